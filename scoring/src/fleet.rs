//! The fleet stage: what no single entity's scorer can see.
//!
//! The per-entity [`Scorer`](crate::Scorer) scores each component from its own telemetry. The
//! fleet stage takes those scores for the whole fleet, one **round** at a time (every entity's
//! score for one window end), and adds:
//!
//! - **`peer_outlier`**: within a group of like components (configured by name pattern, or by
//!   default the entity id without its trailing number: `web-3` is in group `web`), a metric whose
//!   recent window means diverge from the group's (augurs' MAD or DBSCAN outlier detectors over the
//!   group's aligned recent rounds; MAD flags values more than `threshold` robust standard
//!   deviations from the group median) in each of the newest `persist` rounds.
//! - **`dependency`**: risk propagated along the [`DependencyGraph`] (declared in `[graph]` and
//!   observed in traces): a component whose dependency may fail may fail with it,
//!   `P = 1 - (1 - P_own) * prod_d (1 - w_d * P_d)` over its dependencies `d` (noisy-OR), with
//!   `w_d` = `dependencies.critical` for critical edges and `dependencies.other` otherwise, iterated
//!   to a fixed point (bounded by the graph's `max_depth`, so cycles terminate). A dependency
//!   scored in an earlier round counts with its latest probability while it is fresh.
//! - **blast radius and impact**: every component depending on the scored one (transitively),
//!   and `impact = 1 + sum of dependents' weights`; scores of a round are emitted in order of
//!   `probability x impact`, each with its [`Rank`] in the round.
//!
//! Until a learned failure model is promoted, the signals are combined by the same documented
//! noisy-OR prior as the scorer's; with one ([`Fleet::set_model`]), the model maps the full signal
//! vector to a calibrated probability with its bootstrap interval, and the score says
//! `method: learned` with the model's version.
//!
//! ## Rounds and determinism
//! Rounds close on an event-time **watermark** over the input partitions, as in Flink: the
//! watermark is the least, over the partitions that are not idle, of the newest score time each
//! has delivered; round `T` closes once `T + lateness` is below it. A partition the runtime has
//! assigned but that has delivered nothing yet holds the watermark back (so a consumer catching
//! up on a backlog waits for every partition); one the runtime reports as caught up
//! ([`Processor::idle`]) does not, so a quiet partition never stalls the fleet; when every
//! partition is caught up, the watermark is the newest time seen anywhere. Open rounds are
//! bounded (`max_open_rounds`): live, the runtime then pauses the partitions past the oldest
//! open round ([`Processor::held`]) until the partitions it waits for catch up, as a consumer
//! reading one partition's backlog before the next needs; without a runtime that pauses (or
//! with nothing left to wait for), the oldest round closes with what it has. So the content of
//! a round does not depend on how the partitions interleave, as long as no score is later than
//! `lateness` behind its partition, and live and replay agree. A score arriving for an already
//! closed round is scored alone at once (no peers) and counted in [`Fleet::late`]. Dependency
//! edges are applied to the graph when the first round at or after their time closes.
//!
//! The stage keeps state (open rounds, the roster, peer histories, observed edges), owned by the
//! partition of the entity it is about and checkpointed with the input offsets it reflects, like
//! the feature stage's windows. Which rounds are closed is known only from the partitions still
//! owned: a consumer that loses every partition (its group session lost while the broker is
//! away) and restores them from checkpoints older than its last rounds closes those rounds again
//! as before, with all their members, not late and one by one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use augurs::outlier::{DbscanDetector, MADDetector, OutlierDetector};
use chrono::{DateTime, TimeDelta, Utc};
use foresight_events::{
    Contributor, DependencyEdge, DependencyGraph, EntityId, GraphConfig, Origin, Output, Processor,
    Rank, RiskScore, ScoreMethod, StateChange, StateError, decode_json_state, encode_json_state,
    partitions_ahead,
};
use serde::{Deserialize, Serialize};

use crate::Bands;

/// Suffix of the model version of scores the fleet stage has completed.
pub const FLEET_VERSION: &str = "fleet-1";

/// The signal kinds the fleet stage adds.
pub const FLEET_SIGNALS: [&str; 2] = ["peer_outlier", "dependency"];

/// A named group of like components.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRule {
    /// The group's name.
    pub name: String,
    /// Entities whose id matches this regular expression belong to it (first rule wins).
    pub pattern: String,
}

/// Which outlier detector compares peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerDetector {
    /// Median absolute deviation: robust z-scores against the group median.
    Mad,
    /// Density-based clustering: a series outside the group's dense cluster.
    Dbscan,
}

/// Peer comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerConfig {
    /// Groups by name pattern, tried in order.
    pub groups: Vec<GroupRule>,
    /// Entities matching no rule are grouped by their id without a trailing number
    /// (`pump-07` -> `pump`); off: they have no peers.
    pub group_by_prefix: bool,
    /// Fewest members with the metric for a comparison.
    pub min_peers: usize,
    /// The detector.
    pub detector: PeerDetector,
    /// MAD: robust standard deviations from the group median that make an outlier (3.5 is the
    /// usual cut for modified z-scores).
    pub threshold: f64,
    /// DBSCAN: the detector's sensitivity in (0, 1).
    pub sensitivity: f64,
    /// Rounds of each member's history compared.
    pub history: usize,
    /// An outlier must be one in each of this many newest rounds.
    pub persist: usize,
    /// What a peer outlier counts as, at most (reached at twice the threshold).
    pub weight: f64,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            groups: Vec::new(),
            group_by_prefix: true,
            min_peers: 5,
            detector: PeerDetector::Mad,
            threshold: 3.5,
            sensitivity: 0.5,
            history: 6,
            persist: 2,
            weight: 0.5,
        }
    }
}

/// How dependencies pass risk on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DependencyWeights {
    /// Share of a critical dependency's failure probability its dependent inherits.
    pub critical: f64,
    /// Share of a non-critical dependency's.
    pub other: f64,
    /// A dependency's latest score counts this long (event time) after it was made.
    #[serde(with = "humantime_serde")]
    pub fresh_for: Duration,
    /// Impact of a failure: each critical dependent adds this...
    pub critical_impact: f64,
    /// ...and each other dependent this.
    pub other_impact: f64,
}

impl Default for DependencyWeights {
    fn default() -> Self {
        Self {
            critical: 0.9,
            other: 0.3,
            fresh_for: Duration::from_secs(10 * 60),
            critical_impact: 1.0,
            other_impact: 0.25,
        }
    }
}

/// Fleet stage configuration (`[scoring.fleet]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Peer comparison.
    pub peers: PeerConfig,
    /// Risk propagation along dependencies.
    pub dependencies: DependencyWeights,
    /// How far behind its partition's newest score a score may arrive and still be in its round.
    /// Unset: one window of the feature stage (the runtime fills it in), so entities a window
    /// apart still share rounds; a round then closes two windows after its end.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub lateness: Option<Duration>,
    /// Most rounds open at once. Beyond, live, the partitions ahead are paused until those the
    /// oldest round waits for catch up (or, delivering nothing, are found idle); without a
    /// runtime that pauses, the oldest is closed with what it has.
    pub max_open_rounds: usize,
    /// Most entities kept (roster, histories, latest probabilities); beyond, the least recently
    /// seen are forgotten.
    pub max_entities: usize,
    /// How often the live stage looks in Postgres for a newly promoted failure model (it takes
    /// effect from the next round, without a restart).
    #[serde(with = "humantime_serde")]
    pub model_poll: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            peers: PeerConfig::default(),
            dependencies: DependencyWeights::default(),
            lateness: None,
            max_open_rounds: 32,
            max_entities: 200_000,
            model_poll: Duration::from_secs(60),
        }
    }
}

/// An invalid fleet configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FleetConfigError {
    /// A group pattern is not a regular expression.
    #[error("scoring.fleet.peers.groups[{0}].pattern: {1}")]
    Pattern(usize, String),
    /// A number outside its range.
    #[error("scoring.fleet.{key} must be {rule}, not {value}")]
    OutOfRange {
        /// The key.
        key: &'static str,
        /// What it must be.
        rule: &'static str,
        /// What it is.
        value: f64,
    },
    /// The graph configuration is invalid.
    #[error(transparent)]
    Graph(#[from] foresight_events::GraphConfigError),
}

impl FleetConfig {
    /// Checks the configuration, reporting every problem.
    pub fn validate(&self) -> Vec<FleetConfigError> {
        let mut errors = Vec::new();
        for (i, g) in self.peers.groups.iter().enumerate() {
            if let Err(e) = regex::Regex::new(&g.pattern) {
                errors.push(FleetConfigError::Pattern(i, e.to_string()));
            }
        }
        let p = &self.peers;
        let d = &self.dependencies;
        let probability = "between 0 and 1";
        for (key, value, ok, rule) in [
            (
                "peers.weight",
                p.weight,
                (0.0..=1.0).contains(&p.weight),
                probability,
            ),
            (
                "peers.threshold",
                p.threshold,
                p.threshold.is_finite() && p.threshold > 0.0,
                "finite and positive",
            ),
            (
                "peers.sensitivity",
                p.sensitivity,
                p.sensitivity > 0.0 && p.sensitivity < 1.0,
                "strictly between 0 and 1",
            ),
            (
                "peers.min_peers",
                p.min_peers as f64,
                p.min_peers >= 3,
                "at least 3",
            ),
            (
                "peers.persist",
                p.persist as f64,
                p.persist >= 1 && p.persist <= p.history,
                "at least 1 and at most peers.history",
            ),
            (
                "dependencies.critical",
                d.critical,
                (0.0..=1.0).contains(&d.critical),
                probability,
            ),
            (
                "dependencies.other",
                d.other,
                (0.0..=1.0).contains(&d.other),
                probability,
            ),
            (
                "dependencies.critical_impact",
                d.critical_impact,
                d.critical_impact.is_finite() && d.critical_impact >= 0.0,
                "finite and at least 0",
            ),
            (
                "dependencies.other_impact",
                d.other_impact,
                d.other_impact.is_finite() && d.other_impact >= 0.0,
                "finite and at least 0",
            ),
            (
                "max_open_rounds",
                self.max_open_rounds as f64,
                self.max_open_rounds >= 1,
                "at least 1",
            ),
            (
                "max_entities",
                self.max_entities as f64,
                self.max_entities >= 1,
                "at least 1",
            ),
        ] {
            if !ok {
                errors.push(FleetConfigError::OutOfRange { key, rule, value });
            }
        }
        errors
    }
}

/// What the fleet stage takes in.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetInput {
    /// A per-entity score.
    Score(RiskScore),
    /// Calls seen in traces.
    Edge(DependencyEdge),
}

/// A learned failure model as the fleet stage uses it: the full signal vector to a calibrated
/// probability with its interval.
pub trait Predictor: std::fmt::Debug + Send {
    /// The model's version, recorded in every score it makes.
    fn version(&self) -> &str;
    /// P(failure within the horizon), lower and upper bound.
    fn predict(&self, signals: &BTreeMap<String, f64>) -> (f64, f64, f64);
}

/// What the stage keeps about one entity (its checkpointed state).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Member {
    partition: i32,
    /// Time of its newest score.
    last_time: Option<DateTime<Utc>>,
    /// Its newest final probability (lower, p, upper) and when, for its dependents.
    latest: Option<(DateTime<Utc>, [f64; 3])>,
    /// Its scores waiting in open rounds.
    pending: Vec<RiskScore>,
    /// Recent window means per metric, one per closed round it was in, oldest first.
    history: BTreeMap<String, VecDeque<f64>>,
    /// Trace edges it made (as caller) not yet applied to the graph.
    pending_edges: Vec<DependencyEdge>,
    /// Trace edges it made that are in the graph (kept to rebuild it on restore).
    edges: Vec<DependencyEdge>,
}

/// Per-partition progress (checkpointed under [`PROGRESS`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Progress {
    /// Newest score time seen on the partition.
    newest: Option<DateTime<Utc>>,
    /// Rounds up to this time are closed.
    closed_until: Option<DateTime<Utc>>,
    /// Caught up with its input (runtime state, not checkpointed).
    #[serde(skip)]
    idle: bool,
}

/// The name of a partition's progress among its checkpoint's entries
/// ([`foresight_events::partition_key`]).
const PROGRESS: &str = "progress";

/// The fleet stage: per-entity scores in, fleet-aware ranked scores out.
#[derive(Debug)]
pub struct Fleet {
    config: FleetConfig,
    bands: Bands,
    groups: Vec<(String, regex::Regex)>,
    graph: DependencyGraph,
    graph_config: GraphConfig,
    members: BTreeMap<EntityId, Member>,
    progress: BTreeMap<i32, Progress>,
    /// Open rounds: time -> entities with a pending score for it.
    open: BTreeMap<DateTime<Utc>, BTreeSet<EntityId>>,
    closed_until: Option<DateTime<Utc>>,
    dirty: BTreeSet<EntityId>,
    removed: BTreeMap<i32, BTreeSet<EntityId>>,
    model: Option<Box<dyn Predictor>>,
    late: u64,
    redelivered: u64,
    /// The runtime pauses the partitions [`Processor::held`] names: beyond the bound on open
    /// rounds, wait for the partitions behind instead of closing with what there is.
    hold: bool,
}

impl Fleet {
    /// A fleet stage with the scorer's bands, its own configuration and the dependency graph's.
    pub fn new(
        config: FleetConfig,
        bands: Bands,
        graph: GraphConfig,
    ) -> Result<Self, Vec<FleetConfigError>> {
        let mut errors = config.validate();
        errors.extend(graph.validate().into_iter().map(FleetConfigError::Graph));
        if !errors.is_empty() {
            return Err(errors);
        }
        let groups = config
            .peers
            .groups
            .iter()
            .map(|g| {
                let re = regex::Regex::new(&g.pattern).expect("validated above");
                (g.name.clone(), re)
            })
            .collect();
        Ok(Self {
            graph: DependencyGraph::new(graph.clone()),
            graph_config: graph,
            config,
            bands,
            groups,
            members: BTreeMap::new(),
            progress: BTreeMap::new(),
            open: BTreeMap::new(),
            closed_until: None,
            dirty: BTreeSet::new(),
            removed: BTreeMap::new(),
            model: None,
            late: 0,
            redelivered: 0,
            hold: false,
        })
    }

    /// Replaces the failure model (`None`: back to the prior). Takes effect from the next round.
    pub fn set_model(&mut self, model: Option<Box<dyn Predictor>>) {
        self.model = model;
    }

    /// Scores that arrived after their round had closed.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Scores received again after their round had scored them (dropped).
    pub fn redelivered(&self) -> u64 {
        self.redelivered
    }

    /// The dependency graph as the stage knows it now.
    pub fn graph(&self) -> &DependencyGraph {
        &self.graph
    }

    /// The group of an entity, if it has one.
    pub fn group_of(&self, entity: &EntityId) -> Option<String> {
        let id = entity.as_str();
        if let Some((name, _)) = self.groups.iter().find(|(_, re)| re.is_match(id)) {
            return Some(name.clone());
        }
        if !self.config.peers.group_by_prefix {
            return None;
        }
        let stem = id.trim_end_matches(|c: char| c.is_ascii_digit());
        if stem.len() == id.len() || stem.is_empty() {
            return None;
        }
        let stem = stem.trim_end_matches(['-', '_', '.', ':', '/']);
        (!stem.is_empty()).then(|| stem.to_owned())
    }

    fn member(&mut self, entity: &EntityId, partition: i32) -> &mut Member {
        self.dirty.insert(entity.clone());
        let m = self.members.entry(entity.clone()).or_default();
        m.partition = partition;
        m
    }

    /// The watermark: the least newest time over the partitions that are not idle (`None` while
    /// one of them has delivered nothing); the newest time anywhere when all are idle.
    pub fn watermark(&self) -> Option<DateTime<Utc>> {
        let mut active = self.progress.values().filter(|p| !p.idle).peekable();
        if active.peek().is_none() {
            return self.progress.values().filter_map(|p| p.newest).max();
        }
        active.map(|p| p.newest).min().flatten()
    }

    /// The time the watermark must pass for round `t` to close: `t` and the lateness.
    fn due(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let lateness = self.config.lateness.unwrap_or(Duration::from_secs(60));
        t.checked_add_signed(TimeDelta::from_std(lateness).unwrap_or(TimeDelta::MAX))
    }

    /// Whether round `t` can close: the watermark has passed it by the lateness.
    fn closable(&self, t: DateTime<Utc>) -> bool {
        self.watermark()
            .is_some_and(|w| self.due(t).is_some_and(|x| x < w))
    }

    /// With the runtime pausing partitions, and a partition still holding round `t` back: the
    /// partitions past it ([`foresight_events::partitions_ahead`]). Then the bound does not
    /// close the round.
    fn ahead_of(&self, t: DateTime<Utc>) -> Option<Vec<i32>> {
        if !self.hold {
            return None;
        }
        let progress = self.progress.iter().map(|(&k, p)| (k, p.newest, p.idle));
        partitions_ahead(progress, self.due(t).unwrap_or(DateTime::<Utc>::MAX_UTC))
    }

    fn close_ready(&mut self, out: &mut Vec<Output<RiskScore>>) {
        loop {
            let Some(&t) = self.open.keys().next() else {
                return;
            };
            let bound = self.open.len() > self.config.max_open_rounds;
            if self.closable(t) || (bound && self.ahead_of(t).is_none()) {
                self.close(t, out);
            } else {
                return;
            }
        }
    }

    /// Closes round `t`: applies the edges up to it, scores its members together, emits them
    /// ranked.
    fn close(&mut self, t: DateTime<Utc>, out: &mut Vec<Output<RiskScore>>) {
        let entities = self.open.remove(&t).unwrap_or_default();
        let mut round = Vec::with_capacity(entities.len());
        for e in &entities {
            let m = self
                .members
                .get_mut(e)
                .expect("members of open rounds exist");
            if let Some(i) = m.pending.iter().position(|s| s.time == t) {
                round.push(m.pending.remove(i));
            }
            self.dirty.insert(e.clone());
        }
        self.closed_until = Some(self.closed_until.map_or(t, |c| c.max(t)));
        for p in self.progress.values_mut() {
            p.closed_until = self.closed_until;
        }
        self.apply_edges(t);
        self.score_round(t, round, true, out);
    }

    fn apply_edges(&mut self, t: DateTime<Utc>) {
        let mut ready = Vec::new();
        for (e, m) in &mut self.members {
            if m.pending_edges.iter().any(|x| x.time <= t) {
                let (now, later): (Vec<_>, Vec<_>) =
                    m.pending_edges.drain(..).partition(|x| x.time <= t);
                m.pending_edges = later;
                ready.extend(now.iter().cloned());
                m.edges.extend(now);
                bound_edges(&mut m.edges, self.graph_config.max_edges);
                self.dirty.insert(e.clone());
            }
        }
        for edge in &ready {
            self.graph.observe(edge);
        }
        self.graph.expire(t);
    }

    /// Scores one round: peers, dependencies, the model or the prior, impact, rank.
    fn score_round(
        &mut self,
        t: DateTime<Utc>,
        mut round: Vec<RiskScore>,
        with_peers: bool,
        out: &mut Vec<Output<RiskScore>>,
    ) {
        round.sort_by(|a, b| a.entity.cmp(&b.entity));
        // Peers: each member's history gets this round's means first.
        let hist = self.config.peers.history;
        for s in &round {
            let m = self
                .members
                .get_mut(&s.entity)
                .expect("scored members exist");
            for (metric, v) in &s.observed {
                // The metric's name is copied only the first time it is met.
                let h = match m.history.get_mut(metric) {
                    Some(h) => h,
                    None => m.history.entry(metric.clone()).or_default(),
                };
                h.push_back(*v);
                while h.len() > hist {
                    h.pop_front();
                }
            }
            m.history.retain(|k, _| s.observed.contains_key(k));
        }
        let peers = if with_peers {
            self.peer_signals(&round)
        } else {
            BTreeMap::new()
        };
        // Own probability (entity signals + peers), before dependencies.
        let mut own: BTreeMap<EntityId, [f64; 3]> = BTreeMap::new();
        for s in &round {
            let peer = peers.get(&s.entity).map_or(0.0, |c| c.probability);
            let p = match &self.model {
                Some(model) => {
                    let mut signals = s.signals.clone();
                    signals.insert("peer_outlier".into(), peer);
                    signals.insert("dependency".into(), 0.0);
                    let (p, l, u) = model.predict(&signals);
                    [l, p, u]
                }
                None => {
                    let or = |x: f64| 1.0 - (1.0 - x) * (1.0 - peer);
                    [or(s.lower), or(s.probability), or(s.upper)]
                }
            };
            own.insert(s.entity.clone(), p);
        }
        let total = self.propagate(t, &own);
        let d = &self.config.dependencies;
        let mut scored = Vec::with_capacity(round.len());
        for mut s in round {
            let entity = s.entity.clone();
            let mut deps: Vec<(f64, EntityId, bool, f64)> = Vec::new();
            for (dep, critical) in self.graph.dependencies_of(&entity) {
                let w = if critical { d.critical } else { d.other };
                let pd = total
                    .get(dep)
                    .copied()
                    .or_else(|| self.fresh(dep, t))
                    .map_or(0.0, |p| p[1]);
                if w * pd > 0.0 {
                    deps.push((w * pd, dep.clone(), critical, pd));
                }
            }
            deps.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            let dep_strength = 1.0 - deps.iter().map(|x| 1.0 - x.0).product::<f64>();
            let peer = peers.get(&entity).cloned();
            s.signals.insert(
                "peer_outlier".into(),
                peer.as_ref().map_or(0.0, |c| c.probability),
            );
            s.signals.insert("dependency".into(), dep_strength);
            let [lower, p, upper] = match &self.model {
                Some(model) => {
                    let (p, l, u) = model.predict(&s.signals);
                    [l, p, u]
                }
                None => total[&entity],
            };
            let upper = upper.clamp(p, 1.0);
            let lower = lower.clamp(0.0, p);
            s.probability = p;
            s.lower = lower;
            s.upper = upper;
            s.health = (100.0 * (1.0 - p)).clamp(0.0, 100.0);
            s.band = self.bands.of(p);
            if let Some(c) = peer {
                s.contributors.push(c);
            }
            if let Some((strength, dep, critical, pd)) = deps.first() {
                s.contributors.push(Contributor {
                    forecast_interval: None,
                    signal: "dependency".into(),
                    metric: None,
                    probability: *strength,
                    value: *pd,
                    detail: format!(
                        "depends on {dep} ({}), whose failure probability is {pd:.3}{}",
                        if *critical {
                            "critical"
                        } else {
                            "not critical"
                        },
                        if deps.len() > 1 {
                            format!(" (and {} more at risk)", deps.len() - 1)
                        } else {
                            String::new()
                        }
                    ),
                });
            }
            s.contributors.sort_by(|a, b| {
                b.probability
                    .total_cmp(&a.probability)
                    .then_with(|| a.signal.cmp(&b.signal))
                    .then_with(|| a.metric.cmp(&b.metric))
            });
            s.blast_radius = self.graph.blast_radius(&entity);
            s.impact = 1.0
                + s.blast_radius
                    .iter()
                    .map(|x| {
                        if x.critical {
                            d.critical_impact
                        } else {
                            d.other_impact
                        }
                    })
                    .sum::<f64>();
            let (method, version) = match &self.model {
                Some(model) => (ScoreMethod::Learned, model.version().to_owned()),
                None => (s.method, s.model_version.clone()),
            };
            s.method = method;
            s.model_version = format!("{version}+{FLEET_VERSION}");
            let m = self.members.get_mut(&entity).expect("scored members exist");
            m.latest = Some((s.time, [lower, p, upper]));
            scored.push(s);
        }
        scored.sort_by(|a, b| {
            b.priority()
                .total_cmp(&a.priority())
                .then_with(|| a.entity.cmp(&b.entity))
        });
        let of = scored.len() as u32;
        for (i, mut s) in scored.into_iter().enumerate() {
            s.rank = Some(Rank {
                position: i as u32 + 1,
                of,
            });
            out.push(Output::Event(s));
        }
    }

    /// A dependency's latest probability, if it is fresh at `t`.
    fn fresh(&self, entity: &EntityId, t: DateTime<Utc>) -> Option<[f64; 3]> {
        let fresh =
            TimeDelta::from_std(self.config.dependencies.fresh_for).unwrap_or(TimeDelta::MAX);
        let (at, p) = self.members.get(entity)?.latest?;
        (at <= t && t.signed_duration_since(at) <= fresh).then_some(p)
    }

    /// Noisy-OR propagation of the round's own probabilities (lower, p, upper) along the graph,
    /// iterated to a fixed point or `max_depth` times.
    fn propagate(
        &self,
        t: DateTime<Utc>,
        own: &BTreeMap<EntityId, [f64; 3]>,
    ) -> BTreeMap<EntityId, [f64; 3]> {
        let d = &self.config.dependencies;
        let mut total = own.clone();
        for _ in 0..self.graph_config.max_depth {
            let mut next = BTreeMap::new();
            let mut changed = false;
            for (e, p) in own {
                let mut none = [1.0 - p[0], 1.0 - p[1], 1.0 - p[2]];
                for (dep, critical) in self.graph.dependencies_of(e) {
                    let w = if critical { d.critical } else { d.other };
                    let Some(pd) = total.get(dep).copied().or_else(|| self.fresh(dep, t)) else {
                        continue;
                    };
                    for k in 0..3 {
                        none[k] *= 1.0 - w * pd[k];
                    }
                }
                let v = [1.0 - none[0], 1.0 - none[1], 1.0 - none[2]];
                if total
                    .get(e)
                    .is_none_or(|old| old.iter().zip(&v).any(|(a, b)| (a - b).abs() > 1e-12))
                {
                    changed = true;
                }
                next.insert(e.clone(), v);
            }
            total = next;
            if !changed {
                break;
            }
        }
        total
    }

    /// Peer outliers of the round, per entity the strongest over its metrics.
    fn peer_signals(&self, round: &[RiskScore]) -> BTreeMap<EntityId, Contributor> {
        let p = &self.config.peers;
        // Each member looked up once per round, not once per metric.
        let mut by_group: BTreeMap<String, Vec<(&EntityId, &Member)>> = BTreeMap::new();
        for s in round {
            if let Some(g) = self.group_of(&s.entity) {
                let member = &self.members[&s.entity];
                by_group.entry(g).or_default().push((&s.entity, member));
            }
        }
        let mut found: BTreeMap<EntityId, Contributor> = BTreeMap::new();
        let mut values = Vec::new();
        for (group, entities) in by_group {
            if entities.len() < p.min_peers {
                continue;
            }
            let mut metrics: BTreeSet<&String> = BTreeSet::new();
            for (_, m) in &entities {
                metrics.extend(m.history.keys());
            }
            for metric in metrics {
                let members: Vec<(&EntityId, &VecDeque<f64>)> = entities
                    .iter()
                    .filter_map(|(e, m)| {
                        let h = m.history.get(metric)?;
                        (h.len() >= p.persist).then_some((*e, h))
                    })
                    .collect();
                if members.len() < p.min_peers {
                    continue;
                }
                // Every member's newest `len` values, row after row in one buffer.
                let len = members.iter().map(|(_, h)| h.len()).min().unwrap_or(0);
                values.clear();
                for (_, h) in &members {
                    values.extend(h.range(h.len() - len..));
                }
                let rows: Vec<&[f64]> = values.chunks_exact(len).collect();
                let Some(scores) = self.detect(&rows) else {
                    continue;
                };
                for ((entity, h), score) in members.iter().zip(scores) {
                    if score.is_empty() {
                        continue;
                    }
                    let newest = &score[score.len().saturating_sub(p.persist)..];
                    let Some(weakest) = newest.iter().copied().reduce(f64::min) else {
                        continue;
                    };
                    let threshold = match p.detector {
                        PeerDetector::Mad => p.threshold,
                        PeerDetector::Dbscan => 0.5,
                    };
                    if weakest.is_nan() || weakest <= threshold {
                        continue;
                    }
                    let strength = match p.detector {
                        PeerDetector::Mad => {
                            (0.5 + 0.5 * (weakest - p.threshold) / p.threshold).clamp(0.5, 1.0)
                        }
                        PeerDetector::Dbscan => 1.0,
                    };
                    let probability = p.weight * strength;
                    let value = *h.back().expect("persist >= 1 values");
                    let better = found
                        .get(*entity)
                        .is_none_or(|c| probability > c.probability);
                    if better {
                        found.insert(
                            (*entity).clone(),
                            Contributor {
 forecast_interval: None,
                                signal: "peer_outlier".into(),
                                metric: Some(metric.clone()),
                                probability,
                                value: weakest,
                                detail: format!(
                                    "{metric} = {value:.3} diverges from its {} peers in group {group} for {} round(s) (outlier score {weakest:.2})",
                                    members.len() - 1,
                                    p.persist
                                ),
                            },
                        );
                    }
                }
            }
        }
        found
    }

    /// Per-series, per-point outlier scores of aligned series, or `None` when the detector
    /// cannot judge them (e.g. no spread at all).
    fn detect(&self, rows: &[&[f64]]) -> Option<Vec<Vec<f64>>> {
        let p = &self.config.peers;
        let output = match p.detector {
            PeerDetector::Mad => {
                let d = MADDetector::with_threshold(p.threshold);
                d.preprocess(rows).and_then(|x| d.detect(&x)).ok()?
            }
            PeerDetector::Dbscan => {
                let d = DbscanDetector::with_sensitivity(p.sensitivity).ok()?;
                d.preprocess(rows).and_then(|x| d.detect(&x)).ok()?
            }
        };
        Some(
            output
                .series_results
                .into_iter()
                .map(|s| {
                    s.scores
                        .into_iter()
                        .map(|v| if v.is_nan() { 0.0 } else { v })
                        .collect()
                })
                .collect(),
        )
    }

    /// Forgets the least recently seen entities beyond `max_entities`.
    fn bound(&mut self) {
        let excess = self.members.len().saturating_sub(self.config.max_entities);
        if excess == 0 {
            return;
        }
        let mut idle: Vec<(Option<DateTime<Utc>>, EntityId)> = self
            .members
            .iter()
            .filter(|(_, m)| m.pending.is_empty())
            .map(|(e, m)| (m.last_time, e.clone()))
            .collect();
        idle.sort();
        for (_, e) in idle.into_iter().take(excess) {
            if let Some(m) = self.members.remove(&e) {
                self.removed
                    .entry(m.partition)
                    .or_default()
                    .insert(e.clone());
                self.dirty.remove(&e);
            }
        }
    }
}

fn bound_edges(edges: &mut Vec<DependencyEdge>, max: usize) {
    // One aggregate per callee is enough to rebuild the graph: merge, newest time wins.
    let mut merged: BTreeMap<EntityId, DependencyEdge> = BTreeMap::new();
    for e in edges.drain(..) {
        merged
            .entry(e.callee.clone())
            .and_modify(|m| {
                m.calls += e.calls;
                m.errors += e.errors;
                m.latency_ms_sum += e.latency_ms_sum;
                m.latency_ms_max = m.latency_ms_max.max(e.latency_ms_max);
                m.time = m.time.max(e.time);
            })
            .or_insert(e);
    }
    let mut v: Vec<DependencyEdge> = merged.into_values().collect();
    if v.len() > max {
        v.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.callee.cmp(&b.callee)));
        v.truncate(max);
        v.sort_by(|a, b| a.callee.cmp(&b.callee));
    }
    *edges = v;
}

impl Processor for Fleet {
    type Input = FleetInput;
    type Output = RiskScore;

    fn process(&mut self, input: FleetInput, origin: Origin, out: &mut Vec<Output<RiskScore>>) {
        match input {
            FleetInput::Edge(edge) => {
                let m = self.member(&edge.caller, origin.partition);
                m.pending_edges.push(edge);
                if m.pending_edges.len() > 1024 {
                    // Bounded: merge pending edges per callee (nothing is lost but granularity).
                    let mut pending = std::mem::take(&mut m.pending_edges);
                    bound_edges(&mut pending, usize::MAX);
                    m.pending_edges = pending;
                }
                return;
            }
            FleetInput::Score(score) => {
                let t = score.time;
                let entity = score.entity.clone();
                let progress = self.progress.entry(origin.partition).or_default();
                progress.newest = Some(progress.newest.map_or(t, |n| n.max(t)));
                progress.closed_until = self.closed_until;
                progress.idle = false;
                let late = self.closed_until.is_some_and(|c| t <= c);
                let m = self.member(&entity, origin.partition);
                // An entity's scores come in time order (its windows close in order), so one
                // for a closed round at or before its newest is a redelivery (a restarted
                // upstream stage re-emitting what it emitted before its last checkpoint): its
                // round has scored it already, and scoring it again alone would publish its id
                // with other content.
                let redelivered = late && m.last_time.is_some_and(|l| t <= l);
                m.last_time = Some(m.last_time.map_or(t, |l| l.max(t)));
                if redelivered {
                    self.redelivered += 1;
                } else if late {
                    self.late += 1;
                    self.score_round(t, vec![score], false, out);
                } else {
                    m.pending.retain(|s| s.time != t);
                    m.pending.push(score);
                    self.open.entry(t).or_default().insert(entity);
                }
            }
        }
        self.close_ready(out);
        self.bound();
    }

    fn flush(&mut self, out: &mut Vec<Output<RiskScore>>) {
        while let Some(&t) = self.open.keys().next() {
            self.close(t, out);
        }
    }

    fn watches_partitions(&self) -> bool {
        true
    }

    fn assigned(&mut self, partition: i32) {
        self.progress.entry(partition).or_default().idle = false;
    }

    fn hold_partitions(&mut self) {
        self.hold = true;
    }

    /// With the bound on open rounds reached: the partitions past the oldest open round's due
    /// time, while some partition still holds that round back.
    fn held(&self) -> Vec<i32> {
        if !self.hold || self.open.len() < self.config.max_open_rounds {
            return Vec::new();
        }
        let Some(&t) = self.open.keys().next() else {
            return Vec::new();
        };
        self.ahead_of(t).unwrap_or_default()
    }

    fn idle(&mut self, partition: i32, out: &mut Vec<Output<RiskScore>>) {
        let p = self.progress.entry(partition).or_default();
        if !p.idle {
            p.idle = true;
            self.close_ready(out);
        }
    }

    fn forget_partition(&mut self, partition: i32) {
        let gone: Vec<EntityId> = self
            .members
            .iter()
            .filter(|(_, m)| m.partition == partition)
            .map(|(e, _)| e.clone())
            .collect();
        for e in gone {
            self.members.remove(&e);
            self.dirty.remove(&e);
            for entities in self.open.values_mut() {
                entities.remove(&e);
            }
        }
        self.open.retain(|_, v| !v.is_empty());
        self.progress.remove(&partition);
        self.removed.remove(&partition);
        // Which rounds are closed is known only from the partitions still owned: kept from the
        // revoked ones, it would make scores read again after a restore from an older
        // checkpoint late (scored alone), and close their rounds anew with part of the fleet.
        self.closed_until = self.progress.values().filter_map(|p| p.closed_until).max();
        self.rebuild_graph();
    }

    fn stateful(&self) -> bool {
        true
    }

    fn checkpoint(&mut self, partition: i32) -> Vec<StateChange> {
        let mut changes = Vec::new();
        let dirty: Vec<EntityId> = self
            .dirty
            .iter()
            .filter(|e| {
                self.members
                    .get(*e)
                    .is_some_and(|m| m.partition == partition)
            })
            .cloned()
            .collect();
        for e in dirty {
            self.dirty.remove(&e);
            changes.push(StateChange::Put {
                key: e.to_string(),
                value: encode_json_state(&self.members[&e]),
            });
        }
        for e in self.removed.remove(&partition).unwrap_or_default() {
            changes.push(StateChange::Delete { key: e.to_string() });
        }
        if let Some(p) = self.progress.get(&partition) {
            changes.push(StateChange::Put {
                key: foresight_events::partition_key(PROGRESS, partition),
                value: encode_json_state(p),
            });
        }
        changes
    }

    fn restore(
        &mut self,
        partition: i32,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StateError> {
        let progress_key = foresight_events::partition_key(PROGRESS, partition);
        for (key, value) in entries {
            if key == progress_key {
                let p: Progress = decode_json_state(&key, &value)?;
                if let Some(c) = p.closed_until {
                    self.closed_until = Some(self.closed_until.map_or(c, |x| x.max(c)));
                }
                self.progress.insert(partition, p);
                continue;
            }
            let entity = EntityId::new(key.clone()).map_err(|e| StateError::new(&key, e))?;
            let mut m: Member = decode_json_state(&key, &value)?;
            m.partition = partition;
            for s in &m.pending {
                self.open.entry(s.time).or_default().insert(entity.clone());
            }
            self.members.insert(entity, m);
        }
        self.rebuild_graph();
        Ok(())
    }
}

impl Predictor for crate::model::FailureModel {
    fn version(&self) -> &str {
        crate::model::FailureModel::version(self)
    }

    fn predict(&self, signals: &BTreeMap<String, f64>) -> (f64, f64, f64) {
        let p = crate::model::FailureModel::predict(self, signals);
        (p.probability, p.lower, p.upper)
    }
}

impl Fleet {
    /// The version of the failure model in use, if one is.
    pub fn model_version(&self) -> Option<&str> {
        self.model.as_ref().map(|m| m.version())
    }

    fn rebuild_graph(&mut self) {
        self.graph = DependencyGraph::new(self.graph_config.clone());
        for m in self.members.values() {
            for e in &m.edges {
                self.graph.observe(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use foresight_events::{DeclaredDependency, EventId};

    use super::*;

    fn id(s: &str) -> EntityId {
        EntityId::new(s).unwrap()
    }

    fn at(minute: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(minute * 60, 0).unwrap()
    }

    fn score(entity: &str, minute: i64, p: f64, cpu: f64) -> RiskScore {
        RiskScore {
            entity: id(entity),
            time: at(minute),
            window_id: EventId::derive("w", &[entity.as_bytes(), &minute.to_le_bytes()]),
            horizon_seconds: 1800,
            probability: p,
            lower: p * 0.8,
            upper: (p * 1.2).min(1.0),
            time_to_failure_seconds: None,
            health: 100.0 * (1.0 - p),
            band: Bands::default().of(p),
            contributors: vec![],
            method: ScoreMethod::Prior,
            model_version: "prior".into(),
            signals: BTreeMap::new(),
            observed: [("cpu".to_string(), cpu)].into(),
            blast_radius: vec![],
            impact: 1.0,
            rank: None,
        }
    }

    fn fleet(graph: GraphConfig) -> Fleet {
        Fleet::new(FleetConfig::default(), Bands::default(), graph).unwrap()
    }

    fn origin(partition: i32, offset: i64) -> Origin {
        Origin {
            input: 0,
            partition,
            offset,
        }
    }

    fn run(f: &mut Fleet, inputs: &[(i32, RiskScore)]) -> Vec<RiskScore> {
        let mut out = Vec::new();
        for (i, (p, s)) in inputs.iter().enumerate() {
            f.process(FleetInput::Score(s.clone()), origin(*p, i as i64), &mut out);
        }
        out.into_iter()
            .map(|o| match o {
                Output::Event(s) => s,
                Output::Rejected(r) => panic!("{r:?}"),
            })
            .collect()
    }

    /// The entries a checkpoint puts, as a restore takes them.
    fn puts(changes: Vec<StateChange>) -> Vec<(String, Vec<u8>)> {
        changes
            .into_iter()
            .filter_map(StateChange::into_put)
            .collect()
    }

    fn web_fleet(rounds: i64) -> Vec<(i32, RiskScore)> {
        let mut v = Vec::new();
        for minute in 0..rounds {
            for n in 1..=6 {
                let noise = ((n * 7 + minute * 3) % 5) as f64 * 0.4;
                // web-6 runs hot for the last three rounds; the others hover around 50 %.
                let cpu = if n == 6 && minute >= rounds - 3 {
                    97.0
                } else {
                    50.0 + noise
                };
                v.push((
                    (n % 2) as i32,
                    score(&format!("web-{n}"), minute, 0.05, cpu),
                ));
            }
        }
        v
    }

    #[test]
    fn a_member_diverging_from_its_peers_is_a_peer_outlier() {
        let mut f = fleet(GraphConfig::default());
        let mut out = run(&mut f, &web_fleet(8));
        let mut rest = Vec::new();
        f.flush(&mut rest);
        out.extend(rest.into_iter().map(|o| match o {
            Output::Event(s) => s,
            Output::Rejected(_) => unreachable!(),
        }));
        assert_eq!(out.len(), 48, "every score comes out once");
        let last: Vec<&RiskScore> = out.iter().filter(|s| s.time == at(7)).collect();
        let hot = last.iter().find(|s| s.entity == id("web-6")).unwrap();
        let peer = hot
            .contributors
            .iter()
            .find(|c| c.signal == "peer_outlier")
            .expect("web-6 is a peer outlier");
        assert_eq!(peer.metric.as_deref(), Some("cpu"));
        assert!(hot.probability > 0.4, "{hot:?}");
        assert_eq!(hot.signals["peer_outlier"], peer.probability);
        assert_eq!(
            hot.rank,
            Some(Rank { position: 1, of: 6 }),
            "the riskiest ranks first"
        );
        for s in last.iter().filter(|s| s.entity != id("web-6")) {
            assert_eq!(s.signals["peer_outlier"], 0.0, "{s:?}");
            assert!((s.probability - 0.05).abs() < 1e-12);
        }
        // One hot round is not enough (persist = 2): minute 5 has no outlier yet.
        let early = out
            .iter()
            .find(|s| s.time == at(5) && s.entity == id("web-6"))
            .unwrap();
        assert_eq!(early.signals["peer_outlier"], 0.0);
        assert_eq!(f.group_of(&id("web-6")).as_deref(), Some("web"));
        assert_eq!(f.group_of(&id("db")), None);
    }

    #[test]
    fn risk_propagates_along_dependencies_with_blast_radius_and_impact() {
        let dep = |a: &str, b: &str, critical| DeclaredDependency {
            dependent: id(a),
            dependency: id(b),
            critical,
        };
        let mut f = fleet(GraphConfig {
            dependencies: vec![
                dep("checkout", "payments", true),
                dep("payments", "db", true),
                dep("search", "db", false),
            ],
            ..GraphConfig::default()
        });
        let round = |m| {
            vec![
                (0, score("checkout", m, 0.01, 10.0)),
                (1, score("payments", m, 0.02, 10.0)),
                (0, score("search", m, 0.01, 10.0)),
                (1, score("db", m, if m == 0 { 0.01 } else { 0.9 }, 10.0)),
            ]
        };
        let mut inputs = round(0);
        inputs.extend(round(1));
        inputs.extend(round(2));
        inputs.extend(round(3));
        let out = run(&mut f, &inputs);
        let r1: BTreeMap<&str, &RiskScore> = out
            .iter()
            .filter(|s| s.time == at(1))
            .map(|s| (s.entity.as_str(), s))
            .collect();
        assert_eq!(r1.len(), 4);
        let payments = 1.0 - (1.0 - 0.02) * (1.0 - 0.9 * 0.9);
        assert!((r1["payments"].probability - payments).abs() < 1e-9);
        let checkout = 1.0 - (1.0 - 0.01) * (1.0 - 0.9 * payments);
        assert!((r1["checkout"].probability - checkout).abs() < 1e-9);
        let search = 1.0 - (1.0 - 0.01) * (1.0 - 0.3 * 0.9);
        assert!((r1["search"].probability - search).abs() < 1e-9);
        let why = &r1["checkout"].contributors[0];
        assert_eq!(why.signal, "dependency");
        assert!(why.detail.contains("payments"), "{why:?}");
        let db = r1["db"];
        let radius: Vec<&str> = db.blast_radius.iter().map(|d| d.entity.as_str()).collect();
        assert_eq!(radius, ["payments", "search", "checkout"]);
        assert!((db.impact - (1.0 + 1.0 + 0.25 + 1.0)).abs() < 1e-12);
        assert_eq!(
            db.rank.unwrap().position,
            1,
            "highest probability x impact first"
        );
        assert!(db.model_version.ends_with("+fleet-1"));
        let ranks: Vec<u32> = out
            .iter()
            .filter(|s| s.time == at(1))
            .map(|s| s.rank.unwrap().position)
            .collect();
        assert_eq!(ranks, [1, 2, 3, 4], "emitted in rank order");
        // Rounds 2 and 3 are still open: the watermark (minute 3) has not passed them by the
        // lateness (a minute).
        assert!(out.iter().all(|s| s.time < at(2)));
        // Caught-up partitions hold nothing back, but the lateness still applies: round 2 waits
        // for a score past minute 3.
        let mut rest = Vec::new();
        f.idle(0, &mut rest);
        f.idle(1, &mut rest);
        assert!(rest.is_empty());
        // A partition assigned but silent holds the watermark back until it is caught up.
        let mut g = fleet(GraphConfig::default());
        g.assigned(2);
        assert!(run(&mut g, &web_fleet(4)).is_empty());
        assert_eq!(g.watermark(), None);
        g.idle(2, &mut rest);
        assert_eq!(
            rest.len(),
            12,
            "rounds 0 and 1 close once partition 2 is caught up"
        );
    }

    #[test]
    fn rounds_do_not_depend_on_how_partitions_interleave() {
        let inputs = web_fleet(8);
        let (p0, p1): (Vec<_>, Vec<_>) = inputs.iter().cloned().partition(|(p, _)| *p == 0);
        // Partition 1 far behind partition 0, as when a consumer catches up unevenly.
        let mut skewed = Vec::new();
        let (mut a, mut b) = (p0.into_iter(), p1.into_iter());
        loop {
            let (x, y) = (a.next(), a.next());
            let z = b.next();
            if x.is_none() && z.is_none() {
                break;
            }
            skewed.extend(x);
            skewed.extend(y);
            skewed.extend(z);
        }
        let by_id = |v: Vec<RiskScore>| -> BTreeMap<EventId, RiskScore> {
            v.into_iter()
                .map(|s| (foresight_events::EventData::id(&s), s))
                .collect()
        };
        let mut f1 = fleet(GraphConfig::default());
        let mut f2 = fleet(GraphConfig::default());
        let one = run(&mut f1, &inputs);
        let two = run(&mut f2, &skewed);
        assert!(!one.is_empty());
        assert_eq!(by_id(one), by_id(two));
        assert_eq!(f2.late(), 0);
    }

    /// Reads each partition's inputs in one go, the lowest partition first, as a consumer
    /// catching up on a backlog does (one partition's fetched batch before the next's), and
    /// pauses what the fleet holds, as the live runtime does (which first tells it of every
    /// partition assigned).
    fn run_catching_up(f: &mut Fleet, inputs: &[(i32, RiskScore)]) -> Vec<RiskScore> {
        let mut queues: BTreeMap<i32, VecDeque<RiskScore>> = BTreeMap::new();
        for (p, s) in inputs {
            queues.entry(*p).or_default().push_back(s.clone());
        }
        for &p in queues.keys() {
            f.assigned(p);
        }
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let held = f.held();
            let Some((&p, queue)) = queues
                .iter_mut()
                .find(|(p, q)| !q.is_empty() && !held.contains(p))
            else {
                break;
            };
            let s = queue.pop_front().expect("not empty");
            f.process(FleetInput::Score(s), origin(p, offset), &mut out);
            offset += 1;
        }
        assert!(
            queues.values().all(VecDeque::is_empty),
            "every partition held: {:?}",
            f.held()
        );
        out.into_iter()
            .map(|o| match o {
                Output::Event(s) => s,
                Output::Rejected(r) => panic!("{r:?}"),
            })
            .collect()
    }

    #[test]
    fn beyond_the_bound_on_open_rounds_partitions_ahead_are_held_not_rounds_closed() {
        // A consumer catching up after an outage reads one partition's whole backlog before the
        // next one's. With more rounds in it than the bound allows open, closing the oldest
        // with what it has would publish ids once in full rounds and again in partial ones.
        let config = FleetConfig {
            max_open_rounds: 3,
            ..FleetConfig::default()
        };
        let new = || Fleet::new(config.clone(), Bands::default(), GraphConfig::default()).unwrap();
        let inputs = web_fleet(12);
        let by_id = |v: Vec<RiskScore>| -> BTreeMap<EventId, RiskScore> {
            v.into_iter()
                .map(|s| (foresight_events::EventData::id(&s), s))
                .collect()
        };
        let mut in_order = new();
        let want = by_id(run(&mut in_order, &inputs));
        assert!(want.len() >= 50, "{}", want.len());

        // Held: the same rounds, content for content, and none late.
        let mut held = new();
        held.hold_partitions();
        assert_eq!(by_id(run_catching_up(&mut held, &inputs)), want);
        assert_eq!((held.late(), held.redelivered()), (0, 0));

        // Not held (no runtime pausing: replay, or a processor alone), the bound closes rounds
        // with partition 0's members only, and partition 1's scores of them come late.
        let mut unheld = new();
        let got = by_id(run_catching_up(&mut unheld, &inputs));
        assert_ne!(got, want);
        assert!(unheld.late() > 0);
    }

    #[test]
    fn redelivered_scores_of_closed_rounds_are_dropped_and_late_ones_scored_alone() {
        let inputs = web_fleet(8);
        let mut f = fleet(GraphConfig::default());
        let first = run(&mut f, &inputs);
        assert!(f.closed_until.is_some());
        // An upstream stage restarted and re-emits what it had emitted: nothing new comes out,
        // so no id is published again with other content.
        let again = run(&mut f, &inputs[..18]);
        assert!(again.is_empty(), "{again:?}");
        assert_eq!((f.redelivered(), f.late()), (18, 0));
        // A score that is new but late (an entity first heard of after its round closed) is
        // still scored, alone.
        let late = run(&mut f, &[(0, score("web-7", 1, 0.05, 50.0))]);
        assert_eq!(late.len(), 1);
        assert_eq!(f.late(), 1);
        assert!(!first.is_empty());
    }

    #[test]
    fn state_survives_a_checkpoint_and_restore() {
        let inputs = web_fleet(8);
        let mut whole = fleet(GraphConfig::default());
        let want = run(&mut whole, &inputs);

        let (first, second) = inputs.split_at(27);
        let mut before = fleet(GraphConfig::default());
        let mut got = run(&mut before, first);
        let mut after = fleet(GraphConfig::default());
        for p in [0, 1] {
            after.restore(p, puts(before.checkpoint(p))).unwrap();
        }
        got.extend(run(&mut after, second));
        assert_eq!(got, want);
        assert!(after.restore(0, vec![("x".into(), b"{".to_vec())]).is_err());
    }

    #[test]
    fn partitions_revoked_and_restored_in_one_instance_close_the_same_rounds() {
        // A consumer whose group session is lost (the broker away) has every partition revoked
        // and then assigned again, and restores them from their last checkpoint, which may be
        // older than the rounds closed since (their outputs were not yet acknowledged, so no
        // later checkpoint could be written). Reading the input after it again must close
        // those rounds as before: the refused outputs still go out as they were, and a round
        // closed anew with part of the fleet would publish their ids with other content.
        let inputs = web_fleet(8);
        let (first, second) = inputs.split_at(21);
        let mut f = fleet(GraphConfig::default());
        run(&mut f, first);
        let saved = [puts(f.checkpoint(0)), puts(f.checkpoint(1))];
        let want = run(&mut f, second);
        assert!(
            want.len() >= 12,
            "rounds closed after the checkpoint: {want:?}"
        );
        for p in [0, 1] {
            f.forget_partition(p);
        }
        for p in [0, 1] {
            f.assigned(p);
        }
        for (p, e) in saved.into_iter().enumerate() {
            f.restore(p as i32, e).unwrap();
        }
        let got = run(&mut f, second);
        let rounds = |v: &[RiskScore]| -> Vec<(String, i64, usize)> {
            v.iter()
                .map(|s| {
                    let of = s.rank.as_ref().map_or(0, |r| r.of as usize);
                    (s.entity.to_string(), s.time.timestamp() / 60, of)
                })
                .collect()
        };
        assert_eq!(rounds(&got), rounds(&want), "(entity, minute, round size)");
        assert_eq!(got, want);
        assert_eq!((f.late(), f.redelivered()), (0, 0));
    }

    #[test]
    fn a_promoted_model_replaces_the_prior_from_the_next_round() {
        use crate::model::{FailureModel, TrainConfig, TrainingExample};
        // A model trained on recorded outcomes: failures followed strong peer divergence.
        let examples: Vec<TrainingExample> = (0..600)
            .map(|i| {
                let peer = (i % 10) as f64 / 10.0;
                TrainingExample {
                    entity: id(&format!("n-{}", i % 50)),
                    time: at(i),
                    horizon_seconds: 1800,
                    signals: [("peer_outlier".to_string(), peer)].into(),
                    recorded_probability: 0.05,
                    label: peer >= 0.5 && i % 3 != 0,
                }
            })
            .collect();
        let model = FailureModel::train(&examples, &TrainConfig::default()).unwrap();
        let version = model.version().to_owned();
        let mut f = fleet(GraphConfig::default());
        let before = run(&mut f, &web_fleet(4));
        assert!(before.iter().all(|s| s.method == ScoreMethod::Prior));
        f.set_model(Some(Box::new(model.clone())));
        assert_eq!(f.model_version(), Some(version.as_str()));
        let mut after = Vec::new();
        f.flush(&mut after);
        let after: Vec<RiskScore> = after
            .into_iter()
            .map(|o| match o {
                Output::Event(s) => s,
                Output::Rejected(_) => unreachable!(),
            })
            .collect();
        assert!(!after.is_empty());
        for s in &after {
            assert_eq!(s.method, ScoreMethod::Learned);
            assert_eq!(s.model_version, format!("{version}+{FLEET_VERSION}"));
            let want = model.predict(&s.signals);
            assert!((s.probability - want.probability).abs() < 1e-12);
            assert!(s.lower <= s.probability && s.probability <= s.upper);
        }
        f.set_model(None);
        assert_eq!(f.model_version(), None);
    }

    #[test]
    fn config_errors_are_reported() {
        let config = FleetConfig {
            peers: PeerConfig {
                groups: vec![GroupRule {
                    name: "bad".into(),
                    pattern: "(".into(),
                }],
                persist: 9,
                ..PeerConfig::default()
            },
            ..FleetConfig::default()
        };
        let errors = Fleet::new(config, Bands::default(), GraphConfig::default()).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
    }
}
