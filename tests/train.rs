//! `foresight train` against the real Postgres: scores and failure reports are written to the
//! audit log in the recorder's format, and the training run must record a candidate, promote it
//! when it beats the recorded (prior) probabilities, not promote it when its signals carry no
//! information the recorded probabilities lack, and leave the prior alone while labels are few.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration as Delta, Utc};
use foresight::{
    audit,
    db::MIGRATOR,
    recorder::{self, Position, Row},
    train::{self, Outcome, TrainingConfig, Window},
};
use foresight_events::{Band, EntityId, EventData, EventId, FailureReport, RiskScore, ScoreMethod};
use foresight_scoring::{PRIOR_MODEL_VERSION, model::FEATURES};
use foresight_tests::TestDb;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use sqlx::PgPool;

const HORIZON: i64 = 3600;

fn start() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(1_750_000_000, 0).unwrap()
}

fn score(
    entity: &EntityId,
    time: DateTime<Utc>,
    signals: BTreeMap<String, f64>,
    p: f64,
) -> RiskScore {
    RiskScore {
        entity: entity.clone(),
        time,
        window_id: EventId::derive(
            "feature_window",
            &[
                entity.as_str().as_bytes(),
                &time.timestamp_millis().to_le_bytes(),
            ],
        ),
        horizon_seconds: HORIZON as u64,
        probability: p,
        lower: p,
        upper: p,
        time_to_failure_seconds: None,
        health: 100.0 * (1.0 - p),
        band: if p >= 0.7 {
            Band::High
        } else if p >= 0.3 {
            Band::Moderate
        } else {
            Band::Low
        },
        contributors: Vec::new(),
        method: ScoreMethod::Prior,
        model_version: PRIOR_MODEL_VERSION.into(),
        signals,
        observed: BTreeMap::new(),
        blast_radius: Vec::new(),
        impact: 1.0,
        rank: None,
    }
}

/// Writes events as the recorder does: one row per event, keyed by its deterministic id.
async fn insert<T: EventData>(
    pool: &PgPool,
    topic: &str,
    first_offset: i64,
    events: &[T],
) -> anyhow::Result<()> {
    for (chunk_no, chunk) in events.chunks(2000).enumerate() {
        let rows: Vec<(Row, Position)> = chunk
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let position = Position {
                    topic: topic.into(),
                    partition: 0,
                    offset: first_offset + (chunk_no * 2000 + i) as i64,
                };
                (recorder::row(e.clone()), position)
            })
            .collect();
        let mut tx = pool.begin().await?;
        audit::append(&mut tx, &rows).await?;
        tx.commit().await?;
    }
    Ok(())
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Signals as the scorer emits them: usually silent, sometimes anywhere in (0, 1).
fn signals(rng: &mut StdRng) -> BTreeMap<String, f64> {
    FEATURES
        .iter()
        .map(|f| {
            let v = if rng.gen_bool(0.5) {
                0.0
            } else {
                rng.gen_range(0.0..1.0)
            };
            (f.to_string(), v)
        })
        .collect()
}

/// A fleet scored hourly for `days`; each score's entity fails half an hour later with the
/// probability `truth(signals, recorded)`. Returns the scores and the failures.
fn fleet(
    days: i64,
    entities: usize,
    seed: u64,
    recorded: impl Fn(&BTreeMap<String, f64>, &mut StdRng) -> f64,
    truth: impl Fn(&BTreeMap<String, f64>, f64) -> f64,
) -> (Vec<RiskScore>, Vec<FailureReport>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut scores, mut failures) = (Vec::new(), Vec::new());
    for hour in 0..days * 24 {
        let time = start() + Delta::hours(hour);
        for e in 0..entities {
            let entity = EntityId::new(format!("node-{e}")).unwrap();
            let s = signals(&mut rng);
            let p = recorded(&s, &mut rng);
            if rng.gen_bool(truth(&s, p)) {
                failures.push(FailureReport {
                    entity: entity.clone(),
                    time: time + Delta::minutes(30),
                    kind: "crash".into(),
                    detail: String::new(),
                });
            }
            scores.push(score(&entity, time, s, p));
        }
    }
    (scores, failures)
}

/// The prior's combination: noisy-OR of the strengths.
fn noisy_or(s: &BTreeMap<String, f64>, _: &mut StdRng) -> f64 {
    1.0 - s.values().map(|p| 1.0 - p).product::<f64>()
}

async fn database() -> anyhow::Result<(TestDb, PgPool)> {
    // Migrations also touch cluster-wide catalogs (roles and their settings), which Postgres
    // refuses to update from two transactions at once ("tuple concurrently updated"): this file's
    // tests migrate their databases one at a time.
    static MIGRATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    {
        let _one_at_a_time = MIGRATING.lock().await;
        MIGRATOR.run(&pool).await?;
    }
    Ok((db, pool))
}

fn whole(days: i64) -> Window {
    Window {
        since: start(),
        until: start() + Delta::days(days),
    }
}

fn quick() -> TrainingConfig {
    let mut config = TrainingConfig::default();
    config.model.members = 16;
    config
}

/// id, version, current, promoted, brier, baseline_brier of `model_versions`.
type VersionRow = (i64, String, bool, bool, Option<f64>, Option<f64>);

#[tokio::test]
async fn a_model_better_than_the_prior_is_recorded_promoted_and_loaded() -> anyhow::Result<()> {
    let (db, pool) = database().await?;
    // Failures follow strong forecast breaches and anomalies; the prior over-reacts to every
    // signal.
    let (scores, failures) = fleet(14, 20, 1, noisy_or, |s, _| {
        sigmoid(-4.0 + 3.0 * s["forecast_breach"] + 2.5 * s["anomaly"])
    });
    insert(&pool, "scores", 0, &scores).await?;
    insert(&pool, "failures", 0, &failures).await?;
    // A score recorded twice (a replay under another model version) counts once.
    let mut again = scores[100].clone();
    again.model_version = "replayed".into();
    insert(&pool, "scores", scores.len() as i64, &[again]).await?;

    assert_eq!(train::promoted_model(&pool).await?, None);
    // The window ends half an hour before the last scores' horizons do: those are left out (not
    // labelled yet), but the failures that end them are read.
    let window = Window {
        until: whole(14).until - Delta::minutes(30),
        ..whole(14)
    };
    let report = train::train(&pool, &quick(), 0.7, window).await?;
    println!("{report}");
    assert_eq!(report.scores, 20 * (14 * 24 - 1));
    assert_eq!(report.failures, failures.len());
    let Outcome::Recorded(first) = &report.outcome else {
        panic!("{report}");
    };
    assert!(first.promoted, "{report}");
    assert_eq!(first.baseline_version, "recorded");
    assert!(first.candidate.brier < first.baseline.brier, "{report}");
    assert!(
        first.candidate.brier < first.candidate.brier_base_rate,
        "{report}"
    );
    assert!(
        first.candidate.precision_at_threshold >= first.baseline.precision_at_threshold,
        "{report}"
    );
    assert!(first.candidate.calibration_error < 0.05, "{report}");

    let loaded = train::promoted_model(&pool)
        .await?
        .expect("a promoted model");
    assert_eq!(loaded.version(), first.version);
    assert_eq!(
        train::promoted_version(&pool).await?.as_deref(),
        Some(first.version.as_str())
    );
    let weights: BTreeMap<String, f64> = loaded.weights().into_iter().collect();
    assert!(
        weights["forecast_breach"] > 1.5 && weights["anomaly"] > 1.0,
        "{weights:?}"
    );

    // The same data again: the same model, bit for bit, compared with itself (not worse).
    let report = train::train(&pool, &quick(), 0.7, window).await?;
    let Outcome::Recorded(second) = &report.outcome else {
        panic!("{report}");
    };
    assert_eq!(second.version, first.version);
    assert_eq!(second.baseline_version, first.version);
    assert_eq!(second.candidate, second.baseline);
    assert!(second.promoted, "{report}");

    let rows: Vec<VersionRow> = sqlx::query_as(
        "SELECT id, version, current, promoted, brier, baseline_brier FROM model_versions",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].0, rows[0].2),
        (second.id, true),
        "newest first, and current"
    );
    assert_eq!((rows[1].0, rows[1].2, rows[1].3), (first.id, false, true));
    assert_eq!(rows[1].4, Some(first.candidate.brier));

    // docs/sql.md: the reliability table of the model in use covers its whole hold-out.
    let bins: Vec<(f64, f64, i64, f64, f64)> = sqlx::query_as(
        "SELECT (b ->> 'lower')::float8 AS bin_from, (b ->> 'upper')::float8 AS bin_to, \
                (b ->> 'n')::bigint AS scores, (b ->> 'mean_predicted')::float8 AS predicted, \
                (b ->> 'observed')::float8 AS observed \
         FROM models m, jsonb_array_elements(m.metrics -> 'candidate' -> 'reliability') b \
         WHERE m.id = (SELECT id FROM model_versions WHERE current) ORDER BY bin_from",
    )
    .fetch_all(&pool)
    .await?;
    assert!(bins.len() >= 3, "{bins:?}");
    assert_eq!(
        bins.iter().map(|b| b.2).sum::<i64>(),
        second.candidate.n as i64
    );
    let (version, train_examples): (String, i64) =
        sqlx::query_as("SELECT version, train_examples FROM model_versions WHERE current")
            .fetch_one(&pool)
            .await?;
    assert_eq!(
        (version.as_str(), train_examples),
        (second.version.as_str(), second.train_examples as i64)
    );

    // A run's record cannot be edited or deleted; its promotion can be withdrawn.
    assert!(
        sqlx::query("UPDATE models SET reason = 'edited' WHERE id = $1")
            .bind(first.id)
            .execute(&pool)
            .await
            .is_err()
    );
    assert!(
        sqlx::query("DELETE FROM models")
            .execute(&pool)
            .await
            .is_err()
    );
    // docs/sql.md's roll-back.
    sqlx::query(
        "UPDATE models SET promoted = false WHERE id = (SELECT id FROM model_versions WHERE current)",
    )
    .execute(&pool)
    .await?;
    let current: i64 = sqlx::query_scalar("SELECT id FROM model_versions WHERE current")
        .fetch_one(&pool)
        .await?;
    assert_eq!(current, first.id);

    pool.close().await;
    db.drop_db().await
}

#[tokio::test]
async fn a_model_worse_than_the_recorded_probabilities_is_recorded_but_not_promoted()
-> anyhow::Result<()> {
    let (db, pool) = database().await?;
    // The recorded probabilities are the truth, and the signals say nothing about it: the
    // candidate can only learn the base rate.
    let (scores, failures) = fleet(
        14,
        20,
        2,
        |_, rng| {
            if rng.gen_bool(0.15) {
                rng.gen_range(0.5..0.95)
            } else {
                rng.gen_range(0.0..0.05)
            }
        },
        |_, p| p,
    );
    insert(&pool, "scores", 0, &scores).await?;
    insert(&pool, "failures", 0, &failures).await?;

    let report = train::train(&pool, &quick(), 0.7, whole(14)).await?;
    println!("{report}");
    let Outcome::Recorded(c) = &report.outcome else {
        panic!("{report}");
    };
    assert!(!c.promoted, "{report}");
    assert!(c.reason.contains("Brier"), "{}", c.reason);
    assert!(c.candidate.brier > c.baseline.brier, "{report}");
    assert_eq!(train::promoted_model(&pool).await?, None);
    let (promoted, reason): (bool, String) =
        sqlx::query_as("SELECT promoted, reason FROM models WHERE id = $1")
            .bind(c.id)
            .fetch_one(&pool)
            .await?;
    assert!(!promoted);
    assert_eq!(reason, c.reason);

    pool.close().await;
    db.drop_db().await
}

#[tokio::test]
async fn too_few_labels_record_nothing_and_keep_the_prior() -> anyhow::Result<()> {
    let (db, pool) = database().await?;
    let (scores, failures) = fleet(2, 5, 3, noisy_or, |_, _| 0.01);
    insert(&pool, "scores", 0, &scores).await?;
    insert(&pool, "failures", 0, &failures).await?;

    let report = train::train(&pool, &quick(), 0.7, whole(2)).await?;
    println!("{report}");
    let Outcome::NotEnoughData { reason, current } = &report.outcome else {
        panic!("{report}");
    };
    assert!(reason.contains("at least"), "{reason}");
    assert_eq!(current, "prior");
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM models")
        .fetch_one(&pool)
        .await?;
    assert_eq!(recorded, 0);

    // A reversed window is the caller's mistake, not "too few labels".
    let reversed = Window {
        since: whole(2).until,
        until: whole(2).since,
    };
    assert!(train::train(&pool, &quick(), 0.7, reversed).await.is_err());

    pool.close().await;
    db.drop_db().await
}

/// The live fleet stage follows promotions without a restart: it scores with the prior, a model
/// is trained and promoted meanwhile, and the next rounds are scored by it (method `learned`,
/// its version) — over the real broker and Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_fleet_stage_picks_up_a_promoted_model_without_a_restart() -> anyhow::Result<()> {
    use foresight::{Stage, kafka::Topics};
    use foresight_events::Event;
    use foresight_tests::{config, eventually, produce, producer, read_all, tag};
    use std::time::Duration;

    let (db, pool) = database().await?;
    let prefix = format!("pickup-{}", tag());
    let mut config = config(&prefix, &db);
    config.scoring.fleet.model_poll = Duration::from_millis(200);
    config.scoring.fleet.lateness = Some(Duration::from_secs(60));
    let topics = Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stage = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move { foresight::run_stages(&[Stage::Fleet], &config, shutdown).await }
    });
    let producer = producer()?;
    // Per-entity scores, one round a minute for 4 entities.
    let round = |minute: i64| -> Vec<(String, Vec<u8>)> {
        let mut rng = StdRng::seed_from_u64(minute as u64);
        (0..4)
            .map(|e| {
                let entity = EntityId::new(format!("svc-{e}")).unwrap();
                let s = score(
                    &entity,
                    start() + Delta::minutes(minute),
                    signals(&mut rng),
                    0.1,
                );
                let key = entity.to_string();
                (key, Event::new("/test", s).to_json())
            })
            .collect()
    };
    let read = |topic: String| {
        tokio::task::spawn_blocking(move || {
            let reads = read_all(&topic, Duration::from_millis(500), Duration::from_secs(10))?;
            reads
                .into_iter()
                .map(|r| Ok(Event::<RiskScore>::from_json(&r.payload)?.data))
                .collect::<anyhow::Result<Vec<RiskScore>>>()
        })
    };
    let mut records = Vec::new();
    for minute in 0..4 {
        records.extend(round(minute));
    }
    produce(&producer, &topics.entity_scores, &records).await?;
    // Rounds 0 and 1 close (the watermark, minute 3, is past them by the lateness): the prior.
    let before = eventually("prior rounds", Duration::from_secs(60), || async {
        let got = read(topics.scores.clone()).await??;
        Ok((got.len() >= 8).then_some(got))
    })
    .await?;
    assert!(
        before.iter().all(|s| s.method == ScoreMethod::Prior),
        "{before:?}"
    );

    // Meanwhile a model is trained on the recorded history and promoted.
    let (scores, failures) = fleet(14, 20, 1, noisy_or, |s, _| {
        sigmoid(-4.0 + 3.0 * s["forecast_breach"] + 2.5 * s["anomaly"])
    });
    insert(&pool, "scores", 0, &scores).await?;
    insert(&pool, "failures", 0, &failures).await?;
    let report = train::train(&pool, &quick(), 0.7, whole(14)).await?;
    let Outcome::Recorded(candidate) = &report.outcome else {
        panic!("{report}");
    };
    assert!(candidate.promoted, "{report}");
    let version = train::promoted_version(&pool).await?.expect("promoted");
    // Give the stage a poll to see it, then more rounds.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut more = Vec::new();
    for minute in 4..8 {
        more.extend(round(minute));
    }
    produce(&producer, &topics.entity_scores, &more).await?;
    let after = eventually("learned rounds", Duration::from_secs(60), || async {
        let got = read(topics.scores.clone()).await??;
        let learned: Vec<RiskScore> = got
            .into_iter()
            .filter(|s| s.method == ScoreMethod::Learned)
            .collect();
        Ok((learned.len() >= 8).then_some(learned))
    })
    .await?;
    for s in &after {
        assert_eq!(s.model_version, format!("{version}+fleet-1"));
        assert!(s.lower <= s.probability && s.probability <= s.upper);
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), stage).await???;
    pool.close().await;
    db.drop_db().await
}
