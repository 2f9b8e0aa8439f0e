-- The relay's claim and the pruning no longer walk index entries of rows
-- that are gone.
--
-- A published row leaves a dead entry in the partial index of unpublished
-- rows until the table is vacuumed, and the claim, which read that index
-- from its start, walked every one of them: its cost grew with the rows
-- published since the last vacuum, whatever the number still to publish.
-- Each row now records the transaction that wrote it, and the relay claims
-- in that order from a cursor: a transaction older than every one running
-- when a claim began has all its rows visible to that claim, so the next
-- claim may start past it (`outbox::Claim::next_start`).
ALTER TABLE outbox ADD COLUMN writer_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX outbox_unpublished_by_writer ON outbox (writer_xid, id) WHERE published_at IS NULL;
DROP INDEX outbox_unpublished;

-- Pruning looked for rows published before the cutoff in id order, and so
-- read every row kept (all of them, in the statement that found nothing
-- more to delete). It now reads only the rows it deletes.
CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;
