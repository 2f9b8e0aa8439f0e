-- Steps an outside service accepted but has not settled yet. The stage that
-- got "pending" records the step here and moves on; the settlement runner
-- asks the service again (same idempotency key) when next_run_at comes,
-- claiming rows with SKIP LOCKED and a lease, and deletes the row in the
-- transaction that finally applies the step.
CREATE TABLE pending_steps (
    transfer_id  uuid NOT NULL REFERENCES transfers (id),
    step         text NOT NULL CHECK (step IN ('withdrawal', 'deposit')),
    attempts     integer NOT NULL DEFAULT 0,
    next_run_at  timestamptz NOT NULL,
    last_status  text NOT NULL DEFAULT 'pending',
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (transfer_id, step)
);
CREATE INDEX pending_steps_due ON pending_steps (next_run_at);
