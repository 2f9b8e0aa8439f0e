-- Notifications. Who hears about which status changes, over which channel.
-- subscriber_id is an investor account id or a fund account id; operators
-- hear about every transfer. states lists the transfer states (event types)
-- wanted; empty means all.
CREATE TABLE notification_subscriptions (
    id                    bigserial PRIMARY KEY,
    subscriber_kind       text NOT NULL CHECK (subscriber_kind IN ('investor', 'fund', 'operator')),
    subscriber_id         text,
    states                text[] NOT NULL DEFAULT '{}',
    channel               text NOT NULL CHECK (channel IN ('webhook', 'slack', 'sms', 'email')),
    target                text NOT NULL,
    -- Standard Webhooks signing secret(s), comma-separated during a rotation.
    secret                text,
    enabled               boolean NOT NULL DEFAULT true,
    disabled_reason       text,
    -- Since when every delivery to this target has failed; NULL while it works.
    failing_since         timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CHECK ((subscriber_kind = 'operator') = (subscriber_id IS NULL))
);

-- The event log channel: every status event the notifier received, once,
-- whatever the subscriptions. It is also the notifier's inbox.
CREATE TABLE notification_log (
    event_id     uuid PRIMARY KEY,
    transfer_id  uuid NOT NULL,
    version      bigint NOT NULL,
    state        text NOT NULL,
    event        jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_log_transfer ON notification_log (transfer_id, version);

-- One row per (target, event): its own queue per target, in event order.
CREATE TABLE notification_deliveries (
    id               bigserial PRIMARY KEY,
    subscription_id  bigint NOT NULL REFERENCES notification_subscriptions (id),
    event_id         uuid NOT NULL REFERENCES notification_log (event_id),
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    leased_until     timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (subscription_id, event_id)
);
-- Each target's queue head is the lowest pending id of its subscription.
CREATE INDEX notification_deliveries_queue ON notification_deliveries (subscription_id, id) WHERE status = 'pending';
