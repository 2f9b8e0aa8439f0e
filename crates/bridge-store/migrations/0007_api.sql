-- API keys. The key itself is shown once at creation; only its SHA-256 is
-- kept (keys carry 256 random bits, so a fast hash is enough), with a public
-- prefix to find the row without scanning.
CREATE TABLE api_keys (
    id                   uuid PRIMARY KEY,
    prefix               text NOT NULL UNIQUE,
    hash                 bytea NOT NULL,
    name                 text NOT NULL,
    scopes               text[] NOT NULL,
    -- A key bound to one investor sees and creates only their transfers.
    investor_account_id  text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    revoked_at           timestamptz
);

-- Idempotency-Key handling for POST /v1/transfers: per API key, the first
-- request's fingerprint and the response it got, written in the transaction
-- that created the transfer.
CREATE TABLE api_idempotency (
    api_key_id       uuid NOT NULL REFERENCES api_keys (id),
    idempotency_key  text NOT NULL,
    request_hash     bytea NOT NULL,
    transfer_id      uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, idempotency_key)
);

-- Listing transfers newest first, page by page.
CREATE INDEX transfers_created ON transfers (created_at DESC, id DESC);
