//! The stage watchdog: finds a Kafka client that stopped working while the broker answers, so
//! the stage can replace it instead of waiting for ever.
//!
//! The ways a stage wedges without any error reaching it:
//! - **reading**: the consumer reads nothing although its partitions hold unread input and
//!   back-pressure (`runner.max_in_flight`) is not what holds it;
//! - **membership**: the consumer owns no partition while its group's committed offsets stay
//!   behind the ends of the topics it subscribes to (nobody in the group reads them: a consumer
//!   that lost its membership, e.g. when the broker restarted, and never rejoined);
//! - **disconnection**: the consumer cannot get an answer from the broker while the producer can;
//! - **delivery**: outputs wait for the broker's acknowledgement although the broker answers
//!   (the producer never gives up on a message by itself, `message.timeout.ms=0`, so a producer
//!   that lost its way after an outage would hold every offset back and, at `max_in_flight`,
//!   stop reading too).
//!
//! Each is reported after `runner.stall_timeout` (membership after it has held over two
//! checks). While the broker answers neither client nothing is stalled on our side, and the
//! clocks start again: the clients get the whole timeout to recover by themselves once it is
//! back.

use std::{collections::BTreeMap, time::Duration};

use rdkafka::{
    Offset, TopicPartitionList,
    client::{Client, ClientContext},
    consumer::{Consumer as _, StreamConsumer},
    producer::{FutureProducer, Producer as _},
};
use tokio::time::Instant;

use crate::kafka::RebalanceContext;

/// How long one question to the broker may take.
const ASK: Duration = Duration::from_secs(2);

/// What the watchdog found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stall {
    /// Input is waiting in the consumer's partitions but none was read.
    Reading {
        /// Messages waiting.
        unread: i64,
    },
    /// The consumer owns nothing while its group stays behind.
    Membership {
        /// Messages the group has not committed.
        lag: i64,
    },
    /// The consumer gets no answer from the broker, which answers the producer.
    Disconnected,
    /// Outputs were not acknowledged for the whole timeout while the broker answered.
    Delivery {
        /// Outputs waiting.
        in_flight: usize,
    },
}

impl Stall {
    /// Whether the producer must be replaced too (its outputs are abandoned, and their inputs
    /// read again: their outputs come again with the same ids).
    pub(crate) fn producer(self) -> bool {
        matches!(self, Self::Delivery { .. })
    }
}

/// The clocks of one stage's watchdog.
#[derive(Debug)]
pub(crate) struct Watchdog {
    stage: &'static str,
    /// The topics the stage reads.
    topics: Vec<String>,
    timeout: Duration,
    /// When input was last read (or nothing was found waiting).
    last_input: Instant,
    /// When an output was last acknowledged (or nothing was in flight, or the broker was away).
    last_ack: Instant,
    /// Whether outputs waiting on an unreachable broker have been reported.
    waiting_reported: bool,
    /// While the consumer owns nothing: the group's committed offsets when last looked at.
    group_seen: Option<Committed>,
    /// Whether the stage can replace its producer (else a delivery stall is only reported).
    replaces_producer: bool,
}

impl Watchdog {
    /// A watchdog reporting stalls after `timeout` (zero: never).
    pub(crate) fn new(stage: &'static str, topics: Vec<String>, timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            stage,
            topics,
            timeout,
            last_input: now,
            last_ack: now,
            waiting_reported: false,
            group_seen: None,
            replaces_producer: true,
        }
    }

    /// For a stage that cannot abandon its outputs in flight (the actuator's outcomes are not
    /// all made again from re-read input): a delivery stall is reported, never acted on.
    pub(crate) fn keeping_producer(mut self) -> Self {
        self.replaces_producer = false;
        self
    }

    /// Input was read (or a partition's end reached).
    pub(crate) fn read(&mut self) {
        self.last_input = Instant::now();
        self.group_seen = None;
    }

    /// An output was acknowledged.
    pub(crate) fn acknowledged(&mut self) {
        self.last_ack = Instant::now();
        if std::mem::take(&mut self.waiting_reported) {
            tracing::info!(stage = self.stage, "Outputs acknowledged again.");
        }
    }

    /// The clients were replaced: the clocks start again.
    pub(crate) fn replaced(&mut self) {
        let now = Instant::now();
        self.last_input = now;
        self.last_ack = now;
        self.waiting_reported = false;
        self.group_seen = None;
    }

    /// Looks for a stall (call it periodically). Asks the broker (blocking, a few seconds at
    /// most) only once a clock has run out.
    pub(crate) fn check(
        &mut self,
        consumer: &StreamConsumer<RebalanceContext>,
        producer: &FutureProducer,
        in_flight: usize,
        max_in_flight: usize,
    ) -> Option<Stall> {
        if self.timeout.is_zero() {
            return None;
        }
        let stage = self.stage;
        if in_flight == 0 {
            // Nothing waiting: the clock starts with the next output.
            self.last_ack = Instant::now();
        } else if self.last_ack.elapsed() >= self.timeout {
            let waited = self.last_ack.elapsed();
            // Asked through the consumer: the producer is the suspect.
            let answered = tokio::task::block_in_place(|| answers(consumer.client()));
            if answered && self.replaces_producer {
                tracing::warn!(stage, in_flight, unacknowledged_for = ?waited, "Outputs not acknowledged although the broker answers: replacing the producer and the consumer; their inputs are read again (same output ids).");
                return Some(Stall::Delivery { in_flight });
            }
            if !std::mem::replace(&mut self.waiting_reported, true) {
                if answered {
                    tracing::warn!(stage, in_flight, unacknowledged_for = ?waited, "Outputs not acknowledged although the broker answers; offsets wait for them.");
                } else {
                    tracing::warn!(stage, in_flight, unacknowledged_for = ?waited, "Outputs wait for the broker, which does not answer; offsets wait for them.");
                }
            }
            self.last_ack = Instant::now();
        }
        if self.last_input.elapsed() < self.timeout || in_flight >= max_in_flight {
            return None;
        }
        // Nothing read for a while, with room to read: is input waiting?
        let idle = self.last_input.elapsed();
        let stall = match tokio::task::block_in_place(|| waiting(consumer)) {
            Waiting::Unread(unread) if unread > 0 => {
                tracing::warn!(
                    stage,
                    unread,
                    ?idle,
                    "Consumer stalled: input is waiting but none was read; replacing it."
                );
                Some(Stall::Reading { unread })
            }
            Waiting::Unread(_) => None,
            Waiting::Unknown => {
                // Asked through the producer: the consumer is the suspect.
                let others = tokio::task::block_in_place(|| answers(producer.client()));
                others.then(|| {
                    tracing::warn!(stage, ?idle, "Consumer stalled: it gets no answer from the broker, which answers the producer; replacing it.");
                    Stall::Disconnected
                })
            }
            Waiting::Unassigned => {
                match tokio::task::block_in_place(|| group_position(consumer, &self.topics)) {
                    Some((committed, lag)) if lag > 0 => {
                        if self.group_seen.as_ref() == Some(&committed) {
                            tracing::warn!(
                                stage,
                                lag,
                                ?idle,
                                "Consumer owns no partition while its group's offsets stay behind: rejoining with a new consumer."
                            );
                            Some(Stall::Membership { lag })
                        } else {
                            // Behind: look again after another timeout, and act if nobody moved.
                            self.group_seen = Some(committed);
                            None
                        }
                    }
                    _ => {
                        self.group_seen = None;
                        None
                    }
                }
            }
        };
        if stall.is_none() {
            self.last_input = Instant::now();
        }
        stall
    }
}

/// Whether the broker answers a metadata request of this client's.
fn answers<C: ClientContext>(client: &Client<C>) -> bool {
    client
        .fetch_metadata(None, ASK)
        .is_ok_and(|m| !m.brokers().is_empty())
}

/// What waits in a consumer's partitions.
enum Waiting {
    /// Each owned partition's high watermark minus its position (before its first fetch: its
    /// committed offset, else the low watermark), summed.
    Unread(i64),
    /// The broker did not say.
    Unknown,
    /// The consumer owns no partition.
    Unassigned,
}

fn waiting(consumer: &StreamConsumer<RebalanceContext>) -> Waiting {
    let Ok(positions) = consumer.position() else {
        return Waiting::Unknown;
    };
    if positions.count() == 0 {
        return Waiting::Unassigned;
    }
    let mut committed = None;
    let mut unread = 0;
    for e in positions.elements() {
        let Ok((low, high)) = consumer.fetch_watermarks(e.topic(), e.partition(), ASK) else {
            return Waiting::Unknown;
        };
        let from = match e.offset() {
            Offset::Offset(o) => o,
            _ => {
                let c = committed.get_or_insert_with(|| consumer.committed(ASK).ok());
                match c
                    .as_ref()
                    .and_then(|c| c.find_partition(e.topic(), e.partition()))
                    .map(|p| p.offset())
                {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                }
            }
        };
        unread += (high - from).max(0);
    }
    Waiting::Unread(unread)
}

/// A group's committed offset of each (topic, partition).
type Committed = BTreeMap<(String, i32), i64>;

/// The group's committed offsets on every partition of `topics`, and how far they are behind
/// the partitions' ends, summed (`None`: the broker did not say).
fn group_position(
    consumer: &StreamConsumer<RebalanceContext>,
    topics: &[String],
) -> Option<(Committed, i64)> {
    let mut all = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), ASK).ok()?;
        for t in metadata.topics() {
            for p in t.partitions() {
                all.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = consumer.committed_offsets(all, ASK).ok()?;
    let mut offsets = BTreeMap::new();
    let mut lag = 0;
    for e in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), ASK)
            .ok()?;
        let at = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - at).max(0);
        offsets.insert((e.topic().to_owned(), e.partition()), at);
    }
    Some((offsets, lag))
}
