//! Fuzzes the otlp_json decoder: any bytes must decode to telemetry or rejections, never panic.
#![no_main]

use foresight_ingest::{Decoder, Format, IngestConfig, Signal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoder = Decoder::new(IngestConfig::default());
    let out = decoder.decode(data, Format::OtlpJson, Signal::Metrics, None, None);
    // Whatever is accepted passed validation.
    for t in &out.telemetry {
        if let foresight_ingest::Telemetry::Sample(s) = t {
            assert!(s.value.is_finite() && !s.metric.is_empty());
        }
    }
});
