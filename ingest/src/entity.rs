//! Which entity a record is about, from its attributes (labels) and its resource's.

use std::collections::BTreeMap;

use foresight_events::{EntityId, ErrorClass, Rejection};

use crate::checks::entity;

/// Picks the entity: the first of `keys` found in `record`, then in `resource`. Every other
/// attribute is returned as a label (the record's own win over its resource's).
pub(crate) fn identify(
    keys: &[String],
    record: &[(String, String)],
    resource: &[(String, String)],
) -> Result<(EntityId, BTreeMap<String, String>), Rejection> {
    let found = keys.iter().find_map(|k| {
        record
            .iter()
            .chain(resource)
            .find(|(name, value)| name == k && !value.is_empty())
            .map(|(name, value)| (name.as_str(), value.as_str()))
    });
    let Some((key, value)) = found else {
        return Err(Rejection::new(
            ErrorClass::MissingField,
            format!("no entity: none of the attributes {keys:?} (ingest.entity_keys) is set"),
        ));
    };
    let id = entity(value)?;
    let mut labels = BTreeMap::new();
    for (name, value) in resource.iter().chain(record) {
        if name != key {
            labels.insert(name.clone(), value.clone());
        }
    }
    Ok((id, labels))
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
            ]),
        )
        .unwrap();
        assert_eq!(id.as_str(), "pod-1");
        assert_eq!(labels["host.name"], "h-record");
        assert_eq!(labels["zone"], "a");
        assert!(!labels.contains_key("k8s.pod.name"));
        let err = identify(&keys, &kv(&[("a", "b")]), &[]).unwrap_err();
        assert_eq!(err.class, ErrorClass::MissingField);
    }
}
