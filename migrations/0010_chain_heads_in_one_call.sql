-- Appending to the audit log (`audit::append`) locks the chains it extends before anything else.
-- That took three round trips per transaction: make sure each month's partition exists, create
-- the heads of new chains, lock and read the heads. This function does the three in one call.
-- The heads are created and locked in chain order, so concurrent appenders cannot deadlock; a
-- caller that waited for a head's lock reads the head as the other appender committed it.
CREATE FUNCTION foresight_lock_chains(chains text[], months timestamptz[])
RETURNS TABLE (head_chain text, head_seq bigint, head_hash bytea)
LANGUAGE plpgsql SET search_path = public AS $$
BEGIN
    PERFORM foresight_ensure_month(m) FROM UNNEST(months) AS m;
    INSERT INTO audit_chain_heads (chain, seq, hash)
        SELECT c, 0, '\x'::bytea FROM UNNEST(chains) AS c ORDER BY c
        ON CONFLICT (chain) DO NOTHING;
    RETURN QUERY
        SELECT h.chain, h.seq, h.hash FROM audit_chain_heads h
        WHERE h.chain = ANY (chains) ORDER BY h.chain FOR UPDATE;
END
$$;
REVOKE ALL ON FUNCTION foresight_lock_chains(text[], timestamptz[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION foresight_lock_chains(text[], timestamptz[]) TO foresight_writer;
