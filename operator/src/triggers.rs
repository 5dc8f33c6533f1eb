//! Which watch events of pods and service accounts ask for a reconcile of their
//! namespace. The reconciler reads little of them — a pod's labels (policies select
//! pods by labels), a service account's name — while they change often for other
//! reasons: a pod's status is written by the kubelet many times in its life (conditions,
//! IPs, container states). Reconciling on those would only recompute the same plan.
//!
//! An object triggers when it appears, when it disappears (also when a relist shows it
//! gone without a delete event having been seen), and when what [`Triggers`] hashes of it
//! changes; nothing else does. Pure: no I/O, so it is tested on events built in memory.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use kube::Resource;
use kube::runtime::watcher::Event;

/// The hash of what the reconciler reads of an object.
pub type Relevant<K> = fn(&K) -> u64;

/// A hash of `value`, for a [`Relevant`] function.
pub fn hash(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The labels, for pods: what policies select on.
pub fn labels<K: Resource>(object: &K) -> u64 {
    hash(object.meta().labels.as_ref().unwrap_or(&Default::default()))
}

/// Nothing but existence, for service accounts: the reconciler reads their names.
pub fn existence<K>(_: &K) -> u64 {
    0
}

/// Remembers, per object, its namespace and the [`Relevant`] hash last seen.
#[derive(Debug)]
pub struct Triggers<K> {
    relevant: Relevant<K>,
    /// uid → (namespace, hash).
    seen: HashMap<String, (String, u64)>,
    /// The uids listed since the watch (re)started, until the list is complete.
    relisted: Option<HashSet<String>>,
}

/// What one watch event asks for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// The namespaces to reconcile, one entry per object that triggers (the controller's
    /// queue merges repeats).
    pub namespaces: Vec<String>,
    /// Objects seen whose change does not matter.
    pub ignored: u64,
}

impl<K: Resource> Triggers<K> {
    /// Triggers on the changes of `relevant`.
    pub fn new(relevant: Relevant<K>) -> Self {
        Self {
            relevant,
            seen: HashMap::new(),
            relisted: None,
        }
    }

    /// What `event` asks for.
    pub fn on_event(&mut self, event: &Event<K>) -> Decision {
        match event {
            Event::Init => {
                self.relisted = Some(HashSet::new());
                Decision::default()
            }
            Event::InitApply(object) => {
                if let Some(relisted) = &mut self.relisted {
                    relisted.insert(key(object));
                }
                self.applied(object)
            }
            Event::Apply(object) => self.applied(object),
            Event::Delete(object) => {
                self.seen.remove(&key(object));
                Decision {
                    namespaces: vec![namespace(object)],
                    ignored: 0,
                }
            }
            Event::InitDone => {
                // Objects deleted while the watch was down have no delete event: a relist
                // not showing them is how they are learned of.
                let relisted = self.relisted.take().unwrap_or_default();
                let mut namespaces = Vec::new();
                self.seen.retain(|uid, (ns, _)| {
                    let kept = relisted.contains(uid);
                    if !kept {
                        namespaces.push(ns.clone());
                    }
                    kept
                });
                Decision {
                    namespaces,
                    ignored: 0,
                }
            }
        }
    }

    fn applied(&mut self, object: &K) -> Decision {
        let hash = (self.relevant)(object);
        let ns = namespace(object);
        let previous = self.seen.insert(key(object), (ns.clone(), hash));
        if previous.is_some_and(|(_, h)| h == hash) {
            Decision {
                namespaces: Vec::new(),
                ignored: 1,
            }
        } else {
            Decision {
                namespaces: vec![ns],
                ignored: 0,
            }
        }
    }
}

/// The uid: a pod deleted and created again under its name is another object. The API
/// server always sets it; the name stands in for objects built without one.
fn key<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    meta.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        )
    })
}

fn namespace<K: Resource>(object: &K) -> String {
    object.meta().namespace.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ObjectMeta;
    use kube::core::PartialObjectMeta;

    use super::*;

    fn pod(ns: &str, uid: &str, labels: &[(&str, &str)], rv: &str) -> PartialObjectMeta<Pod> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(format!("pod-{uid}")),
                namespace: Some(ns.into()),
                uid: Some(uid.into()),
                resource_version: Some(rv.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    fn triggers(decision: &Decision) -> Vec<&str> {
        decision.namespaces.iter().map(String::as_str).collect()
    }

    #[test]
    fn a_pod_triggers_when_it_appears_changes_labels_or_goes_and_not_on_status_changes() {
        let mut t = Triggers::new(labels::<PartialObjectMeta<Pod>>);
        let a = pod("agents", "1", &[("app", "claude")], "10");
        assert_eq!(triggers(&t.on_event(&Event::Apply(a.clone()))), ["agents"]);
        // A status write: a new resourceVersion, the same labels.
        let status = pod("agents", "1", &[("app", "claude")], "11");
        assert_eq!(
            t.on_event(&Event::Apply(status)),
            Decision {
                namespaces: vec![],
                ignored: 1
            }
        );
        let relabeled = pod("agents", "1", &[("app", "other")], "12");
        assert_eq!(
            triggers(&t.on_event(&Event::Apply(relabeled.clone()))),
            ["agents"]
        );
        // Deleted with its labels unchanged: still a trigger (a label-hash filter on the
        // objects alone would drop it).
        assert_eq!(triggers(&t.on_event(&Event::Delete(relabeled))), ["agents"]);
        // Created again under the same name: a new uid, a new pod.
        let again = pod("agents", "2", &[("app", "other")], "13");
        assert_eq!(triggers(&t.on_event(&Event::Apply(again))), ["agents"]);
    }

    #[test]
    fn a_relist_triggers_only_for_changed_and_vanished_pods() {
        let mut t = Triggers::new(labels::<PartialObjectMeta<Pod>>);
        for (ns, uid) in [("a", "1"), ("b", "2"), ("c", "3")] {
            t.on_event(&Event::Apply(pod(ns, uid, &[("x", "1")], "1")));
        }
        assert_eq!(t.on_event(&Event::Init), Decision::default());
        // Unchanged but for its status.
        let same = t.on_event(&Event::InitApply(pod("a", "1", &[("x", "1")], "5")));
        assert_eq!(same.ignored, 1);
        assert!(same.namespaces.is_empty());
        let relabeled = t.on_event(&Event::InitApply(pod("b", "2", &[("x", "2")], "6")));
        assert_eq!(triggers(&relabeled), ["b"]);
        let new = t.on_event(&Event::InitApply(pod("d", "4", &[], "7")));
        assert_eq!(triggers(&new), ["d"]);
        // Pod 3 was deleted while the watch was down.
        assert_eq!(triggers(&t.on_event(&Event::InitDone)), ["c"]);
        // ...and is forgotten: another relist does not report it again.
        t.on_event(&Event::Init);
        for (ns, uid, v) in [("a", "1", "1"), ("b", "2", "2"), ("d", "4", "")] {
            let labels: &[(&str, &str)] = if v.is_empty() { &[] } else { &[("x", v)] };
            let d = t.on_event(&Event::InitApply(pod(ns, uid, labels, "9")));
            assert!(d.namespaces.is_empty(), "{ns}");
        }
        assert_eq!(t.on_event(&Event::InitDone), Decision::default());
    }

    #[test]
    fn a_service_account_triggers_only_when_it_appears_or_goes() {
        let mut t = Triggers::new(existence::<PartialObjectMeta<Pod>>);
        let sa = pod("agents", "1", &[("a", "b")], "1");
        assert_eq!(triggers(&t.on_event(&Event::Apply(sa.clone()))), ["agents"]);
        let relabeled = pod("agents", "1", &[("a", "c")], "2");
        assert_eq!(t.on_event(&Event::Apply(relabeled)).ignored, 1);
        assert_eq!(triggers(&t.on_event(&Event::Delete(sa))), ["agents"]);
    }
}
