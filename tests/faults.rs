//! The fault suite: the live pipeline against the real broker and the real Postgres while
//! things go wrong — stage processes SIGKILLed, the broker stopped, the database unreachable,
//! consumers joining and leaving, a stalled consumer, poison, a graceful stop. Every input is
//! unique (entity, metric, time); the checker (`foresight_tests::faults::check`) compares the
//! in-process replay of the same input with the windows, scores, decisions, outcomes, dead
//! letters, audit rows and command-actuator calls found, and each test asserts that nothing was
//! lost, duplicated or unexplained. The numbers go to `$FORESIGHT_RELIABILITY_DIR/*.json` (see `Tally::report`) and
//! docs/reliability.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{Duration as Delta, DurationRound as _, Utc};
use foresight::{Config, Stage, kafka::Topics, pipeline::Observer, runner::Fault};
use foresight_actuators::config::{
    ActionConfig, ActuatorConfig, CommandConfig, GroupLimits, Mode, VerificationConfig,
};
use foresight_tests::{
    TestDb, eventually,
    faults::{Process, Proxy, Reference, Tally, Tansu, check, telemetry, write_config},
    produce, tag,
};
use rand::{Rng as _, SeedableRng as _};
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer as _},
};
use tokio_util::sync::CancellationToken;

/// One scenario's world: its topics and database, the replay's reference, the command
/// actuator's call log, and a configuration file for `foresight` processes.
struct World {
    name: &'static str,
    /// The test's own broker (the shared one is left to the other tests), unless the test
    /// brings one.
    _broker: Option<Tansu>,
    dir: tempfile::TempDir,
    db: TestDb,
    pool: sqlx::PgPool,
    config: Config,
    topics: Topics,
    records: Vec<(String, Vec<u8>)>,
    reference: Reference,
    calls: PathBuf,
    config_file: PathBuf,
}

/// `dir`, kept after the test (and where it is said) when `FORESIGHT_FAULT_KEEP` is set.
fn kept_if_asked(mut dir: tempfile::TempDir, what: &str) -> tempfile::TempDir {
    if std::env::var_os("FORESIGHT_FAULT_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("{what} kept in {}", dir.path().display());
    }
    dir
}

/// The broker a scenario runs on, if not a tansu of its own on sqlite storage.
enum Broker {
    /// One the test brings (its address).
    Given(String),
    /// A tansu of its own on memory storage, which serves a fetch from inside a record batch
    /// from the next batch on: every stage must then move its consumer back by itself.
    Memory,
}

impl World {
    /// `entities` nodes x `steps` steps of telemetry (two samples each), on `brokers` (default:
    /// a tansu of its own, on sqlite storage: tansu 0.6's memory storage serves a fetch from
    /// inside a record batch from the next batch on, so a consumer resuming at a committed
    /// offset mid-batch would skip records; see docs/reliability.md).
    async fn new(
        name: &'static str,
        entities: usize,
        steps: i64,
        brokers: Option<Broker>,
    ) -> anyhow::Result<Self> {
        let dir = kept_if_asked(tempfile::tempdir()?, &format!("{name}: logs"));
        let (brokers, broker) = match brokers {
            Some(Broker::Given(b)) => (b, None),
            Some(Broker::Memory) => {
                let mut tansu = Tansu::in_memory(dir.path())?;
                tansu.start().await?;
                (tansu.address(), Some(tansu))
            }
            None => {
                let mut tansu = Tansu::new(dir.path())?;
                tansu.start().await?;
                (tansu.address(), Some(tansu))
            }
        };
        let db = TestDb::create().await?;
        let pool = db.pool().await?;
        foresight::db::MIGRATOR.run(&pool).await?;
        let prefix = format!("fault-{name}-{}", tag());
        let mut config = foresight_tests::config(&prefix, &db);
        config.kafka.brokers = brokers;
        config.features.window = Duration::from_secs(60);
        config.features.max_out_of_orderness = Duration::ZERO;
        config.features.allowed_lateness = Duration::ZERO;
        config.scoring.horizon = Duration::from_secs(20 * 60);
        config.scoring.min_history = 10;
        config.runner.commit_interval = Duration::from_millis(200);
        config.runner.checkpoint_interval = Duration::from_millis(500);
        config.runner.drain_timeout = Duration::from_secs(5);
        // A killed member's partitions move on after 6 s rather than librdkafka's 45 s.
        for (k, v) in [
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "1000"),
        ] {
            config.kafka.consumer.insert(k.into(), v.into());
        }
        let end = Utc::now().duration_trunc(Delta::minutes(1))? - Delta::minutes(1);
        let records = telemetry(entities, steps, end);
        let replayed = Instant::now();
        let outputs = foresight_tests::in_process(&config, &records, None)?;
        eprintln!(
            "{name}: {} records replayed in-process in {:.1?}: {} windows, {} scores, {} decisions",
            records.len(),
            replayed.elapsed(),
            outputs.windows.len(),
            outputs.scores.len(),
            outputs.decisions.len()
        );
        let reference = Reference::new(&outputs, records.len(), 0);
        anyhow::ensure!(
            !reference.decisions.is_empty(),
            "the workload must lead to decisions"
        );
        // Decisions are acted on by a script that logs each call, so double actions are counted.
        let calls = dir.path().join("calls.txt");
        let script = dir.path().join("act.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncat > /dev/null\necho \"$FORESIGHT_OPERATION $FORESIGHT_DECISION_ID\" >> {}\n",
                calls.display()
            ),
        )?;
        let mut perms = std::fs::metadata(&script)?.permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&script, perms)?;
        let a = &mut config.actuators;
        a.default_mode = Mode::Auto;
        // The telemetry spans hours up to now: act on every decision, however old its event
        // time, so that each one reaches the command (and a double action would count).
        a.max_decision_age = Duration::from_secs(30 * 24 * 3600);
        a.kill_switch_poll = Duration::from_millis(200);
        a.groups.insert(
            "default".into(),
            GroupLimits {
                max_actions: 1_000_000,
                per: Duration::from_secs(60),
                max_targets: 1_000_000,
            },
        );
        for d in reference.decisions.values() {
            a.actions
                .entry(d.action.kind)
                .or_insert_with(|| ActionConfig {
                    actuator: ActuatorConfig::Command(CommandConfig {
                        program: script.clone(),
                        args: vec![],
                        timeout: Duration::from_secs(20),
                        max_output: 256,
                        env: BTreeMap::new(),
                    }),
                    group: "default".into(),
                    verification: VerificationConfig {
                        window: Duration::ZERO,
                        margin: 0.1,
                        sustained: 2,
                    },
                    rollback_on_failure: false,
                });
        }
        let config_file = dir.path().join("foresight.toml");
        write_config(&config, &config_file)?;
        let topics = Topics::new(&config.kafka.topic_prefix);
        foresight::kafka::create_topics(&config.kafka, &topics).await?;
        Ok(Self {
            name,
            _broker: broker,
            dir,
            db,
            pool,
            config,
            topics,
            records,
            reference,
            calls,
            config_file,
        })
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts `foresight run` of `stages`, logging to `log` (at `$FORESIGHT_FAULT_LOG`, a
    /// `RUST_LOG` filter, if set: e.g. `warn,foresight=info,foresight::runner=debug` to see
    /// every checkpoint).
    fn start(&self, stages: &[&str], log: &str) -> anyhow::Result<Process> {
        let filter = std::env::var("FORESIGHT_FAULT_LOG").ok();
        let env: Vec<(&str, &str)> = filter.iter().map(|f| ("RUST_LOG", f.as_str())).collect();
        Process::start(&self.config_file, stages, &self.log(log), &env)
    }

    /// A producer to this world's broker.
    fn producer(&self) -> anyhow::Result<rdkafka::producer::FutureProducer> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.config.kafka.brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()?)
    }

    /// Produces records `range` of the input.
    async fn produce(
        &self,
        producer: &rdkafka::producer::FutureProducer,
        range: std::ops::Range<usize>,
    ) -> anyhow::Result<()> {
        produce(producer, &self.topics.metrics, &self.records[range]).await
    }

    /// Whether the audit log holds every expected score, and every decision recorded an
    /// outcome (whether the decisions are the replay's is for the check to say, after the wait:
    /// see `caught_up`).
    fn complete(&self, (decisions, scores, decided): (i64, i64, i64)) -> bool {
        scores >= self.reference.scores.len() as i64 && decided >= decisions && decisions > 0
    }

    /// Decisions, scores and decisions with an outcome in the audit log.
    async fn counts(&self) -> anyhow::Result<(i64, i64, i64)> {
        Ok(sqlx::query_as(
            "SELECT (SELECT count(*) FROM decisions), (SELECT count(*) FROM scores), \
             (SELECT count(DISTINCT decision_id) FROM outcomes)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Waits (at most `limit`) until the audit log is complete, every stage has read its input
    /// to the end (`lagging`), and both stay so, the audit log unchanged, for 3 s; returns how
    /// long it took to first be so that last time. The audit log alone cannot say when it is
    /// complete: how many decisions to expect is what is under test, and a decision still on
    /// its way (its scores not yet read by the allocator, or published but not yet recorded or
    /// acted on) once let a test take 2 of 4 decisions as all.
    async fn caught_up(&self, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let waited = eventually("the audit log to hold everything", limit, || async {
            // A stage that failed stops its process: no use waiting for it.
            if let Some(failed) = self.failed_stage() {
                anyhow::bail!("a stage failed: {failed}");
            }
            let counts = self.counts().await?;
            if !self.complete(counts) {
                return Ok(None);
            }
            // When it was complete; that every stage has read its input to the end is asked of
            // the broker right after (a second or so, not counted).
            let at = started.elapsed();
            if !self.read_to_the_ends().await {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok((self.counts().await? == counts && self.read_to_the_ends().await).then_some(at))
        })
        .await;
        match waited {
            Ok(took) => Ok(took),
            Err(e) => {
                // What differs, and which stage is behind, to say why it never completed.
                match self.check().await {
                    Ok(t) => eprintln!(
                        "{}: at the time-out: {}\nthe lost windows' partitions in the stages' logs:\n{}",
                        self.name,
                        serde_json::to_string_pretty(&t)?,
                        self.history(&t)
                    ),
                    Err(e) => eprintln!(
                        "{}: at the time-out, the check failed too: {e:#}",
                        self.name
                    ),
                }
                eprintln!("{}: {}", self.name, self.behind());
                eprintln!("{}", self.warnings());
                eprintln!("{}", self.metrics().await);
                let (d, s, o) = self.counts().await?;
                Err(e.context(format!(
                    "{}: {d} decisions ({} in the replay), {s} of {} scores, {o} decisions with an outcome recorded",
                    self.name,
                    self.reference.decisions.len(),
                    self.reference.scores.len()
                )))
            }
        }
    }

    /// Whether every stage's group has read its input to the end (no `lagging` partition);
    /// not while the broker cannot say.
    async fn read_to_the_ends(&self) -> bool {
        let (brokers, partitions) = (
            self.config.kafka.brokers.clone(),
            self.config.kafka.partitions,
        );
        let (topics, groups) = (self.topics.clone(), self.config.kafka.group_prefix.clone());
        tokio::task::spawn_blocking(move || lagging(&brokers, &topics, &groups, partitions))
            .await
            .is_ok_and(|l| l.is_ok_and(|l| l.is_empty()))
    }

    /// Each stage's group's committed offsets against the ends of its input partitions, where
    /// they differ: the stage that stopped is the one behind.
    fn behind(&self) -> String {
        let (k, prefix) = (&self.config.kafka, &self.config.kafka.group_prefix);
        match lagging(&k.brokers, &self.topics, prefix, k.partitions) {
            Ok(l) if l.is_empty() => {
                "committed offsets behind the ends of their partitions: none".into()
            }
            Ok(l) => format!(
                "committed offsets behind the ends of their partitions:\n  {}",
                l.join("\n  ")
            ),
            Err(e) => format!("committed offsets unknown: {e:#}"),
        }
    }

    /// The first "Stage failed." line of the processes' logs, with the error that follows it.
    fn failed_stage(&self) -> Option<String> {
        self.logs().into_iter().find_map(|path| {
            let text = std::fs::read_to_string(&path).ok()?;
            let at = text.find("Stage failed.")?;
            let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let line: String = text[start..]
                .lines()
                .take(6)
                .collect::<Vec<_>>()
                .join("\n  ");
            Some(format!("{}: {line}", path.display()))
        })
    }

    /// The last warnings and errors of each process's log.
    fn warnings(&self) -> String {
        const LAST: usize = 12;
        let mut out = String::new();
        for path in self.logs() {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
                .collect();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            out.push_str(&format!(
                "{}: {name}: {} warnings and errors; the last {}:\n",
                self.name,
                lines.len(),
                lines.len().min(LAST)
            ));
            for line in &lines[lines.len().saturating_sub(LAST)..] {
                out.push_str(&format!("  {line}\n"));
            }
        }
        out
    }

    /// Each running process's own view (its `/metrics`): partitions owned, lag, outputs in
    /// flight and stalls per stage, to tell a consumer that lost its partitions from one that
    /// reads nothing and from outputs that are never acknowledged.
    async fn metrics(&self) -> String {
        const SHOWN: [&str; 4] = [
            "foresight_partitions_assigned",
            "foresight_consumer_lag",
            "foresight_outputs_in_flight",
            "foresight_stalls_total",
        ];
        let client = reqwest::Client::new();
        let mut out = String::new();
        for path in self.logs() {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            // The last server this log names (a restarted process appends to its log).
            let Some(address) = text
                .lines()
                .rev()
                .find(|l| l.contains("Serving /healthz"))
                .and_then(|l| l.split("address=").nth(1))
                .and_then(|a| a.split_whitespace().next())
            else {
                continue;
            };
            let got = client
                .get(format!("http://{address}/metrics"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let body = match got {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => {
                    // The process does not answer at all: where are its threads?
                    out.push_str(&format!(
                        "{}: {name}: /metrics: {e}\n{}",
                        self.name,
                        self.stacks()
                    ));
                    continue;
                }
            };
            out.push_str(&format!("{}: {name}: /metrics:\n", self.name));
            for line in body
                .lines()
                .filter(|l| SHOWN.iter().any(|m| l.starts_with(m)))
            {
                out.push_str(&format!("  {line}\n"));
            }
        }
        out
    }

    /// The threads' stacks of this world's `foresight` processes (by gdb, where installed),
    /// written next to their logs; their frames of Foresight and librdkafka are returned.
    fn stacks(&self) -> String {
        let config = self.config_file.display().to_string();
        let pids = std::process::Command::new("pgrep")
            .args(["-f", &config])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut out = String::new();
        for pid in pids.split_whitespace() {
            let dump = std::process::Command::new("gdb")
                .args(["-p", pid, "-batch", "-ex", "thread apply all bt"])
                .output();
            let Ok(dump) = dump else {
                out.push_str("  (no gdb here to show the stacks)\n");
                break;
            };
            let text = String::from_utf8_lossy(&dump.stdout).into_owned();
            let file = self.dir.path().join(format!("stacks-{pid}.txt"));
            let _ = std::fs::write(&file, &text);
            out.push_str(&format!("  stacks of {pid} (all in {}):\n", file.display()));
            for line in text.lines().filter(|l| {
                l.starts_with("Thread ")
                    || [
                        "foresight",
                        "rd_kafka",
                        "tokio::runtime",
                        "parking_lot",
                        "Mutex",
                    ]
                    .iter()
                    .any(|k| l.contains(k))
            }) {
                out.push_str(&format!("    {line}\n"));
            }
        }
        out
    }

    /// The processes' logs, by name.
    fn logs(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
        logs.sort();
        logs
    }

    async fn check(&self) -> anyhow::Result<Tally> {
        check(
            self.name,
            &self.reference,
            &self.config.kafka.brokers,
            &self.topics,
            &self.pool,
            Some(&self.calls),
        )
        .await
    }

    /// What the feature stages' logs say of the partitions of the lost windows (assignments,
    /// revocations, restores, rewinds, fencing), to trace how a window went missing.
    fn history(&self, tally: &Tally) -> String {
        let partitions: BTreeSet<i32> = tally.lost_windows.iter().map(|w| w.partition).collect();
        let mut out = String::new();
        if partitions.is_empty() {
            return out;
        }
        for path in self.logs() {
            let log = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                let about = |p: i32| {
                    line.contains(&format!("-metrics\", {p})"))
                        || (line.contains("stage=\"features\"")
                            && line.contains(&format!(" partition={p} ")))
                };
                if partitions.iter().any(|&p| about(p)) {
                    out.push_str(&format!("{log}: {line}\n"));
                }
            }
        }
        out
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.pool.close().await;
        self.db.drop_db().await
    }
}

/// Each stage's group's partitions not read to their ends, as "group: topic[p] at o of end":
/// every partition the group has committed an offset for, and every non-empty partition of the
/// stage's main input (which it must have read, committed or not).
fn lagging(
    brokers: &str,
    topics: &Topics,
    group_prefix: &str,
    partitions: i32,
) -> anyhow::Result<Vec<String>> {
    let all = topics.all();
    let ends = high_watermarks(brokers, &all, partitions)?;
    let mut out = Vec::new();
    for stage in ALL {
        let main = match stage {
            "features" => &topics.metrics,
            "scoring" => &topics.features,
            "fleet" => &topics.entity_scores,
            "allocator" | "recorder" => &topics.scores,
            _ => &topics.decisions,
        };
        let group = format!("{group_prefix}{stage}");
        let read = committed(brokers, &group, &all, partitions)?;
        for ((topic, p), &end) in &ends {
            let at = read.get(&(topic.clone(), *p)).copied();
            let owed = at.is_some() || (topic == main && end > 0);
            if owed && at.is_none_or(|o| o < end) {
                let at = at.map_or("none".to_owned(), |o| o.to_string());
                out.push(format!("{group}: {topic}[{p}] at {at} of {end}"));
            }
        }
    }
    Ok(out)
}

/// The ends (high watermarks) of `topics`' partitions 0..n, by (topic, partition).
fn high_watermarks(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let mut ends = BTreeMap::new();
    for t in topics {
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(t, p, Duration::from_secs(5))?;
            ends.insert(((*t).to_owned(), p), high);
        }
    }
    Ok(ends)
}

/// Committed offsets of `group` for `topics` (partitions 0..n), by (topic, partition).
fn committed(
    brokers: &str,
    group: &str,
    topics: &[&str],
    partitions: i32,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..partitions {
            tpl.add_partition(t, p);
        }
    }
    let got = consumer.committed_offsets(tpl, Duration::from_secs(15))?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
            _ => None,
        })
        .collect())
}

const ALL: [&str; 6] = [
    "features",
    "scoring",
    "fleet",
    "allocator",
    "actuator",
    "recorder",
];

/// 1. A random stage process is SIGKILLed every 5-15 s, 20 times, while 100,000 samples stream
/// in; each is restarted at once in the same consumer group. Nothing is lost, no decision is
/// made twice, no action is taken twice, and the pipeline has caught up within 60 s of the last
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_a_random_stage_every_5_to_15_s() -> anyhow::Result<()> {
    let world = World::new("sigkill", 25, 2000, Some(Broker::Memory)).await?;
    assert_eq!(world.records.len(), 100_000);
    let mut procs: Vec<Process> = ALL
        .iter()
        .map(|s| world.start(&[s], s))
        .collect::<anyhow::Result<_>>()?;
    let producer = world.producer()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    let kills = 20;
    let chunk = world.records.len() / kills;
    let mut killed: BTreeMap<&str, u32> = BTreeMap::new();
    let mut last_restart = Instant::now();
    for k in 0..kills {
        // Input keeps arriving while stages die.
        world.produce(&producer, k * chunk..(k + 1) * chunk).await?;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5_000..=15_000))).await;
        let i = rng.gen_range(0..ALL.len());
        for p in procs.iter_mut() {
            p.alive()?;
        }
        procs[i].kill()?;
        procs[i] = world.start(&[ALL[i]], ALL[i])?;
        last_restart = Instant::now();
        *killed.entry(ALL[i]).or_default() += 1;
    }
    let since_restart = last_restart.elapsed();
    let caught_up = world.caught_up(Duration::from_secs(180)).await? + since_restart;
    for p in procs.iter_mut() {
        p.alive()?;
    }
    drop(procs);
    let mut tally = world.check().await?;
    tally.measured.insert("kills".into(), kills as f64);
    for (stage, n) in &killed {
        tally
            .measured
            .insert(format!("kills_{stage}"), f64::from(*n));
    }
    tally.measured.insert(
        "caught_up_after_last_restart_s".into(),
        caught_up.as_secs_f64(),
    );
    tally.report()?;
    assert!(
        caught_up <= Duration::from_secs(60),
        "caught up only {caught_up:?} after the last restart"
    );
    world.finish().await
}

/// 2. The broker (a tansu of this test's own, sqlite storage) is stopped for 60 s mid-run and
/// started again with its data: nothing is lost, the stages' producers and consumers recover by
/// themselves (same process throughout), the backlog is drained, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_for_60_s() -> anyhow::Result<()> {
    let broker_dir = kept_if_asked(tempfile::tempdir()?, "broker-stop: broker data and log");
    let mut tansu = Tansu::new(broker_dir.path())?;
    tansu.start().await?;
    let world = World::new("broker-stop", 10, 600, Some(Broker::Given(tansu.address()))).await?;
    let mut foresight = world.start(&["all"], "all")?;
    let producer = world.producer()?;
    let half = world.records.len() / 2;
    world.produce(&producer, 0..half).await?;
    eventually(
        "decisions recorded before the outage",
        Duration::from_secs(120),
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions")
                .fetch_one(&world.pool)
                .await?;
            Ok((n > 0).then_some(()))
        },
    )
    .await?;
    let rss_before = foresight.rss().unwrap_or(0);
    tansu.stop()?;
    let outage = Instant::now();
    let mut rss_max = rss_before;
    while outage.elapsed() < Duration::from_secs(60) {
        foresight.alive()?;
        rss_max = rss_max.max(foresight.rss().unwrap_or(0));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tansu.start().await.context("restarting tansu")?;
    let back = Instant::now();
    world.produce(&producer, half..world.records.len()).await?;
    let drained = match world.caught_up(Duration::from_secs(180)).await {
        Ok(drained) => drained,
        Err(e) => {
            print_broker_log(&tansu);
            return Err(e);
        }
    };
    let drained = drained.max(back.elapsed());
    foresight.alive()?; // Recovered by itself: the same process throughout.
    drop(foresight);
    let mut tally = world.check().await?;
    tally.measured.insert("outage_s".into(), 60.0);
    tally
        .measured
        .insert("rss_before_mb".into(), rss_before as f64 / 1e6);
    tally
        .measured
        .insert("rss_max_during_outage_mb".into(), rss_max as f64 / 1e6);
    tally
        .measured
        .insert("drained_after_restart_s".into(), drained.as_secs_f64());
    if let Err(e) = tally.report() {
        print_process_log(&world, "all");
        print_broker_log(&tansu);
        return Err(e);
    }
    assert!(
        rss_max <= rss_before + 64 * 1024 * 1024,
        "memory grew from {rss_before} to {rss_max} bytes while the broker was down"
    );
    drop(tansu);
    world.finish().await
}

/// What the stages said when scenario 2's counts fail (partitions revoked and restored from
/// which offsets, outputs refused and sent again): their warnings and the fleet stage's lines
/// (the stage whose rounds a restore can change), the first 60 and the last 40, so that a run of
/// the test command that fails once can be explained from its output alone.
fn print_process_log(world: &World, log: &str) {
    let text = std::fs::read_to_string(world.log(log)).unwrap_or_default();
    let said: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("fleet"))
        .collect();
    let head = &said[..said.len().min(60)];
    let tail = &said[said.len().saturating_sub(40).max(head.len())..];
    eprintln!(
        "broker-stop: the stages' log, {} warnings and fleet lines; the first {}:\n{}\nthe last {}:\n{}",
        said.len(),
        head.len(),
        head.join("\n"),
        tail.len(),
        tail.join("\n")
    );
}

/// What the broker said when scenario 2 fails: its panics (a panic in its storage task leaves
/// every later request unanswerable), then its last 40 lines, printed last so that a report
/// that keeps only the start and the end of the output keeps them.
fn print_broker_log(tansu: &Tansu) {
    let log = tansu.log();
    let said: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let panics: Vec<&str> = said
        .iter()
        .copied()
        .filter(|l| l.contains("panicked"))
        .take(10)
        .collect();
    eprintln!(
        "broker-stop: the broker's log, {} lines; its first {} panics:\n{}\nits last 40 lines:\n{}",
        said.len(),
        panics.len(),
        panics.join("\n"),
        said[said.len().saturating_sub(40)..].join("\n")
    );
}

/// 3. Postgres is unreachable for 30 s (a proxy in front of it cuts every connection and
/// refuses new ones; stopping the shared server would disturb everyone else on it). Meanwhile
/// the recorder's committed offsets never pass what the audit log holds, no decision is
/// published without an audit row, and the pipeline recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_for_30_s() -> anyhow::Result<()> {
    let proxy = Proxy::start("127.0.0.1:5432").await?;
    let mut world = World::new("postgres-cut", 10, 600, None).await?;
    // The pipeline reaches Postgres through the proxy only.
    let mut proxied = world.config.clone();
    proxied.postgres.url = world
        .db
        .url
        .replace("127.0.0.1:5432", &proxy.address.to_string());
    anyhow::ensure!(proxied.postgres.url != world.db.url, "{}", world.db.url);
    write_config(&proxied, &world.config_file)?;
    world.config = proxied;
    let mut foresight = world.start(&["all"], "all")?;
    let producer = world.producer()?;
    let half = world.records.len() / 2;
    world.produce(&producer, 0..half).await?;
    eventually(
        "decisions recorded before the cut",
        Duration::from_secs(120),
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions")
                .fetch_one(&world.pool)
                .await?;
            Ok((n > 0).then_some(()))
        },
    )
    .await?;
    proxy.cut();
    let cut = Instant::now();
    let group = format!("{}recorder", world.config.kafka.group_prefix);
    let recorded_topics = [
        world.topics.decisions.as_str(),
        world.topics.outcomes.as_str(),
        world.topics.scores.as_str(),
        world.topics.failures.as_str(),
    ];
    let mut produced_during = false;
    let mut checks = 0;
    while cut.elapsed() < Duration::from_secs(30) {
        foresight.alive()?;
        if !produced_during {
            // Work keeps arriving while the database is away.
            world.produce(&producer, half..world.records.len()).await?;
            produced_during = true;
        }
        // No offset advances past unrecorded work: what Kafka has committed for the recorder
        // is never ahead of the offsets its transactions wrote (read directly, not proxied).
        let kafka = committed(&world.config.kafka.brokers, &group, &recorded_topics, 3)?;
        let db: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = $1",
        )
        .bind(&group)
        .fetch_all(&world.pool)
        .await?;
        let db: BTreeMap<(String, i32), i64> =
            db.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
        for (key, offset) in &kafka {
            let recorded = db.get(key).copied().unwrap_or(0);
            anyhow::ensure!(
                *offset <= recorded,
                "{key:?}: committed {offset} in Kafka but only {recorded} recorded"
            );
        }
        checks += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    proxy.restore();
    let recovered = world.caught_up(Duration::from_secs(180)).await?;
    foresight.alive()?; // No restart.
    drop(foresight);
    let mut tally = world.check().await?;
    tally.measured.insert("outage_s".into(), 30.0);
    tally
        .measured
        .insert("offset_checks_during_outage".into(), f64::from(checks));
    tally
        .measured
        .insert("caught_up_after_restore_s".into(), recovered.as_secs_f64());
    tally.report()?;
    world.finish().await
}

/// 4. Consumer-group churn: every 10 s for 3 minutes a second instance of the feature and
/// scoring stages joins (or leaves: SIGTERM and SIGKILL in turn) beside a full pipeline.
/// Nothing is lost or duplicated, and no committed offset ever moves back (an offset stored
/// for a partition after it was revoked would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_churn_for_3_minutes() -> anyhow::Result<()> {
    let world = World::new("churn", 10, 1800, None).await?;
    let mut base = world.start(&["all"], "all")?;
    let producer = world.producer()?;
    let groups: Vec<String> = ["features", "scoring"]
        .iter()
        .map(|s| format!("{}{s}", world.config.kafka.group_prefix))
        .collect();
    let started = Instant::now();
    let changes = 18;
    let chunk = world.records.len() / changes;
    let mut extra: Option<Process> = None;
    let mut last: BTreeMap<(String, String, i32), i64> = BTreeMap::new();
    let mut regressions = Vec::new();
    let mut skipped_samples = 0_u32;
    let mut next_change = Instant::now();
    let mut change = 0;
    while change < changes {
        if Instant::now() >= next_change {
            world
                .produce(&producer, change * chunk..(change + 1) * chunk)
                .await?;
            match extra.take() {
                None => extra = Some(world.start(&["features", "scoring"], "extra")?),
                Some(mut p) if change % 4 == 1 => {
                    p.terminate(Duration::from_secs(30))?;
                }
                Some(mut p) => p.kill()?,
            }
            change += 1;
            next_change += Duration::from_secs(10);
        }
        base.alive()?;
        for (group, topic) in groups
            .iter()
            .zip([&world.topics.metrics, &world.topics.features])
        {
            // A sample the broker is too busy to answer in time is skipped: the next one still
            // catches an offset that moved back (offsets only ever move on from there).
            let sample = match committed(&world.config.kafka.brokers, group, &[topic], 3) {
                Ok(sample) => sample,
                Err(e) => {
                    eprintln!("churn: committed offsets of {group} not read this round: {e:#}");
                    skipped_samples += 1;
                    continue;
                }
            };
            for ((t, p), o) in sample {
                let key = (group.clone(), t, p);
                if let Some(&before) = last.get(&key)
                    && o < before
                {
                    regressions.push(format!("{key:?}: {before} -> {o}"));
                }
                last.insert(key, o);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let churned = started.elapsed();
    drop(extra);
    let caught_up = world.caught_up(Duration::from_secs(180)).await?;
    base.alive()?;
    drop(base);
    let mut tally = world.check().await?;
    tally
        .measured
        .insert("membership_changes".into(), changes as f64);
    tally
        .measured
        .insert("churn_s".into(), churned.as_secs_f64());
    tally.measured.insert(
        "committed_offset_regressions".into(),
        regressions.len() as f64,
    );
    tally.measured.insert(
        "committed_offset_samples_skipped".into(),
        f64::from(skipped_samples),
    );
    tally
        .measured
        .insert("caught_up_after_churn_s".into(), caught_up.as_secs_f64());
    tally.report()?;
    assert!(
        regressions.is_empty(),
        "committed offsets moved back: {regressions:?}"
    );
    world.finish().await
}

/// 5. A consumer that stops making progress while its partitions hold unread input (here its
/// partitions are paused, as a wedged fetcher would leave them) is found by the runner's
/// watchdog once input has waited `runner.stall_timeout` unread (found on a look at most one
/// timeout after the last read) and replaced; every record is then processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_is_detected_and_recovered() -> anyhow::Result<()> {
    stalled("stall", Stall::Reading).await
}

/// What scenario 5 stalls.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// The consumer: it reads nothing.
    Reading,
    /// Every stage's consumer (the recorder's and the actuator's loops included).
    EveryStage,
    /// An output refused by the broker.
    Refused,
    /// The fleet stage's consumer alone, while scores stream in (its rounds half collected).
    Fleet,
}

/// 5d. Every stage's consumer paused at once (the recorder's and the actuator's loops have
/// the watchdog too): each stage finds its own stall once input comes its way, and the
/// pipeline catches up with nothing lost or made twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_detects_its_stalled_consumer() -> anyhow::Result<()> {
    stalled("stall-all", Stall::EveryStage).await
}

/// 5e. The broker refuses an output (as tansu did for produce requests as it stopped and after
/// it restarted, with an unknown broker error): the stage does not stop, but sends the output
/// again through a new producer; nothing lost or made twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_refused_by_the_broker_is_produced_again() -> anyhow::Result<()> {
    stalled("refused", Stall::Refused).await
}

/// 5f. The fleet stage's consumer stalled alone, while the scores of a round are still coming in
/// (all of the input produced first, so it is caught in the middle of its stream, and some of
/// its partitions may be read to their ends: their checkpoints must be restored without a
/// message to restore them on):
/// the watchdog replaces it in-process (its partitions forgotten as if revoked, its checkpoint
/// restored, its input read again from the stored offsets), and every round it publishes after
/// that is the replay's, content for content: no score published twice with other content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_stage_replaced_mid_round_publishes_the_same_rounds() -> anyhow::Result<()> {
    stalled("stall-fleet", Stall::Fleet).await
}

/// 8. The fleet stage and the allocator started on a backlog: every entity score of the run is
/// already on its topic when they start (as after an outage, or a deployment of those two), so
/// their consumers read one partition's fetched backlog before the next's, far past their
/// bounds on open rounds (made as small as they go here, 2 rounds each of the run's 88, so that
/// any partition read ahead is held). They hold the partitions ahead until the others catch up:
/// every round the fleet stage publishes is the replay's, content for content, and every
/// decision is the replay's, id for id. (Closing rounds at the bound instead, as before,
/// published rounds with part of the fleet and scores alone: scenario 2's failure.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_and_allocator_started_on_a_backlog_publish_the_replays_rounds()
-> anyhow::Result<()> {
    let mut world = World::new("backlog", 10, 600, None).await?;
    world.config.scoring.fleet.max_open_rounds = 2;
    world.config.allocator.max_open_rounds = 2;
    write_config(&world.config, &world.config_file)?;
    let mut upstream = world.start(&["features", "scoring"], "upstream")?;
    let producer = world.producer()?;
    world.produce(&producer, 0..world.records.len()).await?;
    let want = world.reference.scores.len() as i64;
    let brokers = world.config.kafka.brokers.clone();
    let (topic, partitions) = (
        world.topics.entity_scores.clone(),
        world.config.kafka.partitions,
    );
    eventually(
        "every entity score on its topic",
        Duration::from_secs(180),
        || async {
            let ends = high_watermarks(&brokers, &[&topic], partitions)?;
            Ok((ends.values().sum::<i64>() >= want).then_some(()))
        },
    )
    .await?;
    let mut downstream = world.start(
        &["fleet", "allocator", "actuator", "recorder"],
        "downstream",
    )?;
    let caught_up = world.caught_up(Duration::from_secs(180)).await?;
    upstream.alive()?;
    downstream.alive()?;
    drop((upstream, downstream));
    let log = std::fs::read_to_string(world.log("downstream"))?;
    let holds = |stage: &str| {
        log.lines()
            .filter(|l| {
                l.contains("Partitions held until") && l.contains(&format!("stage=\"{stage}\""))
            })
            .count()
    };
    let (fleet_holds, allocator_holds) = (holds("fleet"), holds("allocator"));
    let mut tally = world.check().await?;
    tally.measured.extend([
        ("caught_up_s".to_owned(), caught_up.as_secs_f64()),
        ("fleet_holds".to_owned(), fleet_holds as f64),
        ("allocator_holds".to_owned(), allocator_holds as f64),
    ]);
    tally.report()?;
    // The path under test was taken: reading ran ahead of the bounds, and was held.
    assert!(fleet_holds > 0, "the fleet stage never held a partition");
    world.finish().await
}

/// Scenario 5: the feature stage (or every stage) stalled by `kind` after the first half of the
/// input, or the fleet stage in the middle of all of it; the watchdog must find it and replace
/// what stalled, and then everything is processed: nothing lost, nothing made twice.
async fn stalled(name: &'static str, kind: Stall) -> anyhow::Result<()> {
    const ENTITIES: usize = 10;
    // The stages run in this process: `FORESIGHT_TEST_LOG=<filter>` shows their log.
    if let Ok(filter) = std::env::var("FORESIGHT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let mut world = World::new(name, ENTITIES, 300, None).await?;
    world.config.runner.stall_timeout = Duration::from_secs(3);
    let observer = std::sync::Arc::new(Observer::default());
    let shutdown = CancellationToken::new();
    let producer = world.producer()?;
    let half = world.records.len() / 2;
    // The fleet stage is stalled while it streams through its input, so it gets all of it at
    // once; the others get the second half while they are stalled.
    let at_once = matches!(kind, Stall::Fleet);
    let first = if at_once { world.records.len() } else { half };
    world.produce(&producer, 0..first).await?;
    let task = tokio::spawn({
        let (config, observer, shutdown) =
            (world.config.clone(), observer.clone(), shutdown.clone());
        async move { foresight::run_stages_observed(&Stage::ALL, &config, observer, shutdown).await }
    });
    let features = observer.stage(Stage::Features);
    // The stage whose stall is watched.
    let watched = match kind {
        Stall::Fleet => Stage::Fleet,
        _ => Stage::Features,
    };
    let progress = observer.stage(watched);
    use std::sync::atomic::Ordering::Relaxed;
    let result = async {
        eventually("the first half read", Duration::from_secs(60), || async {
            Ok((features.messages.load(Relaxed) >= half as u64).then_some(()))
        })
        .await?;
        if let Stall::Fleet = kind {
            // Stall it between two scores of one round if it can be caught there (each round
            // has one score per entity), within 20 s; whether it was is measured below.
            let since = Instant::now();
            while since.elapsed() < Duration::from_secs(20) {
                let read = progress.messages.load(Relaxed) as usize;
                if read >= 2 * ENTITIES && !read.is_multiple_of(ENTITIES) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        match kind {
            Stall::Reading | Stall::Fleet => progress.inject(Fault::PauseConsumer),
            Stall::Refused => progress.inject(Fault::RefuseDelivery),
            Stall::EveryStage => {
                for stage in Stage::ALL {
                    observer.stage(stage).inject(Fault::PauseConsumer);
                }
            }
        }
        // Let the stall take hold (offsets stored before it committed), then give the
        // stalled stage input.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let read_before = progress.messages.load(Relaxed);
        if !at_once {
            world.produce(&producer, half..world.records.len()).await?;
        }
        let stalled_at = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let read_while_stalled = progress.messages.load(Relaxed) - read_before;
        // The fleet stage may have read all of its input before it could be stalled (on a busy
        // machine): then no input waits, there is no stall to find, and what is left to check
        // is that everything it published is the replay's.
        let nothing_left = at_once && read_before as usize >= world.reference.scores.len();
        let detected = if nothing_left {
            None
        } else {
            Some(
                eventually("the watchdog", Duration::from_secs(30), || async {
                    Ok((progress.stalls.load(Relaxed) >= 1).then(|| stalled_at.elapsed()))
                })
                .await?,
            )
        };
        let recovered = world.caught_up(Duration::from_secs(120)).await?;
        anyhow::Ok((read_while_stalled, detected, recovered, read_before))
    }
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .context("stages did not stop")???;
    let (read_while_stalled, detected, recovered, read_before) = result?;
    if let Stall::EveryStage = kind {
        // Each stage's watchdog found its own consumer stalled once input came its way.
        for stage in Stage::ALL {
            let stalls = observer.stage(stage).stalls.load(Relaxed);
            assert!(stalls >= 1, "{} found no stall", stage.name());
        }
    }
    match kind {
        Stall::Reading | Stall::EveryStage | Stall::Fleet => assert_eq!(
            read_while_stalled, 0,
            "the injected stall did not stop the consumer"
        ),
        // Recovered at once: reading went on.
        Stall::Refused => {}
    }
    let mut tally = world.check().await?;
    tally.measured.insert(
        "stall_timeout_s".into(),
        world.config.runner.stall_timeout.as_secs_f64(),
    );
    if let Some(detected) = detected {
        tally
            .measured
            .insert("detected_after_s".into(), detected.as_secs_f64());
    }
    tally.measured.insert(
        "caught_up_after_detection_s".into(),
        recovered.as_secs_f64(),
    );
    tally
        .measured
        .insert("stalls".into(), progress.stalls.load(Relaxed) as f64);
    // Consumers replaced in the stages not stalled (measured, not asserted: a stage that truly
    // reads nothing for the timeout on a loaded machine is replaced, harmlessly): each costs a
    // rebalance on the way to catching up.
    if !matches!(kind, Stall::EveryStage) {
        let others: u64 = Stage::ALL
            .into_iter()
            .filter(|s| *s != watched)
            .map(|s| observer.stage(s).stalls.load(Relaxed))
            .sum();
        tally
            .measured
            .insert("other_stages_replaced".into(), others as f64);
    }
    // Records the stalled stage had read when it stopped reading; for the fleet stage (scores
    // only: this input has no traces), a round was open unless it is a multiple of the entities.
    tally
        .measured
        .insert("read_before_stall".into(), read_before as f64);
    if let Stall::Fleet = kind {
        tally.measured.insert(
            "round_open_at_stall".into(),
            f64::from(u8::from(!(read_before as usize).is_multiple_of(ENTITIES))),
        );
        tally.measured.insert(
            "all_read_before_stall".into(),
            f64::from(u8::from(detected.is_none())),
        );
    }
    tally.report()?;
    world.finish().await
}

/// 7. SIGTERM while input is flowing: the process finishes its in-flight work, stores its
/// offsets, flushes its producers and exits 0 within `runner.drain_timeout`. Started again in
/// the same groups it resumes where it stopped: nothing lost, nothing made twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0_within_the_drain_timeout() -> anyhow::Result<()> {
    let world = World::new("sigterm", 10, 600, None).await?;
    let mut foresight = world.start(&["all"], "all")?;
    let producer = world.producer()?;
    let half = world.records.len() / 2;
    world.produce(&producer, 0..half).await?;
    eventually("decisions recorded", Duration::from_secs(120), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM decisions")
            .fetch_one(&world.pool)
            .await?;
        Ok((n > 0).then_some(()))
    })
    .await?;
    // The second half arrives as the stop is requested: work is in flight.
    let feeding = {
        let producer = producer.clone();
        let topic = world.topics.metrics.clone();
        let records = world.records[half..].to_vec();
        tokio::spawn(async move { produce(&producer, &topic, &records).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let drain = world.config.runner.drain_timeout;
    let (status, took) = foresight.terminate(drain * 3)?;
    feeding.await??;
    let log = std::fs::read_to_string(world.log("all"))?;
    assert!(status.success(), "exit status {status}; log:\n{log}");
    let stopped = log.matches("Stage stopped.").count();
    assert_eq!(stopped, 6, "every stage reports its stop:\n{log}");
    assert!(
        took <= drain,
        "took {took:?} to stop, more than the drain timeout {drain:?}"
    );
    drop(foresight);
    let _again = world.start(&["all"], "again")?;
    let caught_up = world.caught_up(Duration::from_secs(120)).await?;
    drop(_again);
    let mut tally = world.check().await?;
    tally
        .measured
        .insert("drain_timeout_s".into(), drain.as_secs_f64());
    tally
        .measured
        .insert("stopped_in_s".into(), took.as_secs_f64());
    tally
        .measured
        .insert("caught_up_after_restart_s".into(), caught_up.as_secs_f64());
    tally.report()?;
    world.finish().await
}
