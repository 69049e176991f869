//! `foresight train`: the retraining loop of the failure model, over the audit log.
//!
//! One run reads the recorded scores of a data window and the failure reports that label them
//! from Postgres, trains a candidate [`FailureModel`] on the earlier part, compares it on the
//! later part (the time-based hold-out) with the model in use (the promoted one, or the
//! probabilities the scores recorded, the prior's, while none is), records the candidate in the
//! `models` table and promotes it if it is not worse (see [`model::promotion`]). The scoring
//! stage picks a promoted model up through [`promoted_model`], without a restart.
//!
//! The model code is pure ([`foresight_scoring::model`]); this module is the IO around it, and
//! the fit runs on the blocking pool.

use std::{collections::BTreeMap, fmt, time::Duration};

use chrono::{DateTime, Utc};
use foresight_events::{EntityId, EventData as _, FailureReport, RiskScore};
use foresight_scoring::model::{
    self, FailureModel, Metrics, Predictor, PromotionRule, Split, TrainConfig, TrainError,
    TrainingExample,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::Config;

/// The `[training]` section: the data window, the hold-out and the promotion rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// How far back from the window's end (`--until`, default now) the data window reaches when
    /// `--since` is not given.
    #[serde(with = "humantime_serde")]
    pub lookback: Duration,
    /// Most scores read (the latest ones): bounds the run's memory and time.
    pub max_examples: usize,
    /// Share of the examples, the latest, held out for evaluation; the rest is trained on.
    pub holdout_fraction: f64,
    /// The operating threshold precision and recall are measured at; by default the high band
    /// (`scoring.bands.high`), where the allocator acts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// How much higher the candidate's hold-out Brier score may be than the current model's and
    /// still count as not worse.
    pub brier_tolerance: f64,
    /// How much lower its precision at the threshold may be and still count as not worse.
    pub precision_tolerance: f64,
    /// Fewest failures in the hold-out for the comparison to count; below it nothing is promoted.
    pub min_holdout_positives: usize,
    /// The model itself: ensemble, regularisation, interval level, minimum labels.
    pub model: TrainConfig,
    /// Train on this schedule inside the live fleet stage (which then picks up what is promoted);
    /// unset: only `foresight train` trains.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub every: Option<Duration>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        let rule = PromotionRule::default();
        Self {
            lookback: Duration::from_secs(30 * 24 * 3600),
            max_examples: 500_000,
            holdout_fraction: 0.25,
            threshold: None,
            brier_tolerance: rule.brier_tolerance,
            precision_tolerance: rule.precision_tolerance,
            min_holdout_positives: rule.min_holdout_positives,
            model: TrainConfig::default(),
            every: None,
        }
    }
}

impl TrainingConfig {
    /// Every problem with the values: (key below `training`, message).
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        let mut bad = |key: &str, message: String| issues.push((key.to_owned(), message));
        if self.lookback.is_zero() {
            bad("lookback", "must be longer than zero".into());
        }
        if self.max_examples == 0 {
            bad("max_examples", "must be at least 1".into());
        }
        if !(self.holdout_fraction > 0.0 && self.holdout_fraction < 1.0) {
            bad(
                "holdout_fraction",
                format!(
                    "must be strictly between 0 and 1, not {}",
                    self.holdout_fraction
                ),
            );
        }
        if let Some(t) = self.threshold
            && !(t > 0.0 && t <= 1.0)
        {
            bad("threshold", format!("must be in (0, 1], not {t}"));
        }
        for (key, v) in [
            ("brier_tolerance", self.brier_tolerance),
            ("precision_tolerance", self.precision_tolerance),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bad(key, format!("must be zero or positive, not {v}"));
            }
        }
        for e in self.model.validate() {
            match e {
                TrainError::InvalidConfig { key, message } => bad(key, message),
                other => bad("model", other.to_string()),
            }
        }
        issues
    }

    fn rule(&self) -> PromotionRule {
        PromotionRule {
            brier_tolerance: self.brier_tolerance,
            precision_tolerance: self.precision_tolerance,
            min_holdout_positives: self.min_holdout_positives,
        }
    }
}

/// The operating threshold of a configuration: `training.threshold`, else the high band.
pub fn operating_threshold(config: &Config) -> f64 {
    config
        .training
        .threshold
        .unwrap_or(config.scoring.bands.high)
}

/// The data window: scores with event times in `[since, until)` whose horizon ended by `until`
/// (so a missing failure report means no failure, not "not yet"), and the failure reports in
/// `(since, until]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Start (inclusive).
    pub since: DateTime<Utc>,
    /// End (exclusive for scores, inclusive for failures).
    pub until: DateTime<Utc>,
}

impl Window {
    /// The window of `lookback` ending at `until`.
    pub fn ending(until: DateTime<Utc>, lookback: Duration) -> Self {
        let lookback = chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::MAX);
        Self {
            since: until
                .checked_sub_signed(lookback)
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
            until,
        }
    }
}

/// Why a training run failed. Not having enough labels yet is not among them: that is a normal
/// outcome ([`Outcome::NotEnoughData`]).
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// Postgres is unreachable or refused a statement (external; retrying later can help).
    #[error("Postgres: {0}")]
    Database(#[from] sqlx::Error),
    /// The configuration or the data cannot produce a model (the user's to fix, or a bug).
    #[error(transparent)]
    Model(TrainError),
    /// The promoted model in the `models` table cannot be loaded (edited or corrupt).
    #[error("the promoted model {version} cannot be loaded: {reason}")]
    StoredModel {
        /// Its version column.
        version: String,
        /// Why.
        reason: String,
    },
    /// The window is empty or reversed (the user's to fix).
    #[error("the training window must end after it starts ({since} .. {until})")]
    Window {
        /// Start.
        since: DateTime<Utc>,
        /// End.
        until: DateTime<Utc>,
    },
    /// More failure reports in the window than `training.max_examples` (the user's to fix:
    /// a shorter window, or a larger limit).
    #[error(
        "more than {max} failure reports in the window (training.max_examples); shorten the window"
    )]
    TooManyFailureReports {
        /// The limit.
        max: usize,
    },
    /// The fit panicked (a bug).
    #[error("the training task failed: {0}")]
    Task(String),
}

/// What one training run read and did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    /// The data window.
    pub window: Window,
    /// Scores read (one per entity and window end; the earliest recorded if scored twice).
    pub scores: usize,
    /// Scores left out because their record could not be read (bad entity, signals or
    /// probability).
    pub unreadable: usize,
    /// Whether `training.max_examples` cut the window short (then the latest scores were used).
    pub truncated: bool,
    /// Failure reports read.
    pub failures: usize,
    /// Scores followed by a failure within their horizon.
    pub positives: usize,
    /// What came of it.
    pub outcome: Outcome,
}

/// The result of a training run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Too few labels for a model yet: nothing was recorded, and the model in use stays.
    NotEnoughData {
        /// Why, in words.
        reason: String,
        /// The model in use: a version, or `prior`.
        current: String,
    },
    /// A candidate was trained, evaluated and recorded.
    Recorded(Box<Candidate>),
}

/// A recorded candidate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// Its row in `models`.
    pub id: i64,
    /// Its version.
    pub version: String,
    /// Where the hold-out starts.
    pub holdout_start: DateTime<Utc>,
    /// Training examples.
    pub train_examples: usize,
    /// Of them, followed by a failure.
    pub train_positives: usize,
    /// Training examples dropped because their horizon reached into the hold-out.
    pub purged: usize,
    /// The candidate on the hold-out.
    pub candidate: Metrics,
    /// What it was compared with: the promoted version, or `recorded`.
    pub baseline_version: String,
    /// The baseline on the same hold-out.
    pub baseline: Metrics,
    /// Whether it is now the model in use.
    pub promoted: bool,
    /// Why (not).
    pub reason: String,
}

/// What `models.metrics` holds.
#[derive(Serialize)]
struct RecordedMetrics<'a> {
    training: TrainingCounts,
    candidate: &'a Metrics,
    baseline: &'a Metrics,
}

#[derive(Serialize)]
struct TrainingCounts {
    examples: usize,
    positives: usize,
    purged: usize,
    scores_read: usize,
    unreadable: usize,
    truncated: bool,
    failures_read: usize,
}

/// One score row as read for training.
type ScoreRow = (
    String,
    DateTime<Utc>,
    Option<i64>,
    Option<f64>,
    Option<serde_json::Value>,
);

fn example(row: ScoreRow) -> Option<TrainingExample> {
    let (entity, time, horizon, probability, signals) = row;
    let signals: BTreeMap<String, f64> = match signals? {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| v.as_f64().map(|v| (k, v)))
            .collect::<Option<_>>()?,
        _ => return None,
    };
    Some(TrainingExample {
        entity: EntityId::new(entity).ok()?,
        time,
        horizon_seconds: u64::try_from(horizon?).ok()?,
        signals,
        recorded_probability: probability.filter(|p| p.is_finite())?,
        label: false,
    })
}

/// Reads the window's scores (at most `max + 1`, to tell whether there were more).
async fn read_scores(
    pool: &PgPool,
    window: Window,
    max: usize,
) -> Result<(Vec<TrainingExample>, usize, bool), sqlx::Error> {
    // One score per entity and window end: a window scored again (a replay with another model)
    // keeps the score that was recorded first, the one acted on at the time. Scores recorded
    // before signals were (no `signals` key) cannot be learned from.
    let rows: Vec<ScoreRow> = sqlx::query_as(
        "SELECT entity, event_time, horizon, probability, signals FROM ( \
             SELECT DISTINCT ON (entity, event_time) \
                    entity, event_time, \
                    (payload ->> 'horizon_seconds')::bigint AS horizon, \
                    (payload ->> 'probability')::float8 AS probability, \
                    payload -> 'signals' AS signals \
             FROM events \
             WHERE type = $1 AND event_time >= $2 AND event_time < $3 AND payload ? 'signals' \
               AND event_time + (payload ->> 'horizon_seconds')::bigint * interval '1 second' <= $3 \
             ORDER BY entity, event_time, recorded_at, id \
         ) s ORDER BY event_time DESC, entity LIMIT $4",
    )
    .bind(RiskScore::event_type())
    .bind(window.since)
    .bind(window.until)
    .bind(i64::try_from(max.saturating_add(1)).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    let truncated = rows.len() > max;
    let mut unreadable = 0;
    let examples = rows
        .into_iter()
        .take(max)
        .filter_map(|r| {
            let e = example(r);
            unreadable += e.is_none() as usize;
            e
        })
        .collect();
    Ok((examples, unreadable, truncated))
}

/// Reads the failure reports that can label the window's scores: all of them, or an error (a
/// partial set would label failed entities' scores as healthy).
async fn read_failures(
    pool: &PgPool,
    window: Window,
    max: usize,
) -> Result<Vec<FailureReport>, TrainingError> {
    let rows: Vec<(String, DateTime<Utc>, Option<String>)> = sqlx::query_as(
        "SELECT entity, event_time, payload ->> 'kind' FROM events \
         WHERE type = $1 AND event_time > $2 AND event_time <= $3 \
         ORDER BY event_time LIMIT $4",
    )
    .bind(FailureReport::event_type())
    .bind(window.since)
    .bind(window.until)
    .bind(i64::try_from(max.saturating_add(1)).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    if rows.len() > max {
        return Err(TrainingError::TooManyFailureReports { max });
    }
    Ok(rows
        .into_iter()
        .filter_map(|(entity, time, kind)| {
            Some(FailureReport {
                entity: EntityId::new(entity).ok()?,
                time,
                kind: kind.unwrap_or_default(),
                detail: String::new(),
            })
        })
        .collect())
}

/// The model in use: the promoted row with the latest promotion.
const CURRENT: &str =
    "SELECT version, model FROM models WHERE promoted ORDER BY promoted_at DESC, id DESC LIMIT 1";
/// Its version only.
const CURRENT_VERSION: &str =
    "SELECT version FROM models WHERE promoted ORDER BY promoted_at DESC, id DESC LIMIT 1";

/// The promoted failure model (the one with the latest promotion), if any: what the scoring
/// stage should use. Every loaded model is checked (its version must match its content).
pub async fn promoted_model(pool: &PgPool) -> Result<Option<FailureModel>, TrainingError> {
    let row: Option<(String, serde_json::Value)> =
        sqlx::query_as(CURRENT).fetch_optional(pool).await?;
    row.map(|(version, json)| {
        serde_json::from_value(json).map_err(|e| TrainingError::StoredModel {
            version,
            reason: e.to_string(),
        })
    })
    .transpose()
}

/// The promoted model's version, if any: a cheap check for a poller, which loads the model with
/// [`promoted_model`] only when this changes.
pub async fn promoted_version(pool: &PgPool) -> Result<Option<String>, TrainingError> {
    Ok(sqlx::query_scalar(CURRENT_VERSION)
        .fetch_optional(pool)
        .await?)
}

/// The fit and both evaluations, on the blocking pool.
struct Fitted {
    model: FailureModel,
    candidate: Metrics,
    baseline: Metrics,
}

/// One training run over `window` (see the module docs). `threshold` is the operating threshold
/// ([`operating_threshold`]).
pub async fn train(
    pool: &PgPool,
    config: &TrainingConfig,
    threshold: f64,
    window: Window,
) -> Result<TrainReport, TrainingError> {
    if window.until <= window.since {
        return Err(TrainingError::Window {
            since: window.since,
            until: window.until,
        });
    }
    let (mut examples, unreadable, truncated) =
        read_scores(pool, window, config.max_examples).await?;
    let failures = read_failures(pool, window, config.max_examples).await?;
    model::label(&mut examples, &failures);
    let positives = examples.iter().filter(|e| e.label).count();
    let read = Read {
        scores: examples.len(),
        unreadable,
        truncated,
        failures: failures.len(),
    };
    let outcome = candidate(pool, config, threshold, window, examples, &read).await?;
    Ok(TrainReport {
        window,
        scores: read.scores,
        unreadable,
        truncated,
        failures: read.failures,
        positives,
        outcome,
    })
}

/// What a run read.
struct Read {
    scores: usize,
    unreadable: usize,
    truncated: bool,
    failures: usize,
}

/// Trains a candidate on the labelled examples, evaluates it against the model in use and records
/// it (promoted or not).
async fn candidate(
    pool: &PgPool,
    config: &TrainingConfig,
    threshold: f64,
    window: Window,
    examples: Vec<TrainingExample>,
    read: &Read,
) -> Result<Outcome, TrainingError> {
    let current = promoted_model(pool).await?;
    let current_name = current
        .as_ref()
        .map_or_else(|| "prior".to_owned(), |m| m.version().to_owned());
    let not_enough = |e: TrainError| -> Result<Outcome, TrainingError> {
        if e.is_insufficient_data() {
            Ok(Outcome::NotEnoughData {
                reason: e.to_string(),
                current: current_name.clone(),
            })
        } else {
            Err(TrainingError::Model(e))
        }
    };
    let split = match model::split_by_time(examples, config.holdout_fraction) {
        Ok(s) => s,
        Err(e) => return not_enough(e),
    };
    let Split {
        train: train_set,
        holdout,
        cut,
        purged,
    } = split;
    let (train_examples, train_positives) = (
        train_set.len(),
        train_set.iter().filter(|e| e.label).count(),
    );
    let model_config = config.model.clone();
    let baseline_model = current.clone();
    let fitted = tokio::task::spawn_blocking(move || -> Result<Fitted, TrainError> {
        let model = FailureModel::train(&train_set, &model_config)?;
        let candidate = model::evaluate(&Predictor::Model(&model), &holdout, threshold)?;
        let baseline_predictor = match &baseline_model {
            Some(m) => Predictor::Model(m),
            None => Predictor::Recorded,
        };
        let baseline = model::evaluate(&baseline_predictor, &holdout, threshold)?;
        Ok(Fitted {
            model,
            candidate,
            baseline,
        })
    })
    .await
    .map_err(|e| TrainingError::Task(e.to_string()))?;
    let fitted = match fitted {
        Ok(f) => f,
        Err(e) => return not_enough(e),
    };
    let baseline_version = current
        .as_ref()
        .map_or_else(|| "recorded".to_owned(), |m| m.version().to_owned());
    let verdict = model::promotion(&fitted.candidate, &fitted.baseline, &config.rule());
    let metrics = RecordedMetrics {
        training: TrainingCounts {
            examples: train_examples,
            positives: train_positives,
            purged,
            scores_read: read.scores,
            unreadable: read.unreadable,
            truncated: read.truncated,
            failures_read: read.failures,
        },
        candidate: &fitted.candidate,
        baseline: &fitted.baseline,
    };
    let recorded_config = serde_json::json!({ "training": config, "threshold": threshold });

    // Record, promoting only if the model in use is still the one compared with: two runs at once
    // must not both promote against the same baseline.
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE models IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let now_current: Option<String> = sqlx::query_scalar(CURRENT_VERSION)
        .fetch_optional(&mut *tx)
        .await?;
    let (promoted, reason) = if now_current.as_deref() != current.as_ref().map(|m| m.version()) {
        (
            false,
            format!(
                "the model in use changed to {} during training; train again to compare with it",
                now_current.as_deref().unwrap_or("prior")
            ),
        )
    } else {
        (verdict.promote, verdict.reason)
    };
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO models (version, window_start, window_end, holdout_start, baseline_version, \
                             config, metrics, model, promoted, promoted_at, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $9 THEN clock_timestamp() END, $10) \
         RETURNING id",
    )
    .bind(fitted.model.version())
    .bind(window.since)
    .bind(window.until)
    .bind(cut)
    .bind(&baseline_version)
    .bind(recorded_config)
    .bind(serde_json::to_value(&metrics).expect("metrics serialise"))
    .bind(serde_json::to_value(&fitted.model).expect("models serialise"))
    .bind(promoted)
    .bind(&reason)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(
        id,
        version = fitted.model.version(),
        promoted,
        %reason,
        "Failure model recorded."
    );
    Ok(Outcome::Recorded(Box::new(Candidate {
        id,
        version: fitted.model.version().to_owned(),
        holdout_start: cut,
        train_examples,
        train_positives,
        purged,
        candidate: fitted.candidate,
        baseline_version,
        baseline: fitted.baseline,
        promoted,
        reason,
    })))
}

/// The command line of `foresight train`: overrides of the `[training]` section.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainArgs {
    /// Start of the data window (RFC 3339, e.g. 2025-01-01T00:00:00Z); default: the end minus
    /// training.lookback.
    #[arg(long)]
    pub since: Option<DateTime<Utc>>,
    /// End of the data window (RFC 3339); default: now.
    #[arg(long)]
    pub until: Option<DateTime<Utc>>,
    /// Share of the latest examples held out for evaluation (training.holdout_fraction).
    #[arg(long)]
    pub holdout_fraction: Option<f64>,
    /// Fewest labelled training examples (training.model.min_examples).
    #[arg(long)]
    pub min_examples: Option<usize>,
    /// Fewest training examples followed by a failure (training.model.min_positives).
    #[arg(long)]
    pub min_positives: Option<usize>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl TrainArgs {
    /// The configuration with these overrides applied, and the window (`now` is the default end).
    pub fn apply(
        &self,
        config: &TrainingConfig,
        now: DateTime<Utc>,
    ) -> Result<(TrainingConfig, Window), String> {
        let mut config = config.clone();
        if let Some(f) = self.holdout_fraction {
            config.holdout_fraction = f;
        }
        if let Some(n) = self.min_examples {
            config.model.min_examples = n;
        }
        if let Some(n) = self.min_positives {
            config.model.min_positives = n;
        }
        let issues = config.validate();
        if !issues.is_empty() {
            return Err(issues
                .iter()
                .map(|(k, m)| format!("training.{k}: {m}"))
                .collect::<Vec<_>>()
                .join("\n"));
        }
        let until = self.until.unwrap_or(now);
        let window = match self.since {
            Some(since) => Window { since, until },
            None => Window::ending(until, config.lookback),
        };
        Ok((config, window))
    }
}

fn precision(m: &Metrics) -> String {
    match m.precision_at_threshold {
        Some(p) => format!("{p:.3} ({} alarms)", m.alarms),
        None => "- (no alarm)".into(),
    }
}

impl fmt::Display for TrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Data window {} .. {}: {} scores ({} followed by a failure), {} failure reports{}{}.",
            self.window.since.to_rfc3339(),
            self.window.until.to_rfc3339(),
            self.scores,
            self.positives,
            self.failures,
            if self.unreadable > 0 {
                format!(", {} unreadable scores skipped", self.unreadable)
            } else {
                String::new()
            },
            if self.truncated {
                " (training.max_examples reached: the latest scores only)"
            } else {
                ""
            }
        )?;
        match &self.outcome {
            Outcome::NotEnoughData { reason, current } => write!(
                f,
                "Not enough labels yet: {reason}. Nothing recorded; {} stays in use.",
                if current == "prior" {
                    "the prior"
                } else {
                    current
                }
            ),
            Outcome::Recorded(c) => {
                writeln!(
                    f,
                    "Trained on {} scores before {} ({} followed by a failure; {} purged at the \
                     cut); evaluated on the {} after it ({} followed by a failure).",
                    c.train_examples,
                    c.holdout_start.to_rfc3339(),
                    c.train_positives,
                    c.purged,
                    c.candidate.n,
                    c.candidate.positives,
                )?;
                writeln!(
                    f,
                    "  {:<36} {:>8} {:>20} {:>8} {:>11}",
                    "hold-out",
                    "Brier",
                    format!("precision@{}", c.candidate.threshold),
                    "recall",
                    "calib. err."
                )?;
                for (name, m) in [
                    (format!("candidate {}", c.version), &c.candidate),
                    (format!("current {}", c.baseline_version), &c.baseline),
                ] {
                    writeln!(
                        f,
                        "  {:<36} {:>8.5} {:>20} {:>8} {:>11.4}",
                        name,
                        m.brier,
                        precision(m),
                        m.recall_at_threshold
                            .map_or_else(|| "-".into(), |r| format!("{r:.3}")),
                        m.calibration_error
                    )?;
                }
                writeln!(
                    f,
                    "  {:<36} {:>8.5}",
                    "always the base rate", c.candidate.brier_base_rate
                )?;
                if c.promoted {
                    write!(
                        f,
                        "Promoted {} (models.id {}): {}.",
                        c.version, c.id, c.reason
                    )
                } else {
                    write!(
                        f,
                        "Not promoted; recorded as models.id {}: {}. {} stays in use.",
                        c.id,
                        c.reason,
                        if c.baseline_version == "recorded" {
                            "The prior"
                        } else {
                            &c.baseline_version
                        }
                    )
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn the_command_line_overrides_the_section_and_sets_the_window() {
        let args = TrainArgs {
            holdout_fraction: Some(0.4),
            min_positives: Some(7),
            ..TrainArgs::default()
        };
        let (config, window) = args.apply(&TrainingConfig::default(), t(0)).unwrap();
        assert_eq!(config.holdout_fraction, 0.4);
        assert_eq!(config.model.min_positives, 7);
        assert_eq!(
            window,
            Window {
                since: t(-30 * 24 * 3600),
                until: t(0)
            }
        );
        let args = TrainArgs {
            since: Some(t(-10)),
            until: Some(t(-5)),
            ..TrainArgs::default()
        };
        let (_, window) = args.apply(&TrainingConfig::default(), t(0)).unwrap();
        assert_eq!((window.since, window.until), (t(-10), t(-5)));

        let bad = TrainArgs {
            holdout_fraction: Some(1.0),
            min_positives: Some(1),
            ..TrainArgs::default()
        };
        let err = bad.apply(&TrainingConfig::default(), t(0)).unwrap_err();
        assert!(err.contains("training.holdout_fraction"), "{err}");
        assert!(err.contains("training.model.min_positives"), "{err}");
    }

    #[test]
    fn unreadable_score_rows_are_skipped() {
        let signals = serde_json::json!({"forecast_breach": 0.5, "anomaly": 0.0});
        let ok = example((
            "node-1".into(),
            t(0),
            Some(3600),
            Some(0.4),
            Some(signals.clone()),
        ))
        .unwrap();
        assert_eq!(ok.signals["forecast_breach"], 0.5);
        assert_eq!((ok.horizon_seconds, ok.recorded_probability), (3600, 0.4));
        let bad_signal = serde_json::json!({"forecast_breach": "high"});
        for row in [
            (
                "".into(),
                t(0),
                Some(3600),
                Some(0.4),
                Some(signals.clone()),
            ),
            ("n".into(), t(0), Some(-1), Some(0.4), Some(signals.clone())),
            ("n".into(), t(0), Some(3600), None, Some(signals.clone())),
            ("n".into(), t(0), Some(3600), Some(0.4), Some(bad_signal)),
            ("n".into(), t(0), Some(3600), Some(0.4), None),
        ] {
            assert_eq!(example(row.clone()), None, "{row:?}");
        }
    }
}
