//! Which entity a record is about, from its attributes (labels) and its resource's.

use std::{cell::RefCell, collections::BTreeMap, sync::Arc};

use foresight_events::{EntityId, ErrorClass, Rejection};

use crate::checks::entity;

/// A shared label set, as samples hold it.
pub(crate) type Labels = Arc<BTreeMap<String, String>>;

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
/// worked out once for all of its records, and the labels of metric samples are shared: the
/// samples of one resource hold the same label set.
pub(crate) struct Resolver<'a> {
    keys: &'a [String],
    /// The resource's own best entity key (its index in `keys`), and the entity it names.
    resource_entity: Option<(usize, Result<EntityId, Rejection>)>,
    /// Promoted resource labels, without the resource's entity key.
    labels: Labels,
    /// The resource's entity key and its value, when promoted: a label again for records that
    /// name their entity themselves.
    entity_label: Option<(String, String)>,
    /// The entity a record attribute named last: the records of one resource mostly name the
    /// same one, which is then validated once.
    last: RefCell<Option<EntityId>>,
    /// The labels of the records that named their entity themselves with an attribute, and its
    /// name, when they differ from `labels`: the records of one resource mostly use the same
    /// attribute, and then share one label set.
    variant: RefCell<Option<(String, Labels)>>,
}

impl<'a> Resolver<'a> {
    /// A resolver for records without a resource (Prometheus samples).
    pub(crate) fn without_resource(keys: &'a [String]) -> Self {
        Self::new::<(String, String)>(keys, &[], &[])
    }

    pub(crate) fn new<P: Pair>(keys: &'a [String], resource: &[P], promoted: &[String]) -> Self {
        Self::reusing(keys, resource, promoted, None)
    }

    /// [`Resolver::new`], sharing the label set of `previous` (another resource's) when this
    /// resource's is the same: the resources of one request often differ only in the attribute
    /// naming their entity.
    pub(crate) fn reusing<P: Pair>(
        keys: &'a [String],
        resource: &[P],
        promoted: &[String],
        previous: Option<&Labels>,
    ) -> Self {
        let resource_entity = keys.iter().enumerate().find_map(|(i, k)| {
            resource
                .iter()
                .find(|p| p.name() == k && !p.value().is_empty())
                .map(|p| (i, entity(p.value())))
        });
        let entity_key = resource_entity.as_ref().map(|(i, _)| keys[*i].as_str());
        let is_promoted = |p: &&P| promoted.iter().any(|k| k == p.name());
        let (labels, entity_label) = match previous
            .filter(|previous| same_labels(previous, resource, is_promoted, entity_key))
        {
            Some(previous) => {
                // As below: the value of the entity key is its last one.
                let entity_label = entity_key.and_then(|key| {
                    resource
                        .iter()
                        .filter(is_promoted)
                        .rfind(|p| p.name() == key)
                        .map(|p| (key.to_owned(), p.value().to_owned()))
                });
                (Arc::clone(previous), entity_label)
            }
            None => {
                let mut labels: BTreeMap<String, String> = resource
                    .iter()
                    .filter(is_promoted)
                    .map(|p| (p.name().to_owned(), p.value().to_owned()))
                    .collect();
                let entity_label = entity_key.and_then(|key| labels.remove_entry(key));
                (Arc::new(labels), entity_label)
            }
        };
        Self {
            keys,
            resource_entity,
            labels,
            entity_label,
            last: RefCell::new(None),
            variant: RefCell::new(None),
        }
    }

    /// The promoted resource labels of the records that do not name their entity themselves.
    pub(crate) fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The entity of a record, and the index of the record attribute that named it (if the
    /// record did).
    fn choose<P: Pair>(&self, record: &[P]) -> Result<(EntityId, Option<usize>), Rejection> {
        let limit = self
            .resource_entity
            .as_ref()
            .map_or(self.keys.len(), |(i, _)| i + 1);
        let own = self.keys[..limit].iter().find_map(|k| {
            record
                .iter()
                .position(|p| p.name() == k && !p.value().is_empty())
        });
        match (own, &self.resource_entity) {
            (Some(i), _) => Ok((self.named(record[i].value())?, Some(i))),
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

    /// The entity a record attribute names.
    fn named(&self, id: &str) -> Result<EntityId, Rejection> {
        let mut last = self.last.borrow_mut();
        if let Some(known) = last.as_ref().filter(|known| known.as_str() == id) {
            return Ok(known.clone());
        }
        let named = entity(id)?;
        *last = Some(named.clone());
        Ok(named)
    }

    /// The promoted resource labels of a record that named its entity itself with attribute
    /// `key`, when they differ from the resource's (`None` when they do not).
    fn labels_named_by(&self, key: &str) -> Option<BTreeMap<String, String>> {
        let put_back = self.entity_label.as_ref().filter(|(k, _)| k != key);
        if put_back.is_none() && !self.labels.contains_key(key) {
            return None;
        }
        let mut labels = BTreeMap::clone(&self.labels);
        labels.remove(key);
        if let Some((k, v)) = put_back {
            labels.insert(k.clone(), v.clone());
        }
        Some(labels)
    }

    /// The promoted resource labels of a record, `record_key` being the attribute with which
    /// it named its entity itself (if it did): shared, built once per resource (and once per
    /// run of records naming their entity with the same attribute).
    fn resource_labels(&self, record_key: Option<&str>) -> Labels {
        let Some(key) = record_key else {
            return Arc::clone(&self.labels);
        };
        let mut variant = self.variant.borrow_mut();
        if let Some((_, labels)) = variant.as_ref().filter(|(k, _)| k == key) {
            return Arc::clone(labels);
        }
        match self.labels_named_by(key) {
            None => Arc::clone(&self.labels),
            Some(labels) => {
                let labels = Arc::new(labels);
                *variant = Some((key.to_owned(), Arc::clone(&labels)));
                labels
            }
        }
    }

    /// The entity, and the record's other attributes plus the promoted resource ones as labels.
    pub(crate) fn identify<P: Pair>(
        &self,
        record: &[P],
    ) -> Result<(EntityId, BTreeMap<String, String>), Rejection> {
        let (id, own) = self.choose(record)?;
        let key = own.map(|i| record[i].name());
        let mut labels = key
            .and_then(|k| self.labels_named_by(k))
            .unwrap_or_else(|| BTreeMap::clone(&self.labels));
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
    ) -> Result<(EntityId, Labels, String), Rejection> {
        let mut series = String::new();
        let (id, labels) = self.point(record, &mut Vec::new(), &mut series)?;
        Ok((id, labels, series))
    }

    /// [`Resolver::series`] on reused buffers: the selector is written to `series` (cleared
    /// first) and `order` is scratch space.
    pub(crate) fn point<P: Pair>(
        &self,
        record: &[P],
        order: &mut Vec<usize>,
        series: &mut String,
    ) -> Result<(EntityId, Labels), Rejection> {
        series.clear();
        let (id, own) = self.choose(record)?;
        let key = own.map(|i| record[i].name());
        match record {
            [] => {}
            [p] if Some(p.name()) == key => {}
            [p] => write_selector(series, [(p.name(), p.value())]),
            _ => {
                order.clear();
                order.extend((0..record.len()).filter(|&i| Some(record[i].name()) != key));
                order.sort_unstable_by(|&a, &b| {
                    let (a, b) = (&record[a], &record[b]);
                    (a.name(), a.value()).cmp(&(b.name(), b.value()))
                });
                write_selector(
                    series,
                    order.iter().map(|&i| (record[i].name(), record[i].value())),
                );
            }
        }
        Ok((id, self.resource_labels(key)))
    }
}

/// Whether the promoted attributes of `resource` but its entity key make up `labels`, checked
/// without building them: each is in `labels` with its value, they are as many, and no name comes
/// twice (when one does, `false`, even where the last value would match).
fn same_labels<P: Pair>(
    labels: &BTreeMap<String, String>,
    resource: &[P],
    is_promoted: impl Fn(&&P) -> bool,
    entity_key: Option<&str>,
) -> bool {
    let mut count = 0;
    let names = || {
        resource
            .iter()
            .filter(&is_promoted)
            .filter(|p| Some(p.name()) != entity_key)
    };
    for p in names() {
        count += 1;
        if count > labels.len() || labels.get(p.name()).map(String::as_str) != Some(p.value()) {
            return false;
        }
    }
    count == labels.len()
        && names()
            .enumerate()
            .all(|(i, p)| names().take(i).all(|q| q.name() != p.name()))
}

/// Appends `{k="v",...}` to `out` (nothing for no pairs).
fn write_selector<'p>(out: &mut String, pairs: impl IntoIterator<Item = (&'p str, &'p str)>) {
    let start = out.len();
    for (k, v) in pairs {
        out.push(if out.len() == start { '{' } else { ',' });
        out.push_str(k);
        out.push_str("=\"");
        push_escaped(out, v);
        out.push('"');
    }
    if out.len() > start {
        out.push('}');
    }
}

/// Appends a label value with Prometheus' escaping of `\`, `"` and newlines.
fn push_escaped(out: &mut String, value: &str) {
    let mut from = 0;
    for (i, b) in value.bytes().enumerate() {
        let escaped = match b {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            b'\n' => "\\n",
            _ => continue,
        };
        out.push_str(&value[from..i]);
        out.push_str(escaped);
        from = i + 1;
    }
    out.push_str(&value[from..]);
}

/// `{k="v",...}` with Prometheus' escaping of `\`, `"` and newlines; empty for no pairs.
#[cfg(test)]
pub(crate) fn selector(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    write_selector(&mut out, pairs.iter().copied());
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
    fn the_resource_entity_key_is_a_label_when_a_record_names_another_entity() {
        let keys = vec!["k8s.pod.name".to_string(), "host.name".to_string()];
        let promoted = ["host.name".to_string(), "zone".to_string()];
        let resource = kv(&[("host.name", "h1"), ("zone", "a")]);
        let r = Resolver::new(&keys, &resource, &promoted);
        // The resource names the entity: its key is not repeated as a label.
        let (id, labels, _) = r.series(&kv(&[("cpu", "0")])).unwrap();
        assert_eq!(id.as_str(), "h1");
        assert_eq!(*labels, [("zone".into(), "a".into())].into());
        // A pod named by the record: the host is one of its labels.
        let (id, labels, series) = r
            .series(&kv(&[("k8s.pod.name", "p1"), ("cpu", "0")]))
            .unwrap();
        assert_eq!(id.as_str(), "p1");
        assert_eq!(series, r#"{cpu="0"}"#);
        assert_eq!(
            *labels,
            [
                ("host.name".into(), "h1".into()),
                ("zone".into(), "a".into())
            ]
            .into()
        );
        // The record naming the host itself: the resource's host is no label of it.
        let (id, labels, _) = r.series(&kv(&[("host.name", "h2")])).unwrap();
        assert_eq!(id.as_str(), "h2");
        assert_eq!(*labels, [("zone".into(), "a".into())].into());
        // Entities named by records, valid or not, one after the other.
        assert_eq!(
            r.series(&kv(&[("k8s.pod.name", "p1")])).unwrap().0.as_str(),
            "p1"
        );
        assert_eq!(
            r.series(&kv(&[("k8s.pod.name", "p2")])).unwrap().0.as_str(),
            "p2"
        );
        let bad = r.series(&kv(&[("k8s.pod.name", "p\n")])).unwrap_err();
        assert_eq!(bad.class, ErrorClass::MissingField);
        assert_eq!(
            r.series(&kv(&[("k8s.pod.name", "p2")])).unwrap().0.as_str(),
            "p2"
        );
    }

    #[test]
    fn resources_with_the_same_labels_share_them() {
        let keys = vec!["k8s.pod.name".to_string(), "host.name".to_string()];
        let promoted = ["host.name".to_string(), "zone".to_string()];
        let first = Resolver::new(&keys, &kv(&[("host.name", "h1"), ("zone", "a")]), &promoted);
        let same = Resolver::reusing(
            &keys,
            &kv(&[("zone", "a"), ("host.name", "h2"), ("other", "x")]),
            &promoted,
            Some(first.labels()),
        );
        assert!(Arc::ptr_eq(first.labels(), same.labels()));
        assert_eq!(same.entity_label, Some(("host.name".into(), "h2".into())));
        // A pod named by a record: the resource's own host is put back, not the first one's.
        let (_, labels, _) = same.series(&kv(&[("k8s.pod.name", "p1")])).unwrap();
        assert_eq!(
            *labels,
            [
                ("host.name".into(), "h2".into()),
                ("zone".into(), "a".into())
            ]
            .into()
        );
        for other in [
            kv(&[("host.name", "h3"), ("zone", "b")]),
            kv(&[("host.name", "h3")]),
            kv(&[("host.name", "h3"), ("zone", "a"), ("zone", "b")]),
            kv(&[("zone", "a"), ("zone", "a"), ("host.name", "h3")]),
        ] {
            let fresh = Resolver::new(&keys, &other, &promoted);
            let reused = Resolver::reusing(&keys, &other, &promoted, Some(first.labels()));
            assert_eq!(reused.labels(), fresh.labels(), "{other:?}");
            assert_eq!(reused.entity_label, fresh.entity_label);
        }
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
        assert_eq!(
            selector(&[("p", "\n"), ("q", "é\"\"")]),
            r#"{p="\n",q="é\"\""}"#
        );
        // Several attributes are sorted; the one naming the entity is left out.
        assert_eq!(
            r.series(&kv(&[("b", "2"), ("host.name", "h2"), ("a", "1")]))
                .unwrap()
                .2,
            r#"{a="1",b="2"}"#
        );
    }
}
