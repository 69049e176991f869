//! Replay: recorded telemetry through the same processors, in this process, into a run directory.

use std::{
    fs::File,
    io::{BufRead, BufReader, BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use foresight_events::{DeadLetter, Event, EventData, Origin};
use serde::Serialize;

use crate::{
    config::Config,
    pipeline::{InProcess, Outputs},
};

/// Counts of a replay, written as `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Input records read.
    pub records: u64,
    /// Samples accepted.
    pub samples: u64,
    /// Scores made.
    pub scores: usize,
    /// Decisions made.
    pub decisions: usize,
    /// Outcomes.
    pub outcomes: usize,
    /// Records rejected.
    pub dead_letters: usize,
}

/// Replays telemetry files (one message per line, any JSON format ingest detects) through the
/// pipeline.
pub fn replay_files(config: &Config, inputs: &[PathBuf]) -> anyhow::Result<(Outputs, u64)> {
    let mut pipeline = InProcess::new(config, false)?;
    let mut records = 0;
    for path in inputs {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let source = path.display().to_string();
        for (line_no, line) in BufReader::new(file).split(b'\n').enumerate() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            records += 1;
            let origin = Origin {
                input: 0,
                partition: 0,
                offset: line_no as i64 + 1,
            };
            pipeline.feed(&line, &source, origin, None);
        }
    }
    Ok((pipeline.finish(), records))
}

fn write_events<T: EventData>(
    dir: &Path,
    name: &str,
    source: &str,
    events: &[T],
) -> anyhow::Result<()> {
    let path = dir.join(name);
    let mut w = BufWriter::new(
        File::create(&path).with_context(|| format!("creating {}", path.display()))?,
    );
    for e in events {
        w.write_all(&Event::new(source, e.clone()).to_json())?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

fn write_dead_letters(dir: &Path, dead: &[DeadLetter]) -> anyhow::Result<()> {
    let mut w = BufWriter::new(File::create(dir.join("dead_letters.jsonl"))?);
    for d in dead {
        #[derive(Serialize)]
        struct Line<'a> {
            #[serde(flatten)]
            dead_letter: &'a DeadLetter,
            payload: String,
        }
        serde_json::to_writer(
            &mut w,
            &Line {
                dead_letter: d,
                payload: String::from_utf8_lossy(&d.payload).into_owned(),
            },
        )?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

/// Writes a run's outputs (JSON lines of CloudEvents envelopes, as on the topics) and a summary.
pub fn write_run(dir: &Path, outputs: &Outputs, records: u64) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_events(dir, "scores.jsonl", "/foresight/scoring", &outputs.scores)?;
    write_events(
        dir,
        "decisions.jsonl",
        "/foresight/allocator",
        &outputs.decisions,
    )?;
    write_events(
        dir,
        "outcomes.jsonl",
        "/foresight/actuator",
        &outputs.outcomes,
    )?;
    write_dead_letters(dir, &outputs.dead_letters)?;
    let summary = Summary {
        records,
        samples: outputs.samples,
        scores: outputs.scores.len(),
        decisions: outputs.decisions.len(),
        outcomes: outputs.outcomes.len(),
        dead_letters: outputs.dead_letters.len(),
    };
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{FleetSpec, generate};

    /// Same inputs and configuration, byte-identical outputs.
    #[test]
    fn replay_is_deterministic() {
        let dir = std::env::temp_dir().join(format!("foresight-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fleet = generate(&FleetSpec {
            nodes: 7,
            hours: 12,
            ..FleetSpec::default()
        });
        let input = dir.join("in.jsonl");
        let lines: Vec<String> = fleet
            .samples
            .iter()
            .map(|s| serde_json::to_string(s).unwrap())
            .collect();
        std::fs::write(&input, lines.join("\n") + "\n{not json}\n").unwrap();
        let config = Config::embedded();
        let mut runs = Vec::new();
        for run in ["a", "b"] {
            let (outputs, records) = replay_files(&config, std::slice::from_ref(&input)).unwrap();
            let summary = write_run(&dir.join(run), &outputs, records).unwrap();
            assert_eq!(summary.dead_letters, 1);
            assert!(summary.scores > 0);
            runs.push(dir.join(run));
        }
        for file in [
            "scores.jsonl",
            "decisions.jsonl",
            "outcomes.jsonl",
            "dead_letters.jsonl",
            "summary.json",
        ] {
            let a = std::fs::read(runs[0].join(file)).unwrap();
            let b = std::fs::read(runs[1].join(file)).unwrap();
            assert!(a == b, "{file} differs between two replays");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
