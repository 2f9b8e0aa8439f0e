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
