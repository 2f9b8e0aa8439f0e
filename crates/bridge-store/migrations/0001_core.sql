-- Core schema of Bridge. Money columns are bigint minor units with a
-- three-letter currency; there is no floating-point column anywhere.
-- CHECK constraints restate invariant I5 so that even a faulty code path
-- cannot commit a negative available balance or an over-full fund.

CREATE TABLE investor_accounts (
    id              text PRIMARY KEY,
    currency        char(3) NOT NULL,
    balance_minor   bigint NOT NULL CHECK (balance_minor >= 0),
    held_minor      bigint NOT NULL DEFAULT 0 CHECK (held_minor >= 0),
    version         bigint NOT NULL DEFAULT 1,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT investor_available_non_negative CHECK (held_minor <= balance_minor)
);

CREATE TABLE funds (
    id                        text PRIMARY KEY,
    name                      text NOT NULL,
    currency                  char(3) NOT NULL,
    minimum_investment_minor  bigint NOT NULL CHECK (minimum_investment_minor > 0),
    seats_max                 integer NOT NULL CHECK (seats_max > 0),
    capacity_minor            bigint NOT NULL CHECK (capacity_minor > 0),
    investors_count           integer NOT NULL DEFAULT 0 CHECK (investors_count >= 0),
    reserved_minor            bigint NOT NULL DEFAULT 0 CHECK (reserved_minor >= 0),
    completed_minor           bigint NOT NULL DEFAULT 0 CHECK (completed_minor >= 0),
    version                   bigint NOT NULL DEFAULT 1,
    updated_at                timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT fund_within_seats CHECK (investors_count <= seats_max),
    CONSTRAINT fund_within_capacity CHECK (reserved_minor + completed_minor <= capacity_minor)
);

CREATE TABLE fund_accounts (
    id             text PRIMARY KEY,
    fund_id        text NOT NULL REFERENCES funds (id),
    currency       char(3) NOT NULL,
    balance_minor  bigint NOT NULL DEFAULT 0 CHECK (balance_minor >= 0),
    version        bigint NOT NULL DEFAULT 1,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- An investor's stake in a fund. A row with reserved + completed > 0 takes
-- one of the fund's seats.
CREATE TABLE allocations (
    fund_id              text NOT NULL REFERENCES funds (id),
    investor_account_id  text NOT NULL REFERENCES investor_accounts (id),
    reserved_minor       bigint NOT NULL DEFAULT 0 CHECK (reserved_minor >= 0),
    completed_minor      bigint NOT NULL DEFAULT 0 CHECK (completed_minor >= 0),
    version              bigint NOT NULL DEFAULT 1,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (fund_id, investor_account_id)
);

-- The current state of each transfer. Requests that fail validation are kept
-- too (state rejected), so the columns hold what the request said, which may
-- name unknown accounts or an invalid currency: hence no foreign keys here.
CREATE TABLE transfers (
    id                   uuid PRIMARY KEY,
    investor_account_id  text NOT NULL,
    fund_account_id      text NOT NULL,
    fund_id              text,
    amount_minor         bigint NOT NULL,
    currency             text NOT NULL,
    reference            text NOT NULL DEFAULT '',
    source_system        text NOT NULL DEFAULT '',
    requested_at         timestamptz NOT NULL,
    state                text NOT NULL,
    reason_code          text,
    version              bigint NOT NULL,
    traceparent          text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transfers_open ON transfers (state)
    WHERE state NOT IN ('completed', 'rejected', 'failed', 'reversed');
-- state is one of: requested, validated, withdrawn, deposited, completed,
-- rejected, failed, reversed, manual_review (see bridge-domain).
CREATE INDEX transfers_investor ON transfers (investor_account_id);

-- Full versioning (invariant I6): one row per state a transfer has been in,
-- never updated, never deleted.
CREATE TABLE transfer_versions (
    transfer_id     uuid NOT NULL REFERENCES transfers (id),
    version         bigint NOT NULL CHECK (version >= 1),
    state           text NOT NULL,
    previous_state  text,
    reason_code     text,
    event_id        uuid NOT NULL UNIQUE,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transfer_id, version)
);

-- Double-entry ledger (invariant I1). Every posting is one debit and one
-- credit of the same amount. The unique index makes a second application of
-- one step of one transfer impossible (invariant I2).
CREATE TABLE ledger_entries (
    id            bigserial PRIMARY KEY,
    posting_id    uuid NOT NULL,
    transfer_id   uuid REFERENCES transfers (id),
    step          text NOT NULL,
    account       text NOT NULL,
    direction     text NOT NULL CHECK (direction IN ('debit', 'credit')),
    amount_minor  bigint NOT NULL CHECK (amount_minor > 0),
    currency      char(3) NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX ledger_one_effect_per_step
    ON ledger_entries (transfer_id, step, direction) WHERE transfer_id IS NOT NULL;
CREATE INDEX ledger_by_account ON ledger_entries (account);

-- Consumer-side deduplication: a message id is applied once per consumer.
CREATE TABLE inbox (
    consumer     text NOT NULL,
    message_id   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Transactional outbox. Rows are written in the same transaction as the state
-- change they announce; the relay publishes them and stamps published_at.
CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    event_id       uuid NOT NULL,
    topic          text NOT NULL,
    message_key    bytea,
    payload        bytea NOT NULL,
    header_names   text[] NOT NULL DEFAULT '{}',
    header_values  bytea[] NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text
);
-- The relay's work queue: only unpublished rows, so its scan stays small
-- however long the table grows.
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bridge_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- The account-service simulator's own books: what the "bank" and the "fund
-- administrator" really did, keyed by the idempotency key we sent. Kept apart
-- from our ledger so tests can compare the two.
CREATE TABLE sim_accounts (
    id      text PRIMARY KEY,
    status  text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'frozen', 'closed', 'no_credits'))
);
CREATE TABLE sim_operations (
    idempotency_key  text PRIMARY KEY,
    operation        text NOT NULL,
    account_id       text NOT NULL,
    amount_minor     bigint NOT NULL,
    currency         char(3) NOT NULL,
    outcome          text NOT NULL,
    reference        text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
