//! The recorder: writes decisions, outcomes, scores and failure reports to the Postgres audit log.
//!
//! Each batch is one transaction holding the events (inserted once, by id) and the consumed
//! offsets that produced them. Offsets are stored in Kafka only after that transaction commits, and
//! the offsets in Postgres are authoritative: a message at or past a recorded offset is skipped, and
//! a redelivered one inserts nothing twice anyway. While Postgres is away the recorder retries with
//! backoff and reads nothing new, so no offset ever advances past unrecorded work.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, ErrorClass, Event, EventData, FailureReport, RiskScore,
};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer},
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::{KafkaConfig, RunnerConfig},
    kafka::{self, Topics},
    runner::{Progress, StageError, StageReport},
};

/// The recorder's stage name.
pub const NAME: &str = "recorder";

/// One row of the `events` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Event id.
    pub id: Uuid,
    /// CloudEvents type.
    pub ty: String,
    /// Entity.
    pub entity: String,
    /// Event time.
    pub time: DateTime<Utc>,
    /// Schema version.
    pub schema_version: i32,
    /// The data.
    pub payload: serde_json::Value,
}

/// The row an event is recorded as.
pub fn row<T: EventData>(data: T) -> Row {
    Row {
        id: data.id().0,
        ty: T::event_type(),
        entity: data.entity().to_string(),
        time: data.time(),
        schema_version: T::VERSION as i32,
        payload: serde_json::to_value(&data).expect("event types serialise"),
    }
}

fn envelope<T: EventData>(bytes: &[u8]) -> Result<Row, (ErrorClass, String)> {
    Event::<T>::from_json(bytes)
        .map(|e| row(e.data))
        .map_err(|e| match e {
            foresight_events::EnvelopeError::UnknownSchemaVersion { .. } => {
                (ErrorClass::UnknownSchemaVersion, e.to_string())
            }
            _ => (ErrorClass::Undecodable, e.to_string()),
        })
}

/// Decodes a message of one of the recorded topics into a row.
pub(crate) fn decode(
    topics: &Topics,
    topic: &str,
    bytes: &[u8],
) -> Result<Row, (ErrorClass, String)> {
    if topic == topics.decisions {
        envelope::<Decision>(bytes)
    } else if topic == topics.outcomes {
        envelope::<ActuationOutcome>(bytes)
    } else if topic == topics.scores {
        envelope::<RiskScore>(bytes)
    } else if topic == topics.failures {
        // Failure reports come from people and their tools: a bare report is accepted as well as
        // an envelope, and its id is derived from entity, time and kind either way.
        if serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("specversion").is_some())
        {
            envelope::<FailureReport>(bytes)
        } else {
            serde_json::from_slice::<FailureReport>(bytes)
                .map(row)
                .map_err(|e| {
                    (
                        ErrorClass::Undecodable,
                        format!("not a failure report: {e}"),
                    )
                })
        }
    } else {
        Err((
            ErrorClass::Undecodable,
            format!("topic {topic} is not recorded"),
        ))
    }
}

/// Whether a row is kept under the score sample: every row but low-band scores, and of those the
/// share `sample`, chosen by id (deterministic: a replay keeps the same ones).
fn sampled(row: &Row, sample: f64) -> bool {
    if sample >= 1.0 || row.ty != RiskScore::event_type() {
        return true;
    }
    if row.payload.get("band").and_then(|b| b.as_str()) != Some("low") {
        return true;
    }
    let bits = u64::from_be_bytes(row.id.as_bytes()[..8].try_into().expect("8 bytes"));
    (bits as f64 / u64::MAX as f64) < sample
}

/// Where a recorded event was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// Writes rows and offsets in one transaction.
async fn write(
    pool: &PgPool,
    group: &str,
    rows: &[(Row, Position)],
    next: &HashMap<(String, i32), i64>,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let inserted = crate::audit::append(&mut tx, rows).await?;
    for ((topic, partition), offset) in next {
        sqlx::query(
            "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (consumer_group, topic, partition) DO UPDATE \
             SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset), updated_at = clock_timestamp()",
        )
        .bind(group)
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

async fn recorded_offsets(
    pool: &PgPool,
    group: &str,
) -> Result<HashMap<(String, i32), i64>, sqlx::Error> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

/// Runs the recorder until `shutdown` is cancelled.
pub(crate) async fn run(
    pool: PgPool,
    kafka_config: &KafkaConfig,
    runner: &RunnerConfig,
    topics: &Topics,
    progress: &Progress,
    shutdown: CancellationToken,
) -> Result<StageReport, StageError> {
    let err = |source| StageError::Kafka {
        stage: NAME,
        source,
    };
    let group = format!("{}{}", kafka_config.group_prefix, NAME);
    let consumer = kafka::consumer(kafka_config, &group).map_err(err)?;
    let producer = kafka::producer(kafka_config).map_err(err)?;
    let inputs = [
        &topics.decisions,
        &topics.outcomes,
        &topics.scores,
        &topics.failures,
    ];
    consumer
        .subscribe(&inputs.map(String::as_str))
        .map_err(err)?;
    tracing::info!(stage = NAME, %group, "Stage started.");

    let mut recorded = loop {
        match recorded_offsets(&pool, &group).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(stage = NAME, error = %e, "Postgres unavailable; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(StageReport::default()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let mut report = StageReport::default();
    'outer: loop {
        // Collect one batch.
        let mut rows: Vec<(Row, Position)> = Vec::new();
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        let mut dead = Vec::new();
        let deadline = tokio::time::sleep(runner.recorder_linger);
        tokio::pin!(deadline);
        let mut stopping = false;
        while rows.len() + dead.len() < runner.recorder_batch {
            let message = tokio::select! {
                biased;
                () = shutdown.cancelled() => { stopping = true; break; }
                () = &mut deadline, if !next.is_empty() => break,
                m = consumer.recv() => m,
            };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(stage = NAME, error = %e, "Consumer error; retrying.");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            report.message(progress);
            let key = (message.topic().to_owned(), message.partition());
            next.insert(key.clone(), message.offset() + 1);
            if recorded.get(&key).is_some_and(|&n| message.offset() < n) {
                continue; // Already recorded (Postgres is ahead of Kafka's commit).
            }
            let payload = message.payload().unwrap_or_default();
            match decode(topics, message.topic(), payload) {
                Ok(row) if !sampled(&row, runner.recorder_score_sample) => {}
                Ok(row) => rows.push((
                    row,
                    Position {
                        topic: key.0,
                        partition: key.1,
                        offset: message.offset(),
                    },
                )),
                Err((class, reason)) => dead.push(DeadLetter {
                    stage: NAME.into(),
                    source_topic: message.topic().into(),
                    partition: message.partition(),
                    offset: message.offset(),
                    error_class: class,
                    reason,
                    key: message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: payload.to_vec(),
                }),
            }
        }
        for revoked in consumer.context().take_revoked() {
            // Writing what was read from a revoked partition is harmless (ids dedupe); storing its
            // offset is not possible and not attempted.
            recorded.remove(&revoked);
        }

        // Dead letters first: an offset is stored only once every output of it is durable.
        for dl in &dead {
            let headers = dl.headers().iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            });
            let mut record = FutureRecord::to(&topics.dead_letters)
                .payload(dl.payload.as_slice())
                .headers(headers);
            if let Some(key) = dl.key.as_deref() {
                record = record.key(key);
            }
            if let Err((source, _)) = producer.send(record, Duration::from_secs(30)).await {
                return Err(StageError::Delivery {
                    stage: NAME,
                    topic: dl.source_topic.clone(),
                    partition: dl.partition,
                    offset: dl.offset,
                    source,
                });
            }
            report.dead_letter(progress);
        }

        if !next.is_empty() {
            let mut backoff = Duration::from_millis(100);
            loop {
                match write(&pool, &group, &rows, &next).await {
                    Ok(inserted) => {
                        report.events += inserted;
                        progress
                            .events
                            .fetch_add(inserted, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(stage = NAME, error = %e, retry_in = ?backoff, "Recording failed; retrying.");
                        tokio::select! {
                            // Stop without storing: the batch is re-read by whoever runs next.
                            () = shutdown.cancelled() => break 'outer,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), offset) in &next {
                recorded.insert((topic.clone(), *partition), *offset);
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
            }
            if let Err(e) = consumer.store_offsets(&tpl) {
                tracing::debug!(stage = NAME, error = %e, "Offsets not stored (partition revoked?).");
            }
        }
        if stopping {
            break;
        }
    }
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::debug!(stage = NAME, error = %e, "Final commit skipped.");
    }
    tracing::info!(
        stage = NAME,
        messages = report.messages,
        events = report.events,
        dead_letters = report.dead_letters,
        "Stage stopped."
    );
    Ok(report)
}

#[cfg(test)]
mod sample_tests {
    use super::*;

    #[test]
    fn the_score_sample_keeps_every_risky_score_and_a_deterministic_share_of_the_rest() {
        let score = |i: u32, p: f64| {
            let mut r = Row {
                id: foresight_events::EventId::derive("s", &[&i.to_le_bytes()]).0,
                ty: RiskScore::event_type(),
                entity: "e".into(),
                time: DateTime::from_timestamp(0, 0).unwrap(),
                schema_version: 1,
                payload: serde_json::json!({ "band": if p > 0.7 { "high" } else { "low" } }),
            };
            if p < 0.0 {
                r.ty = Decision::event_type();
            }
            r
        };
        let kept = (0..10_000)
            .filter(|&i| sampled(&score(i, 0.1), 0.1))
            .count();
        assert!(
            (800..1200).contains(&kept),
            "{kept} of 10,000 low scores at 10 %"
        );
        assert!(
            (0..100).all(|i| sampled(&score(i, 0.9), 0.0)),
            "high scores always"
        );
        assert!(
            (0..100).all(|i| sampled(&score(i, -1.0), 0.0)),
            "other events always"
        );
        assert!((0..100).all(|i| !sampled(&score(i, 0.1), 0.0)));
        let again = (0..10_000)
            .filter(|&i| sampled(&score(i, 0.1), 0.1))
            .count();
        assert_eq!(kept, again);
    }
}
