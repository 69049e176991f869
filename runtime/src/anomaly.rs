//! Anomaly scores of a CSV series: `foresight replay INPUT.csv --anomaly-scores OUT.csv`.
//!
//! The input is one entity's series: a header, then rows of `timestamp,value[,value...]` (comma
//! or semicolon separated, detected from the header). Every row gets a score in `[0, 1)` from the
//! scoring stage's within-series detector, computed online: each score only from the rows up to
//! it, as the live pipeline would. The output is `timestamp,anomaly_score`, one line per input row,
//! with the timestamps as written in the input (the form the Numenta Anomaly Benchmark reads).

use std::{
    io::{Read, Write},
    path::Path,
};

use anyhow::{Context as _, bail};
use foresight_scoring::anomaly::{AnomalyConfig, AnomalyDetector};

/// One scored row.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredRow {
    /// The row's timestamp, as written in the input.
    pub timestamp: String,
    /// The anomaly score.
    pub score: f64,
}

/// Which columns of the input are the series' values.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Columns {
    /// Every column after the first (the timestamp).
    #[default]
    AllButFirst,
    /// These columns, by header name.
    Named(Vec<String>),
}

/// Scores a CSV series read from `input`.
pub fn score_csv(
    input: impl Read,
    columns: &Columns,
    config: &AnomalyConfig,
) -> anyhow::Result<Vec<ScoredRow>> {
    let mut text = String::new();
    std::io::BufReader::new(input)
        .read_to_string(&mut text)
        .context("reading the CSV input (it must be UTF-8)")?;
    let header = text.lines().next().unwrap_or_default();
    let delimiter = if header.matches(';').count() > header.matches(',').count() {
        b';'
    } else {
        b','
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let names: Vec<String> = reader.headers()?.iter().map(str::to_owned).collect();
    if names.len() < 2 {
        bail!("the CSV needs a timestamp column and at least one value column");
    }
    let indices: Vec<usize> = match columns {
        Columns::AllButFirst => (1..names.len()).collect(),
        Columns::Named(wanted) => wanted
            .iter()
            .map(|w| {
                names.iter().position(|n| n == w).with_context(|| {
                    format!("no column {w:?} in the CSV (it has {})", names.join(", "))
                })
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let mut detector = AnomalyDetector::new(config.clone(), indices.len());
    let mut rows = Vec::new();
    let mut value = vec![0.0; indices.len()];
    for (line, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("reading CSV row {}", line + 2))?;
        for (slot, &i) in value.iter_mut().zip(&indices) {
            // An empty or unparsable cell makes the row unscorable (it scores as learning); the
            // row is still written so every input row has a score.
            *slot = record
                .get(i)
                .and_then(|c| c.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
        }
        let score = detector.update(&value).score;
        rows.push(ScoredRow {
            timestamp: record.get(0).unwrap_or_default().to_owned(),
            score,
        });
    }
    Ok(rows)
}

/// Scores the CSV at `input` and writes `timestamp,anomaly_score` to `output`.
pub fn score_csv_file(
    input: &Path,
    output: &Path,
    columns: &Columns,
    config: &AnomalyConfig,
) -> anyhow::Result<usize> {
    let file =
        std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let rows = score_csv(file, columns, config).with_context(|| input.display().to_string())?;
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(output).with_context(|| format!("creating {}", output.display()))?,
    );
    writeln!(w, "timestamp,anomaly_score")?;
    for r in &rows {
        writeln!(w, "{},{:.6}", r.timestamp, r.score)?;
    }
    w.flush()?;
    Ok(rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_gets_a_score_and_columns_can_be_chosen() {
        let mut csv = String::from("datetime;a;b;anomaly\n");
        for i in 0..300 {
            let v = (i as f64 / 10.0).sin();
            let cell = if i == 150 {
                String::new()
            } else {
                format!("{v}")
            };
            csv.push_str(&format!(
                "2020-01-01 00:{:02}:{:02};{cell};{};0\n",
                i / 60,
                i % 60,
                v * 2.0
            ));
        }
        let config = AnomalyConfig::default();
        let all = score_csv(csv.as_bytes(), &Columns::AllButFirst, &config).unwrap();
        assert_eq!(all.len(), 300);
        assert_eq!(all[0].timestamp, "2020-01-01 00:00:00");
        assert_eq!(all[150].score, 0.0, "the row with an empty cell");
        let named = Columns::Named(vec!["a".into(), "b".into()]);
        assert_eq!(
            score_csv(csv.as_bytes(), &named, &config).unwrap().len(),
            300
        );
        let missing = Columns::Named(vec!["c".into()]);
        let err = score_csv(csv.as_bytes(), &missing, &config).unwrap_err();
        assert!(err.to_string().contains("no column \"c\""), "{err}");
    }
}
