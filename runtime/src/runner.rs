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
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use chrono::{DateTime, Utc};
use foresight_events::{
    CLOUDEVENTS_CONTENT_TYPE, DeadLetter, InputPartition, Origin, Output, Processor, Rejection,
    Routed,
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
    checkpoint::CheckpointStore,
    config::{KafkaConfig, RunnerConfig},
    kafka::{self, RebalanceContext},
    offsets::OffsetTracker,
};

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
}

impl StageReport {
    pub(crate) fn message(&mut self, p: &Progress) {
        self.messages += 1;
        p.messages.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn event(&mut self, p: &Progress) {
        self.events += 1;
        p.events.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dead_letter(&mut self, p: &Progress) {
        self.dead_letters += 1;
        p.dead_letters.fetch_add(1, Ordering::Relaxed);
    }
}

type Delivery = Pin<Box<dyn Future<Output = (InputPartition, i64, Result<(), KafkaError>)> + Send>>;

/// The acknowledgement of one output of the input at `offset` of `partition`.
fn delivered(
    delivery: rdkafka::producer::DeliveryFuture,
    partition: InputPartition,
    offset: i64,
) -> Delivery {
    Box::pin(async move {
        let result = match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(KafkaError::Canceled),
        };
        (partition, offset, result)
    })
}

/// Headers of an event message (CloudEvents structured mode).
pub(crate) fn event_headers() -> OwnedHeaders {
    OwnedHeaders::new().insert(Header {
        key: "content-type",
        value: Some(CLOUDEVENTS_CONTENT_TYPE),
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

/// Enqueues a record, waiting while the producer's local queue is full.
pub(crate) async fn enqueue(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, str, [u8]>,
) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
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
    pending: Vec<Pending>,
    /// Offsets of each partition's last written checkpoint, to skip checkpoints with no news.
    written: std::collections::HashMap<i32, Vec<(InputPartition, i64)>>,
    last_taken: tokio::time::Instant,
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
            .load(partition, &topics)
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
                offsets.push((source, next));
            }
        }
        tracing::info!(stage = stage.name, partition, entries, offsets = ?restored.offsets, "Restored the partition's checkpoint.");
        self.written.insert(partition, offsets);
        self.restored.insert(partition);
        Ok(())
    }

    /// Whether the input is already in the restored state.
    fn already_folded(&self, source: InputPartition, offset: i64) -> bool {
        self.skip_before
            .get(&source)
            .is_some_and(|&next| offset < next)
    }

    fn forget(&mut self, partition: i32) {
        self.restored.remove(&partition);
        self.skip_before.retain(|s, _| s.partition != partition);
        self.pending.retain(|p| p.partition != partition);
        self.written.remove(&partition);
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

    /// Writes, in order, the pending checkpoints whose outputs are all acknowledged, and returns
    /// the offsets that may now be stored in Kafka too.
    async fn write_ready(
        &mut self,
        stage: &'static str,
        topics: &[String],
        tracker: &OffsetTracker,
    ) -> Result<Vec<(InputPartition, i64)>, StageError> {
        let mut storable = Vec::new();
        while let Some(first) = self.pending.first() {
            if !first
                .offsets
                .iter()
                .chain(&first.requires)
                .all(|(source, next)| tracker.done_until(*source, *next))
            {
                break;
            }
            let c = self.pending.remove(0);
            let offsets: Vec<(String, i64)> = c
                .offsets
                .iter()
                .map(|(s, next)| (topics[usize::from(s.input)].clone(), *next))
                .collect();
            let entries = c.changes.len();
            self.store
                .save(c.partition, &offsets, c.changes)
                .await
                .map_err(|source| StageError::Checkpoint {
                    stage,
                    partition: c.partition,
                    source,
                })?;
            tracing::debug!(
                stage,
                partition = c.partition,
                entries,
                "Checkpoint written."
            );
            storable.extend(c.offsets.iter().copied());
            self.written.insert(c.partition, c.offsets);
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
            pending: Vec::new(),
            written: Default::default(),
            last_taken: tokio::time::Instant::now(),
        }),
        (true, None) => return Err(StageError::NoCheckpointStore { stage: name }),
    };
    let err = |source| StageError::Kafka {
        stage: name,
        source,
    };
    // Ends of partitions are reported only to processors that wait for every partition.
    let eof = stage.processor.watches_partitions();
    let consumer = kafka::consumer_with(kafka_config, &group, eof).map_err(err)?;
    let producer = kafka::producer(kafka_config).map_err(err)?;
    let topics: Vec<&str> = stage.inputs.iter().map(|i| i.topic.as_str()).collect();
    consumer.subscribe(&topics).map_err(err)?;
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
    let mut next_read: std::collections::HashMap<i32, i64> = Default::default();
    // First-input partitions caught up, as last told to the processor.
    let mut idle: std::collections::BTreeSet<i32> = Default::default();
    loop {
        for (topic, partition) in consumer.context().take_assigned() {
            if input_index(&topic) == Some(0) {
                stage.processor.assigned(partition);
            }
        }
        for (topic, partition) in consumer.context().take_revoked() {
            if let Some(input) = input_index(&topic) {
                tracker.revoke(InputPartition { input, partition });
                stage.processor.forget_partition(partition);
                if input == 0 {
                    idle.remove(&partition);
                    next_read.remove(&partition);
                }
                if let Some(c) = &mut checkpoints {
                    c.forget(partition);
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
                match result {
                    Ok(()) => tracker.ack(partition, offset),
                    Err(source) => {
                        failure = Some(StageError::Delivery {
                            stage: name,
                            topic: stage.inputs[usize::from(partition.input)].topic.clone(),
                            partition: partition.partition,
                            offset,
                            source,
                        });
                        break;
                    }
                }
            }
            _ = tick.tick() => {
                let storable = match &mut checkpoints {
                    None => tracker.storable(),
                    Some(c) => {
                        if c.last_taken.elapsed() >= runner.checkpoint_interval {
                            c.take(&mut stage.processor, &tracker);
                        }
                        match c.write_ready(name, &input_topics, &tracker).await {
                            Ok(storable) => storable,
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        }
                    }
                };
                store(&consumer, &stage.inputs, storable);
            }
            message = consumer.recv(), if tracker.in_flight() < runner.max_in_flight => {
                let message = match message {
                    Ok(m) => m,
                    Err(KafkaError::PartitionEOF(p)) => {
                        // The end of partition `p` of some input: if it is the first input's,
                        // the processor need not wait for that partition any more.
                        // (The end reported may be another input's: ask the broker for the
                        // first input's end. Once per end reached, and only for partitions
                        // not already known to be caught up.)
                        let caught_up = idle.contains(&p) || {
                            let ends = tokio::task::block_in_place(|| {
                                consumer.fetch_watermarks(&input_topics[0], p, Duration::from_secs(2))
                            });
                            match ends {
                                Ok((low, high)) => next_read.get(&p).copied().unwrap_or(low) >= high,
                                Err(e) => {
                                    tracing::debug!(stage = name, partition = p, error = %e, "End offsets unknown.");
                                    false
                                }
                            }
                        };
                        if !caught_up || !idle.insert(p) {
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
                                let m = data.into_message(&source);
                                let record = FutureRecord::to(&stage.outputs[m.route])
                                    .key(m.key.as_str())
                                    .payload(m.payload.as_slice())
                                    .headers(event_headers());
                                match enqueue(&producer, record).await {
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
                    last_read = Some((partition, offset));
                    next_read.insert(partition.partition, offset + 1);
                    idle.remove(&partition.partition);
                }
                if let Some(c) = &mut checkpoints {
                    if let Err(e) = c.ensure_restored(&mut stage, partition.partition).await {
                        failure = Some(e);
                        break;
                    }
                    if c.already_folded(partition, offset) {
                        tracker.read(partition, offset, 0);
                        continue;
                    }
                }
                process(&mut stage, input, &message, &mut out);
                tracker.read(partition, offset, out.len());
                for output in out.drain(..) {
                    let enqueued = match output {
                        Output::Event(data) => {
                            report.event(progress);
                            let m = data.into_message(&source);
                            let record = FutureRecord::to(&stage.outputs[m.route])
                                .key(m.key.as_str())
                                .payload(m.payload.as_slice())
                                .headers(event_headers());
                            enqueue(&producer, record).await
                        }
                        Output::Rejected(rejection) => {
                            report.dead_letter(progress);
                            let dl = dead_letter(name, &message, rejection);
                            tracing::debug!(stage = name, class = dl.error_class.as_str(), reason = %dl.reason, "Dead letter.");
                            let mut record = FutureRecord::to(&stage.dead_letters)
                                .payload(dl.payload.as_slice())
                                .headers(dead_letter_headers(&dl, &message));
                            if let Some(key) = dl.key.as_deref() {
                                record = record.key(key);
                            }
                            enqueue(&producer, record).await
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
        &producer,
        runner.drain_timeout,
        report,
        failure,
    )
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

fn dead_letter(stage: &str, message: &BorrowedMessage<'_>, rejection: Rejection) -> DeadLetter {
    DeadLetter {
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
    }
}
