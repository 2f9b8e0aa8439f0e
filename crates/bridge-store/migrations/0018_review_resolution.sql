-- Who moved a transfer when it was not a stage (an operator resolving a
-- manual review), why in their words, and the outside operation they
-- named. NULL for the pipeline's own steps: the version's event names the
-- stage.
ALTER TABLE transfer_versions
    ADD COLUMN actor text,
    ADD COLUMN note text,
    ADD COLUMN external_reference text;

-- The attempt of a transfer's money-step idempotency keys: 0 until an
-- operator retries a step whose first operation the service has voided,
-- under a new key.
ALTER TABLE transfers ADD COLUMN step_attempt integer NOT NULL DEFAULT 0 CHECK (step_attempt >= 0);

-- Operators' resolutions of manual reviews: what was asked, by whom, who
-- approved it (four-eyes), and how it ended. One resolution at a time per
-- review: the unique index makes a second operator acting on the same
-- review lose, whatever the timing.
CREATE TABLE review_actions (
    id               uuid PRIMARY KEY,
    transfer_id      uuid NOT NULL REFERENCES transfers (id),
    review_version   bigint NOT NULL,
    action           text NOT NULL CHECK (action IN ('retry', 'fail', 'refunded', 'complete')),
    new_attempt      boolean NOT NULL DEFAULT false,
    reason           text NOT NULL CHECK (length(reason) BETWEEN 1 AND 1000),
    reference        text CHECK (length(reference) <= 200),
    requested_by     text NOT NULL,
    requested_by_id  text NOT NULL,
    requested_at     timestamptz NOT NULL DEFAULT now(),
    approved_by      text,
    approved_by_id   text,
    approved_at      timestamptz,
    status           text NOT NULL
                     CHECK (status IN ('awaiting_approval', 'running', 'done', 'not_applied', 'rejected')),
    outcome          text,
    result_state     text,
    idempotency_key  text UNIQUE,
    finished_at      timestamptz,
    CHECK (approved_by_id IS NULL OR approved_by_id <> requested_by_id)
);
CREATE UNIQUE INDEX review_actions_one_open_per_review
    ON review_actions (transfer_id, review_version) WHERE status IN ('awaiting_approval', 'running', 'done');
CREATE INDEX review_actions_by_transfer ON review_actions (transfer_id, requested_at);
