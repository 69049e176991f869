//! Foresight allocator: declarative policies that turn risk into safe, explainable allocation
//! decisions.
//!
//! The allocator consumes risk scores, the resource pool ([`InventoryUpdate`]s), the dependency
//! graph ([`DependencyEdge`]s) and confirmed failures ([`FailureReport`]s). It decides one
//! scoring round at a time (every score with the same event time), highest expected impact
//! first, so that when capacity is short the most important work gets it. Conditions are CEL
//! expressions in a YAML [`Policy`]; the safety rules (staleness, hysteresis, cool-downs,
//! velocity limits, capacity, minimum replicas, the traffic-switch guard) hold whatever the
//! policy says. Everything runs on event time: the same inputs give the same decisions, ids
//! included, live and in replay.
//!
//! ```
//! use foresight_allocator::{Allocator, AllocatorInput, Policy};
//! use foresight_events::{Band, EntityId, Inventory, Origin, Output, Processor, RiskScore, ScoreMethod, EventId};
//! use chrono::{DateTime, Utc};
//!
//! let mut allocator = Allocator::new(Policy::default(), &Inventory::default(), Default::default()).unwrap();
//! let score = RiskScore {
//!     entity: EntityId::new("node-1").unwrap(),
//!     time: DateTime::<Utc>::from_timestamp(600, 0).unwrap(),
//!     window_id: EventId::derive("example", &[]),
//!     horizon_seconds: 1800, probability: 0.93, lower: 0.88, upper: 0.97,
//!     time_to_failure_seconds: Some(600), health: 7.0, band: Band::High,
//!     contributors: vec![], method: ScoreMethod::Prior, model_version: "prior".into(),
//!     signals: Default::default(), observed: Default::default(), blast_radius: vec![], impact: 1.0, rank: None,
//! };
//! let mut out = Vec::new();
//! allocator.process(AllocatorInput::Score(score), Origin { input: 0, partition: 0, offset: 0 }, &mut out);
//! let Output::Event(decision) = &out[0] else { panic!() };
//! assert_eq!(decision.rule, "migrate-high-risk");
//! ```

mod expr;
mod plan;
mod policy;
mod pool;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use cel::common::value::Val;
use chrono::{DateTime, TimeDelta, Utc};
use foresight_events::{
    Action, ActionKind, Alternative, Band, Decision, DependencyEdge, DependencyGraph, EntityId,
    ErrorClass, FailureReport, GraphConfig, Inventory, InventoryUpdate, Origin, Output, Processor,
    Rejection, RiskScore, StateChange, StateError, decode_json_state, encode_json_state,
    partition_key, partitions_ahead,
};
use serde::{Deserialize, Serialize};

pub use expr::VARIABLES;
pub use policy::{
    ActionSpec, Bands, Eviction, Holdout, Limits, Mode, Placement, Policy, PolicyError, Rule,
    Switch,
};

use expr::{Condition, Obj, Vars};
use plan::{Ctx, Step, Velocity, Why};
use pool::Pool;

/// Allocator configuration (`[allocator]`): where the policy and the initial pool come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocatorConfig {
    /// Policy file (YAML). Without one (and without an inline `policy`), the built-in default
    /// policy applies: migrate work off high-risk entities, reserve a buffer for moderate ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_file: Option<PathBuf>,
    /// Inline policy, instead of a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Initial resource pool (YAML or JSON [`Inventory`]); kept current afterwards by inventory
    /// events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inventory_file: Option<PathBuf>,
    /// Topic of [`InventoryUpdate`] events read by the live allocator stage (full name, no
    /// prefix added); none: the pool changes only through the allocator's own decisions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inventory_topic: Option<String>,
    /// Most scoring rounds held open waiting for their last scores; beyond it the oldest is
    /// decided with what it has.
    pub max_open_rounds: usize,
    /// Most scores in one round; more are refused (dead-lettered as oversize).
    pub max_round_size: usize,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        Self {
            policy_file: None,
            policy: None,
            inventory_file: None,
            inventory_topic: None,
            max_open_rounds: 16,
            max_round_size: 200_000,
        }
    }
}

/// Why an allocator could not be set up.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AllocatorError {
    /// The policy is invalid.
    #[error("policy {file}: {error}")]
    Policy {
        /// The policy's file (or `inline`).
        file: String,
        /// The problem.
        error: PolicyError,
    },
    /// A file could not be read or parsed.
    #[error("{file}: {message}")]
    File {
        /// The file.
        file: String,
        /// The problem.
        message: String,
    },
    /// A configuration value that cannot work.
    #[error("allocator.{key}: {message}")]
    Config {
        /// The key.
        key: &'static str,
        /// The problem.
        message: String,
    },
}

impl AllocatorConfig {
    /// Checks the values, reporting every problem (files are read by [`Self::load`]).
    pub fn validate(&self) -> Vec<AllocatorError> {
        let mut errors = Vec::new();
        if self.policy.is_some() && self.policy_file.is_some() {
            errors.push(AllocatorError::Config {
                key: "policy",
                message: "give policy_file or an inline policy, not both".into(),
            });
        }
        if let Some(p) = &self.policy {
            errors.extend(
                p.validate()
                    .into_iter()
                    .map(|error| AllocatorError::Policy {
                        file: "allocator.policy".into(),
                        error,
                    }),
            );
        }
        if self.max_open_rounds == 0 {
            errors.push(AllocatorError::Config {
                key: "max_open_rounds",
                message: "must be at least 1".into(),
            });
        }
        if self.max_round_size == 0 {
            errors.push(AllocatorError::Config {
                key: "max_round_size",
                message: "must be at least 1".into(),
            });
        }
        errors
    }

    /// Reads the policy and the inventory (files, inline or built-in).
    pub fn load(&self) -> Result<(Policy, Inventory), Vec<AllocatorError>> {
        let mut errors = self.validate();
        let policy = match (&self.policy, &self.policy_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(file)) => match std::fs::read_to_string(file) {
                Ok(text) => match Policy::from_yaml(&text) {
                    Ok(p) => Some(p),
                    Err(es) => {
                        errors.extend(es.into_iter().map(|error| AllocatorError::Policy {
                            file: file.display().to_string(),
                            error,
                        }));
                        None
                    }
                },
                Err(e) => {
                    errors.push(AllocatorError::File {
                        file: file.display().to_string(),
                        message: e.to_string(),
                    });
                    None
                }
            },
            (None, None) => Some(Policy::default()),
        };
        let inventory = match &self.inventory_file {
            None => Some(Inventory::default()),
            Some(file) => match std::fs::read_to_string(file)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_inventory(&t))
            {
                Ok(i) => Some(i),
                Err(message) => {
                    errors.push(AllocatorError::File {
                        file: file.display().to_string(),
                        message,
                    });
                    None
                }
            },
        };
        match (policy, inventory) {
            (Some(p), Some(i)) if errors.is_empty() => Ok((p, i)),
            _ => Err(errors),
        }
    }
}

/// Parses an inventory from YAML (JSON is YAML too), checking its resources.
pub fn parse_inventory(text: &str) -> Result<Inventory, String> {
    let inv: Inventory = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    for n in &inv.nodes {
        if !n.capacity.is_valid() || n.virtual_requests.is_some_and(|v| !v.is_valid()) {
            return Err(format!("node {}: resources must be finite and >= 0", n.id));
        }
    }
    for w in &inv.workloads {
        if !w.requests.is_valid() || w.min_replicas > w.max_replicas || w.splittable == 0 {
            return Err(format!(
                "workload {}: requests must be finite and >= 0, min_replicas <= max_replicas, \
                 splittable >= 1",
                w.id
            ));
        }
    }
    Ok(inv)
}

/// What the allocator consumes.
#[derive(Debug, Clone, PartialEq)]
pub enum AllocatorInput {
    /// A risk score.
    Score(RiskScore),
    /// A change to the resource pool.
    Inventory(InventoryUpdate),
    /// Calls seen in traces: an edge of the dependency graph.
    Edge(DependencyEdge),
    /// A confirmed failure: may trigger a traffic switch.
    Failure(FailureReport),
}

/// A compiled rule.
#[derive(Debug)]
struct Compiled {
    condition: Condition,
}

/// What the allocator remembers of one entity (checkpointed with the scores it has in open
/// rounds, see [`Saved`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EntityState {
    /// Time of the newest score seen: older ones are stale.
    newest: Option<DateTime<Utc>>,
    /// Band with hysteresis.
    band: Option<Band>,
    /// Last rule that acted, and until when rules at or below it stay quiet.
    quiet: Option<(usize, DateTime<Utc>)>,
    /// A failure has been reported (and not followed by a healthy score).
    failed: bool,
    /// Its latest score, for decisions triggered by a failure report.
    latest: Option<RiskScore>,
    /// The input partition its scores come from: the checkpoint that holds it.
    #[serde(skip)]
    partition: i32,
}

/// An entity's checkpointed state: what the allocator remembers of it, and its scores waiting
/// in open rounds (offsets move past a score once it is in a round, so a restored allocator
/// would otherwise never see the round complete).
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    state: EntityState,
    pending: Vec<RiskScore>,
}

/// A partition's checkpointed progress: the allocator's clocks and the actions its velocity
/// limits count, as of its checkpoint (the same in every partition's checkpoint taken at once).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Progress {
    decided_through: Option<DateTime<Utc>>,
    watermark: Option<DateTime<Utc>>,
    velocity: Velocity,
}

/// The checkpoint key of a partition's [`Progress`].
const PROGRESS: &str = "allocator-progress";

/// One scoring round waiting for its scores: the latest score per entity (a redelivered one
/// replaces the first). Decided in priority order, so arrival order does not matter.
#[derive(Debug, Default)]
struct Round {
    scores: Vec<RiskScore>,
    index: HashMap<EntityId, usize>,
    /// Scores the round holds when complete (from their ranks).
    of: usize,
}

impl Round {
    /// Adds `score` to the round, or replaces its entity's earlier one.
    fn put(&mut self, score: RiskScore) {
        self.of = self.of.max(score.rank.map_or(0, |r| r.of as usize));
        match self.index.get(&score.entity) {
            Some(&k) => self.scores[k] = score,
            None => {
                self.index.insert(score.entity.clone(), self.scores.len());
                self.scores.push(score);
            }
        }
    }

    /// Drops the scores of `gone`.
    fn drop_entities(&mut self, gone: &BTreeSet<EntityId>) {
        if self.scores.iter().any(|s| gone.contains(&s.entity)) {
            self.scores.retain(|s| !gone.contains(&s.entity));
            self.index = self
                .scores
                .iter()
                .enumerate()
                .map(|(k, s)| (s.entity.clone(), k))
                .collect();
        }
    }
}

/// The CEL environment (which does not implement `Debug`).
struct CelEnv(Arc<cel::Env>);

impl std::fmt::Debug for CelEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CelEnv")
    }
}

/// The policy allocator: [`AllocatorInput`] in, [`Decision`]s out.
#[derive(Debug)]
pub struct Allocator {
    policy: Policy,
    rules: Vec<Compiled>,
    env: CelEnv,
    /// Variables and nested fields some condition reads: only those are built.
    uses: BTreeSet<String>,
    /// Whether some condition reads `pool` (rebuilt after every change to the pool if so).
    uses_pool: bool,
    pool: Pool,
    graph: DependencyGraph,
    /// Looked up, never iterated: a hash map keeps the per-score cost down and cannot make the
    /// output depend on its order.
    entities: HashMap<EntityId, EntityState>,
    velocity: Velocity,
    rounds: BTreeMap<DateTime<Utc>, Round>,
    /// Newest round decided: a score for an older time arrives late.
    decided_through: Option<DateTime<Utc>>,
    /// Newest event time decided (a round's, or a score's decided alone): the clock staleness
    /// is judged by. Scores waiting in open rounds do not move it, so a round's scores are
    /// never stale for how far a consumer has read ahead of it (live, rounds up to the bound
    /// on open ones and a fetch beyond; a replay reads no further than the round).
    watermark: Option<DateTime<Utc>>,
    max_open_rounds: usize,
    max_round_size: usize,
    /// Entities whose state changed since the last checkpoint.
    dirty: BTreeSet<EntityId>,
    /// The clocks each partition's last checkpoint holds.
    checkpointed: HashMap<i32, Progress>,
    /// How far each partition of the scores has delivered (live, not checkpointed).
    reading: BTreeMap<i32, Reading>,
    /// The runtime pauses the partitions [`Processor::held`] names: beyond the bound on open
    /// rounds, wait for the partitions behind instead of deciding with part of a round.
    hold: bool,
}

/// How far a partition of the scores has delivered.
#[derive(Debug, Default, Clone, Copy)]
struct Reading {
    /// The newest score time it delivered.
    newest: Option<DateTime<Utc>>,
    /// Caught up with its input, as the runtime last said.
    idle: bool,
}

impl Allocator {
    /// An allocator with `policy`, starting from `inventory` and the declared dependencies.
    pub fn new(
        policy: Policy,
        inventory: &Inventory,
        graph: GraphConfig,
    ) -> Result<Self, Vec<PolicyError>> {
        let conditions = policy.compile()?;
        let mut uses = expr::words(conditions.iter().map(Condition::source));
        for c in &conditions {
            uses.extend(c.variables());
        }
        let defaults = AllocatorConfig::default();
        Ok(Self {
            rules: conditions
                .into_iter()
                .map(|condition| Compiled { condition })
                .collect(),
            policy,
            env: CelEnv(expr::env()),
            uses_pool: uses.contains("pool"),
            uses,
            pool: Pool::new(inventory),
            graph: DependencyGraph::new(graph),
            entities: HashMap::new(),
            velocity: Velocity::default(),
            rounds: BTreeMap::new(),
            decided_through: None,
            watermark: None,
            max_open_rounds: defaults.max_open_rounds,
            max_round_size: defaults.max_round_size,
            dirty: BTreeSet::new(),
            checkpointed: HashMap::new(),
            reading: BTreeMap::new(),
            hold: false,
        })
    }

    /// An allocator from its configuration (reads the policy and inventory files).
    pub fn from_config(
        config: &AllocatorConfig,
        graph: GraphConfig,
    ) -> Result<Self, Vec<AllocatorError>> {
        let (policy, inventory) = config.load()?;
        let mut a = Self::new(policy, &inventory, graph).map_err(|es| {
            es.into_iter()
                .map(|error| AllocatorError::Policy {
                    file: "policy".into(),
                    error,
                })
                .collect::<Vec<_>>()
        })?;
        a.max_open_rounds = config.max_open_rounds.max(1);
        a.max_round_size = config.max_round_size.max(1);
        Ok(a)
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Checks the safety invariants on the allocator's view of the pool: no node holds more
    /// than its capacity, no workload runs below its minimum replicas. They hold after every
    /// input when the declared inventory satisfied them (the property tests check this).
    pub fn check_pool(&self) -> Result<(), String> {
        self.pool.within_capacity()?;
        for w in self.pool.workloads.values() {
            let declared = w.spec.replicas.len() as f64;
            let floor = f64::from(w.spec.min_replicas).min(declared);
            if w.replicas() < floor - 1e-9 {
                return Err(format!(
                    "{} runs {} replicas, below its minimum of {}",
                    w.spec.id,
                    w.replicas(),
                    w.spec.min_replicas
                ));
            }
        }
        Ok(())
    }

    fn score(&mut self, score: RiskScore, out: &mut Vec<Output<Decision>>) {
        let late = self.decided_through.is_some_and(|d| score.time <= d);
        if score.rank.is_none() || late {
            // Unranked (no fleet stage upstream) or late for its round: a round of its own.
            return self.decide(vec![score], out);
        }
        let time = score.time;
        self.dirty.insert(score.entity.clone());
        let round = self.rounds.entry(time).or_default();
        if !round.index.contains_key(&score.entity) && round.scores.len() >= self.max_round_size {
            out.push(Output::Rejected(Rejection::new(
                ErrorClass::Oversize,
                format!(
                    "round {time} already holds {} scores, the most allowed",
                    self.max_round_size
                ),
            )));
            return;
        }
        round.put(score);
        // Rounds are decided in time order, each once it is complete: the fleet stage emits
        // whole rounds, so a missing score is one still on its way from another partition (a
        // later round completing first says nothing about it). Only the bound on open rounds
        // decides a round with what it has.
        while let Some((&t, r)) = self.rounds.iter().next() {
            if r.scores.len() < r.of {
                break;
            }
            self.close(t, out);
        }
        self.close_over_bound(out);
    }

    /// Decides the oldest rounds, with what they have, while more are open than the bound
    /// allows, unless the runtime pauses partitions while one the oldest waits for catches up.
    fn close_over_bound(&mut self, out: &mut Vec<Output<Decision>>) {
        while self.rounds.len() > self.max_open_rounds && self.ahead_of_oldest().is_none() {
            let oldest = *self.rounds.keys().next().expect("not empty");
            self.close(oldest, out);
        }
    }

    /// With the runtime pausing partitions, and a partition not caught up that has delivered
    /// nothing past the oldest open round (the fleet stage emits whole rounds, and each
    /// partition's scores in time order, so the round's missing scores can only come from
    /// such a one): the partitions past it.
    fn ahead_of_oldest(&self) -> Option<Vec<i32>> {
        let t = *self.rounds.keys().next()?;
        if !self.hold {
            return None;
        }
        partitions_ahead(self.reading.iter().map(|(&p, r)| (p, r.newest, r.idle)), t)
    }

    /// Notes the input partition `entity`'s input comes from: its state goes into that
    /// partition's checkpoint.
    fn owned_by(&mut self, entity: &EntityId, partition: i32) {
        match self.entities.get_mut(entity) {
            Some(st) => st.partition = partition,
            None => {
                let st = EntityState {
                    partition,
                    ..EntityState::default()
                };
                self.entities.insert(entity.clone(), st);
            }
        }
    }

    fn close(&mut self, time: DateTime<Utc>, out: &mut Vec<Output<Decision>>) {
        if let Some(round) = self.rounds.remove(&time) {
            self.decided_through = Some(self.decided_through.map_or(time, |d| d.max(time)));
            self.decide(round.scores, out);
        }
    }

    fn band(&self, prior: Option<Band>, p: f64) -> Band {
        let b = &self.policy.bands;
        let raw = if p >= b.high {
            Band::High
        } else if p >= b.moderate {
            Band::Moderate
        } else {
            Band::Low
        };
        // Falling out of a band needs the margin.
        match prior {
            Some(Band::High) if p >= b.high - b.margin => Band::High,
            Some(Band::High | Band::Moderate) if raw == Band::Low && p >= b.moderate - b.margin => {
                Band::Moderate
            }
            _ => raw,
        }
    }

    fn entity_priority(&self, s: &RiskScore) -> f64 {
        let critical = match self.pool.workloads.get(&s.entity) {
            Some(w) => w.spec.critical,
            None => self
                .pool
                .workloads_on(&s.entity)
                .iter()
                .any(|w| w.spec.critical),
        };
        let p = s.priority();
        if critical {
            p * self.policy.criticality_weight
        } else {
            p
        }
    }

    /// Decides one round.
    fn decide(&mut self, scores: Vec<RiskScore>, out: &mut Vec<Output<Decision>>) {
        let stale_after = TimeDelta::from_std(self.policy.stale_after).unwrap_or(TimeDelta::MAX);
        let watermark = scores.iter().map(|s| s.time).chain(self.watermark).max();
        self.watermark = watermark;
        // Fresh scores only; their entities' risk and bands are updated before anything is
        // decided, so placements avoid every node this round found at risk.
        let mut fresh: Vec<usize> = Vec::with_capacity(scores.len());
        self.dirty.extend(scores.iter().map(|s| s.entity.clone()));
        for (k, s) in scores.iter().enumerate() {
            let prior = self.entities.get(&s.entity).and_then(|st| st.band);
            let band = self.band(prior, s.probability);
            let state = self.entities.entry(s.entity.clone()).or_default();
            let stale_entity = state.newest.is_some_and(|n| s.time < n);
            let stale_time = watermark.is_some_and(|w| s.time < w - stale_after);
            if stale_entity || stale_time || !s.probability.is_finite() {
                continue;
            }
            state.newest = Some(s.time);
            state.band = Some(band);
            if s.probability < self.policy.bands.moderate {
                state.failed = false;
            }
            if let Some(n) = self.pool.nodes.get_mut(&s.entity) {
                n.risk = s.probability;
            }
            fresh.push(k);
        }
        let Some(now) = fresh.iter().map(|k| scores[*k].time).max() else {
            return;
        };
        self.pool.reindex();
        self.pool.expire(now);
        self.graph.expire(now);
        // Indices, sorted: the scores themselves are large and stay where they are.
        let mut ranked: Vec<(f64, usize)> = fresh
            .into_iter()
            .map(|k| (self.entity_priority(&scores[k]), k))
            .collect();
        ranked.sort_by(|a, b| {
            let (sa, sb) = (&scores[a.1], &scores[b.1]);
            b.0.total_cmp(&a.0)
                .then_with(|| sb.probability.total_cmp(&sa.probability))
                .then_with(|| sa.entity.cmp(&sb.entity))
        });
        let size = ranked.len();
        let mut reports = 0u32;
        let mut pool_val: Option<Box<dyn Val>> = None;
        for (position, (_, k)) in ranked.iter().enumerate() {
            if pool_val.is_none() && self.uses_pool {
                pool_val = Some(self.pool_value());
            }
            let changed = self.decide_one(
                &scores[*k],
                (position + 1, size),
                pool_val.as_deref(),
                &mut reports,
                out,
            );
            if changed {
                pool_val = None;
            }
        }
        // Kept for decisions a failure report triggers later.
        let mut decided = vec![false; scores.len()];
        for (_, k) in ranked {
            decided[k] = true;
        }
        for (s, decided) in scores.into_iter().zip(decided) {
            if decided && let Some(st) = self.entities.get_mut(&s.entity) {
                st.latest = Some(s);
            }
        }
    }

    /// The decision for an entity in the randomised hold-out: nothing, with what would have been
    /// done as the alternatives and the propensity recorded.
    fn hold_out(
        &mut self,
        score: &RiskScore,
        band: Band,
        rule: &Rule,
        i: usize,
        (position, size): (usize, usize),
        out: &mut Vec<Output<Decision>>,
    ) {
        let share = self.policy.holdout.share;
        let why = format!(
            "entity in the randomised hold-out (propensity {share}): no action, so that what \
             follows measures the risk without mitigation"
        );
        let alternatives = rule
            .actions
            .iter()
            .map(|a| Alternative {
                action: Action {
                    kind: a.kind,
                    target: score.entity.clone(),
                    params: a.params.clone(),
                },
                rejected_because: why.clone(),
            })
            .collect();
        if let Some(st) = self.entities.get_mut(&score.entity) {
            let cooldown = TimeDelta::from_std(self.policy.cooldown).unwrap_or(TimeDelta::MAX);
            st.quiet = Some((i, score.time + cooldown));
        }
        let reason = self.reason(score, band, rule, i, position, size);
        out.push(Output::Event(Decision {
            entity: score.entity.clone(),
            time: score.time,
            score_id: foresight_events::EventData::id(score),
            probability: score.probability,
            interval: [score.lower, score.upper],
            band,
            policy: self.policy.name.clone(),
            rule: rule.name.clone(),
            action: Action {
                kind: ActionKind::NoOp,
                target: score.entity.clone(),
                params: BTreeMap::from([
                    ("reason".into(), serde_json::Value::String(why.clone())),
                    ("holdout".into(), serde_json::Value::Bool(true)),
                    ("propensity".into(), serde_json::json!(share)),
                ]),
            },
            reason,
            expected_effect: "nothing changes: held out for evaluation".into(),
            inverse: None,
            alternatives,
        }));
    }

    /// Evaluates the rules for one score and carries out the first that holds. Returns whether
    /// the pool changed.
    fn decide_one(
        &mut self,
        score: &RiskScore,
        (position, size): (usize, usize),
        pool: Option<&dyn Val>,
        reports: &mut u32,
        out: &mut Vec<Output<Decision>>,
    ) -> bool {
        let (band, quiet, failed) = self
            .entities
            .get(&score.entity)
            .map_or((None, None, false), |s| (s.band, s.quiet, s.failed));
        let band = band.unwrap_or(Band::Low);
        let (fired, others) = {
            let src = Src {
                a: self,
                score,
                band,
                failed,
                position,
                size,
            };
            let vars = Vars::new(&src, pool);
            let mut fired = None;
            let mut others = Vec::new();
            for (i, rule) in self.rules.iter().enumerate() {
                let holds = rule.condition.holds(&self.env.0, &vars);
                match (holds, fired) {
                    (Ok(true), None) => fired = Some(i),
                    (Ok(true), Some(_)) => others.push(i),
                    // A condition that cannot be evaluated for this score does not hold (e.g.
                    // a signal the score lacks).
                    _ => {}
                }
                // Alternatives are only worth evaluating when something fires; stop early
                // once two rules are known.
                if fired.is_some() && others.len() >= 2 {
                    break;
                }
            }
            (fired, others)
        };
        let Some(i) = fired else {
            return false;
        };
        if let Some((quiet_rule, until)) = quiet
            && score.time < until
            && i >= quiet_rule
        {
            return false;
        }
        let rule = self.policy.rules[i].clone();
        let acts = rule
            .actions
            .iter()
            .any(|a| !matches!(a.kind, ActionKind::Monitor | ActionKind::NoOp));
        if acts && self.policy.holdout.holds_out(&score.entity, score.time) {
            self.hold_out(score, band, &rule, i, (position, size), out);
            return false;
        }
        let group = self.group_of(&score.entity);
        let mut ctx = Ctx {
            pool: &mut self.pool,
            graph: &self.graph,
            policy: &self.policy,
            velocity: &mut self.velocity,
            score,
            failed,
            group,
        };
        let mut steps: Vec<Step> = Vec::new();
        let mut lost: Vec<Alternative> = Vec::new();
        let mut deferred = false;
        for spec in &rule.actions {
            if rule.mode == Mode::First && !steps.is_empty() {
                lost.push(Alternative {
                    action: Action {
                        kind: spec.kind,
                        target: score.entity.clone(),
                        params: spec.params.clone(),
                    },
                    rejected_because: format!(
                        "an earlier action of rule {} could be carried out",
                        rule.name
                    ),
                });
                continue;
            }
            match ctx.plan(spec) {
                Ok(mut s) => steps.append(&mut s),
                Err(why) => {
                    deferred |= matches!(why, Why::Deferred(_));
                    lost.push(Alternative {
                        action: Action {
                            kind: spec.kind,
                            target: score.entity.clone(),
                            params: spec.params.clone(),
                        },
                        rejected_because: why.text().to_owned(),
                    });
                }
            }
        }
        for j in &others {
            let r = &self.policy.rules[*j];
            if let Some(a) = r.actions.first() {
                lost.push(Alternative {
                    action: Action {
                        kind: a.kind,
                        target: score.entity.clone(),
                        params: a.params.clone(),
                    },
                    rejected_because: format!(
                        "rule {} comes first in policy {}",
                        rule.name, self.policy.name
                    ),
                });
            }
        }
        let changed = steps
            .iter()
            .any(|s| !matches!(s.action.kind, ActionKind::Monitor | ActionKind::NoOp));
        let reason = self.reason(score, band, &rule, i, position, size);
        if steps.is_empty() {
            // Could not act: say so (bounded per round) and try again later.
            if *reports >= self.policy.limits.max_reports_per_round {
                return false;
            }
            *reports += 1;
            if !deferred && let Some(st) = self.entities.get_mut(&score.entity) {
                let retry = TimeDelta::from_std(self.policy.retry_after).unwrap_or(TimeDelta::MAX);
                st.quiet = Some((i, score.time + retry));
            }
            let why = lost
                .first()
                .map(|a| a.rejected_because.clone())
                .unwrap_or_default();
            steps.push(Step {
                action: Action {
                    kind: ActionKind::NoOp,
                    target: score.entity.clone(),
                    params: BTreeMap::from([(
                        "reason".into(),
                        serde_json::Value::String(why.clone()),
                    )]),
                },
                effect: format!("nothing changes: {why}"),
                inverse: None,
                considered: Vec::new(),
            });
        } else if !deferred && let Some(st) = self.entities.get_mut(&score.entity) {
            let cooldown = TimeDelta::from_std(self.policy.cooldown).unwrap_or(TimeDelta::MAX);
            st.quiet = Some((i, score.time + cooldown));
        }
        // One decision per step; the rule's lost actions go with the first.
        let mut seen = BTreeSet::new();
        for (k, step) in steps.into_iter().enumerate() {
            let mut alternatives = step.considered;
            if k == 0 {
                alternatives.append(&mut lost);
            }
            alternatives.truncate(8);
            // Each (kind, target) once per score: the id must stay distinct.
            if !seen.insert((step.action.kind, step.action.target.clone())) {
                continue;
            }
            out.push(Output::Event(Decision {
                entity: score.entity.clone(),
                time: score.time,
                score_id: foresight_events::EventData::id(score),
                probability: score.probability,
                interval: [score.lower, score.upper],
                band: score.band,
                policy: self.policy.name.clone(),
                rule: rule.name.clone(),
                inverse: step.inverse,
                expected_effect: step.effect,
                action: step.action,
                reason: reason.clone(),
                alternatives,
            }));
        }
        changed
    }

    fn reason(
        &self,
        score: &RiskScore,
        band: Band,
        rule: &Rule,
        i: usize,
        position: usize,
        size: usize,
    ) -> String {
        format!(
            "{} risk (held band {}): P(failure within {}) = {:.3} [{:.3}, {:.3}], impact {:.2}, \
             priority {:.3}, ranked {position} of {size} in its round{}; rule {} (#{}) holds: {}",
            score.band.as_str(),
            band.as_str(),
            humantime::format_duration(Duration::from_secs(score.horizon_seconds)),
            score.probability,
            score.lower,
            score.upper,
            score.impact,
            score.priority(),
            score
                .contributors
                .first()
                .map(|c| format!(" ({})", c.detail))
                .unwrap_or_default(),
            rule.name,
            i + 1,
            rule.when,
        )
    }

    fn group_of(&self, e: &EntityId) -> String {
        if let Some(n) = self.pool.nodes.get(e) {
            return n.spec.group().to_owned();
        }
        self.pool
            .workloads
            .get(e)
            .and_then(|w| w.placements.first())
            .and_then(|p| self.pool.nodes.get(&p.node))
            .map_or_else(|| "default".to_owned(), |n| n.spec.group().to_owned())
    }

    fn pool_value(&self) -> Box<dyn Val> {
        let mut free = foresight_events::Resources::default();
        let mut cap = foresight_events::Resources::default();
        let mut secondary = foresight_events::Resources::default();
        let (mut nodes, mut healthy) = (0i64, 0i64);
        for n in self.pool.nodes.values() {
            nodes += 1;
            let f = n.free();
            if n.spec.environment == foresight_events::Environment::Secondary {
                secondary = secondary.plus(&f);
                continue;
            }
            free = free.plus(&f);
            cap = cap.plus(&n.spec.capacity);
            if n.risk <= self.policy.placement.max_target_risk {
                healthy += 1;
            }
        }
        let pct = |f: f64, c: f64| if c > 0.0 { 100.0 * f / c } else { 0.0 };
        Obj::with_capacity(12)
            .int("nodes", nodes)
            .int("healthy_nodes", healthy)
            .num("free_cpu", free.cpu)
            .num("free_memory", free.memory)
            .num("free_storage", free.storage)
            .num("free_bandwidth", free.bandwidth)
            .num("free_cpu_pct", pct(free.cpu, cap.cpu))
            .num("free_memory_pct", pct(free.memory, cap.memory))
            .num("secondary_free_cpu", secondary.cpu)
            .num("secondary_free_memory", secondary.memory)
            .int("spares", self.pool.spares.len() as i64)
            .int("standbys", self.pool.standbys.len() as i64)
            .build()
    }

    fn related<'a>(&'a self, e: &'a EntityId, critical: bool) -> Box<dyn Val + 'a> {
        let risk = self
            .entities
            .get(e)
            .and_then(|s| s.latest.as_ref())
            .map_or(0.0, |s| s.probability);
        Obj::with_capacity(5)
            .str("entity", e.as_str())
            .bool("critical", critical)
            .num("risk", risk)
            .bool("has_standby", self.pool.standbys.contains_key(e))
            .bool(
                "known",
                self.pool.nodes.contains_key(e) || self.pool.workloads.contains_key(e),
            )
            .build()
    }

    fn entity_value<'a>(&'a self, e: &'a EntityId, failed: bool) -> Box<dyn Val + 'a> {
        let standby = self.pool.standbys.get(e);
        let mut o = Obj::with_capacity(28)
            .str("id", e.as_str())
            .bool("failed", failed)
            .bool("has_standby", standby.is_some())
            .bool("switch_registered", standby.is_some_and(|s| s.registered))
            .bool("switched", standby.is_some_and(|s| s.switched))
            .bool("has_buffer", self.pool.buffers.contains_key(e))
            .bool("swapped", self.pool.virtuals.contains_key(e))
            .bool("repair_scheduled", self.pool.repairs.contains_key(e));
        if let Some(n) = self.pool.nodes.get(e) {
            let on = self.pool.workloads_on(e);
            let free = n.free();
            let c = n.spec.capacity;
            let pct = |used: f64, cap: f64| if cap > 0.0 { 100.0 * used / cap } else { 0.0 };
            o = o
                .str("type", "node")
                .bool("known", true)
                .str("kind", &n.spec.kind)
                .str("environment", n.spec.environment.as_str())
                .str("zone", &n.spec.zone)
                .str("group", n.spec.group())
                .int("workloads", on.len() as i64)
                .int(
                    "critical_workloads",
                    on.iter().filter(|w| w.spec.critical).count() as i64,
                )
                .int(
                    "priority",
                    i64::from(on.iter().map(|w| w.spec.priority).max().unwrap_or(0)),
                )
                .bool("critical", on.iter().any(|w| w.spec.critical))
                .bool("virtualizable", n.spec.virtual_requests.is_some())
                .int(
                    "spares",
                    self.pool
                        .spares
                        .values()
                        .filter(|s| s.kind == n.spec.kind)
                        .count() as i64,
                )
                .num("risk", n.risk)
                .num("free_cpu", free.cpu)
                .num("free_memory", free.memory)
                .num("cpu_used_pct", pct(n.used.cpu, c.cpu))
                .num("memory_used_pct", pct(n.used.memory, c.memory));
        } else if let Some(w) = self.pool.workloads.get(e) {
            o = o
                .str("type", "workload")
                .bool("known", true)
                .str("kind", &w.spec.kind)
                .int("priority", i64::from(w.spec.priority))
                .bool("critical", w.spec.critical)
                .num("replicas", w.replicas())
                .int("min_replicas", i64::from(w.spec.min_replicas))
                .int("max_replicas", i64::from(w.spec.max_replicas))
                .int("splittable", i64::from(w.spec.splittable))
                .bool("stateful", w.spec.stateful)
                .int("queue_priority", i64::from(w.spec.queue_priority))
                .num("cpu", w.spec.requests.cpu)
                .num("memory", w.spec.requests.memory);
        } else {
            o = o
                .str("type", "unknown")
                .bool("known", false)
                .str("kind", "")
                .int("priority", 0)
                .bool("critical", false)
                .int("workloads", 0);
        }
        o.build()
    }

    fn failure(&mut self, f: FailureReport, out: &mut Vec<Output<Decision>>) {
        self.dirty.insert(f.entity.clone());
        let state = self.entities.entry(f.entity.clone()).or_default();
        state.failed = true;
        // Decide again on the latest score, now that the failure is confirmed; a score too old
        // by the failure's time is stale and not acted on.
        let Some(latest) = state.latest.clone() else {
            return;
        };
        let stale_after = TimeDelta::from_std(self.policy.stale_after).unwrap_or(TimeDelta::MAX);
        if latest.time < f.time - stale_after {
            return;
        }
        // The failure may release a cool-down: a switch is a new step, never quieted by the
        // decisions that prepared it.
        state.quiet = None;
        let pool = self.uses_pool.then(|| self.pool_value());
        let mut reports = 0;
        self.decide_one(&latest, (1, 1), pool.as_deref(), &mut reports, out);
    }
}

/// What the variables of one evaluation are built from.
struct Src<'a> {
    a: &'a Allocator,
    score: &'a RiskScore,
    band: Band,
    failed: bool,
    position: usize,
    size: usize,
}

impl<'a> expr::Build<'a> for Src<'a> {
    fn build(&self, var: expr::Var) -> Option<Box<dyn Val + 'a>> {
        let (a, score, u) = (self.a, self.score, &self.a.uses);
        Some(match var {
            expr::Var::Band => expr::string(self.band.as_str()),
            expr::Var::Score => {
                let critical = score.blast_radius.iter().filter(|d| d.critical).count();
                let mut o = Obj::with_capacity(20)
                    .str("entity", score.entity.as_str())
                    .num("probability", score.probability)
                    .num("lower", score.lower)
                    .num("upper", score.upper)
                    .str("band", score.band.as_str())
                    .num("health", score.health)
                    .int("horizon_seconds", score.horizon_seconds as i64)
                    .num("impact", score.impact)
                    .num("priority", score.priority())
                    .int("critical_dependants", critical as i64)
                    .int("dependants", score.blast_radius.len() as i64)
                    .int(
                        "rank",
                        score
                            .rank
                            .map_or(self.position as i64, |r| i64::from(r.position)),
                    )
                    .str("model_version", &score.model_version);
                o = match score.time_to_failure_seconds {
                    Some(t) => o.int("time_to_failure_seconds", t as i64),
                    None => o.null("time_to_failure_seconds"),
                };
                if u.contains("signals") {
                    o = o.numbers(
                        "signals",
                        score.signals.iter().map(|(k, v)| (k.as_str(), *v)),
                    );
                }
                if u.contains("observed") {
                    o = o.numbers(
                        "observed",
                        score.observed.iter().map(|(k, v)| (k.as_str(), *v)),
                    );
                }
                if u.contains("blast_radius") {
                    o = o.val(
                        "blast_radius",
                        expr::list(
                            score
                                .blast_radius
                                .iter()
                                .map(|d| {
                                    Obj::with_capacity(3)
                                        .str("entity", d.entity.as_str())
                                        .int("depth", i64::from(d.depth))
                                        .bool("critical", d.critical)
                                        .build()
                                })
                                .collect(),
                        ),
                    );
                }
                o.build()
            }
            expr::Var::Entity => a.entity_value(&score.entity, self.failed),
            expr::Var::Deps => expr::list(
                a.graph
                    .dependencies_of(&score.entity)
                    .map(|(d, critical)| a.related(d, critical))
                    .collect(),
            ),
            expr::Var::Dependants => expr::list(
                a.graph
                    .dependents_of(&score.entity)
                    .map(|(d, e)| a.related(d, e.critical))
                    .collect(),
            ),
            expr::Var::Round => Obj::with_capacity(2)
                .int("position", self.position as i64)
                .int("size", self.size as i64)
                .build(),
        })
    }
}

impl Processor for Allocator {
    type Input = AllocatorInput;
    type Output = Decision;

    fn process(&mut self, input: AllocatorInput, origin: Origin, out: &mut Vec<Output<Decision>>) {
        match input {
            AllocatorInput::Score(s) => {
                self.owned_by(&s.entity, origin.partition);
                let r = self.reading.entry(origin.partition).or_default();
                r.newest = Some(r.newest.map_or(s.time, |n| n.max(s.time)));
                r.idle = false;
                self.score(s, out)
            }
            AllocatorInput::Inventory(u) => self.pool.apply(&u.change),
            AllocatorInput::Edge(e) => self.graph.observe(&e),
            AllocatorInput::Failure(f) => {
                self.owned_by(&f.entity, origin.partition);
                self.failure(f, out)
            }
        }
    }

    fn watches_partitions(&self) -> bool {
        true
    }

    fn assigned(&mut self, partition: i32) {
        self.reading.entry(partition).or_default().idle = false;
    }

    fn idle(&mut self, partition: i32, out: &mut Vec<Output<Decision>>) {
        self.reading.entry(partition).or_default().idle = true;
        self.close_over_bound(out);
    }

    fn hold_partitions(&mut self) {
        self.hold = true;
    }

    /// With the bound on open rounds reached: the partitions past the oldest open round, while
    /// one that has not reached it is still being read.
    fn held(&self) -> Vec<i32> {
        if self.rounds.len() < self.max_open_rounds {
            return Vec::new();
        }
        self.ahead_of_oldest().unwrap_or_default()
    }

    fn forget_partition(&mut self, partition: i32) {
        self.reading.remove(&partition);
        let gone: BTreeSet<EntityId> = self
            .entities
            .iter()
            .filter(|(_, st)| st.partition == partition)
            .map(|(e, _)| e.clone())
            .collect();
        for e in &gone {
            self.entities.remove(e);
            self.dirty.remove(e);
        }
        for round in self.rounds.values_mut() {
            round.drop_entities(&gone);
        }
        self.rounds.retain(|_, r| !r.scores.is_empty());
        self.checkpointed.remove(&partition);
        if self.entities.is_empty() {
            // Nothing owned any more (every partition revoked, as when a consumer's group
            // session is lost): the clocks and velocity counts go too. Kept, they would make
            // the scores read again after a restore from an older checkpoint late (decided one
            // by one) and count their actions twice, so decisions still on their way would be
            // published again with other content.
            self.decided_through = None;
            self.watermark = None;
            self.velocity = Velocity::default();
        }
    }

    /// Checkpointed: each entity's bands, cool-downs, failure and latest score, with its scores
    /// in open rounds, and the clocks and velocity counts. A restarted allocator so decides
    /// again exactly as before: the same decisions, with the same content, and no cool-down or
    /// velocity limit forgotten. The pool model is not (yet): it starts again from the
    /// inventory.
    fn stateful(&self) -> bool {
        true
    }

    fn checkpoint(&mut self, partition: i32) -> Vec<StateChange> {
        let dirty: Vec<EntityId> = self
            .dirty
            .iter()
            .filter(|e| {
                self.entities
                    .get(*e)
                    .is_some_and(|st| st.partition == partition)
            })
            .cloned()
            .collect();
        let mut changes = Vec::with_capacity(dirty.len() + 1);
        for e in dirty {
            self.dirty.remove(&e);
            let saved = Saved {
                state: self.entities[&e].clone(),
                pending: self
                    .rounds
                    .values()
                    .filter_map(|r| r.index.get(&e).map(|&k| r.scores[k].clone()))
                    .collect(),
            };
            changes.push(StateChange::Put {
                key: e.to_string(),
                value: encode_json_state(&saved),
            });
        }
        let progress = Progress {
            decided_through: self.decided_through,
            watermark: self.watermark,
            velocity: self.velocity.clone(),
        };
        if self.checkpointed.get(&partition) != Some(&progress) {
            self.checkpointed.insert(partition, progress.clone());
            changes.push(StateChange::Put {
                key: partition_key(PROGRESS, partition),
                value: encode_json_state(&progress),
            });
        }
        changes
    }

    fn restore(
        &mut self,
        partition: i32,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StateError> {
        let progress_key = partition_key(PROGRESS, partition);
        let later = |a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>| a.max(b);
        for (key, value) in entries {
            if key == progress_key {
                let p: Progress = decode_json_state(&key, &value)?;
                // Partitions restored one after another: the velocity of the newest checkpoint
                // (those taken together are equal; never added up, which would count twice).
                if p.watermark >= self.watermark {
                    self.velocity = p.velocity.clone();
                }
                self.decided_through = later(self.decided_through, p.decided_through);
                self.watermark = later(self.watermark, p.watermark);
                self.checkpointed.insert(partition, p);
                continue;
            }
            let entity = EntityId::new(key.clone()).map_err(|e| StateError::new(&key, e))?;
            let Saved { mut state, pending } = decode_json_state(&key, &value)?;
            state.partition = partition;
            for score in pending {
                self.rounds.entry(score.time).or_default().put(score);
            }
            self.entities.insert(entity, state);
        }
        Ok(())
    }

    /// Decides every round still waiting for scores.
    fn flush(&mut self, out: &mut Vec<Output<Decision>>) {
        let open: Vec<DateTime<Utc>> = self.rounds.keys().copied().collect();
        for t in open {
            self.close(t, out);
        }
    }
}

#[cfg(test)]
mod tests;
