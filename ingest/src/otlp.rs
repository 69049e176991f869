//! OTLP, as the OpenTelemetry Collector's Kafka exporter writes it: `otlp_proto` (protobuf) and
//! `otlp_json` (OTLP/JSON) encodings of the metrics, logs and traces export requests.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use chrono::{DateTime, Utc};
use foresight_events::{
    DependencyEdge, EntityId, ErrorClass, LogEvent, MetricKind, MetricSample, Rejection, Severity,
    Telemetry,
};
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::ExportLogsServiceRequest, metrics::v1::ExportMetricsServiceRequest,
        trace::v1::ExportTraceServiceRequest,
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, NumberDataPoint, ResourceMetrics, metric::Data, number_data_point,
    },
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode},
};
use prost::Message as _;

use crate::{
    Decoded, IngestConfig, Signal,
    checks::{At, entity, nanos},
    entity::{Labels, Resolver},
};

/// Attributes that name the peer of a client span, in order of preference.
const PEER_KEYS: [&str; 5] = [
    "peer.service",
    "server.address",
    "net.peer.name",
    "db.system",
    "messaging.system",
];

pub(crate) fn decode_proto(
    bytes: &[u8],
    signal: Signal,
    config: &IngestConfig,
    checks: &At<'_>,
) -> Decoded {
    let undecodable = |e: prost::DecodeError, what: &str| {
        Decoded::rejected(
            ErrorClass::Undecodable,
            format!("not an OTLP {what} protobuf: {e}"),
        )
    };
    match signal {
        Signal::Metrics => match metrics_stream(bytes, config, checks) {
            Some(decoded) => decoded,
            None => match ExportMetricsServiceRequest::decode(bytes) {
                Ok(r) => metrics(r, config, checks),
                Err(e) => undecodable(e, "ExportMetricsServiceRequest"),
            },
        },
        Signal::Logs => match ExportLogsServiceRequest::decode(bytes) {
            Ok(r) => logs(r, config, checks),
            Err(e) => undecodable(e, "ExportLogsServiceRequest"),
        },
        Signal::Traces => match ExportTraceServiceRequest::decode(bytes) {
            Ok(r) => traces(r, checks),
            Err(e) => undecodable(e, "ExportTraceServiceRequest"),
        },
    }
}

pub(crate) fn decode_json(bytes: &[u8], config: &IngestConfig, checks: &At<'_>) -> Decoded {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Decoded::rejected(ErrorClass::InvalidUtf8, format!("not UTF-8: {e}"));
    }
    let head = &bytes[..bytes.len().min(512)];
    let has = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
    let undecodable = |e: serde_json::Error, what: &str| {
        Decoded::rejected(
            ErrorClass::Undecodable,
            format!("not OTLP/JSON {what}: {e}"),
        )
    };
    if has(b"\"resourceLogs\"") {
        match serde_json::from_slice(bytes) {
            Ok(r) => logs(r, config, checks),
            Err(e) => undecodable(e, "logs"),
        }
    } else if has(b"\"resourceSpans\"") {
        match serde_json::from_slice(bytes) {
            Ok(r) => traces(r, checks),
            Err(e) => undecodable(e, "traces"),
        }
    } else {
        match serde_json::from_slice(bytes) {
            Ok(r) => metrics(r, config, checks),
            Err(e) => undecodable(e, "metrics"),
        }
    }
}

/// An attribute value as text: strings as they are (borrowed), everything else rendered.
fn text(value: Option<&AnyValue>) -> Cow<'_, str> {
    match value.and_then(|v| v.value.as_ref()) {
        None => Cow::Borrowed(""),
        Some(any_value::Value::StringValue(s)) => Cow::Borrowed(s),
        Some(any_value::Value::BoolValue(b)) => Cow::Owned(b.to_string()),
        Some(any_value::Value::IntValue(i)) => Cow::Owned(i.to_string()),
        Some(any_value::Value::DoubleValue(d)) => Cow::Owned(d.to_string()),
        Some(any_value::Value::BytesValue(b)) => {
            Cow::Owned(b.iter().map(|x| format!("{x:02x}")).collect())
        }
        Some(any_value::Value::ArrayValue(a)) => Cow::Owned(format!(
            "[{}]",
            a.values
                .iter()
                .map(|v| text(Some(v)))
                .collect::<Vec<_>>()
                .join(",")
        )),
        Some(any_value::Value::KvlistValue(kv)) => Cow::Owned(format!(
            "{{{}}}",
            kv.values
                .iter()
                .map(|kv| format!("{}={}", kv.key, text(kv.value.as_ref())))
                .collect::<Vec<_>>()
                .join(",")
        )),
        Some(any_value::Value::StringValueStrindex(i)) => Cow::Owned(format!("strindex:{i}")),
    }
}

/// Attributes as (name, text) pairs borrowed from the message.
fn pairs(attributes: &[KeyValue]) -> Vec<(&str, Cow<'_, str>)> {
    attributes
        .iter()
        .map(|kv| (kv.key.as_str(), text(kv.value.as_ref())))
        .collect()
}

fn resource_pairs(resource: Option<&Resource>) -> Vec<(&str, Cow<'_, str>)> {
    resource.map(|r| pairs(&r.attributes)).unwrap_or_default()
}

/// Collects one record's outcome; `what` names the record in a rejection's reason.
fn push(out: &mut Decoded, what: impl FnOnce() -> String, result: Result<Telemetry, Rejection>) {
    match result {
        Ok(t) => out.telemetry.push(t),
        Err(mut r) => {
            r.reason = format!("{}: {}", what(), r.reason);
            out.rejections.push(r);
        }
    }
}

/// The p-quantile of an explicit-bounds histogram, interpolated linearly within its bucket (the
/// first bucket's lower edge is taken as 0 when its upper bound is positive, as Prometheus does).
fn histogram_quantile(
    q: f64,
    bounds: &[f64],
    counts: &[u64],
    min: Option<f64>,
    max: Option<f64>,
) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || counts.len() != bounds.len() + 1 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        if (seen + c) as f64 >= rank {
            let lower = if i == 0 {
                min.unwrap_or(bounds.first().map_or(0.0, |b| b.min(0.0)))
            } else {
                bounds[i - 1]
            };
            let upper = if i == bounds.len() {
                max.unwrap_or(lower)
            } else {
                bounds[i]
            };
            let within = (rank - seen as f64) / c as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        seen += c;
    }
    bounds.last().copied()
}

const QUANTILES: [(f64, &str); 3] = [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")];

fn quantile_name(q: f64) -> String {
    let pct = q * 100.0;
    if pct.fract() == 0.0 {
        format!("p{pct:.0}")
    } else {
        format!("p{}", pct.to_string().replace('.', "_"))
    }
}

const CUMULATIVE: i32 = AggregationTemporality::Cumulative as i32;
const DELTA: i32 = AggregationTemporality::Delta as i32;

/// The kind of a sum's points: a monotonic cumulative sum is a counter, a delta sum (monotonic or
/// not) a delta, and a non-monotonic cumulative sum (an up-down counter) the level it has reached,
/// a gauge. So is a sum of unspecified temporality, which no rate can be derived from.
fn sum_kind(temporality: i32, monotonic: bool) -> MetricKind {
    match temporality {
        DELTA => MetricKind::Delta,
        CUMULATIVE if monotonic => MetricKind::Counter,
        _ => MetricKind::Gauge,
    }
}

/// The kind of a histogram's `.count` and `.sum`: running totals when cumulative, increments
/// when delta (unspecified: a gauge, as for sums).
fn totals_kind(temporality: i32) -> MetricKind {
    match temporality {
        DELTA => MetricKind::Delta,
        CUMULATIVE => MetricKind::Counter,
        _ => MetricKind::Gauge,
    }
}

/// A sample of a data point: the suffix of its metric name (empty for none), value and kind.
type Derived = (Cow<'static, str>, f64, MetricKind);

/// Metric samples as they are normalised, one resource at a time, and the space reused from
/// one data point to the next.
struct Metrics<'c> {
    config: &'c IngestConfig,
    checks: &'c At<'c>,
    out: Decoded,
    /// For sorting a point's attributes.
    order: Vec<usize>,
    /// A point's series selector.
    series: String,
    /// The last point's time: the points of one scrape share theirs.
    time: Option<(u64, DateTime<Utc>)>,
    /// The last resource's labels, shared with the next resource when it has the same.
    labels: Option<Arc<BTreeMap<String, String>>>,
}

impl<'c> Metrics<'c> {
    fn new(config: &'c IngestConfig, checks: &'c At<'c>, capacity: usize) -> Self {
        Self {
            config,
            checks,
            out: Decoded {
                telemetry: Vec::with_capacity(capacity),
                rejections: Vec::new(),
            },
            order: Vec::new(),
            series: String::new(),
            time: None,
            labels: None,
        }
    }

    /// Normalises the metrics of one resource.
    fn resource(&mut self, rm: &ResourceMetrics) {
        let resource = resource_pairs(rm.resource.as_ref());
        let resolver = Resolver::reusing(
            &self.config.entity_keys,
            &resource,
            &self.config.resource_labels,
            self.labels.as_ref(),
        );
        self.labels = Some(Arc::clone(resolver.labels()));
        // The last point's attributes as (name, text) and what they identify, and the samples of
        // a histogram or summary point.
        let mut pairs = Vec::new();
        let mut identified = None;
        let mut derived: Vec<Derived> = Vec::new();
        for sm in &rm.scope_metrics {
            for metric in &sm.metrics {
                let name = metric.name.as_str();
                let Some(data) = &metric.data else { continue };
                let mut point = Point {
                    metrics: self,
                    resolver: &resolver,
                    pairs: &mut pairs,
                    identified: &mut identified,
                    name,
                };
                match data {
                    Data::Gauge(g) => {
                        for dp in &g.data_points {
                            point.emit(
                                &dp.attributes,
                                dp.time_unix_nano,
                                &[("".into(), number(dp), MetricKind::Gauge)],
                            );
                        }
                    }
                    Data::Sum(s) => {
                        let kind = sum_kind(s.aggregation_temporality, s.is_monotonic);
                        for dp in &s.data_points {
                            point.emit(
                                &dp.attributes,
                                dp.time_unix_nano,
                                &[("".into(), number(dp), kind)],
                            );
                        }
                    }
                    Data::Histogram(h) => {
                        let totals = totals_kind(h.aggregation_temporality);
                        for dp in &h.data_points {
                            derived.clear();
                            summary(&mut derived, totals, dp.count, dp.sum, dp.min, dp.max);
                            for (q, label) in QUANTILES {
                                if let Some(v) = histogram_quantile(
                                    q,
                                    &dp.explicit_bounds,
                                    &dp.bucket_counts,
                                    dp.min,
                                    dp.max,
                                ) {
                                    derived.push((label.into(), v, MetricKind::Gauge));
                                }
                            }
                            point.emit(&dp.attributes, dp.time_unix_nano, &derived);
                        }
                    }
                    Data::ExponentialHistogram(h) => {
                        let totals = totals_kind(h.aggregation_temporality);
                        for dp in &h.data_points {
                            derived.clear();
                            summary(&mut derived, totals, dp.count, dp.sum, dp.min, dp.max);
                            if let Some(pos) = &dp.positive {
                                // Bucket i covers (base^(offset+i), base^(offset+i+1)], base = 2^(2^-scale).
                                let base = 2f64.powf(2f64.powi(-dp.scale));
                                let bounds: Vec<f64> = (0..=pos.bucket_counts.len())
                                    .map(|i| base.powi(pos.offset + i as i32))
                                    .collect();
                                let mut counts = vec![dp.zero_count];
                                counts.extend(&pos.bucket_counts);
                                counts.push(0);
                                for (q, label) in QUANTILES {
                                    if let Some(v) =
                                        histogram_quantile(q, &bounds, &counts, dp.min, dp.max)
                                    {
                                        derived.push((label.into(), v, MetricKind::Gauge));
                                    }
                                }
                            }
                            point.emit(&dp.attributes, dp.time_unix_nano, &derived);
                        }
                    }
                    Data::Summary(s) => {
                        // A summary's count and sum are cumulative by definition.
                        for dp in &s.data_points {
                            derived.clear();
                            summary(
                                &mut derived,
                                MetricKind::Counter,
                                dp.count,
                                Some(dp.sum),
                                None,
                                None,
                            );
                            derived.extend(dp.quantile_values.iter().map(|q| {
                                (quantile_name(q.quantile).into(), q.value, MetricKind::Gauge)
                            }));
                            point.emit(&dp.attributes, dp.time_unix_nano, &derived);
                        }
                    }
                }
            }
        }
    }

    /// A point's time, converted once for all the points that share it.
    fn time(&mut self, ns: u64) -> Result<DateTime<Utc>, Rejection> {
        match self.time {
            Some((known, time)) if known == ns => Ok(time),
            _ => {
                let time = nanos(ns, "timeUnixNano")?;
                self.time = Some((ns, time));
                Ok(time)
            }
        }
    }
}

/// The data points of one metric.
struct Point<'m, 'c, 'r> {
    metrics: &'m mut Metrics<'c>,
    resolver: &'m Resolver<'c>,
    /// The last point's attributes.
    pairs: &'m mut Vec<(&'r str, Cow<'r, str>)>,
    /// The entity and labels the last point's attributes identify (its series selector is in
    /// `metrics.series`): the points of one resource mostly have the same attributes (`cpu`,
    /// `state`, ...) from one metric to the next, and are then identified once.
    identified: &'m mut Option<Result<(EntityId, Labels), Rejection>>,
    name: &'r str,
}

impl<'r> Point<'_, '_, 'r> {
    /// Validates one data point and its samples: entity, series and time are worked out once
    /// for all the samples of the point.
    fn emit(&mut self, attributes: &'r [KeyValue], time_unix_nano: u64, samples: &[Derived]) {
        let m = &mut *self.metrics;
        let identified = match self.identified.take() {
            Some(known) if same_attributes(attributes, self.pairs) => known,
            _ => {
                self.pairs.clear();
                self.pairs.extend(
                    attributes
                        .iter()
                        .map(|kv| (kv.key.as_str(), text(kv.value.as_ref()))),
                );
                self.resolver.point(self.pairs, &mut m.order, &mut m.series)
            }
        };
        let time = m.time(time_unix_nano);
        let name = self.name;
        for (suffix, value, kind) in samples {
            let rejection = match (&identified, &time) {
                (Ok((id, labels)), Ok(t)) => {
                    let series = &m.series;
                    let mut metric =
                        String::with_capacity(name.len() + 1 + suffix.len() + series.len());
                    metric.push_str(name);
                    if !suffix.is_empty() {
                        metric.push('.');
                        metric.push_str(suffix);
                    }
                    metric.push_str(series);
                    match m.checks.sample_time(&metric, *t, *value) {
                        // Built here rather than by `At::sample`, whose result would be moved
                        // twice more on its way into the output, once for every sample.
                        Ok(time) => {
                            m.out.telemetry.push(Telemetry::Sample(MetricSample {
                                entity: id.clone(),
                                metric,
                                time,
                                value: *value,
                                // The samples share their resource's labels.
                                labels: Arc::clone(labels),
                                kind: *kind,
                            }));
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                (Err(e), _) => e.clone(),
                (_, Err(e)) => e.clone(),
            };
            push(
                &mut m.out,
                || format!("metric {name}.{suffix}"),
                Err(rejection),
            );
        }
        *self.identified = Some(identified);
    }
}

/// Whether `attributes` are, as text, the `pairs` of the point before.
fn same_attributes(attributes: &[KeyValue], pairs: &[(&str, Cow<'_, str>)]) -> bool {
    attributes.len() == pairs.len()
        && attributes
            .iter()
            .zip(pairs)
            .all(|(kv, (name, value))| kv.key == *name && text(kv.value.as_ref()) == *value)
}

/// How many samples the metrics of a resource yield, at least (one per data point); for
/// reserving space.
fn data_points(rm: &ResourceMetrics) -> usize {
    rm.scope_metrics
        .iter()
        .flat_map(|sm| &sm.metrics)
        .map(|m| match &m.data {
            None => 0,
            Some(Data::Gauge(g)) => g.data_points.len(),
            Some(Data::Sum(s)) => s.data_points.len(),
            Some(Data::Histogram(h)) => h.data_points.len(),
            Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
            Some(Data::Summary(s)) => s.data_points.len(),
        })
        .sum()
}

/// An `ExportMetricsServiceRequest` read one `ResourceMetrics` at a time, each decoded (by the
/// generated type) and normalised before the next is read, so the memory of one is reused for
/// the next and only one resource's decoded tree is alive at a time. The request's only field is
/// `resource_metrics` (field 1, length-delimited: key byte 0x0a); anything else, and any decoding
/// error, gives `None`, and the whole request is then decoded as one (same samples, or the same
/// error). The one difference: prost's nesting limit (100) counts from each resource rather than
/// from the request, one level more for deeply nested attribute values.
fn metrics_stream(bytes: &[u8], config: &IngestConfig, checks: &At<'_>) -> Option<Decoded> {
    const RESOURCE_METRICS_KEY: u8 = 1 << 3 | 2;
    let mut m = Metrics::new(config, checks, 0);
    // One resource's decoded tree, cleared and merged into again for the next: what `decode`
    // does, reusing its top-level buffers.
    let mut rm = ResourceMetrics::default();
    let mut buf = bytes;
    while let Some((&key, rest)) = buf.split_first() {
        if key != RESOURCE_METRICS_KEY {
            return None;
        }
        buf = rest;
        let len = prost::decode_length_delimiter(&mut buf).ok()?;
        if len > buf.len() {
            return None;
        }
        let (message, rest) = buf.split_at(len);
        buf = rest;
        rm.clear();
        rm.merge(message).ok()?;
        let points = data_points(&rm);
        if m.out.telemetry.capacity() == 0 {
            // Space for the whole request, if its resources are alike.
            let estimate = points.saturating_mul(bytes.len() / len.max(1));
            m.out.telemetry.reserve(estimate.min(bytes.len() / 16));
        }
        m.out.telemetry.reserve(points);
        m.resource(&rm);
    }
    Some(m.out)
}

fn metrics(
    request: ExportMetricsServiceRequest,
    config: &IngestConfig,
    checks: &At<'_>,
) -> Decoded {
    let capacity = request.resource_metrics.iter().map(data_points).sum();
    let mut m = Metrics::new(config, checks, capacity);
    for rm in &request.resource_metrics {
        m.resource(rm);
    }
    m.out
}

/// A distribution's `count` and `sum` (running totals or increments, as `totals` says) and its
/// `min` and `max` (levels).
fn summary(
    derived: &mut Vec<Derived>,
    totals: MetricKind,
    count: u64,
    sum: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
) {
    derived.push(("count".into(), count as f64, totals));
    derived.extend(sum.map(|s| ("sum".into(), s, totals)));
    derived.extend(min.map(|m| ("min".into(), m, MetricKind::Gauge)));
    derived.extend(max.map(|m| ("max".into(), m, MetricKind::Gauge)));
}

/// A number data point's value.
fn number(dp: &NumberDataPoint) -> f64 {
    match dp.value {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => f64::NAN, // refused by the checks as "not a finite value"
    }
}

/// OTLP severity number (1-24) to ours; unset falls back to the severity text, then `info`.
fn severity(number: i32, text: &str) -> Severity {
    match number {
        1..=4 => Severity::Trace,
        5..=8 => Severity::Debug,
        9..=12 => Severity::Info,
        13..=16 => Severity::Warn,
        17..=20 => Severity::Error,
        21..=24 => Severity::Fatal,
        _ => match text.to_ascii_lowercase().as_str() {
            "trace" => Severity::Trace,
            "debug" => Severity::Debug,
            "warn" | "warning" => Severity::Warn,
            "error" | "err" => Severity::Error,
            "fatal" | "critical" | "crit" | "emerg" | "alert" => Severity::Fatal,
            _ => Severity::Info,
        },
    }
}

fn logs(request: ExportLogsServiceRequest, config: &IngestConfig, checks: &At<'_>) -> Decoded {
    let mut out = Decoded::default();
    for rl in request.resource_logs {
        let resource = resource_pairs(rl.resource.as_ref());
        let resolver = Resolver::new(&config.entity_keys, &resource, &config.resource_labels);
        for sl in rl.scope_logs {
            for record in sl.log_records {
                let result = (|| {
                    let attributes = pairs(&record.attributes);
                    let (entity, attributes) = resolver.identify(&attributes)?;
                    let ns = if record.time_unix_nano != 0 {
                        record.time_unix_nano
                    } else {
                        record.observed_time_unix_nano
                    };
                    let time = checks.time(nanos(ns, "timeUnixNano")?)?;
                    Ok(Telemetry::Log(LogEvent {
                        entity,
                        time,
                        severity: severity(record.severity_number, &record.severity_text),
                        body: text(record.body.as_ref()).into_owned(),
                        attributes,
                    }))
                })();
                push(&mut out, || "log record".into(), result);
            }
        }
    }
    out
}

struct Call {
    service: String,
    kind: SpanKind,
    peer: Option<String>,
    parent: Vec<u8>,
    end: u64,
    latency_ms: f64,
    error: bool,
}

#[derive(Default)]
struct Tally {
    calls: u64,
    errors: u64,
    latency_ms_sum: f64,
    latency_ms_max: f64,
    end: u64,
}

/// Spans to caller -> callee edges. A server or consumer span whose parent (in the same message)
/// belongs to another service is a call from that service; a client or producer span naming its
/// peer (`peer.service`, `server.address`, ...) with no such child in the message is a call to the
/// peer. Calls are counted per (caller, callee) over the message.
fn traces(request: ExportTraceServiceRequest, checks: &At<'_>) -> Decoded {
    let mut out = Decoded::default();
    let mut spans: HashMap<Vec<u8>, Call> = HashMap::new();
    let mut order = Vec::new();
    for rs in request.resource_spans {
        let resource = resource_pairs(rs.resource.as_ref());
        let service = resource
            .iter()
            .find(|(k, _)| *k == "service.name")
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                let attributes = pairs(&span.attributes);
                let peer = PEER_KEYS
                    .iter()
                    .find_map(|k| {
                        attributes
                            .iter()
                            .find(|(name, v)| name == k && !v.is_empty())
                    })
                    .map(|(_, v)| v.to_string());
                let error = span
                    .status
                    .as_ref()
                    .is_some_and(|s| s.code == StatusCode::Error as i32);
                let latency_ms =
                    span.end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano) as f64
                        / 1e6;
                order.push(span.span_id.clone());
                spans.insert(
                    span.span_id,
                    Call {
                        service: service.clone(),
                        kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                        peer,
                        parent: span.parent_span_id,
                        end: span.end_time_unix_nano,
                        latency_ms,
                        error,
                    },
                );
            }
        }
    }
    // Client spans that have a server child from another service in this message.
    let mut answered: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    let mut edges: BTreeMap<(String, String), Tally> = BTreeMap::new();
    let mut count = |caller: &str, callee: &str, c: &Call| {
        let t = edges
            .entry((caller.to_owned(), callee.to_owned()))
            .or_default();
        t.calls += 1;
        t.errors += u64::from(c.error);
        t.latency_ms_sum += c.latency_ms;
        t.latency_ms_max = t.latency_ms_max.max(c.latency_ms);
        t.end = t.end.max(c.end);
    };
    for id in &order {
        let c = &spans[id];
        if matches!(c.kind, SpanKind::Server | SpanKind::Consumer)
            && let Some(parent) = spans.get(&c.parent)
            && parent.service != c.service
            && !parent.service.is_empty()
            && !c.service.is_empty()
        {
            count(&parent.service, &c.service, c);
            answered.insert(c.parent.as_slice());
        }
    }
    for id in &order {
        let c = &spans[id];
        if matches!(c.kind, SpanKind::Client | SpanKind::Producer)
            && !answered.contains(id.as_slice())
            && let Some(peer) = &c.peer
            && !c.service.is_empty()
        {
            count(&c.service, peer, c);
        }
    }
    for ((caller, callee), t) in edges {
        let result = (|| {
            let (caller, callee): (EntityId, EntityId) = (entity(&caller)?, entity(&callee)?);
            let time: DateTime<Utc> = checks.time(nanos(t.end, "endTimeUnixNano")?)?;
            Ok(Telemetry::Edge(DependencyEdge {
                caller,
                callee,
                time,
                calls: t.calls,
                errors: t.errors,
                latency_ms_sum: t.latency_ms_sum,
                latency_ms_max: t.latency_ms_max,
            }))
        })();
        push(&mut out, || "span".into(), result);
    }
    out
}

#[cfg(test)]
mod tests {
    use foresight_events::{MetricSample, Telemetry};
    use opentelemetry_proto::tonic::{
        common::v1::{AnyValue, KeyValue, any_value::Value},
        logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
        metrics::v1::{
            ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram,
            HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
            Summary, SummaryDataPoint, exponential_histogram_data_point, metric,
            summary_data_point,
        },
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span, Status},
    };
    use proptest::prelude::*;

    use super::*;
    use crate::{Decoder, Format, IngestConfig};

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn resource(attrs: &[(&str, &str)]) -> Option<Resource> {
        Some(Resource {
            attributes: attrs.iter().map(|(k, v)| kv(k, v)).collect(),
            ..Default::default()
        })
    }

    fn gauge_request(host: &str, name: &str, points: &[(u64, f64)]) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: resource(&[("host.name", host)]),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: name.into(),
                        data: Some(metric::Data::Gauge(Gauge {
                            data_points: points
                                .iter()
                                .map(|(t, v)| NumberDataPoint {
                                    time_unix_nano: *t,
                                    value: Some(number_data_point::Value::AsDouble(*v)),
                                    attributes: vec![kv("cpu", "0")],
                                    ..Default::default()
                                })
                                .collect(),
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn decoder() -> Decoder {
        Decoder::new(IngestConfig::default())
    }

    /// The request decoded from its protobuf and from its OTLP/JSON (detected) encodings.
    fn proto_and_json(req: &ExportMetricsServiceRequest) -> (Decoded, Decoded) {
        let decode =
            |bytes: &[u8], format| decoder().decode(bytes, format, Signal::Metrics, None, None);
        (
            decode(&req.encode_to_vec(), Format::OtlpProto),
            decode(&serde_json::to_vec(req).unwrap(), Format::Auto),
        )
    }

    fn samples(d: &Decoded) -> Vec<MetricSample> {
        d.samples().cloned().collect()
    }

    #[test]
    fn gauges_in_proto_and_json_give_the_same_samples() {
        let req = gauge_request(
            "h1",
            "system.cpu.utilization",
            &[(1_700_000_000_000_000_000, 0.5)],
        );
        let (proto, json) = proto_and_json(&req);
        assert_eq!(samples(&proto), samples(&json));
        let s = &samples(&proto)[0];
        assert_eq!(
            (s.entity.as_str(), s.metric.as_str(), s.value),
            ("h1", r#"system.cpu.utilization{cpu="0"}"#, 0.5)
        );
        assert!(
            s.labels.is_empty(),
            "only promoted resource attributes, and host.name named the entity"
        );
    }

    #[test]
    fn histograms_become_count_sum_and_quantiles() {
        let req = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: resource(&[("service.name", "api")]),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "http.server.duration".into(),
                        data: Some(metric::Data::Histogram(Histogram {
                            data_points: vec![HistogramDataPoint {
                                time_unix_nano: 1_700_000_000_000_000_000,
                                count: 100,
                                sum: Some(2500.0),
                                explicit_bounds: vec![10.0, 50.0, 100.0],
                                bucket_counts: vec![50, 40, 10, 0],
                                ..Default::default()
                            }],
                            aggregation_temporality: 2,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let d = decoder().decode(
            &req.encode_to_vec(),
            Format::OtlpProto,
            Signal::Metrics,
            None,
            None,
        );
        let by: BTreeMap<String, f64> = samples(&d)
            .into_iter()
            .map(|s| (s.metric, s.value))
            .collect();
        assert_eq!(by["http.server.duration.count"], 100.0);
        assert_eq!(by["http.server.duration.sum"], 2500.0);
        assert_eq!(by["http.server.duration.p50"], 10.0);
        assert!(
            (by["http.server.duration.p95"] - 75.0).abs() < 1e-9,
            "{by:?}"
        );
        assert!(by["http.server.duration.p99"] > 90.0);
    }

    #[test]
    fn logs_keep_severity_body_and_attributes() {
        let req = ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: resource(&[("host.name", "h1")]),
                scope_logs: vec![ScopeLogs {
                    log_records: vec![
                        LogRecord {
                            time_unix_nano: 1_700_000_000_000_000_000,
                            severity_number: 17,
                            body: Some(AnyValue {
                                value: Some(Value::StringValue("disk write failed".into())),
                            }),
                            attributes: vec![kv("code", "EIO")],
                            ..Default::default()
                        },
                        LogRecord {
                            severity_number: 9,
                            ..Default::default()
                        }, // no time at all
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let d = decoder().decode(
            &req.encode_to_vec(),
            Format::OtlpProto,
            Signal::Logs,
            None,
            None,
        );
        let Telemetry::Log(log) = &d.telemetry[0] else {
            panic!("{d:?}")
        };
        assert_eq!(
            (log.entity.as_str(), log.severity, log.body.as_str()),
            ("h1", Severity::Error, "disk write failed")
        );
        assert_eq!(log.attributes["code"], "EIO");
        assert_eq!(d.rejections.len(), 1);
        assert_eq!(d.rejections[0].class, ErrorClass::MissingField);
        let json = decoder().decode(
            &serde_json::to_vec(&req).unwrap(),
            Format::Auto,
            Signal::Metrics,
            None,
            None,
        );
        assert_eq!(json, d);
    }

    fn span(
        service_span: (&[u8], &[u8]),
        kind: SpanKind,
        attrs: &[(&str, &str)],
        ms: u64,
        error: bool,
    ) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: service_span.0.to_vec(),
            parent_span_id: service_span.1.to_vec(),
            name: "call".into(),
            kind: kind as i32,
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_000_000_000 + ms * 1_000_000,
            attributes: attrs.iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(Status {
                code: if error { StatusCode::Error as i32 } else { 0 },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn service(name: &str, spans: Vec<Span>) -> ResourceSpans {
        ResourceSpans {
            resource: resource(&[("service.name", name)]),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn spans_become_dependency_edges() {
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                service(
                    "frontend",
                    vec![
                        span((b"a", b""), SpanKind::Server, &[], 30, false),
                        span(
                            (b"b", b"a"),
                            SpanKind::Client,
                            &[("peer.service", "checkout")],
                            20,
                            false,
                        ),
                        span(
                            (b"c", b"a"),
                            SpanKind::Client,
                            &[("db.system", "postgresql")],
                            5,
                            true,
                        ),
                    ],
                ),
                service(
                    "checkout",
                    vec![span((b"d", b"b"), SpanKind::Server, &[], 18, true)],
                ),
            ],
        };
        let d = decoder().decode(
            &req.encode_to_vec(),
            Format::OtlpProto,
            Signal::Traces,
            None,
            None,
        );
        let edges: Vec<&DependencyEdge> = d
            .telemetry
            .iter()
            .filter_map(|t| match t {
                Telemetry::Edge(e) => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(edges.len(), 2, "{d:?}");
        let checkout = edges
            .iter()
            .find(|e| e.callee.as_str() == "checkout")
            .unwrap();
        // Counted once (from the server side), not again from the client span.
        assert_eq!(
            (
                checkout.caller.as_str(),
                checkout.calls,
                checkout.errors,
                checkout.latency_ms_max
            ),
            ("frontend", 1, 1, 18.0)
        );
        let db = edges
            .iter()
            .find(|e| e.callee.as_str() == "postgresql")
            .unwrap();
        assert_eq!((db.calls, db.errors), (1, 1));
        let json = decoder().decode(
            &serde_json::to_vec(&req).unwrap(),
            Format::Auto,
            Signal::Metrics,
            None,
            None,
        );
        assert_eq!(json, d);
    }

    /// A point with the same attributes as the point before is identified once for both; what
    /// it gives must be what it gives alone, whatever comes before it.
    #[test]
    fn points_identified_once_give_what_they_give_alone() {
        let double = |k: &str, d: f64| KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(Value::DoubleValue(d)),
            }),
            ..Default::default()
        };
        let attributes = [
            vec![kv("cpu", "0")],
            vec![kv("cpu", "0")],
            vec![kv("k8s.pod.name", "p1"), kv("cpu", "0")],
            vec![kv("k8s.pod.name", "p1"), kv("cpu", "0")],
            vec![kv("k8s.pod.name", "p\n")],
            vec![kv("k8s.pod.name", "p\n")],
            // Equal as numbers, not as text: different series.
            vec![double("x", 0.0)],
            vec![double("x", -0.0)],
            vec![],
            vec![kv("cpu", "0")],
            vec![kv("cpu", "0"), kv("state", "used")],
        ];
        let request = |points: &[(usize, &Vec<KeyValue>)]| ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: resource(&[("host.name", "h1"), ("service.name", "api")]),
                scope_metrics: vec![ScopeMetrics {
                    metrics: points
                        .iter()
                        .map(|(i, attributes)| Metric {
                            name: format!("m{}", i % 3),
                            data: Some(metric::Data::Gauge(Gauge {
                                data_points: vec![NumberDataPoint {
                                    time_unix_nano: 1_700_000_000_000_000_000,
                                    value: Some(number_data_point::Value::AsDouble(*i as f64)),
                                    attributes: attributes.to_vec(),
                                    ..Default::default()
                                }],
                            })),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let points: Vec<(usize, &Vec<KeyValue>)> = attributes.iter().enumerate().collect();
        let (all, json) = proto_and_json(&request(&points));
        assert_eq!(all, json);
        let mut alone = Decoded::default();
        for point in &points {
            let (one, _) = proto_and_json(&request(std::slice::from_ref(point)));
            alone.telemetry.extend(one.telemetry);
            alone.rejections.extend(one.rejections);
        }
        assert_eq!(all, alone);
        assert_eq!((all.telemetry.len(), all.rejections.len()), (9, 2));
        let metrics: Vec<&str> = all.samples().map(|s| s.metric.as_str()).collect();
        assert_eq!(metrics[4..6], [r#"m0{x="0"}"#, r#"m1{x="-0"}"#]);
    }

    #[test]
    fn garbage_is_a_dead_letter() {
        let d = decoder().decode(
            &[0xff, 0xff, 0xff, 0x01],
            Format::OtlpProto,
            Signal::Metrics,
            None,
            None,
        );
        assert_eq!(d.rejections[0].class, ErrorClass::Undecodable);
        let d = decoder().decode(
            br#"{"resourceMetrics": 5}"#,
            Format::Auto,
            Signal::Metrics,
            None,
            None,
        );
        assert_eq!(d.rejections[0].class, ErrorClass::Undecodable);
        let req = gauge_request(
            "h1",
            "m",
            &[(1_700_000_000_000_000_000, f64::NAN), (0, 1.0)],
        );
        let d = decoder().decode(
            &req.encode_to_vec(),
            Format::OtlpProto,
            Signal::Metrics,
            None,
            None,
        );
        let classes: Vec<ErrorClass> = d.rejections.iter().map(|r| r.class).collect();
        assert_eq!(
            classes,
            vec![ErrorClass::InvalidValue, ErrorClass::MissingField]
        );
    }

    fn metric(name: &str, data: metric::Data) -> Metric {
        Metric {
            name: name.into(),
            data: Some(data),
            ..Default::default()
        }
    }

    fn number_points(value: f64) -> Vec<NumberDataPoint> {
        vec![NumberDataPoint {
            time_unix_nano: 1_700_000_000_000_000_000,
            value: Some(number_data_point::Value::AsDouble(value)),
            ..Default::default()
        }]
    }

    fn sum(temporality: AggregationTemporality, monotonic: bool) -> metric::Data {
        metric::Data::Sum(Sum {
            data_points: number_points(1.0),
            aggregation_temporality: temporality as i32,
            is_monotonic: monotonic,
        })
    }

    fn histogram(temporality: AggregationTemporality) -> metric::Data {
        metric::Data::Histogram(Histogram {
            data_points: vec![HistogramDataPoint {
                time_unix_nano: 1_700_000_000_000_000_000,
                count: 10,
                sum: Some(25.0),
                min: Some(0.5),
                max: Some(9.0),
                explicit_bounds: vec![1.0, 5.0],
                bucket_counts: vec![2, 5, 3],
                ..Default::default()
            }],
            aggregation_temporality: temporality as i32,
        })
    }

    fn one_resource(metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: resource(&[("host.name", "h1")]),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn metric_kinds_follow_the_type_and_temporality() {
        use AggregationTemporality::{Cumulative, Delta, Unspecified};
        use MetricKind::{Counter, Delta as Increment, Gauge as Level};
        let req = one_resource(vec![
            metric(
                "gauge",
                metric::Data::Gauge(Gauge {
                    data_points: number_points(1.0),
                }),
            ),
            metric("counter", sum(Cumulative, true)),
            metric("updown", sum(Cumulative, false)),
            metric("delta", sum(Delta, true)),
            metric("delta_updown", sum(Delta, false)),
            metric("unspecified", sum(Unspecified, true)),
            metric("hist", histogram(Cumulative)),
            metric("hist_delta", histogram(Delta)),
            metric(
                "exp_delta",
                metric::Data::ExponentialHistogram(ExponentialHistogram {
                    data_points: vec![ExponentialHistogramDataPoint {
                        time_unix_nano: 1_700_000_000_000_000_000,
                        count: 4,
                        sum: Some(10.0),
                        positive: Some(exponential_histogram_data_point::Buckets {
                            offset: 0,
                            bucket_counts: vec![1, 3],
                        }),
                        ..Default::default()
                    }],
                    aggregation_temporality: Delta as i32,
                }),
            ),
            metric(
                "summary",
                metric::Data::Summary(Summary {
                    data_points: vec![SummaryDataPoint {
                        time_unix_nano: 1_700_000_000_000_000_000,
                        count: 3,
                        sum: 6.0,
                        quantile_values: vec![summary_data_point::ValueAtQuantile {
                            quantile: 0.5,
                            value: 2.0,
                        }],
                        ..Default::default()
                    }],
                }),
            ),
        ]);
        let (proto, json) = proto_and_json(&req);
        assert!(proto.rejections.is_empty(), "{:?}", proto.rejections);
        assert_eq!(samples(&proto), samples(&json));
        let got: BTreeMap<String, MetricKind> = samples(&proto)
            .into_iter()
            .map(|s| (s.metric, s.kind))
            .collect();
        let want: BTreeMap<String, MetricKind> = [
            ("gauge", Level),
            ("counter", Counter),
            ("updown", Level),
            ("delta", Increment),
            ("delta_updown", Increment),
            ("unspecified", Level),
            ("hist.count", Counter),
            ("hist.sum", Counter),
            ("hist.min", Level),
            ("hist.max", Level),
            ("hist.p50", Level),
            ("hist.p95", Level),
            ("hist.p99", Level),
            ("hist_delta.count", Increment),
            ("hist_delta.sum", Increment),
            ("hist_delta.min", Level),
            ("hist_delta.max", Level),
            ("hist_delta.p50", Level),
            ("hist_delta.p95", Level),
            ("hist_delta.p99", Level),
            ("exp_delta.count", Increment),
            ("exp_delta.sum", Increment),
            ("exp_delta.p50", Level),
            ("exp_delta.p95", Level),
            ("exp_delta.p99", Level),
            ("summary.count", Counter),
            ("summary.sum", Counter),
            ("summary.p50", Level),
        ]
        .into_iter()
        .map(|(m, k)| (m.to_owned(), k))
        .collect();
        assert_eq!(got, want);
    }

    /// What the request decoded as a whole gives (the path of OTLP/JSON, and of protobuf
    /// requests that are not read one resource at a time).
    fn whole(bytes: &[u8]) -> Decoded {
        let config = IngestConfig::default();
        let checks = crate::checks::Checks::new(&config);
        metrics(
            ExportMetricsServiceRequest::decode(bytes).unwrap(),
            &config,
            &checks.at(None),
        )
    }

    #[test]
    fn protobuf_read_by_resource_falls_back_to_the_whole_request() {
        let mut bytes =
            gauge_request("h1", "m", &[(1_700_000_000_000_000_000, 1.0)]).encode_to_vec();
        let plain = decoder().decode(&bytes, Format::OtlpProto, Signal::Metrics, None, None);
        assert_eq!(samples(&plain).len(), 1);
        let config = IngestConfig::default();
        let checks = crate::checks::Checks::new(&config);
        assert!(metrics_stream(&bytes, &config, &checks.at(None)).is_some());
        // An unknown field (2, varint 1) is skipped, as prost skips it.
        bytes.extend([2 << 3, 1]);
        assert!(metrics_stream(&bytes, &config, &checks.at(None)).is_none());
        let unknown = decoder().decode(&bytes, Format::OtlpProto, Signal::Metrics, None, None);
        assert_eq!(unknown, plain);
        assert_eq!(whole(&bytes), plain);
        // A truncated request is undecodable, with prost's reason for the whole request.
        let cut = &bytes[..bytes.len() - 4];
        let err = ExportMetricsServiceRequest::decode(cut).unwrap_err();
        let d = decoder().decode(cut, Format::OtlpProto, Signal::Metrics, None, None);
        assert_eq!(
            d,
            Decoded::rejected(
                ErrorClass::Undecodable,
                format!("not an OTLP ExportMetricsServiceRequest protobuf: {err}")
            )
        );
    }

    #[test]
    fn histogram_quantiles_interpolate() {
        assert_eq!(
            histogram_quantile(0.5, &[1.0, 2.0], &[0, 10, 0], None, None),
            Some(1.5)
        );
        assert_eq!(histogram_quantile(0.5, &[], &[0], None, None), None);
        assert_eq!(
            histogram_quantile(0.5, &[1.0], &[1, 2, 3], None, None),
            None,
            "mismatched buckets"
        );
    }

    proptest! {
        /// Gauges round-trip through both encodings: every finite value and time comes back.
        #[test]
        fn gauge_round_trip(points in prop::collection::vec((1u64..4_000_000_000_000_000_000, -1e15f64..1e15), 1..20), host in "[a-z0-9-]{1,20}") {
            let req = gauge_request(&host, "m", &points);
            for (bytes, format) in [(req.encode_to_vec(), Format::OtlpProto), (serde_json::to_vec(&req).unwrap(), Format::OtlpJson)] {
                let d = decoder().decode(&bytes, format, Signal::Metrics, None, None);
                prop_assert!(d.rejections.is_empty(), "{:?}", d.rejections);
                let got: Vec<(i64, f64)> = samples(&d).iter().map(|s| (s.time.timestamp_nanos_opt().unwrap(), s.value)).collect();
                let want: Vec<(i64, f64)> = points.iter().map(|(t, v)| (*t as i64, *v)).collect();
                prop_assert_eq!(got, want);
            }
        }

        /// Reading a request one resource at a time gives what decoding it whole does: the same
        /// samples and rejections in the same order, whatever the resources and their points.
        #[test]
        fn read_by_resource_equals_whole(
            resources in prop::collection::vec(
                (
                    prop::option::of("[a-z0-9-]{0,6}"),
                    prop::collection::vec(
                        (
                            "[a-z.]{0,6}",
                            prop::collection::vec((0u64..3, -1e6f64..1e6, prop::option::of("[a-z0-9]{0,3}")), 0..4),
                        ),
                        0..4,
                    ),
                ),
                0..5,
            ),
        ) {
            let req = ExportMetricsServiceRequest {
                resource_metrics: resources
                    .iter()
                    .map(|(host, metrics)| ResourceMetrics {
                        resource: host.as_deref().and_then(|h| resource(&[("host.name", h), ("service.name", "api")])),
                        scope_metrics: vec![ScopeMetrics {
                            metrics: metrics
                                .iter()
                                .map(|(name, points)| Metric {
                                    name: name.clone(),
                                    data: Some(metric::Data::Gauge(Gauge {
                                        data_points: points
                                            .iter()
                                            .map(|(t, v, pod)| NumberDataPoint {
                                                time_unix_nano: t * 1_700_000_000_000_000_000,
                                                value: Some(number_data_point::Value::AsDouble(*v)),
                                                attributes: pod.iter().map(|p| kv("k8s.pod.name", p)).chain([kv("cpu", "0")]).collect(),
                                                ..Default::default()
                                            })
                                            .collect(),
                                    })),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                    .collect(),
            };
            let bytes = req.encode_to_vec();
            let d = decoder().decode(&bytes, Format::OtlpProto, Signal::Metrics, None, None);
            prop_assert_eq!(&d, &whole(&bytes));
            let json = decoder().decode(&serde_json::to_vec(&req).unwrap(), Format::OtlpJson, Signal::Metrics, None, None);
            prop_assert_eq!(d, json);
        }

        /// Arbitrary bytes never panic, whatever the format.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            for format in [Format::Auto, Format::Native, Format::OtlpProto, Format::OtlpJson, Format::Prometheus] {
                for signal in [Signal::Metrics, Signal::Logs, Signal::Traces] {
                    let _ = decoder().decode(&bytes, format, signal, None, None);
                }
            }
        }
    }
}
