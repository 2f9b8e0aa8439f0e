-- Where `bridge rebuild` reads the status topic back into, to compare with
-- the live event log before changing anything.
CREATE TABLE notification_log_rebuild (LIKE notification_log INCLUDING ALL);
