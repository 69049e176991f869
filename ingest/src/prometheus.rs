//! prometheus-kafka-adapter JSON: what it writes for each remote-write sample.
//!
//! ```json
//! {"timestamp": "2026-01-01T00:00:00Z", "value": "0.25", "name": "node_load1",
//!  "labels": {"__name__": "node_load1", "instance": "host-1:9100", "job": "node"}}
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use foresight_events::{ErrorClass, MetricKind, Rejection, Telemetry};
use serde::Deserialize;

use crate::{
    Decoded,
    checks::{At, missing},
    entity::Resolver,
    native::RawValue,
};

#[derive(Deserialize)]
struct Sample<'a> {
    timestamp: Option<String>,
    #[serde(borrow)]
    value: Option<RawValue<'a>>,
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Message<'a> {
    Many(#[serde(borrow)] Vec<Sample<'a>>),
    One(#[serde(borrow)] Sample<'a>),
}

pub(crate) fn decode(bytes: &[u8], keys: &[String], checks: &At<'_>) -> Decoded {
    let message: Message<'_> = match std::str::from_utf8(bytes) {
        Err(e) => return Decoded::rejected(ErrorClass::InvalidUtf8, format!("not UTF-8: {e}")),
        Ok(text) => match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                return Decoded::rejected(
                    ErrorClass::Undecodable,
                    format!("not a prometheus-kafka-adapter sample: {e}"),
                );
            }
        },
    };
    let samples = match message {
        Message::Many(v) => v,
        Message::One(s) => vec![s],
    };
    let mut out = Decoded::default();
    // One for the message: the samples share its (empty) resource labels.
    let resolver = Resolver::without_resource(keys);
    for s in samples {
        match sample(s, &resolver, checks) {
            Ok(t) => out.telemetry.push(t),
            Err(r) => out.rejections.push(r),
        }
    }
    out
}

fn sample(s: Sample<'_>, resolver: &Resolver<'_>, checks: &At<'_>) -> Result<Telemetry, Rejection> {
    let mut labels = s.labels;
    let name = labels
        .remove("__name__")
        .or(s.name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| missing("name"))?;
    let time = s.timestamp.ok_or_else(|| missing("timestamp"))?;
    let time = DateTime::parse_from_rfc3339(&time)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Rejection::new(
                ErrorClass::InvalidValue,
                format!("`timestamp` {time:?} is not RFC 3339: {e}"),
            )
        })?;
    let value = s.value.ok_or_else(|| missing("value"))?.number()?;
    let pairs: Vec<(String, String)> = labels.into_iter().collect();
    // The labels other than the entity's tell the series apart: they go into its name.
    let (entity, labels, series) = resolver.series(&pairs)?;
    let kind = kind(&name);
    let metric = format!("{name}{series}");
    Ok(Telemetry::Sample(
        checks.sample(entity, metric, time, value, labels, kind)?,
    ))
}

/// Remote write does not say what a series is, so its name does, by Prometheus' naming
/// conventions: `_total` (counters), `_count` and `_sum` (of histograms and summaries) and
/// `_bucket` (histogram buckets) are running totals; anything else is a gauge.
fn kind(name: &str) -> MetricKind {
    const COUNTERS: [&str; 4] = ["_total", "_count", "_sum", "_bucket"];
    if COUNTERS.iter().any(|suffix| name.ends_with(suffix)) {
        MetricKind::Counter
    } else {
        MetricKind::Gauge
    }
}

#[cfg(test)]
mod tests {
    use foresight_events::MetricSample;
    use proptest::prelude::*;

    use crate::{Decoder, Format, IngestConfig, Signal};

    fn decode(bytes: &[u8]) -> crate::Decoded {
        Decoder::new(IngestConfig::default()).decode(
            bytes,
            Format::Auto,
            Signal::Metrics,
            None,
            None,
        )
    }

    #[test]
    fn reads_the_adapter_format() {
        let d = decode(
            br#"{"timestamp":"2026-01-01T00:00:00Z","value":"0.25","name":"node_load1","labels":{"__name__":"node_load1","instance":"host-1:9100","job":"node"}}"#,
        );
        let s: Vec<&MetricSample> = d.samples().collect();
        assert_eq!(s.len(), 1, "{d:?}");
        assert_eq!(s[0].entity.as_str(), "host-1:9100");
        assert_eq!(s[0].metric, r#"node_load1{job="node"}"#);
        assert_eq!(s[0].value, 0.25);
        assert!(s[0].labels.is_empty());
    }

    #[test]
    fn kinds_follow_the_naming_conventions() {
        use foresight_events::MetricKind::{Counter, Gauge};
        for (name, want) in [
            ("node_cpu_seconds_total", Counter),
            ("http_request_duration_seconds_count", Counter),
            ("http_request_duration_seconds_sum", Counter),
            ("http_request_duration_seconds_bucket", Counter),
            ("node_load1", Gauge),
            ("node_memory_MemAvailable_bytes", Gauge),
            ("total", Gauge),
            ("process_open_fds_totals", Gauge),
        ] {
            let json = format!(
                r#"{{"timestamp":"2026-01-01T00:00:00Z","value":"1","name":"{name}","labels":{{"__name__":"{name}","instance":"h"}}}}"#
            );
            let d = decode(json.as_bytes());
            let s: Vec<&MetricSample> = d.samples().collect();
            assert_eq!(s.len(), 1, "{d:?}");
            assert_eq!(s[0].kind, want, "{name}");
        }
    }

    #[test]
    fn rejects_nan_and_missing_identity() {
        let nan = decode(br#"{"timestamp":"2026-01-01T00:00:00Z","value":"NaN","name":"up","labels":{"__name__":"up","instance":"h"}}"#);
        assert_eq!(
            nan.rejections[0].class,
            foresight_events::ErrorClass::InvalidValue
        );
        let anon = decode(br#"{"timestamp":"2026-01-01T00:00:00Z","value":"1","name":"up","labels":{"__name__":"up"}}"#);
        assert_eq!(
            anon.rejections[0].class,
            foresight_events::ErrorClass::MissingField
        );
    }

    proptest! {
        /// Whatever the adapter writes (any label set, any finite value), it round-trips.
        #[test]
        fn round_trips(
            value in -1e12f64..1e12,
            instance in "[a-z0-9.:-]{1,20}",
            labels in prop::collection::btree_map("[a-z_]{1,8}", "[ -~]{0,12}", 0..5),
            secs in 0i64..4_000_000_000,
        ) {
            let mut all = labels.clone();
            all.insert("__name__".into(), "m".into());
            all.insert("instance".into(), instance.clone());
            let t = chrono::DateTime::from_timestamp(secs, 0).unwrap();
            let json = serde_json::json!({"timestamp": t.to_rfc3339(), "value": value.to_string(), "name": "m", "labels": all});
            let d = decode(&serde_json::to_vec(&json).unwrap());
            let s: Vec<&MetricSample> = d.samples().collect();
            prop_assert_eq!(s.len(), 1, "{:?}", d.rejections);
            prop_assert_eq!(s[0].value, value);
            prop_assert_eq!(s[0].time, t);
            prop_assert_eq!(s[0].entity.as_str(), instance.as_str());
            let mut expected = labels;
            expected.remove("instance");
            expected.remove("__name__");
            let pairs: Vec<(&str, &str)> = expected.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            prop_assert_eq!(&s[0].metric, &format!("m{}", crate::entity::selector(&pairs)));
        }
    }
}
