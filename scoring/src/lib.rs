//! Foresight scoring: the probability that an entity fails within a horizon, with an interval and an
//! expected time to failure.
//!
//! The scorer is the prior combination of signals, used before a learned failure model exists, and
//! says so in every score (`method: prior`). Every window of every entity is scored from these
//! signals, each a probability of failure within the horizon with its own explanation:
//!
//! - **`forecast_breach`**: for every metric with a declared threshold, an exponential smoothing
//!   model (augurs' AutoETS, additive errors, trend chosen by AICc) fitted to the window history
//!   the feature stage carries forecasts the horizon with prediction intervals, and the forecast
//!   distribution gives P(threshold breached within the horizon) and the expected time to it.
//! - **`anomaly`**: every metric's window means go through the within-series
//!   [`anomaly::AnomalyDetector`] (pattern strangeness against its own past, calibrated to a
//!   p-value); its evidence `-log10 p` counts from `prior.anomaly_from` (3: one value in a
//!   thousand is that strange by chance) and grows linearly to `prior.anomaly` at
//!   `prior.anomaly_full` (12). An anomaly is evidence of trouble, not a failure: alone it reaches
//!   the high band only when it is extreme.
//! - **`changepoint`**: Bayesian online changepoint detection ([`changepoint`]: the Normal-Gamma
//!   model of augurs' BOCPD, stepped once per window on a run-length posterior kept per series);
//!   a regime that most probably began within the last `changepoint_recent` windows, in which
//!   the newest windows stand two standard deviations apart from the ones before, counts as
//!   `prior.changepoint`.
//! - **`logs`**: the window's error rate and share of never-seen message templates, each beyond its
//!   configured baseline, scaled to at most `logs_weight`.
//!
//! Signals that need the whole fleet (peer outliers, risk inherited along dependencies, blast
//! radius, ranking) and the learned failure model are added by the [`fleet`] stage, which reads
//! every entity's score; [`model`] trains and applies the failure model.
//!
//! The signals are combined by **noisy-OR** over the strongest contributor of each kind,
//! `P = 1 - prod(1 - p_kind)` (independent causes, any of which may fail the entity), and the
//! interval likewise from the signals' bounds. Contributors are listed strongest first.
//!
//! ## How the forecast breach probability is computed
//! For each step `h` the forecast is read as Normal(mean_h, sd_h), with `sd_h` recovered from the
//! interval at the configured level. `P_h = P(X_h beyond threshold)`. Forecast errors at successive
//! steps are strongly positively correlated, so the probability of a breach at *some* step is taken
//! as `max_h P_h` (the tight lower bound for perfectly correlated errors) rather than a union bound,
//! which would count one excursion many times. Expected time to failure is the first step whose
//! `P_h` reaches one half.
//!
//! Its interval comes from the uncertainty of the fitted level: the forecast means are shifted by
//! ±z·sd₁/√n (the standard error of a level estimated from `n` points, at the configured level)
//! and the probability recomputed. Short histories give wide intervals.
//!
//! ## State
//! Per series the scorer keeps its fitted forecast (between refits an AutoETS forecast is carried
//! forward from the fitted model's state, updated by each window's value, see `ets`; an MSTL
//! one is read further along; with the AutoETS model chosen at the last selection), its anomaly detector's bounded memory
//! (`anomaly.memory` values) and its changepoint run-length posterior (at most 64 run lengths).
//! All of it is checkpointed exactly. A series it has no state for (first sight, or after a
//! restart without a checkpoint) is warmed up from the window's carried history, so the same
//! input always gives the same scores in replay, and a restarted live instance converges to them
//! as its memory refills.
//!
//! ```
//! use chrono::{DateTime, Utc};
//! use foresight_events::{EntityId, FeatureWindow, MetricStats, Origin, Output, Processor};
//! use foresight_scoring::{Scorer, ScoringConfig, Threshold};
//!
//! let config = ScoringConfig {
//!     thresholds: vec![Threshold { metric: "disk_used_pct".into(), above: Some(95.0), below: None }],
//!     ..ScoringConfig::default()
//! };
//! let mut scorer = Scorer::new(config).unwrap();
//! // A disk filling by about one point a minute, now at 80 %.
//! let history: Vec<f64> = (0..40).map(|i| 41.0 + i as f64 + (i % 3) as f64 * 0.3).collect();
//! let window = FeatureWindow {
//!     entity: EntityId::new("node-1").unwrap(),
//!     start: DateTime::<Utc>::from_timestamp(2340, 0).unwrap(),
//!     end: DateTime::<Utc>::from_timestamp(2400, 0).unwrap(),
//!     metrics: [("disk_used_pct".to_string(), MetricStats {
//!         count: 1, mean: 80.0, min: 80.0, max: 80.0, last: 80.0, std_dev: 0.0,
//!         p50: 80.0, p95: 80.0, p99: 80.0, slope_per_s: 0.0, rate_per_s: None, resets: 0,
//!         ewma: 80.0, history, gap_windows: 0,
//!     })].into(),
//!     logs: None,
//! };
//! let mut out = Vec::new();
//! scorer.process(window, Origin { input: 0, partition: 0, offset: 0 }, &mut out);
//! let Output::Event(score) = &out[0] else { panic!() };
//! assert!(score.probability > 0.9, "{score:?}");
//! assert!(score.time_to_failure_seconds.unwrap() <= 30 * 60);
//! ```

pub mod anomaly;
pub mod changepoint;
mod ets;
pub mod fleet;
pub mod model;
mod season;

use std::time::Duration;

use std::collections::BTreeMap;

use hashbrown::{Equivalent, HashMap};

use augurs::{
    Predict,
    ets::{
        AutoETS,
        model::{ErrorComponent, ModelType, SeasonalComponent, TrendComponent, Unfit},
    },
    mstl::MSTLModel,
    prelude::Fit,
};
use distrs::Normal;
use foresight_events::{
    Band, Contributor, EntityId, FeatureWindow, LogStats, MetricStats, Origin, Output, Processor,
    RiskScore, ScoreMethod, StateChange, StateError, decode_state, encode_state,
};
use serde::{Deserialize, Serialize};

/// Version string of the prior scorer, recorded in every score it makes.
pub const PRIOR_MODEL_VERSION: &str = "prior-signals-2";

/// The signal kinds the per-entity scorer evaluates, as named in [`RiskScore::signals`] and in
/// contributors.
pub const ENTITY_SIGNALS: [&str; 4] = ["forecast_breach", "anomaly", "changepoint", "logs"];

/// A declared limit of one metric: crossing it is a failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    /// The metric name.
    pub metric: String,
    /// Failure when the metric goes above this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// Failure when the metric goes below this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
}

/// Probability thresholds of the bands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bands {
    /// From this probability on, a score is `moderate`.
    pub moderate: f64,
    /// From this probability on, a score is `high`.
    pub high: f64,
}

impl Default for Bands {
    fn default() -> Self {
        Self {
            moderate: 0.3,
            high: 0.7,
        }
    }
}

impl Bands {
    /// The band of a probability.
    pub fn of(&self, p: f64) -> Band {
        if p >= self.high {
            Band::High
        } else if p >= self.moderate {
            Band::Moderate
        } else {
            Band::Low
        }
    }
}

/// Scoring configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringConfig {
    /// How far ahead to look.
    #[serde(with = "humantime_serde")]
    pub horizon: Duration,
    /// Level of the forecast's prediction intervals and of the probability's interval.
    pub level: f64,
    /// Fewest windows of history before a metric is forecast.
    pub min_history: usize,
    /// Most recent windows used to fit (older history is ignored).
    pub max_fit_points: usize,
    /// Band thresholds.
    pub bands: Bands,
    /// Declared limits per metric.
    pub thresholds: Vec<Threshold>,
    /// The within-series anomaly detector.
    pub anomaly: anomaly::AnomalyConfig,
    /// How the prior turns each signal into a probability of failure.
    pub prior: Prior,
    /// Most series (entity x metric) whose anomaly state is kept; beyond it the series seen
    /// least recently are forgotten (and warmed up again from their history when they return).
    pub max_series: usize,
    /// Most contributors listed in a score (the strongest).
    pub max_contributors: usize,
    /// A metric's forecast is refitted every this many windows; in between, each window's value
    /// moves the fitted AutoETS model's state on with its fitted parameters and the forecast is
    /// read from there, unless the series drifts. A forecast whose state is not carried forward
    /// (MSTL's) is only read further along, so it goes stale: it is refitted four times as often
    /// (every `refit_every / 4` windows, at least every window).
    pub refit_every: usize,
    /// AutoETS chooses its model (no trend, additive trend, damped trend, by AICc) at a metric's
    /// first fit, at a drift refit confirmed by two values (see `drift_sigmas`) and at every
    /// this many scheduled refits; the other refits re-estimate the chosen model only (one fit
    /// instead of three). 1 chooses at every refit.
    pub reselect_every: usize,
    /// Drift: a newest value further than this many forecast standard deviations from what the
    /// current fit forecast for it triggers a refit at once; the chosen model is re-estimated
    /// unless the value before it was as far off on the same side, in which case AutoETS
    /// chooses again (a lone outlier does not change the model's form).
    pub drift_sigmas: f64,
    /// Seasonal periods (in windows) are looked for in the periodogram at each refit, from this
    /// length up to a third of the history; a series with a significant one (Fisher's g test,
    /// see `season`) is forecast with MSTL (seasonal decomposition, AutoETS on the rest). 0
    /// turns seasonality detection off.
    pub min_season: usize,
    /// The fleet stage: peer outliers, dependency propagation, ranking.
    pub fleet: fleet::FleetConfig,
}

/// The documented prior combination: what each signal's evidence is worth as a probability of
/// failure within the horizon, before a learned model replaces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Prior {
    /// A metric's anomaly counts as at most this...
    pub anomaly: f64,
    /// ...growing linearly with its evidence (`-log10 p`) from this, where it starts to count...
    pub anomaly_from: f64,
    /// ...to this, where it counts fully.
    pub anomaly_full: f64,
    /// A changepoint in a metric's recent history counts as this.
    pub changepoint: f64,
    /// A changepoint counts when it is within this many of the newest windows.
    pub changepoint_recent: usize,
    /// BOCPD's expected run length between changes, in windows.
    pub changepoint_hazard: f64,
    /// Log evidence counts as at most this.
    pub logs: f64,
    /// Error rate (errors / records) that is normal.
    pub error_rate_baseline: f64,
    /// Share of never-seen templates that is normal.
    pub new_template_baseline: f64,
}

impl Default for Prior {
    fn default() -> Self {
        Self {
            anomaly: 0.9,
            anomaly_from: 3.0,
            anomaly_full: 12.0,
            changepoint: 0.2,
            changepoint_recent: 2,
            changepoint_hazard: 250.0,
            logs: 0.6,
            error_rate_baseline: 0.05,
            new_template_baseline: 0.2,
        }
    }
}

impl Default for ScoringConfig {
    fn default() -> Self {
        Self {
            horizon: Duration::from_secs(30 * 60),
            level: 0.9,
            min_history: 12,
            max_fit_points: 60,
            bands: Bands::default(),
            thresholds: Vec::new(),
            anomaly: anomaly::AnomalyConfig::default(),
            prior: Prior::default(),
            max_series: 200_000,
            max_contributors: 8,
            refit_every: 48,
            reselect_every: 4,
            drift_sigmas: 3.0,
            min_season: 4,
            fleet: fleet::FleetConfig::default(),
        }
    }
}

/// An invalid scoring configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoringConfigError {
    /// The interval level must be strictly between 0 and 1.
    #[error("scoring.level must be strictly between 0 and 1, not {0}")]
    Level(f64),
    /// Bands must satisfy 0 < moderate < high <= 1.
    #[error("scoring.bands must satisfy 0 < moderate < high <= 1 (got moderate {0}, high {1})")]
    Bands(f64, f64),
    /// The model needs a few points more than it has parameters.
    #[error("scoring.min_history must be at least 8, not {0}")]
    MinHistory(usize),
    /// Fitting uses at least the minimum history.
    #[error("scoring.max_fit_points ({0}) must be at least scoring.min_history ({1})")]
    MaxFitPoints(usize, usize),
    /// A threshold needs exactly one direction.
    #[error(
        "scoring.thresholds[{0}] ({1}) must set exactly one of `above` and `below`, to a finite number"
    )]
    Threshold(usize, String),
    /// The horizon must be positive.
    #[error("scoring.horizon must be positive")]
    Horizon,
    /// The anomaly detector's configuration is invalid.
    #[error(transparent)]
    Anomaly(#[from] anomaly::AnomalyConfigError),
    /// A prior weight must be a probability.
    #[error("scoring.prior.{0} must be between 0 and 1, not {1}")]
    PriorWeight(&'static str, f64),
    /// A size that must be positive is zero.
    #[error("scoring.{0} must be at least 1")]
    Zero(&'static str),
    /// A number outside its range.
    #[error("scoring.{key} must be {rule}, not {value}")]
    OutOfRange {
        /// The key.
        key: &'static str,
        /// What it must be.
        rule: &'static str,
        /// What it is.
        value: f64,
    },
}

impl ScoringConfig {
    /// Checks the configuration, reporting every problem.
    pub fn validate(&self) -> Vec<ScoringConfigError> {
        let mut errors = Vec::new();
        if !(self.level > 0.0 && self.level < 1.0) {
            errors.push(ScoringConfigError::Level(self.level));
        }
        let b = &self.bands;
        if !(b.moderate > 0.0 && b.moderate < b.high && b.high <= 1.0) {
            errors.push(ScoringConfigError::Bands(b.moderate, b.high));
        }
        if self.min_history < 8 {
            errors.push(ScoringConfigError::MinHistory(self.min_history));
        }
        if self.max_fit_points < self.min_history {
            errors.push(ScoringConfigError::MaxFitPoints(
                self.max_fit_points,
                self.min_history,
            ));
        }
        if self.horizon.is_zero() {
            errors.push(ScoringConfigError::Horizon);
        }
        for (i, t) in self.thresholds.iter().enumerate() {
            let finite = |v: Option<f64>| v.is_some_and(f64::is_finite);
            if finite(t.above) == finite(t.below) || t.above.is_some() && t.below.is_some() {
                errors.push(ScoringConfigError::Threshold(i, t.metric.clone()));
            }
        }
        let pr = &self.prior;
        for (name, w) in [
            ("anomaly", pr.anomaly),
            ("changepoint", pr.changepoint),
            ("logs", pr.logs),
            ("error_rate_baseline", pr.error_rate_baseline),
            ("new_template_baseline", pr.new_template_baseline),
        ] {
            if !(0.0..=1.0).contains(&w) {
                errors.push(ScoringConfigError::PriorWeight(name, w));
            }
        }
        if !(pr.anomaly_from >= 0.0
            && pr.anomaly_full > pr.anomaly_from
            && pr.anomaly_full.is_finite())
        {
            errors.push(ScoringConfigError::OutOfRange {
                key: "prior.anomaly_full",
                rule: "finite and above prior.anomaly_from, itself at least 0",
                value: pr.anomaly_full,
            });
        }
        if !(pr.changepoint_hazard.is_finite() && pr.changepoint_hazard >= 1.0) {
            errors.push(ScoringConfigError::OutOfRange {
                key: "prior.changepoint_hazard",
                rule: "finite and at least 1",
                value: pr.changepoint_hazard,
            });
        }
        if !(self.drift_sigmas.is_finite() && self.drift_sigmas > 0.0) {
            errors.push(ScoringConfigError::OutOfRange {
                key: "drift_sigmas",
                rule: "finite and positive",
                value: self.drift_sigmas,
            });
        }
        for (name, v) in [
            ("refit_every", self.refit_every),
            ("reselect_every", self.reselect_every),
            ("max_series", self.max_series),
            ("max_contributors", self.max_contributors),
            ("prior.changepoint_recent", pr.changepoint_recent),
        ] {
            if v == 0 {
                errors.push(ScoringConfigError::Zero(name));
            }
        }
        errors.extend(
            self.anomaly
                .validate()
                .into_iter()
                .map(ScoringConfigError::Anomaly),
        );
        errors
    }
}

/// The scorer: [`FeatureWindow`] in, [`RiskScore`] out.
#[derive(Debug)]
pub struct Scorer {
    config: ScoringConfig,
    z: f64,
    /// Anomaly state per series (entity, metric), found by [`SeriesRef`] without building a key.
    series: HashMap<(EntityId, String), Series>,
    /// End (event time, ms) of the window being scored: when its series were last seen, for
    /// forgetting the least recently seen ones. Event time, so what is forgotten does not depend
    /// on when the scorer ran.
    now: i64,
    /// Series forgotten since their partition's last checkpoint, by partition.
    forgotten: Vec<(i32, String)>,
    /// Forecast fits made so far.
    fits: u64,
}

/// A fitted forecast, read further along at each window until the next refit.
#[derive(Debug, Clone)]
struct CachedForecast {
    /// Point forecasts from the window after the fit on, `horizon + refit_every` steps.
    points: Vec<f64>,
    /// Their standard deviations.
    sds: Vec<f64>,
    /// Windows since the fit.
    age: usize,
    /// History length it was fitted on.
    fitted_on: usize,
    /// The model that made it, for the explanation.
    model: &'static str,
    /// The AutoETS model chosen (not for MSTL or a constant), re-estimated alone at scheduled
    /// refits until the next choice.
    chosen: Option<Chosen>,
    /// The fitted AutoETS model's recursion, when recovered: each window's value then moves its
    /// state on, and `points`/`sds` are the forecast from the newest state (`age` counts the
    /// windows since the fit for the schedule only). Without it the fitted forecast is read
    /// `age` steps further along.
    filter: Option<ets::EtsFilter>,
}

/// The form of the AutoETS model chosen at a series' last model selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Chosen {
    /// An additive trend (else none).
    trend: bool,
    /// The trend is damped.
    damped: bool,
    /// Scheduled refits since the choice.
    refits: u32,
}

/// One series' state: its anomaly and changepoint detectors and its forecast.
#[derive(Debug)]
struct Series {
    forecast: Option<CachedForecast>,
    detector: anomaly::AnomalyDetector,
    /// Made at the series' first changepoint step (warmed up on the window's history then), so
    /// that a series restored from a checkpoint written without it gets one too.
    changes: Option<changepoint::ChangeDetector>,
    /// The partition its entity came from, to drop it when the partition is revoked.
    partition: i32,
    /// Event time (ms) of its last update.
    seen: i64,
    /// Changed since its partition's last checkpoint.
    dirty: bool,
}

/// One signal's contribution, with its interval.
#[derive(Debug, Clone, PartialEq)]
struct Signal {
    probability: f64,
    lower: f64,
    upper: f64,
    steps_to_breach: Option<usize>,
    contributor: Contributor,
}

impl Signal {
    /// A signal whose probability is a point value of the prior (no interval of its own, no
    /// lead time).
    fn point(contributor: Contributor) -> Self {
        let p = contributor.probability;
        Self {
            probability: p,
            lower: p,
            upper: p,
            steps_to_breach: None,
            contributor,
        }
    }
}

/// One metric's forecast-breach signal.
#[derive(Debug, Clone, PartialEq)]
struct Breach {
    probability: f64,
    lower: f64,
    upper: f64,
    steps_to_breach: Option<usize>,
    forecast_at_horizon: f64,
    /// The forecast's 80% prediction interval at the horizon.
    interval_at_horizon: [f64; 2],
    /// The forecasting model (`AutoETS`, `MSTL`, `constant`).
    model: &'static str,
}

impl Scorer {
    /// A scorer with the given configuration.
    pub fn new(config: ScoringConfig) -> Result<Self, Vec<ScoringConfigError>> {
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        let z = Normal::ppf(0.5 + config.level / 2.0, 0.0, 1.0);
        Ok(Self {
            config,
            z,
            series: HashMap::new(),
            now: i64::MIN,
            forgotten: Vec::new(),
            fits: 0,
        })
    }

    /// Forecast fits made so far (refits are scheduled and on drift, not every window).
    pub fn fits(&self) -> u64 {
        self.fits
    }

    /// Series whose state is kept.
    pub fn series(&self) -> usize {
        self.series.len()
    }

    /// The state of a series, created (its anomaly detector warmed up on the window's history
    /// before the newest value) when it is new, and marked as seen now. On the map alone, so the
    /// rest of the scorer stays usable while the series is borrowed.
    fn series_in<'a>(
        map: &'a mut HashMap<(EntityId, String), Series>,
        now: i64,
        anomaly: &anomaly::AnomalyConfig,
        entity: &EntityId,
        name: &str,
        stats: &MetricStats,
        partition: i32,
    ) -> &'a mut Series {
        let series = map.entry_ref(&SeriesRef(entity, name)).or_insert_with(|| {
            let mut detector = anomaly::AnomalyDetector::new(anomaly.clone(), 1);
            let past = stats.history.len().saturating_sub(1);
            for v in &stats.history[..past] {
                detector.update(&[*v]);
            }
            Series {
                forecast: None,
                detector,
                changes: None,
                partition,
                seen: now,
                dirty: true,
            }
        });
        series.seen = now;
        series.dirty = true;
        series.partition = partition;
        series
    }

    /// The anomaly signal of one series: its detector takes the window's mean (a detector met for
    /// the first time is warmed up on the history before it).
    fn anomaly(pr: &Prior, series: &mut Series, name: &str, stats: &MetricStats) -> Option<Signal> {
        let a = series.detector.update(&[stats.mean]);
        let strength =
            ((a.evidence - pr.anomaly_from) / (pr.anomaly_full - pr.anomaly_from)).clamp(0.0, 1.0);
        if strength <= 0.0 {
            return None;
        }
        let probability = pr.anomaly * strength;
        Some(Signal::point(Contributor {
            forecast_interval: None,
            signal: "anomaly".into(),
            metric: Some(name.to_owned()),
            probability,
            value: a.score,
            detail: format!(
                "{name} = {:.3} is unusual for this series (anomaly score {:.3}, p = {:.2e})",
                stats.mean, a.score, a.p_value
            ),
        }))
    }

    /// A recent change of regime in a metric: its series' changepoint detector takes the
    /// window's mean (a detector met for the first time is warmed up on the history before it,
    /// each new run's prior scaled by the history), and a change it dates within the newest
    /// `changepoint_recent` windows counts if those windows also stand apart from the ones
    /// before them.
    fn changepoint(
        config: &ScoringConfig,
        series: &mut Series,
        name: &str,
        stats: &MetricStats,
    ) -> Option<Signal> {
        let h = &stats.history;
        let reference = changepoint::Reference::of(h)?;
        let hazard = config.prior.changepoint_hazard;
        let detector = series.changes.get_or_insert_with(|| {
            let mut d = changepoint::ChangeDetector::default();
            for v in &h[..h.len() - 1] {
                d.step(*v, reference, hazard);
            }
            d
        });
        let ago = detector.step(stats.mean, reference, hazard);
        let recent = config.prior.changepoint_recent;
        if h.len() < config.min_history || ago >= recent || ago + 1 >= h.len() {
            return None;
        }
        let sd = reference.variance.sqrt();
        if sd <= reference.mean.abs() * 1e-9 + f64::MIN_POSITIVE {
            return None;
        }
        // A change within the newest `recent` windows must show in them: unless they stand
        // apart from the windows before (by two of their standard deviations), it does not count.
        let recent = recent.min(h.len() - 2);
        let (past, newest) = h.split_at(h.len() - recent);
        let past_mean = past.iter().sum::<f64>() / past.len() as f64;
        let past_sd =
            (past.iter().map(|v| (v - past_mean).powi(2)).sum::<f64>() / past.len() as f64).sqrt();
        let newest_mean = newest.iter().sum::<f64>() / newest.len() as f64;
        if (newest_mean - past_mean).abs() < 2.0 * past_sd {
            return None;
        }
        let last = h.len() - 1 - ago;
        let before = h[..last].iter().sum::<f64>() / last as f64;
        let after = h[last..].iter().sum::<f64>() / (h.len() - last) as f64;
        let probability = config.prior.changepoint;
        Some(Signal::point(Contributor {
            forecast_interval: None,
            signal: "changepoint".into(),
            metric: Some(name.to_owned()),
            probability,
            value: after - before,
            detail: format!(
                "{name} changed regime {ago} window(s) ago: mean {before:.3} before, {after:.3} since"
            ),
        }))
    }

    /// Error rate and never-seen templates beyond their baselines.
    fn logs(&self, logs: &LogStats) -> Option<Signal> {
        let pr = &self.config.prior;
        let excess = |v: f64, base: f64| ((v - base) / (1.0 - base).max(1e-9)).clamp(0.0, 1.0);
        let errors = excess(logs.error_rate, pr.error_rate_baseline);
        let novel = excess(logs.new_template_share, pr.new_template_baseline);
        let strength = 1.0 - (1.0 - errors) * (1.0 - novel);
        if strength <= 0.0 {
            return None;
        }
        let probability = pr.logs * strength;
        Some(Signal::point(Contributor {
            forecast_interval: None,
            signal: "logs".into(),
            metric: None,
            probability,
            value: logs.error_rate,
            detail: format!(
                "{} log records: error rate {:.3} (normal {:.3}), {} never-seen templates ({:.3} of them)",
                logs.count,
                logs.error_rate,
                pr.error_rate_baseline,
                logs.new_templates,
                logs.new_template_share
            ),
        }))
    }

    /// Forgets the least recently seen tenth of the series once there are too many.
    fn bound_series(&mut self) {
        if self.series.len() <= self.config.max_series {
            return;
        }
        // The least recently seen in event time, ties broken by series: which series go is
        // decided by the data alone.
        let mut order: Vec<(i64, &(EntityId, String))> =
            self.series.iter().map(|(k, s)| (s.seen, k)).collect();
        let cut = (order.len() / 10).max(order.len() - self.config.max_series);
        order.select_nth_unstable(cut);
        let gone: Vec<(EntityId, String)> =
            order[..cut].iter().map(|(_, k)| (*k).clone()).collect();
        for key in gone {
            if let Some(s) = self.series.remove(&key) {
                self.forgotten
                    .push((s.partition, series_key(&key.0, &key.1)));
            }
        }
    }

    /// Fits a forecast of `steps` steps to `history`: MSTL when the history has a significant season,
    /// else AutoETS; a constant series forecasts itself.
    /// `chosen`: when the series is forecast with AutoETS (no season found), re-estimate this
    /// model only instead of choosing one.
    fn fit(
        config: &ScoringConfig,
        z: f64,
        history: &[f64],
        steps: usize,
        chosen: Option<Chosen>,
    ) -> Option<CachedForecast> {
        let done = |points: Vec<f64>, sds: Vec<f64>, model| CachedForecast {
            points,
            sds,
            age: 0,
            fitted_on: history.len(),
            model,
            chosen: None,
            filter: None,
        };
        if history.iter().all(|v| *v == history[0]) {
            return Some(done(vec![history[0]; steps], vec![0.0; steps], "constant"));
        }
        let intervals = |forecast: augurs::Forecast| -> Option<(Vec<f64>, Vec<f64>)> {
            let iv = forecast.intervals?;
            let sds = iv
                .upper
                .iter()
                .zip(&iv.lower)
                .map(|(u, l)| ((u - l) / (2.0 * z)).max(0.0))
                .collect();
            Some((forecast.point, sds))
        };
        if let Some(period) = season::period(history, config.min_season) {
            let trend = AutoETS::new(1, "AZN")
                .expect("AZN is a valid AutoETS spec")
                .into_trend_model();
            let forecast = MSTLModel::new(vec![period], trend)
                .fit(history)
                .ok()
                .and_then(|f| f.predict(steps, config.level).ok())
                .and_then(intervals);
            if let Some((points, sds)) = forecast {
                return Some(done(points, sds, "MSTL"));
            }
        }
        // The chosen form is re-estimated alone; else (or if that fails) every form is fitted
        // and the one with the least AICc chosen.
        let refitted =
            chosen.and_then(|c| Some((fit_form(c.trend, c.damped, history)?, c.refits + 1)));
        let (fitted, refits) = match refitted {
            Some(r) => r,
            None => (choose_form(history)?, 0),
        };
        let (points, sds) = intervals(fitted.predict(steps, config.level).ok()?)?;
        let chosen = Chosen {
            trend: fitted.model_type().trend != TrendComponent::None,
            damped: fitted.damped(),
            refits,
        };
        let filter = ets::EtsFilter::recover(&points, &sds, chosen.trend, chosen.damped);
        Some(CachedForecast {
            chosen: Some(chosen),
            filter,
            ..done(points, sds, "AutoETS")
        })
    }

    /// The forecast of the next `steps` windows of a series: the cached fit read one window
    /// further along, or a new fit when the schedule says so, the series drifted away from the
    /// cached forecast, or there is none.
    fn forecast(
        &mut self,
        entity: &EntityId,
        name: &str,
        stats: &MetricStats,
        steps: usize,
        partition: i32,
    ) -> Option<(Vec<f64>, Vec<f64>, usize, &'static str)> {
        let history = &stats.history[stats
            .history
            .len()
            .saturating_sub(self.config.max_fit_points)..];
        if history.len() < self.config.min_history {
            return None;
        }
        let newest = *history.last()?;
        let series = Self::series_in(
            &mut self.series,
            self.now,
            &self.config.anomaly,
            entity,
            name,
            stats,
            partition,
        );
        let cached = series.forecast.take();
        let (refit_every, drift) = (self.config.refit_every, self.config.drift_sigmas);
        // The model chosen last, to re-estimate alone at a refit (none after a confirmed drift,
        // or when it is time to choose again).
        let mut chosen = None;
        let kept = cached.and_then(|mut c| {
            let age = c.age + 1;
            // The forecast of this window: one step ahead of the filter's state, else `age`
            // steps ahead of the fit's.
            let (mean, sd) = match &c.filter {
                Some(filter) => filter.next(),
                None => (*c.points.get(age - 1)?, *c.sds.get(age - 1)?),
            };
            // Drift: the newest value far off this window's forecast refits at once. The form
            // is chosen again only when the value before it is as far off on the same side (the
            // series has moved); a lone outlier re-estimates the chosen form (one fit, not three).
            // Measured on the demo fleet: refitting at once keeps the leak's warning (waiting for
            // a second value lost it); choosing again on a lone value did no better overall
            // (docs/benchmarks.md, Replay).
            let off = |v: f64| {
                let e = v - mean;
                (e.abs() > drift * sd.max(mean.abs() * 1e-9)).then_some(e > 0.0)
            };
            let newest_off = off(newest);
            let drifted = newest_off.is_some();
            let confirmed =
                drifted && newest_off == history.iter().nth_back(1).copied().and_then(off);
            // Due on schedule (sooner for a forecast only read further along: it does not see
            // the values since its fit), or once the history has doubled since a fit on a short
            // one (so a series' first fits, on 12 windows, say, do not stand for `refit_every`).
            let every = if c.filter.is_some() {
                refit_every
            } else {
                stale_refit_every(refit_every)
            };
            let fresh = age < every
                && history.len() < 2 * c.fitted_on
                && (c.filter.is_some() || age + steps <= c.points.len());
            if !confirmed {
                chosen = c
                    .chosen
                    .filter(|k| (k.refits as usize + 1) < self.config.reselect_every);
            }
            (fresh && !drifted).then(|| {
                c.age = age;
                if let Some(filter) = &mut c.filter {
                    filter.update(newest);
                    filter.forecast(steps, &mut c.points, &mut c.sds);
                }
                c
            })
        });
        let c = match kept {
            Some(c) => c,
            None => {
                self.fits += 1;
                Self::fit(&self.config, self.z, history, steps + refit_every, chosen)?
            }
        };
        let from = if c.filter.is_some() { 0 } else { c.age };
        let result = (
            c.points[from..from + steps].to_vec(),
            c.sds[from..from + steps].to_vec(),
            c.fitted_on,
            c.model,
        );
        series.forecast = Some(c);
        Some(result)
    }

    fn breach(
        &mut self,
        entity: &EntityId,
        name: &str,
        stats: &MetricStats,
        threshold: &Threshold,
        steps: usize,
        partition: i32,
    ) -> Option<Breach> {
        let (limit, above) = match (threshold.above, threshold.below) {
            (Some(a), _) => (a, true),
            (None, Some(b)) => (b, false),
            (None, None) => return None,
        };
        let (points, sds, fitted_on, model) =
            self.forecast(entity, name, stats, steps, partition)?;
        if points.iter().any(|p| !p.is_finite()) {
            return None;
        }
        let scale = limit.abs().max(1.0) * 1e-9;
        // P(beyond) = Φ(z) at each step, z the distance beyond the limit in standard deviations
        // (±∞ where the forecast is certain). Φ is monotone, so the largest P over the steps is Φ
        // of the largest z: one evaluation per bound, not one per step.
        let z_beyond = |mean: f64, sd: f64| {
            let d = if above { mean - limit } else { limit - mean };
            if sd <= scale {
                if d > 0.0 {
                    f64::INFINITY
                } else {
                    f64::NEG_INFINITY
                }
            } else {
                d / sd
            }
        };
        let phi = |z: f64| {
            if z == f64::INFINITY {
                1.0
            } else if z == f64::NEG_INFINITY {
                0.0
            } else {
                Normal::cdf(z, 0.0, 1.0)
            }
        };
        let shift = self.z * sds[0] / (fitted_on as f64).sqrt();
        let toward = if above { shift } else { -shift };
        let (mut z, mut z_worse, mut z_better) =
            (f64::NEG_INFINITY, f64::NEG_INFINITY, f64::NEG_INFINITY);
        let mut steps_to_breach = None;
        for (h, (&mean, &sd)) in points.iter().zip(&sds).enumerate() {
            let zh = z_beyond(mean, sd);
            z = z.max(zh);
            z_worse = z_worse.max(z_beyond(mean + toward, sd));
            z_better = z_better.max(z_beyond(mean - toward, sd));
            // Φ(z) < 0.5 well below zero: evaluated only near it.
            if steps_to_breach.is_none() && zh > -1e-3 && phi(zh) >= 0.5 {
                steps_to_breach = Some(h + 1);
            }
        }
        let probability = phi(z);
        Some(Breach {
            probability,
            lower: phi(z_better).min(probability),
            upper: phi(z_worse).max(probability),
            steps_to_breach,
            forecast_at_horizon: *points.last()?,
            interval_at_horizon: {
                // z of a two-sided 80% interval.
                let (mean, sd) = (*points.last()?, *sds.last()?);
                [mean - 1.2816 * sd, mean + 1.2816 * sd]
            },
            model,
        })
    }
}

impl Processor for Scorer {
    type Input = FeatureWindow;
    type Output = RiskScore;

    fn process(&mut self, window: FeatureWindow, origin: Origin, out: &mut Vec<Output<RiskScore>>) {
        // A window met before (the feature stage published it again after a restart), or older
        // than one scored: scoring it again would move this entity's forecasts and detectors on
        // twice, so a scorer redoing its input from a checkpoint would not reproduce what it
        // published (the same score id with other content). Its score went out the first time.
        let end = window.end.timestamp_millis();
        if window.metrics.keys().any(|name| {
            self.series
                .get(&SeriesRef(&window.entity, name))
                .is_some_and(|s| s.seen >= end)
        }) {
            return;
        }
        self.now = end;
        let window_ms = (window.end - window.start).num_milliseconds().max(1);
        let horizon_ms = self.config.horizon.as_millis() as i64;
        let steps = (horizon_ms + window_ms - 1) / window_ms;
        let mut signals: Vec<Signal> = Vec::new();
        // Taken out for the loop (breach needs `&mut self`), put back after it.
        let thresholds = std::mem::take(&mut self.config.thresholds);
        for threshold in &thresholds {
            // A threshold on `m` applies to `m` and to each of its series `m{...}`.
            let m = threshold.metric.as_str();
            let series = window
                .metrics
                .range(threshold.metric.clone()..)
                .take_while(|(name, _)| name.starts_with(m))
                .filter(|(name, _)| name.len() == m.len() || name.as_bytes()[m.len()] == b'{');
            for (name, stats) in series {
                let Some(breach) = self.breach(
                    &window.entity,
                    name,
                    stats,
                    threshold,
                    steps as usize,
                    origin.partition,
                ) else {
                    continue;
                };
                let (op, limit) = match (threshold.above, threshold.below) {
                    (Some(a), _) => (">", a),
                    (_, b) => ("<", b.unwrap_or_default()),
                };
                let detail = format!(
                    "{name} forecast {:.3} at the horizon by {} (now {:.3}); P({name} {op} {limit}) = {:.3}",
                    breach.forecast_at_horizon, breach.model, stats.mean, breach.probability
                );
                signals.push(Signal {
                    probability: breach.probability,
                    lower: breach.lower,
                    upper: breach.upper,
                    steps_to_breach: breach.steps_to_breach,
                    contributor: Contributor {
                        forecast_interval: Some(breach.interval_at_horizon),
                        signal: "forecast_breach".into(),
                        metric: Some(name.clone()),
                        probability: breach.probability,
                        value: breach.forecast_at_horizon,
                        detail,
                    },
                });
            }
        }
        self.config.thresholds = thresholds;
        for (name, stats) in &window.metrics {
            // One lookup per series for both detectors.
            let series = Self::series_in(
                &mut self.series,
                self.now,
                &self.config.anomaly,
                &window.entity,
                name,
                stats,
                origin.partition,
            );
            signals.extend(Self::anomaly(&self.config.prior, series, name, stats));
            signals.extend(Self::changepoint(&self.config, series, name, stats));
        }
        if let Some(l) = window.logs.as_ref().and_then(|l| self.logs(l)) {
            signals.push(l);
        }
        self.bound_series();
        // A window with nothing to score (no history yet, no thresholds) gives no score.
        if signals.is_empty() && !self.scorable(&window) {
            return;
        }
        // Strongest first; ties broken by signal and metric so the order is deterministic.
        signals.sort_by(|a, b| {
            b.probability
                .total_cmp(&a.probability)
                .then_with(|| a.contributor.signal.cmp(&b.contributor.signal))
                .then_with(|| a.contributor.metric.cmp(&b.contributor.metric))
        });
        // Noisy-OR over the strongest signal of each kind.
        let (mut none, mut none_lower, mut none_upper) = (1.0, 1.0, 1.0);
        let mut kinds: Vec<&str> = Vec::new();
        for sig in &signals {
            if kinds.contains(&sig.contributor.signal.as_str()) {
                continue;
            }
            kinds.push(&sig.contributor.signal);
            none *= 1.0 - sig.probability;
            none_lower *= 1.0 - sig.lower;
            none_upper *= 1.0 - sig.upper;
        }
        let probability = (1.0 - none).clamp(0.0, 1.0);
        let lower = (1.0 - none_lower).clamp(0.0, probability);
        let upper = (1.0 - none_upper).clamp(probability, 1.0);
        let time_to_failure_seconds = signals
            .iter()
            .filter_map(|s| s.steps_to_breach)
            .min()
            .map(|h| (h as i64 * window_ms / 1000) as u64);
        let mut strengths: BTreeMap<String, f64> = ENTITY_SIGNALS
            .iter()
            .map(|k| (k.to_string(), 0.0))
            .collect();
        for sig in &signals {
            let v = strengths.entry(sig.contributor.signal.clone()).or_default();
            *v = v.max(sig.probability);
        }
        let observed = window
            .metrics
            .iter()
            .filter(|(_, m)| m.mean.is_finite())
            .map(|(k, m)| (k.clone(), m.mean))
            .collect();
        signals.truncate(self.config.max_contributors);
        out.push(Output::Event(RiskScore {
            window_id: foresight_events::EventData::id(&window),
            entity: window.entity,
            time: window.end,
            horizon_seconds: self.config.horizon.as_secs(),
            probability,
            lower,
            upper,
            time_to_failure_seconds,
            health: (100.0 * (1.0 - probability)).clamp(0.0, 100.0),
            band: self.config.bands.of(probability),
            contributors: signals.into_iter().map(|s| s.contributor).collect(),
            method: ScoreMethod::Prior,
            model_version: PRIOR_MODEL_VERSION.into(),
            signals: strengths,
            observed,
            blast_radius: Vec::new(),
            impact: 1.0,
            rank: None,
        }));
    }

    fn forget_partition(&mut self, partition: i32) {
        self.series.retain(|_, s| s.partition != partition);
        self.forgotten.retain(|(p, _)| *p != partition);
    }

    fn stateful(&self) -> bool {
        true
    }

    fn checkpoint(&mut self, partition: i32) -> Vec<StateChange> {
        let mut dirty: Vec<(&(EntityId, String), &mut Series)> = self
            .series
            .iter_mut()
            .filter(|(_, s)| s.partition == partition && s.dirty)
            .collect();
        dirty.sort_by(|a, b| a.0.cmp(b.0));
        let mut changes: Vec<StateChange> = dirty
            .into_iter()
            .map(|((entity, metric), series)| {
                series.dirty = false;
                StateChange::Put {
                    key: series_key(entity, metric),
                    value: encode_state(STATE_VERSION, &series.state()),
                }
            })
            .collect();
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.forgotten)
            .into_iter()
            .partition(|(p, _)| *p == partition);
        self.forgotten = kept;
        changes.extend(gone.into_iter().map(|(_, key)| StateChange::Delete { key }));
        changes
    }

    fn restore(
        &mut self,
        partition: i32,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StateError> {
        for (key, value) in entries {
            let fail = |reason: String| StateError::new(&key, reason);
            let (entity, metric) = key
                .split_once(SERIES_KEY_SEPARATOR)
                .ok_or_else(|| fail("not an entity and a metric".into()))?;
            let entity = EntityId::new(entity).map_err(|e| fail(e.to_string()))?;
            let state = SeriesState::decode(&key, &value)?;
            let series = Series::restored(state, &self.config.anomaly, partition).map_err(fail)?;
            self.series.insert((entity, metric.to_owned()), series);
        }
        Ok(())
    }
}

/// Version of the checkpointed series state encoding (postcard of [`SeriesState`]). Versions 1
/// to 4 ([`SeriesStateV1`] without the changepoint detector, [`SeriesStateV2`] without the
/// smoothing recursion, [`SeriesStateV3`] without the anomaly detector's records,
/// [`SeriesStateV4`] with the changepoint detector's probabilities as logarithms) are still read.
const STATE_VERSION: u8 = 5;

/// Separates entity and metric in a series' checkpoint key (entity ids hold no control
/// characters, so the first one splits them).
const SERIES_KEY_SEPARATOR: char = '\u{1f}';

/// Windows between scheduled refits of a forecast whose state is not carried forward (MSTL's,
/// or an AutoETS fit whose recursion could not be recovered): a quarter of `refit_every`.
fn stale_refit_every(refit_every: usize) -> usize {
    (refit_every / 4).max(1)
}

/// A series' key, borrowed: hashes and compares as the owned `(EntityId, String)` it stands for.
#[derive(Hash)]
struct SeriesRef<'a>(&'a EntityId, &'a str);

impl Equivalent<(EntityId, String)> for SeriesRef<'_> {
    fn equivalent(&self, key: &(EntityId, String)) -> bool {
        *self.0 == key.0 && self.1 == key.1
    }
}

/// The owned key, built only when a series is first met.
impl From<&SeriesRef<'_>> for (EntityId, String) {
    fn from(key: &SeriesRef<'_>) -> Self {
        (key.0.clone(), key.1.to_owned())
    }
}

fn series_key(entity: &EntityId, metric: &str) -> String {
    format!("{entity}{SERIES_KEY_SEPARATOR}{metric}")
}

/// The forms of exponential smoothing model the scorer forecasts with (additive errors, no
/// season), as `(trend, damped)`, in the order augurs' AutoETS tries them for the spec `AZN`: no
/// trend, additive trend, damped additive trend.
const ETS_FORMS: [(bool, bool); 3] = [(false, false), (true, false), (true, true)];

/// augurs' fit of one form to `history`.
///
/// Fitted with `nmse(1)`: the fit maximises the likelihood, which reads only the one-step
/// forecast, but augurs' default of 3 also forecasts two steps further at every value of every
/// evaluation of it (for the average-MSE criteria, not used here): 29 % of the instructions of a
/// choice among the forms, for a model identical bit for bit (docs/benchmarks.md, Replay).
fn fit_form(trend: bool, damped: bool, history: &[f64]) -> Option<augurs::ets::model::Model> {
    let form = ModelType {
        error: ErrorComponent::Additive,
        trend: if trend {
            TrendComponent::Additive
        } else {
            TrendComponent::None
        },
        season: SeasonalComponent::None,
    };
    Unfit::new(form).damped(damped).nmse(1).fit(history).ok()
}

/// The model augurs' `AutoETS::new(1, "AZN")` chooses for `history` (of the forms with an AICc,
/// the one with the least, the first of equals), fitted as [`fit_form`] fits it. AutoETS fits
/// with `nmse` 3 and has no setting for it. (AutoETS also refuses a history of 6 values or
/// fewer, which the scorer never fits: `min_history` is at least 8.)
fn choose_form(history: &[f64]) -> Option<augurs::ets::model::Model> {
    ETS_FORMS
        .iter()
        .filter_map(|&(trend, damped)| fit_form(trend, damped, history))
        .filter(|model| !model.aicc().is_nan())
        .min_by(|a, b| {
            a.aicc()
                .partial_cmp(&b.aicc())
                .unwrap_or(std::cmp::Ordering::Equal)
        })
}

/// The forecasting models, by the name recorded in explanations.
const FORECAST_MODELS: [&str; 3] = ["constant", "MSTL", "AutoETS"];

/// A series' checkpointed state: its detectors and cached forecast, exactly.
#[derive(Debug, Serialize, Deserialize)]
struct SeriesStateOf<Detector, Changes> {
    forecast: Option<ForecastState>,
    detector: Detector,
    seen: i64,
    changes: Option<Changes>,
    chosen: Option<Chosen>,
    filter: Option<ets::EtsFilter>,
}

/// A series' state as this version writes it.
type SeriesState = SeriesStateOf<anomaly::DetectorState, changepoint::ChangeDetector>;

/// A series' state as version 4 wrote it: the changepoint detector's probabilities as
/// logarithms.
type SeriesStateV4 = SeriesStateOf<anomaly::DetectorState, changepoint::LogChangeDetector>;

/// A series' state as version 3 wrote it: besides, an anomaly detector without its records (its
/// extremes are taken from what it remembers).
type SeriesStateV3 = SeriesStateOf<anomaly::PatternState, changepoint::LogChangeDetector>;

impl<D: Into<anomaly::DetectorState>> From<SeriesStateOf<D, changepoint::LogChangeDetector>>
    for SeriesState
{
    fn from(old: SeriesStateOf<D, changepoint::LogChangeDetector>) -> Self {
        Self {
            forecast: old.forecast,
            detector: old.detector.into(),
            seen: old.seen,
            changes: old.changes.map(Into::into),
            chosen: old.chosen,
            filter: old.filter,
        }
    }
}

/// A series' state as version 2 wrote it: no exponential smoothing recursion (its fitted
/// forecast is read further along until the next refit).
#[derive(Debug, Serialize, Deserialize)]
struct SeriesStateV2 {
    forecast: Option<ForecastState>,
    detector: anomaly::PatternState,
    seen: i64,
    changes: Option<changepoint::LogChangeDetector>,
    chosen: Option<Chosen>,
}

/// A series' state as version 1 wrote it: no changepoint detector (one is warmed up on the
/// history of the series' next window).
#[derive(Debug, Serialize, Deserialize)]
struct SeriesStateV1 {
    forecast: Option<ForecastState>,
    detector: anomaly::PatternState,
    seen: i64,
}

impl From<SeriesStateV1> for SeriesStateV2 {
    fn from(v1: SeriesStateV1) -> Self {
        Self {
            forecast: v1.forecast,
            detector: v1.detector,
            seen: v1.seen,
            changes: None,
            chosen: None,
        }
    }
}

impl From<SeriesStateV2> for SeriesStateV3 {
    fn from(v2: SeriesStateV2) -> Self {
        Self {
            forecast: v2.forecast,
            detector: v2.detector,
            seen: v2.seen,
            changes: v2.changes,
            chosen: v2.chosen,
            filter: None,
        }
    }
}

impl SeriesState {
    fn decode(key: &str, value: &[u8]) -> Result<Self, StateError> {
        match value.first() {
            Some(1) => Ok(
                SeriesStateV3::from(SeriesStateV2::from(decode_state::<SeriesStateV1>(
                    key, 1, value,
                )?))
                .into(),
            ),
            Some(2) => {
                Ok(SeriesStateV3::from(decode_state::<SeriesStateV2>(key, 2, value)?).into())
            }
            Some(3) => Ok(decode_state::<SeriesStateV3>(key, 3, value)?.into()),
            Some(4) => Ok(decode_state::<SeriesStateV4>(key, 4, value)?.into()),
            _ => decode_state(key, STATE_VERSION, value),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ForecastState {
    points: Vec<f64>,
    sds: Vec<f64>,
    age: usize,
    fitted_on: usize,
    model: String,
}

impl Series {
    fn state(&self) -> SeriesState {
        SeriesState {
            forecast: self.forecast.as_ref().map(|f| ForecastState {
                points: f.points.clone(),
                sds: f.sds.clone(),
                age: f.age,
                fitted_on: f.fitted_on,
                model: f.model.to_owned(),
            }),
            detector: self.detector.state(),
            seen: self.seen,
            changes: self.changes.clone(),
            chosen: self.forecast.as_ref().and_then(|f| f.chosen),
            filter: self.forecast.as_ref().and_then(|f| f.filter),
        }
    }

    fn restored(
        state: SeriesState,
        config: &anomaly::AnomalyConfig,
        partition: i32,
    ) -> Result<Self, String> {
        let forecast = match state.forecast {
            None => None,
            Some(f) => {
                let model = FORECAST_MODELS
                    .into_iter()
                    .find(|m| *m == f.model)
                    .ok_or_else(|| format!("unknown forecasting model {:?}", f.model))?;
                Some(CachedForecast {
                    points: f.points,
                    sds: f.sds,
                    age: f.age,
                    fitted_on: f.fitted_on,
                    model,
                    chosen: state.chosen,
                    filter: state.filter,
                })
            }
        };
        if let Some(changes) = &state.changes {
            changes.validate()?;
        }
        if let Some(filter) = &state.filter {
            filter.validate()?;
        }
        Ok(Self {
            forecast,
            detector: anomaly::AnomalyDetector::restored(config.clone(), state.detector)?,
            changes: state.changes,
            partition,
            seen: state.seen,
            dirty: false,
        })
    }
}

impl Scorer {
    /// Whether a window has enough history in some metric to be scored at all: such a window
    /// gets a score even when no signal fired (a low-risk score is news too).
    fn scorable(&self, window: &FeatureWindow) -> bool {
        window
            .metrics
            .values()
            .any(|m| m.history.len() >= self.config.min_history)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use foresight_events::EntityId;

    use super::*;

    fn window(metric: &str, history: Vec<f64>) -> FeatureWindow {
        let n = history.len() as i64;
        let last = *history.last().unwrap();
        FeatureWindow {
            entity: EntityId::new("e").unwrap(),
            start: DateTime::<Utc>::from_timestamp((n - 1) * 60, 0).unwrap(),
            end: DateTime::<Utc>::from_timestamp(n * 60, 0).unwrap(),
            metrics: [(
                metric.to_string(),
                MetricStats {
                    count: 1,
                    mean: last,
                    min: last,
                    max: last,
                    last,
                    std_dev: 0.0,
                    p50: last,
                    p95: last,
                    p99: last,
                    slope_per_s: 0.0,
                    rate_per_s: None,
                    resets: 0,
                    ewma: last,
                    history,
                    gap_windows: 0,
                },
            )]
            .into(),
            logs: None,
        }
    }

    fn scorer(threshold: Threshold) -> Scorer {
        Scorer::new(ScoringConfig {
            thresholds: vec![threshold],
            ..ScoringConfig::default()
        })
        .unwrap()
    }

    fn score(s: &mut Scorer, w: FeatureWindow) -> Option<RiskScore> {
        let mut out = Vec::new();
        s.process(
            w,
            Origin {
                input: 0,
                partition: 0,
                offset: 0,
            },
            &mut out,
        );
        out.into_iter().find_map(|o| match o {
            Output::Event(s) => Some(s),
            Output::Rejected(_) => None,
        })
    }

    fn above(metric: &str, limit: f64) -> Threshold {
        Threshold {
            metric: metric.into(),
            above: Some(limit),
            below: None,
        }
    }

    fn noise(i: usize) -> f64 {
        // Deterministic, zero-mean-ish wiggle.
        ((i * 7919) % 13) as f64 / 13.0 - 0.5
    }

    #[test]
    fn a_steady_metric_far_from_its_limit_is_low_risk() {
        let mut s = scorer(above("cpu", 95.0));
        let h: Vec<f64> = (0..48).map(|i| 40.0 + 2.0 * noise(i)).collect();
        let r = score(&mut s, window("cpu", h)).unwrap();
        assert!(r.probability < 0.01, "{r:?}");
        assert_eq!(r.band, Band::Low);
        assert!(r.time_to_failure_seconds.is_none());
        assert!(r.lower <= r.probability && r.probability <= r.upper);
    }

    #[test]
    fn a_trend_toward_the_limit_is_high_risk_with_a_lead_time() {
        let mut s = scorer(above("disk", 95.0));
        let h: Vec<f64> = (0..48)
            .map(|i| 30.0 + 1.2 * i as f64 + 0.5 * noise(i))
            .collect();
        // Now at ~86, rising 1.2 per minute: the limit is ~7-8 minutes away.
        let r = score(&mut s, window("disk", h)).unwrap();
        assert!(r.probability > 0.95, "{r:?}");
        assert_eq!(r.band, Band::High);
        let ttf = r.time_to_failure_seconds.unwrap();
        assert!((300..=900).contains(&ttf), "{ttf}");
        assert_eq!(r.method, ScoreMethod::Prior);
    }

    #[test]
    fn below_thresholds_work_too() {
        let mut s = scorer(Threshold {
            metric: "voltage".into(),
            above: None,
            below: Some(200.0),
        });
        let h: Vec<f64> = (0..48)
            .map(|i| 240.0 - 0.9 * i as f64 + 0.3 * noise(i))
            .collect();
        let r = score(&mut s, window("voltage", h)).unwrap();
        assert_eq!(r.band, Band::High, "{r:?}");
    }

    #[test]
    fn short_history_gives_no_score_and_scores_are_deterministic() {
        let mut s = scorer(above("cpu", 95.0));
        assert!(score(&mut s, window("cpu", vec![1.0; 5])).is_none());
        // Two scorers fed the same windows give the same scores, ids included.
        let run = || {
            let mut s = scorer(above("cpu", 95.0));
            (20..40)
                .filter_map(|n| {
                    let h: Vec<f64> = (0..n).map(|i| 50.0 + i as f64 + noise(i)).collect();
                    score(&mut s, window("cpu", h))
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (run(), run());
        assert_eq!(a.len(), 20);
        assert_eq!(a, b);
        assert_eq!(
            a.iter()
                .map(foresight_events::EventData::id)
                .collect::<Vec<_>>(),
            b.iter()
                .map(foresight_events::EventData::id)
                .collect::<Vec<_>>()
        );
    }

    /// Windows of one metric with a growing history: `f(i)` is the i-th window's mean.
    fn windows(metric: &str, n: usize, f: impl Fn(usize) -> f64) -> Vec<FeatureWindow> {
        (1..=n)
            .map(|len| {
                let h: Vec<f64> = (0..len).map(&f).collect();
                let h = h[len.saturating_sub(64)..].to_vec();
                let mut w = window(metric, h);
                let end = DateTime::<Utc>::from_timestamp(len as i64 * 60, 0).unwrap();
                w.start = end - chrono::Duration::seconds(60);
                w.end = end;
                w
            })
            .collect()
    }

    #[test]
    fn a_window_met_again_is_not_scored_twice_and_changes_nothing() {
        let ws = windows("cpu", 40, |i| 40.0 + 0.5 * i as f64 + 2.0 * noise(i));
        let mut once = scorer(above("cpu", 95.0));
        let expected: Vec<Option<RiskScore>> =
            ws.iter().map(|w| score(&mut once, w.clone())).collect();
        // Every window arrives twice (published again upstream), and one older one late.
        let mut twice = scorer(above("cpu", 95.0));
        for (i, w) in ws.iter().enumerate() {
            assert_eq!(score(&mut twice, w.clone()), expected[i], "window {i}");
            assert_eq!(score(&mut twice, w.clone()), None, "window {i} again");
            if i >= 20 {
                assert_eq!(
                    score(&mut twice, ws[i - 10].clone()),
                    None,
                    "window {} late",
                    i - 10
                );
            }
        }
        assert_eq!(twice.fits(), once.fits());
    }

    #[test]
    fn the_form_chosen_is_the_model_autoets_chooses_bit_for_bit() {
        use ets::tests::noise;
        let auto = AutoETS::new(1, "AZN").expect("spec");
        let mut chosen = Vec::new();
        for (k, n) in [(0, 12), (1, 30), (2, 60), (3, 60), (4, 45), (5, 60)] {
            let y: Vec<f64> = (0..n)
                .map(|i| {
                    let t = i as f64;
                    match k {
                        0 => 50.0 + 3.0 * noise(i),
                        1 => 10.0 + 0.4 * t + 2.0 * noise(i),
                        2 => 1e4 + 5.0 * (0..=i).map(|j| noise(j + 7)).sum::<f64>(),
                        3 => 80.0 - 60.0 * (-t / 20.0).exp() + noise(i),
                        4 => -3.0 + 0.01 * t * t + 0.5 * noise(i),
                        _ => 0.2 * noise(i) + if i > 40 { 5.0 } else { 0.0 },
                    }
                })
                .collect();
            let theirs = auto.fit(&y).expect("AutoETS fits").model().clone();
            let ours = choose_form(&y).expect("a form fits");
            assert_eq!(
                ours.model_type().trend,
                theirs.model_type().trend,
                "series {k}"
            );
            assert_eq!(ours.damped(), theirs.damped(), "series {k}");
            assert_eq!(ours.aicc().to_bits(), theirs.aicc().to_bits(), "series {k}");
            let (a, b) = (
                ours.predict(24, 0.95).expect("forecast"),
                theirs.predict(24, 0.95).expect("forecast"),
            );
            assert_eq!(a.point, b.point, "series {k}");
            let (a, b) = (
                a.intervals.expect("intervals"),
                b.intervals.expect("intervals"),
            );
            assert_eq!((a.lower, a.upper), (b.lower, b.upper), "series {k}");
            chosen.push((ours.model_type().trend, ours.damped()));
        }
        // The series exercise more than one form.
        chosen.sort();
        chosen.dedup();
        assert!(chosen.len() >= 2, "{chosen:?}");
    }

    #[test]
    fn forecasts_are_refitted_on_schedule_and_on_drift() {
        let every = |refit_every: usize| {
            Scorer::new(ScoringConfig {
                refit_every,
                thresholds: vec![above("cpu", 95.0)],
                ..ScoringConfig::default()
            })
            .unwrap()
        };
        let mut s = every(12);
        for w in windows("cpu", 60, |i| 40.0 + 2.0 * noise(i)) {
            score(&mut s, w);
        }
        // 60 windows, the first 11 too short to forecast: 49 forecasts, one fit per 12 windows.
        let steady = s.fits();
        assert!((4..=8).contains(&steady), "{steady} fits for 49 forecasts");
        // Every 48: the first fit (12 windows of history) is redone when the history has
        // doubled, at 24 and 48 windows, then every 48.
        let mut s = every(48);
        let mut fits = Vec::new();
        for w in windows("cpu", 150, |i| 40.0 + 2.0 * ets::tests::noise(i)) {
            score(&mut s, w);
            fits.push(s.fits());
        }
        let at: Vec<usize> = (1..150).filter(|&i| fits[i] > fits[i - 1]).collect();
        assert_eq!(at[..3], [11, 23, 47], "fits at windows {at:?}");
        assert!(
            at.windows(2).all(|w| w[1] - w[0] <= 48),
            "fits at windows {at:?}"
        );
        assert!(at.len() <= 6, "fits at windows {at:?}");
        // A jump far outside the forecast interval refits at once.
        let mut s = scorer(above("cpu", 95.0));
        let ws = windows("cpu", 40, |i| {
            40.0 + 2.0 * noise(i) + if i >= 37 { 30.0 } else { 0.0 }
        });
        let mut fits = Vec::new();
        for w in ws {
            score(&mut s, w);
            fits.push(s.fits());
        }
        assert!(fits[37] > fits[36], "the jump refits: {fits:?}");
    }

    #[test]
    fn between_refits_the_forecast_moves_on_with_each_window() {
        // A level that climbs slowly (a tenth of the noise's range each window): the schedule
        // refits, and in between each window's value moves the fitted model's state on.
        let mut s = scorer(above("cpu", 95.0));
        let (mut firsts, mut fits) = (Vec::new(), Vec::new());
        let noise = ets::tests::noise;
        let climb = |i: usize| 0.2 * i.saturating_sub(24) as f64;
        for w in windows("cpu", 48, |i| 40.0 + 2.0 * noise(i) + climb(i)) {
            score(&mut s, w);
            let series = s.series.values().next().expect("one series");
            let first = series.forecast.as_ref().map(|f| {
                assert!(f.filter.is_some(), "{f:?}");
                f.points[0]
            });
            firsts.push(first.unwrap_or(f64::NAN));
            fits.push(s.fits());
        }
        // Windows with no fit still forecast anew from the newest value.
        let moved = (25..48)
            .filter(|&i| fits[i] == fits[i - 1] && firsts[i] != firsts[i - 1])
            .count();
        let unfitted = (25..48).filter(|&i| fits[i] == fits[i - 1]).count();
        assert!(unfitted >= 15 && moved == unfitted, "{fits:?} {firsts:?}");
    }

    #[test]
    fn the_model_is_chosen_again_every_few_scheduled_refits_and_after_a_drift() {
        let chosen = |s: &Scorer| {
            s.series
                .values()
                .next()
                .and_then(|x| x.forecast.as_ref())
                .and_then(|f| f.chosen)
        };
        // AutoETS only (no seasons looked for).
        let scorer = |t: Threshold| {
            Scorer::new(ScoringConfig {
                min_season: 0,
                thresholds: vec![t],
                ..ScoringConfig::default()
            })
            .unwrap()
        };
        // A gentle trend, no drift: a choice, then re-estimates of it, a choice again.
        let mut s = scorer(above("cpu", 95.0));
        let mut refits = Vec::new();
        let mut fits = 0;
        for w in windows("cpu", 120, |i| 40.0 + 0.05 * i as f64 + 0.5 * noise(i)) {
            score(&mut s, w);
            if s.fits() > fits {
                fits = s.fits();
                refits.push(chosen(&s).expect("AutoETS").refits);
            }
        }
        // Each refit re-estimates (one more since the choice) or chooses again (0: on schedule
        // after `reselect_every - 1` re-estimates, or earlier on a drift).
        let reselect = ScoringConfig::default().reselect_every as u32;
        assert_eq!(refits[0], 0, "{refits:?}");
        for pair in refits.windows(2) {
            assert!(pair[1] == 0 || pair[1] == pair[0] + 1, "{refits:?}");
            assert!(pair[1] < reselect, "{refits:?}");
            if pair[0] == reselect - 1 {
                assert_eq!(pair[1], 0, "{refits:?}");
            }
        }
        assert!(refits.contains(&(reselect - 1)), "{refits:?}");
        // A value far outside the forecast interval refits at once: a lone one re-estimates
        // the chosen model (it may be an outlier), one confirmed by the value before it, as
        // far off on the same side, chooses again (the series has moved).
        let run = |jump: &dyn Fn(usize) -> f64| {
            let mut s = scorer(above("cpu", 95.0));
            let mut fits = Vec::new();
            for w in windows("cpu", 110, |i| {
                40.0 + 0.05 * i as f64 + 0.5 * noise(i) + jump(i)
            }) {
                score(&mut s, w);
                fits.push((s.fits(), chosen(&s).map(|c| c.refits)));
            }
            fits
        };
        let plain = run(&|_| 0.0);
        let before = plain[59].1.expect("AutoETS");
        assert!(before + 1 < reselect, "not due for a choice: {plain:?}");
        let spike = run(&|i| if i == 60 { 30.0 } else { 0.0 });
        assert!(spike[60].0 > spike[59].0, "the spike refits: {spike:?}");
        assert_eq!(spike[60].1, Some(before + 1), "re-estimated: {spike:?}");
        // A level shift: one re-estimate, whose forecast follows the new level.
        let jump = run(&|i| if i >= 59 { 30.0 } else { 0.0 });
        assert!(jump[59].0 > jump[58].0, "the jump refits: {jump:?}");
        assert_eq!(jump[59].1, Some(before + 1), "re-estimated: {jump:?}");
        assert_eq!(jump[75].0, jump[59].0, "and is followed: {jump:?}");
        // A steep climb: re-estimated at its first value, chosen again at its second.
        let ramp = run(&|i| if i >= 59 { 3.0 * (i - 58) as f64 } else { 0.0 });
        assert_eq!(ramp[59].1, Some(before + 1), "re-estimated: {ramp:?}");
        assert!(ramp[60].0 > ramp[59].0, "refitted again: {ramp:?}");
        assert_eq!(ramp[60].1, Some(0), "with a new choice: {ramp:?}");
        assert!(
            plain[..59].iter().any(|f| f.1 > Some(0)),
            "re-estimates before: {plain:?}"
        );
        // Choosing at every refit (the old way) and every fourth forecast much alike.
        let series = |i: usize| 40.0 + 0.05 * i as f64 + 0.5 * noise(i);
        let run = |reselect_every| {
            let mut s = Scorer::new(ScoringConfig {
                reselect_every,
                min_season: 0,
                thresholds: vec![above("cpu", 50.0)],
                ..ScoringConfig::default()
            })
            .unwrap();
            windows("cpu", 200, series)
                .into_iter()
                .filter_map(|w| score(&mut s, w))
                .map(|r| r.probability)
                .collect::<Vec<_>>()
        };
        let (every, fourth) = (run(1), run(4));
        assert_eq!(every.len(), fourth.len());
        let worst = every
            .iter()
            .zip(&fourth)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 0.2, "largest difference in probability {worst}");
    }

    #[test]
    fn a_seasonal_metric_is_forecast_with_mstl() {
        let mut s = scorer(above("cpu", 95.0));
        let season =
            |i: usize| 50.0 + 20.0 * (i as f64 * std::f64::consts::TAU / 8.0).sin() + noise(i);
        let r = windows("cpu", 48, season)
            .into_iter()
            .filter_map(|w| score(&mut s, w))
            .last()
            .unwrap();
        let breach = r
            .contributors
            .iter()
            .find(|c| c.signal == "forecast_breach")
            .unwrap();
        assert!(breach.detail.contains("MSTL"), "{}", breach.detail);
        assert!(r.probability < 0.5, "a stable cycle below its limit: {r:?}");
        // Its state is not carried forward, so it is refitted every quarter of `refit_every`
        // windows, not every `refit_every`.
        let mut s = scorer(above("cpu", 95.0));
        let mut fits = Vec::new();
        for w in windows("cpu", 120, season) {
            score(&mut s, w);
            fits.push(s.fits());
        }
        let at: Vec<usize> = (1..120).filter(|&i| fits[i] > fits[i - 1]).collect();
        assert_eq!(ScoringConfig::default().refit_every, 48);
        assert!(
            at.windows(2).all(|w| w[1] - w[0] <= 12) && at.len() >= 9,
            "fits at windows {at:?}"
        );
    }

    #[test]
    fn an_anomaly_and_a_changepoint_raise_the_risk_of_an_unthresholded_metric() {
        let mut s = Scorer::new(ScoringConfig::default()).unwrap();
        let f = |i: usize| 20.0 + noise(i) + if i >= 150 { 12.0 } else { 0.0 };
        let scores: Vec<RiskScore> = windows("queue_depth", 156, f)
            .into_iter()
            .filter_map(|w| score(&mut s, w))
            .collect();
        // Scores start at window 12 (min_history): the shift is at score 150 - 11.
        let (before, since) = scores.split_at(150 - 11);
        let calm = before.iter().map(|r| r.probability).fold(0.0, f64::max);
        assert!(
            before[100..].iter().all(|r| r.band == Band::Low),
            "calm before"
        );
        let has = |signal: &str| {
            since
                .iter()
                .any(|r| r.contributors.iter().any(|c| c.signal == signal))
        };
        assert!(has("anomaly"), "{since:?}");
        assert!(has("changepoint"), "{since:?}");
        let after = since
            .iter()
            .max_by(|a, b| a.probability.total_cmp(&b.probability))
            .unwrap();
        assert!(after.probability > calm + 0.3, "{calm} then {after:?}");
        // Noisy-OR: at least the strongest signal, at most certain.
        let strongest = after.contributors[0].probability;
        assert!(after.probability >= strongest && after.probability <= 1.0);
        assert!(after.lower <= after.probability && after.probability <= after.upper);
        assert_eq!(after.method, ScoreMethod::Prior);
    }

    #[test]
    fn error_storms_in_logs_are_a_signal() {
        let mut s = Scorer::new(ScoringConfig::default()).unwrap();
        let mut w = window("cpu", (0..20).map(|i| 30.0 + noise(i)).collect());
        w.logs = Some(LogStats {
            count: 200,
            error_rate: 0.6,
            new_templates: 30,
            new_template_share: 0.15,
            ..LogStats::default()
        });
        let r = score(&mut s, w).unwrap();
        assert_eq!(r.contributors[0].signal, "logs", "{r:?}");
        assert!(r.probability > 0.3, "{r:?}");
    }

    /// Applies checkpoint changes to a key-value store, as the checkpoint table does.
    fn apply(store: &mut BTreeMap<String, Vec<u8>>, changes: Vec<StateChange>) {
        for c in changes {
            match c {
                StateChange::Put { key, value } => {
                    store.insert(key, value);
                }
                StateChange::Delete { key } => {
                    store.remove(&key);
                }
            }
        }
    }

    #[test]
    fn a_restored_scorer_scores_exactly_as_the_one_that_checkpointed() {
        // A daily cycle with a trend towards the limit: forecasts are cached between refits,
        // detectors are past their learning, and incidents open. (Aperiodic noise: the tests'
        // other noise repeats every 13 windows, a season of its own.)
        let noise = ets::tests::noise;
        let f = |i: usize| {
            60.0 + 0.05 * i as f64
                + 10.0 * (i as f64 * std::f64::consts::TAU / 48.0).sin()
                + 3.0 * noise(i)
        };
        let ws = windows("cpu", 400, f);
        let mut original = scorer(above("cpu", 95.0));
        let mut store = BTreeMap::new();
        for (i, w) in ws[..300].iter().enumerate() {
            score(&mut original, w.clone());
            if i % 50 == 49 {
                apply(&mut store, original.checkpoint(0));
            }
        }
        assert!(original.checkpoint(1).is_empty(), "nothing of partition 1");
        let mut restored = scorer(above("cpu", 95.0));
        restored.restore(0, store.into_iter().collect()).unwrap();
        // Its period (48) is longer than a third of the fitted history: forecast by AutoETS,
        // whose state is carried forward between refits, and restored with the rest.
        let carried = |s: &Scorer| {
            s.series
                .values()
                .all(|x| x.forecast.as_ref().is_some_and(|f| f.filter.is_some()))
        };
        assert!(carried(&original) && carried(&restored));
        let fits = (original.fits(), restored.fits());
        let mut scores = Vec::new();
        for w in &ws[300..] {
            let (a, b) = (
                score(&mut original, w.clone()),
                score(&mut restored, w.clone()),
            );
            assert_eq!(a, b, "window ending {}", w.end);
            scores.push(a.expect("every window has enough history to be scored"));
        }
        assert_eq!(
            original.fits() - fits.0,
            restored.fits() - fits.1,
            "the same refits"
        );
        // A fresh scorer, by contrast, scores the same windows differently: the state matters.
        let mut fresh = scorer(above("cpu", 95.0));
        let differ = ws[300..]
            .iter()
            .zip(&scores)
            .filter(|(w, a)| score(&mut fresh, (*w).clone()).as_ref() != Some(*a))
            .count();
        assert!(differ > 0);
    }

    #[test]
    fn checkpoints_of_previous_versions_are_read_and_rewritten_in_the_current_one() {
        // Aperiodic noise: forecast by AutoETS, whose recursion version 2 did not keep.
        let noise = ets::tests::noise;
        let ws = windows("cpu", 120, |i| {
            50.0 + 5.0 * noise(i) + if i >= 110 { 40.0 } else { 0.0 }
        });
        let mut original = scorer(above("cpu", 95.0));
        for w in &ws[..100] {
            score(&mut original, w.clone());
        }
        let mut store = BTreeMap::new();
        apply(&mut store, original.checkpoint(0));
        // The same state as versions 1 (without the changepoint detector), 2 (without the
        // exponential smoothing recursion), 3 (without the anomaly detector's records) and 4
        // (the changepoint detector's probabilities as logarithms) wrote it.
        let old = |version: u8| -> Vec<(String, Vec<u8>)> {
            store
                .iter()
                .map(|(k, v)| {
                    let state = SeriesState::decode(k, v).unwrap();
                    assert!(
                        state.changes.is_some() && state.filter.is_some(),
                        "{state:?}"
                    );
                    let changes = state
                        .changes
                        .as_ref()
                        .map(changepoint::LogChangeDetector::from);
                    if version == 4 {
                        let v4 = SeriesStateV4 {
                            forecast: state.forecast,
                            detector: state.detector,
                            seen: state.seen,
                            changes,
                            chosen: state.chosen,
                            filter: state.filter,
                        };
                        return (k.clone(), encode_state(4, &v4));
                    }
                    let detector = state.detector.without_records();
                    let value = match version {
                        1 => encode_state(
                            1,
                            &SeriesStateV1 {
                                forecast: state.forecast,
                                detector,
                                seen: state.seen,
                            },
                        ),
                        2 => encode_state(
                            2,
                            &SeriesStateV2 {
                                forecast: state.forecast,
                                detector,
                                seen: state.seen,
                                changes,
                                chosen: state.chosen,
                            },
                        ),
                        _ => encode_state(
                            3,
                            &SeriesStateV3 {
                                forecast: state.forecast,
                                detector,
                                seen: state.seen,
                                changes,
                                chosen: state.chosen,
                                filter: state.filter,
                            },
                        ),
                    };
                    (k.clone(), value)
                })
                .collect()
        };
        let mut v1 = scorer(above("cpu", 95.0));
        v1.restore(0, old(1)).unwrap();
        let mut v2 = scorer(above("cpu", 95.0));
        v2.restore(0, old(2)).unwrap();
        let mut v3 = scorer(above("cpu", 95.0));
        v3.restore(0, old(3)).unwrap();
        let mut v4 = scorer(above("cpu", 95.0));
        v4.restore(0, old(4)).unwrap();
        // A version-1 series' changepoint detector is warmed up on the next window's history;
        // a version-2 series' forecast is read further along until its next refit; a version-3
        // series' anomaly detector takes its extremes from what it remembers; a version-4
        // series' changepoint probabilities are the exponentials of their logarithms. The level
        // shift at window 110 is found by all five.
        let mut found = [false; 5];
        for w in &ws[100..] {
            for (i, s) in [&mut original, &mut v1, &mut v2, &mut v3, &mut v4]
                .into_iter()
                .enumerate()
            {
                let r = score(s, w.clone()).unwrap();
                found[i] |= r.contributors.iter().any(|c| c.signal == "changepoint");
            }
        }
        assert_eq!(found, [true; 5]);
        for restored in [&mut v1, &mut v2, &mut v3, &mut v4] {
            let rewritten = restored.checkpoint(0);
            let StateChange::Put { key, value } = &rewritten[0] else {
                panic!("{rewritten:?}")
            };
            assert_eq!(value[0], STATE_VERSION);
            // Refitted since (a level shift is a drift): the recursion is back.
            assert!(SeriesState::decode(key, value).unwrap().filter.is_some());
        }
    }

    #[test]
    fn forgotten_series_are_deleted_from_the_checkpoint_and_bad_state_is_refused() {
        let mut s = Scorer::new(ScoringConfig {
            max_series: 10,
            ..ScoringConfig::default()
        })
        .unwrap();
        let mut store = BTreeMap::new();
        for e in 0..30 {
            let mut w = window("cpu", vec![1.0, 2.0, 3.0]);
            w.entity = EntityId::new(format!("e{e:02}")).unwrap();
            w.end += chrono::Duration::seconds(e);
            score(&mut s, w);
            apply(&mut store, s.checkpoint(0));
        }
        assert_eq!(
            store.len(),
            s.series(),
            "the store holds exactly the kept series"
        );
        assert!(store.len() <= 11, "{}", store.len());
        let mut restored = Scorer::new(ScoringConfig::default()).unwrap();
        restored
            .restore(0, store.clone().into_iter().collect())
            .unwrap();
        assert_eq!(restored.series(), s.series());
        let bad = vec![("e00\u{1f}cpu".to_owned(), vec![STATE_VERSION, 0xff])];
        let err = restored.restore(0, bad).unwrap_err();
        assert!(err.to_string().contains("undecodable"), "{err}");
        let err = restored
            .restore(0, vec![("no-separator".into(), vec![STATE_VERSION])])
            .unwrap_err();
        assert!(
            err.to_string().contains("not an entity and a metric"),
            "{err}"
        );
    }

    #[test]
    fn series_state_is_bounded_and_dropped_with_its_partition() {
        let mut s = Scorer::new(ScoringConfig {
            max_series: 50,
            ..ScoringConfig::default()
        })
        .unwrap();
        for e in 0..200 {
            let mut w = window("cpu", vec![1.0, 2.0, 3.0]);
            w.entity = EntityId::new(format!("e{e}")).unwrap();
            s.process(
                w,
                Origin {
                    input: 0,
                    partition: e % 2,
                    offset: 0,
                },
                &mut Vec::new(),
            );
            assert!(s.series() <= 50);
        }
        s.forget_partition(0);
        s.forget_partition(1);
        assert_eq!(s.series(), 0);
    }

    #[test]
    fn config_errors_are_all_reported() {
        let cfg = ScoringConfig {
            level: 1.5,
            min_history: 2,
            thresholds: vec![Threshold {
                metric: "x".into(),
                above: None,
                below: None,
            }],
            ..ScoringConfig::default()
        };
        assert_eq!(cfg.validate().len(), 3);
    }

    #[test]
    fn a_threshold_covers_every_series_of_its_metric() {
        let mut s = scorer(above("disk_used_pct", 95.0));
        let steady: Vec<f64> = (0..48).map(|i| 40.0 + noise(i)).collect();
        let filling: Vec<f64> = (0..48)
            .map(|i| 30.0 + 1.2 * i as f64 + 0.5 * noise(i))
            .collect();
        let mut w = window(r#"disk_used_pct{mount="/"}"#, steady);
        let other = window(r#"disk_used_pct{mount="/data"}"#, filling);
        w.metrics.extend(other.metrics);
        w.metrics.insert(
            "disk_used_pct_other".into(),
            w.metrics[r#"disk_used_pct{mount="/"}"#].clone(),
        );
        let r = score(&mut s, w).unwrap();
        assert_eq!(
            r.contributors.len(),
            2,
            "the two series, not the other metric"
        );
        assert_eq!(
            r.contributors[0].metric.as_deref(),
            Some(r#"disk_used_pct{mount="/data"}"#)
        );
        assert_eq!(r.band, Band::High);
    }
}
