//! The contract between pure stages and the runtime that feeds them.
//!
//! A stage is a deterministic processor: input + its own state -> outputs. It never reads a clock,
//! the network or a database; time is the event time its inputs carry. The runtime feeds it from
//! Kafka (live) or from files (replay) and delivers its outputs, so both give identical results.

use crate::ErrorClass;

/// Where an input came from: which of the stage's inputs (topic, or file in replay), which
/// partition, which offset (or record number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// Index of the input among the stage's inputs.
    pub input: u16,
    /// Partition of the input topic (0 for files).
    pub partition: i32,
    /// Offset within the partition (record number for files).
    pub offset: i64,
}

impl Origin {
    /// The input partition this origin is in.
    pub fn source(&self) -> InputPartition {
        InputPartition {
            input: self.input,
            partition: self.partition,
        }
    }
}

/// One partition of one of a stage's inputs: the unit offsets are tracked by. State is owned by
/// partition numbers: a stage's inputs are keyed by entity and have equal partition counts, so
/// partition `p` of every input carries the same entities (and is assigned to the same instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InputPartition {
    /// Index of the input among the stage's inputs.
    pub input: u16,
    /// Partition number.
    pub partition: i32,
}

/// Why a stage refused an input; the runtime turns it into a dead letter carrying the input's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Class of error.
    pub class: ErrorClass,
    /// What was wrong, for a person.
    pub reason: String,
}

impl Rejection {
    /// A rejection of the given class.
    pub fn new(class: ErrorClass, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
        }
    }
}

/// What processing one input produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Output<T> {
    /// An event for the stage's output topic.
    Event(T),
    /// The input being processed (or part of it) is refused.
    Rejected(Rejection),
}

/// A deterministic stage processor.
pub trait Processor {
    /// What it consumes.
    type Input;
    /// What it produces.
    type Output;

    /// Processes one input, appending what it produces to `out`, in a deterministic order.
    fn process(&mut self, input: Self::Input, origin: Origin, out: &mut Vec<Output<Self::Output>>);

    /// End of input (replay only): emits whatever open state would have produced.
    fn flush(&mut self, _out: &mut Vec<Output<Self::Output>>) {}

    /// Whether the processor wants [`Processor::assigned`] and [`Processor::idle`] (the live
    /// runtime then asks the broker where each partition ends, which costs a request each time
    /// one is caught up).
    fn watches_partitions(&self) -> bool {
        false
    }

    /// Partition `partition` of the inputs was assigned to this instance (live only, before any
    /// of its input). Processors that wait for every input partition (event-time watermarks)
    /// start waiting for it.
    fn assigned(&mut self, _partition: i32) {}

    /// This instance has read everything there is on partition `partition` of its first input
    /// for now (live only): a watermark need not wait for it until it delivers again. May emit
    /// what becomes ready.
    fn idle(&mut self, _partition: i32, _out: &mut Vec<Output<Self::Output>>) {}

    /// The live runtime pauses the partitions [`Processor::held`] names, so the processor may
    /// wait for its other partitions instead of closing by its bound with what it has (called
    /// once, before any input; replay and tests without a runtime never call it).
    fn hold_partitions(&mut self) {}

    /// Partitions of the first input to stop reading for now (live only, once
    /// [`Processor::hold_partitions`] was called): the processor holds as much open state as
    /// its bound allows, and the oldest of it waits for input from the partitions not named.
    /// The runtime pauses them, and resumes them once they are no longer named, so how the
    /// partitions' reads interleave (a consumer catching up reads one partition's backlog
    /// before the next) does not change what the processor emits. A partition that delivers
    /// nothing while the others are held is reported [`Processor::idle`] after a grace, so a
    /// partition whose input does not come cannot stop the others for ever. Cheap when nothing
    /// is held: the runtime asks after every input.
    fn held(&self) -> Vec<i32> {
        Vec::new()
    }

    /// Partition `partition` (of every input: inputs are co-partitioned by entity) was revoked
    /// from this instance: drop the state it owns.
    fn forget_partition(&mut self, _partition: i32) {}

    /// Whether the processor keeps state that outlives single inputs. The live runtime then
    /// checkpoints it, with the input offsets it reflects, and restores it on restart or
    /// rebalance; stateless processors need neither.
    fn stateful(&self) -> bool {
        false
    }

    /// The changes, since the last checkpoint, to the state owned by partition `partition`,
    /// each keyed by what it is about (e.g. an entity), in a deterministic order. Taken between
    /// two inputs, they hold the effect of every input processed so far.
    fn checkpoint(&mut self, _partition: i32) -> Vec<StateChange> {
        Vec::new()
    }

    /// Restores the state owned by `partition` from the entries of its last checkpoint, before
    /// any of its inputs after that checkpoint are processed.
    fn restore(
        &mut self,
        _partition: i32,
        _entries: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StateError> {
        Ok(())
    }
}

/// For a processor whose open rounds wait for every input partition ([`Processor::held`]): given
/// each partition as (partition, newest event time it has delivered, `None` before its first,
/// and whether the runtime found it caught up), and `due`, the time a partition must have
/// delivered past for the oldest open round to have all of its input: `None` when no partition
/// that is not caught up is behind it (reading brings that round nothing more), else the
/// partitions past it, which the runtime may pause while the others catch up.
pub fn partitions_ahead(
    partitions: impl IntoIterator<Item = (i32, Option<chrono::DateTime<chrono::Utc>>, bool)>,
    due: chrono::DateTime<chrono::Utc>,
) -> Option<Vec<i32>> {
    let mut behind = false;
    let mut ahead = Vec::new();
    for (partition, newest, idle) in partitions {
        match newest {
            _ if idle => {}
            Some(n) if n > due => ahead.push(partition),
            _ => behind = true,
        }
    }
    behind.then_some(ahead)
}

/// The checkpoint key of state a partition owns as a whole (not an entity's: a clock, a
/// progress marker), named `name`.
///
/// A stage's checkpoint keys are unique across its partitions (an entity's key follows the
/// entity from partition to partition), so such state needs the partition in its key: under one
/// shared key, each partition's checkpoint would take the row over from the others, and a
/// partition restored after another had written it would come back without its own. It starts
/// with a control character, so no entity id can be it.
pub fn partition_key(name: &str, partition: i32) -> String {
    format!("\u{1}{name}/{partition}")
}

/// One change to a processor's durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// The state under `key` is now `value` (opaque bytes, the processor's own encoding).
    Put {
        /// What the state is about.
        key: String,
        /// The encoded state.
        value: Vec<u8>,
    },
    /// The state under `key` is gone (e.g. an entity evicted after a long silence).
    Delete {
        /// What the state was about.
        key: String,
    },
}

impl StateChange {
    /// The entry this change puts, as [`Processor::restore`] takes it (`None` for a delete).
    pub fn into_put(self) -> Option<(String, Vec<u8>)> {
        match self {
            StateChange::Put { key, value } => Some((key, value)),
            StateChange::Delete { .. } => None,
        }
    }
}

/// Checkpointed state that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state of {key} cannot be restored: {reason}")]
pub struct StateError {
    /// The entry.
    pub key: String,
    /// Why.
    pub reason: String,
}

impl StateError {
    /// The entry under `key` cannot be restored, for `reason`.
    pub fn new(key: &str, reason: impl std::fmt::Display) -> Self {
        Self {
            key: key.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// Encodes checkpointed state as JSON, for state holding events whose serde form leaves empty
/// fields out (which postcard, see [`encode_state`], cannot read back).
pub fn encode_json_state<T: serde::Serialize>(state: &T) -> Vec<u8> {
    serde_json::to_vec(state).expect("checkpointed state always serialises")
}

/// Decodes what [`encode_json_state`] wrote under `key`.
pub fn decode_json_state<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(value).map_err(|e| StateError::new(key, e))
}

/// Encodes a piece of checkpointed state: its encoding's version (one byte), then the state in
/// postcard, compact and exact (floats bit for bit).
pub fn encode_state<T: serde::Serialize>(version: u8, state: &T) -> Vec<u8> {
    let mut value = vec![version];
    value.extend(postcard::to_stdvec(state).expect("checkpointed state always serialises"));
    value
}

/// Decodes what [`encode_state`] wrote under `key`, refusing another version of the encoding
/// with the reason.
pub fn decode_state<T: serde::de::DeserializeOwned>(
    key: &str,
    version: u8,
    value: &[u8],
) -> Result<T, StateError> {
    let fail = |reason: String| StateError::new(key, reason);
    match value.split_first() {
        Some((&v, bytes)) if v == version => {
            postcard::from_bytes(bytes).map_err(|e| fail(format!("undecodable: {e}")))
        }
        Some((v, _)) => Err(fail(format!(
            "encoding version {v}; this build reads version {version}"
        ))),
        None => Err(fail("empty".into())),
    }
}
