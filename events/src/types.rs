//! The canonical payload types.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{EntityId, EventData, EventId};

fn millis(t: &DateTime<Utc>) -> [u8; 8] {
    t.timestamp_millis().to_le_bytes()
}

/// One numeric observation of one metric of one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricSample {
    /// The component observed (host, pod, service, pump, ...).
    pub entity: EntityId,
    /// Metric name, e.g. `disk_used_pct`.
    pub metric: String,
    /// When it was observed.
    pub time: DateTime<Utc>,
    /// The observed value; always finite.
    pub value: f64,
    /// Further labels of the series, kept for grouping and explanation.
    // Shared (immutable): the samples of one source, such as an OTLP resource, hold one set.
    #[serde(default, skip_serializing_if = "no_labels")]
    pub labels: Arc<BTreeMap<String, String>>,
    /// What the value measures: a level (gauge, the default), a running total (counter) or an
    /// increment since the previous report (delta). Counters and deltas get a rate per second in
    /// the feature windows.
    #[serde(default, skip_serializing_if = "MetricKind::is_gauge")]
    pub kind: MetricKind,
}

fn no_labels(labels: &Arc<BTreeMap<String, String>>) -> bool {
    labels.is_empty()
}

/// What a metric sample's value measures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// A level that goes up and down (CPU %, temperature, queue length).
    #[default]
    Gauge,
    /// A running total that only goes up, except when its source restarts and it resets
    /// (Prometheus counters, OTLP cumulative monotonic sums).
    Counter,
    /// The increment since the previous report (OTLP delta sums, StatsD counters).
    Delta,
}

impl MetricKind {
    /// Whether this is the default kind.
    pub fn is_gauge(&self) -> bool {
        matches!(self, MetricKind::Gauge)
    }

    /// The kind's name as written in events.
    pub fn as_str(&self) -> &'static str {
        match self {
            MetricKind::Gauge => "gauge",
            MetricKind::Counter => "counter",
            MetricKind::Delta => "delta",
        }
    }
}

impl EventData for MetricSample {
    const KIND: &'static str = "metric_sample";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.entity
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    /// Entity, metric and time: a re-sent sample has the id of the original, so duplicates are harmless.
    fn id(&self) -> EventId {
        EventId::derive(
            Self::KIND,
            &[
                self.entity.as_str().as_bytes(),
                self.metric.as_bytes(),
                &millis(&self.time),
            ],
        )
    }
}

/// Severity of a log event, on OpenTelemetry's scale.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Fine-grained debugging.
    Trace,
    /// Debugging.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that did not fail.
    Warn,
    /// An operation failed.
    Error,
    /// The component cannot go on.
    Fatal,
}

/// One log record of one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogEvent {
    /// The component that logged.
    pub entity: EntityId,
    /// When it was logged.
    pub time: DateTime<Utc>,
    /// Severity.
    pub severity: Severity,
    /// The message.
    pub body: String,
    /// Structured attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

impl EventData for LogEvent {
    const KIND: &'static str = "log_event";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.entity
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    fn id(&self) -> EventId {
        EventId::derive(
            Self::KIND,
            &[
                self.entity.as_str().as_bytes(),
                &millis(&self.time),
                self.body.as_bytes(),
            ],
        )
    }
}

/// Statistics of one metric within one window, plus the recent history the scorer forecasts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricStats {
    /// Samples in the window.
    pub count: u64,
    /// Mean of the samples.
    pub mean: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// The sample with the latest event time.
    pub last: f64,
    /// Sample standard deviation (0 for a single sample).
    #[serde(default)]
    pub std_dev: f64,
    /// Median: the sample at rank `floor(0.5 * (count - 1))`, exact for windows of up to 64
    /// samples per slide, else from a mergeable quantile sketch (DDSketch) within 1% of it.
    #[serde(default)]
    pub p50: f64,
    /// 95th percentile (as the median).
    #[serde(default)]
    pub p95: f64,
    /// 99th percentile (as the median).
    #[serde(default)]
    pub p99: f64,
    /// Least-squares slope of the samples against their event time, in units per second (0 for
    /// fewer than two distinct times).
    #[serde(default)]
    pub slope_per_s: f64,
    /// For counters and deltas: the increase per second over the window. A counter's increase
    /// counts a drop as a reset (its source restarted from zero), as Prometheus' `rate` does;
    /// it needs two samples in the window. A delta's is its sum over the window's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// For counters: resets seen in the window.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resets: u64,
    /// Exponentially weighted moving average of this metric's window means, this window included.
    #[serde(default)]
    pub ewma: f64,
    /// Means of this metric's most recent windows that had data, oldest first, ending with this one.
    /// Bounded by the feature stage's configured history length. Carrying it here keeps the scorer a
    /// pure function of one window, so live, restarted and replayed runs score identically.
    pub history: Vec<f64>,
    /// Windows without data for this metric between the previous window with data and this one
    /// (marked, never filled in).
    #[serde(default)]
    pub gap_windows: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Counts of one entity's log records within one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogStats {
    /// Records in the window.
    pub count: u64,
    /// Records per severity.
    pub by_severity: BTreeMap<Severity, u64>,
    /// Share of records at severity `error` or worse.
    #[serde(default)]
    pub error_rate: f64,
    /// Records matching each configured log pattern (by pattern name; patterns with no match
    /// are left out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub patterns: BTreeMap<String, u64>,
    /// Records whose message template (the body with its variable parts masked) this entity
    /// had never logged before.
    #[serde(default)]
    pub new_templates: u64,
    /// `new_templates / count`: a burst of never-seen messages is an early sign of trouble.
    #[serde(default)]
    pub new_template_share: f64,
}

/// The features of one entity over one event-time window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeatureWindow {
    /// The entity.
    pub entity: EntityId,
    /// Window start (inclusive).
    pub start: DateTime<Utc>,
    /// Window end (exclusive); the window's event time.
    pub end: DateTime<Utc>,
    /// Statistics per metric that had samples in the window.
    pub metrics: BTreeMap<String, MetricStats>,
    /// Log counts, when the entity logged in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogStats>,
}

impl EventData for FeatureWindow {
    const KIND: &'static str = "feature_window";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.entity
    }
    fn time(&self) -> DateTime<Utc> {
        self.end
    }
    fn id(&self) -> EventId {
        EventId::derive(
            Self::KIND,
            &[
                self.entity.as_str().as_bytes(),
                &millis(&self.start),
                &millis(&self.end),
            ],
        )
    }
}

/// Risk band of a score, from configured probability thresholds.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Band {
    /// Use normally.
    Low,
    /// Watch; prepare.
    Moderate,
    /// Act.
    High,
}

impl Band {
    /// The band's name as written in events and config.
    pub fn as_str(&self) -> &'static str {
        match self {
            Band::Low => "low",
            Band::Moderate => "moderate",
            Band::High => "high",
        }
    }
}

/// One signal's contribution to a score, so a person can see why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Contributor {
    /// Signal name, e.g. `forecast_breach`.
    pub signal: String,
    /// The metric the signal is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// The signal's own probability of failure within the horizon.
    pub probability: f64,
    /// The signal's headline value (e.g. the forecast at the horizon).
    pub value: f64,
    /// Human-readable explanation.
    pub detail: String,
    /// For a forecast: the 80% prediction interval of the metric at the horizon (`value` is its
    /// point forecast), so a report can draw the forecast band.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast_interval: Option<[f64; 2]>,
}

/// How a score's probability was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScoreMethod {
    /// The documented prior combination of signals, used before enough failure labels exist.
    Prior,
    /// A failure model trained on recorded failures.
    Learned,
}

/// An entity's risk of failure within a horizon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RiskScore {
    /// The entity.
    pub entity: EntityId,
    /// Event time of the window the score is for (its end).
    pub time: DateTime<Utc>,
    /// The feature window scored.
    pub window_id: EventId,
    /// How far ahead the probability looks, in seconds.
    pub horizon_seconds: u64,
    /// Probability of failure within the horizon.
    pub probability: f64,
    /// Lower bound of the probability's confidence interval.
    pub lower: f64,
    /// Upper bound of the probability's confidence interval.
    pub upper: f64,
    /// Expected time to failure in seconds, when a failure is expected within the horizon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_failure_seconds: Option<u64>,
    /// Health in [0, 100]: 100 is certainly fine.
    pub health: f64,
    /// Risk band.
    pub band: Band,
    /// The signals behind the probability, strongest first.
    pub contributors: Vec<Contributor>,
    /// How the probability was computed.
    pub method: ScoreMethod,
    /// Version of the model (or prior) that computed it.
    pub model_version: String,
    /// Strength of every signal kind the scorer evaluates (`forecast_breach`, `anomaly`,
    /// `changepoint`, `logs`, `peer_outlier`, `dependency`), 0 when silent: the inputs of the
    /// learned failure model, recorded so that it can be trained from the audit log.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub signals: BTreeMap<String, f64>,
    /// The window's mean of every metric scored, as the scorer saw it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub observed: BTreeMap<String, f64>,
    /// Components that depend on this one (directly or through others), nearest first: affected
    /// if it fails. Empty until the fleet stage has seen the dependency graph.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blast_radius: Vec<crate::Dependent>,
    /// Expected impact of a failure: 1 for the component itself plus a weight per dependent
    /// (the fleet stage's configuration says how much a critical and a non-critical one count).
    #[serde(default = "unit_impact")]
    pub impact: f64,
    /// The score's place in its scoring round (every score of the fleet for one window end),
    /// ranked by [`RiskScore::priority`]; set by the fleet stage, so a consumer reading the
    /// round from several partitions knows when it has all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<Rank>,
}

/// A score's place in its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rank {
    /// 1 for the highest priority.
    pub position: u32,
    /// Scores in the round.
    pub of: u32,
}

fn unit_impact() -> f64 {
    1.0
}

impl RiskScore {
    /// What the allocator ranks by: probability x impact.
    pub fn priority(&self) -> f64 {
        self.probability * self.impact
    }
}

impl EventData for RiskScore {
    const KIND: &'static str = "risk_score";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.entity
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    fn id(&self) -> EventId {
        EventId::derive(
            Self::KIND,
            &[self.window_id.as_bytes(), self.model_version.as_bytes()],
        )
    }
}

/// What an allocation decision does.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Move workloads away from the entity.
    Migrate,
    /// Add replicas or capacity.
    ScaleUp,
    /// Remove replicas or shift load off the entity.
    ScaleBack,
    /// Reserve spare capacity on healthy nodes.
    ReserveBuffer,
    /// Bring up standby capacity in a secondary environment.
    PreProvisionStandby,
    /// Copy state to the standby.
    TransferState,
    /// Register the standby with a traffic switch.
    RegisterTrafficSwitch,
    /// Switch traffic to the standby.
    SwitchTraffic,
    /// Swap the component for a virtual one.
    SwapVirtual,
    /// Schedule repair or replacement.
    ScheduleRepair,
    /// Change bandwidth or I/O priority.
    AdjustBandwidth,
    /// Raise resource limits for a code or function id.
    RaiseLimits,
    /// Raise the queue priority of a code or function id.
    PrioritiseQueue,
    /// Evict lower-priority work.
    Evict,
    /// Do nothing but keep watching.
    Monitor,
    /// Do nothing (the reason says why).
    NoOp,
}

impl ActionKind {
    /// The action's name as written in events and config.
    pub fn as_str(&self) -> &'static str {
        match self {
            ActionKind::Migrate => "migrate",
            ActionKind::ScaleUp => "scale_up",
            ActionKind::ScaleBack => "scale_back",
            ActionKind::ReserveBuffer => "reserve_buffer",
            ActionKind::PreProvisionStandby => "pre_provision_standby",
            ActionKind::TransferState => "transfer_state",
            ActionKind::RegisterTrafficSwitch => "register_traffic_switch",
            ActionKind::SwitchTraffic => "switch_traffic",
            ActionKind::SwapVirtual => "swap_virtual",
            ActionKind::ScheduleRepair => "schedule_repair",
            ActionKind::AdjustBandwidth => "adjust_bandwidth",
            ActionKind::RaiseLimits => "raise_limits",
            ActionKind::PrioritiseQueue => "prioritise_queue",
            ActionKind::Evict => "evict",
            ActionKind::Monitor => "monitor",
            ActionKind::NoOp => "no_op",
        }
    }
}

/// An action with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// What to do.
    pub kind: ActionKind,
    /// The entity acted on.
    pub target: EntityId,
    /// Action parameters (replicas, destination, limits, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// An action that was considered and not chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Alternative {
    /// The action considered.
    pub action: Action,
    /// Why it lost.
    pub rejected_because: String,
}

/// An allocation decision, with everything needed to explain and undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// The entity the decision is about.
    pub entity: EntityId,
    /// Event time of the score it was based on.
    pub time: DateTime<Utc>,
    /// The score it was based on.
    pub score_id: EventId,
    /// That score's probability.
    pub probability: f64,
    /// That score's interval.
    pub interval: [f64; 2],
    /// That score's band.
    pub band: Band,
    /// The policy that fired.
    pub policy: String,
    /// The rule within the policy that fired.
    pub rule: String,
    /// What to do.
    pub action: Action,
    /// Why, in words.
    pub reason: String,
    /// What the action is expected to achieve.
    pub expected_effect: String,
    /// The action that undoes this one, for rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inverse: Option<Action>,
    /// Actions considered and why they lost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<Alternative>,
}

impl EventData for Decision {
    const KIND: &'static str = "decision";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.entity
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    /// Score, policy, rule, and the action's kind and target: one score can yield several
    /// decisions (e.g. one migration per workload on a failing node), each with its own id, and a
    /// re-decided score yields the same ids.
    fn id(&self) -> EventId {
        EventId::derive(
            Self::KIND,
            &[
                self.score_id.as_bytes(),
                self.policy.as_bytes(),
                self.rule.as_bytes(),
                self.action.kind.as_str().as_bytes(),
                self.action.target.as_str().as_bytes(),
            ],
        )
    }
}

/// What became of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    /// Recorded what would have been done; nothing was changed.
    DryRun,
    /// Applied.
    Applied,
    /// Tried and failed.
    Failed,
    /// Postponed (rate limit, budget, approval).
    Deferred,
    /// Applied, then undone.
    RolledBack,
    /// Unknown: needs a person to check the target.
    Unknown,
}

impl OutcomeStatus {
    /// The status's name as written in events.
    pub fn as_str(&self) -> &'static str {
        match self {
            OutcomeStatus::DryRun => "dry_run",
            OutcomeStatus::Applied => "applied",
            OutcomeStatus::Failed => "failed",
            OutcomeStatus::Deferred => "deferred",
            OutcomeStatus::RolledBack => "rolled_back",
            OutcomeStatus::Unknown => "unknown",
        }
    }
}

/// The result of actuating one decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActuationOutcome {
    /// The decision actuated.
    pub decision_id: EventId,
    /// The entity.
    pub entity: EntityId,
    /// Event time of the decision.
    pub time: DateTime<Utc>,
    /// Which actuator handled it (`dry-run`, `webhook`, ...).
    pub actuator: String,
    /// What became of it.
    pub status: OutcomeStatus,
    /// The action as actuated.
    pub action: Action,
    /// Details: response, output, reason for deferral.
    pub detail: String,
}

impl EventData for ActuationOutcome {
    const KIND: &'static str = "actuation_outcome";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.entity
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    fn id(&self) -> EventId {
        EventId::derive(
            Self::KIND,
            &[
                self.decision_id.as_bytes(),
                self.actuator.as_bytes(),
                self.status.as_str().as_bytes(),
            ],
        )
    }
}

/// An observed failure: the label that scores are judged by and the failure model learns from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailureReport {
    /// The entity that failed.
    pub entity: EntityId,
    /// When it failed.
    pub time: DateTime<Utc>,
    /// Kind of failure, e.g. `disk_full`, `oom`, `crash`.
    pub kind: String,
    /// Free-form details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl EventData for FailureReport {
    const KIND: &'static str = "failure_report";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.entity
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    fn id(&self) -> EventId {
        EventId::derive(
            Self::KIND,
            &[
                self.entity.as_str().as_bytes(),
                &millis(&self.time),
                self.kind.as_bytes(),
            ],
        )
    }
}

/// Calls from one service to another seen in trace spans: an edge of the dependency graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DependencyEdge {
    /// The calling service (the entity of the edge).
    pub caller: EntityId,
    /// The called service (or peer: database, queue, host).
    pub callee: EntityId,
    /// End of the latest call counted.
    pub time: DateTime<Utc>,
    /// Calls counted.
    pub calls: u64,
    /// Calls that failed (span status error).
    pub errors: u64,
    /// Sum of call latencies, in milliseconds.
    pub latency_ms_sum: f64,
    /// Longest call, in milliseconds.
    pub latency_ms_max: f64,
}

impl EventData for DependencyEdge {
    const KIND: &'static str = "dependency_edge";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.caller
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    fn id(&self) -> EventId {
        EventId::derive(
            Self::KIND,
            &[
                self.caller.as_str().as_bytes(),
                self.callee.as_str().as_bytes(),
                &millis(&self.time),
                &self.calls.to_le_bytes(),
                &self.errors.to_le_bytes(),
                &self.latency_ms_sum.to_bits().to_le_bytes(),
            ],
        )
    }
}

/// Telemetry as ingest normalises it: what the feature stage consumes.
#[derive(Debug, Clone, PartialEq)]
pub enum Telemetry {
    /// A metric sample.
    Sample(MetricSample),
    /// A log record.
    Log(LogEvent),
    /// Calls between services, from trace spans.
    Edge(DependencyEdge),
}
