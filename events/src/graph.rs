//! The dependency graph: which components depend on which, declared in configuration and observed
//! in trace spans ([`DependencyEdge`]s). Scoring propagates risk along it and measures blast radius;
//! the allocator reads it to find a component's dependants and dependencies.
//!
//! Deterministic (ordered maps throughout) and bounded: observed edges not seen for `observed_ttl`
//! of event time are forgotten, and at most `max_edges` observed edges are kept.
//!
//! ```
//! use foresight_events::{DependencyGraph, GraphConfig, DeclaredDependency, EntityId};
//! let id = |s: &str| EntityId::new(s).unwrap();
//! let graph = DependencyGraph::new(GraphConfig {
//!     dependencies: vec![
//!         DeclaredDependency { dependent: id("checkout"), dependency: id("payments"), critical: true },
//!         DeclaredDependency { dependent: id("payments"), dependency: id("db-1"), critical: true },
//!         DeclaredDependency { dependent: id("search"), dependency: id("db-1"), critical: false },
//!     ],
//!     ..GraphConfig::default()
//! });
//! let radius = graph.blast_radius(&id("db-1"));
//! let names: Vec<_> = radius.iter().map(|d| (d.entity.as_str(), d.depth, d.critical)).collect();
//! assert_eq!(names, [("payments", 1, true), ("search", 1, false), ("checkout", 2, true)]);
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{DependencyEdge, EntityId};

/// A dependency declared in configuration: `dependent` needs `dependency`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredDependency {
    /// The component that depends.
    pub dependent: EntityId,
    /// The component it depends on.
    pub dependency: EntityId,
    /// Whether the dependent fails when the dependency fails (no fallback).
    #[serde(default)]
    pub critical: bool,
}

/// Dependency graph configuration (`[graph]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GraphConfig {
    /// Declared dependencies.
    pub dependencies: Vec<DeclaredDependency>,
    /// An observed edge (from trace spans) not seen for this long, in event time, is forgotten.
    #[serde(with = "humantime_serde")]
    pub observed_ttl: Duration,
    /// An observed edge whose calls fail at least this often is marked critical: the caller is
    /// visibly hurt by the callee's failures.
    pub critical_error_rate: f64,
    /// Most observed edges kept (the least recently seen are forgotten first).
    pub max_edges: usize,
    /// Blast radius and propagation follow at most this many hops.
    pub max_depth: u32,
}

impl Default for GraphConfig {
    fn default() -> Self {
        Self {
            dependencies: Vec::new(),
            observed_ttl: Duration::from_secs(24 * 3600),
            critical_error_rate: 0.5,
            max_edges: 100_000,
            max_depth: 6,
        }
    }
}

/// An invalid graph configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GraphConfigError {
    /// A component declared to depend on itself.
    #[error("graph.dependencies[{0}]: {1} cannot depend on itself")]
    SelfDependency(usize, EntityId),
    /// A rate outside [0, 1].
    #[error("graph.critical_error_rate must be between 0 and 1, not {0}")]
    ErrorRate(f64),
    /// A bound that must be positive is zero.
    #[error("graph.{0} must be at least 1")]
    Zero(&'static str),
}

impl GraphConfig {
    /// Checks the configuration, reporting every problem.
    pub fn validate(&self) -> Vec<GraphConfigError> {
        let mut errors: Vec<_> = self
            .dependencies
            .iter()
            .enumerate()
            .filter(|(_, d)| d.dependent == d.dependency)
            .map(|(i, d)| GraphConfigError::SelfDependency(i, d.dependent.clone()))
            .collect();
        if !(0.0..=1.0).contains(&self.critical_error_rate) {
            errors.push(GraphConfigError::ErrorRate(self.critical_error_rate));
        }
        if self.max_edges == 0 {
            errors.push(GraphConfigError::Zero("max_edges"));
        }
        if self.max_depth == 0 {
            errors.push(GraphConfigError::Zero("max_depth"));
        }
        errors
    }
}

/// What is known of one edge.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeInfo {
    /// Declared in configuration (never expires).
    pub declared: bool,
    /// Critical: declared so, or observed failing the caller often enough.
    pub critical: bool,
    /// Event time it was last observed in traces, if ever.
    pub last_seen: Option<DateTime<Utc>>,
    /// Calls observed.
    pub calls: u64,
    /// Failed calls observed.
    pub errors: u64,
}

/// A component affected when another fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dependent {
    /// The affected component.
    pub entity: EntityId,
    /// Hops from the failing component (1: depends on it directly).
    pub depth: u32,
    /// Every edge on the way is critical: the dependent fails with it.
    pub critical: bool,
}

/// The dependency graph.
#[derive(Debug, Clone, Default)]
pub struct DependencyGraph {
    config: GraphConfig,
    /// dependency -> dependent -> edge (who is hurt when the key fails).
    dependents: BTreeMap<EntityId, BTreeMap<EntityId, EdgeInfo>>,
    /// dependent -> dependency -> critical (what the key needs).
    dependencies: BTreeMap<EntityId, BTreeMap<EntityId, bool>>,
    observed: usize,
}

impl DependencyGraph {
    /// The graph of the declared dependencies (the configuration should have been validated;
    /// self-dependencies are ignored).
    pub fn new(config: GraphConfig) -> Self {
        let mut graph = Self {
            config: GraphConfig {
                dependencies: Vec::new(),
                ..config.clone()
            },
            ..Self::default()
        };
        for d in &config.dependencies {
            if d.dependent == d.dependency {
                continue;
            }
            let edge = graph.edge(&d.dependency, &d.dependent);
            edge.declared = true;
            edge.critical |= d.critical;
            let critical = edge.critical;
            graph.link(&d.dependent, &d.dependency, critical);
        }
        graph
    }

    fn edge(&mut self, dependency: &EntityId, dependent: &EntityId) -> &mut EdgeInfo {
        self.dependents
            .entry(dependency.clone())
            .or_default()
            .entry(dependent.clone())
            .or_insert(EdgeInfo {
                declared: false,
                critical: false,
                last_seen: None,
                calls: 0,
                errors: 0,
            })
    }

    fn link(&mut self, dependent: &EntityId, dependency: &EntityId, critical: bool) {
        self.dependencies
            .entry(dependent.clone())
            .or_default()
            .insert(dependency.clone(), critical);
    }

    /// Takes in calls seen in traces: the caller depends on the callee.
    pub fn observe(&mut self, edge: &DependencyEdge) {
        if edge.caller == edge.callee {
            return;
        }
        let threshold = self.config.critical_error_rate;
        let info = self.edge(&edge.callee, &edge.caller);
        let new = !info.declared && info.last_seen.is_none();
        info.calls += edge.calls;
        info.errors += edge.errors;
        info.last_seen = Some(info.last_seen.map_or(edge.time, |t| t.max(edge.time)));
        if info.calls > 0 && info.errors as f64 / info.calls as f64 >= threshold && threshold > 0.0
        {
            info.critical = true;
        }
        let critical = info.critical;
        self.link(&edge.caller, &edge.callee, critical);
        if new {
            self.observed += 1;
            if self.observed > self.config.max_edges {
                self.evict_least_recent();
            }
        }
    }

    /// Forgets observed edges last seen more than `observed_ttl` before `now` (event time).
    pub fn expire(&mut self, now: DateTime<Utc>) {
        let ttl =
            chrono::TimeDelta::from_std(self.config.observed_ttl).unwrap_or(chrono::TimeDelta::MAX);
        let cutoff = now.checked_sub_signed(ttl);
        self.remove_observed(|info| cutoff.is_some_and(|c| info.last_seen.is_some_and(|t| t < c)));
    }

    fn evict_least_recent(&mut self) {
        let oldest = self
            .dependents
            .values()
            .flat_map(|m| m.values())
            .filter(|i| !i.declared)
            .filter_map(|i| i.last_seen)
            .min();
        if let Some(oldest) = oldest {
            self.remove_observed(|info| info.last_seen == Some(oldest));
        }
    }

    fn remove_observed(&mut self, doomed: impl Fn(&EdgeInfo) -> bool) {
        let mut removed = Vec::new();
        for (dependency, dependents) in &mut self.dependents {
            dependents.retain(|dependent, info| {
                let gone = !info.declared && doomed(info);
                if gone {
                    removed.push((dependent.clone(), dependency.clone()));
                }
                !gone
            });
        }
        self.dependents.retain(|_, m| !m.is_empty());
        for (dependent, dependency) in removed {
            self.observed -= 1;
            if let Some(m) = self.dependencies.get_mut(&dependent) {
                m.remove(&dependency);
                if m.is_empty() {
                    self.dependencies.remove(&dependent);
                }
            }
        }
    }

    /// What `entity` depends on directly, with whether each dependency is critical.
    pub fn dependencies_of(&self, entity: &EntityId) -> impl Iterator<Item = (&EntityId, bool)> {
        self.dependencies
            .get(entity)
            .into_iter()
            .flat_map(|m| m.iter().map(|(e, c)| (e, *c)))
    }

    /// Who depends on `entity` directly, with the edge.
    pub fn dependents_of(&self, entity: &EntityId) -> impl Iterator<Item = (&EntityId, &EdgeInfo)> {
        self.dependents
            .get(entity)
            .into_iter()
            .flat_map(|m| m.iter())
    }

    /// Everything that depends on `entity`, directly or through others, up to `max_depth` hops,
    /// nearest first (then by name). A dependent reached both by an all-critical path and by
    /// another at the same depth counts as critical.
    pub fn blast_radius(&self, entity: &EntityId) -> Vec<Dependent> {
        let mut found: BTreeMap<EntityId, Dependent> = BTreeMap::new();
        let mut queue = VecDeque::from([(entity.clone(), 0u32, true)]);
        let mut expanded = BTreeSet::from([(entity.clone(), true)]);
        while let Some((at, depth, critical)) = queue.pop_front() {
            if depth >= self.config.max_depth {
                continue;
            }
            for (dependent, edge) in self.dependents_of(&at) {
                if dependent == entity {
                    continue;
                }
                let critical = critical && edge.critical;
                let entry = found.entry(dependent.clone()).or_insert(Dependent {
                    entity: dependent.clone(),
                    depth: depth + 1,
                    critical,
                });
                if critical && !entry.critical && entry.depth == depth + 1 {
                    entry.critical = true;
                }
                if expanded.insert((dependent.clone(), critical)) {
                    queue.push_back((dependent.clone(), depth + 1, critical));
                }
            }
        }
        let mut out: Vec<Dependent> = found.into_values().collect();
        out.sort_by(|a, b| a.depth.cmp(&b.depth).then_with(|| a.entity.cmp(&b.entity)));
        out
    }

    /// Every component that appears in an edge.
    pub fn entities(&self) -> BTreeSet<&EntityId> {
        self.dependents
            .keys()
            .chain(self.dependencies.keys())
            .collect()
    }

    /// Edges known (declared and observed).
    pub fn edges(&self) -> usize {
        self.dependents.values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> EntityId {
        EntityId::new(s).unwrap()
    }

    fn edge(caller: &str, callee: &str, t: i64, calls: u64, errors: u64) -> DependencyEdge {
        DependencyEdge {
            caller: id(caller),
            callee: id(callee),
            time: DateTime::from_timestamp(t, 0).unwrap(),
            calls,
            errors,
            latency_ms_sum: 1.0,
            latency_ms_max: 1.0,
        }
    }

    #[test]
    fn observed_edges_expire_and_are_bounded_but_declared_ones_stay() {
        let mut g = DependencyGraph::new(GraphConfig {
            dependencies: vec![DeclaredDependency {
                dependent: id("a"),
                dependency: id("b"),
                critical: true,
            }],
            observed_ttl: Duration::from_secs(100),
            max_edges: 2,
            ..GraphConfig::default()
        });
        g.observe(&edge("a", "c", 10, 5, 0));
        g.observe(&edge("x", "c", 20, 5, 5));
        assert_eq!(g.edges(), 3);
        let radius = g.blast_radius(&id("c"));
        assert_eq!(
            radius,
            vec![
                Dependent {
                    entity: id("a"),
                    depth: 1,
                    critical: false
                },
                Dependent {
                    entity: id("x"),
                    depth: 1,
                    critical: true
                },
            ]
        );
        // A third observed edge evicts the least recently seen one (a -> c).
        g.observe(&edge("y", "c", 30, 1, 0));
        assert_eq!(g.edges(), 3);
        assert!(g.dependencies_of(&id("a")).all(|(d, _)| d == &id("b")));
        g.expire(DateTime::from_timestamp(200, 0).unwrap());
        assert_eq!(g.edges(), 1, "only the declared edge is left");
        assert_eq!(g.blast_radius(&id("b")).len(), 1);
    }

    #[test]
    fn cycles_terminate_and_depth_is_bounded() {
        let deps = ["a", "b", "c", "d"]
            .windows(2)
            .map(|w| DeclaredDependency {
                dependent: id(w[0]),
                dependency: id(w[1]),
                critical: true,
            })
            .chain([DeclaredDependency {
                dependent: id("d"),
                dependency: id("a"),
                critical: true,
            }])
            .collect();
        let g = DependencyGraph::new(GraphConfig {
            dependencies: deps,
            max_depth: 2,
            ..GraphConfig::default()
        });
        let radius: Vec<_> = g
            .blast_radius(&id("d"))
            .into_iter()
            .map(|d| d.entity)
            .collect();
        assert_eq!(radius, vec![id("c"), id("b")]);
        assert!(
            GraphConfig {
                dependencies: vec![DeclaredDependency {
                    dependent: id("a"),
                    dependency: id("a"),
                    critical: false
                }],
                max_depth: 0,
                ..GraphConfig::default()
            }
            .validate()
            .len()
                == 2
        );
    }
}
