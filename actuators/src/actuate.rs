//! The IO side of one actuator kind, behind one small async trait.

use std::future::Future;

use foresight_events::{Action, Decision, EventId, OutcomeStatus};
use tokio::sync::watch;

use crate::{
    command::Command, config::ActuatorConfig, error::ActuatorError, kubernetes::Kubernetes,
    webhook::Webhook,
};

/// Whether an action is being applied or undone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Apply the decision's action.
    Apply,
    /// Apply the decision's recorded inverse.
    Rollback,
}

impl Operation {
    /// The operation's name, as sent to webhooks and commands.
    pub fn as_str(&self) -> &'static str {
        match self {
            Operation::Apply => "apply",
            Operation::Rollback => "rollback",
        }
    }
}

/// The kill switch as an actuator sees it: engaged means stop at once.
#[derive(Debug, Clone)]
pub struct KillSignal(watch::Receiver<bool>);

impl KillSignal {
    /// A signal following `rx` (true = engaged).
    pub fn new(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    /// A signal that never engages (tests, one-shot CLI calls that check the switch themselves).
    pub fn never() -> Self {
        // With the sender gone the value can never change: `engaged` waits forever.
        let (_, rx) = watch::channel(false);
        Self(rx)
    }

    /// Whether the switch is engaged now.
    pub fn is_engaged(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when the switch is engaged (at once if it is).
    pub async fn engaged(&mut self) {
        if self.0.wait_for(|s| *s).await.is_err() {
            // The sender is gone: the switch can no longer change, so wait forever.
            std::future::pending::<()>().await;
        }
    }
}

/// One thing for an actuator to do.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The decision.
    pub decision: &'a Decision,
    /// Its id: the idempotency key.
    pub decision_id: EventId,
    /// Apply or undo.
    pub operation: Operation,
    /// The action to perform: the decision's action, or its inverse on rollback.
    pub action: &'a Action,
    /// What the actuator recorded when it applied the action (e.g. the replica count before
    /// scaling), for its rollback.
    pub memo: Option<&'a serde_json::Value>,
    /// Engaged when the kill switch trips.
    pub stop: KillSignal,
}

impl Request<'_> {
    /// The idempotency key of this request: the decision id, suffixed for a rollback so that
    /// the receiver does not take the undo for a repeat of the action.
    pub fn idempotency_key(&self) -> String {
        match self.operation {
            Operation::Apply => self.decision_id.to_string(),
            Operation::Rollback => format!("{}.rollback", self.decision_id),
        }
    }
}

/// What an actuator did.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    /// Applied, failed, deferred (e.g. a PodDisruptionBudget said not now) or unknown
    /// (interrupted: it may or may not have happened).
    pub status: OutcomeStatus,
    /// Response, output, reason.
    pub detail: String,
    /// State to keep for the rollback.
    pub memo: Option<serde_json::Value>,
}

impl Effect {
    /// An effect without memo.
    pub fn new(status: OutcomeStatus, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
            memo: None,
        }
    }
}

/// What checking the target says about an action interrupted between claim and outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Reconciled {
    /// The target is in the state the action leads to.
    Applied(String),
    /// The target is not: the action did not take effect (it is not retried).
    NotApplied(String),
    /// The actuator cannot tell: a person must look.
    Unknown(String),
}

/// One kind of actuator.
pub trait Actuate: Send + Sync {
    /// Performs the request.
    fn apply(&self, request: Request<'_>) -> impl Future<Output = Effect> + Send;

    /// After a crash between claim and outcome, checks the target's state. Never performs the
    /// action again.
    fn reconcile(&self, request: Request<'_>) -> impl Future<Output = Reconciled> + Send;
}

/// Every actuator kind, selected per action type by configuration.
#[derive(Debug)]
pub enum AnyActuator {
    /// Records what would have been done.
    DryRun,
    /// HTTP POST.
    Webhook(Webhook),
    /// A program.
    Command(Command),
    /// The Kubernetes API (boxed: its configuration is several times the others' size).
    Kubernetes(Box<Kubernetes>),
}

impl AnyActuator {
    /// Builds the actuator a configuration names.
    pub fn from_config(config: &ActuatorConfig) -> Result<Self, ActuatorError> {
        Ok(match config {
            ActuatorConfig::DryRun => AnyActuator::DryRun,
            ActuatorConfig::Webhook(c) => AnyActuator::Webhook(Webhook::new(c.clone())?),
            ActuatorConfig::Command(c) => AnyActuator::Command(Command::new(c.clone())),
            ActuatorConfig::Kubernetes(c) => {
                AnyActuator::Kubernetes(Box::new(Kubernetes::new(c.clone())?))
            }
        })
    }

    /// The actuator's name in outcomes.
    pub fn name(&self) -> &'static str {
        match self {
            AnyActuator::DryRun => crate::DryRun::NAME,
            AnyActuator::Webhook(_) => "webhook",
            AnyActuator::Command(_) => "command",
            AnyActuator::Kubernetes(_) => "kubernetes",
        }
    }
}

impl Actuate for AnyActuator {
    async fn apply(&self, request: Request<'_>) -> Effect {
        match self {
            AnyActuator::DryRun => Effect::new(
                OutcomeStatus::DryRun,
                format!(
                    "dry run: would {} {} {}",
                    request.operation.as_str(),
                    request.action.kind.as_str(),
                    request.action.target
                ),
            ),
            AnyActuator::Webhook(w) => w.apply(request).await,
            AnyActuator::Command(c) => c.apply(request).await,
            AnyActuator::Kubernetes(k) => k.apply(request).await,
        }
    }

    async fn reconcile(&self, request: Request<'_>) -> Reconciled {
        match self {
            AnyActuator::DryRun => Reconciled::NotApplied("dry run: nothing was changed".into()),
            AnyActuator::Webhook(w) => w.reconcile(request).await,
            AnyActuator::Command(c) => c.reconcile(request).await,
            AnyActuator::Kubernetes(k) => k.reconcile(request).await,
        }
    }
}

/// At most `max` bytes of `text`, cut at a character boundary, marked when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}
