//! Scoring of anomaly detectors with the Numenta Anomaly Benchmark (NAB).
//!
//! This follows NAB's published description and the behaviour of its reference implementation
//! (`nab/sweeper.py`, used by its optimiser and scorer since NAB 1.0):
//!
//! - The first rows of each file are a probationary period in which the detector learns;
//!   detections there are ignored ([`probationary_length`]).
//! - A detection is a row whose anomaly score is at least the threshold.
//! - Inside an anomaly window only the earliest detection counts, weighted by the scaled sigmoid
//!   of its position so that a detection on the window's first row earns exactly `tpWeight` and
//!   one on its last row almost nothing. A window without a detection costs `fnWeight`.
//! - A detection outside every window is a false positive: it costs `fpWeight` if no window
//!   precedes it, and less if it comes just after a window (the sigmoid of its distance from the
//!   end of the closest preceding window, in units of that window's width), so that a late
//!   detection of a real anomaly is punished lightly.
//! - The raw score of a corpus is the sum over its files. It is normalised between the null
//!   detector (no detections: 0) and the perfect detector (one detection on the first row of
//!   each window: 100).
//! - The threshold is chosen per profile to maximise the raw score of the whole corpus. Like
//!   NAB's sweeper, [`sweep`] visits every distinct anomaly score from the highest down, so the
//!   maximum is exact.
//!
//! [`score_corpus`] scores a corpus at its best threshold, [`score_at_threshold`] at a given one,
//! [`file_scores`] breaks a score down by file.
//!
//! The backtest ([`crate::backtest`]) scores a replay's risk scores against its failure reports with
//! these rules (each entity a file, each failure the end of a window), and the NAB test in
//! `tests/nab.rs` scores the within-series anomaly detector on NAB's own corpus with them.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail, ensure};
use chrono::NaiveDateTime;

/// The share of each file that is probationary, as in NAB.
pub const PROBATIONARY_PERCENT: f64 = 0.15;

/// NAB caps the probationary period at this share of 5000 rows (750 rows).
const PROBATIONARY_CAP_ROWS: f64 = 5000.0;

/// The threshold NAB's sweeper starts from: above every score in [0, 1], so nothing is detected.
const NO_DETECTION_THRESHOLD: f64 = 1.1;

/// The anomaly windows of a corpus: for each file (keyed as in `combined_windows.json`, e.g.
/// `realKnownCause/nyc_taxi.csv`), the inclusive `(start, end)` of each window.
pub type Windows = BTreeMap<String, Vec<(NaiveDateTime, NaiveDateTime)>>;

/// The cost weights of one NAB application profile (its `CostMatrix`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// What a detection on the first row of a window earns; later detections earn less.
    pub tp_weight: f64,
    /// What a false positive far from any window costs.
    pub fp_weight: f64,
    /// What a window without any detection costs.
    pub fn_weight: f64,
    /// Kept for completeness: NAB gives true negatives no weight in the score.
    pub tn_weight: f64,
}

impl Profile {
    /// NAB's `standard` profile.
    pub const STANDARD: Self = Self {
        tp_weight: 1.0,
        fp_weight: 0.11,
        fn_weight: 1.0,
        tn_weight: 1.0,
    };
    /// NAB's `reward_low_FP_rate` profile.
    pub const LOW_FP: Self = Self {
        fp_weight: 0.22,
        ..Self::STANDARD
    };
    /// NAB's `reward_low_FN_rate` profile.
    pub const LOW_FN: Self = Self {
        fn_weight: 2.0,
        ..Self::STANDARD
    };
    /// NAB's three profiles: standard, low false-positive rate, low false-negative rate.
    pub const ALL: [Self; 3] = [Self::STANDARD, Self::LOW_FP, Self::LOW_FN];
}

/// A detector's output for one file of the corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorRun {
    /// The file's key in `combined_windows.json`, e.g. `realKnownCause/nyc_taxi.csv`.
    pub file: String,
    /// The timestamp of every row of the file, in file order (NAB's files are not strictly
    /// increasing: a few repeat a timestamp or step back, and rows are scored by position).
    pub timestamps: Vec<NaiveDateTime>,
    /// The detector's anomaly score in [0, 1] for each row.
    pub scores: Vec<f64>,
}

/// A corpus scored under one profile at one threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CorpusScore {
    /// `100 * (raw - null) / (perfect - null)`: 0 for the null detector, 100 for a perfect one
    /// (NaN if the corpus has no scorable window).
    pub normalized: f64,
    /// The sum of the files' raw NAB scores.
    pub raw: f64,
    /// The raw score of the null detector (no detections): minus `fnWeight` per window.
    pub null: f64,
    /// The raw score of a perfect detector (one detection on each window's first row).
    pub perfect: f64,
    /// The threshold the score was computed at (rows with score >= threshold are detections);
    /// 1.1, as in NAB, when detecting nothing scores best.
    pub threshold: f64,
    /// Rows detected inside windows (NAB's `TP` count: rows, not windows).
    pub tp: usize,
    /// Rows detected outside windows (NAB's `FP` count).
    pub fp: usize,
    /// Rows inside windows not detected (NAB's `FN` count: rows, not windows).
    pub fn_: usize,
    /// Rows outside windows not detected (NAB's `TN` count).
    pub tn: usize,
    /// Scorable windows in the corpus (those with a row after the probationary period).
    pub windows: usize,
    /// Windows with at least one detection: what the row counts above do not tell.
    pub windows_detected: usize,
}

/// One file scored under one profile at one threshold: the per-file breakdown for tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct FileScore {
    /// The file's key.
    pub file: String,
    /// Its raw NAB score.
    pub raw: f64,
    /// The null detector's raw score on it.
    pub null: f64,
    /// A perfect detector's raw score on it.
    pub perfect: f64,
    /// Rows detected inside windows.
    pub tp: usize,
    /// Rows detected outside windows.
    pub fp: usize,
    /// Rows inside windows not detected.
    pub fn_: usize,
    /// Rows outside windows not detected.
    pub tn: usize,
    /// Scorable windows in the file.
    pub windows: usize,
    /// Windows with at least one detection.
    pub windows_detected: usize,
}

/// The corpus score at one candidate threshold, as produced by [`sweep`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdScore {
    /// The threshold: rows with score >= it are detections.
    pub threshold: f64,
    /// The corpus raw score at it.
    pub raw: f64,
    /// Rows detected inside windows.
    pub tp: usize,
    /// Rows detected outside windows.
    pub fp: usize,
    /// Rows inside windows not detected.
    pub fn_: usize,
    /// Rows outside windows not detected.
    pub tn: usize,
}

/// NAB's scaled sigmoid of a relative position: about 0.98661 at -1 (a window's left edge),
/// 0 at 0 (its right edge), negative after it, and exactly -1 beyond 3.
pub fn scaled_sigmoid(relative_position: f64) -> f64 {
    if relative_position > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * relative_position).exp()) - 1.0
    }
}

/// The number of leading rows of a file of `rows` rows that are probationary:
/// `min(floor(0.15 * rows), 0.15 * 5000)`, as in NAB.
pub fn probationary_length(rows: usize) -> usize {
    let length = (PROBATIONARY_PERCENT * rows as f64)
        .floor()
        .min(PROBATIONARY_PERCENT * PROBATIONARY_CAP_ROWS);
    length as usize
}

/// What a scorable row is to the scorer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    /// In the probationary period: never scored.
    Probation,
    /// Outside windows with no window before it.
    BeforeAnyWindow,
    /// Inside the file's window of this index.
    In(usize),
    /// Outside windows; this is the index of the closest preceding window.
    After(usize),
}

/// A run checked against its windows, with the windows as inclusive row ranges.
struct Prepared<'a> {
    run: &'a DetectorRun,
    probation: usize,
    windows: Vec<(usize, usize)>,
    places: Vec<Place>,
}

impl Prepared<'_> {
    /// Whether a window has a row after the probationary period. NAB's sweeper neither rewards
    /// nor penalises windows that lie wholly inside it.
    fn scorable(&self, window: usize) -> bool {
        self.windows[window].1 >= self.probation
    }

    /// What detecting row `i` is worth, given where it is (the sweeper's per-row score).
    /// Inside a window this is the true-positive reward of that row as the window's earliest
    /// detection; outside, the false-positive cost.
    fn weight(&self, i: usize, profile: &Profile) -> f64 {
        match self.places[i] {
            Place::Probation => 0.0,
            Place::BeforeAnyWindow => -profile.fp_weight,
            Place::In(w) => {
                let (start, end) = self.windows[w];
                let width = (end - start + 1) as f64;
                // -1 at the first row (which therefore earns exactly tpWeight), -1/width at the last.
                let position = -((end - i + 1) as f64) / width;
                scaled_sigmoid(position) * profile.tp_weight / scaled_sigmoid(-1.0)
            }
            Place::After(w) => {
                let (start, end) = self.windows[w];
                let width = (end - start + 1) as f64;
                // A one-row window gives an infinite distance, that is the full fpWeight.
                let position = (i - end) as f64 / (width - 1.0);
                scaled_sigmoid(position) * profile.fp_weight
            }
        }
    }
}

/// Checks each run against its windows and maps the windows to rows.
fn prepare<'a>(runs: &'a [DetectorRun], windows: &Windows) -> anyhow::Result<Vec<Prepared<'a>>> {
    let mut seen = std::collections::BTreeSet::new();
    runs.iter()
        .map(|run| {
            let file = &run.file;
            ensure!(seen.insert(file.as_str()), "{file} is scored twice");
            ensure!(
                run.timestamps.len() == run.scores.len(),
                "{file}: {} timestamps but {} scores",
                run.timestamps.len(),
                run.scores.len()
            );
            if let Some(i) = run.scores.iter().position(|s| s.is_nan()) {
                bail!("{file}: the score of row {i} is NaN");
            }
            let limits = windows
                .get(file)
                .with_context(|| format!("{file} has no entry in the windows"))?;
            let mut limits = limits.clone();
            limits.sort();
            let ts = &run.timestamps;
            let mut rows: Vec<(usize, usize)> = Vec::with_capacity(limits.len());
            for &(start, end) in &limits {
                // Positional, as NAB's sweeper walks the rows: real NAB files repeat timestamps
                // and even step back once, so the rows are not searched as a sorted list. The
                // window opens at the first row at or after its start (after the previous
                // window) and closes at the first row equal to its end, or before the first
                // row past it.
                let from = rows.last().map_or(0, |&(_, prev_end)| prev_end + 1);
                let first = (from..ts.len()).find(|&i| ts[i] >= start);
                let last = first.map(|first| {
                    match (first..ts.len()).find(|&j| ts[j] >= end) {
                        Some(j) if ts[j] == end => Some(j),
                        Some(j) => j.checked_sub(1).filter(|&j| j >= first),
                        None => Some(ts.len() - 1),
                    }
                });
                let (Some(first), Some(Some(last))) = (first, last) else {
                    bail!("{file}: window [{start}, {end}] contains no row (after the previous window)");
                };
                rows.push((first, last));
            }
            let probation = probationary_length(run.scores.len());
            let mut places = Vec::with_capacity(run.scores.len());
            let mut next = 0;
            for i in 0..run.scores.len() {
                if next < rows.len() && i > rows[next].1 {
                    next += 1;
                }
                places.push(if i < probation {
                    Place::Probation
                } else if next < rows.len() && i >= rows[next].0 {
                    Place::In(next)
                } else if next == 0 {
                    Place::BeforeAnyWindow
                } else {
                    Place::After(next - 1)
                });
            }
            Ok(Prepared {
                run,
                probation,
                windows: rows,
                places,
            })
        })
        .collect()
}

/// Scores one prepared file at `threshold`, directly (not by sweeping).
fn score_prepared(p: &Prepared<'_>, profile: &Profile, threshold: f64) -> FileScore {
    let detected = |i: usize| i >= p.probation && p.run.scores[i] >= threshold;
    let mut score = FileScore {
        file: p.run.file.clone(),
        raw: 0.0,
        null: 0.0,
        perfect: 0.0,
        tp: 0,
        fp: 0,
        fn_: 0,
        tn: 0,
        windows: 0,
        windows_detected: 0,
    };
    let (mut tp_score, mut fn_score, mut fp_score) = (0.0, 0.0, 0.0);
    for (w, &(start, end)) in p.windows.iter().enumerate() {
        if !p.scorable(w) {
            continue;
        }
        let first_scorable = start.max(p.probation);
        score.windows += 1;
        score.null -= profile.fn_weight;
        score.perfect += p.weight(first_scorable, profile);
        // Only the earliest detection in a window counts.
        match (first_scorable..=end).find(|&i| detected(i)) {
            Some(i) => {
                score.windows_detected += 1;
                tp_score += p.weight(i, profile);
            }
            None => fn_score -= profile.fn_weight,
        }
    }
    for (i, place) in p.places.iter().enumerate() {
        match (place, detected(i)) {
            (Place::Probation, _) => {}
            (Place::In(_), true) => score.tp += 1,
            (Place::In(_), false) => score.fn_ += 1,
            (_, true) => {
                score.fp += 1;
                fp_score += p.weight(i, profile);
            }
            (_, false) => score.tn += 1,
        }
    }
    score.raw = tp_score + fp_score + fn_score;
    score
}

/// Scores each file of the corpus under `profile` at a given threshold.
pub fn file_scores(
    runs: &[DetectorRun],
    windows: &Windows,
    profile: &Profile,
    threshold: f64,
) -> anyhow::Result<Vec<FileScore>> {
    Ok(prepare(runs, windows)?
        .iter()
        .map(|p| score_prepared(p, profile, threshold))
        .collect())
}

/// Scores the corpus under `profile` at a given threshold (no optimisation).
pub fn score_at_threshold(
    runs: &[DetectorRun],
    windows: &Windows,
    profile: &Profile,
    threshold: f64,
) -> anyhow::Result<CorpusScore> {
    let files = file_scores(runs, windows, profile, threshold)?;
    let mut total = CorpusScore {
        normalized: 0.0,
        raw: 0.0,
        null: 0.0,
        perfect: 0.0,
        threshold,
        tp: 0,
        fp: 0,
        fn_: 0,
        tn: 0,
        windows: 0,
        windows_detected: 0,
    };
    for f in &files {
        total.raw += f.raw;
        total.null += f.null;
        total.perfect += f.perfect;
        total.tp += f.tp;
        total.fp += f.fp;
        total.fn_ += f.fn_;
        total.tn += f.tn;
        total.windows += f.windows;
        total.windows_detected += f.windows_detected;
    }
    total.normalized = 100.0 * (total.raw - total.null) / (total.perfect - total.null);
    Ok(total)
}

/// The corpus score under `profile` at every distinct threshold, from the highest down (the
/// first entry detects nothing), computed in one pass as NAB's sweeper does: all scorable rows
/// of all files sorted by anomaly score, descending, each lowering of the threshold adding the
/// rows at the new score.
pub fn sweep(
    runs: &[DetectorRun],
    windows: &Windows,
    profile: &Profile,
) -> anyhow::Result<Vec<ThresholdScore>> {
    let prepared = prepare(runs, windows)?;
    // Each scorable window's contribution, indexed corpus-wide: -fnWeight until detected, then
    // the best (earliest) detection's reward.
    let mut window_parts = Vec::new();
    let mut window_base = Vec::with_capacity(prepared.len());
    for p in &prepared {
        window_base.push(window_parts.len());
        window_parts.extend((0..p.windows.len()).map(|w| {
            if p.scorable(w) {
                -profile.fn_weight
            } else {
                0.0
            }
        }));
    }
    let mut rows: Vec<(f64, usize, usize)> = Vec::new();
    let (mut tn, mut fn_) = (0, 0);
    for (f, p) in prepared.iter().enumerate() {
        for (i, place) in p.places.iter().enumerate() {
            match place {
                Place::Probation => continue,
                Place::In(_) => fn_ += 1,
                _ => tn += 1,
            }
            rows.push((p.run.scores[i], f, i));
        }
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));

    let mut fp_part = 0.0;
    let (mut tp, mut fp) = (0, 0);
    let mut threshold = match rows.first() {
        Some(&(max, _, _)) if max >= NO_DETECTION_THRESHOLD => f64::INFINITY,
        _ => NO_DETECTION_THRESHOLD,
    };
    let mut out = Vec::new();
    let record = |threshold, fp_part: f64, window_parts: &[f64], tp, fp, fn_, tn| ThresholdScore {
        threshold,
        raw: fp_part + window_parts.iter().sum::<f64>(),
        tp,
        fp,
        fn_,
        tn,
    };
    for &(score, f, i) in &rows {
        if score != threshold {
            out.push(record(threshold, fp_part, &window_parts, tp, fp, fn_, tn));
            threshold = score;
        }
        let p = &prepared[f];
        let weight = p.weight(i, profile);
        match p.places[i] {
            Place::In(w) => {
                tp += 1;
                fn_ -= 1;
                let part = &mut window_parts[window_base[f] + w];
                *part = part.max(weight);
            }
            _ => {
                fp += 1;
                tn -= 1;
                fp_part += weight;
            }
        }
    }
    out.push(record(threshold, fp_part, &window_parts, tp, fp, fn_, tn));
    Ok(out)
}

/// Scores the corpus under `profile` at the threshold that maximises its raw score (the
/// highest such threshold on ties, as NAB's optimiser picks), then rescores each file at it
/// as NAB's scorer does.
pub fn score_corpus(
    runs: &[DetectorRun],
    windows: &Windows,
    profile: &Profile,
) -> anyhow::Result<CorpusScore> {
    let sweep = sweep(runs, windows, profile)?;
    let best = sweep
        .iter()
        .fold(None::<&ThresholdScore>, |best, s| match best {
            Some(b) if b.raw >= s.raw => Some(b),
            _ => Some(s),
        })
        .context("empty sweep")?;
    score_at_threshold(runs, windows, profile, best.threshold)
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, NaiveDate};
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

    use super::*;

    const PROFILES: [Profile; 3] = Profile::ALL;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    fn times(n: usize) -> Vec<NaiveDateTime> {
        let t0 = NaiveDate::from_ymd_opt(2024, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap();
        (0..n)
            .map(|i| t0 + Duration::minutes(5 * i as i64))
            .collect()
    }

    /// A synthetic file: its key, its number of rows and its windows as inclusive row ranges.
    type Spec = (&'static str, usize, &'static [(usize, usize)]);

    /// A synthetic detector: the score of row `i`.
    type ScoreOf = fn(usize) -> f64;

    /// A file of `n` rows with windows over the given inclusive row ranges and the given scores.
    fn file(
        name: &str,
        n: usize,
        ranges: &[(usize, usize)],
        scores: Vec<f64>,
        windows: &mut Windows,
    ) -> DetectorRun {
        let ts = times(n);
        windows.insert(
            name.into(),
            ranges.iter().map(|&(a, b)| (ts[a], ts[b])).collect(),
        );
        DetectorRun {
            file: name.into(),
            timestamps: ts,
            scores,
        }
    }

    /// Scores 1 on the given rows, 0 elsewhere.
    fn spikes(n: usize, rows: &[usize]) -> Vec<f64> {
        let mut s = vec![0.0; n];
        for &r in rows {
            s[r] = 1.0;
        }
        s
    }

    /// A small corpus: two files with windows (after the probationary period), one without.
    fn synthetic(
        detect: impl Fn(usize, &[(usize, usize)]) -> Vec<f64>,
    ) -> (Vec<DetectorRun>, Windows) {
        let mut windows = Windows::new();
        let specs: [Spec; 3] = [
            ("a/one.csv", 200, &[(60, 79), (150, 169)]),
            ("a/two.csv", 120, &[(100, 109)]),
            ("b/none.csv", 150, &[]),
        ];
        let runs = specs
            .iter()
            .map(|&(name, n, ranges)| file(name, n, ranges, detect(n, ranges), &mut windows))
            .collect();
        (runs, windows)
    }

    fn perfect_scores(n: usize, ranges: &[(usize, usize)]) -> Vec<f64> {
        spikes(n, &ranges.iter().map(|r| r.0).collect::<Vec<_>>())
    }

    #[test]
    fn scaled_sigmoid_matches_nab() {
        assert!((scaled_sigmoid(-1.0) - 0.986_614_298_151_43).abs() < 1e-12);
        assert!((scaled_sigmoid(-0.5) - 0.848_283_639_957_51).abs() < 1e-12);
        assert_eq!(scaled_sigmoid(0.0), 0.0);
        assert!((scaled_sigmoid(1.0) + 0.986_614_298_151_43).abs() < 1e-12);
        assert_eq!(scaled_sigmoid(3.0001), -1.0);
        assert!(scaled_sigmoid(3.0) > -1.0);
    }

    #[test]
    fn probationary_length_matches_nab() {
        assert_eq!(probationary_length(4032), 604);
        assert_eq!(probationary_length(1882), 282);
        assert_eq!(probationary_length(5000), 750);
        assert_eq!(probationary_length(22695), 750);
        assert_eq!(probationary_length(6), 0);
        assert_eq!(probationary_length(7), 1);
    }

    #[test]
    fn null_and_perfect_detectors_normalise_to_0_and_100() {
        for profile in &PROFILES {
            let (runs, windows) = synthetic(|n, _| vec![0.0; n]);
            let null = score_corpus(&runs, &windows, profile).unwrap();
            assert_eq!(null.normalized, 0.0, "{null:?}");
            assert_eq!(null.threshold, NO_DETECTION_THRESHOLD);
            assert_eq!(null.null, -3.0 * profile.fn_weight);
            assert_eq!((null.tp, null.fp, null.windows_detected), (0, 0, 0));

            let (runs, windows) = synthetic(perfect_scores);
            let perfect = score_corpus(&runs, &windows, profile).unwrap();
            assert!(close(perfect.normalized, 100.0), "{perfect:?}");
            assert_eq!(perfect.perfect, 3.0 * profile.tp_weight);
            assert_eq!(perfect.threshold, 1.0);
            assert_eq!(
                (perfect.tp, perfect.fp, perfect.windows_detected),
                (3, 0, 3)
            );
            // Rows, not windows: 50 rows in windows, 3 of them detected.
            assert_eq!(perfect.fn_, 50 - 3);
        }
    }

    #[test]
    fn an_early_detection_scores_more_than_a_late_one() {
        let mut windows = Windows::new();
        let early = file(
            "x/f.csv",
            100,
            &[(40, 59)],
            spikes(100, &[42]),
            &mut windows,
        );
        let late = DetectorRun {
            scores: spikes(100, &[57]),
            ..early.clone()
        };
        let s = |run: &DetectorRun| {
            score_at_threshold(std::slice::from_ref(run), &windows, &Profile::STANDARD, 0.5)
                .unwrap()
                .raw
        };
        assert!(s(&early) > s(&late));
        assert!(s(&late) > 0.0);
        assert!(s(&early) < 1.0);
        // Only the earliest detection in a window counts: later ones change nothing.
        let both = DetectorRun {
            scores: spikes(100, &[42, 50, 57]),
            ..early.clone()
        };
        assert_eq!(s(&both), s(&early));
        // A missed window costs fnWeight.
        let missed = DetectorRun {
            scores: vec![0.0; 100],
            ..early.clone()
        };
        assert_eq!(s(&missed), -1.0);
    }

    #[test]
    fn a_false_positive_just_after_a_window_costs_less_than_a_far_one() {
        let n = 300;
        // Detect the window's start (worth exactly tpWeight = 1), plus one false positive.
        let s = |fp: usize| {
            let mut windows = Windows::new();
            let run = file(
                "x/f.csv",
                n,
                &[(100, 119)],
                spikes(n, &[100, fp]),
                &mut windows,
            );
            score_at_threshold(&[run], &windows, &Profile::STANDARD, 1.0)
                .unwrap()
                .raw
        };
        let just_after = s(121) - 1.0;
        let later = s(140) - 1.0;
        let far = s(250) - 1.0;
        let before = s(60) - 1.0;
        assert!(
            just_after < 0.0 && just_after > later,
            "{just_after} {later}"
        );
        assert!(later > far);
        assert!(close(far, -0.11), "{far}");
        assert!(close(before, -0.11), "{before}");
    }

    #[test]
    fn probationary_detections_are_ignored() {
        let mut windows = Windows::new();
        let n = 200; // 30 probationary rows
        let quiet = file("x/f.csv", n, &[(100, 119)], vec![0.0; n], &mut windows);
        let noisy = DetectorRun {
            scores: spikes(n, &[0, 5, 29]),
            ..quiet.clone()
        };
        let counted = DetectorRun {
            scores: spikes(n, &[30]),
            ..quiet.clone()
        };
        let s = |run: &DetectorRun| {
            score_at_threshold(std::slice::from_ref(run), &windows, &Profile::STANDARD, 0.5)
                .unwrap()
        };
        assert_eq!(s(&noisy), s(&quiet));
        assert_eq!(s(&noisy).fp, 0);
        assert_eq!(s(&counted).fp, 1);
        assert!(s(&counted).raw < s(&quiet).raw);
        // The sweep agrees: the noisy run's best is detecting nothing that counts.
        let best = score_corpus(&[noisy], &windows, &Profile::STANDARD).unwrap();
        assert_eq!(best.normalized, 0.0);
    }

    /// The sweep's score at every threshold equals the direct score, and its maximum equals a
    /// brute force over a grid holding every score value.
    #[test]
    fn the_sweep_finds_the_brute_force_best() {
        let levels = 20;
        for seed in 0..30 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut windows = Windows::new();
            let runs: Vec<DetectorRun> = (0..rng.gen_range(1..4))
                .map(|f| {
                    let n = rng.gen_range(40..160);
                    let mut ranges = Vec::new();
                    let mut at = rng.gen_range(0..n / 2);
                    while at + 2 < n && ranges.len() < 3 && rng.gen_bool(0.7) {
                        let end = (at + rng.gen_range(0..15)).min(n - 1);
                        ranges.push((at, end));
                        at = end + 1 + rng.gen_range(1..40);
                    }
                    // Mostly low scores, some high ones, quantised so the grid holds them all.
                    let scores = (0..n)
                        .map(|_| {
                            let x: f64 = rng.r#gen::<f64>().powi(4);
                            (x * levels as f64).round() / levels as f64
                        })
                        .collect();
                    file(&format!("d/{f}.csv"), n, &ranges, scores, &mut windows)
                })
                .collect();
            for profile in &PROFILES {
                let swept = sweep(&runs, &windows, profile).unwrap();
                for s in &swept {
                    let direct = score_at_threshold(&runs, &windows, profile, s.threshold).unwrap();
                    assert!(close(s.raw, direct.raw), "seed {seed}: {s:?} vs {direct:?}");
                    assert_eq!(
                        (s.tp, s.fp, s.fn_, s.tn),
                        (direct.tp, direct.fp, direct.fn_, direct.tn)
                    );
                }
                let brute = (0..=levels + 2)
                    .map(|k| k as f64 / levels as f64)
                    .map(|t| score_at_threshold(&runs, &windows, profile, t).unwrap().raw)
                    .fold(f64::NEG_INFINITY, f64::max);
                let best = score_corpus(&runs, &windows, profile).unwrap();
                assert!(
                    close(best.raw, brute),
                    "seed {seed}: {} vs {brute}",
                    best.raw
                );
                assert!(swept.windows(2).all(|w| w[0].threshold > w[1].threshold));
            }
        }
    }

    /// Numbers computed by NAB's reference `Sweeper` (nab/sweeper.py, as its optimiser and
    /// scorer use it) on the same three synthetic files.
    #[test]
    fn matches_the_reference_implementation() {
        let mut windows = Windows::new();
        let specs: [(Spec, ScoreOf); 3] = [
            (("g/a.csv", 100, &[(40, 59)]), |i| {
                ((i * 37) % 101) as f64 / 100.0
            }),
            (("g/b.csv", 60, &[]), |i| ((i * 53) % 97) as f64 / 96.0),
            (("g/c.csv", 80, &[(20, 29), (50, 54)]), |i| {
                ((i * 29) % 89) as f64 / 88.0
            }),
        ];
        let runs: Vec<DetectorRun> = specs
            .iter()
            .map(|&((name, n, ranges), score)| {
                file(name, n, ranges, (0..n).map(score).collect(), &mut windows)
            })
            .collect();
        let low_fn = PROFILES[2];
        let expected = [
            (
                Profile::STANDARD,
                0.954_545_454_545_454_6,
                0.024_885_229_502_416_006,
                [0.547_435_854_377_887_3, -0.22, -0.302_550_624_875_471_46],
            ),
            (
                low_fn,
                0.852_272_727_272_727_3,
                -0.050_818_789_637_709_03,
                [-0.140_065_596_378_290_3, -0.88, 0.969_246_806_740_581],
            ),
        ];
        for (profile, threshold, raw, per_file) in expected {
            let best = score_corpus(&runs, &windows, &profile).unwrap();
            assert_eq!(best.threshold, threshold);
            assert!(close(best.raw, raw), "{best:?}");
            let files = file_scores(&runs, &windows, &profile, threshold).unwrap();
            for (f, want) in files.iter().zip(per_file) {
                assert!(close(f.raw, want), "{f:?} vs {want}");
            }
        }
        let at_half = [-2.471_836_717_166_478_3, -2.75, -0.830_017_506_098_480_7];
        let files = file_scores(&runs, &windows, &Profile::STANDARD, 0.5).unwrap();
        for (f, want) in files.iter().zip(at_half) {
            assert!(close(f.raw, want), "{f:?} vs {want}");
        }
    }

    #[test]
    fn inputs_are_checked() {
        let mut windows = Windows::new();
        let run = file("x/f.csv", 50, &[(20, 29)], vec![0.0; 50], &mut windows);
        let short = DetectorRun {
            scores: vec![0.0; 49],
            ..run.clone()
        };
        assert!(score_corpus(&[short], &windows, &Profile::STANDARD).is_err());
        let unknown = DetectorRun {
            file: "x/g.csv".into(),
            ..run.clone()
        };
        assert!(score_corpus(&[unknown], &windows, &Profile::STANDARD).is_err());
        assert!(score_corpus(&[run.clone(), run], &windows, &Profile::STANDARD).is_err());
    }
}
