-- Old inbox rows are pruned on a schedule, oldest first; without this index
-- each pruning pass would scan the whole table.
CREATE INDEX inbox_received_at ON inbox (received_at);
