//! The stage watchdog: finds a Kafka client that stopped working while the broker answers, so
//! the stage can replace it instead of waiting for ever.
//!
//! - **reading**: the consumer reads nothing for `runner.stall_timeout` although its
//!   partitions hold unread input and back-pressure (`runner.max_in_flight`) is not what holds
//!   it: the stage replaces it. The input must have been seen waiting for that long: a first
//!   look that finds input (once nothing was read for the timeout) starts that clock. Input
//!   that arrived just before the look is not a stall (a stage quiet for a while, then given
//!   a burst, had its consumer replaced before it could fetch, and the replacements of the
//!   stages downstream added a rebalance each to the catch-up);
//! - **delivery**: outputs wait longer than `runner.stall_timeout` for the broker's
//!   acknowledgement: reported once (whether the broker answers or not), not acted on. Replacing
//!   the clients on it, and on a consumer that owns nothing or gets no answer while the producer
//!   does, was tried and taken back: under load (two fault scenarios side by side on one broker)
//!   those checks fired on a slow broker, and the replacements' rebalances added to its load.
//!
//! While the broker does not answer nothing is stalled on our side, and the clock starts again.

use std::time::Duration;

use rdkafka::{
    Offset,
    client::{Client, ClientContext},
    consumer::{Consumer as _, StreamConsumer},
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
}

/// The clocks of one stage's watchdog.
#[derive(Debug)]
pub(crate) struct Watchdog {
    stage: &'static str,
    timeout: Duration,
    /// When input was last read (or nothing was found waiting).
    last_input: Instant,
    /// When input was first found waiting with nothing read since.
    waiting_since: Option<Instant>,
    /// When an output was last acknowledged (or nothing was in flight, or the broker was away).
    last_ack: Instant,
    /// Whether outputs waiting on an unreachable broker have been reported.
    waiting_reported: bool,
}

impl Watchdog {
    /// A watchdog reporting stalls after `timeout` (zero: never).
    pub(crate) fn new(stage: &'static str, timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            stage,
            timeout,
            last_input: now,
            waiting_since: None,
            last_ack: now,
            waiting_reported: false,
        }
    }

    /// Input was read (or a partition's end reached).
    pub(crate) fn read(&mut self) {
        self.last_input = Instant::now();
        self.waiting_since = None;
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
        self.waiting_since = None;
        self.last_ack = now;
        self.waiting_reported = false;
    }

    /// Looks for a stall (call it periodically). Asks the broker (blocking, a few seconds at
    /// most) only once a clock has run out.
    pub(crate) fn check(
        &mut self,
        consumer: &StreamConsumer<RebalanceContext>,
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
            if !std::mem::replace(&mut self.waiting_reported, true) {
                if tokio::task::block_in_place(|| answers(consumer.client())) {
                    tracing::warn!(stage, in_flight, unacknowledged_for = ?waited, "Outputs not acknowledged although the broker answers; offsets wait for them.");
                } else {
                    tracing::warn!(stage, in_flight, unacknowledged_for = ?waited, "Outputs wait for the broker, which does not answer; offsets wait for them.");
                }
            }
        }
        if self.last_input.elapsed() < self.timeout
            || self
                .waiting_since
                .is_some_and(|since| since.elapsed() < self.timeout)
        {
            return None;
        }
        if in_flight >= max_in_flight {
            // Back-pressure holds it: input waiting is not a stall, and is looked at afresh.
            self.waiting_since = None;
            return None;
        }
        // Nothing read for a while, with room to read: is input waiting?
        let idle = self.last_input.elapsed();
        match tokio::task::block_in_place(|| waiting(consumer)) {
            Waiting::Unread(unread) if unread > 0 => match self.waiting_since {
                // Seen waiting for the timeout, and still nothing read.
                Some(since) => {
                    tracing::warn!(
                        stage,
                        unread,
                        ?idle,
                        waiting = ?since.elapsed(),
                        "Consumer stalled: input is waiting but none was read; replacing it."
                    );
                    Some(Stall::Reading { unread })
                }
                // It may have just arrived: the consumer gets the timeout to read it.
                None => {
                    self.waiting_since = Some(Instant::now());
                    None
                }
            },
            // Nothing waiting, nothing owned, or the broker does not say (it is away, or too
            // busy: then nothing is stalled on our side).
            _ => {
                self.last_input = Instant::now();
                self.waiting_since = None;
                None
            }
        }
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

#[cfg(test)]
mod tests {
    //! Against the broker the test command starts (`FORESIGHT_TEST_BROKERS`, default
    //! `127.0.0.1:9092`).
    use std::sync::Arc;

    use rdkafka::{TopicPartitionList, producer::FutureRecord};

    use super::*;
    use crate::kafka;

    /// Input that arrives just before the watchdog looks is not a stall; input left unread for
    /// the timeout after it was seen is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn input_must_wait_unread_for_the_timeout_to_be_a_stall() {
        let (config, topics) = kafka::test_topics("watchdog", 1).await;
        let topic = &topics.metrics;
        let consumer = kafka::consumer(&config, &format!("{topic}-group"), Arc::default()).unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();

        let timeout = Duration::from_secs(1);
        let mut watchdog = Watchdog::new("test", timeout);
        assert_eq!(watchdog.check(&consumer, 0, 10), None);
        // Nothing read for the timeout, and nothing waiting: the clock starts again.
        tokio::time::sleep(timeout).await;
        assert_eq!(watchdog.check(&consumer, 0, 10), None);
        assert!(watchdog.waiting_since.is_none());

        // Input arrives (the consumer is never polled, so it reads none of it) just before the
        // next look, a timeout after the last: seen, not a stall yet.
        tokio::time::sleep(timeout).await;
        let producer = kafka::producer(&config).unwrap();
        for i in 0..3 {
            producer
                .send(
                    FutureRecord::<(), _>::to(topic).payload(&format!("{i}")),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
        assert_eq!(watchdog.check(&consumer, 0, 10), None);
        assert!(watchdog.waiting_since.is_some());
        // Back-pressure is never a stall.
        tokio::time::sleep(timeout).await;
        assert_eq!(watchdog.check(&consumer, 10, 10), None);
        assert!(watchdog.waiting_since.is_none());
        // Seen again, then still unread for the timeout: a stall.
        assert_eq!(watchdog.check(&consumer, 0, 10), None);
        assert_eq!(watchdog.check(&consumer, 0, 10), None);
        tokio::time::sleep(timeout).await;
        assert_eq!(
            watchdog.check(&consumer, 0, 10),
            Some(Stall::Reading { unread: 3 })
        );
        // Anything read starts both clocks again.
        watchdog.read();
        assert!(watchdog.waiting_since.is_none());
        assert_eq!(watchdog.check(&consumer, 0, 10), None);
    }
}
