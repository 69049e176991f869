//! The command actuator: runs a configured program with the decision's CloudEvents JSON on stdin.
//!
//! The program also gets `FORESIGHT_OPERATION` (`apply` or `rollback`: then it should perform
//! the decision's `inverse`), `FORESIGHT_DECISION_ID` and `FORESIGHT_IDEMPOTENCY_KEY`. Exit 0
//! is applied; exit 75 (`EX_TEMPFAIL`) is deferred ("not now"); anything else, or running past
//! the timeout (the program is then killed), is failed. The first `max_output` bytes of stdout
//! and stderr go into the outcome. A program busy being written is waited out briefly
//! (`spawn`).

use std::process::Stdio;

use foresight_events::{Event, OutcomeStatus};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    actuate::{Actuate, Effect, Reconciled, Request},
    config::CommandConfig,
    webhook::SOURCE,
};

/// `EX_TEMPFAIL` from sysexits.h: a temporary failure, try again later.
pub const EXIT_DEFER: i32 = 75;

/// The command actuator.
#[derive(Debug)]
pub struct Command {
    config: CommandConfig,
}

/// Reads everything, keeping the first `max` bytes (the rest is drained so the program never
/// blocks on a full pipe).
async fn read_capped<R: AsyncRead + Unpin>(mut r: R, max: usize) -> String {
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    let text = String::from_utf8_lossy(&kept).trim_end().to_owned();
    if total > kept.len() {
        format!("{text}… ({total} bytes in all)")
    } else {
        text
    }
}

/// How many times a start refused because the program is open for writing (`ETXTBSY`) is tried
/// again, and the first pause before that (doubled each time: 10 ms to 320 ms, 630 ms in all).
const BUSY_RETRIES: u32 = 6;
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Starts `command`, waiting out a program that is busy: Linux refuses to run a file that any
/// process holds open for writing, and a program just written (deployed, or made by a test) is
/// briefly held so by every process forked while it was open, even elsewhere in this one, until
/// they exec. Only the start can fail so, before anything ran: a retry never runs it twice.
async fn spawn(command: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    let mut pause = BUSY_PAUSE;
    for _ in 0..BUSY_RETRIES {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            started => return started,
        }
    }
    command.spawn()
}

impl Command {
    /// A command actuator.
    pub fn new(config: CommandConfig) -> Self {
        Self { config }
    }
}

impl Actuate for Command {
    async fn apply(&self, request: Request<'_>) -> Effect {
        let c = &self.config;
        let body = Event::new(SOURCE, request.decision.clone()).to_json();
        let mut command = tokio::process::Command::new(&c.program);
        command
            .args(&c.args)
            .envs(&c.env)
            .env("FORESIGHT_OPERATION", request.operation.as_str())
            .env("FORESIGHT_DECISION_ID", request.decision_id.to_string())
            .env("FORESIGHT_IDEMPOTENCY_KEY", request.idempotency_key())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Dropping the child (timeout, kill switch) kills it.
            .kill_on_drop(true);
        let mut child = match spawn(&mut command).await {
            Ok(child) => child,
            Err(e) => {
                return Effect::new(
                    OutcomeStatus::Failed,
                    format!("could not start {}: {e}", c.program.display()),
                );
            }
        };
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Effect::new(OutcomeStatus::Failed, "the program's pipes were not opened");
        };
        let max = c.max_output;
        let run = async move {
            // A program that does not read its stdin gets a broken pipe here; that is its business.
            let feed = async move {
                let _ = stdin.write_all(&body).await;
                drop(stdin);
            };
            let ((), out, err, status) = tokio::join!(
                feed,
                read_capped(stdout, max),
                read_capped(stderr, max),
                child.wait()
            );
            (out, err, status)
        };
        let mut stop = request.stop.clone();
        let (out, err, status) = tokio::select! {
            biased;
            () = stop.engaged() => {
                return Effect::new(
                    OutcomeStatus::Unknown,
                    format!("{} was killed by the kill switch while running; it may have acted", c.program.display()),
                );
            }
            () = tokio::time::sleep(c.timeout) => {
                return Effect::new(
                    OutcomeStatus::Failed,
                    format!("{} ran longer than {:?} and was killed", c.program.display(), c.timeout),
                );
            }
            r = run => r,
        };
        // Already capped at `max_output` bytes each by `read_capped`.
        let output = format!("stdout: {out}; stderr: {err}");
        match status {
            Ok(s) if s.success() => {
                Effect::new(OutcomeStatus::Applied, format!("exit 0; {output}"))
            }
            Ok(s) if s.code() == Some(EXIT_DEFER) => Effect::new(
                OutcomeStatus::Deferred,
                format!("exit {EXIT_DEFER} (try later); {output}"),
            ),
            Ok(s) => Effect::new(
                OutcomeStatus::Failed,
                match s.code() {
                    Some(code) => format!("exit {code}; {output}"),
                    None => format!("killed by a signal ({s}); {output}"),
                },
            ),
            Err(e) => Effect::new(
                OutcomeStatus::Failed,
                format!("waiting for the program: {e}"),
            ),
        }
    }

    async fn reconcile(&self, request: Request<'_>) -> Reconciled {
        Reconciled::Unknown(format!(
            "{} may or may not have run to completion: check its target (idempotency key {})",
            self.config.program.display(),
            request.idempotency_key()
        ))
    }
}
