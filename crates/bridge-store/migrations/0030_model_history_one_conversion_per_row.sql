-- The history trigger (migration 0022) converted the new row to jsonb twice
-- per change: once to read its key and version, once to store it. The
-- conversion is most of the trigger's cost, and the trigger fires for
-- every change to the books (about five per transfer), so each image is
-- now converted once and reused. What it writes is unchanged.
CREATE OR REPLACE FUNCTION record_model_history() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    before_row jsonb;
    after_row jsonb;
    current jsonb;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.version <> OLD.version + 1 THEN
        RAISE EXCEPTION 'stale version: % row at version % written as version %',
            TG_TABLE_NAME, OLD.version, NEW.version
            USING ERRCODE = '40001';
    END IF;
    IF TG_OP <> 'INSERT' THEN
        before_row := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        after_row := to_jsonb(NEW);
    END IF;
    current := COALESCE(after_row, before_row);
    INSERT INTO model_history (model, key, version, actor, before, after)
    VALUES (
        TG_TABLE_NAME,
        COALESCE(current->>'id', (current->>'fund_id') || '/' || (current->>'investor_account_id')),
        (current->>'version')::bigint,
        COALESCE(NULLIF(current_setting('bridge.actor', true), ''),
                 NULLIF(current_setting('application_name', true), ''),
                 session_user),
        before_row,
        after_row
    );
    RETURN NULL;
END;
$$;
