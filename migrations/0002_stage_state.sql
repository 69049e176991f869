-- Checkpointed state of stateful stages (the feature stage's windows and per-metric history).
--
-- A checkpoint of partition P of a stage is, in one transaction: the state entries P owns that
-- changed since its previous checkpoint, and the next offset to read of partition P of each of
-- the stage's input topics (in consumer_offsets, under the stage's consumer group). A restarted
-- or rebalanced instance loads both and skips input before those offsets, so nothing is lost
-- or counted twice. The bytes are the stage's own encoding (versioned by its first byte).

CREATE TABLE stage_state (
    consumer_group text        NOT NULL,
    key            text        NOT NULL,
    partition      integer     NOT NULL,
    state          bytea       NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, key)
);

CREATE INDEX stage_state_by_partition ON stage_state (consumer_group, partition);
