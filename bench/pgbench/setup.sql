-- Tables shaped like the ones one stage transaction touches, for measuring
-- the ceiling of this machine's Postgres with pgbench (see stage.sql).
DROP TABLE IF EXISTS bench_inbox, bench_accounts, bench_ledger, bench_outbox;
CREATE TABLE bench_inbox (
    consumer text NOT NULL,
    message_id text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
CREATE TABLE bench_accounts (
    id text PRIMARY KEY,
    balance_minor bigint NOT NULL CHECK (balance_minor >= 0),
    held_minor bigint NOT NULL DEFAULT 0,
    version bigint NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE bench_ledger (
    id bigserial PRIMARY KEY,
    posting_id uuid NOT NULL,
    transfer_id uuid NOT NULL,
    step text NOT NULL,
    account text NOT NULL,
    direction text NOT NULL,
    amount_minor bigint NOT NULL,
    currency char(3) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX bench_ledger_one_effect ON bench_ledger (transfer_id, step, direction);
CREATE INDEX bench_ledger_by_account ON bench_ledger (account);
CREATE TABLE bench_outbox (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL,
    topic text NOT NULL,
    message_key bytea,
    payload bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX bench_outbox_unpublished ON bench_outbox (id) WHERE published_at IS NULL;
-- 10,000 investor accounts and 100 fund accounts, so clients rarely wait on
-- one row's lock (the pipeline spreads its load the same way).
INSERT INTO bench_accounts (id, balance_minor)
    SELECT 'inv-' || i, 1000000000000 FROM generate_series(1, 10000) AS i;
INSERT INTO bench_accounts (id, balance_minor)
    SELECT 'fund-' || i, 0 FROM generate_series(1, 100) AS i;
