//! One metric's samples within one pane (a slice of event time one slide long), and the window
//! statistics of one or more consecutive panes.
//!
//! Everything a pane keeps merges exactly across panes (counts, Welford moments, least-squares
//! sums, extremes, the quantile sketch, counter spans), so a hopping window is the merge of its
//! panes and a tumbling window is the special case of one pane per window.

use std::sync::LazyLock;

use foresight_events::MetricKind;
use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

/// Samples kept per metric per pane: they deduplicate re-sent samples (same time), give exact
/// counter increases under disorder, and fill the quantile sketch when the window closes. Beyond
/// this (series reporting faster than that many times per slide) samples go straight into a
/// sketch and counter increases follow arrival order.
pub const PANE_POINTS: usize = 64;

/// Relative accuracy of the quantiles (DDSketch: every quantile is within 1% of a sample at that
/// rank) and the most bins a sketch may use (values below max / 1.02^512 collapse into its lowest
/// bin, which leaves p50/p95/p99 untouched for any realistic spread).
static SKETCH: LazyLock<SketchConfig> = LazyLock::new(|| SketchConfig::new(0.01, 512, 1e-9));

/// The first and last sample of a counter over some span of time, and its increase in between
/// (a drop counts as a reset to zero, as in Prometheus' `rate`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct CounterSpan {
    first: (i64, f64),
    last: (i64, f64),
    increase: f64,
    resets: u64,
}

impl CounterSpan {
    fn new(time: i64, value: f64) -> Self {
        Self {
            first: (time, value),
            last: (time, value),
            increase: 0.0,
            resets: 0,
        }
    }

    /// Extends the span by a later sample.
    fn push(&mut self, time: i64, value: f64) {
        let before = self.last.1;
        if value >= before {
            self.increase += value - before;
        } else {
            self.increase += value;
            self.resets += 1;
        }
        self.last = (time, value);
    }

    /// This span followed by a later one.
    fn then(mut self, next: &CounterSpan) -> CounterSpan {
        self.push(next.first.0, next.first.1);
        self.increase += next.increase;
        self.resets += next.resets;
        self.last = next.last;
        self
    }
}

/// All values of a pane, once they outgrew its points.
#[derive(Clone, Serialize, Deserialize)]
struct Overflow(Box<DDSketch>);

impl std::fmt::Debug for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DDSketch({} values)", self.0.count())
    }
}

/// One metric's samples within one pane.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MetricPane {
    kind: MetricKind,
    count: u64,
    sum: f64,
    /// Running mean and sum of squared deviations (Welford), for a stable variance.
    mean: f64,
    m2: f64,
    /// Slope sums use seconds since `t0` (the first sample's time, ms), to keep them small.
    t0: i64,
    sum_t: f64,
    sum_tt: f64,
    sum_tv: f64,
    min: f64,
    max: f64,
    last: f64,
    last_time: i64,
    /// Up to [`PANE_POINTS`] samples as (time ms, value), sorted by time.
    points: Vec<(i64, f64)>,
    /// All values, once there were more than [`PANE_POINTS`].
    overflow: Option<Overflow>,
    /// The counter span in arrival order (samples older than the latest are left out): used
    /// when the points overflowed.
    arrival: CounterSpan,
}

impl MetricPane {
    pub(crate) fn new(kind: MetricKind, time: i64, value: f64) -> Self {
        Self {
            kind,
            count: 1,
            sum: value,
            mean: value,
            m2: 0.0,
            t0: time,
            sum_t: 0.0,
            sum_tt: 0.0,
            sum_tv: 0.0,
            min: value,
            max: value,
            last: value,
            last_time: time,
            points: {
                // Room for a minute of 10-second scrapes without regrowing.
                let mut points = Vec::with_capacity(8);
                points.push((time, value));
                points
            },
            overflow: None,
            arrival: CounterSpan::new(time, value),
        }
    }

    /// Folds in a sample. A sample with the time of one already in the pane is a re-send of it
    /// (a producer retry, a replayed batch) and is not counted again; returns whether it counted.
    pub(crate) fn add(&mut self, time: i64, value: f64) -> bool {
        match self.points.binary_search_by_key(&time, |p| p.0) {
            Ok(_) => return false,
            Err(at) if self.points.len() < PANE_POINTS => self.points.insert(at, (time, value)),
            Err(_) => {
                let sketch = self.overflow.get_or_insert_with(|| {
                    let mut sketch = DDSketch::new(*SKETCH);
                    for &(_, v) in &self.points {
                        sketch.add(v);
                    }
                    Overflow(Box::new(sketch))
                });
                sketch.0.add(value);
            }
        }
        self.count += 1;
        self.sum += value;
        let delta = value - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (value - self.mean);
        let t = (time - self.t0) as f64 / 1000.0;
        self.sum_t += t;
        self.sum_tt += t * t;
        self.sum_tv += t * value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        // Ties keep the later-arriving sample, so the result is deterministic for a given order.
        if time >= self.last_time {
            self.last = value;
            self.last_time = time;
        }
        if time > self.arrival.last.0 {
            self.arrival.push(time, value);
        }
        true
    }

    /// The counter span of this pane: exact from the sorted points, or in arrival order once
    /// they overflowed.
    fn span(&self) -> CounterSpan {
        if self.overflow.is_some() {
            return self.arrival;
        }
        let mut points = self.points.iter();
        let &(t, v) = points.next().expect("a pane holds at least one sample");
        let mut span = CounterSpan::new(t, v);
        for &(t, v) in points {
            span.push(t, v);
        }
        span
    }

    /// Heap bytes this pane holds (for memory accounting).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.points.capacity() * std::mem::size_of::<(i64, f64)>()
            + self.overflow.as_ref().map_or(0, |s| {
                std::mem::size_of::<DDSketch>() + s.0.length() * std::mem::size_of::<u64>()
            })
    }
}

/// Statistics of one metric over one window.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WindowStats {
    pub(crate) count: u64,
    pub(crate) mean: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) last: f64,
    pub(crate) std_dev: f64,
    pub(crate) p50: f64,
    pub(crate) p95: f64,
    pub(crate) p99: f64,
    pub(crate) slope_per_s: f64,
    pub(crate) rate_per_s: Option<f64>,
    pub(crate) resets: u64,
}

/// Merges the panes of one window (in time order, at least one) into its statistics;
/// `window_s` is the window's length in seconds.
pub(crate) fn window_stats(panes: &[&MetricPane], window_s: f64) -> WindowStats {
    let first = panes[0];
    let t0 = first.t0;
    let (mut count, mut sum, mut mean, mut m2) = (0u64, 0.0, 0.0, 0.0);
    let (mut sum_t, mut sum_tt, mut sum_tv) = (0.0, 0.0, 0.0);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut last, mut last_time) = (first.last, i64::MIN);
    let mut span: Option<CounterSpan> = None;
    for pane in panes {
        // Chan et al.'s pairwise update of the mean and the sum of squared deviations.
        let n = count + pane.count;
        let delta = pane.mean - mean;
        mean += delta * pane.count as f64 / n as f64;
        m2 += pane.m2 + delta * delta * (count as f64) * (pane.count as f64) / n as f64;
        count = n;
        sum += pane.sum;
        // Shift the pane's time sums to the window's reference time.
        let d = (pane.t0 - t0) as f64 / 1000.0;
        let c = pane.count as f64;
        sum_t += pane.sum_t + c * d;
        sum_tt += pane.sum_tt + 2.0 * d * pane.sum_t + c * d * d;
        sum_tv += pane.sum_tv + d * pane.sum;
        min = min.min(pane.min);
        max = max.max(pane.max);
        if pane.last_time >= last_time {
            last = pane.last;
            last_time = pane.last_time;
        }
        if pane.kind == MetricKind::Counter {
            let next = pane.span();
            span = Some(match span {
                None => next,
                Some(before) => before.then(&next),
            });
        }
    }
    let n = count as f64;
    let std_dev = if count < 2 {
        0.0
    } else {
        (m2 / (n - 1.0)).max(0.0).sqrt()
    };
    let denominator = n * sum_tt - sum_t * sum_t;
    let slope_per_s = if count < 2 || denominator.abs() < 1e-12 {
        0.0
    } else {
        (n * sum_tv - sum_t * sum) / denominator
    };
    let [p50, p95, p99] = quantiles(panes, [0.5, 0.95, 0.99]).map(|v| v.clamp(min, max));
    let (rate_per_s, resets) = match (first.kind, span) {
        (MetricKind::Counter, Some(span)) if span.last.0 > span.first.0 => (
            Some(span.increase / ((span.last.0 - span.first.0) as f64 / 1000.0)),
            span.resets,
        ),
        (MetricKind::Counter, Some(span)) => (None, span.resets),
        (MetricKind::Delta, _) => (Some(sum / window_s), 0),
        _ => (None, 0),
    };
    WindowStats {
        count,
        mean,
        min,
        max,
        last,
        std_dev,
        p50,
        p95,
        p99,
        slope_per_s,
        rate_per_s,
        resets,
    }
}

/// Quantiles of the panes' samples, each the sample at rank `floor(q * (n - 1))`: exact while
/// every pane still holds its samples, else from the merge of the panes' DDSketches (the same
/// rank, within 1% of the sample's value).
fn quantiles<const N: usize>(panes: &[&MetricPane], qs: [f64; N]) -> [f64; N] {
    if panes.iter().all(|p| p.overflow.is_none()) {
        let mut stack = [0.0; PANE_POINTS];
        let mut heap = Vec::new();
        let values: &mut [f64] = match panes {
            [one] => {
                for (slot, &(_, v)) in stack.iter_mut().zip(&one.points) {
                    *slot = v;
                }
                &mut stack[..one.points.len()]
            }
            _ => {
                heap.extend(panes.iter().flat_map(|p| p.points.iter().map(|&(_, v)| v)));
                &mut heap
            }
        };
        values.sort_unstable_by(f64::total_cmp);
        let n = values.len();
        return qs.map(|q| values[((q * (n - 1) as f64) as usize).min(n - 1)]);
    }
    let mut sketch = DDSketch::new(*SKETCH);
    for pane in panes {
        match &pane.overflow {
            Some(s) => sketch
                .merge(&s.0)
                .expect("sketches share one configuration"),
            None => pane.points.iter().for_each(|&(_, v)| sketch.add(v)),
        }
    }
    qs.map(|q| sketch.quantile(q).ok().flatten().unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pane(kind: MetricKind, samples: &[(i64, f64)]) -> MetricPane {
        let mut p = MetricPane::new(kind, samples[0].0, samples[0].1);
        for &(t, v) in &samples[1..] {
            p.add(t, v);
        }
        p
    }

    #[test]
    fn counter_rate_handles_resets_and_disorder() {
        // 10, 20, (restart) 5, 15 at 0, 10, 20, 30 s, delivered out of order.
        let p = pane(
            MetricKind::Counter,
            &[(10_000, 20.0), (0, 10.0), (30_000, 15.0), (20_000, 5.0)],
        );
        let s = window_stats(&[&p], 60.0);
        // Increase: 10 + 5 (reset: counted from zero) + 10 = 25 over 30 s.
        assert_eq!(s.resets, 1);
        assert!((s.rate_per_s.unwrap() - 25.0 / 30.0).abs() < 1e-12, "{s:?}");
        // Across panes: the step from one pane's last to the next's first counts too.
        let a = pane(MetricKind::Counter, &[(0, 100.0), (10_000, 110.0)]);
        let b = pane(MetricKind::Counter, &[(20_000, 130.0), (30_000, 2.0)]);
        let s = window_stats(&[&a, &b], 60.0);
        assert_eq!(s.resets, 1);
        assert!((s.rate_per_s.unwrap() - 32.0 / 30.0).abs() < 1e-12, "{s:?}");
        // One sample: no rate.
        let one = pane(MetricKind::Counter, &[(0, 1.0)]);
        assert_eq!(window_stats(&[&one], 60.0).rate_per_s, None);
        // Deltas: their sum per second of window; gauges: no rate.
        let d = pane(MetricKind::Delta, &[(0, 3.0), (10_000, 9.0)]);
        assert_eq!(window_stats(&[&d], 60.0).rate_per_s, Some(0.2));
        let g = pane(MetricKind::Gauge, &[(0, 3.0), (10_000, 9.0)]);
        assert_eq!(window_stats(&[&g], 60.0).rate_per_s, None);
    }

    #[test]
    fn quantiles_are_within_one_percent() {
        let samples: Vec<(i64, f64)> = (0..1000).map(|i| (i * 10, (i + 1) as f64)).collect();
        let panes: Vec<MetricPane> = samples
            .chunks(100)
            .map(|c| pane(MetricKind::Gauge, c))
            .collect();
        let refs: Vec<&MetricPane> = panes.iter().collect();
        let s = window_stats(&refs, 10.0);
        for (got, want) in [(s.p50, 500.0), (s.p95, 950.0), (s.p99, 990.0)] {
            assert!((got - want).abs() / want <= 0.011, "{got} vs {want}");
        }
        assert!(
            panes.iter().all(|p| p.overflow.is_some()),
            "100 > {PANE_POINTS} points"
        );
    }

    fn samples() -> impl Strategy<Value = Vec<(i64, f64)>> {
        prop::collection::vec((0i64..600_000, -1e3f64..1e3), 1..150)
    }

    proptest! {
        /// A window merged from its panes has the statistics of the same samples in one pane,
        /// whatever their order: hopping windows are exact.
        #[test]
        fn merging_panes_equals_one_pane(mut s in samples(), split in 0usize..150) {
            s.sort_by_key(|p| p.0);
            s.dedup_by_key(|p| p.0);
            let split = split.min(s.len() - 1).max(1).min(s.len());
            let whole = pane(MetricKind::Counter, &s);
            let w = window_stats(&[&whole], 600.0);
            if split < s.len() {
                let a = pane(MetricKind::Counter, &s[..split]);
                let b = pane(MetricKind::Counter, &s[split..]);
                let m = window_stats(&[&a, &b], 600.0);
                let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * (1.0 + x.abs().max(y.abs()));
                prop_assert_eq!(m.count, w.count);
                prop_assert!(close(m.mean, w.mean), "{} {}", m.mean, w.mean);
                prop_assert!(close(m.std_dev, w.std_dev), "{} {}", m.std_dev, w.std_dev);
                prop_assert!(close(m.slope_per_s, w.slope_per_s), "{} {}", m.slope_per_s, w.slope_per_s);
                prop_assert_eq!((m.min, m.max, m.last), (w.min, w.max, w.last));
                // Exact (split panes) and sketched (one overflowing pane) agree within 1%.
                let near = |x: f64, y: f64| (x - y).abs() <= 0.0201 * x.abs().max(y.abs()) + 1e-6;
                prop_assert!(near(m.p50, w.p50) && near(m.p95, w.p95) && near(m.p99, w.p99),
                    "{:?} vs {:?}", (m.p50, m.p95, m.p99), (w.p50, w.p95, w.p99));
                prop_assert_eq!(m.resets, w.resets);
                match (m.rate_per_s, w.rate_per_s) {
                    (Some(x), Some(y)) => prop_assert!(close(x, y), "{} {}", x, y),
                    (x, y) => prop_assert_eq!(x, y),
                }
            }
            // Arrival order does not matter within the point cap.
            let mut reversed = s.clone();
            reversed.reverse();
            if s.len() <= PANE_POINTS {
                let r = window_stats(&[&pane(MetricKind::Counter, &reversed)], 600.0);
                prop_assert_eq!(r.rate_per_s, w.rate_per_s);
                prop_assert_eq!((r.p50, r.p99, r.count), (w.p50, w.p99, w.count));
            }
        }
    }
}
