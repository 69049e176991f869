//! The audit log against the real Postgres: hash chains that expose edits, removals and
//! insertions; roles that can only append or only read; monthly partitions; and every query of
//! the SQL cookbook run against a populated log.

use std::collections::BTreeMap;

use anyhow::Context as _;
use chrono::{DateTime, Duration, Utc};
use foresight::recorder::{Position, Row, row};
use foresight_events::{
    Action, ActionKind, ActuationOutcome, Contributor, Decision, EntityId, EventData,
    FailureReport, OutcomeStatus, RiskScore, ScoreMethod,
};
use foresight_tests::{TestDb, postgres_server};
use sqlx::{Connection, PgConnection, PgPool};

fn id(s: &str) -> EntityId {
    EntityId::new(s).unwrap()
}

fn score(entity: &str, time: DateTime<Utc>, p: f64) -> RiskScore {
    RiskScore {
        entity: id(entity),
        time,
        window_id: foresight_events::EventId::derive(
            "w",
            &[entity.as_bytes(), &time.timestamp().to_le_bytes()],
        ),
        horizon_seconds: 7200,
        probability: p,
        lower: p * 0.9,
        upper: (p * 1.1).min(1.0),
        time_to_failure_seconds: (p > 0.7).then_some(3600),
        health: 100.0 * (1.0 - p),
        band: foresight_scoring::Bands::default().of(p),
        contributors: vec![Contributor {
            forecast_interval: None,
            signal: "forecast_breach".into(),
            metric: Some("disk_used_pct".into()),
            probability: p,
            value: 97.0,
            detail: "disk_used_pct reaches 97 in 1h".into(),
        }],
        method: ScoreMethod::Prior,
        model_version: "prior-signals-2+fleet-1".into(),
        signals: BTreeMap::new(),
        observed: BTreeMap::new(),
        blast_radius: vec![],
        impact: 1.5,
        rank: None,
    }
}

fn decision(s: &RiskScore, kind: ActionKind, rule: &str) -> Decision {
    Decision {
        entity: s.entity.clone(),
        time: s.time,
        score_id: s.id(),
        probability: s.probability,
        interval: [s.lower, s.upper],
        band: s.band,
        policy: "default".into(),
        rule: rule.into(),
        action: Action {
            kind,
            target: s.entity.clone(),
            params: Default::default(),
        },
        reason: format!("{} risk", s.band.as_str()),
        expected_effect: "moves work away".into(),
        inverse: None,
        alternatives: vec![],
    }
}

fn outcome(d: &Decision, status: OutcomeStatus, detail: &str) -> ActuationOutcome {
    ActuationOutcome {
        decision_id: d.id(),
        entity: d.entity.clone(),
        time: d.time + Duration::seconds(5),
        actuator: "webhook".into(),
        status,
        action: d.action.clone(),
        detail: detail.into(),
    }
}

/// A small fleet's log over two months: node-03 fails after being warned (hit), node-05's risk is
/// acted on and nothing fails (prevented?), node-07 is warned, nothing is applied, nothing fails
/// (false alarm), node-09 fails unwarned (miss); one action is rolled back.
fn log(now: DateTime<Utc>) -> Vec<(Row, Position)> {
    let mut rows = Vec::new();
    let mut at = |topic: &str, r: Row| {
        let offset = rows.len() as i64;
        rows.push((
            r,
            Position {
                topic: topic.into(),
                partition: (offset % 2) as i32,
                offset,
            },
        ));
    };
    let old = now - Duration::days(40);
    for (entity, t, p) in [
        ("node-03", now - Duration::hours(3), 0.05),
        ("node-03", now - Duration::hours(2), 0.92),
        ("node-05", now - Duration::hours(5), 0.85),
        ("node-07", now - Duration::hours(4), 0.75),
        ("node-09", now - Duration::hours(6), 0.02),
        ("node-11", old, 0.95),
        ("node-15", now - Duration::hours(2), 0.9),
    ] {
        let s = score(entity, t, p);
        at("scores", row(s.clone()));
        if p > 0.7 {
            let mut d = decision(&s, ActionKind::Migrate, "migrate-high-risk");
            if entity == "node-15" {
                // In the randomised hold-out: nothing done, propensity recorded.
                d.action.kind = ActionKind::NoOp;
                d.action.params = [
                    ("holdout".to_string(), serde_json::json!(true)),
                    ("propensity".to_string(), serde_json::json!(0.05)),
                ]
                .into();
            }
            at("decisions", row(d.clone()));
            let o = match entity {
                "node-03" | "node-05" => outcome(&d, OutcomeStatus::Applied, "200 OK"),
                "node-11" => outcome(
                    &d,
                    OutcomeStatus::RolledBack,
                    "health got worse: rolled back",
                ),
                _ => outcome(&d, OutcomeStatus::DryRun, "shadow mode"),
            };
            at("outcomes", row(o));
        }
    }
    for (entity, t) in [
        ("node-03", now - Duration::minutes(50)),
        ("node-09", now - Duration::hours(1)),
        ("node-15", now - Duration::minutes(70)),
    ] {
        at(
            "failures",
            row(FailureReport {
                entity: id(entity),
                time: t,
                kind: "disk_full".into(),
                detail: String::new(),
            }),
        );
    }
    rows
}

async fn append(pool: &PgPool, rows: &[(Row, Position)]) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await?;
    let n = foresight::audit::append(&mut tx, rows).await?;
    tx.commit().await?;
    Ok(n)
}

async fn as_role(db: &TestDb, role: &str) -> anyhow::Result<PgConnection> {
    let url = format!(
        "{}/{}",
        postgres_server().replace("postgres@", &format!("{role}@")),
        db.name
    );
    PgConnection::connect(&url)
        .await
        .with_context(|| format!("connecting as {role}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_is_chained_partitioned_guarded_and_answers_the_cookbook()
-> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    let now = Utc::now();
    let rows = log(now);
    let (first, second) = rows.split_at(rows.len() / 2);
    assert_eq!(append(&pool, first).await?, first.len() as u64);
    // The first half redelivered with the second: only the second half is new.
    assert_eq!(append(&pool, &rows).await?, second.len() as u64);
    // Redelivered (and repeated within a batch): nothing twice, chains intact.
    let mut again = rows.clone();
    again.extend(rows[..3].iter().cloned());
    assert_eq!(append(&pool, &again).await?, 0);
    let v = foresight::audit::verify(&pool).await?;
    assert_eq!(v.rows, rows.len() as u64);
    assert!(v.breaks.is_empty(), "{:?}", v.breaks);
    assert!(v.chains >= 4);

    // Monthly partitions: this month's and the one 40 days back, and nothing in the default.
    let partitions: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'events'::regclass ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    let month = |t: DateTime<Utc>| format!("events_{}", t.format("%Y_%m"));
    let names: Vec<&str> = partitions.iter().map(|p| p.0.as_str()).collect();
    assert!(names.contains(&month(now).as_str()), "{names:?}");
    assert!(
        names.contains(&month(now - Duration::days(40)).as_str()),
        "{names:?}"
    );
    let (in_default,): (i64,) = sqlx::query_as("SELECT count(*) FROM events_default")
        .fetch_one(&pool)
        .await?;
    assert_eq!(in_default, 0);

    // The writer appends and reads; it can neither change nor remove.
    let mut writer = as_role(&db, "foresight_writer").await?;
    let err = sqlx::query("UPDATE events SET entity = 'x'")
        .execute(&mut writer)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
    assert!(
        sqlx::query("DELETE FROM events")
            .execute(&mut writer)
            .await
            .is_err()
    );
    assert!(
        sqlx::query("TRUNCATE events")
            .execute(&mut writer)
            .await
            .is_err()
    );
    let later = score("node-13", now, 0.5);
    let mut tx = writer.begin().await?;
    let n = foresight::audit::append(
        &mut tx,
        &[(
            row(later),
            Position {
                topic: "scores".into(),
                partition: 0,
                offset: 99,
            },
        )],
    )
    .await?;
    tx.commit().await?;
    assert_eq!(n, 1, "the writer appends");
    writer.close().await?;
    // Even the owner cannot change rows: the triggers refuse.
    let err = sqlx::query("DELETE FROM events")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");

    // The reader reads, with a statement timeout, and cannot write.
    let mut reader = as_role(&db, "foresight_reader").await?;
    let (timeout,): (String,) = sqlx::query_as("SHOW statement_timeout")
        .fetch_one(&mut reader)
        .await?;
    assert_eq!(timeout, "30s");
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM decision_outcomes")
        .fetch_one(&mut reader)
        .await?;
    assert!(n > 0);
    assert!(
        sqlx::query("INSERT INTO audit_chain_heads VALUES ('x', 0, '\\x')")
            .execute(&mut reader)
            .await
            .is_err()
    );
    reader.close().await?;

    // The verdicts of decision_outcomes.
    let verdicts: Vec<(String, String)> =
        sqlx::query_as("SELECT entity, verdict FROM decision_outcomes ORDER BY entity, verdict")
            .fetch_all(&pool)
            .await?;
    let verdicts: Vec<(&str, &str)> = verdicts
        .iter()
        .map(|(e, v)| (e.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        verdicts,
        [
            ("node-03", "hit"),
            ("node-05", "prevented?"),
            ("node-07", "false_alarm"),
            ("node-09", "miss"),
            ("node-11", "false_alarm"),
            ("node-15", "hit"),
        ]
    );

    // Every cookbook query runs; every read over the log above returns something. (Queries over
    // the failure model's tables are run by the training test, which records models.)
    let cookbook = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/sql.md"))?;
    let queries: Vec<&str> = cookbook
        .split("```sql")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert!(queries.len() >= 10, "{} queries", queries.len());
    for q in queries {
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(q.to_owned()))
            .fetch_all(&mut *tx)
            .await
            .with_context(|| format!("cookbook query failed:\n{q}"))?;
        tx.rollback().await?;
        let reads = q.trim_start().starts_with("SELECT") || q.trim_start().starts_with("WITH");
        if reads && !q.contains("model") {
            assert!(!rows.is_empty(), "cookbook query returned nothing:\n{q}");
        }
    }

    // Tampering shows: an edited payload, then a removed row, each named by verify.
    let edit = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await?;
            sqlx::query("ALTER TABLE events DISABLE TRIGGER events_append_only")
                .execute(&mut *tx)
                .await?;
            sqlx::query(sql).execute(&mut *tx).await?;
            sqlx::query("ALTER TABLE events ENABLE TRIGGER events_append_only")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            anyhow::Ok(())
        }
    };
    let (chain, seq): (String, i64) =
        sqlx::query_as("SELECT chain, seq FROM events WHERE type = 'foresight.decision' ORDER BY chain, seq LIMIT 1")
            .fetch_one(&pool)
            .await?;
    edit("UPDATE events SET payload = jsonb_set(payload, '{probability}', '0.01') WHERE id = (SELECT id FROM events WHERE type = 'foresight.decision' ORDER BY chain, seq LIMIT 1)").await?;
    let v = foresight::audit::verify(&pool).await?;
    assert_eq!(v.breaks.len(), 1, "{:?}", v.breaks);
    assert_eq!(
        (v.breaks[0].chain.as_str(), v.breaks[0].seq),
        (chain.as_str(), seq)
    );
    assert!(v.breaks[0].reason.contains("edited"), "{}", v.breaks[0]);

    let (chain2, seq2): (String, i64) = sqlx::query_as(
        "SELECT chain, seq FROM events WHERE chain <> $1 AND seq = 2 ORDER BY chain LIMIT 1",
    )
    .bind(&chain)
    .fetch_one(&pool)
    .await?;
    assert_eq!(seq2, 2);
    edit("DELETE FROM events WHERE (chain, seq) = (SELECT chain, seq FROM events WHERE chain <> (SELECT chain FROM events WHERE type = 'foresight.decision' ORDER BY chain, seq LIMIT 1) AND seq = 2 ORDER BY chain LIMIT 1)").await?;
    let v = foresight::audit::verify(&pool).await?;
    let broken: Vec<(&str, i64)> = v.breaks.iter().map(|b| (b.chain.as_str(), b.seq)).collect();
    assert!(broken.contains(&(chain2.as_str(), 2)), "{:?}", v.breaks);
    assert_eq!(v.breaks.len(), 2);

    pool.close().await;
    db.drop_db().await?;
    Ok(())
}

/// A random JSON value with the shapes that make text forms differ: numbers with exponents, large
/// and tiny floats, negative zero, extreme integers, control and non-ASCII characters in strings
/// and keys, keys of different lengths, nesting.
fn random_json(rng: &mut impl rand::Rng, depth: u32) -> serde_json::Value {
    use serde_json::Value;
    fn string(rng: &mut impl rand::Rng) -> String {
        const PIECES: &[&str] = &[
            "a",
            "zz",
            "é",
            "\u{1f600}",
            "\"",
            "\\",
            "\n",
            "\t",
            "\r",
            "\u{8}",
            "\u{c}",
            "\u{1}",
            "\u{1f}",
            "\u{7f}",
            "/",
            "x y",
            "\\u0041",
            "",
            "日本",
        ];
        (0..rng.gen_range(0..6))
            .map(|_| PIECES[rng.gen_range(0..PIECES.len())])
            .collect()
    }
    match rng.gen_range(0..if depth == 0 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.r#gen()),
        2 => Value::from(rng.r#gen::<i64>() >> rng.gen_range(0..63)),
        3 => Value::from(
            [u64::MAX, i64::MIN as u64, 0, 10_000_000_000_000_000_000][rng.gen_range(0..4)],
        ),
        4 => {
            let f = match rng.gen_range(0..6) {
                0 => rng.r#gen::<f64>(),
                1 => rng.r#gen::<f64>() * 10f64.powi(rng.gen_range(-300..300)),
                2 => -rng.r#gen::<f64>() * 10f64.powi(rng.gen_range(-30..30)),
                3 => [
                    -0.0,
                    0.0,
                    1.0,
                    1e16,
                    1e17,
                    1e19,
                    1e20,
                    1e-7,
                    5e-324,
                    f64::MAX,
                ][rng.gen_range(0..10)],
                4 => f64::from(rng.gen_range(-1000..1000)),
                _ => f64::from_bits(rng.r#gen::<u64>() & 0x7fef_ffff_ffff_ffff),
            };
            serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        5 => Value::String(string(rng)),
        6 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.gen_range(0..5))
                .map(|_| (string(rng), random_json(rng, depth - 1)))
                .collect(),
        ),
    }
}

/// The recorder computes each row's digest itself (so every payload crosses the wire once); it
/// must be exactly what Postgres computes from the stored row, or `verify` would call honest rows
/// edited. Checked against the real server: the jsonb text form on 2,000 random values, and
/// whole rows with random payloads appended and verified.
#[tokio::test(flavor = "multi_thread")]
async fn digests_computed_by_the_recorder_are_those_postgres_computes() -> anyhow::Result<()> {
    use rand::SeedableRng as _;
    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let values: Vec<serde_json::Value> = (0..2000).map(|_| random_json(&mut rng, 3)).collect();
    let texts: Vec<String> = sqlx::query_scalar(
        "SELECT v::text FROM UNNEST($1::jsonb[]) WITH ORDINALITY AS u(v, ord) ORDER BY ord",
    )
    .bind(values.iter().map(sqlx::types::Json).collect::<Vec<_>>())
    .fetch_all(&pool)
    .await?;
    for (v, text) in values.iter().zip(&texts) {
        assert_eq!(&foresight::audit::jsonb_text(v), text, "for {v}");
    }

    // Whole rows: odd times (sub-microsecond, before 2000, far future), odd entities and topics.
    let times = [
        Utc::now(),
        DateTime::from_timestamp_nanos(1_700_000_000_123_456_789),
        DateTime::from_timestamp_nanos(-1_000_000_000_987_654_321),
        DateTime::parse_from_rfc3339("9999-12-31T23:59:59.999999Z")?.to_utc(),
        DateTime::parse_from_rfc3339("0001-01-01T00:00:00Z")?.to_utc(),
    ];
    let rows: Vec<(Row, Position)> = values
        .iter()
        .take(300)
        .enumerate()
        .map(|(i, v)| {
            let t = times[i % times.len()];
            assert!(foresight::audit::recordable(t));
            (
                Row {
                    id: uuid::Uuid::from_u128(i as u128 + 1),
                    ty: "foresight.test".into(),
                    entity: format!("entity\t{i}\\é"),
                    time: t,
                    schema_version: 1,
                    payload: serde_json::json!({ "v": v, "i": i }),
                },
                Position {
                    topic: "odd\ttopic\\".into(),
                    partition: (i % 3) as i32,
                    offset: i as i64,
                },
            )
        })
        .collect();
    for chunk in rows.chunks(70) {
        append(&pool, chunk).await?;
    }
    let v = foresight::audit::verify(&pool).await?;
    assert_eq!(v.rows, rows.len() as u64);
    assert!(v.breaks.is_empty(), "{:?}", v.breaks);
    // Stored as given: the payload reads back with the same text form (jsonb may turn a float
    // such as 1e16 into an integer), the time to the microsecond.
    let back: Vec<(serde_json::Value, DateTime<Utc>)> =
        sqlx::query_as("SELECT payload, event_time FROM events ORDER BY source_offset")
            .fetch_all(&pool)
            .await?;
    for ((r, _), (payload, time)) in rows.iter().zip(&back) {
        assert_eq!(
            foresight::audit::jsonb_text(&r.payload),
            foresight::audit::jsonb_text(payload)
        );
        assert!((r.time - *time).num_nanoseconds().unwrap().abs() < 1000);
    }
    pool.close().await;
    db.drop_db().await
}

/// The recorder's writers (a task per source partition, one batch queued while one is written):
/// every partition's rows are chained in the order they were read, each batch's offset is stored
/// with it and reported once committed, and a redelivered batch inserts nothing and moves no
/// offset back.
#[tokio::test(flavor = "multi_thread")]
async fn the_recorders_writers_keep_each_partitions_order_and_offset() -> anyhow::Result<()> {
    use std::collections::HashMap;
    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    let now = Utc::now();
    let rows: Vec<(Row, Position)> = (0..600)
        .map(|i| {
            let s = score(
                &format!("node-{:02}", i % 20),
                now - Duration::minutes(i),
                0.1,
            );
            let position = Position {
                topic: "scores".into(),
                partition: (i % 3) as i32,
                offset: i / 3,
            };
            (row(s), position)
        })
        .collect();
    let batches: Vec<_> = rows
        .chunks(100)
        .map(|chunk| {
            let mut next = HashMap::new();
            for (_, p) in chunk {
                next.insert((p.topic.clone(), p.partition), p.offset + 1);
            }
            (chunk.to_vec(), next)
        })
        .collect();
    let mut writers = foresight::recorder::Writers::new(
        pool.clone(),
        "writers-test",
        1,
        tokio_util::sync::CancellationToken::new(),
    );
    for (batch, next) in &batches {
        assert!(writers.submit(batch.clone(), next).await);
    }
    // The first batch again, as after a restart that re-read it.
    assert!(writers.submit(batches[0].0.clone(), &batches[0].1).await);
    let written = writers.close().await;
    assert_eq!(written.len(), 3 * (batches.len() + 1), "{written:?}");
    assert_eq!(written.iter().map(|w| w.inserted).sum::<u64>(), 600);
    // Per partition, reported in the order submitted: every batch's offset, then the re-read one.
    for partition in 0..3 {
        let reported: Vec<i64> = written
            .iter()
            .filter(|w| w.partition == partition)
            .map(|w| w.next)
            .collect();
        let mut submitted: Vec<i64> = batches
            .iter()
            .map(|(_, next)| next[&("scores".to_string(), partition)])
            .collect();
        submitted.push(batches[0].1[&("scores".to_string(), partition)]);
        assert_eq!(reported, submitted, "partition {partition}");
    }
    // Postgres holds each partition's last offset (the re-read batch did not move it back).
    let stored: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets WHERE consumer_group = 'writers-test' ORDER BY partition",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(stored, vec![(0, 200), (1, 200), (2, 200)]);
    // Each chain holds its partition's rows in the order read.
    let chains: Vec<(String, Vec<i64>)> = sqlx::query_as(
        "SELECT chain, array_agg(source_offset ORDER BY seq) FROM events GROUP BY chain ORDER BY chain",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(chains.len(), 3);
    for (chain, offsets) in &chains {
        assert_eq!(offsets, &(0..200).collect::<Vec<i64>>(), "{chain}");
    }
    let v = foresight::audit::verify(&pool).await?;
    assert_eq!(v.rows, 600);
    assert!(v.breaks.is_empty(), "{:?}", v.breaks);
    Ok(())
}
