-- A target's queue is ordered by the transaction that queued each delivery,
-- and its head is sent only once every transaction older than that one has
-- ended, as the relay claims the outbox (0013).
--
-- The queue was ordered by id alone. Ids are drawn at insert, not at commit,
-- and the notifier's consumer runs one transaction per partition at once, so
-- a delivery with a lower id could become visible after a higher one had
-- been claimed as the head. It then became the head itself: two deliveries
-- of one target were in flight together, and a head waiting for its retry
-- was overtaken. Now no delivery can appear ahead of a head once it is
-- claimable.
ALTER TABLE notification_deliveries ADD COLUMN writer_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX notification_deliveries_queue_by_writer
    ON notification_deliveries (subscription_id, writer_xid, id) WHERE status = 'pending';
DROP INDEX notification_deliveries_queue;
