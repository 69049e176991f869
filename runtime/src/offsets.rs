//! Ordered acknowledgement: which input offsets may be stored.
//!
//! An input offset is done when every output derived from it (events, dead letters) is acknowledged
//! by the broker. The storable offset of a partition is the lowest offset not yet done (or one past
//! the highest seen). So an offset is never stored ahead of an unacknowledged output, whatever order
//! acks arrive in. Stateful stages store offsets with their checkpoints instead, once
//! [`OffsetTracker::done_until`] says every output before them is acknowledged.

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

/// Where reading must resume on partitions whose consumer may start past it, and how to get it
/// there.
///
/// A consumer resumes at its group's committed offset, which can be ahead of where a stage must
/// resume (a stateful stage's last checkpoint; the recorder's offsets in Postgres). It is then
/// moved back, and the input between is read again (input before the resume point is skipped by
/// the caller). A broker must serve a fetch from inside a record batch from that offset on (Kafka
/// returns the whole batch and the client drops the records before the offset); one that serves it
/// from the next batch on instead (tansu 0.6's memory storage does, see docs/reliability.md) would
/// skip the records between, and a plain seek back to the resume point would come back ahead again
/// for ever. So each further try seeks further back, 64, 128, 256... offsets before the resume
/// point, until a fetch starts at or before it (or the start of the partition was tried).
///
/// Input fetched before a seek can still arrive after it: it follows the input that caused the
/// seek. Such input is skipped without counting as another try, so it can neither push the
/// consumer further back for nothing nor, by exhausting the tries, be processed ahead of the
/// input before it.
#[derive(Debug)]
pub(crate) struct Resume<K> {
    at: HashMap<K, Pending>,
}

/// A resume point not reached yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Where reading must resume.
    next: i64,
    /// Seeks made so far.
    tries: u32,
    /// The offset of the input that caused the last seek.
    last: Option<i64>,
}

impl<K> Default for Resume<K> {
    fn default() -> Self {
        Self { at: HashMap::new() }
    }
}

/// What to do with an input read ahead of where its partition must resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rewind {
    /// Input fetched before the last seek: skip it, and wait for the seek's.
    Skip,
    /// Move the consumer to this offset (`tries` so far, 1 for the first).
    Seek {
        /// The offset to read from.
        to: i64,
        /// Seeks made for this resume point, this one included.
        tries: u32,
    },
    /// Even a fetch from the start of the partition came back ahead of the resume point: the
    /// input between is gone (deleted by retention); read on.
    Gone {
        /// Where reading should have resumed.
        expected: i64,
    },
}

impl<K: std::hash::Hash + Eq + Clone> Resume<K> {
    /// Reading of `key` must resume at `next`.
    pub(crate) fn expect(&mut self, key: K, next: i64) {
        self.at.insert(
            key,
            Pending {
                next,
                tries: 0,
                last: None,
            },
        );
    }

    /// Whether reading of `key` has yet to reach its resume point.
    pub(crate) fn pending(&self, key: &K) -> bool {
        self.at.contains_key(key)
    }

    /// The seek [`Self::check`] asked for failed: the next input read is taken as the answer to
    /// none, and asks for another.
    pub(crate) fn seek_failed(&mut self, key: &K) {
        if let Some(p) = self.at.get_mut(key) {
            p.last = None;
        }
    }

    /// Forgets the resume points of the keys `gone` says.
    pub(crate) fn forget(&mut self, gone: impl Fn(&K) -> bool) {
        self.at.retain(|k, _| !gone(k));
    }

    /// Input at `offset` of `key` was read: `None` to go on (at or before the resume point, or
    /// none is pending), else where to move the consumer.
    pub(crate) fn check(&mut self, key: &K, offset: i64) -> Option<Rewind> {
        let Pending { next, tries, last } = *self.at.get(key)?;
        if offset <= next {
            self.at.remove(key);
            return None;
        }
        if last.is_some_and(|last| offset > last) {
            return Some(Rewind::Skip);
        }
        let back = |t: u32| if t == 0 { 0 } else { 64_i64 << (t - 1).min(40) };
        if tries > 0 && next - back(tries - 1) <= 0 {
            self.at.remove(key);
            return Some(Rewind::Gone { expected: next });
        }
        self.at.insert(
            key.clone(),
            Pending {
                next,
                tries: tries + 1,
                last: Some(offset),
            },
        );
        Some(Rewind::Seek {
            to: (next - back(tries)).max(0),
            tries: tries + 1,
        })
    }
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

    /// Whether input `offset` of `partition` comes before where reading is: read (or skipped as
    /// folded) already since the partition was assigned. A consumer reads a partition in offset
    /// order and every move back is followed by a revocation or a resume point (which set the
    /// position again), so such input is served a second time; processed again it would be
    /// folded twice, or dead-lettered as late where its window has closed since.
    pub(crate) fn already_read(&self, partition: InputPartition, offset: i64) -> Option<i64> {
        self.partitions
            .get(&partition)
            .and_then(|p| p.next)
            .filter(|&next| offset < next)
    }

    /// One past the highest offset read of each input partition numbered `number`.
    pub(crate) fn positions(&self, number: i32) -> Vec<(InputPartition, i64)> {
        let mut out: Vec<_> = self
            .partitions
            .iter()
            .filter(|(ip, _)| ip.partition == number)
            .filter_map(|(ip, p)| p.next.map(|n| (*ip, n)))
            .collect();
        out.sort_unstable();
        out
    }

    /// Whether every output of every input before `next` is acknowledged.
    pub(crate) fn done_until(&self, partition: InputPartition, next: i64) -> bool {
        self.partitions.get(&partition).is_some_and(|p| {
            p.pending.keys().next().is_none_or(|&first| first >= next)
                && p.next.is_some_and(|n| n >= next)
        })
    }

    /// The offsets (next offset to read) that may be stored now and have advanced since last time.
    pub(crate) fn storable(&mut self) -> Vec<(InputPartition, i64)> {
        let mut out = Vec::new();
        for (&partition, p) in &mut self.partitions {
            let Some(next) = p.next else { continue };
            let offset = p.pending.keys().next().copied().unwrap_or(next);
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
        assert_eq!(t.storable(), vec![(P(0), 10)]);
        t.ack(P(0), 11);
        t.ack(P(0), 11);
        assert_eq!(t.storable(), vec![], "10 still in flight");
        t.ack(P(0), 10);
        assert_eq!(t.storable(), vec![(P(0), 13)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn checkpoints_wait_for_every_output_before_them() {
        let mut t = OffsetTracker::default();
        let q = InputPartition {
            input: 1,
            partition: 1,
        };
        t.read(P(1), 5, 1);
        t.read(P(1), 6, 0);
        t.read(q, 40, 0);
        t.read(P(2), 9, 0);
        assert_eq!(t.positions(1), vec![(P(1), 7), (q, 41)]);
        assert!(!t.done_until(P(1), 7), "5 in flight");
        assert!(t.done_until(P(1), 5), "nothing before 5 is in flight");
        assert!(!t.done_until(P(1), 8), "not read that far");
        t.ack(P(1), 5);
        assert!(t.done_until(P(1), 7));
        assert!(t.done_until(q, 41));
        assert!(!t.done_until(P(4), 0), "never read");
    }

    #[test]
    fn input_served_again_is_known_as_read() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.already_read(P(0), 0), None, "nothing read yet");
        t.read(P(0), 10, 1);
        t.read(P(0), 11, 0);
        assert_eq!(t.already_read(P(0), 10), Some(12));
        assert_eq!(t.already_read(P(0), 3), Some(12));
        assert_eq!(t.already_read(P(0), 12), None, "the next input");
        assert_eq!(t.already_read(P(0), 20), None, "past a gap");
        assert_eq!(t.already_read(P(1), 3), None, "another partition");
        t.revoke(P(0));
        assert_eq!(t.already_read(P(0), 10), None, "assigned again: read anew");
    }

    #[test]
    fn revoked_partitions_are_never_stored() {
        let mut t = OffsetTracker::default();
        t.read(P(3), 0, 1);
        t.revoke(P(3));
        t.ack(P(3), 0);
        assert!(t.storable().is_empty());
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
                for (_, stored) in t.storable() {
                    prop_assert!(stored > last);
                    last = stored;
                    if let Some((&lowest, _)) = remaining.iter().next() {
                        prop_assert!(stored <= lowest, "stored {stored} past pending {lowest}");
                    }
                }
            }
            let _ = t.storable();
            prop_assert_eq!(t.partitions[&P(0)].stored, Some(outputs.len() as i64));
        }
    }

    #[test]
    fn resuming_seeks_further_back_while_the_broker_serves_past_the_resume_point() {
        let mut r = Resume::default();
        r.expect("p", 1000);
        assert!(r.pending(&"p"));
        assert_eq!(r.check(&"q", 5), None, "no resume point: read on");
        assert_eq!(
            r.check(&"p", 1500),
            Some(Rewind::Seek { to: 1000, tries: 1 })
        );
        assert_eq!(
            r.check(&"p", 1500),
            Some(Rewind::Seek { to: 936, tries: 2 })
        );
        assert_eq!(
            r.check(&"p", 1500),
            Some(Rewind::Seek { to: 872, tries: 3 })
        );
        assert_eq!(
            r.check(&"p", 1500),
            Some(Rewind::Seek { to: 744, tries: 4 })
        );
        assert_eq!(
            r.check(&"p", 1501),
            Some(Rewind::Skip),
            "fetched before the seek: skipped, not another try"
        );
        assert_eq!(
            r.check(&"p", 1480),
            Some(Rewind::Seek { to: 488, tries: 5 })
        );
        assert_eq!(
            r.check(&"p", 700),
            None,
            "at or before the resume point: read on"
        );
        assert!(!r.pending(&"p"));
        assert_eq!(r.check(&"p", 1500), None, "resumed: nothing more to do");

        // Gone for good: once the start of the partition was tried, read on.
        r.expect("p", 100);
        let mut seeks = Vec::new();
        while let Some(Rewind::Seek { to, .. }) = r.check(&"p", 500) {
            seeks.push(to);
        }
        assert_eq!(seeks, [100, 36, 0]);
        r.expect("p", 100);
        for _ in 0..3 {
            r.check(&"p", 500);
        }
        assert_eq!(r.check(&"p", 500), Some(Rewind::Gone { expected: 100 }));
        assert_eq!(r.check(&"p", 500), None);

        r.expect("p", 10);
        r.expect("q", 10);
        r.forget(|k| *k == "p");
        assert!(!r.pending(&"p") && r.pending(&"q"));
    }
}
