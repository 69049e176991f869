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

/// One partition of one of a stage's inputs: the unit offsets are tracked and state is owned by.
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

    /// The earliest offset of `source` whose effect is still held only in the processor's open
    /// state (e.g. a window not yet emitted). The runtime never stores an offset past it, so a
    /// restart re-reads what open state would otherwise lose. `None`: nothing is held.
    fn retained_from(&self, _source: InputPartition) -> Option<i64> {
        None
    }

    /// End of input (replay only): emits whatever open state would have produced.
    fn flush(&mut self, _out: &mut Vec<Output<Self::Output>>) {}

    /// The partition was revoked from this instance: drop the state that came from it.
    fn forget_partition(&mut self, _source: InputPartition) {}
}
