//! The backtest: a run's scores, decisions and outcomes against the failures that really happened
//! (the labels). Pure: outputs and labels in, numbers out; the same for a replay and the demo.
//!
//! - An **alarm** is a score in the high band. A failure is **foreseen** if an alarm about its
//!   entity came within the look-back before it; its **lead time** is how long before the failure
//!   the first such alarm came. Recall is the share of failures foreseen.
//! - **Precision** is the share of alarms followed by a failure of their entity within their
//!   horizon (the cookbook's "precision of the high band"); decision precision the same for
//!   decisions (the horizon of the score behind each).
//! - A **false alarm** is a decision about an entity that did not fail within the horizon (plus
//!   the look-back) after it; they are counted per entity per day of data.
//! - The **NAB-style score** treats each entity's score series as one NAB file (the probability as
//!   the anomaly score) and each failure as the end of an anomaly window one look-back wide, and
//!   scores it with NAB's rules ([`crate::nab`]) under NAB's three profiles, at the operating
//!   threshold and at the best threshold.
//! - **Calibration**: each score's probability against whether its entity failed within its
//!   horizon: Brier score (with the base rate's, for reference) and a reliability curve.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration as Delta, Utc};
use foresight_events::{
    ActuationOutcome, Band, Decision, EntityId, EventData, EventId, FailureReport, RiskScore,
};
use serde::Serialize;

use crate::nab;

/// How alarms are matched with failures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacktestConfig {
    /// How long before a failure an alarm or a decision counts as seeing it coming (the width of
    /// the NAB windows).
    pub lookback: Delta,
    /// The probability at or above which a score is an alarm for the NAB-style score at the
    /// operating point (the configuration's high band, unless training sets another).
    pub threshold: f64,
}

/// How one failure was seen coming.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureCatch {
    /// The failure.
    pub failure: FailureReport,
    /// When the entity's first alarm within the look-back before the failure came.
    pub first_alarm: Option<DateTime<Utc>>,
    /// The first decision about the entity within the look-back before the failure.
    #[serde(skip)]
    pub first_decision: Option<Decision>,
    /// That decision's id.
    pub first_decision_id: Option<EventId>,
    /// Minutes from the first alarm to the failure.
    pub lead_minutes: Option<f64>,
}

impl FailureCatch {
    /// How long before the failure the first alarm came.
    pub fn lead_time(&self) -> Option<Delta> {
        self.first_alarm.map(|t| self.failure.time - t)
    }
}

/// The distribution of lead times of the foreseen failures, in minutes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LeadTimes {
    /// Failures foreseen.
    pub count: usize,
    /// Shortest.
    pub min: Option<f64>,
    /// 10th percentile (linear interpolation, as Postgres' `percentile_cont`).
    pub p10: Option<f64>,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// Longest.
    pub max: Option<f64>,
    /// Mean.
    pub mean: Option<f64>,
}

impl LeadTimes {
    fn of(mut minutes: Vec<f64>) -> Self {
        minutes.sort_by(f64::total_cmp);
        let pct = |q: f64| percentile_cont(&minutes, q);
        Self {
            count: minutes.len(),
            min: minutes.first().copied(),
            p10: pct(0.1),
            p50: pct(0.5),
            p90: pct(0.9),
            max: minutes.last().copied(),
            mean: (!minutes.is_empty()).then(|| minutes.iter().sum::<f64>() / minutes.len() as f64),
        }
    }
}

/// Postgres' `percentile_cont` of sorted values.
fn percentile_cont(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let pos = q * last as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64))
}

/// One bin of the reliability curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReliabilityBin {
    /// The bin `[bin/10, (bin+1)/10)`.
    pub bin: usize,
    /// Scores in it.
    pub scores: usize,
    /// Their mean probability.
    pub predicted: f64,
    /// The share of them followed by a failure within their horizon.
    pub observed: f64,
}

/// How well probabilities match frequencies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// Scores compared (those before their entity's first failure).
    pub scores: usize,
    /// Mean squared error of the probability against the outcome (0 or 1): 0 is perfect.
    pub brier: f64,
    /// The Brier score of always predicting the observed base rate, for reference.
    pub brier_base_rate: f64,
    /// The reliability curve; empty bins are left out.
    pub reliability: Vec<ReliabilityBin>,
}

/// Compares each score's probability with whether its entity failed within its horizon. Scores
/// after an entity's failure are left out: it had already failed.
pub fn calibration(scores: &[RiskScore], failures: &[FailureReport]) -> Calibration {
    let by_entity = failures_by_entity(failures);
    let mut pairs = Vec::with_capacity(scores.len());
    for s in scores {
        let mine = by_entity.get(&s.entity).map(Vec::as_slice).unwrap_or(&[]);
        if mine.iter().any(|t| *t < s.time) {
            continue;
        }
        let horizon = Delta::seconds(s.horizon_seconds as i64);
        let failed = mine.iter().any(|t| *t <= s.time + horizon);
        pairs.push((s.probability, if failed { 1.0 } else { 0.0 }));
    }
    let n = pairs.len().max(1) as f64;
    let brier = pairs.iter().map(|(p, y)| (p - y).powi(2)).sum::<f64>() / n;
    let rate = pairs.iter().map(|(_, y)| y).sum::<f64>() / n;
    let brier_base_rate = pairs.iter().map(|(_, y)| (rate - y).powi(2)).sum::<f64>() / n;
    let mut bins = [(0usize, 0.0f64, 0.0f64); 10];
    for (p, y) in &pairs {
        let b = ((p * 10.0) as usize).min(9);
        bins[b].0 += 1;
        bins[b].1 += p;
        bins[b].2 += y;
    }
    let reliability = bins
        .iter()
        .enumerate()
        .filter(|(_, b)| b.0 > 0)
        .map(|(i, b)| ReliabilityBin {
            bin: i,
            scores: b.0,
            predicted: b.1 / b.0 as f64,
            observed: b.2 / b.0 as f64,
        })
        .collect();
    Calibration {
        scores: pairs.len(),
        brier,
        brier_base_rate,
        reliability,
    }
}

/// The NAB-style score under one profile.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NabScore {
    /// The profile's name, as in NAB's `profiles.json`.
    pub profile: &'static str,
    /// Normalised score at the operating threshold (0: detects nothing; 100: perfect).
    pub at_threshold: f64,
    /// Normalised score at the best threshold.
    pub best: f64,
    /// That best threshold.
    pub best_threshold: f64,
    /// Failure windows scored (those with a score after the probationary period).
    pub windows: usize,
    /// Of them, detected at the operating threshold.
    pub windows_detected: usize,
}

/// NAB's three application profiles.
pub const NAB_PROFILES: [(&str, nab::Profile); 3] = [
    ("standard", nab::Profile::STANDARD),
    ("reward_low_FP_rate", nab::Profile::LOW_FP),
    ("reward_low_FN_rate", nab::Profile::LOW_FN),
];

/// Headline numbers of a run against its labels.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backtest {
    /// The look-back, in minutes.
    pub lookback_minutes: i64,
    /// Entities seen (in scores or labels).
    pub entities: usize,
    /// Days of data (first to last score).
    pub days: f64,
    /// Failures in the labels.
    pub failures: usize,
    /// Failures with an alarm within the look-back before them.
    pub foreseen: usize,
    /// `foreseen / failures` (None without failures).
    pub recall: Option<f64>,
    /// Alarms (high-band scores).
    pub alarms: usize,
    /// Share of alarms followed by a failure of their entity within their horizon.
    pub precision: Option<f64>,
    /// Decisions.
    pub decisions: usize,
    /// Share of decisions followed by a failure of their entity within the horizon (plus the
    /// look-back).
    pub decision_precision: Option<f64>,
    /// Decisions not followed by a failure.
    pub false_alarms: usize,
    /// False alarms per entity per day.
    pub false_alarms_per_entity_day: f64,
    /// Lead times of the foreseen failures.
    pub lead_time: LeadTimes,
    /// NAB-style scores, one per profile.
    pub nab: Vec<NabScore>,
    /// Calibration of the probabilities.
    pub calibration: Calibration,
    /// Decisions by action kind.
    pub actions: BTreeMap<String, usize>,
    /// Outcomes by status.
    pub outcomes: BTreeMap<String, usize>,
    /// One row per failure.
    pub catches: Vec<FailureCatch>,
}

fn failures_by_entity(failures: &[FailureReport]) -> BTreeMap<EntityId, Vec<DateTime<Utc>>> {
    let mut by: BTreeMap<EntityId, Vec<DateTime<Utc>>> = BTreeMap::new();
    for f in failures {
        by.entry(f.entity.clone()).or_default().push(f.time);
    }
    for times in by.values_mut() {
        times.sort();
    }
    by
}

fn share(hits: usize, of: usize) -> Option<f64> {
    (of > 0).then(|| hits as f64 / of as f64)
}

/// Scores a run against its labels.
pub fn backtest(
    scores: &[RiskScore],
    decisions: &[Decision],
    outcomes: &[ActuationOutcome],
    failures: &[FailureReport],
    config: &BacktestConfig,
) -> Backtest {
    let lookback = config.lookback;
    let by_entity = failures_by_entity(failures);
    let failed_within = |entity: &EntityId, from: DateTime<Utc>, to: DateTime<Utc>| {
        by_entity
            .get(entity)
            .is_some_and(|ts| ts.iter().any(|t| *t >= from && *t <= to))
    };
    // Alarms per entity, in time order, for the catches.
    let mut alarms_of: BTreeMap<&EntityId, Vec<DateTime<Utc>>> = BTreeMap::new();
    let mut alarms = 0;
    let mut true_alarms = 0;
    for s in scores.iter().filter(|s| s.band == Band::High) {
        alarms += 1;
        let horizon = Delta::seconds(s.horizon_seconds as i64);
        if failed_within(&s.entity, s.time, s.time + horizon) {
            true_alarms += 1;
        }
        alarms_of.entry(&s.entity).or_default().push(s.time);
    }
    let catches: Vec<FailureCatch> = failures
        .iter()
        .map(|f| {
            let in_window = |t: DateTime<Utc>| t <= f.time && t >= f.time - lookback;
            let first_alarm = alarms_of
                .get(&f.entity)
                .and_then(|ts| ts.iter().copied().filter(|t| in_window(*t)).min());
            let first_decision = decisions
                .iter()
                .filter(|d| d.entity == f.entity && in_window(d.time))
                .min_by_key(|d| d.time)
                .cloned();
            FailureCatch {
                failure: f.clone(),
                first_alarm,
                first_decision_id: first_decision.as_ref().map(EventData::id),
                first_decision,
                lead_minutes: first_alarm.map(|t| (f.time - t).num_seconds() as f64 / 60.0),
            }
        })
        .collect();
    let foreseen = catches.iter().filter(|c| c.first_alarm.is_some()).count();

    let horizon_of: BTreeMap<EventId, u64> =
        scores.iter().map(|s| (s.id(), s.horizon_seconds)).collect();
    let fallback_horizon = scores.first().map_or(0, |s| s.horizon_seconds);
    let true_decisions = decisions
        .iter()
        .filter(|d| {
            let h = horizon_of
                .get(&d.score_id)
                .copied()
                .unwrap_or(fallback_horizon);
            failed_within(
                &d.entity,
                d.time,
                d.time + Delta::seconds(h as i64) + lookback,
            )
        })
        .count();
    let false_alarms = decisions.len() - true_decisions;

    let entities: BTreeSet<&EntityId> = scores
        .iter()
        .map(|s| &s.entity)
        .chain(failures.iter().map(|f| &f.entity))
        .collect();
    let (first, last) = (
        scores.iter().map(|s| s.time).min(),
        scores.iter().map(|s| s.time).max(),
    );
    let days = match (first, last) {
        (Some(a), Some(b)) => (b - a).num_seconds() as f64 / 86_400.0,
        _ => 0.0,
    };

    let mut actions = BTreeMap::new();
    for d in decisions {
        *actions
            .entry(d.action.kind.as_str().to_owned())
            .or_insert(0) += 1;
    }
    let mut outcome_counts = BTreeMap::new();
    for o in outcomes {
        *outcome_counts
            .entry(o.status.as_str().to_owned())
            .or_insert(0) += 1;
    }

    Backtest {
        lookback_minutes: lookback.num_minutes(),
        entities: entities.len(),
        days,
        failures: failures.len(),
        foreseen,
        recall: share(foreseen, failures.len()),
        alarms,
        precision: share(true_alarms, alarms),
        decisions: decisions.len(),
        decision_precision: share(true_decisions, decisions.len()),
        false_alarms,
        false_alarms_per_entity_day: false_alarms as f64 / (entities.len() as f64 * days).max(1e-9),
        lead_time: LeadTimes::of(catches.iter().filter_map(|c| c.lead_minutes).collect()),
        nab: nab_scores(scores, failures, config),
        calibration: calibration(scores, failures),
        actions,
        outcomes: outcome_counts,
        catches,
    }
}

/// Each entity's scores as one NAB file, each failure the end of a window one look-back wide.
fn nab_scores(
    scores: &[RiskScore],
    failures: &[FailureReport],
    config: &BacktestConfig,
) -> Vec<NabScore> {
    let mut series: BTreeMap<&EntityId, Vec<(DateTime<Utc>, f64)>> = BTreeMap::new();
    for s in scores {
        series
            .entry(&s.entity)
            .or_default()
            .push((s.time, s.probability));
    }
    let by_entity = failures_by_entity(failures);
    let mut runs = Vec::with_capacity(series.len());
    let mut windows = nab::Windows::new();
    for (entity, mut rows) in series {
        rows.sort_by_key(|r| r.0);
        let (first, last) = (rows[0].0, rows[rows.len() - 1].0);
        let mut limits = Vec::new();
        for &t in by_entity.get(entity).map(Vec::as_slice).unwrap_or(&[]) {
            let start = (t - config.lookback).max(first);
            // A window must hold a row: failures before the first score or long after the last
            // one are not the detector's to see.
            let end = t.min(last);
            let holds_a_row = rows.iter().any(|r| r.0 >= start && r.0 <= end);
            let overlaps =
                limits
                    .last()
                    .is_some_and(|(_, prev_end): &(_, chrono::NaiveDateTime)| {
                        start.naive_utc() <= *prev_end
                    });
            if holds_a_row && !overlaps {
                limits.push((start.naive_utc(), end.naive_utc()));
            }
        }
        windows.insert(entity.to_string(), limits);
        runs.push(nab::DetectorRun {
            file: entity.to_string(),
            timestamps: rows.iter().map(|r| r.0.naive_utc()).collect(),
            scores: rows.iter().map(|r| r.1.clamp(0.0, 1.0)).collect(),
        });
    }
    if runs.is_empty() {
        return Vec::new();
    }
    NAB_PROFILES
        .iter()
        .filter_map(|(name, profile)| {
            let at = nab::score_at_threshold(&runs, &windows, profile, config.threshold).ok()?;
            let best = nab::score_corpus(&runs, &windows, profile).ok()?;
            Some(NabScore {
                profile: name,
                at_threshold: finite(at.normalized),
                best: finite(best.normalized),
                best_threshold: best.threshold,
                windows: at.windows,
                windows_detected: at.windows_detected,
            })
        })
        .collect()
}

/// NaN (no scorable window) as 0, so that summaries stay valid JSON.
fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

impl std::fmt::Display for Backtest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{:.1}%", 100.0 * x));
        let min = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{x:.0} min"));
        writeln!(
            f,
            "Backtest against {} failure(s) of {} entities over {:.1} days (look-back {} min):",
            self.failures, self.entities, self.days, self.lookback_minutes
        )?;
        writeln!(
            f,
            "  recall {} ({} foreseen); precision of alarms {} ({} alarms); precision of decisions {} ({} decisions)",
            pct(self.recall),
            self.foreseen,
            pct(self.precision),
            self.alarms,
            pct(self.decision_precision),
            self.decisions
        )?;
        writeln!(
            f,
            "  lead time: p10 {}, median {}, p90 {}, max {}",
            min(self.lead_time.p10),
            min(self.lead_time.p50),
            min(self.lead_time.p90),
            min(self.lead_time.max)
        )?;
        writeln!(
            f,
            "  false alarms: {} ({:.3} per entity per day)",
            self.false_alarms, self.false_alarms_per_entity_day
        )?;
        for n in &self.nab {
            writeln!(
                f,
                "  NAB {}: {:.1} at the operating threshold, {:.1} at the best ({:.3}); {} of {} windows detected",
                n.profile, n.at_threshold, n.best, n.best_threshold, n.windows_detected, n.windows
            )?;
        }
        writeln!(
            f,
            "  calibration: Brier {:.4} over {} scores (base rate: {:.4})",
            self.calibration.brier, self.calibration.scores, self.calibration.brier_base_rate
        )?;
        let actions: Vec<String> = self
            .actions
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(
            f,
            "  actions: {}; outcomes: {}",
            if actions.is_empty() {
                "none".to_owned()
            } else {
                actions.join(", ")
            },
            if outcomes.is_empty() {
                "none".to_owned()
            } else {
                outcomes.join(", ")
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foresight_events::{Action, ActionKind, ScoreMethod};

    fn t(m: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_767_225_600 + m * 60, 0).unwrap()
    }

    fn score(entity: &str, minute: i64, p: f64) -> RiskScore {
        let e = EntityId::new(entity).unwrap();
        RiskScore {
            window_id: EventId::derive("w", &[entity.as_bytes(), &minute.to_le_bytes()]),
            entity: e,
            time: t(minute),
            horizon_seconds: 600,
            probability: p,
            lower: p,
            upper: p,
            time_to_failure_seconds: None,
            health: 100.0 * (1.0 - p),
            band: if p >= 0.6 {
                Band::High
            } else if p >= 0.3 {
                Band::Moderate
            } else {
                Band::Low
            },
            contributors: Vec::new(),
            method: ScoreMethod::Prior,
            model_version: "t".into(),
            signals: Default::default(),
            observed: Default::default(),
            blast_radius: vec![],
            impact: 1.0,
            rank: None,
        }
    }

    fn decision(s: &RiskScore) -> Decision {
        Decision {
            entity: s.entity.clone(),
            time: s.time,
            score_id: s.id(),
            probability: s.probability,
            interval: [s.lower, s.upper],
            band: s.band,
            policy: "p".into(),
            rule: "r".into(),
            action: Action {
                kind: ActionKind::Migrate,
                target: s.entity.clone(),
                params: Default::default(),
            },
            reason: String::new(),
            expected_effect: String::new(),
            inverse: None,
            alternatives: Vec::new(),
        }
    }

    fn failure(entity: &str, minute: i64) -> FailureReport {
        FailureReport {
            entity: EntityId::new(entity).unwrap(),
            time: t(minute),
            kind: "crash".into(),
            detail: String::new(),
        }
    }

    #[test]
    fn calibration_scores_probabilities_against_outcomes() {
        let f = failure("n", 100);
        // Certain and right: 0 before the horizon reaches the failure, 1 within it; the score
        // after the failure is left out.
        let perfect = [
            score("n", 0, 0.0),
            score("n", 50, 0.0),
            score("n", 95, 1.0),
            score("n", 120, 0.3),
        ];
        let c = calibration(&perfect, std::slice::from_ref(&f));
        assert_eq!(c.scores, 3);
        assert_eq!(c.brier, 0.0);
        assert!(c.brier_base_rate > 0.2);
        // Always one half: a Brier score of a quarter, all in one bin.
        let half = [score("n", 0, 0.5), score("n", 95, 0.5)];
        let c = calibration(&half, &[f]);
        assert!((c.brier - 0.25).abs() < 1e-12);
        assert_eq!(
            c.reliability,
            vec![ReliabilityBin {
                bin: 5,
                scores: 2,
                predicted: 0.5,
                observed: 0.5
            }]
        );
    }

    /// Two entities over one day: `a` fails at minute 1000 after alarms from minute 940 on (one
    /// decision at 950); `b` never fails but raises one alarm at minute 500, acted on.
    #[test]
    fn counts_hits_misses_leads_and_false_alarms() {
        let mut scores = Vec::new();
        for m in (0..1440).step_by(10) {
            let pa = if (940..=1000).contains(&m) { 0.8 } else { 0.05 };
            if m <= 1000 {
                scores.push(score("a", m, pa));
            }
            scores.push(score("b", m, if m == 500 { 0.7 } else { 0.05 }));
        }
        let decisions = vec![
            decision(
                &scores
                    .iter()
                    .find(|s| s.entity.as_str() == "a" && s.time == t(950))
                    .unwrap()
                    .clone(),
            ),
            decision(
                &scores
                    .iter()
                    .find(|s| s.entity.as_str() == "b" && s.time == t(500))
                    .unwrap()
                    .clone(),
            ),
        ];
        let failures = vec![failure("a", 1000), failure("c", 300)];
        let config = BacktestConfig {
            lookback: Delta::minutes(120),
            threshold: 0.6,
        };
        let b = backtest(&scores, &decisions, &[], &failures, &config);
        assert_eq!(b.failures, 2);
        assert_eq!(b.foreseen, 1);
        assert_eq!(b.recall, Some(0.5));
        assert_eq!(b.catches[0].lead_minutes, Some(60.0));
        assert_eq!(b.catches[1].first_alarm, None);
        assert_eq!(b.lead_time.p50, Some(60.0));
        // Alarms at 940..=1000 (7) of which those within 10 min of the failure are true (990,
        // 1000), plus b's false one.
        assert_eq!(b.alarms, 8);
        assert_eq!(b.precision, Some(2.0 / 8.0));
        assert_eq!(b.decisions, 2);
        assert_eq!(b.decision_precision, Some(0.5));
        assert_eq!(b.false_alarms, 1);
        assert_eq!(b.entities, 3);
        assert!((b.days - 1430.0 / 1440.0).abs() < 1e-9);
        assert!((b.false_alarms_per_entity_day - 1.0 / (3.0 * b.days)).abs() < 1e-9);
        assert_eq!(b.actions.get("migrate"), Some(&2));
        // NAB: one window (a's failure; c has no scores), detected at 0.6.
        let standard = &b.nab[0];
        assert_eq!(standard.profile, "standard");
        assert_eq!((standard.windows, standard.windows_detected), (1, 1));
        assert!(standard.at_threshold > 0.0 && standard.at_threshold <= 100.0);
        assert!(standard.best >= standard.at_threshold);
    }

    #[test]
    fn nothing_to_score_gives_empty_numbers() {
        let config = BacktestConfig {
            lookback: Delta::minutes(60),
            threshold: 0.5,
        };
        let b = backtest(&[], &[], &[], &[], &config);
        assert_eq!(b.recall, None);
        assert_eq!(b.precision, None);
        assert!(b.nab.is_empty());
        assert_eq!(b.lead_time, LeadTimes::default());
    }

    #[test]
    fn percentiles_match_postgres() {
        let v = [10.0, 20.0, 30.0, 40.0];
        assert_eq!(percentile_cont(&v, 0.5), Some(25.0));
        assert!((percentile_cont(&v, 0.1).unwrap() - 13.0).abs() < 1e-12);
        assert_eq!(percentile_cont(&[], 0.5), None);
    }
}
