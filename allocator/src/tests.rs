use foresight_events::{
    Environment, EventData, EventId, Node, Rank, Resources, ScoreMethod, Workload,
};

use super::*;

pub(crate) fn id(s: &str) -> EntityId {
    EntityId::new(s).unwrap()
}

fn score(entity: &str, minute: i64, p: f64) -> RiskScore {
    RiskScore {
        entity: id(entity),
        time: DateTime::from_timestamp(minute * 60, 0).unwrap(),
        window_id: EventId::derive("w", &[entity.as_bytes(), &minute.to_le_bytes()]),
        horizon_seconds: 1800,
        probability: p,
        lower: (p - 0.05).max(0.0),
        upper: (p + 0.05).min(1.0),
        time_to_failure_seconds: None,
        health: 100.0 * (1.0 - p),
        band: if p >= 0.7 {
            Band::High
        } else if p >= 0.3 {
            Band::Moderate
        } else {
            Band::Low
        },
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

fn node(name: &str, cpu: f64) -> Node {
    Node {
        id: id(name),
        kind: "host".into(),
        environment: Environment::Primary,
        zone: "a".into(),
        group: None,
        capacity: Resources {
            cpu,
            memory: cpu * 4.0,
            ..Resources::default()
        },
        virtual_requests: None,
    }
}

fn workload(name: &str, cpu: f64, on: &[&str], priority: u32) -> Workload {
    Workload {
        id: id(name),
        kind: "service".into(),
        priority,
        critical: false,
        requests: Resources {
            cpu,
            memory: cpu * 4.0,
            ..Resources::default()
        },
        replicas: on.iter().map(|n| id(n)).collect(),
        min_replicas: 1,
        max_replicas: 8,
        splittable: 1,
        stateful: false,
        queue_priority: 0,
    }
}

fn run(a: &mut Allocator, input: AllocatorInput) -> Vec<Decision> {
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
        .filter_map(|o| match o {
            Output::Event(d) => Some(d),
            Output::Rejected(_) => None,
        })
        .collect()
}

/// The decisions among a stage's outputs; a rejection fails the test.
fn decisions(out: Vec<Output<Decision>>) -> Vec<Decision> {
    out.into_iter()
        .map(|o| match o {
            Output::Event(d) => d,
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

fn pool3() -> Inventory {
    Inventory {
        nodes: vec![node("n1", 8.0), node("n2", 8.0), node("n3", 8.0)],
        workloads: vec![
            workload("web", 2.0, &["n1", "n2"], 5),
            workload("batch", 4.0, &["n1"], 1),
        ],
        spares: vec![],
    }
}

#[test]
fn high_risk_migrates_each_workload_to_the_lowest_risk_node_with_room() {
    let mut a = Allocator::new(Policy::default(), &pool3(), GraphConfig::default()).unwrap();
    run(&mut a, AllocatorInput::Score(score("n2", 0, 0.2)));
    let d = run(&mut a, AllocatorInput::Score(score("n1", 1, 0.9)));
    let moves: Vec<(&str, &serde_json::Value)> = d
        .iter()
        .map(|d| (d.action.target.as_str(), &d.action.params["to"]))
        .collect();
    // Highest priority first: web already runs on n2, so it spreads to n3; batch goes to the
    // lowest-risk node with room, n3 again (n2 was scored 0.2).
    assert_eq!(
        moves,
        [
            ("web", &serde_json::json!(["n3"])),
            ("batch", &serde_json::json!(["n3"]))
        ],
        "{d:#?}"
    );
    assert!(
        d.iter()
            .all(|d| d.inverse.is_some() && d.rule == "migrate-high-risk")
    );
    let ids: BTreeSet<_> = d.iter().map(EventData::id).collect();
    assert_eq!(ids.len(), d.len(), "distinct ids");
    a.pool.within_capacity().unwrap();
    // The node is empty now: the next high score (after the cool-down) has nothing to move.
    let later = run(&mut a, AllocatorInput::Score(score("n1", 40, 0.9)));
    assert_eq!(later[0].action.kind, ActionKind::NoOp, "{later:#?}");
    assert!(later[0].reason.contains("migrate-high-risk"));
}

#[test]
fn stale_scores_are_never_acted_on() {
    let mut a = Allocator::new(Policy::default(), &pool3(), GraphConfig::default()).unwrap();
    assert!(run(&mut a, AllocatorInput::Score(score("x", 100, 0.1))).is_empty());
    // 20 minutes behind the newest event time (stale_after is 15 minutes).
    assert!(run(&mut a, AllocatorInput::Score(score("n1", 80, 0.95))).is_empty());
    assert!(!run(&mut a, AllocatorInput::Score(score("n1", 100, 0.95))).is_empty());
    // Older than the entity's newest score.
    assert!(run(&mut a, AllocatorInput::Score(score("n2", 100, 0.1))).is_empty());
    assert!(run(&mut a, AllocatorInput::Score(score("n2", 99, 0.95))).is_empty());
}

#[test]
fn hysteresis_and_cooldown_stop_flapping_at_a_threshold() {
    let inv = Inventory::default();
    let mut a = Allocator::new(Policy::default(), &inv, GraphConfig::default()).unwrap();
    let mut kinds = Vec::new();
    // Hovering around the high threshold 0.7 (margin 0.05): stays high, acts once.
    for (m, p) in [(0, 0.71), (1, 0.69), (2, 0.72), (3, 0.68), (4, 0.70)] {
        for d in run(&mut a, AllocatorInput::Score(score("svc", m, p))) {
            kinds.push(d.action.kind);
        }
    }
    assert_eq!(kinds, [ActionKind::Migrate]);
    // Well below: leaves the high band, but the moderate rule waits for the cool-down.
    assert!(run(&mut a, AllocatorInput::Score(score("svc", 5, 0.5))).is_empty());
    let d = run(&mut a, AllocatorInput::Score(score("svc", 31, 0.5)));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].action.kind, ActionKind::ReserveBuffer);
    assert_eq!(d[0].action.params["placement"], "delegated");
}

#[test]
fn escalation_bypasses_the_cooldown_of_a_lower_rule() {
    let mut a = Allocator::new(Policy::default(), &pool3(), GraphConfig::default()).unwrap();
    let d = run(&mut a, AllocatorInput::Score(score("n1", 0, 0.5)));
    assert_eq!(d[0].action.kind, ActionKind::ReserveBuffer, "{d:#?}");
    let d = run(&mut a, AllocatorInput::Score(score("n1", 2, 0.9)));
    assert!(
        d.iter().any(|d| d.action.kind == ActionKind::Migrate),
        "{d:#?}"
    );
    // The buffer held for n1 was released for the migration.
    assert!(a.pool.buffers.is_empty());
}

/// Nodes a and b each run a 3-CPU workload; only the spare node has room for one more.
fn two_workloads_one_spare_node() -> Inventory {
    Inventory {
        nodes: vec![node("a", 4.0), node("b", 4.0), node("spare", 4.0)],
        workloads: vec![
            workload("wa", 3.0, &["a"], 1),
            workload("wb", 3.0, &["b"], 1),
        ],
        spares: vec![],
    }
}

#[test]
fn rounds_are_decided_by_priority_whatever_the_arrival_order() {
    let inv = two_workloads_one_spare_node();
    let ranked = |e: &str, p: f64, impact: f64| {
        let mut s = score(e, 10, p);
        s.impact = impact;
        s.rank = Some(Rank { position: 0, of: 3 });
        s
    };
    let round = [
        ranked("a", 0.8, 1.0),
        ranked("b", 0.75, 3.0),
        ranked("spare", 0.0, 1.0),
    ];
    let mut outcomes = Vec::new();
    for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
        let mut a = Allocator::new(Policy::default(), &inv, GraphConfig::default()).unwrap();
        let mut got = Vec::new();
        for (k, i) in order.iter().enumerate() {
            let d = run(&mut a, AllocatorInput::Score(round[*i].clone()));
            if k < 2 {
                assert!(d.is_empty(), "the round is not complete yet");
            }
            got.extend(d);
        }
        outcomes.push(got);
    }
    assert_eq!(outcomes[0], outcomes[1]);
    assert_eq!(outcomes[0], outcomes[2]);
    // b has the higher expected impact (0.75 x 3): it gets the only room; a is told why not.
    let d = &outcomes[0];
    assert_eq!(d[0].action.target.as_str(), "wb");
    assert_eq!(d[1].action.kind, ActionKind::NoOp);
    assert!(d[1].reason.contains("ranked 2 of 3"), "{}", d[1].reason);
}

#[test]
fn beyond_the_bound_on_open_rounds_partitions_ahead_are_held_not_rounds_decided_in_part() {
    // A consumer catching up reads one partition's whole backlog of scores before the next
    // one's. Deciding the oldest rounds with part of their scores, once more are open than the
    // bound allows, gives other decisions than the replay's; holding the partitions ahead until
    // the others catch up gives the same.
    let inv = two_workloads_one_spare_node();
    // (partition, score): b, with the higher expected impact, is on partition 1.
    let mut inputs = Vec::new();
    for minute in 10..16 {
        for (partition, e, p, impact) in [
            (0, "a", 0.8, 1.0),
            (1, "b", 0.75, 3.0),
            (0, "spare", 0.0, 1.0),
        ] {
            let mut s = score(e, minute, p);
            s.impact = impact;
            s.rank = Some(Rank { position: 0, of: 3 });
            inputs.push((partition, s));
        }
    }
    let new = || {
        let mut a = Allocator::new(Policy::default(), &inv, GraphConfig::default()).unwrap();
        a.max_open_rounds = 2;
        a
    };
    let decide = |a: &mut Allocator, input: &(i32, RiskScore), out: &mut Vec<Output<Decision>>| {
        let origin = Origin {
            input: 0,
            partition: input.0,
            offset: 0,
        };
        a.process(AllocatorInput::Score(input.1.clone()), origin, out);
    };
    let mut in_order = new();
    let mut out = Vec::new();
    for input in &inputs {
        decide(&mut in_order, input, &mut out);
    }
    let want = decisions(out);
    assert_eq!(want.first().map(|d| d.action.target.as_str()), Some("wb"));
    // Partition 0's backlog first, then partition 1's, pausing what the allocator holds, as
    // the live runtime does (which first tells it of every partition assigned).
    let catching_up = |a: &mut Allocator| -> Vec<Decision> {
        a.assigned(0);
        a.assigned(1);
        let mut queues: BTreeMap<i32, std::collections::VecDeque<(i32, RiskScore)>> =
            BTreeMap::new();
        for input in &inputs {
            queues.entry(input.0).or_default().push_back(input.clone());
        }
        let mut out = Vec::new();
        loop {
            let held = a.held();
            let Some(queue) = queues
                .iter_mut()
                .find(|(p, q)| !q.is_empty() && !held.contains(p))
                .map(|(_, q)| q)
            else {
                break;
            };
            let input = queue.pop_front().expect("not empty");
            decide(a, &input, &mut out);
        }
        assert!(
            queues.values().all(|q| q.is_empty()),
            "every partition held"
        );
        decisions(out)
    };
    let mut held = new();
    held.hold_partitions();
    assert_eq!(catching_up(&mut held), want);
    // Not held (no runtime pausing), the bound decides rounds without b's score: a takes the
    // room b would have had.
    let mut unheld = new();
    let got = catching_up(&mut unheld);
    assert_ne!(got, want);
    assert_eq!(got.first().map(|d| d.action.target.as_str()), Some("wa"));
}

#[test]
fn scores_read_ahead_into_open_rounds_do_not_make_an_older_round_stale() {
    // Live, a consumer reads one partition ahead of another up to the bound on open rounds
    // (and a fetch beyond it, before the pause takes effect). Those scores wait in their open
    // rounds; judged against them, the oldest round's scores would be stale (over 15 minutes
    // behind) when it completes, and its decisions never made, where the replay, reading in
    // time order, makes them.
    let mut inputs = Vec::new();
    for minute in 10..32 {
        // n1 (partition 1) is at high risk in the first round only.
        let p1 = if minute == 10 { 0.95 } else { 0.1 };
        for (partition, e, p) in [(0, "n2", 0.1), (1, "n1", p1)] {
            let mut s = score(e, minute, p);
            s.rank = Some(Rank { position: 0, of: 2 });
            inputs.push((partition, s));
        }
    }
    let new = || {
        let mut a = Allocator::new(Policy::default(), &pool3(), GraphConfig::default()).unwrap();
        a.max_open_rounds = 32;
        a.hold_partitions();
        a.assigned(0);
        a.assigned(1);
        a
    };
    let decide = |a: &mut Allocator, inputs: &mut dyn Iterator<Item = &(i32, RiskScore)>| {
        let mut out = Vec::new();
        for (partition, s) in inputs {
            let origin = Origin {
                input: 0,
                partition: *partition,
                offset: 0,
            };
            a.process(AllocatorInput::Score(s.clone()), origin, &mut out);
        }
        decisions(out)
    };
    let want = decide(&mut new(), &mut inputs.iter());
    assert!(
        want.iter().any(|d| d.rule == "migrate-high-risk"),
        "{want:#?}"
    );
    // Partition 0's 22 rounds first, then partition 1's.
    let mut ahead = new();
    let mut got = decide(&mut ahead, &mut inputs.iter().filter(|(p, _)| *p == 0));
    assert!(got.is_empty(), "no round complete: {got:#?}");
    got.extend(decide(
        &mut ahead,
        &mut inputs.iter().filter(|(p, _)| *p == 1),
    ));
    assert_eq!(got, want);
}

#[test]
fn velocity_limits_defer_and_report() {
    let mut policy = Policy::default();
    policy.limits.per_minute = 2;
    let mut a = Allocator::new(policy, &Inventory::default(), GraphConfig::default()).unwrap();
    let mut acted = 0;
    let mut deferred = 0;
    for e in ["a", "b", "c", "d"] {
        for d in run(&mut a, AllocatorInput::Score(score(e, 0, 0.9))) {
            match d.action.kind {
                ActionKind::Migrate => acted += 1,
                ActionKind::NoOp => {
                    assert!(d.alternatives[0].rejected_because.contains("velocity"));
                    deferred += 1
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!((acted, deferred), (2, 2));
    // A minute later the deferred ones go through (they were not put in cool-down).
    let d = run(&mut a, AllocatorInput::Score(score("c", 1, 0.9)));
    assert_eq!(d[0].action.kind, ActionKind::Migrate);
}

#[test]
fn eviction_needs_permission_and_respects_minimum_replicas() {
    let inv = Inventory {
        nodes: vec![node("hot", 4.0), node("full", 4.0)],
        workloads: vec![
            workload("important", 3.0, &["hot"], 9),
            workload("filler", 3.0, &["full"], 1),
            workload("floor", 0.5, &["full"], 0),
        ],
        spares: vec![],
    };
    let mut policy = Policy::default();
    let mut a = Allocator::new(policy.clone(), &inv, GraphConfig::default()).unwrap();
    let d = run(&mut a, AllocatorInput::Score(score("hot", 0, 0.9)));
    assert_eq!(d[0].action.kind, ActionKind::NoOp);
    assert!(
        d[0].expected_effect.contains("does not allow eviction"),
        "{d:#?}"
    );

    policy.eviction.allowed = true;
    // filler is at its minimum (1 replica) on the only other node.
    let mut a = Allocator::new(policy.clone(), &inv, GraphConfig::default()).unwrap();
    let d = run(&mut a, AllocatorInput::Score(score("hot", 0, 0.9)));
    assert!(
        d[0].expected_effect.contains("insufficient resources"),
        "{d:#?}"
    );

    let mut inv2 = inv.clone();
    inv2.workloads[1].min_replicas = 0;
    let mut a = Allocator::new(policy, &inv2, GraphConfig::default()).unwrap();
    let d = run(&mut a, AllocatorInput::Score(score("hot", 0, 0.9)));
    let kinds: Vec<_> = d
        .iter()
        .map(|d| (d.action.kind, d.action.target.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (ActionKind::Evict, "filler"),
            (ActionKind::Migrate, "important")
        ]
    );
    a.pool.within_capacity().unwrap();
}

#[test]
fn inventory_updates_change_the_pool() {
    let mut a = Allocator::new(
        Policy::default(),
        &Inventory::default(),
        GraphConfig::default(),
    )
    .unwrap();
    let update = |change| {
        AllocatorInput::Inventory(InventoryUpdate {
            entity: id("inv"),
            time: DateTime::from_timestamp(0, 0).unwrap(),
            change,
        })
    };
    let mut inv = pool3();
    inv.workloads[1].requests.cpu = 5.0;
    run(
        &mut a,
        update(foresight_events::InventoryChange::Snapshot(inv)),
    );
    run(
        &mut a,
        update(foresight_events::InventoryChange::Remove(id("n3"))),
    );
    let d = run(&mut a, AllocatorInput::Score(score("n1", 1, 0.9)));
    // Only n2 is left: web cannot spread but fits there; batch does not fit after it.
    assert_eq!(d[0].action.target.as_str(), "web", "{d:#?}");
    assert_eq!(d[0].action.params["to"], serde_json::json!(["n2"]));
    assert!(
        d[0].alternatives
            .iter()
            .any(|a| a.action.target.as_str() == "batch" && a.rejected_because.contains("room")),
        "{d:#?}"
    );
    assert_eq!(d.len(), 1);
}

#[test]
fn config_loading_reports_missing_files() {
    let config = AllocatorConfig {
        policy_file: Some("/nonexistent/policy.yaml".into()),
        inventory_file: Some("/nonexistent/inventory.yaml".into()),
        ..AllocatorConfig::default()
    };
    assert_eq!(config.load().unwrap_err().len(), 2);
    let (policy, inventory) = AllocatorConfig::default().load().unwrap();
    assert_eq!(policy, Policy::default());
    assert_eq!(inventory, Inventory::default());
}

#[test]
fn the_randomised_hold_out_takes_no_action_and_records_its_propensity() {
    use foresight_events::{EventId, RiskScore, ScoreMethod};
    let policy = Policy {
        holdout: Holdout {
            share: 0.3,
            period: std::time::Duration::from_secs(24 * 3600),
        },
        ..Policy::default()
    };
    assert!(policy.validate().is_empty());
    let mut a = Allocator::new(policy.clone(), &Default::default(), Default::default()).unwrap();
    let mut out = Vec::new();
    let mut held = 0;
    for n in 0..200 {
        let entity = foresight_events::EntityId::new(format!("node-{n}")).unwrap();
        let score = RiskScore {
            entity: entity.clone(),
            time: chrono::DateTime::from_timestamp(3600, 0).unwrap(),
            window_id: EventId::derive("w", &[entity.as_str().as_bytes()]),
            horizon_seconds: 1800,
            probability: 0.95,
            lower: 0.9,
            upper: 0.97,
            time_to_failure_seconds: None,
            health: 5.0,
            band: foresight_events::Band::High,
            contributors: vec![],
            method: ScoreMethod::Prior,
            model_version: "prior".into(),
            signals: Default::default(),
            observed: Default::default(),
            blast_radius: vec![],
            impact: 1.0,
            rank: None,
        };
        let before = out.len();
        a.process(
            AllocatorInput::Score(score),
            foresight_events::Origin {
                input: 0,
                partition: 0,
                offset: n,
            },
            &mut out,
        );
        let decisions: Vec<_> = out[before..]
            .iter()
            .filter_map(|o| match o {
                foresight_events::Output::Event(d) => Some(d),
                _ => None,
            })
            .collect();
        assert!(!decisions.is_empty());
        let in_holdout = policy
            .holdout
            .holds_out(&entity, chrono::DateTime::from_timestamp(3600, 0).unwrap());
        let d = decisions[0];
        if in_holdout {
            held += 1;
            assert_eq!(decisions.len(), 1);
            assert_eq!(d.action.kind, ActionKind::NoOp);
            assert_eq!(d.action.params["holdout"], serde_json::json!(true));
            assert_eq!(d.action.params["propensity"], serde_json::json!(0.3));
            assert_eq!(d.alternatives[0].action.kind, ActionKind::Migrate);
        } else {
            // Acted on (or stopped by a velocity limit), never held out.
            assert!(!d.action.params.contains_key("holdout"), "{d:?}");
        }
    }
    assert!((40..80).contains(&held), "{held} of 200 held out at 30 %");
    assert!(
        !Policy {
            holdout: Holdout {
                share: 1.0,
                ..Holdout::default()
            },
            ..Policy::default()
        }
        .validate()
        .is_empty()
    );
}

#[test]
fn a_restored_allocator_decides_as_the_original_and_a_fresh_one_does_not() {
    let new = || {
        Allocator::new(
            Policy::default(),
            &Inventory::default(),
            GraphConfig::default(),
        )
        .unwrap()
    };
    let ranked = |e: &str, minute: i64, p: f64| {
        let mut s = score(e, minute, p);
        s.rank = Some(Rank { position: 0, of: 2 });
        s
    };
    let mut original = new();
    // svc is high: migrated, its band held and its lower rules quiet for the cool-down; x waits
    // in an open round for its peer.
    let first = run(&mut original, AllocatorInput::Score(score("svc", 0, 0.9)));
    assert_eq!(first[0].action.kind, ActionKind::Migrate);
    assert!(run(&mut original, AllocatorInput::Score(ranked("x", 1, 0.5))).is_empty());

    let entries = puts(original.checkpoint(0));
    assert_eq!(entries.len(), 3, "svc, x and the clocks");
    let mut restored = new();
    restored.restore(0, entries).unwrap();
    let mut fresh = new();
    assert!(original.checkpoint(0).is_empty(), "nothing changed since");

    let next = [
        ranked("y", 1, 0.5),
        score("svc", 2, 0.6),
        score("svc", 3, 0.72),
    ];
    let decide = |a: &mut Allocator| -> Vec<String> {
        next.iter()
            .flat_map(|s| run(a, AllocatorInput::Score(s.clone())))
            .map(|d| serde_json::to_string(&d).unwrap())
            .collect()
    };
    let (o, r, f) = (
        decide(&mut original),
        decide(&mut restored),
        decide(&mut fresh),
    );
    assert!(!o.is_empty(), "the round of x and y is decided");
    assert_eq!(o, r, "a restored allocator decides exactly as the original");
    assert_ne!(
        o, f,
        "a fresh one forgets the open round, the band and the cool-down"
    );
    // Forgetting the partition drops its entities and their open rounds.
    restored.forget_partition(0);
    assert!(restored.entities.is_empty() && restored.rounds.is_empty());
}

#[test]
fn velocity_limits_hold_across_a_restart() {
    let limited = || {
        let mut policy = Policy::default();
        policy.limits.per_minute = 3;
        Allocator::new(policy, &Inventory::default(), GraphConfig::default()).unwrap()
    };
    let mut original = limited();
    for e in ["a", "b"] {
        let d = run(&mut original, AllocatorInput::Score(score(e, 0, 0.9)));
        assert_eq!(d[0].action.kind, ActionKind::Migrate);
    }
    // Restored from the checkpoints of two partitions taken together: counted once, not twice.
    let (p0, p1) = (puts(original.checkpoint(0)), puts(original.checkpoint(1)));
    let mut restored = limited();
    restored.restore(0, p0).unwrap();
    restored.restore(1, p1).unwrap();
    // Two of the minute's three actions are taken (counted once, not once per partition):
    // one more goes, the next waits, as they would have without the restart.
    let kinds = |a: &mut Allocator, entities: &[&str]| -> Vec<ActionKind> {
        entities
            .iter()
            .flat_map(|e| run(a, AllocatorInput::Score(score(e, 0, 0.9))))
            .map(|d| d.action.kind)
            .collect()
    };
    assert_eq!(
        kinds(&mut restored, &["c", "d"]),
        [ActionKind::Migrate, ActionKind::NoOp]
    );
    assert_eq!(
        kinds(&mut limited(), &["c", "d"]),
        [ActionKind::Migrate, ActionKind::Migrate],
        "a fresh one forgets"
    );
}

#[test]
fn partitions_revoked_and_restored_in_one_instance_decide_again_as_before() {
    // A consumer whose group session is lost has its partitions revoked and assigned again,
    // and restores them from their last checkpoint, which may be older than the rounds decided
    // since (their decisions not yet acknowledged). Reading the scores after it again must
    // decide as before: the decisions still waiting go out as they were, so other ones (a
    // round decided late, score by score, or velocity counted twice) would publish their ids
    // with other content.
    let limited = || {
        let mut policy = Policy::default();
        policy.limits.per_minute = 3;
        Allocator::new(policy, &Inventory::default(), GraphConfig::default()).unwrap()
    };
    let round = |minute: i64| -> Vec<RiskScore> {
        (0..4)
            .map(|k| {
                let mut s = score(&format!("e{minute}-{k}"), minute, 0.75 + 0.05 * k as f64);
                s.rank = Some(Rank {
                    position: k as u32 + 1,
                    of: 4,
                });
                s
            })
            .collect()
    };
    let decide = |a: &mut Allocator, minutes: std::ops::Range<i64>| -> Vec<String> {
        minutes
            .flat_map(round)
            .flat_map(|s| run(a, AllocatorInput::Score(s)))
            .map(|d| serde_json::to_string(&d).unwrap())
            .collect()
    };
    let mut a = limited();
    decide(&mut a, 0..1);
    let saved = puts(a.checkpoint(0));
    let want = decide(&mut a, 1..4);
    assert!(want.len() >= 12, "three rounds of four decided: {want:?}");
    a.forget_partition(0);
    a.restore(0, saved).unwrap();
    assert_eq!(decide(&mut a, 1..4), want);
}
