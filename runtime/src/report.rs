//! The backtest report: one self-contained HTML file (inline SVG charts and CSS, nothing fetched
//! when it is opened) that shows what Foresight would have done on a history:
//!
//! - the headline numbers of the backtest ([`crate::backtest`]);
//! - per entity (those that failed or were acted on first): the metric behind its risk with the
//!   forecast at the horizon, its 80% band and the failure threshold; and its risk over time with
//!   the band thresholds, its decisions and its failures marked;
//! - a heat map of the fleet's risk over time;
//! - the calibration curve (reliability diagram).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use chrono::{DateTime, Duration as Delta, Utc};
use foresight_events::{Decision, EntityId, FailureReport, RiskScore};
use plotters::{coord::Shift, prelude::*};

use crate::{backtest::Backtest, config::Config};

/// Entities drawn one by one.
const MAX_ENTITY_CHARTS: usize = 8;
/// Rows of the heat map.
const MAX_HEATMAP_ROWS: usize = 60;
/// Columns of the heat map.
const HEATMAP_COLUMNS: usize = 96;

/// Why the report could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing the report: {0}")]
pub struct ReportError(String);

fn draw_err<E: std::fmt::Debug>(e: E) -> ReportError {
    ReportError(format!("{e:?}"))
}

/// What the report shows.
#[derive(Debug, Clone, Copy)]
pub struct ReportInput<'a> {
    /// A title (e.g. the inputs replayed).
    pub title: &'a str,
    /// The run's scores.
    pub scores: &'a [RiskScore],
    /// Its decisions.
    pub decisions: &'a [Decision],
    /// The labels.
    pub failures: &'a [FailureReport],
    /// The backtest of the run against the labels.
    pub backtest: &'a Backtest,
    /// The configuration it ran with (thresholds, bands).
    pub config: &'a Config,
}

/// Hours since `t0`, the x axis of the time charts.
fn hours(t0: DateTime<Utc>, t: DateTime<Utc>) -> f64 {
    (t - t0).num_milliseconds() as f64 / 3_600_000.0
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Green (0) through amber to red (1).
fn heat(p: f64) -> RGBColor {
    let p = p.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64, t: f64| (a + (b - a) * t).round() as u8;
    if p < 0.5 {
        let t = p / 0.5;
        RGBColor(
            lerp(46.0, 255.0, t),
            lerp(160.0, 193.0, t),
            lerp(67.0, 7.0, t),
        )
    } else {
        let t = (p - 0.5) / 0.5;
        RGBColor(
            lerp(255.0, 200.0, t),
            lerp(193.0, 30.0, t),
            lerp(7.0, 30.0, t),
        )
    }
}

const OBSERVED: RGBColor = RGBColor(31, 119, 180);
const FORECAST: RGBColor = RGBColor(148, 103, 189);
const THRESHOLD: RGBColor = RGBColor(214, 39, 40);
const DECISION: RGBColor = RGBColor(255, 127, 14);

/// Renders the report.
pub fn render(input: &ReportInput<'_>) -> Result<String, ReportError> {
    let scores = input.scores;
    let Some(t0) = scores.iter().map(|s| s.time).min() else {
        return Ok(page(
            input,
            "<p class=\"empty\">No scores: nothing to chart.</p>",
        ));
    };
    let t1 = scores.iter().map(|s| s.time).max().unwrap_or(t0);
    let span = hours(t0, t1).max(1.0 / 60.0);
    let mut body = String::new();

    let mut by_entity: BTreeMap<&EntityId, Vec<&RiskScore>> = BTreeMap::new();
    for s in scores {
        by_entity.entry(&s.entity).or_default().push(s);
    }
    // The entities to draw one by one: failed first, then acted on, then the riskiest.
    let mut riskiest: Vec<(&EntityId, f64)> = by_entity
        .iter()
        .map(|(e, ss)| (*e, ss.iter().map(|s| s.probability).fold(0.0, f64::max)))
        .collect();
    riskiest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let candidates = input
        .failures
        .iter()
        .map(|f| &f.entity)
        .chain(input.decisions.iter().map(|d| &d.entity))
        .chain(riskiest.iter().map(|(e, _)| *e));
    let mut chosen: Vec<&EntityId> = Vec::new();
    for e in candidates {
        if let Some((k, _)) = by_entity.get_key_value(e)
            && !chosen.contains(k)
            && chosen.len() < MAX_ENTITY_CHARTS
        {
            chosen.push(k);
        }
    }

    body.push_str("<h2>Entities</h2>\n");
    for entity in &chosen {
        let series = &by_entity[entity];
        let failures: Vec<&FailureReport> = input
            .failures
            .iter()
            .filter(|f| &f.entity == *entity)
            .collect();
        let decisions: Vec<&Decision> = input
            .decisions
            .iter()
            .filter(|d| &d.entity == *entity)
            .collect();
        let _ = writeln!(
            body,
            "<section class=\"entity\"><h3>{}</h3><p>{} scores, {} decision(s), {} failure(s){}</p>",
            escape(entity.as_str()),
            series.len(),
            decisions.len(),
            failures.len(),
            failures
                .iter()
                .map(|f| format!(
                    ": {} at {}",
                    escape(&f.kind),
                    f.time.format("%Y-%m-%d %H:%M")
                ))
                .collect::<String>()
        );
        if let Some(svg) = metric_chart(input.config, t0, span, entity, series, &failures)? {
            body.push_str(&svg);
        }
        body.push_str(&risk_chart(
            input.config,
            t0,
            span,
            series,
            &decisions,
            &failures,
        )?);
        body.push_str("</section>\n");
    }

    body.push_str("<h2>Fleet risk</h2>\n");
    body.push_str(&heat_map(t0, span, &by_entity, &riskiest, input.failures)?);
    body.push_str("<h2>Calibration</h2>\n");
    body.push_str(&calibration_chart(input.backtest)?);
    Ok(page(input, &body))
}

fn x_label(t0: DateTime<Utc>, x: f64) -> String {
    (t0 + Delta::milliseconds((x * 3_600_000.0) as i64))
        .format("%m-%d %H:%M")
        .to_string()
}

/// The metric behind an entity's risk: the one whose forecast breach was the most probable (then
/// the most often forecast), else one with a threshold, else the first observed.
fn key_metric(config: &Config, series: &[&RiskScore]) -> Option<String> {
    let mut best: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for s in series {
        for c in s
            .contributors
            .iter()
            .filter(|c| c.signal == "forecast_breach")
        {
            if let Some(m) = &c.metric {
                let e = best.entry(m.as_str()).or_insert((0.0, 0));
                e.0 = e.0.max(c.probability);
                e.1 += 1;
            }
        }
    }
    if let Some((m, _)) = best.iter().max_by(|a, b| {
        a.1.0
            .total_cmp(&b.1.0)
            .then(a.1.1.cmp(&b.1.1))
            .then(b.0.cmp(a.0))
    }) {
        return Some((*m).to_owned());
    }
    let observed: BTreeSet<&str> = series
        .iter()
        .flat_map(|s| s.observed.keys().map(String::as_str))
        .collect();
    config
        .scoring
        .thresholds
        .iter()
        .map(|t| t.metric.as_str())
        .find(|m| observed.contains(m))
        .or_else(|| observed.iter().next().copied())
        .map(str::to_owned)
}

fn svg_area(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), ReportError>,
) -> Result<String, ReportError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw(&root)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg + "\n")
}

fn metric_chart(
    config: &Config,
    t0: DateTime<Utc>,
    span: f64,
    entity: &EntityId,
    series: &[&RiskScore],
    failures: &[&FailureReport],
) -> Result<Option<String>, ReportError> {
    let Some(metric) = key_metric(config, series) else {
        return Ok(None);
    };
    let observed: Vec<(f64, f64)> = series
        .iter()
        .filter_map(|s| s.observed.get(&metric).map(|v| (hours(t0, s.time), *v)))
        .collect();
    let mut forecast = Vec::new();
    let mut band = Vec::new();
    for s in series {
        let at = hours(t0, s.time + Delta::seconds(s.horizon_seconds as i64));
        for c in &s.contributors {
            if c.signal == "forecast_breach" && c.metric.as_deref() == Some(metric.as_str()) {
                forecast.push((at, c.value));
                if let Some([lo, hi]) = c.forecast_interval {
                    band.push((at, lo, hi));
                }
            }
        }
    }
    let threshold = config
        .scoring
        .thresholds
        .iter()
        .find(|t| t.metric == metric)
        .and_then(|t| t.above.or(t.below));
    let values = observed
        .iter()
        .map(|p| p.1)
        .chain(forecast.iter().map(|p| p.1))
        .chain(band.iter().flat_map(|b| [b.1, b.2]))
        .chain(threshold)
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return Ok(None);
    }
    let pad = ((hi - lo) * 0.08).max(1e-6);
    let x_max = forecast.iter().map(|p| p.0).fold(span, f64::max);
    let title = format!(
        "{} {}: observed, forecast at the horizon (80% band), threshold",
        entity.as_str(),
        metric
    );
    svg_area(1100, 260, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(&title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, (lo - pad)..(hi + pad))
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_labels(8)
            .x_label_formatter(&|x| x_label(t0, *x))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        if band.len() > 1 {
            let mut outline: Vec<(f64, f64)> = band.iter().map(|b| (b.0, b.2)).collect();
            outline.extend(band.iter().rev().map(|b| (b.0, b.1)));
            chart
                .draw_series(std::iter::once(Polygon::new(outline, FORECAST.mix(0.18))))
                .map_err(draw_err)?
                .label("80% forecast band")
                .legend(|(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], FORECAST.mix(0.3).filled())
                });
        }
        chart
            .draw_series(LineSeries::new(
                observed.iter().copied(),
                OBSERVED.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label("observed (window mean)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], OBSERVED.stroke_width(2)));
        if !forecast.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    forecast.iter().copied(),
                    FORECAST.stroke_width(1),
                ))
                .map_err(draw_err)?
                .label("forecast at the horizon")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], FORECAST));
        }
        if let Some(limit) = threshold {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, limit), (x_max, limit)],
                    THRESHOLD.stroke_width(1),
                ))
                .map_err(draw_err)?
                .label("failure threshold")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], THRESHOLD));
        }
        for f in failures {
            let x = hours(t0, f.time);
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x, lo - pad), (x, hi + pad)],
                    BLACK.stroke_width(2),
                )))
                .map_err(draw_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(draw_err)
    })
    .map(Some)
}

fn risk_chart(
    config: &Config,
    t0: DateTime<Utc>,
    span: f64,
    series: &[&RiskScore],
    decisions: &[&Decision],
    failures: &[&FailureReport],
) -> Result<String, ReportError> {
    let bands = &config.scoring.bands;
    svg_area(1100, 220, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "risk: probability of failure within the horizon",
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..span, 0.0..1.0)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&|x| x_label(t0, *x))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        let interval: Vec<(f64, f64)> = series
            .iter()
            .map(|s| (hours(t0, s.time), s.upper))
            .chain(series.iter().rev().map(|s| (hours(t0, s.time), s.lower)))
            .collect();
        chart
            .draw_series(std::iter::once(Polygon::new(interval, OBSERVED.mix(0.15))))
            .map_err(draw_err)?;
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|s| (hours(t0, s.time), s.probability)),
                OBSERVED.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label("probability (and interval)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], OBSERVED.stroke_width(2)));
        for (level, name, color) in [
            (bands.moderate, "moderate band", RGBColor(255, 193, 7)),
            (bands.high, "high band", THRESHOLD),
        ] {
            chart
                .draw_series(LineSeries::new([(0.0, level), (span, level)], color))
                .map_err(draw_err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        if !decisions.is_empty() {
            chart
                .draw_series(decisions.iter().map(|d| {
                    TriangleMarker::new((hours(t0, d.time), d.probability), 6, DECISION.filled())
                }))
                .map_err(draw_err)?
                .label("decision")
                .legend(|(x, y)| TriangleMarker::new((x + 8, y), 5, DECISION.filled()));
        }
        if !failures.is_empty() {
            chart
                .draw_series(failures.iter().map(|f| {
                    let x = hours(t0, f.time);
                    PathElement::new(vec![(x, 0.0), (x, 1.0)], BLACK.stroke_width(2))
                }))
                .map_err(draw_err)?
                .label("failure")
                .legend(|(x, y)| {
                    PathElement::new(vec![(x + 8, y - 6), (x + 8, y + 6)], BLACK.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(draw_err)
    })
}

fn heat_map(
    t0: DateTime<Utc>,
    span: f64,
    by_entity: &BTreeMap<&EntityId, Vec<&RiskScore>>,
    riskiest: &[(&EntityId, f64)],
    failures: &[FailureReport],
) -> Result<String, ReportError> {
    // The riskiest rows, shown in name order.
    let mut rows: Vec<&EntityId> = riskiest
        .iter()
        .take(MAX_HEATMAP_ROWS)
        .map(|(e, _)| *e)
        .collect();
    rows.sort();
    let n = rows.len().max(1);
    let width = span / HEATMAP_COLUMNS as f64;
    let mut cells = Vec::new();
    for (r, entity) in rows.iter().enumerate() {
        let mut max = [f64::NAN; HEATMAP_COLUMNS];
        for s in &by_entity[entity] {
            let c = ((hours(t0, s.time) / width) as usize).min(HEATMAP_COLUMNS - 1);
            max[c] = if max[c].is_nan() {
                s.probability
            } else {
                max[c].max(s.probability)
            };
        }
        for (c, p) in max.iter().enumerate() {
            if !p.is_nan() {
                cells.push((r, c, *p));
            }
        }
    }
    let names: Vec<String> = rows.iter().map(|e| e.to_string()).collect();
    let height = (60 + 16 * n as u32).max(160);
    svg_area(1100, height, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                "highest probability per entity and time slot (green 0, red 1); black: failures",
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(120)
            .build_cartesian_2d(0.0..span, -0.5..n as f64 - 0.5)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(8)
            .y_labels(n.min(MAX_HEATMAP_ROWS))
            .x_label_formatter(&|x| x_label(t0, *x))
            .y_label_formatter(&|y| {
                // Rows are centred on whole numbers: label those only.
                let i = y.round();
                if (y - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(cells.iter().map(|&(r, c, p)| {
                let x = c as f64 * width;
                Rectangle::new(
                    [(x, r as f64 - 0.5), (x + width, r as f64 + 0.5)],
                    heat(p).filled(),
                )
            }))
            .map_err(draw_err)?;
        chart
            .draw_series(failures.iter().filter_map(|f| {
                let r = rows.iter().position(|e| **e == f.entity)?;
                let x = hours(t0, f.time);
                Some(PathElement::new(
                    vec![(x, r as f64 - 0.5), (x, r as f64 + 0.5)],
                    BLACK.stroke_width(3),
                ))
            }))
            .map_err(draw_err)?;
        Ok(())
    })
}

fn calibration_chart(backtest: &Backtest) -> Result<String, ReportError> {
    let bins = &backtest.calibration.reliability;
    svg_area(520, 420, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "reliability: Brier {:.4} (base rate {:.4})",
                    backtest.calibration.brier, backtest.calibration.brier_base_rate
                ),
                ("sans-serif", 15),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc("predicted probability")
            .y_desc("observed failure frequency")
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                RGBColor(150, 150, 150),
            ))
            .map_err(draw_err)?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RGBColor(150, 150, 150)));
        chart
            .draw_series(LineSeries::new(
                bins.iter().map(|b| (b.predicted, b.observed)),
                OBSERVED.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label("Foresight")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], OBSERVED.stroke_width(2)));
        let most = bins.iter().map(|b| b.scores).max().unwrap_or(1).max(1) as f64;
        chart
            .draw_series(bins.iter().map(|b| {
                let r = 3.0 + 7.0 * (b.scores as f64 / most).sqrt();
                Circle::new((b.predicted, b.observed), r as i32, OBSERVED.filled())
            }))
            .map_err(draw_err)?;
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(draw_err)
    })
}

fn page(input: &ReportInput<'_>, body: &str) -> String {
    let b = input.backtest;
    let pct = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{:.1}%", 100.0 * x));
    let min = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{x:.0} min"));
    let mut rows = vec![
        ("Failures (labels)".to_owned(), b.failures.to_string()),
        (
            "Recall (foreseen within the look-back)".to_owned(),
            format!("{} ({} of {})", pct(b.recall), b.foreseen, b.failures),
        ),
        (
            "Precision of alarms (high band)".to_owned(),
            format!("{} of {} alarms", pct(b.precision), b.alarms),
        ),
        (
            "Precision of decisions".to_owned(),
            format!("{} of {} decisions", pct(b.decision_precision), b.decisions),
        ),
        (
            "Lead time p10 / median / p90 / max".to_owned(),
            format!(
                "{} / {} / {} / {}",
                min(b.lead_time.p10),
                min(b.lead_time.p50),
                min(b.lead_time.p90),
                min(b.lead_time.max)
            ),
        ),
        (
            "False alarms per entity per day".to_owned(),
            format!(
                "{:.3} ({} decisions)",
                b.false_alarms_per_entity_day, b.false_alarms
            ),
        ),
        (
            "Brier score (base rate)".to_owned(),
            format!(
                "{:.4} ({:.4}) over {} scores",
                b.calibration.brier, b.calibration.brier_base_rate, b.calibration.scores
            ),
        ),
    ];
    for n in &b.nab {
        rows.push((
            format!("NAB score, {} profile", n.profile),
            format!(
                "{:.1} at the operating threshold; {:.1} at the best ({:.3})",
                n.at_threshold, n.best, n.best_threshold
            ),
        ));
    }
    rows.push((
        "Actions by type".to_owned(),
        if b.actions.is_empty() {
            "none".into()
        } else {
            b.actions
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
    ));
    let table: String = rows
        .iter()
        .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>\n", escape(k), escape(v)))
        .collect();
    let catches: String = b
        .catches
        .iter()
        .map(|c| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                escape(c.failure.entity.as_str()),
                escape(&c.failure.kind),
                c.failure.time.format("%Y-%m-%d %H:%M"),
                c.lead_minutes
                    .map_or("not foreseen".to_owned(), |m| format!("{m:.0} min ahead"))
            )
        })
        .collect();
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Foresight backtest: {title}</title>\n<style>\n\
         body {{ font-family: sans-serif; margin: 24px; color: #222; background: #fff; }}\n\
         h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; margin-top: 28px; }} h3 {{ font-size: 15px; margin: 8px 0; }}\n\
         table {{ border-collapse: collapse; margin: 8px 0; }}\n\
         th, td {{ border: 1px solid #ddd; padding: 4px 10px; text-align: left; font-size: 13px; }}\n\
         th {{ background: #f4f4f4; }}\n\
         section.entity {{ border-top: 1px solid #eee; padding-top: 6px; }}\n\
         svg {{ display: block; max-width: 100%; height: auto; }}\n\
         .empty {{ color: #888; }}\n\
         </style></head><body>\n<h1>Foresight backtest: {title}</h1>\n\
         <p>{entities} entities over {days:.1} days; look-back {lookback} min.</p>\n\
         <table>{table}</table>\n<h2>Failures</h2>\n\
         <table><tr><th>entity</th><th>kind</th><th>time</th><th>first alarm</th></tr>\n{catches}</table>\n\
         {body}</body></html>\n",
        title = escape(input.title),
        entities = b.entities,
        days = b.days,
        lookback = b.lookback_minutes,
    )
}
