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
