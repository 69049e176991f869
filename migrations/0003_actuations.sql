-- The actuation ledger: what the actuators did with each decision, so every decision is acted
-- on at most once across redeliveries, replays, restarts and instances.
--
-- A decision is claimed (its row inserted, keyed by decision id) in a committed transaction
-- before anything is done to the target; its outcome is written after. The acting session holds
-- a session-level advisory lock on the decision while it acts, so a row still `claimed` (or
-- `rolling_back`) whose lock is free was left by a crashed instance: it is resolved by checking
-- the target, or marked `unknown` for a person, and never blindly retried.

-- The global kill switch: one row. `foresight actuation stop` sets it; every claim reads it in
-- its own transaction (FOR SHARE), so once a stop commits no action starts.
CREATE TABLE actuation_control (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    stopped    boolean     NOT NULL DEFAULT false,
    reason     text        NOT NULL DEFAULT '',
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO actuation_control (id) VALUES (true);

-- One row per limit group, locked (FOR UPDATE) by each claim of the group: counting the group's
-- recent actions and inserting the claim are then one atomic step across all instances.
CREATE TABLE actuation_groups (
    name text PRIMARY KEY
);

CREATE TABLE actuations (
    decision_id  uuid        PRIMARY KEY,
    entity       text        NOT NULL,
    -- The entity acted on (the blast radius counts distinct targets).
    target       text        NOT NULL,
    action       text        NOT NULL,
    policy       text        NOT NULL,
    -- The policy's mode when the decision was first seen.
    mode         text        NOT NULL,
    actuator     text        NOT NULL,
    grp          text        NOT NULL,
    -- The decision itself (approval and rollback act on it later, from other processes).
    decision     jsonb       NOT NULL,
    state        text        NOT NULL CHECK (state IN (
        'dry_run', 'proposed', 'deferred', 'claimed', 'applied', 'failed',
        'rolling_back', 'rolled_back', 'unknown')),
    detail       text        NOT NULL DEFAULT '',
    -- When an attempt started (by the database's clock): what the rate limit counts.
    started_at   timestamptz,
    -- False while the action counts against the blast radius: started and not yet verified,
    -- failed or rolled back.
    settled      boolean     NOT NULL DEFAULT true,
    -- End of the verification window (event time), for applied actions that are verified.
    verify_until timestamptz,
    -- What the actuator recorded for its rollback (e.g. the replica count before scaling).
    memo         jsonb,
    -- Every outcome emitted for the decision, in order: re-emitted as they were on redelivery.
    outcomes     jsonb       NOT NULL DEFAULT '[]',
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX actuations_rate ON actuations (grp, started_at) WHERE started_at IS NOT NULL;
CREATE INDEX actuations_open ON actuations (grp, target) WHERE NOT settled;
CREATE INDEX actuations_pending ON actuations (state) WHERE state IN ('claimed', 'rolling_back', 'proposed');
