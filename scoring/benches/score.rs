//! Scoring throughput in steady state: 500 entities x 8 metrics (3 of them with a declared
//! threshold, so forecast), one-minute windows carrying 40-64 windows of history, every signal
//! on (forecast breach with scheduled and drift refits, anomaly, changepoint, logs). Reported as
//! entity-metric series scored per minute on one core, against a baseline measured in the same
//! run: fitting AutoETS to every thresholded series at every window (what scoring would cost
//! without amortised refits). Also reports the AutoETS fit time per series, and the size of a
//! checkpoint of every series' state.
//!
//! `cargo bench -p foresight-scoring --bench score -- --bench` measures; without `--bench`
//! (under `cargo test --benches`) it runs a small case once, so the benchmark cannot rot.

use std::{hint::black_box, time::Instant};

use augurs::{Predict, ets::AutoETS, prelude::Fit};
use chrono::{DateTime, Duration};
use foresight_events::{EntityId, FeatureWindow, MetricStats, Origin, Processor, StateChange};
use foresight_scoring::{Scorer, ScoringConfig, Threshold};

const METRICS: [&str; 8] = [
    "cpu_pct",
    "mem_used_pct",
    "disk_used_pct",
    "disk_io_ms",
    "net_latency_ms",
    "error_rate",
    "temperature_c",
    "requests_per_s",
];
const THRESHOLDED: usize = 3;

fn value(entity: usize, metric: usize, t: usize) -> f64 {
    // A daily-ish cycle, a slow trend and deterministic noise, different per series.
    let phase = (entity * 7 + metric * 13) as f64;
    let x = (entity as u64 * 1_000_003 + metric as u64 * 10_007 + t as u64)
        .wrapping_mul(6364136223846793005)
        >> 33;
    let noise = (x % 1000) as f64 / 1000.0 - 0.5;
    40.0 + 10.0 * ((t as f64 + phase) / 30.0).sin() + 0.01 * t as f64 + 2.0 * noise
}

fn window(entities: &[EntityId], e: usize, t: usize) -> FeatureWindow {
    let end = DateTime::from_timestamp(t as i64 * 60, 0).unwrap();
    let metrics = METRICS
        .iter()
        .enumerate()
        .map(|(m, name)| {
            let from = t.saturating_sub(63);
            let history: Vec<f64> = (from..=t).map(|i| value(e, m, i)).collect();
            let mean = *history.last().unwrap();
            let stats = MetricStats {
                count: 6,
                mean,
                min: mean - 1.0,
                max: mean + 1.0,
                last: mean,
                std_dev: 0.5,
                p50: mean,
                p95: mean + 0.8,
                p99: mean + 0.9,
                slope_per_s: 0.0,
                rate_per_s: None,
                resets: 0,
                ewma: mean,
                history,
                gap_windows: 0,
            };
            (name.to_string(), stats)
        })
        .collect();
    FeatureWindow {
        entity: entities[e].clone(),
        start: end - Duration::seconds(60),
        end,
        metrics,
        logs: None,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (n_entities, warmup, measured) = if full { (500, 12, 48) } else { (10, 2, 3) };
    let entities: Vec<EntityId> = (0..n_entities)
        .map(|i| EntityId::new(format!("node-{i:05}")).unwrap())
        .collect();
    let config = ScoringConfig {
        thresholds: METRICS[..THRESHOLDED]
            .iter()
            .map(|m| Threshold {
                metric: m.to_string(),
                above: Some(95.0),
                below: None,
            })
            .collect(),
        ..ScoringConfig::default()
    };
    let mut scorer = Scorer::new(config.clone()).unwrap();
    let first = 40;
    let origin = Origin {
        input: 0,
        partition: 0,
        offset: 0,
    };
    let mut out = Vec::new();
    // Warm-up (not measured): every series met, warmed up and fitted once.
    for t in first..first + warmup {
        for e in 0..n_entities {
            scorer.process(window(&entities, e, t), origin, &mut out);
        }
        out.clear();
    }
    let inputs: Vec<FeatureWindow> = (first + warmup..first + warmup + measured)
        .flat_map(|t| (0..n_entities).map(move |e| (t, e)))
        .map(|(t, e)| window(&entities, e, t))
        .collect();
    let fits_before = scorer.fits();
    let started = Instant::now();
    let mut scores = 0;
    for w in inputs {
        scorer.process(w, origin, &mut out);
        scores += out.len();
        out.clear();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let series = (n_entities * METRICS.len() * measured) as f64;
    let refits = scorer.fits() - fits_before;
    black_box(scores);
    // What a checkpoint of every series costs (each series changes once per window, so this is
    // what the scoring stage writes to Postgres per window interval), and its time.
    let started = Instant::now();
    let changes = scorer.checkpoint(0);
    let checkpoint_s = started.elapsed().as_secs_f64();
    let bytes: usize = changes
        .iter()
        .map(|c| match c {
            StateChange::Put { key, value } => key.len() + value.len(),
            StateChange::Delete { key } => key.len(),
        })
        .sum();
    let per_series = bytes as f64 / scorer.series() as f64;
    println!(
        "scoring checkpoint: {} series, {:.1} KiB per series, {:.1} MiB in all, taken in {:.0} ms",
        scorer.series(),
        per_series / 1024.0,
        bytes as f64 / (1024.0 * 1024.0),
        checkpoint_s * 1e3
    );

    // Baseline: a fresh AutoETS fit and forecast of a thresholded series' history, every window.
    let model = AutoETS::new(1, "AZN").unwrap();
    let sample = if full { 2_000 } else { 10 };
    let histories: Vec<Vec<f64>> = (0..sample)
        .map(|i| {
            let t = first + warmup + i % measured;
            let from = (t + 1).saturating_sub(config.max_fit_points);
            (from..=t).map(|j| value(i, i % THRESHOLDED, j)).collect()
        })
        .collect();
    let started = Instant::now();
    for h in &histories {
        let fitted = model.fit(h).unwrap();
        black_box(fitted.predict(30, config.level).unwrap());
    }
    let fit_s = started.elapsed().as_secs_f64() / sample as f64;
    // Without amortised refits, every window fits each thresholded series and scores the rest.
    let per_window_ours = elapsed / (n_entities * measured) as f64;
    let baseline_series_per_min =
        METRICS.len() as f64 / (per_window_ours + THRESHOLDED as f64 * fit_s) * 60.0;
    let ours_per_min = series / elapsed * 60.0;
    println!(
        "scoring: {n_entities} entities x {} metrics, {measured} windows: {:.0} series/min \
         ({refits} refits of {} forecasts, {:.1} %); AutoETS fit+forecast {:.0} us per series; \
         fitting every window would give {:.0} series/min; ratio {:.2}",
        METRICS.len(),
        ours_per_min,
        n_entities * THRESHOLDED * measured,
        100.0 * refits as f64 / (n_entities * THRESHOLDED * measured) as f64,
        fit_s * 1e6,
        baseline_series_per_min,
        ours_per_min / baseline_series_per_min,
    );
}
