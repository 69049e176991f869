//! The live actuator stage: decisions (and the scores that verify applied actions) from Kafka,
//! through the [`Engine`], outcomes to Kafka (and so, through the recorder, to Postgres).
//!
//! Unlike the pure stages this one does IO per input (claims in Postgres, the actuators' calls),
//! so it is its own loop, as the recorder is. Exactly-once effects come from the engine's ledger,
//! not from Kafka: offsets are stored (ordered acknowledgement) only once every outcome of an
//! input is acknowledged by the broker, and a decision read again after a crash finds its row and
//! only re-emits the recorded outcomes, with the same ids.
//!
//! Decisions are handled one at a time, in offset order: actions on one entity happen in the
//! order they were decided, and the rate of actuation is meant to be low (the limits see to it).
//! The kill switch row is polled every `actuators.kill_switch_poll` (at most 1 s) by a side task
//! that interrupts actions in flight; every claim also reads it in its own transaction.

use std::{sync::atomic::Ordering, time::Duration};

use anyhow::Context as _;
use foresight_actuators::{Engine, KillSignal, Ledger};
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, ErrorClass, InputPartition, RiskScore, Routed,
};
use futures::{StreamExt, stream::FuturesUnordered};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer},
    error::KafkaError,
    message::{Header, OwnedHeaders, OwnedMessage},
    producer::FutureRecord,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    Config,
    kafka::{self, Topics},
    offsets::OffsetTracker,
    runner::{Progress, StageReport},
    watchdog::Watchdog,
};

/// The actuator stage's name.
pub const NAME: &str = "actuator";

/// The input index of the decisions topic.
const DECISIONS: u16 = 0;
/// The input index of the scores topic.
const SCORES: u16 = 1;

/// Outcomes not tied to an input (claims of crashed instances resolved by a scan) carry none.
/// A refused message comes back with its error, to be sent again.
type Delivery = std::pin::Pin<
    Box<
        dyn Future<
                Output = (
                    Option<(InputPartition, i64)>,
                    Result<(), (KafkaError, Option<OwnedMessage>)>,
                ),
            > + Send,
    >,
>;

/// Follows the kill switch row, so that actions in flight are interrupted within
/// `poll` of `foresight actuation stop`. The configuration's switch holds it engaged for good.
pub fn kill_switch(
    ledger: Ledger,
    configured: bool,
    poll: Duration,
    shutdown: CancellationToken,
) -> KillSignal {
    let (tx, rx) = tokio::sync::watch::channel(configured);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match ledger.stopped().await {
                Ok(stopped) => {
                    let engaged = stopped || configured;
                    tx.send_if_modified(|s| std::mem::replace(s, engaged) != engaged);
                }
                // Unreadable switch: keep the last state; claims read the row themselves and fail
                // (so act on nothing) while Postgres is away.
                Err(e) => tracing::warn!(stage = NAME, error = %e, "Kill switch unreadable."),
            }
        }
    });
    KillSignal::new(rx)
}

fn delivery(
    d: rdkafka::producer::DeliveryFuture,
    input: Option<(InputPartition, i64)>,
) -> Delivery {
    Box::pin(async move {
        let result = match d.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, message))) => Err((e, Some(message))),
            Err(_) => Err((KafkaError::Canceled, None)),
        };
        (input, result)
    })
}

/// Produces outcomes to the outcomes topic, in the trace of `traceparent` (counted in
/// `progress`'s actuations when given).
pub(crate) async fn send_outcomes(
    producer: &mut kafka::Outputs,
    topic: &str,
    outcomes: Vec<ActuationOutcome>,
    traceparent: &str,
    progress: Option<&Progress>,
) -> Result<Vec<rdkafka::producer::DeliveryFuture>, KafkaError> {
    let source = format!("/foresight/{NAME}");
    let mut out = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        if let Some(p) = progress {
            p.actuation(&o.actuator, o.status.as_str());
        }
        let m = o.into_message(&source);
        let record = FutureRecord::to(topic)
            .key(m.key.as_str())
            .payload(m.payload.as_slice())
            .headers(crate::runner::event_headers(traceparent));
        out.push(crate::runner::enqueue(producer, record).await?);
    }
    Ok(out)
}

/// Runs the engine call `$op` until it succeeds or fails for good; `None` on shutdown. Ledger
/// (Postgres) errors are retried with backoff: the input stays unacknowledged meanwhile, so
/// nothing is lost, and claims are idempotent, so a retry never acts twice. (A macro, because
/// the call borrows the engine mutably, which a retried closure cannot.)
macro_rules! retrying {
    ($shutdown:expr, $op:expr) => {{
        let mut backoff = Duration::from_millis(100);
        loop {
            match $op.await {
                Err(e) if e.is_retryable() => {
                    tracing::warn!(stage = NAME, error = %e, retry_in = ?backoff, "Actuation ledger unavailable; retrying.");
                    tokio::select! {
                        () = $shutdown.cancelled() => break None,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                other => break Some(other),
            }
        }
    }};
}

/// Runs the actuator stage until `shutdown`.
pub(crate) async fn run(
    config: &Config,
    pool: PgPool,
    progress: &Progress,
    shutdown: CancellationToken,
) -> anyhow::Result<StageReport> {
    let (k, r, a) = (&config.kafka, &config.runner, &config.actuators);
    let topics = Topics::new(&k.topic_prefix);
    let stop = kill_switch(
        Ledger::new(pool.clone()),
        a.stopped,
        a.kill_switch_poll,
        shutdown.child_token(),
    );
    let mut engine = Engine::new(a.clone(), pool, stop).context("building the actuators")?;
    let group = format!("{}{}", k.group_prefix, NAME);
    let mut consumer = kafka::consumer(k, &group, progress.consumer.clone())?;
    let mut producer = kafka::Outputs::new(k)?;
    let inputs = [topics.decisions.as_str(), topics.scores.as_str()];
    // The watchdog replaces a stalled consumer.
    let mut watchdog = Watchdog::new(NAME, r.stall_timeout);
    let mut stalled = false;
    // Outcomes refused by the broker since one was last delivered.
    let mut undelivered = 0;
    consumer.subscribe(&inputs)?;
    let mut resumer = kafka::Resumer::new(false);
    tracing::info!(stage = NAME, %group, "Stage started.");

    let mut report = StageReport::default();
    let mut tracker = OffsetTracker::default();
    let mut deliveries: FuturesUnordered<Delivery> = FuturesUnordered::new();
    let mut tick = tokio::time::interval(r.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first scan (at once) resolves what crashed instances left behind.
    let mut scan = tokio::time::interval(a.scan_interval);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failure: Option<anyhow::Error> = None;

    'main: loop {
        let mut dropped = Vec::new();
        if std::mem::take(&mut stalled) {
            // Store and commit what is done, then a new consumer rejoins the group from there.
            store(&consumer, &inputs, tracker.storable());
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(stage = NAME, error = %e, "Commit before replacing the consumer failed.");
            }
            dropped = kafka::owned(&consumer);
            let fresh = kafka::consumer(k, &group, progress.consumer.clone())?;
            tokio::task::block_in_place(|| drop(std::mem::replace(&mut consumer, fresh)));
            consumer.subscribe(&inputs)?;
            resumer = kafka::Resumer::new(false);
            tracing::info!(stage = NAME, partitions = ?dropped, "Stalled consumer replaced; rejoining the group.");
            watchdog.replaced();
        }
        for (topic, partition) in dropped.into_iter().chain(consumer.context().take_revoked()) {
            resumer.forget(&topic, partition);
            if let Some(input) = inputs.iter().position(|t| *t == topic) {
                tracker.revoke(InputPartition {
                    input: input as u16,
                    partition,
                });
            }
        }
        tokio::select! {
            // Shutdown first, then acknowledgements (they let offsets advance), then the
            // periodic store and scan, and only then new input.
            biased;
            () = shutdown.cancelled() => break,
            Some((input, result)) = deliveries.next(), if !deliveries.is_empty() => {
                match result {
                    Ok(()) => {
                        watchdog.acknowledged();
                        undelivered = 0;
                        if let Some((p, o)) = input { tracker.ack(p, o) }
                    }
                    // The broker refused an outcome (seen: an unknown broker error for the
                    // first batches after the broker restarted): sent again, as it was, by a
                    // new producer after a pause (the old one's outputs in flight come back
                    // purged, and are sent again too); an error that keeps coming back with
                    // nothing delivered in between stops the stage. (Outcomes of a scan are
                    // made once, so they are sent again rather than made again from re-read
                    // input.)
                    Err((e, Some(message))) if crate::runner::purged(&e) || !crate::runner::refused_for_good(&e) => {
                        if crate::runner::refusal(&e, &producer) {
                            undelivered += 1;
                            tracing::warn!(stage = NAME, error = %e, topic = message.topic(), attempt = undelivered, "Outcome not delivered; sending it again with a new producer.");
                            tokio::time::sleep(crate::runner::resend_pause(undelivered)).await;
                            producer.replace()?;
                        }
                        let d = crate::runner::enqueue_again(&mut producer, &message).await?;
                        deliveries.push(delivery(d, input));
                    }
                    Err((e, _)) => { failure = Some(anyhow::Error::new(e).context("delivering an outcome")); break; }
                }
            }
            _ = tick.tick() => {
                store(&consumer, &inputs, tracker.storable());
                if let Some(fault) = progress.take_fault(NAME, &consumer) {
                    tracing::warn!(stage = NAME, ?fault, "Fault not supported by this stage; ignored.");
                }
                progress.in_flight.store(tracker.in_flight() as u64, Ordering::Relaxed);
                if watchdog.check(&consumer, tracker.in_flight(), r.max_in_flight).is_some() {
                    progress.stalls.fetch_add(1, Ordering::Relaxed);
                    stalled = true;
                }
            }
            _ = scan.tick() => {
                let Some(scanned) = retrying!(shutdown, engine.scan()) else { break };
                match scanned {
                    Ok(outcomes) => {
                        let traceparent = crate::telemetry::new_traceparent();
                        for d in send_outcomes(&mut producer, &topics.outcomes, outcomes, &traceparent, Some(progress)).await? {
                            report.event(progress);
                            deliveries.push(delivery(d, None));
                        }
                    }
                    Err(e) => tracing::error!(stage = NAME, error = %e, "Scan of the actuation ledger failed."),
                }
            }
            message = resumer.recv(NAME, &consumer), if tracker.in_flight() < r.max_in_flight => {
                let message = match message {
                    Ok(Some(m)) => {
                        watchdog.read();
                        m
                    }
                    // A rebalance to take first (at the top of the loop).
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(stage = NAME, error = %e, "Consumer error; retrying.");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                report.message(progress);
                let Some(input) = inputs.iter().position(|t| *t == message.topic()) else { continue };
                let input = input as u16;
                let partition = InputPartition { input, partition: message.partition() };
                let offset = message.offset();
                let payload = message.payload().unwrap_or_default();
                let parent = crate::telemetry::extract(message.headers());
                let span = crate::telemetry::input_span(NAME, message.topic(), partition.partition, offset, &parent);
                let traceparent = crate::telemetry::traceparent(&span, &parent);
                let mut outcomes = Vec::new();
                let mut dead: Option<(ErrorClass, String)> = None;
                if input == DECISIONS {
                    match crate::pipeline::envelope::<Decision>(payload) {
                        Err(rejection) => dead = Some((rejection.class, rejection.reason)),
                        Ok(decision) => match retrying!(shutdown, engine.decide(&decision)) {
                            None => break 'main,
                            Some(Ok(o)) => outcomes = o,
                            Some(Err(e)) => {
                                tracing::error!(stage = NAME, error = %e, "Decision not actuated.");
                                dead = Some((ErrorClass::InvalidValue, format!("not actuated: {e}")));
                            }
                        },
                    }
                } else if input == SCORES {
                    // Scores matter only for entities with an action being verified; the
                    // recorder dead-letters undecodable ones, so they are skipped here.
                    let watched = message
                        .key()
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .is_some_and(|entity| engine.watches_entity(entity));
                    if watched && let Ok(score) = crate::pipeline::envelope::<RiskScore>(payload) {
                        match retrying!(shutdown, engine.score(&score)) {
                            None => break 'main,
                            Some(Ok(o)) => outcomes = o,
                            Some(Err(e)) => tracing::error!(stage = NAME, error = %e, "Verification step failed."),
                        }
                    }
                }
                let mut sent = Vec::new();
                if let Some((class, reason)) = dead {
                    let mut dl = DeadLetter {
                        stage: NAME.into(),
                        source_topic: message.topic().into(),
                        partition: message.partition(),
                        offset,
                        error_class: class,
                        reason,
                        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: payload.to_vec(),
                    };
                    crate::runner::cap_payload(&mut dl, r.dead_letter_max_bytes);
                    let hs = dl.headers().iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                        h.insert(Header { key: k, value: Some(v.as_bytes()) })
                    });
                    let mut record = FutureRecord::to(&topics.dead_letters).payload(dl.payload.as_slice()).headers(hs);
                    if let Some(key) = dl.key.as_deref() {
                        record = record.key(key);
                    }
                    sent.push(crate::runner::enqueue(&mut producer, record).await?);
                    report.dead_letter(progress, dl.error_class);
                }
                drop(span);
                for d in send_outcomes(&mut producer, &topics.outcomes, outcomes, &traceparent, Some(progress)).await? {
                    report.event(progress);
                    sent.push(d);
                }
                tracker.read(partition, offset, sent.len());
                for d in sent {
                    deliveries.push(delivery(d, Some((partition, offset))));
                }
            }
        }
    }

    if failure.is_none() {
        let drained = tokio::time::timeout(r.drain_timeout, async {
            while let Some((input, result)) = deliveries.next().await {
                if let (Some((p, o)), Ok(())) = (input, result) {
                    tracker.ack(p, o);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                stage = NAME,
                "Drain timed out; unacknowledged inputs will be re-read."
            );
        }
        store(&consumer, &inputs, tracker.storable());
    }
    crate::runner::stopped(
        NAME,
        &consumer,
        producer.producer(),
        r.drain_timeout,
        report,
        failure,
    )
}

fn store(
    consumer: &rdkafka::consumer::StreamConsumer<kafka::RebalanceContext>,
    inputs: &[&str],
    storable: Vec<(InputPartition, i64)>,
) {
    if storable.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (source, offset) in storable {
        let topic = inputs[usize::from(source.input)];
        let _ = tpl.add_partition_offset(topic, source.partition, Offset::Offset(offset));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(stage = NAME, error = %e, "Offsets not stored (partition revoked?).");
    }
}

/// What a person asked of the actuators from the command line.
#[derive(Debug, Clone)]
pub enum ByHand {
    /// Apply a proposed decision.
    Approve(foresight_events::EventId),
    /// Undo an applied decision, for the reason given.
    Rollback(foresight_events::EventId, String),
}

/// Runs `foresight approve` or `foresight rollback`: acts through the same engine as the live
/// stage (same ledger, same gates, same actuators) and delivers the outcomes to the outcomes
/// topic before returning them.
pub async fn by_hand(config: &Config, what: ByHand) -> anyhow::Result<Vec<ActuationOutcome>> {
    let pool = crate::db::connect(&config.postgres)
        .await
        .context("connecting to Postgres")?;
    let shutdown = CancellationToken::new();
    let a = &config.actuators;
    let stop = kill_switch(
        Ledger::new(pool.clone()),
        a.stopped,
        a.kill_switch_poll,
        shutdown.clone(),
    );
    let mut engine = Engine::new(a.clone(), pool, stop).context("building the actuators")?;
    let result = match what {
        ByHand::Approve(id) => engine.approve(id).await,
        ByHand::Rollback(id, reason) => engine.rollback(id, &reason).await,
    };
    shutdown.cancel();
    let outcomes = result?;
    let mut producer = kafka::Outputs::new(&config.kafka)?;
    let topics = Topics::new(&config.kafka.topic_prefix);
    let traceparent = crate::telemetry::new_traceparent();
    for d in send_outcomes(
        &mut producer,
        &topics.outcomes,
        outcomes.clone(),
        &traceparent,
        None,
    )
    .await?
    {
        d.await
            .map_err(|_| KafkaError::Canceled)?
            .map_err(|(e, _)| e)
            .with_context(|| format!("delivering the outcome to {}", topics.outcomes))?;
    }
    Ok(outcomes)
}

/// `foresight actuation stop|start|status`.
pub async fn switch(config: &Config, stop: Option<(bool, String)>) -> anyhow::Result<String> {
    let pool = crate::db::connect(&config.postgres)
        .await
        .context("connecting to Postgres")?;
    let ledger = Ledger::new(pool);
    if let Some((stopped, reason)) = stop {
        ledger.set_stopped(stopped, &reason).await?;
    }
    let s = ledger.status().await?;
    let mut text = if s.stopped || config.actuators.stopped {
        format!(
            "Actuation is STOPPED{}{} (since {}).",
            if config.actuators.stopped {
                " by configuration (actuators.stopped)"
            } else {
                ""
            },
            if s.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", s.reason)
            },
            s.changed_at.to_rfc3339()
        )
    } else {
        format!(
            "Actuation is running (since {}).",
            s.changed_at.to_rfc3339()
        )
    };
    for (state, n) in s.states {
        text.push_str(&format!("\n  {state}: {n}"));
    }
    Ok(text)
}
