//! The recorder: writes decisions, outcomes, scores and failure reports to the Postgres audit log.
//!
//! Each source partition's share of a batch is one transaction holding its events (inserted once,
//! by id) and the partition's next offset, written by that partition's writer task while the
//! stage reads the next batch ([`Writers`]). Offsets are stored in Kafka only after that
//! transaction commits, and the offsets in Postgres are authoritative: a message at or past a
//! recorded offset is skipped, and a redelivered one inserts nothing twice anyway. While Postgres
//! is away the writers retry with backoff and, their queues full, the stage reads nothing new, so
//! no offset ever advances past unrecorded work.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use chrono::{DateTime, Utc};
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, ErrorClass, Event, EventData, FailureReport, RiskScore,
};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer},
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
};
use sqlx::PgPool;
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::{KafkaConfig, RunnerConfig},
    kafka::{self, Topics},
    offsets::Resume,
    runner::{Progress, StageError, StageReport},
    watchdog::Watchdog,
};

/// The recorder's stage name.
pub const NAME: &str = "recorder";

/// One row of the `events` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Event id.
    pub id: Uuid,
    /// CloudEvents type.
    pub ty: String,
    /// Entity.
    pub entity: String,
    /// Event time.
    pub time: DateTime<Utc>,
    /// Schema version.
    pub schema_version: i32,
    /// The data.
    pub payload: serde_json::Value,
}

/// The row an event is recorded as.
pub fn row<T: EventData>(data: T) -> Row {
    Row {
        id: data.id().0,
        ty: T::event_type(),
        entity: data.entity().to_string(),
        time: data.time(),
        schema_version: T::VERSION as i32,
        payload: serde_json::to_value(&data).expect("event types serialise"),
    }
}

fn envelope<T: EventData>(bytes: &[u8]) -> Result<Row, (ErrorClass, String)> {
    Event::<T>::from_json(bytes)
        .map(|e| row(e.data))
        .map_err(|e| match e {
            foresight_events::EnvelopeError::UnknownSchemaVersion { .. } => {
                (ErrorClass::UnknownSchemaVersion, e.to_string())
            }
            _ => (ErrorClass::Undecodable, e.to_string()),
        })
}

/// Decodes a message of one of the recorded topics into a row; a row the audit log cannot hold
/// (a time outside years 1-9999, or a payload with a NUL character, which Postgres' text and jsonb
/// types refuse) is rejected here rather than stalling the recorder on a batch that cannot commit.
pub(crate) fn decode(
    topics: &Topics,
    topic: &str,
    bytes: &[u8],
) -> Result<Row, (ErrorClass, String)> {
    let row = decode_row(topics, topic, bytes)?;
    if !crate::audit::recordable(row.time) {
        return Err((
            ErrorClass::TimestampOutOfRange,
            format!(
                "time {} is outside the audit log's range (years 1-9999)",
                row.time
            ),
        ));
    }
    if row.entity.contains('\0') || has_nul(&row.payload) {
        return Err((
            ErrorClass::Undecodable,
            "contains a NUL character, which Postgres cannot store".to_owned(),
        ));
    }
    Ok(row)
}

fn has_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn decode_row(topics: &Topics, topic: &str, bytes: &[u8]) -> Result<Row, (ErrorClass, String)> {
    if topic == topics.decisions {
        envelope::<Decision>(bytes)
    } else if topic == topics.outcomes {
        envelope::<ActuationOutcome>(bytes)
    } else if topic == topics.scores {
        envelope::<RiskScore>(bytes)
    } else if topic == topics.failures {
        // Failure reports come from people and their tools: a bare report is accepted as well as
        // an envelope, and its id is derived from entity, time and kind either way.
        if serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("specversion").is_some())
        {
            envelope::<FailureReport>(bytes)
        } else {
            serde_json::from_slice::<FailureReport>(bytes)
                .map(row)
                .map_err(|e| {
                    (
                        ErrorClass::Undecodable,
                        format!("not a failure report: {e}"),
                    )
                })
        }
    } else {
        Err((
            ErrorClass::Undecodable,
            format!("topic {topic} is not recorded"),
        ))
    }
}

/// Whether a row is kept under the score sample: every row but low-band scores, and of those the
/// share `sample`, chosen by id (deterministic: a replay keeps the same ones).
fn sampled(row: &Row, sample: f64) -> bool {
    if sample >= 1.0 || row.ty != RiskScore::event_type() {
        return true;
    }
    if row.payload.get("band").and_then(|b| b.as_str()) != Some("low") {
        return true;
    }
    let bits = u64::from_be_bytes(row.id.as_bytes()[..8].try_into().expect("8 bytes"));
    (bits as f64 / u64::MAX as f64) < sample
}

/// Where a recorded event was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A source partition's rows to record and the offset to store with them.
struct Job {
    rows: Vec<(Row, Position)>,
    next: i64,
}

/// A job committed: its partition's rows are in the audit log and its offset beside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// The partition's next offset, now stored in Postgres with the rows before it.
    pub next: i64,
    /// Rows inserted (redelivered rows are skipped).
    pub inserted: u64,
}

/// The recorder's writers: a task per source partition that records the partition's batches in
/// order, each in one transaction with the partition's next offset, while the stage reads on.
///
/// Each partition is its own hash chain and its own offset, so partitions share no lock and
/// write concurrently (on every core the runtime has), and a partition's batches commit in the
/// order they were read, so its stored offset never passes unrecorded work. At most `depth`
/// batches wait per partition: when Postgres is slower than the input, or away (a writer retries
/// with backoff until the shutdown), [`Writers::submit`] waits, and the stage reads nothing new.
pub struct Writers {
    pool: PgPool,
    group: String,
    depth: usize,
    shutdown: CancellationToken,
    queues: HashMap<(String, i32), mpsc::Sender<Job>>,
    done_tx: mpsc::UnboundedSender<Written>,
    done_rx: mpsc::UnboundedReceiver<Written>,
    tasks: JoinSet<()>,
    in_flight: usize,
}

impl Writers {
    /// Writers for consumer group `group` (whose offsets they store in Postgres), with at most
    /// `depth` batches waiting per partition; they stop retrying a failed write at `shutdown`.
    pub fn new(pool: PgPool, group: &str, depth: usize, shutdown: CancellationToken) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            pool,
            group: group.to_owned(),
            depth: depth.max(1),
            shutdown,
            queues: HashMap::new(),
            done_tx,
            done_rx,
            tasks: JoinSet::new(),
            in_flight: 0,
        }
    }

    /// Queues a batch: each partition's rows with its next offset from `next` (every partition
    /// there gets a job, rows or not, so its offset is stored). Waits while a partition's queue is
    /// full. `false` if a writer has stopped (the shutdown came while Postgres was failing).
    pub async fn submit(
        &mut self,
        rows: Vec<(Row, Position)>,
        next: &HashMap<(String, i32), i64>,
    ) -> bool {
        // Each partition's rows, in a fixed order of partitions, so that two runs over the same
        // input queue the same way.
        let mut keys: Vec<((String, i32), i64)> =
            next.iter().map(|(k, n)| (k.clone(), *n)).collect();
        keys.sort_unstable();
        let mut parts: Vec<Vec<(Row, Position)>> = keys.iter().map(|_| Vec::new()).collect();
        for (r, p) in rows {
            let at = keys.binary_search_by(|((t, q), _)| {
                (t.as_str(), *q).cmp(&(p.topic.as_str(), p.partition))
            });
            match at {
                Ok(i) => parts[i].push((r, p)),
                // Not the caller's contract (`next` covers every row's partition); recorded
                // all the same, with the offset after the row.
                Err(i) => {
                    keys.insert(i, ((p.topic.clone(), p.partition), p.offset + 1));
                    parts.insert(i, vec![(r, p)]);
                }
            }
        }
        for ((key, next), rows) in keys.iter().zip(parts) {
            let next = rows.iter().map(|(_, p)| p.offset + 1).fold(*next, i64::max);
            let job = Job { rows, next };
            let queue = match self.queues.get(key) {
                Some(q) => q.clone(),
                None => {
                    let (tx, rx) = mpsc::channel(self.depth);
                    self.tasks.spawn(writer(
                        self.pool.clone(),
                        self.group.clone(),
                        key.clone(),
                        rx,
                        self.done_tx.clone(),
                        self.shutdown.clone(),
                    ));
                    self.queues.insert(key.clone(), tx.clone());
                    tx
                }
            };
            if queue.send(job).await.is_err() {
                return false;
            }
            self.in_flight += 1;
        }
        true
    }

    /// Jobs queued or being written.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The next job committed; waits for one (never resolves while nothing is in flight, so it
    /// can sit in a `select!`).
    pub async fn written(&mut self) -> Written {
        if self.in_flight == 0 {
            return std::future::pending().await;
        }
        match self.done_rx.recv().await {
            Some(w) => {
                self.in_flight -= 1;
                w
            }
            // `self` holds a sender, so the channel cannot close.
            None => std::future::pending().await,
        }
    }

    /// Every job committed so far, without waiting.
    pub fn try_written(&mut self) -> Vec<Written> {
        let mut out = Vec::new();
        while let Ok(w) = self.done_rx.try_recv() {
            self.in_flight -= 1;
            out.push(w);
        }
        out
    }

    /// Waits until every queued job is committed, or for the shutdown (then [`Writers::close`]
    /// says what was still written).
    pub async fn drain(&mut self) -> Vec<Written> {
        let mut out = self.try_written();
        while self.in_flight > 0 {
            tokio::select! {
                w = self.done_rx.recv() => if let Some(w) = w {
                    self.in_flight -= 1;
                    out.push(w);
                },
                () = self.shutdown.cancelled() => break,
                // A writer ends early only by a panic (or at the shutdown, above).
                Some(r) = self.tasks.join_next() => resume_panic(r),
            }
        }
        out
    }

    /// Closes the queues and waits for the writers to write what they hold (a writer whose write
    /// fails after the shutdown stops without it: those offsets are stored nowhere).
    pub async fn close(mut self) -> Vec<Written> {
        self.queues.clear();
        while let Some(r) = self.tasks.join_next().await {
            resume_panic(r);
        }
        self.try_written()
    }
}

fn resume_panic(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// One source partition's writer: records its jobs in order; a failed write is retried with
/// backoff (the job stays at the head of the queue) until it succeeds or the shutdown comes.
async fn writer(
    pool: PgPool,
    group: String,
    (topic, partition): (String, i32),
    mut jobs: mpsc::Receiver<Job>,
    done: mpsc::UnboundedSender<Written>,
    shutdown: CancellationToken,
) {
    // Months whose partition of `events` is known to exist: ensured (committed) before the
    // transaction that needs them, once.
    let mut months: HashSet<(i32, u32)> = HashSet::new();
    while let Some(job) = jobs.recv().await {
        let mut backoff = Duration::from_millis(100);
        loop {
            match write(
                &pool,
                &group,
                &job.rows,
                &topic,
                partition,
                job.next,
                &mut months,
            )
            .await
            {
                Ok(inserted) => {
                    tracing::debug!(stage = NAME, %topic, partition, rows = job.rows.len(), inserted, next = job.next, "Batch recorded.");
                    let _ = done.send(Written {
                        topic: topic.clone(),
                        partition,
                        next: job.next,
                        inserted,
                    });
                    break;
                }
                Err(e) => {
                    tracing::warn!(stage = NAME, %topic, partition, error = %e, retry_in = ?backoff, "Recording failed; retrying.");
                    tokio::select! {
                        // Stop without storing: the batch is re-read by whoever runs next.
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Writes one source partition's rows and its next offset in one transaction.
async fn write(
    pool: &PgPool,
    group: &str,
    rows: &[(Row, Position)],
    topic: &str,
    partition: i32,
    next: i64,
    months: &mut HashSet<(i32, u32)>,
) -> Result<u64, sqlx::Error> {
    use chrono::Datelike as _;
    let new: Vec<DateTime<Utc>> = rows
        .iter()
        .map(|(r, _)| r.time)
        .filter(|t| !months.contains(&(t.year(), t.month())))
        .collect();
    if !new.is_empty() {
        crate::audit::ensure_months(pool, new.iter().copied()).await?;
        months.extend(new.iter().map(|t| (t.year(), t.month())));
    }
    let mut tx = pool.begin().await?;
    let inserted = crate::audit::append(&mut tx, rows).await?;
    sqlx::query(
        "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (consumer_group, topic, partition) DO UPDATE \
         SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset), updated_at = clock_timestamp()",
    )
    .bind(group)
    .bind(topic)
    .bind(partition)
    .bind(next)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(inserted)
}

async fn recorded_offsets(
    pool: &PgPool,
    group: &str,
) -> Result<HashMap<(String, i32), i64>, sqlx::Error> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

type StageConsumer = rdkafka::consumer::StreamConsumer<kafka::RebalanceContext>;

/// Each partition's next offset as recorded in Postgres.
struct Recorded {
    next: HashMap<(String, i32), i64>,
    /// Whether any was recorded since the last commit (or that commit failed).
    changed: bool,
}

impl Recorded {
    /// Stores in Kafka the offsets of the jobs written (each already stored in Postgres with its
    /// rows).
    ///
    /// They are also committed explicitly (every `runner.commit_interval`, [`Recorded::commit`]),
    /// not left to the consumer's auto-commit alone: after a Postgres outage had held the stage's
    /// loop, offsets stored were seen never committed (the group's committed offset stayed behind
    /// what Postgres holds, for good, and its lag said so).
    fn store(
        &mut self,
        consumer: &StageConsumer,
        report: &mut StageReport,
        progress: &Progress,
        written: Vec<Written>,
    ) {
        if written.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for w in written {
            report.events += w.inserted;
            progress
                .events
                .fetch_add(w.inserted, std::sync::atomic::Ordering::Relaxed);
            let next = self
                .next
                .entry((w.topic.clone(), w.partition))
                .or_insert(w.next);
            *next = (*next).max(w.next);
            self.changed = true;
            let _ = tpl.add_partition_offset(&w.topic, w.partition, Offset::Offset(w.next));
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::debug!(stage = NAME, error = %e, "Offsets not stored (partition revoked?).");
        }
    }

    /// Commits, in `mode`, the recorded offsets of the partitions the consumer owns (another
    /// member's committed offset is not moved back): asynchronously only if any was recorded
    /// since the last commit, synchronously always.
    ///
    /// All of them, each time: one request, and a commit that failed (an asynchronous one
    /// reports its failure to no one here) is made good by the next, with nothing to track.
    fn commit(&mut self, consumer: &StageConsumer, mode: CommitMode) {
        if matches!(mode, CommitMode::Async) && !self.changed {
            return;
        }
        self.changed = false;
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in kafka::owned(consumer) {
            if let Some(&next) = self.next.get(&(topic.clone(), partition)) {
                let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            self.changed = true;
            tracing::debug!(stage = NAME, error = %e, "Recorded offsets not committed (partition revoked?); the next commit carries them.");
        }
    }

    /// Forgets a revoked partition.
    fn forget(&mut self, key: &(String, i32)) {
        self.next.remove(key);
    }
}

/// Runs the recorder until `shutdown` is cancelled.
pub(crate) async fn run(
    pool: PgPool,
    kafka_config: &KafkaConfig,
    runner: &RunnerConfig,
    topics: &Topics,
    progress: &Progress,
    shutdown: CancellationToken,
) -> Result<StageReport, StageError> {
    let err = |source| StageError::Kafka {
        stage: NAME,
        source,
    };
    let group = format!("{}{}", kafka_config.group_prefix, NAME);
    let mut consumer =
        kafka::consumer(kafka_config, &group, progress.consumer.clone()).map_err(err)?;
    let mut producer = kafka::Outputs::new(kafka_config).map_err(err)?;
    let inputs = [
        &topics.decisions,
        &topics.outcomes,
        &topics.scores,
        &topics.failures,
    ];
    consumer
        .subscribe(&inputs.map(String::as_str))
        .map_err(err)?;
    tracing::info!(stage = NAME, %group, "Stage started.");

    let mut recorded = loop {
        match recorded_offsets(&pool, &group).await {
            Ok(next) => {
                break Recorded {
                    next,
                    changed: false,
                };
            }
            Err(e) => {
                tracing::warn!(stage = NAME, error = %e, "Postgres unavailable; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(StageReport::default()),
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    // Where each partition recorded before must resume: a consumer starting past it (its group's
    // commit lags Postgres, or a broker serves a fetch from the next record batch on) is moved back.
    let mut resume = Resume::default();
    for (key, &next) in &recorded.next {
        resume.expect(key.clone(), next);
    }
    let mut report = StageReport::default();
    // Two batches per partition: one being written while the next is read and queued.
    let mut writers = Writers::new(pool.clone(), &group, 1, shutdown.clone());
    // The watchdog replaces a stalled consumer (at the end of the batch being collected).
    let mut watchdog = Watchdog::new(NAME, runner.stall_timeout);
    let mut watch = tokio::time::interval(runner.commit_interval);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = false;
    'outer: loop {
        if std::mem::take(&mut stalled) {
            // What was read is recorded (and its offsets stored) before the consumer goes.
            let written = writers.drain().await;
            recorded.store(&consumer, &mut report, progress, written);
            if shutdown.is_cancelled() {
                break 'outer;
            }
            recorded.commit(&consumer, CommitMode::Sync);
            let dropped = kafka::owned(&consumer);
            let fresh =
                kafka::consumer(kafka_config, &group, progress.consumer.clone()).map_err(err)?;
            tokio::task::block_in_place(|| drop(std::mem::replace(&mut consumer, fresh)));
            consumer
                .subscribe(&inputs.map(String::as_str))
                .map_err(err)?;
            // The new consumer resumes where the audit log says, as at the start.
            match recorded_offsets(&pool, &group).await {
                Ok(r) => recorded.next = r,
                Err(e) => {
                    tracing::warn!(stage = NAME, error = %e, "Recorded offsets not read again; resuming from those known.");
                }
            }
            resume = Resume::default();
            for (key, &next) in &recorded.next {
                resume.expect(key.clone(), next);
            }
            tracing::info!(stage = NAME, partitions = ?dropped, "Stalled consumer replaced; rejoining the group.");
            watchdog.replaced();
        }
        // Collect one batch.
        let mut rows: Vec<(Row, Position)> = Vec::new();
        let mut next: HashMap<(String, i32), i64> = HashMap::new();
        let mut dead = Vec::new();
        // The watchdog's clock counts only time spent waiting for input (not a Postgres outage
        // waited out in the last batch's write).
        watchdog.read();
        let deadline = tokio::time::sleep(runner.recorder_linger);
        tokio::pin!(deadline);
        let mut stopping = false;
        while rows.len() + dead.len() < runner.recorder_batch {
            let message = tokio::select! {
                biased;
                () = shutdown.cancelled() => { stopping = true; break; }
                () = &mut deadline, if !next.is_empty() => break,
                w = writers.written() => {
                    recorded.store(&consumer, &mut report, progress, vec![w]);
                    continue;
                }
                _ = watch.tick() => {
                    recorded.commit(&consumer, CommitMode::Async);
                    if let Some(fault) = progress.take_fault(NAME, &consumer) {
                        tracing::warn!(stage = NAME, ?fault, "Fault not supported by this stage; ignored.");
                    }
                    progress.in_flight.store(writers.in_flight() as u64, std::sync::atomic::Ordering::Relaxed);
                    if watchdog.check(&consumer, 0, 1).is_some() {
                        progress.stalls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        stalled = true;
                        break;
                    }
                    continue;
                }
                m = consumer.recv() => m,
            };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(stage = NAME, error = %e, "Consumer error; retrying.");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            report.message(progress);
            watchdog.read();
            let key = (message.topic().to_owned(), message.partition());
            // Read from the recorded offset if the consumer came back past it: the input between
            // was never recorded.
            if let Some(rewind) = resume.check(&key, message.offset())
                && kafka::move_back(
                    NAME,
                    &consumer,
                    &mut resume,
                    &key,
                    &key.0,
                    key.1,
                    message.offset(),
                    rewind,
                )
            {
                continue;
            }
            next.insert(key.clone(), message.offset() + 1);
            if recorded
                .next
                .get(&key)
                .is_some_and(|&n| message.offset() < n)
            {
                // Already recorded (Postgres is ahead of Kafka's commit).
                tracing::debug!(stage = NAME, topic = %key.0, partition = key.1, offset = message.offset(), "Skipped: recorded before.");
                continue;
            }
            let payload = message.payload().unwrap_or_default();
            match decode(topics, message.topic(), payload) {
                Ok(row) if !sampled(&row, runner.recorder_score_sample) => {}
                Ok(row) => rows.push((
                    row,
                    Position {
                        topic: key.0,
                        partition: key.1,
                        offset: message.offset(),
                    },
                )),
                Err((class, reason)) => dead.push({
                    let mut dl = DeadLetter {
                        stage: NAME.into(),
                        source_topic: message.topic().into(),
                        partition: message.partition(),
                        offset: message.offset(),
                        error_class: class,
                        reason,
                        key: message
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: payload.to_vec(),
                    };
                    crate::runner::cap_payload(&mut dl, runner.dead_letter_max_bytes);
                    dl
                }),
            }
        }
        for revoked in consumer.context().take_revoked() {
            // Writing what was read from a revoked partition is harmless (ids dedupe); storing its
            // offset is not possible and not attempted.
            resume.forget(|k| *k == revoked);
            recorded.forget(&revoked);
        }

        // Dead letters first: an offset is stored only once every output of it is durable.
        for dl in &dead {
            let headers = dl.headers().iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                })
            });
            let record = || {
                let record = FutureRecord::to(&topics.dead_letters)
                    .payload(dl.payload.as_slice())
                    .headers(headers.clone());
                match dl.key.as_deref() {
                    Some(key) => record.key(key),
                    None => record,
                }
            };
            // Refused by the broker (seen once after it restarted): sent again by a new producer
            // after a pause, until the shutdown; a final refusal stops the stage (the offset is
            // not stored).
            let mut attempt = 0;
            while let Err((source, _)) = producer
                .producer()
                .send(record(), Duration::from_secs(30))
                .await
            {
                attempt += 1;
                if crate::runner::refused_for_good(&source) {
                    return Err(StageError::Delivery {
                        stage: NAME,
                        topic: dl.source_topic.clone(),
                        partition: dl.partition,
                        offset: dl.offset,
                        source,
                    });
                }
                tracing::warn!(stage = NAME, error = %source, attempt, "Dead letter not delivered; sending it again with a new producer.");
                tokio::select! {
                    // Stop without storing: the batch is re-read by whoever runs next.
                    () = shutdown.cancelled() => break 'outer,
                    () = tokio::time::sleep(crate::runner::resend_pause(attempt)) => {}
                }
                producer.replace().map_err(err)?;
            }
            report.dead_letter(progress, dl.error_class);
        }

        // Each partition's rows and next offset go to its writer; its offset is stored in Kafka
        // once they are committed (as reported by `writers.written()`).
        if !next.is_empty() && !writers.submit(rows, &next).await {
            // A writer stopped at the shutdown with its batch not written.
            break 'outer;
        }
        let written = writers.try_written();
        recorded.store(&consumer, &mut report, progress, written);
        if stopping {
            break;
        }
    }
    // What was read and queued is written (unless Postgres is failing: the shutdown stops the
    // retries, and those offsets are stored nowhere), and its offsets stored.
    let written = writers.close().await;
    recorded.store(&consumer, &mut report, progress, written);
    recorded.commit(&consumer, CommitMode::Sync);
    tracing::info!(
        stage = NAME,
        messages = report.messages,
        events = report.events,
        dead_letters = report.dead_letters,
        "Stage stopped."
    );
    Ok(report)
}

#[cfg(test)]
mod sample_tests {
    use super::*;

    #[test]
    fn the_score_sample_keeps_every_risky_score_and_a_deterministic_share_of_the_rest() {
        let score = |i: u32, p: f64| {
            let mut r = Row {
                id: foresight_events::EventId::derive("s", &[&i.to_le_bytes()]).0,
                ty: RiskScore::event_type(),
                entity: "e".into(),
                time: DateTime::from_timestamp(0, 0).unwrap(),
                schema_version: 1,
                payload: serde_json::json!({ "band": if p > 0.7 { "high" } else { "low" } }),
            };
            if p < 0.0 {
                r.ty = Decision::event_type();
            }
            r
        };
        let kept = (0..10_000)
            .filter(|&i| sampled(&score(i, 0.1), 0.1))
            .count();
        assert!(
            (800..1200).contains(&kept),
            "{kept} of 10,000 low scores at 10 %"
        );
        assert!(
            (0..100).all(|i| sampled(&score(i, 0.9), 0.0)),
            "high scores always"
        );
        assert!(
            (0..100).all(|i| sampled(&score(i, -1.0), 0.0)),
            "other events always"
        );
        assert!((0..100).all(|i| !sampled(&score(i, 0.1), 0.0)));
        let again = (0..10_000)
            .filter(|&i| sampled(&score(i, 0.1), 0.1))
            .count();
        assert_eq!(kept, again);
    }
}
