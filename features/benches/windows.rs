//! Windowing throughput: 10,000 entities x 8 metrics, one sample per metric every 10 s,
//! one-minute windows (the defaults), against a baseline measured in the same run: a plain
//! `HashMap` of `Vec`s that only appends each value under its (entity, metric). The memory this
//! state takes is measured by the `window_memory` benchmark.
//!
//! `cargo bench -p foresight-features --bench windows -- --bench` measures; without `--bench`
//! (under `cargo test --benches`) it runs a small case once, so the benchmark cannot rot.

use std::{collections::HashMap, hint::black_box, time::Instant};

use foresight_events::{EntityId, Origin, Processor, Telemetry};
use foresight_features::{FeaturesConfig, WindowProcessor};
use support::{METRICS, entities, stream};

mod support;

fn main() {
    let (n_entities, steps, rounds) = if support::full() {
        (10_000, 30, 5)
    } else {
        (500, 12, 1)
    };
    let entities = entities(n_entities);
    let samples = (n_entities * METRICS.len()) as i64 * steps;

    let mut baseline = Vec::new();
    let mut ours = Vec::new();
    let mut windows = 0usize;
    for _ in 0..rounds {
        let input = stream(&entities, steps, 0);
        let t = Instant::now();
        let mut map: HashMap<(EntityId, String), Vec<f64>> = HashMap::new();
        for item in input {
            if let Telemetry::Sample(s) = item {
                map.entry((s.entity, s.metric)).or_default().push(s.value);
            }
        }
        black_box(&map);
        baseline.push(samples as f64 / t.elapsed().as_secs_f64());
        drop(map);

        let input = stream(&entities, steps, 0);
        let t = Instant::now();
        let mut p = WindowProcessor::new(FeaturesConfig::default()).unwrap();
        let mut out = Vec::new();
        for (i, item) in input.into_iter().enumerate() {
            let origin = Origin {
                input: 0,
                partition: 0,
                offset: i as i64,
            };
            p.process(item, origin, &mut out);
            if out.len() >= 1024 {
                windows += out.len();
                out.clear();
            }
        }
        windows += out.len();
        black_box(&out);
        ours.push(samples as f64 / t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, o) = (median(&mut baseline), median(&mut ours));
    assert!(windows > 0, "windows were emitted");

    println!("| case | baseline | baseline samples/s | ours samples/s | ratio (ours / baseline) |");
    println!("|---|---|---|---|---|");
    println!(
        "| windowing, {n_entities} entities x {} metrics, 1-minute windows | HashMap<(entity, metric), Vec<f64>> append | {b:.0} | {o:.0} | {:.2} |",
        METRICS.len(),
        o / b
    );
}
