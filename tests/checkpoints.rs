//! The feature stage, run as its own process against the real broker and Postgres, is killed
//! (SIGKILL) mid-stream and restarted: its windows must be exactly those of the in-process replay
//! of the same records: none lost, none doubled with different content, ids included.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::bail;
use chrono::{DateTime, Duration as Delta, DurationRound as _, Utc};
use foresight::{Config, kafka::Topics};
use foresight_events::{Event, EventData, EventId, FeatureWindow};
use foresight_tests::{TestDb, config, eventually, in_process, produce, producer, read_all, tag};

/// Starts `foresight run features` with the test's configuration in its environment.
fn start(config: &Config) -> anyhow::Result<Child> {
    let f = &config.features;
    let mut cmd = Command::new(foresight_tests::binary()?);
    cmd.args(["run", "features"])
        .env("FORESIGHT_KAFKA__BROKERS", &config.kafka.brokers)
        .env("FORESIGHT_KAFKA__TOPIC_PREFIX", &config.kafka.topic_prefix)
        .env("FORESIGHT_KAFKA__GROUP_PREFIX", &config.kafka.group_prefix)
        .env(
            "FORESIGHT_KAFKA__PARTITIONS",
            config.kafka.partitions.to_string(),
        )
        .env("FORESIGHT_POSTGRES__URL", &config.postgres.url)
        .env("FORESIGHT_RUNNER__CHECKPOINT_INTERVAL", "300ms")
        .env("FORESIGHT_RUNNER__COMMIT_INTERVAL", "100ms")
        .env("FORESIGHT_OBSERVABILITY__LISTEN", "127.0.0.1:0")
        .env(
            "FORESIGHT_FEATURES__WINDOW",
            format!("{}ms", f.window.as_millis()),
        )
        .env(
            "FORESIGHT_FEATURES__MAX_OUT_OF_ORDERNESS",
            format!("{}ms", f.max_out_of_orderness.as_millis()),
        )
        .env(
            "FORESIGHT_FEATURES__ALLOWED_LATENESS",
            format!("{}ms", f.allowed_lateness.as_millis()),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, pattern) in &f.log_patterns {
        cmd.env(format!("FORESIGHT_FEATURES__LOG_PATTERNS__{name}"), pattern);
    }
    Ok(cmd.spawn()?)
}

/// Twelve nodes over 50 minutes: a gauge and a counter (which restarts once) every 10 s as
/// native JSON. (topic, key, payload) in production order. Logs are left out: they come on
/// their own topic, and how far one topic is read ahead of another is up to the consumer, so the
/// windows that hold both are only as deterministic as that skew allows (see docs/architecture.md);
/// the unit tests of the feature stage restore log state exactly.
fn records(topics: &Topics, end: DateTime<Utc>) -> Vec<(String, String, Vec<u8>)> {
    let start = end - Delta::minutes(50);
    let mut out = Vec::new();
    for step in 0..300i64 {
        let t = start + Delta::seconds(step * 10);
        for n in 0..12i64 {
            let entity = format!("node-{n:02}");
            let cpu = 30.0 + ((step * 7 + n * 13) % 40) as f64;
            let requests = if step < 150 {
                step * 5 + n
            } else {
                (step - 150) * 5
            };
            for sample in [
                serde_json::json!({"entity": entity, "metric": "cpu_pct", "time": t.to_rfc3339(), "value": cpu}),
                serde_json::json!({"entity": entity, "metric": "requests_total", "time": t.to_rfc3339(),
                    "value": requests, "kind": "counter"}),
            ] {
                out.push((
                    topics.metrics.clone(),
                    entity.clone(),
                    serde_json::to_vec(&sample).unwrap(),
                ));
            }
        }
    }
    out
}

/// The next offsets the stage's checkpoints have reached, summed over its input partitions.
async fn checkpointed(pool: &sqlx::PgPool, group: &str) -> anyhow::Result<i64> {
    let sum: Option<i64> = sqlx::query_scalar(
        "SELECT sum(next_offset)::bigint FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await?;
    Ok(sum.unwrap_or(0))
}

/// Feature windows read back from the topic, by id; fails if one id came with two contents.
fn windows_by_id(topic: &str) -> anyhow::Result<(BTreeMap<EventId, FeatureWindow>, usize)> {
    let read = read_all(topic, Duration::from_secs(3), Duration::from_secs(120))?;
    let mut by_id: BTreeMap<EventId, FeatureWindow> = BTreeMap::new();
    for m in &read {
        let e = Event::<FeatureWindow>::from_json(&m.payload)?;
        if let Some(prev) = by_id.insert(e.id, e.data.clone())
            && prev != e.data
        {
            bail!("window {} emitted twice with different content", e.id);
        }
    }
    Ok((by_id, read.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_feature_stage_resumes_and_live_windows_equal_replay() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let prefix = format!("ckpt{}", tag());
    let mut config = config(&prefix, &db);
    config.features.window = Duration::from_secs(60);
    config.features.max_out_of_orderness = Duration::from_secs(20);
    config.features.allowed_lateness = Duration::from_secs(10);
    let topics = Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;

    let end = Utc::now().duration_trunc(Delta::minutes(1))?;
    let records = records(&topics, end);
    let producer = producer()?;
    let metrics: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|(_, k, p)| (k.clone(), p.clone()))
        .collect();
    let total = records.len() as i64;
    let group = format!("{}features", config.kafka.group_prefix);
    // A third up front; the rest streams in while the stage runs, never more than eight chunks
    // ahead of what the stage has checkpointed, so the kill below always lands mid-stream.
    let third = metrics.len() / 3;
    produce(&producer, &topics.metrics, &metrics[..third]).await?;
    let streaming = tokio::spawn({
        let (producer, topic, pool, group) = (
            producer.clone(),
            topics.metrics.clone(),
            pool.clone(),
            group.clone(),
        );
        let rest = metrics[third..].to_vec();
        async move {
            let mut sent = third as i64;
            for chunk in rest.chunks(200) {
                while checkpointed(&pool, &group).await? < sent - 1600 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                produce(&producer, &topic, chunk).await?;
                sent += chunk.len() as i64;
            }
            anyhow::Ok(())
        }
    });

    let mut child = start(&config)?;
    // Kill it (SIGKILL) once a checkpoint holds a third of the input, while the rest arrives.
    let reached = eventually(
        "a mid-stream checkpoint",
        Duration::from_secs(180),
        || async {
            let n = checkpointed(&pool, &group).await?;
            Ok((n >= total / 3).then_some(n))
        },
    )
    .await;
    child.kill()?;
    child.wait()?;
    let reached = reached?;
    assert!(
        !streaming.is_finished(),
        "killed while the input was still arriving"
    );
    assert!(reached < total, "killed mid-stream ({reached} of {total})");

    // A new instance resumes from the checkpoint and reads to the end.
    let mut child = start(&config)?;
    let done = eventually(
        "the whole input checkpointed",
        Duration::from_secs(240),
        || async {
            let n = checkpointed(&pool, &group).await?;
            Ok((n >= total).then_some(n))
        },
    )
    .await;
    child.kill()?;
    child.wait()?;
    streaming.await??;
    assert_eq!(done?, total, "every input offset checkpointed once");

    let (live, read) = windows_by_id(&topics.features)?;
    let expected = in_process(&config, &metrics, Some(end))?;
    let expected: BTreeMap<EventId, FeatureWindow> = expected
        .windows
        .iter()
        .map(|w| (w.id(), w.clone()))
        .collect();
    assert!(expected.len() > 500, "{} windows expected", expected.len());
    let missing: Vec<_> = expected
        .keys()
        .filter(|id| !live.contains_key(id))
        .collect();
    let extra: Vec<_> = live
        .keys()
        .filter(|id| !expected.contains_key(id))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} windows lost, {} unexpected (of {})",
        missing.len(),
        extra.len(),
        expected.len()
    );
    for (id, w) in &expected {
        assert_eq!(&live[id], w, "window {id} differs from the replay");
    }
    let rates = expected
        .values()
        .filter(|w| {
            w.metrics
                .get("requests_total")
                .is_some_and(|m| m.rate_per_s.is_some())
        })
        .count();
    assert!(rates > 100, "counter rates are compared too ({rates})");
    eprintln!(
        "{} windows, identical to the replay; {} messages on the topic ({} re-emitted after the kill)",
        expected.len(),
        read,
        read - expected.len()
    );
    drop(pool);
    db.drop_db().await
}

/// Two instances hold one partition during a rebalance: the one it was revoked from still has a
/// checkpoint to write after its successor restored the partition. The successor's claim fences
/// it off: its write is refused, and what the successor restored stays the last checkpoint. A
/// checkpoint being written while the successor claims is waited for, so the successor restores
/// it (real Postgres; the store the runner uses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_instance_cannot_write_over_its_successors_checkpoint() -> anyhow::Result<()> {
    use foresight::checkpoint::{Checkpoint, CheckpointStore, SaveError};
    use foresight_events::StateChange;
    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    let topics = vec!["t.metrics".to_owned()];
    let put = |v: &str| StateChange::Put {
        key: "node-1".into(),
        value: v.as_bytes().to_vec(),
    };
    let old = CheckpointStore::new(pool.clone(), "g-features".into());
    let new = CheckpointStore::new(pool.clone(), "g-features".into());

    let first = old.load(0, &topics, "old").await?;
    assert_eq!(first.epoch, 1);
    old.save(0, first.epoch, &[(topics[0].clone(), 10)], &[put("at 10")])
        .await?;
    let taken = new.load(0, &topics, "new").await?;
    assert_eq!(taken.epoch, 2);
    assert_eq!(taken.offsets[&topics[0]], 10);
    // The old holder's next checkpoint is refused, and changes nothing.
    let refused = old
        .save(0, first.epoch, &[(topics[0].clone(), 20)], &[put("at 20")])
        .await;
    assert!(
        matches!(
            refused,
            Err(SaveError::Fenced {
                partition: 0,
                ours: 1,
                current: 2
            })
        ),
        "{refused:?}"
    );
    new.save(0, taken.epoch, &[(topics[0].clone(), 15)], &[put("at 15")])
        .await?;
    let now = CheckpointStore::new(pool.clone(), "g-features".into())
        .load(0, &topics, "third")
        .await?;
    assert_eq!(now.offsets[&topics[0]], 15);
    assert_eq!(now.entries, vec![("node-1".to_owned(), b"at 15".to_vec())]);
    // Other partitions and groups are claimed on their own.
    assert_eq!(old.load(1, &topics, "old").await?.epoch, 1);
    let other = CheckpointStore::new(pool.clone(), "g-scoring".into());
    assert_eq!(other.load(0, &topics, "old").await?.epoch, 1);

    // Checkpoints taken together are written together: with one of them fenced, none is (a
    // processor whose partitions depend on each other comes back to one cut).
    let two = old.load(2, &topics, "old").await?;
    let three = old.load(3, &topics, "old").await?;
    new.load(3, &topics, "new").await?;
    let offsets = [(topics[0].clone(), 30)];
    let changes = |key: &str| {
        vec![StateChange::Put {
            key: key.into(),
            value: b"at 30".to_vec(),
        }]
    };
    let (at_two, at_three) = (changes("node-2"), changes("node-3"));
    let both = old
        .save_all(&[
            Checkpoint {
                partition: 2,
                epoch: two.epoch,
                offsets: &offsets,
                changes: &at_two,
            },
            Checkpoint {
                partition: 3,
                epoch: three.epoch,
                offsets: &offsets,
                changes: &at_three,
            },
        ])
        .await;
    assert!(
        matches!(both, Err(SaveError::Fenced { partition: 3, .. })),
        "{both:?}"
    );
    let two_now = new.load(2, &topics, "new").await?;
    assert!(
        two_now.offsets.is_empty() && two_now.entries.is_empty(),
        "partition 2 written without partition 3: {two_now:?}"
    );

    // A claim made while a checkpoint is being written waits for it, and restores it.
    let mut writing = pool.begin().await?;
    let epoch: i64 = sqlx::query_scalar(
        "SELECT epoch FROM partition_owners WHERE consumer_group = 'g-scoring' AND partition = 0 FOR UPDATE",
    )
    .fetch_one(&mut *writing)
    .await?;
    sqlx::query(
        "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset) \
         VALUES ('g-scoring', 't.metrics', 0, 99)",
    )
    .execute(&mut *writing)
    .await?;
    let claim = tokio::spawn({
        let pool = pool.clone();
        let topics = topics.clone();
        async move {
            CheckpointStore::new(pool, "g-scoring".into())
                .load(0, &topics, "successor")
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!claim.is_finished(), "the claim waits for the write");
    writing.commit().await?;
    let restored = claim.await??;
    assert_eq!(
        (restored.epoch, restored.offsets[&topics[0]]),
        (epoch + 1, 99)
    );
    pool.close().await;
    db.drop_db().await
}

/// State a partition owns as a whole (the feature stage's clock) survives the checkpoints of the
/// stage's other partitions: each partition restores its own. (Under one key shared by every
/// partition, the partition checkpointed last took the row, and the others came back without
/// their clocks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_restores_its_own_clock() -> anyhow::Result<()> {
    use foresight::checkpoint::CheckpointStore;
    use foresight_events::{EntityId, MetricSample, Origin, Processor as _, partition_key};
    use foresight_features::{FeaturesConfig, WindowProcessor};
    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    let topics = vec!["t.metrics".to_owned()];
    let store = CheckpointStore::new(pool.clone(), "g-features".into());
    let mut windows = WindowProcessor::new(FeaturesConfig::default())?;
    let start = Utc::now().duration_trunc(Delta::hours(1))?;
    let mut out = Vec::new();
    for minute in 0..5 {
        for (partition, entity) in [(0, "node-a"), (1, "node-b")] {
            let sample = MetricSample {
                entity: EntityId::new(entity)?,
                metric: "cpu_pct".into(),
                time: start + Delta::minutes(minute),
                value: 50.0,
                labels: Default::default(),
                kind: Default::default(),
            };
            let origin = Origin {
                input: 0,
                partition,
                offset: minute,
            };
            windows.process(
                foresight_events::Telemetry::Sample(sample),
                origin,
                &mut out,
            );
        }
    }
    for partition in [0, 1] {
        let epoch = store.load(partition, &topics, "one").await?.epoch;
        let changes = windows.checkpoint(partition);
        store
            .save(partition, epoch, &[(topics[0].clone(), 5)], &changes)
            .await?;
    }
    for partition in [0, 1] {
        let restored = store.load(partition, &topics, "two").await?;
        let keys: Vec<&str> = restored.entries.iter().map(|(k, _)| k.as_str()).collect();
        assert!(
            keys.contains(&partition_key("clock", partition).as_str()),
            "partition {partition} restored {keys:?}"
        );
        WindowProcessor::new(FeaturesConfig::default())?.restore(partition, restored.entries)?;
    }
    pool.close().await;
    db.drop_db().await
}
