-- The learned failure model's training runs: every candidate `foresight train` produced, with
-- the data window it learned from, how it compared with the model in use on a time-based
-- hold-out, and whether it was promoted. The scoring stage uses the promoted row with the latest
-- `promoted_at` (the current model); with none, the prior.

CREATE TABLE models (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- `learned-` and a hash of the model's content: what scores record as `model_version`.
    -- Not unique: retraining on the same data gives the same model, and each run is recorded.
    version          text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Scores with event times in [window_start, window_end) whose horizon ended by window_end.
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    -- Scores from here on were the hold-out (not trained on); earlier ones were trained on.
    holdout_start    timestamptz NOT NULL,
    -- What the candidate was compared with: the promoted version then, or `recorded` (the
    -- probabilities the scores recorded, the prior's) when none was.
    baseline_version text        NOT NULL,
    -- The training configuration and the operating threshold used.
    config           jsonb       NOT NULL,
    -- {"training": {...}, "candidate": Metrics, "baseline": Metrics} on the hold-out.
    metrics          jsonb       NOT NULL,
    -- The model itself (scoring::model::FailureModel as JSON).
    model            jsonb       NOT NULL,
    promoted         boolean     NOT NULL,
    promoted_at      timestamptz,
    -- Why it was (not) promoted, in words.
    reason           text        NOT NULL,
    CHECK (window_start < window_end),
    CHECK (NOT promoted OR promoted_at IS NOT NULL)
);

CREATE INDEX models_current ON models (promoted_at DESC, id DESC) WHERE promoted;
CREATE INDEX models_version ON models (version);

-- A run's record stays as written. Only the promotion may change, so that people can roll back
-- (`UPDATE models SET promoted = false WHERE version = '...'` makes the previously promoted one
-- current again) or re-promote an older model.
CREATE FUNCTION foresight_models_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'foresight models are kept for audit (DELETE refused)';
    END IF;
    IF (NEW.id, NEW.version, NEW.created_at, NEW.window_start, NEW.window_end, NEW.holdout_start,
        NEW.baseline_version, NEW.config, NEW.metrics, NEW.model, NEW.reason)
       IS DISTINCT FROM
       (OLD.id, OLD.version, OLD.created_at, OLD.window_start, OLD.window_end, OLD.holdout_start,
        OLD.baseline_version, OLD.config, OLD.metrics, OLD.model, OLD.reason) THEN
        RAISE EXCEPTION 'only promoted and promoted_at of a foresight model may change';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER models_guard
    BEFORE UPDATE OR DELETE ON models
    FOR EACH ROW EXECUTE FUNCTION foresight_models_guard();

CREATE TRIGGER models_no_truncate
    BEFORE TRUNCATE ON models
    FOR EACH STATEMENT EXECUTE FUNCTION foresight_forbid_change();

-- For people: one row per training run, newest first, with the headline numbers.
CREATE VIEW model_versions AS
SELECT m.id,
       m.version,
       m.created_at,
       COALESCE(m.id = current.id, false)                                 AS current,
       m.promoted,
       m.promoted_at,
       m.reason,
       m.window_start,
       m.window_end,
       m.holdout_start,
       (m.metrics -> 'training' ->> 'examples')::bigint                  AS train_examples,
       (m.metrics -> 'training' ->> 'positives')::bigint                 AS train_positives,
       (m.metrics -> 'candidate' ->> 'n')::bigint                        AS holdout_examples,
       (m.metrics -> 'candidate' ->> 'positives')::bigint                AS holdout_positives,
       (m.metrics -> 'candidate' ->> 'threshold')::float8                AS threshold,
       (m.metrics -> 'candidate' ->> 'brier')::float8                    AS brier,
       (m.metrics -> 'baseline' ->> 'brier')::float8                     AS baseline_brier,
       (m.metrics -> 'candidate' ->> 'precision_at_threshold')::float8   AS precision,
       (m.metrics -> 'baseline' ->> 'precision_at_threshold')::float8    AS baseline_precision,
       (m.metrics -> 'candidate' ->> 'recall_at_threshold')::float8      AS recall,
       (m.metrics -> 'baseline' ->> 'recall_at_threshold')::float8       AS baseline_recall,
       (m.metrics -> 'candidate' ->> 'calibration_error')::float8        AS calibration_error,
       m.baseline_version
FROM models m
LEFT JOIN (SELECT id FROM models WHERE promoted ORDER BY promoted_at DESC, id DESC LIMIT 1) current
       ON true
ORDER BY m.id DESC;
