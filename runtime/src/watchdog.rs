//! The stage watchdog: finds a Kafka client that stopped working while the broker answers, so
//! the stage can replace it instead of waiting for ever.
//!
//! - **reading**: the consumer reads nothing for `runner.stall_timeout` although its
//!   partitions hold unread input and back-pressure (`runner.max_in_flight`) is not what holds
//!   it: the stage replaces it;
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
            last_ack: now,
            waiting_reported: false,
        }
    }

    /// Input was read (or a partition's end reached).
    pub(crate) fn read(&mut self) {
        self.last_input = Instant::now();
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
        if self.last_input.elapsed() < self.timeout || in_flight >= max_in_flight {
            return None;
        }
        // Nothing read for a while, with room to read: is input waiting?
        let idle = self.last_input.elapsed();
        match tokio::task::block_in_place(|| waiting(consumer)) {
            Waiting::Unread(unread) if unread > 0 => {
                tracing::warn!(
                    stage,
                    unread,
                    ?idle,
                    "Consumer stalled: input is waiting but none was read; replacing it."
                );
                Some(Stall::Reading { unread })
            }
            // Nothing waiting, nothing owned, or the broker does not say (it is away, or too
            // busy: then nothing is stalled on our side).
            _ => {
                self.last_input = Instant::now();
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
