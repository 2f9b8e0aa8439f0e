-- An update's entry in the history stored the row before and after, and
-- its `before` was always the previous entry's `after`: the trigger fires
-- under the row's lock, so a key's entries are numbered in the order its
-- changes were made, and each moves the version by one. Storing it twice
-- cost a jsonb conversion and an image's WAL on every change to the books
-- (about five per transfer). An update now stores only the row after it;
-- `bridge_store::history` reads its `before` from the entry of the
-- version below. Inserts store `after`, deletes `before`, as they did, and
-- the entries written before this migration keep both.
--
-- The key and version come from the row itself rather than from its jsonb
-- image: each trigger's table is fixed, so PL/pgSQL prepares the branch
-- its table takes, and no other.
CREATE OR REPLACE FUNCTION record_model_history() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed record;
    row_key text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.version <> OLD.version + 1 THEN
        RAISE EXCEPTION 'stale version: % row at version % written as version %',
            TG_TABLE_NAME, OLD.version, NEW.version
            USING ERRCODE = '40001';
    END IF;
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSE
        changed := NEW;
    END IF;
    IF TG_TABLE_NAME = 'allocations' THEN
        row_key := changed.fund_id || '/' || changed.investor_account_id;
    ELSE
        row_key := changed.id;
    END IF;
    INSERT INTO model_history (model, key, version, actor, before, after)
    VALUES (
        TG_TABLE_NAME,
        row_key,
        changed.version,
        COALESCE(NULLIF(current_setting('bridge.actor', true), ''),
                 NULLIF(current_setting('application_name', true), ''),
                 session_user),
        CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) END,
        CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END
    );
    RETURN NULL;
END;
$$;
