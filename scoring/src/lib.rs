//! Foresight scoring: the probability that an entity fails within a horizon, with an interval and an
//! expected time to failure.
//!
//! This is the prior scorer: for every metric with a declared threshold it fits an exponential
//! smoothing model (augurs' AutoETS, additive errors, trend chosen by AICc) to the window history the
//! feature stage carries, forecasts the horizon with prediction intervals, and turns the forecast
//! distribution into P(threshold breached within the horizon). It is a pure function of one
//! [`FeatureWindow`], so live, restarted and replayed runs give identical scores.
//!
//! ## How the probability is computed
//! For each step `h` the forecast is read as Normal(mean_h, sd_h), with `sd_h` recovered from the
//! interval at the configured level. `P_h = P(X_h beyond threshold)`. Forecast errors at successive
//! steps are strongly positively correlated, so the probability of a breach at *some* step is taken
//! as `max_h P_h` (the tight lower bound for perfectly correlated errors) rather than a union bound,
//! which would count one excursion many times. The entity's probability is the strongest metric's;
//! the others are listed as contributors. Expected time to failure is the first step whose `P_h`
//! reaches one half.
//!
//! ## The interval
//! The probability's own uncertainty comes from the uncertainty of the fitted level: the forecast
//! means are shifted by ±z·sd₁/√n (the standard error of a level estimated from `n` points, at the
//! configured level) and the probability recomputed. Short histories give wide intervals.
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

use std::time::Duration;

use augurs::{Predict, ets::AutoETS, prelude::Fit};
use distrs::Normal;
use foresight_events::{
    Band, Contributor, FeatureWindow, MetricStats, Origin, Output, Processor, RiskScore,
    ScoreMethod,
};
use serde::{Deserialize, Serialize};

/// Version string of the prior scorer, recorded in every score it makes.
pub const PRIOR_MODEL_VERSION: &str = "prior-forecast-breach-1";

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
        errors
    }
}

/// The forecast-breach scorer: [`FeatureWindow`] in, [`RiskScore`] out.
#[derive(Debug)]
pub struct Scorer {
    config: ScoringConfig,
    z: f64,
    model: AutoETS,
}

/// One metric's forecast-breach signal.
#[derive(Debug, Clone, PartialEq)]
struct Breach {
    probability: f64,
    lower: f64,
    upper: f64,
    steps_to_breach: Option<usize>,
    forecast_at_horizon: f64,
}

impl Scorer {
    /// A scorer with the given configuration.
    pub fn new(config: ScoringConfig) -> Result<Self, Vec<ScoringConfigError>> {
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        let z = Normal::ppf(0.5 + config.level / 2.0, 0.0, 1.0);
        // Additive errors (metrics may be zero or negative); no, additive or damped trend by AICc.
        let model = AutoETS::new(1, "AZN").expect("AZN is a valid AutoETS spec");
        Ok(Self { config, z, model })
    }

    fn breach(&self, stats: &MetricStats, threshold: &Threshold, steps: usize) -> Option<Breach> {
        let history = &stats.history[stats
            .history
            .len()
            .saturating_sub(self.config.max_fit_points)..];
        if history.len() < self.config.min_history {
            return None;
        }
        let (limit, above) = match (threshold.above, threshold.below) {
            (Some(a), _) => (a, true),
            (None, Some(b)) => (b, false),
            (None, None) => return None,
        };
        // A constant series has no variance to fit; its forecast is itself.
        let (points, sds) = if history.iter().all(|v| *v == history[0]) {
            (vec![history[0]; steps], vec![0.0; steps])
        } else {
            let fitted = self.model.fit(history).ok()?;
            let forecast = fitted.predict(steps, self.config.level).ok()?;
            let intervals = forecast.intervals?;
            let sds = intervals
                .upper
                .iter()
                .zip(&intervals.lower)
                .map(|(u, l)| ((u - l) / (2.0 * self.z)).max(0.0))
                .collect();
            (forecast.point, sds)
        };
        if points.iter().any(|p| !p.is_finite()) {
            return None;
        }
        let scale = limit.abs().max(1.0) * 1e-9;
        let p_beyond = |mean: f64, sd: f64| {
            let d = if above { mean - limit } else { limit - mean };
            if sd <= scale {
                if d > 0.0 { 1.0 } else { 0.0 }
            } else {
                Normal::cdf(d / sd, 0.0, 1.0)
            }
        };
        let shift = self.z * sds[0] / (history.len() as f64).sqrt();
        let (mut probability, mut worse, mut better) = (0.0_f64, 0.0_f64, 0.0_f64);
        let mut steps_to_breach = None;
        for (h, (&mean, &sd)) in points.iter().zip(&sds).enumerate() {
            let p = p_beyond(mean, sd);
            probability = probability.max(p);
            let toward = if above { shift } else { -shift };
            worse = worse.max(p_beyond(mean + toward, sd));
            better = better.max(p_beyond(mean - toward, sd));
            if steps_to_breach.is_none() && p >= 0.5 {
                steps_to_breach = Some(h + 1);
            }
        }
        Some(Breach {
            probability,
            lower: better.min(probability),
            upper: worse.max(probability),
            steps_to_breach,
            forecast_at_horizon: *points.last()?,
        })
    }
}

impl Processor for Scorer {
    type Input = FeatureWindow;
    type Output = RiskScore;

    fn process(
        &mut self,
        window: FeatureWindow,
        _origin: Origin,
        out: &mut Vec<Output<RiskScore>>,
    ) {
        let window_ms = (window.end - window.start).num_milliseconds().max(1);
        let horizon_ms = self.config.horizon.as_millis() as i64;
        let steps = (horizon_ms + window_ms - 1) / window_ms;
        let mut signals: Vec<(Breach, Contributor)> = Vec::new();
        for threshold in &self.config.thresholds {
            // A threshold on `m` applies to `m` and to each of its series `m{...}`.
            let m = threshold.metric.as_str();
            let series = window
                .metrics
                .range(threshold.metric.clone()..)
                .take_while(|(name, _)| name.starts_with(m))
                .filter(|(name, _)| name.len() == m.len() || name.as_bytes()[m.len()] == b'{');
            for (name, stats) in series {
                let Some(breach) = self.breach(stats, threshold, steps as usize) else {
                    continue;
                };
                let (op, limit) = match (threshold.above, threshold.below) {
                    (Some(a), _) => (">", a),
                    (_, b) => ("<", b.unwrap_or_default()),
                };
                let detail = format!(
                    "{name} forecast {:.3} at the horizon (now {:.3}); P({name} {op} {limit}) = {:.3}",
                    breach.forecast_at_horizon, stats.mean, breach.probability
                );
                let contributor = Contributor {
                    signal: "forecast_breach".into(),
                    metric: Some(name.clone()),
                    probability: breach.probability,
                    value: breach.forecast_at_horizon,
                    detail,
                };
                signals.push((breach, contributor));
            }
        }
        if signals.is_empty() {
            return;
        }
        // Strongest first; ties broken by metric name so the order is deterministic.
        signals.sort_by(|a, b| {
            b.0.probability
                .total_cmp(&a.0.probability)
                .then_with(|| a.1.metric.cmp(&b.1.metric))
        });
        let top = &signals[0].0;
        let (probability, lower, upper) = (top.probability, top.lower, top.upper);
        let time_to_failure_seconds = top
            .steps_to_breach
            .map(|h| (h as i64 * window_ms / 1000) as u64);
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
            contributors: signals.into_iter().map(|(_, c)| c).collect(),
            method: ScoreMethod::Prior,
            model_version: PRIOR_MODEL_VERSION.into(),
        }));
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
        let h: Vec<f64> = (0..30).map(|i| 50.0 + i as f64 + noise(i)).collect();
        let a = score(&mut s, window("cpu", h.clone())).unwrap();
        let b = score(&mut s, window("cpu", h)).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            foresight_events::EventData::id(&a),
            foresight_events::EventData::id(&b)
        );
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
