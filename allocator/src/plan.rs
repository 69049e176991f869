//! Planning one action against the pool: choosing targets, checking room, minimum replicas,
//! velocity and the traffic-switch guard, and applying the effect to the pool at once so the
//! next decision sees it.

use std::collections::{BTreeMap, VecDeque};

use chrono::{DateTime, TimeDelta, Utc};
use foresight_events::{
    Action, ActionKind, Alternative, DependencyGraph, EntityId, Environment, Resources, RiskScore,
};
use serde_json::{Value, json};

use crate::policy::{ActionSpec, Policy};
use crate::pool::{Hold, Pool, Standby};

/// Actions started recently, on event time: what the velocity limits count. Kept sorted by
/// time, globally and per group, so that counting a window is a binary search.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Velocity {
    started: VecDeque<DateTime<Utc>>,
    by_group: BTreeMap<String, VecDeque<DateTime<Utc>>>,
}

/// Inserts `t` keeping `q` sorted (at the back, unless a decision on an older score came late).
fn insert_sorted(q: &mut VecDeque<DateTime<Utc>>, t: DateTime<Utc>) {
    let at = q.partition_point(|x| *x <= t);
    q.insert(at, t);
}

/// Entries of `q` within `window` before `now` (or after it).
fn within(q: &VecDeque<DateTime<Utc>>, now: DateTime<Utc>, window: TimeDelta) -> u32 {
    let from = now
        .checked_sub_signed(window)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    (q.len() - q.partition_point(|t| *t <= from)) as u32
}

impl Velocity {
    /// Starts one action in `group` at `now` if the limits allow it.
    pub(crate) fn take(
        &mut self,
        policy: &Policy,
        now: DateTime<Utc>,
        group: &str,
    ) -> Result<(), String> {
        self.check(policy, now, group)?;
        insert_sorted(&mut self.started, now);
        insert_sorted(self.by_group.entry(group.to_owned()).or_default(), now);
        Ok(())
    }

    /// Whether the limits allow one more action in `group` at `now` (checked before planning,
    /// so that a round past its limits does not search the pool for nothing).
    pub(crate) fn check(
        &mut self,
        policy: &Policy,
        now: DateTime<Utc>,
        group: &str,
    ) -> Result<(), String> {
        let l = &policy.limits;
        let flight = TimeDelta::from_std(l.action_duration).unwrap_or(TimeDelta::MAX);
        let minute = TimeDelta::minutes(1);
        let horizon = flight.max(minute);
        // Forget what no window can count any more.
        let old = |t: &DateTime<Utc>| now.signed_duration_since(*t) >= horizon;
        while self.started.front().is_some_and(old) {
            self.started.pop_front();
        }
        self.by_group.retain(|_, q| {
            while q.front().is_some_and(old) {
                q.pop_front();
            }
            !q.is_empty()
        });
        let (in_flight, last_minute) = (
            within(&self.started, now, flight),
            within(&self.started, now, minute),
        );
        let (g_flight, g_minute) = self
            .by_group
            .get(group)
            .map_or((0, 0), |q| (within(q, now, flight), within(q, now, minute)));
        let over = if in_flight >= l.max_concurrent {
            Some(format!("{} actions in flight", l.max_concurrent))
        } else if last_minute >= l.per_minute {
            Some(format!("{} actions in the last minute", l.per_minute))
        } else if g_flight >= l.group_max_concurrent {
            Some(format!(
                "{} actions in flight in group {group:?}",
                l.group_max_concurrent
            ))
        } else if g_minute >= l.group_per_minute {
            Some(format!(
                "{} actions in the last minute in group {group:?}",
                l.group_per_minute
            ))
        } else {
            None
        };
        match over {
            Some(why) => Err(format!("velocity limit reached: {why}")),
            None => Ok(()),
        }
    }
}

/// Why an action was not carried out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Why {
    /// A velocity limit: it will be tried again.
    Deferred(String),
    /// It cannot be done now (no room, nothing to do, guard not met).
    Cannot(String),
}

impl Why {
    pub(crate) fn text(&self) -> &str {
        match self {
            Why::Deferred(s) | Why::Cannot(s) => s,
        }
    }
}

/// One action decided.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) action: Action,
    pub(crate) effect: String,
    pub(crate) inverse: Option<Action>,
    /// Other choices considered for this step (targets) and why they lost.
    pub(crate) considered: Vec<Alternative>,
}

/// What a planner works with.
pub(crate) struct Ctx<'a> {
    pub(crate) pool: &'a mut Pool,
    pub(crate) graph: &'a DependencyGraph,
    pub(crate) policy: &'a Policy,
    pub(crate) velocity: &'a mut Velocity,
    pub(crate) score: &'a RiskScore,
    /// A failure of the entity has been reported.
    pub(crate) failed: bool,
    /// Velocity-limit group of the entity.
    pub(crate) group: String,
}

fn act(kind: ActionKind, target: &EntityId, params: BTreeMap<String, Value>) -> Action {
    Action {
        kind,
        target: target.clone(),
        params,
    }
}

fn params<const N: usize>(kv: [(&str, Value); N]) -> BTreeMap<String, Value> {
    kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The inverse of an action that is undone by the same kind with `revert`.
fn revert(a: &Action, extra: BTreeMap<String, Value>) -> Action {
    let mut p = a.params.clone();
    p.extend(extra);
    p.insert("revert".into(), Value::Bool(true));
    act(a.kind, &a.target, p)
}

fn res_json(r: &Resources) -> Value {
    json!({"cpu": r.cpu, "memory": r.memory, "storage": r.storage, "bandwidth": r.bandwidth})
}

impl Ctx<'_> {
    fn entity(&self) -> &EntityId {
        &self.score.entity
    }

    fn now(&self) -> DateTime<Utc> {
        self.score.time
    }

    fn take(&mut self) -> Result<(), Why> {
        self.velocity
            .take(self.policy, self.score.time, &self.group)
            .map_err(Why::Deferred)
    }

    fn max_risk(&self) -> f64 {
        self.policy.placement.max_target_risk
    }

    /// Plans one action of a rule.
    pub(crate) fn plan(&mut self, spec: &ActionSpec) -> Result<Vec<Step>, Why> {
        if !matches!(spec.kind, ActionKind::Monitor | ActionKind::NoOp) {
            self.velocity
                .check(self.policy, self.score.time, &self.group)
                .map_err(Why::Deferred)?;
        }
        let p = &spec.params;
        let flag = |k: &str, d: bool| p.get(k).and_then(Value::as_bool).unwrap_or(d);
        let num = |k: &str, d: f64| p.get(k).and_then(Value::as_f64).unwrap_or(d);
        match spec.kind {
            ActionKind::Migrate => self.migrate(flag("split", true)),
            ActionKind::ScaleUp => self.scale_up(num("replicas", 1.0) as u32),
            ActionKind::ScaleBack => self.scale_back(num("replicas", 1.0) as u32),
            ActionKind::ReserveBuffer => {
                self.reserve_buffer(num("share", 1.0), num("pieces", 2.0) as usize)
            }
            ActionKind::PreProvisionStandby => self.pre_provision(
                flag("include_dependencies", true),
                num("depth", 2.0) as u32,
                Resources {
                    cpu: num("cpu", 1.0),
                    memory: num("memory", 1.0),
                    ..Resources::default()
                },
            ),
            ActionKind::TransferState => self.transfer_state(
                p.get("mode").and_then(Value::as_str).unwrap_or("auto"),
                flag("include_dependencies", true),
            ),
            ActionKind::RegisterTrafficSwitch => {
                self.register_switch(flag("include_dependencies", true))
            }
            ActionKind::SwitchTraffic => self.switch_traffic(flag("include_dependencies", true)),
            ActionKind::SwapVirtual => self.swap_virtual(),
            ActionKind::ScheduleRepair => self.schedule_repair(),
            ActionKind::AdjustBandwidth => self.simple(
                ActionKind::AdjustBandwidth,
                params([
                    (
                        "priority",
                        p.get("priority").cloned().unwrap_or(json!("low")),
                    ),
                    ("limit", json!(num("limit", 0.5))),
                ]),
                "its bandwidth and I/O priority are lowered, easing the pressure on it",
            ),
            ActionKind::RaiseLimits => self.raise_limits(num("factor", 1.5)),
            ActionKind::PrioritiseQueue => self.prioritise(num("boost", 10.0) as i32),
            ActionKind::Evict => self.evict_on_entity(),
            ActionKind::Monitor | ActionKind::NoOp => Ok(vec![Step {
                action: act(spec.kind, self.entity(), p.clone()),
                effect: if spec.kind == ActionKind::Monitor {
                    "the entity is watched; nothing changes".into()
                } else {
                    "nothing changes".into()
                },
                inverse: None,
                considered: Vec::new(),
            }]),
        }
    }

    fn simple(
        &mut self,
        kind: ActionKind,
        params: BTreeMap<String, Value>,
        effect: &str,
    ) -> Result<Vec<Step>, Why> {
        self.take()?;
        let action = act(kind, self.entity(), params);
        Ok(vec![Step {
            inverse: Some(revert(&action, BTreeMap::new())),
            action,
            effect: effect.into(),
            considered: Vec::new(),
        }])
    }

    /// Frees room for `need` on some node of `env` by evicting lower-priority work, if the
    /// policy allows it and the priority justifies it. Returns the node and the evictions.
    fn evict_for(
        &mut self,
        need: &Resources,
        env: Environment,
        beneficiary: u32,
        exclude: &dyn Fn(&EntityId) -> bool,
    ) -> Result<(EntityId, Vec<Step>), Why> {
        let e = &self.policy.eviction;
        if !e.allowed {
            return Err(Why::Cannot(format!(
                "no node has room for {}; policy {} does not allow eviction",
                show(need),
                self.policy.name
            )));
        }
        if self.score.priority() < e.min_score_priority {
            return Err(Why::Cannot(format!(
                "no node has room for {}; priority {:.3} is below the {:.3} eviction needs",
                show(need),
                self.score.priority(),
                e.min_score_priority
            )));
        }
        // Candidate nodes by risk, then id; the first where evicting enough is possible wins.
        let nodes: Vec<EntityId> = self
            .pool
            .by_risk()
            .iter()
            .take_while(|r| r.risk <= self.max_risk())
            .filter(|r| r.environment == env && !exclude(&r.id))
            .map(|r| r.id.clone())
            .collect();
        for node in nodes {
            let n = &self.pool.nodes[&node];
            if !need.fits_in(&n.spec.capacity.minus(&n.reserved)) {
                continue;
            }
            let mut free = n.free();
            let mut victims: Vec<(EntityId, u32)> = self
                .pool
                .workloads_on(&node)
                .into_iter()
                .filter(|w| {
                    !w.spec.critical
                        && w.spec.priority + e.min_priority_gap <= beneficiary
                        && w.replicas()
                            - w.placements
                                .iter()
                                .filter(|p| p.node == node)
                                .map(|p| p.share)
                                .sum::<f64>()
                            >= f64::from(w.spec.min_replicas) - 1e-9
                })
                .map(|w| (w.spec.id.clone(), w.spec.priority))
                .collect();
            // Lowest priority first, then id.
            victims.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            let mut chosen = Vec::new();
            for (v, _) in victims {
                if need.fits_in(&free) {
                    break;
                }
                let w = &self.pool.workloads[&v];
                let share: f64 = w
                    .placements
                    .iter()
                    .filter(|p| p.node == node)
                    .map(|p| p.share)
                    .sum();
                free = free.plus(&w.spec.requests.scaled(share));
                chosen.push(v);
            }
            if !need.fits_in(&free) {
                continue;
            }
            let mut steps = Vec::new();
            for v in chosen {
                self.take()?;
                let share = self.pool.remove_from(&v, &node);
                let action = act(
                    ActionKind::Evict,
                    &v,
                    params([
                        ("node", json!(node.as_str())),
                        ("share", json!(share)),
                        ("for", json!(self.entity().as_str())),
                    ]),
                );
                steps.push(Step {
                    inverse: Some(act(
                        ActionKind::ScaleUp,
                        &v,
                        params([("node", json!(node.as_str())), ("share", json!(share))]),
                    )),
                    effect: format!(
                        "lower-priority {v} leaves {node}, making room for {}",
                        self.entity()
                    ),
                    action,
                    considered: Vec::new(),
                });
            }
            return Ok((node, steps));
        }
        Err(Why::Cannot(format!(
            "insufficient resources: no node has room for {}, even by evicting lower-priority work",
            show(need)
        )))
    }

    /// Where to put `need`: the best node, else room made by eviction.
    fn room(
        &mut self,
        need: &Resources,
        env: Environment,
        beneficiary: u32,
        exclude: &dyn Fn(&EntityId) -> bool,
    ) -> Result<(EntityId, Vec<Step>, Vec<Alternative>), Why> {
        if let Some(n) = self.pool.best_node(need, env, self.max_risk(), exclude) {
            let chosen = (n.spec.id.clone(), n.risk);
            let considered = self.runner_up(need, env, exclude, &chosen);
            return Ok((chosen.0, Vec::new(), considered));
        }
        let (node, evictions) = self.evict_for(need, env, beneficiary, exclude)?;
        Ok((node, evictions, Vec::new()))
    }

    /// The next-best node, as the alternative that lost.
    fn runner_up(
        &self,
        need: &Resources,
        env: Environment,
        exclude: &dyn Fn(&EntityId) -> bool,
        chosen: &(EntityId, f64),
    ) -> Vec<Alternative> {
        let other = |id: &EntityId| exclude(id) || id == &chosen.0;
        self.pool
            .best_node(need, env, self.max_risk(), &other)
            .map(|n| Alternative {
                action: act(
                    ActionKind::Migrate,
                    self.entity(),
                    params([("to", json!(n.spec.id.as_str()))]),
                ),
                rejected_because: format!(
                    "{} has risk {:.3}; {} has {:.3}",
                    n.spec.id, n.risk, chosen.0, chosen.1
                ),
            })
            .into_iter()
            .collect()
    }

    fn migrate(&mut self, split: bool) -> Result<Vec<Step>, Why> {
        let entity = self.entity().clone();
        // Which placements move: every workload's on an at-risk node; an at-risk workload's on
        // its riskiest node.
        let moves: Vec<(EntityId, EntityId)> = if self.pool.nodes.contains_key(&entity) {
            let ws: Vec<EntityId> = self
                .pool
                .workloads_on(&entity)
                .iter()
                .map(|w| w.spec.id.clone())
                .collect();
            if ws.is_empty() {
                return Err(Why::Cannot(format!("no workloads run on {entity}")));
            }
            ws.into_iter().map(|w| (w, entity.clone())).collect()
        } else if let Some(w) = self.pool.workloads.get(&entity) {
            let riskiest = w
                .placements
                .iter()
                .filter_map(|p| self.pool.nodes.get(&p.node))
                .max_by(|a, b| {
                    a.risk
                        .total_cmp(&b.risk)
                        .then_with(|| b.spec.id.cmp(&a.spec.id))
                });
            match riskiest {
                Some(n) if n.risk > self.max_risk() => vec![(entity.clone(), n.spec.id.clone())],
                _ => {
                    return Err(Why::Cannot(format!(
                        "none of {entity}'s nodes is at risk (all at most {:.2})",
                        self.max_risk()
                    )));
                }
            }
        } else {
            // Not in the inventory: the orchestrator places it.
            self.take()?;
            let action = act(
                ActionKind::Migrate,
                &entity,
                params([("placement", json!("delegated"))]),
            );
            return Ok(vec![Step {
                inverse: Some(revert(&action, BTreeMap::new())),
                action,
                effect: format!(
                    "work moves off {entity} before it fails ({entity} is not in the inventory: \
                     the orchestrator chooses where)"
                ),
                considered: Vec::new(),
            }]);
        };
        // The buffers held for the entity were for exactly this.
        self.pool.release_buffers(&entity);
        let mut steps = Vec::new();
        let mut failures = Vec::new();
        for (w, from) in moves {
            match self.move_workload(&w, &from, split) {
                Ok(mut s) => steps.append(&mut s),
                Err(why @ Why::Deferred(_)) if steps.is_empty() => return Err(why),
                Err(why) => failures.push((w, why)),
            }
        }
        if steps.is_empty() {
            let (w, why) = failures.remove(0);
            return Err(Why::Cannot(format!("{w}: {}", why.text())));
        }
        if let Some(first) = steps
            .iter_mut()
            .find(|s| s.action.kind == ActionKind::Migrate)
        {
            for (w, why) in failures {
                first.considered.push(Alternative {
                    action: act(ActionKind::Migrate, &w, BTreeMap::new()),
                    rejected_because: why.text().to_owned(),
                });
            }
        }
        Ok(steps)
    }

    fn move_workload(
        &mut self,
        w: &EntityId,
        from: &EntityId,
        split: bool,
    ) -> Result<Vec<Step>, Why> {
        let ws = &self.pool.workloads[w];
        let share: f64 = ws
            .placements
            .iter()
            .filter(|p| &p.node == from)
            .map(|p| p.share)
            .sum();
        let need = ws.spec.requests.scaled(share);
        let (priority, pieces) = (ws.spec.priority, ws.spec.splittable.max(1));
        let env = self
            .pool
            .nodes
            .get(from)
            .map_or(Environment::Primary, |n| n.spec.environment);
        let hosts: Vec<EntityId> = ws.placements.iter().map(|p| p.node.clone()).collect();
        // Prefer a node without another replica of it (spread), then any other node.
        let spread = |id: &EntityId| hosts.contains(id);
        let not_from = |id: &EntityId| id == from;
        let mut targets: Vec<(EntityId, f64)> = Vec::new();
        let mut evictions = Vec::new();
        let mut considered = Vec::new();
        if let Some(n) = self
            .pool
            .best_node(&need, env, self.max_risk(), &spread)
            .or_else(|| self.pool.best_node(&need, env, self.max_risk(), &not_from))
        {
            let chosen = (n.spec.id.clone(), n.risk);
            considered = self.runner_up(&need, env, &not_from, &chosen);
            targets.push((chosen.0, share));
        } else if split && pieces > 1 {
            // Smaller units on distinct nodes.
            let piece = need.scaled(1.0 / f64::from(pieces));
            let mut taken: Vec<EntityId> = vec![from.clone()];
            for _ in 0..pieces {
                let t = taken.clone();
                let excl = move |id: &EntityId| t.contains(id);
                match self.pool.best_node(&piece, env, self.max_risk(), &excl) {
                    Some(n) => {
                        let id = n.spec.id.clone();
                        taken.push(id.clone());
                        targets.push((id, share / f64::from(pieces)));
                    }
                    None => break,
                }
            }
            if targets.len() < pieces as usize {
                targets.clear();
            }
        }
        if targets.is_empty() {
            let (node, ev) = self.evict_for(&need, env, priority, &not_from)?;
            evictions = ev;
            targets.push((node, share));
        }
        self.take()?;
        for (to, s) in &targets {
            self.pool.move_share(w, from, to, *s);
        }
        let to: Vec<Value> = targets.iter().map(|(t, _)| json!(t.as_str())).collect();
        let action = act(
            ActionKind::Migrate,
            w,
            params([
                ("from", json!(from.as_str())),
                ("to", Value::Array(to.clone())),
                ("pieces", json!(targets.len())),
            ]),
        );
        let inverse = act(
            ActionKind::Migrate,
            w,
            params([
                ("from", Value::Array(to)),
                ("to", json!([from.as_str()])),
                ("revert", json!(true)),
            ]),
        );
        let names: Vec<&str> = targets.iter().map(|(t, _)| t.as_str()).collect();
        let mut steps = evictions;
        steps.push(Step {
            action,
            effect: format!(
                "{w} moves off {from} to {} before {from} fails{}",
                names.join(", "),
                if targets.len() > 1 {
                    format!(", split into {} smaller units", targets.len())
                } else {
                    String::new()
                }
            ),
            inverse: Some(inverse),
            considered,
        });
        Ok(steps)
    }

    /// The workloads an action on the entity is about: the entity itself if it is a workload,
    /// else those on the node.
    fn subject_workloads(&self) -> Vec<EntityId> {
        let e = self.entity();
        if self.pool.workloads.contains_key(e) {
            vec![e.clone()]
        } else {
            self.pool
                .workloads_on(e)
                .iter()
                .map(|w| w.spec.id.clone())
                .collect()
        }
    }

    fn scale_up(&mut self, replicas: u32) -> Result<Vec<Step>, Why> {
        let subjects = self.subject_workloads();
        if subjects.is_empty() {
            return Err(Why::Cannot(format!(
                "{} is not a workload in the inventory and runs none",
                self.entity()
            )));
        }
        let mut steps = Vec::new();
        let mut last = None;
        for w in subjects {
            let ws = &self.pool.workloads[&w];
            let room_left = f64::from(ws.spec.max_replicas) - ws.replicas();
            let add = (room_left.floor().max(0.0) as u32).min(replicas);
            if add == 0 {
                last = Some(Why::Cannot(format!(
                    "{w} already runs its maximum of {} replicas",
                    ws.spec.max_replicas
                )));
                continue;
            }
            let (need, priority) = (ws.spec.requests, ws.spec.priority);
            let at_risk = self.entity().clone();
            let mut placed = Vec::new();
            let mut evictions = Vec::new();
            let mut considered = Vec::new();
            for _ in 0..add {
                let hosts: Vec<EntityId> = self.pool.workloads[&w]
                    .placements
                    .iter()
                    .map(|p| p.node.clone())
                    .collect();
                let excl = |id: &EntityId| id == &at_risk || hosts.contains(id);
                match self.room(&need, Environment::Primary, priority, &excl) {
                    Ok((node, mut ev, c)) => {
                        evictions.append(&mut ev);
                        considered = c;
                        self.pool.add_replica(&w, &node);
                        placed.push(node);
                    }
                    Err(why) => {
                        last = Some(why);
                        break;
                    }
                }
            }
            if placed.is_empty() {
                continue;
            }
            if let Err(why) = self.take() {
                for n in &placed {
                    self.pool.remove_from(&w, n);
                }
                return if steps.is_empty() {
                    Err(why)
                } else {
                    Ok(steps)
                };
            }
            let nodes: Vec<Value> = placed.iter().map(|n| json!(n.as_str())).collect();
            let action = act(
                ActionKind::ScaleUp,
                &w,
                params([
                    ("replicas", json!(placed.len())),
                    ("nodes", Value::Array(nodes.clone())),
                ]),
            );
            steps.append(&mut evictions);
            steps.push(Step {
                inverse: Some(act(
                    ActionKind::ScaleBack,
                    &w,
                    params([
                        ("replicas", json!(placed.len())),
                        ("nodes", Value::Array(nodes)),
                    ]),
                )),
                effect: format!(
                    "{} more replica(s) of {w} absorb the loss if {} fails",
                    placed.len(),
                    self.entity()
                ),
                action,
                considered,
            });
        }
        if steps.is_empty() {
            return Err(last.unwrap_or_else(|| Why::Cannot("nothing to scale".into())));
        }
        Ok(steps)
    }

    fn scale_back(&mut self, replicas: u32) -> Result<Vec<Step>, Why> {
        let e = self.entity().clone();
        let mut removals: Vec<(EntityId, Vec<EntityId>)> = Vec::new();
        let mut reasons = Vec::new();
        if let Some(ws) = self.pool.workloads.get(&e) {
            // The workload's placements on its riskiest nodes go first.
            let mut nodes: Vec<(f64, EntityId)> = ws
                .placements
                .iter()
                .map(|p| {
                    (
                        self.pool.nodes.get(&p.node).map_or(0.0, |n| n.risk),
                        p.node.clone(),
                    )
                })
                .collect();
            nodes.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            nodes.dedup_by(|a, b| a.1 == b.1);
            let mut left = ws.replicas();
            let mut chosen = Vec::new();
            for (_, n) in nodes.into_iter().take(replicas as usize) {
                let share: f64 = ws
                    .placements
                    .iter()
                    .filter(|p| p.node == n)
                    .map(|p| p.share)
                    .sum();
                if left - share < f64::from(ws.spec.min_replicas) - 1e-9 {
                    break;
                }
                left -= share;
                chosen.push(n);
            }
            if chosen.is_empty() {
                reasons.push(format!(
                    "{e} runs at its minimum of {} replicas",
                    ws.spec.min_replicas
                ));
            } else {
                removals.push((e.clone(), chosen));
            }
        } else {
            for w in self.pool.workloads_on(&e) {
                let share: f64 = w
                    .placements
                    .iter()
                    .filter(|p| p.node == e)
                    .map(|p| p.share)
                    .sum();
                if w.replicas() - share >= f64::from(w.spec.min_replicas) - 1e-9 {
                    removals.push((w.spec.id.clone(), vec![e.clone()]));
                } else {
                    reasons.push(format!(
                        "{} runs at its minimum of {} replicas",
                        w.spec.id, w.spec.min_replicas
                    ));
                }
            }
            if removals.is_empty() && reasons.is_empty() {
                reasons.push(format!("no workloads run on {e}"));
            }
        }
        if removals.is_empty() {
            return Err(Why::Cannot(reasons.join("; ")));
        }
        let mut steps = Vec::new();
        for (w, nodes) in removals {
            if let Err(why) = self.take() {
                return if steps.is_empty() {
                    Err(why)
                } else {
                    Ok(steps)
                };
            }
            // Everything of it on those nodes goes (two replicas on one node are two).
            let removed: f64 = nodes.iter().map(|n| self.pool.remove_from(&w, n)).sum();
            let replicas = if removed.fract() == 0.0 {
                json!(removed as u64)
            } else {
                json!(removed)
            };
            let nodes: Vec<Value> = nodes.iter().map(|n| json!(n.as_str())).collect();
            steps.push(Step {
                action: act(
                    ActionKind::ScaleBack,
                    &w,
                    params([
                        ("replicas", replicas.clone()),
                        ("nodes", Value::Array(nodes.clone())),
                    ]),
                ),
                inverse: Some(act(
                    ActionKind::ScaleUp,
                    &w,
                    params([("replicas", replicas), ("nodes", Value::Array(nodes))]),
                )),
                effect: format!(
                    "less load on {e} slows its degradation; {w} keeps its minimum replicas"
                ),
                considered: reasons
                    .iter()
                    .map(|r| Alternative {
                        action: act(ActionKind::ScaleBack, &e, BTreeMap::new()),
                        rejected_because: r.clone(),
                    })
                    .collect(),
            });
        }
        Ok(steps)
    }

    fn reserve_buffer(&mut self, share: f64, pieces: usize) -> Result<Vec<Step>, Why> {
        let e = self.entity().clone();
        if self.pool.buffers.contains_key(&e) {
            return Err(Why::Cannot(format!("a buffer is already reserved for {e}")));
        }
        let load = if let Some(n) = self.pool.nodes.get(&e) {
            n.used
        } else if let Some(w) = self.pool.workloads.get(&e) {
            w.spec.requests
        } else {
            // Not in the inventory: the orchestrator sizes and places the buffer.
            return self.simple(
                ActionKind::ReserveBuffer,
                params([("placement", json!("delegated"))]),
                &format!(
                    "healthy nodes keep room to take over {e}'s work ({e} is not in the \
                     inventory: the orchestrator sizes and places the buffer)"
                ),
            );
        };
        if load.cpu + load.memory + load.storage + load.bandwidth <= 0.0 {
            return Err(Why::Cannot(format!("{e} carries no load to buffer")));
        }
        let pieces = pieces.max(1);
        let chunk = load.scaled(share / pieces as f64);
        let env = self
            .pool
            .nodes
            .get(&e)
            .map_or(Environment::Primary, |n| n.spec.environment);
        let mut holds: Vec<EntityId> = Vec::new();
        for _ in 0..pieces {
            let taken = holds.clone();
            let at = e.clone();
            let excl = move |id: &EntityId| id == &at || taken.contains(id);
            let Some(n) = self.pool.best_node(&chunk, env, self.max_risk(), &excl) else {
                break;
            };
            holds.push(n.spec.id.clone());
        }
        if holds.len() < pieces {
            return Err(Why::Cannot(format!(
                "insufficient resources: fewer than {pieces} healthy nodes have room for {}",
                show(&chunk)
            )));
        }
        self.take()?;
        let until = self.now()
            + TimeDelta::from_std(self.policy.placement.buffer_ttl).unwrap_or(TimeDelta::MAX);
        for n in &holds {
            self.pool.hold(n, &chunk);
        }
        self.pool.buffers.insert(
            e.clone(),
            holds
                .iter()
                .map(|n| Hold {
                    node: n.clone(),
                    amount: chunk,
                    until: Some(until),
                })
                .collect(),
        );
        let nodes: Vec<Value> = holds.iter().map(|n| json!(n.as_str())).collect();
        let action = act(
            ActionKind::ReserveBuffer,
            &e,
            params([
                ("nodes", Value::Array(nodes)),
                ("each", res_json(&chunk)),
                ("until", json!(until.to_rfc3339())),
            ]),
        );
        Ok(vec![Step {
            inverse: Some(revert(&action, BTreeMap::new())),
            effect: format!(
                "healthy nodes {} keep room to take over {e}'s work",
                holds
                    .iter()
                    .map(EntityId::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            action,
            considered: Vec::new(),
        }])
    }

    /// The entity and (if asked) what it depends on, nearest first, up to `depth` hops.
    fn component_and_dependencies(&self, include: bool, depth: u32) -> Vec<EntityId> {
        let mut out = vec![self.entity().clone()];
        if !include {
            return out;
        }
        let mut frontier = vec![self.entity().clone()];
        for _ in 0..depth {
            let mut next = Vec::new();
            for f in &frontier {
                for (d, _) in self.graph.dependencies_of(f) {
                    if !out.contains(d) {
                        out.push(d.clone());
                        next.push(d.clone());
                    }
                }
            }
            frontier = next;
        }
        out
    }

    fn pre_provision(
        &mut self,
        include: bool,
        depth: u32,
        default_size: Resources,
    ) -> Result<Vec<Step>, Why> {
        let components = self.component_and_dependencies(include, depth);
        let mut steps = Vec::new();
        let mut problems = Vec::new();
        for c in components {
            if self.pool.standbys.contains_key(&c) {
                continue;
            }
            let need = match self.pool.workloads.get(&c) {
                Some(w) => w.spec.requests,
                None => default_size,
            };
            let Some(n) =
                self.pool
                    .best_node(&need, Environment::Secondary, self.max_risk(), &|_| false)
            else {
                problems.push(format!(
                    "insufficient resources: no secondary node has room for {}'s standby ({})",
                    c,
                    show(&need)
                ));
                continue;
            };
            let node = n.spec.id.clone();
            if let Err(why) = self.take() {
                return if steps.is_empty() {
                    Err(why)
                } else {
                    Ok(steps)
                };
            }
            self.pool.hold(&node, &need);
            self.pool.standbys.insert(
                c.clone(),
                Standby {
                    hold: Hold {
                        node: node.clone(),
                        amount: need,
                        until: None,
                    },
                    transfers: 0,
                    registered: false,
                    switched: false,
                },
            );
            let action = act(
                ActionKind::PreProvisionStandby,
                &c,
                params([
                    ("environment", json!(Environment::Secondary.as_str())),
                    ("node", json!(node.as_str())),
                    ("resources", res_json(&need)),
                    ("for", json!(self.entity().as_str())),
                ]),
            );
            steps.push(Step {
                inverse: Some(revert(&action, BTreeMap::new())),
                effect: format!("a standby of {c} on {node} is ready to take over if it fails"),
                action,
                considered: Vec::new(),
            });
        }
        if steps.is_empty() {
            return Err(Why::Cannot(if problems.is_empty() {
                "standbys are already provisioned".into()
            } else {
                problems.join("; ")
            }));
        }
        Ok(steps)
    }

    fn transfer_state(&mut self, mode: &str, include: bool) -> Result<Vec<Step>, Why> {
        let components = self.component_and_dependencies(include, 6);
        let mut steps = Vec::new();
        for c in components {
            let Some(s) = self.pool.standbys.get(&c) else {
                continue;
            };
            let mode = match mode {
                "auto" if s.transfers == 0 => "snapshot",
                "auto" => "incremental",
                m => m,
            };
            let node = s.hold.node.clone();
            if let Err(why) = self.take() {
                return if steps.is_empty() {
                    Err(why)
                } else {
                    Ok(steps)
                };
            }
            if let Some(s) = self.pool.standbys.get_mut(&c) {
                s.transfers += 1;
            }
            steps.push(Step {
                action: act(
                    ActionKind::TransferState,
                    &c,
                    params([("mode", json!(mode)), ("to", json!(node.as_str()))]),
                ),
                effect: format!("the standby of {c} on {node} holds current state ({mode})"),
                // A copy of state changes nothing that needs undoing.
                inverse: None,
                considered: Vec::new(),
            });
        }
        if steps.is_empty() {
            return Err(Why::Cannot(format!("{} has no standby", self.entity())));
        }
        Ok(steps)
    }

    fn register_switch(&mut self, include: bool) -> Result<Vec<Step>, Why> {
        let components = self.component_and_dependencies(include, 6);
        let mut steps = Vec::new();
        for c in components {
            let Some(s) = self.pool.standbys.get(&c) else {
                continue;
            };
            if s.registered {
                continue;
            }
            let node = s.hold.node.clone();
            if let Err(why) = self.take() {
                return if steps.is_empty() {
                    Err(why)
                } else {
                    Ok(steps)
                };
            }
            if let Some(s) = self.pool.standbys.get_mut(&c) {
                s.registered = true;
            }
            let action = act(
                ActionKind::RegisterTrafficSwitch,
                &c,
                params([("standby", json!(node.as_str()))]),
            );
            steps.push(Step {
                inverse: Some(revert(&action, BTreeMap::new())),
                effect: format!("traffic for {c} can switch to {node} at once"),
                action,
                considered: Vec::new(),
            });
        }
        if steps.is_empty() {
            return Err(Why::Cannot(format!(
                "{} has no standby waiting for registration",
                self.entity()
            )));
        }
        Ok(steps)
    }

    fn switch_traffic(&mut self, include: bool) -> Result<Vec<Step>, Why> {
        let min = self.policy.switch.min_lower_bound;
        if !self.failed && self.score.lower < min {
            return Err(Why::Cannot(format!(
                "failure not confirmed and the score's lower bound {:.3} is below {min:.3}",
                self.score.lower
            )));
        }
        let why = if self.failed {
            "failure confirmed".to_owned()
        } else {
            format!("P >= {:.3} with very high confidence", self.score.lower)
        };
        let components = self.component_and_dependencies(include, 6);
        let mut steps = Vec::new();
        for c in components {
            let Some(s) = self.pool.standbys.get(&c) else {
                continue;
            };
            if !s.registered || s.switched {
                continue;
            }
            let node = s.hold.node.clone();
            if let Err(e) = self.take() {
                return if steps.is_empty() { Err(e) } else { Ok(steps) };
            }
            if let Some(s) = self.pool.standbys.get_mut(&c) {
                s.switched = true;
            }
            let action = act(
                ActionKind::SwitchTraffic,
                &c,
                params([("to", json!(node.as_str())), ("because", json!(why))]),
            );
            steps.push(Step {
                inverse: Some(revert(&action, BTreeMap::new())),
                effect: format!("traffic for {c} is served by its standby on {node}"),
                action,
                considered: Vec::new(),
            });
        }
        if steps.is_empty() {
            return Err(Why::Cannot(format!(
                "{} has no registered standby to switch to",
                self.entity()
            )));
        }
        Ok(steps)
    }

    fn swap_virtual(&mut self) -> Result<Vec<Step>, Why> {
        let e = self.entity().clone();
        if self.pool.virtuals.contains_key(&e) {
            return Err(Why::Cannot(format!("{e} is already swapped")));
        }
        let Some(n) = self.pool.nodes.get(&e) else {
            return Err(Why::Cannot(format!("{e} is not in the inventory")));
        };
        let Some(need) = n.spec.virtual_requests else {
            return Err(Why::Cannot(format!(
                "no virtual component can be made operational for {e}"
            )));
        };
        let env = n.spec.environment;
        let at = e.clone();
        let Some(host) = self
            .pool
            .best_node(&need, env, self.max_risk(), &|id| id == &at)
            .map(|h| h.spec.id.clone())
        else {
            return Err(Why::Cannot(format!(
                "no healthy node has room for a virtual {e} ({})",
                show(&need)
            )));
        };
        self.take()?;
        self.pool.hold(&host, &need);
        self.pool.virtuals.insert(
            e.clone(),
            Hold {
                node: host.clone(),
                amount: need,
                until: None,
            },
        );
        let action = act(
            ActionKind::SwapVirtual,
            &e,
            params([
                ("host", json!(host.as_str())),
                ("resources", res_json(&need)),
            ]),
        );
        Ok(vec![Step {
            inverse: Some(revert(&action, BTreeMap::new())),
            effect: format!("a virtual {e} on {host} takes the failing one's place"),
            action,
            considered: Vec::new(),
        }])
    }

    fn schedule_repair(&mut self) -> Result<Vec<Step>, Why> {
        let e = self.entity().clone();
        if self.pool.repairs.contains_key(&e) {
            return Err(Why::Cannot(format!("a repair of {e} is already scheduled")));
        }
        let (kind, zone) = self
            .pool
            .nodes
            .get(&e)
            .map(|n| (n.spec.kind.clone(), n.spec.zone.clone()))
            .unwrap_or_default();
        // A spare of its kind, from its own zone first.
        let spare = self
            .pool
            .spares
            .values()
            .filter(|s| s.kind == kind)
            .min_by(|a, b| (a.zone != zone, &a.id).cmp(&(b.zone != zone, &b.id)))
            .map(|s| s.id.clone());
        self.take()?;
        if let Some(s) = &spare {
            self.pool.spares.remove(s);
        }
        self.pool.repairs.insert(e.clone(), spare.clone());
        let action = act(
            ActionKind::ScheduleRepair,
            &e,
            params([
                (
                    "spare",
                    spare.as_ref().map_or(Value::Null, |s| json!(s.as_str())),
                ),
                ("order_replacement", json!(spare.is_none())),
            ]),
        );
        Ok(vec![Step {
            inverse: Some(revert(&action, BTreeMap::new())),
            effect: match &spare {
                Some(s) => format!("{e} is replaced with spare {s} before it fails"),
                None => format!(
                    "{e} is repaired; no spare of kind {kind:?} is in the pool, so one is ordered"
                ),
            },
            action,
            considered: Vec::new(),
        }])
    }

    fn raise_limits(&mut self, factor: f64) -> Result<Vec<Step>, Why> {
        let e = self.entity().clone();
        let Some(ws) = self.pool.workloads.get(&e) else {
            // A code id the pool does not place: the platform applies the new limits.
            return self.simple(
                ActionKind::RaiseLimits,
                params([
                    ("factor", json!(factor)),
                    ("applies_to", json!("current_and_future_executions")),
                ]),
                "current and future executions get the resources they lacked",
            );
        };
        let old = ws.spec.requests;
        let new = old.scaled(factor);
        // Every node running it must have room for the increase of all its placements there.
        let mut extra: BTreeMap<&EntityId, Resources> = BTreeMap::new();
        for p in &ws.placements {
            let e = extra.entry(&p.node).or_default();
            *e = e.plus(&new.minus(&old).scaled(p.share));
        }
        let mut short = Vec::new();
        for (node, extra) in extra {
            if let Some(n) = self.pool.nodes.get(node)
                && !extra.fits_in(&n.free())
            {
                short.push(format!("{node} lacks {}", show(&extra)));
            }
        }
        if !short.is_empty() {
            return Err(Why::Cannot(format!(
                "insufficient resources to raise {e}'s limits x{factor}: {}",
                short.join(", ")
            )));
        }
        self.take()?;
        self.pool.set_requests(&e, new);
        let action = act(
            ActionKind::RaiseLimits,
            &e,
            params([
                ("factor", json!(factor)),
                ("requests", res_json(&new)),
                ("applies_to", json!("current_and_future_executions")),
            ]),
        );
        Ok(vec![Step {
            inverse: Some(act(
                ActionKind::RaiseLimits,
                &e,
                params([("requests", res_json(&old)), ("revert", json!(true))]),
            )),
            effect: format!("current and future executions of {e} get {factor}x the resources"),
            action,
            considered: Vec::new(),
        }])
    }

    fn prioritise(&mut self, boost: i32) -> Result<Vec<Step>, Why> {
        let e = self.entity().clone();
        self.take()?;
        let now = self.pool.workloads.get_mut(&e).map(|w| {
            w.spec.queue_priority = w.spec.queue_priority.saturating_add(boost);
            w.spec.queue_priority
        });
        let action = act(
            ActionKind::PrioritiseQueue,
            &e,
            params([
                ("boost", json!(boost)),
                ("queue_priority", now.map_or(Value::Null, |p| json!(p))),
            ]),
        );
        Ok(vec![Step {
            inverse: Some(act(
                ActionKind::PrioritiseQueue,
                &e,
                params([("boost", json!(-boost)), ("revert", json!(true))]),
            )),
            effect: format!("{e}'s queued requests are served first"),
            action,
            considered: Vec::new(),
        }])
    }

    fn evict_on_entity(&mut self) -> Result<Vec<Step>, Why> {
        let e = self.entity().clone();
        let victim = self
            .pool
            .workloads_on(&e)
            .into_iter()
            .rev()
            .find(|w| {
                let share: f64 = w
                    .placements
                    .iter()
                    .filter(|p| p.node == e)
                    .map(|p| p.share)
                    .sum();
                !w.spec.critical && w.replicas() - share >= f64::from(w.spec.min_replicas) - 1e-9
            })
            .map(|w| w.spec.id.clone());
        let Some(v) = victim else {
            return Err(Why::Cannot(format!(
                "no work on {e} can be evicted without going below its minimum replicas"
            )));
        };
        self.take()?;
        let share = self.pool.remove_from(&v, &e);
        let action = act(
            ActionKind::Evict,
            &v,
            params([("node", json!(e.as_str())), ("share", json!(share))]),
        );
        Ok(vec![Step {
            inverse: Some(act(
                ActionKind::ScaleUp,
                &v,
                params([("node", json!(e.as_str())), ("share", json!(share))]),
            )),
            effect: format!("lowest-priority {v} leaves at-risk {e}"),
            action,
            considered: Vec::new(),
        }])
    }
}

fn show(r: &Resources) -> String {
    format!(
        "cpu {}, memory {}, storage {}, bandwidth {}",
        r.cpu, r.memory, r.storage, r.bandwidth
    )
}
