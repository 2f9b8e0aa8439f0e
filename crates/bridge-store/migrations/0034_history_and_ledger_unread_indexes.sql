-- Two indexes that every step paid for and no query reads.
--
-- The models' history is read by key, newest first (`bridge_store::history`,
-- the reconciler's last-entry check), through its index on (model, key,
-- id); nothing looks an entry up by its id alone. That index becomes the
-- primary key, and the separate one on the id goes: one index insert less
-- for each of the five entries a transfer writes.
--
-- The ledger's index on its account served no query: the reconciler sums
-- every account at once, reading the whole table, and a transfer's lines
-- are found through its unique index on (transfer_id, step, direction). Two
-- of a transfer's four lines name the one in-transit account, so each
-- step's insert went to the same few leaf pages as every other stage's.
ALTER TABLE model_history DROP CONSTRAINT model_history_pkey;
DROP INDEX model_history_by_key;
ALTER TABLE model_history ADD PRIMARY KEY (model, key, id);

DROP INDEX ledger_by_account;
