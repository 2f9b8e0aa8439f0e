-- The outbox no longer notifies from inside the writing transaction.
-- Postgres takes a database-wide lock at the commit of every transaction
-- that issued NOTIFY and holds it until the commit is durable, so with the
-- trigger every stage transaction committed one after another: no two
-- commits could share a WAL flush. Writers now wake the relay after their
-- commit, in a transaction of their own (`outbox::wake_relay`); the relay
-- still polls, so a lost wake-up costs latency, never a message.
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
DROP FUNCTION IF EXISTS outbox_notify();
