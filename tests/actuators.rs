//! The actuators against the real Postgres (a fresh database per test), real scripts as the
//! command actuator (each call appended to a file, so side effects are counted, not assumed),
//! and, for the live stage, the real broker and the real `foresight` binary.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use foresight_actuators::{
    ActuatorError, ActuatorsConfig, Engine, KillSignal, State,
    config::{ActionConfig, ActuatorConfig, CommandConfig, GroupLimits, Mode, VerificationConfig},
};
use foresight_events::{
    Action, ActionKind, ActuationOutcome, Band, Decision, EntityId, EventData, EventId,
    OutcomeStatus, RiskScore,
};
use foresight_tests::TestDb;

/// A script that appends `<operation> <decision id>` to `calls` and sleeps `sleep` seconds.
fn recorder_script(dir: &Path, sleep: &str) -> (PathBuf, PathBuf) {
    let calls = dir.join("calls.txt");
    let path = dir.join("act.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\ncat > /dev/null\necho \"$FORESIGHT_OPERATION $FORESIGHT_DECISION_ID\" >> {}\nsleep {sleep}\necho done\n",
            calls.display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    (path, calls)
}

fn calls(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn actuators(program: &Path, limits: GroupLimits, window: Duration) -> ActuatorsConfig {
    let mut c = ActuatorsConfig::default();
    c.policies.insert("auto".into(), Mode::Auto);
    c.policies.insert("prop".into(), Mode::Propose);
    c.groups.insert("default".into(), limits);
    c.kill_switch_poll = Duration::from_millis(50);
    c.actions.insert(
        ActionKind::Migrate,
        ActionConfig {
            actuator: ActuatorConfig::Command(CommandConfig {
                program: program.to_owned(),
                args: vec![],
                timeout: Duration::from_secs(20),
                max_output: 1024,
                env: BTreeMap::new(),
            }),
            group: "default".into(),
            verification: VerificationConfig {
                window,
                margin: 0.1,
                sustained: 2,
            },
            rollback_on_failure: true,
        },
    );
    c
}

fn decision(policy: &str, entity: &str, n: u32, time: DateTime<Utc>) -> Decision {
    let target = EntityId::new(entity).unwrap();
    let action = |params: BTreeMap<String, serde_json::Value>| Action {
        kind: ActionKind::Migrate,
        target: target.clone(),
        params,
    };
    Decision {
        entity: target.clone(),
        time,
        score_id: EventId::derive("test-score", &[entity.as_bytes(), &n.to_le_bytes()]),
        probability: 0.5,
        interval: [0.4, 0.6],
        band: Band::High,
        policy: policy.into(),
        rule: "r".into(),
        action: action(BTreeMap::new()),
        reason: "test".into(),
        expected_effect: "less risk".into(),
        inverse: Some(action(BTreeMap::from([(
            "revert".into(),
            "migrate".into(),
        )]))),
        alternatives: vec![],
    }
}

fn score(entity: &str, time: DateTime<Utc>, p: f64) -> RiskScore {
    serde_json::from_value(serde_json::json!({
        "entity": entity, "time": time,
        "window_id": EventId::derive("w", &[entity.as_bytes(), &time.timestamp().to_le_bytes()]),
        "horizon_seconds": 3600, "probability": p, "lower": p, "upper": p,
        "health": 100.0 * (1.0 - p), "band": "high", "contributors": [],
        "method": "prior", "model_version": "m",
    }))
    .unwrap()
}

async fn database() -> anyhow::Result<(TestDb, sqlx::PgPool)> {
    let db = TestDb::create().await?;
    let pool = db.pool().await?;
    foresight::db::MIGRATOR.run(&pool).await?;
    Ok((db, pool))
}

fn statuses(o: &[ActuationOutcome]) -> Vec<OutcomeStatus> {
    o.iter().map(|o| o.status).collect()
}

fn wide() -> GroupLimits {
    GroupLimits {
        max_actions: 1000,
        per: Duration::from_secs(60),
        max_targets: 1000,
    }
}

#[tokio::test]
async fn exactly_once_modes_kill_switch_verification_and_rollback() -> anyhow::Result<()> {
    let (db, pool) = database().await?;
    let dir = tempfile::tempdir()?;
    let (program, file) = recorder_script(dir.path(), "0");
    let config = actuators(&program, wide(), Duration::from_secs(600));
    let mut engine = Engine::new(config.clone(), pool.clone(), KillSignal::never())?;
    let now = Utc::now();

    // auto: applied once; seen again (redelivery, replay): the same outcome, no second call.
    let d1 = decision("auto", "node-1", 1, now);
    let first = engine.decide(&d1).await?;
    assert_eq!(statuses(&first), [OutcomeStatus::Applied], "{first:?}");
    let again = engine.decide(&d1).await?;
    assert_eq!(again, first);
    assert_eq!(calls(&file), [format!("apply {}", d1.id())]);

    // shadow: a dry run, recorded, no call.
    let shadow = decision("some-other-policy", "node-9", 1, now);
    assert_eq!(
        statuses(&engine.decide(&shadow).await?),
        [OutcomeStatus::DryRun]
    );

    // propose: deferred until approved; approved once.
    let d2 = decision("prop", "node-2", 1, now);
    let proposed = engine.decide(&d2).await?;
    assert_eq!(statuses(&proposed), [OutcomeStatus::Deferred]);
    assert!(
        proposed[0]
            .detail
            .contains(&format!("foresight approve {}", d2.id()))
    );
    assert_eq!(calls(&file).len(), 1);
    let approved = engine.approve(d2.id()).await?;
    assert_eq!(statuses(&approved), [OutcomeStatus::Applied]);
    assert!(matches!(
        engine.approve(d2.id()).await,
        Err(ActuatorError::Refused(_))
    ));
    // A redelivery of the proposal now re-emits both outcomes and acts on nothing.
    assert_eq!(
        statuses(&engine.decide(&d2).await?),
        [OutcomeStatus::Deferred, OutcomeStatus::Applied]
    );
    assert_eq!(calls(&file).len(), 2);

    // Verification: d1's entity gets worse in two consecutive scores (event time) -> rollback.
    let secs = |s: i64| now + chrono::Duration::seconds(s);
    assert!(engine.watches_entity("node-1"));
    assert!(
        engine
            .score(&score("node-1", secs(60), 0.9))
            .await?
            .is_empty()
    );
    let rolled = engine.score(&score("node-1", secs(120), 0.95)).await?;
    assert_eq!(statuses(&rolled), [OutcomeStatus::RolledBack], "{rolled:?}");
    assert!(
        rolled[0]
            .detail
            .contains("verification found the entity worse")
    );
    assert_eq!(rolled[0].action.params["revert"], "migrate");
    assert_eq!(calls(&file)[2], format!("rollback {}", d1.id()));
    // d2's window passes quietly (another entity's score moves the watermark past it).
    assert!(
        engine
            .score(&score("node-2", secs(300), 0.5))
            .await?
            .is_empty()
    );
    assert!(
        engine
            .score(&score("node-3", secs(700), 0.1))
            .await?
            .is_empty()
    );
    let e2 = engine.ledger().get(&d2.id()).await?.unwrap();
    assert!(e2.settled && e2.state == State::Applied, "{e2:?}");

    // By hand: d2 rolled back once; a second request is refused.
    let by_hand = engine.rollback(d2.id(), "operator says so").await?;
    assert_eq!(statuses(&by_hand), [OutcomeStatus::RolledBack]);
    assert!(matches!(
        engine.rollback(d2.id(), "again").await,
        Err(ActuatorError::Refused(_))
    ));
    assert_eq!(calls(&file).len(), 4);

    // Kill switch: nothing is applied while it is engaged.
    engine.ledger().set_stopped(true, "test").await?;
    let d3 = decision("auto", "node-3", 1, now);
    let stopped = engine.decide(&d3).await?;
    assert_eq!(statuses(&stopped), [OutcomeStatus::Deferred]);
    assert!(stopped[0].detail.contains("kill switch"), "{stopped:?}");
    engine.ledger().set_stopped(false, "").await?;
    // A deferred decision stays deferred: the allocator decides afresh on fresh scores.
    assert_eq!(engine.decide(&d3).await?, stopped);
    assert_eq!(calls(&file).len(), 4);

    // Stale decisions are not acted on.
    let old = decision("auto", "node-4", 1, now - chrono::Duration::hours(2));
    let stale = engine.decide(&old).await?;
    assert!(stale[0].status == OutcomeStatus::Deferred && stale[0].detail.contains("stale"));
    assert_eq!(calls(&file).len(), 4);
    drop(engine);
    pool.close().await;
    db.drop_db().await
}

#[tokio::test]
async fn a_crash_between_claim_and_outcome_is_resolved_not_retried() -> anyhow::Result<()> {
    let (db, pool) = database().await?;
    let dir = tempfile::tempdir()?;
    let (program, file) = recorder_script(dir.path(), "5");
    let config = actuators(&program, wide(), Duration::ZERO);
    let d = decision("auto", "node-1", 1, Utc::now());

    // The acting session "crashes": its future is dropped mid-action (its connection, and so
    // its lock, goes; the command is killed).
    let mut doomed = Engine::new(config.clone(), pool.clone(), KillSignal::never())?;
    let acting = tokio::spawn(async move { doomed.decide(&d).await });
    foresight_tests::eventually("the call", Duration::from_secs(10), || async {
        Ok((!calls(&file).is_empty()).then_some(()))
    })
    .await?;
    acting.abort();
    let _ = acting.await;
    let d = decision("auto", "node-1", 1, Utc::now());
    let entry = foresight_tests::eventually("the orphan", Duration::from_secs(10), || {
        let pool = pool.clone();
        let id = d.id();
        async move {
            let e = foresight_actuators::Ledger::new(pool).get(&id).await?;
            Ok(e.filter(|e| e.state == State::Claimed))
        }
    })
    .await?;
    assert!(entry.outcomes.is_empty());

    // The next instance finds the claim without outcome, checks (a command cannot tell) and
    // marks it unknown for a person; the redelivered decision then only re-emits that.
    let mut next = Engine::new(config, pool.clone(), KillSignal::never())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let resolved = loop {
        let o = next.scan().await?;
        if !o.is_empty() || Instant::now() > deadline {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        statuses(&resolved),
        [OutcomeStatus::Unknown],
        "{resolved:?}"
    );
    assert!(resolved[0].detail.contains("needs a person"));
    assert_eq!(next.decide(&d).await?, resolved);
    assert_eq!(calls(&file).len(), 1);
    drop(next);
    pool.close().await;
    db.drop_db().await
}

/// 1,000 decisions within 10 s against a limit of 5 per minute, handled by four engines at once
/// (four instances sharing the ledger): at most 5 applied, every other one deferred with the
/// rate limit as its reason.
#[tokio::test]
async fn a_thousand_decisions_against_five_per_minute() -> anyhow::Result<()> {
    let (db, pool) = database().await?;
    let dir = tempfile::tempdir()?;
    let (program, file) = recorder_script(dir.path(), "0");
    let limits = GroupLimits {
        max_actions: 5,
        per: Duration::from_secs(60),
        max_targets: 1000,
    };
    let config = actuators(&program, limits, Duration::ZERO);
    let now = Utc::now();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for instance in 0..4u32 {
        let mut engine = Engine::new(config.clone(), pool.clone(), KillSignal::never())?;
        tasks.spawn(async move {
            let mut out = Vec::new();
            for n in (instance..1000).step_by(4) {
                let d = decision("auto", &format!("node-{}", n % 50), n, now);
                out.extend(engine.decide(&d).await?);
            }
            anyhow::Ok(out)
        });
    }
    let mut outcomes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        outcomes.extend(r??);
    }
    let elapsed = started.elapsed();
    assert_eq!(outcomes.len(), 1000);
    let applied = outcomes
        .iter()
        .filter(|o| o.status == OutcomeStatus::Applied)
        .count();
    let deferred: Vec<_> = outcomes
        .iter()
        .filter(|o| o.status == OutcomeStatus::Deferred)
        .collect();
    eprintln!(
        "1000 decisions in {elapsed:?}: {applied} applied, {} deferred",
        deferred.len()
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "the limit's window is a minute: {elapsed:?}"
    );
    assert_eq!(applied, 5);
    assert_eq!(deferred.len(), 995);
    assert!(
        deferred
            .iter()
            .all(|o| o.detail.contains("rate limit of group default"))
    );
    assert_eq!(calls(&file).len(), 5);
    pool.close().await;
    db.drop_db().await
}

/// The decisions as their CloudEvents envelopes, keyed by entity, as the allocator writes them.
fn envelopes(decisions: &[Decision]) -> Vec<(String, Vec<u8>)> {
    decisions
        .iter()
        .map(|d| {
            let e = foresight_events::Event::new("/foresight/allocator", d.clone());
            (d.entity.to_string(), e.to_json())
        })
        .collect()
}

fn outcome_ids(topic: &str) -> anyhow::Result<Vec<EventId>> {
    let read = foresight_tests::read_all(topic, Duration::from_secs(2), Duration::from_secs(30))?;
    read.iter()
        .map(|m| {
            Ok(
                foresight_events::Event::<ActuationOutcome>::from_json(&m.payload)?
                    .data
                    .id(),
            )
        })
        .collect()
}

/// The live stage reads the whole decisions topic from offset 0 again (a new consumer group,
/// the same ledger): every outcome is emitted again with the same id, and not one new call is
/// made.
#[tokio::test]
async fn a_replay_of_the_decisions_topic_makes_no_new_calls() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let dir = tempfile::tempdir()?;
    let (program, file) = recorder_script(dir.path(), "0");
    let prefix = foresight_tests::tag();
    let mut config = foresight_tests::config(&prefix, &db);
    config.actuators = actuators(&program, wide(), Duration::ZERO);
    let topics = foresight::kafka::Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;
    let now = Utc::now();
    let decisions: Vec<Decision> = (0..30)
        .map(|n| decision("auto", &format!("node-{}", n % 7), n, now))
        .collect();
    foresight_tests::produce(
        &foresight_tests::producer()?,
        &topics.decisions,
        &envelopes(&decisions),
    )
    .await?;

    let run = |config: foresight::Config| async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let s = shutdown.clone();
        let task = tokio::spawn(async move {
            foresight::run_stages(&[foresight::Stage::Actuator], &config, s).await
        });
        (shutdown, task)
    };
    let (stop, task) = run(config.clone()).await;
    foresight_tests::eventually("30 calls", Duration::from_secs(60), || async {
        Ok((calls(&file).len() >= 30).then_some(()))
    })
    .await?;
    let first = foresight_tests::eventually("30 outcomes", Duration::from_secs(60), || async {
        let ids = outcome_ids(&topics.outcomes)?;
        Ok((ids.len() >= 30).then_some(ids))
    })
    .await?;
    stop.cancel();
    task.await??;

    // From offset 0, as a new group.
    config.kafka.group_prefix = format!("{prefix}-replay-");
    let (stop, task) = run(config.clone()).await;
    let all = foresight_tests::eventually("60 outcomes", Duration::from_secs(60), || async {
        let ids = outcome_ids(&topics.outcomes)?;
        Ok((ids.len() >= 60).then_some(ids))
    })
    .await?;
    stop.cancel();
    task.await??;
    assert_eq!(calls(&file).len(), 30, "the replay made new calls");
    // Every outcome twice (the partitions of the topic interleave when read), nothing else.
    let mut twice: Vec<_> = first.iter().chain(&first).copied().collect();
    twice.sort();
    let mut all = all;
    all.sort();
    assert_eq!(
        all, twice,
        "the replay's outcomes are the first run's, ids included"
    );
    db.drop_db().await
}

/// `foresight run actuator` as a child process is SIGKILLed 20 times, each time while a command
/// it started is running (between claim and outcome), and restarted: no decision is ever acted
/// on twice, and every decision ends with an outcome.
#[tokio::test]
async fn killing_the_actuator_between_claim_and_outcome_never_acts_twice() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let dir = tempfile::tempdir()?;
    let (program, file) = recorder_script(dir.path(), "0.5");
    let prefix = foresight_tests::tag();
    let config = foresight_tests::config(&prefix, &db);
    let topics = foresight::kafka::Topics::new(&config.kafka.topic_prefix);
    foresight::kafka::create_topics(&config.kafka, &topics).await?;
    let toml = dir.path().join("foresight.toml");
    std::fs::write(
        &toml,
        format!(
            "[actuators]\nkill_switch_poll = \"100ms\"\nscan_interval = \"300ms\"\n\
             [actuators.policies]\nauto = \"auto\"\n\
             [actuators.groups.default]\nmax_actions = 1000\nper = \"1m\"\nmax_targets = 1000\n\
             [actuators.actions.migrate]\nverification = {{ window = \"0s\" }}\nrollback_on_failure = false\n\
             [actuators.actions.migrate.actuator.command]\nprogram = \"{}\"\n",
            program.display()
        ),
    )?;
    // Each restart joins a new consumer group, so it gets its partitions at once instead of
    // waiting out the killed member's session, and reads the decisions from offset 0 again: a
    // crash and a replay at once.
    let start = |k: u32| {
        std::process::Command::new(foresight_tests::binary()?)
            .args(["run", "actuator", "--config"])
            .arg(&toml)
            .env("FORESIGHT_KAFKA__BROKERS", &config.kafka.brokers)
            .env("FORESIGHT_KAFKA__TOPIC_PREFIX", &config.kafka.topic_prefix)
            .env("FORESIGHT_KAFKA__GROUP_PREFIX", format!("{prefix}-{k}-"))
            .env("FORESIGHT_POSTGRES__URL", &config.postgres.url)
            .env("FORESIGHT_RUNNER__COMMIT_INTERVAL", "100ms")
            .env("FORESIGHT_OBSERVABILITY__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting foresight")
    };
    let now = Utc::now();
    let decisions: Vec<Decision> = (0..40)
        .map(|n| decision("auto", &format!("node-{}", n % 5), n, now))
        .collect();
    foresight_tests::produce(
        &foresight_tests::producer()?,
        &topics.decisions,
        &envelopes(&decisions),
    )
    .await?;
    let mut child = start(0)?;
    for kill in 0..20 {
        let seen = calls(&file).len();
        foresight_tests::eventually("a new call", Duration::from_secs(60), || async {
            Ok((calls(&file).len() > seen).then_some(()))
        })
        .await
        .with_context(|| format!("before kill {kill}"))?;
        child.kill()?; // SIGKILL, while the command it started sleeps: claimed, no outcome.
        child.wait()?;
        child = start(kill + 1)?;
    }
    let pool = db.pool().await?;
    let finished: i64 =
        foresight_tests::eventually("40 outcomes", Duration::from_secs(120), || {
            let pool = pool.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM actuations WHERE state NOT IN ('claimed', 'rolling_back')",
            )
            .fetch_one(&pool)
            .await?;
                Ok((n >= 40).then_some(n))
            }
        })
        .await?;
    child.kill()?;
    child.wait()?;
    let calls = calls(&file);
    let mut unique = calls.clone();
    unique.sort();
    unique.dedup();
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM actuations GROUP BY state ORDER BY state")
            .fetch_all(&pool)
            .await?;
    eprintln!(
        "{} calls, {finished} decisions finished: {states:?}",
        calls.len()
    );
    assert_eq!(
        unique.len(),
        calls.len(),
        "a decision was acted on twice: {calls:?}"
    );
    assert!(calls.len() <= 40);
    pool.close().await;
    db.drop_db().await
}
