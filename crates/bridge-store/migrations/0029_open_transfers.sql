-- Every step updates its transfer's row. Postgres writes such an update as
-- a heap-only tuple, next to the old one and with no new index entries,
-- only when no indexed column changes and the page has room. `state` was
-- indexed (transfers_open) and so was `updated_at` (transfers_validated_since),
-- so each of a transfer's updates added an entry to every index of the
-- table: four or five index inserts per step, on the busiest table.
--
-- The transfers not yet in a final state are listed here instead, written
-- in the statements that create and advance transfers
-- (`bridge_store::transfers`): a row when a transfer is recorded in an open
-- state, deleted when it reaches a final one. Keyed by the transfer's
-- creation time, so the search for reservations validated long ago reads
-- only the transfers created before the cutoff. No foreign key: the row is
-- written with the transfer's, and the reconciler checks that this list and
-- the transfers' states agree.
CREATE TABLE open_transfers (
    created_at   timestamptz NOT NULL,
    transfer_id  uuid NOT NULL,
    PRIMARY KEY (created_at, transfer_id)
);

INSERT INTO open_transfers (created_at, transfer_id)
SELECT created_at, id FROM transfers WHERE state NOT IN ('completed', 'rejected', 'failed', 'reversed');

DROP INDEX transfers_open;
DROP INDEX transfers_validated_since;

-- Room on each page for a transfer's later versions, so its updates can
-- stay on its page. Applies to pages written from now on.
ALTER TABLE transfers SET (fillfactor = 70);
