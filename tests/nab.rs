//! The within-series anomaly detector on the Numenta Anomaly Benchmark's development subset
//! (`../shared/data/nab`, or `FORESIGHT_NAB_DIR`), scored with NAB's rules: one configuration for
//! every file, no tuning per file. The numbers are in `docs/benchmarks.md`; this test guards them
//! and prints the lead times on the real failures (realKnownCause windows end at the failure).

use foresight_scoring::anomaly::AnomalyConfig;
use foresight_tests::nab;

#[test]
fn nab_scores_hold_on_the_development_subset() {
    let dir = nab::default_data_dir();
    assert!(
        dir.join("combined_windows.json").is_file(),
        "no NAB data at {} (the evaluation data lives in shared/data/nab beside the checkout; \
         or set FORESIGHT_NAB_DIR)",
        dir.display()
    );
    let config = AnomalyConfig::default();
    let windows = nab::load_windows(&dir.join("combined_windows.json")).unwrap();
    let profiles = nab::load_profiles(&dir.join("profiles.json")).unwrap();
    let runs = nab::run_detector(&dir, &windows, nab::foresight_detector(&config)).unwrap();
    let mut scores = std::collections::BTreeMap::new();
    for (profile, weights) in &profiles {
        let s = nab::score_corpus(&runs, &windows, weights).unwrap();
        println!(
            "{profile}: {:.1} (threshold {:.3}, {} of {} windows detected, {} false positive rows)",
            s.normalized, s.threshold, s.windows_detected, s.windows, s.fp
        );
        scores.insert(profile.clone(), s);
    }

    // Lead time on the real failures, at the standard profile's threshold: how long before a
    // window's end (the failure) the first alarm inside it came; and alarms outside any window
    // per day of data.
    let threshold = scores["standard"].threshold;
    for run in runs
        .iter()
        .filter(|r| r.file.starts_with("realKnownCause/"))
    {
        let mut leads = Vec::new();
        for (start, end) in &windows[&run.file] {
            let first = run
                .timestamps
                .iter()
                .zip(&run.scores)
                .find(|(t, s)| *t >= start && *t <= end && **s >= threshold);
            leads.push(match first {
                Some((t, _)) => format!("{:.1} h", (*end - *t).num_minutes() as f64 / 60.0),
                None => "missed".into(),
            });
        }
        let outside = run
            .timestamps
            .iter()
            .zip(&run.scores)
            .filter(|(t, s)| {
                **s >= threshold && !windows[&run.file].iter().any(|(a, b)| a <= *t && *t <= b)
            })
            .count();
        let days = (*run.timestamps.last().unwrap() - run.timestamps[0]).num_minutes() as f64
            / (24.0 * 60.0);
        println!(
            "{}: lead before failure {}; {:.2} alarms per day outside the windows",
            run.file,
            leads.join(", "),
            outside as f64 / days
        );
    }

    // Floors a little under the measured scores (docs/benchmarks.md): a detector change that
    // loses ground on NAB fails here.
    let floor = [
        ("standard", 65.0),
        ("reward_low_FP_rate", 57.0),
        ("reward_low_FN_rate", 70.0),
    ];
    for (profile, min) in floor {
        let got = scores[profile].normalized;
        assert!(got >= min, "{profile}: NAB score {got:.1} fell below {min}");
    }
}
