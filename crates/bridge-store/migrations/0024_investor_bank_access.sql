-- An investor's own access to their bank account (an open-banking access
-- token or consent), so a withdrawal carries the consent of the investor
-- whose money moves, not only Bridge's service token. The token itself is
-- in `credentials`, sealed under its own data key with its name
-- (`investor-bank-access/<investor>`) as associated data, so a ciphertext
-- moved to another investor's row does not open; key rotation reseals it
-- with every other credential. This table keeps what may be shown: that it
-- is there, the consent's id, scopes and expiry, when it was set and last
-- used, and whether it was revoked.
CREATE TABLE investor_bank_access (
    investor_account_id text PRIMARY KEY REFERENCES investor_accounts (id),
    consent_id          text NOT NULL,
    scopes              text[] NOT NULL DEFAULT '{}',
    expires_at          timestamptz,
    set_at              timestamptz NOT NULL DEFAULT now(),
    set_by              text NOT NULL,
    last_used_at        timestamptz,
    revoked_at          timestamptz
);

-- The simulated bank's side: the consents it issued (tokens kept as their
-- SHA-256 only, as a bank would), and which consent each withdrawal it was
-- asked for carried.
CREATE TABLE sim_bank_consents (
    token_sha256 bytea PRIMARY KEY,
    consent_id   text NOT NULL UNIQUE,
    account_id   text NOT NULL,
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz
);
CREATE INDEX sim_bank_consents_by_account ON sim_bank_consents (account_id);

CREATE TABLE sim_bank_access_seen (
    id               bigserial PRIMARY KEY,
    idempotency_key  text NOT NULL,
    account_id       text NOT NULL,
    consent_id       text,
    verdict          text NOT NULL,
    at               timestamptz NOT NULL DEFAULT now()
);
