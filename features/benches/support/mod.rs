//! The benchmarks' shared workload: a fleet scraped every 10 s.

use chrono::DateTime;
use foresight_events::{EntityId, MetricKind, MetricSample, Telemetry};

/// Whether the benchmark measures (`--bench`) or only runs a small case once.
pub(crate) fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// `n` entity ids like a cloud fleet's host names.
pub(crate) fn entities(n: usize) -> Vec<EntityId> {
    (0..n)
        .map(|i| EntityId::new(format!("node-{i:05}.eu-west-1.compute.internal")).unwrap())
        .collect()
}

/// Metrics per entity; the last is a counter.
pub(crate) const METRICS: [&str; 8] = [
    "cpu_pct",
    "mem_used_pct",
    "disk_used_pct",
    "disk_io_ms",
    "net_latency_ms",
    "error_rate",
    "temperature_c",
    "requests_total",
];

/// The samples of `steps` scrapes (10 s apart) of every metric of every entity, in time order.
pub(crate) fn stream(entities: &[EntityId], steps: i64, from: i64) -> Vec<Telemetry> {
    let mut out = Vec::with_capacity(entities.len() * METRICS.len() * steps as usize);
    for step in from..from + steps {
        let time = DateTime::from_timestamp(1_767_225_600 + step * 10, 0).unwrap();
        for (e, entity) in entities.iter().enumerate() {
            for (m, metric) in METRICS.iter().enumerate() {
                let counter = m == METRICS.len() - 1;
                out.push(Telemetry::Sample(MetricSample {
                    entity: entity.clone(),
                    metric: (*metric).to_owned(),
                    time,
                    value: if counter {
                        (step * 17 + e as i64) as f64
                    } else {
                        50.0 + ((step * 7 + e as i64 * 3 + m as i64) % 40) as f64 * 0.5
                    },
                    labels: Default::default(),
                    kind: if counter {
                        MetricKind::Counter
                    } else {
                        MetricKind::Gauge
                    },
                }));
            }
        }
    }
    out
}
