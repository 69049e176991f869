//! A run's outputs as Parquet tables: `scores`, `decisions`, `outcomes`, `failures` (the labels)
//! and `dead_letters`, with the columns of the Postgres views of the same names (see
//! `docs/sql.md`), so the cookbook's questions can be asked of a replay with `foresight sql`.
//!
//! Each row keeps its event's deterministic id and, in `payload`, the event's JSON. The files are
//! byte-identical for the same outputs: uncompressed, no creation time, a fixed `created_by`.

use std::{fs::File, path::Path, sync::Arc};

use chrono::{DateTime, Utc};
use datafusion::{
    arrow::{
        array::{
            ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
        },
        datatypes::{DataType, Field, Schema, TimeUnit},
    },
    parquet::{
        arrow::ArrowWriter,
        basic::Compression,
        file::properties::{EnabledStatistics, WriterProperties},
    },
};
use foresight_events::{
    ActuationOutcome, DeadLetter, Decision, EventData, FailureReport, RiskScore,
};

/// Why a table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Arrow refused the columns (a bug).
    #[error("building table {table}: {source}")]
    Arrow {
        /// The table.
        table: &'static str,
        /// Arrow's error.
        source: datafusion::arrow::error::ArrowError,
    },
    /// The Parquet writer failed.
    #[error("writing {path}: {source}")]
    Parquet {
        /// The file.
        path: String,
        /// Parquet's error.
        source: datafusion::parquet::errors::ParquetError,
    },
    /// The file could not be created.
    #[error("creating {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
}

/// Rows per row group: bounded memory while writing, big enough for fast scans.
const ROW_GROUP_ROWS: usize = 64 * 1024;

/// Builds one table column by column.
struct Columns {
    fields: Vec<Field>,
    arrays: Vec<ArrayRef>,
}

impl Columns {
    fn new() -> Self {
        Self {
            fields: Vec::new(),
            arrays: Vec::new(),
        }
    }

    fn text<'a>(mut self, name: &str, values: impl Iterator<Item = &'a str>) -> Self {
        self.fields.push(Field::new(name, DataType::Utf8, false));
        self.arrays
            .push(Arc::new(StringArray::from_iter_values(values)) as ArrayRef);
        self
    }

    fn text_opt(mut self, name: &str, values: impl Iterator<Item = Option<String>>) -> Self {
        self.fields.push(Field::new(name, DataType::Utf8, true));
        self.arrays
            .push(Arc::new(values.collect::<StringArray>()) as ArrayRef);
        self
    }

    fn owned(self, name: &str, values: impl Iterator<Item = String>) -> Self {
        self.text_opt(name, values.map(Some)).required()
    }

    /// Marks the last column as not nullable.
    fn required(mut self) -> Self {
        if let Some(f) = self.fields.pop() {
            self.fields.push(f.with_nullable(false));
        }
        self
    }

    fn float(mut self, name: &str, values: impl Iterator<Item = f64>) -> Self {
        self.fields.push(Field::new(name, DataType::Float64, false));
        self.arrays
            .push(Arc::new(Float64Array::from_iter_values(values)) as ArrayRef);
        self
    }

    fn int(mut self, name: &str, values: impl Iterator<Item = Option<i64>>) -> Self {
        self.fields.push(Field::new(name, DataType::Int64, true));
        self.arrays
            .push(Arc::new(values.collect::<Int64Array>()) as ArrayRef);
        self
    }

    fn time(mut self, name: &str, values: impl Iterator<Item = DateTime<Utc>>) -> Self {
        self.fields.push(Field::new(
            name,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ));
        let array =
            TimestampMicrosecondArray::from_iter_values(values.map(|t| t.timestamp_micros()))
                .with_timezone("UTC");
        self.arrays.push(Arc::new(array) as ArrayRef);
        self
    }

    fn batch(self, table: &'static str) -> Result<RecordBatch, TableError> {
        RecordBatch::try_new(Arc::new(Schema::new(self.fields)), self.arrays)
            .map_err(|source| TableError::Arrow { table, source })
    }
}

fn payload<T: EventData>(e: &T) -> String {
    serde_json::to_string(e).expect("events serialise")
}

/// The `scores` table.
pub fn scores(scores: &[RiskScore]) -> Result<RecordBatch, TableError> {
    Columns::new()
        .owned("id", scores.iter().map(|s| s.id().to_string()))
        .text("entity", scores.iter().map(|s| s.entity.as_str()))
        .time("event_time", scores.iter().map(|s| s.time))
        .float("probability", scores.iter().map(|s| s.probability))
        .float("lower", scores.iter().map(|s| s.lower))
        .float("upper", scores.iter().map(|s| s.upper))
        .text("band", scores.iter().map(|s| s.band.as_str()))
        .int(
            "horizon_seconds",
            scores.iter().map(|s| Some(s.horizon_seconds as i64)),
        )
        .int(
            "time_to_failure_seconds",
            scores
                .iter()
                .map(|s| s.time_to_failure_seconds.map(|t| t as i64)),
        )
        .float("health", scores.iter().map(|s| s.health))
        .float("impact", scores.iter().map(|s| s.impact))
        .owned(
            "method",
            scores.iter().map(|s| {
                serde_json::to_value(s.method)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            }),
        )
        .text(
            "model_version",
            scores.iter().map(|s| s.model_version.as_str()),
        )
        .text_opt(
            "why",
            scores
                .iter()
                .map(|s| s.contributors.first().map(|c| c.detail.clone())),
        )
        .owned("window_id", scores.iter().map(|s| s.window_id.to_string()))
        .owned("payload", scores.iter().map(payload))
        .batch("scores")
}

/// The `decisions` table.
pub fn decisions(decisions: &[Decision]) -> Result<RecordBatch, TableError> {
    Columns::new()
        .owned("id", decisions.iter().map(|d| d.id().to_string()))
        .text("entity", decisions.iter().map(|d| d.entity.as_str()))
        .time("event_time", decisions.iter().map(|d| d.time))
        .text("policy", decisions.iter().map(|d| d.policy.as_str()))
        .text("rule", decisions.iter().map(|d| d.rule.as_str()))
        .text("action", decisions.iter().map(|d| d.action.kind.as_str()))
        .text("target", decisions.iter().map(|d| d.action.target.as_str()))
        .float("probability", decisions.iter().map(|d| d.probability))
        .float("probability_lower", decisions.iter().map(|d| d.interval[0]))
        .float("probability_upper", decisions.iter().map(|d| d.interval[1]))
        .text("band", decisions.iter().map(|d| d.band.as_str()))
        .text("reason", decisions.iter().map(|d| d.reason.as_str()))
        .owned("score_id", decisions.iter().map(|d| d.score_id.to_string()))
        .owned("payload", decisions.iter().map(payload))
        .batch("decisions")
}

/// The `outcomes` table.
pub fn outcomes(outcomes: &[ActuationOutcome]) -> Result<RecordBatch, TableError> {
    Columns::new()
        .owned("id", outcomes.iter().map(|o| o.id().to_string()))
        .text("entity", outcomes.iter().map(|o| o.entity.as_str()))
        .time("event_time", outcomes.iter().map(|o| o.time))
        .owned(
            "decision_id",
            outcomes.iter().map(|o| o.decision_id.to_string()),
        )
        .text("actuator", outcomes.iter().map(|o| o.actuator.as_str()))
        .text("status", outcomes.iter().map(|o| o.status.as_str()))
        .text("action", outcomes.iter().map(|o| o.action.kind.as_str()))
        .text("detail", outcomes.iter().map(|o| o.detail.as_str()))
        .owned("payload", outcomes.iter().map(payload))
        .batch("outcomes")
}

/// The `failures` table (the labels the run was scored against).
pub fn failures(failures: &[FailureReport]) -> Result<RecordBatch, TableError> {
    Columns::new()
        .owned("id", failures.iter().map(|f| f.id().to_string()))
        .text("entity", failures.iter().map(|f| f.entity.as_str()))
        .time("event_time", failures.iter().map(|f| f.time))
        .text("kind", failures.iter().map(|f| f.kind.as_str()))
        .text("detail", failures.iter().map(|f| f.detail.as_str()))
        .owned("payload", failures.iter().map(payload))
        .batch("failures")
}

/// The `dead_letters` table: every rejected record with where it came from and why.
pub fn dead_letters(dead: &[DeadLetter]) -> Result<RecordBatch, TableError> {
    Columns::new()
        .text("stage", dead.iter().map(|d| d.stage.as_str()))
        .text("source", dead.iter().map(|d| d.source_topic.as_str()))
        .int("position", dead.iter().map(|d| Some(d.offset)))
        .text("error_class", dead.iter().map(|d| d.error_class.as_str()))
        .text("reason", dead.iter().map(|d| d.reason.as_str()))
        .owned(
            "payload",
            dead.iter()
                .map(|d| String::from_utf8_lossy(&d.payload).into_owned()),
        )
        .batch("dead_letters")
}

/// Writes one table to `path`, deterministically.
pub fn write_parquet(path: &Path, batch: &RecordBatch) -> Result<(), TableError> {
    let name = path.display().to_string();
    let file = File::create(path).map_err(|source| TableError::Io {
        path: name.clone(),
        source,
    })?;
    let props = WriterProperties::builder()
        .set_created_by("foresight".into())
        .set_compression(Compression::UNCOMPRESSED)
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let err = |source| TableError::Parquet {
        path: name.clone(),
        source,
    };
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).map_err(err)?;
    writer.write(batch).map_err(err)?;
    writer.close().map_err(err)?;
    Ok(())
}
