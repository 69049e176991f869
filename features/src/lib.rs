//! Foresight features: per-entity event-time windows over metric samples and log records.
//!
//! Windows are tumbling (`slide` = `window`, the default) or hopping (`slide` < `window`, and
//! `window` a multiple of it). Records are folded into panes one slide long; a window is the
//! merge of its panes, so hopping windows cost one fold per record, not one per window.
//!
//! **Event time and watermarks.** Each entity has its own watermark: its latest record time minus
//! the bounded out-of-orderness. A window closes, and is emitted, once the entity's watermark has
//! passed its end by the allowed lateness; a record whose every window has closed is late: it
//! goes to the dead-letter topic with the reason, never silently lost. Per-entity watermarks make
//! the result independent of how entities are spread over partitions, so live (any number of
//! partitions) and replay (one file) give the same windows. (Metrics and logs come on different
//! topics: records of the one read behind the other by more than the out-of-orderness are late.)
//! An entity that falls silent does not hold its last windows open forever: once its partition has moved on `idle_timeout` (event
//! time) since the entity's last record, the partition's watermark closes its windows.
//!
//! **State** per entity is bounded (open panes, at most `history` window means per metric, at most
//! `max_metrics_per_entity` metrics, at most `max_templates` log templates; entities silent for
//! `entity_ttl` are evicted) and checkpointable ([`Processor::checkpoint`]), so a restarted or
//! rebalanced instance resumes exactly where the last checkpoint left off.
//!
//! ```
//! use chrono::{DateTime, Utc};
//! use foresight_events::{EntityId, MetricSample, Origin, Output, Processor, Telemetry};
//! use foresight_features::{FeaturesConfig, FeaturesOutput, WindowProcessor};
//!
//! let mut windows = WindowProcessor::new(FeaturesConfig::default()).unwrap();
//! let mut out = Vec::new();
//! for (i, minute) in [0, 1, 2].into_iter().enumerate() {
//!     let sample = MetricSample {
//!         entity: EntityId::new("node-1").unwrap(),
//!         metric: "cpu".into(),
//!         time: DateTime::<Utc>::from_timestamp(minute * 60, 0).unwrap(),
//!         value: minute as f64,
//!         labels: Default::default(),
//!         kind: Default::default(),
//!     };
//!     windows.process(Telemetry::Sample(sample), Origin { input: 0, partition: 0, offset: i as i64 }, &mut out);
//! }
//! // One-minute windows, 20 s out-of-orderness and 10 s lateness: the sample at minute 2 moves
//! // the watermark to 1:40, which closes the window of minute 0 only (it needed 1:10).
//! assert_eq!(out.len(), 1);
//! assert!(matches!(&out[0], Output::Event(FeaturesOutput::Window(w)) if w.metrics["cpu"].mean == 0.0));
//! ```

mod logs;
mod metric;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use chrono::{DateTime, Utc};
use foresight_events::{
    DependencyEdge, EntityId, ErrorClass, Event, EventData, FeatureWindow, LogEvent, MetricSample,
    MetricStats, Origin, OutgoingMessage, Output, Processor, Rejection, Routed, StateChange,
    StateError, Telemetry, decode_state, encode_state, partition_key,
};
use serde::{Deserialize, Serialize};

pub use metric::PANE_POINTS;

use crate::{
    logs::{LogPane, Patterns, TemplateMemory, window_logs},
    metric::{MetricPane, WindowStats, window_stats},
};

/// Windowing configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    /// Length of a window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How often a window starts, for hopping (sliding) windows: `window` must be a multiple of
    /// it. Unset: tumbling windows (the slide is the window).
    #[serde(default, with = "humantime_serde::option")]
    pub slide: Option<Duration>,
    /// How far out of order records may arrive: an entity's watermark is its latest record time
    /// minus this.
    #[serde(with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    /// How long after the watermark passes a window's end the window still waits for records.
    /// Records for a window that has closed are late, and dead-lettered.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// An entity this far behind its partition's latest record time is idle: its open windows
    /// are closed by the partition's watermark instead of its own.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// An entity this far behind its partition's latest record time is forgotten (its history
    /// with it), which bounds the state of fleets whose members come and go.
    #[serde(with = "humantime_serde")]
    pub entity_ttl: Duration,
    /// How many recent window means per metric to carry for the scorer.
    pub history: usize,
    /// Weight of the newest window mean in each metric's EWMA, in (0, 1].
    pub ewma_alpha: f64,
    /// Most distinct metrics kept per entity; samples of further metrics are dead-lettered.
    pub max_metrics_per_entity: usize,
    /// Log patterns to count per window: name -> regular expression (Rust `regex` syntax),
    /// matched against each record's body.
    pub log_patterns: BTreeMap<String, String>,
    /// Most message templates remembered per entity for the never-seen-template share.
    pub max_templates: usize,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            slide: None,
            max_out_of_orderness: Duration::from_secs(20),
            allowed_lateness: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            entity_ttl: Duration::from_secs(24 * 3600),
            history: 64,
            ewma_alpha: 0.3,
            max_metrics_per_entity: 1000,
            log_patterns: BTreeMap::new(),
            max_templates: 1000,
        }
    }
}

/// An invalid features configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeaturesConfigError {
    /// The window must be at least one millisecond.
    #[error("features.window must be at least 1ms")]
    WindowTooShort,
    /// The slide must divide the window.
    #[error(
        "features.slide must be at least 1ms, at most features.window, and divide it (window {window:?}, slide {slide:?})"
    )]
    Slide {
        /// The window.
        window: Duration,
        /// The slide.
        slide: Duration,
    },
    /// Too many panes per window would make every record's window fan-out expensive.
    #[error("features.window / features.slide is {0}; at most {MAX_PANES} is allowed")]
    TooManyPanes(i64),
    /// History must hold at least one window.
    #[error("features.history must be at least 1")]
    NoHistory,
    /// History is bounded to keep per-entity memory bounded.
    #[error("features.history is {0}; at most {MAX_HISTORY} is allowed")]
    HistoryTooLong(usize),
    /// The EWMA weight must be a fraction.
    #[error("features.ewma_alpha must be in (0, 1], not {0}")]
    EwmaAlpha(f64),
    /// A bound that must be positive is zero.
    #[error("features.{0} must be at least 1")]
    Zero(&'static str),
    /// A log pattern is not a valid regular expression.
    #[error("features.log_patterns.{name}: {error}")]
    Pattern {
        /// The pattern's name.
        name: String,
        /// What is wrong with it.
        error: String,
    },
}

/// Longest history per metric, to bound memory per entity-metric.
pub const MAX_HISTORY: usize = 512;
/// Most panes per hopping window.
pub const MAX_PANES: i64 = 60;

impl FeaturesConfig {
    /// The slide: the configured one, else the window's length (tumbling windows).
    pub fn slide(&self) -> Duration {
        self.slide.unwrap_or(self.window)
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), FeaturesConfigError> {
        let window = self.window.as_millis() as i64;
        let slide = self.slide().as_millis() as i64;
        if window < 1 {
            return Err(FeaturesConfigError::WindowTooShort);
        }
        if slide < 1 || slide > window || window % slide != 0 {
            return Err(FeaturesConfigError::Slide {
                window: self.window,
                slide: self.slide(),
            });
        }
        if window / slide > MAX_PANES {
            return Err(FeaturesConfigError::TooManyPanes(window / slide));
        }
        if self.history == 0 {
            return Err(FeaturesConfigError::NoHistory);
        }
        if self.history > MAX_HISTORY {
            return Err(FeaturesConfigError::HistoryTooLong(self.history));
        }
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            return Err(FeaturesConfigError::EwmaAlpha(self.ewma_alpha));
        }
        if self.max_metrics_per_entity == 0 {
            return Err(FeaturesConfigError::Zero("max_metrics_per_entity"));
        }
        if self.max_templates == 0 {
            return Err(FeaturesConfigError::Zero("max_templates"));
        }
        Patterns::new(&self.log_patterns).map_err(|(name, e)| FeaturesConfigError::Pattern {
            name,
            error: e.to_string(),
        })?;
        Ok(())
    }
}

/// One slide of one entity's records.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Pane {
    metrics: BTreeMap<String, MetricPane>,
    logs: Option<LogPane>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct MetricHistory {
    means: VecDeque<f64>,
    ewma: Option<f64>,
    /// Start (ms) of the last window that had data for this metric.
    last_start: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EntityState {
    /// Latest record time seen (ms).
    max_time: i64,
    /// Its partition's latest record time when this entity's latest record arrived: the entity
    /// is idle once its partition moves on `idle_timeout` past it (event time).
    seen_at: i64,
    /// Start (ms) of the next window to emit: all windows before it have been emitted, and a
    /// record whose pane is before it is late.
    next_start: i64,
    panes: BTreeMap<i64, Pane>,
    history: BTreeMap<String, MetricHistory>,
    templates: TemplateMemory,
    /// The partition (number) that owns it: its latest record's.
    #[serde(skip)]
    partition: i32,
    /// Changed since its last checkpoint.
    #[serde(skip)]
    dirty: bool,
}

/// Version of the checkpointed entity state encoding (postcard of [`EntityState`]).
const STATE_VERSION: u8 = 1;

/// A partition's event-time progress, for idle entities and eviction. Checkpointed exactly
/// (under [`CLOCK`]): when idle entities are swept depends on it, and a restored partition
/// must sweep when the original would have.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct PartitionClock {
    max_time: i64,
    /// Partition watermark up to which idle entities were last swept.
    swept_until: i64,
    /// Changed since the partition's last checkpoint.
    #[serde(skip)]
    dirty: bool,
}

/// The name of a partition's clock among its checkpoint's entries
/// ([`foresight_events::partition_key`]).
const CLOCK: &str = "clock";

/// The clock of `source`, advanced to `t`.
fn clock(partitions: &mut Vec<(i32, PartitionClock)>, source: i32, t: i64) -> &mut PartitionClock {
    let at = match partitions.iter().position(|(s, _)| *s == source) {
        Some(at) => at,
        None => {
            partitions.push((
                source,
                PartitionClock {
                    max_time: t,
                    swept_until: i64::MIN,
                    dirty: true,
                },
            ));
            partitions.len() - 1
        }
    };
    let clock = &mut partitions[at].1;
    if t > clock.max_time {
        clock.max_time = t;
        clock.dirty = true;
    }
    clock
}

/// The window processor: [`MetricSample`]s and [`LogEvent`]s in, [`FeatureWindow`]s out.
#[derive(Debug)]
pub struct WindowProcessor {
    shape: Shape,
    entities: HashMap<EntityId, EntityState, foldhash::fast::RandomState>,
    /// Per input partition (few per instance: a vector beats hashing on every record).
    partitions: Vec<(i32, PartitionClock)>,
    /// Entities evicted since the last checkpoint of their partition.
    evicted: Vec<(i32, EntityId)>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

impl WindowProcessor {
    /// A processor with the given configuration.
    pub fn new(config: FeaturesConfig) -> Result<Self, FeaturesConfigError> {
        config.validate()?;
        let patterns =
            Patterns::new(&config.log_patterns).expect("validated: every pattern compiles");
        Ok(Self {
            shape: Shape {
                window_ms: ms(config.window),
                slide_ms: ms(config.slide()),
                out_of_order_ms: ms(config.max_out_of_orderness),
                lateness_ms: ms(config.allowed_lateness),
                idle_ms: ms(config.idle_timeout),
                ttl_ms: ms(config.entity_ttl),
                patterns,
                config,
            },
            entities: HashMap::default(),
            partitions: Vec::new(),
            evicted: Vec::new(),
        })
    }

    /// Entities with state.
    pub fn entity_count(&self) -> usize {
        self.entities.len()
    }

    /// The configuration.
    pub fn config(&self) -> &FeaturesConfig {
        &self.shape.config
    }
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("window bounds come from valid record times")
}

/// What the feature stage emits.
#[derive(Debug, Clone, PartialEq)]
pub enum FeaturesOutput {
    /// A closed window (to the features topic).
    Window(FeatureWindow),
    /// Calls between services, passed on for the dependency graph (to the dependencies topic).
    Edge(DependencyEdge),
}

impl FeaturesOutput {
    /// The window, if this is one.
    pub fn window(&self) -> Option<&FeatureWindow> {
        match self {
            FeaturesOutput::Window(w) => Some(w),
            FeaturesOutput::Edge(_) => None,
        }
    }
}

impl Routed for FeaturesOutput {
    /// Windows go to output 0 (features), edges to output 1 (dependencies).
    fn into_message(self, source: &str) -> OutgoingMessage {
        match self {
            FeaturesOutput::Window(w) => w.into_message(source),
            FeaturesOutput::Edge(e) => {
                let key = e.entity().as_str().to_owned();
                OutgoingMessage {
                    route: 1,
                    key,
                    payload: Event::new(source, e).to_json(),
                }
            }
        }
    }

    fn event_time(&self) -> Option<DateTime<Utc>> {
        Some(match self {
            FeaturesOutput::Window(w) => w.time(),
            FeaturesOutput::Edge(e) => e.time(),
        })
    }
}

/// One timestamped record to fold into an entity's panes.
enum Record {
    Sample(MetricSample),
    Log(LogEvent),
}

/// The processor's fixed shape: configuration, compiled patterns and timings in milliseconds.
/// Kept apart from the entity map so windows can be closed while an entity is borrowed.
#[derive(Debug)]
struct Shape {
    config: FeaturesConfig,
    patterns: Patterns,
    window_ms: i64,
    slide_ms: i64,
    out_of_order_ms: i64,
    lateness_ms: i64,
    idle_ms: i64,
    ttl_ms: i64,
}

impl Shape {
    /// An entity's own watermark: its latest record time minus the bounded out-of-orderness.
    fn watermark(&self, state: &EntityState) -> i64 {
        state.max_time.saturating_sub(self.out_of_order_ms)
    }

    /// Emits, in order, every window of `state` that the watermark `watermark` closes, and drops
    /// the panes no open window needs any more.
    fn advance(
        &self,
        entity: &EntityId,
        state: &mut EntityState,
        watermark: i64,
        out: &mut Vec<Output<FeaturesOutput>>,
    ) {
        while let Some(&first) = state.panes.keys().next() {
            // The earliest window not yet emitted that holds the earliest pane.
            let start = state.next_start.max(first - self.window_ms + self.slide_ms);
            if start.saturating_add(self.window_ms + self.lateness_ms) > watermark {
                break;
            }
            self.emit(entity, state, start, out);
            state.next_start = start + self.slide_ms;
            while let Some(entry) = state.panes.first_entry() {
                if *entry.key() >= state.next_start {
                    break;
                }
                entry.remove();
            }
        }
    }

    fn emit(
        &self,
        entity: &EntityId,
        state: &mut EntityState,
        start: i64,
        out: &mut Vec<Output<FeaturesOutput>>,
    ) {
        let end = start + self.window_ms;
        let panes: Vec<&Pane> = state.panes.range(start..end).map(|(_, p)| p).collect();
        let window_s = self.window_ms as f64 / 1000.0;
        // Each metric's panes, in time order (a tumbling window has one pane: no grouping).
        let stats: Vec<(&str, WindowStats)> = match panes.as_slice() {
            [one] => one
                .metrics
                .iter()
                .map(|(name, m)| {
                    (
                        name.as_str(),
                        window_stats(std::slice::from_ref(&m), window_s),
                    )
                })
                .collect(),
            _ => {
                let mut grouped: BTreeMap<&str, Vec<&MetricPane>> = BTreeMap::new();
                for pane in &panes {
                    for (name, m) in &pane.metrics {
                        grouped.entry(name.as_str()).or_default().push(m);
                    }
                }
                grouped
                    .into_iter()
                    .map(|(name, ps)| (name, window_stats(&ps, window_s)))
                    .collect()
            }
        };
        let mut metrics = BTreeMap::new();
        for (name, s) in stats {
            let history = match state.history.get_mut(name) {
                Some(h) => h,
                None => state.history.entry(name.to_owned()).or_default(),
            };
            let alpha = self.config.ewma_alpha;
            let ewma = history
                .ewma
                .map_or(s.mean, |prev| alpha * s.mean + (1.0 - alpha) * prev);
            history.ewma = Some(ewma);
            if history.means.len() == self.config.history {
                history.means.pop_front();
            }
            history.means.push_back(s.mean);
            let gap_windows = history
                .last_start
                .map(|prev| ((start - prev) / self.slide_ms - 1).max(0) as u64)
                .unwrap_or(0);
            history.last_start = Some(start);
            metrics.insert(
                name.to_owned(),
                MetricStats {
                    count: s.count,
                    mean: s.mean,
                    min: s.min,
                    max: s.max,
                    last: s.last,
                    std_dev: s.std_dev,
                    p50: s.p50,
                    p95: s.p95,
                    p99: s.p99,
                    slope_per_s: s.slope_per_s,
                    rate_per_s: s.rate_per_s,
                    resets: s.resets,
                    ewma,
                    history: history.means.iter().copied().collect(),
                    gap_windows,
                },
            );
        }
        let logs = window_logs(panes.iter().filter_map(|p| p.logs.as_ref()), &self.patterns);
        out.push(Output::Event(FeaturesOutput::Window(FeatureWindow {
            entity: entity.clone(),
            start: ms_to_time(start),
            end: ms_to_time(end),
            metrics,
            logs,
        })));
    }
}

impl WindowProcessor {
    fn fold(&mut self, record: Record, origin: Origin, out: &mut Vec<Output<FeaturesOutput>>) {
        let (entity, time) = match &record {
            Record::Sample(s) => (&s.entity, s.time),
            Record::Log(l) => (&l.entity, l.time),
        };
        let t = time.timestamp_millis();
        let pane_start = t.div_euclid(self.shape.slide_ms) * self.shape.slide_ms;
        let partition = origin.partition;
        let state = self
            .entities
            .entry(entity.clone())
            .or_insert_with(|| EntityState {
                max_time: i64::MIN,
                seen_at: i64::MIN,
                next_start: i64::MIN,
                panes: BTreeMap::new(),
                history: BTreeMap::new(),
                templates: TemplateMemory::default(),
                partition,
                dirty: true,
            });
        state.partition = partition;
        state.dirty = true;
        if pane_start < state.next_start {
            let what = match &record {
                Record::Sample(s) => format!("sample of {}/{}", s.entity, s.metric),
                Record::Log(l) => format!("log record of {}", l.entity),
            };
            out.push(Output::Rejected(Rejection::new(
                ErrorClass::Late,
                format!(
                    "{what} at {time} arrived after its window closed (max out-of-orderness {}, allowed lateness {})",
                    humantime::format_duration(self.shape.config.max_out_of_orderness),
                    humantime::format_duration(self.shape.config.allowed_lateness)
                ),
            )));
            return;
        }
        let entity = match record {
            Record::Sample(sample) => {
                let pane = state.panes.entry(pane_start).or_default();
                match pane.metrics.get_mut(&sample.metric) {
                    Some(m) => {
                        m.add(t, sample.value);
                    }
                    None => {
                        if !state.history.contains_key(&sample.metric) {
                            if state.history.len() >= self.shape.config.max_metrics_per_entity {
                                if pane.metrics.is_empty() && pane.logs.is_none() {
                                    state.panes.remove(&pane_start);
                                }
                                out.push(Output::Rejected(Rejection::new(
                                    ErrorClass::Oversize,
                                    format!(
                                        "sample of {}/{}: the entity already has {} metrics (features.max_metrics_per_entity)",
                                        sample.entity,
                                        sample.metric,
                                        state.history.len()
                                    ),
                                )));
                                return;
                            }
                            state
                                .history
                                .insert(sample.metric.clone(), MetricHistory::default());
                        }
                        pane.metrics
                            .insert(sample.metric, MetricPane::new(sample.kind, t, sample.value));
                    }
                }
                sample.entity
            }
            Record::Log(log) => {
                let pane = state.panes.entry(pane_start).or_default();
                pane.logs.get_or_insert_with(LogPane::default).add(
                    log.severity,
                    &log.body,
                    &self.shape.patterns,
                    &mut state.templates,
                    self.shape.config.max_templates,
                );
                log.entity
            }
        };
        state.max_time = state.max_time.max(t);
        state.seen_at = clock(&mut self.partitions, partition, t).max_time;
        let watermark = self.shape.watermark(state);
        self.shape.advance(&entity, state, watermark, out);
        self.sweep_partition(partition, out);
    }

    /// When the partition's watermark crosses a slide boundary, closes the windows of its idle
    /// entities and evicts the long-silent ones.
    fn sweep_partition(&mut self, source: i32, out: &mut Vec<Output<FeaturesOutput>>) {
        let Some((_, clock)) = self.partitions.iter_mut().find(|(p, _)| *p == source) else {
            return;
        };
        let watermark = clock.max_time.saturating_sub(self.shape.out_of_order_ms);
        let boundary = watermark.div_euclid(self.shape.slide_ms) * self.shape.slide_ms;
        if boundary <= clock.swept_until {
            return;
        }
        clock.swept_until = boundary;
        clock.dirty = true;
        let latest = clock.max_time;
        let mut idle: Vec<EntityId> = self
            .entities
            .iter()
            .filter(|(_, s)| {
                s.partition == source && s.seen_at.saturating_add(self.shape.idle_ms) <= latest
            })
            .map(|(e, _)| e.clone())
            .collect();
        if idle.is_empty() {
            return;
        }
        idle.sort();
        for entity in idle {
            let state = self.entities.get_mut(&entity).expect("listed above");
            if state.panes.is_empty() && state.seen_at.saturating_add(self.shape.ttl_ms) <= latest {
                self.entities.remove(&entity);
                self.evicted.push((source, entity));
                continue;
            }
            if !state.panes.is_empty() {
                state.dirty = true;
                self.shape.advance(&entity, state, watermark, out);
            }
        }
    }
}

impl Processor for WindowProcessor {
    type Input = Telemetry;
    type Output = FeaturesOutput;

    fn process(&mut self, input: Telemetry, origin: Origin, out: &mut Vec<Output<FeaturesOutput>>) {
        match input {
            Telemetry::Sample(s) => self.fold(Record::Sample(s), origin, out),
            Telemetry::Log(l) => self.fold(Record::Log(l), origin, out),
            // Edges are aggregated per message by ingest; the graph is built downstream.
            Telemetry::Edge(e) => out.push(Output::Event(FeaturesOutput::Edge(e))),
        }
    }

    fn flush(&mut self, out: &mut Vec<Output<FeaturesOutput>>) {
        let mut entities: Vec<_> = self.entities.iter_mut().collect();
        entities.sort_by(|a, b| a.0.cmp(b.0));
        for (entity, state) in entities {
            self.shape.advance(entity, state, i64::MAX, out);
        }
    }

    fn forget_partition(&mut self, partition: i32) {
        self.entities.retain(|_, s| s.partition != partition);
        self.partitions.retain(|(p, _)| *p != partition);
        self.evicted.retain(|(p, _)| *p != partition);
    }

    fn stateful(&self) -> bool {
        true
    }

    fn checkpoint(&mut self, partition: i32) -> Vec<StateChange> {
        let mut changes: Vec<StateChange> = Vec::new();
        let mut dirty: Vec<(&EntityId, &mut EntityState)> = self
            .entities
            .iter_mut()
            .filter(|(_, s)| s.partition == partition && s.dirty)
            .collect();
        dirty.sort_by(|a, b| a.0.cmp(b.0));
        for (entity, state) in dirty {
            state.dirty = false;
            changes.push(StateChange::Put {
                key: entity.as_str().to_owned(),
                value: encode_state(STATE_VERSION, &*state),
            });
        }
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.evicted)
            .into_iter()
            .partition(|(p, _)| *p == partition);
        self.evicted = kept;
        changes.extend(gone.into_iter().map(|(_, e)| StateChange::Delete {
            key: e.as_str().to_owned(),
        }));
        if let Some((_, clock)) = self.partitions.iter_mut().find(|(p, _)| *p == partition)
            && clock.dirty
        {
            clock.dirty = false;
            changes.push(StateChange::Put {
                key: partition_key(CLOCK, partition),
                value: encode_state(STATE_VERSION, &*clock),
            });
        }
        changes
    }

    fn restore(
        &mut self,
        partition: i32,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StateError> {
        let clock_key = partition_key(CLOCK, partition);
        for (key, value) in entries {
            let fail = |reason: String| StateError::new(&key, reason);
            if key == clock_key {
                let restored: PartitionClock = decode_state(&key, STATE_VERSION, &value)?;
                let clock = clock(&mut self.partitions, partition, restored.max_time);
                // Exactly as checkpointed (entities restored before it may have set an earlier
                // time from their own records).
                *clock = restored;
                continue;
            }
            let entity = EntityId::new(&key).map_err(|e| fail(e.to_string()))?;
            let state: EntityState = decode_state(&key, STATE_VERSION, &value)?;
            clock(&mut self.partitions, partition, state.seen_at);
            self.entities.insert(
                entity,
                EntityState {
                    partition,
                    dirty: false,
                    templates: state.templates.restored(),
                    ..state
                },
            );
        }
        Ok(())
    }
}

/// Memory held by the processor's state, for sizing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateFootprint {
    /// Entities with state.
    pub entities: usize,
    /// Entity-metric pairs with state.
    pub entity_metrics: usize,
    /// Bytes of pane samples, sketches and history held on the heap (not counting map overhead;
    /// the windowing benchmark measures the true total with a counting allocator).
    pub heap_bytes: usize,
}

impl WindowProcessor {
    /// What the state holds now.
    pub fn footprint(&self) -> StateFootprint {
        let mut f = StateFootprint {
            entities: self.entities.len(),
            ..StateFootprint::default()
        };
        for state in self.entities.values() {
            f.entity_metrics += state.history.len();
            f.heap_bytes += state.templates.heap_bytes();
            for (name, h) in &state.history {
                f.heap_bytes += name.capacity() + h.means.capacity() * 8;
            }
            for pane in state.panes.values() {
                for (name, m) in &pane.metrics {
                    f.heap_bytes +=
                        name.capacity() + std::mem::size_of::<MetricPane>() + m.heap_bytes();
                }
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use foresight_events::MetricKind;

    use super::*;

    fn sample(entity: &str, metric: &str, secs: i64, value: f64) -> MetricSample {
        MetricSample {
            entity: EntityId::new(entity).unwrap(),
            metric: metric.into(),
            time: DateTime::from_timestamp(secs, 0).unwrap(),
            value,
            labels: Default::default(),
            kind: Default::default(),
        }
    }

    fn run(samples: Vec<MetricSample>) -> Vec<Output<FeaturesOutput>> {
        let mut p = WindowProcessor::new(FeaturesConfig::default()).unwrap();
        let mut out = Vec::new();
        for (i, s) in samples.into_iter().enumerate() {
            p.process(
                Telemetry::Sample(s),
                Origin {
                    input: 0,
                    partition: 0,
                    offset: i as i64,
                },
                &mut out,
            );
        }
        p.flush(&mut out);
        out
    }

    fn windows(out: &[Output<FeaturesOutput>]) -> Vec<&FeatureWindow> {
        out.iter()
            .filter_map(|o| match o {
                Output::Event(w) => w.window(),
                Output::Rejected(_) => None,
            })
            .collect()
    }

    #[test]
    fn computes_stats_per_window_and_metric() {
        let out = run(vec![
            sample("a", "cpu", 0, 1.0),
            sample("a", "cpu", 10, 3.0),
            sample("a", "mem", 20, 5.0),
            sample("a", "cpu", 65, 7.0),
        ]);
        let w = windows(&out);
        assert_eq!(w.len(), 2);
        let cpu = &w[0].metrics["cpu"];
        assert_eq!(
            (cpu.count, cpu.mean, cpu.min, cpu.max, cpu.last),
            (2, 2.0, 1.0, 3.0, 3.0)
        );
        assert_eq!(w[0].metrics["mem"].mean, 5.0);
        assert_eq!(w[1].metrics["cpu"].history, vec![2.0, 7.0]);
    }

    #[test]
    fn tolerates_disorder_within_lateness_and_rejects_beyond() {
        let out = run(vec![
            sample("a", "cpu", 50, 1.0),
            sample("a", "cpu", 70, 2.0), // watermark 40: window [0,60) stays open
            sample("a", "cpu", 55, 3.0), // out of order but in time
            sample("a", "cpu", 95, 4.0), // watermark 65: closes [0,60)
            sample("a", "cpu", 59, 5.0), // late
        ]);
        let w = windows(&out);
        assert_eq!(w[0].metrics["cpu"].count, 2);
        assert_eq!(w[0].metrics["cpu"].last, 3.0);
        let late: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Rejected(r) => Some(r),
                Output::Event(_) => None,
            })
            .collect();
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].class, ErrorClass::Late);
    }

    #[test]
    fn marks_gaps_instead_of_filling_them() {
        let out = run(vec![
            sample("a", "cpu", 0, 1.0),
            sample("a", "cpu", 300, 2.0),
        ]);
        let w = windows(&out);
        assert_eq!(w.len(), 2, "no window is invented for the empty minutes");
        assert_eq!(w[1].metrics["cpu"].gap_windows, 4);
    }

    #[test]
    fn entities_do_not_hold_each_other_back() {
        let out = run(vec![
            sample("a", "cpu", 0, 1.0),
            sample("b", "cpu", 0, 1.0),
            sample("b", "cpu", 100, 1.0),
        ]);
        let w = windows(&out);
        // b's window closes by b's progress; a's only at the final flush.
        assert_eq!(w[0].entity.as_str(), "b");
        assert_eq!(w[1].entity.as_str(), "a");
    }

    #[test]
    fn history_is_bounded() {
        let cfg = FeaturesConfig {
            history: 3,
            ..FeaturesConfig::default()
        };
        let mut p = WindowProcessor::new(cfg).unwrap();
        let mut out = Vec::new();
        for i in 0..10 {
            p.process(
                Telemetry::Sample(sample("a", "cpu", i * 60, i as f64)),
                Origin {
                    input: 0,
                    partition: 0,
                    offset: i,
                },
                &mut out,
            );
        }
        p.flush(&mut out);
        let last = windows(&out).last().unwrap().metrics["cpu"].history.clone();
        assert_eq!(last, vec![7.0, 8.0, 9.0]);
    }

    #[test]
    fn a_revoked_partition_takes_its_entities_along() {
        let mut p = WindowProcessor::new(FeaturesConfig::default()).unwrap();
        let mut out = Vec::new();
        for (entity, partition) in [("a", 0), ("b", 1)] {
            let origin = Origin {
                input: 0,
                partition,
                offset: 0,
            };
            p.process(
                Telemetry::Sample(sample(entity, "cpu", 0, 1.0)),
                origin,
                &mut out,
            );
        }
        p.forget_partition(1);
        assert_eq!(p.entity_count(), 1);
        p.flush(&mut out);
        assert_eq!(windows(&out).len(), 1);
        assert_eq!(windows(&out)[0].entity.as_str(), "a");
    }

    #[test]
    fn counts_logs_by_severity_and_passes_edges_on() {
        use foresight_events::{LogEvent, Severity};
        let mut p = WindowProcessor::new(FeaturesConfig::default()).unwrap();
        let mut out = Vec::new();
        let origin = Origin {
            input: 0,
            partition: 0,
            offset: 0,
        };
        for (secs, severity) in [
            (1, Severity::Error),
            (2, Severity::Info),
            (3, Severity::Error),
        ] {
            let log = LogEvent {
                entity: EntityId::new("a").unwrap(),
                time: DateTime::from_timestamp(secs, 0).unwrap(),
                severity,
                body: "x".into(),
                attributes: Default::default(),
            };
            p.process(Telemetry::Log(log), origin, &mut out);
        }
        let edge = DependencyEdge {
            caller: EntityId::new("a").unwrap(),
            callee: EntityId::new("b").unwrap(),
            time: DateTime::from_timestamp(4, 0).unwrap(),
            calls: 3,
            errors: 1,
            latency_ms_sum: 30.0,
            latency_ms_max: 20.0,
        };
        p.process(Telemetry::Edge(edge.clone()), origin, &mut out);
        assert_eq!(out, vec![Output::Event(FeaturesOutput::Edge(edge.clone()))]);
        assert_eq!(FeaturesOutput::Edge(edge).into_message("/t").route, 1);
        p.flush(&mut out);
        let w = windows(&out)[0];
        let logs = w.logs.as_ref().unwrap();
        assert_eq!(logs.count, 3);
        assert_eq!(logs.by_severity[&Severity::Error], 2);
        assert!(w.metrics.is_empty());
        assert_eq!(
            FeaturesOutput::Window(w.clone()).into_message("/t").route,
            0
        );
    }

    #[test]
    fn duplicate_samples_count_once() {
        let out = run(vec![
            sample("a", "cpu", 0, 1.0),
            sample("a", "cpu", 10, 3.0),
            sample("a", "cpu", 0, 1.0),  // re-sent
            sample("a", "cpu", 10, 3.0), // re-sent
            sample("a", "cpu", 65, 7.0),
        ]);
        let w = windows(&out);
        assert_eq!(w[0].metrics["cpu"].count, 2);
        assert_eq!(w[0].metrics["cpu"].mean, 2.0);
    }

    #[test]
    fn std_dev_slope_and_ewma() {
        let out = run(vec![
            sample("a", "cpu", 0, 1.0),
            sample("a", "cpu", 10, 3.0),
            sample("a", "cpu", 20, 5.0),
            sample("a", "cpu", 60, 11.0),
            sample("a", "cpu", 120, 0.0),
        ]);
        let w = windows(&out);
        let first = &w[0].metrics["cpu"];
        assert!((first.std_dev - 2.0).abs() < 1e-12, "{first:?}");
        assert!((first.slope_per_s - 0.2).abs() < 1e-12, "{first:?}");
        assert_eq!(first.ewma, 3.0, "the first window's EWMA is its mean");
        let second = &w[1].metrics["cpu"];
        assert_eq!(
            (second.std_dev, second.slope_per_s),
            (0.0, 0.0),
            "one sample"
        );
        assert!((second.ewma - (0.3 * 11.0 + 0.7 * 3.0)).abs() < 1e-12);
        let bad = FeaturesConfig {
            ewma_alpha: 0.0,
            ..FeaturesConfig::default()
        };
        assert_eq!(bad.validate(), Err(FeaturesConfigError::EwmaAlpha(0.0)));
    }

    fn origin(offset: i64) -> Origin {
        Origin {
            input: 0,
            partition: 0,
            offset,
        }
    }

    fn feed(
        p: &mut WindowProcessor,
        samples: &[MetricSample],
        from: i64,
    ) -> Vec<Output<FeaturesOutput>> {
        let mut out = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            p.process(
                Telemetry::Sample(s.clone()),
                origin(from + i as i64),
                &mut out,
            );
        }
        out
    }

    #[test]
    fn hopping_windows_merge_their_panes() {
        let cfg = FeaturesConfig {
            window: Duration::from_secs(60),
            slide: Some(Duration::from_secs(20)),
            ..FeaturesConfig::default()
        };
        let mut p = WindowProcessor::new(cfg).unwrap();
        let samples: Vec<_> = (0..12)
            .map(|i| sample("a", "cpu", i * 10, i as f64))
            .collect();
        let mut out = feed(&mut p, &samples, 0);
        p.flush(&mut out);
        let w = windows(&out);
        // Windows start every 20 s; the first holding the sample at 0 s starts at -40 s.
        let starts: Vec<i64> = w.iter().map(|w| w.start.timestamp()).collect();
        assert_eq!(starts, vec![-40, -20, 0, 20, 40, 60, 80, 100]);
        let counts: Vec<u64> = w.iter().map(|w| w.metrics["cpu"].count).collect();
        assert_eq!(counts, vec![2, 4, 6, 6, 6, 6, 4, 2]);
        assert_eq!(w[2].metrics["cpu"].mean, 2.5);
        assert_eq!(w[2].metrics["cpu"].gap_windows, 0);
    }

    #[test]
    fn a_record_late_for_every_window_is_rejected() {
        let cfg = FeaturesConfig {
            window: Duration::from_secs(60),
            slide: Some(Duration::from_secs(30)),
            max_out_of_orderness: Duration::ZERO,
            allowed_lateness: Duration::ZERO,
            ..FeaturesConfig::default()
        };
        let mut p = WindowProcessor::new(cfg).unwrap();
        let out = feed(
            &mut p,
            &[
                sample("a", "cpu", 0, 1.0),
                sample("a", "cpu", 95, 1.0), // closes windows starting at -30 and 0
                sample("a", "cpu", 40, 1.0), // pane 30: window 0 closed, window 30 open: counted
                sample("a", "cpu", 20, 1.0), // pane 0: both of its windows closed: late
            ],
            0,
        );
        let rejected: Vec<_> = out
            .iter()
            .filter(|o| matches!(o, Output::Rejected(r) if r.class == ErrorClass::Late))
            .collect();
        assert_eq!(rejected.len(), 1);
    }

    #[test]
    fn idle_entities_are_closed_by_their_partition_and_evicted_after_ttl() {
        let cfg = FeaturesConfig {
            idle_timeout: Duration::from_secs(120),
            entity_ttl: Duration::from_secs(600),
            ..FeaturesConfig::default()
        };
        let mut p = WindowProcessor::new(cfg).unwrap();
        let mut samples = vec![sample("quiet", "cpu", 0, 1.0)];
        samples.extend((0..20).map(|i| sample("busy", "cpu", i * 60, 1.0)));
        let out = feed(&mut p, &samples, 0);
        let quiet: Vec<_> = windows(&out)
            .into_iter()
            .filter(|w| w.entity.as_str() == "quiet")
            .collect();
        assert_eq!(
            quiet.len(),
            1,
            "closed without a flush, by the partition's progress"
        );
        assert_eq!(p.entity_count(), 1, "evicted after 10 silent minutes");
        let changes = p.checkpoint(0);
        assert!(changes.contains(&StateChange::Delete {
            key: "quiet".into()
        }));
    }

    #[test]
    fn entity_by_entity_streams_are_not_idle() {
        // All of a's hour, then all of b's: b starts far behind its partition, but is not idle.
        let mut samples: Vec<_> = (0..60).map(|i| sample("a", "cpu", i * 60, 1.0)).collect();
        samples.extend((0..60).map(|i| sample("b", "cpu", i * 60, 2.0)));
        let mut p = WindowProcessor::new(FeaturesConfig::default()).unwrap();
        let out = feed(&mut p, &samples, 0);
        assert!(
            out.iter().all(|o| matches!(o, Output::Event(_))),
            "nothing late"
        );
        let b = windows(&out)
            .iter()
            .filter(|w| w.entity.as_str() == "b")
            .count();
        assert_eq!(
            b, 58,
            "all of b's windows but the last two (30 s of lateness)"
        );
    }

    #[test]
    fn metrics_per_entity_are_bounded() {
        let cfg = FeaturesConfig {
            max_metrics_per_entity: 2,
            ..FeaturesConfig::default()
        };
        let mut p = WindowProcessor::new(cfg).unwrap();
        let out = feed(
            &mut p,
            &[
                sample("a", "m1", 0, 1.0),
                sample("a", "m2", 0, 1.0),
                sample("a", "m3", 0, 1.0),
                sample("a", "m1", 1, 1.0),
            ],
            0,
        );
        assert!(matches!(&out[..], [Output::Rejected(r)] if r.class == ErrorClass::Oversize));
    }

    #[test]
    fn log_windows_carry_patterns_error_rate_and_new_templates() {
        use foresight_events::{LogEvent, Severity};
        let cfg = FeaturesConfig {
            log_patterns: BTreeMap::from([("oom".into(), "(?i)out of memory".into())]),
            ..FeaturesConfig::default()
        };
        let mut p = WindowProcessor::new(cfg).unwrap();
        let mut out = Vec::new();
        for (secs, severity, body) in [
            (1, Severity::Info, "GET /a 200 in 5ms"),
            (2, Severity::Info, "GET /a 200 in 9ms"),
            (3, Severity::Error, "Out of memory in worker 3"),
            (61, Severity::Info, "GET /a 200 in 7ms"),
        ] {
            let log = LogEvent {
                entity: EntityId::new("a").unwrap(),
                time: DateTime::from_timestamp(secs, 0).unwrap(),
                severity,
                body: body.into(),
                attributes: Default::default(),
            };
            p.process(Telemetry::Log(log), origin(secs), &mut out);
        }
        p.flush(&mut out);
        let w = windows(&out);
        let first = w[0].logs.as_ref().unwrap();
        assert_eq!(first.patterns["oom"], 1);
        assert!((first.error_rate - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(first.new_templates, 2);
        let second = w[1].logs.as_ref().unwrap();
        assert_eq!(second.new_templates, 0, "seen in the first window");
        assert!(second.patterns.is_empty());
    }

    #[test]
    fn bad_configurations_are_refused() {
        let slide = FeaturesConfig {
            slide: Some(Duration::from_secs(25)),
            ..FeaturesConfig::default()
        };
        assert!(matches!(
            slide.validate(),
            Err(FeaturesConfigError::Slide { .. })
        ));
        let pattern = FeaturesConfig {
            log_patterns: BTreeMap::from([("x".into(), "[".into())]),
            ..FeaturesConfig::default()
        };
        assert!(
            matches!(pattern.validate(), Err(FeaturesConfigError::Pattern { name, .. }) if name == "x")
        );
    }

    #[test]
    fn corrupt_or_foreign_state_is_refused_by_name() {
        let mut p = WindowProcessor::new(FeaturesConfig::default()).unwrap();
        let source = 0;
        let err = p
            .restore(source, vec![("a".into(), vec![99, 1, 2])])
            .unwrap_err();
        assert_eq!(err.key, "a");
        assert!(err.reason.contains("version 99"), "{err}");
        let err = p
            .restore(source, vec![("b".into(), vec![STATE_VERSION, 0xff])])
            .unwrap_err();
        assert!(err.reason.contains("undecodable"), "{err}");
    }

    /// Replays `samples` through one processor, or through one that is checkpointed after
    /// `cut` inputs, dropped ("killed") some inputs later, and restored from that checkpoint
    /// into a new processor that re-reads from the checkpoint. Returns the distinct windows
    /// (by id) and whether any id was emitted twice with different content.
    fn windows_by_id(
        out: &[Output<FeaturesOutput>],
    ) -> BTreeMap<foresight_events::EventId, FeatureWindow> {
        let mut by_id = BTreeMap::new();
        for w in windows(out) {
            if let Some(prev) = by_id.insert(w.id(), w.clone()) {
                assert_eq!(&prev, w, "one id, two contents");
            }
        }
        by_id
    }

    proptest::proptest! {
        /// Kill anywhere, restore from the last checkpoint, re-read from its offset: the windows
        /// are those of an uninterrupted run: none lost, none with different content.
        #[test]
        fn a_restored_processor_resumes_exactly(
            cut in 0usize..400,
            lost in 0usize..50,
            hopping in proptest::bool::ANY,
            lagging in proptest::bool::ANY,
            seed in 0u64..1000,
        ) {
            // Lagging: one entity's stream runs 100 s behind the others', past the idle timeout,
            // so the partition's sweeps close its windows and some of its records come late.
            let cfg = FeaturesConfig {
                slide: hopping.then_some(Duration::from_secs(20)),
                idle_timeout: if lagging { Duration::from_secs(30) } else { FeaturesConfig::default().idle_timeout },
                ..FeaturesConfig::default()
            };
            // 5 entities x 2 metrics and some logs, with disorder.
            let mut input = Vec::new();
            for i in 0..200i64 {
                let jitter = ((i as u64 * 7919 + seed) % 15) as i64;
                let e = format!("e{}", i % 5);
                let t = 1000 + i * 2 - if lagging && e == "e4" { 100 } else { 0 };
                input.push(Telemetry::Sample(sample(&e, "cpu", t - jitter, (i % 13) as f64)));
                input.push(Telemetry::Sample(MetricSample {
                    kind: MetricKind::Counter,
                    ..sample(&e, "requests", t, (i * 3 % 500) as f64)
                }));
                if i % 3 == 0 {
                    input.push(Telemetry::Log(foresight_events::LogEvent {
                        entity: EntityId::new(&e).unwrap(),
                        time: DateTime::from_timestamp(t - jitter / 2, 0).unwrap(),
                        severity: foresight_events::Severity::Warn,
                        body: format!("retry {} of job-{}", i % 4, i % 7),
                        attributes: Default::default(),
                    }));
                }
            }
            // Outputs, and the inputs (by number) that were rejected.
            let feed = |p: &mut WindowProcessor, items: &[Telemetry], from: usize, rejected: &mut BTreeSet<usize>| {
                let mut out = Vec::new();
                for (i, t) in items.iter().enumerate() {
                    let before = out.len();
                    p.process(t.clone(), origin((from + i) as i64), &mut out);
                    if out[before..].iter().any(|o| matches!(o, Output::Rejected(_))) {
                        rejected.insert(from + i);
                    }
                }
                out
            };
            let cut = cut.min(input.len());
            let lost = lost.min(input.len() - cut);

            let mut whole = WindowProcessor::new(cfg.clone()).unwrap();
            let mut expected_rejected = BTreeSet::new();
            let mut expected = feed(&mut whole, &input, 0, &mut expected_rejected);
            whole.flush(&mut expected);

            // Two checkpoints (the second holds only what changed), applied as the store does.
            let source = 0;
            let mut first = WindowProcessor::new(cfg.clone()).unwrap();
            let mut store: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut apply = |changes: Vec<StateChange>| {
                for c in changes {
                    match c {
                        StateChange::Put { key, value } => drop(store.insert(key, value)),
                        StateChange::Delete { key } => drop(store.remove(&key)),
                    }
                }
            };
            let mut rejected = BTreeSet::new();
            let mut got = feed(&mut first, &input[..cut / 2], 0, &mut rejected);
            apply(first.checkpoint(source));
            got.extend(feed(&mut first, &input[cut / 2..cut], cut / 2, &mut rejected));
            apply(first.checkpoint(source));
            // Work after the checkpoint that is lost with the process (its outputs may or may
            // not have been delivered: here they were).
            got.extend(feed(&mut first, &input[cut..cut + lost], cut, &mut BTreeSet::new()));
            drop(first);

            let mut second = WindowProcessor::new(cfg).unwrap();
            second.restore(source, store.into_iter().collect()).unwrap();
            got.extend(feed(&mut second, &input[cut..], cut, &mut rejected));
            second.flush(&mut got);

            proptest::prop_assert_eq!(windows_by_id(&got), windows_by_id(&expected));
            // The same inputs rejected as late, no more, no fewer.
            proptest::prop_assert_eq!(rejected, expected_rejected);
        }
    }
}
