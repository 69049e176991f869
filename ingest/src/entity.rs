//! Which entity a record is about, from its attributes (labels) and its resource's.

use std::collections::BTreeMap;

use foresight_events::{EntityId, ErrorClass, Rejection};

use crate::checks::entity;

/// An attribute: a name and its value as text, owned or borrowed from the decoded message.
pub(crate) trait Pair {
    fn name(&self) -> &str;
    fn value(&self) -> &str;
}

impl Pair for (String, String) {
    fn name(&self) -> &str {
        &self.0
    }
    fn value(&self) -> &str {
        &self.1
    }
}

impl Pair for (&str, std::borrow::Cow<'_, str>) {
    fn name(&self) -> &str {
        self.0
    }
    fn value(&self) -> &str {
        &self.1
    }
}

/// Picks the entity of records: the first of `keys` found in the record, then in its resource.
/// Of the resource's attributes only those `promoted` become labels (resources carry many, such
/// as SDK and process details, that would bloat every sample; the OpenTelemetry Collector's
/// Prometheus exporter leaves them out by default for the same reason). The resource's part is
/// worked out once for all of its records.
pub(crate) struct Resolver<'a> {
    keys: &'a [String],
    /// The resource's own best entity key (its index in `keys`), and the entity it names.
    resource_entity: Option<(usize, Result<EntityId, Rejection>)>,
    /// Promoted resource labels, without the resource's entity key.
    labels: BTreeMap<String, String>,
    /// Promoted resource labels, all of them (for records that name the entity themselves).
    all_labels: BTreeMap<String, String>,
}

impl<'a> Resolver<'a> {
    /// A resolver for records without a resource (Prometheus samples).
    pub(crate) fn without_resource(keys: &'a [String]) -> Self {
        Self::new::<(String, String)>(keys, &[], &[])
    }

    pub(crate) fn new<P: Pair>(keys: &'a [String], resource: &[P], promoted: &[String]) -> Self {
        let resource_entity = keys.iter().enumerate().find_map(|(i, k)| {
            resource
                .iter()
                .find(|p| p.name() == k && !p.value().is_empty())
                .map(|p| (i, entity(p.value())))
        });
        let all_labels: BTreeMap<String, String> = resource
            .iter()
            .filter(|p| promoted.iter().any(|k| k == p.name()))
            .map(|p| (p.name().to_owned(), p.value().to_owned()))
            .collect();
        let mut labels = all_labels.clone();
        if let Some((i, _)) = &resource_entity {
            labels.remove(&keys[*i]);
        }
        Self {
            keys,
            resource_entity,
            labels,
            all_labels,
        }
    }

    /// The entity of a record, and the record attribute that named it (if the record did).
    fn choose<'r, P: Pair>(
        &self,
        record: &'r [P],
    ) -> Result<(EntityId, Option<&'r str>), Rejection> {
        let limit = self
            .resource_entity
            .as_ref()
            .map_or(self.keys.len(), |(i, _)| i + 1);
        let own = self.keys[..limit].iter().find_map(|k| {
            record
                .iter()
                .find(|p| p.name() == k && !p.value().is_empty())
        });
        match (own, &self.resource_entity) {
            (Some(p), _) => Ok((entity(p.value())?, Some(p.name()))),
            (None, Some((_, Ok(id)))) => Ok((id.clone(), None)),
            (None, Some((_, Err(e)))) => Err(e.clone()),
            (None, None) => Err(Rejection::new(
                ErrorClass::MissingField,
                format!(
                    "no entity: none of the attributes {:?} (ingest.entity_keys) is set",
                    self.keys
                ),
            )),
        }
    }

    fn resource_labels(&self, record_key: Option<&str>) -> BTreeMap<String, String> {
        match record_key {
            Some(key) => {
                let mut labels = self.all_labels.clone();
                labels.remove(key);
                labels
            }
            None => self.labels.clone(),
        }
    }

    /// The entity, and the record's other attributes plus the promoted resource ones as labels.
    pub(crate) fn identify<P: Pair>(
        &self,
        record: &[P],
    ) -> Result<(EntityId, BTreeMap<String, String>), Rejection> {
        let (id, key) = self.choose(record)?;
        let mut labels = self.resource_labels(key);
        for p in record {
            if Some(p.name()) != key {
                labels.insert(p.name().to_owned(), p.value().to_owned());
            }
        }
        Ok((id, labels))
    }

    /// For a metric data point: its own attributes (but the one naming the entity) tell its series
    /// apart (cpu 0 from cpu 1, used from free), so they go into the series name as a
    /// Prometheus-style selector, e.g. `{cpu="0",state="used"}` (sorted; empty when there are
    /// none), and are not repeated as labels. The labels hold the promoted resource attributes.
    pub(crate) fn series<P: Pair>(
        &self,
        record: &[P],
    ) -> Result<(EntityId, BTreeMap<String, String>, String), Rejection> {
        let (id, key) = self.choose(record)?;
        let mut own: Vec<(&str, &str)> = record
            .iter()
            .filter(|p| Some(p.name()) != key)
            .map(|p| (p.name(), p.value()))
            .collect();
        own.sort_unstable();
        Ok((id, self.resource_labels(key), selector(&own)))
    }
}

/// `{k="v",...}` with Prometheus' escaping of `\`, `"` and newlines; empty for no pairs.
pub(crate) fn selector(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let mut out = String::from("{");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn prefers_keys_in_order_and_the_record_over_the_resource() {
        let keys = vec!["k8s.pod.name".to_string(), "host.name".to_string()];
        let (id, labels) = Resolver::new(
            &keys,
            &kv(&[
                ("host.name", "h-resource"),
                ("k8s.pod.name", "pod-1"),
                ("zone", "a"),
                ("telemetry.sdk.name", "x"),
            ]),
            &["zone".to_string()],
        )
        .identify(&kv(&[("host.name", "h-record"), ("cpu", "0")]))
        .unwrap();
        assert_eq!(id.as_str(), "pod-1");
        assert_eq!(labels["host.name"], "h-record");
        assert_eq!(labels["zone"], "a");
        assert!(!labels.contains_key("k8s.pod.name"));
        assert!(!labels.contains_key("telemetry.sdk.name"), "not promoted");
        let err = Resolver::without_resource(&keys)
            .identify(&kv(&[("a", "b")]))
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
    }

    #[test]
    fn point_attributes_name_the_series() {
        let keys = vec!["host.name".to_string()];
        let resource = kv(&[("host.name", "h1"), ("service.name", "api")]);
        let r = Resolver::new(&keys, &resource, &["service.name".to_string()]);
        let (id, labels, series) = r.series(&kv(&[("state", "used"), ("cpu", "0")])).unwrap();
        assert_eq!(id.as_str(), "h1");
        assert_eq!(series, r#"{cpu="0",state="used"}"#);
        assert_eq!(labels.len(), 1);
        assert_eq!(labels["service.name"], "api");
        assert_eq!(r.series::<(String, String)>(&[]).unwrap().2, "");
        assert_eq!(selector(&[("p", "a\"b\\c")]), r#"{p="a\"b\\c"}"#);
    }
}
