//! The CloudEvents 1.0 envelope every Foresight event travels in, and deterministic event ids.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::EntityId;

/// Namespace of every derived Foresight event id (UUID v5). Changing it changes every id, so never do.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3c0e_9b7d_4e52_8f30_5d2c_71a4_e8b9);

/// The CloudEvents content type of a structured-mode message (the whole envelope in the body).
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";

/// A stable event id.
///
/// Ids of derived events are UUID v5 hashes of the ids (or identifying fields) of their inputs, so
/// reprocessing the same input yields the same id and every consumer can deduplicate by id.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    /// Derives an id from a kind and the parts that identify the event.
    ///
    /// Each part is length-prefixed so that `("ab", "c")` and `("a", "bc")` give different ids.
    pub fn derive(kind: &str, parts: &[&[u8]]) -> Self {
        let mut buf = Vec::with_capacity(64);
        for part in std::iter::once(kind.as_bytes()).chain(parts.iter().copied()) {
            buf.extend_from_slice(&(part.len() as u64).to_le_bytes());
            buf.extend_from_slice(part);
        }
        Self(Uuid::new_v5(&ID_NAMESPACE, &buf))
    }

    /// The id as raw bytes, to feed into the derivation of another id.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for EventId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// The payload of an event: one of Foresight's canonical, versioned record types.
pub trait EventData: Serialize + DeserializeOwned + JsonSchema + Clone + fmt::Debug {
    /// Short snake_case name of the kind, e.g. `risk_score`.
    const KIND: &'static str;
    /// Schema version of this payload. Bumped on any incompatible change.
    const VERSION: u32;

    /// The entity (component) the event is about; the Kafka key of its messages.
    fn entity(&self) -> &EntityId;
    /// The event time: when the thing it describes happened, never when it was processed.
    fn time(&self) -> DateTime<Utc>;
    /// The deterministic id, derived from the event's inputs.
    fn id(&self) -> EventId;

    /// The CloudEvents `type` attribute of this kind.
    fn event_type() -> String {
        format!("foresight.{}", Self::KIND)
    }
    /// The CloudEvents `dataschema` attribute: a URN naming the kind and its schema version.
    fn data_schema() -> String {
        format!("urn:foresight:schema:{}:{}", Self::KIND, Self::VERSION)
    }
}

/// A CloudEvents 1.0 envelope (structured JSON mode) around one event payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Event<T> {
    /// CloudEvents spec version; always `1.0`.
    pub specversion: String,
    /// Stable id, derived from the event's inputs (see [`EventId::derive`]).
    pub id: EventId,
    /// The stage that produced the event, e.g. `/foresight/scoring`.
    pub source: String,
    /// The kind of event, e.g. `foresight.risk_score`.
    #[serde(rename = "type")]
    pub ty: String,
    /// Event time (RFC 3339): when the described thing happened.
    pub time: DateTime<Utc>,
    /// The entity (component) the event is about.
    pub subject: EntityId,
    /// URN of the payload's schema and its version, e.g. `urn:foresight:schema:risk_score:1`.
    pub dataschema: String,
    /// Always `application/json`.
    pub datacontenttype: String,
    /// The payload.
    pub data: T,
}

/// Why an envelope could not be turned back into a typed event.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The bytes are not a JSON envelope of the expected shape.
    #[error("not a valid event envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The envelope carries another kind of event than the topic should.
    #[error("expected event type `{expected}`, found `{found}`")]
    WrongType {
        /// The type this reader understands.
        expected: String,
        /// The type found in the envelope.
        found: String,
    },
    /// The payload's schema version is not one this build understands.
    #[error("unknown schema `{found}` (this build reads `{expected}`)")]
    UnknownSchemaVersion {
        /// The schema this reader understands.
        expected: String,
        /// The schema found in the envelope.
        found: String,
    },
    /// The envelope id does not match the id derived from its payload: corrupted or forged.
    #[error("envelope id {found} does not match the id derived from its data ({expected})")]
    IdMismatch {
        /// The id derived from the payload.
        expected: EventId,
        /// The id the envelope carried.
        found: EventId,
    },
}

impl<T: EventData> Event<T> {
    /// Wraps a payload, taking id, time and subject from it.
    pub fn new(source: &str, data: T) -> Self {
        Self {
            specversion: "1.0".to_owned(),
            id: data.id(),
            source: source.to_owned(),
            ty: T::event_type(),
            time: data.time(),
            subject: data.entity().clone(),
            dataschema: T::data_schema(),
            datacontenttype: "application/json".to_owned(),
            data,
        }
    }

    /// Serialises the envelope to JSON bytes (deterministic for equal events).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("event types always serialise")
    }

    /// Parses and checks an envelope: type, schema version and id must all match.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        // Read the attributes first, so a wrong type or version is reported as such rather than as
        // whatever the payload of another kind fails to parse as.
        let raw: Event<Box<serde_json::value::RawValue>> = serde_json::from_slice(bytes)?;
        if raw.ty != T::event_type() {
            return Err(EnvelopeError::WrongType {
                expected: T::event_type(),
                found: raw.ty,
            });
        }
        if raw.dataschema != T::data_schema() {
            return Err(EnvelopeError::UnknownSchemaVersion {
                expected: T::data_schema(),
                found: raw.dataschema,
            });
        }
        let event = Event {
            data: serde_json::from_str::<T>(raw.data.get())?,
            specversion: raw.specversion,
            id: raw.id,
            source: raw.source,
            ty: raw.ty,
            time: raw.time,
            subject: raw.subject,
            dataschema: raw.dataschema,
            datacontenttype: raw.datacontenttype,
        };
        let expected = event.data.id();
        if event.id != expected {
            return Err(EnvelopeError::IdMismatch {
                expected,
                found: event.id,
            });
        }
        Ok(event)
    }
}

/// A message ready for Kafka: which of the stage's output topics, its key, its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Index of the output topic among the stage's outputs.
    pub route: usize,
    /// Message key: the entity id.
    pub key: String,
    /// The CloudEvents JSON envelope.
    pub payload: Vec<u8>,
}

/// A stage output that knows which of the stage's output topics it goes to.
pub trait Routed {
    /// Wraps the output in its envelope, stamped with `source`.
    fn into_message(self, source: &str) -> OutgoingMessage;

    /// The output's event time, if it has one: what a runner measures its processing latency
    /// (event time to output) against.
    fn event_time(&self) -> Option<DateTime<Utc>> {
        None
    }
}

impl<T: EventData> Routed for T {
    /// Single-output stages: every event goes to output 0.
    fn into_message(self, source: &str) -> OutgoingMessage {
        let event = Event::new(source, self);
        OutgoingMessage {
            route: 0,
            key: event.subject.as_str().to_owned(),
            payload: event.to_json(),
        }
    }

    fn event_time(&self) -> Option<DateTime<Utc>> {
        Some(self.time())
    }
}
