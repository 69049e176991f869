//! The live stage runner: one pure processor between a Kafka input topic and a Kafka output topic.
//!
//! Delivery is at-least-once with ordered acknowledgement. Offsets are stored (and then
//! auto-committed) only up to the first input whose outputs are not all acknowledged by the broker,
//! and never past what the processor's open state still depends on. Output ids are derived from the
//! inputs, so a redelivered input produces the same ids and downstream consumers deduplicate.

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

/// Headers of an event message (CloudEvents structured mode).
fn event_headers() -> OwnedHeaders {
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
async fn enqueue(
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
    tracker: &mut OffsetTracker,
    retained: impl Fn(InputPartition) -> Option<i64>,
) {
    let storable = tracker.storable(retained);
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

/// Runs a stage until `shutdown` is cancelled, then drains in-flight outputs, stores and commits
/// offsets and flushes the producer.
pub(crate) async fn run<P>(
    mut stage: LiveStage<P>,
    kafka_config: &KafkaConfig,
    runner: &RunnerConfig,
    progress: &Progress,
    shutdown: CancellationToken,
) -> Result<StageReport, StageError>
where
    P: Processor + Send,
    P::Output: Routed,
{
    let name = stage.name;
    let err = |source| StageError::Kafka {
        stage: name,
        source,
    };
    let group = format!("{}{}", kafka_config.group_prefix, name);
    let consumer = kafka::consumer(kafka_config, &group).map_err(err)?;
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

    loop {
        for (topic, partition) in consumer.context().take_revoked() {
            if let Some(input) = input_index(&topic) {
                let source = InputPartition { input, partition };
                tracker.revoke(source);
                stage.processor.forget_partition(source);
            }
        }
        tokio::select! {
            // Shutdown first, then acknowledgements (they free in-flight room and let offsets
            // advance), then the periodic store, and only then new input.
            biased;
            () = shutdown.cancelled() => break,
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
                store(&consumer, &stage.inputs, &mut tracker, |p| stage.processor.retained_from(p));
            }
            message = consumer.recv(), if tracker.in_flight() < runner.max_in_flight => {
                let message = match message {
                    Ok(m) => m,
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
                        Ok(delivery) => deliveries.push(Box::pin(async move {
                            let result = match delivery.await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err((e, _))) => Err(e),
                                Err(_) => Err(KafkaError::Canceled),
                            };
                            (partition, offset, result)
                        })),
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
    store(&consumer, &stage.inputs, &mut tracker, |p| {
        stage.processor.retained_from(p)
    });
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync)
        && !matches!(e, KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))
    {
        tracing::warn!(stage = name, error = %e, "Final commit failed.");
    }
    if let Err(e) = producer.flush(runner.drain_timeout) {
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
