//! Foresight's native JSON.

use std::{borrow::Cow, collections::BTreeMap, sync::Arc};

use chrono::{DateTime, Utc};
use foresight_events::{ErrorClass, MetricKind, MetricSample, Rejection, Telemetry};
use serde::Deserialize;

use crate::{
    Decoded,
    checks::{At, entity, missing},
};

/// The native schema version this build reads.
pub const NATIVE_SCHEMA_VERSION: u32 = 1;

/// A sample, or a batch object holding samples: one struct reads either shape in one pass (an
/// untagged enum would buffer the whole message and parse it up to three times).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSample<'a> {
    schema_version: Option<u32>,
    #[serde(borrow)]
    samples: Option<Vec<RawSample<'a>>>,
    #[serde(borrow)]
    entity: Option<Cow<'a, str>>,
    #[serde(borrow)]
    metric: Option<Cow<'a, str>>,
    #[serde(borrow)]
    time: Option<RawTime<'a>>,
    #[serde(borrow)]
    value: Option<RawValue<'a>>,
    /// Owned as read: a sample keeps them.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// `gauge` (the default), `counter` or `delta`; read as text so that an unknown kind rejects
    /// its sample only, not the whole message.
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
}

/// A time: epoch milliseconds or RFC 3339 text.
enum RawTime<'a> {
    Millis(i64),
    Text(Cow<'a, str>),
}

/// A value: a number, or text holding one.
pub(crate) enum RawValue<'a> {
    Number(f64),
    Text(Cow<'a, str>),
}

/// Number-or-text visitor shared by [`RawTime`] and [`RawValue`] (hand-written: serde's untagged
/// enums buffer every value before trying each variant).
macro_rules! number_or_text {
    ($ty:ident, $variant:ident, $num:ty, $what:literal) => {
        impl<'de: 'a, 'a> Deserialize<'de> for $ty<'a> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V<'a>(std::marker::PhantomData<&'a ()>);
                impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
                    type Value = $ty<'a>;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                        Ok($ty::$variant(<$num as Num>::from_i64(v)))
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                        <$num as Num>::from_u64(v)
                            .map($ty::$variant)
                            .ok_or_else(|| E::custom("number out of range"))
                    }
                    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
                        <$num as Num>::from_f64(v)
                            .map($ty::$variant)
                            .ok_or_else(|| E::custom("time must be whole milliseconds"))
                    }
                    fn visit_borrowed_str<E: serde::de::Error>(
                        self,
                        v: &'de str,
                    ) -> Result<Self::Value, E> {
                        Ok($ty::Text(Cow::Borrowed(v)))
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                        Ok($ty::Text(Cow::Owned(v.to_owned())))
                    }
                }
                d.deserialize_any(V(std::marker::PhantomData))
            }
        }
    };
}

/// The numbers a [`RawTime`] or [`RawValue`] holds.
trait Num: Sized {
    fn from_i64(v: i64) -> Self;
    fn from_u64(v: u64) -> Option<Self>;
    fn from_f64(v: f64) -> Option<Self>;
}

impl Num for f64 {
    fn from_i64(v: i64) -> Self {
        v as f64
    }
    fn from_u64(v: u64) -> Option<Self> {
        Some(v as f64)
    }
    fn from_f64(v: f64) -> Option<Self> {
        Some(v)
    }
}

impl Num for i64 {
    fn from_i64(v: i64) -> Self {
        v
    }
    fn from_u64(v: u64) -> Option<Self> {
        i64::try_from(v).ok()
    }
    fn from_f64(v: f64) -> Option<Self> {
        (v.fract() == 0.0 && v.abs() < 9.0e18).then_some(v as i64)
    }
}

number_or_text!(
    RawTime,
    Millis,
    i64,
    "epoch milliseconds or an RFC 3339 time"
);
number_or_text!(RawValue, Number, f64, "a number or a string holding one");

impl RawValue<'_> {
    /// The value as a number: JSON numbers as they are, strings parsed (so "NaN" and "+Inf" become
    /// non-finite numbers, refused by the checks with a clear reason).
    pub(crate) fn number(&self) -> Result<f64, Rejection> {
        match self {
            RawValue::Number(v) => Ok(*v),
            RawValue::Text(t) => t.trim().parse::<f64>().map_err(|_| {
                Rejection::new(
                    ErrorClass::InvalidValue,
                    format!("`value` {t:?} is not a number"),
                )
            }),
        }
    }
}

fn unsupported(v: u32) -> Rejection {
    Rejection::new(
        ErrorClass::UnknownSchemaVersion,
        format!("schema_version {v} is not supported (this build reads {NATIVE_SCHEMA_VERSION})"),
    )
}

pub(crate) fn decode(bytes: &[u8], checks: &At<'_>) -> Decoded {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => return Decoded::rejected(ErrorClass::InvalidUtf8, format!("not UTF-8: {e}")),
    };
    let first = text.bytes().find(|b| !b.is_ascii_whitespace());
    let parsed = if first == Some(b'[') {
        serde_json::from_str::<Vec<RawSample<'_>>>(text).map(|v| (None, v))
    } else {
        serde_json::from_str::<RawSample<'_>>(text).map(|mut o| match o.samples.take() {
            Some(samples) => (o.schema_version, samples),
            None => (None, vec![o]),
        })
    };
    let (version, raw) = match parsed {
        Ok(p) => p,
        Err(e) => {
            return Decoded::rejected(
                ErrorClass::Undecodable,
                format!("not a native JSON sample, batch or array: {e}"),
            );
        }
    };
    if let Some(v) = version.filter(|v| *v != NATIVE_SCHEMA_VERSION) {
        return Decoded {
            telemetry: Vec::new(),
            rejections: vec![unsupported(v)],
        };
    }
    let many = raw.len() > 1;
    let mut out = Decoded {
        telemetry: Vec::with_capacity(raw.len()),
        rejections: Vec::new(),
    };
    for (i, sample) in raw.into_iter().enumerate() {
        match validate(sample, checks) {
            Ok(s) => out.telemetry.push(Telemetry::Sample(s)),
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

fn validate(raw: RawSample<'_>, checks: &At<'_>) -> Result<MetricSample, Rejection> {
    if let Some(v) = raw.schema_version.filter(|v| *v != NATIVE_SCHEMA_VERSION) {
        return Err(unsupported(v));
    }
    if raw.samples.is_some() {
        return Err(Rejection::new(
            ErrorClass::Undecodable,
            "a sample cannot hold `samples`",
        ));
    }
    let id = entity(&raw.entity.ok_or_else(|| missing("entity"))?)?;
    let metric = raw.metric.ok_or_else(|| missing("metric"))?;
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
    let value = raw.value.ok_or_else(|| missing("value"))?.number()?;
    let kind = raw.kind.as_deref().map_or(Ok(MetricKind::Gauge), kind)?;
    checks.sample(
        id,
        metric.into_owned(),
        time,
        value,
        Arc::new(raw.labels),
        kind,
    )
}

/// A sample's `kind`, as [`MetricKind`] writes it.
fn kind(text: &str) -> Result<MetricKind, Rejection> {
    match text {
        "gauge" => Ok(MetricKind::Gauge),
        "counter" => Ok(MetricKind::Counter),
        "delta" => Ok(MetricKind::Delta),
        _ => Err(Rejection::new(
            ErrorClass::InvalidValue,
            format!("`kind` {text:?} is not one of \"gauge\", \"counter\", \"delta\""),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{Decoder, Format, IngestConfig, Signal};

    fn native(d: &Decoder, bytes: &[u8], time: Option<DateTime<Utc>>) -> Decoded {
        d.decode(bytes, Format::Native, Signal::Metrics, None, time)
    }

    fn decode(s: &str) -> Decoded {
        native(&Decoder::new(IngestConfig::default()), s.as_bytes(), None)
    }

    fn samples(d: &Decoded) -> Vec<&MetricSample> {
        d.samples().collect()
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
        assert_eq!(samples(&one).len(), 1);
        assert_eq!(samples(&one)[0].labels["zone"], "a");
        let batch = decode(
            r#"{"schema_version":1,"samples":[{"entity":"n1","metric":"cpu","time":1,"value":1},{"entity":"n2","metric":"cpu","time":2,"value":"2.5"}]}"#,
        );
        assert_eq!(samples(&batch).len(), 2);
        assert_eq!(samples(&batch)[1].value, 2.5);
        let array = decode(r#"[{"entity":"n1","metric":"cpu","time":1,"value":1}]"#);
        assert_eq!(samples(&array).len(), 1);
    }

    #[test]
    fn classifies_bad_input() {
        let cfg = IngestConfig {
            max_message_bytes: 200,
            ..IngestConfig::default()
        };
        let d = Decoder::new(cfg);
        assert_eq!(class(&native(&d, &[b'x'; 201], None)), ErrorClass::Oversize);
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

    #[test]
    fn reads_the_metric_kind() {
        let kind = |k: &str| {
            let d = decode(&format!(
                r#"{{"entity":"n","metric":"m","time":1,"value":1{k}}}"#
            ));
            samples(&d).first().map(|s| s.kind)
        };
        assert_eq!(kind(""), Some(MetricKind::Gauge));
        assert_eq!(kind(r#","kind":"gauge""#), Some(MetricKind::Gauge));
        assert_eq!(kind(r#","kind":"counter""#), Some(MetricKind::Counter));
        assert_eq!(kind(r#","kind":"delta""#), Some(MetricKind::Delta));
        // An unknown kind rejects its sample only.
        let d = decode(
            r#"[{"entity":"n","metric":"m","time":1,"value":1,"kind":"Counter"},{"entity":"n","metric":"m","time":2,"value":2,"kind":"counter"}]"#,
        );
        assert_eq!(samples(&d).len(), 1);
        assert_eq!(d.rejections.len(), 1);
        assert_eq!(d.rejections[0].class, ErrorClass::InvalidValue);
        assert_eq!(
            d.rejections[0].reason,
            r#"sample 0: `kind` "Counter" is not one of "gauge", "counter", "delta""#
        );
        assert_eq!(
            class(&decode(
                r#"{"entity":"n","metric":"m","time":1,"value":1,"kind":7}"#
            )),
            ErrorClass::Undecodable,
            "not text: the message does not parse"
        );
    }

    fn decode_bytes(b: &[u8]) -> Decoded {
        native(&Decoder::new(IngestConfig::default()), b, None)
    }

    #[test]
    fn checks_time_against_the_message_time() {
        let d = Decoder::new(IngestConfig::default());
        let now = DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        let at = |ms: i64| format!(r#"{{"entity":"n","metric":"m","time":{ms},"value":1}}"#);
        assert!(
            native(&d, at(1_700_000_000_000).as_bytes(), Some(now))
                .rejections
                .is_empty()
        );
        let future = native(&d, at(1_700_000_000_000 + 3_600_000).as_bytes(), Some(now));
        assert_eq!(class(&future), ErrorClass::TimestampOutOfRange);
        let old = native(
            &d,
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
        assert_eq!(samples(&d).len(), 2);
        assert_eq!(d.rejections.len(), 1);
        assert!(
            d.rejections[0].reason.starts_with("sample 1:"),
            "{:?}",
            d.rejections
        );
    }

    proptest::proptest! {
        /// Any valid sample, written as Foresight's native JSON (one, batch or array; time as
        /// RFC 3339 or epoch ms; value as number or text), decodes back to itself.
        #[test]
        fn round_trips(
            entity in "[a-zA-Z0-9._:-]{1,40}",
            metric in "[a-z_.]{1,30}",
            ms in 0i64..4_000_000_000_000,
            value in -1e15f64..1e15,
            labels in proptest::collection::btree_map("[a-z_]{1,8}", "[ -~]{0,12}", 0..4),
            shape in 0u8..3,
            rfc3339 in proptest::bool::ANY,
            text_value in proptest::bool::ANY,
            kind in proptest::option::of(proptest::sample::select(vec![MetricKind::Gauge, MetricKind::Counter, MetricKind::Delta])),
        ) {
            let time = DateTime::from_timestamp_millis(ms).unwrap();
            let t = if rfc3339 { serde_json::json!(time.to_rfc3339()) } else { serde_json::json!(ms) };
            let v = if text_value { serde_json::json!(value.to_string()) } else { serde_json::json!(value) };
            let mut one = serde_json::json!({"entity": entity, "metric": metric, "time": t, "value": v, "labels": labels});
            if let Some(k) = kind {
                one["kind"] = serde_json::json!(k.as_str());
            }
            let message = match shape {
                0 => one,
                1 => serde_json::json!({"schema_version": 1, "samples": [one]}),
                _ => serde_json::json!([one]),
            };
            let d = decode(&serde_json::to_string(&message).unwrap());
            proptest::prop_assert!(d.rejections.is_empty(), "{:?}", d.rejections);
            let s = samples(&d);
            proptest::prop_assert_eq!(s.len(), 1);
            proptest::prop_assert_eq!(s[0].entity.as_str(), entity.as_str());
            proptest::prop_assert_eq!(&s[0].metric, &metric);
            proptest::prop_assert_eq!(s[0].time, time);
            proptest::prop_assert_eq!(s[0].value, value);
            proptest::prop_assert_eq!(&*s[0].labels, &labels);
            proptest::prop_assert_eq!(s[0].kind, kind.unwrap_or_default());
        }
    }
}
