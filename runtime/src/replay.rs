//! Replay: recorded telemetry through the same processors, in this process, into a run directory.
//!
//! Inputs, by file name:
//! - `*.csv`, `*.parquet`: tables read through DataFusion, optionally filtered or projected by a
//!   SQL query over the table `input`. Long tables have `timestamp` (or `time`), `entity`,
//!   `metric`, `value` and optionally `labels` (a JSON object) columns; wide tables have a
//!   `timestamp` column, an optional `entity` column (else the `--entity` flag, else the file
//!   name) and one numeric column per metric. Integer timestamps are Unix epoch milliseconds, as
//!   in native JSON; text ones RFC 3339 or `YYYY-MM-DD HH:MM:SS[.f]` (UTC).
//! - anything else: JSON lines, each message in any format ingest detects (native JSON,
//!   OTLP/JSON, prometheus-kafka-adapter JSON), decoded by ingest's decoder line by line.
//!
//! A bad line or row becomes a dead letter with its reason; everything else flows. Failure
//! reports (the labels of the backtest) are read the same way: JSON lines of `FailureReport` (or
//! its event envelope), or tables with `entity`, `timestamp` (or `time`), `kind` and `detail`.
//!
//! The run directory gets `scores.parquet`, `decisions.parquet`, `outcomes.parquet`,
//! `failures.parquet`, `dead_letters.parquet` ([`crate::tables`]) and `summary.json`; all are
//! byte-identical for the same inputs and configuration.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, IsTerminal as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use chrono::{DateTime, NaiveDateTime, Utc};
use datafusion::{
    arrow::{
        array::{Array, ArrayRef, AsArray as _, RecordBatch},
        compute::{CastOptions, cast_with_options},
        datatypes::{DataType, Float64Type, Int64Type, TimeUnit, TimestampMillisecondType},
        util::display::{ArrayFormatter, FormatOptions},
    },
    prelude::{CsvReadOptions, ParquetReadOptions, SessionConfig, SessionContext},
};
use foresight_events::{
    DeadLetter, ErrorClass, Event, FailureReport, Origin, Rejection, Telemetry,
};
use futures::StreamExt as _;
use serde::Serialize;

use crate::{
    backtest::Backtest,
    config::Config,
    pipeline::{InProcess, Outputs},
    tables,
};

/// How to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// A query over the table `input` applied to each tabular input (e.g. `SELECT * FROM input
    /// WHERE entity LIKE 'node-%'`).
    pub sql: Option<String>,
    /// The entity of wide tables without an `entity` column (default: the file name).
    pub entity: Option<String>,
    /// Failure reports (labels).
    pub failures: Vec<PathBuf>,
    /// Leave the windows open at the end of the input, as a live pipeline that is still running
    /// does (to compare with one); by default they are closed and scored.
    pub keep_open: bool,
    /// Show a progress bar on stderr (only if it is a terminal).
    pub progress: bool,
}

/// What a replay read and produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// Everything the pipeline produced.
    pub outputs: Outputs,
    /// Input records (lines, rows) read.
    pub records: u64,
    /// The failure reports read (sorted by time, then entity).
    pub failures: Vec<FailureReport>,
}

/// Counts of a replay (and its backtest, with labels), written as `summary.json`.
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
    /// Records rejected (telemetry and labels).
    pub dead_letters: usize,
    /// Failure reports (labels) read.
    pub failures: usize,
    /// The backtest against the labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backtest: Option<Backtest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    JsonLines,
    Csv,
    Parquet,
}

fn kind(path: &Path) -> Kind {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("csv") => Kind::Csv,
        Some("parquet" | "pq") => Kind::Parquet,
        _ => Kind::JsonLines,
    }
}

/// A progress bar on stderr when it is a terminal (bytes of input, throughput and ETA, samples
/// so far); nothing otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(show: bool, total_bytes: u64) -> Self {
        let bar = if show && std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total_bytes),
                indicatif::ProgressDrawTarget::stderr_with_hz(4),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {binary_bytes}/{binary_total_bytes} \
                     {binary_bytes_per_sec}, ETA {eta} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        Self { bar }
    }

    fn advance(&self, bytes: u64, samples: u64) {
        self.bar.inc(bytes);
        self.bar.set_message(format!("{samples} samples"));
    }
}

/// Replays `inputs` through the pipeline built from `config`.
pub async fn replay(
    config: &Config,
    inputs: &[PathBuf],
    options: &ReplayOptions,
) -> anyhow::Result<Replay> {
    let mut pipeline = InProcess::new(config, false)?;
    let total: u64 = inputs
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let progress = Progress::new(options.progress, total);
    let mut records = 0;
    if options.sql.is_some() && inputs.iter().all(|p| kind(p) == Kind::JsonLines) {
        anyhow::bail!("--sql applies to tabular inputs (CSV, Parquet); none was given");
    }
    for (i, path) in inputs.iter().enumerate() {
        let input = u16::try_from(i).context("too many inputs (at most 65,536)")?;
        records += match kind(path) {
            Kind::JsonLines => json_lines(&mut pipeline, path, input, &progress)?,
            Kind::Csv | Kind::Parquet => {
                let n = table(&mut pipeline, path, input, options).await?;
                let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                progress.advance(size, pipeline.samples());
                n
            }
        };
    }
    progress.bar.finish_and_clear();
    let mut outputs = if options.keep_open {
        pipeline.into_outputs()
    } else {
        pipeline.finish()
    };
    let (mut failures, dead) = read_failures(&options.failures).await?;
    failures.sort_by(|a, b| (a.time, &a.entity, &a.kind).cmp(&(b.time, &b.entity, &b.kind)));
    failures.dedup();
    outputs.dead_letters.extend(dead);
    Ok(Replay {
        outputs,
        records,
        failures,
    })
}

/// One file of JSON lines, each decoded by ingest (every format it detects).
fn json_lines(
    pipeline: &mut InProcess,
    path: &Path,
    input: u16,
    progress: &Progress,
) -> anyhow::Result<u64> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let source = path.display().to_string();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(1024);
    let (mut records, mut line_no, mut pending) = (0u64, 0i64, 0u64);
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        pending += n as u64;
        if pending >= 1 << 20 {
            progress.advance(pending, pipeline.samples());
            pending = 0;
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        records += 1;
        let origin = Origin {
            input,
            partition: 0,
            offset: line_no,
        };
        pipeline.feed(body, &source, origin, None);
    }
    progress.advance(pending, pipeline.samples());
    Ok(records)
}

fn context() -> SessionContext {
    // One partition: rows come in file order, so the replay is deterministic.
    SessionContext::new_with_config(
        SessionConfig::new()
            .with_target_partitions(1)
            .with_repartition_file_scans(false),
    )
}

/// Registers `path` as the table `input` and runs `sql` (default: every row) over it.
async fn query(
    path: &Path,
    sql: Option<&str>,
) -> anyhow::Result<datafusion::physical_plan::SendableRecordBatchStream> {
    let ctx = context();
    let name = path
        .to_str()
        .with_context(|| format!("{} is not a UTF-8 path", path.display()))?;
    match kind(path) {
        Kind::Csv => ctx
            .register_csv(
                "input",
                name,
                CsvReadOptions::new()
                    .has_header(true)
                    // Types inferred from every row: a bad value makes its column text (and
                    // that row a dead letter) instead of failing the whole read.
                    .schema_infer_max_records(usize::MAX),
            )
            .await
            .with_context(|| format!("reading {}", path.display()))?,
        _ => ctx
            .register_parquet("input", name, ParquetReadOptions::default())
            .await
            .with_context(|| format!("reading {}", path.display()))?,
    }
    let sql = sql.unwrap_or("SELECT * FROM input");
    let df = ctx
        .sql(sql)
        .await
        .with_context(|| format!("query {sql:?} over {}", path.display()))?;
    df.execute_stream()
        .await
        .with_context(|| format!("query {sql:?} over {}", path.display()))
}

/// Finds a column by one of `names` (case-insensitive).
fn column(batch: &RecordBatch, names: &[&str]) -> Option<usize> {
    let schema = batch.schema();
    schema
        .fields()
        .iter()
        .position(|f| names.iter().any(|n| f.name().eq_ignore_ascii_case(n)))
}

const TIME_COLUMNS: [&str; 3] = ["timestamp", "time", "ts"];

/// A column of times as epoch milliseconds per row (`Err` with the text for a bad one).
struct Times {
    millis: Vec<Result<i64, String>>,
}

impl Times {
    fn of(col: &ArrayRef) -> anyhow::Result<Self> {
        let safe = CastOptions {
            safe: true,
            ..Default::default()
        };
        let text = |i: usize| display(col, i);
        let timestamps = |tz| -> anyhow::Result<Vec<Result<i64, String>>> {
            let c = cast_with_options(col, &DataType::Timestamp(TimeUnit::Millisecond, tz), &safe)?;
            let c = c.as_primitive::<TimestampMillisecondType>();
            Ok((0..c.len())
                .map(|i| {
                    if c.is_null(i) {
                        Err(text(i))
                    } else {
                        Ok(c.value(i))
                    }
                })
                .collect())
        };
        let millis = match col.data_type() {
            DataType::Timestamp(_, tz) => timestamps(tz.clone())?,
            DataType::Date32 | DataType::Date64 => timestamps(None)?,
            t if t.is_integer() || t.is_floating() => {
                let c = cast_with_options(col, &DataType::Int64, &safe)?;
                let c = c.as_primitive::<Int64Type>();
                (0..c.len())
                    .map(|i| {
                        if c.is_null(i) {
                            Err(text(i))
                        } else {
                            Ok(c.value(i))
                        }
                    })
                    .collect()
            }
            _ => {
                let c = cast_with_options(col, &DataType::Utf8, &safe)?;
                let c = c.as_string::<i32>();
                (0..c.len())
                    .map(|i| {
                        if c.is_null(i) {
                            return Err(String::new());
                        }
                        parse_time(c.value(i)).ok_or_else(|| c.value(i).to_owned())
                    })
                    .collect()
            }
        };
        Ok(Self { millis })
    }

    fn at(&self, row: usize) -> Result<DateTime<Utc>, Rejection> {
        match &self.millis[row] {
            Ok(ms) => DateTime::from_timestamp_millis(*ms).ok_or_else(|| {
                Rejection::new(
                    ErrorClass::TimestampOutOfRange,
                    format!("time {ms} ms is out of range"),
                )
            }),
            Err(text) if text.is_empty() => Err(Rejection::new(
                ErrorClass::MissingField,
                "`timestamp` is missing",
            )),
            Err(text) => Err(Rejection::new(
                ErrorClass::InvalidValue,
                format!(
                    "`timestamp` {text:?} is not a time (RFC 3339, `YYYY-MM-DD HH:MM:SS` or epoch milliseconds)"
                ),
            )),
        }
    }
}

fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .map(|t| t.and_utc().timestamp_millis())
}

fn display(col: &ArrayRef, row: usize) -> String {
    if col.is_null(row) {
        return String::new();
    }
    ArrayFormatter::try_new(col.as_ref(), &FormatOptions::default())
        .map(|f| f.value(row).to_string())
        .unwrap_or_default()
}

/// A row as JSON (every value as its text), for its dead letter.
fn row_json(batch: &RecordBatch, row: usize) -> Vec<u8> {
    let schema = batch.schema();
    let map: serde_json::Map<String, serde_json::Value> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, c)| {
            let v = if c.is_null(row) {
                serde_json::Value::Null
            } else {
                serde_json::Value::String(display(c, row))
            };
            (f.name().clone(), v)
        })
        .collect();
    serde_json::to_vec(&map).expect("a map serialises")
}

fn texts(col: &ArrayRef) -> anyhow::Result<Vec<Option<String>>> {
    let c = cast_with_options(col, &DataType::Utf8, &CastOptions::default())?;
    let c = c.as_string::<i32>();
    Ok((0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.value(i).to_owned()))
        .collect())
}

fn numbers(col: &ArrayRef) -> anyhow::Result<Vec<Option<f64>>> {
    let safe = CastOptions {
        safe: true,
        ..Default::default()
    };
    let c = cast_with_options(col, &DataType::Float64, &safe)?;
    let c = c.as_primitive::<Float64Type>();
    Ok((0..c.len())
        .map(|i| (!c.is_null(i)).then(|| c.value(i)))
        .collect())
}

/// One tabular input, long or wide, row by row into the pipeline.
async fn table(
    pipeline: &mut InProcess,
    path: &Path,
    input: u16,
    options: &ReplayOptions,
) -> anyhow::Result<u64> {
    let source = path.display().to_string();
    let file_entity = options.entity.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mut stream = query(path, options.sql.as_deref()).await?;
    let mut row_no: i64 = 0;
    while let Some(batch) = stream.next().await {
        let batch = batch.with_context(|| format!("reading {}", path.display()))?;
        let time_col = column(&batch, &TIME_COLUMNS).with_context(|| {
            format!(
                "{}: no time column (one of {})",
                path.display(),
                TIME_COLUMNS.join(", ")
            )
        })?;
        let times = Times::of(batch.column(time_col))?;
        let entities = column(&batch, &["entity"])
            .map(|i| texts(batch.column(i)))
            .transpose()?;
        let long = column(&batch, &["metric"]).zip(column(&batch, &["value"]));
        let labels = column(&batch, &["labels"])
            .map(|i| texts(batch.column(i)))
            .transpose()?;
        // Wide: every other numeric column is a metric.
        let skip = [Some(time_col), column(&batch, &["entity"])];
        let schema = batch.schema();
        let wide: Vec<(String, Vec<Option<f64>>)> = if long.is_some() {
            Vec::new()
        } else {
            schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(i, f)| !skip.contains(&Some(*i)) && f.data_type().is_numeric())
                .map(|(i, f)| Ok((f.name().clone(), numbers(batch.column(i))?)))
                .collect::<anyhow::Result<_>>()?
        };
        let long = match long {
            Some((m, v)) => Some((texts(batch.column(m))?, numbers(batch.column(v))?)),
            None => None,
        };
        for row in 0..batch.num_rows() {
            row_no += 1;
            let origin = Origin {
                input,
                partition: 0,
                offset: row_no,
            };
            let decoder = pipeline.decoder();
            let mut telemetry = Vec::new();
            let mut rejections = Vec::new();
            let entity = match &entities {
                Some(e) => e[row].clone().unwrap_or_default(),
                None => file_entity.clone(),
            };
            match times.at(row) {
                Err(r) => rejections.push(r),
                Ok(time) => match &long {
                    Some((metrics, values)) => {
                        let labels = match labels.as_ref().and_then(|l| l[row].as_deref()) {
                            None | Some("") => Ok(Default::default()),
                            Some(text) => serde_json::from_str::<BTreeMap<String, String>>(text)
                                .map_err(|e| {
                                    Rejection::new(
                                        ErrorClass::InvalidValue,
                                        format!("`labels` is not a JSON object of strings: {e}"),
                                    )
                                }),
                        };
                        let sample = labels.and_then(|labels| {
                            let metric = metrics[row].as_deref().unwrap_or_default();
                            let value = values[row].ok_or_else(|| {
                                Rejection::new(
                                    ErrorClass::InvalidValue,
                                    format!("value of {metric} is missing or not a number"),
                                )
                            })?;
                            decoder.sample(&entity, metric, time, value, Arc::new(labels), None)
                        });
                        match sample {
                            Ok(s) => telemetry.push(Telemetry::Sample(s)),
                            Err(r) => rejections.push(r),
                        }
                    }
                    None => {
                        for (metric, values) in &wide {
                            // An empty cell is no sample (wide tables are often sparse).
                            let Some(value) = values[row] else { continue };
                            match decoder.sample(&entity, metric, time, value, Arc::default(), None)
                            {
                                Ok(s) => telemetry.push(Telemetry::Sample(s)),
                                Err(r) => rejections.push(r),
                            }
                        }
                    }
                },
            }
            let bytes = if rejections.is_empty() {
                Vec::new()
            } else {
                row_json(&batch, row)
            };
            pipeline.feed_decoded(telemetry, rejections, &bytes, &source, origin);
        }
    }
    Ok(row_no as u64)
}

/// Reads failure reports: JSON lines (bare or in event envelopes) or tables.
async fn read_failures(paths: &[PathBuf]) -> anyhow::Result<(Vec<FailureReport>, Vec<DeadLetter>)> {
    let mut failures = Vec::new();
    let mut dead = Vec::new();
    for path in paths {
        let source = path.display().to_string();
        let mut reject = |offset: i64, reason: String, payload: Vec<u8>| {
            dead.push(DeadLetter {
                stage: "labels".into(),
                source_topic: source.clone(),
                partition: 0,
                offset,
                error_class: ErrorClass::Undecodable,
                reason,
                key: None,
                payload,
            });
        };
        if kind(path) == Kind::JsonLines {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            for (n, line) in BufReader::new(file).split(b'\n').enumerate() {
                let line = line.with_context(|| format!("reading {}", path.display()))?;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<FailureReport>(&line) {
                    Ok(f) => failures.push(f),
                    Err(e) => match Event::<FailureReport>::from_json(&line) {
                        Ok(ev) => failures.push(ev.data),
                        Err(_) => reject(n as i64 + 1, format!("not a failure report: {e}"), line),
                    },
                }
            }
            continue;
        }
        let mut stream = query(path, None).await?;
        let mut row_no = 0i64;
        while let Some(batch) = stream.next().await {
            let batch = batch.with_context(|| format!("reading {}", path.display()))?;
            let need = |names: &[&str]| {
                column(&batch, names).with_context(|| {
                    format!("{}: no {} column", path.display(), names.join(" or "))
                })
            };
            let times = Times::of(batch.column(need(&TIME_COLUMNS)?))?;
            let entities = texts(batch.column(need(&["entity"])?))?;
            let kinds = column(&batch, &["kind"])
                .map(|i| texts(batch.column(i)))
                .transpose()?;
            let details = column(&batch, &["detail"])
                .map(|i| texts(batch.column(i)))
                .transpose()?;
            for row in 0..batch.num_rows() {
                row_no += 1;
                let entity = entities[row].as_deref().unwrap_or_default();
                let report = times.at(row).map_err(|r| r.reason).and_then(|time| {
                    Ok(FailureReport {
                        entity: foresight_events::EntityId::new(entity)
                            .map_err(|e| format!("bad entity: {e}"))?,
                        time,
                        kind: kinds
                            .as_ref()
                            .and_then(|k| k[row].clone())
                            .unwrap_or_else(|| "failure".into()),
                        detail: details
                            .as_ref()
                            .and_then(|d| d[row].clone())
                            .unwrap_or_default(),
                    })
                });
                match report {
                    Ok(f) => failures.push(f),
                    Err(reason) => reject(row_no, reason, row_json(&batch, row)),
                }
            }
        }
    }
    Ok((failures, dead))
}

/// Writes a run's outputs (Parquet tables) and its summary.
pub fn write_run(
    dir: &Path,
    replay: &Replay,
    backtest: Option<&Backtest>,
) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let o = &replay.outputs;
    tables::write_parquet(&dir.join("scores.parquet"), &tables::scores(&o.scores)?)?;
    tables::write_parquet(
        &dir.join("decisions.parquet"),
        &tables::decisions(&o.decisions)?,
    )?;
    tables::write_parquet(
        &dir.join("outcomes.parquet"),
        &tables::outcomes(&o.outcomes)?,
    )?;
    tables::write_parquet(
        &dir.join("failures.parquet"),
        &tables::failures(&replay.failures)?,
    )?;
    tables::write_parquet(
        &dir.join("dead_letters.parquet"),
        &tables::dead_letters(&o.dead_letters)?,
    )?;
    let summary = Summary {
        records: replay.records,
        samples: o.samples,
        scores: o.scores.len(),
        decisions: o.decisions.len(),
        outcomes: o.outcomes.len(),
        dead_letters: o.dead_letters.len(),
        failures: replay.failures.len(),
        backtest: backtest.cloned(),
    };
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// Output formats of [`sql`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SqlFormat {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON object per row.
    Json,
}

/// Runs `query` over a run directory's tables (each `NAME.parquet` is the table `NAME`) and
/// returns the result as batches.
pub async fn sql_batches(dir: &Path, query: &str) -> anyhow::Result<Vec<RecordBatch>> {
    let ctx = context();
    let mut tables = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if kind(&path) != Kind::Parquet {
            continue;
        }
        let (Some(name), Some(file)) = (path.file_stem().and_then(|s| s.to_str()), path.to_str())
        else {
            continue;
        };
        ctx.register_parquet(name, file, ParquetReadOptions::default())
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        tables += 1;
    }
    anyhow::ensure!(tables > 0, "no tables (*.parquet) in {}", dir.display());
    let df = ctx.sql(query).await?;
    Ok(df.collect().await?)
}

/// Runs `query` over a run directory's tables and renders the result.
pub async fn sql(dir: &Path, query: &str, format: SqlFormat) -> anyhow::Result<String> {
    let batches = sql_batches(dir, query).await?;
    Ok(match format {
        SqlFormat::Table => {
            datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string() + "\n"
        }
        SqlFormat::Csv => {
            let mut out = Vec::new();
            {
                let mut w = datafusion::arrow::csv::Writer::new(&mut out);
                for b in &batches {
                    w.write(b)?;
                }
            }
            String::from_utf8(out)?
        }
        SqlFormat::Json => {
            let mut out = Vec::new();
            {
                let mut w = datafusion::arrow::json::LineDelimitedWriter::new(&mut out);
                for b in &batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            String::from_utf8(out)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{FleetSpec, generate};

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("foresight-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Same inputs and configuration, byte-identical outputs.
    #[tokio::test]
    async fn replay_is_deterministic() {
        let dir = tmp("replay");
        let fleet = generate(&FleetSpec {
            nodes: 7,
            hours: 12,
            ..FleetSpec::default()
        });
        let input = dir.join("in.jsonl");
        let mut text = fleet.lines().join("\n");
        text.push_str("\n{not json}\n");
        std::fs::write(&input, text).unwrap();
        let labels = dir.join("failures.jsonl");
        let lines: Vec<String> = fleet
            .failures
            .iter()
            .map(|f| serde_json::to_string(f).unwrap())
            .collect();
        std::fs::write(&labels, lines.join("\n") + "\n").unwrap();
        let config = Config::embedded();
        let options = ReplayOptions {
            failures: vec![labels],
            ..Default::default()
        };
        let mut runs = Vec::new();
        for run in ["a", "b"] {
            let r = replay(&config, std::slice::from_ref(&input), &options)
                .await
                .unwrap();
            let b = crate::backtest::backtest(
                &r.outputs.scores,
                &r.outputs.decisions,
                &r.outputs.outcomes,
                &r.failures,
                &crate::backtest::BacktestConfig {
                    lookback: chrono::Duration::hours(2),
                    threshold: 0.6,
                },
            );
            let summary = write_run(&dir.join(run), &r, Some(&b)).unwrap();
            assert_eq!(summary.dead_letters, 1);
            assert!(summary.scores > 0);
            assert_eq!(summary.failures, fleet.failures.len());
            runs.push(dir.join(run));
        }
        for file in [
            "scores.parquet",
            "decisions.parquet",
            "outcomes.parquet",
            "failures.parquet",
            "dead_letters.parquet",
            "summary.json",
        ] {
            let a = std::fs::read(runs[0].join(file)).unwrap();
            let b = std::fs::read(runs[1].join(file)).unwrap();
            assert!(!a.is_empty());
            assert!(a == b, "{file} differs between two replays");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Long and wide CSV and Parquet give the same samples as the same data in native JSON; bad
    /// rows become dead letters with their reason; `--sql` filters.
    #[tokio::test]
    async fn tables_replay_like_native_json() {
        let dir = tmp("tables");
        let t0 = 1_767_225_600_000i64;
        let mut json = String::new();
        let mut long = String::from("timestamp,entity,metric,value\n");
        let mut wide = String::from("time,cpu_pct,mem_used_pct\n");
        for i in 0..240i64 {
            let t = t0 + i * 60_000;
            let cpu = 40.0 + (i % 7) as f64;
            let mem = 50.0 + i as f64 * 0.2;
            for (m, v) in [("cpu_pct", cpu), ("mem_used_pct", mem)] {
                json.push_str(&format!(
                    "{{\"entity\":\"node-1\",\"metric\":\"{m}\",\"time\":{t},\"value\":{v}}}\n"
                ));
                let ts = DateTime::from_timestamp_millis(t).unwrap().to_rfc3339();
                long.push_str(&format!("{ts},node-1,{m},{v}\n"));
            }
            wide.push_str(&format!("{t},{cpu},{mem}\n"));
        }
        long.push_str("not a time,node-1,cpu_pct,1\n");
        long.push_str("2026-01-01T05:00:00Z,node-1,cpu_pct,\n");
        std::fs::write(dir.join("in.jsonl"), &json).unwrap();
        std::fs::write(dir.join("long.csv"), &long).unwrap();
        std::fs::write(dir.join("node-1.csv"), &wide).unwrap();
        let config = Config::embedded();
        let run = |inputs: Vec<PathBuf>, sql: Option<&str>| {
            let config = config.clone();
            let options = ReplayOptions {
                sql: sql.map(str::to_owned),
                ..Default::default()
            };
            async move { replay(&config, &inputs, &options).await.unwrap() }
        };
        let native = run(vec![dir.join("in.jsonl")], None).await;
        let long_run = run(vec![dir.join("long.csv")], None).await;
        let wide_run = run(vec![dir.join("node-1.csv")], None).await;
        assert_eq!(native.outputs.samples, 480);
        assert!(!native.outputs.scores.is_empty());
        for other in [&long_run, &wide_run] {
            assert_eq!(other.outputs.samples, native.outputs.samples);
            assert_eq!(other.outputs.scores, native.outputs.scores);
            assert_eq!(other.outputs.decisions, native.outputs.decisions);
        }
        let reasons: Vec<&str> = long_run
            .outputs
            .dead_letters
            .iter()
            .map(|d| d.reason.as_str())
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("not a time"), "{reasons:?}");
        assert!(
            reasons[1].contains("missing or not a number"),
            "{reasons:?}"
        );
        assert!(
            String::from_utf8_lossy(&long_run.outputs.dead_letters[0].payload)
                .contains("not a time")
        );

        // The same table as Parquet (written through the run-directory writer's arrow types).
        let batches = sql_batches_of_csv(&dir.join("long.csv")).await;
        let parquet = dir.join("long.parquet");
        tables::write_parquet(&parquet, &batches).unwrap();
        let parquet_run = run(vec![parquet.clone()], None).await;
        assert_eq!(parquet_run.outputs.scores, native.outputs.scores);

        // A filter: one metric only.
        let cpu = run(
            vec![parquet],
            Some("SELECT * FROM input WHERE metric = 'cpu_pct'"),
        )
        .await;
        assert_eq!(cpu.outputs.samples, 240);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    async fn sql_batches_of_csv(path: &Path) -> RecordBatch {
        let mut stream = query(path, None).await.unwrap();
        let mut batches = Vec::new();
        while let Some(b) = stream.next().await {
            batches.push(b.unwrap());
        }
        datafusion::arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    }
}
