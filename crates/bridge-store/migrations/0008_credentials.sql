-- Credentials for outside services, encrypted (envelope encryption; see the
-- bridge-secrets crate). No plaintext and no master key is ever stored.
CREATE TABLE credentials (
    name         text PRIMARY KEY,
    -- The master key that seals the data key.
    key_id       text NOT NULL,
    -- nonce || AES-256-GCM(master key, data key), associated data names the row.
    wrapped_key  bytea NOT NULL,
    -- nonce || AES-256-GCM(data key, value), associated data names the row.
    ciphertext   bytea NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
