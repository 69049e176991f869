//! Policies: what to do about risk, declared in YAML.
//!
//! A policy is a list of rules tried in order; each has a CEL condition (`when`) and actions.
//! Around the rules sit the safety settings the allocator enforces whatever the rules say:
//! staleness, hysteresis bands, cool-downs, velocity limits, eviction and traffic-switch guards.

use std::{collections::BTreeMap, time::Duration};

use foresight_events::ActionKind;
use serde::{Deserialize, Serialize};

use crate::expr::{self, Condition};

/// A policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Name, recorded in every decision.
    pub name: String,
    /// What the policy is for, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// A score older than this behind the newest event time the allocator has decided (the
    /// newest round; scores read ahead into rounds still open do not count) is stale and never
    /// acted on.
    #[serde(with = "humantime_serde", default = "default_stale_after")]
    pub stale_after: Duration,
    /// Bands with hysteresis, exposed to conditions as `band`.
    #[serde(default)]
    pub bands: Bands,
    /// After a decision about an entity, rules at or below the one that fired stay quiet for
    /// that entity this long (event time); an earlier rule (an escalation) may still fire.
    #[serde(with = "humantime_serde", default = "default_cooldown")]
    pub cooldown: Duration,
    /// After reporting that it could not act (no room), the allocator tries again this much
    /// later (event time).
    #[serde(with = "humantime_serde", default = "default_retry_after")]
    pub retry_after: Duration,
    /// How much more a score counts in the round's ranking when its entity is critical (a
    /// critical workload, or a node running one).
    #[serde(default = "default_criticality_weight")]
    pub criticality_weight: f64,
    /// How many actions may run at once and how fast they may start.
    #[serde(default)]
    pub limits: Limits,
    /// Where work may be placed.
    #[serde(default)]
    pub placement: Placement,
    /// Whether and when lower-priority work may be evicted for higher-priority work.
    #[serde(default)]
    pub eviction: Eviction,
    /// When traffic may be switched to a standby.
    #[serde(default)]
    pub switch: Switch,
    /// A randomised hold-out of at-risk entities on which no action is taken, for unbiased
    /// evaluation of the failure model (off by default).
    #[serde(default)]
    pub holdout: Holdout,
    /// Rules, tried in order: the first whose condition holds decides.
    pub rules: Vec<Rule>,
}

fn default_stale_after() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_retry_after() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_criticality_weight() -> f64 {
    2.0
}

/// Risk bands with hysteresis: an entity enters a band when its probability reaches the band's
/// threshold and leaves it only when its probability falls `margin` below it, so a score
/// hovering at a threshold does not flap between rules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bands {
    /// Probability at which an entity enters the moderate band.
    pub moderate: f64,
    /// Probability at which an entity enters the high band.
    pub high: f64,
    /// How far below a threshold the probability must fall to leave the band.
    pub margin: f64,
}

impl Default for Bands {
    fn default() -> Self {
        Self {
            moderate: 0.3,
            high: 0.7,
            margin: 0.05,
        }
    }
}

/// Velocity limits. Actions are counted on event time: an action is in flight for
/// `action_duration` after its decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most actions in flight at once.
    pub max_concurrent: u32,
    /// Most actions started within any minute.
    pub per_minute: u32,
    /// Most actions in flight at once within one group (a node's group or zone).
    pub group_max_concurrent: u32,
    /// Most actions started within any minute within one group.
    pub group_per_minute: u32,
    /// How long an action counts as in flight.
    #[serde(with = "humantime_serde")]
    pub action_duration: Duration,
    /// Most "could not act" reports (deferred by a limit, no room) per round; beyond it the
    /// entities wait silently for the next round.
    pub max_reports_per_round: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent: 50,
            per_minute: 100,
            group_max_concurrent: 20,
            group_per_minute: 40,
            action_duration: Duration::from_secs(10 * 60),
            max_reports_per_round: 100,
        }
    }
}

/// Placement settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Placement {
    /// Nodes whose latest probability of failure is above this never receive work, buffers or
    /// standbys.
    pub max_target_risk: f64,
    /// Reserved buffers are released after this long (event time).
    #[serde(with = "humantime_serde")]
    pub buffer_ttl: Duration,
}

impl Default for Placement {
    fn default() -> Self {
        Self {
            max_target_risk: 0.3,
            buffer_ttl: Duration::from_secs(3600),
        }
    }
}

/// Eviction settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Eviction {
    /// Whether lower-priority work may be evicted when there is no room.
    pub allowed: bool,
    /// A victim's priority must be at least this much below the beneficiary's.
    pub min_priority_gap: u32,
    /// And the beneficiary's score priority (probability x impact) at least this.
    pub min_score_priority: f64,
}

impl Default for Eviction {
    fn default() -> Self {
        Self {
            allowed: false,
            min_priority_gap: 1,
            min_score_priority: 0.5,
        }
    }
}

/// Traffic-switch guard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Switch {
    /// Without a confirmed failure, traffic switches only when the lower bound of the score's
    /// interval is at least this (very high confidence).
    pub min_lower_bound: f64,
}

/// The randomised hold-out: a rule that fires for an entity in it decides `no_op` instead, with
/// the actions it would have taken as alternatives and the propensity in the decision's
/// parameters (`holdout: true`, `propensity`). Mitigation hides failures: an acted-on entity that
/// did not fail may have been saved or may never have been at risk. Outcomes of the held-out
/// entities are what the risk really led to, so precision measured on them is unbiased (divide by
/// the propensity to weigh them up to the whole fleet).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Holdout {
    /// Share of at-risk entities held out, in [0, 1); 0 turns it off.
    pub share: f64,
    /// An entity is in or out of the hold-out for this long (event time), so one incident is
    /// either acted on throughout or not at all. The draw is a hash of the entity and the
    /// period: deterministic, so replays hold out the same entities.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
}

impl Default for Holdout {
    fn default() -> Self {
        Self {
            share: 0.0,
            period: Duration::from_secs(24 * 3600),
        }
    }
}

impl Holdout {
    /// Whether `entity` is held out at `time`.
    pub fn holds_out(
        &self,
        entity: &foresight_events::EntityId,
        time: chrono::DateTime<chrono::Utc>,
    ) -> bool {
        if self.share <= 0.0 {
            return false;
        }
        let period = self.period.as_secs().max(1) as i64;
        let slot = time.timestamp().div_euclid(period);
        let id = foresight_events::EventId::derive(
            "holdout",
            &[entity.as_str().as_bytes(), &slot.to_le_bytes()],
        );
        let bits = u64::from_be_bytes(id.as_bytes()[..8].try_into().expect("8 bytes"));
        (bits as f64 / u64::MAX as f64) < self.share
    }
}

impl Default for Switch {
    fn default() -> Self {
        Self {
            min_lower_bound: 0.97,
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name, recorded in every decision the rule makes.
    pub name: String,
    /// CEL condition over `score`, `band`, `entity`, `deps`, `dependants`, `pool` and `round`.
    pub when: String,
    /// `all`: carry out every action (each that can be); `first`: the first that can be.
    #[serde(default)]
    pub mode: Mode,
    /// What to do.
    pub actions: Vec<ActionSpec>,
}

/// How a rule's actions combine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every action that can be carried out.
    #[default]
    All,
    /// The first action that can be carried out; the others are alternatives.
    First,
}

/// An action of a rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// What to do.
    pub kind: ActionKind,
    /// Its parameters (see docs/configuration.md for each kind's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// A problem in a policy, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct PolicyError {
    /// Where: a key path such as `rules[2].when`, with the line and column when known.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

impl PolicyError {
    fn at(location: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            location: location.into(),
            message: message.into(),
        }
    }
}

impl Policy {
    /// Parses a policy from YAML and validates it, reporting every problem.
    pub fn from_yaml(text: &str) -> Result<Self, Vec<PolicyError>> {
        let policy: Policy = serde_yaml_ng::from_str(text).map_err(|e| {
            let location = match e.location() {
                Some(l) => format!("line {}, column {}", l.line(), l.column()),
                None => "policy".into(),
            };
            vec![PolicyError::at(location, e.to_string())]
        })?;
        let errors = policy.validate();
        if errors.is_empty() {
            Ok(policy)
        } else {
            // Point at the line of the rule each error is about.
            Err(errors
                .into_iter()
                .map(|mut e| {
                    if let Some(line) = rule_line(text, &policy, &e.location) {
                        e.location = format!("{} (line {line})", e.location);
                    }
                    e
                })
                .collect())
        }
    }

    /// Checks the policy, reporting every problem.
    pub fn validate(&self) -> Vec<PolicyError> {
        self.compile().err().unwrap_or_default()
    }

    pub(crate) fn compile(&self) -> Result<Vec<Condition>, Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut bad = |loc: &str, msg: String| errors.push(PolicyError::at(loc, msg));
        if self.name.trim().is_empty() {
            bad("name", "must not be empty".into());
        }
        let b = &self.bands;
        if !(0.0 < b.moderate && b.moderate < b.high && b.high <= 1.0) {
            bad(
                "bands",
                format!(
                    "need 0 < moderate < high <= 1, got moderate {} and high {}",
                    b.moderate, b.high
                ),
            );
        }
        if !(0.0..b.moderate.max(0.0)).contains(&b.margin) && b.margin != 0.0 {
            bad(
                "bands.margin",
                "must be at least 0 and below moderate".into(),
            );
        }
        if !(self.criticality_weight.is_finite() && self.criticality_weight >= 1.0) {
            bad("criticality_weight", "must be at least 1".into());
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_concurrent", l.max_concurrent),
            ("limits.per_minute", l.per_minute),
            ("limits.group_max_concurrent", l.group_max_concurrent),
            ("limits.group_per_minute", l.group_per_minute),
        ] {
            if v == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        if l.action_duration.is_zero() {
            bad("limits.action_duration", "must be positive".into());
        }
        for (key, v) in [
            ("placement.max_target_risk", self.placement.max_target_risk),
            ("switch.min_lower_bound", self.switch.min_lower_bound),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bad(key, format!("must be within [0, 1], got {v}"));
            }
        }
        if !(0.0..1.0).contains(&self.holdout.share) {
            bad(
                "holdout.share",
                format!("must be within [0, 1), got {}", self.holdout.share),
            );
        }
        if self.holdout.period.is_zero() {
            bad("holdout.period", "must be positive".into());
        }
        let p = self.eviction.min_score_priority;
        if !(p.is_finite() && p >= 0.0) {
            bad(
                "eviction.min_score_priority",
                format!("must be at least 0, got {p}"),
            );
        }
        if self.rules.is_empty() {
            bad("rules", "a policy needs at least one rule".into());
        }
        let env = expr::env();
        let mut conditions = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.name.trim().is_empty() || !names.insert(rule.name.as_str()) {
                bad(
                    &format!("rules[{i}].name"),
                    format!("{:?} is empty or used by an earlier rule", rule.name),
                );
            }
            match Condition::compile(&env, &rule.when) {
                Ok(c) => conditions.push(c),
                Err(e) => bad(&format!("rules[{i}].when"), e.0),
            }
            if rule.actions.is_empty() {
                bad(
                    &format!("rules[{i}].actions"),
                    "needs at least one action".into(),
                );
            }
            for (j, a) in rule.actions.iter().enumerate() {
                for msg in check_params(a) {
                    bad(&format!("rules[{i}].actions[{j}].params"), msg);
                }
            }
        }
        if errors.is_empty() {
            Ok(conditions)
        } else {
            Err(errors)
        }
    }
}

/// The line of `rules[i]`'s name in the YAML text, for error locations.
fn rule_line(text: &str, policy: &Policy, location: &str) -> Option<usize> {
    let i: usize = location
        .strip_prefix("rules[")?
        .split(']')
        .next()?
        .parse()
        .ok()?;
    // The i-th rule item, when every rule starts with its name (as the examples do); else the
    // first rule of that name.
    let items: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("- name:"))
        .map(|(n, _)| n + 1)
        .collect();
    if items.len() == policy.rules.len() {
        return items.get(i).copied();
    }
    let name = &policy.rules.get(i)?.name;
    text.lines()
        .position(|l| {
            let l = l.trim_start().trim_start_matches("- ").trim_start();
            l.strip_prefix("name:")
                .is_some_and(|v| v.trim().trim_matches(['"', '\'']) == name)
        })
        .map(|p| p + 1)
}

/// The parameters each action kind reads, with their checks.
fn check_params(a: &ActionSpec) -> Vec<String> {
    let known: &[&str] = match a.kind {
        ActionKind::Migrate => &["split"],
        ActionKind::ScaleUp | ActionKind::ScaleBack => &["replicas"],
        ActionKind::ReserveBuffer => &["share", "pieces"],
        ActionKind::PreProvisionStandby => &["include_dependencies", "depth", "cpu", "memory"],
        ActionKind::TransferState => &["mode", "include_dependencies"],
        ActionKind::RegisterTrafficSwitch | ActionKind::SwitchTraffic => &["include_dependencies"],
        ActionKind::AdjustBandwidth => &["priority", "limit"],
        ActionKind::RaiseLimits => &["factor"],
        ActionKind::PrioritiseQueue => &["boost"],
        ActionKind::SwapVirtual | ActionKind::ScheduleRepair | ActionKind::Evict => &[],
        ActionKind::Monitor | ActionKind::NoOp => &["note"],
    };
    let mut errors: Vec<String> = a
        .params
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| {
            format!(
                "{} does not take {k:?} (it takes: {})",
                a.kind.as_str(),
                if known.is_empty() {
                    "nothing".to_owned()
                } else {
                    known.join(", ")
                }
            )
        })
        .collect();
    let num = |k: &str| a.params.get(k).map(|v| v.as_f64());
    let mut want = |k: &str, ok: fn(f64) -> bool, what: &str| match num(k) {
        Some(Some(v)) if ok(v) => {}
        Some(_) => errors.push(format!("{k} must be {what}")),
        None => {}
    };
    want(
        "replicas",
        |v| v >= 1.0 && v.fract() == 0.0,
        "a whole number >= 1",
    );
    want("share", |v| v > 0.0 && v <= 1.0, "within (0, 1]");
    want(
        "pieces",
        |v| v >= 1.0 && v.fract() == 0.0,
        "a whole number >= 1",
    );
    want(
        "depth",
        |v| (1.0..=6.0).contains(&v) && v.fract() == 0.0,
        "1 to 6",
    );
    want("factor", |v| v > 1.0 && v <= 10.0, "within (1, 10]");
    want(
        "boost",
        |v| v >= 1.0 && v.fract() == 0.0,
        "a whole number >= 1",
    );
    want("limit", |v| v > 0.0 && v <= 1.0, "within (0, 1]");
    want("cpu", |v| v >= 0.0, "at least 0");
    want("memory", |v| v >= 0.0, "at least 0");
    if let Some(m) = a.params.get("mode")
        && !matches!(m.as_str(), Some("snapshot" | "incremental" | "auto"))
    {
        errors.push("mode must be snapshot, incremental or auto".into());
    }
    for k in ["split", "include_dependencies"] {
        if a.params.get(k).is_some_and(|v| !v.is_boolean()) {
            errors.push(format!("{k} must be true or false"));
        }
    }
    errors
}

impl Default for Policy {
    /// The built-in policy, used without a policy file: migrate work off high-risk entities,
    /// reserve a buffer for moderate ones.
    fn default() -> Self {
        let rule = |name: &str, when: &str, kind| Rule {
            name: name.into(),
            when: when.into(),
            mode: Mode::All,
            actions: vec![ActionSpec {
                kind,
                params: BTreeMap::new(),
            }],
        };
        Self {
            name: "default".into(),
            description: "Migrate work off high-risk entities; reserve a buffer for moderate ones."
                .into(),
            stale_after: default_stale_after(),
            bands: Bands::default(),
            cooldown: default_cooldown(),
            retry_after: default_retry_after(),
            criticality_weight: default_criticality_weight(),
            limits: Limits::default(),
            placement: Placement::default(),
            eviction: Eviction::default(),
            switch: Switch::default(),
            holdout: Holdout::default(),
            rules: vec![
                rule("migrate-high-risk", "band == 'high'", ActionKind::Migrate),
                rule(
                    "reserve-buffer-moderate-risk",
                    "band == 'moderate'",
                    ActionKind::ReserveBuffer,
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_is_valid() {
        assert_eq!(Policy::default().validate(), vec![]);
        let yaml = serde_yaml_ng::to_string(&Policy::default()).unwrap();
        assert_eq!(Policy::from_yaml(&yaml).unwrap(), Policy::default());
    }

    #[test]
    fn every_problem_is_reported_with_its_location() {
        let yaml = r#"
name: broken
bands: { moderate: 0.8, high: 0.5 }
rules:
  - name: a
    when: "score.probability >"
    actions: [{ kind: migrate }]
  - name: a
    when: "entty.known"
    actions: [{ kind: raise_limits, params: { factor: 0.5, colour: red } }]
"#;
        let errors = Policy::from_yaml(yaml).unwrap_err();
        let locations: Vec<&str> = errors.iter().map(|e| e.location.as_str()).collect();
        assert_eq!(
            locations,
            [
                "bands",
                "rules[0].when (line 5)",
                "rules[1].name (line 8)",
                "rules[1].when (line 8)",
                "rules[1].actions[0].params (line 8)",
                "rules[1].actions[0].params (line 8)",
            ],
            "{errors:#?}"
        );
        assert!(errors[3].message.contains("entty"), "{}", errors[3]);
        let syntax = Policy::from_yaml("name: x\nrules: [\n").unwrap_err();
        assert!(syntax[0].location.starts_with("line "), "{syntax:?}");
        let unknown = Policy::from_yaml("name: x\nrulez: []\n").unwrap_err();
        assert!(unknown[0].message.contains("rulez"), "{unknown:?}");
    }
}
