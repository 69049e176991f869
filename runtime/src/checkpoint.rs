//! Checkpoints of stateful stages, in Postgres (see `migrations/0002_stage_state.sql`).
//!
//! A checkpoint of partition `p` holds, written in one transaction, the state entries `p` owns
//! that changed since its previous checkpoint and the next offset to read of partition `p` of
//! each input topic. The runner writes one only once every output of the inputs before those
//! offsets is acknowledged by the broker, so a restored instance neither loses an output (it
//! re-reads from the offsets) nor folds an input twice (the state already holds everything before
//! them).
//!
//! **Fencing.** During a rebalance two instances can briefly both hold a partition: the one it
//! was revoked from may still be writing a checkpoint its successor never sees, or sees half of
//! (the state of one, the offsets of the other). So restoring a partition claims it: the claim
//! takes the partition's next epoch (`partition_owners`, migration 0007), and a checkpoint is
//! written only under the epoch it was restored with, checked under a row lock in the
//! checkpoint's own transaction. A fenced-off instance writes nothing more for the partition.

use std::collections::HashMap;

use foresight_events::StateChange;
use sqlx::PgPool;

/// Most state entries written per statement.
const CHUNK: usize = 2000;

/// Where a stage's checkpoints live: its consumer group's rows.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    pool: PgPool,
    group: String,
}

/// A partition's last checkpoint.
#[derive(Debug, Default)]
pub struct Restored {
    /// The epoch of this instance's claim on the partition: its checkpoints are written under it.
    pub epoch: i64,
    /// Next offset to read, per input topic (topics never checkpointed are absent).
    pub offsets: HashMap<String, i64>,
    /// The state entries the partition owns.
    pub entries: Vec<(String, Vec<u8>)>,
}

/// One partition's checkpoint, as [`CheckpointStore::save_all`] writes it.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoint<'a> {
    /// The partition.
    pub partition: i32,
    /// The epoch of this instance's claim on it (from [`CheckpointStore::load`]).
    pub epoch: i64,
    /// Next offset to read, per input topic.
    pub offsets: &'a [(String, i64)],
    /// Its state's changes since its last checkpoint.
    pub changes: &'a [StateChange],
}

/// Why a checkpoint was not written.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Postgres failed (or is away): retry.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// Another instance has claimed the partition since this one restored it.
    #[error("partition {partition} claimed by another instance (epoch {current}, ours {ours})")]
    Fenced {
        /// The partition.
        partition: i32,
        /// The epoch this instance restored the partition with.
        ours: i64,
        /// The partition's epoch now.
        current: i64,
    },
}

impl CheckpointStore {
    /// The checkpoints of consumer group `group` (one per stage).
    pub fn new(pool: PgPool, group: String) -> Self {
        Self { pool, group }
    }

    /// Claims `partition` (its next epoch, so that an earlier holder can write no more) and reads
    /// its last checkpoint of the given input topics. `owner` names this instance for operators.
    pub async fn load(
        &self,
        partition: i32,
        topics: &[String],
        owner: &str,
    ) -> Result<Restored, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Waits for an earlier holder's checkpoint being written (it holds the row's lock), so
        // what is read below includes it.
        let epoch: i64 = sqlx::query_scalar(
            "INSERT INTO partition_owners (consumer_group, partition, epoch, owner) \
             VALUES ($1, $2, 1, $3) \
             ON CONFLICT (consumer_group, partition) DO UPDATE \
             SET epoch = partition_owners.epoch + 1, owner = EXCLUDED.owner, \
                 claimed_at = clock_timestamp() \
             RETURNING epoch",
        )
        .bind(&self.group)
        .bind(partition)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        let offsets: Vec<(String, i64)> = sqlx::query_as(
            "SELECT topic, next_offset FROM consumer_offsets \
             WHERE consumer_group = $1 AND partition = $2 AND topic = ANY($3)",
        )
        .bind(&self.group)
        .bind(partition)
        .bind(topics)
        .fetch_all(&mut *tx)
        .await?;
        let entries: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT key, state FROM stage_state WHERE consumer_group = $1 AND partition = $2 \
             ORDER BY key",
        )
        .bind(&self.group)
        .bind(partition)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Restored {
            epoch,
            offsets: offsets.into_iter().collect(),
            entries,
        })
    }

    /// Writes one checkpoint of `partition`: its state changes and its input offsets,
    /// atomically, if the partition is still this instance's (`epoch`, from [`Self::load`]).
    pub async fn save(
        &self,
        partition: i32,
        epoch: i64,
        offsets: &[(String, i64)],
        changes: &[StateChange],
    ) -> Result<(), SaveError> {
        self.save_all(&[Checkpoint {
            partition,
            epoch,
            offsets,
            changes,
        }])
        .await
    }

    /// Writes the checkpoints of several partitions, taken together, in one transaction: all
    /// of them or none. A processor whose partitions' state depends on each other's input (the
    /// fleet stage's rounds span every partition) so comes back to one cut, even if the process
    /// dies while writing. Fenced, naming the partition, if one of them is no longer this
    /// instance's: then none is written.
    pub async fn save_all(&self, checkpoints: &[Checkpoint<'_>]) -> Result<(), SaveError> {
        let mut tx = self.pool.begin().await?;
        for c in checkpoints {
            self.write(&mut tx, c).await?;
        }
        Ok(tx.commit().await?)
    }

    /// Writes checkpoint `c` within `tx`.
    async fn write(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        c: &Checkpoint<'_>,
    ) -> Result<(), SaveError> {
        let Checkpoint {
            partition,
            epoch,
            offsets,
            changes,
        } = *c;
        let mut puts: (Vec<String>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
        let mut deletes: Vec<String> = Vec::new();
        for change in changes {
            match change {
                StateChange::Put { key, value } => {
                    puts.0.push(key.clone());
                    puts.1.push(value.clone());
                }
                StateChange::Delete { key } => deletes.push(key.clone()),
            }
        }
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT epoch FROM partition_owners WHERE consumer_group = $1 AND partition = $2 \
             FOR UPDATE",
        )
        .bind(&self.group)
        .bind(partition)
        .fetch_optional(&mut **tx)
        .await?;
        if current != Some(epoch) {
            return Err(SaveError::Fenced {
                partition,
                ours: epoch,
                current: current.unwrap_or_default(),
            });
        }
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
            .execute(&mut **tx)
            .await?;
        }
        if !deletes.is_empty() {
            sqlx::query(
                "DELETE FROM stage_state WHERE consumer_group = $1 AND partition = $2 AND key = ANY($3)",
            )
            .bind(&self.group)
            .bind(partition)
            .bind(&deletes)
            .execute(&mut **tx)
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
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }
}
