//! Dead letters: records a stage could not use, kept with the reason so nothing is silently lost.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whose fault a rejected record is, and so what can be done about it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Not decodable in the declared format (bad JSON, bad protobuf).
    Undecodable,
    /// Text that is not UTF-8.
    InvalidUtf8,
    /// A schema version this build does not read.
    UnknownSchemaVersion,
    /// A required field (entity, metric, timestamp, value) is missing or empty.
    MissingField,
    /// A value that cannot be used (NaN, infinite, wrong type).
    InvalidValue,
    /// A timestamp too far in the future or older than the retention.
    TimestampOutOfRange,
    /// Larger than the configured maximum message size.
    Oversize,
    /// Arrived after its window closed (beyond the allowed lateness).
    Late,
}

impl ErrorClass {
    /// The class's name as written in headers and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorClass::Undecodable => "undecodable",
            ErrorClass::InvalidUtf8 => "invalid_utf8",
            ErrorClass::UnknownSchemaVersion => "unknown_schema_version",
            ErrorClass::MissingField => "missing_field",
            ErrorClass::InvalidValue => "invalid_value",
            ErrorClass::TimestampOutOfRange => "timestamp_out_of_range",
            ErrorClass::Oversize => "oversize",
            ErrorClass::Late => "late",
        }
    }

    /// All classes, for metrics and docs.
    pub const ALL: [ErrorClass; 8] = [
        ErrorClass::Undecodable,
        ErrorClass::InvalidUtf8,
        ErrorClass::UnknownSchemaVersion,
        ErrorClass::MissingField,
        ErrorClass::InvalidValue,
        ErrorClass::TimestampOutOfRange,
        ErrorClass::Oversize,
        ErrorClass::Late,
    ];

    /// Parses a class name written by [`ErrorClass::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A rejected record and why.
///
/// On Kafka the message value is the original bytes, unchanged, and these fields travel as headers
/// (see [`DeadLetter::HEADER_PREFIX`]), so the original can be fixed and re-produced as it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    /// The stage that rejected it.
    pub stage: String,
    /// Topic (or input file) it came from.
    pub source_topic: String,
    /// Partition it came from (0 for files).
    pub partition: i32,
    /// Offset (or line/record number for files).
    pub offset: i64,
    /// The class of error.
    pub error_class: ErrorClass,
    /// What was wrong, for a person.
    pub reason: String,
    /// The original key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The original bytes (not part of the JSON form; the Kafka message value).
    #[serde(skip)]
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// Prefix of the headers a dead letter carries on Kafka.
    pub const HEADER_PREFIX: &'static str = "foresight.dlq.";

    /// The headers that describe this dead letter on Kafka, as (name, value) pairs.
    pub fn headers(&self) -> Vec<(String, String)> {
        let p = Self::HEADER_PREFIX;
        vec![
            (format!("{p}stage"), self.stage.clone()),
            (format!("{p}source_topic"), self.source_topic.clone()),
            (format!("{p}partition"), self.partition.to_string()),
            (format!("{p}offset"), self.offset.to_string()),
            (
                format!("{p}error_class"),
                self.error_class.as_str().to_owned(),
            ),
            (format!("{p}reason"), self.reason.clone()),
        ]
    }

    /// Rebuilds a dead letter from Kafka headers and the message value; `None` if a header is missing.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        key: Option<String>,
        payload: Vec<u8>,
    ) -> Option<Self> {
        let mut fields = std::collections::HashMap::new();
        for (name, value) in headers {
            if let Some(field) = name.strip_prefix(Self::HEADER_PREFIX) {
                fields.insert(
                    field.to_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
        }
        Some(Self {
            stage: fields.remove("stage")?,
            source_topic: fields.remove("source_topic")?,
            partition: fields.remove("partition")?.parse().ok()?,
            offset: fields.remove("offset")?.parse().ok()?,
            error_class: ErrorClass::parse(&fields.remove("error_class")?)?,
            reason: fields.remove("reason")?,
            key,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let dl = DeadLetter {
            stage: "features".into(),
            source_topic: "t".into(),
            partition: 3,
            offset: 42,
            error_class: ErrorClass::InvalidValue,
            reason: "value is NaN".into(),
            key: Some("node-1".into()),
            payload: b"{\"value\":NaN}".to_vec(),
        };
        let headers = dl.headers();
        let back = DeadLetter::from_headers(
            headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
            dl.key.clone(),
            dl.payload.clone(),
        )
        .unwrap();
        assert_eq!(back, dl);
    }

    #[test]
    fn class_names_parse_back() {
        for c in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(c.as_str()), Some(c));
        }
        assert_eq!(ErrorClass::parse("nope"), None);
    }
}
