//! OTLP, as the OpenTelemetry Collector's Kafka exporter writes it: `otlp_proto` (protobuf) and
//! `otlp_json` (OTLP/JSON) encodings of the metrics, logs and traces export requests.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
};

use chrono::{DateTime, Utc};
use foresight_events::{
    DependencyEdge, EntityId, ErrorClass, LogEvent, Rejection, Severity, Telemetry,
};
use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::ExportLogsServiceRequest, metrics::v1::ExportMetricsServiceRequest,
        trace::v1::ExportTraceServiceRequest,
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{metric::Data, number_data_point},
    resource::v1::Resource,
    trace::v1::{span::SpanKind, status::StatusCode},
};
use prost::Message as _;

use crate::{
    Decoded, IngestConfig, Signal,
    checks::{At, entity, nanos},
    entity::Resolver,
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
        Signal::Metrics => match ExportMetricsServiceRequest::decode(bytes) {
            Ok(r) => metrics(r, config, checks),
            Err(e) => undecodable(e, "ExportMetricsServiceRequest"),
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

/// One data point: its attributes, its time, and the (metric suffix, value) samples it yields.
type Point = (Vec<KeyValue>, u64, Vec<(String, f64)>);

const QUANTILES: [(f64, &str); 3] = [(0.5, "p50"), (0.95, "p95"), (0.99, "p99")];

fn quantile_name(q: f64) -> String {
    let pct = q * 100.0;
    if pct.fract() == 0.0 {
        format!("p{pct:.0}")
    } else {
        format!("p{}", pct.to_string().replace('.', "_"))
    }
}

fn metrics(
    request: ExportMetricsServiceRequest,
    config: &IngestConfig,
    checks: &At<'_>,
) -> Decoded {
    let mut out = Decoded::default();
    for rm in request.resource_metrics {
        let resource = resource_pairs(rm.resource.as_ref());
        let resolver = Resolver::new(&config.entity_keys, &resource, &config.resource_labels);
        for sm in rm.scope_metrics {
            for metric in sm.metrics {
                let name = metric.name;
                let Some(data) = metric.data else { continue };
                // Each data point yields one or more (suffix, value) samples.
                let mut points: Vec<Point> = Vec::new();
                match data {
                    Data::Gauge(g) => points.extend(g.data_points.into_iter().map(number)),
                    Data::Sum(s) => points.extend(s.data_points.into_iter().map(number)),
                    Data::Histogram(h) => {
                        for dp in h.data_points {
                            let mut values = vec![("count".to_owned(), dp.count as f64)];
                            values.extend(dp.sum.map(|s| ("sum".to_owned(), s)));
                            values.extend(dp.min.map(|m| ("min".to_owned(), m)));
                            values.extend(dp.max.map(|m| ("max".to_owned(), m)));
                            for (q, label) in QUANTILES {
                                if let Some(v) = histogram_quantile(
                                    q,
                                    &dp.explicit_bounds,
                                    &dp.bucket_counts,
                                    dp.min,
                                    dp.max,
                                ) {
                                    values.push((label.to_owned(), v));
                                }
                            }
                            points.push((dp.attributes, dp.time_unix_nano, values));
                        }
                    }
                    Data::ExponentialHistogram(h) => {
                        for dp in h.data_points {
                            let mut values = vec![("count".to_owned(), dp.count as f64)];
                            values.extend(dp.sum.map(|s| ("sum".to_owned(), s)));
                            values.extend(dp.min.map(|m| ("min".to_owned(), m)));
                            values.extend(dp.max.map(|m| ("max".to_owned(), m)));
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
                                        values.push((label.to_owned(), v));
                                    }
                                }
                            }
                            points.push((dp.attributes, dp.time_unix_nano, values));
                        }
                    }
                    Data::Summary(s) => {
                        for dp in s.data_points {
                            let mut values = vec![
                                ("count".to_owned(), dp.count as f64),
                                ("sum".to_owned(), dp.sum),
                            ];
                            values.extend(
                                dp.quantile_values
                                    .iter()
                                    .map(|q| (quantile_name(q.quantile), q.value)),
                            );
                            points.push((dp.attributes, dp.time_unix_nano, values));
                        }
                    }
                }
                for (attributes, time, values) in points {
                    let attributes = pairs(&attributes);
                    let mut identified = resolver.series(&attributes);
                    let time = nanos(time, "timeUnixNano");
                    let last = values.len().saturating_sub(1);
                    for (i, (suffix, value)) in values.into_iter().enumerate() {
                        let result = match (&mut identified, &time) {
                            (Ok((id, labels, series)), Ok(t)) => {
                                let metric = match suffix.is_empty() {
                                    true => format!("{name}{series}"),
                                    false => format!("{name}.{suffix}{series}"),
                                };
                                // The last sample of a point takes its labels; the others copy them.
                                let labels = if i == last {
                                    std::mem::take(labels)
                                } else {
                                    labels.clone()
                                };
                                checks
                                    .sample(id.clone(), metric, *t, value, labels)
                                    .map(Telemetry::Sample)
                            }
                            (Err(e), _) => Err(e.clone()),
                            (_, Err(e)) => Err(e.clone()),
                        };
                        push(&mut out, || format!("metric {name}.{suffix}"), result);
                    }
                }
            }
        }
    }
    out
}

fn number(dp: opentelemetry_proto::tonic::metrics::v1::NumberDataPoint) -> Point {
    let value = match dp.value {
        Some(number_data_point::Value::AsDouble(d)) => d,
        Some(number_data_point::Value::AsInt(i)) => i as f64,
        None => f64::NAN, // refused by the checks as "not a finite value"
    };
    (
        dp.attributes,
        dp.time_unix_nano,
        vec![(String::new(), value)],
    )
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
            Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics,
            ScopeMetrics, metric,
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
        let proto = decoder().decode(
            &req.encode_to_vec(),
            Format::OtlpProto,
            Signal::Metrics,
            None,
            None,
        );
        let json = decoder().decode(
            &serde_json::to_vec(&req).unwrap(),
            Format::Auto,
            Signal::Metrics,
            None,
            None,
        );
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
