-- The upstream systems allowed to publish transfer requests: each signs its
-- requests with a secret of its own (sealed in `credentials`, named here),
-- and may move only the money of the investors and into the funds listed
-- (exact ids, or prefixes ending in '*'; '*' alone for all).
CREATE TABLE request_sources (
    name               text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    investors          text[] NOT NULL CHECK (cardinality(investors) > 0),
    funds              text[] NOT NULL CHECK (cardinality(funds) > 0),
    secret_credential  text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    revoked_at         timestamptz
);
