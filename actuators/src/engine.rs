//! The engine: the pure plan and gates of [`crate::plan`], the ledger's claims, and the
//! actuators' IO, put together. The live stage (`runtime/src/actuator.rs`) feeds it decisions
//! and scores from Kafka and delivers the outcomes it returns; `foresight approve` and
//! `foresight rollback` call it directly.
//!
//! Exactly-once effects: a decision is acted on only by the session holding its advisory lock,
//! and only after its claim row is committed. Whoever sees the row later (a redelivery, a replay
//! from offset 0, another instance) re-emits the outcomes recorded in it and does nothing else.
//! A row left `claimed` by a crashed session (its lock free) is resolved by asking the actuator
//! to check the target, never by acting again.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use foresight_events::{
    Action, ActionKind, ActuationOutcome, Decision, EventData, EventId, OutcomeStatus, RiskScore,
};
use sqlx::PgPool;

use crate::{
    actuate::{Actuate, AnyActuator, Effect, KillSignal, Operation, Reconciled, Request},
    config::{ActionConfig, ActuatorsConfig, GroupLimits},
    error::ActuatorError,
    ledger::{DecisionLock, Entry, Ledger, NewEntry, State},
    plan::{self, Admission, Plan, Verdict, Verifier, Watch},
};

/// Applies decisions, verifies them and rolls them back.
#[derive(Debug)]
pub struct Engine {
    config: ActuatorsConfig,
    actuators: BTreeMap<ActionKind, AnyActuator>,
    ledger: Ledger,
    stop: KillSignal,
    verifier: Verifier,
}

/// An outcome of `decision`.
fn outcome(
    decision: &Decision,
    id: EventId,
    actuator: &str,
    status: OutcomeStatus,
    action: &Action,
    detail: String,
) -> ActuationOutcome {
    ActuationOutcome {
        decision_id: id,
        entity: decision.entity.clone(),
        time: decision.time,
        actuator: actuator.to_owned(),
        status,
        action: action.clone(),
        detail,
    }
}

/// Who asked for a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// Verification found the entity worse, or the action failed.
    Automatic,
    /// A person (`foresight rollback`).
    Manual,
}

impl Engine {
    /// An engine over the ledger in `pool`, stopping actions in flight when `stop` engages.
    pub fn new(
        config: ActuatorsConfig,
        pool: PgPool,
        stop: KillSignal,
    ) -> Result<Self, ActuatorError> {
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(ActuatorError::Config(
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        let mut actuators = BTreeMap::new();
        let mut errors = Vec::new();
        for (kind, a) in &config.actions {
            match AnyActuator::from_config(&a.actuator) {
                Ok(x) => {
                    actuators.insert(*kind, x);
                }
                Err(e) => errors.push(format!("actuators.actions.{}: {e}", kind.as_str())),
            }
        }
        if !errors.is_empty() {
            return Err(ActuatorError::Config(errors.join("; ")));
        }
        Ok(Self {
            config,
            actuators,
            ledger: Ledger::new(pool),
            stop,
            verifier: Verifier::default(),
        })
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn action_config(&self, kind: ActionKind) -> Option<&ActionConfig> {
        self.config.actions.get(&kind)
    }

    fn actuator(&self, kind: ActionKind) -> &AnyActuator {
        self.actuators.get(&kind).unwrap_or(&AnyActuator::DryRun)
    }

    fn limits(&self, group: &str) -> GroupLimits {
        // `validate` checked that every action's group exists.
        self.config.groups.get(group).cloned().unwrap_or_default()
    }

    fn watch_for(&self, id: EventId, decision: &Decision) -> Option<Watch> {
        let v = &self.action_config(decision.action.kind)?.verification;
        (!v.window.is_zero()).then(|| Watch::new(id, decision, v))
    }

    /// Whether scores of `entity` matter now (an action on it is being verified).
    pub fn watches_entity(&self, entity: &str) -> bool {
        self.verifier.watches_entity(entity)
    }

    /// Handles one decision: returns the outcomes to emit (those recorded before, if the
    /// decision was seen before; none if another session is acting on it right now).
    pub async fn decide(
        &mut self,
        decision: &Decision,
    ) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let id = decision.id();
        let kind = decision.action.kind;
        let mode = self.config.mode(&decision.policy);
        let group = plan::group_of(&self.config, kind).to_owned();
        let actuator = self.actuator(kind).name();
        match plan::plan(decision, &self.config) {
            Plan::DryRun(why) => {
                let params =
                    serde_json::to_string(&decision.action.params).expect("JSON values serialise");
                let detail = format!(
                    "dry run ({why}): would {} {} with {params}",
                    kind.as_str(),
                    decision.action.target
                );
                let o = outcome(
                    decision,
                    id,
                    crate::DryRun::NAME,
                    OutcomeStatus::DryRun,
                    &decision.action,
                    detail.clone(),
                );
                self.record_once(
                    decision,
                    id,
                    mode,
                    crate::DryRun::NAME,
                    &group,
                    State::DryRun,
                    &detail,
                    o,
                )
                .await
            }
            Plan::Propose => {
                let detail = format!(
                    "awaiting approval (policy {} is in propose mode): foresight approve {id}",
                    decision.policy
                );
                let o = outcome(
                    decision,
                    id,
                    actuator,
                    OutcomeStatus::Deferred,
                    &decision.action,
                    detail.clone(),
                );
                self.record_once(
                    decision,
                    id,
                    mode,
                    actuator,
                    &group,
                    State::Proposed,
                    &detail,
                    o,
                )
                .await
            }
            Plan::Act => {
                let mut lock = self.ledger.lock(&id).await?;
                let limits = self.limits(&group);
                let mut tx = sqlx::Connection::begin(&mut **lock.conn()).await?;
                let (stopped, usage) = self.ledger.gate(&mut tx, &group, limits.per).await?;
                let admission = plan::admit(
                    &limits,
                    &group,
                    &usage,
                    &decision.action.target,
                    stopped || self.config.stopped,
                    decision.time,
                    self.config.max_decision_age,
                );
                let (state, detail, started) = match &admission {
                    Admission::Admit => (State::Claimed, String::new(), true),
                    Admission::Defer(why) => (State::Deferred, why.clone(), false),
                };
                let deferred = matches!(admission, Admission::Defer(_)).then(|| {
                    outcome(
                        decision,
                        id,
                        actuator,
                        OutcomeStatus::Deferred,
                        &decision.action,
                        detail.clone(),
                    )
                });
                let existing = self
                    .ledger
                    .insert(
                        &mut tx,
                        NewEntry {
                            id,
                            decision,
                            mode: mode.as_str(),
                            actuator,
                            group: &group,
                            state,
                            detail: &detail,
                            started,
                            outcome: deferred.as_ref(),
                        },
                    )
                    .await?;
                tx.commit().await?;
                if let Some(existing) = existing {
                    // Seen before. We hold the lock, so if it is still in progress its session died.
                    return self.seen(existing, lock).await;
                }
                if let Some(d) = deferred {
                    lock.release().await;
                    return Ok(vec![d]);
                }
                // Claimed and committed: only now touch the target.
                self.act(decision, id, lock).await
            }
        }
    }

    /// Records a decision that needs no claim (dry run, proposal) unless it was seen before.
    #[allow(clippy::too_many_arguments)] // The row's columns.
    async fn record_once(
        &mut self,
        decision: &Decision,
        id: EventId,
        mode: crate::config::Mode,
        actuator: &str,
        group: &str,
        state: State,
        detail: &str,
        o: ActuationOutcome,
    ) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let mut conn = self.ledger.pool().acquire().await?;
        let existing = self
            .ledger
            .insert(
                &mut conn,
                NewEntry {
                    id,
                    decision,
                    mode: mode.as_str(),
                    actuator,
                    group,
                    state,
                    detail,
                    started: false,
                    outcome: Some(&o),
                },
            )
            .await?;
        drop(conn);
        match existing {
            None => Ok(vec![o]),
            Some(e) if e.state.in_progress() => {
                let lock = self.ledger.lock(&id).await?;
                self.seen(e, lock).await
            }
            Some(e) => Ok(e.outcomes),
        }
    }

    /// A decision seen before, with its lock held: its recorded outcomes, after resolving it if
    /// the session that claimed it died.
    async fn seen(
        &mut self,
        entry: Entry,
        lock: DecisionLock,
    ) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        // Re-read under the lock: the session we waited for may have finished meanwhile.
        let Some(entry) = self.ledger.get(&entry.decision_id).await? else {
            lock.release().await;
            return Ok(Vec::new());
        };
        if entry.state.in_progress() {
            let before = entry.outcomes.len();
            let all = self.resolve(entry, lock).await?;
            return Ok(all.into_iter().skip(before).collect::<Vec<_>>());
        }
        lock.release().await;
        Ok(entry.outcomes)
    }

    /// Applies a claimed decision and records what happened (the lock is held).
    async fn act(
        &mut self,
        decision: &Decision,
        id: EventId,
        mut lock: DecisionLock,
    ) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let actuator = self.actuator(decision.action.kind);
        let effect = actuator
            .apply(Request {
                decision,
                decision_id: id,
                operation: Operation::Apply,
                action: &decision.action,
                memo: None,
                stop: self.stop.clone(),
            })
            .await;
        let name = actuator.name();
        let o = outcome(
            decision,
            id,
            name,
            effect.status,
            &decision.action,
            effect.detail.clone(),
        );
        let watch = (effect.status == OutcomeStatus::Applied)
            .then(|| self.watch_for(id, decision))
            .flatten();
        let state = match effect.status {
            OutcomeStatus::Applied => State::Applied,
            OutcomeStatus::Deferred => State::Deferred,
            OutcomeStatus::Unknown => State::Unknown,
            OutcomeStatus::DryRun => State::DryRun,
            OutcomeStatus::Failed | OutcomeStatus::RolledBack => State::Failed,
        };
        self.ledger
            .update(
                lock.conn(),
                &id,
                state,
                &effect.detail,
                watch.is_none(),
                false,
                watch.as_ref().map(|w| w.until),
                effect.memo.as_ref(),
                std::slice::from_ref(&o),
            )
            .await?;
        let mut out = vec![o];
        if let Some(w) = watch {
            self.verifier.watch(w);
        }
        let roll_back_failure = effect.status == OutcomeStatus::Failed
            && decision.inverse.is_some()
            && self
                .action_config(decision.action.kind)
                .is_some_and(|a| a.rollback_on_failure);
        if roll_back_failure {
            let why = format!("the action failed ({})", effect.detail);
            out.extend(self.roll_back(id, &why, Trigger::Automatic, lock).await?);
        } else {
            lock.release().await;
        }
        Ok(out)
    }

    /// Resolves a decision whose session died between claim and outcome (the lock is held).
    async fn resolve(
        &mut self,
        entry: Entry,
        mut lock: DecisionLock,
    ) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let d = &entry.decision;
        let id = entry.decision_id;
        let actuator = self.actuator(d.action.kind);
        let rollback = entry.state == State::RollingBack;
        let (operation, action) = match (rollback, plan::undo(d)) {
            (true, Some(inverse)) => (Operation::Rollback, inverse),
            _ => (Operation::Apply, &d.action),
        };
        let checked = actuator
            .reconcile(Request {
                decision: d,
                decision_id: id,
                operation,
                action,
                memo: entry.memo.as_ref(),
                stop: self.stop.clone(),
            })
            .await;
        let what = if rollback { "rollback" } else { "action" };
        let (state, status, detail) = match (rollback, checked) {
            (false, Reconciled::Applied(why)) => (
                State::Applied,
                OutcomeStatus::Applied,
                format!(
                    "resolved after its instance stopped mid-action: the target shows it applied ({why})"
                ),
            ),
            (true, Reconciled::Applied(why)) => (
                State::RolledBack,
                OutcomeStatus::RolledBack,
                format!(
                    "resolved after its instance stopped mid-rollback: the target shows it undone ({why})"
                ),
            ),
            (false, Reconciled::NotApplied(why)) => (
                State::Failed,
                OutcomeStatus::Failed,
                format!(
                    "its instance stopped mid-action and the target shows no effect ({why}); not retried"
                ),
            ),
            (true, Reconciled::NotApplied(why)) | (_, Reconciled::Unknown(why)) => (
                State::Unknown,
                OutcomeStatus::Unknown,
                format!(
                    "its instance stopped between claim and outcome of the {what}; needs a person: {why}"
                ),
            ),
        };
        let name = actuator.name();
        let o = outcome(d, id, name, status, action, detail.clone());
        let watch = (state == State::Applied)
            .then(|| self.watch_for(id, d))
            .flatten();
        self.ledger
            .update(
                lock.conn(),
                &id,
                state,
                &detail,
                watch.is_none(),
                false,
                watch.as_ref().map(|w| w.until),
                None,
                std::slice::from_ref(&o),
            )
            .await?;
        lock.release().await;
        if let Some(w) = watch {
            self.verifier.watch(w);
        }
        tracing::warn!(decision = %id, status = status.as_str(), %detail, "Resolved an interrupted actuation.");
        let mut all = entry.outcomes;
        all.push(o);
        Ok(all)
    }

    /// Applies the decision's inverse (the lock is held) and records it.
    async fn roll_back(
        &mut self,
        id: EventId,
        why: &str,
        trigger: Trigger,
        mut lock: DecisionLock,
    ) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let mut tx = sqlx::Connection::begin(&mut **lock.conn()).await?;
        let Some(entry) = self.ledger.get_for_update(&mut tx, &id).await? else {
            return Err(ActuatorError::Refused(format!(
                "no actuation of decision {id} is recorded"
            )));
        };
        if !matches!(entry.state, State::Applied | State::Failed) {
            return Err(ActuatorError::Refused(format!(
                "decision {id} is {}: only an applied or failed action can be rolled back",
                entry.state.as_str()
            )));
        }
        let d = entry.decision.clone();
        let Some(inverse) = plan::undo(&d).cloned() else {
            return Err(ActuatorError::Refused(format!(
                "decision {id} records no inverse action: it cannot be rolled back"
            )));
        };
        if trigger == Trigger::Automatic && (self.config.stopped || self.stop.is_engaged()) {
            // The kill switch stops automatic rollbacks too; a person can still roll back.
            let note = format!(
                "rollback due ({why}) but the kill switch is engaged: roll back by hand with foresight rollback {id}"
            );
            sqlx::query("UPDATE actuations SET settled = true, detail = detail || '; ' || $2 WHERE decision_id = $1")
                .bind(id.0)
                .bind(&note)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            lock.release().await;
            self.verifier.forget(&id);
            return Ok(Vec::new());
        }
        self.ledger
            .update(
                &mut tx,
                &id,
                State::RollingBack,
                why,
                false,
                false,
                None,
                None,
                &[],
            )
            .await?;
        tx.commit().await?;
        self.verifier.forget(&id);
        let actuator = self.actuator(d.action.kind);
        let effect: Effect = actuator
            .apply(Request {
                decision: &d,
                decision_id: id,
                operation: Operation::Rollback,
                action: &inverse,
                memo: entry.memo.as_ref(),
                stop: self.stop.clone(),
            })
            .await;
        let who = match trigger {
            Trigger::Automatic => "rolled back automatically",
            Trigger::Manual => "rolled back by hand",
        };
        let (state, status, detail) = if effect.status == OutcomeStatus::Applied {
            (
                State::RolledBack,
                OutcomeStatus::RolledBack,
                format!(
                    "{who} because {why}; inverse {} on {}: {}",
                    inverse.kind.as_str(),
                    inverse.target,
                    effect.detail
                ),
            )
        } else {
            (
                State::Unknown,
                OutcomeStatus::Unknown,
                format!(
                    "{who} because {why}, but the inverse {} {}: {}; the original action may stand: needs a person",
                    inverse.kind.as_str(),
                    effect.status.as_str(),
                    effect.detail
                ),
            )
        };
        let o = outcome(&d, id, actuator.name(), status, &inverse, detail.clone());
        self.ledger
            .update(
                lock.conn(),
                &id,
                state,
                &detail,
                true,
                false,
                None,
                None,
                std::slice::from_ref(&o),
            )
            .await?;
        lock.release().await;
        Ok(vec![o])
    }

    /// Folds one score into the verification of actions on its entity; returns the outcomes
    /// of the rollbacks it triggers.
    pub async fn score(
        &mut self,
        score: &RiskScore,
    ) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let mut out = Vec::new();
        for verdict in self.verifier.score(score) {
            match verdict {
                Verdict::Held(id) => {
                    self.ledger
                        .settle(&id, &format!("verified: no sustained worsening within the window (scores up to {})", score.time.to_rfc3339()))
                        .await?;
                }
                Verdict::Worse(id, why) => {
                    let lock = self.ledger.lock(&id).await?;
                    match self
                        .roll_back(
                            id,
                            &format!("verification found the entity worse: {why}"),
                            Trigger::Automatic,
                            lock,
                        )
                        .await
                    {
                        Ok(o) => out.extend(o),
                        // Rolled back by hand meanwhile, or no inverse: nothing more to do.
                        Err(ActuatorError::Refused(reason)) => {
                            tracing::info!(decision = %id, %reason, "Verification found the entity worse; not rolled back.");
                            self.ledger.settle(&id, &format!("verification found the entity worse ({why}); not rolled back: {reason}")).await?;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(out)
    }

    /// Resolves every claim left by a crashed session and starts verifying every applied
    /// action still in its window (approved or applied by other processes too). Run at start
    /// and every `actuators.scan_interval`.
    pub async fn scan(&mut self) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let mut out = Vec::new();
        for id in self.ledger.in_progress().await? {
            let Some(lock) = self.ledger.try_lock(&id).await? else {
                continue; // A live session is acting on it.
            };
            match self.ledger.get(&id).await? {
                Some(entry) if entry.state.in_progress() => {
                    if let Some(o) = self.resolve(entry, lock).await?.pop() {
                        out.push(o);
                    }
                }
                _ => lock.release().await,
            }
        }
        for (id, decision, _) in self.ledger.verifying().await? {
            if !self.verifier.is_watching(&id)
                && let Some(w) = self.watch_for(id, &decision)
            {
                self.verifier.watch(w);
            }
        }
        Ok(out)
    }

    /// Applies a proposed decision a person approved. Refused while the kill switch is engaged
    /// or the decision's group is at its limits (it stays proposed: approve again later).
    pub async fn approve(&mut self, id: EventId) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let mut lock = self.ledger.lock(&id).await?;
        let mut tx = sqlx::Connection::begin(&mut **lock.conn()).await?;
        let Some(entry) = self.ledger.get_for_update(&mut tx, &id).await? else {
            return Err(ActuatorError::Refused(format!(
                "decision {id} has not been seen by the actuators"
            )));
        };
        if entry.state != State::Proposed {
            return Err(ActuatorError::Refused(format!(
                "decision {id} is {}, not awaiting approval",
                entry.state.as_str()
            )));
        }
        let d = entry.decision;
        let group = plan::group_of(&self.config, d.action.kind).to_owned();
        let limits = self.limits(&group);
        let (stopped, usage) = self.ledger.gate(&mut tx, &group, limits.per).await?;
        // A person approving now makes the decision current: no staleness limit.
        let admission = plan::admit(
            &limits,
            &group,
            &usage,
            &d.action.target,
            stopped || self.config.stopped,
            usage.now,
            std::time::Duration::MAX,
        );
        if let Admission::Defer(why) = admission {
            return Err(ActuatorError::Refused(format!(
                "not applied, still awaiting approval: {why}"
            )));
        }
        if matches!(self.actuator(d.action.kind), AnyActuator::DryRun) {
            return Err(ActuatorError::Refused(format!(
                "action type {} has no actuator configured any more",
                d.action.kind.as_str()
            )));
        }
        self.ledger
            .update(
                &mut tx,
                &id,
                State::Claimed,
                "approved",
                false,
                true,
                None,
                None,
                &[],
            )
            .await?;
        tx.commit().await?;
        self.act(&d, id, lock).await
    }

    /// Rolls back an applied (or failed) action by hand.
    pub async fn rollback(
        &mut self,
        id: EventId,
        reason: &str,
    ) -> Result<Vec<ActuationOutcome>, ActuatorError> {
        let lock = self.ledger.lock(&id).await?;
        self.roll_back(id, reason, Trigger::Manual, lock).await
    }

    /// The database's clock (for the live stage's logs and the CLI).
    pub async fn now(&self) -> Result<DateTime<Utc>, ActuatorError> {
        Ok(sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(self.ledger.pool())
            .await?)
    }
}
