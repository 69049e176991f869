//! `foresight simulate`: the demo fleet's telemetry, produced live to the metrics topic at a
//! bounded rate, for trying the pipeline on the local stack.
//!
//! The fleet's history starts `backfill` ago and is produced as fast as the rate allows until it
//! reaches the present; from then on each sample is produced when its time comes (samples are
//! never ahead of the clock, which ingest would refuse). When one generated fleet history ends,
//! the next (same fleet, next seed, with new injected degradations) continues where it ended.
//! Every message starts a trace (`traceparent` header).

use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, DurationRound as _, Utc};
use futures::{StreamExt as _, stream::FuturesUnordered};
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureRecord, Producer as _},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Config,
    demo::{self, FleetSpec},
    kafka::{self, Topics},
    telemetry,
};

/// What to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulateOptions {
    /// Samples per second (at most).
    pub rate: u32,
    /// Stop after this long; `None`: until shutdown.
    pub duration: Option<Duration>,
    /// Nodes in the fleet (at least 7: the demo degrades nodes 3, 5 and 7).
    pub nodes: usize,
    /// How far back the first sample is.
    pub backfill: Duration,
    /// Seed of the first fleet history.
    pub seed: u64,
}

/// What a simulation produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimulateReport {
    /// Samples acknowledged by the broker.
    pub produced: u64,
}

/// Most samples produced and not yet acknowledged.
const MAX_IN_FLIGHT: usize = 10_000;

/// Produces the simulated fleet's telemetry to `<prefix>telemetry.metrics` until `duration` or
/// `shutdown`, creating the topics first.
pub async fn simulate(
    config: &Config,
    options: &SimulateOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<SimulateReport> {
    anyhow::ensure!(
        options.rate > 0,
        "--rate must be at least 1 sample per second"
    );
    anyhow::ensure!(
        options.nodes >= 7,
        "--nodes must be at least 7 (the simulated fleet degrades nodes 3, 5 and 7)"
    );
    let hours = (options.backfill.as_secs() / 3600).max(1) as u32;
    let topics = Topics::new(&config.kafka.topic_prefix);
    let unreachable = || {
        format!(
            "the broker at {} is not reachable: start it with `deploy/dev/stack.sh up` (or set \
             kafka.brokers / FORESIGHT_KAFKA__BROKERS)",
            config.kafka.brokers
        )
    };
    let mut producer = kafka::Outputs::new(&config.kafka)?;
    // The topics are created unless the metrics topic is there already (a running pipeline made
    // them): a metadata request is cheaper for a busy broker than a round of topic creations.
    let exists = tokio::task::block_in_place(|| {
        producer
            .producer()
            .client()
            .fetch_metadata(Some(&topics.metrics), Duration::from_secs(10))
    })
    .with_context(unreachable)?
    .topics()
    .iter()
    .any(|t| t.name() == topics.metrics && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        kafka::create_topics(&config.kafka, &topics)
            .await
            .with_context(unreachable)?;
    }
    let started = tokio::time::Instant::now();
    let deadline = options.duration.map(|d| started + d);
    let mut start: DateTime<Utc> = (Utc::now()
        - chrono::Duration::seconds(i64::from(hours) * 3600))
    .duration_trunc(chrono::Duration::minutes(1))?;
    let mut seed = options.seed;
    let mut produced = 0u64;
    let mut sent = 0u64;
    let mut in_flight = FuturesUnordered::new();
    let mut last_report = started;
    tracing::info!(
        topic = %topics.metrics,
        rate = options.rate,
        nodes = options.nodes,
        from = %start,
        "Simulating telemetry."
    );
    'fleets: loop {
        let spec = FleetSpec {
            nodes: options.nodes,
            hours,
            seed,
            start,
            ..FleetSpec::default()
        };
        let fleet = demo::generate(&spec);
        for sample in &fleet.samples {
            // Pace: never ahead of the rate, never ahead of the clock.
            let due = started + Duration::from_secs_f64(sent as f64 / f64::from(options.rate));
            let ahead = (sample.time - Utc::now()).to_std().unwrap_or_default();
            let wait = tokio::time::Instant::now().max(due) + ahead;
            if deadline.is_some_and(|d| wait >= d) {
                break 'fleets;
            }
            if wait > tokio::time::Instant::now() {
                tokio::select! {
                    () = shutdown.cancelled() => break 'fleets,
                    () = tokio::time::sleep_until(wait) => {}
                }
            } else if shutdown.is_cancelled() {
                break 'fleets;
            }
            let payload = serde_json::to_vec(sample)?;
            let traceparent = telemetry::new_traceparent();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "content-type",
                    value: Some("application/json"),
                })
                .insert(Header {
                    key: telemetry::TRACEPARENT,
                    value: Some(traceparent.as_str()),
                });
            let record = FutureRecord::to(&topics.metrics)
                .key(sample.entity.as_str())
                .payload(payload.as_slice())
                .headers(headers);
            in_flight.push(crate::runner::enqueue(&mut producer, record).await?);
            sent += 1;
            while in_flight.len() >= MAX_IN_FLIGHT {
                acknowledged(in_flight.next().await, &mut produced)?;
            }
            while let Some(Some(ack)) = futures::FutureExt::now_or_never(in_flight.next()) {
                acknowledged(Some(ack), &mut produced)?;
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = tokio::time::Instant::now();
                eprintln!(
                    "Produced {produced} samples ({:.0}/s); event time {}.",
                    produced as f64 / started.elapsed().as_secs_f64(),
                    sample.time.format("%Y-%m-%d %H:%M")
                );
            }
        }
        start += chrono::Duration::seconds(i64::from(hours) * 3600);
        seed = seed.wrapping_add(1);
    }
    // Everything produced is acknowledged before returning: a slow broker may be well behind
    // the rate, so the wait is at least a minute (or `runner.drain_timeout` if longer).
    if !in_flight.is_empty() {
        eprintln!(
            "Waiting for the broker to acknowledge {} sample(s).",
            in_flight.len()
        );
    }
    let drain = config.runner.drain_timeout.max(Duration::from_secs(60));
    let drained = tokio::time::timeout(drain, async {
        while let Some(ack) = in_flight.next().await {
            acknowledged(Some(ack), &mut produced)?;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(r) => r?,
        Err(_) => anyhow::bail!(
            "{} sample(s) not acknowledged within {:?}: is the broker at {} still up?",
            in_flight.len(),
            drain,
            config.kafka.brokers
        ),
    }
    Ok(SimulateReport { produced })
}

fn acknowledged<C>(
    ack: Option<Result<rdkafka::producer::future_producer::OwnedDeliveryResult, C>>,
    produced: &mut u64,
) -> anyhow::Result<()> {
    match ack {
        None => Ok(()),
        Some(Ok(Ok(_))) => {
            *produced += 1;
            Ok(())
        }
        Some(Ok(Err((e, _)))) => Err(e).context("producing a sample"),
        Some(Err(_)) => anyhow::bail!("the producer stopped"),
    }
}
