//! Replay throughput, end to end in this process on one core, against only reading and parsing
//! the same file.
//!
//! A file of native-JSON samples (1,000 entities x 10 metrics, one sample per series per minute:
//! 10,000,000 samples, about 16.7 hours) is written once; then, in the same run:
//! - (a) **read + parse**: every line read and decoded by ingest's decoder into telemetry;
//! - (b) **replay**: `foresight replay` on it: ingest, features, scoring, fleet, allocator,
//!   dry-run actuator, with the embedded configuration; and writing the run directory.
//!
//! It prints samples/s of both and their ratio (machines are shared and noisy: the ratio is the
//! number to compare). `cargo bench -p foresight --bench replay`; `FORESIGHT_BENCH_SAMPLES`
//! changes the size. Under `cargo test` (no `--bench`) it runs a quick round of 20,000 samples so
//! it cannot rot (20 entities, so that it gets past the scorer's warm-up).

use std::{
    fs::File,
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    path::Path,
    time::Instant,
};

use foresight::{Config, replay};
use foresight_ingest::{Decoder, Format, Signal};

/// Entities of the full run; the quick round has 20 (so its 20,000 samples span 100 minutes and
/// get scored).
const ENTITIES: usize = 1_000;
const METRICS: [(&str, f64, f64); 10] = [
    ("cpu_pct", 45.0, 12.0),
    ("mem_used_pct", 55.0, 4.0),
    ("disk_used_pct", 60.0, 0.5),
    ("temperature_c", 55.0, 3.0),
    ("p99_latency_ms", 120.0, 20.0),
    ("net_rx_mbps", 300.0, 80.0),
    ("net_tx_mbps", 250.0, 70.0),
    ("io_wait_pct", 3.0, 1.0),
    ("load1", 2.0, 0.6),
    ("open_fds", 900.0, 60.0),
];

/// Writes `samples` native-JSON lines: every series one sample per minute, in time order, with
/// daily seasonality and deterministic noise; a few entities drift towards their limits.
fn generate(path: &Path, entities: usize, samples: usize) -> std::io::Result<usize> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let start_ms: i64 = 1_767_225_600_000; // 2026-01-01
    let per_step = entities * METRICS.len();
    let steps = samples.div_ceil(per_step);
    let mut written = 0;
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = || {
        // xorshift: fast, portable, deterministic.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let mut line = String::with_capacity(128);
    for step in 0..steps {
        let t = start_ms + step as i64 * 60_000;
        let day = (step as f64 / 1440.0) * std::f64::consts::TAU;
        for e in 0..entities {
            for (m, (name, base, amp)) in METRICS.iter().enumerate() {
                if written == samples {
                    break;
                }
                let drift = if e % 97 == 0 && m == 2 {
                    step as f64 * 0.04
                } else {
                    0.0
                };
                let value = base + amp * (day + e as f64).sin() + amp * 0.3 * noise() + drift;
                line.clear();
                use std::fmt::Write as _;
                let _ = writeln!(
                    line,
                    "{{\"entity\":\"node-{e:04}\",\"metric\":\"{name}\",\"time\":{t},\"value\":{value:.3}}}"
                );
                w.write_all(line.as_bytes())?;
                written += 1;
            }
        }
    }
    w.flush()?;
    Ok(written)
}

/// (a) Reads and decodes every line; returns the samples decoded.
fn read_and_parse(path: &Path) -> u64 {
    let decoder = Decoder::new(Config::embedded().ingest);
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path).expect("bench file"));
    let mut line = Vec::with_capacity(256);
    let mut samples = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).expect("read") == 0 {
            break;
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let d = decoder.decode(body, Format::Auto, Signal::Metrics, None, None);
        samples += d.telemetry.len() as u64;
        std::hint::black_box(&d);
    }
    samples
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let samples: usize = std::env::var("FORESIGHT_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 10_000_000 } else { 20_000 });
    let dir = std::env::temp_dir().join(format!("foresight-bench-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    let input = dir.join("samples.jsonl");
    let started = Instant::now();
    let entities = if bench { ENTITIES } else { 20 };
    let n = generate(&input, entities, samples).expect("generate");
    let bytes = std::fs::metadata(&input).map(|m| m.len()).unwrap_or(0);
    println!(
        "replay: {n} samples ({entities} entities x {} metrics), {:.0} MB, generated in {:.1?}",
        METRICS.len(),
        bytes as f64 / 1e6,
        started.elapsed()
    );

    // One core: a current-thread runtime, and the pipeline is single-threaded.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config = Config::embedded();

    let t = Instant::now();
    let parsed = read_and_parse(&input);
    let parse_s = t.elapsed().as_secs_f64();
    assert_eq!(parsed, n as u64);

    let t = Instant::now();
    let run = rt
        .block_on(replay::replay(
            &config,
            std::slice::from_ref(&input),
            &replay::ReplayOptions::default(),
        ))
        .expect("replay");
    let pipeline_s = t.elapsed().as_secs_f64();
    let summary = replay::write_run(&dir.join("run"), &run, None).expect("run dir");
    let replay_s = t.elapsed().as_secs_f64();
    assert_eq!(summary.samples, n as u64);
    assert_eq!(summary.dead_letters, 0);
    assert!(summary.scores > 0, "{summary:?}");

    let rate = |s: f64| n as f64 / s.max(1e-9);
    println!(
        "replay: (a) read + parse      {:>10.0} samples/s ({parse_s:.2} s)",
        rate(parse_s)
    );
    println!(
        "replay: (b) replay            {:>10.0} samples/s ({pipeline_s:.2} s; {} scores, {} decisions)",
        rate(pipeline_s),
        summary.scores,
        summary.decisions
    );
    println!(
        "replay: (b') + run directory  {:>10.0} samples/s ({replay_s:.2} s)",
        rate(replay_s)
    );
    println!(
        "replay: ratio replay / read+parse = {:.3}; end to end (with the run directory) {:.3}",
        parse_s / pipeline_s,
        parse_s / replay_s
    );
    std::fs::remove_dir_all(&dir).ok();
}
