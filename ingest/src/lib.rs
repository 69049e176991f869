//! Foresight ingest: turns telemetry bytes into validated [`MetricSample`]s.
//!
//! Decoding is pure: bytes (+ the message's own timestamp, for range checks) in, samples and
//! rejections out. A batch with some bad samples keeps its good ones; every bad one becomes a
//! [`Rejection`] with its class and reason, which the runtime sends to the dead-letter topic.
//!
//! # Native JSON (schema version 1)
//! One sample, a batch object, or a JSON array of samples:
//!
//! ```json
//! {"entity": "node-1", "metric": "disk_used_pct", "time": "2026-01-01T00:00:00Z", "value": 71.5,
//!  "labels": {"zone": "a"}}
//! {"schema_version": 1, "samples": [ ... ]}
//! ```
//!
//! `time` is RFC 3339 or a number of Unix epoch milliseconds; `value` is a number, or a string
//! holding one (as Prometheus writes them); `schema_version` is optional and must be 1.
//!
//! ```
//! use foresight_ingest::{Decoder, IngestConfig};
//! let decoder = Decoder::new(IngestConfig::default());
//! let out = decoder.decode(br#"{"entity":"n1","metric":"cpu","time":1700000000000,"value":0.5}"#, None);
//! assert_eq!(out.samples.len(), 1);
//! assert!(out.rejections.is_empty());
//! ```

use std::{borrow::Cow, collections::BTreeMap, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use foresight_events::{EntityId, ErrorClass, MetricSample, Rejection};
use serde::{Deserialize, Serialize};

/// The native schema version this build reads.
pub const NATIVE_SCHEMA_VERSION: u32 = 1;

/// Ingest limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest message accepted, in bytes; larger ones are dead-lettered unread.
    pub max_message_bytes: usize,
    /// How far ahead of the message's own timestamp a sample may be.
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    /// How far behind the message's own timestamp a sample may be (the retention).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_future: Duration::from_secs(5 * 60),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What one message decoded into.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decoded {
    /// The valid samples, in message order.
    pub samples: Vec<MetricSample>,
    /// One rejection per bad sample (or one for the whole message if it could not be read).
    pub rejections: Vec<Rejection>,
}

impl Decoded {
    fn rejected(class: ErrorClass, reason: impl Into<String>) -> Self {
        Self {
            samples: Vec::new(),
            rejections: vec![Rejection::new(class, reason)],
        }
    }
}

/// Native JSON decoder with validation.
#[derive(Debug, Clone)]
pub struct Decoder {
    config: IngestConfig,
    max_future: TimeDelta,
    retention: TimeDelta,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Message<'a> {
    Batch(#[serde(borrow)] Batch<'a>),
    Array(#[serde(borrow)] Vec<RawSample<'a>>),
    One(#[serde(borrow)] RawSample<'a>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    schema_version: Option<u32>,
    #[serde(borrow)]
    samples: Vec<RawSample<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSample<'a> {
    schema_version: Option<u32>,
    #[serde(borrow)]
    entity: Option<Cow<'a, str>>,
    #[serde(borrow)]
    metric: Option<Cow<'a, str>>,
    #[serde(borrow)]
    time: Option<RawTime<'a>>,
    #[serde(borrow)]
    value: Option<RawValue<'a>>,
    #[serde(default, borrow)]
    labels: BTreeMap<Cow<'a, str>, Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTime<'a> {
    Millis(i64),
    Text(#[serde(borrow)] Cow<'a, str>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawValue<'a> {
    Number(f64),
    Text(#[serde(borrow)] Cow<'a, str>),
}

impl Decoder {
    /// A decoder with the given limits.
    pub fn new(config: IngestConfig) -> Self {
        let delta = |d: Duration| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        Self {
            max_future: delta(config.max_future),
            retention: delta(config.retention),
            config,
        }
    }

    /// Decodes one message. `message_time` is the message's own timestamp (Kafka's, or none in
    /// replay); sample times are checked against it so that the check is the same live and in replay.
    pub fn decode(&self, bytes: &[u8], message_time: Option<DateTime<Utc>>) -> Decoded {
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
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                return Decoded::rejected(ErrorClass::InvalidUtf8, format!("not UTF-8: {e}"));
            }
        };
        let message: Message<'_> = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                return Decoded::rejected(
                    ErrorClass::Undecodable,
                    format!("not a native JSON sample, batch or array: {e}"),
                );
            }
        };
        let (version, raw) = match message {
            Message::Batch(b) => (b.schema_version, b.samples),
            Message::Array(samples) => (None, samples),
            Message::One(s) => (None, vec![s]),
        };
        if let Some(v) = version.filter(|v| *v != NATIVE_SCHEMA_VERSION) {
            return Decoded::rejected(
                ErrorClass::UnknownSchemaVersion,
                format!(
                    "schema_version {v} is not supported (this build reads {NATIVE_SCHEMA_VERSION})"
                ),
            );
        }
        let many = raw.len() > 1;
        let mut out = Decoded {
            samples: Vec::with_capacity(raw.len()),
            rejections: Vec::new(),
        };
        for (i, sample) in raw.into_iter().enumerate() {
            match self.validate(sample, message_time) {
                Ok(s) => out.samples.push(s),
                Err(mut r) => {
                    if many {
                        r.reason = format!("sample {i}: {}", r.reason);
                    }
                    out.rejections.push(r);
                }
            }
        }
        out
    }

    fn validate(
        &self,
        raw: RawSample<'_>,
        message_time: Option<DateTime<Utc>>,
    ) -> Result<MetricSample, Rejection> {
        if let Some(v) = raw.schema_version.filter(|v| *v != NATIVE_SCHEMA_VERSION) {
            return Err(Rejection::new(
                ErrorClass::UnknownSchemaVersion,
                format!(
                    "schema_version {v} is not supported (this build reads {NATIVE_SCHEMA_VERSION})"
                ),
            ));
        }
        let missing =
            |field: &str| Rejection::new(ErrorClass::MissingField, format!("`{field}` is missing"));
        let entity = raw.entity.ok_or_else(|| missing("entity"))?;
        let entity = EntityId::new(entity.into_owned())
            .map_err(|e| Rejection::new(ErrorClass::MissingField, format!("bad `entity`: {e}")))?;
        let metric = raw
            .metric
            .filter(|m| !m.is_empty())
            .ok_or_else(|| missing("metric"))?;
        let time = match raw.time.ok_or_else(|| missing("time"))? {
            RawTime::Millis(ms) => DateTime::from_timestamp_millis(ms).ok_or_else(|| {
                Rejection::new(
                    ErrorClass::TimestampOutOfRange,
                    format!("time {ms} ms is out of range"),
                )
            })?,
            RawTime::Text(t) => DateTime::parse_from_rfc3339(&t)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    Rejection::new(
                        ErrorClass::InvalidValue,
                        format!("`time` {t:?} is not RFC 3339: {e}"),
                    )
                })?,
        };
        let value = match raw.value.ok_or_else(|| missing("value"))? {
            RawValue::Number(v) => v,
            RawValue::Text(t) => t.trim().parse::<f64>().map_err(|_| {
                Rejection::new(
                    ErrorClass::InvalidValue,
                    format!("`value` {t:?} is not a number"),
                )
            })?,
        };
        if !value.is_finite() {
            return Err(Rejection::new(
                ErrorClass::InvalidValue,
                format!("`value` is {value}; only finite values are accepted"),
            ));
        }
        if let Some(now) = message_time {
            if time > now + self.max_future {
                return Err(Rejection::new(
                    ErrorClass::TimestampOutOfRange,
                    format!(
                        "time {time} is more than {} ahead of the message time {now}",
                        humantime::format_duration(self.config.max_future)
                    ),
                ));
            }
            if time < now - self.retention {
                return Err(Rejection::new(
                    ErrorClass::TimestampOutOfRange,
                    format!(
                        "time {time} is older than the retention ({}) before the message time {now}",
                        humantime::format_duration(self.config.retention)
                    ),
                ));
            }
        }
        Ok(MetricSample {
            entity,
            metric: metric.into_owned(),
            time,
            value,
            labels: raw
                .labels
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Decoded {
        Decoder::new(IngestConfig::default()).decode(s.as_bytes(), None)
    }

    fn class(d: &Decoded) -> ErrorClass {
        assert_eq!(d.rejections.len(), 1, "{d:?}");
        d.rejections[0].class
    }

    #[test]
    fn reads_one_batch_and_array() {
        let one = decode(
            r#"{"entity":"n1","metric":"cpu","time":"2026-01-01T00:00:00Z","value":1.5,"labels":{"zone":"a"}}"#,
        );
        assert_eq!(one.samples.len(), 1);
        assert_eq!(one.samples[0].labels["zone"], "a");
        let batch = decode(
            r#"{"schema_version":1,"samples":[{"entity":"n1","metric":"cpu","time":1,"value":1},{"entity":"n2","metric":"cpu","time":2,"value":"2.5"}]}"#,
        );
        assert_eq!(batch.samples.len(), 2);
        assert_eq!(batch.samples[1].value, 2.5);
        let array = decode(r#"[{"entity":"n1","metric":"cpu","time":1,"value":1}]"#);
        assert_eq!(array.samples.len(), 1);
    }

    #[test]
    fn classifies_bad_input() {
        let cfg = IngestConfig {
            max_message_bytes: 200,
            ..IngestConfig::default()
        };
        let d = Decoder::new(cfg);
        assert_eq!(class(&d.decode(&[b'x'; 201], None)), ErrorClass::Oversize);
        assert_eq!(class(&decode_bytes(&[0xff, 0xfe])), ErrorClass::InvalidUtf8);
        assert_eq!(class(&decode("{not json")), ErrorClass::Undecodable);
        assert_eq!(
            class(&decode(r#"{"schema_version":2,"samples":[]}"#)),
            ErrorClass::UnknownSchemaVersion
        );
        assert_eq!(
            class(&decode(r#"{"metric":"cpu","time":1,"value":1}"#)),
            ErrorClass::MissingField
        );
        assert_eq!(
            class(&decode(r#"{"entity":"n","metric":"cpu","value":1}"#)),
            ErrorClass::MissingField
        );
        assert_eq!(
            class(&decode(
                r#"{"entity":"n","metric":"cpu","time":1,"value":"NaN"}"#
            )),
            ErrorClass::InvalidValue
        );
        assert_eq!(
            class(&decode(
                r#"{"entity":"n","metric":"cpu","time":1,"value":"+Inf"}"#
            )),
            ErrorClass::InvalidValue
        );
    }

    fn decode_bytes(b: &[u8]) -> Decoded {
        Decoder::new(IngestConfig::default()).decode(b, None)
    }

    #[test]
    fn checks_time_against_the_message_time() {
        let d = Decoder::new(IngestConfig::default());
        let now = DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        let at = |ms: i64| format!(r#"{{"entity":"n","metric":"m","time":{ms},"value":1}}"#);
        assert!(
            d.decode(at(1_700_000_000_000).as_bytes(), Some(now))
                .rejections
                .is_empty()
        );
        let future = d.decode(at(1_700_000_000_000 + 3_600_000).as_bytes(), Some(now));
        assert_eq!(class(&future), ErrorClass::TimestampOutOfRange);
        let old = d.decode(
            at(1_700_000_000_000 - 30 * 86_400_000).as_bytes(),
            Some(now),
        );
        assert_eq!(class(&old), ErrorClass::TimestampOutOfRange);
    }

    #[test]
    fn keeps_the_good_samples_of_a_partly_bad_batch() {
        let d = decode(
            r#"[{"entity":"n1","metric":"cpu","time":1,"value":1},{"entity":"","metric":"cpu","time":1,"value":1},{"entity":"n3","metric":"cpu","time":3,"value":3}]"#,
        );
        assert_eq!(d.samples.len(), 2);
        assert_eq!(d.rejections.len(), 1);
        assert!(
            d.rejections[0].reason.starts_with("sample 1:"),
            "{:?}",
            d.rejections
        );
    }
}
