//! Operating Foresight, against the real broker and Postgres: the `foresight` binary's health
//! endpoints, its Prometheus metrics, its traces (W3C trace context through Kafka headers, OTLP
//! export), its JSON logs, and the first-run commands (`init`, `simulate`, `tail`).
//!
//! No OpenTelemetry Collector can be installed here, so the OTLP/HTTP receiver is a small server
//! in the test that decodes what it receives with opentelemetry-proto, as a collector would.

use std::{
    collections::BTreeSet,
    io::Read as _,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Duration as Delta, DurationRound as _, Utc};
use foresight::{Config, kafka::Topics, telemetry::trace_id_of};
use foresight_tests::{TestDb, eventually, read_all, tag};
use opentelemetry_proto::tonic::collector::{
    metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest,
};
use prost::Message as _;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What the OTLP/HTTP receiver got: (path, headers, body) per request.
type Received = Arc<Mutex<Vec<(String, Vec<(String, String)>, Vec<u8>)>>>;

/// A minimal OTLP/HTTP receiver: accepts every POST, keeps it, answers 200 with an empty
/// (protobuf) export response.
async fn otlp_receiver() -> anyhow::Result<(SocketAddr, Received)> {
    let received: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let store = received.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let headers = headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_owned(),
                            v.to_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect();
                store
                    .lock()
                    .unwrap()
                    .push((uri.path().to_owned(), headers, body.to_vec()));
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        },
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((address, received))
}

/// GET `url`: (status, body); `None` while nothing listens.
async fn get(url: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .ok()?;
    let r = client.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

/// The e2e scenario: node-a's disk fills toward its limit, node-b's is steady, two poison
/// records; each message starts its own trace (`traceparent`), whose ids are returned.
fn telemetry(end: DateTime<Utc>) -> Vec<(String, Vec<u8>, String)> {
    let start = end - Delta::minutes(40);
    let mut records = Vec::new();
    for minute in 0..40 {
        let t = start + Delta::minutes(minute);
        let wiggle = ((minute * 7919) % 13) as f64 / 13.0 - 0.5;
        for (entity, value) in [
            ("node-a", 50.0 + 1.1 * minute as f64 + wiggle),
            ("node-b", 40.0 + wiggle),
        ] {
            let sample = serde_json::json!({
                "entity": entity, "metric": "disk_used_pct", "time": t.to_rfc3339(), "value": value,
            });
            records.push((
                entity.to_owned(),
                serde_json::to_vec(&sample).unwrap(),
                foresight::telemetry::new_traceparent(),
            ));
        }
        if minute == 10 {
            records.push((
                "node-a".into(),
                b"{\"entity\":\"node-a\",\"metric\":\"disk_used_pct\"".to_vec(),
                foresight::telemetry::new_traceparent(),
            ));
        }
    }
    records
}

const CONFIG: &str = r#"
[features]
window = "1m"
max_out_of_orderness = "0s"
allowed_lateness = "0s"
[scoring]
horizon = "20m"
min_history = 10
[runner]
commit_interval = "200ms"
[observability]
trace_sample_ratio = 1.0
metrics_interval = "1s"
stall_after = "30s"
"#;

fn start_pipeline(
    dir: &std::path::Path,
    prefix: &str,
    url: &str,
    listen: &str,
    otlp: &str,
) -> anyhow::Result<Child> {
    let file = dir.join("foresight.toml");
    std::fs::write(&file, CONFIG)?;
    Ok(Command::new(foresight_tests::binary()?)
        .args(["--log-format", "json", "--config"])
        .arg(&file)
        .args(["run", "all"])
        .env("FORESIGHT_KAFKA__BROKERS", foresight_tests::brokers())
        .env("FORESIGHT_KAFKA__TOPIC_PREFIX", format!("{prefix}."))
        .env("FORESIGHT_KAFKA__GROUP_PREFIX", format!("{prefix}-"))
        .env("FORESIGHT_POSTGRES__URL", url)
        .env("FORESIGHT_OBSERVABILITY__LISTEN", listen)
        .env("FORESIGHT_OBSERVABILITY__OTLP_ENDPOINT", otlp)
        .env(
            "FORESIGHT_OBSERVABILITY__OTLP_HEADERS__X_API_KEY",
            SECRET_HEADER,
        )
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// A password in the database URL (trust authentication ignores it) and an OTLP API key: neither
/// may appear in the logs.
const SECRET_PASSWORD: &str = "pw-5ecr3t-never-logged";
const SECRET_HEADER: &str = "key-5ecr3t-never-logged";

fn stop(mut child: Child) -> anyhow::Result<String> {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let started = std::time::Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill()?;
            bail!("the pipeline did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut logs = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut logs)?;
    Ok(logs)
}

/// The value of the first sample of `metric` whose labels include all of `labels`.
fn sample(metrics: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_run_is_ready_observable_traced_and_logs_no_secret() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let prefix = format!("ops-{}", tag());
    let url = db
        .url
        .replacen("postgres@", &format!("postgres:{SECRET_PASSWORD}@"), 1);
    let port = free_port()?;
    let (otlp, received) = otlp_receiver().await?;
    let dir = tempfile::tempdir()?;
    let child = start_pipeline(
        dir.path(),
        &prefix,
        &url,
        &format!("127.0.0.1:{port}"),
        &format!("http://{otlp}"),
    )?;
    let base = format!("http://127.0.0.1:{port}");
    let result = async {
        // Alive at once; ready only once broker, database and every stage's partitions are there.
        let saw_unready: Arc<Mutex<Option<String>>> = Arc::default();
        let ready = eventually("/readyz 200", Duration::from_secs(90), || {
            let (base, saw) = (base.clone(), saw_unready.clone());
            async move {
                match get(&format!("{base}/readyz")).await {
                    Some((503, body)) => {
                        saw.lock().unwrap().get_or_insert(body);
                        Ok(None)
                    }
                    Some((200, body)) => Ok(Some(body)),
                    Some((status, body)) => bail!("/readyz {status}: {body}"),
                    None => Ok(None),
                }
            }
        })
        .await?;
        let unready = saw_unready
            .lock()
            .unwrap()
            .clone()
            .context("/readyz was never 503 before it was ready")?;
        let unready: serde_json::Value = serde_json::from_str(&unready)?;
        assert_eq!(unready["ready"], false);
        assert!(
            unready["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["ok"] == false),
            "{unready}"
        );
        let ready: serde_json::Value = serde_json::from_str(&ready)?;
        let checks: Vec<&str> = ready["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(checks.contains(&"broker") && checks.contains(&"database"));
        assert!(checks.contains(&"stage features") && checks.contains(&"stage recorder"));
        assert_eq!(
            get(&format!("{base}/healthz")).await.map(|r| r.0),
            Some(200)
        );

        // Telemetry, each message in its own trace.
        let topics = Topics::new(&format!("{prefix}."));
        let now = Utc::now().duration_trunc(Delta::minutes(1))?;
        let records = telemetry(now - Delta::minutes(1));
        let producer = foresight_tests::producer()?;
        let mut telemetry_traces = BTreeSet::new();
        for (key, payload, traceparent) in &records {
            telemetry_traces.insert(trace_id_of(traceparent).unwrap().to_owned());
            let headers = OwnedHeaders::new().insert(Header {
                key: "traceparent",
                value: Some(traceparent.as_str()),
            });
            producer
                .send(
                    FutureRecord::to(&topics.metrics)
                        .key(key)
                        .payload(payload)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)?;
        }

        // Decisions arrive, each with a traceparent leading back to the window that caused it,
        // and that window's to the telemetry message that closed it.
        let decisions = eventually("decisions", Duration::from_secs(120), || {
            let topic = topics.decisions.clone();
            async move {
                let read = read_all(&topic, Duration::from_secs(1), Duration::from_secs(10))?;
                Ok((!read.is_empty()).then_some(read))
            }
        })
        .await?;
        let windows = read_all(
            &topics.features,
            Duration::from_secs(2),
            Duration::from_secs(30),
        )?;
        let window_traces: BTreeSet<String> = windows
            .iter()
            .map(|w| {
                trace_id_of(&w.headers["traceparent"])
                    .expect("every window has a traceparent")
                    .to_owned()
            })
            .collect();
        assert!(
            window_traces.is_subset(&telemetry_traces),
            "each window is in the trace of a telemetry message"
        );
        let mut decision_traces = BTreeSet::new();
        for d in &decisions {
            let traceparent = d
                .headers
                .get("traceparent")
                .context("a decision's traceparent")?;
            let trace = trace_id_of(traceparent).context("well-formed")?.to_owned();
            assert!(
                window_traces.contains(&trace),
                "decision trace {trace} is a window's trace"
            );
            decision_traces.insert(trace);
        }

        // Metrics after the run: throughput, lag, latency, dead letters.
        let produced = records.len() as f64;
        let metrics = eventually("metrics", Duration::from_secs(30), || {
            let base = base.clone();
            async move {
                let Some((200, text)) = get(&format!("{base}/metrics")).await else {
                    return Ok(None);
                };
                let ready = sample(&text, "foresight_messages_total", &["stage=\"features\""])
                    .is_some_and(|n| n >= produced)
                    && sample(
                        &text,
                        "foresight_dead_letters_total",
                        &["reason=\"undecodable\""],
                    )
                    .is_some_and(|n| n >= 1.0)
                    && sample(&text, "foresight_consumer_lag", &["stage=\"features\""]).is_some()
                    // The actuator's outcomes of the decisions, by actuator and outcome.
                    && sample(&text, "foresight_actuations_total", &["outcome="])
                        .is_some_and(|n| n >= 1.0);
                Ok(ready.then_some(text))
            }
        })
        .await?;
        let latency_count = sample(
            &metrics,
            "foresight_processing_latency_seconds_count",
            &["stage=\"allocator\""],
        )
        .context("allocator latency histogram")?;
        assert!(latency_count >= decisions.len() as f64, "{metrics}");
        assert!(
            sample(
                &metrics,
                "foresight_processing_latency_seconds_bucket",
                &["stage=\"allocator\"", "le=\"+Inf\""]
            )
            .is_some()
        );
        assert!(
            sample(
                &metrics,
                "foresight_partitions_assigned",
                &["stage=\"recorder\""]
            )
            .is_some()
        );
        assert!(
            sample(
                &metrics,
                "foresight_outputs_in_flight",
                &["stage=\"features\""]
            )
            .is_some()
        );
        assert_eq!(
            sample(&metrics, "foresight_stalls_total", &["stage=\"scoring\""]),
            Some(0.0),
            "{metrics}"
        );
        assert!(
            sample(
                &metrics,
                "foresight_model_refits_total",
                &["stage=\"scoring\""]
            )
            .is_some()
        );
        assert!(
            sample(&metrics, "foresight_events_total", &["stage=\"allocator\""])
                .is_some_and(|n| n >= 1.0)
        );

        // OTLP: spans of the decisions' traces and the metrics reached the receiver.
        eventually(
            "OTLP spans of a decision's trace",
            Duration::from_secs(30),
            || {
                let (received, decision_traces) = (received.clone(), decision_traces.clone());
                async move {
                    let got = received.lock().unwrap().clone();
                    let mut traces = BTreeSet::new();
                    for (path, _, body) in got.iter().filter(|(p, _, _)| p == "/v1/traces") {
                        let request = ExportTraceServiceRequest::decode(body.as_slice())
                            .with_context(|| format!("decoding {path}"))?;
                        for span in request
                            .resource_spans
                            .iter()
                            .flat_map(|r| &r.scope_spans)
                            .flat_map(|s| &s.spans)
                            .filter(|s| s.name == "stage.process")
                        {
                            let id: String =
                                span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                            traces.insert(id);
                        }
                    }
                    Ok(decision_traces
                        .iter()
                        .any(|t| traces.contains(t))
                        .then_some(()))
                }
            },
        )
        .await?;
        let got = received.lock().unwrap().clone();
        let mut metric_names = BTreeSet::new();
        for (_, headers, body) in got.iter().filter(|(p, _, _)| p == "/v1/metrics") {
            let request = ExportMetricsServiceRequest::decode(body.as_slice())?;
            metric_names.extend(
                request
                    .resource_metrics
                    .iter()
                    .flat_map(|r| &r.scope_metrics)
                    .flat_map(|s| &s.metrics)
                    .map(|m| m.name.clone()),
            );
            assert!(
                headers
                    .iter()
                    .any(|(k, v)| k == "x_api_key" && v == SECRET_HEADER),
                "the configured OTLP header is sent: {headers:?}"
            );
        }
        for name in [
            foresight::telemetry::names::MESSAGES,
            foresight::telemetry::names::PROCESSING_LATENCY,
            foresight::telemetry::names::DEAD_LETTERS,
        ] {
            assert!(
                metric_names.contains(name),
                "{name} exported: {metric_names:?}"
            );
        }
        anyhow::Ok(())
    }
    .await;
    let logs = stop(child)?;
    result.with_context(|| format!("logs:\n{}", tail(&logs)))?;

    // Structured logs: one JSON object per line, and no secret anywhere.
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 5, "{logs}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(
        !logs.contains(SECRET_PASSWORD),
        "the database password was logged"
    );
    assert!(!logs.contains(SECRET_HEADER), "the OTLP API key was logged");
    db.drop_db().await
}

fn tail(logs: &str) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn foresight(args: &[&str], brokers: &str, prefix: &str) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(foresight_tests::binary()?)
        .args(args)
        .env("FORESIGHT_KAFKA__BROKERS", brokers)
        .env("FORESIGHT_KAFKA__TOPIC_PREFIX", format!("{prefix}."))
        .env("FORESIGHT_KAFKA__GROUP_PREFIX", format!("{prefix}-"))
        .env("RUST_LOG", "warn")
        .output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_feeds_the_pipeline_and_tail_shows_its_scores_and_decisions() -> anyhow::Result<()>
{
    // A broker of this test's own: the simulator, the whole pipeline and the tail clients
    // together outran the shared test broker (tansu on sqlite) on 2 cores, which then left the
    // simulator's samples unacknowledged for over a minute. Memory storage keeps up; this test
    // never restarts a consumer, so its fetches always start at batch boundaries (see
    // docs/reliability.md on tansu's memory storage).
    let broker_dir = tempfile::tempdir()?;
    let mut broker = foresight_tests::faults::Tansu::in_memory(broker_dir.path())?;
    broker.start().await?;
    let brokers = broker.address();
    let db = TestDb::create().await?;
    let prefix = format!("sim-{}", tag());
    let mut config: Config = foresight_tests::config(&prefix, &db);
    config.kafka.brokers = brokers.clone();
    // A shorter window than the default, so the simulated hours close windows quickly.
    config.features.window = Duration::from_secs(5 * 60);
    foresight::kafka::create_topics(&config.kafka, &Topics::new(&config.kafka.topic_prefix))
        .await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let pipeline = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move { foresight::run_stages(&foresight::Stage::ALL, &config, shutdown).await }
    });
    let result = async {
        // 12 simulated hours of backfill for a 10-node fleet, then live samples, at up to 4,000 a
        // second for 9 s (over 12,000 samples in all).
        let out = tokio::task::spawn_blocking({
            let (prefix, brokers) = (prefix.clone(), brokers.clone());
            move || {
                foresight(
                    &[
                        "simulate",
                        "--rate",
                        "4000",
                        "--duration",
                        "9s",
                        "--backfill",
                        "12h",
                    ],
                    &brokers,
                    &prefix,
                )
            }
        })
        .await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let produced: u64 = stdout
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("simulate said {stdout:?}"))?;
        assert!(produced > 12_000, "{stdout}");

        for (what, min) in [("scores", 10), ("decisions", 1)] {
            let lines = eventually(what, Duration::from_secs(240), || {
                let (prefix, brokers) = (prefix.clone(), brokers.clone());
                async move {
                    let out = tokio::task::spawn_blocking(move || {
                        foresight(&["tail", what, "--from-beginning"], &brokers, &prefix)
                    })
                    .await??;
                    // A failed tail (the broker slower than tail's own patience while the
                    // pipeline writes to it) is "not yet"; its error is what a time-out reports.
                    if !out.status.success() {
                        eprintln!("tail {what}: {}", String::from_utf8_lossy(&out.stderr));
                        return Ok(None);
                    }
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
                    Ok((lines.len() >= min).then_some(lines))
                }
            })
            .await?;
            for line in &lines {
                assert!(
                    line.contains(" P=") && line.contains(" trace="),
                    "{what}: {line}"
                );
                assert!(!line.contains("undecodable"), "{line}");
            }
        }
        // --json prints the events themselves; --last bounds the start.
        let out = foresight(
            &["tail", "decisions", "--last", "1", "--json"],
            &brokers,
            &prefix,
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // One per partition at most: decisions written after the command started are not
        // part of `--last 1` (the pipeline may still be deciding).
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            !lines.is_empty() && lines.len() <= config.kafka.partitions as usize,
            "{} lines for {} partitions: {text}",
            lines.len(),
            config.kafka.partitions
        );
        for line in lines {
            let event: serde_json::Value = serde_json::from_str(line)?;
            assert_eq!(
                event["type"].as_str().map(|t| t.contains("decision")),
                Some(true),
                "{event}"
            );
        }
        anyhow::Ok(())
    }
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), pipeline)
        .await
        .context("the pipeline did not stop")???;
    result?;
    db.drop_db().await
}

#[test]
fn errors_say_what_to_do_next() -> anyhow::Result<()> {
    // Nothing listens on port 1.
    let out = Command::new(foresight_tests::binary()?)
        .args(["tail", "decisions"])
        .env("FORESIGHT_KAFKA__BROKERS", "127.0.0.1:1")
        .env("RUST_LOG", "off")
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("deploy/dev/stack.sh up"), "{stderr}");

    let out = Command::new(foresight_tests::binary()?)
        .args(["--config", "/nonexistent/foresight.toml", "config", "check"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("file not found"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn init_writes_a_starter_the_loaders_accept_and_never_overwrites() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (scenario, _, _) in foresight::init::SCENARIOS {
        let target = dir.path().join(scenario);
        let out = Command::new(foresight_tests::binary()?)
            .args(["init", "--scenario", scenario])
            .arg(&target)
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = target.join("foresight.toml");
        let text = std::fs::read_to_string(&file)?;
        assert!(text.starts_with("# Starter configuration"), "commented");
        // The real loaders: configuration (every key checked), then every processor, the
        // allocator with the scenario's policy.
        let config = Config::load(Some(&file)).map_err(|e| anyhow::anyhow!("{e}"))?;
        let policy = config
            .allocator
            .policy_file
            .clone()
            .context("the starter names its policy")?;
        assert_eq!(
            policy,
            target.join("policies").join(format!("{scenario}.yaml"))
        );
        foresight::pipeline::Processors::new(&config)?;
        let out = Command::new(foresight_tests::binary()?)
            .args(["policy", "check"])
            .arg(&policy)
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // A second init refuses, and says how to overwrite.
        let again = Command::new(foresight_tests::binary()?)
            .args(["init", "--scenario", scenario])
            .arg(&target)
            .output()?;
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
        let forced = Command::new(foresight_tests::binary()?)
            .args(["init", "--force", "--scenario", scenario])
            .arg(&target)
            .output()?;
        assert!(forced.status.success());
    }
    let unknown = Command::new(foresight_tests::binary()?)
        .args(["init", "--scenario", "nope"])
        .arg(dir.path())
        .output()?;
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("instances"));
    Ok(())
}
