//! Decode + validate + normalise throughput, each against a baseline measured in the same run:
//! native JSON against `serde_json` parsing the same bytes into untyped values, and OTLP protobuf
//! against `prost` decoding the same bytes into the generated request type.
//!
//! `cargo bench -p foresight-ingest --bench decode` measures; without `--bench` (e.g. under
//! `cargo test --benches`) it runs each case briefly, so the benchmark cannot rot.

use std::{hint::black_box, time::Instant};

use foresight_ingest::{Decoder, Format, IngestConfig, Signal};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
    metrics::v1::{
        Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, metric, number_data_point,
    },
    resource::v1::Resource,
};
use prost::Message as _;

/// Runs `f` (which processes `items` items) in alternating rounds with the baseline and returns
/// the median items per second of each.
fn compare(
    rounds: usize,
    items: u64,
    mut baseline: impl FnMut(),
    mut ours: impl FnMut(),
) -> (f64, f64) {
    let mut b = Vec::new();
    let mut o = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        baseline();
        b.push(items as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        ours();
        o.push(items as f64 / t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut b), median(&mut o))
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, repeat) = if full { (15, 20) } else { (1, 1) };
    let decoder = Decoder::new(IngestConfig::default());
    println!("| case | baseline | baseline items/s | ours items/s | ratio (ours / baseline) |");
    println!("|---|---|---|---|---|");

    // Native JSON: 10,000 single-sample messages of about 150 bytes.
    let messages: Vec<Vec<u8>> = (0..10_000)
        .map(|i| {
            format!(
                r#"{{"entity":"node-{:04}.eu-west-1.compute.internal","metric":"disk_used_pct","time":"2026-01-01T00:{:02}:{:02}Z","value":{}.25,"labels":{{"zone":"a"}}}}"#,
                i % 1000, (i / 60) % 60, i % 60, i % 100
            )
            .into_bytes()
        })
        .collect();
    let avg = messages.iter().map(Vec::len).sum::<usize>() / messages.len();
    let n = (messages.len() * repeat) as u64;
    let (b, o) = compare(
        rounds,
        n,
        || {
            for _ in 0..repeat {
                for m in &messages {
                    black_box(serde_json::from_slice::<serde_json::Value>(black_box(m)).unwrap());
                }
            }
        },
        || {
            for _ in 0..repeat {
                for m in &messages {
                    let d =
                        decoder.decode(black_box(m), Format::Native, Signal::Metrics, None, None);
                    assert_eq!(d.telemetry.len(), 1);
                    black_box(d);
                }
            }
        },
    );
    println!(
        "| native JSON, {avg}-byte samples | serde_json::Value | {b:.0} | {o:.0} | {:.2} |",
        o / b
    );

    // OTLP protobuf: requests of 1,000 gauge points each (100 hosts x 10 metrics).
    let request = ExportMetricsServiceRequest {
        resource_metrics: (0..100)
            .map(|h| ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![
                        kv("host.name", &format!("host-{h}")),
                        kv("service.name", "node"),
                    ],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: (0..10)
                        .map(|m| Metric {
                            name: format!("system.metric_{m}"),
                            data: Some(metric::Data::Gauge(Gauge {
                                data_points: vec![NumberDataPoint {
                                    time_unix_nano: 1_767_225_600_000_000_000 + h as u64,
                                    value: Some(number_data_point::Value::AsDouble(m as f64 * 1.5)),
                                    attributes: vec![kv("state", "used")],
                                    ..Default::default()
                                }],
                            })),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    };
    let bytes = request.encode_to_vec();
    let reps = 20 * repeat;
    let points = (1000 * reps) as u64;
    let (b, o) = compare(
        rounds,
        points,
        || {
            for _ in 0..reps {
                black_box(
                    ExportMetricsServiceRequest::decode(black_box(bytes.as_slice())).unwrap(),
                );
            }
        },
        || {
            for _ in 0..reps {
                let d = decoder.decode(
                    black_box(&bytes),
                    Format::OtlpProto,
                    Signal::Metrics,
                    None,
                    None,
                );
                assert_eq!(d.telemetry.len(), 1000);
                black_box(d);
            }
        },
    );
    println!(
        "| OTLP protobuf, 1,000-point requests | prost decode | {b:.0} | {o:.0} | {:.2} |",
        o / b
    );
}
