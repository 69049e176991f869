//! The resource pool the allocator places work in: nodes with capacity, the workloads placed on
//! them, spare components. Declared in configuration ([`Inventory`]) and kept current by
//! [`InventoryUpdate`] events (from an inventory topic), so the allocator never works from a
//! hard-coded pool.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{EntityId, EventData, EventId};

/// An amount of each resource the allocator accounts for. Units are the operator's (the
/// examples use cores, GiB, GiB and Mbit/s); they only have to agree between capacities and
/// requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// CPU.
    pub cpu: f64,
    /// Memory.
    pub memory: f64,
    /// Storage.
    pub storage: f64,
    /// Network bandwidth.
    pub bandwidth: f64,
}

impl Resources {
    /// Component-wise sum.
    pub fn plus(&self, o: &Resources) -> Resources {
        Resources {
            cpu: self.cpu + o.cpu,
            memory: self.memory + o.memory,
            storage: self.storage + o.storage,
            bandwidth: self.bandwidth + o.bandwidth,
        }
    }

    /// Component-wise difference.
    pub fn minus(&self, o: &Resources) -> Resources {
        Resources {
            cpu: self.cpu - o.cpu,
            memory: self.memory - o.memory,
            storage: self.storage - o.storage,
            bandwidth: self.bandwidth - o.bandwidth,
        }
    }

    /// Every component multiplied by `k`.
    pub fn scaled(&self, k: f64) -> Resources {
        Resources {
            cpu: self.cpu * k,
            memory: self.memory * k,
            storage: self.storage * k,
            bandwidth: self.bandwidth * k,
        }
    }

    /// Whether every component of `self` is at most that of `o` (with a tolerance for rounding).
    pub fn fits_in(&self, o: &Resources) -> bool {
        const EPS: f64 = 1e-9;
        self.cpu <= o.cpu + EPS
            && self.memory <= o.memory + EPS
            && self.storage <= o.storage + EPS
            && self.bandwidth <= o.bandwidth + EPS
    }

    /// Whether every component is finite and not negative.
    pub fn is_valid(&self) -> bool {
        [self.cpu, self.memory, self.storage, self.bandwidth]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0)
    }
}

/// Which environment a node is in: work runs in the primary; standbys wait in the secondary.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    /// Where work normally runs.
    #[default]
    Primary,
    /// Where standby capacity is pre-provisioned, ready for a traffic switch.
    Secondary,
}

impl Environment {
    /// The environment's name as written in events and policies.
    pub fn as_str(&self) -> &'static str {
        match self {
            Environment::Primary => "primary",
            Environment::Secondary => "secondary",
        }
    }
}

/// A node (host, instance, device): something with capacity that work is placed on, or an
/// inventory item that can fail and be swapped or replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Its id: the entity its scores are about.
    pub id: EntityId,
    /// What it is (`host`, `disk`, `pump`...): spares replace nodes of their kind.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Primary or secondary environment.
    #[serde(default)]
    pub environment: Environment,
    /// Failure domain, e.g. an availability zone: spares are taken from the same zone first.
    #[serde(default)]
    pub zone: String,
    /// Velocity-limit group (defaults to the zone): limits per group bound how much of one
    /// group is changed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// What it can hold.
    #[serde(default)]
    pub capacity: Resources,
    /// If a virtual stand-in can be made operational for it: the resources that stand-in needs
    /// on another node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_requests: Option<Resources>,
}

fn default_kind() -> String {
    "host".into()
}

impl Node {
    /// Its velocity-limit group.
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.zone)
    }
}

/// Work placed on nodes: a service, a task, a function (code id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Its id: the entity its scores are about (e.g. a code id for function executions).
    pub id: EntityId,
    /// What it is (`service`, `task`, `function`...), visible to policy conditions.
    #[serde(default = "default_workload_kind")]
    pub kind: String,
    /// Importance: when capacity is short, work of lower priority may be evicted for it.
    #[serde(default)]
    pub priority: u32,
    /// Critical work is never evicted and weighs more in the allocator's ranking.
    #[serde(default)]
    pub critical: bool,
    /// Resources of one replica (for functions: of one execution slot).
    #[serde(default)]
    pub requests: Resources,
    /// The node of each replica.
    #[serde(default)]
    pub replicas: Vec<EntityId>,
    /// Fewest replicas it may run with: never scaled or evicted below this.
    #[serde(default = "one")]
    pub min_replicas: u32,
    /// Most replicas it may run with.
    #[serde(default = "max_replicas")]
    pub max_replicas: u32,
    /// Into how many smaller units one replica can be split when migrated (1: not splittable).
    #[serde(default = "one")]
    pub splittable: u32,
    /// Whether it holds state that a standby needs transferred.
    #[serde(default)]
    pub stateful: bool,
    /// Priority of its queued requests (higher is served first).
    #[serde(default)]
    pub queue_priority: i32,
}

fn default_workload_kind() -> String {
    "service".into()
}

fn one() -> u32 {
    1
}

fn max_replicas() -> u32 {
    16
}

/// A spare component that a repair can use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Spare {
    /// Its id.
    pub id: EntityId,
    /// The kind of node it replaces.
    pub kind: String,
    /// Where it is stocked.
    #[serde(default)]
    pub zone: String,
}

/// The whole pool, as declared in configuration or sent as a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Inventory {
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Workloads and where their replicas run.
    pub workloads: Vec<Workload>,
    /// Spare components.
    pub spares: Vec<Spare>,
}

/// One change to the pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum InventoryChange {
    /// A node appeared or changed.
    Node(Node),
    /// A workload appeared or changed (its placements included).
    Workload(Workload),
    /// A spare was stocked.
    Spare(Spare),
    /// The node, workload or spare with this id is gone.
    Remove(EntityId),
    /// The whole pool, replacing what was known.
    Snapshot(Inventory),
}

/// An inventory event: keeps the allocator's resource pool current.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryUpdate {
    /// The item changed (for a snapshot: the inventory's source, e.g. `inventory`).
    pub entity: EntityId,
    /// When the change was observed.
    pub time: DateTime<Utc>,
    /// What changed.
    pub change: InventoryChange,
}

impl EventData for InventoryUpdate {
    const KIND: &'static str = "inventory_update";
    const VERSION: u32 = 1;
    fn entity(&self) -> &EntityId {
        &self.entity
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    /// Entity, time and content: a re-sent update has the id of the original.
    fn id(&self) -> EventId {
        let body = serde_json::to_vec(&self.change).unwrap_or_default();
        EventId::derive(
            Self::KIND,
            &[
                self.entity.as_str().as_bytes(),
                &self.time.timestamp_millis().to_le_bytes(),
                &body,
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_round_trip_and_ids_follow_content() {
        let node = Node {
            id: EntityId::new("n1").unwrap(),
            kind: "host".into(),
            environment: Environment::Secondary,
            zone: "a".into(),
            group: None,
            capacity: Resources {
                cpu: 8.0,
                memory: 32.0,
                ..Resources::default()
            },
            virtual_requests: None,
        };
        let update = InventoryUpdate {
            entity: node.id.clone(),
            time: DateTime::from_timestamp(60, 0).unwrap(),
            change: InventoryChange::Node(node.clone()),
        };
        let json = serde_json::to_string(&update).unwrap();
        assert_eq!(
            serde_json::from_str::<InventoryUpdate>(&json).unwrap(),
            update
        );
        let mut other = update.clone();
        if let InventoryChange::Node(n) = &mut other.change {
            n.capacity.cpu = 16.0;
        }
        assert_ne!(update.id(), other.id());
        assert_eq!(node.group(), "a");
        assert!(Resources::default().fits_in(&node.capacity));
        assert!(!node.capacity.fits_in(&Resources::default()));
    }
}
