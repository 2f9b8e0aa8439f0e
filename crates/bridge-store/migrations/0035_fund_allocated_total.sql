-- A fund's row kept its reserved and its completed total apart. A
-- completion moves a transfer's amount from one to the other: the sum,
-- which the fund's capacity bounds, and its seats stay as they were, yet
-- the completion had to lock the fund's row until it committed, and every
-- validation into that fund queued behind it. The fund's row now holds
-- only what its limits bound: `allocated_minor`, reserved and completed
-- together, beside its seats. The split lives where it always was as
-- well, in each investor's allocation, and is summed from there when it
-- is read. A completion changes allocations only.
ALTER TABLE funds ADD COLUMN allocated_minor bigint NOT NULL DEFAULT 0 CHECK (allocated_minor >= 0);

-- The conversion itself is no change to a fund's books, so it writes no
-- history entry of its own; the version step after it records the row's
-- new shape once.
ALTER TABLE funds DISABLE TRIGGER funds_history;
UPDATE funds SET allocated_minor = reserved_minor + completed_minor;
ALTER TABLE funds ENABLE TRIGGER funds_history;

ALTER TABLE funds DROP CONSTRAINT fund_within_capacity;
ALTER TABLE funds DROP COLUMN reserved_minor, DROP COLUMN completed_minor;
ALTER TABLE funds ADD CONSTRAINT fund_within_capacity CHECK (allocated_minor <= capacity_minor);

SET LOCAL bridge.actor = 'migration 0035';
UPDATE funds SET version = version + 1, updated_at = now();
