//! Foresight allocator: rules that turn risk scores into decisions.
//!
//! Rules are tried in order; the first whose condition holds and whose entity is not cooling down
//! fires. Cool-downs run on event time, so the same scores give the same decisions live and in
//! replay. A score older than the newest one already seen for its entity is stale and never acted on.
//!
//! ```
//! use foresight_allocator::{Allocator, AllocatorConfig};
//! use foresight_events::{Band, EntityId, Origin, Output, Processor, RiskScore, ScoreMethod, EventId};
//! use chrono::{DateTime, Utc};
//!
//! let mut allocator = Allocator::new(AllocatorConfig::default()).unwrap();
//! let score = RiskScore {
//!     entity: EntityId::new("node-1").unwrap(),
//!     time: DateTime::<Utc>::from_timestamp(600, 0).unwrap(),
//!     window_id: EventId::derive("example", &[]),
//!     horizon_seconds: 1800, probability: 0.93, lower: 0.88, upper: 0.97,
//!     time_to_failure_seconds: Some(600), health: 7.0, band: Band::High,
//!     contributors: vec![], method: ScoreMethod::Prior, model_version: "prior".into(),
//! };
//! let mut out = Vec::new();
//! allocator.process(score, Origin { input: 0, partition: 0, offset: 0 }, &mut out);
//! let Output::Event(decision) = &out[0] else { panic!() };
//! assert_eq!(decision.rule, "migrate-high-risk");
//! ```

use std::{collections::BTreeMap, collections::HashMap, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use foresight_events::{
    Action, ActionKind, Alternative, Band, Decision, EntityId, EventData, Origin, Output,
    Processor, RiskScore,
};
use serde::{Deserialize, Serialize};

/// One rule: when a score meets the condition, take the action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name, recorded in every decision the rule makes.
    pub name: String,
    /// Fires for scores in this band or above.
    pub min_band: Band,
    /// And (optionally) at least this probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_probability: Option<f64>,
    /// What to do.
    pub action: ActionKind,
    /// Parameters of the action.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// After firing for an entity, the rule stays quiet for that entity this long (event time).
    #[serde(with = "humantime_serde", default = "default_cooldown")]
    pub cooldown: Duration,
}

fn default_cooldown() -> Duration {
    Duration::from_secs(30 * 60)
}

/// Allocator configuration: one policy of ordered rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocatorConfig {
    /// Name of the policy, recorded in every decision.
    pub policy: String,
    /// Rules, tried in order.
    pub rules: Vec<Rule>,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        Self {
            policy: "default".into(),
            rules: vec![
                Rule {
                    name: "migrate-high-risk".into(),
                    min_band: Band::High,
                    min_probability: None,
                    action: ActionKind::Migrate,
                    params: BTreeMap::new(),
                    cooldown: default_cooldown(),
                },
                Rule {
                    name: "reserve-buffer-moderate-risk".into(),
                    min_band: Band::Moderate,
                    min_probability: None,
                    action: ActionKind::ReserveBuffer,
                    params: BTreeMap::new(),
                    cooldown: default_cooldown(),
                },
            ],
        }
    }
}

/// An invalid allocator configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AllocatorConfigError {
    /// Rule names identify decisions, so they must be unique and non-empty.
    #[error("allocator.rules[{0}]: name {1:?} is empty or used twice")]
    RuleName(usize, String),
    /// Probabilities are in [0, 1].
    #[error("allocator.rules[{0}] ({1}): min_probability must be within [0, 1]")]
    Probability(usize, String),
    /// The policy needs a name.
    #[error("allocator.policy must not be empty")]
    PolicyName,
}

impl AllocatorConfig {
    /// Checks the configuration, reporting every problem.
    pub fn validate(&self) -> Vec<AllocatorConfigError> {
        let mut errors = Vec::new();
        if self.policy.trim().is_empty() {
            errors.push(AllocatorConfigError::PolicyName);
        }
        let mut seen = std::collections::HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.name.trim().is_empty() || !seen.insert(rule.name.as_str()) {
                errors.push(AllocatorConfigError::RuleName(i, rule.name.clone()));
            }
            if rule
                .min_probability
                .is_some_and(|p| !(0.0..=1.0).contains(&p))
            {
                errors.push(AllocatorConfigError::Probability(i, rule.name.clone()));
            }
        }
        errors
    }
}

/// The inverse of an action, for rollback; `None` for actions with nothing to undo.
pub fn inverse(action: &Action) -> Option<Action> {
    let kind = match action.kind {
        ActionKind::ScaleUp => ActionKind::ScaleBack,
        ActionKind::ScaleBack => ActionKind::ScaleUp,
        ActionKind::Monitor | ActionKind::NoOp => return None,
        other => other,
    };
    let mut params = action.params.clone();
    params.insert(
        "revert".into(),
        serde_json::Value::String(action.kind.as_str().into()),
    );
    Some(Action {
        kind,
        target: action.target.clone(),
        params,
    })
}

fn expected_effect(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::Migrate => "work moves off the at-risk entity before it fails",
        ActionKind::ScaleUp => "added capacity absorbs the loss of the at-risk entity",
        ActionKind::ScaleBack => "less load on the at-risk entity slows its degradation",
        ActionKind::ReserveBuffer => {
            "healthy nodes keep room to take over the at-risk entity's work"
        }
        ActionKind::PreProvisionStandby => "a standby is ready to take over if the entity fails",
        ActionKind::TransferState => "the standby holds current state",
        ActionKind::RegisterTrafficSwitch => "traffic can switch to the standby at once",
        ActionKind::SwitchTraffic => "traffic is served by the standby",
        ActionKind::SwapVirtual => "a virtual component takes the failing one's place",
        ActionKind::ScheduleRepair => "the component is repaired or replaced before it fails",
        ActionKind::AdjustBandwidth => "I/O pressure on the at-risk entity drops",
        ActionKind::RaiseLimits => "future executions get the resources they lacked",
        ActionKind::PrioritiseQueue => "the failing code's requests are served first",
        ActionKind::Evict => "lower-priority work frees room for critical work",
        ActionKind::Monitor => "the entity is watched more closely",
        ActionKind::NoOp => "nothing changes",
    }
}

/// The rule-based allocator: [`RiskScore`] in, [`Decision`] out.
#[derive(Debug)]
pub struct Allocator {
    config: AllocatorConfig,
    /// Newest score time per entity: older scores are stale.
    newest: HashMap<EntityId, DateTime<Utc>>,
    /// When each (entity, rule) last fired.
    fired: HashMap<(EntityId, usize), DateTime<Utc>>,
}

impl Allocator {
    /// An allocator with the given policy.
    pub fn new(config: AllocatorConfig) -> Result<Self, Vec<AllocatorConfigError>> {
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            config,
            newest: HashMap::new(),
            fired: HashMap::new(),
        })
    }

    fn matches(rule: &Rule, score: &RiskScore) -> bool {
        score.band >= rule.min_band && rule.min_probability.is_none_or(|p| score.probability >= p)
    }
}

impl Processor for Allocator {
    type Input = RiskScore;
    type Output = Decision;

    fn process(&mut self, score: RiskScore, _origin: Origin, out: &mut Vec<Output<Decision>>) {
        let newest = self
            .newest
            .entry(score.entity.clone())
            .or_insert(score.time);
        if score.time < *newest {
            return; // Stale: a newer score of this entity has been seen.
        }
        *newest = score.time;

        let mut chosen = None;
        let mut alternatives = Vec::new();
        for (i, rule) in self.config.rules.iter().enumerate() {
            if !Self::matches(rule, &score) {
                continue;
            }
            let action = Action {
                kind: rule.action,
                target: score.entity.clone(),
                params: rule.params.clone(),
            };
            let cooling = self
                .fired
                .get(&(score.entity.clone(), i))
                .is_some_and(|last| {
                    score.time - *last
                        < TimeDelta::from_std(rule.cooldown).unwrap_or(TimeDelta::MAX)
                });
            match (&chosen, cooling) {
                (None, false) => chosen = Some((i, action)),
                (None, true) => alternatives.push(Alternative {
                    action,
                    rejected_because: format!(
                        "rule {} fired for this entity less than {} ago",
                        rule.name,
                        humantime::format_duration(rule.cooldown)
                    ),
                }),
                (Some((winner, _)), _) => alternatives.push(Alternative {
                    action,
                    rejected_because: format!(
                        "rule {} comes first in policy {}",
                        self.config.rules[*winner].name, self.config.policy
                    ),
                }),
            }
        }
        let Some((i, action)) = chosen else {
            return;
        };
        let rule = &self.config.rules[i];
        self.fired.insert((score.entity.clone(), i), score.time);
        let reason = format!(
            "{} risk: P(failure within {}) = {:.3} [{:.3}, {:.3}]{}; rule {} requires band >= {}{}",
            score.band.as_str(),
            humantime::format_duration(Duration::from_secs(score.horizon_seconds)),
            score.probability,
            score.lower,
            score.upper,
            score
                .contributors
                .first()
                .map(|c| format!(" ({})", c.detail))
                .unwrap_or_default(),
            rule.name,
            rule.min_band.as_str(),
            rule.min_probability
                .map(|p| format!(" and P >= {p}"))
                .unwrap_or_default(),
        );
        out.push(Output::Event(Decision {
            entity: score.entity.clone(),
            time: score.time,
            score_id: score.id(),
            probability: score.probability,
            interval: [score.lower, score.upper],
            band: score.band,
            policy: self.config.policy.clone(),
            rule: rule.name.clone(),
            inverse: inverse(&action),
            expected_effect: expected_effect(action.kind).into(),
            action,
            reason,
            alternatives,
        }));
    }
}

#[cfg(test)]
mod tests {
    use foresight_events::{EventId, ScoreMethod};

    use super::*;

    fn score(entity: &str, minute: i64, p: f64) -> RiskScore {
        let bands = |p: f64| {
            if p >= 0.7 {
                Band::High
            } else if p >= 0.3 {
                Band::Moderate
            } else {
                Band::Low
            }
        };
        RiskScore {
            entity: EntityId::new(entity).unwrap(),
            time: DateTime::from_timestamp(minute * 60, 0).unwrap(),
            window_id: EventId::derive("w", &[entity.as_bytes(), &minute.to_le_bytes()]),
            horizon_seconds: 1800,
            probability: p,
            lower: p,
            upper: p,
            time_to_failure_seconds: None,
            health: 100.0 * (1.0 - p),
            band: bands(p),
            contributors: vec![],
            method: ScoreMethod::Prior,
            model_version: "t".into(),
        }
    }

    fn decide(a: &mut Allocator, s: RiskScore) -> Option<Decision> {
        let mut out = Vec::new();
        a.process(
            s,
            Origin {
                input: 0,
                partition: 0,
                offset: 0,
            },
            &mut out,
        );
        out.into_iter().find_map(|o| match o {
            Output::Event(d) => Some(d),
            Output::Rejected(_) => None,
        })
    }

    #[test]
    fn first_matching_rule_wins_and_others_are_explained() {
        let mut a = Allocator::new(AllocatorConfig::default()).unwrap();
        let d = decide(&mut a, score("n", 0, 0.9)).unwrap();
        assert_eq!(d.action.kind, ActionKind::Migrate);
        assert_eq!(d.alternatives.len(), 1);
        assert_eq!(d.alternatives[0].action.kind, ActionKind::ReserveBuffer);
        assert!(d.inverse.is_some());
        assert!(
            decide(&mut a, score("n", 1, 0.1)).is_none(),
            "low risk: nothing to do"
        );
    }

    #[test]
    fn cooldown_and_staleness_hold_back_repeats() {
        let mut a = Allocator::new(AllocatorConfig::default()).unwrap();
        assert!(decide(&mut a, score("n", 0, 0.9)).is_some());
        // Within the cool-down the high rule is quiet; the moderate rule may still act.
        let d = decide(&mut a, score("n", 5, 0.9)).unwrap();
        assert_eq!(d.action.kind, ActionKind::ReserveBuffer);
        assert!(decide(&mut a, score("n", 10, 0.9)).is_none());
        assert!(decide(&mut a, score("n", 3, 0.95)).is_none(), "stale score");
        assert!(
            decide(&mut a, score("n", 31, 0.9)).is_some(),
            "cool-down over"
        );
    }

    #[test]
    fn same_scores_same_decisions() {
        let run = || {
            let mut a = Allocator::new(AllocatorConfig::default()).unwrap();
            (0..50)
                .filter_map(|m| decide(&mut a, score("n", m, (m as f64 / 50.0).min(1.0))))
                .map(|d| (d.id(), d))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn duplicate_rule_names_are_refused() {
        let mut cfg = AllocatorConfig::default();
        cfg.rules[1].name = cfg.rules[0].name.clone();
        cfg.rules[1].min_probability = Some(2.0);
        assert_eq!(Allocator::new(cfg).unwrap_err().len(), 2);
    }
}
