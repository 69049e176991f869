//! A generated fleet with injected degradations and known failure times, and the numbers that say
//! how early Foresight saw them coming.

use std::{collections::BTreeMap, f64::consts::TAU};

use chrono::{DateTime, Duration as Delta, Utc};
use foresight_events::{Band, Decision, EntityId, FailureReport, MetricSample, RiskScore};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};

/// What to generate.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Nodes in the fleet.
    pub nodes: usize,
    /// Hours of history.
    pub hours: u32,
    /// Seconds between samples.
    pub step_seconds: u32,
    /// Seed: same seed, same fleet.
    pub seed: u64,
    /// First sample time.
    pub start: DateTime<Utc>,
}

impl Default for FleetSpec {
    fn default() -> Self {
        Self {
            nodes: 10,
            hours: 48,
            step_seconds: 60,
            seed: 7,
            start: DateTime::from_timestamp(1_767_225_600, 0).expect("valid"), // 2026-01-01
        }
    }
}

/// A degradation injected into one entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degradation {
    /// Memory use climbs steadily until the node runs out.
    MemoryLeak,
    /// The disk fills until it is full.
    DiskFilling,
    /// Temperature drifts up until thermal shutdown.
    ThermalDrift,
    /// A dependency fails: latency jumps with no warning.
    DependencyOutage,
}

impl Degradation {
    fn failure_kind(self) -> &'static str {
        match self {
            Degradation::MemoryLeak => "oom",
            Degradation::DiskFilling => "disk_full",
            Degradation::ThermalDrift => "thermal_shutdown",
            Degradation::DependencyOutage => "dependency_outage",
        }
    }
}

/// The generated fleet: samples in time order, and the failures that really happened.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Samples, ordered by time.
    pub samples: Vec<MetricSample>,
    /// Failures (the labels).
    pub failures: Vec<FailureReport>,
    /// Which entity got which degradation, from when.
    pub injected: Vec<(EntityId, Degradation, DateTime<Utc>)>,
    /// Every entity.
    pub entities: Vec<EntityId>,
}

struct Series {
    entity: EntityId,
    metric: &'static str,
    base: f64,
    daily_amplitude: f64,
    noise: f64,
    lo: f64,
    hi: f64,
}

/// Generates a fleet: nodes with cpu, memory, disk and temperature (daily seasonality, noise), a
/// few services with p99 latency, and four injected degradations ending in failures.
pub fn generate(spec: &FleetSpec) -> Fleet {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let id = |s: String| EntityId::new(s).expect("generated ids are valid");
    let nodes: Vec<EntityId> = (1..=spec.nodes)
        .map(|i| id(format!("node-{i:02}")))
        .collect();
    let services: Vec<EntityId> = ["svc-checkout", "svc-payments", "svc-search"]
        .into_iter()
        .map(|s| id(s.to_owned()))
        .collect();
    let mut series = Vec::new();
    for node in &nodes {
        let cpu = rng.gen_range(25.0..55.0);
        let mem = rng.gen_range(35.0..60.0);
        let disk = rng.gen_range(30.0..70.0);
        let temp = rng.gen_range(50.0..62.0);
        for (metric, base, amp, noise, lo, hi) in [
            ("cpu_pct", cpu, 15.0, 4.0, 0.0, 100.0),
            ("mem_used_pct", mem, 3.0, 0.8, 0.0, 100.0),
            ("disk_used_pct", disk, 0.0, 0.15, 0.0, 100.0),
            ("temperature_c", temp, 4.0, 0.6, -20.0, 120.0),
        ] {
            series.push(Series {
                entity: node.clone(),
                metric,
                base,
                daily_amplitude: amp,
                noise,
                lo,
                hi,
            });
        }
    }
    for svc in &services {
        let base = rng.gen_range(80.0..160.0);
        series.push(Series {
            entity: svc.clone(),
            metric: "p99_latency_ms",
            base,
            daily_amplitude: base * 0.25,
            noise: base * 0.06,
            lo: 1.0,
            hi: 10_000.0,
        });
    }

    let total_steps = (spec.hours as i64 * 3600) / spec.step_seconds as i64;
    let hour = |h: f64| spec.start + Delta::seconds((h * 3600.0) as i64);
    // Injected degradations: (entity, metric, kind, start hour, hours to failure).
    let pick = |i: usize| nodes[i % nodes.len()].clone();
    let h = spec.hours as f64;
    let plan = [
        (
            pick(2),
            "mem_used_pct",
            Degradation::MemoryLeak,
            0.40 * h,
            0.25 * h,
        ),
        (
            pick(4),
            "disk_used_pct",
            Degradation::DiskFilling,
            0.20 * h,
            0.60 * h,
        ),
        (
            pick(6),
            "temperature_c",
            Degradation::ThermalDrift,
            0.50 * h,
            0.30 * h,
        ),
        (
            services[1].clone(),
            "p99_latency_ms",
            Degradation::DependencyOutage,
            0.70 * h,
            0.0,
        ),
    ];

    let mut samples = Vec::with_capacity(series.len() * total_steps as usize);
    let mut failed: BTreeMap<EntityId, DateTime<Utc>> = BTreeMap::new();
    let mut failures = Vec::new();
    for step in 0..total_steps {
        let t = spec.start + Delta::seconds(step * spec.step_seconds as i64);
        let hours = (step * spec.step_seconds as i64) as f64 / 3600.0;
        let day_phase = (hours / 24.0) * TAU;
        for s in &series {
            if failed.get(&s.entity).is_some_and(|f| *f <= t) {
                continue; // A failed component stops reporting.
            }
            let mut value = s.base + s.daily_amplitude * (day_phase - 1.0).sin();
            value += Normal::new(0.0, s.noise)
                .expect("noise sd > 0")
                .sample(&mut rng);
            for (entity, metric, kind, start_h, ttf_h) in &plan {
                if entity != &s.entity || *metric != s.metric || hours < *start_h {
                    continue;
                }
                let progress = (hours - start_h) / ttf_h.max(1e-9);
                match kind {
                    Degradation::MemoryLeak | Degradation::DiskFilling => {
                        value += (101.0 - s.base) * progress.min(1.2);
                    }
                    Degradation::ThermalDrift => value += (92.0 - s.base) * progress.min(1.2),
                    Degradation::DependencyOutage => {
                        if hours - start_h < 0.5 {
                            value = 900.0 + 100.0 * rng.r#gen::<f64>();
                        }
                    }
                }
            }
            let value = value.clamp(s.lo, s.hi);
            samples.push(MetricSample {
                entity: s.entity.clone(),
                metric: s.metric.to_owned(),
                time: t,
                value,
                labels: Default::default(),
                kind: Default::default(),
            });
            let limit_hit = match s.metric {
                "mem_used_pct" => value >= 99.5,
                "disk_used_pct" => value >= 99.5,
                "temperature_c" => value >= 90.0,
                "p99_latency_ms" => value >= 850.0,
                _ => false,
            };
            if limit_hit && !failed.contains_key(&s.entity) {
                let kind = plan
                    .iter()
                    .find(|p| p.0 == s.entity && p.1 == s.metric)
                    .map(|p| p.2.failure_kind())
                    .unwrap_or("limit_reached");
                failed.insert(s.entity.clone(), t);
                failures.push(FailureReport {
                    entity: s.entity.clone(),
                    time: t,
                    kind: kind.to_owned(),
                    detail: format!("{} reached {value:.1}", s.metric),
                });
            }
        }
    }
    let injected = plan.iter().map(|p| (p.0.clone(), p.2, hour(p.3))).collect();
    let mut entities: Vec<EntityId> = nodes.into_iter().chain(services).collect();
    entities.sort();
    Fleet {
        samples,
        failures,
        injected,
        entities,
    }
}

/// How one failure was seen coming.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureCatch {
    /// The failure.
    pub failure: FailureReport,
    /// When the entity's score first reached the high band before the failure (within the lookback).
    pub first_high: Option<DateTime<Utc>>,
    /// The first decision about the entity before the failure (within the lookback).
    pub first_decision: Option<Decision>,
}

impl FailureCatch {
    /// How long before the failure the high band was reached.
    pub fn lead_time(&self) -> Option<Delta> {
        self.first_high.map(|t| self.failure.time - t)
    }
}

/// Headline numbers of a run against known failures.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// One row per failure.
    pub catches: Vec<FailureCatch>,
    /// Decisions about entities that did not fail within the score horizon afterwards.
    pub false_alarm_decisions: usize,
    /// False alarms per entity per day.
    pub false_alarms_per_entity_day: f64,
    /// Calibration of the scores against what happened: each score's probability against whether
    /// its entity failed within the score's horizon after it (scores after an entity's failure are
    /// left out: it had already failed).
    pub calibration: Calibration,
}

/// How well probabilities match frequencies.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Scores compared.
    pub scores: usize,
    /// Mean squared error of the probability against the outcome (0 or 1): 0 is perfect.
    pub brier: f64,
    /// The Brier score of always predicting the observed base rate, for reference.
    pub brier_base_rate: f64,
    /// Reliability diagram: for probability bins `[i/10, (i+1)/10)`, (bin, scores in it, mean
    /// predicted probability, observed failure frequency); empty bins are left out.
    pub reliability: Vec<(usize, usize, f64, f64)>,
}

/// Compares each score's probability with whether its entity failed within its horizon.
pub fn calibration(scores: &[RiskScore], failures: &[FailureReport]) -> Calibration {
    let mut pairs = Vec::new();
    for s in scores {
        let horizon = Delta::seconds(s.horizon_seconds as i64);
        let mine = || failures.iter().filter(|f| f.entity == s.entity);
        if mine().any(|f| f.time < s.time) {
            continue;
        }
        let failed = mine().any(|f| f.time <= s.time + horizon);
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
        .map(|(i, b)| (i, b.0, b.1 / b.0 as f64, b.2 / b.0 as f64))
        .collect();
    Calibration {
        scores: pairs.len(),
        brier,
        brier_base_rate,
        reliability,
    }
}

/// Compares scores and decisions with the failures that happened. A high-band score or a decision
/// counts for a failure if it came within `lookback` before it; a decision is a false alarm if its
/// entity did not fail within the score's horizon after it.
pub fn evaluate(
    scores: &[RiskScore],
    decisions: &[Decision],
    failures: &[FailureReport],
    lookback: Delta,
    entities: usize,
    days: f64,
) -> Evaluation {
    let catches = failures
        .iter()
        .map(|f| {
            let in_window = |entity: &EntityId, t: DateTime<Utc>| {
                entity == &f.entity && t <= f.time && t >= f.time - lookback
            };
            FailureCatch {
                failure: f.clone(),
                first_high: scores
                    .iter()
                    .filter(|s| s.band == Band::High && in_window(&s.entity, s.time))
                    .map(|s| s.time)
                    .min(),
                first_decision: decisions
                    .iter()
                    .filter(|d| in_window(&d.entity, d.time))
                    .min_by_key(|d| d.time)
                    .cloned(),
            }
        })
        .collect();
    let horizon: BTreeMap<_, _> = scores
        .iter()
        .map(|s| (s.entity.clone(), s.horizon_seconds))
        .collect();
    let false_alarm_decisions = decisions
        .iter()
        .filter(|d| {
            let h = Delta::seconds(horizon.get(&d.entity).copied().unwrap_or(0) as i64);
            !failures.iter().any(|f| {
                f.entity == d.entity && f.time >= d.time && f.time <= d.time + h + lookback
            })
        })
        .count();
    Evaluation {
        calibration: calibration(scores, failures),
        catches,
        false_alarm_decisions,
        false_alarms_per_entity_day: false_alarm_decisions as f64
            / (entities as f64 * days).max(1e-9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_fails_where_injected() {
        let spec = FleetSpec {
            nodes: 8,
            hours: 24,
            ..FleetSpec::default()
        };
        let a = generate(&spec);
        let b = generate(&spec);
        assert_eq!(a.samples, b.samples);
        let kinds: Vec<_> = a.failures.iter().map(|f| f.kind.as_str()).collect();
        for kind in ["oom", "thermal_shutdown", "dependency_outage"] {
            assert!(kinds.contains(&kind), "{kinds:?}");
        }
        // Failed components stop reporting.
        for f in &a.failures {
            assert!(
                !a.samples
                    .iter()
                    .any(|s| s.entity == f.entity && s.time > f.time)
            );
        }
    }

    #[test]
    fn calibration_scores_probabilities_against_outcomes() {
        let t = |m: i64| DateTime::<Utc>::from_timestamp(m * 60, 0).unwrap();
        let e = EntityId::new("n").unwrap();
        let score = |minute: i64, p: f64| RiskScore {
            entity: e.clone(),
            time: t(minute),
            window_id: foresight_events::EventId::derive("w", &[&minute.to_le_bytes()]),
            horizon_seconds: 600,
            probability: p,
            lower: p,
            upper: p,
            time_to_failure_seconds: None,
            health: 100.0 * (1.0 - p),
            band: Band::Low,
            contributors: Vec::new(),
            method: foresight_events::ScoreMethod::Prior,
            model_version: "t".into(),
            signals: Default::default(),
            observed: Default::default(),
            blast_radius: vec![],
            impact: 1.0,
            rank: None,
        };
        let failure = FailureReport {
            entity: e.clone(),
            time: t(100),
            kind: "crash".into(),
            detail: String::new(),
        };
        // Certain and right: 0 before the horizon reaches the failure, 1 within it; the score
        // after the failure is left out.
        let perfect = [
            score(0, 0.0),
            score(50, 0.0),
            score(95, 1.0),
            score(120, 0.3),
        ];
        let c = calibration(&perfect, std::slice::from_ref(&failure));
        assert_eq!(c.scores, 3);
        assert_eq!(c.brier, 0.0);
        assert!(c.brier_base_rate > 0.2);
        // Always one half: a Brier score of a quarter, all in one bin.
        let half = [score(0, 0.5), score(95, 0.5)];
        let c = calibration(&half, &[failure]);
        assert!((c.brier - 0.25).abs() < 1e-12);
        assert_eq!(c.reliability, vec![(5, 2, 0.5, 0.5)]);
    }
}
