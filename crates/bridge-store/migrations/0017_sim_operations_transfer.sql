-- The transfer a simulated operation was made for, as the simulator read it
-- from the idempotency key when it stored the operation (NULL for a key
-- Bridge did not make). The reconciler, the demo and the tests join on it,
-- so the key's layout is known in one place (`bridge_domain::ids`). No
-- index: they join it to the transfers' primary key, and every simulated
-- call would pay for one.
ALTER TABLE sim_operations ADD COLUMN transfer_id uuid;

-- Operations stored before this column existed.
UPDATE sim_operations SET transfer_id = substring(idempotency_key FROM 8 FOR 36)::uuid
WHERE idempotency_key ~ '^bridge-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}-';

-- An account the simulated bank does not know: it answers 404 before
-- acting, as a bank does for an account number it has never issued.
ALTER TABLE sim_accounts DROP CONSTRAINT sim_accounts_status_check;
ALTER TABLE sim_accounts ADD CONSTRAINT sim_accounts_status_check
    CHECK (status IN ('active', 'frozen', 'closed', 'no_credits', 'unknown'));
