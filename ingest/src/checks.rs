//! Validation shared by every format: required fields, finite values, time range.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, TimeDelta, Utc};
use foresight_events::{EntityId, ErrorClass, MetricKind, MetricSample, Rejection};

use crate::IngestConfig;

#[derive(Debug, Clone)]
pub(crate) struct Checks {
    max_future: TimeDelta,
    retention: TimeDelta,
}

/// The checks for one message (its timestamp fixed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct At<'a> {
    checks: &'a Checks,
    message_time: Option<DateTime<Utc>>,
    /// The latest and earliest record times accepted (worked out once per message; `None` where
    /// the limit lies beyond the representable times).
    latest: Option<DateTime<Utc>>,
    earliest: Option<DateTime<Utc>>,
}

impl Checks {
    pub(crate) fn new(config: &IngestConfig) -> Self {
        let delta = |d| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX);
        Self {
            max_future: delta(config.max_future),
            retention: delta(config.retention),
        }
    }

    pub(crate) fn at(&self, message_time: Option<DateTime<Utc>>) -> At<'_> {
        At {
            checks: self,
            message_time,
            latest: message_time.and_then(|t| t.checked_add_signed(self.max_future)),
            earliest: message_time.and_then(|t| t.checked_sub_signed(self.retention)),
        }
    }
}

pub(crate) fn missing(field: &str) -> Rejection {
    Rejection::new(ErrorClass::MissingField, format!("`{field}` is missing"))
}

pub(crate) fn entity(id: &str) -> Result<EntityId, Rejection> {
    EntityId::new(id)
        .map_err(|e| Rejection::new(ErrorClass::MissingField, format!("bad entity: {e}")))
}

/// Unix nanoseconds (OTLP) to a time; 0 means "not set".
pub(crate) fn nanos(ns: u64, field: &str) -> Result<DateTime<Utc>, Rejection> {
    if ns == 0 {
        return Err(missing(field));
    }
    i64::try_from(ns)
        .ok()
        .map(DateTime::from_timestamp_nanos)
        .ok_or_else(|| {
            Rejection::new(
                ErrorClass::TimestampOutOfRange,
                format!("`{field}` {ns} is out of range"),
            )
        })
}

impl At<'_> {
    /// Checks a record time against the message time.
    pub(crate) fn time(&self, time: DateTime<Utc>) -> Result<DateTime<Utc>, Rejection> {
        let Some(now) = self.message_time else {
            return Ok(time);
        };
        if self.latest.is_some_and(|latest| time > latest) {
            return Err(Rejection::new(
                ErrorClass::TimestampOutOfRange,
                format!(
                    "time {time} is more than {} ahead of the message time {now} (ingest.max_future)",
                    self.checks.max_future
                ),
            ));
        }
        if self.earliest.is_some_and(|earliest| time < earliest) {
            return Err(Rejection::new(
                ErrorClass::TimestampOutOfRange,
                format!(
                    "time {time} is older than the retention ({}) before the message time {now} (ingest.retention)",
                    self.checks.retention
                ),
            ));
        }
        Ok(time)
    }

    /// Builds a validated sample.
    pub(crate) fn sample(
        &self,
        entity: EntityId,
        metric: String,
        time: DateTime<Utc>,
        value: f64,
        labels: Arc<BTreeMap<String, String>>,
        kind: MetricKind,
    ) -> Result<MetricSample, Rejection> {
        Ok(MetricSample {
            time: self.sample_time(&metric, time, value)?,
            entity,
            metric,
            value,
            labels,
            kind,
        })
    }

    /// Checks a sample's metric name, value and time (in that order), for [`At::sample`] or a
    /// caller building the sample itself: the time, checked.
    pub(crate) fn sample_time(
        &self,
        metric: &str,
        time: DateTime<Utc>,
        value: f64,
    ) -> Result<DateTime<Utc>, Rejection> {
        if metric.is_empty() {
            return Err(missing("metric"));
        }
        if !value.is_finite() {
            return Err(Rejection::new(
                ErrorClass::InvalidValue,
                format!("value of {metric} is {value}; only finite values are accepted"),
            ));
        }
        self.time(time)
    }
}
