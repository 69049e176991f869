//! Live ingest: does the feature stage (decode, validate, window, produce, store offsets) keep up
//! with a bare rdkafka consumer reading the same topic from the same broker?
//!
//! `cargo bench -p foresight-tests --bench ingest_live` (broker up: `deploy/dev/stack.sh up`)
//! produces 100,000 native-JSON samples (500 entities x 8 metrics, one sample per metric every
//! 15 s, so a one-minute window gathers 32 of them), reads them with a bare `StreamConsumer`
//! (baseline), then runs the feature stage over them, and prints both rates and their ratio.
//! Without `--bench` (under `cargo test --benches`) it does the same with 4,000 samples of 25 entities.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use chrono::{Duration as Delta, DurationRound as _, Utc};
use foresight::{Stage, kafka::Topics, pipeline::Observer};
use foresight_tests::{TestDb, config, producer, tag};
use rdkafka::{
    ClientConfig,
    consumer::{Consumer, StreamConsumer},
    producer::FutureRecord,
};
use tokio_util::sync::CancellationToken;

const METRICS: [&str; 8] = [
    "cpu_pct",
    "mem_used_pct",
    "disk_used_pct",
    "disk_io_ms",
    "net_rx_bytes",
    "net_tx_bytes",
    "p99_latency_ms",
    "error_rate",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let (n, entities): (usize, usize) = if full { (100_000, 500) } else { (4_000, 25) };
    let prefix = format!("bench-{}", tag());
    // The feature stage checkpoints its windows in Postgres.
    let db = TestDb::create().await?;
    let mut config = config(&prefix, &db);
    config.features.window = Duration::from_secs(60);
    config.features.max_out_of_orderness = Duration::ZERO;
    config.features.allowed_lateness = Duration::ZERO;
    let topics = Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;

    // Input: one sample per message, entity by entity, minute by minute.
    let start = Utc::now().duration_trunc(Delta::hours(1))? - Delta::hours(48);
    let producer = producer()?;
    let mut pending = Vec::with_capacity(10_000);
    let produce_started = Instant::now();
    for i in 0..n {
        let entity = format!("node-{:04}", (i / METRICS.len()) % entities);
        let metric = METRICS[i % METRICS.len()];
        let step = (i / (METRICS.len() * entities)) as i64;
        let payload = format!(
            r#"{{"entity":"{entity}","metric":"{metric}","time":"{}","value":{}.5,"labels":{{"zone":"a"}}}}"#,
            (start + Delta::seconds(15 * step)).to_rfc3339(),
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
    eprintln!("Produced {n} samples in {:.1?}.", produce_started.elapsed());

    // Baseline: a bare consumer that only receives.
    let bare: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", foresight_tests::brokers())
        .set("group.id", format!("{prefix}-bare"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    bare.subscribe(&[&topics.metrics])?;
    let mut first = None;
    for i in 0..n {
        let m = bare.recv().await?;
        first.get_or_insert_with(Instant::now);
        std::hint::black_box(m);
        if (i + 1) % 20_000 == 0 {
            eprintln!("Bare consumer: {} messages.", i + 1);
        }
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
    let mut last_report = Instant::now();
    loop {
        let read = progress.messages.load(Ordering::Relaxed) as usize;
        if read > 0 {
            first.get_or_insert((Instant::now(), read));
        }
        if read >= n || Instant::now() > deadline {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("Feature stage: {read} messages.");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (t0, read0) = first.expect("the stage read nothing");
    let ours_rate = (n - read0) as f64 / t0.elapsed().as_secs_f64();
    shutdown.cancel();
    stage.await??;
    let windows = progress.events.load(Ordering::Relaxed) as usize;
    // Every minute's window but the last, still open.
    let expected = (n / (4 * METRICS.len())).saturating_sub(entities);
    anyhow::ensure!(
        windows > 0 && windows + entities >= expected,
        "only {windows} windows from {n} samples (expected {expected})"
    );

    println!(
        "| messages | windows out | bare rdkafka consumer msg/s | feature stage msg/s | ratio |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {n} | {windows} | {bare_rate:.0} | {ours_rate:.0} | {:.2} |",
        ours_rate / bare_rate
    );
    db.drop_db().await
}
