//! A Kubernetes API server in the test process: list and watch of Services,
//! EndpointSlices and Nodes over real HTTP, faithful where kube-rs looks.
//!
//! Entry point: [`FakeApiServer::start`]. The test mutates objects with
//! [`FakeApiServer::apply`] and [`FakeApiServer::delete`], and provokes recovery with
//! [`FakeApiServer::compact`] and [`FakeApiServer::close_watches`].
//!
//! What it implements, as the real API server does:
//! - one global, monotonically increasing `resourceVersion`, stamped on every object;
//! - list (`kind: ServiceList`, …) with `resourceVersion` / `resourceVersionMatch`
//!   (`NotOlderThan`, `Exact`, served from history), `limit` / `continue` pagination over a
//!   consistent snapshot, `labelSelector` (`k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (…)`,
//!   `k notin (…)`), cluster-wide and per-namespace paths;
//! - watch (`?watch=true`) streaming newline-delimited `ADDED` / `MODIFIED` / `DELETED`
//!   events after the given `resourceVersion` (objects moving in or out of a label
//!   selector arrive as `ADDED` / `DELETED`), `BOOKMARK`s every bookmark interval when
//!   `allowWatchBookmarks=true`, the server-side `timeoutSeconds`, `resourceVersion=0`
//!   and `sendInitialEvents=true` (synthetic `ADDED` events for the current objects);
//! - a watch from a `resourceVersion` older than the compacted history gets HTTP 200 and
//!   a single `ERROR` event holding a `410 Expired` Status, as the watch cache answers;
//!   a list or `continue` from before compaction gets HTTP `410 Gone`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    time::{Instant, Interval, MissedTickBehavior},
};

type Body = BoxBody<Bytes, Infallible>;

/// The resources the server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn from_name(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

/// Options fixed when the server starts.
#[derive(Clone, Debug)]
pub struct Options {
    /// How often an open watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// The most items one list response holds, whatever `limit` asks (`None`: `limit`).
    pub max_page_size: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_millis(100),
            max_page_size: None,
        }
    }
}

type Key = (Kind, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of the history a watch replays.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    key: Key,
    change: ChangeType,
    /// The object after the change (for a deletion: the deleted object, stamped with the
    /// deletion's resourceVersion).
    object: Value,
    /// The object before the change.
    old: Option<Value>,
}

struct Snapshot {
    rv: u64,
    kind: Kind,
    remaining: VecDeque<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change with `rv > compacted`, oldest first.
    history: VecDeque<Change>,
    compacted: u64,
    watch_generation: u64,
    /// While set, watch requests wait before being answered.
    watches_held: bool,
    open_watches: usize,
    bookmarks_sent: usize,
    /// Watches answered with `410 Expired`.
    expired_watches: usize,
    requests: Vec<String>,
    snapshots: HashMap<u64, Snapshot>,
    next_id: u64,
    /// Created Events by (namespace, name), in creation order of their names.
    events: BTreeMap<(String, String), Value>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every mutation, compaction and forced close; watches wait on it.
    changed: watch::Sender<u64>,
    options: Options,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake API server state poisoned")
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// A running fake API server; stops (and closes its watches) when dropped.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl FakeApiServer {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            options,
        });
        let (shutdown, stop) = oneshot::channel();
        tokio::spawn(serve(listener, shared.clone(), stop));
        Self {
            shared,
            addr,
            shutdown: Some(shutdown),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client talking to this server over HTTP.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("server URL"));
        kube::Client::try_from(config).expect("kube client for the fake API server")
    }

    /// Creates or replaces an object (its `kind` says which resource); returns the new
    /// resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        let kind = object["kind"]
            .as_str()
            .and_then(Kind::from_name)
            .unwrap_or_else(|| panic!("unsupported kind in {object}"));
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let namespace = if kind.namespaced() {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        object["apiVersion"] = json!(kind.api_version());
        let key = (kind, namespace.clone(), name);
        let rv = {
            let mut state = self.shared.lock();
            state.rv += 1;
            let rv = state.rv;
            let old = state.objects.get(&key).cloned();
            let metadata = &mut object["metadata"];
            if kind.namespaced() {
                metadata["namespace"] = json!(namespace);
            }
            metadata["resourceVersion"] = json!(rv.to_string());
            match &old {
                Some(old) => {
                    metadata["uid"] = old["metadata"]["uid"].clone();
                    metadata["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                }
                None => {
                    metadata["uid"] = json!(format!("00000000-0000-0000-0000-{rv:012}"));
                    metadata["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                }
            }
            let change = if old.is_some() {
                ChangeType::Modified
            } else {
                ChangeType::Added
            };
            state.objects.insert(key.clone(), object.clone());
            state.history.push_back(Change {
                rv,
                key,
                change,
                object,
                old,
            });
            rv
        };
        self.shared.notify();
        rv
    }

    /// Deletes an object; returns the deletion's resourceVersion, `None` if it did not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<u64> {
        let kind = Kind::from_name(kind).unwrap_or_else(|| panic!("unsupported kind {kind}"));
        let namespace = if kind.namespaced() { namespace } else { "" };
        let key = (kind, namespace.to_string(), name.to_string());
        let rv = {
            let mut state = self.shared.lock();
            let old = state.objects.remove(&key)?;
            state.rv += 1;
            let rv = state.rv;
            let mut object = old.clone();
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            state.history.push_back(Change {
                rv,
                key,
                change: ChangeType::Deleted,
                object,
                old: Some(old),
            });
            rv
        };
        self.shared.notify();
        Some(rv)
    }

    /// Forgets all history: lists, continues and watches from any resourceVersion older
    /// than the current one now get `410`; the current one stays readable, as after an
    /// etcd compaction.
    pub fn compact(&self) {
        {
            let mut state = self.shared.lock();
            state.compacted = state.rv;
            state.history.clear();
        }
        self.shared.notify();
    }

    /// Ends every open watch response cleanly, as an API server restart or a load balancer
    /// idle timeout would.
    pub fn close_watches(&self) {
        self.shared.lock().watch_generation += 1;
        self.shared.notify();
    }

    /// Cuts the watchers off, as a network partition would: open watches end and new
    /// watch requests hang (lists still work) until [`Self::release_watches`].
    pub fn hold_watches(&self) {
        {
            let mut state = self.shared.lock();
            state.watches_held = true;
            state.watch_generation += 1;
        }
        self.shared.notify();
    }

    /// Lets held watch requests through; each is then answered from the resourceVersion
    /// it asked for.
    pub fn release_watches(&self) {
        self.shared.lock().watches_held = false;
        self.shared.notify();
    }

    /// The current (latest) resourceVersion.
    /// Every Event created, in name order.
    #[allow(
        dead_code,
        reason = "used by integration/tests/replicas.rs, which includes this file"
    )]
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.values().cloned().collect()
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    pub fn open_watches(&self) -> usize {
        self.shared.lock().open_watches
    }

    /// How many watches were refused with `410 Expired` (too old resourceVersion).
    pub fn expired_watches(&self) -> usize {
        self.shared.lock().expired_watches
    }

    pub fn bookmarks_sent(&self) -> usize {
        self.shared.lock().bookmarks_sent
    }

    /// Every request received, as `METHOD path?query`, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.close_watches();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            // Errors here are the client going away; nothing to report.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A request's decoded query parameters.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        let mut params = HashMap::new();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            params.insert(percent_decode(key), percent_decode(value));
        }
        Self(params)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which collection a path names: its kind and, for a namespaced path, the namespace.
fn route(path: &str) -> Option<(Kind, Option<String>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, namespace) = match segments.as_slice() {
        ["api", "v1", "services"] => (Kind::Service, None),
        ["api", "v1", "namespaces", ns, "services"] => (Kind::Service, Some(ns)),
        ["api", "v1", "nodes"] => (Kind::Node, None),
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => (Kind::EndpointSlice, None),
        [
            "apis",
            "discovery.k8s.io",
            "v1",
            "namespaces",
            ns,
            "endpointslices",
        ] => (Kind::EndpointSlice, Some(ns)),
        _ => return None,
    };
    Some((kind, namespace.map(|ns| ns.to_string())))
}

async fn handle(shared: &Arc<Shared>, request: Request<Incoming>) -> Response<Body> {
    let uri = request.uri().clone();
    shared
        .lock()
        .requests
        .push(format!("{} {}", request.method(), uri));
    if request.method() == Method::POST
        && let Some(namespace) = uri
            .path()
            .strip_prefix("/api/v1/namespaces/")
            .and_then(|rest| rest.strip_suffix("/events"))
            .filter(|ns| !ns.contains('/'))
    {
        let namespace = namespace.to_owned();
        return create_event(shared, &namespace, request).await;
    }
    if request.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the fake API server only lists and watches",
        );
    }
    let Some((kind, namespace)) = route(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "the server could not find the requested resource ({})",
                uri.path()
            ),
        );
    };
    let query = Query::parse(uri.query());
    if query.get("fieldSelector").is_some() {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "field selectors are not supported by the fake API server",
        );
    }
    let selector = match Selector::parse(query.get("labelSelector").unwrap_or_default()) {
        Ok(selector) => selector,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let filter = Filter {
        kind,
        namespace,
        selector,
    };
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let mut changed = shared.changed.subscribe();
        while shared.lock().watches_held {
            if changed.changed().await.is_err() {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "shutting down",
                );
            }
        }
        watch(shared, filter, &query)
    } else {
        list(shared, filter, &query)
    }
}

/// Creates an Event as the API server does: `409` when the name is taken.
async fn create_event(
    shared: &Arc<Shared>,
    namespace: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let Ok(body) = request.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let Ok(mut event) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let Some(name) = event["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value",
        );
    };
    let mut state = shared.lock();
    let key = (namespace.to_owned(), name.clone());
    if state.events.contains_key(&key) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("events \"{name}\" already exists"),
        );
    }
    state.rv += 1;
    event["metadata"]["namespace"] = json!(namespace);
    event["metadata"]["resourceVersion"] = json!(state.rv.to_string());
    state.events.insert(key, event.clone());
    json_response(StatusCode::CREATED, &event)
}

/// Which objects a request is about.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    selector: Selector,
}

impl Filter {
    fn matches(&self, key: &Key, object: &Value) -> bool {
        key.0 == self.kind
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.1)
            && self.selector.matches(&object["metadata"]["labels"])
    }
}

fn list(shared: &Shared, filter: Filter, query: &Query) -> Response<Body> {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let page_size = match (limit, shared.options.max_page_size) {
        (Some(limit), Some(max)) => Some(limit.min(max)),
        (limit, max) => limit.or(max),
    };
    let mut state = shared.lock();
    let (rv, mut items) = if let Some(token) = query.get("continue") {
        let snapshot = token
            .parse::<u64>()
            .ok()
            .and_then(|id| state.snapshots.remove(&id).map(|s| (id, s)));
        match snapshot {
            Some((_, snapshot))
                if snapshot.kind == filter.kind && snapshot.rv >= state.compacted =>
            {
                (snapshot.rv, snapshot.remaining)
            }
            Some(_) => {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                );
            }
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid continue token {token}"),
                );
            }
        }
    } else {
        let requested = match query.get("resourceVersion").map(str::parse::<u64>) {
            None => None,
            Some(Ok(rv)) => Some(rv),
            Some(Err(_)) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid resourceVersion",
                );
            }
        };
        let objects = match (query.get("resourceVersionMatch"), requested) {
            (Some(_), None) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                );
            }
            (Some("Exact"), Some(rv)) => match state_at(&state, rv) {
                Ok(objects) => (rv, objects),
                Err(response) => return response,
            },
            (Some("NotOlderThan") | None, rv) => {
                if rv.is_some_and(|rv| rv > state.rv) {
                    return status(
                        StatusCode::GATEWAY_TIMEOUT,
                        "Timeout",
                        "Too large resource version",
                    );
                }
                (state.rv, state.objects.clone())
            }
            (Some(other), _) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("unsupported resourceVersionMatch {other}"),
                );
            }
        };
        let (rv, objects) = objects;
        let items = objects
            .iter()
            .filter(|(key, object)| filter.matches(key, object))
            .map(|(_, object)| list_item(object))
            .collect();
        (rv, items)
    };
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if let Some(page_size) = page_size
        && items.len() > page_size
    {
        let remaining = items.split_off(page_size);
        state.next_id += 1;
        let id = state.next_id;
        metadata["continue"] = json!(id.to_string());
        metadata["remainingItemCount"] = json!(remaining.len());
        state.snapshots.insert(
            id,
            Snapshot {
                rv,
                kind: filter.kind,
                remaining,
            },
        );
    }
    let body = json!({
        "kind": format!("{}List", filter.kind.name()),
        "apiVersion": filter.kind.api_version(),
        "metadata": metadata,
        "items": Vec::from(items),
    });
    json_response(StatusCode::OK, &body)
}

/// Items of a list carry no `kind` / `apiVersion`, as the API server sends them.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

/// Every object as it was at `rv`, undoing later history.
#[allow(clippy::result_large_err)]
fn state_at(state: &State, rv: u64) -> Result<BTreeMap<Key, Value>, Response<Body>> {
    if rv < state.compacted {
        return Err(status(
            StatusCode::GONE,
            "Expired",
            &format!("too old resource version: {rv} ({})", state.compacted),
        ));
    }
    if rv > state.rv {
        return Err(status(
            StatusCode::GATEWAY_TIMEOUT,
            "Timeout",
            "Too large resource version",
        ));
    }
    let mut objects = state.objects.clone();
    for change in state.history.iter().rev().take_while(|c| c.rv > rv) {
        match &change.old {
            Some(old) => objects.insert(change.key.clone(), old.clone()),
            None => objects.remove(&change.key),
        };
    }
    Ok(objects)
}

/// One open watch: what it filters, how far it has read, when it ends.
struct WatchStream {
    shared: Arc<Shared>,
    filter: Filter,
    /// Every change up to here has been considered.
    position: u64,
    generation: u64,
    bookmarks: Option<Interval>,
    deadline: Instant,
    changed: watch::Receiver<u64>,
    pending: VecDeque<Value>,
    done: bool,
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.shared.lock().open_watches -= 1;
    }
}

fn watch(shared: &Arc<Shared>, filter: Filter, query: &Query) -> Response<Body> {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = query.get("allowWatchBookmarks") == Some("true");
    let initial_events = query.get("sendInitialEvents") == Some("true");
    let requested = query.get("resourceVersion").unwrap_or("0");
    let mut changed = shared.changed.subscribe();
    changed.borrow_and_update();
    let mut state = shared.lock();
    let mut pending = VecDeque::new();
    let mut done = false;
    let position = if requested == "0" || initial_events {
        // Start from "any": synthetic ADDED events for what exists now.
        for (key, object) in &state.objects {
            if filter.matches(key, object) {
                pending.push_back(event("ADDED", object.clone()));
            }
        }
        if initial_events {
            let mut bookmark = bookmark(filter.kind, state.rv);
            bookmark["object"]["metadata"]["annotations"] =
                json!({ "k8s.io/initial-events-end": "true" });
            pending.push_back(bookmark);
        }
        state.rv
    } else {
        let Ok(rv) = requested.parse::<u64>() else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid resourceVersion",
            );
        };
        rv
    };
    if position < state.compacted {
        // What the watch cache does with a too old resourceVersion: 200, one ERROR event.
        state.expired_watches += 1;
        pending.push_back(event(
            "ERROR",
            status_object(
                410,
                "Expired",
                &format!("too old resource version: {position} ({})", state.compacted),
            ),
        ));
        done = true;
    }
    state.open_watches += 1;
    let interval = shared.options.bookmark_interval;
    let stream = WatchStream {
        shared: shared.clone(),
        filter,
        position,
        generation: state.watch_generation,
        bookmarks: bookmarks.then(|| {
            let mut interval = tokio::time::interval_at(Instant::now() + interval, interval);
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        }),
        deadline: Instant::now() + Duration::from_secs(timeout),
        changed,
        pending,
        done,
    };
    drop(state);
    let frames = futures::stream::unfold(stream, |mut stream| async move {
        let line = stream.next_line().await?;
        let mut bytes = serde_json::to_vec(&line).expect("watch event serializes");
        bytes.push(b'\n');
        Some((Ok(Frame::data(Bytes::from(bytes))), stream))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(frames).boxed())
        .expect("watch response")
}

impl WatchStream {
    /// The next event to send, waiting for one; `None` ends the response.
    async fn next_line(&mut self) -> Option<Value> {
        let mut bookmark_due = false;
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Some(line);
            }
            if self.done {
                return None;
            }
            self.changed.borrow_and_update();
            {
                let mut state = self.shared.lock();
                if state.watch_generation != self.generation {
                    return None;
                }
                if self.position < state.compacted {
                    state.expired_watches += 1;
                    self.pending.push_back(event(
                        "ERROR",
                        status_object(
                            410,
                            "Expired",
                            &format!(
                                "too old resource version: {} ({})",
                                self.position, state.compacted
                            ),
                        ),
                    ));
                    self.done = true;
                    continue;
                }
                for change in state.history.iter().filter(|c| c.rv > self.position) {
                    if let Some(line) = self.translate(change) {
                        self.pending.push_back(line);
                    }
                }
                self.position = self.position.max(state.rv);
                if bookmark_due && self.pending.is_empty() {
                    state.bookmarks_sent += 1;
                    self.pending
                        .push_back(bookmark(self.filter.kind, self.position));
                    bookmark_due = false;
                }
            }
            if !self.pending.is_empty() {
                continue;
            }
            let tick = async {
                match &mut self.bookmarks {
                    Some(interval) => {
                        interval.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.changed.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = tick => bookmark_due = true,
                () = tokio::time::sleep_until(self.deadline) => return None,
            }
        }
    }

    /// What this watch sees of one change: objects entering or leaving its selector
    /// arrive as ADDED or DELETED.
    fn translate(&self, change: &Change) -> Option<Value> {
        let now = self.filter.matches(&change.key, &change.object);
        let before = change
            .old
            .as_ref()
            .is_some_and(|old| self.filter.matches(&change.key, old));
        let kind = match change.change {
            ChangeType::Deleted => before.then_some("DELETED")?,
            ChangeType::Added => now.then_some("ADDED")?,
            ChangeType::Modified => match (before, now) {
                (true, true) => "MODIFIED",
                (false, true) => "ADDED",
                (true, false) => "DELETED",
                (false, false) => return None,
            },
        };
        Some(event(kind, change.object.clone()))
    }
}

fn event(kind: &str, object: Value) -> Value {
    json!({ "type": kind, "object": object })
}

fn bookmark(kind: Kind, rv: u64) -> Value {
    event(
        "BOOKMARK",
        json!({
            "kind": kind.name(),
            "apiVersion": kind.api_version(),
            "metadata": { "resourceVersion": rv.to_string() },
        }),
    )
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status_object(code.as_u16(), reason, message))
}

fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON body serializes");
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .expect("JSON response")
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Debug, Default)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug)]
enum Requirement {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let requirement = if let Some(key) = term.strip_prefix('!') {
                Requirement::NotExists(key.trim().into())
            } else if let Some((key, value)) = term.split_once("!=") {
                Requirement::NotEquals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = term.split_once("==").or(term.split_once('=')) {
                Requirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some((key, values)) = term.split_once(" notin ") {
                Requirement::NotIn(key.trim().into(), set(values)?)
            } else if let Some((key, values)) = term.split_once(" in ") {
                Requirement::In(key.trim().into(), set(values)?)
            } else if term.contains([' ', '(', ')']) {
                return Err(format!("unable to parse requirement: {term:?}"));
            } else {
                Requirement::Exists(term.into())
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, labels: &Value) -> bool {
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        self.0.iter().all(|requirement| match requirement {
            Requirement::Exists(key) => label(key).is_some(),
            Requirement::NotExists(key) => label(key).is_none(),
            Requirement::Equals(key, value) => label(key) == Some(value),
            Requirement::NotEquals(key, value) => label(key) != Some(value),
            Requirement::In(key, values) => {
                label(key).is_some_and(|l| values.iter().any(|v| v == l))
            }
            Requirement::NotIn(key, values) => {
                !label(key).is_some_and(|l| values.iter().any(|v| v == l))
            }
        })
    }
}

/// Splits on commas outside parentheses.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn set(values: &str) -> Result<Vec<String>, String> {
    let inner = values
        .trim()
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesized set, got {values:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
}
