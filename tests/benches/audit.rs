//! Recording into the audit log: does the recorder's append (dedup by id, month partitions,
//! hash chain, one transaction per batch) keep up with a bare `COPY` of the same rows into a
//! plain table? And how long does `foresight audit verify` take over the result?
//!
//! `cargo bench -p foresight-tests --bench audit` (Postgres up: `deploy/dev/stack.sh up`) records
//! 200,000 risk-score rows (realistic payloads, in batches of `runner.recorder_batch`, 4 source
//! partitions, written as the recorder writes them: by its per-partition writers), copies the
//! same rows with `COPY ... FROM STDIN` (baseline, one stream), prints both rates and the ratio,
//! then appends until the log holds 1,000,000 rows and times a full verification. Without
//! `--bench` (under `cargo test --benches`) it does the same with 5,000 and 10,000 rows.

use std::{collections::BTreeMap, time::Instant};

use chrono::{Duration, Utc};
use foresight::recorder::{Position, Row, row};
use foresight_events::{Contributor, EntityId, EventId, RiskScore, ScoreMethod};
use foresight_tests::TestDb;

fn rows(from: usize, n: usize) -> Vec<(Row, Position)> {
    let start = Utc::now() - Duration::days(20);
    (from..from + n)
        .map(|i| {
            let entity = format!("node-{:04}", i % 1000);
            let time = start + Duration::seconds((i / 1000) as i64 * 60);
            let p = (i % 97) as f64 / 100.0;
            let score = RiskScore {
                entity: EntityId::new(entity.clone()).unwrap(),
                time,
                window_id: EventId::derive("bench", &[&(i as u64).to_le_bytes()]),
                horizon_seconds: 7200,
                probability: p,
                lower: p * 0.9,
                upper: p,
                time_to_failure_seconds: None,
                health: 100.0 * (1.0 - p),
                band: foresight_scoring::Bands::default().of(p),
                contributors: vec![Contributor {
                    forecast_interval: None,
                    signal: "anomaly".into(),
                    metric: Some("cpu_pct".into()),
                    probability: p,
                    value: 0.5,
                    detail: "cpu_pct = 93.1 is unusual for this series".into(),
                }],
                method: ScoreMethod::Prior,
                model_version: "prior-signals-2+fleet-1".into(),
                signals: [
                    ("anomaly".to_string(), p),
                    ("forecast_breach".to_string(), 0.0),
                ]
                .into(),
                observed: BTreeMap::from([("cpu_pct".to_string(), 93.1)]),
                blast_radius: vec![],
                impact: 1.0,
                rank: None,
            };
            (
                row(score),
                Position {
                    topic: "foresight.scores".into(),
                    partition: (i % 4) as i32,
                    offset: (i / 4) as i64,
                },
            )
        })
        .collect()
}

/// One COPY text-format line (tab separated, backslash-escaped).
fn copy_line(out: &mut String, r: &Row, p: &Position) {
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('\t', "\\t")
            .replace('\n', "\\n")
    };
    out.push_str(&format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
        r.id,
        r.ty,
        esc(&r.entity),
        r.time.to_rfc3339(),
        r.schema_version,
        esc(&r.payload.to_string()),
        p.topic,
        p.partition,
        p.offset
    ));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (n, total) = if full {
        (200_000, 1_000_000)
    } else {
        (5_000, 10_000)
    };
    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    let batch = foresight::config::RunnerConfig::default().recorder_batch;
    let data = rows(0, n);

    // Baseline: a bare COPY of the same rows into a plain table with the same columns.
    sqlx::query(
        "CREATE TABLE bare (id uuid PRIMARY KEY, type text, entity text, event_time timestamptz, \
         schema_version int, payload jsonb, source_topic text, source_partition int, source_offset bigint)",
    )
    .execute(&pool)
    .await?;
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY bare (id, type, entity, event_time, schema_version, payload, source_topic, source_partition, source_offset) FROM STDIN",
        )
        .await?;
    for chunk in data.chunks(batch) {
        let mut text = String::new();
        for (r, p) in chunk {
            copy_line(&mut text, r, p);
        }
        copy.send(text.into_bytes()).await?;
    }
    copy.finish().await?;
    drop(conn);
    let bare = started.elapsed();

    // The recorder's writes, batch by batch as it reads them: each batch split by source
    // partition, each partition's rows (and its offset) in a transaction of its own, by the
    // partition's writer task, the partitions concurrently and each one batch ahead of its
    // writes (as `foresight run recorder` queues them while it reads the next batch).
    let batches: Vec<_> = data
        .chunks(batch)
        .map(|chunk| {
            let mut next = std::collections::HashMap::new();
            for (_, p) in chunk {
                next.insert((p.topic.clone(), p.partition), p.offset + 1);
            }
            (chunk.to_vec(), next)
        })
        .collect();
    let started = Instant::now();
    let mut writers = foresight::recorder::Writers::new(
        pool.clone(),
        "bench",
        1,
        tokio_util::sync::CancellationToken::new(),
    );
    for (rows, next) in batches {
        assert!(writers.submit(rows, &next).await);
    }
    let inserted: u64 = writers.close().await.iter().map(|w| w.inserted).sum();
    let ours = started.elapsed();
    assert_eq!(inserted, n as u64);
    let rate = |d: std::time::Duration| n as f64 / d.as_secs_f64();
    println!(
        "audit append: {n} rows in {:.2}s = {:.0} events/s; bare COPY {:.2}s = {:.0} rows/s; ratio {:.2}",
        ours.as_secs_f64(),
        rate(ours),
        bare.as_secs_f64(),
        rate(bare),
        rate(ours) / rate(bare)
    );

    // Grow the log, then verify every chain.
    let mut have = n;
    while have < total {
        let more = rows(have, (total - have).min(50_000));
        for chunk in more.chunks(5000) {
            let mut tx = pool.begin().await?;
            foresight::audit::append(&mut tx, chunk).await?;
            tx.commit().await?;
        }
        have += more.len();
    }
    let started = Instant::now();
    let v = foresight::audit::verify(&pool).await?;
    let took = started.elapsed();
    assert_eq!(v.rows, total as u64);
    assert!(v.breaks.is_empty(), "{:?}", v.breaks);
    println!(
        "audit verify: {} rows in {} chains in {:.1}s ({:.0} rows/s)",
        v.rows,
        v.chains,
        took.as_secs_f64(),
        v.rows as f64 / took.as_secs_f64()
    );
    pool.close().await;
    db.drop_db().await
}
