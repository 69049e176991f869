//! End to end against the real broker (tansu, over the Kafka protocol) and the real Postgres.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::Context as _;
use chrono::{DateTime, Duration as Delta, DurationRound as _, Utc};
use foresight::{Config, Stage, kafka::Topics};
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, Event, EventData, EventId, RiskScore,
};
use foresight_tests::{TestDb, config, eventually, produce, producer, read_all, tag};
use tokio_util::sync::CancellationToken;

/// Telemetry for two nodes over 40 minutes: node-a's disk fills toward its 97 % limit, node-b's is
/// steady. Plus two poison records. Returns (key, payload) in production order.
fn telemetry(end: DateTime<Utc>) -> Vec<(String, Vec<u8>)> {
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
            records.push((entity.to_owned(), serde_json::to_vec(&sample).unwrap()));
        }
        if minute == 10 {
            records.push((
                "node-a".into(),
                b"{\"entity\":\"node-a\",\"metric\":\"disk_used_pct\"".to_vec(),
            ));
            records.push((
                "node-b".into(),
                br#"{"entity":"node-b","metric":"disk_used_pct","time":0,"value":"NaN"}"#.to_vec(),
            ));
        }
    }
    records
}

fn test_config(prefix: &str, db: &TestDb) -> Config {
    let mut c = config(prefix, db);
    c.features.window = Duration::from_secs(60);
    c.features.max_out_of_orderness = Duration::from_secs(0);
    c.features.allowed_lateness = Duration::from_secs(0);
    c.scoring.horizon = Duration::from_secs(20 * 60);
    c.scoring.min_history = 10;
    c
}

async fn count(pool: &sqlx::PgPool, view: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {view}")))
            .fetch_one(pool)
            .await?,
    )
}

async fn ids(pool: &sqlx::PgPool, view: &str) -> anyhow::Result<BTreeSet<EventId>> {
    let rows: Vec<uuid::Uuid> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT id FROM {view}")))
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(EventId).collect())
}

fn decode<T: EventData>(topic: &str) -> anyhow::Result<Vec<T>> {
    read_all(topic, Duration::from_secs(3), Duration::from_secs(30))?
        .into_iter()
        .map(|m| Ok(Event::<T>::from_json(&m.payload)?.data))
        .collect()
}

/// Runs `stages` until `done` holds, then stops them gracefully and returns.
/// A run directory's table as events by id: every row's `id` column is its payload's id.
async fn table<T: EventData>(
    dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<BTreeMap<EventId, T>> {
    use datafusion::arrow::array::{Array as _, AsArray as _};
    let batches =
        foresight::replay::sql_batches(dir, &format!("SELECT id, payload FROM {name}")).await?;
    let mut out = BTreeMap::new();
    for b in &batches {
        // Parquet strings may come back as views: cast to plain UTF-8.
        let text = |i: usize| {
            datafusion::arrow::compute::cast(
                b.column(i),
                &datafusion::arrow::datatypes::DataType::Utf8,
            )
        };
        let (ids, payloads) = (text(0)?, text(1)?);
        let (ids, payloads) = (ids.as_string::<i32>(), payloads.as_string::<i32>());
        for i in 0..b.num_rows() {
            let event: T = serde_json::from_str(payloads.value(i))?;
            assert_eq!(
                ids.value(i),
                event.id().to_string(),
                "{name}: id column and payload"
            );
            anyhow::ensure!(
                out.insert(event.id(), event).is_none(),
                "{name}: an id twice"
            );
            assert!(!ids.is_null(i));
        }
    }
    Ok(out)
}

async fn run_until<F, Fut>(
    stages: &[Stage],
    config: &Config,
    what: &str,
    done: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<()>>>,
{
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn({
        let (stages, config, shutdown) = (stages.to_vec(), config.clone(), shutdown.clone());
        async move { foresight::run_stages(&stages, &config, shutdown).await }
    });
    let waited = eventually(what, Duration::from_secs(90), done).await;
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .context("stages did not stop")??;
    waited?;
    stopped?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_to_decision_to_audit_row_exactly_once() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let prefix = format!("e2e-{}", tag());
    let config = test_config(&prefix, &db);
    let topics = Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;

    let now = Utc::now().duration_trunc(Delta::minutes(1))?;
    let records = telemetry(now - Delta::minutes(1));
    let want = foresight_tests::in_process(&config, &records, None)?;
    assert!(
        want.decisions.iter().any(|d| d.entity.as_str() == "node-a"),
        "the scenario must produce a decision: {:?}",
        want.scores.last()
    );
    assert!(
        want.decisions.iter().all(|d| d.entity.as_str() == "node-a"),
        "node-b is healthy"
    );
    let want_decisions: BTreeSet<EventId> = want.decisions.iter().map(EventData::id).collect();
    let want_outcomes: BTreeSet<EventId> = want.outcomes.iter().map(EventData::id).collect();
    let want_scores: BTreeSet<EventId> = want.scores.iter().map(EventData::id).collect();

    produce(&producer()?, &topics.metrics, &records).await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;

    // The whole pipeline, started at once, live: decisions on the topic, rows in Postgres. The
    // fleet stage finds its input partitions empty (or caught up) while the scoring stage is
    // still starting; they hold its rounds back until they have stayed caught up for
    // `runner.idle_grace`, so no round closes without a partition's scores and live equals
    // in-process, ids and content.
    run_until(
        &Stage::ALL,
        &config,
        "decisions and outcomes in Postgres",
        || {
            let pool = pool.clone();
            let (d, o, s) = (
                want_decisions.len() as i64,
                want_outcomes.len() as i64,
                want_scores.len() as i64,
            );
            async move {
                let done = count(&pool, "decisions").await? == d
                    && count(&pool, "outcomes").await? == o
                    && count(&pool, "scores").await? == s;
                Ok(done.then_some(()))
            }
        },
    )
    .await?;

    let live_decisions: Vec<Decision> = decode(&topics.decisions)?;
    let live_ids: BTreeSet<EventId> = live_decisions.iter().map(EventData::id).collect();
    assert_eq!(
        live_ids, want_decisions,
        "live and in-process decisions differ"
    );
    assert_eq!(
        live_decisions.len(),
        want_decisions.len(),
        "a decision was published twice"
    );
    for d in &want.decisions {
        let live = live_decisions.iter().find(|l| l.id() == d.id()).unwrap();
        assert_eq!(live, d, "same id, same content");
    }
    let live_scores: Vec<RiskScore> = decode(&topics.scores)?;
    assert_eq!(
        live_scores
            .iter()
            .map(EventData::id)
            .collect::<BTreeSet<_>>(),
        want_scores
    );
    assert_eq!(ids(&pool, "decisions").await?, want_decisions);
    assert_eq!(ids(&pool, "outcomes").await?, want_outcomes);

    // Poison records: dead letters with the original bytes and the reason in headers.
    let dead = read_all(
        &topics.dead_letters,
        Duration::from_secs(2),
        Duration::from_secs(20),
    )?;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for m in &dead {
        let dl = DeadLetter::from_headers(
            m.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
            m.key.clone(),
            m.payload.clone(),
        )
        .context("dead letter headers")?;
        assert_eq!(dl.source_topic, topics.metrics);
        assert!(
            records.iter().any(|(_, p)| *p == m.payload),
            "original bytes kept"
        );
        assert!(!dl.reason.is_empty());
    }
    let classes: BTreeSet<&str> = dead
        .iter()
        .map(|m| m.headers["foresight.dlq.error_class"].as_str())
        .collect();
    assert_eq!(classes, BTreeSet::from(["invalid_value", "undecodable"]));

    // 1b. `foresight replay --keep-open` of the same input from a file writes the same scores,
    // decisions and outcomes to its run directory's tables: ids and content.
    let replay_dir = tempfile::tempdir()?;
    let input = replay_dir.path().join("telemetry.jsonl");
    let mut text = Vec::new();
    for (_, payload) in &records {
        text.extend_from_slice(payload);
        text.push(b'\n');
    }
    std::fs::write(&input, text)?;
    let options = foresight::replay::ReplayOptions {
        keep_open: true,
        ..Default::default()
    };
    let run = foresight::replay::replay(&config, &[input], &options).await?;
    let run_dir = replay_dir.path().join("run");
    foresight::replay::write_run(&run_dir, &run, None)?;
    let by_id = |events: Vec<RiskScore>| -> BTreeMap<EventId, RiskScore> {
        events.into_iter().map(|e| (e.id(), e)).collect()
    };
    let replayed_scores: BTreeMap<EventId, RiskScore> = table(&run_dir, "scores").await?;
    assert_eq!(
        replayed_scores,
        by_id(live_scores),
        "replayed and live scores differ"
    );
    let replayed_decisions: BTreeMap<EventId, Decision> = table(&run_dir, "decisions").await?;
    let live: BTreeMap<EventId, Decision> =
        live_decisions.iter().map(|d| (d.id(), d.clone())).collect();
    assert_eq!(
        replayed_decisions, live,
        "replayed and live decisions differ"
    );
    let replayed_outcomes: BTreeMap<EventId, ActuationOutcome> =
        table(&run_dir, "outcomes").await?;
    assert_eq!(
        replayed_outcomes.keys().copied().collect::<BTreeSet<_>>(),
        ids(&pool, "outcomes").await?,
        "replayed and live outcome ids differ"
    );
    assert_eq!(run.outputs.dead_letters.len(), 2);

    // 2. Restart over the same input (same consumer groups): nothing is produced or recorded twice.
    let decisions_before = count(&pool, "events").await?;
    let started = std::time::Instant::now();
    run_until(&Stage::ALL, &config, "a quiet restart", || {
        let elapsed = started.elapsed();
        async move { Ok((elapsed > Duration::from_secs(8)).then_some(())) }
    })
    .await?;
    assert_eq!(
        count(&pool, "events").await?,
        decisions_before,
        "rows were added on restart"
    );
    assert_eq!(
        decode::<Decision>(&topics.decisions)?.len(),
        want_decisions.len(),
        "decisions republished on restart"
    );
    assert_eq!(
        decode::<ActuationOutcome>(&topics.outcomes)?.len(),
        want_outcomes.len(),
        "outcomes republished on restart"
    );

    // 3. Reprocess everything from offset 0 (fresh consumer groups): the same ids again, and the
    // audit log, keyed by id, records nothing twice.
    let mut again = config.clone();
    again.kafka.group_prefix = format!("{prefix}-again-");
    let decisions_topic = topics.decisions.clone();
    let n = want_decisions.len();
    run_until(&Stage::ALL, &again, "a full reprocess", || {
        let topic = decisions_topic.clone();
        async move {
            let seen = read_all(&topic, Duration::from_millis(500), Duration::from_secs(5))?.len();
            Ok((seen >= 2 * n).then_some(()))
        }
    })
    .await?;
    let all: Vec<Decision> = decode(&topics.decisions)?;
    assert_eq!(
        all.iter().map(EventData::id).collect::<BTreeSet<_>>(),
        want_decisions,
        "reprocessing made other ids"
    );
    assert_eq!(count(&pool, "decisions").await?, n as i64);
    assert_eq!(count(&pool, "events").await?, decisions_before);
    let dup: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT id FROM events GROUP BY id HAVING count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(dup, 0);

    // Every query of the SQL cookbook runs against this audit log, written by the live pipeline
    // (tests/audit.rs checks that each returns what it should on a log with failures and
    // rollbacks too); those about decisions return rows here.
    let cookbook = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/sql.md"))?;
    let queries: Vec<&str> = cookbook
        .split("```sql")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(queries.len() >= 10);
    for q in queries {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(q.replace("'node-03'", "'node-a'")))
            .fetch_all(&mut *tx)
            .await
            .with_context(|| format!("cookbook query failed:\n{q}"))?;
        tx.rollback().await?;
        if q.trim_start().starts_with("SELECT") && q.contains("FROM decisions") {
            assert!(!rows.is_empty(), "cookbook query returned nothing:\n{q}");
        }
    }
    let v = foresight::audit::verify(&pool).await?;
    assert!(v.rows > 0 && v.breaks.is_empty(), "{v:?}");

    pool.close().await;
    db.drop_db().await
}

/// An input's offset must not be stored until its outputs are acknowledged. The features stage
/// first runs with a producer that cannot deliver its outputs (every message is over its size
/// limit), so it fails after reading input; then the pipeline runs normally. Had offsets been
/// stored on receipt, the first run would have committed past the failed outputs and the windows
/// (and so the decisions) they carried would be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_wait_for_outputs() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let prefix = format!("ack-{}", tag());
    let config = test_config(&prefix, &db);
    let topics = Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;
    let now = Utc::now().duration_trunc(Delta::minutes(1))?;
    let records = telemetry(now - Delta::minutes(1));
    let want = foresight_tests::in_process(&config, &records, None)?;
    produce(&producer()?, &topics.metrics, &records).await?;

    let mut broken = config.clone();
    broken
        .kafka
        .producer
        .insert("message.max.bytes".into(), "1000".into());
    let result = foresight::run_stages(&[Stage::Features], &broken, CancellationToken::new()).await;
    let error = format!(
        "{:#}",
        result.expect_err("outputs cannot be delivered, so the stage must fail")
    );
    assert!(error.contains("not delivered"), "{error}");
    let delivered = read_all(
        &topics.features,
        Duration::from_secs(1),
        Duration::from_secs(5),
    )?
    .len();
    assert!(
        delivered < want.windows.len(),
        "{delivered} of {} windows delivered",
        want.windows.len()
    );

    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    let n = want.decisions.len() as i64;
    assert!(n > 0);
    run_until(
        &Stage::ALL,
        &config,
        "every decision after the failed run",
        || {
            let pool = pool.clone();
            async move { Ok((count(&pool, "decisions").await? == n).then_some(())) }
        },
    )
    .await?;
    assert_eq!(
        ids(&pool, "decisions").await?,
        want.decisions.iter().map(EventData::id).collect()
    );
    pool.close().await;
    db.drop_db().await
}
