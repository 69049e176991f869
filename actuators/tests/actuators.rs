//! The webhook and command actuators against real things: a local HTTP server (axum) that
//! verifies the Standard Webhooks signature and counts calls per idempotency key, and real shell
//! scripts.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use chrono::{TimeZone, Utc};
use foresight_actuators::{
    Actuate, Command, KillSignal, Operation, Request, Webhook,
    config::{CommandConfig, WebhookConfig},
    signature,
};
use foresight_events::{
    Action, ActionKind, Band, Decision, EntityId, Event, EventData, OutcomeStatus,
};

const SECRET: &str = "s3cret-for-tests";

fn decision(rule: &str) -> Decision {
    let target = EntityId::new("node-7").unwrap();
    Decision {
        entity: target.clone(),
        time: Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        score_id: foresight_events::EventId::derive("s", &[rule.as_bytes()]),
        probability: 0.9,
        interval: [0.8, 0.95],
        band: Band::High,
        policy: "p".into(),
        rule: rule.into(),
        action: Action {
            kind: ActionKind::Migrate,
            target: target.clone(),
            params: BTreeMap::from([("to".into(), "node-8".into())]),
        },
        reason: "r".into(),
        expected_effect: "e".into(),
        inverse: Some(Action {
            kind: ActionKind::Migrate,
            target,
            params: BTreeMap::new(),
        }),
        alternatives: vec![],
    }
}

fn request(d: &Decision, op: Operation) -> Request<'_> {
    Request {
        decision: d,
        decision_id: d.id(),
        operation: op,
        action: &d.action,
        memo: None,
        stop: KillSignal::never(),
    }
}

/// What the test server saw.
#[derive(Default)]
struct Seen {
    /// Calls per idempotency key, in order, with the status answered.
    calls: Vec<(String, u16)>,
    /// Requests whose signature did not verify.
    bad_signatures: usize,
    /// How to answer each key: the statuses to return, in order (then 200).
    script: BTreeMap<String, Vec<u16>>,
    bodies: Vec<Vec<u8>>,
}

async fn receive(
    State(seen): State<Arc<Mutex<Seen>>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, ts, sig) = (
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
    );
    let mut seen = seen.lock().unwrap();
    let expected = signature(SECRET.as_bytes(), &id, ts.parse().unwrap_or(0), &body);
    // The receiver's checks: signature, fresh timestamp, the idempotency key twice.
    let fresh = (Utc::now().timestamp() - ts.parse::<i64>().unwrap_or(0)).abs() < 300;
    if sig != expected || !fresh || h("idempotency-key") != id {
        seen.bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, "bad signature".into());
    }
    let status = seen
        .script
        .get_mut(&id)
        .and_then(|s| (!s.is_empty()).then(|| s.remove(0)))
        .unwrap_or(200);
    seen.calls.push((id, status));
    seen.bodies.push(body.to_vec());
    (
        StatusCode::from_u16(status).unwrap(),
        format!("answered {status}"),
    )
}

async fn server(seen: Arc<Mutex<Seen>>) -> String {
    let app = Router::new().route("/hook", post(receive)).with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook")
}

fn webhook(url: String, secret: &str, retries: u32) -> Webhook {
    let config = WebhookConfig {
        url,
        secret_env: "UNUSED".into(),
        timeout: Duration::from_secs(2),
        retries,
        backoff: Duration::from_millis(20),
    };
    Webhook::with_secret(config, secret.as_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn webhook_is_signed_keyed_by_decision_and_retried_only_when_it_can_help() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let url = server(seen.clone()).await;
    let (ok, refused, down) = (decision("ok"), decision("refused"), decision("down"));
    {
        let mut s = seen.lock().unwrap();
        s.script.insert(ok.id().to_string(), vec![503, 502]);
        s.script.insert(refused.id().to_string(), vec![422]);
        s.script
            .insert(down.id().to_string(), vec![500, 500, 500, 500, 500]);
    }
    let hook = webhook(url.clone(), SECRET, 3);

    // 5xx twice, then success: three calls, applied.
    let e = hook.apply(request(&ok, Operation::Apply)).await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    assert!(e.detail.starts_with("attempt 3: HTTP 200"), "{}", e.detail);
    // 4xx: one call, failed, not retried.
    let e = hook.apply(request(&refused, Operation::Apply)).await;
    assert_eq!(e.status, OutcomeStatus::Failed, "{}", e.detail);
    assert!(
        e.detail.contains("HTTP 422 (refused; not retried)"),
        "{}",
        e.detail
    );
    // 5xx every time: 1 + 3 retries, failed.
    let e = hook.apply(request(&down, Operation::Apply)).await;
    assert_eq!(e.status, OutcomeStatus::Failed, "{}", e.detail);
    assert!(
        e.detail.starts_with("gave up after 4 attempts"),
        "{}",
        e.detail
    );
    // A rollback has its own key.
    let e = hook.apply(request(&ok, Operation::Rollback)).await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);

    {
        let s = seen.lock().unwrap();
        assert_eq!(s.bad_signatures, 0);
        let calls = |id: String| s.calls.iter().filter(|(k, _)| *k == id).count();
        assert_eq!(calls(ok.id().to_string()), 3);
        assert_eq!(calls(refused.id().to_string()), 1);
        assert_eq!(calls(down.id().to_string()), 4);
        assert_eq!(calls(format!("{}.rollback", ok.id())), 1);
        // The body is the decision's CloudEvents envelope, as on the decisions topic.
        let event = Event::<Decision>::from_json(&s.bodies[0]).unwrap();
        assert_eq!(event.data, ok);
    }

    // A wrong secret is caught by the server's verification.
    let wrong = webhook(url, "not-the-secret", 0);
    let e = wrong.apply(request(&decision("x"), Operation::Apply)).await;
    assert_eq!(e.status, OutcomeStatus::Failed, "{}", e.detail);
    assert!(e.detail.contains("HTTP 401"), "{}", e.detail);
    assert_eq!(seen.lock().unwrap().bad_signatures, 1);
}

#[tokio::test]
async fn webhook_timeouts_are_retried_and_a_dead_endpoint_fails() {
    // An endpoint that accepts connections and never answers: every attempt times out.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(0usize));
    let a = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            *a.lock().unwrap() += 1;
            held.push(sock);
        }
    });
    let config = WebhookConfig {
        url: format!("http://{addr}/hook"),
        secret_env: "UNUSED".into(),
        timeout: Duration::from_millis(200),
        retries: 2,
        backoff: Duration::from_millis(10),
    };
    let hook = Webhook::with_secret(config, SECRET.as_bytes().to_vec()).unwrap();
    let d = decision("slow");
    let e = hook.apply(request(&d, Operation::Apply)).await;
    assert_eq!(e.status, OutcomeStatus::Failed, "{}", e.detail);
    assert_eq!(e.detail.matches("timed out").count(), 3, "{}", e.detail);
    assert_eq!(*accepted.lock().unwrap(), 3);
}

fn script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    path
}

fn command(program: std::path::PathBuf, timeout: Duration) -> Command {
    Command::new(CommandConfig {
        program,
        args: vec!["--flag".into()],
        timeout,
        max_output: 256,
        env: BTreeMap::from([("EXTRA".into(), "yes".into())]),
    })
}

#[tokio::test]
async fn command_gets_the_decision_on_stdin_and_its_exit_status_decides() {
    let dir = tempfile::tempdir().unwrap();
    let got = dir.path().join("stdin.json");
    let ok = script(
        dir.path(),
        "ok.sh",
        &format!(
            "cat > {}\necho \"op=$FORESIGHT_OPERATION id=$FORESIGHT_DECISION_ID arg=$1 extra=$EXTRA\"",
            got.display()
        ),
    );
    let d = decision("cmd");
    let e = command(ok, Duration::from_secs(5))
        .apply(request(&d, Operation::Apply))
        .await;
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    assert!(
        e.detail
            .contains(&format!("op=apply id={} arg=--flag extra=yes", d.id())),
        "{}",
        e.detail
    );
    let stdin = std::fs::read(&got).unwrap();
    assert_eq!(Event::<Decision>::from_json(&stdin).unwrap().data, d);

    let failing = script(dir.path(), "fail.sh", "echo broken >&2\nexit 3");
    let e = command(failing, Duration::from_secs(5))
        .apply(request(&d, Operation::Apply))
        .await;
    assert_eq!(e.status, OutcomeStatus::Failed);
    assert!(
        e.detail.starts_with("exit 3;") && e.detail.contains("stderr: broken"),
        "{}",
        e.detail
    );

    let later = script(dir.path(), "later.sh", "exit 75");
    let e = command(later, Duration::from_secs(5))
        .apply(request(&d, Operation::Apply))
        .await;
    assert_eq!(e.status, OutcomeStatus::Deferred, "{}", e.detail);

    let chatty = script(
        dir.path(),
        "chatty.sh",
        "head -c 100000 /dev/zero | tr '\\0' x",
    );
    let e = command(chatty, Duration::from_secs(5))
        .apply(request(&d, Operation::Apply))
        .await;
    assert_eq!(e.status, OutcomeStatus::Applied);
    assert!(e.detail.contains("(100000 bytes in all)"), "{}", e.detail);

    let slow = script(dir.path(), "slow.sh", "exec sleep 30");
    let started = std::time::Instant::now();
    let e = command(slow, Duration::from_millis(300))
        .apply(request(&d, Operation::Apply))
        .await;
    assert_eq!(e.status, OutcomeStatus::Failed);
    assert!(e.detail.contains("and was killed"), "{}", e.detail);
    assert!(started.elapsed() < Duration::from_secs(10));

    let missing = command(dir.path().join("nope"), Duration::from_secs(1))
        .apply(request(&d, Operation::Apply))
        .await;
    assert_eq!(missing.status, OutcomeStatus::Failed);
    assert!(
        missing.detail.starts_with("could not start"),
        "{}",
        missing.detail
    );
}

/// A program held open for writing (here by this test; in the test suite, by a process forked
/// elsewhere while it was being written) cannot be run (`ETXTBSY`): it is waited out briefly,
/// and what stays busy fails with the reason.
#[tokio::test]
async fn a_program_busy_being_written_is_waited_out_briefly() {
    let dir = tempfile::tempdir().unwrap();
    let d = decision("busy");
    let program = script(dir.path(), "busy.sh", "echo ran");
    let writer = std::fs::OpenOptions::new()
        .append(true)
        .open(&program)
        .unwrap();
    let released = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(writer);
    });
    let e = command(program.clone(), Duration::from_secs(5))
        .apply(request(&d, Operation::Apply))
        .await;
    released.await.unwrap();
    assert_eq!(e.status, OutcomeStatus::Applied, "{}", e.detail);
    assert!(e.detail.contains("stdout: ran"), "{}", e.detail);

    let _writer = std::fs::OpenOptions::new()
        .append(true)
        .open(&program)
        .unwrap();
    let started = std::time::Instant::now();
    let e = command(program, Duration::from_secs(5))
        .apply(request(&d, Operation::Apply))
        .await;
    assert_eq!(e.status, OutcomeStatus::Failed, "{}", e.detail);
    assert!(
        e.detail.starts_with("could not start") && e.detail.contains("busy"),
        "{}",
        e.detail
    );
    // Waited out for the retries' pauses (630 ms), no longer.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[tokio::test]
async fn the_kill_switch_interrupts_a_running_command() {
    let dir = tempfile::tempdir().unwrap();
    let slow = script(dir.path(), "slow.sh", "exec sleep 30");
    let d = decision("kill");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut req = request(&d, Operation::Apply);
    req.stop = KillSignal::new(rx);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let started = std::time::Instant::now();
    let e = command(slow, Duration::from_secs(20)).apply(req).await;
    assert_eq!(e.status, OutcomeStatus::Unknown, "{}", e.detail);
    assert!(e.detail.contains("kill switch"), "{}", e.detail);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}
