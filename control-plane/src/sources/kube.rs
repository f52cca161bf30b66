//! Watches Services, EndpointSlices and Nodes through the Kubernetes API with kube-rs and
//! reports them, converted to the model, to the store. Never decides what a node needs.
//!
//! Entry point: [`KubeSource::run`]. What one kind's watch events mean for the store is the
//! pure [`KindTracker::step`]; the task around it only feeds it events and forwards its
//! updates.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::SystemTime,
};

use futures::{StreamExt, future};
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::{
    convert::{self, ConvertError},
    model::{Object, ObjectKind, ObjectRef},
    sources::{Origin, StoreSender, StoreUpdate},
};

/// Origin of the objects reported by the Service watcher.
pub const SERVICE_ORIGIN: &str = "kubernetes/Service";
/// Origin of the objects reported by the EndpointSlice watcher.
pub const ENDPOINT_SLICE_ORIGIN: &str = "kubernetes/EndpointSlice";
/// Origin of the objects reported by the Node watcher.
pub const NODE_ORIGIN: &str = "kubernetes/Node";

/// Label the control plane puts on the EndpointSlices (and Endpoints) of headless
/// Services (`v1.IsHeadlessService`); kube-proxy never watches objects carrying it.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Why the Kubernetes source cannot run.
///
/// None of these is retryable by calling again with the same input: watch errors
/// (API server unreachable, expired resource versions, forbidden lists) never surface
/// here, they are logged and retried with kube-runtime's default backoff.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// No client configuration was found or it could not be used (no kubeconfig and
    /// not running in a cluster, unreadable certificates, …).
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// A watcher stream ended, which kube-runtime's watcher never does on its own.
    #[error("the {origin} watch ended unexpectedly")]
    WatchEnded { origin: Origin },
}

/// Watches the three kinds a proxy needs, cluster-wide, and reports them to the store.
///
/// Each kind is its own origin (`kubernetes/Service`, `kubernetes/EndpointSlice`,
/// `kubernetes/Node`): a relist replaces exactly that kind's objects.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    skip_headless: bool,
    events: WatchEvents,
}

/// Counts what each kind's watch saw, by `kind` (`Service`, `EndpointSlice`, `Node`) and
/// `event`: `relist` (a full list began: the first, or after the watch fell out of the
/// API server's history), `listed` (an object of a list), `apply`, `delete`, `expired`
/// (`410 Gone`) and `error` (a failed list or watch, retried with backoff). Exported by
/// the controller as `switchyard_controller_watch_events_total`.
pub type WatchEvents = Family<Vec<(&'static str, &'static str)>, Counter>;

impl KubeSource {
    /// Uses `client` as it is (tests point it at a fake API server).
    pub fn new(client: Client) -> Self {
        Self {
            client,
            skip_headless: true,
            events: WatchEvents::default(),
        }
    }

    /// Counts watch events into `events` (the controller's metrics hand theirs).
    pub fn with_watch_events(mut self, events: WatchEvents) -> Self {
        self.events = events;
        self
    }

    /// The API client it watches with (the leader also reports Events through it).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Builds a client the way `kubectl` finds one: `KUBECONFIG` or `~/.kube/config`,
    /// else the in-cluster service account.
    pub async fn try_default() -> Result<Self, KubeSourceError> {
        let client = Client::try_default()
            .await
            .map_err(KubeSourceError::Client)?;
        Ok(Self::new(client))
    }

    /// Whether to ask the API server only for objects without the
    /// `service.kubernetes.io/headless` label, as kube-proxy does (the default). The label
    /// marks the EndpointSlices of headless Services, which no proxy uses; headless
    /// Services themselves are still reported, and skipped by the computation.
    pub fn skip_headless(mut self, skip: bool) -> Self {
        self.skip_headless = skip;
        self
    }

    /// Watches until the store's receiver is gone, then returns `Ok(())`.
    ///
    /// # Recovery
    /// A failed list or watch is logged and retried with kube-runtime's default backoff
    /// (0.8 s doubling to 30 s, with jitter). A watch that falls out of the API server's
    /// history (`410 Gone`) relists that kind, which reaches the store as one `Replace`.
    pub async fn run(self, tx: StoreSender) -> Result<(), KubeSourceError> {
        // Bookmarks on, consistent paginated lists: kube-runtime's defaults.
        let filtered = if self.skip_headless {
            watcher::Config::default().labels(&format!("!{HEADLESS_LABEL}"))
        } else {
            watcher::Config::default()
        };
        // The store is whole once every kind has been listed once.
        let unlisted = AtomicUsize::new(3);
        let services = watch_kind(
            Api::<core::Service>::all(self.client.clone()),
            filtered.clone(),
            KindTracker::new(SERVICE_ORIGIN, ObjectKind::Service, convert_service),
            Watch {
                tx: &tx,
                unlisted: &unlisted,
                events: &self.events,
                kind: "Service",
            },
        );
        let slices = watch_kind(
            Api::<discovery::EndpointSlice>::all(self.client.clone()),
            filtered,
            KindTracker::new(
                ENDPOINT_SLICE_ORIGIN,
                ObjectKind::EndpointSlice,
                convert_endpoint_slice,
            ),
            Watch {
                tx: &tx,
                unlisted: &unlisted,
                events: &self.events,
                kind: "EndpointSlice",
            },
        );
        let nodes = watch_kind(
            Api::<core::Node>::all(self.client.clone()),
            watcher::Config::default(),
            KindTracker::new(NODE_ORIGIN, ObjectKind::Node, convert_node),
            Watch {
                tx: &tx,
                unlisted: &unlisted,
                events: &self.events,
                kind: "Node",
            },
        );
        tokio::select! {
            () = tx.closed() => Ok(()),
            result = future::try_join3(services, slices, nodes) => result.map(|_| ()),
        }
    }
}

fn convert_service(object: &core::Service) -> Result<Option<Object>, ConvertError> {
    convert::service(object).map(|service| Some(Object::Service(service)))
}

fn convert_endpoint_slice(
    object: &discovery::EndpointSlice,
) -> Result<Option<Object>, ConvertError> {
    convert::endpoint_slice(object).map(|slice| slice.map(Object::EndpointSlice))
}

fn convert_node(object: &core::Node) -> Result<Option<Object>, ConvertError> {
    convert::node(object).map(|node| Some(Object::Node(node)))
}

/// What one kind's watcher reports to, shared by the three.
struct Watch<'a> {
    tx: &'a StoreSender,
    /// Kinds not listed yet: the last one listed tells the store it is synced.
    unlisted: &'a AtomicUsize,
    events: &'a WatchEvents,
    /// The `kind` label.
    kind: &'static str,
}

impl Watch<'_> {
    fn count(&self, event: &'static str) {
        self.events
            .get_or_create(&vec![("kind", self.kind), ("event", event)])
            .inc();
    }
}

/// Runs one kind's watcher until the store is closed. After its first full list it
/// counts `unlisted` down; the last kind listed tells the store it is synced.
async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    mut tracker: KindTracker<K>,
    watch: Watch<'_>,
) -> Result<(), KubeSourceError>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + DeserializeOwned + Send + 'static,
{
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut was_listed = false;
    loop {
        let event = match events.next().await {
            None => {
                return Err(KubeSourceError::WatchEnded {
                    origin: tracker.origin.clone(),
                });
            }
            Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                info!(origin = %tracker.origin, message = %status.message, "watch history expired, relisting");
                watch.count("expired");
                continue;
            }
            Some(Err(error)) => {
                warn!(origin = %tracker.origin, %error, "watch failed, retrying with backoff");
                watch.count("error");
                continue;
            }
            Some(Ok(event)) => event,
        };
        match &event {
            Event::Init => watch.count("relist"),
            Event::InitApply(_) => watch.count("listed"),
            Event::InitDone => {}
            Event::Apply(_) => watch.count("apply"),
            Event::Delete(_) => watch.count("delete"),
        }
        let listed = matches!(event, Event::InitDone) && !std::mem::replace(&mut was_listed, true);
        let mut updates = tracker.step(event, SystemTime::now());
        if listed && watch.unlisted.fetch_sub(1, Ordering::SeqCst) == 1 {
            updates.push(StoreUpdate::Synced);
        }
        for update in updates {
            if watch.tx.send(update).await.is_err() {
                debug!(origin = %tracker.origin, "store closed, stopping watch");
                return Ok(());
            }
        }
    }
}

/// Turns one API object into the model: `Ok(None)` for objects a proxy ignores.
pub type ConvertFn<K> = fn(&K) -> Result<Option<Object>, ConvertError>;

/// What one kind's watcher has told the store, so that watch events become store updates.
///
/// It remembers the last good version of every object it reported: a relist that finds an
/// object invalid keeps that version in the `Replace`, as a modification does by sending
/// no `Upsert` (a bad edit never removes a working Service).
pub struct KindTracker<K> {
    origin: Origin,
    kind: ObjectKind,
    convert: ConvertFn<K>,
    /// The objects the store holds for this origin, as this tracker reported them.
    reported: BTreeMap<ObjectRef, Object>,
    /// Objects whose current version does not convert, with the message sent.
    problems: BTreeMap<ObjectRef, String>,
    /// Objects of a relist in progress (between `Init` and `InitDone`).
    relist: Option<Vec<K>>,
}

impl<K: Resource> KindTracker<K> {
    pub fn new(origin: impl Into<Origin>, kind: ObjectKind, convert: ConvertFn<K>) -> Self {
        Self {
            origin: origin.into(),
            kind,
            convert,
            reported: BTreeMap::new(),
            problems: BTreeMap::new(),
            relist: None,
        }
    }

    /// The store updates that one watcher event calls for, stamped `now`.
    ///
    /// - `Init`/`InitApply` buffer; `InitDone` sends one `Replace` with every listed object
    ///   that converts (or its last good version), then the problems that appeared or
    ///   went away.
    /// - `Apply` sends `Upsert` when the converted object differs from what was reported
    ///   (preceded by `ClearProblem` if the previous version was invalid), or `Problem`
    ///   when it does not convert (once per distinct message).
    /// - `Delete` sends `Delete` for a reported object and clears its problem.
    pub fn step(&mut self, event: Event<K>, now: SystemTime) -> Vec<StoreUpdate> {
        match event {
            Event::Init => {
                self.relist = Some(Vec::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                self.relist.get_or_insert_default().push(object);
                Vec::new()
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                self.replace(listed, now)
            }
            Event::Apply(object) => self.apply(&object, now),
            Event::Delete(object) => self.delete(&object, now),
        }
    }

    fn object_ref(&self, object: &K) -> ObjectRef {
        ObjectRef {
            kind: self.kind,
            namespace: object.meta().namespace.clone().unwrap_or_default(),
            name: object.meta().name.clone().unwrap_or_default(),
        }
    }

    fn replace(&mut self, listed: Vec<K>, now: SystemTime) -> Vec<StoreUpdate> {
        let mut reported = BTreeMap::new();
        let mut problems = BTreeMap::new();
        for object in &listed {
            let object_ref = self.object_ref(object);
            match (self.convert)(object) {
                Ok(Some(converted)) => {
                    reported.insert(object_ref, converted);
                }
                Ok(None) => {}
                Err(error) => {
                    if let Some(last_good) = self.reported.get(&object_ref) {
                        reported.insert(object_ref.clone(), last_good.clone());
                    }
                    problems.insert(object_ref, error.to_string());
                }
            }
        }
        let mut updates = vec![StoreUpdate::Replace {
            origin: self.origin.clone(),
            objects: reported.values().cloned().collect(),
            at: now,
        }];
        for (object_ref, message) in &problems {
            if self.problems.get(object_ref) != Some(message) {
                updates.push(self.problem(object_ref.clone(), message.clone()));
            }
        }
        for object_ref in self.problems.keys() {
            if !problems.contains_key(object_ref) {
                updates.push(self.clear_problem(object_ref.clone()));
            }
        }
        self.reported = reported;
        self.problems = problems;
        updates
    }

    fn apply(&mut self, object: &K, now: SystemTime) -> Vec<StoreUpdate> {
        let object_ref = self.object_ref(object);
        let mut updates = Vec::new();
        match (self.convert)(object) {
            Ok(converted) => {
                if self.problems.remove(&object_ref).is_some() {
                    updates.push(self.clear_problem(object_ref.clone()));
                }
                match converted {
                    Some(converted) => {
                        if self.reported.get(&object_ref) != Some(&converted) {
                            self.reported.insert(object_ref, converted.clone());
                            updates.push(StoreUpdate::Upsert {
                                origin: self.origin.clone(),
                                object: converted,
                                at: now,
                            });
                        }
                    }
                    None => {
                        if self.reported.remove(&object_ref).is_some() {
                            updates.push(self.deleted(object_ref, now));
                        }
                    }
                }
            }
            Err(error) => {
                let message = error.to_string();
                if self.problems.get(&object_ref) != Some(&message) {
                    self.problems.insert(object_ref.clone(), message.clone());
                    updates.push(self.problem(object_ref, message));
                }
            }
        }
        updates
    }

    fn delete(&mut self, object: &K, now: SystemTime) -> Vec<StoreUpdate> {
        let object_ref = self.object_ref(object);
        let mut updates = Vec::new();
        if self.problems.remove(&object_ref).is_some() {
            updates.push(self.clear_problem(object_ref.clone()));
        }
        if self.reported.remove(&object_ref).is_some() {
            updates.push(self.deleted(object_ref, now));
        }
        updates
    }

    fn deleted(&self, object: ObjectRef, at: SystemTime) -> StoreUpdate {
        StoreUpdate::Delete {
            origin: self.origin.clone(),
            object,
            at,
        }
    }

    fn problem(&self, object: ObjectRef, message: String) -> StoreUpdate {
        warn!(origin = %self.origin, %object, %message, "ignoring invalid object");
        StoreUpdate::Problem {
            origin: self.origin.clone(),
            object: Some(object),
            message,
        }
    }

    fn clear_problem(&self, object: ObjectRef) -> StoreUpdate {
        StoreUpdate::ClearProblem {
            origin: self.origin.clone(),
            object: Some(object),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The tracker is exercised with ConfigMaps standing in for API objects and a
    //! conversion of their own, so these tests don't depend on `convert`.

    use std::collections::BTreeMap;

    use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;
    use crate::model::Node;

    /// `data.zone` becomes the node's zone; `data.bad` makes the object invalid;
    /// `data.skip` makes it one the proxy ignores.
    fn convert_config_map(object: &ConfigMap) -> Result<Option<Object>, ConvertError> {
        let data = object.data.clone().unwrap_or_default();
        if let Some(bad) = data.get("bad") {
            return Err(ConvertError::Invalid {
                field: "data.bad".into(),
                message: bad.clone(),
            });
        }
        if data.contains_key("skip") {
            return Ok(None);
        }
        Ok(Some(node(
            object.metadata.name.as_deref().unwrap(),
            data.get("zone"),
        )))
    }

    fn node(name: &str, zone: Option<&String>) -> Object {
        Object::Node(Node {
            name: name.into(),
            zone: zone.cloned(),
            deleting: false,
            dataplane: None,
            label_problems: Vec::new(),
            addresses: Vec::new(),
        })
    }

    fn config_map(name: &str, data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..ConfigMap::default()
        }
    }

    fn object_ref(name: &str) -> ObjectRef {
        ObjectRef {
            kind: ObjectKind::Node,
            namespace: String::new(),
            name: name.into(),
        }
    }

    fn tracker() -> KindTracker<ConfigMap> {
        KindTracker::new("test", ObjectKind::Node, convert_config_map)
    }

    fn relist(
        tracker: &mut KindTracker<ConfigMap>,
        objects: Vec<ConfigMap>,
        now: SystemTime,
    ) -> Vec<StoreUpdate> {
        let mut updates = tracker.step(Event::Init, now);
        for object in objects {
            updates.extend(tracker.step(Event::InitApply(object), now));
        }
        updates.extend(tracker.step(Event::InitDone, now));
        updates
    }

    const T: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn relist_sends_one_replace_at_init_done() {
        let mut tracker = tracker();
        assert_eq!(tracker.step(Event::Init, T), []);
        assert_eq!(
            tracker.step(Event::InitApply(config_map("a", &[("zone", "z1")])), T),
            []
        );
        assert_eq!(
            tracker.step(Event::InitApply(config_map("s", &[("skip", "")])), T),
            []
        );
        assert_eq!(
            tracker.step(Event::InitDone, T),
            [StoreUpdate::Replace {
                origin: "test".into(),
                objects: vec![node("a", Some(&"z1".into()))],
                at: T,
            }]
        );
    }

    #[test]
    fn apply_upserts_only_when_the_converted_object_changes() {
        let mut tracker = tracker();
        relist(&mut tracker, vec![], T);
        let a = config_map("a", &[("zone", "z1")]);
        assert_eq!(tracker.step(Event::Apply(a.clone()), T).len(), 1);
        assert_eq!(tracker.step(Event::Apply(a), T), []);
        assert_eq!(
            tracker.step(Event::Apply(config_map("a", &[("zone", "z2")])), T),
            [StoreUpdate::Upsert {
                origin: "test".into(),
                object: node("a", Some(&"z2".into())),
                at: T,
            }]
        );
    }

    #[test]
    fn invalid_version_reports_a_problem_and_a_fix_clears_it_before_the_upsert() {
        let mut tracker = tracker();
        relist(&mut tracker, vec![config_map("a", &[("zone", "z1")])], T);
        let problem = StoreUpdate::Problem {
            origin: "test".into(),
            object: Some(object_ref("a")),
            message: "data.bad: broken".into(),
        };
        let bad = config_map("a", &[("bad", "broken")]);
        assert_eq!(tracker.step(Event::Apply(bad.clone()), T), [problem]);
        // The same problem again is not repeated.
        assert_eq!(tracker.step(Event::Apply(bad), T), []);
        assert_eq!(
            tracker.step(Event::Apply(config_map("a", &[("zone", "z3")])), T),
            [
                StoreUpdate::ClearProblem {
                    origin: "test".into(),
                    object: Some(object_ref("a")),
                },
                StoreUpdate::Upsert {
                    origin: "test".into(),
                    object: node("a", Some(&"z3".into())),
                    at: T,
                },
            ]
        );
    }

    #[test]
    fn relist_keeps_the_last_good_version_of_an_invalid_object() {
        let mut tracker = tracker();
        relist(&mut tracker, vec![config_map("a", &[("zone", "z1")])], T);
        tracker.step(Event::Apply(config_map("a", &[("bad", "broken")])), T);
        let updates = relist(&mut tracker, vec![config_map("a", &[("bad", "broken")])], T);
        assert_eq!(
            updates,
            [StoreUpdate::Replace {
                origin: "test".into(),
                objects: vec![node("a", Some(&"z1".into()))],
                at: T,
            }]
        );
    }

    #[test]
    fn relist_clears_problems_of_objects_that_are_gone_or_fixed() {
        let mut tracker = tracker();
        relist(&mut tracker, vec![], T);
        tracker.step(Event::Apply(config_map("a", &[("bad", "x")])), T);
        tracker.step(Event::Apply(config_map("b", &[("bad", "y")])), T);
        let updates = relist(&mut tracker, vec![config_map("b", &[])], T);
        assert_eq!(
            updates,
            [
                StoreUpdate::Replace {
                    origin: "test".into(),
                    objects: vec![node("b", None)],
                    at: T,
                },
                StoreUpdate::ClearProblem {
                    origin: "test".into(),
                    object: Some(object_ref("a")),
                },
                StoreUpdate::ClearProblem {
                    origin: "test".into(),
                    object: Some(object_ref("b")),
                },
            ]
        );
    }

    #[test]
    fn delete_removes_a_reported_object_and_its_problem() {
        let mut tracker = tracker();
        relist(&mut tracker, vec![config_map("a", &[])], T);
        tracker.step(Event::Apply(config_map("a", &[("bad", "x")])), T);
        assert_eq!(
            tracker.step(Event::Delete(config_map("a", &[("bad", "x")])), T),
            [
                StoreUpdate::ClearProblem {
                    origin: "test".into(),
                    object: Some(object_ref("a")),
                },
                StoreUpdate::Delete {
                    origin: "test".into(),
                    object: object_ref("a"),
                    at: T,
                },
            ]
        );
        // Deleting something never reported sends nothing.
        assert_eq!(tracker.step(Event::Delete(config_map("z", &[])), T), []);
    }

    #[test]
    fn an_object_becoming_ignored_is_deleted_from_the_store() {
        let mut tracker = tracker();
        relist(&mut tracker, vec![config_map("a", &[])], T);
        assert_eq!(
            tracker.step(Event::Apply(config_map("a", &[("skip", "")])), T),
            [StoreUpdate::Delete {
                origin: "test".into(),
                object: object_ref("a"),
                at: T,
            }]
        );
    }
}
