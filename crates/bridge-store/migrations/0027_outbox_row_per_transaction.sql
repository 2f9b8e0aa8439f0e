-- One outbox row per writing transaction, holding its messages in order,
-- instead of one row per message.
--
-- Each row costs Postgres a heap tuple, an entry in each of the two
-- indexes, and a delete once published, whatever its size: about a third
-- of the rows a transfer wrote were outbox rows inserted and deleted. A
-- step writes two messages (its outcome and its status event), and a
-- batch of transfers committed together writes two per transfer, so the
-- relay now claims, publishes and deletes a transaction's messages as one.
-- The order of the relay's claim (writer, then id) is unchanged, and a
-- row's messages are published in their order, so each transfer's events
-- stay in order.
--
-- A message's headers are the next `header_counts[i]` entries of
-- `header_names` and `header_values`, which already held one message's.
ALTER TABLE outbox
    ADD COLUMN event_ids uuid[],
    ADD COLUMN topics text[],
    ADD COLUMN message_keys bytea[],
    ADD COLUMN payloads bytea[],
    ADD COLUMN header_counts integer[];

CREATE FUNCTION outbox_header_total(counts integer[]) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT coalesce(sum(count), 0) FROM unnest(counts) count $$;

UPDATE outbox
SET event_ids = ARRAY[event_id],
    topics = ARRAY[topic],
    message_keys = ARRAY[message_key],
    payloads = ARRAY[payload],
    header_counts = ARRAY[cardinality(header_names)];

ALTER TABLE outbox
    DROP COLUMN event_id,
    DROP COLUMN topic,
    DROP COLUMN message_key,
    DROP COLUMN payload,
    ALTER COLUMN event_ids SET NOT NULL,
    ALTER COLUMN topics SET NOT NULL,
    ALTER COLUMN message_keys SET NOT NULL,
    ALTER COLUMN payloads SET NOT NULL,
    ALTER COLUMN header_counts SET NOT NULL,
    ADD CONSTRAINT outbox_messages_aligned CHECK (
        cardinality(topics) >= 1
        AND cardinality(event_ids) = cardinality(topics)
        AND cardinality(message_keys) = cardinality(topics)
        AND cardinality(payloads) = cardinality(topics)
        AND cardinality(header_counts) = cardinality(topics)
        AND cardinality(header_names) = cardinality(header_values)
        AND 0 <= ALL (header_counts)
        AND outbox_header_total(header_counts) = cardinality(header_names)
    );

-- A batch's messages make a row of tens of kilobytes, which Postgres
-- compresses before moving it out of line: lz4 does that several times
-- faster than the default, where the server was built with it.
DO $$
BEGIN
    ALTER TABLE outbox
        ALTER COLUMN payloads SET COMPRESSION lz4,
        ALTER COLUMN header_values SET COMPRESSION lz4,
        ALTER COLUMN header_names SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available; the outbox keeps the default compression';
END;
$$;
