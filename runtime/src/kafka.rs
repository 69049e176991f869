//! Kafka clients, topic names and topic creation.

use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use rdkafka::{
    ClientConfig, ClientContext,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    producer::FutureProducer,
    types::RDKafkaErrorCode,
};

use crate::config::KafkaConfig;

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

fn base(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.client {
        c.set(k, v);
    }
    c
}

/// A consumer for at-least-once processing with ordered acknowledgement: offsets are stored by the
/// runner only, and auto-committed from what it stored.
pub(crate) fn consumer(
    config: &KafkaConfig,
    group: &str,
) -> Result<StreamConsumer<RebalanceContext>, KafkaError> {
    consumer_with(config, group, false)
}

/// [`consumer`], optionally reporting the end of each partition (`KafkaError::PartitionEOF`),
/// which the stage runner uses to tell processors a partition is caught up.
pub(crate) fn consumer_with(
    config: &KafkaConfig,
    group: &str,
    partition_eof: bool,
) -> Result<StreamConsumer<RebalanceContext>, KafkaError> {
    let mut c = base(config);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "enable.partition.eof",
            if partition_eof { "true" } else { "false" },
        );
    // Session and heartbeat stay at librdkafka's defaults (45 s / 3 s): a broker busy serving
    // large fetches can answer heartbeats late, and a short session then evicts a healthy
    // consumer over and over.
    for (k, v) in &config.consumer {
        c.set(k, v);
    }
    c.create_with_context(RebalanceContext::default())
}

/// An idempotent producer that never gives up on a message by itself (`message.timeout.ms=0`):
/// while the broker is away, in-flight limits hold the consumer back instead of losing outputs.
pub(crate) fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    let mut c = base(config);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    for (k, v) in &config.producer {
        c.set(k, v);
    }
    c.create()
}

/// Creates the pipeline's topics that do not exist yet.
pub async fn create_topics(config: &KafkaConfig, topics: &Topics) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base(config).create()?;
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
    revoked: Mutex<Vec<(String, i32)>>,
    assigned: Mutex<Vec<(String, i32)>>,
}

impl RebalanceContext {
    /// Partitions revoked since the last call.
    pub(crate) fn take_revoked(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Partitions assigned since the last call.
    pub(crate) fn take_assigned(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.assigned.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl ClientContext for RebalanceContext {}

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
                self.revoked
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(partitions);
            }
            Rebalance::Assign(tpl) => {
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(?partitions, "Partitions assigned.");
                self.assigned
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(partitions);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance failed."),
        }
    }
}
