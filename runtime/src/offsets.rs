//! Ordered acknowledgement: which input offsets may be stored.
//!
//! An input offset is done when every output derived from it (events, dead letters) is acknowledged
//! by the broker. The storable offset of a partition is the lowest offset not yet done (or one past
//! the highest seen), further held back by whatever the processor's open state still depends on. So
//! an offset is never stored ahead of an unacknowledged output, whatever order acks arrive in.

use std::collections::{BTreeMap, HashMap};

use foresight_events::InputPartition;

#[derive(Debug, Default)]
struct Partition {
    /// Offsets with outputs still unacknowledged, and how many.
    pending: BTreeMap<i64, usize>,
    /// One past the highest offset seen.
    next: Option<i64>,
    /// The last offset handed out for storing.
    stored: Option<i64>,
}

/// Tracks in-flight inputs per partition.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<InputPartition, Partition>,
    in_flight: usize,
}

impl OffsetTracker {
    /// An input at `offset` was read and produced `outputs` outputs, now in flight.
    pub(crate) fn read(&mut self, partition: InputPartition, offset: i64, outputs: usize) {
        let p = self.partitions.entry(partition).or_default();
        p.next = Some(p.next.map_or(offset + 1, |n| n.max(offset + 1)));
        if outputs > 0 {
            *p.pending.entry(offset).or_default() += outputs;
            self.in_flight += outputs;
        }
    }

    /// One output of the input at `offset` was acknowledged.
    pub(crate) fn ack(&mut self, partition: InputPartition, offset: i64) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return; // Revoked meanwhile: nothing to store for it.
        };
        if let Some(n) = p.pending.get_mut(&offset) {
            *n -= 1;
            self.in_flight -= 1;
            if *n == 0 {
                p.pending.remove(&offset);
            }
        }
    }

    /// Outputs not yet acknowledged, over all partitions.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The partition was revoked: forget it, so nothing is ever stored for it.
    pub(crate) fn revoke(&mut self, partition: InputPartition) {
        if let Some(p) = self.partitions.remove(&partition) {
            self.in_flight -= p.pending.values().sum::<usize>();
        }
    }

    /// The offsets (next offset to read) that may be stored now and have advanced since last time.
    /// `retained` gives, per partition, the earliest offset the processor's open state depends on.
    pub(crate) fn storable(
        &mut self,
        retained: impl Fn(InputPartition) -> Option<i64>,
    ) -> Vec<(InputPartition, i64)> {
        let mut out = Vec::new();
        for (&partition, p) in &mut self.partitions {
            let Some(next) = p.next else { continue };
            let mut offset = p.pending.keys().next().copied().unwrap_or(next);
            if let Some(r) = retained(partition) {
                offset = offset.min(r);
            }
            if p.stored.is_none_or(|s| offset > s) {
                p.stored = Some(offset);
                out.push((partition, offset));
            }
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[allow(non_snake_case)]
    fn P(partition: i32) -> InputPartition {
        InputPartition {
            input: 0,
            partition,
        }
    }

    #[test]
    fn never_passes_an_unacknowledged_output() {
        let mut t = OffsetTracker::default();
        t.read(P(0), 10, 1);
        t.read(P(0), 11, 2);
        t.read(P(0), 12, 0);
        assert_eq!(t.storable(|_| None), vec![(P(0), 10)]);
        t.ack(P(0), 11);
        t.ack(P(0), 11);
        assert_eq!(t.storable(|_| None), vec![], "10 still in flight");
        t.ack(P(0), 10);
        assert_eq!(t.storable(|_| None), vec![(P(0), 13)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn respects_what_the_processor_retains() {
        let mut t = OffsetTracker::default();
        t.read(P(1), 5, 0);
        t.read(P(1), 6, 0);
        assert_eq!(t.storable(|_| Some(5)), vec![(P(1), 5)]);
        assert_eq!(t.storable(|_| None), vec![(P(1), 7)]);
    }

    #[test]
    fn revoked_partitions_are_never_stored() {
        let mut t = OffsetTracker::default();
        t.read(P(3), 0, 1);
        t.revoke(P(3));
        t.ack(P(3), 0);
        assert!(t.storable(|_| None).is_empty());
        assert_eq!(t.in_flight(), 0);
    }

    proptest! {
        /// Whatever the order of acknowledgements, the stored offset never passes an input with an
        /// unacknowledged output, and once everything is acknowledged it reaches the end.
        #[test]
        fn stored_offsets_are_safe_and_complete(
            outputs in prop::collection::vec(0usize..4, 1..60),
            seed in any::<u64>(),
        ) {
            let mut t = OffsetTracker::default();
            let mut acks = Vec::new();
            for (offset, n) in outputs.iter().enumerate() {
                t.read(P(0), offset as i64, *n);
                acks.extend(std::iter::repeat_n(offset as i64, *n));
            }
            // A deterministic shuffle of the acknowledgements.
            let mut state = seed | 1;
            for i in (1..acks.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                acks.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut remaining: BTreeMap<i64, usize> = BTreeMap::new();
            for a in &acks { *remaining.entry(*a).or_default() += 1; }
            let mut last = -1;
            for a in acks {
                t.ack(P(0), a);
                let left = remaining.get_mut(&a).unwrap();
                *left -= 1;
                if *left == 0 { remaining.remove(&a); }
                for (_, stored) in t.storable(|_| None) {
                    prop_assert!(stored > last);
                    last = stored;
                    if let Some((&lowest, _)) = remaining.iter().next() {
                        prop_assert!(stored <= lowest, "stored {stored} past pending {lowest}");
                    }
                }
            }
            let _ = t.storable(|_| None);
            prop_assert_eq!(t.partitions[&P(0)].stored, Some(outputs.len() as i64));
        }
    }
}
