//! The pipeline, top-down, in one place:
//!
//! ```text
//! telemetry (metrics, logs, traces; native, OTLP, Prometheus)
//!   --ingest+features--> feature windows (+ dependency edges)
//!   --scoring--> per-entity scores --fleet (+ edges)--> ranked risk scores
//!   --allocator--> decisions --actuator--> outcomes
//! decisions, outcomes, scores, failures --recorder--> Postgres
//! ```
//!
//! The same processors run live (each wrapped by the Kafka [`runner`](crate::runner)) and in replay
//! ([`InProcess`], fed from files in this process), so both make identical decisions.

use chrono::{DateTime, Utc};
use foresight_actuators::DryRun;
use foresight_allocator::{Allocator, AllocatorInput};
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, DependencyEdge, EnvelopeError, ErrorClass, Event,
    EventData, FeatureWindow, Origin, Output, Processor, Rejection, RiskScore, Telemetry,
};
use foresight_features::{FeaturesOutput, WindowProcessor};
use foresight_ingest::{Decoder, Format, Signal};
use foresight_scoring::{
    Scorer,
    fleet::{Fleet, FleetInput},
};
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
    /// Feature windows -> per-entity risk scores.
    Scoring,
    /// Per-entity scores and dependency edges -> fleet-aware, ranked risk scores (one instance).
    Fleet,
    /// Risk scores -> decisions.
    Allocator,
    /// Decisions -> outcomes.
    Actuator,
    /// Decisions, outcomes, scores and failures -> Postgres.
    Recorder,
}

impl Stage {
    /// Every stage, in data-flow order.
    pub const ALL: [Stage; 6] = [
        Stage::Features,
        Stage::Scoring,
        Stage::Fleet,
        Stage::Allocator,
        Stage::Actuator,
        Stage::Recorder,
    ];

    /// The stage's name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Features => "features",
            Stage::Scoring => "scoring",
            Stage::Fleet => "fleet",
            Stage::Allocator => "allocator",
            Stage::Actuator => "actuator",
            Stage::Recorder => "recorder",
        }
    }
}

/// Live counters of every stage of a process.
#[derive(Debug, Default)]
pub struct Observer {
    stages: [Progress; 6],
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
    /// Fleet stage.
    pub fleet: Fleet,
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
            fleet: {
                let mut fleet = config.scoring.fleet.clone();
                // One window of slack unless configured.
                fleet.lateness.get_or_insert(config.features.window);
                Fleet::new(fleet, config.scoring.bands.clone(), config.graph.clone()).map_err(
                    |e| BuildError::Config {
                        stage: "fleet",
                        message: join(e),
                    },
                )?
            },
            allocator: Allocator::from_config(&config.allocator, config.graph.clone()).map_err(
                |e| BuildError::Config {
                    stage: "allocator",
                    message: join(e),
                },
            )?,
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

/// Decodes each of `inputs` into a stage's input enum (a stage with several input types).
fn as_input<T: Send + 'static, U: Send + 'static>(
    inputs: Vec<Input<T>>,
    wrap: fn(T) -> U,
) -> Vec<Input<U>> {
    inputs
        .into_iter()
        .map(|mut i| {
            let decode: Decode<U> = Box::new(move |m| {
                let (items, rejections) = (i.decode)(m);
                (items.into_iter().map(wrap).collect(), rejections)
            });
            Input {
                topic: i.topic,
                decode,
            }
        })
        .collect()
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
        control: None,
        fits: None,
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
            let mut s = live("scoring", inputs, &[&t.entity_scores], &t, p.scorer, true);
            s.fits = Some(Scorer::fits);
            runner::run(s, k, r, progress, shutdown, pool).await?
        }
        Stage::Fleet => {
            // One instance: it compares peers and follows dependencies across the whole fleet.
            // Its input partitions are watched together (event-time watermark over them).
            let mut inputs = as_input(events::<RiskScore>(&t.entity_scores), FleetInput::Score);
            inputs.extend(as_input(
                events::<DependencyEdge>(&t.dependencies),
                FleetInput::Edge,
            ));
            let mut s = live("fleet", inputs, &[&t.scores], &t, p.fleet, false);
            if let Some(pool) = &pool {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                s.control = Some(rx);
                let poll = config.scoring.fleet.model_poll;
                tokio::spawn(watch_model(pool.clone(), poll, tx, shutdown.clone()));
                if let Some(every) = config.training.every {
                    let threshold = crate::train::operating_threshold(config);
                    let training = config.training.clone();
                    tokio::spawn(train_on_schedule(
                        pool.clone(),
                        training,
                        threshold,
                        every,
                        shutdown.clone(),
                    ));
                }
            }
            runner::run(s, k, r, progress, shutdown, pool).await?
        }
        Stage::Allocator => {
            // A singleton consumer: it needs the whole pool and every score of a round. Scores
            // first; then what keeps its view of the world current.
            let mut inputs = as_input(events::<RiskScore>(&t.scores), AllocatorInput::Score);
            inputs.extend(as_input(
                events::<DependencyEdge>(&t.dependencies),
                AllocatorInput::Edge,
            ));
            inputs.extend(as_input(
                events::<foresight_events::FailureReport>(&t.failures),
                AllocatorInput::Failure,
            ));
            if let Some(topic) = &config.allocator.inventory_topic {
                inputs.extend(as_input(
                    events::<foresight_events::InventoryUpdate>(topic),
                    AllocatorInput::Inventory,
                ));
            }
            let s = live("allocator", inputs, &[&t.decisions], &t, p.allocator, false);
            runner::run(s, k, r, progress, shutdown, pool).await?
        }
        Stage::Actuator => {
            // Its own loop (as the recorder's): it claims each decision in Postgres before acting.
            let pool = pool.ok_or_else(|| anyhow::anyhow!("the actuator needs Postgres"))?;
            crate::actuator::run(config, pool, progress, shutdown).await?
        }
        Stage::Recorder => {
            let pool = pool.ok_or_else(|| anyhow::anyhow!("the recorder needs Postgres"))?;
            crate::recorder::run(pool, k, r, &t, progress, shutdown).await?
        }
    };
    Ok(report)
}

/// Keeps the fleet stage on the promoted failure model: looks in Postgres every `poll`, and hands
/// a newly promoted one (or the return to the prior, if promotion was withdrawn) to the stage.
async fn watch_model(
    pool: sqlx::PgPool,
    poll: std::time::Duration,
    tx: tokio::sync::mpsc::Sender<runner::Control<Fleet>>,
    shutdown: CancellationToken,
) {
    let mut current: Option<String> = None;
    loop {
        match crate::train::promoted_version(&pool).await {
            Ok(version) if version != current => {
                let model = match &version {
                    None => Ok(None),
                    Some(_) => crate::train::promoted_model(&pool).await,
                };
                match model {
                    Ok(model) => {
                        let now = model.as_ref().map(|m| m.version().to_owned());
                        tracing::info!(model = ?now, "Fleet stage: failure model changed.");
                        let change: runner::Control<Fleet> = Box::new(move |fleet: &mut Fleet| {
                            fleet.set_model(model.map(|m| {
                                Box::new(m) as Box<dyn foresight_scoring::fleet::Predictor>
                            }));
                        });
                        if tx.send(change).await.is_err() {
                            return; // The stage stopped.
                        }
                        current = now;
                    }
                    Err(e) => tracing::warn!(error = %e, "Could not load the promoted model."),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Could not look for a promoted model."),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// Trains the failure model every `every` (the first time one period after start), over the
/// configured look-back ending now; a promoted model reaches the stage through [`watch_model`].
async fn train_on_schedule(
    pool: sqlx::PgPool,
    training: crate::train::TrainingConfig,
    threshold: f64,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let window = crate::train::Window::ending(chrono::Utc::now(), training.lookback);
        match crate::train::train(&pool, &training, threshold, window).await {
            Ok(report) => tracing::info!(%report, "Scheduled training ran."),
            Err(e) => tracing::warn!(error = %e, "Scheduled training failed."),
        }
    }
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
        self.feed_decoded(decoded.telemetry, decoded.rejections, bytes, source, origin);
    }

    /// The decoder, for inputs decoded outside the pipeline (the rows of a table in replay are
    /// validated by [`Decoder::sample`]).
    pub fn decoder(&self) -> &Decoder {
        &self.p.decoder
    }

    /// Feeds telemetry decoded from one record (`bytes`, kept for its dead letters), and the
    /// record's rejections.
    pub fn feed_decoded(
        &mut self,
        telemetry: Vec<Telemetry>,
        rejections: Vec<Rejection>,
        bytes: &[u8],
        source: &str,
        origin: Origin,
    ) {
        let mut windows = Vec::new();
        for r in rejections {
            windows.push(Output::Rejected(r));
        }
        for t in telemetry {
            if matches!(t, Telemetry::Sample(_)) {
                self.out.samples += 1;
            }
            self.p.features.process(t, origin, &mut windows);
        }
        self.windows(windows, bytes, source, origin);
    }

    /// Samples accepted so far.
    pub fn samples(&self) -> u64 {
        self.out.samples
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
        let origin = Origin {
            input: 0,
            partition: 0,
            offset: -1,
        };
        // Open fleet rounds are scored with what they have, then the allocator's.
        let mut scores = Vec::new();
        self.p.fleet.flush(&mut scores);
        self.scores(scores, origin);
        // Rounds still waiting for scores are decided with what they have.
        let mut decisions = Vec::new();
        self.p.allocator.flush(&mut decisions);
        self.decisions(decisions, origin);
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
                Output::Event(FeaturesOutput::Edge(e)) => {
                    // The fleet's and the allocator's dependency graphs learn from the edges.
                    let mut none = Vec::new();
                    let edge = AllocatorInput::Edge(e.clone());
                    self.p.allocator.process(edge, origin, &mut none);
                    self.p
                        .fleet
                        .process(FleetInput::Edge(e.clone()), origin, &mut scores);
                    self.out.edges.push(e);
                }
                Output::Event(FeaturesOutput::Window(w)) => {
                    if self.keep_windows {
                        self.out.windows.push(w.clone());
                    }
                    let mut entity_scores = Vec::new();
                    self.p.scorer.process(w, origin, &mut entity_scores);
                    for s in entity_scores {
                        if let Output::Event(s) = s {
                            self.p
                                .fleet
                                .process(FleetInput::Score(s), origin, &mut scores);
                        }
                    }
                }
                Output::Rejected(r) => self.reject("features", r, bytes, source, origin),
            }
        }
        self.scores(scores, origin);
    }

    fn scores(&mut self, scores: Vec<Output<RiskScore>>, origin: Origin) {
        let mut decisions = Vec::new();
        for s in scores {
            if let Output::Event(s) = s {
                self.out.scores.push(s.clone());
                self.p
                    .allocator
                    .process(AllocatorInput::Score(s), origin, &mut decisions);
            }
        }
        self.decisions(decisions, origin);
    }

    fn decisions(&mut self, decisions: Vec<Output<Decision>>, origin: Origin) {
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
