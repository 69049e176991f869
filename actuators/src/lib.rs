#![doc = include_str!("../README.md")]

mod actuate;
mod command;
pub mod config;
mod engine;
mod error;
mod kubernetes;
mod ledger;
pub mod plan;
mod webhook;

pub use actuate::{Actuate, AnyActuator, Effect, KillSignal, Operation, Reconciled, Request};
pub use command::{Command, EXIT_DEFER};
pub use config::ActuatorsConfig;
pub use engine::Engine;
pub use error::ActuatorError;
pub use kubernetes::Kubernetes;
pub use ledger::{Entry, Ledger, State, Status};
pub use webhook::{SOURCE, Webhook, signature};

use foresight_events::{
    ActuationOutcome, Decision, EventData, Origin, OutcomeStatus, Output, Processor,
};

/// The dry-run actuator: records what would have been done.
#[derive(Debug, Clone, Copy, Default)]
pub struct DryRun;

impl DryRun {
    /// The actuator's name in outcomes.
    pub const NAME: &'static str = "dry-run";
}

impl Processor for DryRun {
    type Input = Decision;
    type Output = ActuationOutcome;

    fn process(
        &mut self,
        decision: Decision,
        _origin: Origin,
        out: &mut Vec<Output<ActuationOutcome>>,
    ) {
        let params = serde_json::to_string(&decision.action.params).expect("JSON values serialise");
        let detail = format!(
            "dry run: would {} {} with {params} (policy {}, rule {})",
            decision.action.kind.as_str(),
            decision.action.target,
            decision.policy,
            decision.rule
        );
        out.push(Output::Event(ActuationOutcome {
            decision_id: decision.id(),
            entity: decision.entity,
            time: decision.time,
            actuator: Self::NAME.into(),
            status: OutcomeStatus::DryRun,
            action: decision.action,
            detail,
        }));
    }
}
