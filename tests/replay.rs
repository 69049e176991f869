//! Replay and backtest over a generated fleet: the cookbook's questions asked of a run directory
//! with `foresight sql`, the backtest report rendered by headless Chromium, and the `foresight`
//! binary's replay/sql commands end to end. No broker, no database.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use datafusion::arrow::{
    array::{Array, AsArray as _, RecordBatch},
    datatypes::{Float64Type, Int64Type},
};
use foresight::{
    Config,
    backtest::{self, BacktestConfig},
    demo::{self, FleetSpec},
    replay::{self, ReplayOptions},
};
use foresight_events::{Band, EventData};

struct Run {
    dir: tempfile::TempDir,
    run: replay::Replay,
    backtest: backtest::Backtest,
    config: Config,
}

/// A 7-node fleet over 24 hours, replayed from files with its failures as labels.
async fn demo_run() -> Run {
    let dir = tempfile::tempdir().unwrap();
    let fleet = demo::generate(&FleetSpec {
        nodes: 7,
        hours: 24,
        ..FleetSpec::default()
    });
    let input = dir.path().join("fleet.jsonl");
    std::fs::write(&input, fleet.lines().join("\n") + "\n").unwrap();
    let labels = dir.path().join("failures.csv");
    let mut csv = String::from("entity,timestamp,kind,detail\n");
    for f in &fleet.failures {
        csv.push_str(&format!(
            "{},{},{},\n",
            f.entity,
            f.time.to_rfc3339(),
            f.kind
        ));
    }
    std::fs::write(&labels, csv).unwrap();
    let config = Config::embedded();
    let run = replay::replay(
        &config,
        &[input],
        &ReplayOptions {
            failures: vec![labels],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(run.failures.len(), fleet.failures.len());
    let backtest = backtest::backtest(
        &run.outputs.scores,
        &run.outputs.decisions,
        &run.outputs.outcomes,
        &run.failures,
        &BacktestConfig {
            lookback: chrono::Duration::hours(12),
            threshold: foresight::train::operating_threshold(&config),
        },
    );
    replay::write_run(&dir.path().join("run"), &run, Some(&backtest)).unwrap();
    Run {
        dir,
        run,
        backtest,
        config,
    }
}

async fn query(dir: &Path, sql: &str) -> RecordBatch {
    let batches = replay::sql_batches(dir, sql).await.unwrap();
    datafusion::arrow::compute::concat_batches(
        &batches
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| panic!("no result for {sql}")),
        &batches,
    )
    .unwrap()
}

fn strings(b: &RecordBatch, col: usize) -> Vec<String> {
    let c = datafusion::arrow::compute::cast(
        b.column(col),
        &datafusion::arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    let c = c.as_string::<i32>();
    (0..c.len())
        .map(|i| {
            if c.is_null(i) {
                String::new()
            } else {
                c.value(i).to_owned()
            }
        })
        .collect()
}

fn ints(b: &RecordBatch, col: usize) -> Vec<i64> {
    let c = datafusion::arrow::compute::cast(
        b.column(col),
        &datafusion::arrow::datatypes::DataType::Int64,
    )
    .unwrap();
    c.as_primitive::<Int64Type>().values().to_vec()
}

fn floats(b: &RecordBatch, col: usize) -> Vec<f64> {
    let c = datafusion::arrow::compute::cast(
        b.column(col),
        &datafusion::arrow::datatypes::DataType::Float64,
    )
    .unwrap();
    c.as_primitive::<Float64Type>().values().to_vec()
}

/// The cookbook's questions (docs/sql.md), adapted to the run directory's tables, answered with
/// what the replay produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_a_run_answers_the_cookbook_questions() {
    let r = demo_run().await;
    let dir = r.dir.path().join("run");
    let out = &r.run.outputs;
    assert!(!out.decisions.is_empty() && !out.scores.is_empty());

    // Why was an entity acted on?
    let entity = out.decisions[0].entity.clone();
    let b = query(
        &dir,
        &format!(
            "SELECT event_time, rule, action, probability, probability_lower, probability_upper, reason \
             FROM decisions WHERE entity = '{entity}' ORDER BY event_time"
        ),
    )
    .await;
    let want: Vec<_> = out
        .decisions
        .iter()
        .filter(|d| d.entity == entity)
        .collect();
    assert_eq!(b.num_rows(), want.len());
    assert_eq!(strings(&b, 1)[0], want[0].rule);
    assert_eq!(floats(&b, 3)[0], want[0].probability);

    // Decisions by rule and action.
    let b = query(
        &dir,
        "SELECT rule, action, count(*) AS n FROM decisions GROUP BY rule, action ORDER BY n DESC, rule, action",
    )
    .await;
    let mut want: BTreeMap<(String, String), i64> = BTreeMap::new();
    for d in &out.decisions {
        *want
            .entry((d.rule.clone(), d.action.kind.as_str().to_owned()))
            .or_insert(0) += 1;
    }
    let got: BTreeMap<(String, String), i64> = strings(&b, 0)
        .into_iter()
        .zip(strings(&b, 1))
        .zip(ints(&b, 2))
        .collect();
    assert_eq!(got, want);

    // Each decision with what became of it.
    let b = query(
        &dir,
        "SELECT d.event_time, d.entity, d.action, o.actuator, o.status, o.detail \
         FROM decisions d LEFT JOIN outcomes o ON o.decision_id = d.id ORDER BY d.event_time",
    )
    .await;
    assert_eq!(b.num_rows(), out.outcomes.len().max(out.decisions.len()));
    let statuses: BTreeSet<String> = strings(&b, 4).into_iter().collect();
    let want: BTreeSet<String> = out
        .outcomes
        .iter()
        .map(|o| o.status.as_str().to_owned())
        .collect();
    assert_eq!(statuses, want);

    // The score behind a decision, with its strongest signal.
    let b = query(
        &dir,
        "SELECT d.id, s.probability, s.lower, s.upper, s.why FROM decisions d JOIN scores s ON s.id = d.score_id",
    )
    .await;
    assert_eq!(
        b.num_rows(),
        out.decisions.len(),
        "every decision's score is in scores"
    );
    let ids: BTreeSet<String> = strings(&b, 0).into_iter().collect();
    let want: BTreeSet<String> = out.decisions.iter().map(|d| d.id().to_string()).collect();
    assert_eq!(ids, want);

    // Precision of the high band, overall (the cookbook groups it by week; the run is one day).
    let b = query(
        &dir,
        "SELECT date_trunc('week', s.event_time) AS week, count(*) AS high_scores, \
                avg(CASE WHEN hit.id IS NOT NULL THEN 1.0 ELSE 0.0 END) AS precision \
         FROM scores s LEFT JOIN ( \
             SELECT DISTINCT h.id FROM scores h JOIN failures f ON f.entity = h.entity \
             WHERE h.band = 'high' AND f.event_time >= h.event_time \
               AND to_unixtime(f.event_time) <= to_unixtime(h.event_time) + h.horizon_seconds) hit \
           ON hit.id = s.id \
         WHERE s.band = 'high' GROUP BY 1 ORDER BY 1",
    )
    .await;
    let high = out.scores.iter().filter(|s| s.band == Band::High).count() as i64;
    assert_eq!(ints(&b, 1).iter().sum::<i64>(), high);
    assert_eq!(ints(&b, 1).iter().sum::<i64>() as usize, r.backtest.alarms);
    if b.num_rows() == 1 {
        let p = floats(&b, 2)[0];
        assert!(
            (p - r.backtest.precision.unwrap()).abs() < 1e-9,
            "SQL {p} vs backtest {:?}",
            r.backtest.precision
        );
    }

    // Calibration: predicted probability against what happened (bins of a tenth).
    let b = query(
        &dir,
        "SELECT CASE WHEN s.probability >= 0.9 THEN 9 ELSE floor(s.probability * 10) END AS bin, count(*) AS scores, avg(s.probability) AS predicted \
         FROM scores s \
         WHERE NOT EXISTS (SELECT 1 FROM failures f WHERE f.entity = s.entity AND f.event_time < s.event_time) \
         GROUP BY 1 ORDER BY 1",
    )
    .await;
    let bins: Vec<i64> = ints(&b, 0);
    let counts: Vec<i64> = ints(&b, 1);
    let want: Vec<(i64, i64)> = r
        .backtest
        .calibration
        .reliability
        .iter()
        .map(|bin| (bin.bin as i64, bin.scores as i64))
        .collect();
    assert_eq!(bins.into_iter().zip(counts).collect::<Vec<_>>(), want);

    // Decisions per action and outcome status, per day.
    let b = query(
        &dir,
        "SELECT date_trunc('day', d.event_time) AS day, d.action, o.status, count(*) AS n \
         FROM decisions d LEFT JOIN outcomes o ON o.decision_id = d.id GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .await;
    assert_eq!(
        ints(&b, 3).iter().sum::<i64>() as usize,
        out.outcomes.len().max(out.decisions.len())
    );

    // The labels and the dead letters are tables too.
    let b = query(&dir, "SELECT count(*) FROM failures").await;
    assert_eq!(ints(&b, 0), vec![r.run.failures.len() as i64]);
    let b = query(&dir, "SELECT count(*) FROM dead_letters").await;
    assert_eq!(ints(&b, 0), vec![out.dead_letters.len() as i64]);

    // The text renderings.
    let table = replay::sql(
        &dir,
        "SELECT count(*) AS n FROM scores",
        replay::SqlFormat::Table,
    )
    .await
    .unwrap();
    assert!(table.contains(&out.scores.len().to_string()), "{table}");
    let csv = replay::sql(
        &dir,
        "SELECT count(*) AS n FROM scores",
        replay::SqlFormat::Csv,
    )
    .await
    .unwrap();
    assert_eq!(csv, format!("n\n{}\n", out.scores.len()));
    let json = replay::sql(
        &dir,
        "SELECT count(*) AS n FROM scores",
        replay::SqlFormat::Json,
    )
    .await
    .unwrap();
    assert_eq!(json.trim(), format!("{{\"n\":{}}}", out.scores.len()));
    // A bad query is an error, not a crash.
    assert!(
        replay::sql_batches(&dir, "SELECT nope FROM scores")
            .await
            .is_err()
    );
}

/// Screenshots `html` with headless Chromium (Debian's `chromium`); returns the PNG's bytes.
fn screenshot(html: &Path, out: &Path) -> Vec<u8> {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect(
            "headless Chromium is needed: apt-get install -y chromium (deploy/dev/test.sh does)",
        );
    let profile = tempfile::tempdir().unwrap();
    let status = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg("--window-size=1280,2000")
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("running chromium");
    assert!(
        out.exists(),
        "chromium wrote no screenshot: {}\n{}",
        status.status,
        String::from_utf8_lossy(&status.stderr)
    );
    std::fs::read(out).unwrap()
}

/// Decodes a PNG: (width, height, distinct colours, share of pixels that are not the page's
/// white background).
fn picture(png_bytes: &[u8]) -> (u32, u32, usize, f64) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let mut colours = BTreeSet::new();
    let mut ink = 0usize;
    let n = pixels.len() / channels;
    for px in pixels.chunks(channels) {
        let rgb = (
            px[0],
            px.get(1).copied().unwrap_or(px[0]),
            px.get(2).copied().unwrap_or(px[0]),
        );
        colours.insert(rgb);
        if rgb.0 < 245 || rgb.1 < 245 || rgb.2 < 245 {
            ink += 1;
        }
    }
    (
        info.width,
        info.height,
        colours.len(),
        ink as f64 / n.max(1) as f64,
    )
}

/// The report is one self-contained HTML file whose charts really render: Chromium draws it
/// with many colours and a good share of non-white pixels; an empty page fails the same check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_renders_in_headless_chromium() {
    let r = demo_run().await;
    let html = foresight::report::render(&foresight::report::ReportInput {
        title: "demo fleet",
        scores: &r.run.outputs.scores,
        decisions: &r.run.outputs.decisions,
        failures: &r.run.failures,
        backtest: &r.backtest,
        config: &r.config,
    })
    .unwrap();
    // Self-contained: nothing to fetch (the SVG namespace is a name, not a request).
    for needle in [
        "<script", "<link", "<img", "<iframe", "url(", "src=", "@import",
    ] {
        assert!(!html.contains(needle), "the report refers to {needle}");
    }
    for heading in [
        "Entities",
        "Fleet risk",
        "Calibration",
        "NAB score",
        "Recall",
    ] {
        assert!(html.contains(heading), "no {heading} in the report");
    }
    assert!(html.matches("<svg").count() >= 4, "charts missing");
    let path = r.dir.path().join("report.html");
    std::fs::write(&path, &html).unwrap();
    let png = screenshot(&path, &r.dir.path().join("report.png"));
    if let Some(keep) = std::env::var_os("FORESIGHT_KEEP_REPORT") {
        std::fs::write(PathBuf::from(&keep).with_extension("html"), &html).unwrap();
        std::fs::write(PathBuf::from(keep).with_extension("png"), &png).unwrap();
    }
    let (w, h, colours, ink) = picture(&png);
    println!(
        "report screenshot: {w}x{h}, {colours} colours, {:.1}% ink",
        100.0 * ink
    );
    assert_eq!((w, h), (1280, 2000));
    assert!(
        colours >= 64,
        "only {colours} colours: the charts did not render"
    );
    assert!(ink >= 0.05, "only {:.1}% of the page is drawn", 100.0 * ink);

    // The same check fails on an empty page: it can tell.
    let blank = r.dir.path().join("blank.html");
    std::fs::write(&blank, "<!DOCTYPE html><html><body></body></html>").unwrap();
    let (_, _, colours, ink) = picture(&screenshot(&blank, &r.dir.path().join("blank.png")));
    assert!(
        colours < 64 && ink < 0.05,
        "{colours} colours, {ink} ink on a blank page"
    );
}

/// `foresight replay` over CSV and Parquet inputs with a SQL filter, failures and a report, then
/// `foresight sql` over the run; the outputs of two runs are byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_replays_tables_and_answers_sql() {
    let r = demo_run().await;
    let dir = r.dir.path();
    // The fleet's samples as a long CSV (the metrics of nodes only, selected by --sql).
    let fleet = demo::generate(&FleetSpec {
        nodes: 7,
        hours: 24,
        ..FleetSpec::default()
    });
    let mut csv = String::from("timestamp,entity,metric,value\n");
    for s in &fleet.samples {
        csv.push_str(&format!(
            "{},{},{},{}\n",
            s.time.to_rfc3339(),
            s.entity,
            s.metric,
            s.value
        ));
    }
    csv.push_str("yesterday,node-01,cpu_pct,1\n");
    std::fs::write(dir.join("fleet.csv"), csv).unwrap();
    let mut labels = String::new();
    for f in &fleet.failures {
        labels.push_str(&serde_json::to_string(f).unwrap());
        labels.push('\n');
    }
    std::fs::write(dir.join("failures.jsonl"), labels).unwrap();
    let run = |out: &str| {
        let o = Command::new(foresight_tests::binary().unwrap())
            .current_dir(dir)
            .args([
                "replay",
                "fleet.csv",
                "--sql",
                "SELECT * FROM input WHERE entity LIKE 'node-%'",
                "--failures",
                "failures.jsonl",
                "--out",
                out,
                "--report",
                &format!("{out}.html"),
            ])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let stdout = run("a");
    assert!(stdout.contains("recall"), "{stdout}");
    assert!(stdout.contains("NAB standard"), "{stdout}");
    run("b");
    for file in [
        "scores.parquet",
        "decisions.parquet",
        "outcomes.parquet",
        "failures.parquet",
        "dead_letters.parquet",
        "summary.json",
    ] {
        let a = std::fs::read(dir.join("a").join(file)).unwrap();
        let b = std::fs::read(dir.join("b").join(file)).unwrap();
        assert!(a == b, "{file} differs between two runs");
    }
    assert!(
        std::fs::read(dir.join("a.html")).unwrap() == std::fs::read(dir.join("b.html")).unwrap()
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("a/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["dead_letters"], 1, "{summary}");
    assert!(summary["backtest"]["recall"].is_number(), "{summary}");

    let o = Command::new(foresight_tests::binary().unwrap())
        .args([
            "sql",
            dir.join("a").to_str().unwrap(),
            "SELECT count(DISTINCT entity) AS n FROM scores WHERE entity NOT LIKE 'node-%'",
            "--format",
            "csv",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "n\n0\n",
        "the filter kept services out"
    );
    let o = Command::new(foresight_tests::binary().unwrap())
        .args([
            "sql",
            dir.join("a").to_str().unwrap(),
            "SELECT reason FROM dead_letters",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("yesterday"));
}
