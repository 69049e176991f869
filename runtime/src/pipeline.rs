//! The pipeline, top-down, in one place:
//!
//! ```text
//! telemetry --ingest+features--> feature windows --scoring--> risk scores --allocator--> decisions
//!           --actuator--> outcomes;    decisions, outcomes, scores, failures --recorder--> Postgres
//! ```
//!
//! The same processors run live (each wrapped by the Kafka [`runner`](crate::runner)) and in replay
//! ([`InProcess`], fed from files in this process), so both make identical decisions.

use chrono::{DateTime, Utc};
use foresight_actuators::DryRun;
use foresight_allocator::Allocator;
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, EnvelopeError, ErrorClass, Event, EventData,
    FeatureWindow, MetricSample, Origin, Output, Processor, Rejection, RiskScore,
};
use foresight_features::WindowProcessor;
use foresight_ingest::Decoder;
use foresight_scoring::Scorer;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    kafka::Topics,
    runner::{self, Decode, LiveStage, StageReport},
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

/// Decodes telemetry with the ingest decoder.
fn telemetry(decoder: Decoder) -> Decode<MetricSample> {
    Box::new(move |bytes, time| {
        let decoded = decoder.decode(bytes, time);
        (decoded.samples, decoded.rejections)
    })
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

fn events<T: EventData + Send + 'static>() -> Decode<T> {
    Box::new(|bytes, _| match envelope::<T>(bytes) {
        Ok(data) => (vec![data], Vec::new()),
        Err(r) => (Vec::new(), vec![r]),
    })
}

fn live<P: Processor>(
    name: &'static str,
    input: &str,
    output: &str,
    topics: &Topics,
    processor: P,
    decode: Decode<P::Input>,
) -> LiveStage<P> {
    LiveStage {
        name,
        input: input.to_owned(),
        output: output.to_owned(),
        dead_letters: topics.dead_letters.clone(),
        processor,
        decode,
    }
}

/// Runs one stage live until `shutdown`.
pub async fn run_stage(
    stage: Stage,
    config: &Config,
    pool: Option<sqlx::PgPool>,
    shutdown: CancellationToken,
) -> Result<StageReport, anyhow::Error> {
    let p = Processors::new(config)?;
    let t = Topics::new(&config.kafka.topic_prefix);
    let (k, r) = (&config.kafka, &config.runner);
    let report = match stage {
        Stage::Features => {
            let s = live(
                "features",
                &t.metrics,
                &t.features,
                &t,
                p.features,
                telemetry(p.decoder),
            );
            runner::run(s, k, r, shutdown).await?
        }
        Stage::Scoring => {
            let s = live(
                "scoring",
                &t.features,
                &t.scores,
                &t,
                p.scorer,
                events::<FeatureWindow>(),
            );
            runner::run(s, k, r, shutdown).await?
        }
        Stage::Allocator => {
            let s = live(
                "allocator",
                &t.scores,
                &t.decisions,
                &t,
                p.allocator,
                events::<RiskScore>(),
            );
            runner::run(s, k, r, shutdown).await?
        }
        Stage::Actuator => {
            let s = live(
                "actuator",
                &t.decisions,
                &t.outcomes,
                &t,
                p.actuator,
                events::<Decision>(),
            );
            runner::run(s, k, r, shutdown).await?
        }
        Stage::Recorder => {
            let pool = pool.ok_or_else(|| anyhow::anyhow!("the recorder needs Postgres"))?;
            crate::recorder::run(pool, k, r, &t, shutdown).await?
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

    /// Feeds one telemetry message (its bytes, its position in `source`, its timestamp if known).
    pub fn feed(
        &mut self,
        bytes: &[u8],
        source: &str,
        origin: Origin,
        time: Option<DateTime<Utc>>,
    ) {
        let decoded = self.p.decoder.decode(bytes, time);
        let mut windows = Vec::new();
        for r in decoded.rejections {
            windows.push(Output::Rejected(r));
        }
        self.out.samples += decoded.samples.len() as u64;
        for sample in decoded.samples {
            self.p.features.process(sample, origin, &mut windows);
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
        windows: Vec<Output<FeatureWindow>>,
        bytes: &[u8],
        source: &str,
        origin: Origin,
    ) {
        let mut scores = Vec::new();
        for w in windows {
            match w {
                Output::Event(w) => {
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
