-- The audit log made trustworthy and keepable: monthly partitions, a hash chain per source
-- partition, roles that can only append or only read, and the views people ask questions with.

-- Views over `events` are recreated below, on the partitioned table.
DROP VIEW decisions, outcomes, scores, failures;

ALTER TABLE events RENAME TO events_unpartitioned;
ALTER TRIGGER events_append_only ON events_unpartitioned RENAME TO events_unpartitioned_append_only;
ALTER TRIGGER events_no_truncate ON events_unpartitioned RENAME TO events_unpartitioned_no_truncate;
ALTER INDEX events_type_time RENAME TO events_unpartitioned_type_time;
ALTER INDEX events_entity_time RENAME TO events_unpartitioned_entity_time;

-- Partitioned by month of event time, so that old months can be detached (and archived or
-- dropped) without touching the rest. The key includes the partition key, as Postgres requires;
-- an event's id is derived from its content including its time, so (id, event_time) identifies
-- an event exactly as the id does.
CREATE TABLE events (
    id               uuid        NOT NULL,
    type             text        NOT NULL,
    entity           text        NOT NULL,
    event_time       timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    schema_version   integer     NOT NULL,
    payload          jsonb       NOT NULL,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    -- Tamper evidence: rows of one chain (one source topic partition, written by one recorder at
    -- a time) are numbered 1, 2, ... and each hash covers the previous row's hash and this row's
    -- digest (foresight_row_digest): an edited, removed or inserted row breaks the chain from
    -- there on, and `foresight audit verify` names it.
    chain            text        NOT NULL,
    seq              bigint      NOT NULL,
    prev_hash        bytea       NOT NULL,
    hash             bytea       NOT NULL,
    PRIMARY KEY (id, event_time)
) PARTITION BY RANGE (event_time);

CREATE INDEX events_type_time ON events (type, event_time);
CREATE INDEX events_entity_time ON events (entity, event_time);
CREATE INDEX events_chain_seq ON events (chain, seq);

-- Rows whose month has no partition (yet) land here; the recorder creates each month's partition
-- before it writes rows of that month, so this stays empty in normal operation.
CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION foresight_forbid_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION foresight_forbid_change();

-- Creates the partition of the month that `at` falls in, if it does not exist. Runs with its
-- owner's rights, so that the writer role, which may only append, can call it.
CREATE FUNCTION foresight_ensure_month(at timestamptz) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
DECLARE
    start timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name  text := format('events_%s', to_char(start AT TIME ZONE 'UTC', 'YYYY_MM'));
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN name;
    END IF;
    -- Creators of the same month queue here (the lock lasts until their transaction ends, which
    -- is rare: once a month, or when history is replayed).
    PERFORM pg_advisory_xact_lock(hashtext('foresight_ensure_month'));
    IF to_regclass(name) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
            name, start, start + interval '1 month');
    END IF;
    RETURN name;
END
$$;

-- What a row's hash covers: every column that says what happened and where it came from.
CREATE FUNCTION foresight_row_digest(
    id uuid, type text, entity text, event_time timestamptz, schema_version integer,
    payload jsonb, source_topic text, source_partition integer, source_offset bigint
) RETURNS bytea LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT sha256(convert_to(concat_ws(E'\x1f',
        id::text, type, entity,
        to_char(event_time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
        schema_version::text, payload::text, source_topic, source_partition::text,
        source_offset::text), 'UTF8'))
$$;

-- The newest row of each chain: appending to a chain locks its head.
CREATE TABLE audit_chain_heads (
    chain text   PRIMARY KEY,
    seq   bigint NOT NULL,
    hash  bytea  NOT NULL
);

-- Rows recorded before this migration become chains of their own, in their recorded order.
DO $$
DECLARE
    r      record;
    heads  jsonb := '{}';
    c      text;
    s      bigint;
    prev   bytea;
    h      bytea;
BEGIN
    FOR r IN SELECT * FROM events_unpartitioned ORDER BY recorded_at, source_topic, source_partition, source_offset, id LOOP
        PERFORM foresight_ensure_month(r.event_time);
        c := r.source_topic || '/' || r.source_partition;
        SELECT seq, hash INTO s, prev FROM audit_chain_heads WHERE chain = c;
        IF NOT FOUND THEN
            s := 0;
            prev := '\x'::bytea;
            INSERT INTO audit_chain_heads VALUES (c, 0, prev);
        END IF;
        h := sha256(prev || foresight_row_digest(r.id, r.type, r.entity, r.event_time,
            r.schema_version, r.payload, r.source_topic, r.source_partition, r.source_offset));
        INSERT INTO events VALUES (r.id, r.type, r.entity, r.event_time, r.recorded_at,
            r.schema_version, r.payload, r.source_topic, r.source_partition, r.source_offset,
            c, s + 1, prev, h);
        UPDATE audit_chain_heads SET seq = s + 1, hash = h WHERE chain = c;
    END LOOP;
END
$$;

DROP TABLE events_unpartitioned;

-- Views for people.

CREATE VIEW decisions AS
SELECT id,
       entity,
       event_time,
       recorded_at,
       payload ->> 'policy'                  AS policy,
       payload ->> 'rule'                    AS rule,
       payload -> 'action' ->> 'kind'        AS action,
       payload -> 'action' ->> 'target'      AS target,
       (payload ->> 'probability')::float8   AS probability,
       (payload -> 'interval' ->> 0)::float8 AS probability_lower,
       (payload -> 'interval' ->> 1)::float8 AS probability_upper,
       payload ->> 'band'                    AS band,
       payload ->> 'reason'                  AS reason,
       (payload ->> 'score_id')::uuid        AS score_id,
       payload
FROM events
WHERE type = 'foresight.decision';

CREATE VIEW outcomes AS
SELECT id,
       entity,
       event_time,
       recorded_at,
       (payload ->> 'decision_id')::uuid AS decision_id,
       payload ->> 'actuator'            AS actuator,
       payload ->> 'status'              AS status,
       payload ->> 'detail'              AS detail,
       payload
FROM events
WHERE type = 'foresight.actuation_outcome';

CREATE VIEW scores AS
SELECT id,
       entity,
       event_time,
       recorded_at,
       (payload ->> 'probability')::float8              AS probability,
       (payload ->> 'lower')::float8                    AS lower,
       (payload ->> 'upper')::float8                    AS upper,
       payload ->> 'band'                               AS band,
       (payload ->> 'horizon_seconds')::bigint          AS horizon_seconds,
       (payload ->> 'time_to_failure_seconds')::bigint  AS time_to_failure_seconds,
       COALESCE((payload ->> 'impact')::float8, 1)      AS impact,
       payload ->> 'method'                             AS method,
       payload ->> 'model_version'                      AS model_version,
       payload
FROM events
WHERE type = 'foresight.risk_score';

CREATE VIEW failures AS
SELECT id,
       entity,
       event_time,
       recorded_at,
       payload ->> 'kind'   AS kind,
       payload ->> 'detail' AS detail,
       payload
FROM events
WHERE type = 'foresight.failure_report';

-- Each decision with what became of it (its latest outcome) and whether its entity failed within
-- the horizon of the score it was based on (2 hours when that score is not recorded), and each
-- failure no decision saw coming:
--   hit          a failure followed within the horizon: the risk was real
--   prevented?   no failure followed and the action was applied: prevented, or a false alarm
--                acted on (only a randomised hold-out can tell which)
--   false_alarm  no failure followed and nothing was applied
--   miss         a failure with no decision about its entity within the horizon before it
CREATE VIEW decision_outcomes AS
WITH d AS (
    SELECT d.*,
           COALESCE(s.horizon_seconds, 7200) AS horizon_seconds,
           o.status AS outcome,
           o.actuator,
           o.detail AS outcome_detail
    FROM decisions d
    LEFT JOIN scores s ON s.id = d.score_id
    LEFT JOIN LATERAL (
        SELECT status, actuator, detail FROM outcomes o
        WHERE o.decision_id = d.id ORDER BY o.event_time DESC, o.recorded_at DESC LIMIT 1
    ) o ON true
)
SELECT d.id AS decision_id,
       d.entity,
       d.event_time AS decided_at,
       d.policy,
       d.rule,
       d.action,
       d.probability,
       d.band,
       d.outcome,
       d.actuator,
       f.id AS failure_id,
       f.event_time AS failed_at,
       f.kind AS failure_kind,
       f.event_time - d.event_time AS lead_time,
       -- In the randomised hold-out (no action taken; propensity in the decision): outcomes
       -- here are unbiased by mitigation.
       COALESCE((d.payload -> 'action' -> 'params' ->> 'holdout')::boolean, false) AS held_out,
       (d.payload -> 'action' -> 'params' ->> 'propensity')::float8 AS propensity,
       CASE
           WHEN f.id IS NOT NULL THEN 'hit'
           WHEN d.outcome = 'applied' THEN 'prevented?'
           ELSE 'false_alarm'
       END AS verdict
FROM d
LEFT JOIN LATERAL (
    SELECT id, event_time, kind FROM failures f
    WHERE f.entity = d.entity
      AND f.event_time > d.event_time
      AND f.event_time <= d.event_time + d.horizon_seconds * interval '1 second'
    ORDER BY f.event_time LIMIT 1
) f ON true
UNION ALL
SELECT NULL, f.entity, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       f.id, f.event_time, f.kind, NULL, false, NULL, 'miss'
FROM failures f
WHERE NOT EXISTS (
    SELECT 1 FROM decisions d
    LEFT JOIN scores s ON s.id = d.score_id
    WHERE d.entity = f.entity
      AND d.event_time < f.event_time
      AND d.event_time >= f.event_time - COALESCE(s.horizon_seconds, 7200) * interval '1 second'
);

-- The newest score of every entity, riskiest (probability x impact) first.
CREATE VIEW fleet_risk_now AS
SELECT *, probability * impact AS priority
FROM (
    SELECT DISTINCT ON (entity) entity, event_time, probability, lower, upper, band, impact,
           time_to_failure_seconds, model_version, payload -> 'contributors' -> 0 ->> 'detail' AS why
    FROM scores
    ORDER BY entity, event_time DESC, recorded_at DESC
) latest
ORDER BY probability * impact DESC, entity;

-- Roles. The recorder connects as foresight_writer: it may append and read, never change or
-- remove (no UPDATE, DELETE or TRUNCATE grants; the triggers refuse them for every role anyway).
-- People and dashboards connect as foresight_reader: read-only, with a statement timeout. Both
-- are login roles without a password: set one (ALTER ROLE ... PASSWORD) where auth requires it.
-- Roles belong to the whole server, so databases migrating at the same moment (tests, several
-- deployments on one server) race on them: each step is retried a few times.
DO $$
DECLARE
    attempt integer := 0;
BEGIN
    LOOP
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'foresight_writer') THEN
                CREATE ROLE foresight_writer LOGIN;
            END IF;
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'foresight_reader') THEN
                CREATE ROLE foresight_reader LOGIN;
            END IF;
            ALTER ROLE foresight_reader SET statement_timeout = '30s';
            ALTER ROLE foresight_reader SET default_transaction_read_only = on;
            EXIT;
        EXCEPTION WHEN OTHERS THEN
            attempt := attempt + 1;
            IF attempt >= 20 THEN
                RAISE;
            END IF;
            PERFORM pg_sleep(0.05 * attempt);
        END;
    END LOOP;
END
$$;

GRANT USAGE ON SCHEMA public TO foresight_writer, foresight_reader;
REVOKE ALL ON events, audit_chain_heads, consumer_offsets FROM foresight_writer, foresight_reader;
GRANT SELECT, INSERT ON events TO foresight_writer;
GRANT SELECT, INSERT, UPDATE ON audit_chain_heads, consumer_offsets TO foresight_writer;
GRANT EXECUTE ON FUNCTION foresight_ensure_month(timestamptz) TO foresight_writer;
GRANT SELECT ON events, decisions, outcomes, scores, failures, decision_outcomes, fleet_risk_now
    TO foresight_reader;
GRANT SELECT ON models, model_versions TO foresight_reader;
