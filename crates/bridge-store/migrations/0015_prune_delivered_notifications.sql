-- Delivered notifications are pruned on a schedule, oldest first, once past
-- their retention; without this index each pass would scan the whole table,
-- which otherwise grows by one row per event and target for ever. Pending
-- and dead deliveries are never pruned: the first are still to be sent, the
-- second wait for an operator (`bridge notify redrive`).
CREATE INDEX notification_deliveries_delivered
    ON notification_deliveries (finished_at) WHERE status = 'delivered';
