//! Foresight's shared event types.
//!
//! Every record that crosses a stage boundary is one of the payload types here, wrapped in a
//! CloudEvents 1.0 [`Event`] envelope with a deterministic [`EventId`]. Stages meet only through these
//! types and the [`Processor`] contract; nothing here does IO.

mod dead_letter;
mod envelope;
mod graph;
mod inventory;
mod stage;
mod types;

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use dead_letter::{DeadLetter, ErrorClass};
pub use envelope::{
    CLOUDEVENTS_CONTENT_TYPE, EnvelopeError, Event, EventData, EventId, OutgoingMessage, Routed,
};
pub use graph::{
    DeclaredDependency, DependencyGraph, Dependent, EdgeInfo, GraphConfig, GraphConfigError,
};
pub use inventory::{
    Environment, Inventory, InventoryChange, InventoryUpdate, Node, Resources, Spare, Workload,
};
pub use stage::{
    InputPartition, Origin, Output, Processor, Rejection, StateChange, StateError,
    decode_json_state, decode_state, encode_json_state, encode_state, partition_key,
    partitions_ahead,
};
pub use types::{
    Action, ActionKind, ActuationOutcome, Alternative, Band, Contributor, Decision, DependencyEdge,
    FailureReport, FeatureWindow, LogEvent, LogStats, MetricKind, MetricSample, MetricStats,
    OutcomeStatus, Rank, RiskScore, ScoreMethod, Severity, Telemetry,
};

/// Longest entity id accepted.
pub const MAX_ENTITY_LEN: usize = 256;

/// The id of a component (host, pod, service, pump...): non-empty, at most [`MAX_ENTITY_LEN`] bytes,
/// no control characters. It is the Kafka key of every message about the entity.
///
/// Cheap to clone (a shared string): every sample, window and score carries one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct EntityId(std::sync::Arc<str>);

/// Why a string is not an entity id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntityIdError {
    /// Empty string.
    #[error("entity id is empty")]
    Empty,
    /// Longer than [`MAX_ENTITY_LEN`].
    #[error("entity id is {0} bytes long; at most {MAX_ENTITY_LEN} are allowed")]
    TooLong(usize),
    /// Contains a control character.
    #[error("entity id contains a control character")]
    ControlCharacter,
}

impl EntityId {
    /// Validates and wraps an id (checked where it lies, then copied once into its shared
    /// string: every decoded sample makes one).
    pub fn new(id: impl AsRef<str>) -> Result<Self, EntityIdError> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(EntityIdError::Empty);
        }
        if id.len() > MAX_ENTITY_LEN {
            return Err(EntityIdError::TooLong(id.len()));
        }
        // Printable ASCII has no control characters; anything else is checked character by
        // character (Unicode's controls include U+0080 to U+009F).
        let printable = id.bytes().all(|b| (0x20..0x7f).contains(&b));
        if !printable && id.chars().any(char::is_control) {
            return Err(EntityIdError::ControlCharacter);
        }
        Ok(Self(id.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for EntityId {
    type Error = EntityIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl<'de> Deserialize<'de> for EntityId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// The public event kinds, for schema generation and docs: (kind, JSON Schema of its envelope).
pub fn public_schemas() -> Vec<(&'static str, schemars::Schema)> {
    fn one<T: EventData>() -> (&'static str, schemars::Schema) {
        let mut schema = schemars::schema_for!(Event<T>);
        schema.insert("$id".into(), T::data_schema().into());
        schema.insert(
            "title".into(),
            format!("{} (schema version {})", T::event_type(), T::VERSION).into(),
        );
        (T::KIND, schema)
    }
    vec![
        one::<MetricSample>(),
        one::<LogEvent>(),
        one::<FeatureWindow>(),
        one::<RiskScore>(),
        one::<Decision>(),
        one::<ActuationOutcome>(),
        one::<FailureReport>(),
        one::<DependencyEdge>(),
        one::<InventoryUpdate>(),
        ("dead_letter", schemars::schema_for!(DeadLetter)),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone;

    use super::*;

    fn sample() -> MetricSample {
        MetricSample {
            entity: EntityId::new("node-1").unwrap(),
            metric: "cpu".into(),
            time: chrono::Utc.timestamp_millis_opt(1_700_000_000_123).unwrap(),
            value: 0.5,
            labels: BTreeMap::from([("zone".into(), "a".into())]).into(),
            kind: MetricKind::Counter,
        }
    }

    #[test]
    fn envelope_round_trips_and_checks_id() {
        let event = Event::new("/foresight/test", sample());
        let bytes = event.to_json();
        let back = Event::<MetricSample>::from_json(&bytes).unwrap();
        assert_eq!(back, event);

        let mut forged: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        forged["data"]["metric"] = "mem".into();
        let err = Event::<MetricSample>::from_json(&serde_json::to_vec(&forged).unwrap());
        assert!(matches!(err, Err(EnvelopeError::IdMismatch { .. })));
    }

    #[test]
    fn envelope_rejects_other_versions_and_types() {
        let event = Event::new("/foresight/test", sample());
        let mut v: serde_json::Value = serde_json::to_value(&event).unwrap();
        v["dataschema"] = "urn:foresight:schema:metric_sample:2".into();
        let err = Event::<MetricSample>::from_json(&serde_json::to_vec(&v).unwrap());
        assert!(matches!(
            err,
            Err(EnvelopeError::UnknownSchemaVersion { .. })
        ));
        let err = Event::<LogEvent>::from_json(&event.to_json());
        assert!(matches!(err, Err(EnvelopeError::WrongType { .. })));
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = sample();
        let mut b = sample();
        assert_eq!(a.id(), b.id());
        b.value = 0.7; // Same entity, metric and time: a duplicate, so the same id.
        assert_eq!(a.id(), b.id());
        b.metric = "mem".into();
        assert_ne!(a.id(), b.id());
        assert_ne!(
            EventId::derive("k", &[b"ab", b"c"]),
            EventId::derive("k", &[b"a", b"bc"])
        );
    }

    #[test]
    fn entity_ids_are_validated() {
        assert_eq!(EntityId::new(""), Err(EntityIdError::Empty));
        assert_eq!(
            EntityId::new("a".repeat(300)),
            Err(EntityIdError::TooLong(300))
        );
        assert_eq!(EntityId::new("a\nb"), Err(EntityIdError::ControlCharacter));
        // DEL and the C1 controls (U+0080..=U+009F) too; other non-ASCII text is an id.
        assert_eq!(
            EntityId::new("a\x7fb"),
            Err(EntityIdError::ControlCharacter)
        );
        assert_eq!(
            EntityId::new("a\u{85}b"),
            Err(EntityIdError::ControlCharacter)
        );
        assert_eq!(EntityId::new("pompe-é").unwrap().as_str(), "pompe-é");
        assert!(serde_json::from_str::<EntityId>("\"\"").is_err());
    }

    #[test]
    fn every_public_kind_has_a_schema() {
        let schemas = public_schemas();
        assert_eq!(schemas.len(), 10);
        for (kind, schema) in schemas {
            let text = serde_json::to_string(&schema).unwrap();
            assert!(text.contains("properties"), "{kind}");
        }
    }

    #[test]
    fn partitions_ahead_are_named_only_while_one_not_caught_up_is_behind() {
        let at = |m: i64| Some(chrono::Utc.timestamp_opt(m * 60, 0).unwrap());
        let due = at(10).unwrap();
        // Partition 2 has delivered nothing yet: 0 and 1, past the round, may wait for it.
        let v = [(0, at(12), false), (1, at(11), false), (2, None, false)];
        assert_eq!(partitions_ahead(v, due), Some(vec![0, 1]));
        // Behind but caught up (idle): nothing to wait for; neither is anything behind.
        assert_eq!(
            partitions_ahead([(0, at(12), false), (1, at(3), true)], due),
            None
        );
        assert_eq!(partitions_ahead([(0, at(12), false)], due), None);
        // At the due time is not past it: still behind; nothing ahead to pause.
        assert_eq!(partitions_ahead([(0, at(10), false)], due), Some(vec![]));
    }
}
