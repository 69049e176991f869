//! Reading the Numenta Anomaly Benchmark (NAB) corpus and running detectors over it; the scoring
//! itself is the library's ([`foresight::nab`]), shared with the backtest of replays.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, ensure};
use chrono::NaiveDateTime;

pub use foresight::nab::*;

/// The NAB data directory: `FORESIGHT_NAB_DIR`, or `shared/data/nab` beside the workspace.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("FORESIGHT_NAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/nab"))
}

/// Parses a NAB timestamp, with or without fractional seconds.
fn parse_timestamp(s: &str) -> anyhow::Result<NaiveDateTime> {
    NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%d %H:%M:%S%.f")
        .with_context(|| format!("bad timestamp {s:?}"))
}

/// Reads NAB's `combined_windows.json`: file key -> list of `[start, end]` timestamps.
pub fn load_windows(path: &Path) -> anyhow::Result<Windows> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let raw: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(&text).with_context(|| format!("parsing {path:?}"))?;
    raw.into_iter()
        .map(|(file, windows)| {
            let windows = windows
                .iter()
                .map(|(start, end)| Ok((parse_timestamp(start)?, parse_timestamp(end)?)))
                .collect::<anyhow::Result<Vec<_>>>()
                .with_context(|| format!("windows of {file}"))?;
            Ok((file, windows))
        })
        .collect()
}

/// Reads NAB's `profiles.json`: profile name -> its cost matrix.
pub fn load_profiles(path: &Path) -> anyhow::Result<BTreeMap<String, Profile>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {path:?}"))?;
    let profiles = raw
        .as_object()
        .with_context(|| format!("{path:?} is not a JSON object"))?;
    profiles
        .iter()
        .map(|(name, profile)| {
            let weight = |key: &str| {
                profile["CostMatrix"][key]
                    .as_f64()
                    .with_context(|| format!("profile {name}: no number CostMatrix.{key}"))
            };
            Ok((
                name.clone(),
                Profile {
                    tp_weight: weight("tpWeight")?,
                    fp_weight: weight("fpWeight")?,
                    fn_weight: weight("fnWeight")?,
                    tn_weight: weight("tnWeight")?,
                },
            ))
        })
        .collect()
}

/// Reads one NAB data file (`timestamp,value` with a header row).
pub fn read_series(path: &Path) -> anyhow::Result<(Vec<NaiveDateTime>, Vec<f64>)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let mut timestamps = Vec::new();
    let mut values = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let (ts, value) = line
            .split_once(',')
            .with_context(|| format!("{path:?} line {}: expected timestamp,value", n + 1))?;
        timestamps.push(parse_timestamp(ts).with_context(|| format!("{path:?} line {}", n + 1))?);
        values.push(
            value
                .trim()
                .parse()
                .with_context(|| format!("{path:?} line {}: bad value {value:?}", n + 1))?,
        );
    }
    Ok((timestamps, values))
}

/// Runs `detect` on every CSV in the subfolders of a NAB data directory (file keys are
/// `subfolder/name.csv`, sorted). Every file must have an entry in `windows`.
pub fn run_detector(
    data_dir: &Path,
    windows: &Windows,
    detect: impl Fn(&Path) -> anyhow::Result<(Vec<NaiveDateTime>, Vec<f64>)>,
) -> anyhow::Result<Vec<DetectorRun>> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(data_dir).with_context(|| format!("listing {data_dir:?}"))? {
        let dir = dir?;
        if !dir.file_type()?.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(dir.path())? {
            let path = file?.path();
            if path.extension().is_some_and(|e| e == "csv") {
                let key = format!(
                    "{}/{}",
                    dir.file_name().to_string_lossy(),
                    path.file_name().unwrap_or_default().to_string_lossy()
                );
                files.push((key, path));
            }
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "no CSV files under {data_dir:?}");
    files
        .into_iter()
        .map(|(file, path)| {
            ensure!(
                windows.contains_key(&file),
                "{file} has no entry in the windows"
            );
            let (timestamps, scores) =
                detect(&path).with_context(|| format!("detecting {file}"))?;
            Ok(DetectorRun {
                file,
                timestamps,
                scores,
            })
        })
        .collect()
}

/// Runs `detect` over the NAB corpus in `data_dir` (its subfolders of CSVs, its
/// `combined_windows.json` and `profiles.json`) and scores it under every profile, each at its
/// own optimal threshold.
pub fn evaluate(
    data_dir: &Path,
    detect: impl Fn(&Path) -> anyhow::Result<(Vec<NaiveDateTime>, Vec<f64>)>,
) -> anyhow::Result<BTreeMap<String, CorpusScore>> {
    let windows = load_windows(&data_dir.join("combined_windows.json"))?;
    let profiles = load_profiles(&data_dir.join("profiles.json"))?;
    let runs = run_detector(data_dir, &windows, detect)?;
    profiles
        .into_iter()
        .map(|(name, profile)| Ok((name, score_corpus(&runs, &windows, &profile)?)))
        .collect()
}

/// Foresight's within-series detector as a NAB detector: each file scored online, row by row,
/// exactly as `foresight replay FILE.csv --anomaly-scores OUT.csv` scores it.
pub fn foresight_detector(
    config: &foresight_scoring::anomaly::AnomalyConfig,
) -> impl Fn(&Path) -> anyhow::Result<(Vec<NaiveDateTime>, Vec<f64>)> + '_ {
    move |path| {
        let file = std::fs::File::open(path).with_context(|| format!("opening {path:?}"))?;
        let rows =
            foresight::anomaly::score_csv(file, &foresight::anomaly::Columns::AllButFirst, config)?;
        let timestamps = rows
            .iter()
            .map(|r| parse_timestamp(&r.timestamp).with_context(|| format!("{path:?}")))
            .collect::<anyhow::Result<_>>()?;
        Ok((timestamps, rows.into_iter().map(|r| r.score).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILES: [Profile; 3] = Profile::ALL;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
    }

    /// The real development subset, or `None` (with a message) if it is missing.
    fn real_data() -> Option<PathBuf> {
        let dir = default_data_dir();
        if dir.join("combined_windows.json").exists() {
            Some(dir)
        } else {
            eprintln!("Skipping: no NAB data at {dir:?} (set FORESIGHT_NAB_DIR).");
            None
        }
    }

    #[test]
    fn loads_the_real_windows_and_profiles() {
        let Some(dir) = real_data() else { return };
        let profiles = load_profiles(&dir.join("profiles.json")).unwrap();
        assert_eq!(profiles.len(), 3);
        assert_eq!(profiles["standard"], Profile::STANDARD);
        assert_eq!(profiles["reward_low_FP_rate"], PROFILES[1]);
        assert_eq!(profiles["reward_low_FN_rate"], PROFILES[2]);
        let windows = load_windows(&dir.join("combined_windows.json")).unwrap();
        let taxi = &windows["realKnownCause/nyc_taxi.csv"];
        assert_eq!(taxi.len(), 5);
        assert!(windows["artificialNoAnomaly/art_noisy.csv"].is_empty());
        // NAB's sweeper enters and leaves windows on exact timestamps: check they are rows, and
        // that no window starts inside the probationary period.
        for (file, limits) in &windows {
            let (ts, _) = read_series(&dir.join(file)).unwrap();
            let probation = probationary_length(ts.len());
            for (start, end) in limits {
                let at = |t| {
                    assert_eq!(ts.iter().filter(|&x| x == t).count(), 1, "{file}: {t}");
                    ts.iter().position(|x| x == t).unwrap()
                };
                assert!(at(start) >= probation, "{file}");
                assert!(at(end) > at(start), "{file}");
            }
        }
    }

    #[test]
    fn real_null_and_perfect_detectors_normalise_to_0_and_100() {
        let Some(dir) = real_data() else { return };
        let windows = load_windows(&dir.join("combined_windows.json")).unwrap();
        let null = evaluate(&dir, |path| {
            let (ts, values) = read_series(path)?;
            Ok((ts, vec![0.5; values.len()]))
        })
        .unwrap();
        let perfect = evaluate(&dir, |path| {
            let (ts, _) = read_series(path)?;
            let key = path
                .strip_prefix(&dir)?
                .to_string_lossy()
                .replace('\\', "/");
            let scores = ts
                .iter()
                .map(|t| f64::from(windows[&key].iter().any(|(start, _)| start == t)))
                .collect();
            Ok((ts, scores))
        })
        .unwrap();
        let window_count: usize = windows.values().map(Vec::len).sum();
        assert_eq!(null.len(), 3);
        for (name, score) in &null {
            assert_eq!(score.normalized, 0.0, "{name}: {score:?}");
            assert_eq!(score.windows, window_count);
            let p = &perfect[name];
            assert!(close(p.normalized, 100.0), "{name}: {p:?}");
            assert_eq!(p.windows_detected, window_count);
            // NAB normalises with perfect = number of windows * tpWeight.
            let profile = load_profiles(&dir.join("profiles.json")).unwrap()[name];
            assert!(close(p.perfect, window_count as f64 * profile.tp_weight));
            assert!(close(p.null, -(window_count as f64) * profile.fn_weight));
        }
    }
}
