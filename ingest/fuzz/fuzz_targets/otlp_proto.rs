//! Fuzzes the OTLP protobuf decoder for all three signals: any bytes must decode to telemetry or
//! rejections, never panic.
#![no_main]

use foresight_ingest::{Decoder, Format, IngestConfig, Signal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoder = Decoder::new(IngestConfig::default());
    for signal in [Signal::Metrics, Signal::Logs, Signal::Traces] {
        let _ = decoder.decode(data, Format::OtlpProto, signal, None, None);
    }
});
