-- Foresight's audit log: every recorded event, once, with the Kafka position it came from.

CREATE TABLE events (
    -- The event's deterministic id: redelivery or replay of the same input inserts nothing twice.
    id               uuid        PRIMARY KEY,
    -- CloudEvents type, e.g. foresight.decision.
    type             text        NOT NULL,
    -- The entity (component) the event is about.
    entity           text        NOT NULL,
    -- When the described thing happened.
    event_time       timestamptz NOT NULL,
    -- When it was written here.
    recorded_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Schema version of the payload.
    schema_version   integer     NOT NULL,
    -- The event's data (the envelope's `data`).
    payload          jsonb       NOT NULL,
    -- Where it was read from.
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL
);

CREATE INDEX events_type_time ON events (type, event_time);
CREATE INDEX events_entity_time ON events (entity, event_time);

-- Offsets consumed by the recorder, written in the same transaction as the events they produced.
CREATE TABLE consumer_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    -- The next offset to read: everything before it is recorded.
    next_offset    bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- The log is append-only, whoever connects.
CREATE FUNCTION foresight_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'foresight events are append-only (% refused)', TG_OP;
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION foresight_forbid_change();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION foresight_forbid_change();

-- Views for people.

CREATE VIEW decisions AS
SELECT id,
       entity,
       event_time,
       recorded_at,
       payload ->> 'policy'                  AS policy,
       payload ->> 'rule'                    AS rule,
       payload -> 'action' ->> 'kind'        AS action,
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
       (payload ->> 'time_to_failure_seconds')::bigint  AS time_to_failure_seconds,
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
