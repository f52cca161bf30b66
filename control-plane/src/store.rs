//! Holds every object the sources reported, by origin, and folds them into one
//! [`ClusterSnapshot`], telling which Services and Nodes each batch of updates touched.
//!
//! When two origins define the same object, the first origin in name order wins and
//! the other copy is reported as a problem. Problems are kept here for the query API,
//! each on its own (two problems of one object are two entries), with messages cut to
//! [`MAX_PROBLEM_MESSAGE`] characters. So are Services in force that no node programs
//! (no cluster IP, no ports: see [`crate::compute::dropped_reason`]) and ignored
//! annotations: nothing is dropped silently.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use switchyard_proto::names::one_line;

use crate::{
    compute,
    model::{ClusterSnapshot, Object, ObjectKind, ObjectRef, ServiceKey},
    sources::{Origin, StoreUpdate},
};

/// Longest problem message kept, in characters.
pub const MAX_PROBLEM_MESSAGE: usize = 2048;

/// Something a source could not use, as the query API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    pub object: Option<ObjectRef>,
    pub message: String,
    pub since: SystemTime,
}

/// Origin, object, and the problem's place among that object's problems.
type ProblemKey = (Origin, Option<ObjectRef>, u32);

/// The place of a duplicate's problem, apart from the source's own problems of it.
const DUPLICATE_ORDINAL: u32 = u32::MAX;

/// `message` as kept: on one line (control characters escaped, whatever a source or a
/// library echoed into it) and at most [`MAX_PROBLEM_MESSAGE`] characters.
fn bounded(message: String) -> String {
    one_line(&message, MAX_PROBLEM_MESSAGE)
}

/// Cheap read handle on the current problems.
#[derive(Clone, Debug, Default)]
pub struct ProblemsView {
    /// What the sources reported (objects that do not convert, files that do not parse)
    /// and duplicates.
    sources: Arc<RwLock<BTreeMap<ProblemKey, Problem>>>,
    /// Notes on the Services and Nodes in the snapshot, by object: why no node programs
    /// a Service, and ignored annotations and labels.
    annotations: Arc<RwLock<BTreeMap<ObjectRef, Problem>>>,
}

impl ProblemsView {
    /// How many problems [`ProblemsView::list`] would return, without copying them.
    pub fn len(&self) -> usize {
        self.sources.read().unwrap_or_else(|e| e.into_inner()).len()
            + self
                .annotations
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn list(&self) -> Vec<Problem> {
        let mut list: Vec<Problem> = self
            .sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        list.extend(
            self.annotations
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned(),
        );
        list
    }

    fn sources(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<ProblemKey, Problem>> {
        self.sources.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or clears, for `None` or an object without any) the notes on the object
    /// `r` in force (why no node programs a Service, ignored annotations or labels),
    /// keeping `since` while the message stays the same.
    fn set_annotations(&self, r: &ObjectRef, notes: Option<(&Origin, Vec<String>)>) {
        let mut annotations = self.annotations.write().unwrap_or_else(|e| e.into_inner());
        let Some((origin, notes)) = notes.filter(|(_, notes)| !notes.is_empty()) else {
            annotations.remove(r);
            return;
        };
        let message = bounded(notes.join("; "));
        let since = match annotations.get(r) {
            Some(p) if p.message == message && &p.origin == origin => p.since,
            _ => SystemTime::now(),
        };
        annotations.insert(
            r.clone(),
            Problem {
                origin: origin.clone(),
                object: Some(r.clone()),
                message,
                since,
            },
        );
    }
}

/// What one batch of updates changed in the snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub services: BTreeSet<ServiceKey>,
    pub nodes: BTreeSet<String>,
    /// The earliest time a change in this batch happened.
    pub trigger_time: Option<SystemTime>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.nodes.is_empty()
    }
}

/// The one writer of the cluster snapshot.
#[derive(Debug, Default)]
pub struct Store {
    origins: BTreeMap<Origin, BTreeMap<ObjectRef, Arc<Object>>>,
    /// Which origins hold each object, to resolve duplicates.
    holders: HashMap<ObjectRef, BTreeSet<Origin>>,
    snapshot: ClusterSnapshot,
    /// Which Service each EndpointSlice in the snapshot belongs to.
    slice_owner: HashMap<ServiceKey, ServiceKey>,
    problems: ProblemsView,
}

const DUPLICATE: &str = "also defined in ";

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn snapshot(&self) -> &ClusterSnapshot {
        &self.snapshot
    }

    pub fn problems(&self) -> ProblemsView {
        self.problems.clone()
    }

    /// Applies a batch of updates and returns what it changed.
    pub fn apply(&mut self, updates: impl IntoIterator<Item = StoreUpdate>) -> Touched {
        let mut refs = BTreeSet::new();
        let mut touched = Touched::default();
        for update in updates {
            match update {
                StoreUpdate::Replace {
                    origin,
                    objects,
                    at,
                } => {
                    let new: BTreeMap<_, _> = objects
                        .into_iter()
                        .map(|o| (o.object_ref(), Arc::new(o)))
                        .collect();
                    let old = self.origins.remove(&origin).unwrap_or_default();
                    for r in old.keys().filter(|r| !new.contains_key(*r)) {
                        self.unhold(r, &origin);
                        refs.insert(r.clone());
                    }
                    for (r, object) in &new {
                        if old.get(r) != Some(object) {
                            refs.insert(r.clone());
                        }
                        self.holders
                            .entry(r.clone())
                            .or_default()
                            .insert(origin.clone());
                    }
                    if !new.is_empty() {
                        self.origins.insert(origin, new);
                    }
                    earliest(&mut touched.trigger_time, at);
                }
                StoreUpdate::Upsert { origin, object, at } => {
                    let r = object.object_ref();
                    self.holders
                        .entry(r.clone())
                        .or_default()
                        .insert(origin.clone());
                    self.origins
                        .entry(origin)
                        .or_default()
                        .insert(r.clone(), Arc::new(object));
                    refs.insert(r);
                    earliest(&mut touched.trigger_time, at);
                }
                StoreUpdate::Delete { origin, object, at } => {
                    let removed = self
                        .origins
                        .get_mut(&origin)
                        .and_then(|o| o.remove(&object));
                    if removed.is_some() {
                        self.unhold(&object, &origin);
                        refs.insert(object);
                        earliest(&mut touched.trigger_time, at);
                    }
                }
                StoreUpdate::Problem {
                    origin,
                    object,
                    message,
                } => {
                    let mut problems = self.problems.sources();
                    let message = bounded(message);
                    let since = problems
                        .get(&(origin.clone(), object.clone(), 0))
                        .filter(|p| p.message == message)
                        .map_or_else(SystemTime::now, |p| p.since);
                    problems.retain(|(o, r, n), _| {
                        o != &origin || r != &object || *n == DUPLICATE_ORDINAL
                    });
                    problems.insert(
                        (origin.clone(), object.clone(), 0),
                        Problem {
                            origin,
                            object,
                            message,
                            since,
                        },
                    );
                }
                StoreUpdate::ReplaceProblems {
                    origin,
                    problems: replacement,
                } => {
                    let mut problems = self.problems.sources();
                    let mut old: BTreeMap<(Option<ObjectRef>, String), SystemTime> =
                        BTreeMap::new();
                    problems.retain(|(o, r, n), p| {
                        if o != &origin || *n == DUPLICATE_ORDINAL {
                            return true;
                        }
                        old.insert((r.clone(), p.message.clone()), p.since);
                        false
                    });
                    let mut ordinals: HashMap<Option<ObjectRef>, u32> = HashMap::new();
                    for (object, message) in replacement {
                        let message = bounded(message);
                        let ordinal = ordinals.entry(object.clone()).or_default();
                        let since = old
                            .get(&(object.clone(), message.clone()))
                            .copied()
                            .unwrap_or_else(SystemTime::now);
                        problems.insert(
                            (origin.clone(), object.clone(), *ordinal),
                            Problem {
                                origin: origin.clone(),
                                object,
                                message,
                                since,
                            },
                        );
                        *ordinal = (*ordinal + 1).min(DUPLICATE_ORDINAL - 1);
                    }
                }
                StoreUpdate::ClearProblem {
                    origin,
                    object: None,
                } => {
                    let mut problems = self.problems.sources();
                    problems.retain(|(o, _, n), _| o != &origin || *n == DUPLICATE_ORDINAL);
                }
                StoreUpdate::ClearProblem {
                    origin,
                    object: Some(r),
                } => {
                    let mut problems = self.problems.sources();
                    let object = Some(r);
                    problems.retain(|(o, o_ref, n), _| {
                        o != &origin || o_ref != &object || *n == DUPLICATE_ORDINAL
                    });
                }
                StoreUpdate::Synced => {}
            }
        }
        for r in refs {
            self.resolve(&r, &mut touched);
        }
        touched
    }

    fn unhold(&mut self, r: &ObjectRef, origin: &Origin) {
        if let Some(set) = self.holders.get_mut(r) {
            set.remove(origin);
            if set.is_empty() {
                self.holders.remove(r);
            }
        }
        let mut problems = self.problems.sources();
        problems.remove(&(origin.clone(), Some(r.clone()), DUPLICATE_ORDINAL));
    }

    /// Puts the winning copy of `r` (if any) into the snapshot and records what moved.
    fn resolve(&mut self, r: &ObjectRef, touched: &mut Touched) {
        let holders: Vec<Origin> = self
            .holders
            .get(r)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        if let Some((winner, losers)) = holders.split_first() {
            let mut problems = self.problems.sources();
            problems.remove(&(winner.clone(), Some(r.clone()), DUPLICATE_ORDINAL));
            for loser in losers {
                problems
                    .entry((loser.clone(), Some(r.clone()), DUPLICATE_ORDINAL))
                    .or_insert_with(|| Problem {
                        origin: loser.clone(),
                        object: Some(r.clone()),
                        message: format!("{DUPLICATE}{winner}; this copy is ignored"),
                        since: SystemTime::now(),
                    });
            }
        }
        let winner = holders
            .first()
            .and_then(|o| self.origins.get(o))
            .and_then(|o| o.get(r));
        let notes = holders.first().zip(winner).and_then(|(o, w)| match &**w {
            Object::Service(s) => Some((
                o,
                compute::dropped_reason(s)
                    .map(|reason| format!("not programmed on any node: {reason}"))
                    .into_iter()
                    .chain(s.annotation_problems.iter().cloned())
                    .collect(),
            )),
            Object::Node(n) => Some((o, n.label_problems.clone())),
            Object::EndpointSlice(_) => None,
        });
        if r.kind != ObjectKind::EndpointSlice {
            self.problems.set_annotations(r, notes);
        }
        let snapshot = &mut self.snapshot;
        match r.kind {
            ObjectKind::Service => {
                let key = ServiceKey::new(&r.namespace, &r.name);
                let new = winner.and_then(|o| match &**o {
                    Object::Service(s) => Some(Arc::new(s.clone())),
                    _ => None,
                });
                let changed = match (&new, snapshot.services.get(&key)) {
                    (Some(new), Some(old)) => new != old,
                    (None, None) => false,
                    _ => true,
                };
                if changed {
                    match new {
                        Some(s) => snapshot.services.insert(key.clone(), s),
                        None => snapshot.services.remove(&key),
                    };
                    touched.services.insert(key);
                }
            }
            ObjectKind::EndpointSlice => {
                let slice_key = ServiceKey::new(&r.namespace, &r.name);
                let new = winner.and_then(|o| match &**o {
                    Object::EndpointSlice(s) => Some(Arc::new(s.clone())),
                    _ => None,
                });
                let old_service = self.slice_owner.remove(&slice_key);
                let old = old_service
                    .as_ref()
                    .and_then(|s| snapshot.slices.get_mut(s))
                    .and_then(|slices| slices.remove(&slice_key));
                if let Some(service) = &old_service
                    && snapshot
                        .slices
                        .get(service)
                        .is_some_and(imbl::OrdMap::is_empty)
                {
                    snapshot.slices.remove(service);
                }
                if old != new {
                    touched.services.extend(old_service);
                }
                if let Some(slice) = new {
                    if old.as_ref() != Some(&slice) {
                        touched.services.insert(slice.service.clone());
                        if let Some(t) = slice.trigger_time {
                            earliest(&mut touched.trigger_time, t);
                        }
                    }
                    self.slice_owner
                        .insert(slice_key.clone(), slice.service.clone());
                    snapshot
                        .slices
                        .entry(slice.service.clone())
                        .or_default()
                        .insert(slice_key, slice);
                }
            }
            ObjectKind::Node => {
                let new = winner.and_then(|o| match &**o {
                    Object::Node(n) => Some(Arc::new(n.clone())),
                    _ => None,
                });
                if new.as_deref() != snapshot.nodes.get(&r.name).map(|n| &**n) {
                    match new {
                        Some(n) => snapshot.nodes.insert(r.name.clone(), n),
                        None => snapshot.nodes.remove(&r.name),
                    };
                    touched.nodes.insert(r.name.clone());
                }
            }
        }
    }
}

fn earliest(slot: &mut Option<SystemTime>, at: SystemTime) {
    *slot = Some(slot.map_or(at, |t| t.min(at)));
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::model::{AddressFamily, EndpointSlice, Node, Service, ServicePort};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn service(name: &str, port: u16) -> Object {
        let key = ServiceKey::new("default", name);
        Object::Service(Service::cluster_ip(
            key,
            "10.96.0.1".parse().unwrap(),
            vec![ServicePort::tcp("", port)],
        ))
    }

    fn slice(name: &str, service: &str) -> Object {
        Object::EndpointSlice(EndpointSlice {
            key: ServiceKey::new("default", name),
            service: ServiceKey::new("default", service),
            address_family: AddressFamily::V4,
            ports: vec![],
            endpoints: vec![],
            trigger_time: Some(at(5)),
        })
    }

    fn node(name: &str, zone: &str) -> Object {
        Object::Node(Node {
            name: name.into(),
            zone: Some(zone.into()),
            deleting: false,
            dataplane: None,
            label_problems: Vec::new(),
            addresses: vec![],
        })
    }

    fn replace(origin: &str, objects: Vec<Object>, secs: u64) -> StoreUpdate {
        StoreUpdate::Replace {
            origin: origin.into(),
            objects,
            at: at(secs),
        }
    }

    fn keys(names: &[&str]) -> BTreeSet<ServiceKey> {
        names
            .iter()
            .map(|n| ServiceKey::new("default", *n))
            .collect()
    }

    #[test]
    fn replacing_an_origin_touches_only_what_changed() {
        let mut store = Store::new();
        let first = store.apply([replace(
            "a.yaml",
            vec![service("web", 80), service("db", 5432)],
            10,
        )]);
        assert_eq!(first.services, keys(&["db", "web"]));
        assert_eq!(first.trigger_time, Some(at(10)));

        let second = store.apply([replace(
            "a.yaml",
            vec![service("web", 8080), service("db", 5432)],
            20,
        )]);
        assert_eq!(second.services, keys(&["web"]));
        assert_eq!(store.snapshot().services.len(), 2);

        let third = store.apply([replace("a.yaml", vec![service("web", 8080)], 30)]);
        assert_eq!(third.services, keys(&["db"]));
        assert!(
            !store
                .snapshot()
                .services
                .contains_key(&ServiceKey::new("default", "db"))
        );
    }

    #[test]
    fn an_unchanged_replace_touches_nothing() {
        let mut store = Store::new();
        store.apply([replace(
            "a.yaml",
            vec![service("web", 80), node("n1", "z1")],
            10,
        )]);
        assert!(
            store
                .apply([replace(
                    "a.yaml",
                    vec![service("web", 80), node("n1", "z1")],
                    20
                )])
                .is_empty()
        );
    }

    #[test]
    fn slice_changes_touch_their_service_and_moving_a_slice_touches_both() {
        let mut store = Store::new();
        let touched = store.apply([replace("s.yaml", vec![slice("web-1", "web")], 10)]);
        assert_eq!(touched.services, keys(&["web"]));
        assert_eq!(
            touched.trigger_time,
            Some(at(5)),
            "the slice's own trigger time is earlier"
        );

        let moved = store.apply([replace("s.yaml", vec![slice("web-1", "api")], 20)]);
        assert_eq!(moved.services, keys(&["api", "web"]));
        assert!(
            !store
                .snapshot()
                .slices
                .contains_key(&ServiceKey::new("default", "web"))
        );
        assert_eq!(
            store.snapshot().slices[&ServiceKey::new("default", "api")].len(),
            1
        );
    }

    #[test]
    fn upsert_and_delete_change_single_objects_of_an_origin() {
        let mut store = Store::new();
        store.apply([replace("kubernetes/Service", vec![service("web", 80)], 1)]);
        let origin = "kubernetes/Service".to_string();
        let upserted = store.apply([StoreUpdate::Upsert {
            origin: origin.clone(),
            object: service("db", 1),
            at: at(2),
        }]);
        assert_eq!(upserted.services, keys(&["db"]));
        let object = service("web", 80).object_ref();
        let deleted = store.apply([StoreUpdate::Delete {
            origin: origin.clone(),
            object: object.clone(),
            at: at(3),
        }]);
        assert_eq!(deleted.services, keys(&["web"]));
        assert!(
            store
                .apply([StoreUpdate::Delete {
                    origin,
                    object,
                    at: at(4)
                }])
                .is_empty()
        );
    }

    #[test]
    fn node_changes_are_reported_by_name() {
        let mut store = Store::new();
        let touched = store.apply([replace(
            "nodes.yaml",
            vec![node("n1", "z1"), node("n2", "z1")],
            1,
        )]);
        assert_eq!(touched.nodes, ["n1", "n2"].map(String::from).into());
        let touched = store.apply([replace(
            "nodes.yaml",
            vec![node("n1", "z1"), node("n2", "z2")],
            2,
        )]);
        assert_eq!(touched.nodes, ["n2"].map(String::from).into());
    }

    #[test]
    fn an_object_defined_twice_keeps_the_first_origin_and_reports_the_other() {
        let mut store = Store::new();
        store.apply([replace("b.yaml", vec![service("web", 81)], 1)]);
        store.apply([replace("a.yaml", vec![service("web", 80)], 2)]);
        let Object::Service(expected) = service("web", 80) else {
            unreachable!()
        };
        assert_eq!(*store.snapshot().services[&expected.key], expected);
        let problems = store.problems().list();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].origin, "b.yaml");
        assert!(
            problems[0].message.contains("also defined in a.yaml"),
            "{}",
            problems[0].message
        );

        // Removing the winner promotes the other copy and clears the problem.
        let touched = store.apply([replace("a.yaml", vec![], 3)]);
        assert_eq!(touched.services, keys(&["web"]));
        assert_eq!(store.snapshot().services[&expected.key].ports[0].port, 81);
        assert!(store.problems().list().is_empty());
    }

    #[test]
    fn problems_are_kept_until_cleared_and_keep_their_first_time() {
        let mut store = Store::new();
        let problem = || StoreUpdate::Problem {
            origin: "x.yaml".into(),
            object: None,
            message: "bad".into(),
        };
        store.apply([problem()]);
        let since = store.problems().list()[0].since;
        store.apply([problem()]);
        assert_eq!(store.problems().list()[0].since, since);
        store.apply([StoreUpdate::ClearProblem {
            origin: "x.yaml".into(),
            object: None,
        }]);
        assert!(store.problems().list().is_empty());
    }

    #[test]
    fn ignored_annotations_of_the_service_in_force_are_listed_until_it_changes_or_goes() {
        let mut store = Store::new();
        let annotated = |problems: &[&str]| {
            let Object::Service(mut s) = service("web", 80) else {
                unreachable!()
            };
            s.annotation_problems = problems.iter().map(|p| p.to_string()).collect();
            Object::Service(s)
        };
        let upsert = |object: Object| StoreUpdate::Upsert {
            origin: "a.yaml".into(),
            object,
            at: at(1),
        };
        store.apply([upsert(annotated(&["ipvs: bad", "ebpf: bad"]))]);
        let problems = store.problems().list();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].origin, "a.yaml");
        assert_eq!(problems[0].message, "ipvs: bad; ebpf: bad");
        assert_eq!(
            problems[0].object.as_ref().map(ToString::to_string),
            Some(service("web", 80).object_ref().to_string())
        );
        let since = problems[0].since;
        store.apply([upsert(annotated(&["ipvs: bad", "ebpf: bad"]))]);
        assert_eq!(store.problems().list()[0].since, since);

        store.apply([upsert(annotated(&[]))]);
        assert!(store.problems().list().is_empty(), "fixed");
        store.apply([upsert(annotated(&["ipvs: bad"]))]);
        assert_eq!(store.problems().list().len(), 1);
        store.apply([StoreUpdate::Delete {
            origin: "a.yaml".into(),
            object: service("web", 80).object_ref(),
            at: at(2),
        }]);
        assert!(store.problems().list().is_empty(), "deleted");
    }

    #[test]
    fn every_problem_of_an_origin_is_listed_even_for_one_object_and_replaced_together() {
        let mut store = Store::new();
        let web = service("web", 80).object_ref();
        let replace = |problems: Vec<(Option<ObjectRef>, &str)>| StoreUpdate::ReplaceProblems {
            origin: "m.yaml".into(),
            problems: problems
                .into_iter()
                .map(|(o, m)| (o, m.to_string()))
                .collect(),
        };
        store.apply([replace(vec![
            (None, "document 1: apiVersion and kind must be set"),
            (None, "document 2: apiVersion and kind must be set"),
            (Some(web.clone()), "document 3: spec.type: bad"),
            (Some(web.clone()), "document 4: defined again"),
        ])]);
        let messages = |store: &Store| {
            let mut m: Vec<String> = store
                .problems()
                .list()
                .into_iter()
                .map(|p| p.message)
                .collect();
            m.sort();
            m
        };
        assert_eq!(messages(&store).len(), 4);
        let since = store.problems().list()[0].since;
        store.apply([replace(vec![
            (None, "document 1: apiVersion and kind must be set"),
            (Some(web.clone()), "document 3: spec.type: bad"),
        ])]);
        assert_eq!(
            messages(&store),
            [
                "document 1: apiVersion and kind must be set",
                "document 3: spec.type: bad"
            ]
        );
        assert_eq!(
            store.problems().list()[0].since,
            since,
            "unchanged problems keep their time"
        );
        store.apply([replace(vec![])]);
        assert!(store.problems().list().is_empty());
    }

    #[test]
    fn a_problem_message_is_kept_bounded() {
        let mut store = Store::new();
        store.apply([StoreUpdate::Problem {
            origin: "kubernetes/Service".into(),
            object: None,
            message: "x".repeat(100_000),
        }]);
        let message = &store.problems().list()[0].message;
        assert_eq!(message.chars().count(), MAX_PROBLEM_MESSAGE + 1);
        assert!(message.ends_with('…'));
        store.apply([StoreUpdate::Problem {
            origin: "kubernetes/Service".into(),
            object: None,
            message: "unknown variant `a\nforged line`, expected \"b\"".into(),
        }]);
        assert_eq!(
            store.problems().list()[0].message,
            "unknown variant `a\\nforged line`, expected \"b\"",
            "one line, quotes kept"
        );
    }

    #[test]
    fn a_service_no_node_programs_is_listed_with_why_and_headless_ones_are_not() {
        let mut store = Store::new();
        let Object::Service(base) = service("web", 80) else {
            unreachable!()
        };
        let mut no_ip = base.clone();
        no_ip.key = ServiceKey::new("default", "no-ip");
        no_ip.cluster_ips.clear();
        let mut no_ports = base.clone();
        no_ports.key = ServiceKey::new("default", "no-ports");
        no_ports.ports.clear();
        let mut headless = base.clone();
        headless.key = ServiceKey::new("default", "headless");
        headless.headless = true;
        headless.cluster_ips.clear();
        store.apply([replace(
            "a.yaml",
            vec![
                Object::Service(base),
                Object::Service(no_ip),
                Object::Service(no_ports),
                Object::Service(headless),
            ],
            1,
        )]);
        let mut listed: Vec<(String, String)> = store
            .problems()
            .list()
            .into_iter()
            .map(|p| (p.object.unwrap().name, p.message))
            .collect();
        listed.sort();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert_eq!(listed[0].0, "no-ip");
        assert!(listed[0].1.contains("no cluster IP"), "{}", listed[0].1);
        assert_eq!(listed[1].0, "no-ports");
        assert!(listed[1].1.contains("no ports"), "{}", listed[1].1);

        // Fixed, or gone: the problem goes too.
        store.apply([replace("a.yaml", vec![service("web", 80)], 2)]);
        assert!(store.problems().list().is_empty());
    }
}
