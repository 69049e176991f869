//! Foresight ingest: turns telemetry in the formats users already emit into validated
//! [`MetricSample`]s, [`LogEvent`](foresight_events::LogEvent)s and
//! [`DependencyEdge`](foresight_events::DependencyEdge)s.
//!
//! Decoding is pure: bytes (+ the message's content type and timestamp) in, telemetry and
//! rejections out. A message with some bad records keeps its good ones; every bad one becomes a
//! [`Rejection`] with its class and reason, which the runtime sends to the dead-letter topic.
//!
//! | format | what | selected by |
//! |---|---|---|
//! | [`Format::Native`] | Foresight's JSON: one sample, a batch, or an array | config, or JSON that is neither of the others |
//! | [`Format::OtlpProto`] | OTLP protobuf as the OpenTelemetry Collector's Kafka exporter writes it (`otlp_proto`) | config, or `content-type: application/x-protobuf`, or non-JSON bytes |
//! | [`Format::OtlpJson`] | OTLP/JSON (`otlp_json`) | config, or JSON with `resourceMetrics` / `resourceLogs` / `resourceSpans` |
//! | [`Format::Prometheus`] | prometheus-kafka-adapter JSON (from remote-write) | config, or JSON with `labels.__name__` |
//!
//! OTLP metrics: gauges and sums become one sample per data point; histograms `NAME.count`,
//! `NAME.sum`, `NAME.min`, `NAME.max` and `NAME.p50` / `.p95` / `.p99` estimated from the buckets;
//! summaries `NAME.count`, `NAME.sum` and one `NAME.pQ` per quantile. Logs keep severity, body and
//! attributes. Spans become caller -> callee edges with call and error counts and latency.
//!
//! Each sample has a [`MetricKind`](foresight_events::MetricKind). OTLP: a monotonic cumulative
//! sum is a counter, a delta sum (monotonic or not) a delta, and anything else a gauge (a
//! non-monotonic cumulative sum is an up-down counter's level); the `.count` and `.sum` of
//! histograms are counters when cumulative and deltas when delta (summaries' are cumulative), and
//! their min, max and quantiles gauges. An unspecified temporality gives gauges. Prometheus:
//! names ending in `_total`, `_count`, `_sum` or `_bucket` are counters, the rest gauges. Native
//! JSON says so itself (`kind`, default `gauge`).
//!
//! The entity of OTLP and Prometheus records is the first of [`IngestConfig::entity_keys`] found
//! among the record's attributes (labels), then its resource's; the rest are kept as labels.
//!
//! # Native JSON (schema version 1)
//!
//! ```json
//! {"entity": "node-1", "metric": "disk_used_pct", "time": "2026-01-01T00:00:00Z", "value": 71.5,
//!  "labels": {"zone": "a"}}
//! {"entity": "node-1", "metric": "disk_writes", "time": 1767225600000, "value": 1234, "kind": "counter"}
//! {"schema_version": 1, "samples": [ ... ]}
//! ```
//!
//! `time` is RFC 3339 or a number of Unix epoch milliseconds; `value` is a number, or a string
//! holding one (as Prometheus writes them); `kind` is optional: `gauge` (the default), `counter`
//! or `delta`, and any other value rejects the sample (`invalid_value`); `schema_version` is
//! optional and must be 1.
//!
//! ```
//! use foresight_ingest::{Decoder, Format, IngestConfig, Signal};
//! let decoder = Decoder::new(IngestConfig::default());
//! let bytes = br#"{"entity":"n1","metric":"cpu","time":1700000000000,"value":0.5}"#;
//! let out = decoder.decode(bytes, Format::Auto, Signal::Metrics, None, None);
//! assert_eq!(out.telemetry.len(), 1);
//! assert!(out.rejections.is_empty());
//! ```

mod checks;
mod entity;
mod native;
mod otlp;
mod prometheus;

use std::{sync::LazyLock, time::Duration};

use chrono::{DateTime, Utc};
pub use foresight_events::Telemetry;
use foresight_events::{ErrorClass, MetricSample, Rejection};
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};

pub use native::NATIVE_SCHEMA_VERSION;

/// The wire format of a telemetry topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Decide per message from the content type and the bytes.
    #[default]
    Auto,
    /// Foresight's native JSON.
    Native,
    /// OTLP protobuf (`otlp_proto`).
    OtlpProto,
    /// OTLP/JSON (`otlp_json`).
    OtlpJson,
    /// prometheus-kafka-adapter JSON.
    Prometheus,
}

/// Which OTLP request a protobuf message holds (JSON says so itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// `ExportMetricsServiceRequest`.
    #[default]
    Metrics,
    /// `ExportLogsServiceRequest`.
    Logs,
    /// `ExportTraceServiceRequest`.
    Traces,
}

/// Ingest limits and identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest message accepted, in bytes; larger ones are dead-lettered unread.
    pub max_message_bytes: usize,
    /// How far ahead of the message's own timestamp a record may be.
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    /// How far behind the message's own timestamp a record may be (the retention).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Attributes (OTLP) or labels (Prometheus) that name the entity, in order of preference.
    pub entity_keys: Vec<String>,
    /// OTLP resource attributes kept as sample labels (a data point's own attributes always are).
    pub resource_labels: Vec<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_future: Duration::from_secs(5 * 60),
            retention: Duration::from_secs(7 * 24 * 3600),
            entity_keys: [
                "k8s.pod.name",
                "host.name",
                "service.instance.id",
                "instance",
                "service.name",
                "job",
            ]
            .map(String::from)
            .to_vec(),
            resource_labels: [
                "service.name",
                "service.namespace",
                "deployment.environment",
                "k8s.namespace.name",
                "k8s.node.name",
                "host.name",
                "cloud.region",
                "cloud.availability_zone",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// What one message decoded into.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decoded {
    /// The valid records, in message order.
    pub telemetry: Vec<Telemetry>,
    /// One rejection per bad record (or one for the whole message if it could not be read).
    pub rejections: Vec<Rejection>,
}

impl Decoded {
    fn rejected(class: ErrorClass, reason: impl Into<String>) -> Self {
        Self {
            telemetry: Vec::new(),
            rejections: vec![Rejection::new(class, reason)],
        }
    }

    /// The metric samples only.
    pub fn samples(&self) -> impl Iterator<Item = &MetricSample> {
        self.telemetry.iter().filter_map(|t| match t {
            Telemetry::Sample(s) => Some(s),
            _ => None,
        })
    }
}

/// The telemetry decoder, for every format.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: IngestConfig,
    checks: checks::Checks,
}

impl Decoder {
    /// A decoder with the given limits.
    pub fn new(config: IngestConfig) -> Self {
        Self {
            checks: checks::Checks::new(&config),
            config,
        }
    }

    /// Decodes one message.
    ///
    /// `format` and `signal` come from the topic's configuration; `content_type` from the
    /// message's `content-type` header; `message_time` is the message's own timestamp (Kafka's, or
    /// none in replay): record times are checked against it, so the check is the same live and in
    /// replay.
    pub fn decode(
        &self,
        bytes: &[u8],
        format: Format,
        signal: Signal,
        content_type: Option<&str>,
        message_time: Option<DateTime<Utc>>,
    ) -> Decoded {
        if bytes.len() > self.config.max_message_bytes {
            return Decoded::rejected(
                ErrorClass::Oversize,
                format!(
                    "message is {} bytes; the limit is {} (ingest.max_message_bytes)",
                    bytes.len(),
                    self.config.max_message_bytes
                ),
            );
        }
        let checks = self.checks.at(message_time);
        match detect(format, content_type, bytes) {
            Format::Native | Format::Auto => native::decode(bytes, &checks),
            Format::Prometheus => prometheus::decode(bytes, &self.config.entity_keys, &checks),
            Format::OtlpJson => otlp::decode_json(bytes, &self.config, &checks),
            Format::OtlpProto => otlp::decode_proto(bytes, signal, &self.config, &checks),
        }
    }
}

impl Decoder {
    /// Validates one sample given field by field (a row of a table, in replay), with exactly the
    /// checks a decoded message's samples get: entity, metric name, finite value, and the time
    /// against `message_time`.
    pub fn sample(
        &self,
        entity: &str,
        metric: &str,
        time: DateTime<Utc>,
        value: f64,
        labels: std::sync::Arc<std::collections::BTreeMap<String, String>>,
        message_time: Option<DateTime<Utc>>,
    ) -> Result<foresight_events::MetricSample, Rejection> {
        let entity = checks::entity(entity)?;
        self.checks.at(message_time).sample(
            entity,
            metric.to_owned(),
            time,
            value,
            labels,
            foresight_events::MetricKind::Gauge,
        )
    }
}

/// The keys that tell the JSON formats apart: OTLP's three (`"resourceMetrics"`,
/// `"resourceLogs"`, `"resourceSpans"`, found by their common start and then told apart: two
/// searches of a message's head instead of four), Prometheus' metric name.
static FORMAT_KEYS: LazyLock<[Finder<'static>; 2]> =
    LazyLock::new(|| [&b"\"resource"[..], b"\"__name__\""].map(Finder::new));

/// What follows `"resource` in OTLP's three keys.
const OTLP_KEY_ENDS: [&[u8]; 3] = [b"Metrics\"", b"Logs\"", b"Spans\""];

/// The format of one message: the configured one, or (for [`Format::Auto`]) what the content
/// type and the first bytes say.
pub fn detect(configured: Format, content_type: Option<&str>, bytes: &[u8]) -> Format {
    if configured != Format::Auto {
        return configured;
    }
    let media = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if media == "application/x-protobuf" || media == "application/protobuf" {
        return Format::OtlpProto;
    }
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let Some(first) = bytes.get(start) else {
        return Format::Native; // empty: let the native decoder say so
    };
    if *first != b'{' && *first != b'[' {
        // Not JSON. Text that is valid UTF-8 is more likely broken JSON than protobuf.
        return if std::str::from_utf8(bytes).is_ok() {
            Format::Native
        } else {
            Format::OtlpProto
        };
    }
    // Peek at the first few hundred bytes for the keys that tell the JSON formats apart.
    let head = &bytes[start..bytes.len().min(start + 512)];
    let [resource, name] = &*FORMAT_KEYS;
    let otlp = resource.find_iter(head).any(|at| {
        let rest = &head[at + resource.needle().len()..];
        OTLP_KEY_ENDS.iter().any(|end| rest.starts_with(end))
    });
    if otlp {
        Format::OtlpJson
    } else if name.find(head).is_some() {
        Format::Prometheus
    } else {
        Format::Native
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        assert_eq!(
            detect(Format::Native, Some("application/x-protobuf"), b"{}"),
            Format::Native
        );
        assert_eq!(
            detect(Format::Auto, Some("application/x-protobuf"), b"{}"),
            Format::OtlpProto
        );
        for otlp in [
            &br#" {"resourceMetrics":[]}"#[..],
            br#"{"resourceLogs":[]}"#,
            br#"{"resourceSpans":[]}"#,
        ] {
            assert_eq!(detect(Format::Auto, None, otlp), Format::OtlpJson);
        }
        // Only the first 512 bytes are looked at.
        let late = format!(r#"{{"pad":"{}","resourceLogs":[]}}"#, " ".repeat(600));
        assert_eq!(detect(Format::Auto, None, late.as_bytes()), Format::Native);
        assert_eq!(
            detect(
                Format::Auto,
                None,
                br#"{"timestamp":"x","labels":{"__name__":"up"}}"#
            ),
            Format::Prometheus
        );
        assert_eq!(
            detect(Format::Auto, None, br#"{"entity":"n"}"#),
            Format::Native
        );
        // A key that only starts like OTLP's is not one; a later one still counts.
        for (text, format) in [
            (&br#"{"resourceX":1,"entity":"n"}"#[..], Format::Native),
            (br#"{"resource":"x","a":1}"#, Format::Native),
            (br#"{"resourceX":1,"resourceSpans":[]}"#, Format::OtlpJson),
        ] {
            assert_eq!(detect(Format::Auto, None, text), format);
        }
        assert_eq!(
            detect(Format::Auto, None, &[0x0a, 0x80, 0xff]),
            Format::OtlpProto
        );
        assert_eq!(detect(Format::Auto, None, b"not json"), Format::Native);
    }
}
