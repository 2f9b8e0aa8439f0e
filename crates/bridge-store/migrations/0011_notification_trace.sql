-- The trace a status event belongs to, so a webhook delivery carries it on
-- (W3C traceparent) and the receiver's work joins the transfer's trace.
ALTER TABLE notification_log ADD COLUMN traceparent text;
ALTER TABLE notification_log_rebuild ADD COLUMN traceparent text;
