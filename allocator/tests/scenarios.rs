//! The five seed scenarios: each policy in `examples/policies/` on the situation it is for.

use chrono::DateTime;
use foresight_allocator::{Allocator, AllocatorInput, Policy};
use foresight_events::{
    ActionKind, Band, Decision, DeclaredDependency, Dependent, EntityId, Environment, EventData,
    EventId, FailureReport, GraphConfig, Inventory, Node, Origin, Output, Processor, Rank,
    Resources, RiskScore, ScoreMethod, Spare, Workload,
};

fn id(s: &str) -> EntityId {
    EntityId::new(s).unwrap()
}

fn policy(name: &str) -> Policy {
    let path = format!(
        "{}/../examples/policies/{name}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    Policy::from_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn score(entity: &str, minute: i64, p: f64) -> RiskScore {
    RiskScore {
        entity: id(entity),
        time: DateTime::from_timestamp(minute * 60, 0).unwrap(),
        window_id: EventId::derive("w", &[entity.as_bytes(), &minute.to_le_bytes()]),
        horizon_seconds: 3600,
        probability: p,
        lower: (p - 0.05).max(0.0),
        upper: (p + 0.05).min(1.0),
        time_to_failure_seconds: None,
        health: 100.0 * (1.0 - p),
        band: if p >= 0.7 { Band::High } else { Band::Low },
        contributors: vec![],
        method: ScoreMethod::Prior,
        model_version: "t".into(),
        signals: Default::default(),
        observed: Default::default(),
        blast_radius: vec![],
        impact: 1.0,
        rank: None,
    }
}

fn res(cpu: f64, memory: f64) -> Resources {
    Resources {
        cpu,
        memory,
        ..Resources::default()
    }
}

fn node(name: &str, cpu: f64) -> Node {
    Node {
        id: id(name),
        kind: "host".into(),
        environment: Environment::Primary,
        zone: "a".into(),
        group: None,
        capacity: res(cpu, cpu * 4.0),
        virtual_requests: None,
    }
}

fn workload(name: &str, cpu: f64, on: &[&str]) -> Workload {
    Workload {
        id: id(name),
        kind: "service".into(),
        priority: 1,
        critical: false,
        requests: res(cpu, cpu * 4.0),
        replicas: on.iter().map(|n| id(n)).collect(),
        min_replicas: 1,
        max_replicas: 8,
        splittable: 1,
        stateful: false,
        queue_priority: 0,
    }
}

fn feed(a: &mut Allocator, input: AllocatorInput) -> Vec<Decision> {
    let mut out = Vec::new();
    a.process(
        input,
        Origin {
            input: 0,
            partition: 0,
            offset: 0,
        },
        &mut out,
    );
    out.into_iter()
        .map(|o| match o {
            Output::Event(d) => d,
            Output::Rejected(r) => panic!("{r:?}"),
        })
        .collect()
}

fn kinds(d: &[Decision]) -> Vec<(ActionKind, &str)> {
    d.iter()
        .map(|d| (d.action.kind, d.action.target.as_str()))
        .collect()
}

#[test]
fn scenario_1_inventory_items_swap_replace_ease_or_monitor() {
    let mut pump = node("pump-1", 1.0);
    pump.kind = "pump".into();
    pump.virtual_requests = Some(res(2.0, 4.0));
    let mut valve = node("valve-1", 1.0);
    valve.kind = "valve".into();
    let mut fan = node("fan-1", 1.0);
    fan.kind = "fan".into();
    let inventory = Inventory {
        nodes: vec![pump, valve, fan, node("edge-host", 4.0)],
        workloads: vec![],
        spares: vec![Spare {
            id: id("valve-spare-1"),
            kind: "valve".into(),
            zone: "a".into(),
        }],
    };
    // The line depends critically on the pump and the valve; the fan has no critical dependant.
    let graph = GraphConfig {
        dependencies: vec![DeclaredDependency {
            dependent: id("line-1"),
            dependency: id("pump-1"),
            critical: true,
        }],
        ..GraphConfig::default()
    };
    let mut a = Allocator::new(policy("inventory-items"), &inventory, graph).unwrap();
    let d = feed(&mut a, AllocatorInput::Score(score("pump-1", 0, 0.85)));
    assert_eq!(kinds(&d), [(ActionKind::SwapVirtual, "pump-1")], "{d:#?}");
    assert_eq!(d[0].action.params["host"], "edge-host");
    assert_eq!(d[0].alternatives[0].action.kind, ActionKind::ScheduleRepair);

    // The valve cannot be virtualised: replaced with the spare (the blast radius says its
    // dependant is critical).
    let mut s = score("valve-1", 0, 0.9);
    s.blast_radius = vec![Dependent {
        entity: id("line-1"),
        depth: 1,
        critical: true,
    }];
    let d = feed(&mut a, AllocatorInput::Score(s));
    assert_eq!(
        kinds(&d),
        [(ActionKind::ScheduleRepair, "valve-1")],
        "{d:#?}"
    );
    assert_eq!(d[0].action.params["spare"], "valve-spare-1");
    assert!(
        d[0].alternatives[0]
            .rejected_because
            .contains("no virtual component")
    );

    let d = feed(&mut a, AllocatorInput::Score(score("fan-1", 0, 0.8)));
    assert_eq!(kinds(&d), [(ActionKind::AdjustBandwidth, "fan-1")]);
    let d = feed(&mut a, AllocatorInput::Score(score("fan-2", 0, 0.2)));
    assert_eq!(kinds(&d), [(ActionKind::Monitor, "fan-2")]);
    assert!(feed(&mut a, AllocatorInput::Score(score("fan-3", 0, 0.01))).is_empty());
}

#[test]
fn scenario_2_instances_migrate_split_scale_back_and_buffer_under_a_velocity_limit() {
    let mut nodes: Vec<Node> = (1..=6).map(|i| node(&format!("i{i}"), 4.0)).collect();
    nodes[0].capacity = res(8.0, 32.0);
    let mut big = workload("big", 6.0, &["i1"]);
    big.splittable = 3;
    let inventory = Inventory {
        nodes,
        workloads: vec![
            big,
            workload("api", 1.0, &["i2", "i3"]),
            workload("small", 1.0, &["i4"]),
        ],
        spares: vec![],
    };
    let mut a = Allocator::new(policy("instances"), &inventory, GraphConfig::default()).unwrap();
    let round = |e: &str, p: f64| {
        let mut s = score(e, 0, p);
        s.rank = Some(Rank { position: 0, of: 6 });
        s
    };
    let mut d = Vec::new();
    for (e, p) in [
        ("i1", 0.9),
        ("i2", 0.5),
        ("i3", 0.05),
        ("i4", 0.02),
        ("i5", 0.01),
        ("i6", 0.0),
    ] {
        d.extend(feed(&mut a, AllocatorInput::Score(round(e, p))));
    }
    // big (6 cpu) fits on no 4-cpu instance: split into 3 units of 2 on the lowest-risk ones.
    assert_eq!(d[0].action.kind, ActionKind::Migrate);
    assert_eq!(d[0].action.params["pieces"], 3);
    assert_eq!(
        d[0].action.params["to"],
        serde_json::json!(["i6", "i5", "i4"]),
        "{d:#?}"
    );
    // i2 (moderate) reserves a buffer and scales back api (2 replicas, min 1).
    assert_eq!(
        kinds(&d[1..]),
        [
            (ActionKind::ReserveBuffer, "i2"),
            (ActionKind::ScaleBack, "api")
        ]
    );
    assert_eq!(d.len(), 3, "low-risk instances are used normally");

    // A velocity limit of 5 per minute per group: a burst of high scores is paced.
    let mut nodes: Vec<Node> = (0..10).map(|i| node(&format!("h{i}"), 4.0)).collect();
    nodes.extend((0..10).map(|i| node(&format!("free{i}"), 4.0)));
    let inventory = Inventory {
        workloads: (0..10)
            .map(|i| workload(&format!("w{i}"), 1.0, &[&format!("h{i}")]))
            .collect(),
        nodes,
        spares: vec![],
    };
    let mut a = Allocator::new(policy("instances"), &inventory, GraphConfig::default()).unwrap();
    let mut migrations = 0;
    for i in 0..10 {
        let mut s = score(&format!("h{i}"), 0, 0.8 + i as f64 / 100.0);
        s.rank = Some(Rank {
            position: 0,
            of: 10,
        });
        migrations += feed(&mut a, AllocatorInput::Score(s))
            .iter()
            .filter(|d| d.action.kind == ActionKind::Migrate)
            .count();
    }
    assert_eq!(migrations, 5, "group_per_minute is 5");
}

#[test]
fn scenario_3_standby_in_the_secondary_environment_switches_on_confirmed_failure() {
    let mut standby_host = node("dr-1", 16.0);
    standby_host.environment = Environment::Secondary;
    let inventory = Inventory {
        nodes: vec![node("p-1", 8.0), standby_host],
        workloads: vec![
            workload("checkout", 2.0, &["p-1"]),
            workload("payments", 1.0, &["p-1"]),
        ],
        spares: vec![],
    };
    let graph = GraphConfig {
        dependencies: vec![DeclaredDependency {
            dependent: id("checkout"),
            dependency: id("payments"),
            critical: true,
        }],
        ..GraphConfig::default()
    };
    let mut a = Allocator::new(policy("standby"), &inventory, graph).unwrap();
    assert!(feed(&mut a, AllocatorInput::Score(score("checkout", 0, 0.4))).is_empty());
    let d = feed(&mut a, AllocatorInput::Score(score("checkout", 5, 0.7)));
    assert_eq!(
        kinds(&d),
        [
            (ActionKind::PreProvisionStandby, "checkout"),
            (ActionKind::PreProvisionStandby, "payments"),
            (ActionKind::TransferState, "checkout"),
            (ActionKind::TransferState, "payments"),
            (ActionKind::RegisterTrafficSwitch, "checkout"),
            (ActionKind::RegisterTrafficSwitch, "payments"),
        ],
        "{d:#?}"
    );
    assert_eq!(d[0].action.params["environment"], "secondary");
    assert_eq!(d[2].action.params["mode"], "snapshot");
    // High but not confirmed, and the lower bound is below 0.97: no switch, state refreshed.
    let d = feed(&mut a, AllocatorInput::Score(score("checkout", 25, 0.8)));
    assert_eq!(d[0].action.kind, ActionKind::TransferState, "{d:#?}");
    assert_eq!(d[0].action.params["mode"], "incremental");
    // Confirmed: switch.
    let d = feed(
        &mut a,
        AllocatorInput::Failure(FailureReport {
            entity: id("checkout"),
            time: DateTime::from_timestamp(26 * 60, 0).unwrap(),
            kind: "crash".into(),
            detail: String::new(),
        }),
    );
    assert_eq!(
        kinds(&d),
        [
            (ActionKind::SwitchTraffic, "checkout"),
            (ActionKind::SwitchTraffic, "payments")
        ],
        "{d:#?}"
    );
    assert_eq!(d[0].action.params["because"], "failure confirmed");
    assert!(d[0].inverse.is_some());
}

#[test]
fn scenario_4_failing_code_gets_more_resources_and_queue_priority() {
    let mut f = workload("fn-resize-image", 0.5, &["pool-1", "pool-2"]);
    f.kind = "function".into();
    let inventory = Inventory {
        nodes: vec![node("pool-1", 2.0), node("pool-2", 2.0)],
        workloads: vec![f],
        spares: vec![],
    };
    let mut a = Allocator::new(
        policy("code-executions"),
        &inventory,
        GraphConfig::default(),
    )
    .unwrap();
    assert!(
        feed(
            &mut a,
            AllocatorInput::Score(score("fn-resize-image", 0, 0.3))
        )
        .is_empty()
    );
    let d = feed(
        &mut a,
        AllocatorInput::Score(score("fn-resize-image", 1, 0.6)),
    );
    assert_eq!(
        kinds(&d),
        [
            (ActionKind::RaiseLimits, "fn-resize-image"),
            (ActionKind::PrioritiseQueue, "fn-resize-image")
        ]
    );
    assert_eq!(d[0].action.params["requests"]["cpu"], 0.75);
    assert_eq!(
        d[0].action.params["applies_to"],
        "current_and_future_executions"
    );
    assert_eq!(d[1].action.params["queue_priority"], 10);
    assert_eq!(
        d[0].inverse.as_ref().unwrap().params["requests"]["cpu"],
        0.5
    );
}

#[test]
fn scenario_5_ranked_components_evict_lower_priority_work_or_report_shortage() {
    let mut critical = workload("orders", 2.0, &["c1"]);
    critical.priority = 9;
    critical.critical = true;
    let mut reports = workload("reports", 2.0, &["c1"]);
    reports.priority = 5;
    let mut batch = workload("batch", 2.0, &["c2"]);
    batch.priority = 1;
    batch.min_replicas = 0;
    let inventory = Inventory {
        nodes: vec![node("c1", 4.0), node("c2", 2.0)],
        workloads: vec![critical, reports, batch],
        spares: vec![],
    };
    let mut a = Allocator::new(policy("distributed"), &inventory, GraphConfig::default()).unwrap();
    let ranked = |e: &str, p: f64, impact: f64| {
        let mut s = score(e, 0, p);
        s.impact = impact;
        s.rank = Some(Rank { position: 0, of: 3 });
        s
    };
    let mut d = Vec::new();
    for s in [
        ranked("reports", 0.8, 1.0),
        ranked("orders", 0.7, 2.0),
        ranked("batch", 0.62, 0.5),
    ] {
        d.extend(feed(&mut a, AllocatorInput::Score(s)));
    }
    // orders first (0.7 x 2 impact x 2 critical): evicts batch (priority 1) from c2 for its
    // replica; reports (priority 5, gap 2 needed) finds no room and nothing it may evict.
    assert_eq!(
        kinds(&d),
        [
            (ActionKind::Evict, "batch"),
            (ActionKind::ScaleUp, "orders"),
            (ActionKind::NoOp, "reports"),
            (ActionKind::Monitor, "batch"),
        ],
        "{d:#?}"
    );
    assert!(
        d[2].expected_effect.contains("insufficient resources"),
        "{}",
        d[2].expected_effect
    );
    let ids: std::collections::BTreeSet<_> = d.iter().map(EventData::id).collect();
    assert_eq!(ids.len(), d.len());
}

#[test]
fn every_example_policy_is_valid() {
    let dir = format!("{}/../examples/policies", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        Policy::from_yaml(&text).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        n += 1;
    }
    assert!(n >= 5);
}
