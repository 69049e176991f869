//! Invariants over random pools, graphs and score streams: capacity is never exceeded, no
//! workload goes below its minimum replicas, stale scores are never acted on, velocity limits
//! hold, and the same input gives the same decisions, ids included.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use foresight_allocator::{Allocator, AllocatorInput, Policy};
use foresight_events::{
    ActionKind, Band, Decision, DeclaredDependency, EntityId, Environment, EventData, EventId,
    GraphConfig, Inventory, Node, Origin, Output, Processor, Rank, Resources, RiskScore,
    ScoreMethod, Workload,
};
use proptest::prelude::*;

fn id(s: String) -> EntityId {
    EntityId::new(s).unwrap()
}

#[derive(Debug, Clone)]
struct Case {
    inventory: Inventory,
    graph: GraphConfig,
    /// (minute, entity index, probability, impact); rounds are the scores of one minute.
    scores: Vec<(i64, usize, f64, f64)>,
    policy: usize,
    eviction: bool,
}

fn entity_names(inv: &Inventory) -> Vec<EntityId> {
    inv.nodes
        .iter()
        .map(|n| n.id.clone())
        .chain(inv.workloads.iter().map(|w| w.id.clone()))
        .collect()
}

fn case() -> impl Strategy<Value = Case> {
    let nodes = prop::collection::vec((1u32..16, any::<bool>(), 0u8..3), 2..10);
    (nodes, 0usize..14).prop_flat_map(|(nodes, n_workloads)| {
        let n = nodes.len();
        let workloads = prop::collection::vec(
            (
                1u32..6,
                prop::collection::vec(0..n, 1..4),
                0u32..10,
                any::<bool>(),
                0u32..3,
                1u32..4,
            ),
            n_workloads,
        );
        let deps = prop::collection::vec(
            (0..n + n_workloads, 0..n + n_workloads, any::<bool>()),
            0..8,
        );
        let scores = prop::collection::vec(
            (0i64..40, 0..n + n_workloads, 0.0f64..1.0, 1.0f64..4.0),
            1..60,
        );
        (
            Just(nodes),
            workloads,
            deps,
            scores,
            0usize..6,
            any::<bool>(),
        )
            .prop_map(|(nodes, workloads, deps, scores, policy, eviction)| {
                let nodes: Vec<Node> = nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (cpu, secondary, zone))| Node {
                        id: id(format!("n{i}")),
                        kind: "host".into(),
                        environment: if secondary {
                            Environment::Secondary
                        } else {
                            Environment::Primary
                        },
                        zone: format!("z{zone}"),
                        group: None,
                        capacity: Resources {
                            cpu: f64::from(cpu),
                            memory: f64::from(cpu) * 2.0,
                            ..Resources::default()
                        },
                        virtual_requests: (cpu % 2 == 0).then_some(Resources {
                            cpu: 1.0,
                            ..Resources::default()
                        }),
                    })
                    .collect();
                // Place replicas only where they fit, so the starting pool is valid.
                let mut free: Vec<f64> = nodes.iter().map(|n| n.capacity.cpu).collect();
                let workloads: Vec<Workload> = workloads
                    .into_iter()
                    .enumerate()
                    .map(|(i, (cpu, on, priority, critical, min, split))| {
                        let mut replicas = Vec::new();
                        for n in on {
                            if free[n] >= f64::from(cpu) {
                                free[n] -= f64::from(cpu);
                                replicas.push(nodes[n].id.clone());
                            }
                        }
                        Workload {
                            id: id(format!("w{i}")),
                            kind: if i % 3 == 0 { "function" } else { "service" }.into(),
                            priority,
                            critical,
                            requests: Resources {
                                cpu: f64::from(cpu),
                                memory: f64::from(cpu) * 2.0,
                                ..Resources::default()
                            },
                            min_replicas: min.min(replicas.len() as u32),
                            replicas,
                            max_replicas: 6,
                            splittable: split,
                            stateful: false,
                            queue_priority: 0,
                        }
                    })
                    .collect();
                let inventory = Inventory {
                    nodes,
                    workloads,
                    spares: vec![],
                };
                let names = entity_names(&inventory);
                let graph = GraphConfig {
                    dependencies: deps
                        .into_iter()
                        .filter(|(a, b, _)| a != b)
                        .map(|(a, b, critical)| DeclaredDependency {
                            dependent: names[a].clone(),
                            dependency: names[b].clone(),
                            critical,
                        })
                        .collect(),
                    ..GraphConfig::default()
                };
                Case {
                    inventory,
                    graph,
                    scores,
                    policy,
                    eviction,
                }
            })
    })
}

fn policy(case: &Case) -> Policy {
    let dir = format!("{}/../examples/policies", env!("CARGO_MANIFEST_DIR"));
    let mut p = match case.policy {
        0 => Policy::default(),
        k => {
            let name = [
                "",
                "inventory-items",
                "instances",
                "standby",
                "code-executions",
                "distributed",
            ][k];
            Policy::from_yaml(&std::fs::read_to_string(format!("{dir}/{name}.yaml")).unwrap())
                .unwrap()
        }
    };
    p.eviction.allowed |= case.eviction;
    p.limits.per_minute = 6;
    p.limits.max_concurrent = 9;
    p
}

fn inputs(case: &Case) -> Vec<AllocatorInput> {
    arrivals(case, Arrival::Mixed)
}

/// How the scores of a round arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Arrival {
    /// Rotated by the minute; every other round without ranks.
    Mixed,
    /// Every round ranked, in entity order or reversed (as two partition interleavings might
    /// deliver it).
    Ranked { reversed: bool },
}

fn arrivals(case: &Case, arrival: Arrival) -> Vec<AllocatorInput> {
    let names = entity_names(&case.inventory);
    // Group by minute (a round per minute, ranked), one score per entity per round.
    let mut rounds: BTreeMap<i64, BTreeMap<usize, (f64, f64)>> = BTreeMap::new();
    for (m, e, p, impact) in &case.scores {
        rounds.entry(*m).or_default().insert(*e, (*p, *impact));
    }
    let mut out = Vec::new();
    for (m, round) in rounds {
        let of = round.len() as u32;
        // Arrival order within the round is shuffled deterministically by minute.
        let mut entries: Vec<_> = round.into_iter().collect();
        match arrival {
            Arrival::Mixed => {
                let shift = (m as usize) % entries.len();
                entries.rotate_left(shift);
            }
            Arrival::Ranked { reversed: true } => entries.reverse(),
            Arrival::Ranked { reversed: false } => {}
        }
        for (k, (e, (p, impact))) in entries.into_iter().enumerate() {
            out.push(AllocatorInput::Score(RiskScore {
                entity: names[e].clone(),
                time: DateTime::from_timestamp(m * 60, 0).unwrap(),
                window_id: EventId::derive("w", &[names[e].as_str().as_bytes(), &m.to_le_bytes()]),
                horizon_seconds: 3600,
                probability: p,
                lower: (p - 0.1).max(0.0),
                upper: (p + 0.1).min(1.0),
                time_to_failure_seconds: None,
                health: 100.0 * (1.0 - p),
                band: if p > 0.7 { Band::High } else { Band::Low },
                contributors: vec![],
                method: ScoreMethod::Prior,
                model_version: "t".into(),
                signals: Default::default(),
                observed: Default::default(),
                blast_radius: vec![],
                impact,
                // Every other round comes without ranks (as from an older producer).
                rank: (m % 2 == 0 || arrival != Arrival::Mixed).then_some(Rank {
                    position: k as u32 + 1,
                    of,
                }),
            }));
        }
    }
    out
}

/// Runs the case; checks, as each decision comes out, that its score was not stale: no newer
/// score of its entity had been read, and it is within `stale_after` of the newest event time.
fn run(case: &Case) -> Result<(Vec<Decision>, Allocator), TestCaseError> {
    run_with(case, inputs(case))
}

fn run_with(
    case: &Case,
    inputs: Vec<AllocatorInput>,
) -> Result<(Vec<Decision>, Allocator), TestCaseError> {
    let policy = policy(case);
    let stale = TimeDelta::from_std(policy.stale_after).unwrap();
    let mut a = Allocator::new(policy, &case.inventory, case.graph.clone()).unwrap();
    let mut newest: BTreeMap<EntityId, DateTime<Utc>> = BTreeMap::new();
    let mut watermark = DateTime::<Utc>::MIN_UTC;
    let mut decisions = Vec::new();
    for (i, input) in inputs.into_iter().enumerate() {
        let origin = Origin {
            input: 0,
            partition: 0,
            offset: i as i64,
        };
        let mut out = Vec::new();
        if let AllocatorInput::Score(s) = &input {
            watermark = watermark.max(s.time);
            let n = newest.entry(s.entity.clone()).or_insert(s.time);
            *n = (*n).max(s.time);
        }
        a.process(input, origin, &mut out);
        for o in out {
            let Output::Event(d) = o else {
                return Err(TestCaseError::fail(format!("{o:?}")));
            };
            prop_assert!(d.time >= newest[&d.entity], "acted on a superseded score");
            prop_assert!(d.time >= watermark - stale, "acted on a stale score");
            decisions.push(d);
        }
    }
    let mut out = Vec::new();
    a.flush(&mut out);
    decisions.extend(out.into_iter().filter_map(|o| match o {
        Output::Event(d) => Some(d),
        Output::Rejected(_) => None,
    }));
    Ok((decisions, a))
}

/// Replays the decisions' effects on the declared pool to check capacity and replicas.
fn check(case: &Case, decisions: &[Decision]) -> Result<(), TestCaseError> {
    let policy = policy(case);
    // Velocity: within any minute, at most per_minute acting decisions.
    let acting: Vec<DateTime<Utc>> = decisions
        .iter()
        .filter(|d| !matches!(d.action.kind, ActionKind::NoOp | ActionKind::Monitor))
        .map(|d| d.time)
        .collect();
    for t in &acting {
        let in_minute = acting
            .iter()
            .filter(|u| **u <= *t && *t - **u < TimeDelta::minutes(1))
            .count();
        prop_assert!(
            in_minute as u32 <= policy.limits.per_minute,
            "{in_minute} in a minute"
        );
    }
    // Replicas: replay migrations, scale-ups/backs and evictions on the declared placements.
    let mut replicas: BTreeMap<EntityId, f64> = case
        .inventory
        .workloads
        .iter()
        .map(|w| (w.id.clone(), w.replicas.len() as f64))
        .collect();
    for d in decisions {
        let r = replicas.get_mut(&d.action.target);
        let n = |k: &str| {
            d.action
                .params
                .get(k)
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0)
        };
        match (d.action.kind, r) {
            (ActionKind::ScaleUp, Some(r)) => *r += n("replicas"),
            (ActionKind::ScaleBack, Some(r)) => *r -= n("replicas"),
            (ActionKind::Evict, Some(r)) => *r -= n("share"),
            _ => {}
        }
    }
    for w in &case.inventory.workloads {
        prop_assert!(
            replicas[&w.id] >= f64::from(w.min_replicas) - 1e-6,
            "{} below its minimum: {} < {}",
            w.id,
            replicas[&w.id],
            w.min_replicas
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_and_runs_are_deterministic(case in case()) {
        let (decisions, allocator) = run(&case)?;
        allocator.check_pool().map_err(TestCaseError::fail)?;
        check(&case, &decisions)?;
        let (again, _) = run(&case)?;
        let ids: Vec<_> = decisions.iter().map(EventData::id).collect();
        let again_ids: Vec<_> = again.iter().map(EventData::id).collect();
        prop_assert_eq!(&ids, &again_ids);
        prop_assert_eq!(&decisions, &again);
        // Ids are distinct: one decision per (score, rule, kind, target).
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        prop_assert_eq!(distinct.len(), ids.len());
        // Every decision explains itself.
        for d in &decisions {
            prop_assert!(d.reason.contains(&d.rule));
            prop_assert!(!d.expected_effect.is_empty());
            prop_assert!(d.probability >= d.interval[0] && d.probability <= d.interval[1]);
        }
    }

    #[test]
    fn ranked_rounds_are_decided_the_same_whatever_the_arrival_order(case in case()) {
        let (forward, _) = run_with(&case, arrivals(&case, Arrival::Ranked { reversed: false }))?;
        let (backward, _) = run_with(&case, arrivals(&case, Arrival::Ranked { reversed: true }))?;
        prop_assert_eq!(forward, backward);
    }
}
