//! Telemetry from clients no one here wrote: the official OpenTelemetry Python SDK's OTLP encoders
//! producing metrics, logs and traces through Python's confluent-kafka into the real broker, in
//! both `otlp_proto` and `otlp_json`, and Foresight's live feature stage turning them into samples
//! (in feature windows), log counts and dependency edges.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use foresight::{Stage, config::SourceConfig, kafka::Topics};
use foresight_events::{DependencyEdge, Event, FeatureWindow, Severity};
use foresight_ingest::{Format, Signal};
use foresight_tests::{TestDb, brokers, config, create_topics, eventually, python, read_all, tag};
use tokio_util::sync::CancellationToken;

fn windows_of(topic: &str) -> anyhow::Result<Vec<FeatureWindow>> {
    read_all(topic, Duration::from_millis(1000), Duration::from_secs(10))?
        .iter()
        .map(|m| Ok(Event::<FeatureWindow>::from_json(&m.payload)?.data))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opentelemetry_sdk_telemetry_becomes_features_logs_and_edges() -> anyhow::Result<()> {
    let prefix = format!("otel-{}", tag());
    // The feature stage checkpoints its windows in Postgres.
    let db = TestDb::create().await?;
    let mut config = config(&prefix, &db);
    config.features.window = Duration::from_secs(1);
    config.features.max_out_of_orderness = Duration::ZERO;
    config.features.allowed_lateness = Duration::from_secs(2);
    let mut source_topics = Vec::new();
    for encoding in ["proto", "json"] {
        for signal in [Signal::Metrics, Signal::Logs, Signal::Traces] {
            let name = format!(
                "{prefix}.otlp.{}.{encoding}",
                format!("{signal:?}").to_lowercase()
            );
            let format = if encoding == "proto" {
                Format::OtlpProto
            } else {
                Format::Auto
            };
            config.sources.push(SourceConfig {
                topic: name.clone(),
                format,
                signal,
            });
            source_topics.push(name);
        }
    }
    create_topics(&source_topics).await?;
    let topics = Topics::new(&config.kafka.topic_prefix);

    // The feature stage runs while the clients produce, as it would live.
    let shutdown = CancellationToken::new();
    let stage = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move { foresight::run_stages(&[Stage::Features], &config, shutdown).await }
    });
    for encoding in ["proto", "json"] {
        let output = tokio::process::Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/clients/otel_produce.py"
            ))
            .args([brokers(), prefix.clone(), encoding.to_owned()])
            .output()
            .await
            .with_context(|| {
                format!(
                    "running {} (deploy/dev/test.sh installs its packages)",
                    python()
                )
            })?;
        anyhow::ensure!(
            output.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let (features, dependencies) = (topics.features.clone(), topics.dependencies.clone());
    let waited = eventually(
        "windows with metrics and logs, and edges, for both encodings",
        Duration::from_secs(60),
        || {
            let (features, dependencies) = (features.clone(), dependencies.clone());
            async move {
                let windows = windows_of(&features)?;
                if read_all(
                    &dependencies,
                    Duration::from_millis(1000),
                    Duration::from_secs(10),
                )?
                .len()
                    < 4
                {
                    return Ok(None);
                }
                let done = ["py-proto", "py-json"].iter().all(|h| {
                    windows
                        .iter()
                        .any(|w| w.entity.as_str() == *h && w.logs.is_some())
                        && windows
                            .iter()
                            .filter(|w| w.entity.as_str() == *h && !w.metrics.is_empty())
                            .count()
                            >= 3
                });
                Ok(done.then_some(windows))
            }
        },
    )
    .await;
    shutdown.cancel();
    stage.await??;
    let windows = waited?;

    // Metrics: the same values whichever encoding carried them.
    let series = |host: &str| {
        let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for w in windows.iter().filter(|w| w.entity.as_str() == host) {
            for (name, stats) in &w.metrics {
                by.entry(name.clone()).or_default().push(stats.last);
            }
        }
        by
    };
    let proto = series("py-proto");
    let json = series("py-json");
    // The counter's data point attribute (route) names its series.
    let requests_series = r#"requests{route="/checkout"}"#;
    for name in [
        requests_series,
        "queue.depth",
        "latency_ms.count",
        "latency_ms.sum",
        "latency_ms.p50",
        "latency_ms.p99",
    ] {
        assert!(proto.contains_key(name), "{name} missing: {proto:?}");
    }
    let n = proto[requests_series]
        .len()
        .min(json[requests_series].len());
    for (name, values) in &proto {
        assert_eq!(
            &values[..n],
            &json[name][..n],
            "{name} differs between otlp_proto and otlp_json"
        );
    }
    // A cumulative counter of 5 per collection, a gauge of 10 per collection, 4 latencies each time.
    assert_eq!(&proto[requests_series][..3], &[5.0, 10.0, 15.0]);
    assert_eq!(&proto["queue.depth"][..3], &[10.0, 20.0, 30.0]);
    assert_eq!(&proto["latency_ms.count"][..3], &[4.0, 8.0, 12.0]);
    assert_eq!(proto["latency_ms.sum"][0], 125.0);
    let requests = windows
        .iter()
        .find(|w| w.entity.as_str() == "py-proto" && w.metrics.contains_key(requests_series))
        .unwrap();
    assert_eq!(requests.metrics[requests_series].count, 1);

    // Logs: counted by severity in the host's window.
    for host in ["py-proto", "py-json"] {
        let logs = windows
            .iter()
            .find_map(|w| {
                (w.entity.as_str() == host)
                    .then_some(w.logs.as_ref())
                    .flatten()
            })
            .unwrap();
        assert_eq!(logs.count, 3, "{host}");
        assert_eq!(logs.by_severity.get(&Severity::Error), Some(&1));
        assert_eq!(logs.by_severity.get(&Severity::Warn), Some(&1));
        assert_eq!(logs.by_severity.get(&Severity::Info), Some(&1));
    }

    // Traces: frontend -> checkout (counted once, from the server span) and frontend -> postgresql.
    let edges: Vec<DependencyEdge> = read_all(
        &topics.dependencies,
        Duration::from_millis(500),
        Duration::from_secs(10),
    )?
    .iter()
    .map(|m| Ok(Event::<DependencyEdge>::from_json(&m.payload)?.data))
    .collect::<anyhow::Result<_>>()?;
    for encoding in ["proto", "json"] {
        let frontend = format!("frontend-{encoding}");
        let mut seen: Vec<(String, u64)> = edges
            .iter()
            .filter(|e| e.caller.as_str() == frontend)
            .map(|e| (e.callee.to_string(), e.calls))
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (format!("checkout-{encoding}"), 1),
                ("postgresql".to_owned(), 1)
            ],
            "{encoding}: {edges:?}"
        );
    }

    // Nothing was rejected.
    let dead = read_all(
        &topics.dead_letters,
        Duration::from_millis(500),
        Duration::from_secs(5),
    )?;
    assert!(
        dead.is_empty(),
        "{:?}",
        dead.iter().map(|d| &d.headers).collect::<Vec<_>>()
    );
    db.drop_db().await
}
