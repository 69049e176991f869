//! Kafka clients, topic names and topic creation.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use rdkafka::{
    ClientConfig, ClientContext,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    producer::{BaseProducer, FutureProducer, Producer as _, ProducerContext},
    statistics::Statistics,
    types::RDKafkaErrorCode,
};

use crate::{
    config::KafkaConfig,
    offsets::{Resume, Rewind},
};

/// The topics of one pipeline, all under the configured prefix, keyed by entity id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Input: telemetry metric samples (native JSON).
    pub metrics: String,
    /// Input: telemetry log events.
    pub logs: String,
    /// Input: trace spans (for the dependency graph).
    pub traces: String,
    /// Input: observed failures (the labels).
    pub failures: String,
    /// Internal, publicly readable: feature windows.
    pub features: String,
    /// Internal: per-entity risk scores, before the fleet stage.
    pub entity_scores: String,
    /// Public: risk scores, fleet-aware (peers, dependencies) and ranked.
    pub scores: String,
    /// Internal, publicly readable: caller -> callee edges from traces.
    pub dependencies: String,
    /// Public: allocation decisions.
    pub decisions: String,
    /// Public: actuation outcomes.
    pub outcomes: String,
    /// Records some stage could not use, with the reason in headers.
    pub dead_letters: String,
}

impl Topics {
    /// The topic names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        let t = |name: &str| format!("{prefix}{name}");
        Self {
            metrics: t("telemetry.metrics"),
            logs: t("telemetry.logs"),
            traces: t("telemetry.traces"),
            failures: t("failures"),
            features: t("features"),
            entity_scores: t("entity-scores"),
            scores: t("scores"),
            dependencies: t("dependencies"),
            decisions: t("decisions"),
            outcomes: t("outcomes"),
            dead_letters: t("dead-letters"),
        }
    }

    /// Every topic.
    pub fn all(&self) -> [&str; 11] {
        [
            &self.metrics,
            &self.logs,
            &self.traces,
            &self.failures,
            &self.features,
            &self.entity_scores,
            &self.scores,
            &self.dependencies,
            &self.decisions,
            &self.outcomes,
            &self.dead_letters,
        ]
    }
}

/// What every client shares: the brokers, TLS and SASL (`kafka.security`), then the extra
/// properties of `kafka.client`.
fn base(config: &KafkaConfig) -> Result<ClientConfig, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    let security = config
        .security
        .properties()
        .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
    for (k, v) in security {
        c.set(k, v);
    }
    for (k, v) in &config.client {
        c.set(k, v);
    }
    Ok(c)
}

/// Why the brokers could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The client could not be created (e.g. an unreadable certificate or password file).
    #[error("Kafka client: {0}")]
    Client(KafkaError),
    /// The brokers refused us: wrong credentials, or a TLS certificate that does not verify.
    #[error("Kafka brokers {brokers} refused the connection: {reason}")]
    Refused {
        /// The bootstrap servers.
        brokers: String,
        /// librdkafka's own words.
        reason: String,
    },
    /// No broker answered in time.
    #[error("Kafka brokers {brokers} unreachable within {timeout:?}: {reason}")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// How long we waited.
        timeout: Duration,
        /// The last error librdkafka reported, if any.
        reason: String,
    },
}

impl ConnectError {
    /// Whether waiting may help: no broker answered (none listening yet, or one too busy to
    /// answer in time), as opposed to a refusal or an answer in another protocol (a plaintext
    /// client at a TLS listener is disconnected while it asks for API versions).
    pub fn transient(&self) -> bool {
        match self {
            Self::Unreachable { reason, .. } => {
                let r = reason.to_ascii_lowercase();
                r.is_empty()
                    || r.contains("connection refused")
                    || r.contains("timed out")
                    || r.contains("all broker connections are down")
            }
            Self::Client(_) | Self::Refused { .. } => false,
        }
    }
}

/// Client context that keeps the last error librdkafka reported (authentication and TLS
/// failures come only this way: a request then just times out).
#[derive(Default)]
struct LastError(Mutex<Option<(Option<RDKafkaErrorCode>, String)>>);

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(error = %error, reason, "Kafka client error.");
        let code = error.rdkafka_error_code();
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // A refusal is the news: the "all brokers down" that follows it must not hide it.
        if !last.as_ref().is_some_and(|(c, r)| refused(*c, r)) {
            *last = Some((code, reason.to_owned()));
        }
    }
}

impl ProducerContext for LastError {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// Checks that the brokers can be reached and accept our credentials and certificates, so a
/// misconfigured process stops at once with librdkafka's reason instead of retrying forever.
pub async fn check_connection(config: &KafkaConfig, timeout: Duration) -> Result<(), ConnectError> {
    // A producer, whose poll serves the error callbacks (nothing is ever produced with it).
    let client: BaseProducer<LastError> = base(config)
        .and_then(|c| c.create_with_context(LastError::default()))
        .map_err(ConnectError::Client)?;
    let brokers = config.brokers.clone();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        loop {
            let last = client
                .context()
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some((code, reason)) = &last
                && refused(*code, reason)
            {
                return Err(ConnectError::Refused {
                    brokers,
                    reason: reason.clone(),
                });
            }
            let left = timeout.saturating_sub(started.elapsed());
            client.poll(Duration::from_millis(50));
            match client
                .client()
                .fetch_metadata(None, left.min(Duration::from_millis(500)))
            {
                Ok(_) => return Ok(()),
                Err(e) if left.is_zero() => {
                    return Err(ConnectError::Unreachable {
                        brokers,
                        timeout,
                        reason: last.map_or_else(|| e.to_string(), |(_, r)| r),
                    });
                }
                Err(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|e| {
        Err(ConnectError::Client(KafkaError::ClientCreation(format!(
            "connection check panicked: {e}"
        ))))
    })
}

/// Whether a client error means the broker will not have us (no retry helps).
fn refused(code: Option<RDKafkaErrorCode>, reason: &str) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SaslAuthenticationFailed
                | RDKafkaErrorCode::SSL
        )
    ) || reason.contains("SSL handshake failed")
        || reason.contains("certificate verify failed")
        || reason.contains("SASL authentication error")
}

/// A consumer for at-least-once processing with ordered acknowledgement: offsets are stored by the
/// runner only, and auto-committed from what it stored.
pub(crate) fn consumer(
    config: &KafkaConfig,
    group: &str,
    state: Arc<ConsumerState>,
) -> Result<StreamConsumer<RebalanceContext>, KafkaError> {
    consumer_with(config, group, false, state)
}

/// The consumers' `fetch.wait.max.ms` unless `kafka.consumer` sets it: a fifth of librdkafka's
/// default. An idle consumer then asks each broker 10 times a second instead of twice; a
/// stage that holds partitions to keep its rounds in order resumes them 4 times sooner
/// (docs/reliability.md, scenario 8). 100 ms is the knee measured there: 50 and 10 gained
/// nothing more.
const FETCH_WAIT_MAX_MS: &str = "100";

/// [`consumer`], optionally reporting the end of each partition (`KafkaError::PartitionEOF`),
/// which the stage runner uses to tell processors a partition is caught up.
pub(crate) fn consumer_with(
    config: &KafkaConfig,
    group: &str,
    partition_eof: bool,
    state: Arc<ConsumerState>,
) -> Result<StreamConsumer<RebalanceContext>, KafkaError> {
    consumer_config(config, group, partition_eof)?.create_with_context(RebalanceContext {
        state,
        ..RebalanceContext::default()
    })
}

/// The stages' consumer properties: ours, then `kafka.consumer`'s over them.
fn consumer_config(
    config: &KafkaConfig,
    group: &str,
    partition_eof: bool,
) -> Result<ClientConfig, KafkaError> {
    let mut c = base(config)?;
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "enable.partition.eof",
            if partition_eof { "true" } else { "false" },
        )
        // librdkafka's statistics carry each partition's consumer lag (metrics, readiness).
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        // How long the broker may keep a fetch open while the partitions in it have nothing
        // new (librdkafka's default: 500 ms). A partition resumed, or assigned, meanwhile is
        // fetched only by the next request, so every hold of a stage that aligns its partitions
        // (the fleet stage, the allocator) cost up to this much once the others were caught up
        // or paused, and so does every record that arrives to a stage waiting at its ends.
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
    // Session and heartbeat stay at librdkafka's defaults (45 s / 3 s): a broker busy serving
    // large fetches can answer heartbeats late, and a short session then evicts a healthy
    // consumer over and over.
    for (k, v) in &config.consumer {
        c.set(k, v);
    }
    Ok(c)
}

/// How often consumers report their statistics (partition lag), unless
/// `kafka.consumer."statistics.interval.ms"` says otherwise.
const STATISTICS_INTERVAL_MS: &str = "5000";

/// An idempotent producer that never gives up on a message by itself (`message.timeout.ms=0`):
/// while the broker is away, in-flight limits hold the consumer back instead of losing outputs.
///
/// It never bumps its producer epoch by itself either. An idempotent producer whose batch the
/// broker refuses (or whose later requests in flight fail for the gap it left) otherwise bumps
/// its epoch locally (KIP-360) and goes on with it; a broker that does not know that epoch may
/// fail for good (tansu's sqlite storage panics on it and answers nothing more until restarted).
/// With the gap-less guarantee and one request in flight, such a refusal makes the producer
/// fail instead, and [`Outputs`] replaces it with a new one, which asks the broker for a
/// producer id. (On Apache Kafka, `kafka.producer` may set both back to librdkafka's defaults.)
pub(crate) fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    let mut c = base(config)?;
    c.set("enable.idempotence", "true")
        .set("enable.gapless.guarantee", "true")
        .set("max.in.flight.requests.per.connection", "1")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    for (k, v) in &config.producer {
        c.set(k, v);
    }
    c.create()
}

/// Whether a producer's error means the producer itself has failed for good (see [`producer`]).
pub(crate) fn fatal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::GaplessGuarantee)
    )
}

/// A stage's producer, replaced by a new one when it has failed for good.
pub(crate) struct Outputs {
    producer: FutureProducer,
    config: KafkaConfig,
}

impl Outputs {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: producer(config)?,
            config: config.clone(),
        })
    }

    /// The producer in use.
    pub(crate) fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Whether the producer in use has failed for good.
    pub(crate) fn failed(&self) -> bool {
        self.producer.client().fatal_error().is_some()
    }

    /// A new producer in place of the one in use, whose queued outputs come back purged.
    pub(crate) fn replace(&mut self) -> Result<(), KafkaError> {
        let old = std::mem::replace(&mut self.producer, producer(&self.config)?);
        tokio::task::block_in_place(|| drop(old));
        Ok(())
    }
}

/// The (topic, partition)s a consumer owns now (none if it cannot say).
pub(crate) fn owned<C: ConsumerContext>(consumer: &impl Consumer<C>) -> Vec<(String, i32)> {
    consumer
        .assignment()
        .map(|tpl| {
            tpl.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect()
        })
        .unwrap_or_default()
}

/// Creates the pipeline's topics that do not exist yet.
pub async fn create_topics(config: &KafkaConfig, topics: &Topics) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(config)?.create()?;
    let new: Vec<NewTopic<'_>> = topics
        .all()
        .into_iter()
        .map(|name| NewTopic::new(name, config.partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(new.iter(), &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, error = %code, "Could not create topic.");
                });
            }
        }
    }
    Ok(())
}

/// Consumer context that tells the runner which partitions were taken away, so it stops tracking
/// (and never stores offsets for) them and drops the state that came from them.
#[derive(Debug, Default)]
pub(crate) struct RebalanceContext {
    /// Revocations and assignments since the runner last asked, in the order they happened (a
    /// partition revoked and assigned back in one rebalance must end up assigned).
    changes: Mutex<Vec<Rebalanced>>,
    /// Whether `changes` holds anything (set and cleared under its lock), so that the check
    /// made for every message received takes no lock in the common case.
    unsettled: std::sync::atomic::AtomicBool,
    /// What health checks and metrics see of this consumer.
    state: Arc<ConsumerState>,
}

/// One change of a consumer's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rebalanced {
    /// The partition (topic, number) is this consumer's now.
    Assigned(String, i32),
    /// It is not any more.
    Revoked(String, i32),
}

/// A stage consumer's assignment and lag, as health checks and metrics read them.
#[derive(Debug, Default)]
pub struct ConsumerState {
    /// The partitions it owns now.
    assigned: Mutex<BTreeSet<(String, i32)>>,
    /// Each owned partition's lag (messages between its position and the end), from the last
    /// statistics; partitions whose lag librdkafka does not know yet are absent.
    lag: Mutex<BTreeMap<(String, i32), i64>>,
}

impl ConsumerState {
    /// The partitions owned now.
    pub fn assigned(&self) -> BTreeSet<(String, i32)> {
        self.assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Each owned partition's last known lag.
    pub fn lag(&self) -> BTreeMap<(String, i32), i64> {
        self.lag
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether it owns `partition` of `topic` now.
    fn owns(&self, topic: &str, partition: i32) -> bool {
        self.assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(topic.to_owned(), partition))
    }

    fn revoke(&self, partitions: &[(String, i32)]) {
        let mut assigned = self.assigned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut lag = self.lag.lock().unwrap_or_else(PoisonError::into_inner);
        for p in partitions {
            assigned.remove(p);
            lag.remove(p);
        }
    }

    fn assign(&self, partitions: &[(String, i32)]) {
        self.assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(partitions.iter().cloned());
    }

    fn statistics(&self, stats: &Statistics) {
        let assigned = self.assigned();
        let mut lag = BTreeMap::new();
        for (topic, t) in &stats.topics {
            for (&partition, p) in &t.partitions {
                let key = (topic.clone(), partition);
                // Partition -1 is librdkafka's internal one; -1 lag means not known yet.
                if p.consumer_lag >= 0 && assigned.contains(&key) {
                    lag.insert(key, p.consumer_lag);
                }
            }
        }
        *self.lag.lock().unwrap_or_else(PoisonError::into_inner) = lag;
    }
}

impl RebalanceContext {
    /// Partitions revoked since the last call (for consumers that track only revocations).
    pub(crate) fn take_revoked(&self) -> Vec<(String, i32)> {
        self.take_changes()
            .into_iter()
            .filter_map(|c| match c {
                Rebalanced::Revoked(t, p) => Some((t, p)),
                Rebalanced::Assigned(..) => None,
            })
            .collect()
    }

    /// Whether changes waiting to be taken must be taken before a message of `partition` of
    /// `topic` is processed: its revocation, or any assignment (the message may be the first
    /// of partitions assigned together, and a stage must know all of them before it processes
    /// any: the fleet stage closes a round once every partition it owns is past it, so one it
    /// has not been told of yet would be left out of the rounds it closes).
    pub(crate) fn must_take_first(&self, topic: &str, partition: i32) -> bool {
        if !self.unsettled.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        self.changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|c| match c {
                Rebalanced::Revoked(t, p) => t == topic && *p == partition,
                Rebalanced::Assigned(..) => true,
            })
    }

    /// Assignment changes since the last call, in order.
    pub(crate) fn take_changes(&self) -> Vec<Rebalanced> {
        let mut changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        self.unsettled
            .store(false, std::sync::atomic::Ordering::Release);
        std::mem::take(&mut *changes)
    }

    /// Records changes of the assignment, in the order they happened.
    fn record(&self, new: impl IntoIterator<Item = Rebalanced>) {
        let mut changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        changes.extend(new);
        self.unsettled
            .store(!changes.is_empty(), std::sync::atomic::Ordering::Release);
    }
}

impl ClientContext for RebalanceContext {
    fn stats(&self, statistics: Statistics) {
        self.state.statistics(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // With `enable.partition.eof` the end of a partition comes this way too: news the
        // runner acts on (a partition caught up), not an error.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::trace!(reason, "Kafka: end of a partition.");
        } else {
            tracing::error!(error = %error, reason, "Kafka client error.");
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(?partitions, "Partitions revoked.");
                self.state.revoke(&partitions);
                self.record(
                    partitions
                        .into_iter()
                        .map(|(t, p)| Rebalanced::Revoked(t, p)),
                );
            }
            Rebalance::Assign(tpl) => {
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(?partitions, "Partitions assigned.");
                self.state.assign(&partitions);
                self.record(
                    partitions
                        .into_iter()
                        .map(|(t, p)| Rebalanced::Assigned(t, p)),
                );
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance failed."),
        }
    }
}

/// Resumes a stateless stage's consumer where its group committed, whatever the broker serves.
///
/// A consumer assigned a partition fetches from its group's committed offset, and a broker must
/// serve that fetch from the offset on even when it falls inside a record batch. One that serves
/// it from the next batch on (tansu 0.6's memory storage) would silently skip the records
/// between (docs/reliability.md). So the first message read from each partition after its
/// assignment is compared with the committed offset; one past it moves the consumer back
/// ([`Resume`]: further back each time the broker serves past it again), and what comes before
/// the committed offset is skipped, as it was processed before. Stateful stages resume at their
/// checkpoints instead and do not use this.
#[derive(Debug, Default)]
pub(crate) struct Resumer {
    /// Off: messages are passed on as they come (stateful stages).
    off: bool,
    /// Partitions read since their assignment.
    seen: std::collections::HashSet<(String, i32)>,
    resume: Resume<(String, i32)>,
    /// Offsets before the committed one: done before this consumer got the partition.
    done_before: std::collections::HashMap<(String, i32), i64>,
}

impl Resumer {
    /// A resumer for a stage that keeps state (`stateful`: it resumes at its checkpoints, and
    /// this one passes messages on as they come) or not.
    pub(crate) fn new(stateful: bool) -> Self {
        Self {
            off: stateful,
            ..Self::default()
        }
    }

    /// The partition was revoked: its next assignment is checked again.
    pub(crate) fn forget(&mut self, topic: &str, partition: i32) {
        let key = (topic.to_owned(), partition);
        self.seen.remove(&key);
        self.done_before.remove(&key);
        self.resume.forget(|k| *k == key);
    }

    /// Receives the next message to process, moving the consumer back when the broker served
    /// past the committed offset and skipping what comes before it.
    ///
    /// `None`: the group rebalanced during this receive, and the caller must take the changes
    /// before the message is processed ([`RebalanceContext::must_take_first`]). A message of a
    /// partition whose revocation is not taken yet would meet the state the stage held before
    /// the rebalance (state ahead of where the new assignment reads from: its records would look
    /// late or be folded twice); one that came with an assignment not taken yet would be
    /// processed before the stage knew all the partitions it owns. So the consumer is moved back
    /// to the message instead; the caller takes the changes
    /// ([`RebalanceContext::take_changes`]), then receives again.
    pub(crate) async fn recv<'a>(
        &mut self,
        stage: &'static str,
        consumer: &'a StreamConsumer<RebalanceContext>,
    ) -> rdkafka::error::KafkaResult<Option<rdkafka::message::BorrowedMessage<'a>>> {
        use rdkafka::{Message as _, Offset, TopicPartitionList};
        loop {
            let message = consumer.recv().await?;
            let offset = message.offset();
            if consumer
                .context()
                .must_take_first(message.topic(), message.partition())
            {
                let (topic, partition) = (message.topic().to_owned(), message.partition());
                tracing::debug!(stage, %topic, partition, offset, "Input received before the rebalance that came with it was taken; moving back to it.");
                let seek = blocking(|| {
                    consumer.seek(
                        &topic,
                        partition,
                        Offset::Offset(offset),
                        Duration::from_secs(10),
                    )
                });
                match seek {
                    Ok(()) => return Ok(None),
                    // Not assigned any more: its next owner reads it.
                    Err(e) if !consumer.context().state.owns(&topic, partition) => {
                        tracing::debug!(stage, %topic, partition, error = %e, "Seek back before a rebalance was taken failed; the partition is not ours any more.");
                        return Ok(None);
                    }
                    // Still ours: processed now rather than lost.
                    Err(e) => {
                        tracing::warn!(stage, %topic, partition, offset, error = %e, "Seek back before a rebalance was taken failed; the input is processed before it.");
                    }
                }
            }
            if self.off {
                return Ok(Some(message));
            }
            let key = (message.topic().to_owned(), message.partition());
            if self.seen.insert(key.clone()) {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&key.0, key.1);
                let committed =
                    blocking(|| consumer.committed_offsets(tpl, Duration::from_secs(10)));
                match committed.map(|t| t.find_partition(&key.0, key.1).map(|e| e.offset())) {
                    Ok(Some(Offset::Offset(next))) => {
                        self.resume.expect(key.clone(), next);
                        self.done_before.insert(key.clone(), next);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(stage, topic = %key.0, partition = key.1, error = %e, "Committed offset unknown; not checked.");
                    }
                }
            }
            if let Some(rewind) = self.resume.check(&key, offset)
                && move_back(
                    stage,
                    consumer,
                    &mut self.resume,
                    &key,
                    &key.0,
                    key.1,
                    offset,
                    rewind,
                )
            {
                continue;
            }
            if self.done_before.get(&key).is_some_and(|&n| offset < n) {
                continue;
            }
            return Ok(Some(message));
        }
    }
}

/// For tests against the broker the test command starts (`FORESIGHT_TEST_BROKERS`, default
/// `127.0.0.1:9092`): its configuration with `partitions` per topic, and topics of their own
/// (`name` and a random suffix), created.
#[cfg(test)]
pub(crate) async fn test_topics(name: &str, partitions: i32) -> (KafkaConfig, Topics) {
    let config = KafkaConfig {
        brokers: std::env::var("FORESIGHT_TEST_BROKERS")
            .unwrap_or_else(|_| "127.0.0.1:9092".into()),
        partitions,
        ..KafkaConfig::default()
    };
    let suffix: u64 = rand::random();
    let topics = Topics::new(&format!("{name}-{suffix:x}."));
    create_topics(&config, &topics).await.unwrap();
    (config, topics)
}

/// Runs a blocking client call from async code: on a multi-threaded runtime without holding up
/// the other tasks of its worker, on a current-thread one (tests, `replay`) in place.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Acts on a [`Rewind`] for input `offset` of `key` (`topic`, `partition`), read ahead of where
/// reading must resume: moves the consumer back (true: the caller reads on from there) or, when
/// the input between is gone, says so (false: the caller processes this input).
#[allow(clippy::too_many_arguments)]
pub(crate) fn move_back<K: std::hash::Hash + Eq + Clone>(
    stage: &'static str,
    consumer: &StreamConsumer<RebalanceContext>,
    resume: &mut Resume<K>,
    key: &K,
    topic: &str,
    partition: i32,
    offset: i64,
    rewind: Rewind,
) -> bool {
    use rdkafka::Offset;
    match rewind {
        Rewind::Skip => true,
        Rewind::Gone { expected } => {
            tracing::error!(
                stage,
                topic,
                partition,
                expected,
                first = offset,
                "Input between where reading must resume and the first offset the broker serves is gone (deleted by retention?); reading on."
            );
            false
        }
        Rewind::Seek { to, tries } => {
            if tries == 1 {
                tracing::info!(
                    stage,
                    topic,
                    partition,
                    from = offset,
                    to,
                    "Consumer ahead of where it must resume; moving it back."
                );
            } else {
                tracing::warn!(
                    stage,
                    topic,
                    partition,
                    from = offset,
                    to,
                    tries,
                    "The broker served a fetch from past the offset asked for (from the next record batch?); moving the consumer further back, input already done is skipped."
                );
            }
            let seek = blocking(|| {
                consumer.seek(
                    topic,
                    partition,
                    Offset::Offset(to),
                    Duration::from_secs(10),
                )
            });
            if let Err(e) = seek {
                tracing::warn!(stage, error = %e, "Seek failed; retrying.");
                resume.seek_failed(key);
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::{
        Message as _,
        mocking::MockCluster,
        producer::FutureRecord,
        types::{RDKafkaApiKey, RDKafkaRespErr},
    };

    async fn deliver(outputs: &mut Outputs, value: &str) -> Result<(), KafkaError> {
        let record = FutureRecord::to("t").key("k").payload(value.as_bytes());
        let delivery = crate::runner::enqueue(outputs, record).await?;
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_) => Err(KafkaError::Canceled),
        }
    }

    /// The stages' consumers wait at most 100 ms for a fetch to fill (librdkafka: 500 ms), and
    /// `kafka.consumer` still has the last word.
    #[test]
    fn consumers_fetch_again_within_100_ms_unless_configured() {
        let mut config = KafkaConfig::default();
        let ours = consumer_config(&config, "g", false).unwrap();
        assert_eq!(ours.get("fetch.wait.max.ms"), Some("100"));
        assert_eq!(ours.get("enable.auto.offset.store"), Some("false"));
        config
            .consumer
            .insert("fetch.wait.max.ms".into(), "500".into());
        let theirs = consumer_config(&config, "g", false).unwrap();
        assert_eq!(theirs.get("fetch.wait.max.ms"), Some("500"));
    }

    /// A batch the broker refuses makes the producer fail (and the next output goes out through
    /// a new one) instead of going on under an epoch it bumped itself, which tansu's storage
    /// does not survive. librdkafka's own mock broker does the refusing: no broker that runs
    /// here refuses a batch on demand (tansu did only as it stopped).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_batch_fails_the_producer_instead_of_bumping_its_epoch() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("t", 1, 1).unwrap();
        let config = KafkaConfig {
            brokers: mock.bootstrap_servers(),
            ..KafkaConfig::default()
        };
        let mut outputs = Outputs::new(&config).unwrap();
        deliver(&mut outputs, "one").await.unwrap();
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN],
        );
        let refused = deliver(&mut outputs, "two").await.unwrap_err();
        assert_eq!(
            refused.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Unknown),
            "{refused}"
        );
        let started = std::time::Instant::now();
        while !outputs.failed() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the producer goes on after a refused batch (under a bumped epoch)"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (code, reason) = outputs.producer().client().fatal_error().unwrap();
        assert_eq!(code, RDKafkaErrorCode::GaplessGuarantee, "{reason}");
        deliver(&mut outputs, "three").await.unwrap();
        assert!(!outputs.failed());
    }

    /// Partitions assigned together are all announced to the stage before any of their input is
    /// processed. (The first input of a rebalance comes from the receive the rebalance happened
    /// in; processed then, the fleet stage would close rounds on the one partition it knew of.)
    /// Against the broker the test command starts (`FORESIGHT_TEST_BROKERS`, default
    /// `127.0.0.1:9092`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn input_is_received_only_after_the_assignment_it_came_with_is_taken() {
        let (config, topics) = test_topics("rebalance", 3).await;
        let topic = topics.metrics.as_str();
        let producer = producer(&config).unwrap();
        for partition in 0..3 {
            for i in 0..5 {
                producer
                    .send(
                        FutureRecord::<(), _>::to(topic)
                            .partition(partition)
                            .payload(&format!("{i}")),
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
            }
        }

        for stateful in [true, false] {
            let consumer =
                consumer(&config, &format!("{topic}-{stateful}"), Arc::default()).unwrap();
            consumer.subscribe(&[topic]).unwrap();
            let mut resumer = Resumer::new(stateful);
            let mut taken = BTreeSet::new();
            let mut read = BTreeSet::new();
            let mut moved_back = 0;
            while read.len() < 15 {
                for change in consumer.context().take_changes() {
                    match change {
                        Rebalanced::Assigned(t, p) => assert!(taken.insert((t, p))),
                        Rebalanced::Revoked(t, p) => panic!("{t}/{p} revoked"),
                    }
                }
                let received =
                    tokio::time::timeout(Duration::from_secs(30), resumer.recv("test", &consumer))
                        .await
                        .expect("all input read within 30 s")
                        .unwrap();
                let Some(message) = received else {
                    moved_back += 1;
                    continue;
                };
                let key = (message.topic().to_owned(), message.partition());
                assert!(
                    taken.contains(&key),
                    "input of {key:?} received before its assignment was taken (taken: {taken:?})"
                );
                assert!(read.insert((key.1, message.offset())), "read twice");
            }
            assert_eq!(taken.len(), 3);
            // The first input came in the receive the assignment happened in, and was moved
            // back to once; each message was then read once, none lost.
            assert_eq!(moved_back, 1);
            let expected: BTreeSet<(i32, i64)> =
                (0..3).flat_map(|p| (0..5).map(move |o| (p, o))).collect();
            assert_eq!(read, expected);
        }
    }
}
