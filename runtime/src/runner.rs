//! The live stage runner: one pure processor between a Kafka input topic and a Kafka output topic.
//!
//! Delivery is at-least-once with ordered acknowledgement. Offsets are stored (and then
//! auto-committed) only up to the first input whose outputs are not all acknowledged by the broker.
//! Output ids are derived from the inputs, so a redelivered input produces the same ids and
//! downstream consumers deduplicate.
//!
//! A stateful processor (the feature stage's windows) is checkpointed instead: every
//! `runner.checkpoint_interval` its changed state and the input offsets it reflects are written to
//! Postgres in one transaction, once every output before those offsets is acknowledged; only then
//! are the offsets stored in Kafka too. When a partition is first read (start, rebalance), its
//! last checkpoint is restored and input before the checkpoint's offsets is skipped: a killed
//! instance's successor loses no window and folds no input twice. Outputs emitted after the last
//! checkpoint are emitted again, identical and with the same ids.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use foresight_events::{
    CLOUDEVENTS_CONTENT_TYPE, DeadLetter, ErrorClass, InputPartition, Origin, Output, Processor,
    Rejection, Routed,
};
use futures::{StreamExt, stream::FuturesUnordered};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer, StreamConsumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::{BorrowedMessage, Header, Headers, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer},
};
use tokio_util::sync::CancellationToken;

use crate::{
    checkpoint::{Checkpoint, CheckpointStore, SaveError},
    config::{KafkaConfig, RunnerConfig},
    kafka::{self, ConsumerState, RebalanceContext, Rebalanced},
    offsets::{OffsetTracker, Resume, Rewind},
    telemetry,
    watchdog::{Stall, Watchdog},
};

/// Whether the broker's refusal of an output is final: the same message sent again cannot be
/// accepted (too large, malformed, not allowed, against the topic's policy). Any other refusal
/// (seen: "unknown broker error" from a broker stopping or just restarted) is transient, and the
/// message is sent again, without limit, until the shutdown.
pub(crate) fn refused_for_good(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::InvalidMessage
                | C::InvalidMessageSize
                | C::MessageSizeTooLarge
                | C::MessageBatchTooLarge
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::PolicyViolation
                | C::InvalidRecord
        )
    )
}

/// The pause before an output refused `attempt` times in a row is sent again: 200 ms more each
/// time, at most 5 s.
pub(crate) fn resend_pause(attempt: u32) -> Duration {
    Duration::from_millis(200) * attempt.min(25)
}

/// One message as a decoder sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Incoming<'a> {
    /// The value.
    pub(crate) payload: &'a [u8],
    /// The message timestamp.
    pub(crate) time: Option<DateTime<Utc>>,
    /// The `content-type` header.
    pub(crate) content_type: Option<&'a str>,
}

/// Decodes one input message into the processor's inputs, and rejections for what is unusable.
pub(crate) type Decode<I> = Box<dyn FnMut(Incoming<'_>) -> (Vec<I>, Vec<Rejection>) + Send>;

/// One input topic of a stage and how its messages are decoded.
pub(crate) struct Input<I> {
    /// The topic.
    pub(crate) topic: String,
    /// Its decoder.
    pub(crate) decode: Decode<I>,
}

/// A change to a running stage's processor between two inputs (e.g. a newly promoted model).
pub(crate) type Control<P> = Box<dyn FnOnce(&mut P) + Send>;

/// A stage as the live runner sees it.
pub(crate) struct LiveStage<P: Processor> {
    /// Stage name: consumer group suffix, event source and log field.
    pub(crate) name: &'static str,
    /// Topics it reads; an origin's `input` is the index here.
    pub(crate) inputs: Vec<Input<P::Input>>,
    /// Topics its events go to, by [`OutgoingMessage::route`].
    pub(crate) outputs: Vec<String>,
    /// Topic its rejections go to.
    pub(crate) dead_letters: String,
    /// The pure processor.
    pub(crate) processor: P,
    /// Whether processing is CPU-heavy (model fits): then it runs where it cannot stall the IO
    /// driver (`block_in_place`), which costs a thread hand-off per message and so is not worth
    /// it for cheap processors.
    pub(crate) cpu_heavy: bool,
    /// Changes to apply to the processor while it runs, between inputs.
    pub(crate) control: Option<tokio::sync::mpsc::Receiver<Control<P>>>,
    /// Reads the processor's model fits so far (the scorer's), for the refit metric.
    pub(crate) fits: Option<fn(&P) -> u64>,
}

/// Why a stage stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A Kafka client could not be created or failed for good.
    #[error("stage {stage}: Kafka: {source}")]
    Kafka {
        /// The stage.
        stage: &'static str,
        /// The client error.
        source: KafkaError,
    },
    /// An output could not be delivered. Its input's offset was not stored, so a restart redoes it.
    #[error("stage {stage}: output for {topic}[{partition}]@{offset} not delivered: {source}")]
    Delivery {
        /// The stage.
        stage: &'static str,
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Input offset.
        offset: i64,
        /// The producer error.
        source: KafkaError,
    },
    /// A stateful stage runs only with a checkpoint store.
    #[error("stage {stage} keeps state and needs Postgres for its checkpoints")]
    NoCheckpointStore {
        /// The stage.
        stage: &'static str,
    },
    /// A checkpoint could not be read or written. Nothing past the last written checkpoint
    /// was acknowledged, so a restart resumes from it.
    #[error("stage {stage}: checkpoint of partition {partition}: {source}")]
    Checkpoint {
        /// The stage.
        stage: &'static str,
        /// The partition.
        partition: i32,
        /// The database error.
        source: sqlx::Error,
    },
    /// A checkpoint was read but the processor cannot restore it (e.g. written by an
    /// incompatible version). Delete the stage's rows in `stage_state` to start it afresh.
    #[error("stage {stage}: partition {partition}: {source}")]
    Restore {
        /// The stage.
        stage: &'static str,
        /// The partition.
        partition: i32,
        /// Why.
        source: foresight_events::StateError,
    },
}

/// What a stage did, reported when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StageReport {
    /// Input messages read.
    pub messages: u64,
    /// Events produced.
    pub events: u64,
    /// Dead letters produced.
    pub dead_letters: u64,
}

/// Live counters of one stage, readable while it runs (by health checks, metrics, benchmarks).
#[derive(Debug, Default)]
pub struct Progress {
    /// Input messages read.
    pub messages: AtomicU64,
    /// Events produced.
    pub events: AtomicU64,
    /// Dead letters produced.
    pub dead_letters: AtomicU64,
    /// Client replacements: the watchdog found the consumer stalled, or the broker refused an
    /// output (a new producer sends it again).
    pub stalls: AtomicU64,
    /// Outputs waiting for the broker's acknowledgement (as of the last periodic store).
    pub in_flight: AtomicU64,
    /// Inputs served again behind where reading was, and skipped (already processed).
    pub redelivered: AtomicU64,
    /// Fault injection for tests: the stage takes it at its next periodic store (once), so the
    /// watchdog's detection and recovery can be exercised.
    injected: Mutex<Option<Fault>>,
    /// Forecast model fits so far (the scoring stage's).
    pub refits: AtomicU64,
    /// When the stage last read an input (Unix milliseconds; 0: not yet), for stall detection.
    pub last_read_ms: AtomicI64,
    /// The stage's consumer: the partitions it owns and their lag.
    pub consumer: Arc<ConsumerState>,
    /// Dead letters by error class.
    by_class: Mutex<BTreeMap<&'static str, u64>>,
    /// Actuation outcomes by (actuator, status).
    by_outcome: Mutex<BTreeMap<(String, &'static str), u64>>,
}

/// A fault a test can inject into a running stage ([`Progress::inject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pause every partition the consumer owns, as a wedged fetcher would.
    PauseConsumer,
    /// Take the next output's acknowledgement for a refusal by the broker (an unknown broker
    /// error, as tansu answered the first produce requests after it restarted).
    RefuseDelivery,
}

impl Progress {
    /// Injects `fault` into the running stage (tests).
    pub fn inject(&self, fault: Fault) {
        *self.injected.lock().unwrap_or_else(PoisonError::into_inner) = Some(fault);
    }

    /// The fault injected and not yet taken, if any.
    fn injected(&self) -> Option<Fault> {
        *self.injected.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the fault injected, if any: a consumer's is applied to `consumer` here, the
    /// others are returned for the stage to apply.
    pub(crate) fn take_fault(
        &self,
        stage: &str,
        consumer: &StreamConsumer<RebalanceContext>,
    ) -> Option<Fault> {
        let fault = self
            .injected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        tracing::warn!(stage, ?fault, "Fault injected.");
        match fault {
            Fault::PauseConsumer => {
                if let Err(e) = consumer
                    .assignment()
                    .and_then(|owned| consumer.pause(&owned))
                {
                    tracing::warn!(stage, error = %e, "Could not pause.");
                }
                None
            }
            other => Some(other),
        }
    }

    /// Dead letters so far, by error class.
    pub fn dead_letters_by_class(&self) -> BTreeMap<&'static str, u64> {
        self.by_class
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Actuation outcomes so far, by (actuator, status).
    pub fn actuations(&self) -> BTreeMap<(String, &'static str), u64> {
        self.by_outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counts an actuation outcome.
    pub(crate) fn actuation(&self, actuator: &str, status: &'static str) {
        *self
            .by_outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((actuator.to_owned(), status))
            .or_default() += 1;
    }
}

impl StageReport {
    pub(crate) fn message(&mut self, p: &Progress) {
        self.messages += 1;
        p.messages.fetch_add(1, Ordering::Relaxed);
        p.last_read_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }
    pub(crate) fn event(&mut self, p: &Progress) {
        self.events += 1;
        p.events.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dead_letter(&mut self, p: &Progress, class: ErrorClass) {
        self.dead_letters += 1;
        p.dead_letters.fetch_add(1, Ordering::Relaxed);
        *p.by_class
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(class.as_str())
            .or_default() += 1;
    }
}

/// A refused message comes back with its error, to be sent again.
type Refused = (KafkaError, Option<rdkafka::message::OwnedMessage>);
type Delivery = Pin<Box<dyn Future<Output = (InputPartition, i64, Result<(), Refused>)> + Send>>;

/// Enqueues a message again as it was (topic, key, payload, headers): one the broker refused.
pub(crate) async fn enqueue_again(
    outputs: &mut kafka::Outputs,
    message: &rdkafka::message::OwnedMessage,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    let mut record =
        FutureRecord::to(message.topic()).payload(message.payload().unwrap_or_default());
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(headers) = message.headers() {
        record = record.headers(headers.clone());
    }
    enqueue(outputs, record).await
}

/// Whether an undelivered output stands for a refusal (counted, and sent again by a new producer
/// after a pause), rather than for a producer replaced already: purged from its queue, or failed
/// by the fatal error of a producer replaced since (those are only sent again by the current one).
pub(crate) fn refusal(e: &KafkaError, outputs: &kafka::Outputs) -> bool {
    !purged(e) && (!kafka::fatal(e) || outputs.failed())
}

/// Whether a delivery failed only because its producer was replaced (its queue purged).
pub(crate) fn purged(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight
        )
    )
}

/// The acknowledgement of one output of the input at `offset` of `partition`.
fn delivered(
    delivery: rdkafka::producer::DeliveryFuture,
    partition: InputPartition,
    offset: i64,
) -> Delivery {
    Box::pin(async move {
        let result = match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, message))) => Err((e, Some(message))),
            Err(_) => Err((KafkaError::Canceled, None)),
        };
        (partition, offset, result)
    })
}

/// Headers of an event message (CloudEvents structured mode), with the W3C trace context of
/// the processing that produced it.
pub(crate) fn event_headers(traceparent: &str) -> OwnedHeaders {
    OwnedHeaders::new()
        .insert(Header {
            key: "content-type",
            value: Some(CLOUDEVENTS_CONTENT_TYPE),
        })
        .insert(Header {
            key: telemetry::TRACEPARENT,
            value: Some(traceparent),
        })
}

/// The original message's headers, then the dead letter's own (source, class, reason).
fn dead_letter_headers(dl: &DeadLetter, original: &BorrowedMessage<'_>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(h) = original.headers() {
        for header in h.iter() {
            if !header.key.starts_with(DeadLetter::HEADER_PREFIX) {
                headers = headers.insert(header);
            }
        }
    }
    dl.headers().iter().fold(headers, |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        })
    })
}

/// Enqueues a record, waiting while the producer's local queue is full, and through a new
/// producer if the one in use has failed for good (a refusal made it fail: see
/// [`kafka::producer`]).
pub(crate) async fn enqueue<K: rdkafka::message::ToBytes + ?Sized>(
    outputs: &mut kafka::Outputs,
    mut record: FutureRecord<'_, K, [u8]>,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    let mut replaced = 0;
    loop {
        match outputs.producer().send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // A new producer is never failed: a bound only against the unforeseen.
            Err((e, r)) if kafka::fatal(&e) && replaced < 3 => {
                tracing::warn!(error = %e, "Producer failed; replacing it.");
                outputs.replace()?;
                replaced += 1;
                record = r;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

fn store<I>(
    consumer: &StreamConsumer<RebalanceContext>,
    inputs: &[Input<I>],
    storable: Vec<(InputPartition, i64)>,
) {
    if storable.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (source, offset) in storable {
        let topic = &inputs[usize::from(source.input)].topic;
        if let Err(e) = tpl.add_partition_offset(topic, source.partition, Offset::Offset(offset)) {
            tracing::warn!(%topic, partition = source.partition, error = %e, "Could not note an offset to store.");
        }
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // Happens only for a partition revoked a moment ago; its new owner re-reads from the last commit.
        tracing::debug!(error = %e, "Offsets not stored.");
    }
}

/// A checkpoint taken, waiting for the outputs before its offsets to be acknowledged.
struct Pending {
    partition: i32,
    offsets: Vec<(InputPartition, i64)>,
    /// Every input partition's position when it was taken: a processor's state may change on
    /// another partition's input (the fleet stage closes rounds across partitions), so the
    /// checkpoint is written only once every output emitted before it is acknowledged.
    requires: Vec<(InputPartition, i64)>,
    changes: Vec<foresight_events::StateChange>,
}

/// The checkpointing of a stateful stage.
struct Checkpoints {
    store: CheckpointStore,
    /// Partitions restored (so owned) by this instance.
    restored: std::collections::BTreeSet<i32>,
    /// Per input partition, the checkpoint's offset: input before it is already in the state.
    skip_before: std::collections::HashMap<InputPartition, i64>,
    /// Per input partition restored and not yet read from its checkpoint's offset: the
    /// consumer may start past it (its group's committed offset is not the checkpoint's), and is
    /// then moved back to it.
    resume_at: Resume<InputPartition>,
    pending: Vec<Pending>,
    /// Offsets of each partition's last written checkpoint, to skip checkpoints with no news.
    written: std::collections::HashMap<i32, Vec<(InputPartition, i64)>>,
    last_taken: tokio::time::Instant,
    /// This instance, as its claims name it.
    owner: String,
    /// The epoch of this instance's claim on each restored partition.
    epochs: std::collections::HashMap<i32, i64>,
    /// Fenced since the runner last asked, for it to drop their state and in-flight offsets.
    newly_fenced: Vec<i32>,
}

impl Checkpoints {
    /// Restores `partition` from its last checkpoint, if this instance has not yet.
    async fn ensure_restored<P: Processor>(
        &mut self,
        stage: &mut LiveStage<P>,
        partition: i32,
    ) -> Result<(), StageError> {
        if self.restored.contains(&partition) {
            return Ok(());
        }
        let topics: Vec<String> = stage.inputs.iter().map(|i| i.topic.clone()).collect();
        let restored = self
            .store
            .load(partition, &topics, &self.owner)
            .await
            .map_err(|source| StageError::Checkpoint {
                stage: stage.name,
                partition,
                source,
            })?;
        let entries = restored.entries.len();
        stage
            .processor
            .restore(partition, restored.entries)
            .map_err(|source| StageError::Restore {
                stage: stage.name,
                partition,
                source,
            })?;
        let mut offsets = Vec::new();
        for (i, topic) in topics.iter().enumerate() {
            if let Some(&next) = restored.offsets.get(topic) {
                let source = InputPartition {
                    input: i as u16,
                    partition,
                };
                self.skip_before.insert(source, next);
                self.resume_at.expect(source, next);
                offsets.push((source, next));
            }
        }
        tracing::info!(stage = stage.name, partition, entries, epoch = restored.epoch, offsets = ?restored.offsets, "Restored the partition's checkpoint.");
        self.written.insert(partition, offsets);
        self.epochs.insert(partition, restored.epoch);
        self.restored.insert(partition);
        Ok(())
    }

    /// Where to move the consumer back to, if input `offset` of `source` comes after the
    /// restored checkpoint's offset with the input between not yet read (it would be lost).
    fn rewind_to(&mut self, source: InputPartition, offset: i64) -> Option<Rewind> {
        self.resume_at.check(&source, offset)
    }

    /// If the input is already in the restored state: the restored checkpoint's offset.
    fn folded_until(&self, source: InputPartition, offset: i64) -> Option<i64> {
        self.skip_before
            .get(&source)
            .copied()
            .filter(|&next| offset < next)
    }

    /// Where the restored checkpoint of `source`'s partition goes on reading `source`.
    fn resumes_at(&self, source: InputPartition) -> Option<i64> {
        self.skip_before.get(&source).copied()
    }

    /// Drops what this instance knows of `partition` (revoked, or claimed by another).
    fn forget(&mut self, partition: i32) {
        self.restored.remove(&partition);
        self.skip_before.retain(|s, _| s.partition != partition);
        self.resume_at.forget(|s| s.partition == partition);
        self.pending.retain(|p| p.partition != partition);
        // Its outputs are no longer this instance's to wait for (else the other partitions'
        // checkpoints would wait for them for ever).
        for p in &mut self.pending {
            p.requires.retain(|(s, _)| s.partition != partition);
        }
        self.written.remove(&partition);
        self.epochs.remove(&partition);
    }

    /// Another instance has claimed `partition` since: drop what this one holds of it. Should
    /// its input still come here (the broker has not revoked it yet, or assigned it to both for
    /// a while), it is claimed again and restored from the other's last checkpoint, from whose
    /// offsets the consumer reads again: work is redone, never lost or folded twice.
    fn fence(&mut self, partition: i32) {
        self.forget(partition);
        self.newly_fenced.push(partition);
    }

    /// Takes a checkpoint of every owned partition (unless one is still pending).
    fn take<P: Processor>(&mut self, processor: &mut P, tracker: &OffsetTracker) {
        if !self.pending.is_empty() {
            return;
        }
        let requires: Vec<(InputPartition, i64)> = self
            .restored
            .iter()
            .flat_map(|&p| tracker.positions(p))
            .collect();
        for &partition in &self.restored {
            let changes = processor.checkpoint(partition);
            let offsets = tracker.positions(partition);
            if changes.is_empty() && self.written.get(&partition) == Some(&offsets) {
                continue;
            }
            self.pending.push(Pending {
                partition,
                offsets,
                requires: requires.clone(),
                changes,
            });
        }
        self.last_taken = tokio::time::Instant::now();
    }

    /// The checkpoint of a stopping stage: what is pending, then the state as it is now.
    async fn last<P: Processor>(
        &mut self,
        processor: &mut P,
        stage: &'static str,
        topics: &[String],
        tracker: &OffsetTracker,
    ) -> Result<Vec<(InputPartition, i64)>, StageError> {
        let mut storable = self.write_ready(stage, topics, tracker).await?;
        self.take(processor, tracker);
        storable.extend(self.write_ready(stage, topics, tracker).await?);
        Ok(storable)
    }

    /// Writes the pending checkpoints (taken together) once the outputs emitted before them are
    /// all acknowledged, in one transaction, and returns the offsets that may now be stored in
    /// Kafka too.
    async fn write_ready(
        &mut self,
        stage: &'static str,
        topics: &[String],
        tracker: &OffsetTracker,
    ) -> Result<Vec<(InputPartition, i64)>, StageError> {
        let mut storable = Vec::new();
        loop {
            let ready = self
                .pending
                .iter()
                .take_while(|c| {
                    c.offsets
                        .iter()
                        .chain(&c.requires)
                        .all(|(source, next)| tracker.done_until(*source, *next))
                })
                .count();
            if ready == 0 {
                break;
            }
            // Removed only once written: a failed write (Postgres away) is retried next time,
            // and meanwhile no offset past it is stored.
            let offsets: Vec<Vec<(String, i64)>> = self.pending[..ready]
                .iter()
                .map(|c| {
                    c.offsets
                        .iter()
                        .map(|(s, next)| (topics[usize::from(s.input)].clone(), *next))
                        .collect()
                })
                .collect();
            let batch: Vec<Checkpoint<'_>> = self.pending[..ready]
                .iter()
                .zip(&offsets)
                .map(|(c, offsets)| Checkpoint {
                    partition: c.partition,
                    epoch: self.epochs.get(&c.partition).copied().unwrap_or_default(),
                    offsets,
                    changes: &c.changes,
                })
                .collect();
            match self.store.save_all(&batch).await {
                Ok(()) => {}
                Err(SaveError::Database(source)) => {
                    return Err(StageError::Checkpoint {
                        stage,
                        partition: self.pending[0].partition,
                        source,
                    });
                }
                Err(fenced @ SaveError::Fenced { partition, .. }) => {
                    tracing::warn!(stage, partition, reason = %fenced, "Checkpoint not written: another instance has claimed the partition; its state here is dropped (restored again if its input still comes here).");
                    self.fence(partition);
                    continue;
                }
            }
            for c in self.pending.drain(..ready) {
                tracing::debug!(
                    stage,
                    partition = c.partition,
                    entries = c.changes.len(),
                    epoch = self.epochs.get(&c.partition).copied().unwrap_or_default(),
                    offsets = ?c.offsets,
                    "Checkpoint written."
                );
                storable.extend(c.offsets.iter().copied());
                self.written.insert(c.partition, c.offsets);
            }
        }
        Ok(storable)
    }
}

/// Runs a stage until `shutdown` is cancelled, then drains in-flight outputs, stores and commits
/// offsets (stateful stages: writes a last checkpoint) and flushes the producer.
pub(crate) async fn run<P>(
    mut stage: LiveStage<P>,
    kafka_config: &KafkaConfig,
    runner: &RunnerConfig,
    progress: &Progress,
    shutdown: CancellationToken,
    pool: Option<sqlx::PgPool>,
) -> Result<StageReport, StageError>
where
    P: Processor + Send,
    P::Output: Routed,
{
    let name = stage.name;
    let group = format!("{}{}", kafka_config.group_prefix, name);
    let mut checkpoints = match (stage.processor.stateful(), pool) {
        (false, _) => None,
        (true, Some(pool)) => Some(Checkpoints {
            store: CheckpointStore::new(pool, group.clone()),
            restored: Default::default(),
            skip_before: Default::default(),
            resume_at: Default::default(),
            pending: Vec::new(),
            written: Default::default(),
            last_taken: tokio::time::Instant::now(),
            owner: format!(
                "{}/{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
                std::process::id()
            ),
            epochs: Default::default(),
            newly_fenced: Vec::new(),
        }),
        (true, None) => return Err(StageError::NoCheckpointStore { stage: name }),
    };
    let err = |source| StageError::Kafka {
        stage: name,
        source,
    };
    // Ends of partitions are reported only to processors that wait for every partition.
    let eof = stage.processor.watches_partitions();
    // Partitions a processor holds are paused here (see `hold` below).
    stage.processor.hold_partitions();
    let mut consumer =
        kafka::consumer_with(kafka_config, &group, eof, progress.consumer.clone()).map_err(err)?;
    let latency = telemetry::Latency::new(name);
    let mut producer = kafka::Outputs::new(kafka_config).map_err(err)?;
    let topics: Vec<&str> = stage.inputs.iter().map(|i| i.topic.as_str()).collect();
    consumer.subscribe(&topics).map_err(err)?;
    let mut resumer = kafka::Resumer::new(stage.processor.stateful());
    let input_topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    let input_index = |topic: &str| {
        input_topics
            .iter()
            .position(|t| t == topic)
            .map(|i| i as u16)
    };
    let source = format!("/foresight/{name}");
    tracing::info!(stage = name, inputs = ?topics, outputs = ?stage.outputs, %group, "Stage started.");

    let mut tracker = OffsetTracker::default();
    let mut deliveries: FuturesUnordered<Delivery> = FuturesUnordered::new();
    let mut tick = tokio::time::interval(runner.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out: Vec<Output<P::Output>> = Vec::new();
    let mut report = StageReport::default();
    let mut failure: Option<StageError> = None;

    // The newest input read from the first input, to which outputs a processor emits when told a
    // partition is caught up are attributed.
    let mut last_read: Option<(InputPartition, i64)> = None;
    // The trace context of the newest input's processing, which those outputs carry on.
    let mut last_traceparent = telemetry::new_traceparent();
    let mut next_read: std::collections::HashMap<i32, i64> = Default::default();
    // First-input partitions caught up, as last told to the processor.
    let mut idle: std::collections::BTreeSet<i32> = Default::default();
    // First-input partitions found caught up, and since when (told once it lasts the grace).
    let mut caught_up_at: std::collections::BTreeMap<i32, tokio::time::Instant> =
        Default::default();
    // The watchdog, and the stall it found (handled at the top of the loop).
    let mut watchdog = Watchdog::new(name, runner.stall_timeout);
    let mut stalled: Option<Stall> = None;
    // Outputs refused by the broker since one was last delivered.
    let mut undelivered = 0;
    // An injected fault (tests): the next acknowledgement taken for a refusal of the output
    // copied here.
    let mut refusing = false;
    // The output copied for it, and the input it came from: the refusal is injected on that
    // input's acknowledgement only (one enqueued before the fault has no copy to send again).
    let mut refused_copy: Option<(InputPartition, i64, rdkafka::message::OwnedMessage)> = None;
    // Partitions whose input is being served again (warned once per run of it).
    let mut served_again: std::collections::HashSet<InputPartition> = Default::default();
    // Partitions of a replaced consumer, to forget as if revoked.
    let mut dropped: Vec<(String, i32)> = Vec::new();
    // First-input partitions paused because the processor holds them.
    let mut paused: std::collections::BTreeSet<i32> = Default::default();
    // The consumer paused whole by an injected fault (tests): holds are left alone.
    let mut wedged = false;
    // First-input partitions the others were held for, found delivering nothing for the grace
    // (told to the processor as idle at the top of the loop).
    let mut given_up: Vec<i32> = Vec::new();
    // When the first input last delivered (or a hold began): other inputs (observed edges)
    // may flow on while the partitions waited for deliver nothing.
    let mut first_input_at = tokio::time::Instant::now();
    loop {
        if let Some(Stall::Reading { .. }) = stalled.take() {
            // Let what is in flight land (bounded), store its offsets and commit them, so the
            // new consumer resumes right after the work done.
            let _ = tokio::time::timeout(runner.drain_timeout, async {
                while let Some((partition, offset, result)) = deliveries.next().await {
                    if result.is_ok() {
                        tracker.ack(partition, offset);
                    }
                }
            })
            .await;
            let storable = match &mut checkpoints {
                None => tracker.storable(),
                Some(c) => c
                    .write_ready(name, &input_topics, &tracker)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::warn!(stage = name, error = %e, "Checkpoint not written; the new consumer resumes from the last one.");
                        Vec::new()
                    }),
            };
            store(&consumer, &stage.inputs, storable);
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(stage = name, error = %e, "Commit before replacing the consumer failed.");
            }
            dropped = kafka::owned(&consumer);
            let fresh =
                match kafka::consumer_with(kafka_config, &group, eof, progress.consumer.clone()) {
                    Ok(c) => c,
                    Err(source) => {
                        failure = Some(StageError::Kafka {
                            stage: name,
                            source,
                        });
                        break;
                    }
                };
            // Closing the old one leaves the group (it may wait briefly for the coordinator).
            tokio::task::block_in_place(|| drop(std::mem::replace(&mut consumer, fresh)));
            resumer = kafka::Resumer::new(stage.processor.stateful());
            let refs: Vec<&str> = input_topics.iter().map(String::as_str).collect();
            if let Err(source) = consumer.subscribe(&refs) {
                failure = Some(StageError::Kafka {
                    stage: name,
                    source,
                });
                break;
            }
            tracing::info!(stage = name, partitions = ?dropped, "Stalled consumer replaced; rejoining the group.");
            watchdog.replaced();
            paused.clear();
            wedged = false;
        }
        // A replaced consumer's partitions first, then the rebalances in the order they came.
        let changes = std::mem::take(&mut dropped)
            .into_iter()
            .map(|(t, p)| Rebalanced::Revoked(t, p))
            .chain(consumer.context().take_changes());
        for change in changes {
            let (topic, partition) = match change {
                Rebalanced::Assigned(topic, partition) => {
                    if input_index(&topic) == Some(0) {
                        stage.processor.assigned(partition);
                        // Assigned anew: read it (librdkafka keeps a partition paused across
                        // a revocation and a new assignment).
                        paused.remove(&partition);
                        resume(name, &consumer, &topic, &[partition]);
                    }
                    continue;
                }
                Rebalanced::Revoked(topic, partition) => (topic, partition),
            };
            resumer.forget(&topic, partition);
            if let Some(input) = input_index(&topic) {
                tracker.revoke(InputPartition { input, partition });
                stage.processor.forget_partition(partition);
                if input == 0 {
                    idle.remove(&partition);
                    caught_up_at.remove(&partition);
                    next_read.remove(&partition);
                }
                if let Some(c) = &mut checkpoints {
                    c.forget(partition);
                }
            }
        }
        for partition in checkpoints
            .as_mut()
            .map(|c| std::mem::take(&mut c.newly_fenced))
            .unwrap_or_default()
        {
            // Its outputs in flight land or not; their offsets are never stored here.
            for input in 0..stage.inputs.len() as u16 {
                tracker.revoke(InputPartition { input, partition });
            }
            stage.processor.forget_partition(partition);
            idle.remove(&partition);
            caught_up_at.remove(&partition);
            next_read.remove(&partition);
        }
        // Partitions caught up for the grace period: the processor need not wait for them.
        // Nor for those that delivered nothing for as long while the others were held for them.
        let due: Vec<(i32, bool)> = caught_up_at
            .iter()
            .filter(|(_, since)| since.elapsed() >= runner.idle_grace)
            .map(|(p, _)| (*p, true))
            .chain(given_up.drain(..).map(|p| (p, false)))
            .collect();
        for (p, at_end) in due {
            caught_up_at.remove(&p);
            // Still at the end (input written since is read soon; wait for its end again)?
            if (at_end
                && !tokio::task::block_in_place(|| {
                    caught_up(&consumer, &input_topics[0], p, &next_read)
                }))
                || !idle.insert(p)
            {
                continue;
            }
            stage.processor.idle(p, &mut out);
            if !out.is_empty() {
                let Some((at, at_offset)) = last_read else {
                    tracing::error!(stage = name, "Outputs without any input read; dropped.");
                    out.clear();
                    continue;
                };
                tracker.read(at, at_offset, out.len());
                for output in out.drain(..) {
                    let Output::Event(data) = output else {
                        tracing::error!(stage = name, "A rejection without an input; dropped.");
                        tracker.ack(at, at_offset);
                        continue;
                    };
                    report.event(progress);
                    latency.record(data.event_time());
                    let m = data.into_message(&source);
                    let record = FutureRecord::to(&stage.outputs[m.route])
                        .key(m.key.as_str())
                        .payload(m.payload.as_slice())
                        .headers(event_headers(&last_traceparent));
                    match enqueue(&mut producer, record).await {
                        Ok(d) => deliveries.push(delivered(d, at, at_offset)),
                        Err(e) => {
                            failure = Some(StageError::Delivery {
                                stage: name,
                                topic: input_topics[0].clone(),
                                partition: at.partition,
                                offset: at_offset,
                                source: e,
                            });
                            break;
                        }
                    }
                }
                if failure.is_some() {
                    break;
                }
            }
        }
        if failure.is_some() {
            break;
        }
        if !wedged {
            let (began, resumed) = hold(
                name,
                &consumer,
                &input_topics[0],
                stage.processor.held(),
                &mut paused,
            );
            if began {
                first_input_at = tokio::time::Instant::now();
            }
            // A resumed partition is fetched again from where reading was: a broker may serve
            // that fetch from past it (tansu, from the next record batch), so reading must be
            // seen to go on from there, as after a restore (moved back if it does not).
            if let Some(c) = &mut checkpoints {
                for p in resumed {
                    let key = InputPartition {
                        input: 0,
                        partition: p,
                    };
                    if let (false, Some(&next)) = (c.resume_at.pending(&key), next_read.get(&p)) {
                        c.resume_at.expect(key, next);
                    }
                }
            }
        }
        tokio::select! {
            // Shutdown first, then acknowledgements (they free in-flight room and let offsets
            // advance), then the periodic store, and only then new input.
            biased;
            () = shutdown.cancelled() => break,
            Some(change) = recv_control(&mut stage.control) => change(&mut stage.processor),
            Some((partition, offset, result)) = deliveries.next(), if !deliveries.is_empty() => {
                let result = match result {
                    // An injected refusal (tests): the output landed, and is sent again too.
                    Ok(()) if refused_copy
                        .as_ref()
                        .is_some_and(|(p, o, _)| *p == partition && *o == offset) =>
                    {
                        refusing = false;
                        Err((
                            KafkaError::MessageProduction(RDKafkaErrorCode::Unknown),
                            refused_copy.take().map(|(_, _, m)| m),
                        ))
                    }
                    other => other,
                };
                let source = match result {
                    Ok(()) => {
                        tracker.ack(partition, offset);
                        watchdog.acknowledged();
                        undelivered = 0;
                        continue;
                    }
                    // The broker refused an output (seen: an unknown broker error as the broker
                    // stopped or right after it restarted). It is sent again, as it was, by a
                    // new producer after a pause; the old producer's outputs in flight come back
                    // purged and are sent again too. (Reading the input again instead, with a
                    // new consumer, made the fleet stage close a round again without all of its
                    // entities: another content under the same id.) Only a final refusal stops
                    // the stage.
                    Err((e, Some(message))) if purged(&e) || !refused_for_good(&e) => {
                        if refusal(&e, &producer) {
                            undelivered += 1;
                            tracing::warn!(stage = name, error = %e, topic = message.topic(), attempt = undelivered, "Output not delivered; sending it again with a new producer.");
                            progress.stalls.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(resend_pause(undelivered)).await;
                            if let Err(source) = producer.replace() {
                                failure = Some(StageError::Kafka { stage: name, source });
                                break;
                            }
                        }
                        match enqueue_again(&mut producer, &message).await {
                            Ok(d) => {
                                deliveries.push(delivered(d, partition, offset));
                                continue;
                            }
                            Err(source) => source,
                        }
                    }
                    Err((source, _)) => source,
                };
                failure = Some(StageError::Delivery {
                    stage: name,
                    topic: stage.inputs[usize::from(partition.input)].topic.clone(),
                    partition: partition.partition,
                    offset,
                    source,
                });
                break;
            }
            _ = tick.tick() => {
                if let Some(fits) = stage.fits {
                    progress.refits.store(fits(&stage.processor), Ordering::Relaxed);
                }
                let storable = match &mut checkpoints {
                    None => tracker.storable(),
                    Some(c) => {
                        if c.last_taken.elapsed() >= runner.checkpoint_interval {
                            c.take(&mut stage.processor, &tracker);
                        }
                        // Postgres away: the checkpoint stays pending and is written on a later
                        // tick; meanwhile no offset past it is stored anywhere.
                        c.write_ready(name, &input_topics, &tracker).await.unwrap_or_else(|e| {
                            tracing::warn!(stage = name, error = %e, "Checkpoint not written; retrying.");
                            Vec::new()
                        })
                    }
                };
                store(&consumer, &stage.inputs, storable);
                // A paused consumer (injected) stays paused whatever the processor holds, until
                // the watchdog replaces it.
                let pausing = progress.injected() == Some(Fault::PauseConsumer);
                match progress.take_fault(name, &consumer) {
                    Some(Fault::RefuseDelivery) => refusing = true,
                    None if pausing => wedged = true,
                    _ => {}
                }
                progress.in_flight.store(tracker.in_flight() as u64, Ordering::Relaxed);
                if !wedged && !paused.is_empty() && first_input_at.elapsed() >= runner.idle_grace {
                    // The partitions the held ones wait for delivered nothing for the grace
                    // (their input does not come): the processor stops waiting for them until
                    // they deliver again, as for a partition caught up.
                    given_up = kafka::owned(&consumer)
                        .into_iter()
                        .filter(|(t, p)| {
                            input_index(t) == Some(0) && !paused.contains(p) && !idle.contains(p)
                        })
                        .map(|(_, p)| p)
                        .collect();
                    tracing::warn!(stage = name, held = ?paused, waited_for = ?given_up, grace = ?runner.idle_grace, "Partitions held for others that delivered nothing: those are now taken as caught up.");
                    first_input_at = tokio::time::Instant::now();
                }
                if let Some(stall) = watchdog.check(&consumer, tracker.in_flight(), runner.max_in_flight) {
                    progress.stalls.fetch_add(1, Ordering::Relaxed);
                    stalled = Some(stall);
                }
            }
            message = resumer.recv(name, &consumer), if tracker.in_flight() < runner.max_in_flight => {
                let message = match message {
                    Ok(Some(m)) => {
                        watchdog.read();
                        m
                    }
                    // A rebalance to take first (at the top of the loop).
                    Ok(None) => continue,
                    Err(KafkaError::PartitionEOF(p)) => {
                        watchdog.read();
                        // The end of partition `p` of some input: if it is the first input's,
                        // the processor need not wait for that partition any more, once it has
                        // stayed caught up for `runner.idle_grace` (checked at the top of the
                        // loop). (The end reported may be another input's: ask the broker for
                        // the first input's end. Once per end reached, and only for partitions
                        // not already known to be caught up.)
                        if idle.contains(&p) || caught_up_at.contains_key(&p) {
                            continue;
                        }
                        // A partition read to its end by an earlier owner (this process's
                        // replaced consumer, or another instance) brings no message to restore
                        // its checkpoint on: restore it here, or the state it holds (a round's
                        // pending scores) would be missing, and waited for, for ever.
                        if let Some(c) = &mut checkpoints
                            && kafka::owned(&consumer).iter().any(|(t, q)| *q == p && input_index(t).is_some())
                        {
                            if let Err(e) = restore_retrying(c, &mut stage, p, &shutdown).await {
                                failure = Some(e);
                                break;
                            }
                            // Nothing read from it yet: its input goes on where the checkpoint
                            // does.
                            let first = InputPartition { input: 0, partition: p };
                            if let (false, Some(next)) = (next_read.contains_key(&p), c.resumes_at(first)) {
                                next_read.insert(p, next);
                            }
                        }
                        if tokio::task::block_in_place(|| caught_up(&consumer, &input_topics[0], p, &next_read)) {
                            caught_up_at.insert(p, tokio::time::Instant::now());
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(stage = name, error = %e, "Consumer error; retrying.");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                report.message(progress);
                let Some(input) = input_index(message.topic()) else {
                    continue; // Not subscribed (cannot happen); never stored either.
                };
                let partition = InputPartition { input, partition: message.partition() };
                let offset = message.offset();
                if input == 0 {
                    first_input_at = tokio::time::Instant::now();
                    next_read.insert(partition.partition, offset + 1);
                    idle.remove(&partition.partition);
                    caught_up_at.remove(&partition.partition);
                }
                if let Some(c) = &mut checkpoints {
                    if let Err(e) = restore_retrying(c, &mut stage, partition.partition, &shutdown).await {
                        failure = Some(e);
                        break;
                    }
                    if let Some(rewind) = c.rewind_to(partition, offset)
                        && kafka::move_back(name, &consumer, &mut c.resume_at, &partition, message.topic(), partition.partition, offset, rewind)
                    {
                        // Fetched before the consumer was moved back, or moved back to the
                        // checkpoint's offset (from further back if the broker served past it):
                        // this input comes again.
                        if let (0, Rewind::Seek { to, .. }) = (input, rewind) {
                            next_read.insert(partition.partition, to);
                        }
                        continue;
                    }
                    if let Some(next) = c.folded_until(partition, offset) {
                        // Read on from the checkpoint's offset, not from this input's: a
                        // checkpoint taken now must not say the state is older than it is (a
                        // successor would fold this input again).
                        tracker.read(partition, next - 1, 0);
                        continue;
                    }
                }
                // Input before the partition's position was read already (the broker or the
                // client served it again): skipped, so it is neither folded twice nor, its
                // windows closed since, dead-lettered as late.
                if let Some(expected) = tracker.already_read(partition, offset) {
                    if served_again.insert(partition) {
                        tracing::warn!(stage = name, topic = message.topic(), partition = partition.partition, offset, expected, "Input served again, behind where reading is; skipped (already processed).");
                    }
                    progress.redelivered.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                served_again.remove(&partition);
                // One span per input processed, in the input's trace.
                let parent = telemetry::extract(message.headers());
                let span = telemetry::input_span(name, message.topic(), partition.partition, offset, &parent);
                span.in_scope(|| process(&mut stage, input, &message, &mut out));
                let traceparent = telemetry::traceparent(&span, &parent);
                drop(span);
                tracker.read(partition, offset, out.len());
                for output in out.drain(..) {
                    let enqueued = match output {
                        Output::Event(data) => {
                            report.event(progress);
                            latency.record(data.event_time());
                            let m = data.into_message(&source);
                            if refusing && refused_copy.is_none() {
                                refused_copy = Some((partition, offset, rdkafka::message::OwnedMessage::new(
                                    Some(m.payload.clone()),
                                    Some(m.key.as_bytes().to_vec()),
                                    stage.outputs[m.route].clone(),
                                    rdkafka::Timestamp::NotAvailable,
                                    -1,
                                    -1,
                                    Some(event_headers(&traceparent)),
                                )));
                            }
                            let record = FutureRecord::to(&stage.outputs[m.route])
                                .key(m.key.as_str())
                                .payload(m.payload.as_slice())
                                .headers(event_headers(&traceparent));
                            enqueue(&mut producer, record).await
                        }
                        Output::Rejected(rejection) => {
                            report.dead_letter(progress, rejection.class);
                            let dl = dead_letter(name, &message, rejection, runner.dead_letter_max_bytes);
                            tracing::debug!(stage = name, class = dl.error_class.as_str(), reason = %dl.reason, "Dead letter.");
                            let mut record = FutureRecord::to(&stage.dead_letters)
                                .payload(dl.payload.as_slice())
                                .headers(dead_letter_headers(&dl, &message));
                            if let Some(key) = dl.key.as_deref() {
                                record = record.key(key);
                            }
                            enqueue(&mut producer, record).await
                        }
                    };
                    match enqueued {
                        Ok(d) => deliveries.push(delivered(d, partition, offset)),
                        Err(source) => {
                            failure = Some(StageError::Delivery {
                                stage: name,
                                topic: message.topic().to_owned(),
                                partition: message.partition(),
                                offset,
                                source,
                            });
                            break;
                        }
                    }
                }
                if input == 0 {
                    // Outputs a processor emits when told a partition is caught up are
                    // attributed to the newest input it processed, and carry on its trace.
                    last_read = Some((partition, offset));
                    last_traceparent = traceparent;
                }
                if failure.is_some() {
                    break;
                }
            }
        }
    }

    // Drain: wait (bounded) for what is in flight, so its offsets can be stored too.
    if failure.is_none() {
        let drained = tokio::time::timeout(runner.drain_timeout, async {
            while let Some((partition, offset, result)) = deliveries.next().await {
                if result.is_ok() {
                    tracker.ack(partition, offset);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                stage = name,
                in_flight = tracker.in_flight(),
                "Drain timed out; unacknowledged inputs will be re-read."
            );
        }
    }
    let storable = match &mut checkpoints {
        None => tracker.storable(),
        Some(c) if failure.is_none() => {
            match c
                .last(&mut stage.processor, name, &input_topics, &tracker)
                .await
            {
                Ok(storable) => storable,
                Err(e) => {
                    failure = Some(e);
                    Vec::new()
                }
            }
        }
        Some(_) => Vec::new(),
    };
    store(&consumer, &stage.inputs, storable);
    stopped(
        name,
        &consumer,
        producer.producer(),
        runner.drain_timeout,
        report,
        failure,
    )
}

/// Pauses the partitions of the first input `topic` the processor holds ([`Processor::held`])
/// and resumes those it no longer holds. Paused, a partition's input waits at the broker
/// (librdkafka drops what it had fetched of it and fetches again from the position on resume;
/// the caller checks that reading does go on from there), so nothing is lost and what is read
/// keeps its order. Returns whether a hold began, and the partitions resumed.
fn hold(
    stage: &'static str,
    consumer: &StreamConsumer<RebalanceContext>,
    topic: &str,
    held: Vec<i32>,
    paused: &mut std::collections::BTreeSet<i32>,
) -> (bool, Vec<i32>) {
    if held.len() == paused.len() && held.iter().all(|p| paused.contains(p)) {
        return (false, Vec::new());
    }
    let began = paused.is_empty();
    let held: std::collections::BTreeSet<i32> = held.into_iter().collect();
    let more: Vec<i32> = held.difference(paused).copied().collect();
    let fewer: Vec<i32> = paused.difference(&held).copied().collect();
    if !more.is_empty()
        && let Err(e) = consumer.pause(&partition_list(topic, &more))
    {
        tracing::warn!(stage, partitions = ?more, error = %e, "Could not pause held partitions; they are read on.");
    }
    resume(stage, consumer, topic, &fewer);
    if began {
        tracing::info!(stage, held = ?held, "Partitions held until the others catch up.");
    } else {
        tracing::debug!(stage, held = ?held, "Partitions held until the others catch up.");
    }
    *paused = held;
    (began, fewer)
}

/// Resumes reading `partitions` of `topic` (a partition not assigned any more is skipped).
fn resume(
    stage: &'static str,
    consumer: &StreamConsumer<RebalanceContext>,
    topic: &str,
    partitions: &[i32],
) {
    if partitions.is_empty() {
        return;
    }
    if let Err(e) = consumer.resume(&partition_list(topic, partitions)) {
        tracing::debug!(stage, partitions = ?partitions, error = %e, "Partitions not resumed (revoked since).");
    }
}

fn partition_list(topic: &str, partitions: &[i32]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition(topic, p);
    }
    tpl
}

/// Whether this consumer has read everything partition `p` of `topic` holds now (false when the
/// broker does not say).
fn caught_up(
    consumer: &StreamConsumer<RebalanceContext>,
    topic: &str,
    p: i32,
    next_read: &std::collections::HashMap<i32, i64>,
) -> bool {
    match consumer.fetch_watermarks(topic, p, Duration::from_secs(2)) {
        Ok((low, high)) => next_read.get(&p).copied().unwrap_or(low) >= high,
        Err(e) => {
            tracing::debug!(partition = p, error = %e, "End offsets unknown.");
            false
        }
    }
}

/// Restores a partition's checkpoint, waiting out a Postgres outage (with backoff, until
/// shutdown): nothing of the partition is processed meanwhile, so nothing is lost.
async fn restore_retrying<P: Processor>(
    checkpoints: &mut Checkpoints,
    stage: &mut LiveStage<P>,
    partition: i32,
    shutdown: &CancellationToken,
) -> Result<(), StageError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match checkpoints.ensure_restored(stage, partition).await {
            Err(StageError::Checkpoint { source, .. }) if !shutdown.is_cancelled() => {
                tracing::warn!(stage = stage.name, partition, error = %source, retry_in = ?backoff, "Checkpoint store unavailable; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// How a stage ends, once its offsets are stored: a last synchronous commit, the producer
/// flushed, and its report (or the failure that stopped it).
pub(crate) fn stopped<E>(
    name: &str,
    consumer: &StreamConsumer<RebalanceContext>,
    producer: &FutureProducer,
    drain_timeout: Duration,
    report: StageReport,
    failure: Option<E>,
) -> Result<StageReport, E> {
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync)
        && !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
    {
        tracing::warn!(stage = name, error = %e, "Final commit failed.");
    }
    if let Err(e) = producer.flush(drain_timeout) {
        tracing::warn!(stage = name, error = %e, "Producer flush failed.");
    }
    tracing::info!(
        stage = name,
        messages = report.messages,
        events = report.events,
        dead_letters = report.dead_letters,
        "Stage stopped."
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// The next control message, or never when there is no control channel (or it is closed).
async fn recv_control<P>(
    control: &mut Option<tokio::sync::mpsc::Receiver<Control<P>>>,
) -> Option<Control<P>> {
    match control {
        Some(rx) => match rx.recv().await {
            Some(c) => Some(c),
            None => {
                *control = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

fn process<P: Processor>(
    stage: &mut LiveStage<P>,
    input: u16,
    message: &BorrowedMessage<'_>,
    out: &mut Vec<Output<P::Output>>,
) {
    let content_type = message.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key.eq_ignore_ascii_case("content-type"))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    });
    let incoming = Incoming {
        payload: message.payload().unwrap_or_default(),
        time: message
            .timestamp()
            .to_millis()
            .and_then(DateTime::from_timestamp_millis),
        content_type,
    };
    let origin = Origin {
        input,
        partition: message.partition(),
        offset: message.offset(),
    };
    let (inputs, rejections) = (stage.inputs[usize::from(input)].decode)(incoming);
    out.extend(rejections.into_iter().map(Output::Rejected));
    let processor = &mut stage.processor;
    let run = || {
        for input in inputs {
            processor.process(input, origin, out);
        }
    };
    if stage.cpu_heavy {
        tokio::task::block_in_place(run);
    } else {
        run();
    }
}

/// Keeps a dead letter's copy of the original record within `max` bytes: a record far over the
/// size limit (say 10 MB) would otherwise be over the producer's message size too, and then
/// could never be dead-lettered, stopping the stage on it for ever. The reason says so.
pub(crate) fn cap_payload(dl: &mut DeadLetter, max: usize) {
    if dl.payload.len() > max {
        dl.reason = format!(
            "{} (payload truncated to its first {max} of {} bytes)",
            dl.reason,
            dl.payload.len()
        );
        dl.payload.truncate(max);
    }
}

fn dead_letter(
    stage: &str,
    message: &BorrowedMessage<'_>,
    rejection: Rejection,
    max_payload: usize,
) -> DeadLetter {
    let mut dl = DeadLetter {
        stage: stage.to_owned(),
        source_topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        error_class: rejection.class,
        reason: rejection.reason,
        key: message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: message.payload().unwrap_or_default().to_vec(),
    };
    cap_payload(&mut dl, max_payload);
    dl
}
