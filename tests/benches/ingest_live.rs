//! Live ingest: does the feature stage (decode, validate, window, produce, store offsets) keep up
//! with a bare rdkafka consumer reading the same topic from the same broker?
//!
//! `cargo bench -p foresight-tests --bench ingest_live` (broker up: `deploy/dev/stack.sh up`)
//! produces 200,000 native-JSON samples (1,000 entities), reads them with a bare `StreamConsumer`
//! (baseline), then runs the feature stage over them, and prints both rates and their ratio.
//! Without `--bench` (under `cargo test --benches`) it does the same with 5,000 samples.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use chrono::{Duration as Delta, DurationRound as _, Utc};
use foresight::{Stage, kafka::Topics, pipeline::Observer};
use foresight_tests::{config_without_db, producer, tag};
use rdkafka::{
    ClientConfig,
    consumer::{Consumer, StreamConsumer},
    producer::FutureRecord,
};
use tokio_util::sync::CancellationToken;

const ENTITIES: usize = 1000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full { 200_000 } else { 5_000 };
    let prefix = format!("bench-{}", tag());
    let mut config = config_without_db(&prefix);
    config.features.window = Duration::from_secs(60);
    config.features.allowed_lateness = Duration::ZERO;
    let topics = Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;

    // Input: one sample per message, entity by entity, minute by minute.
    let start = Utc::now().duration_trunc(Delta::hours(1))? - Delta::hours(48);
    let producer = producer()?;
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        let (entity, minute) = (format!("node-{:04}", i % ENTITIES), (i / ENTITIES) as i64);
        let payload = format!(
            r#"{{"entity":"{entity}","metric":"cpu_pct","time":"{}","value":{}.5,"labels":{{"zone":"a"}}}}"#,
            (start + Delta::minutes(minute)).to_rfc3339(),
            i % 97
        );
        let record = FutureRecord::to(&topics.metrics)
            .key(&entity)
            .payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e)?);
        if pending.len() == 10_000 {
            for d in pending.drain(..) {
                d.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    for d in pending.drain(..) {
        d.await?.map_err(|(e, _)| e)?;
    }

    // Baseline: a bare consumer that only receives.
    let bare: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", foresight_tests::brokers())
        .set("group.id", format!("{prefix}-bare"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    bare.subscribe(&[&topics.metrics])?;
    let mut first = None;
    for _ in 0..n {
        let m = bare.recv().await?;
        first.get_or_insert_with(Instant::now);
        std::hint::black_box(m);
    }
    let bare_rate = (n - 1) as f64 / first.expect("read").elapsed().as_secs_f64();

    // Ours: the feature stage over the same topic, timed from its first to its last message.
    let observer = Arc::new(Observer::default());
    let shutdown = CancellationToken::new();
    let stage = tokio::spawn({
        let (config, observer, shutdown) = (config.clone(), observer.clone(), shutdown.clone());
        async move {
            foresight::run_stages_observed(&[Stage::Features], &config, observer, shutdown).await
        }
    });
    let progress = observer.stage(Stage::Features);
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let read = progress.messages.load(Ordering::Relaxed) as usize;
        if read > 0 {
            first.get_or_insert((Instant::now(), read));
        }
        if read >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (t0, read0) = first.expect("the stage read nothing");
    let ours_rate = (n - read0) as f64 / t0.elapsed().as_secs_f64();
    shutdown.cancel();
    stage.await??;
    let windows = progress.events.load(Ordering::Relaxed);
    anyhow::ensure!(
        windows as usize >= n - 2 * ENTITIES,
        "only {windows} windows from {n} samples"
    );

    println!("| messages | bare rdkafka consumer msg/s | feature stage msg/s | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| {n} | {bare_rate:.0} | {ours_rate:.0} | {:.2} |",
        ours_rate / bare_rate
    );
    Ok(())
}
