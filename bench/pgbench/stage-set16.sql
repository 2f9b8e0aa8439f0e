-- One transaction applying 16 messages set-based: each statement of
-- stage.sql runs once for the whole batch (held in a temporary table), the
-- balance updates summed per account. See docs/PERFORMANCE.md, "Batching".
BEGIN;
CREATE TEMP TABLE IF NOT EXISTS b (investor text, fund text, amount bigint, transfer uuid) ON COMMIT DELETE ROWS;
INSERT INTO b SELECT 'inv-' || (1 + floor(random() * 10000))::int, 'fund-' || (1 + floor(random() * 100))::int,
    (100 + floor(random() * 100000))::bigint, gen_random_uuid() FROM generate_series(1, 16);
INSERT INTO bench_inbox (consumer, message_id) SELECT 'withdrawal', transfer::text FROM b;
UPDATE bench_accounts a SET balance_minor = a.balance_minor - d.amount, version = a.version + 1, updated_at = now()
    FROM (SELECT investor, sum(amount) AS amount FROM b GROUP BY investor ORDER BY investor) d WHERE a.id = d.investor;
UPDATE bench_accounts a SET balance_minor = a.balance_minor + d.amount, version = a.version + 1, updated_at = now()
    FROM (SELECT fund, sum(amount) AS amount FROM b GROUP BY fund ORDER BY fund) d WHERE a.id = d.fund;
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT transfer, transfer, 'withdrawal', investor, 'debit', amount, 'EUR' FROM b
    UNION ALL SELECT transfer, transfer, 'withdrawal', fund, 'credit', amount, 'EUR' FROM b;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    SELECT transfer, 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8') FROM b;
COMMIT;
