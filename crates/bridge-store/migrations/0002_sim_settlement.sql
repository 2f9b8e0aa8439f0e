-- Asynchronous settlement at the simulated services: an operation can be
-- accepted as 'pending' and become its final outcome at settles_at.
ALTER TABLE sim_operations
    ADD COLUMN final_outcome text,
    ADD COLUMN settles_at timestamptz;
