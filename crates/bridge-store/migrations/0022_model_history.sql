-- Every model money or eligibility depends on keeps its history: investor
-- accounts, funds (their terms among them), fund accounts and allocations.
-- A trigger writes the row before and after each change, with who made it
-- (the transaction's `bridge.actor` setting if it set one, else the
-- connection's application_name, which each Bridge process sets to its
-- command), in the same transaction as the change. Appending is the only
-- write to the history, and to transfers' history: a trigger refuses the
-- rest, whatever the code does.
--
-- The trigger also checks versions: an update must move a row from its
-- version N to N + 1. Writers that change a row relative to itself under
-- its lock (`version = version + 1`) always do; a writer that read the row
-- at N and writes `version = N + 1` fails if someone else wrote it since
-- (SQLSTATE 40001, which callers retry from the start of the transaction).
CREATE TABLE model_history (
    id       bigserial PRIMARY KEY,
    model    text NOT NULL,
    key      text NOT NULL,
    version  bigint NOT NULL,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    before   jsonb,
    after    jsonb
);
CREATE INDEX model_history_by_key ON model_history (model, key, id);

CREATE FUNCTION record_model_history() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    current jsonb;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.version <> OLD.version + 1 THEN
        RAISE EXCEPTION 'stale version: % row at version % written as version %',
            TG_TABLE_NAME, OLD.version, NEW.version
            USING ERRCODE = '40001';
    END IF;
    IF TG_OP = 'DELETE' THEN
        current := to_jsonb(OLD);
    ELSE
        current := to_jsonb(NEW);
    END IF;
    INSERT INTO model_history (model, key, version, actor, before, after)
    VALUES (
        TG_TABLE_NAME,
        COALESCE(current->>'id', (current->>'fund_id') || '/' || (current->>'investor_account_id')),
        (current->>'version')::bigint,
        COALESCE(NULLIF(current_setting('bridge.actor', true), ''),
                 NULLIF(current_setting('application_name', true), ''),
                 session_user),
        CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE to_jsonb(OLD) END,
        CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE to_jsonb(NEW) END
    );
    RETURN NULL;
END;
$$;

CREATE TRIGGER investor_accounts_history AFTER INSERT OR UPDATE OR DELETE ON investor_accounts
    FOR EACH ROW EXECUTE FUNCTION record_model_history();
CREATE TRIGGER funds_history AFTER INSERT OR UPDATE OR DELETE ON funds
    FOR EACH ROW EXECUTE FUNCTION record_model_history();
CREATE TRIGGER fund_accounts_history AFTER INSERT OR UPDATE OR DELETE ON fund_accounts
    FOR EACH ROW EXECUTE FUNCTION record_model_history();
CREATE TRIGGER allocations_history AFTER INSERT OR UPDATE OR DELETE ON allocations
    FOR EACH ROW EXECUTE FUNCTION record_model_history();

-- The rows that exist already start their history as they are.
INSERT INTO model_history (model, key, version, actor, after)
SELECT 'investor_accounts', id, version, 'migration 0022', to_jsonb(a) FROM investor_accounts a;
INSERT INTO model_history (model, key, version, actor, after)
SELECT 'funds', id, version, 'migration 0022', to_jsonb(f) FROM funds f;
INSERT INTO model_history (model, key, version, actor, after)
SELECT 'fund_accounts', id, version, 'migration 0022', to_jsonb(f) FROM fund_accounts f;
INSERT INTO model_history (model, key, version, actor, after)
SELECT 'allocations', fund_id || '/' || investor_account_id, version, 'migration 0022', to_jsonb(a) FROM allocations a;

CREATE FUNCTION refuse_history_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END;
$$;

CREATE TRIGGER model_history_append_only BEFORE UPDATE OR DELETE ON model_history
    FOR EACH ROW EXECUTE FUNCTION refuse_history_changes();
CREATE TRIGGER model_history_no_truncate BEFORE TRUNCATE ON model_history
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_history_changes();
CREATE TRIGGER transfer_versions_append_only BEFORE UPDATE OR DELETE ON transfer_versions
    FOR EACH ROW EXECUTE FUNCTION refuse_history_changes();
CREATE TRIGGER transfer_versions_no_truncate BEFORE TRUNCATE ON transfer_versions
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_history_changes();
