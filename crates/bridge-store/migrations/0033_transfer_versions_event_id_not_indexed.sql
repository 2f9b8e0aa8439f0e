-- A version's event id is the id of the status event it publishes, derived
-- from the transfer and the version (`bridge_domain::ids::status_event_id`,
-- a name-based UUID), so the primary key on (transfer_id, version) already
-- makes it unique. Its own unique index cost every version written an
-- insert at a random place in a large index, and after each checkpoint
-- most such inserts write a whole index page to the WAL; nothing looks a
-- version up by its event id. The reconciler checks that no two versions
-- share one (invariant I6).
ALTER TABLE transfer_versions DROP CONSTRAINT transfer_versions_event_id_key;
