//! What tracing costs a stage per input: reading the input's `traceparent`, opening the
//! `stage.process` span and writing the outputs' `traceparent` header, against the baseline of
//! decoding one native-JSON metric sample (the least work a stage does per input). Spans are not
//! exported here (no OTLP endpoint); logs go through the same `fmt` subscriber as `foresight run`,
//! to a sink.
//!
//! `cargo bench -p foresight --bench trace_context`; the ratio of the two is in
//! docs/benchmarks.md.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use foresight::telemetry;
use foresight_ingest::{Decoder, Format, IngestConfig, Signal};
use rdkafka::message::{Header, OwnedHeaders};

fn per_input(c: &mut Criterion) {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::sink)
        .init();
    let sample =
        br#"{"entity":"node-07","metric":"cpu_pct","time":"2026-01-01T00:00:00Z","value":41.5}"#;
    let decoder = Decoder::new(IngestConfig::default());
    let time = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:10Z")
        .unwrap()
        .to_utc();
    let parent = telemetry::new_traceparent();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "content-type",
            value: Some("application/json"),
        })
        .insert(Header {
            key: telemetry::TRACEPARENT,
            value: Some(parent.as_str()),
        });
    let headers = headers.as_borrowed();

    let mut group = c.benchmark_group("per_input");
    group.bench_function("baseline: decode one JSON sample", |b| {
        b.iter(|| {
            black_box(decoder.decode(
                black_box(sample),
                Format::Auto,
                Signal::Metrics,
                Some("application/json"),
                Some(time),
            ))
        })
    });
    group.bench_function("trace context: extract, span, traceparent", |b| {
        b.iter(|| {
            let parent = telemetry::extract(Some(black_box(headers)));
            let span =
                telemetry::input_span("features", "foresight.telemetry.metrics", 2, 12345, &parent);
            let traceparent = telemetry::traceparent(&span, &parent);
            drop(span);
            let out = OwnedHeaders::new().insert(Header {
                key: telemetry::TRACEPARENT,
                value: Some(traceparent.as_str()),
            });
            black_box(out)
        })
    });
    group.finish();
}

criterion_group!(benches, per_input);
criterion_main!(benches);
