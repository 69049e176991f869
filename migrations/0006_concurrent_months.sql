-- The recorder writes the rows of each source partition in a transaction of its own, concurrently:
-- two of them may create the same month's partition at once. The advisory lock queues them, but
-- the second one's catalog lookup can still miss the table the first one just committed, so a
-- creation that finds the partition already there counts as done.
CREATE OR REPLACE FUNCTION foresight_ensure_month(at timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    start timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name  text := format('events_%s', to_char(start AT TIME ZONE 'UTC', 'YYYY_MM'));
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN name;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('foresight_ensure_month'));
    BEGIN
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
            name, start, start + interval '1 month');
    EXCEPTION WHEN duplicate_table THEN
        NULL;
    END;
    RETURN name;
END
$$;
