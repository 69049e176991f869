//! `foresight policy check FILE --scores SCORES.jsonl`: validates an allocation policy and
//! prints what it would decide on a file of scores, with the same allocator the pipeline runs.

use std::{
    fmt::Write as _,
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use anyhow::Context as _;
use foresight_allocator::{Allocator, AllocatorInput, Policy};
use foresight_events::{
    Decision, Event, FailureReport, GraphConfig, Inventory, InventoryUpdate, Origin, Output,
    Processor, RiskScore,
};

/// What a check found.
#[derive(Debug)]
pub struct Report {
    /// The policy's problems (empty: valid).
    pub errors: Vec<String>,
    /// Decisions it made on the inputs, in order.
    pub decisions: Vec<Decision>,
    /// Inputs read.
    pub inputs: usize,
}

/// One line of the input file: a score, a failure or an inventory update, each as an event
/// envelope (as on the topics and in replay outputs) or as the bare payload.
fn parse_line(line: &[u8]) -> anyhow::Result<AllocatorInput> {
    let value: serde_json::Value = serde_json::from_slice(line)?;
    let kind = value.get("type").and_then(|t| t.as_str()).unwrap_or("");
    if kind.ends_with("failure_report") {
        return Ok(AllocatorInput::Failure(
            Event::<FailureReport>::from_json(line)?.data,
        ));
    }
    if kind.ends_with("inventory_update") {
        return Ok(AllocatorInput::Inventory(
            Event::<InventoryUpdate>::from_json(line)?.data,
        ));
    }
    if value.get("specversion").is_some() {
        return Ok(AllocatorInput::Score(
            Event::<RiskScore>::from_json(line)?.data,
        ));
    }
    // Bare payloads: whichever type the fields fit.
    if let Ok(s) = serde_json::from_value::<RiskScore>(value.clone()) {
        return Ok(AllocatorInput::Score(s));
    }
    if let Ok(f) = serde_json::from_value::<FailureReport>(value.clone()) {
        return Ok(AllocatorInput::Failure(f));
    }
    Ok(AllocatorInput::Inventory(serde_json::from_value(value)?))
}

/// Validates `policy_file` and, if it is valid and `scores` is given, runs it over them.
pub fn check(
    policy_file: &Path,
    scores: Option<&Path>,
    inventory: &Inventory,
    graph: GraphConfig,
) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(policy_file)
        .with_context(|| format!("reading {}", policy_file.display()))?;
    let policy = match Policy::from_yaml(&text) {
        Ok(p) => p,
        Err(errors) => {
            return Ok(Report {
                errors: errors
                    .iter()
                    .map(|e| format!("{}: {e}", policy_file.display()))
                    .collect(),
                decisions: Vec::new(),
                inputs: 0,
            });
        }
    };
    let mut allocator = Allocator::new(policy, inventory, graph).map_err(|errors| {
        anyhow::anyhow!(
            "{}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let mut out = Vec::new();
    let mut inputs = 0;
    if let Some(path) = scores {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
            let line = line?;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let input =
                parse_line(&line).with_context(|| format!("{}, line {}", path.display(), n + 1))?;
            inputs += 1;
            let origin = Origin {
                input: 0,
                partition: 0,
                offset: n as i64,
            };
            allocator.process(input, origin, &mut out);
        }
        allocator.flush(&mut out);
    }
    let mut errors = Vec::new();
    let decisions = out
        .into_iter()
        .filter_map(|o| match o {
            Output::Event(d) => Some(d),
            Output::Rejected(r) => {
                errors.push(format!("input refused: {}", r.reason));
                None
            }
        })
        .collect();
    Ok(Report {
        errors,
        decisions,
        inputs,
    })
}

/// The report as text: one line per decision, its alternatives indented below it.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    for e in &report.errors {
        let _ = writeln!(s, "error: {e}");
    }
    for d in &report.decisions {
        let _ = writeln!(
            s,
            "{} {} {} {} {} (rule {}, P={:.3} [{:.3}, {:.3}]): {}",
            d.time.format("%Y-%m-%dT%H:%M:%SZ"),
            d.entity,
            d.action.kind.as_str(),
            d.action.target,
            serde_json::to_string(&d.action.params).unwrap_or_default(),
            d.rule,
            d.probability,
            d.interval[0],
            d.interval[1],
            d.expected_effect,
        );
        for a in &d.alternatives {
            let _ = writeln!(
                s,
                "    not {} {}: {}",
                a.action.kind.as_str(),
                a.action.target,
                a.rejected_because
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
    }

    #[test]
    fn reports_errors_with_locations_and_decisions_on_scores() {
        let dir = std::env::temp_dir().join(format!("policy-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.yaml");
        std::fs::write(
            &bad,
            "name: bad\nrules:\n  - name: r\n    when: \"score.probability >\"\n    actions: [{kind: migrate}]\n",
        )
        .unwrap();
        let r = check(&bad, None, &Inventory::default(), GraphConfig::default()).unwrap();
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(
            r.errors[0].contains("rules[0].when (line 3)"),
            "{:?}",
            r.errors
        );

        let scores = dir.join("scores.jsonl");
        let score = |e: &str, p: f64| {
            serde_json::json!({
                "entity": e, "time": "2026-01-01T00:10:00Z",
                "window_id": "00000000-0000-0000-0000-000000000001",
                "horizon_seconds": 3600, "probability": p, "lower": p - 0.05, "upper": p + 0.05,
                "health": 10.0, "band": "high", "contributors": [], "method": "prior",
                "model_version": "t"
            })
            .to_string()
        };
        std::fs::write(
            &scores,
            format!("{}\n{}\n", score("a", 0.9), score("b", 0.1)),
        )
        .unwrap();
        let r = check(
            &examples().join("instances.yaml"),
            Some(&scores),
            &Inventory::default(),
            GraphConfig::default(),
        )
        .unwrap();
        assert_eq!(r.inputs, 2);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        // Not in the inventory: the instances policy needs workloads to migrate.
        assert!(r.decisions.is_empty(), "{}", render(&r));
        let r = check(
            &examples().join("inventory-items.yaml"),
            Some(&scores),
            &Inventory::default(),
            GraphConfig::default(),
        )
        .unwrap();
        let text = render(&r);
        assert!(text.contains(" a adjust_bandwidth a "), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
