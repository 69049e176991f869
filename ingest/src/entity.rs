//! Which entity a record is about, from its attributes (labels) and its resource's.

use std::collections::BTreeMap;

use foresight_events::{EntityId, ErrorClass, Rejection};

use crate::checks::entity;

/// Picks the entity: the first of `keys` found in `record`, then in `resource`. The record's other
/// attributes become labels, and of its resource's only those in `promoted` (resources carry many
/// attributes, such as SDK and process details, that would bloat every sample; the
/// OpenTelemetry Collector's Prometheus exporter leaves them out by default for the same reason).
pub(crate) fn identify(
    keys: &[String],
    record: &[(String, String)],
    resource: &[(String, String)],
    promoted: &[String],
) -> Result<(EntityId, BTreeMap<String, String>), Rejection> {
    Resolver::new(keys, resource, promoted).identify(record)
}

/// [`identify`] with the resource's part worked out once for all of its records.
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
    pub(crate) fn new(keys: &'a [String], resource: &[(String, String)], promoted: &[String]) -> Self {
        let resource_entity = keys.iter().enumerate().find_map(|(i, k)| {
            resource
                .iter()
                .find(|(name, value)| name == k && !value.is_empty())
                .map(|(_, value)| (i, entity(value)))
        });
        let all_labels: BTreeMap<String, String> = resource
            .iter()
            .filter(|(name, _)| promoted.contains(name))
            .cloned()
            .collect();
        let mut labels = all_labels.clone();
        if let Some((i, _)) = &resource_entity {
            labels.remove(&keys[*i]);
        }
        Self { keys, resource_entity, labels, all_labels }
    }

    pub(crate) fn identify(&self, record: &[(String, String)]) -> Result<(EntityId, BTreeMap<String, String>), Rejection> {
        let limit = self.resource_entity.as_ref().map_or(self.keys.len(), |(i, _)| i + 1);
        let own = self.keys[..limit].iter().find_map(|k| record.iter().find(|(name, value)| name == k && !value.is_empty()));
        let (id, mut labels, skip) = match (own, &self.resource_entity) {
            (Some((key, value)), _) => {
                let mut labels = self.all_labels.clone();
                labels.remove(key);
                (entity(value)?, labels, Some(key.as_str()))
            }
            (None, Some((_, Ok(id)))) => (id.clone(), self.labels.clone(), None),
            (None, Some((_, Err(e)))) => return Err(e.clone()),
            (None, None) => {
                return Err(Rejection::new(
                    ErrorClass::MissingField,
                    format!("no entity: none of the attributes {:?} (ingest.entity_keys) is set", self.keys),
                ));
            }
        };
        for (name, value) in record {
            if Some(name.as_str()) != skip {
                labels.insert(name.clone(), value.clone());
            }
        }
        Ok((id, labels))
    }
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
        let (id, labels) = identify(
            &keys,
            &kv(&[("host.name", "h-record"), ("cpu", "0")]),
            &kv(&[
                ("host.name", "h-resource"),
                ("k8s.pod.name", "pod-1"),
                ("zone", "a"),
                ("telemetry.sdk.name", "x"),
            ]),
            &["zone".to_string()],
        )
        .unwrap();
        assert_eq!(id.as_str(), "pod-1");
        assert_eq!(labels["host.name"], "h-record");
        assert_eq!(labels["zone"], "a");
        assert!(!labels.contains_key("k8s.pod.name"));
        assert!(!labels.contains_key("telemetry.sdk.name"), "not promoted");
        let err = identify(&keys, &kv(&[("a", "b")]), &[], &[]).unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
    }
}
