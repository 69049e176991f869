//! The learned failure model: P(failure within the horizon) from the strengths of the signals a
//! score recorded, trained on the failure reports in the audit log.
//!
//! Everything here is pure and deterministic: no clock, no IO, seeded resampling. The runtime's
//! `foresight train` reads the examples from Postgres, calls [`label`], [`split_by_time`],
//! [`FailureModel::train`], [`evaluate`] and [`promotion`], and records the result.
//!
//! ## The model
//! - **Inputs**: the strength in [0, 1] of each signal kind in [`RiskScore::signals`]
//!   ([`FEATURES`] by default; a missing or non-finite signal counts as 0). They are already on a
//!   common probability-like scale, so no standardisation is needed, and six numbers per example
//!   keep training cheap and the model explainable (one weight per signal).
//! - **Classifier**: L2-regularised logistic regression (linfa-logistic, fitted by L-BFGS). Failures
//!   are rare and labels few; a linear model in the log-odds is what that much data supports, and
//!   it extrapolates monotonically (a stronger signal never lowers the risk unless the data say
//!   so with a negative weight).
//! - **Uncertainty**: a bootstrap ensemble of `members` classifiers, each fitted to a stratified
//!   resample (positives and negatives resampled separately, so every member sees both classes).
//!   The probability is the ensemble mean; the interval is the `(1 - level) / 2` and
//!   `(1 + level) / 2` quantiles of the members' calibrated probabilities: it shows how much the
//!   answer depends on which failures happened to be recorded (model uncertainty), which is
//!   large where data are few and shrinks as labels accumulate.
//! - **Calibration**: Platt scaling of each member on its out-of-bag examples (about 37 % of the
//!   data, which that member's classifier never saw), with Platt's smoothed targets. Platt rather
//!   than isotonic regression because positives are rare: isotonic needs many positives per
//!   step and overfits with few, Platt has two parameters.
//! - **Version**: `learned-` and a 64-bit hash of everything that determines the predictions and
//!   the training summary, so equal versions mean equal models and every score can name the model
//!   behind it.
//! - **Determinism**: the examples are put in a canonical order first and the resamples come from
//!   a ChaCha8 generator seeded by [`TrainConfig::seed`]; the same examples and config give the same
//!   model, bit for bit, whatever order they came in.
//!
//! ## Evaluation and promotion
//! [`split_by_time`] keeps the latest `holdout_fraction` of the examples for evaluation and drops
//! ("purges") training examples whose horizon reaches into the hold-out period, so that no failure
//! labels examples on both sides. [`evaluate`] computes the Brier score, precision and recall at
//! the operating threshold (the high band) and a reliability table; [`promotion`] promotes a
//! candidate only if it is not worse than the current model on the same hold-out, in Brier score
//! and in precision at the threshold.
//!
//! ```
//! use std::collections::BTreeMap;
//! use chrono::{DateTime, Utc};
//! use foresight_events::EntityId;
//! use foresight_scoring::model::{FailureModel, TrainConfig, TrainingExample};
//!
//! // Failures follow strong forecast breaches: deterministic synthetic data.
//! let examples: Vec<TrainingExample> = (0..600)
//!     .map(|i| {
//!         let breach = (i % 10) as f64 / 10.0;
//!         TrainingExample {
//!             entity: EntityId::new(format!("node-{}", i % 7)).unwrap(),
//!             time: DateTime::<Utc>::from_timestamp(60 * i, 0).unwrap(),
//!             horizon_seconds: 3600,
//!             signals: BTreeMap::from([("forecast_breach".to_string(), breach)]),
//!             recorded_probability: breach,
//!             label: (i * 7919) % 100 < (breach * breach * 80.0) as i64,
//!         }
//!     })
//!     .collect();
//! let model = FailureModel::train(&examples, &TrainConfig { members: 8, ..TrainConfig::default() })
//!     .unwrap();
//! let high = model.predict(&BTreeMap::from([("forecast_breach".into(), 0.9)]));
//! let low = model.predict(&BTreeMap::new());
//! assert!(high.probability > low.probability);
//! assert!(high.lower <= high.probability && high.probability <= high.upper);
//! assert!(model.version().starts_with("learned-"));
//! ```

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use foresight_events::{EntityId, FailureReport, RiskScore};
use linfa::{Dataset, traits::Fit as _};
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The signal kinds the model reads by default, in order: the per-entity scorer's and the fleet
/// stage's.
pub const FEATURES: [&str; 6] = [
    "forecast_breach",
    "anomaly",
    "changepoint",
    "logs",
    "peer_outlier",
    "dependency",
];

/// Prefix of every learned model's version.
pub const VERSION_PREFIX: &str = "learned-";

/// Most ensemble members: bounds training time and the stored model's size.
pub const MAX_MEMBERS: usize = 1000;

/// Attempts at a resample whose out-of-bag part holds both classes, before giving up.
const RESAMPLE_ATTEMPTS: usize = 20;

/// Equal-width bins of the reliability table.
const RELIABILITY_BINS: usize = 10;

/// One recorded score with its label: did the entity fail within the score's horizon?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingExample {
    /// The entity scored: labels are matched by it.
    pub entity: EntityId,
    /// The score's event time: the label window starts here, and the time-based hold-out splits
    /// on it.
    pub time: DateTime<Utc>,
    /// The score's horizon: the label window is `(time, time + horizon]`.
    pub horizon_seconds: u64,
    /// The strength of each signal kind (the model's inputs); missing kinds are 0.
    pub signals: BTreeMap<String, f64>,
    /// The probability the score itself recorded: the baseline's prediction when no model has
    /// been promoted (the prior's, until then).
    pub recorded_probability: f64,
    /// Whether a failure of the entity was reported within the horizon.
    pub label: bool,
}

impl TrainingExample {
    /// An unlabelled example from a recorded score ([`label`] sets the label).
    pub fn from_score(score: &RiskScore) -> Self {
        Self {
            entity: score.entity.clone(),
            time: score.time,
            horizon_seconds: score.horizon_seconds,
            signals: score.signals.clone(),
            recorded_probability: score.probability,
            label: false,
        }
    }

    /// End of the label window.
    pub fn horizon_end(&self) -> DateTime<Utc> {
        self.time + chrono::Duration::seconds(self.horizon_seconds.min(i64::MAX as u64) as i64)
    }
}

/// Labels every example: positive when a failure of the same entity falls in
/// `(time, time + horizon]`. The failure's kind does not matter: any failure is what the score
/// predicts.
pub fn label(examples: &mut [TrainingExample], failures: &[FailureReport]) {
    let mut by_entity: HashMap<&EntityId, Vec<DateTime<Utc>>> = HashMap::new();
    for f in failures {
        by_entity.entry(&f.entity).or_default().push(f.time);
    }
    for times in by_entity.values_mut() {
        times.sort_unstable();
    }
    for ex in examples.iter_mut() {
        ex.label = by_entity.get(&ex.entity).is_some_and(|times| {
            // The first failure after the score's time; positive if it is within the horizon.
            let i = times.partition_point(|t| *t <= ex.time);
            times.get(i).is_some_and(|t| *t <= ex.horizon_end())
        });
    }
}

/// Why a model could not be trained, evaluated or loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// Fewer labelled examples than configured: not an error of anyone's, just too early.
    #[error("{have} labelled training examples; at least {need} are needed")]
    NotEnoughExamples {
        /// Examples available.
        have: usize,
        /// Examples required.
        need: usize,
    },
    /// Fewer failures (positives) than configured: too early to learn from them.
    #[error("{have} examples followed by a failure; at least {need} are needed")]
    NotEnoughPositives {
        /// Positives available.
        have: usize,
        /// Positives required.
        need: usize,
    },
    /// Fewer examples without a failure than the positives required.
    #[error("{have} examples without a failure; at least {need} are needed")]
    NotEnoughNegatives {
        /// Negatives available.
        have: usize,
        /// Negatives required.
        need: usize,
    },
    /// A configuration value that cannot work (the user's to fix).
    #[error("training.{key}: {message}")]
    InvalidConfig {
        /// The key, relative to the training configuration.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The solver failed (a bug or pathological data; retrying the same data does not help).
    #[error("fitting the classifier failed: {0}")]
    Fit(String),
    /// No resample left both classes out of bag: too few examples of one class.
    #[error(
        "no bootstrap resample left both classes out of bag in {RESAMPLE_ATTEMPTS} attempts; \
         more examples of the rarer class are needed"
    )]
    DegenerateResample,
    /// Nothing to evaluate on.
    #[error("the hold-out is empty")]
    EmptyHoldout,
    /// A stored model that does not hold together (corrupt, or edited: its version does not
    /// match its content).
    #[error("invalid model: {0}")]
    InvalidModel(String),
}

impl TrainError {
    /// Whether this only means that not enough labels have been recorded yet: the prior stays in
    /// use, and training later, with more data, can succeed.
    pub fn is_insufficient_data(&self) -> bool {
        matches!(
            self,
            TrainError::NotEnoughExamples { .. }
                | TrainError::NotEnoughPositives { .. }
                | TrainError::NotEnoughNegatives { .. }
                | TrainError::DegenerateResample
                | TrainError::EmptyHoldout
        )
    }
}

/// How a model is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The signal kinds the model reads, in order. A kind no score carries only costs a weight
    /// near zero; a new kind needs retraining to be used.
    pub features: Vec<String>,
    /// Bootstrap ensemble members: more give a smoother interval and a slower training run.
    pub members: usize,
    /// L2 penalty on the weights (not the intercept), against a sum of log-losses: keeps weights
    /// finite when a signal separates the classes perfectly, and matters less as data grow.
    pub l2: f64,
    /// Most L-BFGS iterations per member.
    pub max_iterations: u64,
    /// Level of the probability interval, strictly between 0 and 1.
    pub level: f64,
    /// Seed of the bootstrap resampling: the same examples and seed give the same model.
    pub seed: u64,
    /// Fewest labelled training examples to train on.
    pub min_examples: usize,
    /// Fewest positives (and negatives) to train on: each member's calibration needs some out of
    /// bag.
    pub min_positives: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
            members: 32,
            l2: 1.0,
            max_iterations: 200,
            level: 0.9,
            seed: 0x5eed_f0e5_1647,
            min_examples: 200,
            min_positives: 20,
        }
    }
}

impl TrainConfig {
    /// Every problem with the values, each with its key.
    pub fn validate(&self) -> Vec<TrainError> {
        let mut errors = Vec::new();
        let mut bad =
            |key, message: String| errors.push(TrainError::InvalidConfig { key, message });
        if self.features.is_empty() {
            bad(
                "model.features",
                "must name at least one signal kind".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.features {
            if !seen.insert(f) {
                bad("model.features", format!("{f:?} is listed twice"));
            }
        }
        if !(2..=MAX_MEMBERS).contains(&self.members) {
            bad(
                "model.members",
                format!("must be between 2 and {MAX_MEMBERS}, not {}", self.members),
            );
        }
        if !(self.l2.is_finite() && self.l2 > 0.0) {
            bad("model.l2", format!("must be positive, not {}", self.l2));
        }
        if self.max_iterations == 0 {
            bad("model.max_iterations", "must be at least 1".into());
        }
        if !(self.level > 0.0 && self.level < 1.0) {
            bad(
                "model.level",
                format!("must be strictly between 0 and 1, not {}", self.level),
            );
        }
        if self.min_positives < 2 {
            bad(
                "model.min_positives",
                format!("must be at least 2, not {}", self.min_positives),
            );
        }
        errors
    }
}

/// A probability of failure with its interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Calibrated probability of failure within the horizon (the ensemble mean).
    pub probability: f64,
    /// Lower bound of the interval at the model's level.
    pub lower: f64,
    /// Upper bound of the interval at the model's level.
    pub upper: f64,
}

/// One bootstrap member: a logistic regression and its Platt calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Member {
    /// One weight per feature, on the log-odds scale.
    weights: Vec<f64>,
    /// The classifier's intercept.
    intercept: f64,
    /// Platt's `[slope, intercept]`: calibrated P = sigmoid(slope * z + intercept) for the
    /// classifier's log-odds z.
    platt: [f64; 2],
}

impl Member {
    fn log_odds(&self, x: &[f64]) -> f64 {
        self.intercept + self.weights.iter().zip(x).map(|(w, x)| w * x).sum::<f64>()
    }

    fn probability(&self, x: &[f64]) -> f64 {
        sigmoid(self.platt[0] * self.log_odds(x) + self.platt[1])
    }
}

/// What the model was trained on, kept with it for people and the version hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSummary {
    /// Training examples.
    pub examples: usize,
    /// Of them, followed by a failure.
    pub positives: usize,
    /// Earliest example time.
    pub first: DateTime<Utc>,
    /// Latest example time.
    pub last: DateTime<Utc>,
}

/// A trained, calibrated failure model. Serialises to JSON for storage; deserialising checks that
/// the parts fit together and that the version matches the content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "StoredModel")]
pub struct FailureModel {
    /// `learned-` and the content hash.
    version: String,
    /// The signal kinds read, in the order of each member's weights.
    features: Vec<String>,
    /// The interval level.
    level: f64,
    /// The bootstrap ensemble.
    members: Vec<Member>,
    /// What it was trained on.
    trained: TrainingSummary,
}

/// The serialised form, validated into a [`FailureModel`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredModel {
    version: String,
    features: Vec<String>,
    level: f64,
    members: Vec<Member>,
    trained: TrainingSummary,
}

impl TryFrom<StoredModel> for FailureModel {
    type Error = TrainError;
    fn try_from(s: StoredModel) -> Result<Self, TrainError> {
        let bad = |m: String| Err(TrainError::InvalidModel(m));
        if s.features.is_empty() || s.members.is_empty() || s.members.len() > MAX_MEMBERS {
            return bad(format!(
                "{} features and {} members",
                s.features.len(),
                s.members.len()
            ));
        }
        if !(s.level > 0.0 && s.level < 1.0) {
            return bad(format!("level {}", s.level));
        }
        for (i, m) in s.members.iter().enumerate() {
            if m.weights.len() != s.features.len() {
                return bad(format!(
                    "member {i} has {} weights for {} features",
                    m.weights.len(),
                    s.features.len()
                ));
            }
            if !m
                .weights
                .iter()
                .chain([&m.intercept, &m.platt[0], &m.platt[1]])
                .all(|v| v.is_finite())
            {
                return bad(format!("member {i} has a non-finite parameter"));
            }
        }
        let model = FailureModel {
            version: String::new(),
            features: s.features,
            level: s.level,
            members: s.members,
            trained: s.trained,
        };
        let version = model.content_version();
        if version != s.version {
            return bad(format!(
                "version {} does not match its content ({version})",
                s.version
            ));
        }
        Ok(FailureModel { version, ..model })
    }
}

impl FailureModel {
    /// Trains a model on labelled examples (in any order).
    ///
    /// Fails with [`TrainError::NotEnoughExamples`], [`TrainError::NotEnoughPositives`] or
    /// [`TrainError::NotEnoughNegatives`] below the configured minimums.
    pub fn train(examples: &[TrainingExample], config: &TrainConfig) -> Result<Self, TrainError> {
        if let Some(e) = config.validate().into_iter().next() {
            return Err(e);
        }
        let positives = examples.iter().filter(|e| e.label).count();
        let negatives = examples.len() - positives;
        if examples.len() < config.min_examples {
            return Err(TrainError::NotEnoughExamples {
                have: examples.len(),
                need: config.min_examples,
            });
        }
        if positives < config.min_positives {
            return Err(TrainError::NotEnoughPositives {
                have: positives,
                need: config.min_positives,
            });
        }
        if negatives < config.min_positives {
            return Err(TrainError::NotEnoughNegatives {
                have: negatives,
                need: config.min_positives,
            });
        }

        // A canonical order, so the model does not depend on the order the database returned.
        let mut rows: Vec<(Vec<f64>, &TrainingExample)> = examples
            .iter()
            .map(|e| (features(&config.features, &e.signals), e))
            .collect();
        rows.sort_by(|(xa, a), (xb, b)| {
            (a.time, &a.entity, a.horizon_seconds, a.label)
                .cmp(&(b.time, &b.entity, b.horizon_seconds, b.label))
                .then_with(|| {
                    xa.iter()
                        .map(|v| v.to_bits())
                        .cmp(xb.iter().map(|v| v.to_bits()))
                })
        });
        let d = config.features.len();
        let pos: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].1.label).collect();
        let neg: Vec<usize> = (0..rows.len()).filter(|&i| !rows[i].1.label).collect();
        // The loss is a sum over the examples, so its gradient grows with their number: stop at a
        // gradient of 1e-6 per example (a weight error of the order of 1e-4, far below the
        // ensemble's spread), not at linfa's fixed 1e-4, which would run large sets to the
        // iteration limit for no visible change.
        let solver = LogisticRegression::<f64>::default()
            .alpha(config.l2)
            .max_iterations(config.max_iterations)
            .gradient_tolerance((1e-6 * rows.len() as f64).max(1e-4))
            .with_intercept(true);

        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut members = Vec::with_capacity(config.members);
        let mut counts = vec![0u32; rows.len()];
        for _ in 0..config.members {
            // A stratified bootstrap whose out-of-bag part holds both classes (nearly always the
            // first draw: with n positives it fails with probability ~0.37^n).
            let mut attempt = 0;
            loop {
                counts.iter_mut().for_each(|c| *c = 0);
                for class in [&pos, &neg] {
                    for _ in 0..class.len() {
                        counts[class[rng.gen_range(0..class.len())]] += 1;
                    }
                }
                let oob_has = |class: &[usize]| class.iter().any(|&i| counts[i] == 0);
                if oob_has(&pos) && oob_has(&neg) {
                    break;
                }
                attempt += 1;
                if attempt == RESAMPLE_ATTEMPTS {
                    return Err(TrainError::DegenerateResample);
                }
            }
            let in_bag: Vec<usize> = (0..rows.len())
                .flat_map(|i| std::iter::repeat_n(i, counts[i] as usize))
                .collect();
            let mut x = Array2::<f64>::zeros((in_bag.len(), d));
            for (r, &i) in in_bag.iter().enumerate() {
                for (c, v) in rows[i].0.iter().enumerate() {
                    x[[r, c]] = *v;
                }
            }
            let y: Array1<bool> = in_bag.iter().map(|&i| rows[i].1.label).collect();
            let fitted = solver
                .fit(&Dataset::new(x, y))
                .map_err(|e| TrainError::Fit(e.to_string()))?;
            // linfa models the probability of its `pos` class, the more frequent one (usually
            // "no failure"): turn it around to the log-odds of failure.
            let sign = if fitted.labels().pos.class { 1.0 } else { -1.0 };
            let mut member = Member {
                weights: fitted.params().iter().map(|w| sign * w).collect(),
                intercept: sign * fitted.intercept(),
                platt: [1.0, 0.0],
            };
            let (z, labels): (Vec<f64>, Vec<bool>) = (0..rows.len())
                .filter(|&i| counts[i] == 0)
                .map(|i| (member.log_odds(&rows[i].0), rows[i].1.label))
                .unzip();
            member.platt = platt(&z, &labels);
            members.push(member);
        }

        let mut model = FailureModel {
            version: String::new(),
            features: config.features.clone(),
            level: config.level,
            members,
            trained: TrainingSummary {
                examples: rows.len(),
                positives,
                first: rows.first().map(|r| r.1.time).unwrap_or_default(),
                last: rows.last().map(|r| r.1.time).unwrap_or_default(),
            },
        };
        model.version = model.content_version();
        Ok(model)
    }

    /// The calibrated probability of failure within the horizon, with its interval, from a score's
    /// signal strengths.
    pub fn predict(&self, signals: &BTreeMap<String, f64>) -> Prediction {
        let x = features(&self.features, signals);
        let mut p: Vec<f64> = self.members.iter().map(|m| m.probability(&x)).collect();
        let mean = p.iter().sum::<f64>() / p.len() as f64;
        p.sort_by(f64::total_cmp);
        let tail = (1.0 - self.level) / 2.0;
        Prediction {
            probability: mean,
            // The mean of a skewed ensemble can leave the central quantiles; keep it inside.
            lower: quantile(&p, tail).min(mean),
            upper: quantile(&p, 1.0 - tail).max(mean),
        }
    }

    /// Each feature's contribution to the log-odds (ensemble mean weight times the signal), largest
    /// first: why the model says what it says. Features that contribute nothing are left out.
    pub fn contributions(&self, signals: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
        let x = features(&self.features, signals);
        let n = self.members.len() as f64;
        let mut out: Vec<(String, f64)> = self
            .features
            .iter()
            .enumerate()
            .map(|(j, f)| {
                let w = self.members.iter().map(|m| m.weights[j]).sum::<f64>() / n;
                (f.clone(), w * x[j])
            })
            .filter(|(_, c)| *c != 0.0)
            .collect();
        out.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// The ensemble-mean weight of each feature on the log-odds scale (before calibration).
    pub fn weights(&self) -> Vec<(String, f64)> {
        let n = self.members.len() as f64;
        self.features
            .iter()
            .enumerate()
            .map(|(j, f)| {
                (
                    f.clone(),
                    self.members.iter().map(|m| m.weights[j]).sum::<f64>() / n,
                )
            })
            .collect()
    }

    /// `learned-` and a hash of the content: recorded in every score the model makes.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The signal kinds the model reads.
    pub fn features(&self) -> &[String] {
        &self.features
    }

    /// The interval level.
    pub fn level(&self) -> f64 {
        self.level
    }

    /// Ensemble members.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// What the model was trained on.
    pub fn trained(&self) -> &TrainingSummary {
        &self.trained
    }

    fn content_version(&self) -> String {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for f in &self.features {
            h.update(f.as_bytes());
            h.update(&[0]);
        }
        let mut num = |v: f64| h.update(&v.to_bits().to_le_bytes());
        num(self.level);
        for m in &self.members {
            m.weights.iter().for_each(|w| num(*w));
            num(m.intercept);
            num(m.platt[0]);
            num(m.platt[1]);
        }
        h.update(&(self.trained.examples as u64).to_le_bytes());
        h.update(&(self.trained.positives as u64).to_le_bytes());
        h.update(&self.trained.first.timestamp_millis().to_le_bytes());
        h.update(&self.trained.last.timestamp_millis().to_le_bytes());
        format!("{VERSION_PREFIX}{:016x}", h.digest())
    }
}

/// The model's inputs from a score's signals: missing or non-finite signals are 0, others are
/// clamped to [0, 1].
fn features(names: &[String], signals: &BTreeMap<String, f64>) -> Vec<f64> {
    names
        .iter()
        .map(|n| {
            signals
                .get(n)
                .copied()
                .filter(|v| v.is_finite())
                .unwrap_or(0.0)
                .clamp(0.0, 1.0)
        })
        .collect()
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Linear interpolation between order statistics (R's type 7) of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Platt scaling, by the Newton method with backtracking of Lin, Lin and Weng (2007), "A note on
/// Platt's probabilistic outputs for support vector machines": fits P(y | z) = sigmoid(a z + b)
/// to targets smoothed towards the class prior, `(N+ + 1) / (N+ + 2)` and `1 / (N- + 2)`, which
/// keeps it from overfitting small calibration sets. Returns `[a, b]`.
fn platt(z: &[f64], y: &[bool]) -> [f64; 2] {
    let n_pos = y.iter().filter(|&&l| l).count() as f64;
    let n_neg = y.len() as f64 - n_pos;
    let hi = (n_pos + 1.0) / (n_pos + 2.0);
    let lo = 1.0 / (n_neg + 2.0);
    let t: Vec<f64> = y.iter().map(|&l| if l { hi } else { lo }).collect();
    // In Lin et al.'s parametrisation P = 1 / (1 + exp(A z + B)).
    let objective = |a: f64, b: f64| -> f64 {
        z.iter()
            .zip(&t)
            .map(|(&f, &t)| {
                let v = f * a + b;
                if v >= 0.0 {
                    t * v + (-v).exp().ln_1p()
                } else {
                    (t - 1.0) * v + v.exp().ln_1p()
                }
            })
            .sum()
    };
    let (mut a, mut b) = (0.0, ((n_neg + 1.0) / (n_pos + 1.0)).ln());
    let mut value = objective(a, b);
    for _ in 0..100 {
        let (mut h11, mut h22, mut h21, mut g1, mut g2) = (1e-12, 1e-12, 0.0, 0.0, 0.0);
        for (&f, &t) in z.iter().zip(&t) {
            let v = f * a + b;
            let (p, q) = if v >= 0.0 {
                let e = (-v).exp();
                (e / (1.0 + e), 1.0 / (1.0 + e))
            } else {
                let e = v.exp();
                (1.0 / (1.0 + e), e / (1.0 + e))
            };
            let d2 = p * q;
            h11 += f * f * d2;
            h22 += d2;
            h21 += f * d2;
            let d1 = t - p;
            g1 += f * d1;
            g2 += d1;
        }
        if g1.abs() < 1e-5 && g2.abs() < 1e-5 {
            break;
        }
        let det = h11 * h22 - h21 * h21;
        let da = -(h22 * g1 - h21 * g2) / det;
        let db = -(-h21 * g1 + h11 * g2) / det;
        let gd = g1 * da + g2 * db;
        let mut step = 1.0;
        let mut moved = false;
        while step >= 1e-10 {
            let (na, nb) = (a + step * da, b + step * db);
            let nv = objective(na, nb);
            if nv < value + 1e-4 * step * gd {
                (a, b, value) = (na, nb, nv);
                moved = true;
                break;
            }
            step /= 2.0;
        }
        if !moved {
            break;
        }
    }
    [-a, -b]
}

/// A time-based split of labelled examples.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Examples before the cut whose whole horizon ends by it.
    pub train: Vec<TrainingExample>,
    /// Examples at or after the cut.
    pub holdout: Vec<TrainingExample>,
    /// Where the hold-out starts.
    pub cut: DateTime<Utc>,
    /// Training examples dropped because their horizon reached past the cut: a failure after the
    /// cut would otherwise label examples on both sides.
    pub purged: usize,
}

/// Splits examples by time: the latest `holdout_fraction` of them (by count, never splitting one
/// instant) for evaluation, the earlier ones for training (purged, see [`Split::purged`]).
pub fn split_by_time(
    mut examples: Vec<TrainingExample>,
    holdout_fraction: f64,
) -> Result<Split, TrainError> {
    if !(holdout_fraction > 0.0 && holdout_fraction < 1.0) {
        return Err(TrainError::InvalidConfig {
            key: "holdout_fraction",
            message: format!("must be strictly between 0 and 1, not {holdout_fraction}"),
        });
    }
    if examples.len() < 2 {
        return Err(TrainError::NotEnoughExamples {
            have: examples.len(),
            need: 2,
        });
    }
    examples.sort_by(|a, b| (a.time, &a.entity).cmp(&(b.time, &b.entity)));
    let at = ((examples.len() as f64 * (1.0 - holdout_fraction)).round() as usize)
        .clamp(1, examples.len() - 1);
    let cut = examples[at].time;
    let first_holdout = examples.partition_point(|e| e.time < cut);
    if first_holdout == 0 {
        return Err(TrainError::EmptyHoldout);
    }
    let holdout = examples.split_off(first_holdout);
    let before = examples.len();
    examples.retain(|e| e.horizon_end() <= cut);
    Ok(Split {
        purged: before - examples.len(),
        train: examples,
        holdout,
        cut,
    })
}

/// What makes the predictions that a candidate is compared with.
#[derive(Debug, Clone, Copy)]
pub enum Predictor<'a> {
    /// The probabilities the scores recorded: the prior's while no model is promoted.
    Recorded,
    /// A model's predictions from the recorded signals.
    Model(&'a FailureModel),
}

impl Predictor<'_> {
    /// The predicted probability for one example.
    pub fn probability(&self, example: &TrainingExample) -> f64 {
        match self {
            Predictor::Recorded => example.recorded_probability,
            Predictor::Model(m) => m.predict(&example.signals).probability,
        }
    }

    /// The version the predictions come from (`recorded` for the recorded probabilities).
    pub fn version(&self) -> &str {
        match self {
            Predictor::Recorded => "recorded",
            Predictor::Model(m) => m.version(),
        }
    }
}

/// One bin of a reliability table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReliabilityBin {
    /// Lower edge of the predicted probabilities in it (inclusive).
    pub lower: f64,
    /// Upper edge (exclusive, except for the last bin).
    pub upper: f64,
    /// Examples in it.
    pub n: usize,
    /// Their mean predicted probability.
    pub mean_predicted: f64,
    /// The share of them followed by a failure.
    pub observed: f64,
}

/// How good probabilities are on labelled examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Examples.
    pub n: usize,
    /// Examples followed by a failure.
    pub positives: usize,
    /// `positives / n`.
    pub base_rate: f64,
    /// Mean squared error of the probabilities against the 0/1 outcomes (lower is better).
    pub brier: f64,
    /// The Brier score of always predicting the base rate: a useful model is below it.
    pub brier_base_rate: f64,
    /// Mean negative log-likelihood (probabilities clamped to [1e-15, 1 - 1e-15]).
    pub log_loss: f64,
    /// The operating threshold (the high band): a probability at or above it raises an alarm.
    pub threshold: f64,
    /// Examples at or above the threshold.
    pub alarms: usize,
    /// Share of alarms followed by a failure; none without alarms.
    pub precision_at_threshold: Option<f64>,
    /// Share of failures preceded by an alarm; none without failures.
    pub recall_at_threshold: Option<f64>,
    /// Expected calibration error: the examples' mean |mean predicted - observed| over the
    /// reliability bins.
    pub calibration_error: f64,
    /// The reliability table ([`RELIABILITY_BINS`] equal-width bins; empty ones left out).
    pub reliability: Vec<ReliabilityBin>,
}

/// Evaluates a predictor on labelled examples at an operating threshold.
pub fn evaluate(
    predictor: &Predictor<'_>,
    examples: &[TrainingExample],
    threshold: f64,
) -> Result<Metrics, TrainError> {
    metrics(
        examples.iter().map(|e| (predictor.probability(e), e.label)),
        threshold,
    )
}

/// [`evaluate`] over (probability, outcome) pairs.
pub fn metrics(
    predictions: impl IntoIterator<Item = (f64, bool)>,
    threshold: f64,
) -> Result<Metrics, TrainError> {
    let mut n = 0usize;
    let mut positives = 0usize;
    let (mut brier, mut log_loss) = (0.0, 0.0);
    let (mut alarms, mut hits) = (0usize, 0usize);
    let mut bins = [(0usize, 0.0f64, 0usize); RELIABILITY_BINS];
    for (p, y) in predictions {
        let p = if p.is_finite() {
            p.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let o = if y { 1.0 } else { 0.0 };
        n += 1;
        positives += y as usize;
        brier += (p - o) * (p - o);
        let pc = p.clamp(1e-15, 1.0 - 1e-15);
        log_loss -= if y { pc.ln() } else { (1.0 - pc).ln() };
        if p >= threshold {
            alarms += 1;
            hits += y as usize;
        }
        let b = ((p * RELIABILITY_BINS as f64) as usize).min(RELIABILITY_BINS - 1);
        bins[b].0 += 1;
        bins[b].1 += p;
        bins[b].2 += y as usize;
    }
    if n == 0 {
        return Err(TrainError::EmptyHoldout);
    }
    let nf = n as f64;
    let base_rate = positives as f64 / nf;
    let reliability: Vec<ReliabilityBin> = bins
        .iter()
        .enumerate()
        .filter(|(_, b)| b.0 > 0)
        .map(|(i, &(count, sum, pos))| ReliabilityBin {
            lower: i as f64 / RELIABILITY_BINS as f64,
            upper: (i + 1) as f64 / RELIABILITY_BINS as f64,
            n: count,
            mean_predicted: sum / count as f64,
            observed: pos as f64 / count as f64,
        })
        .collect();
    Ok(Metrics {
        n,
        positives,
        base_rate,
        brier: brier / nf,
        brier_base_rate: base_rate * (1.0 - base_rate),
        log_loss: log_loss / nf,
        threshold,
        alarms,
        precision_at_threshold: (alarms > 0).then(|| hits as f64 / alarms as f64),
        recall_at_threshold: (positives > 0).then(|| hits as f64 / positives as f64),
        calibration_error: reliability
            .iter()
            .map(|b| b.n as f64 * (b.mean_predicted - b.observed).abs())
            .sum::<f64>()
            / nf,
        reliability,
    })
}

/// When a candidate replaces the current model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionRule {
    /// How much higher the candidate's Brier score may be and still count as not worse (0: not
    /// higher at all).
    pub brier_tolerance: f64,
    /// How much lower its precision at the threshold may be and still count as not worse.
    pub precision_tolerance: f64,
    /// Fewest failures in the hold-out for a comparison to mean anything; below it nothing is
    /// promoted.
    pub min_holdout_positives: usize,
}

impl Default for PromotionRule {
    fn default() -> Self {
        Self {
            brier_tolerance: 0.0,
            precision_tolerance: 0.0,
            min_holdout_positives: 5,
        }
    }
}

/// Whether a candidate is promoted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// Promote it.
    pub promote: bool,
    /// Why (not), in words.
    pub reason: String,
}

fn precision_text(p: Option<f64>) -> String {
    p.map(|p| format!("{p:.3}"))
        .unwrap_or_else(|| "undefined (no alarm)".into())
}

/// Applies the rule to a candidate's and the current model's metrics on the same hold-out:
/// promote only if the candidate is not worse in Brier score and, when the current model raised
/// alarms, not worse in precision at the threshold (a baseline without alarms has no precision to
/// lose, and then the Brier score alone decides).
pub fn promotion(candidate: &Metrics, baseline: &Metrics, rule: &PromotionRule) -> Verdict {
    let no = |reason: String| Verdict {
        promote: false,
        reason,
    };
    if candidate.n != baseline.n
        || candidate.positives != baseline.positives
        || candidate.threshold != baseline.threshold
    {
        return no(format!(
            "not comparable: evaluated on different hold-outs ({} and {} examples) or thresholds",
            candidate.n, baseline.n
        ));
    }
    if candidate.positives < rule.min_holdout_positives {
        return no(format!(
            "the hold-out has {} failures; at least {} are needed to compare models",
            candidate.positives, rule.min_holdout_positives
        ));
    }
    if candidate.brier > baseline.brier + rule.brier_tolerance {
        return no(format!(
            "Brier score {:.5} is worse than the current {:.5}",
            candidate.brier, baseline.brier
        ));
    }
    if let Some(current) = baseline.precision_at_threshold {
        match candidate.precision_at_threshold {
            Some(p) if p + rule.precision_tolerance >= current => {}
            p => {
                return no(format!(
                    "precision at {} is {}, worse than the current {current:.3}",
                    candidate.threshold,
                    precision_text(p)
                ));
            }
        }
    }
    Verdict {
        promote: true,
        reason: format!(
            "Brier score {:.5} against the current {:.5}; precision at {} {} against {}",
            candidate.brier,
            baseline.brier,
            candidate.threshold,
            precision_text(candidate.precision_at_threshold),
            precision_text(baseline.precision_at_threshold)
        ),
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng as _;

    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn entity(i: usize) -> EntityId {
        EntityId::new(format!("node-{i}")).unwrap()
    }

    /// The true failure probability of the synthetic fleet: failures follow strong forecast
    /// breaches and anomalies; the other signals are noise.
    fn truth(s: &BTreeMap<String, f64>) -> f64 {
        let get = |k: &str| s.get(k).copied().unwrap_or(0.0);
        sigmoid(-4.0 + 3.0 * get("forecast_breach") + 2.5 * get("anomaly"))
    }

    /// Signals as the scorer emits them: usually silent, sometimes anywhere in (0, 1].
    fn random_signals(rng: &mut ChaCha8Rng) -> BTreeMap<String, f64> {
        FEATURES
            .iter()
            .map(|f| {
                let v = if rng.gen_bool(0.5) {
                    0.0
                } else {
                    rng.gen_range(0.0..1.0)
                };
                (f.to_string(), v)
            })
            .collect()
    }

    /// The prior's combination (noisy-OR of the strengths), as the scores recorded it.
    fn noisy_or(s: &BTreeMap<String, f64>) -> f64 {
        1.0 - s.values().map(|p| 1.0 - p).product::<f64>()
    }

    fn synthetic(n: usize, seed: u64) -> Vec<TrainingExample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let signals = random_signals(&mut rng);
                let label = rng.gen_bool(truth(&signals));
                TrainingExample {
                    entity: entity(i % 50),
                    time: t(60 * i as i64),
                    horizon_seconds: 3600,
                    recorded_probability: noisy_or(&signals),
                    signals,
                    label,
                }
            })
            .collect()
    }

    fn quick() -> TrainConfig {
        TrainConfig {
            members: 16,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn learns_which_signals_precede_failures() {
        let model = FailureModel::train(&synthetic(4000, 1), &quick()).unwrap();
        let w: BTreeMap<String, f64> = model.weights().into_iter().collect();
        assert!(w["forecast_breach"] > 2.0, "{w:?}");
        assert!(w["anomaly"] > 1.5, "{w:?}");
        assert!(w["forecast_breach"] > w["anomaly"], "{w:?}");
        for noise in ["changepoint", "logs", "peer_outlier", "dependency"] {
            assert!(w[noise].abs() < 0.6, "{noise}: {w:?}");
        }
        let strong = BTreeMap::from([("forecast_breach".into(), 1.0), ("anomaly".into(), 1.0)]);
        let p = model.predict(&strong);
        assert!((p.probability - truth(&strong)).abs() < 0.12, "{p:?}");
        assert!(model.predict(&BTreeMap::new()).probability < 0.05);
        let why = model.contributions(&strong);
        assert_eq!(why[0].0, "forecast_breach", "{why:?}");
        assert_eq!(why.len(), 2, "silent signals contribute nothing: {why:?}");
    }

    #[test]
    fn is_calibrated_and_beats_the_base_rate_on_held_out_data() {
        let model = FailureModel::train(&synthetic(4000, 2), &quick()).unwrap();
        let test = synthetic(20_000, 3);
        let m = evaluate(&Predictor::Model(&model), &test, 0.5).unwrap();
        assert!(m.calibration_error < 0.02, "{m:#?}");
        for bin in m.reliability.iter().filter(|b| b.n >= 300) {
            assert!(
                (bin.mean_predicted - bin.observed).abs() < 0.05,
                "{bin:?} in {m:#?}"
            );
        }
        assert!(m.brier < 0.85 * m.brier_base_rate, "{m:#?}");
        // And better than the prior, which overstates every silent-signal noise.
        let prior = evaluate(&Predictor::Recorded, &test, 0.5).unwrap();
        assert!(m.brier < prior.brier, "{m:#?}\n{prior:#?}");
    }

    #[test]
    fn the_interval_covers_the_true_probability_and_shrinks_with_data() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let points: Vec<_> = (0..60).map(|_| random_signals(&mut rng)).collect();
        let config = TrainConfig {
            members: 40,
            ..TrainConfig::default()
        };
        let width = |model: &FailureModel| {
            points
                .iter()
                .map(|s| {
                    let p = model.predict(s);
                    p.upper - p.lower
                })
                .sum::<f64>()
                / points.len() as f64
        };
        let small = FailureModel::train(&synthetic(1500, 4), &config).unwrap();
        let covered = points
            .iter()
            .filter(|s| {
                let p = small.predict(s);
                assert!(
                    p.lower <= p.probability && p.probability <= p.upper,
                    "{p:?}"
                );
                p.lower <= truth(s) && truth(s) <= p.upper
            })
            .count();
        // A 90 % interval; bootstrap percentile intervals run a little narrow.
        assert!(covered >= 45, "covered {covered} of {}", points.len());
        let large = FailureModel::train(&synthetic(12_000, 5), &config).unwrap();
        assert!(
            width(&large) < 0.7 * width(&small),
            "{} vs {}",
            width(&large),
            width(&small)
        );
    }

    #[test]
    fn training_is_deterministic_and_order_independent() {
        let examples = synthetic(1000, 6);
        let a = FailureModel::train(&examples, &quick()).unwrap();
        let mut reversed = examples.clone();
        reversed.reverse();
        let b = FailureModel::train(&reversed, &quick()).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            serde_json_like(&a),
            serde_json_like(&b),
            "bit for bit, so the version is stable"
        );
        assert_eq!(a.version(), b.version());
        let other_seed =
            FailureModel::train(&examples, &TrainConfig { seed: 1, ..quick() }).unwrap();
        assert_ne!(a.version(), other_seed.version());
    }

    /// Every parameter's bits, in order (what the version hash covers).
    fn serde_json_like(m: &FailureModel) -> Vec<u64> {
        m.members
            .iter()
            .flat_map(|m| {
                m.weights
                    .iter()
                    .chain([&m.intercept, &m.platt[0], &m.platt[1]])
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn too_few_labels_is_a_typed_error() {
        let examples = synthetic(100, 7);
        let err = FailureModel::train(&examples, &quick()).unwrap_err();
        assert_eq!(
            err,
            TrainError::NotEnoughExamples {
                have: 100,
                need: 200
            }
        );
        assert!(err.is_insufficient_data());

        let mut few_failures = synthetic(1000, 7);
        let mut kept = 0;
        for e in &mut few_failures {
            if e.label {
                kept += 1;
                e.label = kept <= 3;
            }
        }
        let err = FailureModel::train(&few_failures, &quick()).unwrap_err();
        assert_eq!(err, TrainError::NotEnoughPositives { have: 3, need: 20 });
        assert!(err.is_insufficient_data());

        let bad = TrainConfig {
            level: 1.0,
            members: 1,
            ..quick()
        };
        let err = FailureModel::train(&synthetic(1000, 7), &bad).unwrap_err();
        assert!(!err.is_insufficient_data());
        assert_eq!(bad.validate().len(), 2);
    }

    #[test]
    fn round_trips_through_json_and_refuses_a_tampered_model() {
        let model = FailureModel::train(&synthetic(1000, 8), &quick()).unwrap();
        let json = serde_json::to_value(&model).unwrap();
        let back: FailureModel = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, model);
        let s = BTreeMap::from([("forecast_breach".into(), 0.7)]);
        assert_eq!(back.predict(&s), model.predict(&s));

        let mut tampered = json.clone();
        tampered["members"][0]["weights"][0] = 9.0.into();
        let err = serde_json::from_value::<FailureModel>(tampered).unwrap_err();
        assert!(
            err.to_string().contains("does not match its content"),
            "{err}"
        );
        let mut short = json;
        short["members"][1]["weights"] = serde_json::json!([1.0]);
        assert!(serde_json::from_value::<FailureModel>(short).is_err());
    }

    fn example(e: usize, time: i64, horizon: u64) -> TrainingExample {
        TrainingExample {
            entity: entity(e),
            time: t(time),
            horizon_seconds: horizon,
            signals: BTreeMap::new(),
            recorded_probability: 0.0,
            label: false,
        }
    }

    fn failure(e: usize, time: i64) -> FailureReport {
        FailureReport {
            entity: entity(e),
            time: t(time),
            kind: "crash".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn a_failure_labels_the_scores_whose_horizon_it_falls_in() {
        let mut examples = vec![
            example(1, 0, 100),   // failure at 100: on the horizon's last second
            example(1, 100, 100), // failure at 100: at the score's own time, not after it
            example(1, 150, 100), // next failure at 400: too late
            example(1, 350, 100), // failure at 400
            example(2, 50, 100),  // another entity's failure does not count
        ];
        label(
            &mut examples,
            &[failure(1, 400), failure(1, 100), failure(3, 60)],
        );
        let labels: Vec<bool> = examples.iter().map(|e| e.label).collect();
        assert_eq!(labels, [true, false, false, true, false]);
    }

    #[test]
    fn the_split_is_by_time_and_purges_horizons_reaching_into_the_holdout() {
        let examples: Vec<_> = (0..10).rev().map(|i| example(1, i * 100, 150)).collect();
        let split = split_by_time(examples, 0.3).unwrap();
        assert_eq!(split.cut, t(700));
        let times = |v: &[TrainingExample]| v.iter().map(|e| e.time).collect::<Vec<_>>();
        assert_eq!(times(&split.holdout), [t(700), t(800), t(900)]);
        // 600 + 150 > 700: its label could come from the hold-out period.
        assert_eq!(
            times(&split.train),
            (0..6).map(|i| t(i * 100)).collect::<Vec<_>>()
        );
        assert_eq!(split.purged, 1);
        assert!(split_by_time(vec![example(1, 0, 1)], 0.3).is_err());
        assert!(split_by_time((0..5).map(|_| example(1, 0, 1)).collect(), 0.3).is_err());
        assert!(matches!(
            split_by_time(Vec::new(), 1.5),
            Err(TrainError::InvalidConfig { .. })
        ));
    }

    #[test]
    fn metrics_by_hand() {
        let m = metrics([(0.9, true), (0.8, false), (0.1, false), (0.2, true)], 0.7).unwrap();
        assert_eq!((m.n, m.positives, m.alarms), (4, 2, 2));
        assert!((m.brier - (0.01 + 0.64 + 0.01 + 0.64) / 4.0).abs() < 1e-12);
        assert_eq!(m.base_rate, 0.5);
        assert_eq!(m.brier_base_rate, 0.25);
        assert_eq!(m.precision_at_threshold, Some(0.5));
        assert_eq!(m.recall_at_threshold, Some(0.5));
        assert_eq!(m.reliability.len(), 4);
        assert!((m.calibration_error - (0.1 + 0.8 + 0.1 + 0.8) / 4.0).abs() < 1e-12);
        let quiet = metrics([(0.1, false)], 0.7).unwrap();
        assert_eq!(quiet.precision_at_threshold, None);
        assert_eq!(quiet.recall_at_threshold, None);
        assert_eq!(metrics([], 0.7), Err(TrainError::EmptyHoldout));
    }

    fn with(brier: f64, precision: Option<f64>) -> Metrics {
        let mut m = metrics([(0.9, true), (0.1, false)], 0.7).unwrap();
        m.positives = 10;
        m.brier = brier;
        m.precision_at_threshold = precision;
        m
    }

    #[test]
    fn promotes_only_what_is_not_worse() {
        let rule = PromotionRule::default();
        let yes = |c: &Metrics, b: &Metrics| promotion(c, b, &rule).promote;
        assert!(yes(&with(0.05, Some(0.8)), &with(0.06, Some(0.7))));
        assert!(
            yes(&with(0.06, Some(0.7)), &with(0.06, Some(0.7))),
            "equal is not worse"
        );
        assert!(
            !yes(&with(0.07, Some(0.9)), &with(0.06, Some(0.7))),
            "worse Brier"
        );
        assert!(
            !yes(&with(0.05, Some(0.6)), &with(0.06, Some(0.7))),
            "worse precision"
        );
        assert!(
            !yes(&with(0.05, None), &with(0.06, Some(0.7))),
            "alarms lost"
        );
        assert!(
            yes(&with(0.05, Some(0.2)), &with(0.06, None)),
            "no precision to lose"
        );
        let lenient = PromotionRule {
            brier_tolerance: 0.02,
            precision_tolerance: 0.15,
            ..rule.clone()
        };
        assert!(promotion(&with(0.07, Some(0.6)), &with(0.06, Some(0.7)), &lenient).promote);
        let mut few = with(0.01, Some(1.0));
        few.positives = 2;
        let mut base = with(0.06, Some(0.7));
        base.positives = 2;
        let v = promotion(&few, &base, &rule);
        assert!(!v.promote && v.reason.contains("at least 5"), "{v:?}");
    }
}
