-- One transaction applying 16 messages statement by statement (the stage
-- transaction of stage.sql repeated 16 times, one BEGIN/COMMIT), to measure
-- batching without set-based SQL. Message i's fund is drawn from its own
-- range of six, so every batch locks fund rows in ascending order and
-- batches cannot deadlock on them. See docs/PERFORMANCE.md, "Batching".
BEGIN;
\set investor random(1, 10000)
\set fund random(1, 6)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(7, 12)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(13, 18)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(19, 24)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(25, 30)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(31, 36)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(37, 42)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(43, 48)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(49, 54)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(55, 60)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(61, 66)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(67, 72)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(73, 78)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(79, 84)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(85, 90)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
\set investor random(1, 10000)
\set fund random(91, 96)
\set amount random(100, 100000)
INSERT INTO bench_inbox (consumer, message_id) VALUES ('withdrawal', gen_random_uuid()::text);
UPDATE bench_accounts SET balance_minor = balance_minor - :amount, version = version + 1, updated_at = now()
    WHERE id = 'inv-' || :investor AND version = (SELECT version FROM bench_accounts WHERE id = 'inv-' || :investor);
UPDATE bench_accounts SET balance_minor = balance_minor + :amount, version = version + 1, updated_at = now()
    WHERE id = 'fund-' || :fund AND version = (SELECT version FROM bench_accounts WHERE id = 'fund-' || :fund);
WITH posting AS (SELECT gen_random_uuid() AS posting_id, gen_random_uuid() AS transfer_id)
INSERT INTO bench_ledger (posting_id, transfer_id, step, account, direction, amount_minor, currency)
    SELECT posting_id, transfer_id, 'withdrawal', 'inv-' || :investor, 'debit', :amount, 'EUR' FROM posting
    UNION ALL
    SELECT posting_id, transfer_id, 'withdrawal', 'fund-' || :fund, 'credit', :amount, 'EUR' FROM posting;
INSERT INTO bench_outbox (event_id, topic, message_key, payload)
    VALUES (gen_random_uuid(), 'bridge.transfers.withdrawn.v1', 'key', convert_to(repeat('x', 300), 'UTF8'));
COMMIT;
