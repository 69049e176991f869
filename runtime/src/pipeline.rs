//! The pipeline, top-down, in one place:
//!
//! ```text
//! telemetry (metrics, logs, traces; native, OTLP, Prometheus)
//!   --ingest+features--> feature windows (+ dependency edges)
//!   --scoring--> risk scores --allocator--> decisions --actuator--> outcomes
//! decisions, outcomes, scores, failures --recorder--> Postgres
//! ```
//!
//! The same processors run live (each wrapped by the Kafka [`runner`](crate::runner)) and in replay
//! ([`InProcess`], fed from files in this process), so both make identical decisions.

use chrono::{DateTime, Utc};
use foresight_actuators::DryRun;
use foresight_allocator::Allocator;
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, DependencyEdge, EnvelopeError, ErrorClass, Event,
    EventData, FeatureWindow, Origin, Output, Processor, Rejection, RiskScore, Telemetry,
};
use foresight_features::{FeaturesOutput, WindowProcessor};
use foresight_ingest::{Decoder, Format, Signal};
use foresight_scoring::Scorer;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    config::SourceConfig,
    kafka::Topics,
    runner::{self, Decode, Input, LiveStage, Progress, StageReport},
};

/// The stages, in data-flow order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Telemetry -> feature windows (ingest decoding included).
    Features,
    /// Feature windows -> risk scores.
    Scoring,
    /// Risk scores -> decisions.
    Allocator,
    /// Decisions -> outcomes.
    Actuator,
    /// Decisions, outcomes, scores and failures -> Postgres.
    Recorder,
}

impl Stage {
    /// Every stage, in data-flow order.
    pub const ALL: [Stage; 5] = [
        Stage::Features,
        Stage::Scoring,
        Stage::Allocator,
        Stage::Actuator,
        Stage::Recorder,
    ];

    /// The stage's name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Features => "features",
            Stage::Scoring => "scoring",
            Stage::Allocator => "allocator",
            Stage::Actuator => "actuator",
            Stage::Recorder => "recorder",
        }
    }
}

/// Live counters of every stage of a process.
#[derive(Debug, Default)]
pub struct Observer {
    stages: [Progress; 5],
}

impl Observer {
    /// The counters of one stage.
    pub fn stage(&self, stage: Stage) -> &Progress {
        &self.stages[stage as usize]
    }
}

/// Why a pipeline could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A stage refused its configuration.
    #[error("invalid {stage} configuration: {message}")]
    Config {
        /// The stage.
        stage: &'static str,
        /// Every problem, joined.
        message: String,
    },
}

fn join<E: std::fmt::Display>(errors: impl IntoIterator<Item = E>) -> String {
    errors
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The processors of every stage, built from one configuration.
#[derive(Debug)]
pub struct Processors {
    /// Telemetry decoder.
    pub decoder: Decoder,
    /// Windows.
    pub features: WindowProcessor,
    /// Scorer.
    pub scorer: Scorer,
    /// Allocator.
    pub allocator: Allocator,
    /// Actuator.
    pub actuator: DryRun,
}

impl Processors {
    /// Builds every processor.
    pub fn new(config: &Config) -> Result<Self, BuildError> {
        Ok(Self {
            decoder: Decoder::new(config.ingest.clone()),
            features: WindowProcessor::new(config.features.clone()).map_err(|e| {
                BuildError::Config {
                    stage: "features",
                    message: e.to_string(),
                }
            })?,
            scorer: Scorer::new(config.scoring.clone()).map_err(|e| BuildError::Config {
                stage: "scoring",
                message: join(e),
            })?,
            allocator: Allocator::new(config.allocator.clone()).map_err(|e| {
                BuildError::Config {
                    stage: "allocator",
                    message: join(e),
                }
            })?,
            actuator: DryRun,
        })
    }
}

/// Every telemetry topic: the pipeline's own three, then the configured extra sources.
pub fn telemetry_sources(config: &Config) -> Vec<SourceConfig> {
    let t = Topics::new(&config.kafka.topic_prefix);
    let own = [
        (t.metrics, Signal::Metrics),
        (t.logs, Signal::Logs),
        (t.traces, Signal::Traces),
    ];
    own.into_iter()
        .map(|(topic, signal)| SourceConfig {
            topic,
            format: Format::Auto,
            signal,
        })
        .chain(config.sources.iter().cloned())
        .collect()
}

/// Decodes one telemetry topic with the ingest decoder.
fn telemetry(decoder: Decoder, source: &SourceConfig) -> Input<Telemetry> {
    let (format, signal) = (source.format, source.signal);
    let decode: Decode<Telemetry> = Box::new(move |m| {
        let decoded = decoder.decode(m.payload, format, signal, m.content_type, m.time);
        (decoded.telemetry, decoded.rejections)
    });
    Input {
        topic: source.topic.clone(),
        decode,
    }
}

/// Decodes one checked event envelope.
pub(crate) fn envelope<T: EventData>(bytes: &[u8]) -> Result<T, Rejection> {
    Event::<T>::from_json(bytes).map(|e| e.data).map_err(|e| {
        let class = match e {
            EnvelopeError::UnknownSchemaVersion { .. } => ErrorClass::UnknownSchemaVersion,
            _ => ErrorClass::Undecodable,
        };
        Rejection::new(class, e.to_string())
    })
}

fn events<T: EventData + Send + 'static>(topic: &str) -> Vec<Input<T>> {
    let decode: Decode<T> = Box::new(|m| match envelope::<T>(m.payload) {
        Ok(data) => (vec![data], Vec::new()),
        Err(r) => (Vec::new(), vec![r]),
    });
    vec![Input {
        topic: topic.to_owned(),
        decode,
    }]
}

fn live<P: Processor>(
    name: &'static str,
    inputs: Vec<Input<P::Input>>,
    outputs: &[&str],
    topics: &Topics,
    processor: P,
    cpu_heavy: bool,
) -> LiveStage<P> {
    LiveStage {
        name,
        inputs,
        outputs: outputs.iter().map(|t| (*t).to_owned()).collect(),
        dead_letters: topics.dead_letters.clone(),
        processor,
        cpu_heavy,
    }
}

/// Runs one stage live until `shutdown`.
pub async fn run_stage(
    stage: Stage,
    config: &Config,
    pool: Option<sqlx::PgPool>,
    progress: &Progress,
    shutdown: CancellationToken,
) -> Result<StageReport, anyhow::Error> {
    let p = Processors::new(config)?;
    let t = Topics::new(&config.kafka.topic_prefix);
    let (k, r) = (&config.kafka, &config.runner);
    let report = match stage {
        Stage::Features => {
            let inputs = telemetry_sources(config)
                .iter()
                .map(|src| telemetry(p.decoder.clone(), src))
                .collect();
            let outputs = [t.features.as_str(), t.dependencies.as_str()];
            let s = live("features", inputs, &outputs, &t, p.features, false);
            runner::run(s, k, r, progress, shutdown, pool).await?
        }
        Stage::Scoring => {
            let inputs = events::<FeatureWindow>(&t.features);
            // Scoring fits a model per metric per window: CPU-heavy.
            let s = live("scoring", inputs, &[&t.scores], &t, p.scorer, true);
            runner::run(s, k, r, progress, shutdown, None).await?
        }
        Stage::Allocator => {
            let inputs = events::<RiskScore>(&t.scores);
            let s = live("allocator", inputs, &[&t.decisions], &t, p.allocator, false);
            runner::run(s, k, r, progress, shutdown, None).await?
        }
        Stage::Actuator => {
            let inputs = events::<Decision>(&t.decisions);
            let s = live("actuator", inputs, &[&t.outcomes], &t, p.actuator, false);
            runner::run(s, k, r, progress, shutdown, None).await?
        }
        Stage::Recorder => {
            let pool = pool.ok_or_else(|| anyhow::anyhow!("the recorder needs Postgres"))?;
            crate::recorder::run(pool, k, r, &t, progress, shutdown).await?
        }
    };
    Ok(report)
}

/// Everything an in-process run produced, in the order it was produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outputs {
    /// Samples accepted.
    pub samples: u64,
    /// Feature windows closed.
    pub windows: Vec<FeatureWindow>,
    /// Dependency edges seen in traces.
    pub edges: Vec<DependencyEdge>,
    /// Scores.
    pub scores: Vec<RiskScore>,
    /// Decisions.
    pub decisions: Vec<Decision>,
    /// Outcomes.
    pub outcomes: Vec<ActuationOutcome>,
    /// Rejected records.
    pub dead_letters: Vec<DeadLetter>,
}

/// The whole pipeline in one process (replay and demo): same processors, no broker, no database.
#[derive(Debug)]
pub struct InProcess {
    p: Processors,
    /// Windows are kept only if asked for: they are the bulk of the output.
    keep_windows: bool,
    out: Outputs,
}

impl InProcess {
    /// A pipeline built from `config`.
    pub fn new(config: &Config, keep_windows: bool) -> Result<Self, BuildError> {
        Ok(Self {
            p: Processors::new(config)?,
            keep_windows,
            out: Outputs::default(),
        })
    }

    /// Feeds one native-JSON telemetry message (its bytes, its position in `source`, its
    /// timestamp if known).
    pub fn feed(
        &mut self,
        bytes: &[u8],
        source: &str,
        origin: Origin,
        time: Option<DateTime<Utc>>,
    ) {
        self.feed_as(
            bytes,
            Format::Auto,
            Signal::Metrics,
            None,
            source,
            origin,
            time,
        );
    }

    /// Feeds one telemetry message in the given format (as a live stage would read it from a
    /// topic with that configuration and content type).
    #[allow(clippy::too_many_arguments)] // Mirrors the decoder's inputs one to one.
    pub fn feed_as(
        &mut self,
        bytes: &[u8],
        format: Format,
        signal: Signal,
        content_type: Option<&str>,
        source: &str,
        origin: Origin,
        time: Option<DateTime<Utc>>,
    ) {
        let decoded = self
            .p
            .decoder
            .decode(bytes, format, signal, content_type, time);
        let mut windows = Vec::new();
        for r in decoded.rejections {
            windows.push(Output::Rejected(r));
        }
        for t in decoded.telemetry {
            if matches!(t, Telemetry::Sample(_)) {
                self.out.samples += 1;
            }
            self.p.features.process(t, origin, &mut windows);
        }
        self.windows(windows, bytes, source, origin);
    }

    /// Everything produced so far, leaving open windows open: what a live pipeline has produced
    /// after reading the same input.
    pub fn into_outputs(self) -> Outputs {
        self.out
    }

    /// Flushes open windows through the rest of the pipeline and returns everything produced.
    pub fn finish(mut self) -> Outputs {
        let mut windows = Vec::new();
        self.p.features.flush(&mut windows);
        self.windows(
            windows,
            &[],
            "flush",
            Origin {
                input: 0,
                partition: 0,
                offset: -1,
            },
        );
        self.out
    }

    fn reject(&mut self, stage: &str, r: Rejection, bytes: &[u8], source: &str, origin: Origin) {
        self.out.dead_letters.push(DeadLetter {
            stage: stage.into(),
            source_topic: source.into(),
            partition: origin.partition,
            offset: origin.offset,
            error_class: r.class,
            reason: r.reason,
            key: None,
            payload: bytes.to_vec(),
        });
    }

    // telemetry -> windows -> scores -> decisions -> outcomes, each stage's outputs fed to the next.
    fn windows(
        &mut self,
        windows: Vec<Output<FeaturesOutput>>,
        bytes: &[u8],
        source: &str,
        origin: Origin,
    ) {
        let mut scores = Vec::new();
        for w in windows {
            match w {
                Output::Event(FeaturesOutput::Edge(e)) => self.out.edges.push(e),
                Output::Event(FeaturesOutput::Window(w)) => {
                    if self.keep_windows {
                        self.out.windows.push(w.clone());
                    }
                    self.p.scorer.process(w, origin, &mut scores);
                }
                Output::Rejected(r) => self.reject("features", r, bytes, source, origin),
            }
        }
        let mut decisions = Vec::new();
        for s in scores {
            if let Output::Event(s) = s {
                self.out.scores.push(s.clone());
                self.p.allocator.process(s, origin, &mut decisions);
            }
        }
        let mut outcomes = Vec::new();
        for d in decisions {
            if let Output::Event(d) = d {
                self.out.decisions.push(d.clone());
                self.p.actuator.process(d, origin, &mut outcomes);
            }
        }
        for o in outcomes {
            if let Output::Event(o) = o {
                self.out.outcomes.push(o);
            }
        }
    }
}
