//! Checkpoints of stateful stages, in Postgres (see `migrations/0002_stage_state.sql`).
//!
//! A checkpoint of partition `p` holds, written in one transaction, the state entries `p` owns
//! that changed since its previous checkpoint and the next offset to read of partition `p` of
//! each input topic. The runner writes one only once every output of the inputs before those
//! offsets is acknowledged by the broker, so a restored instance neither loses an output (it
//! re-reads from the offsets) nor folds an input twice (the state already holds everything before
//! them).

use std::collections::HashMap;

use foresight_events::StateChange;
use sqlx::PgPool;

/// Most state entries written per statement.
const CHUNK: usize = 2000;

/// Where a stage's checkpoints live: its consumer group's rows.
#[derive(Debug, Clone)]
pub(crate) struct CheckpointStore {
    pool: PgPool,
    group: String,
}

/// A partition's last checkpoint.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// Next offset to read, per input topic (topics never checkpointed are absent).
    pub(crate) offsets: HashMap<String, i64>,
    /// The state entries the partition owns.
    pub(crate) entries: Vec<(String, Vec<u8>)>,
}

impl CheckpointStore {
    pub(crate) fn new(pool: PgPool, group: String) -> Self {
        Self { pool, group }
    }

    /// The last checkpoint of `partition` of the given input topics.
    pub(crate) async fn load(
        &self,
        partition: i32,
        topics: &[String],
    ) -> Result<Restored, sqlx::Error> {
        let offsets: Vec<(String, i64)> = sqlx::query_as(
            "SELECT topic, next_offset FROM consumer_offsets \
             WHERE consumer_group = $1 AND partition = $2 AND topic = ANY($3)",
        )
        .bind(&self.group)
        .bind(partition)
        .bind(topics)
        .fetch_all(&self.pool)
        .await?;
        let entries: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT key, state FROM stage_state WHERE consumer_group = $1 AND partition = $2 \
             ORDER BY key",
        )
        .bind(&self.group)
        .bind(partition)
        .fetch_all(&self.pool)
        .await?;
        Ok(Restored {
            offsets: offsets.into_iter().collect(),
            entries,
        })
    }

    /// Writes one checkpoint of `partition`: its state changes and its input offsets, atomically.
    pub(crate) async fn save(
        &self,
        partition: i32,
        offsets: &[(String, i64)],
        changes: Vec<StateChange>,
    ) -> Result<(), sqlx::Error> {
        let mut puts: (Vec<String>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
        let mut deletes: Vec<String> = Vec::new();
        for change in changes {
            match change {
                StateChange::Put { key, value } => {
                    puts.0.push(key);
                    puts.1.push(value);
                }
                StateChange::Delete { key } => deletes.push(key),
            }
        }
        let mut tx = self.pool.begin().await?;
        for (keys, states) in puts.0.chunks(CHUNK).zip(puts.1.chunks(CHUNK)) {
            sqlx::query(
                "INSERT INTO stage_state (consumer_group, key, partition, state) \
                 SELECT $1, k, $2, s FROM UNNEST($3::text[], $4::bytea[]) AS t(k, s) \
                 ON CONFLICT (consumer_group, key) DO UPDATE \
                 SET partition = EXCLUDED.partition, state = EXCLUDED.state, updated_at = clock_timestamp()",
            )
            .bind(&self.group)
            .bind(partition)
            .bind(keys)
            .bind(states)
            .execute(&mut *tx)
            .await?;
        }
        if !deletes.is_empty() {
            sqlx::query(
                "DELETE FROM stage_state WHERE consumer_group = $1 AND partition = $2 AND key = ANY($3)",
            )
            .bind(&self.group)
            .bind(partition)
            .bind(&deletes)
            .execute(&mut *tx)
            .await?;
        }
        for (topic, next) in offsets {
            sqlx::query(
                "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (consumer_group, topic, partition) DO UPDATE \
                 SET next_offset = EXCLUDED.next_offset, updated_at = clock_timestamp()",
            )
            .bind(&self.group)
            .bind(topic)
            .bind(partition)
            .bind(next)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }
}
