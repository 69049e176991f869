//! One scoring round: 10,000 scored entities (1,000 nodes, 9,000 workloads) over a pool of
//! 1,000 nodes, decided by the seed policies. Target: under 50 ms per round on one core.
//!
//! Measured as CPU time of the benchmark thread (`/proc/thread-self/schedstat`), so that other
//! work on a shared machine does not inflate the figure; on an idle machine it equals wall time.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use chrono::DateTime;
use criterion::{
    BatchSize, Criterion, criterion_group, criterion_main,
    measurement::{Measurement, ValueFormatter, WallTime},
};
use foresight_allocator::{Allocator, AllocatorInput, Policy};
use foresight_events::{
    Band, EntityId, Environment, EventId, GraphConfig, Inventory, Node, Origin, Output, Processor,
    Rank, Resources, RiskScore, ScoreMethod, Workload,
};

const NODES: usize = 1_000;
const WORKLOADS: usize = 9_000;

fn id(s: String) -> EntityId {
    EntityId::new(s).unwrap()
}

fn inventory() -> Inventory {
    let nodes = (0..NODES)
        .map(|i| Node {
            id: id(format!("node-{i:04}")),
            kind: "host".into(),
            environment: if i % 10 == 9 {
                Environment::Secondary
            } else {
                Environment::Primary
            },
            zone: format!("zone-{}", i % 3),
            group: None,
            capacity: Resources {
                cpu: 32.0,
                memory: 128.0,
                storage: 1000.0,
                bandwidth: 10_000.0,
            },
            virtual_requests: None,
        })
        .collect();
    let workloads = (0..WORKLOADS)
        .map(|i| Workload {
            id: id(format!("wl-{i:04}")),
            kind: if i % 5 == 0 { "function" } else { "service" }.into(),
            priority: (i % 10) as u32,
            critical: i % 17 == 0,
            requests: Resources {
                cpu: 1.0 + (i % 3) as f64,
                memory: 4.0,
                storage: 10.0,
                bandwidth: 50.0,
            },
            // Primary nodes only (every tenth node is secondary).
            replicas: vec![id(format!("node-{:04}", (i * 7 % NODES) / 10 * 10 + i % 9))],
            min_replicas: 1,
            max_replicas: 4,
            splittable: 1 + (i % 3) as u32,
            stateful: i % 4 == 0,
            queue_priority: 0,
        })
        .collect();
    Inventory {
        nodes,
        workloads,
        spares: vec![],
    }
}

/// A deterministic spread of risk: about 2% high, 8% moderate, the rest low.
fn round(inventory: &Inventory) -> Vec<AllocatorInput> {
    let entities: Vec<EntityId> = inventory
        .nodes
        .iter()
        .map(|n| n.id.clone())
        .chain(inventory.workloads.iter().map(|w| w.id.clone()))
        .collect();
    let of = entities.len() as u32;
    entities
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            let u = (h % 10_000) as f64 / 10_000.0;
            let p = if u < 0.02 {
                0.75 + u * 10.0
            } else if u < 0.10 {
                0.35 + u
            } else {
                u * 0.25
            };
            AllocatorInput::Score(RiskScore {
                window_id: EventId::derive("bench", &[e.as_str().as_bytes()]),
                entity: e,
                time: DateTime::from_timestamp(3600, 0).unwrap(),
                horizon_seconds: 3600,
                probability: p.min(1.0),
                lower: (p - 0.05).max(0.0),
                upper: (p + 0.05).min(1.0),
                time_to_failure_seconds: None,
                health: 100.0 * (1.0 - p),
                band: Band::Low,
                contributors: vec![],
                method: ScoreMethod::Prior,
                model_version: "bench".into(),
                signals: Default::default(),
                observed: Default::default(),
                blast_radius: vec![],
                impact: 1.0 + (i % 4) as f64,
                rank: Some(Rank {
                    position: i as u32 + 1,
                    of,
                }),
            })
        })
        .collect()
}

fn policy(name: &str) -> Policy {
    let path = format!(
        "{}/../examples/policies/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    Policy::from_yaml(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Nanoseconds this thread has run on a CPU.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/thread-self/schedstat (Linux) is needed for CPU time")
}

/// CPU time of the benchmark thread.
struct ThreadCpu;

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Nanoseconds, as wall time's.
        static WALL: WallTime = WallTime;
        WALL.formatter()
    }
}

fn bench(c: &mut Criterion<ThreadCpu>) {
    let inventory = inventory();
    let inputs = round(&inventory);
    let mut group = c.benchmark_group("allocator_round_10k_entities_1k_nodes");
    group.sample_size(20);
    for (name, policy) in [
        ("default", Policy::default()),
        ("instances", policy("instances")),
        ("distributed", policy("distributed")),
        // The worst case: no velocity limit, so every high and moderate score is acted on.
        ("default-unlimited", {
            let mut p = Policy::default();
            p.limits.max_concurrent = u32::MAX;
            p.limits.per_minute = u32::MAX;
            p.limits.group_max_concurrent = u32::MAX;
            p.limits.group_per_minute = u32::MAX;
            p.limits.max_reports_per_round = u32::MAX;
            p
        }),
        // The floor: buffering and ranking the round, one condition per score, no action.
        ("never", {
            let mut p = Policy::default();
            p.rules.truncate(1);
            p.rules[0].when = "false".into();
            p
        }),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    (
                        Allocator::new(policy.clone(), &inventory, GraphConfig::default()).unwrap(),
                        inputs.clone(),
                    )
                },
                |(mut allocator, inputs)| {
                    let mut out = Vec::with_capacity(1024);
                    for (i, input) in inputs.into_iter().enumerate() {
                        let origin = Origin {
                            input: 0,
                            partition: (i % 3) as i32,
                            offset: i as i64,
                        };
                        allocator.process(input, origin, &mut out);
                    }
                    let decided = out.iter().filter(|o| matches!(o, Output::Event(_))).count();
                    assert!(decided > 0 || name == "never", "the round was decided");
                    // Returned, so that dropping the allocator is not timed.
                    (allocator, black_box(out))
                },
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpu);
    targets = bench
}
criterion_main!(benches);
