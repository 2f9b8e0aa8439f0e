-- The relay deletes a row in the transaction that saw it acknowledged,
-- instead of stamping `published_at` and pruning it an hour later.
--
-- Marking a row published wrote a whole new version of it (payload and
-- headers included) plus an entry in the index of published rows, and a
-- pruning pass later deleted it: three writes of every event, and on a run
-- of 100,000 transfers more than half of the full-page images in the WAL
-- came from the outbox. A delete writes only the old row's header. What was
-- published stays in Kafka (and status events in the notification log), so
-- the outbox holds exactly what is still to publish.
DELETE FROM outbox WHERE published_at IS NOT NULL;
DROP INDEX outbox_published;
-- Dropping the column drops the partial index whose predicate named it.
ALTER TABLE outbox DROP COLUMN published_at;
CREATE INDEX outbox_by_writer ON outbox (writer_xid, id);
