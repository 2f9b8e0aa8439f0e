-- Which transfers a change to a model came with. Each history row and each
-- transfer version records the transaction that wrote it, so an entry of a
-- model's history names the transfers whose versions the same transaction
-- recorded: the validator's hold for transfer X, the deposit's credit for
-- Y (`bridge_store::accounts::history`). A BRIN index on the versions' time
-- (a transaction's start, the same for all it writes) finds them: rows are
-- written in roughly the order their transactions start, and a BRIN index
-- costs the writers of this busy table next to nothing, where a b-tree
-- would add an index insert to every step.
ALTER TABLE model_history ADD COLUMN xid xid8;
ALTER TABLE model_history ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
ALTER TABLE transfer_versions ADD COLUMN xid xid8;
ALTER TABLE transfer_versions ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX transfer_versions_by_time ON transfer_versions USING brin (recorded_at)
    WITH (pages_per_range = 16, autosummarize = on);
