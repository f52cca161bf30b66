//! The Kubernetes source against a fake API server over real HTTP: the real kube-rs
//! client and watcher code paths, nothing in the controller knowing it is a test.

mod support;

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1 as core;
use kube::{
    Api,
    api::{ListParams, VersionMatch},
    runtime::watcher::{self, Event},
};
use serde_json::{Value, json};
use support::fake_apiserver::{FakeApiServer, Options};
use switchyard_controller::{
    model::{Object, ObjectKind, ObjectRef},
    sources::{
        Origin, StoreUpdate,
        kube::{ENDPOINT_SLICE_ORIGIN, KubeSource, NODE_ORIGIN, SERVICE_ORIGIN, WatchEvents},
    },
};
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};

/// Bound on every wait; generous because a relist waits out the watcher's backoff.
const WAIT: Duration = Duration::from_secs(15);

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        },
    })
}

fn slice(name: &str, service: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": [{ "addresses": [ip], "conditions": { "ready": true }, "nodeName": "node-a" }],
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "topology.kubernetes.io/zone": zone } },
        "status": { "addresses": [{ "type": "InternalIP", "address": "192.168.0.10" }] },
    })
}

fn object_ref(kind: ObjectKind, namespace: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn service_ref(name: &str) -> ObjectRef {
    object_ref(ObjectKind::Service, "default", name)
}

/// How many watch events of `kind` and `event` the source counted.
fn counted(events: &WatchEvents, kind: &'static str, event: &'static str) -> u64 {
    events
        .get_or_create(&vec![("kind", kind), ("event", event)])
        .get()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// What the store would hold, folded from the updates received, plus the updates
/// themselves.
#[derive(Debug, Default)]
struct View {
    objects: BTreeMap<Origin, BTreeMap<ObjectRef, Object>>,
    problems: BTreeMap<(Origin, ObjectRef), String>,
    log: Vec<StoreUpdate>,
    /// Whether the source said its first full read is complete (not in `log`).
    synced: bool,
}

impl View {
    fn fold(&mut self, update: StoreUpdate) {
        match &update {
            StoreUpdate::Synced => {
                assert!(!self.synced, "Synced is said once");
                self.synced = true;
                return;
            }
            StoreUpdate::ReplaceProblems { .. } => {
                panic!("the kube source reports problems one object at a time: {update:?}")
            }
            StoreUpdate::Replace {
                origin, objects, ..
            } => {
                let objects = objects
                    .iter()
                    .map(|o| (o.object_ref(), o.clone()))
                    .collect();
                self.objects.insert(origin.clone(), objects);
            }
            StoreUpdate::Upsert { origin, object, .. } => {
                self.objects
                    .entry(origin.clone())
                    .or_default()
                    .insert(object.object_ref(), object.clone());
            }
            StoreUpdate::Delete { origin, object, .. } => {
                self.objects
                    .entry(origin.clone())
                    .or_default()
                    .remove(object);
            }
            StoreUpdate::Problem {
                origin,
                object,
                message,
            } => {
                let object = object.clone().expect("the kube source names the object");
                self.problems
                    .insert((origin.clone(), object), message.clone());
            }
            StoreUpdate::ClearProblem { origin, object } => {
                let object = object.clone().expect("the kube source names the object");
                self.problems.remove(&(origin.clone(), object));
            }
        }
        self.log.push(update);
    }

    fn names(&self, origin: &str) -> Vec<String> {
        self.objects
            .get(origin)
            .map(|objects| objects.keys().map(|r| r.name.clone()).collect())
            .unwrap_or_default()
    }

    fn get(&self, origin: &str, object: &ObjectRef) -> Option<&Object> {
        self.objects.get(origin)?.get(object)
    }

    fn cluster_ips(&self, name: &str) -> Option<Vec<IpAddr>> {
        match self.get(SERVICE_ORIGIN, &service_ref(name))? {
            Object::Service(service) => Some(service.cluster_ips.clone()),
            other => panic!("not a Service: {other:?}"),
        }
    }

    fn replaces(&self, origin: &str) -> usize {
        self.log
            .iter()
            .filter(|u| matches!(u, StoreUpdate::Replace { origin: o, .. } if o == origin))
            .count()
    }
}

/// A fake API server, a running [`KubeSource`] pointed at it, and the view of what it
/// reported.
struct Harness {
    server: FakeApiServer,
    updates: mpsc::Receiver<StoreUpdate>,
    view: View,
    source: JoinHandle<Result<(), switchyard_controller::sources::kube::KubeSourceError>>,
}

impl Harness {
    async fn start(server: FakeApiServer) -> Self {
        Self::start_with(server, |source| source).await
    }

    async fn start_with(
        server: FakeApiServer,
        configure: impl FnOnce(KubeSource) -> KubeSource,
    ) -> Self {
        let (tx, updates) = mpsc::channel(64);
        let source = tokio::spawn(configure(KubeSource::new(server.client())).run(tx));
        Self {
            server,
            updates,
            view: View::default(),
            source,
        }
    }

    /// [`Harness::start`] with the source counting its watch events into the returned
    /// counters.
    async fn start_counting(server: FakeApiServer) -> (Self, WatchEvents) {
        let events = WatchEvents::default();
        let counted = events.clone();
        let harness = Self::start_with(server, |s| s.with_watch_events(counted)).await;
        (harness, events)
    }

    /// Receives updates until `done` holds for the view; panics after [`WAIT`].
    async fn wait_for(&mut self, what: &str, done: impl Fn(&View) -> bool) {
        let wait = async {
            while !done(&self.view) {
                let update = self.updates.recv().await.expect("source still running");
                self.view.fold(update);
            }
        };
        if timeout(WAIT, wait).await.is_err() {
            panic!(
                "timed out waiting for {what}; received: {:#?}\nrequests: {:#?}",
                self.view.log,
                self.server.requests()
            );
        }
    }

    /// Waits until all three kinds have been listed once and the source said so.
    async fn wait_synced(&mut self) {
        self.wait_for("the initial list of every kind", |view| {
            [SERVICE_ORIGIN, ENDPOINT_SLICE_ORIGIN, NODE_ORIGIN]
                .iter()
                .all(|origin| view.replaces(origin) >= 1)
                && view.synced
        })
        .await;
    }

    /// Waits until the server has `count` watches open.
    async fn wait_watches(&self, count: usize) {
        let wait = async {
            while self.server.open_watches() != count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {count} open watches"));
    }

    fn watch_requests(&self) -> usize {
        self.server
            .requests()
            .iter()
            .filter(|r| r.contains("watch=true"))
            .count()
    }

    /// Waits until the server has received `count` watch requests in all.
    async fn wait_watch_requests(&self, count: usize) {
        let wait = async {
            while self.watch_requests() < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {count} watch requests"));
    }

    /// Folds in whatever arrives within `period`, returning how many updates that was.
    async fn drain_for(&mut self, period: Duration) -> usize {
        let before = self.view.log.len();
        let _ = timeout(period, async {
            while let Some(update) = self.updates.recv().await {
                self.view.fold(update);
            }
        })
        .await;
        self.view.log.len() - before
    }

    fn requests_matching(&self, path: &str, watch: bool) -> Vec<String> {
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.starts_with(&format!("GET {path}?")))
            .filter(|r| r.contains("watch=true") == watch)
            .collect()
    }
}

#[tokio::test]
async fn fake_server_pages_lists_and_streams_watches_to_a_plain_kube_watcher() {
    let server = FakeApiServer::start_with(Options {
        max_page_size: Some(1),
        ..Options::default()
    })
    .await;
    server.apply(service("a", "10.96.0.1"));
    server.apply(service("b", "10.96.0.2"));
    let api = Api::<core::Service>::all(server.client());
    let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
    let mut next = async || {
        timeout(WAIT, events.next())
            .await
            .expect("watch event in time")
            .expect("watcher keeps going")
            .expect("no watch error")
    };
    let mut listed = Vec::new();
    loop {
        match next().await {
            Event::Init => {}
            Event::InitApply(service) => listed.push(service.metadata.name.unwrap()),
            Event::InitDone => break,
            other => panic!("unexpected {other:?} during the initial list"),
        }
    }
    assert_eq!(listed, ["a", "b"]);
    server.apply(service("c", "10.96.0.3"));
    match next().await {
        Event::Apply(service) => {
            assert_eq!(service.metadata.name.as_deref(), Some("c"));
            assert_eq!(service.metadata.resource_version.as_deref(), Some("3"));
        }
        other => panic!("expected Apply(c), got {other:?}"),
    }
    server.delete("Service", "default", "a");
    match next().await {
        Event::Delete(service) => assert_eq!(service.metadata.name.as_deref(), Some("a")),
        other => panic!("expected Delete(a), got {other:?}"),
    }
    let lists = server
        .requests()
        .into_iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert_eq!(lists, 2, "one page per Service: {:?}", server.requests());
}

#[tokio::test]
async fn fake_server_lists_exact_versions_from_history_and_expires_them_on_compaction() {
    let server = FakeApiServer::start().await;
    server.apply(service("a", "10.96.0.1"));
    let before_b = server.apply(service("b", "10.96.0.2"));
    server.apply(service("b", "10.96.0.3"));
    server.delete("Service", "default", "a");
    let api = Api::<core::Service>::all(server.client());

    let exact = ListParams::default()
        .at(&before_b.to_string())
        .matching(VersionMatch::Exact);
    let list = api.list(&exact).await.expect("exact list");
    let cluster_ips: Vec<_> = list
        .items
        .iter()
        .map(|s| s.spec.as_ref().unwrap().cluster_ip.clone().unwrap())
        .collect();
    assert_eq!(cluster_ips, ["10.96.0.1", "10.96.0.2"]);
    assert_eq!(list.metadata.resource_version, Some(before_b.to_string()));

    server.apply(service("c", "10.96.0.4"));
    let first = api
        .list(&ListParams::default().limit(1))
        .await
        .expect("first page");
    let token = first.metadata.continue_.clone().expect("a continue token");
    // Compacting keeps the latest revision readable (as etcd does), so move past it first.
    server.apply(service("d", "10.96.0.5"));
    server.compact();
    let expired = api
        .list(&ListParams::default().limit(1).continue_token(&token))
        .await
        .expect_err("the continue token expired");
    assert!(
        matches!(&expired, kube::Error::Api(status) if status.code == 410),
        "{expired:?}"
    );
    let gone = api.list(&exact).await.expect_err("history compacted");
    assert!(
        matches!(&gone, kube::Error::Api(status) if status.code == 410),
        "{gone:?}"
    );
}

#[tokio::test]
async fn fake_server_serves_streaming_lists_to_a_plain_kube_watcher() {
    let server = FakeApiServer::start().await;
    server.apply(node("node-a", "zone-1"));
    let api = Api::<core::Node>::all(server.client());
    let config = watcher::Config::default().streaming_lists();
    let mut events = watcher::watcher(api, config).boxed();
    let mut seen = Vec::new();
    timeout(WAIT, async {
        loop {
            match events.next().await.unwrap().unwrap() {
                Event::Init => seen.push("Init".to_string()),
                Event::InitApply(node) => seen.push(node.metadata.name.unwrap()),
                Event::InitDone => break,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("initial events in time");
    assert_eq!(seen, ["Init", "node-a"]);
    server.apply(node("node-b", "zone-1"));
    match timeout(WAIT, events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    {
        Event::Apply(node) => assert_eq!(node.metadata.name.as_deref(), Some("node-b")),
        other => panic!("expected Apply(node-b), got {other:?}"),
    }
    let watch = &server.requests()[0];
    assert!(watch.contains("sendInitialEvents=true"), "{watch}");
}

#[tokio::test]
async fn initial_list_of_all_three_kinds_produces_one_replace_per_kind() {
    let server = FakeApiServer::start().await;
    server.apply(service("web", "10.96.0.10"));
    server.apply(service("db", "10.96.0.11"));
    server.apply(slice("web-abc", "web", "10.0.0.1"));
    server.apply(node("node-a", "zone-1"));
    let (mut harness, events) = Harness::start_counting(server).await;
    harness.wait_synced().await;
    let count = |kind, event| counted(&events, kind, event);
    assert_eq!(count("Service", "relist"), 1);
    assert_eq!(count("Service", "listed"), 2);
    assert_eq!(count("EndpointSlice", "listed"), 1);
    assert_eq!(count("Node", "listed"), 1);
    assert_eq!(count("Node", "apply"), 0);

    let view = &harness.view;
    assert_eq!(view.replaces(SERVICE_ORIGIN), 1);
    assert_eq!(view.replaces(ENDPOINT_SLICE_ORIGIN), 1);
    assert_eq!(view.replaces(NODE_ORIGIN), 1);
    assert_eq!(view.names(SERVICE_ORIGIN), ["db", "web"]);
    assert_eq!(view.cluster_ips("web"), Some(vec![ip("10.96.0.10")]));
    match view.get(
        ENDPOINT_SLICE_ORIGIN,
        &object_ref(ObjectKind::EndpointSlice, "default", "web-abc"),
    ) {
        Some(Object::EndpointSlice(slice)) => {
            assert_eq!(slice.service.name, "web");
            assert_eq!(slice.endpoints.len(), 1);
            assert_eq!(slice.endpoints[0].address, ip("10.0.0.1"));
        }
        other => panic!("expected the web-abc slice, got {other:?}"),
    }
    match view.get(NODE_ORIGIN, &object_ref(ObjectKind::Node, "", "node-a")) {
        Some(Object::Node(node)) => assert_eq!(node.zone.as_deref(), Some("zone-1")),
        other => panic!("expected node-a, got {other:?}"),
    }
    assert!(view.problems.is_empty(), "{:?}", view.problems);
    // Nothing else follows the three Replaces.
    assert_eq!(view.log.len(), 3, "{:#?}", view.log);
}

#[tokio::test]
async fn objects_added_modified_and_deleted_while_watching_end_up_right() {
    let server = FakeApiServer::start().await;
    server.apply(service("web", "10.96.0.10"));
    server.apply(node("node-a", "zone-1"));
    let (mut harness, events) = Harness::start_counting(server).await;
    harness.wait_synced().await;
    harness.wait_watches(3).await;

    harness.server.apply(service("db", "10.96.0.11"));
    harness.server.apply(slice("db-1", "db", "10.0.0.5"));
    harness.server.apply(node("node-b", "zone-2"));
    harness.server.apply(service("web", "10.96.0.20"));
    harness.server.apply(node("node-a", "zone-3"));
    harness.server.delete("Service", "default", "db");
    harness.server.delete("EndpointSlice", "default", "db-1");

    harness
        .wait_for("the changes to arrive", |view| {
            view.names(SERVICE_ORIGIN) == ["web"]
                && view.cluster_ips("web") == Some(vec![ip("10.96.0.20")])
                && view.names(ENDPOINT_SLICE_ORIGIN).is_empty()
                && view.names(NODE_ORIGIN) == ["node-a", "node-b"]
                && matches!(
                    view.get(NODE_ORIGIN, &object_ref(ObjectKind::Node, "", "node-a")),
                    Some(Object::Node(n)) if n.zone.as_deref() == Some("zone-3")
                )
        })
        .await;
    let view = &harness.view;
    // Watched changes arrive one by one, never as a relist.
    assert_eq!(view.replaces(SERVICE_ORIGIN), 1);
    let count = |kind, event| counted(&events, kind, event);
    assert_eq!(count("Service", "relist"), 1);
    assert_eq!(count("Service", "apply"), 2);
    assert_eq!(count("Service", "delete"), 1);
    assert_eq!(count("EndpointSlice", "delete"), 1);
    assert_eq!(count("Node", "apply"), 2);
    let upserts = view
        .log
        .iter()
        .filter(|u| matches!(u, StoreUpdate::Upsert { .. }))
        .count();
    let mut deletes: Vec<_> = view
        .log
        .iter()
        .filter_map(|u| match u {
            StoreUpdate::Delete { object, .. } => Some(object.name.clone()),
            _ => None,
        })
        .collect();
    // Different kinds are watched independently, so only the set is fixed.
    deletes.sort();
    assert_eq!(upserts, 5, "{:#?}", view.log);
    assert_eq!(deletes, ["db", "db-1"]);
}

#[tokio::test]
async fn bookmarks_advance_the_resume_point_without_producing_updates() {
    let server = FakeApiServer::start_with(Options {
        bookmark_interval: Duration::from_millis(30),
        ..Options::default()
    })
    .await;
    server.apply(service("web", "10.96.0.10"));
    let mut harness = Harness::start(server).await;
    harness.wait_synced().await;
    harness.wait_watches(3).await;
    let synced = harness.view.log.len();

    // Move the resourceVersion on with changes to another kind only.
    harness.server.apply(node("node-a", "zone-1"));
    harness.server.apply(node("node-b", "zone-1"));
    harness
        .wait_for("the nodes", |view| view.names(NODE_ORIGIN).len() == 2)
        .await;
    let latest = harness.server.resource_version();
    let bookmarks = harness.server.bookmarks_sent();
    timeout(WAIT, async {
        while harness.server.bookmarks_sent() < bookmarks + 9 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("bookmarks sent");
    assert_eq!(harness.drain_for(Duration::from_millis(200)).await, 0);
    assert_eq!(
        harness.view.log.len(),
        synced + 2,
        "{:#?}",
        harness.view.log
    );

    // A dropped watch resumes from the bookmark: the Service watch asks for the latest
    // resourceVersion (newer than any Service) and nothing is relisted.
    let watches = harness.watch_requests();
    harness.server.close_watches();
    harness.wait_watch_requests(watches + 3).await;
    harness.wait_watches(3).await;
    assert_eq!(harness.drain_for(Duration::from_millis(200)).await, 0);
    let service_watches = harness.requests_matching("/api/v1/services", true);
    let resumed = service_watches.last().unwrap();
    assert!(
        resumed.contains(&format!("resourceVersion={latest}")),
        "resumed from {resumed}, latest is {latest}"
    );
    assert_eq!(
        harness.requests_matching("/api/v1/services", false).len(),
        1
    );
}

#[tokio::test]
async fn expired_history_after_a_lost_watch_forces_a_relist_that_ends_up_right() {
    let server = FakeApiServer::start().await;
    server.apply(service("web", "10.96.0.10"));
    server.apply(service("old", "10.96.0.11"));
    server.apply(slice("web-1", "web", "10.0.0.1"));
    let mut harness = Harness::start(server).await;
    harness.wait_synced().await;
    harness.wait_watches(3).await;

    // While the watches are cut off, objects change and the history is compacted.
    harness.server.hold_watches();
    harness.server.delete("Service", "default", "old");
    harness.server.apply(service("web", "10.96.0.30"));
    harness.server.apply(service("new", "10.96.0.12"));
    harness.server.apply(slice("web-1", "web", "10.0.0.2"));
    harness.server.compact();
    harness.server.release_watches();

    harness
        .wait_for("the relist of every kind", |view| {
            [SERVICE_ORIGIN, ENDPOINT_SLICE_ORIGIN, NODE_ORIGIN]
                .iter()
                .all(|origin| view.replaces(origin) == 2)
        })
        .await;
    // Every kind's resumed watch was refused as too old, then relisted.
    assert_eq!(harness.server.expired_watches(), 3);
    let view = &harness.view;
    assert_eq!(view.names(SERVICE_ORIGIN), ["new", "web"]);
    assert_eq!(view.cluster_ips("web"), Some(vec![ip("10.96.0.30")]));
    match view.get(
        ENDPOINT_SLICE_ORIGIN,
        &object_ref(ObjectKind::EndpointSlice, "default", "web-1"),
    ) {
        Some(Object::EndpointSlice(slice)) => {
            assert_eq!(slice.endpoints[0].address, ip("10.0.0.2"));
        }
        other => panic!("expected the web-1 slice, got {other:?}"),
    }
    // "old" went away through the Replace, not a Delete; nothing was upserted.
    assert!(
        view.log
            .iter()
            .all(|u| !matches!(u, StoreUpdate::Delete { .. } | StoreUpdate::Upsert { .. })),
        "{:#?}",
        view.log
    );
    let lists = harness.requests_matching("/api/v1/services", false);
    assert_eq!(lists.len(), 2, "{lists:?}");
    assert!(view.names(NODE_ORIGIN).is_empty());
}

#[tokio::test]
async fn invalid_service_reports_a_problem_keeps_the_last_good_version_and_a_fix_clears_it() {
    let server = FakeApiServer::start().await;
    server.apply(service("web", "10.96.0.10"));
    server.apply(service("broken", "not-an-ip"));
    let mut harness = Harness::start(server).await;
    harness.wait_synced().await;
    harness.wait_watches(3).await;

    let broken = service_ref("broken");
    let web = service_ref("web");
    harness
        .wait_for("a problem for broken", |view| {
            view.problems
                .contains_key(&(SERVICE_ORIGIN.to_string(), broken.clone()))
        })
        .await;
    assert_eq!(harness.view.names(SERVICE_ORIGIN), ["web"]);
    assert!(
        !harness
            .view
            .log
            .iter()
            .any(|u| matches!(u, StoreUpdate::Upsert { .. })),
        "{:#?}",
        harness.view.log
    );
    let message = harness
        .view
        .problems
        .get(&(SERVICE_ORIGIN.to_string(), broken.clone()))
        .expect("a problem for the broken Service");
    assert!(message.contains("clusterIP"), "{message}");

    // Breaking a good Service reports a problem and keeps its last good version.
    harness.server.apply(service("web", "not-an-ip"));
    harness
        .wait_for("a problem for web", |view| {
            view.problems
                .contains_key(&(SERVICE_ORIGIN.to_string(), web.clone()))
        })
        .await;
    assert_eq!(
        harness.view.cluster_ips("web"),
        Some(vec![ip("10.96.0.10")])
    );

    // Fixing both clears each problem, then upserts.
    let before_fixes = harness.view.log.len();
    harness.server.apply(service("broken", "10.96.0.40"));
    harness.server.apply(service("web", "10.96.0.41"));
    harness
        .wait_for("the fixes", |view| {
            view.problems.is_empty()
                && view.cluster_ips("broken") == Some(vec![ip("10.96.0.40")])
                && view.cluster_ips("web") == Some(vec![ip("10.96.0.41")])
        })
        .await;
    let fixes = &harness.view.log[before_fixes..];
    assert!(
        matches!(
            fixes,
            [
                StoreUpdate::ClearProblem { object: Some(a), .. },
                StoreUpdate::Upsert { object: Object::Service(sa), .. },
                StoreUpdate::ClearProblem { object: Some(b), .. },
                StoreUpdate::Upsert { object: Object::Service(sb), .. },
            ] if *a == broken && sa.key.name == "broken" && *b == web && sb.key.name == "web"
        ),
        "{fixes:#?}"
    );
}

#[tokio::test]
async fn endpoint_slices_of_headless_services_are_not_watched() {
    let server = FakeApiServer::start().await;
    let mut headless = slice("dns-1", "dns", "10.0.0.9");
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    server.apply(headless);
    server.apply(slice("web-1", "web", "10.0.0.1"));
    let mut harness = Harness::start(server).await;
    harness.wait_synced().await;
    assert_eq!(harness.view.names(ENDPOINT_SLICE_ORIGIN), ["web-1"]);

    // A slice that gains the label leaves the watch as a deletion.
    let mut relabelled = slice("web-1", "web", "10.0.0.1");
    relabelled["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    harness.server.apply(relabelled);
    harness
        .wait_for("web-1 to go", |view| {
            view.names(ENDPOINT_SLICE_ORIGIN).is_empty()
        })
        .await;
}

#[tokio::test]
async fn endpoint_slices_of_headless_services_are_reported_when_not_skipped() {
    let server = FakeApiServer::start().await;
    let mut headless = slice("dns-1", "dns", "10.0.0.9");
    headless["metadata"]["labels"]["service.kubernetes.io/headless"] = json!("");
    server.apply(headless);
    let mut harness = Harness::start_with(server, |source| source.skip_headless(false)).await;
    harness.wait_synced().await;
    assert_eq!(harness.view.names(ENDPOINT_SLICE_ORIGIN), ["dns-1"]);
    let slice_lists = harness.requests_matching("/apis/discovery.k8s.io/v1/endpointslices", false);
    assert!(!slice_lists[0].contains("labelSelector"), "{slice_lists:?}");
}

#[tokio::test]
async fn source_stops_when_the_store_is_closed() {
    let server = FakeApiServer::start().await;
    let mut harness = Harness::start(server).await;
    harness.wait_synced().await;
    drop(harness.updates);
    let result = timeout(WAIT, harness.source)
        .await
        .expect("the source stops in time")
        .expect("the source task does not panic");
    assert!(result.is_ok(), "{result:?}");
}
