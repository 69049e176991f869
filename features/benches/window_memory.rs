//! Memory of the windowing state: 10,000 entities x 8 metrics scraped every 10 s into one-minute
//! windows (the defaults). A heap profiler's allocator (dhat) counts the bytes the processor's
//! state holds between scrapes (open panes, per-metric history, maps); the peak is divided by the
//! entity-metrics tracked. The target is at most 2 KiB per entity-metric, the history the scorer
//! forecasts from included.
//!
//! `cargo bench -p foresight-features --bench window_memory -- --bench` measures the full fleet;
//! without `--bench` (under `cargo test --benches`) a small one.

use foresight_events::{Origin, Processor};
use foresight_features::{FeaturesConfig, WindowProcessor};
use support::{METRICS, entities, stream};

mod support;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    let (n_entities, steps) = if support::full() {
        (10_000, 30)
    } else {
        (500, 12)
    };
    let entities = entities(n_entities);
    // Feed the stream one scrape at a time and look at the state between scrapes.
    let _profiler = dhat::Profiler::builder().testing().build();
    let allocated = || dhat::HeapStats::get().curr_bytes as isize;
    let mut p = WindowProcessor::new(FeaturesConfig::default()).unwrap();
    let mut out = Vec::new();
    let before = allocated();
    let mut peak = 0isize;
    let mut offset = 0;
    for step in 0..steps {
        for item in stream(&entities, 1, step) {
            p.process(
                item,
                Origin {
                    input: 0,
                    partition: 0,
                    offset,
                },
                &mut out,
            );
            offset += 1;
        }
        out.clear();
        out.shrink_to_fit();
        // The scrape's buffer is freed by now: what is left is the processor's state.
        peak = peak.max(allocated() - before);
    }
    let footprint = p.footprint();
    let per = peak as f64 / footprint.entity_metrics as f64;
    println!(
        "| window state, {n_entities} entities x {} metrics, 1-minute windows | {} entity-metrics | peak {:.1} MiB | {per:.0} bytes per entity-metric (history of {} window means included) |",
        METRICS.len(),
        footprint.entity_metrics,
        peak as f64 / (1024.0 * 1024.0),
        FeaturesConfig::default().history,
    );
    assert!(
        per <= 2048.0,
        "{per:.0} bytes per entity-metric exceeds the 2 KiB target"
    );
}
