-- One stage transaction, as the pipeline runs it for one message: the
-- inbox row that makes the message idempotent, two version-checked balance
-- updates, a two-row ledger posting and one outbox row, committed with
-- synchronous_commit on (the server default; nothing here turns it off).
\set investor random(1, 10000)
\set fund random(1, 100)
\set amount random(100, 100000)
BEGIN;
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
