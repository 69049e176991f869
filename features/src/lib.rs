//! Foresight features: per-entity tumbling event-time windows over metric samples.
//!
//! Each entity keeps its own watermark (its latest sample time minus the allowed lateness), so a
//! window closes on the entity's own progress and the result does not depend on how entities are
//! spread over partitions: live (any number of partitions) and replay (one file) give the same
//! windows. A sample whose window has already closed is rejected as late, never silently dropped.
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
//! // One-minute windows, 30 s allowed lateness: the sample at minute 2 moves the watermark to
//! // 1:30, which closes the window of minute 0 only.
//! assert_eq!(out.len(), 1);
//! assert!(matches!(&out[0], Output::Event(FeaturesOutput::Window(w)) if w.metrics["cpu"].mean == 0.0));
//! ```

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use chrono::{DateTime, Utc};
use foresight_events::{
    DependencyEdge, EntityId, ErrorClass, Event, EventData, FeatureWindow, InputPartition,
    LogEvent, LogStats, MetricSample, MetricStats, Origin, OutgoingMessage, Output, Processor,
    Rejection, Routed, Telemetry,
};
use serde::{Deserialize, Serialize};

/// Windowing configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    /// Length of a tumbling window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How far out of order (behind the entity's latest sample) a sample may arrive and still count.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// How many recent window means per metric to carry for the scorer.
    pub history: usize,
    /// Weight of the newest window mean in each metric's EWMA, in (0, 1].
    pub ewma_alpha: f64,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            allowed_lateness: Duration::from_secs(30),
            history: 64,
            ewma_alpha: 0.3,
        }
    }
}

/// An invalid features configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeaturesConfigError {
    /// The window must be at least one millisecond.
    #[error("features.window must be at least 1ms")]
    WindowTooShort,
    /// History must hold at least one window.
    #[error("features.history must be at least 1")]
    NoHistory,
    /// History is bounded to keep per-entity memory bounded.
    #[error("features.history is {0}; at most {MAX_HISTORY} is allowed")]
    HistoryTooLong(usize),
    /// The EWMA weight must be a fraction.
    #[error("features.ewma_alpha must be in (0, 1], not {0}")]
    EwmaAlpha(f64),
}

/// Longest history per metric, to bound memory per entity-metric.
pub const MAX_HISTORY: usize = 512;

impl FeaturesConfig {
    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), FeaturesConfigError> {
        if self.window.as_millis() < 1 {
            return Err(FeaturesConfigError::WindowTooShort);
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
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Accumulator {
    count: u64,
    /// Running mean and sum of squared deviations (Welford), for a stable variance.
    mean: f64,
    m2: f64,
    /// Time of the first sample (ms); slope sums use seconds since it, to keep them small.
    t0: i64,
    sum_t: f64,
    sum_tt: f64,
    sum_tv: f64,
    min: f64,
    max: f64,
    last: f64,
    last_time: i64,
    /// Sample times seen in the window (sorted, at most [`DEDUP_TIMES`]): a sample re-sent with
    /// the same time (a producer retry, a replayed batch) is the same sample and is not counted
    /// twice. Beyond the cap (series faster than that many samples per window) it is not tracked,
    /// to keep memory per open window bounded.
    times: Vec<i64>,
}

/// Most sample times remembered per metric per open window for deduplication (512 bytes).
pub const DEDUP_TIMES: usize = 64;

impl Accumulator {
    fn new(value: f64, time: i64) -> Self {
        Self {
            count: 1,
            mean: value,
            m2: 0.0,
            t0: time,
            sum_t: 0.0,
            sum_tt: 0.0,
            sum_tv: 0.0,
            min: value,
            max: value,
            last: value,
            last_time: time,
            times: vec![time],
        }
    }

    fn std_dev(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            (self.m2 / (self.count - 1) as f64).max(0.0).sqrt()
        }
    }

    /// Least-squares slope of value against time (per second).
    fn slope(&self) -> f64 {
        let n = self.count as f64;
        let sum_v = self.mean * n;
        let denominator = n * self.sum_tt - self.sum_t * self.sum_t;
        if self.count < 2 || denominator.abs() < 1e-12 {
            return 0.0;
        }
        (n * self.sum_tv - self.sum_t * sum_v) / denominator
    }

    fn add(&mut self, value: f64, time: i64) {
        match self.times.binary_search(&time) {
            Ok(_) => return, // Seen: a duplicate.
            Err(at) if self.times.len() < DEDUP_TIMES => self.times.insert(at, time),
            Err(_) => {}
        }
        self.count += 1;
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
        let t = (time - self.t0) as f64 / 1000.0;
        self.sum_t += t;
        self.sum_tt += t * t;
        self.sum_tv += t * value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        // Ties keep the later-arriving sample, so the result is deterministic for a given order.
        if time >= self.last_time {
            self.last = value;
            self.last_time = time;
        }
    }
}

#[derive(Debug, Default)]
struct OpenWindow {
    metrics: BTreeMap<String, Accumulator>,
    logs: Option<LogStats>,
    /// Earliest input offset folded into this window: it must be re-read if the window is lost.
    first_offset: i64,
}

#[derive(Debug, Default)]
struct MetricHistory {
    means: VecDeque<f64>,
    ewma: Option<f64>,
    /// Start (ms) of the last window that had data for this metric.
    last_start: Option<i64>,
}

#[derive(Debug)]
struct EntityState {
    source: InputPartition,
    /// Latest sample time seen (ms).
    max_time: i64,
    /// End (ms) of the latest closed window: samples before it are late.
    closed_until: i64,
    open: BTreeMap<i64, OpenWindow>,
    history: HashMap<String, MetricHistory>,
}

/// The tumbling-window processor: [`MetricSample`] in, [`FeatureWindow`] out.
#[derive(Debug)]
pub struct WindowProcessor {
    config: FeaturesConfig,
    window_ms: i64,
    lateness_ms: i64,
    entities: HashMap<EntityId, EntityState>,
}

impl WindowProcessor {
    /// A processor with the given configuration.
    pub fn new(config: FeaturesConfig) -> Result<Self, FeaturesConfigError> {
        config.validate()?;
        Ok(Self {
            window_ms: config.window.as_millis() as i64,
            lateness_ms: config.allowed_lateness.as_millis() as i64,
            config,
            entities: HashMap::new(),
        })
    }

    /// Entities with state.
    pub fn entity_count(&self) -> usize {
        self.entities.len()
    }

    fn close(
        config: &FeaturesConfig,
        window_ms: i64,
        entity: &EntityId,
        state: &mut EntityState,
        start: i64,
        window: OpenWindow,
        out: &mut Vec<Output<FeaturesOutput>>,
    ) {
        let mut metrics = BTreeMap::new();
        for (name, acc) in window.metrics {
            let history = state.history.entry(name.clone()).or_default();
            let mean = acc.mean;
            let alpha = config.ewma_alpha;
            let ewma = history
                .ewma
                .map_or(mean, |prev| alpha * mean + (1.0 - alpha) * prev);
            history.ewma = Some(ewma);
            if history.means.len() == config.history {
                history.means.pop_front();
            }
            history.means.push_back(mean);
            let gap_windows = history
                .last_start
                .map(|prev| ((start - prev) / window_ms - 1).max(0) as u64)
                .unwrap_or(0);
            history.last_start = Some(start);
            metrics.insert(
                name,
                MetricStats {
                    count: acc.count,
                    mean,
                    min: acc.min,
                    max: acc.max,
                    last: acc.last,
                    std_dev: acc.std_dev(),
                    slope_per_s: acc.slope(),
                    ewma,
                    history: history.means.iter().copied().collect(),
                    gap_windows,
                },
            );
        }
        state.closed_until = state.closed_until.max(start + window_ms);
        out.push(Output::Event(FeaturesOutput::Window(FeatureWindow {
            entity: entity.clone(),
            start: ms_to_time(start),
            end: ms_to_time(start + window_ms),
            metrics,
            logs: window.logs,
        })));
    }
}

fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("window bounds come from valid sample times")
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
}

/// One timestamped record to fold into an entity's window.
enum Record {
    Sample(MetricSample),
    Log(LogEvent),
}

impl WindowProcessor {
    fn fold(&mut self, record: Record, origin: Origin, out: &mut Vec<Output<FeaturesOutput>>) {
        let (entity, time) = match &record {
            Record::Sample(s) => (&s.entity, s.time),
            Record::Log(l) => (&l.entity, l.time),
        };
        let t = time.timestamp_millis();
        let start = t.div_euclid(self.window_ms) * self.window_ms;
        let state = match self.entities.get_mut(entity) {
            Some(state) => state,
            None => self
                .entities
                .entry(entity.clone())
                .or_insert_with(|| EntityState {
                    source: origin.source(),
                    max_time: i64::MIN,
                    closed_until: i64::MIN,
                    open: BTreeMap::new(),
                    history: HashMap::new(),
                }),
        };
        state.source = origin.source();
        if start < state.closed_until {
            let what = match &record {
                Record::Sample(s) => format!("sample of {}/{}", s.entity, s.metric),
                Record::Log(l) => format!("log record of {}", l.entity),
            };
            out.push(Output::Rejected(Rejection::new(
                ErrorClass::Late,
                format!(
                    "{what} at {time} arrived after its window closed (allowed lateness {})",
                    humantime::format_duration(self.config.allowed_lateness)
                ),
            )));
            return;
        }
        let window = state.open.entry(start).or_insert_with(|| OpenWindow {
            metrics: BTreeMap::new(),
            logs: None,
            first_offset: origin.offset,
        });
        window.first_offset = window.first_offset.min(origin.offset);
        let entity = match record {
            Record::Sample(sample) => {
                match window.metrics.get_mut(&sample.metric) {
                    Some(acc) => acc.add(sample.value, t),
                    None => {
                        window
                            .metrics
                            .insert(sample.metric, Accumulator::new(sample.value, t));
                    }
                }
                sample.entity
            }
            Record::Log(log) => {
                let stats = window.logs.get_or_insert_with(LogStats::default);
                stats.count += 1;
                *stats.by_severity.entry(log.severity).or_default() += 1;
                log.entity
            }
        };
        state.max_time = state.max_time.max(t);
        let watermark = state.max_time.saturating_sub(self.lateness_ms);
        while let Some(entry) = state.open.first_entry() {
            if *entry.key() + self.window_ms > watermark {
                break;
            }
            let (start, window) = entry.remove_entry();
            Self::close(
                &self.config,
                self.window_ms,
                &entity,
                state,
                start,
                window,
                out,
            );
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

    fn retained_from(&self, source: InputPartition) -> Option<i64> {
        self.entities
            .values()
            .filter(|s| s.source == source)
            .flat_map(|s| s.open.values().map(|w| w.first_offset))
            .min()
    }

    fn flush(&mut self, out: &mut Vec<Output<FeaturesOutput>>) {
        let mut entities: Vec<_> = self.entities.iter_mut().collect();
        entities.sort_by(|a, b| a.0.cmp(b.0));
        for (entity, state) in entities {
            while let Some((start, window)) = state.open.pop_first() {
                Self::close(
                    &self.config,
                    self.window_ms,
                    entity,
                    state,
                    start,
                    window,
                    out,
                );
            }
        }
    }

    fn forget_partition(&mut self, source: InputPartition) {
        self.entities.retain(|_, s| s.source != source);
    }
}

#[cfg(test)]
mod tests {
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
    fn retains_the_offsets_of_open_windows_only() {
        let mut p = WindowProcessor::new(FeaturesConfig::default()).unwrap();
        let mut out = Vec::new();
        p.process(
            Telemetry::Sample(sample("a", "cpu", 0, 1.0)),
            Origin {
                input: 0,
                partition: 2,
                offset: 10,
            },
            &mut out,
        );
        p.process(
            Telemetry::Sample(sample("a", "cpu", 30, 1.0)),
            Origin {
                input: 0,
                partition: 2,
                offset: 11,
            },
            &mut out,
        );
        let two = InputPartition {
            input: 0,
            partition: 2,
        };
        assert_eq!(p.retained_from(two), Some(10));
        assert_eq!(
            p.retained_from(InputPartition {
                input: 0,
                partition: 1
            }),
            None
        );
        assert_eq!(
            p.retained_from(InputPartition {
                input: 1,
                partition: 2
            }),
            None
        );
        p.process(
            Telemetry::Sample(sample("a", "cpu", 95, 1.0)),
            Origin {
                input: 0,
                partition: 2,
                offset: 12,
            },
            &mut out,
        );
        assert_eq!(
            p.retained_from(two),
            Some(12),
            "the closed window no longer pins offset 10"
        );
        p.forget_partition(two);
        assert_eq!(p.retained_from(two), None);
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
}
