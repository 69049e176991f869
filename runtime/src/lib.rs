//! The Foresight runtime: wires the pure stages to Kafka (live), to files (replay) and to Postgres
//! (the audit log). The binary `foresight` is a thin command line over this library.
//!
//! The data flow, top-down, is in [`pipeline`].

pub mod actuator;
pub mod anomaly;
pub mod audit;
pub mod backtest;
pub mod checkpoint;
pub mod config;
pub mod db;
pub mod demo;
pub mod health;
pub mod init;
pub mod kafka;
pub mod nab;
mod offsets;
pub mod pipeline;
pub mod policy;
pub mod recorder;
pub mod replay;
pub mod report;
pub mod runner;
pub mod simulate;
pub mod tables;
pub mod tail;
pub mod telemetry;
pub mod train;
mod watchdog;

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use pipeline::Stage;

/// Every binary built on this library (the `foresight` command, its benchmarks and tests) allocates
/// with mimalloc: the pipeline's stages make and drop many small values per record, which it serves
/// from thread-local free lists.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the given stages live in this process until `shutdown` is cancelled or one of them fails
/// (then the others are stopped too). Topics are created if missing; Postgres is connected (and
/// migrated) only if the recorder or the feature stage (for its checkpoints) is among the stages.
pub async fn run_stages(
    stages: &[Stage],
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<(Stage, runner::StageReport)>> {
    run_stages_observed(stages, config, std::sync::Arc::default(), shutdown).await
}

/// [`run_stages`], with the stages' live counters in `observer`.
pub async fn run_stages_observed(
    stages: &[Stage],
    config: &Config,
    observer: std::sync::Arc<pipeline::Observer>,
    shutdown: CancellationToken,
) -> anyhow::Result<Vec<(Stage, runner::StageReport)>> {
    // Wrong credentials or certificates stop the process here, with the broker's reason, rather
    // than leaving every client retrying in silence. A broker that does not answer is waited for
    // (it may be restarting, or too busy to answer in time), as running stages wait out an outage.
    let mut waited = std::time::Duration::ZERO;
    loop {
        let attempt = std::time::Duration::from_secs(30);
        match kafka::check_connection(&config.kafka, attempt).await {
            Ok(()) => break,
            Err(e) if e.transient() => {
                waited += attempt;
                tracing::warn!(brokers = %config.kafka.brokers, error = %e, waited = ?waited, "Kafka brokers unreachable; still trying (check kafka.brokers if this goes on).");
                if shutdown.is_cancelled() {
                    return Ok(Vec::new());
                }
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context("checking the Kafka connection (kafka.brokers, kafka.security)"));
            }
        }
    }
    // Every stage keeps something in Postgres (see below).
    let needs_database = !stages.is_empty();
    telemetry::observe(observer.clone(), stages);
    let health = std::sync::Arc::new(health::Health::new(
        stages,
        config,
        observer.clone(),
        needs_database,
    ));
    if !config.observability.listen.is_empty() {
        health::serve(
            &config.observability.listen,
            health.clone(),
            shutdown.clone(),
        )
        .await?;
    }
    let topics = kafka::Topics::new(&config.kafka.topic_prefix);
    kafka::create_topics(&config.kafka, &topics)
        .await
        .with_context(|| {
            format!(
                "creating topics on {}; is the broker up? (deploy/dev/stack.sh up)",
                config.kafka.brokers
            )
        })?;
    // The recorder writes the audit log; the feature, scoring, fleet and allocator stages
    // checkpoint their state (the fleet stage also follows the promoted failure model); the
    // actuator claims decisions in its ledger.
    let pool = if needs_database {
        let pool = db::connect(&config.postgres)
            .await
            .context("connecting to Postgres; is it up? (deploy/dev/stack.sh up)")?;
        let _ = health.pool.set(pool.clone());
        Some(pool)
    } else {
        None
    };
    let mut tasks = JoinSet::new();
    for &stage in stages {
        let config = config.clone();
        let pool = pool.clone();
        let shutdown = shutdown.clone();
        let observer = observer.clone();
        tasks.spawn(async move {
            let progress = observer.stage(stage);
            let result =
                pipeline::run_stage(stage, &config, pool, progress, shutdown.clone()).await;
            if result.is_err() {
                shutdown.cancel(); // One stage down: stop the rest, so a supervisor restarts all.
            }
            (stage, result)
        });
    }
    let mut reports = Vec::new();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((stage, Ok(report))) => reports.push((stage, report)),
            Ok((stage, Err(e))) => {
                tracing::error!(stage = stage.name(), error = %e, "Stage failed.");
                first_error.get_or_insert(e.context(format!("stage {}", stage.name())));
            }
            Err(e) => {
                shutdown.cancel();
                first_error.get_or_insert(anyhow::Error::new(e).context("a stage panicked"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            reports.sort_by_key(|(s, _)| *s as u8);
            Ok(reports)
        }
    }
}

#[cfg(test)]
mod tests {
    /// The JSON Schemas in docs/schemas are generated from the types; this fails when they drift.
    /// Regenerate with `cargo run -- schema`.
    #[test]
    fn published_schemas_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas");
        for (kind, schema) in foresight_events::public_schemas() {
            let path = dir.join(format!("{kind}.json"));
            let published = std::fs::read_to_string(&path).unwrap_or_default();
            let current = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            assert!(
                published == current,
                "{} is stale: run `cargo run -- schema`",
                path.display()
            );
        }
    }
}
