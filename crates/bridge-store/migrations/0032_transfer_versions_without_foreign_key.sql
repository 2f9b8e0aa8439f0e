-- A transfer's versions named it through a foreign key, checked for every
-- version written (five per transfer) by a lookup of the transfer and a
-- lock on its row. The reference holds without it: every statement that
-- writes a version takes the row from the transfer the same statement
-- inserts or updates (`bridge_store::transfers`), so a version cannot be
-- written for a transfer that does not exist. The one other thing the key
-- did was stop a transfer with versions being deleted; no transfer is ever
-- deleted (a finished one is the record of what happened), and a trigger
-- now refuses that outright, as it does for the histories. The reconciler
-- checks that every version belongs to a transfer (invariant I6).
ALTER TABLE transfer_versions DROP CONSTRAINT transfer_versions_transfer_id_fkey;

CREATE FUNCTION refuse_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rows of % are never deleted', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER transfers_never_deleted BEFORE DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION refuse_deletes();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_deletes();
