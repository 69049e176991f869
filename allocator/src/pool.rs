//! The resource pool as the allocator sees it: the declared inventory, kept current by
//! inventory events, plus the effects of its own decisions (placements moved, buffers reserved,
//! standbys provisioned, spares taken) so that later decisions never count the same room twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use foresight_events::{
    EntityId, Environment, Inventory, InventoryChange, Node, Resources, Spare, Workload,
};

/// A node and what is taken of it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodeState {
    pub(crate) spec: Node,
    /// Requests of the work placed on it.
    pub(crate) used: Resources,
    /// Held for buffers, standbys and virtual stand-ins.
    pub(crate) reserved: Resources,
    /// Latest probability of failure scored for it (0 until scored).
    pub(crate) risk: f64,
}

impl NodeState {
    pub(crate) fn free(&self) -> Resources {
        self.spec.capacity.minus(&self.used).minus(&self.reserved)
    }
}

/// A workload's placement on one node: its whole replicas there (share 1 each) and pieces of
/// split ones. A workload has at most one placement per node (see [`add_share`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Placement {
    pub(crate) node: EntityId,
    pub(crate) share: f64,
}

/// Adds `share` of a workload on `node` to its placements: to the node's placement if it has
/// one, so that moving or removing "the workload on a node" always moves or removes all of it
/// there (an inventory may list a node twice for two replicas on it).
fn add_share(placements: &mut Vec<Placement>, node: &EntityId, share: f64) {
    match placements.iter_mut().find(|p| &p.node == node) {
        Some(p) => p.share += share,
        None => placements.push(Placement {
            node: node.clone(),
            share,
        }),
    }
}

/// A workload and where it runs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WorkloadState {
    pub(crate) spec: Workload,
    pub(crate) placements: Vec<Placement>,
}

impl WorkloadState {
    /// Replicas it runs with (split pieces add up to one).
    pub(crate) fn replicas(&self) -> f64 {
        self.placements.iter().map(|p| p.share).sum()
    }
    pub(crate) fn on(&self, node: &EntityId) -> bool {
        self.placements.iter().any(|p| &p.node == node)
    }
}

/// Capacity held on a node for someone.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Hold {
    pub(crate) node: EntityId,
    pub(crate) amount: Resources,
    /// Released at this event time (buffers); `None`: until undone.
    pub(crate) until: Option<DateTime<Utc>>,
}

/// A standby in the secondary environment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Standby {
    pub(crate) hold: Hold,
    pub(crate) transfers: u32,
    pub(crate) registered: bool,
    pub(crate) switched: bool,
}

/// The pool.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pool {
    pub(crate) nodes: BTreeMap<EntityId, NodeState>,
    pub(crate) workloads: BTreeMap<EntityId, WorkloadState>,
    pub(crate) spares: BTreeMap<EntityId, Spare>,
    /// Workloads placed on each node.
    pub(crate) on_node: BTreeMap<EntityId, BTreeSet<EntityId>>,
    /// Buffers reserved for each at-risk entity.
    pub(crate) buffers: BTreeMap<EntityId, Vec<Hold>>,
    pub(crate) standbys: BTreeMap<EntityId, Standby>,
    /// Virtual stand-ins, by the component they replace.
    pub(crate) virtuals: BTreeMap<EntityId, Hold>,
    /// Repairs scheduled, with the spare used.
    pub(crate) repairs: BTreeMap<EntityId, Option<EntityId>>,
    /// Every node by (risk, id): placement searches stop at the first risk level with room
    /// instead of scanning the pool. Rebuilt by [`Pool::reindex`] whenever risks or nodes change.
    by_risk: Vec<Ranked>,
    /// Where each node is in `by_risk`.
    position: HashMap<EntityId, usize>,
}

/// A node as placement searches see it: a copy of what they read, kept in step by
/// [`Pool::adjust`], so that a search touches no map.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ranked {
    pub(crate) risk: f64,
    pub(crate) id: EntityId,
    pub(crate) environment: Environment,
    free: Resources,
}

impl Pool {
    pub(crate) fn new(inventory: &Inventory) -> Self {
        let mut pool = Self::default();
        pool.replace(inventory);
        pool
    }

    /// Every node by (risk, id), lowest first.
    pub(crate) fn by_risk(&self) -> &[Ranked] {
        &self.by_risk
    }

    /// Changes what `node` uses and holds by these amounts (which may be negative).
    fn adjust(&mut self, node: &EntityId, used: Resources, reserved: Resources) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        n.used = n.used.plus(&used);
        n.reserved = n.reserved.plus(&reserved);
        let free = n.free();
        if let Some(&p) = self.position.get(node) {
            self.by_risk[p].free = free;
        }
    }

    /// Re-sorts the nodes by risk (after risks or nodes changed).
    pub(crate) fn reindex(&mut self) {
        self.by_risk.clear();
        self.by_risk.extend(self.nodes.values().map(|n| Ranked {
            risk: n.risk,
            id: n.spec.id.clone(),
            environment: n.spec.environment,
            free: n.free(),
        }));
        self.by_risk
            .sort_by(|a, b| a.risk.total_cmp(&b.risk).then_with(|| a.id.cmp(&b.id)));
        self.position = self
            .by_risk
            .iter()
            .enumerate()
            .map(|(p, r)| (r.id.clone(), p))
            .collect();
    }

    /// Replaces the declared inventory, keeping the allocator's own holds that still fit.
    fn replace(&mut self, inventory: &Inventory) {
        let risks: BTreeMap<EntityId, f64> = self
            .nodes
            .iter()
            .map(|(k, n)| (k.clone(), n.risk))
            .collect();
        self.nodes.clear();
        self.workloads.clear();
        self.spares.clear();
        for n in &inventory.nodes {
            self.put_node(n.clone());
        }
        for w in &inventory.workloads {
            self.put_workload(w.clone());
        }
        for s in &inventory.spares {
            self.spares.insert(s.id.clone(), s.clone());
        }
        for (id, risk) in risks {
            if let Some(n) = self.nodes.get_mut(&id) {
                n.risk = risk;
            }
        }
        self.recount();
        self.reindex();
    }

    fn put_node(&mut self, spec: Node) {
        let risk = self.nodes.get(&spec.id).map_or(0.0, |n| n.risk);
        self.nodes.insert(
            spec.id.clone(),
            NodeState {
                spec,
                used: Resources::default(),
                reserved: Resources::default(),
                risk,
            },
        );
    }

    fn put_workload(&mut self, spec: Workload) {
        let mut placements = Vec::new();
        for n in &spec.replicas {
            add_share(&mut placements, n, 1.0);
        }
        self.workloads
            .insert(spec.id.clone(), WorkloadState { spec, placements });
    }

    /// Applies an inventory change: the inventory is the truth about what runs where.
    pub(crate) fn apply(&mut self, change: &InventoryChange) {
        match change {
            InventoryChange::Node(n) => self.put_node(n.clone()),
            InventoryChange::Workload(w) => self.put_workload(w.clone()),
            InventoryChange::Spare(s) => {
                self.spares.insert(s.id.clone(), s.clone());
            }
            InventoryChange::Remove(id) => {
                self.nodes.remove(id);
                self.workloads.remove(id);
                self.spares.remove(id);
            }
            InventoryChange::Snapshot(inv) => return self.replace(inv),
        }
        self.recount();
        self.reindex();
    }

    /// Recomputes what is used and held on every node from the placements and holds. Holds on
    /// nodes that are gone are dropped.
    fn recount(&mut self) {
        for n in self.nodes.values_mut() {
            n.used = Resources::default();
            n.reserved = Resources::default();
        }
        self.on_node.clear();
        for w in self.workloads.values() {
            for p in &w.placements {
                if let Some(n) = self.nodes.get_mut(&p.node) {
                    n.used = n.used.plus(&w.spec.requests.scaled(p.share));
                    self.on_node
                        .entry(p.node.clone())
                        .or_default()
                        .insert(w.spec.id.clone());
                }
            }
        }
        let nodes = &mut self.nodes;
        let mut hold = |h: &Hold| match nodes.get_mut(&h.node) {
            Some(n) => {
                n.reserved = n.reserved.plus(&h.amount);
                true
            }
            None => false,
        };
        for holds in self.buffers.values_mut() {
            holds.retain(&mut hold);
        }
        self.buffers.retain(|_, h| !h.is_empty());
        self.standbys.retain(|_, s| hold(&s.hold));
        self.virtuals.retain(|_, h| hold(h));
    }

    /// Releases buffers whose time is up.
    pub(crate) fn expire(&mut self, now: DateTime<Utc>) {
        let mut freed = Vec::new();
        for holds in self.buffers.values_mut() {
            holds.retain(|h| {
                let keep = h.until.is_none_or(|u| u > now);
                if !keep {
                    freed.push((h.node.clone(), h.amount));
                }
                keep
            });
        }
        self.buffers.retain(|_, h| !h.is_empty());
        for (node, amount) in freed {
            self.adjust(&node, Resources::default(), amount.scaled(-1.0));
        }
    }

    /// Holds `amount` on `node` (which must have room: callers check).
    pub(crate) fn hold(&mut self, node: &EntityId, amount: &Resources) {
        self.adjust(node, Resources::default(), *amount);
    }

    /// Releases a hold.
    pub(crate) fn release(&mut self, h: &Hold) {
        self.adjust(&h.node, Resources::default(), h.amount.scaled(-1.0));
    }

    /// Releases every buffer held for `entity`.
    pub(crate) fn release_buffers(&mut self, entity: &EntityId) {
        for h in self.buffers.remove(entity).unwrap_or_default() {
            self.release(&h);
        }
    }

    /// Moves `share` of workload `w`'s placement on `from` to `to`.
    pub(crate) fn move_share(&mut self, w: &EntityId, from: &EntityId, to: &EntityId, share: f64) {
        let Some(ws) = self.workloads.get_mut(w) else {
            return;
        };
        let req = ws.spec.requests.scaled(share);
        if let Some(i) = ws.placements.iter().position(|p| &p.node == from) {
            ws.placements[i].share -= share;
            if ws.placements[i].share <= 1e-9 {
                ws.placements.remove(i);
            }
        }
        add_share(&mut ws.placements, to, share);
        let still_on_from = ws.on(from);
        self.adjust(from, req.scaled(-1.0), Resources::default());
        self.adjust(to, req, Resources::default());
        if !still_on_from && let Some(s) = self.on_node.get_mut(from) {
            s.remove(w);
        }
        self.on_node
            .entry(to.clone())
            .or_default()
            .insert(w.clone());
    }

    /// Adds a whole replica of `w` on `node`.
    pub(crate) fn add_replica(&mut self, w: &EntityId, node: &EntityId) {
        let Some(ws) = self.workloads.get_mut(w) else {
            return;
        };
        add_share(&mut ws.placements, node, 1.0);
        let req = ws.spec.requests;
        self.adjust(node, req, Resources::default());
        self.on_node
            .entry(node.clone())
            .or_default()
            .insert(w.clone());
    }

    /// Removes `w`'s placement(s) on `node`, returning the share removed.
    pub(crate) fn remove_from(&mut self, w: &EntityId, node: &EntityId) -> f64 {
        let Some(ws) = self.workloads.get_mut(w) else {
            return 0.0;
        };
        let share: f64 = ws
            .placements
            .iter()
            .filter(|p| &p.node == node)
            .map(|p| p.share)
            .sum();
        ws.placements.retain(|p| &p.node != node);
        let req = ws.spec.requests.scaled(share);
        self.adjust(node, req.scaled(-1.0), Resources::default());
        if let Some(s) = self.on_node.get_mut(node) {
            s.remove(w);
        }
        share
    }

    /// Changes `w`'s requests, updating what its nodes use.
    pub(crate) fn set_requests(&mut self, w: &EntityId, requests: Resources) {
        let Some(ws) = self.workloads.get_mut(w) else {
            return;
        };
        let old = ws.spec.requests;
        ws.spec.requests = requests;
        let placements: Vec<(EntityId, f64)> = ws
            .placements
            .iter()
            .map(|p| (p.node.clone(), p.share))
            .collect();
        for (node, share) in placements {
            self.adjust(
                &node,
                requests.minus(&old).scaled(share),
                Resources::default(),
            );
        }
    }

    /// Workloads on `node`, highest priority first (then by id).
    pub(crate) fn workloads_on(&self, node: &EntityId) -> Vec<&WorkloadState> {
        let mut ws: Vec<&WorkloadState> = self
            .on_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|w| self.workloads.get(w))
            .collect();
        ws.sort_by(|a, b| {
            b.spec
                .priority
                .cmp(&a.spec.priority)
                .then_with(|| a.spec.id.cmp(&b.spec.id))
        });
        ws
    }

    /// The lowest-risk node in `env` with room for `need`, not in `exclude`, risk at most
    /// `max_risk`; ties go to the node with most free CPU, then to the smallest id.
    pub(crate) fn best_node(
        &self,
        need: &Resources,
        env: Environment,
        max_risk: f64,
        exclude: &dyn Fn(&EntityId) -> bool,
    ) -> Option<&NodeState> {
        let mut best: Option<&Ranked> = None;
        for r in &self.by_risk {
            // Sorted by risk: nothing further on can beat a node already found.
            if r.risk > max_risk || best.is_some_and(|b| r.risk > b.risk) {
                break;
            }
            if r.environment != env || !need.fits_in(&r.free) || exclude(&r.id) {
                continue;
            }
            // Equal risk: more free CPU wins; equal free CPU: the smaller id (seen first) stays.
            if best.is_none_or(|b| r.free.cpu > b.free.cpu) {
                best = Some(r);
            }
        }
        best.and_then(|b| self.nodes.get(&b.id))
    }

    /// Whether no node holds more than it has (within rounding), and the search index agrees
    /// with the nodes.
    pub(crate) fn within_capacity(&self) -> Result<(), String> {
        for r in &self.by_risk {
            let n = self
                .nodes
                .get(&r.id)
                .ok_or("index names a node that is gone")?;
            let d = n.free().minus(&r.free);
            if [d.cpu, d.memory, d.storage, d.bandwidth]
                .iter()
                .any(|v| v.abs() > 1e-6)
            {
                return Err(format!("index of {} is out of step with the node", r.id));
            }
        }
        for n in self.nodes.values() {
            let taken = n.used.plus(&n.reserved);
            if !taken.fits_in(&n.spec.capacity.plus(&Resources {
                cpu: 1e-6,
                memory: 1e-6,
                storage: 1e-6,
                bandwidth: 1e-6,
            })) {
                return Err(format!(
                    "{} holds {taken:?} of {:?}",
                    n.spec.id, n.spec.capacity
                ));
            }
        }
        Ok(())
    }
}
