//! Foresight actuators: apply decisions and report what became of them.
//!
//! Every action type is dry-run until a user opts in: the [`DryRun`] actuator records what would have
//! been done as an [`ActuationOutcome`] and changes nothing.
//!
//! ```
//! use foresight_actuators::DryRun;
//! use foresight_events::{Action, ActionKind, Band, Decision, EntityId, EventId, OutcomeStatus, Origin, Output, Processor};
//! use chrono::{DateTime, Utc};
//!
//! let target = EntityId::new("node-1").unwrap();
//! let decision = Decision {
//!     entity: target.clone(), time: DateTime::<Utc>::from_timestamp(0, 0).unwrap(),
//!     score_id: EventId::derive("example", &[]), probability: 0.9, interval: [0.8, 0.95],
//!     band: Band::High, policy: "p".into(), rule: "r".into(),
//!     action: Action { kind: ActionKind::Migrate, target, params: Default::default() },
//!     reason: "high risk".into(), expected_effect: "moves work".into(), inverse: None,
//!     alternatives: vec![],
//! };
//! let mut out = Vec::new();
//! DryRun.process(decision, Origin { input: 0, partition: 0, offset: 0 }, &mut out);
//! assert!(matches!(&out[0], Output::Event(o) if o.status == OutcomeStatus::DryRun));
//! ```

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
