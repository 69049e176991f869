//! The decision logic, pure and deterministic: what to do with a decision (mode gate), whether a
//! group's limits admit one more action, how an applied action is judged from later scores, and
//! which action undoes it. No clock, no IO: the engine passes in what it read.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use foresight_events::{Action, ActionKind, Decision, EntityId, EventId, RiskScore};

use crate::config::{ActuatorsConfig, DEFAULT_GROUP, GroupLimits, Mode, VerificationConfig};

/// What the mode gate says to do with a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Record a dry-run outcome and change nothing; the text says why.
    DryRun(String),
    /// Wait for approval.
    Propose,
    /// Apply now (if the limits admit it).
    Act,
}

/// The mode gate: shadow policies, dry-run actuators and actions with nothing to change give a
/// dry run; otherwise the policy's mode decides.
pub fn plan(decision: &Decision, config: &ActuatorsConfig) -> Plan {
    let mode = config.mode(&decision.policy);
    let kind = decision.action.kind;
    if matches!(kind, ActionKind::Monitor | ActionKind::NoOp) {
        return Plan::DryRun(format!("{} changes nothing", kind.as_str()));
    }
    let dry_actuator = config
        .actions
        .get(&kind)
        .is_none_or(|a| matches!(a.actuator, crate::config::ActuatorConfig::DryRun));
    match mode {
        Mode::Shadow => Plan::DryRun(format!("policy {} is in shadow mode", decision.policy)),
        _ if dry_actuator => Plan::DryRun(format!(
            "action type {} has no actuator configured (dry-run)",
            kind.as_str()
        )),
        Mode::Propose => Plan::Propose,
        Mode::Auto => Plan::Act,
    }
}

/// The group an action type counts against.
pub fn group_of(config: &ActuatorsConfig, kind: ActionKind) -> &str {
    config
        .actions
        .get(&kind)
        .map_or(DEFAULT_GROUP, |a| a.group.as_str())
}

/// What the ledger counted for a group, at the database's time `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The database's clock when counting.
    pub now: DateTime<Utc>,
    /// Start times of the group's actions within the last `per`, oldest first.
    pub recent_starts: Vec<DateTime<Utc>>,
    /// Distinct targets with an unsettled action of the group.
    pub open_targets: Vec<EntityId>,
}

/// Whether a group's limits admit one more action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Admit,
    /// Not now; the reason, for the outcome.
    Defer(String),
}

/// The gates in order: kill switch, staleness, rate limit, blast-radius cap.
pub fn admit(
    limits: &GroupLimits,
    group: &str,
    usage: &Usage,
    target: &EntityId,
    stopped: bool,
    decision_time: DateTime<Utc>,
    max_age: std::time::Duration,
) -> Admission {
    if stopped {
        return Admission::Defer("the kill switch is engaged: actuation is stopped".into());
    }
    let age = usage.now.signed_duration_since(decision_time);
    if age.to_std().is_ok_and(|a| a > max_age) {
        return Admission::Defer(format!(
            "stale: the decision is {}s old, older than actuators.max_decision_age ({}s)",
            age.num_seconds(),
            max_age.as_secs()
        ));
    }
    let recent = usage.recent_starts.len();
    if recent >= limits.max_actions as usize {
        // The oldest action in the window frees a slot when it leaves it.
        let free_at = usage
            .recent_starts
            .first()
            .map(|t| *t + chrono::Duration::from_std(limits.per).unwrap_or_default());
        let when = free_at.map_or_else(String::new, |t| {
            format!("; the next slot frees at {}", t.to_rfc3339())
        });
        return Admission::Defer(format!(
            "rate limit of group {group}: {recent} actions in the last {}s (limit {}){when}",
            limits.per.as_secs(),
            limits.max_actions
        ));
    }
    let open = &usage.open_targets;
    if !open.contains(target) && open.len() >= limits.max_targets as usize {
        return Admission::Defer(format!(
            "blast-radius cap of group {group}: {} targets already have unsettled actions (cap {})",
            open.len(),
            limits.max_targets
        ));
    }
    Admission::Admit
}

/// The action that undoes a decision's action: the decision's recorded inverse.
pub fn undo(decision: &Decision) -> Option<&Action> {
    decision.inverse.as_ref()
}

/// One applied action being judged.
#[derive(Debug, Clone, PartialEq)]
pub struct Watch {
    /// The decision.
    pub decision_id: EventId,
    /// Whose scores judge it.
    pub entity: EntityId,
    /// The decision's probability: the baseline.
    pub baseline: f64,
    /// End of the window (event time).
    pub until: DateTime<Utc>,
    /// How much worse counts.
    pub margin: f64,
    /// In how many consecutive scores.
    pub sustained: u32,
    /// Consecutive worse scores so far.
    pub worse_run: u32,
    /// Time of the latest score counted: a redelivered score is not counted twice.
    pub last_seen: Option<DateTime<Utc>>,
}

impl Watch {
    /// A watch over `decision`'s entity, per `v`.
    pub fn new(decision_id: EventId, decision: &Decision, v: &VerificationConfig) -> Self {
        Self {
            decision_id,
            entity: decision.entity.clone(),
            baseline: decision.probability,
            until: decision.time + chrono::Duration::from_std(v.window).unwrap_or_default(),
            margin: v.margin,
            sustained: v.sustained,
            worse_run: 0,
            last_seen: None,
        }
    }
}

/// The judgement of an applied action.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The window passed without the entity getting worse.
    Held(EventId),
    /// The entity got worse; the text says how. Roll back.
    Worse(EventId, String),
}

/// The applied actions being judged, by decision; fed the scores in event time.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    watches: BTreeMap<EventId, Watch>,
    /// Latest score time seen over all entities: windows of entities that fall silent close
    /// when this passes their end.
    watermark: Option<DateTime<Utc>>,
}

impl Verifier {
    /// Starts (or keeps) watching.
    pub fn watch(&mut self, w: Watch) {
        self.watches.entry(w.decision_id).or_insert(w);
    }

    /// Stops watching (settled elsewhere, e.g. rolled back by hand).
    pub fn forget(&mut self, id: &EventId) {
        self.watches.remove(id);
    }

    /// Whether any action on `entity` is being judged.
    pub fn watches_entity(&self, entity: &str) -> bool {
        self.watches.values().any(|w| w.entity.as_str() == entity)
    }

    /// Whether the decision is being judged.
    pub fn is_watching(&self, id: &EventId) -> bool {
        self.watches.contains_key(id)
    }

    /// Folds one score in; returns the verdicts it settles, in decision-id order.
    pub fn score(&mut self, score: &RiskScore) -> Vec<Verdict> {
        let mut verdicts = Vec::new();
        for w in self.watches.values_mut() {
            if w.entity != score.entity || w.last_seen.is_some_and(|t| score.time <= t) {
                continue;
            }
            if score.time > w.until {
                continue; // Past the window: settled by the watermark below.
            }
            w.last_seen = Some(score.time);
            if score.probability > w.baseline + w.margin {
                w.worse_run += 1;
            } else {
                w.worse_run = 0;
            }
            if w.worse_run >= w.sustained {
                verdicts.push(Verdict::Worse(
                    w.decision_id,
                    format!(
                        "{} consecutive scores above the decision's probability {:.3} + margin {:.3} (latest {:.3} at {})",
                        w.worse_run,
                        w.baseline,
                        w.margin,
                        score.probability,
                        score.time.to_rfc3339()
                    ),
                ));
            }
        }
        for v in &verdicts {
            if let Verdict::Worse(id, _) = v {
                self.watches.remove(id);
            }
        }
        if self.watermark.is_none_or(|t| score.time > t) {
            self.watermark = Some(score.time);
        }
        verdicts.extend(self.close());
        verdicts
    }

    /// Settles every watch whose window the watermark has passed.
    fn close(&mut self) -> Vec<Verdict> {
        let Some(mark) = self.watermark else {
            return Vec::new();
        };
        let done: Vec<EventId> = self
            .watches
            .values()
            .filter(|w| w.until < mark)
            .map(|w| w.decision_id)
            .collect();
        done.into_iter()
            .map(|id| {
                self.watches.remove(&id);
                Verdict::Held(id)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::TimeZone;
    use foresight_events::{Band, EventData};

    use super::*;
    use crate::config::{ActionConfig, ActuatorConfig, CommandConfig};

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0).unwrap()
    }

    pub(crate) fn decision(policy: &str, kind: ActionKind) -> Decision {
        let target = EntityId::new("node-1").unwrap();
        Decision {
            entity: target.clone(),
            time: t(0),
            score_id: EventId::derive("s", &[]),
            probability: 0.5,
            interval: [0.4, 0.6],
            band: Band::High,
            policy: policy.into(),
            rule: "r".into(),
            action: Action {
                kind,
                target: target.clone(),
                params: Default::default(),
            },
            reason: "x".into(),
            expected_effect: "y".into(),
            inverse: None,
            alternatives: vec![],
        }
    }

    fn command_for(c: &mut ActuatorsConfig, kind: ActionKind) {
        c.actions.insert(
            kind,
            ActionConfig {
                actuator: ActuatorConfig::Command(CommandConfig {
                    program: "/bin/true".into(),
                    args: vec![],
                    timeout: Duration::from_secs(1),
                    max_output: 10,
                    env: Default::default(),
                }),
                group: "default".into(),
                verification: Default::default(),
                rollback_on_failure: true,
            },
        );
    }

    #[test]
    fn the_mode_gate() {
        let mut c = ActuatorsConfig::default();
        let d = decision("p", ActionKind::Migrate);
        assert!(matches!(plan(&d, &c), Plan::DryRun(r) if r.contains("shadow")));
        c.policies.insert("p".into(), Mode::Auto);
        assert!(matches!(plan(&d, &c), Plan::DryRun(r) if r.contains("no actuator")));
        command_for(&mut c, ActionKind::Migrate);
        assert_eq!(plan(&d, &c), Plan::Act);
        c.policies.insert("p".into(), Mode::Propose);
        assert_eq!(plan(&d, &c), Plan::Propose);
        command_for(&mut c, ActionKind::Monitor);
        assert!(matches!(
            plan(&decision("p", ActionKind::Monitor), &c),
            Plan::DryRun(_)
        ));
    }

    fn usage(starts: &[i64], open: &[&str]) -> Usage {
        Usage {
            now: t(100),
            recent_starts: starts.iter().map(|s| t(*s)).collect(),
            open_targets: open.iter().map(|e| EntityId::new(*e).unwrap()).collect(),
        }
    }

    #[test]
    fn limits_in_order() {
        let limits = GroupLimits {
            max_actions: 2,
            per: Duration::from_secs(60),
            max_targets: 1,
        };
        let target = EntityId::new("a").unwrap();
        let age = Duration::from_secs(60);
        let go = |u: &Usage, stopped, time| admit(&limits, "g", u, &target, stopped, time, age);
        assert_eq!(go(&usage(&[], &[]), false, t(90)), Admission::Admit);
        assert!(
            matches!(go(&usage(&[], &[]), true, t(90)), Admission::Defer(r) if r.contains("kill switch"))
        );
        assert!(
            matches!(go(&usage(&[], &[]), false, t(0)), Admission::Defer(r) if r.contains("stale"))
        );
        let full = go(&usage(&[50, 70], &[]), false, t(90));
        assert!(
            matches!(&full, Admission::Defer(r) if r.contains("rate limit") && r.contains(&t(110).to_rfc3339())),
            "{full:?}"
        );
        assert_eq!(go(&usage(&[50], &["a"]), false, t(90)), Admission::Admit);
        assert!(
            matches!(go(&usage(&[50], &["b"]), false, t(90)), Admission::Defer(r) if r.contains("blast-radius"))
        );
    }

    /// A score from its JSON (new optional fields of the shared type need no change here).
    fn score(entity: &str, s: i64, p: f64) -> RiskScore {
        serde_json::from_value(serde_json::json!({
            "entity": entity,
            "time": t(s),
            "window_id": EventId::derive("w", &[&s.to_le_bytes()]),
            "horizon_seconds": 3600,
            "probability": p,
            "lower": p,
            "upper": p,
            "health": 100.0 * (1.0 - p),
            "band": "low",
            "contributors": [],
            "method": "prior",
            "model_version": "m",
        }))
        .unwrap()
    }

    #[test]
    fn sustained_worsening_rolls_back_and_a_quiet_window_holds() {
        let d = decision("p", ActionKind::Migrate);
        let v = VerificationConfig {
            window: Duration::from_secs(600),
            margin: 0.1,
            sustained: 2,
        };
        let mut verifier = Verifier::default();
        verifier.watch(Watch::new(d.id(), &d, &v));
        assert!(verifier.score(&score("node-1", 60, 0.9)).is_empty());
        // A redelivered score does not count twice.
        assert!(verifier.score(&score("node-1", 60, 0.9)).is_empty());
        assert!(verifier.score(&score("node-1", 120, 0.55)).is_empty()); // Within margin: run resets.
        assert!(verifier.score(&score("other", 130, 0.99)).is_empty());
        assert!(verifier.score(&score("node-1", 180, 0.7)).is_empty());
        let v2 = verifier.score(&score("node-1", 240, 0.8));
        assert!(
            matches!(&v2[..], [Verdict::Worse(id, why)] if *id == d.id() && why.contains("2 consecutive"))
        );
        assert!(!verifier.is_watching(&d.id()));

        let mut verifier = Verifier::default();
        verifier.watch(Watch::new(d.id(), &d, &v));
        assert!(verifier.score(&score("node-1", 300, 0.5)).is_empty());
        // Another entity's score moves the watermark past the window.
        assert_eq!(
            verifier.score(&score("other", 601, 0.1)),
            vec![Verdict::Held(d.id())]
        );
    }
}
