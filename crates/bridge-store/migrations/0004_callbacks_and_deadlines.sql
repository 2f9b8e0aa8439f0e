-- Settlement callbacks from the account services: each delivery's
-- webhook-id is remembered so a captured request cannot be replayed inside
-- the signature's timestamp tolerance. Rows older than that window are
-- pruned; the signature check refuses anything that old anyway.
CREATE TABLE callback_receipts (
    service      text NOT NULL,
    webhook_id   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, webhook_id)
);
CREATE INDEX callback_receipts_age ON callback_receipts (received_at);

-- When a pending step has waited too long and its deadline policy applies.
ALTER TABLE pending_steps ADD COLUMN deadline_at timestamptz;

-- Reservations expire: the sweep looks for transfers validated long ago.
-- The index holds only transfers waiting for their withdrawal, so it stays
-- small however many transfers the table keeps.
CREATE INDEX transfers_validated_since ON transfers (updated_at) WHERE state = 'validated';

-- Manual review freezes a transfer where it stood: entered from 'validated'
-- the funds stay held, entered from 'withdrawn' the money stays in transit.
-- The reconciler checks the books against this phase rather than the state.
CREATE VIEW transfer_phases AS
SELECT t.id, t.investor_account_id, t.fund_id, t.amount_minor, t.currency, t.state,
       CASE WHEN t.state = 'manual_review' THEN v.previous_state ELSE t.state END AS phase
FROM transfers t
LEFT JOIN transfer_versions v ON v.transfer_id = t.id AND v.version = t.version AND t.state = 'manual_review';
