//! The Foresight runtime: wires the pure stages to Kafka (live), to files (replay) and to Postgres
//! (the audit log). The binary `foresight` is a thin command line over this library.
//!
//! The data flow, top-down, is in [`pipeline`].

pub mod actuator;
pub mod anomaly;
pub mod audit;
mod checkpoint;
pub mod config;
pub mod db;
pub mod demo;
pub mod kafka;
mod offsets;
pub mod pipeline;
pub mod policy;
pub mod recorder;
pub mod replay;
pub mod runner;
pub mod train;

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use pipeline::Stage;

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
    let topics = kafka::Topics::new(&config.kafka.topic_prefix);
    kafka::create_topics(&config.kafka, &topics)
        .await
        .with_context(|| {
            format!(
                "creating topics on {}; is the broker up? (deploy/dev/stack.sh up)",
                config.kafka.brokers
            )
        })?;
    // The recorder writes the audit log; the feature and fleet stages checkpoint their state
    // (the fleet stage also follows the promoted failure model); the actuator claims decisions
    // in its ledger.
    let pool = if stages.contains(&Stage::Recorder)
        || stages.contains(&Stage::Features)
        || stages.contains(&Stage::Fleet)
        || stages.contains(&Stage::Actuator)
    {
        Some(
            db::connect(&config.postgres)
                .await
                .context("connecting to Postgres; is it up? (deploy/dev/stack.sh up)")?,
        )
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
