-- Operator console sessions. The browser holds a random token in an
-- HttpOnly cookie; only its SHA-256 is kept. A session belongs to the API
-- key that signed in: its scopes are read from the key on every request, so
-- revoking the key ends its sessions at once. csrf_token is the
-- synchronizer token every form of the session carries.
CREATE TABLE console_sessions (
    token_hash    bytea PRIMARY KEY,
    api_key_id    uuid NOT NULL REFERENCES api_keys (id),
    csrf_token    text NOT NULL,
    source        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    ended_at      timestamptz
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);

-- The console finds transfers by reason code; only transfers that did not
-- go the happy way have one, so the index stays small and costs the happy
-- path nothing.
CREATE INDEX transfers_reason ON transfers (reason_code) WHERE reason_code IS NOT NULL;
