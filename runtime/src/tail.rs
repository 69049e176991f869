//! `foresight tail`: prints a public topic's events as they arrive, one line each.
//!
//! The consumer is assigned the partitions directly and never commits: tailing changes no
//! consumer group's position and can run beside the pipeline as often as wanted.

use std::{collections::BTreeMap, io::Write, time::Duration};

use foresight_events::{ActuationOutcome, DeadLetter, Decision, Event, EventData, RiskScore};
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{Consumer as _, StreamConsumer},
    error::KafkaError,
    message::{BorrowedMessage, Headers as _},
};
use tokio_util::sync::CancellationToken;

use crate::{Config, kafka::Topics, telemetry};

/// The topics that can be tailed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TailTopic {
    /// Allocation decisions.
    Decisions,
    /// Fleet-aware risk scores.
    Scores,
    /// Actuation outcomes.
    Outcomes,
    /// Records a stage could not use, with the reason.
    DeadLetters,
}

impl TailTopic {
    /// The topic's full name.
    pub fn topic(self, topics: &Topics) -> &str {
        match self {
            TailTopic::Decisions => &topics.decisions,
            TailTopic::Scores => &topics.scores,
            TailTopic::Outcomes => &topics.outcomes,
            TailTopic::DeadLetters => &topics.dead_letters,
        }
    }
}

/// How to tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailOptions {
    /// Start at each partition's beginning (else `last` messages before its end).
    pub from_beginning: bool,
    /// Messages per partition to show from before the end, without `from_beginning`.
    pub last: i64,
    /// Keep waiting for new messages (else stop once caught up with every partition).
    pub follow: bool,
    /// Print each message's JSON (the event envelope; for dead letters, its description) instead
    /// of a summary line.
    pub json: bool,
}

/// Prints `what` to `out` until caught up (or, following, until `shutdown`); returns how many
/// messages were printed.
pub async fn tail(
    config: &Config,
    what: TailTopic,
    options: &TailOptions,
    out: &mut (dyn Write + Send),
    shutdown: CancellationToken,
) -> anyhow::Result<u64> {
    let topics = Topics::new(&config.kafka.topic_prefix);
    let topic = what.topic(&topics).to_owned();
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers);
    for (k, v) in &config.kafka.client {
        c.set(k, v);
    }
    // A group id is required by the client, but nothing is ever committed under it.
    c.set("group.id", format!("{}tail", config.kafka.group_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "100");
    let consumer: StreamConsumer = c.create()?;
    let unreachable = || {
        format!(
            "cannot read {topic} from the broker at {}: is it up? (start it with \
             `deploy/dev/stack.sh up`; the pipeline's topics exist once `foresight topics` or \
             `foresight run` has run)",
            config.kafka.brokers
        )
    };
    // A busy broker can time out a metadata or watermark request; those are retried until
    // `PATIENCE` has passed, so one slow answer does not end the command.
    let started = std::time::Instant::now();
    let (assignment, mut ends) = loop {
        match tokio::task::block_in_place(|| assignment(&consumer, &topic, options)) {
            Ok(Some(found)) => break found,
            Ok(None) => anyhow::bail!(
                "topic {topic} does not exist on the broker at {} (yet): `foresight topics` or \
                 `foresight run` creates the pipeline's topics",
                config.kafka.brokers
            ),
            Err(e) if started.elapsed() < PATIENCE && transient(&e) => {
                tracing::warn!(error = %e, "the broker did not answer; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(unreachable())),
        }
    };
    consumer.assign(&assignment)?;
    let mut printed = 0;
    // Transient consumer errors (a broker connection dropped and re-established) are reported
    // and ridden out; only when they persist for `PATIENCE` with no message between does tail
    // give up.
    let mut failing_since: Option<std::time::Instant> = None;
    while options.follow || !ends.is_empty() {
        let message = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => {
                failing_since = None;
                m
            }
            Err(e) if transient(&e) && failing_since.is_none_or(|t| t.elapsed() < PATIENCE) => {
                failing_since.get_or_insert_with(std::time::Instant::now);
                tracing::warn!(error = %e, "reading {topic}; retrying");
                continue;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(unreachable())),
        };
        if !ends.take(message.partition(), message.offset()) && !options.follow {
            // Written after the command started, to a partition still being caught up with:
            // not part of what `--last` asked for.
            continue;
        }
        let line = if options.json {
            json_line(what, &message)
        } else {
            summary(what, &message)
        };
        writeln!(out, "{line}")?;
        out.flush()?;
        printed += 1;
    }
    Ok(printed)
}

/// How long transient broker errors are retried before `tail` gives up.
const PATIENCE: Duration = Duration::from_secs(60);

/// Whether retrying could help: not for a fatal client error, nor for being refused.
fn transient(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    !matches!(e, KafkaError::MessageConsumptionFatal(_))
        && e.rdkafka_error_code().is_some_and(|c| {
            !matches!(
                c,
                C::Fatal
                    | C::Authentication
                    | C::SaslAuthenticationFailed
                    | C::TopicAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::ClusterAuthorizationFailed
                    | C::InvalidArgument
            )
        })
}

/// Each partition's end offset as it was when the command started, for those with something to
/// show: what "caught up" means without `follow`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Ends(BTreeMap<i32, i64>);

impl Ends {
    /// Whether the message at `offset` of `partition` was written before the command started;
    /// the partition is done once its last such message has been taken.
    fn take(&mut self, partition: i32, offset: i64) -> bool {
        let Some(&end) = self.0.get(&partition) else {
            return false;
        };
        if offset + 1 >= end {
            self.0.remove(&partition);
        }
        offset < end
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The partitions of `topic` to read and where each starts, with the end offset of each that
/// has something to show; `None` when the broker does not know the topic.
fn assignment(
    consumer: &StreamConsumer,
    topic: &str,
    options: &TailOptions,
) -> Result<Option<(TopicPartitionList, Ends)>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(20))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = Ends::default();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(20))?;
        let start = if options.from_beginning {
            low
        } else {
            (high - options.last).max(low)
        };
        if start < high {
            ends.0.insert(p, high);
        }
        tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
    }
    Ok(Some((tpl, ends)))
}

fn header<'a>(m: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

fn dead_letter_header<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> &'a str {
    header(m, &format!("{}{name}", DeadLetter::HEADER_PREFIX)).unwrap_or("?")
}

fn json_line(what: TailTopic, m: &BorrowedMessage<'_>) -> String {
    let payload = m.payload().unwrap_or_default();
    match what {
        TailTopic::DeadLetters => {
            let original = String::from_utf8_lossy(payload);
            let description: serde_json::Map<String, serde_json::Value> = [
                "stage",
                "source_topic",
                "partition",
                "offset",
                "error_class",
                "reason",
            ]
            .into_iter()
            .map(|k| (k.to_owned(), dead_letter_header(m, k).into()))
            .chain([("payload".to_owned(), original.into_owned().into())])
            .collect();
            serde_json::Value::Object(description).to_string()
        }
        _ => String::from_utf8_lossy(payload).into_owned(),
    }
}

fn decode<T: EventData>(m: &BorrowedMessage<'_>) -> Result<Event<T>, String> {
    Event::<T>::from_json(m.payload().unwrap_or_default()).map_err(|e| e.to_string())
}

fn summary(what: TailTopic, m: &BorrowedMessage<'_>) -> String {
    let trace = header(m, telemetry::TRACEPARENT)
        .and_then(telemetry::trace_id_of)
        .map(|t| format!(" trace={t}"))
        .unwrap_or_default();
    let undecodable = |e: String| format!("(undecodable at {}@{}: {e})", m.partition(), m.offset());
    match what {
        TailTopic::Decisions => match decode::<Decision>(m) {
            Ok(e) => {
                let d = e.data;
                format!(
                    "{} {} {} P={:.2} [{:.2}, {:.2}] {}/{}: {}{trace}",
                    d.time.format("%Y-%m-%d %H:%M:%S"),
                    d.entity,
                    d.action.kind.as_str(),
                    d.probability,
                    d.interval[0],
                    d.interval[1],
                    d.policy,
                    d.rule,
                    d.reason
                )
            }
            Err(e) => undecodable(e),
        },
        TailTopic::Scores => match decode::<RiskScore>(m) {
            Ok(e) => {
                let s = e.data;
                format!(
                    "{} {} P={:.2} [{:.2}, {:.2}] band={} health={:.2}{trace}",
                    s.time.format("%Y-%m-%d %H:%M:%S"),
                    s.entity,
                    s.probability,
                    s.lower,
                    s.upper,
                    serde_json::to_value(s.band)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    s.health
                )
            }
            Err(e) => undecodable(e),
        },
        TailTopic::Outcomes => match decode::<ActuationOutcome>(m) {
            Ok(e) => {
                let o = e.data;
                format!(
                    "{} {} decision {} {} {}: {}{trace}",
                    o.time.format("%Y-%m-%d %H:%M:%S"),
                    o.entity,
                    o.decision_id,
                    o.actuator,
                    o.status.as_str(),
                    o.detail
                )
            }
            Err(e) => undecodable(e),
        },
        TailTopic::DeadLetters => format!(
            "{} rejected {}[{}]@{}: {}: {}",
            dead_letter_header(m, "stage"),
            dead_letter_header(m, "source_topic"),
            dead_letter_header(m, "partition"),
            dead_letter_header(m, "offset"),
            dead_letter_header(m, "error_class"),
            dead_letter_header(m, "reason"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_follow_only_what_was_written_before_the_start_is_shown() {
        // Partition 0 had offsets 0..10 (showing the last 1), partition 1 had 0..5 (the last
        // 1), partition 2 nothing to show when the command started.
        let mut ends = Ends([(0, 10), (1, 5)].into_iter().collect());
        assert!(ends.take(0, 9));
        // Written to partition 0 after the start while partition 1 is still being read.
        assert!(!ends.take(0, 10));
        assert!(!ends.take(2, 0));
        assert!(!ends.is_empty());
        assert!(ends.take(1, 4));
        assert!(ends.is_empty());
        assert!(!ends.take(1, 5));
    }

    #[test]
    fn a_gap_at_the_end_of_a_partition_still_finishes_it() {
        // Offsets need not be contiguous (compaction, transaction markers): a message at or
        // past the last offset before the end finishes the partition.
        let mut ends = Ends([(0, 10)].into_iter().collect());
        assert!(ends.take(0, 7));
        assert!(!ends.is_empty());
        assert!(!ends.take(0, 11));
        assert!(ends.is_empty());
    }
}
