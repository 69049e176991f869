//! Within-series anomaly: how surprising is the newest value of a series, given its own past?
//!
//! [`AnomalyDetector`] is a streaming, deterministic detector with bounded memory, for one series of
//! one or more dimensions (a metric, or the sensors of one pump). For every new value it answers
//! with an anomaly score in `[0, 1)` computed only from the values up to it, so it runs the same
//! online, in replay and in an offline evaluation.
//!
//! ## How it scores
//! 1. **Pattern strangeness.** The newest `pattern` values form a pattern; its strangeness is the
//!    mean distance to its `neighbours` nearest patterns among the last `memory` values, each
//!    dimension scaled by its standard deviation over that memory. A value that the series has
//!    never shown in this context is far from every past pattern: spikes, level shifts, a daily
//!    cycle that goes flat, a noise change. Patterns ending within `exclusion` values before the
//!    newest one are not candidates: an anomaly is not its own neighbour, so a slow, sustained
//!    departure (a climb to a level never seen) stays strange while it lasts instead of being
//!    matched by its own beginning a few values back.
//! 2. **Calibrated tail probability.** The strangeness is ranked against the strangeness of the
//!    last `calibration` values (conformal p-value); beyond the top `tail` of them, where ranks run
//!    out, the tail is extrapolated with an exponential fitted to their excesses (peaks over
//!    threshold), so a huge anomaly is more surprising than a merely unprecedented one.
//! 3. **Evidence over time.** A single value's p-value catches spikes; sustained, moderate
//!    strangeness is caught by pooling: the mean surprise (`-ln p`) of the last `pooling` values.
//!    Overlapping patterns make neighbouring surprises strongly dependent, so the pooled mean does
//!    not follow the Gamma law independent surprises would; it is calibrated like the strangeness,
//!    against its own last `calibration` values (rank, then exponential tail). The more surprising
//!    of the two tests is kept, Bonferroni-corrected (its p-value doubled) for having had two tries.
//! 4. **Records.** A value beyond everything the series has ever shown (its maximum or minimum
//!    over its whole history, not only the memory) is the newest of `n + 1` values being the most
//!    extreme: probability `2 / (n + 1)` per dimension if nothing is happening. How far it
//!    overshoots the old extreme, as a fraction `r` of the series' whole range, makes it rarer,
//!    by a conservative heavy (Pareto) tail `(1 + 10 r)^-2`. A series that keeps setting records
//!    (a trend, a growing load) is not surprised by one more: the probability is at least the
//!    share of records among the last `memory` values. The record's probability is kept where it
//!    is smaller than the pattern tests' (not counted in their Bonferroni factor: a record is so
//!    rare that what it adds to the chance of a false alarm fades as the series grows). The
//!    pattern tests' p-values cannot fall far below `1 / calibration` except by extrapolation;
//!    a record after a long quiet history can, and says so with a reason anyone can check.
//! 5. **One alarm per incident.** Once the evidence reaches `alarm` (a p-value of `10^-alarm`),
//!    values report only evidence beyond the incident's peak by another `alarm`, until `refractory`
//!    values in a row stay below `alarm`: an incident raises one alarm, not one per value nor one
//!    per `refractory` values while it lasts, while a much worse development still shows.
//!
//! The score is `L / (1 + L)` with `L = -log10(p)` of the kept test: monotone in the evidence, never
//! saturating, 0.5 at p = 0.1 and 0.9 at p = 1e-9.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Configuration of the within-series anomaly detector. One configuration serves every series:
/// each part adapts to the series' own scale and variability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Consecutive values compared as one pattern.
    pub pattern: usize,
    /// Nearest past patterns averaged into a pattern's strangeness.
    pub neighbours: usize,
    /// Most recent values kept to compare the newest pattern against (bounds memory and time per
    /// value: `memory x pattern x dimensions` multiply-adds).
    pub memory: usize,
    /// Past patterns ending within this many values before the newest pattern's start are not
    /// compared with it (the exclusion zone), so a sustained anomaly is not matched by its own
    /// beginning. 0 excludes only the patterns overlapping the newest.
    pub exclusion: usize,
    /// Most recent strangeness values a new one is ranked against (and pooled surprises a new
    /// pooled one is ranked against); each value costs a pass over both.
    pub calibration: usize,
    /// Fewest calibration values before any score above zero (the pooled test starts once it has
    /// as many pooled values of its own).
    pub min_calibration: usize,
    /// Highest calibration values whose excesses fit the extrapolated tail.
    pub tail: usize,
    /// Surprises pooled into the evidence of a sustained anomaly (1 turns the pooled test off).
    pub pooling: usize,
    /// Evidence (`-log10 p`) from which a value counts as an alarm; also the margin by which later
    /// evidence must beat the incident's peak to show during the refractory period.
    pub alarm: f64,
    /// Values in a row below `alarm` that end an incident; until then only evidence beyond its
    /// peak is reported.
    pub refractory: usize,
    /// Whether a value beyond everything the series has ever shown is tested as a record.
    pub records: bool,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            pattern: 6,
            neighbours: 3,
            memory: 1500,
            exclusion: 24,
            calibration: 900,
            min_calibration: 60,
            tail: 30,
            pooling: 24,
            alarm: 3.0,
            refractory: 150,
            records: true,
        }
    }
}

/// An invalid anomaly configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnomalyConfigError {
    /// A size that must be positive is zero.
    #[error("scoring.anomaly.{0} must be at least 1")]
    Zero(&'static str),
    /// The memory must hold enough patterns to find neighbours in.
    #[error(
        "scoring.anomaly.memory ({memory}) must be at least 2 x pattern + neighbours + exclusion ({needed})"
    )]
    Memory {
        /// The configured memory.
        memory: usize,
        /// The least memory that works.
        needed: usize,
    },
    /// The calibration set must be larger than its tail and its minimum.
    #[error(
        "scoring.anomaly: need tail ({tail}) < min_calibration ({min}) <= calibration ({calibration})"
    )]
    Calibration {
        /// The tail.
        tail: usize,
        /// The minimum.
        min: usize,
        /// The calibration size.
        calibration: usize,
    },
    /// The alarm level must be a positive number.
    #[error("scoring.anomaly.alarm must be positive and finite, not {0}")]
    Alarm(f64),
}

impl AnomalyConfig {
    /// Checks the configuration, reporting every problem.
    pub fn validate(&self) -> Vec<AnomalyConfigError> {
        let mut errors = Vec::new();
        for (name, v) in [
            ("pattern", self.pattern),
            ("neighbours", self.neighbours),
            ("pooling", self.pooling),
            ("tail", self.tail),
        ] {
            if v == 0 {
                errors.push(AnomalyConfigError::Zero(name));
            }
        }
        let needed = 2 * self.pattern + self.neighbours + self.exclusion;
        if self.memory < needed {
            errors.push(AnomalyConfigError::Memory {
                memory: self.memory,
                needed,
            });
        }
        if !(self.tail < self.min_calibration && self.min_calibration <= self.calibration) {
            errors.push(AnomalyConfigError::Calibration {
                tail: self.tail,
                min: self.min_calibration,
                calibration: self.calibration,
            });
        }
        if !(self.alarm.is_finite() && self.alarm > 0.0) {
            errors.push(AnomalyConfigError::Alarm(self.alarm));
        }
        errors
    }
}

/// What the detector said about one value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Anomaly {
    /// The anomaly score in `[0, 1)`; 0 while the detector is still learning the series.
    pub score: f64,
    /// The evidence behind it, `-log10` of the p-value of the kept test (after the refractory
    /// period's discount).
    pub evidence: f64,
    /// The p-value of the newest value's strangeness alone (1 while learning).
    pub p_value: f64,
}

impl Anomaly {
    const LEARNING: Anomaly = Anomaly {
        score: 0.0,
        evidence: 0.0,
        p_value: 1.0,
    };
}

/// The streaming detector for one series with a fixed number of dimensions.
#[derive(Debug, Clone)]
pub struct AnomalyDetector {
    config: AnomalyConfig,
    dims: usize,
    /// The last `memory` values, row after row.
    values: VecDeque<f64>,
    /// Per dimension: sum and sum of squares of the values in memory (for their scale).
    sums: Vec<(f64, f64)>,
    /// Strangeness of the last `calibration` values.
    calibration: Calibrator,
    /// Pooled surprise (mean `-ln p` over `pooling` values) of the last `calibration` values:
    /// overlapping patterns make neighbouring surprises dependent, so the pooled test is ranked
    /// against its own history rather than trusted to follow a Gamma law.
    pooled: Calibrator,
    /// Surprises (`-ln p`) of the last `pooling` values.
    surprises: VecDeque<f64>,
    /// Peak evidence of the current incident and values since its last alarm-level value.
    alarm: Option<(f64, usize)>,
    /// The series' extremes over its whole history, for the record test.
    records: Records,
    /// Scratch: the nearest distances found so far.
    nearest: Vec<f64>,
    /// Scratch: the inverse variance of each dimension over the memory.
    inv_var: Vec<f64>,
}

impl AnomalyDetector {
    /// A detector for series of `dims` dimensions. The configuration must be valid.
    pub fn new(config: AnomalyConfig, dims: usize) -> Self {
        debug_assert!(config.validate().is_empty());
        let dims = dims.max(1);
        Self {
            // Grown as values come (`grow_within`): a short replay of many series does not pay
            // for memory it never fills.
            values: VecDeque::new(),
            sums: vec![(0.0, 0.0); dims],
            calibration: Calibrator::new(config.calibration),
            pooled: Calibrator::new(config.calibration),
            surprises: VecDeque::with_capacity(config.pooling),
            alarm: None,
            records: Records::new(dims),
            nearest: Vec::with_capacity(config.neighbours + 1),
            inv_var: Vec::with_capacity(dims),
            dims,
            config,
        }
    }

    /// Values the detector remembers.
    pub fn len(&self) -> usize {
        self.values.len() / self.dims
    }

    /// Whether it has seen nothing yet.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Takes the next value (one number per dimension; non-finite values are skipped and score
    /// as "still learning") and scores it.
    pub fn update(&mut self, value: &[f64]) -> Anomaly {
        if value.len() != self.dims || value.iter().any(|v| !v.is_finite()) {
            return Anomaly::LEARNING;
        }
        self.push(value);
        let strangeness = self.strangeness();
        let learning =
            strangeness.is_none() || self.calibration.len() < self.config.min_calibration;
        let record =
            self.records
                .observe(value, self.config.memory, self.config.records && !learning);
        let Some(strangeness) = strangeness else {
            return Anomaly::LEARNING;
        };
        let p = self.calibration.p_value(strangeness, self.config.tail);
        self.calibration.push(strangeness);
        if learning {
            return Anomaly::LEARNING;
        }
        self.surprises.push_back(-p.ln());
        if self.surprises.len() > self.config.pooling {
            self.surprises.pop_front();
        }
        let mean_surprise = self.surprises.iter().sum::<f64>() / self.surprises.len() as f64;
        let pooled = if self.config.pooling > 1 && self.pooled.len() > self.config.min_calibration {
            self.pooled.p_value(mean_surprise, self.config.tail)
        } else {
            1.0
        };
        self.pooled.push(mean_surprise);
        // Keeping the better of the two pattern tests is a multiple comparison: Bonferroni-correct
        // it, so the evidence keeps its meaning as a p-value. The record test is not counted:
        // nothing happening, its probability of reaching any level is at most 2 x dims / n at the
        // n-th value (a record is that rare), so what it adds to the chance of a false alarm
        // fades as the series grows, where counting it would cut every pattern test's evidence
        // for good (NAB, standard profile, development subset / whole corpus: 67.1 / 58.4 as it
        // is, 66.1 / 53.1 counted).
        let tests = if self.config.pooling > 1 { 2.0 } else { 1.0 };
        let kept = (tests * p.min(pooled)).min(record).min(1.0);
        let evidence = self.one_alarm_per_incident(-kept.max(f64::MIN_POSITIVE).log10());
        Anomaly {
            score: evidence / (1.0 + evidence),
            evidence,
            p_value: p,
        }
    }

    /// The evidence that shows, given the incident state: everything outside an incident, only
    /// what goes beyond the incident's peak inside one.
    fn one_alarm_per_incident(&mut self, mut evidence: f64) -> f64 {
        match &mut self.alarm {
            Some((peak, since)) if *since < self.config.refractory => {
                // An incident lasts while alarms keep coming: every alarm-level value restarts the
                // quiet period, so a long incident is not announced again when its first alarm
                // expires.
                *since = if evidence >= self.config.alarm {
                    0
                } else {
                    *since + 1
                };
                // The same incident keeps building evidence (the pooled test grows for a while):
                // only what goes beyond its peak by a whole alarm's worth shows.
                let beyond = evidence - *peak - self.config.alarm;
                *peak = peak.max(evidence);
                evidence = beyond.max(0.0);
            }
            _ if evidence >= self.config.alarm => self.alarm = Some((evidence, 0)),
            _ => self.alarm = None,
        }
        evidence
    }

    fn push(&mut self, value: &[f64]) {
        if self.len() == self.config.memory {
            for (d, s) in self.sums.iter_mut().enumerate() {
                let old = self.values[d];
                s.0 -= old;
                s.1 -= old * old;
            }
            self.values.drain(..self.dims);
        }
        grow_within(&mut self.values, self.dims, self.config.memory * self.dims);
        for (s, &v) in self.sums.iter_mut().zip(value) {
            s.0 += v;
            s.1 += v * v;
        }
        self.values.extend(value.iter().copied());
    }

    /// Mean distance of the newest pattern to its nearest past patterns, or `None` while too few
    /// patterns are remembered.
    fn strangeness(&mut self) -> Option<f64> {
        let (w, k, dims) = (self.config.pattern, self.config.neighbours, self.dims);
        let (n, gap) = (self.len(), self.config.exclusion);
        // Past patterns end at j = w-1 ..= n-1-w-gap: none overlaps the newest (ending at n-1)
        // or ends in the exclusion zone before it.
        if n < 2 * w + k + gap {
            return None;
        }
        // Inverse variance per dimension; a constant dimension gets a tiny scale, so any change
        // in it is far.
        self.inv_var.clear();
        self.inv_var.extend(self.sums.iter().map(|&(s, sq)| {
            let mean = s / n as f64;
            let var = (sq / n as f64 - mean * mean).max(0.0);
            let floor = (1e-6 * mean.abs().max(1e-3)).powi(2);
            1.0 / var.max(floor)
        }));
        let inv_var = self.inv_var.as_slice();
        let (values, _) = self.values.as_slices();
        // Contiguous storage makes the inner loop simple; the deque is contiguous most of the time.
        let owned;
        let values: &[f64] = if values.len() == self.values.len() {
            values
        } else {
            owned = self.values.iter().copied().collect::<Vec<_>>();
            &owned
        };
        let newest = &values[(n - w) * dims..];
        self.nearest.clear();
        let mut worst_kept = f64::INFINITY;
        // The distances of a block of consecutive past patterns are summed row by row, each
        // row of the pattern over the whole block at once: the loops have no data-dependent
        // branch (giving up on a far pattern early costs more in mispredicted branches than the
        // few multiply-adds it saves) and run over adjacent values. Each distance is summed in
        // the same order as pattern by pattern, so it is the same to the bit.
        const BLOCK: usize = 64;
        let mut acc = [0.0_f64; BLOCK];
        // Past patterns end at `first..=last`.
        let (first, last) = (w - 1, n - 1 - w - gap);
        let mut from = first;
        while from <= last {
            let len = BLOCK.min(last + 1 - from);
            let acc = &mut acc[..len];
            acc.fill(0.0);
            for (row, q) in newest.chunks_exact(dims).enumerate() {
                // Row `row` of the pattern ending at `from + j` is value `from + j + 1 - w + row`.
                let at = from + 1 - w + row;
                for (d, (&q, &iv)) in q.iter().zip(inv_var).enumerate() {
                    if dims == 1 {
                        for (sum, &a) in acc.iter_mut().zip(&values[at..at + len]) {
                            let diff = a - q;
                            *sum += diff * diff * iv;
                        }
                    } else {
                        for (j, sum) in acc.iter_mut().enumerate() {
                            let diff = values[(at + j) * dims + d] - q;
                            *sum += diff * diff * iv;
                        }
                    }
                }
            }
            for &d2 in acc.iter() {
                if d2 < worst_kept || self.nearest.len() < k {
                    let at = self.nearest.partition_point(|&x| x <= d2);
                    self.nearest.insert(at, d2);
                    self.nearest.truncate(k);
                    if self.nearest.len() == k {
                        worst_kept = self.nearest[k - 1];
                    }
                }
            }
            from += len;
        }
        let mean = self.nearest.iter().map(|d2| d2.sqrt()).sum::<f64>() / k as f64;
        Some(mean / ((w * dims) as f64).sqrt())
    }
}

/// Makes room in `ring` for `more` values, holding at most `bound`: the capacity doubles as the
/// ring fills (from 16), and its last step stops at the bound. A ring reserved at its bound from
/// the start costs every new series its whole memory at once (fresh pages, which the kernel
/// zeroes), which a short replay of many series never fills; one grown by `VecDeque`'s own
/// doubling would end up at up to twice the bound, which a long run of many series keeps.
fn grow_within<T>(ring: &mut VecDeque<T>, more: usize, bound: usize) {
    let need = ring.len() + more;
    if need > ring.capacity() {
        let target = (2 * ring.capacity()).max(16).min(bound).max(need);
        ring.reserve_exact(target - ring.len());
    }
}

/// The record test's state: how many values the series has shown, its extremes over all of them,
/// and which of the last `memory` values were records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Records {
    /// Values seen.
    seen: u64,
    /// Per dimension, the least and the greatest value seen.
    extremes: Vec<(f64, f64)>,
    /// Which of the last `window` values were scored as records: bit `position % window` (empty
    /// until the first record; 1,500 values take 24 words).
    recent: Vec<u64>,
}

impl Records {
    fn new(dims: usize) -> Self {
        Self {
            seen: 0,
            extremes: Vec::with_capacity(dims),
            recent: Vec::new(),
        }
    }

    /// What a detector that knew only `values` (rows of `dims`) would know: for states written
    /// before the record test existed, whose history beyond the memory is gone.
    fn from_memory(values: &[f64], dims: usize) -> Self {
        let mut records = Self::new(dims);
        for row in values.chunks_exact(dims) {
            records.observe(row, 1, false);
        }
        records
    }

    /// Takes the next value and returns the probability, if nothing were happening, of a record
    /// at least this far beyond the old extremes (1 if it is no record, or if it is not `scored`:
    /// the detector is still learning). A record's probability is at least the share of records
    /// among the last `window` values.
    fn observe(&mut self, value: &[f64], window: usize, scored: bool) -> f64 {
        let n = self.seen;
        self.seen += 1;
        if self.extremes.is_empty() {
            self.extremes.extend(value.iter().map(|&v| (v, v)));
            return 1.0;
        }
        // The value `window` places back leaves the window: its bit is this value's.
        let words = window.div_ceil(64);
        if self.recent.len() != words && !self.recent.is_empty() {
            // Written under another memory: the positions mean nothing now.
            self.recent.clear();
        }
        let slot = (n % window as u64) as usize;
        let mut leaving = 0;
        if let Some(word) = self.recent.get_mut(slot / 64) {
            leaving = (*word >> (slot % 64)) & 1;
            *word &= !(1 << (slot % 64));
        }
        // The overshoot beyond the old extreme as a share of the old range (a range of zero, a
        // series constant so far, gets a tiny one: any change is far).
        let mut overshoot = None::<f64>;
        for ((lo, hi), &v) in self.extremes.iter_mut().zip(value) {
            let range = (*hi - *lo).max(1e-9 * hi.abs().max(lo.abs()).max(1e-3));
            let r = if v > *hi {
                (v - *hi) / range
            } else if v < *lo {
                (*lo - v) / range
            } else {
                continue;
            };
            overshoot = Some(overshoot.map_or(r, |o| o.max(r)));
            *lo = lo.min(v);
            *hi = hi.max(v);
        }
        let Some(r) = overshoot.filter(|_| scored) else {
            return 1.0;
        };
        // Records among the `window` values before this one (counted only for a record).
        let before = self.recent.iter().map(|w| w.count_ones()).sum::<u32>() + leaving as u32;
        if self.recent.is_empty() {
            self.recent.resize(words, 0);
        }
        self.recent[slot / 64] |= 1 << (slot % 64);
        // Nothing happening, the newest of n + 1 values is the greatest or the least in one of
        // the dimensions with probability at most 2 x dims / (n + 1); a series that sets
        // records often (a trend) makes the next one as likely as its recent share of them.
        let dims = self.extremes.len() as f64;
        let chance = (2.0 * dims / (n as f64 + 1.0)).max(f64::from(before) / window as f64);
        (chance * (1.0 + RECORD_OVERSHOOT * r).powi(-RECORD_TAIL)).clamp(f64::MIN_POSITIVE, 1.0)
    }
}

/// The record test's overshoot model: an overshoot of `r` times the old range is
/// `(1 + RECORD_OVERSHOOT r)^-RECORD_TAIL` times as likely as a bare record (a Pareto tail, heavy
/// enough for the spikes of real series: one range beyond is 121 times less likely, not
/// impossible).
const RECORD_OVERSHOOT: f64 = 10.0;
const RECORD_TAIL: i32 = 2;

/// A bounded window of a statistic's recent values, turning a new value into a tail probability.
#[derive(Debug, Clone)]
struct Calibrator {
    /// The last `cap` values, oldest first.
    values: VecDeque<f64>,
    cap: usize,
}

impl Calibrator {
    fn new(cap: usize) -> Self {
        Self {
            values: VecDeque::new(),
            cap,
        }
    }

    fn len(&self) -> usize {
        self.values.len()
    }

    fn push(&mut self, x: f64) {
        if self.values.len() == self.cap {
            self.values.pop_front();
        }
        grow_within(&mut self.values, 1, self.cap);
        self.values.push_back(x);
    }

    /// P(a value at least `x` when nothing is happening): its conformal rank, and beyond the top
    /// `tail` values an exponential tail fitted to their excesses.
    fn p_value(&self, x: f64, tail: usize) -> f64 {
        let c = self.values.len();
        if c == 0 {
            return 1.0;
        }
        // Branch-free over both halves of the ring (so the count vectorises).
        let (front, back) = self.values.as_slices();
        let count = |xs: &[f64]| xs.iter().map(|&s| usize::from(s >= x)).sum::<usize>();
        let at_least = count(front) + count(back);
        let tail = tail.min(c);
        if at_least >= tail {
            return (at_least as f64 + 1.0) / (c as f64 + 1.0);
        }
        // Beyond the top `tail`: exponential tail over the threshold u (the tail-th largest).
        let mut top: Vec<f64> = self.values.iter().copied().collect();
        top.select_nth_unstable_by(c - tail, f64::total_cmp);
        let u = top[c - tail];
        let excess: f64 = top[c - tail + 1..].iter().map(|s| s - u).sum::<f64>();
        let scale = (excess / (tail - 1).max(1) as f64).max(u.abs() * 1e-9 + f64::MIN_POSITIVE);
        let base = tail as f64 / (c as f64 + 1.0);
        (base * (-(x - u) / scale).exp()).max(f64::MIN_POSITIVE)
    }
}

/// A detector's state, for checkpoints: everything it learnt, bit for bit, so a restored
/// detector scores the next value exactly as the original would have. Its configuration is not
/// part of it (the restoring scorer's own applies). Encoded as the pattern tests' state followed
/// by the records', so a state written before the record test is a prefix of one written after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorState {
    patterns: PatternState,
    records: Records,
}

/// What the pattern tests and the incident learnt: a detector's whole state as written before
/// the record test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatternState {
    dims: usize,
    values: Vec<f64>,
    sums: Vec<(f64, f64)>,
    calibration: Vec<f64>,
    pooled: Vec<f64>,
    surprises: Vec<f64>,
    alarm: Option<(f64, usize)>,
}

/// A state written before the record test: its extremes are taken from what it remembers (the
/// history before that is gone), and it has scored no record yet.
impl From<PatternState> for DetectorState {
    fn from(patterns: PatternState) -> Self {
        let records = Records::from_memory(&patterns.values, patterns.dims.max(1));
        Self { patterns, records }
    }
}

impl DetectorState {
    /// The state as the version before the record test wrote it (for tests of the migration).
    #[cfg(test)]
    pub(crate) fn without_records(self) -> PatternState {
        self.patterns
    }
}

impl AnomalyDetector {
    /// What it has learnt.
    pub fn state(&self) -> DetectorState {
        DetectorState {
            patterns: PatternState {
                dims: self.dims,
                values: self.values.iter().copied().collect(),
                sums: self.sums.clone(),
                calibration: self.calibration.values.iter().copied().collect(),
                pooled: self.pooled.values.iter().copied().collect(),
                surprises: self.surprises.iter().copied().collect(),
                alarm: self.alarm,
            },
            records: self.records.clone(),
        }
    }

    /// A detector with `config` that has learnt `state`. A state that does not fit `config`
    /// (written under a smaller memory or calibration, or malformed) is refused with the reason.
    pub fn restored(config: AnomalyConfig, state: DetectorState) -> Result<Self, String> {
        let DetectorState {
            patterns: state,
            records,
        } = state;
        let dims = state.dims;
        if dims == 0 || state.sums.len() != dims || !state.values.len().is_multiple_of(dims) {
            return Err(format!(
                "{} values and {} sums for {dims} dimensions",
                state.values.len(),
                state.sums.len()
            ));
        }
        let fits = |what: &str, len: usize, cap: usize| {
            if len > cap {
                Err(format!(
                    "{len} {what} values, more than the configured {cap}"
                ))
            } else {
                Ok(())
            }
        };
        fits("remembered", state.values.len() / dims, config.memory)?;
        fits("calibration", state.calibration.len(), config.calibration)?;
        fits("pooled calibration", state.pooled.len(), config.calibration)?;
        fits("surprise", state.surprises.len(), config.pooling)?;
        if !records.extremes.is_empty() && records.extremes.len() != dims {
            return Err(format!(
                "extremes of {} dimensions for {dims}",
                records.extremes.len()
            ));
        }
        let mut detector = Self::new(config, dims);
        detector.values.extend(state.values);
        detector.sums = state.sums;
        detector.calibration.values.extend(state.calibration);
        detector.pooled.values.extend(state.pooled);
        detector.surprises.extend(state.surprises);
        detector.alarm = state.alarm;
        detector.records = records;
        Ok(detector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(i: usize) -> f64 {
        // Deterministic pseudo-noise in [-0.5, 0.5).
        let x = (i as u64)
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) % 1000) as f64 / 1000.0 - 0.5
    }

    fn seasonal(i: usize) -> f64 {
        50.0 + 10.0 * (i as f64 * std::f64::consts::TAU / 48.0).sin() + noise(i)
    }

    fn run(series: impl Iterator<Item = f64>) -> Vec<Anomaly> {
        let mut d = AnomalyDetector::new(AnomalyConfig::default(), 1);
        series.map(|v| d.update(&[v])).collect()
    }

    #[test]
    fn a_restored_detector_goes_on_exactly_as_the_original() {
        // Past the memory, so the sums have been subtracted from; a spike inside, so an incident
        // is open when the state is taken.
        let value = |i: usize| seasonal(i) + if i == 1990 { 15.0 } else { 0.0 };
        let mut original = AnomalyDetector::new(AnomalyConfig::default(), 1);
        for i in 0..2000 {
            original.update(&[value(i)]);
        }
        let bytes = foresight_events::encode_state(1, &original.state());
        let state: DetectorState = foresight_events::decode_state("cpu", 1, &bytes).unwrap();
        let mut restored = AnomalyDetector::restored(AnomalyConfig::default(), state).unwrap();
        for i in 2000..2600 {
            let (a, b) = (original.update(&[value(i)]), restored.update(&[value(i)]));
            assert_eq!(a.score.to_bits(), b.score.to_bits(), "value {i}");
            assert_eq!(a.p_value.to_bits(), b.p_value.to_bits(), "value {i}");
        }
        // A state that does not fit the configuration is refused, not truncated silently.
        let small = AnomalyConfig {
            memory: 100,
            ..AnomalyConfig::default()
        };
        let err = AnomalyDetector::restored(small, original.state()).unwrap_err();
        assert!(err.contains("more than the configured 100"), "{err}");
    }

    #[test]
    fn memory_grows_with_the_series_and_stops_at_its_bound() {
        let config = AnomalyConfig::default();
        let mut d = AnomalyDetector::new(config.clone(), 2);
        for i in 0..40 {
            d.update(&[seasonal(i), noise(i)]);
        }
        // A young series holds little more than it has seen...
        assert!(d.values.capacity() <= 128, "{}", d.values.capacity());
        assert!(d.calibration.values.capacity() <= 64);
        for i in 40..3000 {
            d.update(&[seasonal(i), noise(i)]);
        }
        // ...and an old one no more than its bounds.
        assert_eq!(d.len(), config.memory);
        assert_eq!(d.values.capacity(), 2 * config.memory);
        assert_eq!(d.calibration.values.capacity(), config.calibration);
        assert_eq!(d.pooled.values.capacity(), config.calibration);
    }

    #[test]
    fn default_config_is_valid_and_errors_are_all_reported() {
        assert!(AnomalyConfig::default().validate().is_empty());
        let bad = AnomalyConfig {
            pattern: 0,
            memory: 2,
            tail: 100,
            alarm: f64::NAN,
            ..AnomalyConfig::default()
        };
        assert_eq!(bad.validate().len(), 4, "{:?}", bad.validate());
    }

    #[test]
    fn a_spike_in_a_seasonal_series_stands_out() {
        let scores = run((0..2000).map(|i| seasonal(i) + if i == 1500 { 15.0 } else { 0.0 }));
        let spike = scores[1500].score;
        let normal = scores[800..1500]
            .iter()
            .map(|a| a.score)
            .fold(0.0, f64::max);
        assert!(spike > 0.8, "spike scored {spike}");
        assert!(
            spike > normal + 0.1,
            "spike {spike}, normal at most {normal}"
        );
    }

    #[test]
    fn a_seasonal_cycle_that_goes_flat_is_anomalous() {
        let scores = run((0..2000).map(|i| {
            if (1500..1600).contains(&i) {
                50.0
            } else {
                seasonal(i)
            }
        }));
        let during = scores[1500..1560]
            .iter()
            .map(|a| a.evidence)
            .fold(0.0, f64::max);
        let before = scores[800..1500]
            .iter()
            .map(|a| a.evidence)
            .fold(0.0, f64::max);
        assert!(during > before + 1.0, "flat {during}, normal {before}");
    }

    #[test]
    fn a_sustained_anomaly_is_not_its_own_neighbour() {
        // A level shift in noise. Without an exclusion zone the shifted patterns soon find each
        // other (after two pattern lengths) and the shift looks normal again; with it, each is
        // compared with the past before the shift until the shift is older than the zone.
        let strangeness = |exclusion: usize| {
            let mut d = AnomalyDetector::new(
                AnomalyConfig {
                    exclusion,
                    ..AnomalyConfig::default()
                },
                1,
            );
            (0..1600)
                .map(|i| {
                    d.push(&[noise(i) + if i >= 1500 { 5.0 } else { 0.0 }]);
                    d.strangeness().unwrap_or(0.0)
                })
                .collect::<Vec<f64>>()
        };
        let max = |s: &[f64]| s.iter().copied().fold(0.0, f64::max);
        let min = |s: &[f64]| s.iter().copied().fold(f64::INFINITY, f64::min);
        let zone = AnomalyConfig::default().exclusion;
        assert!(zone >= 12, "{zone}");
        let excluded = strangeness(zone);
        let normal = max(&excluded[1000..1500]);
        let during = min(&excluded[1500..1500 + zone]);
        assert!(during > 5.0 * normal, "shift {during}, normal {normal}");
        let matched = strangeness(0);
        assert!(
            max(&matched[1500 + zone..1500 + 2 * zone]) < normal,
            "without a zone: {:?}",
            &matched[1500..1500 + 2 * zone]
        );
    }

    #[test]
    fn one_incident_raises_one_alarm() {
        // A level shift: many strange values in a row, but after the first alarm they are discounted.
        let scores = run((0..2000).map(|i| seasonal(i) + if i >= 1500 { 30.0 } else { 0.0 }));
        let alarms = scores[1500..1800]
            .iter()
            .filter(|a| a.evidence >= AnomalyConfig::default().alarm)
            .count();
        assert!(alarms >= 1);
        assert!(alarms <= 3, "{alarms} alarms for one shift");
    }

    #[test]
    fn scores_are_in_range_deterministic_and_online() {
        let series: Vec<f64> = (0..1200).map(seasonal).collect();
        let a = run(series.iter().copied());
        let b = run(series.iter().copied());
        assert_eq!(a, b);
        // Online: the scores of a prefix do not depend on what comes after it.
        let prefix = run(series[..700].iter().copied());
        assert_eq!(&a[..700], &prefix[..]);
        assert!(a.iter().all(|s| (0.0..1.0).contains(&s.score)));
        assert!(a[..20].iter().all(|s| s.score == 0.0), "learning at first");
    }

    #[test]
    fn a_flat_series_stays_quiet_and_bad_values_are_skipped() {
        let mut d = AnomalyDetector::new(AnomalyConfig::default(), 2);
        for _ in 0..500 {
            assert_eq!(d.update(&[3.0, 7.0]).score, 0.0);
        }
        assert_eq!(d.update(&[f64::NAN, 1.0]), Anomaly::LEARNING);
        assert_eq!(d.update(&[1.0]), Anomaly::LEARNING);
        assert!(
            d.update(&[3.0, 9.0]).score > 0.5,
            "a change in a flat dimension"
        );
    }

    #[test]
    fn a_long_incident_is_announced_once() {
        // Alarm-level evidence every 2/3 of the refractory period, five times (longer than two
        // periods): each one restarts the quiet period, so only the first shows; after a whole
        // quiet period a new incident shows again.
        let config = AnomalyConfig::default();
        let (alarm, gap) = (config.alarm, config.refractory * 2 / 3);
        let last = 4 * gap;
        let next = last + config.refractory + 1;
        let mut d = AnomalyDetector::new(config, 1);
        let mut shown = Vec::new();
        for i in 0..=next {
            let evidence = if i % gap == 0 && i <= last || i == next {
                alarm + 0.5
            } else {
                0.0
            };
            if d.one_alarm_per_incident(evidence) > 0.0 {
                shown.push(i);
            }
        }
        assert_eq!(shown, [0, next]);
        // A much worse development inside an incident still shows, by its excess over the peak.
        assert!((d.one_alarm_per_incident(3.0 * alarm + 1.0) - (alarm + 0.5)).abs() < 1e-12);
    }

    #[test]
    fn a_record_is_rarer_the_longer_the_history_and_the_further_beyond() {
        let mut r = Records::new(1);
        for i in 0..999 {
            r.observe(&[noise(i)], 1500, false);
        }
        let (lo, hi) = r.extremes[0];
        // The 1,000th value, just above everything before it: 2 in 1,000.
        let mut just = r.clone();
        let p = just.observe(&[hi + 1e-9], 1500, true);
        assert!((p - 2.0 / 1000.0).abs() < 1e-6, "{p}");
        // One whole range beyond: 121 times rarer.
        let mut far = r.clone();
        let p = far.observe(&[hi + (hi - lo)], 1500, true);
        assert!((p - 2.0 / 1000.0 / 121.0).abs() < 1e-9, "{p}");
        // Inside the range: no record.
        assert_eq!(r.clone().observe(&[0.0], 1500, true), 1.0);
        // After ten records in the window, an eleventh is no surprise beyond their share.
        for k in 2..=10 {
            just.observe(&[hi + k as f64 * 1e-9], 1500, true);
        }
        let p = just.observe(&[hi + 11e-9], 1500, true);
        assert!((p - 10.0 / 1500.0).abs() < 1e-6, "{p}");
    }

    /// Evidence per value, with and without the record test.
    fn evidence(series: impl Fn(usize) -> f64, len: usize, records: bool) -> Vec<f64> {
        let mut d = AnomalyDetector::new(
            AnomalyConfig {
                records,
                ..AnomalyConfig::default()
            },
            1,
        );
        (0..len).map(|i| d.update(&[series(i)]).evidence).collect()
    }

    #[test]
    fn a_spike_beyond_every_earlier_one_alarms_with_the_record_test() {
        // A cycle with a spike of the same height every 150 values; at 1,890 one half as high
        // again: the pattern test has seen spikes and finds it strange, not strange enough.
        let spiky = |i: usize| {
            seasonal(i)
                + match i {
                    1890 => 30.0,
                    _ if i % 150 == 75 => 20.0,
                    _ => 0.0,
                }
        };
        let alarm = AnomalyConfig::default().alarm;
        let (with, without) = (evidence(spiky, 1900, true), evidence(spiky, 1900, false));
        assert!(with[1890] >= alarm, "{}", with[1890]);
        assert!(without[1890] < alarm, "{}", without[1890]);
    }

    #[test]
    fn a_growing_series_sets_records_without_alarms() {
        // A daily cycle over a load that grows by half its swing a day: its daily peak is a
        // record every day, for 40 days, but no surprise: the record test adds no alarm.
        let growing = |i: usize| seasonal(i) + 5.0 * i as f64 / 48.0;
        let alarm = AnomalyConfig::default().alarm;
        let alarms = |records| {
            evidence(growing, 1920, records)
                .iter()
                .filter(|&&e| e >= alarm)
                .count()
        };
        assert_eq!(alarms(true), alarms(false));
        let mut d = AnomalyDetector::new(AnomalyConfig::default(), 1);
        let mut least = 1.0_f64;
        for i in 0..1920 {
            let before = d.records.clone();
            d.update(&[growing(i)]);
            if d.calibration.len() > d.config.min_calibration {
                least = least.min(before.clone().observe(&[growing(i)], d.config.memory, true));
            }
        }
        // Its records' own evidence (not counted in the Bonferroni factor) stays half an alarm's
        // worth below the alarm level (2.2 here).
        assert!(-least.log10() < alarm - 0.5, "{least}");
    }

    #[test]
    fn a_state_from_before_the_record_test_takes_its_extremes_from_its_memory() {
        let mut original = AnomalyDetector::new(AnomalyConfig::default(), 1);
        for i in 0..2000 {
            original.update(&[seasonal(i) + if i == 100 { 50.0 } else { 0.0 }]);
        }
        let old = original.state().without_records();
        let migrated = AnomalyDetector::restored(AnomalyConfig::default(), old.into()).unwrap();
        // The spike at 100 is older than the memory: the migrated detector never saw it.
        assert!(original.records.extremes[0].1 > 100.0);
        let (lo, hi) = migrated.records.extremes[0];
        assert!(
            (39.0..41.0).contains(&lo) && (59.0..61.0).contains(&hi),
            "{lo} {hi}"
        );
        assert_eq!(
            migrated.records.seen,
            AnomalyConfig::default().memory as u64
        );
        assert!(migrated.records.recent.is_empty());
    }

    #[test]
    fn calibration_ranks_then_extrapolates_the_tail() {
        let mut c = Calibrator::new(100);
        for i in 0..150 {
            c.push(f64::from(i % 100));
        }
        assert_eq!(c.len(), 100, "bounded");
        // Within the ranks: 50 of the 100 values are at least 50.
        assert!((c.p_value(50.0, 10) - 51.0 / 101.0).abs() < 1e-12);
        // Beyond the top 10 (from 90) the exponential tail takes over: it keeps falling past the
        // largest value seen, and stays positive.
        let (p1, p2) = (c.p_value(100.0, 10), c.p_value(200.0, 10));
        assert!(p1 < 10.0 / 101.0 && p2 < p1 && p2 > 0.0, "{p1} {p2}");
    }

    /// The strangeness as its definition says: every past pattern's scaled distance, pattern by
    /// pattern, and the mean of the `neighbours` smallest.
    fn strangeness_by_definition(d: &AnomalyDetector) -> Option<f64> {
        let (w, k, dims, gap) = (
            d.config.pattern,
            d.config.neighbours,
            d.dims,
            d.config.exclusion,
        );
        let n = d.len();
        if n < 2 * w + k + gap {
            return None;
        }
        let values: Vec<f64> = d.values.iter().copied().collect();
        let inv_var: Vec<f64> = d
            .sums
            .iter()
            .map(|&(s, sq)| {
                let mean = s / n as f64;
                let var = (sq / n as f64 - mean * mean).max(0.0);
                1.0 / var.max((1e-6 * mean.abs().max(1e-3)).powi(2))
            })
            .collect();
        let newest = &values[(n - w) * dims..];
        let mut all: Vec<f64> = ((w - 1)..=(n - 1 - w - gap))
            .map(|end| {
                let past = &values[(end + 1 - w) * dims..(end + 1) * dims];
                let mut d2 = 0.0;
                for (i, (a, b)) in past.iter().zip(newest).enumerate() {
                    let diff = a - b;
                    d2 += diff * diff * inv_var[i % dims];
                }
                d2
            })
            .collect();
        all.sort_by(f64::total_cmp);
        let mean = all[..k].iter().map(|d2| d2.sqrt()).sum::<f64>() / k as f64;
        Some(mean / ((w * dims) as f64).sqrt())
    }

    #[test]
    fn the_nearest_patterns_are_found_exactly_as_defined() {
        // One and three dimensions; past the memory bound, so the ring has wrapped and the
        // search runs over more than one block.
        for dims in [1, 3] {
            let config = AnomalyConfig {
                memory: 150,
                ..AnomalyConfig::default()
            };
            let mut d = AnomalyDetector::new(config, dims);
            let mut checked = 0;
            for i in 0..400 {
                let v: Vec<f64> = (0..dims)
                    .map(|j| seasonal(i + 7 * j) * (1.0 + j as f64) + 5.0 * noise(i * 3 + j))
                    .collect();
                d.push(&v);
                let expected = strangeness_by_definition(&d);
                assert_eq!(
                    d.strangeness().map(f64::to_bits),
                    expected.map(f64::to_bits),
                    "value {i}, {dims} dimension(s)"
                );
                checked += usize::from(expected.is_some());
            }
            assert!(checked > 350, "{checked}");
        }
    }
}
