-- The outbox's CHECK adds up a row's header counts with
-- `outbox_header_total`. As an SQL function whose body has a FROM clause it
-- cannot be inlined, so Postgres parsed and planned its body again for
-- every insert (the CHECK's expression is prepared per statement): about
-- a third of an outbox insert's cost. PL/pgSQL compiles a function once
-- per session and keeps it. Same name, arguments and answer: the CHECK
-- keeps referring to it, and nothing that writes or reads the outbox
-- changes.
CREATE OR REPLACE FUNCTION outbox_header_total(counts integer[]) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    total bigint := 0;
    count integer;
BEGIN
    FOREACH count IN ARRAY counts LOOP
        total := total + coalesce(count, 0);
    END LOOP;
    RETURN total;
END;
$$;

-- The CHECK also refuses NULL among a row's messages and headers (only a
-- message's key may be absent): `0 <= ALL (...)` lets a NULL count pass,
-- and a row the relay cannot read would stop it at that row.
ALTER TABLE outbox
    DROP CONSTRAINT outbox_messages_aligned,
    ADD CONSTRAINT outbox_messages_aligned CHECK (
        cardinality(topics) >= 1
        AND cardinality(event_ids) = cardinality(topics)
        AND cardinality(message_keys) = cardinality(topics)
        AND cardinality(payloads) = cardinality(topics)
        AND cardinality(header_counts) = cardinality(topics)
        AND cardinality(header_names) = cardinality(header_values)
        AND 0 <= ALL (header_counts)
        AND outbox_header_total(header_counts) = cardinality(header_names)
        AND array_position(event_ids, NULL) IS NULL
        AND array_position(topics, NULL) IS NULL
        AND array_position(payloads, NULL) IS NULL
        AND array_position(header_counts, NULL) IS NULL
        AND array_position(header_names, NULL) IS NULL
        AND array_position(header_values, NULL) IS NULL
    );
