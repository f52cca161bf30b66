//! Keeps the desired state of every node as a series of immutable [`Generation`]s and
//! publishes each one to the delta streams.
//!
//! A generation does not hold one state per node: for each Service it caches one
//! encoded resource per [`VariantKey`], computed the first time a node needs it, so
//! a thousand nodes that see a Service alike share one computation and one buffer.
//! Streams learn what changed from the generation's recent change records and diff
//! only those Services.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, OnceLock},
    time::SystemTime,
};

use bytes::Bytes;
use opentelemetry::{
    Context, KeyValue,
    global::{BoxedSpan, BoxedTracer},
    trace::{Span as _, SpanContext, SpanKind, TraceContextExt as _, Tracer as _},
};
// Seeded and several times faster than SipHash on short keys such as resource names:
// these maps are hit once per node and Service during a sync.
use foldhash::{HashMap, HashSet, HashSetExt};
use prost::Message;
use switchyard_proto::{format_version, v1, version_hash};
use tokio::sync::{mpsc, watch};

use crate::{
    compute::{self, ComputeOptions, NodeContext, VariantIndex, VariantKey},
    model::{ClusterSnapshot, EndpointSlice, Service},
    name_ids::NameTable,
    sources::StoreUpdate,
    store::{ProblemsView, Store, Touched},
};

/// How many change records a generation remembers; a stream further behind diffs
/// every Service instead.
const RECENT_CHANGES: usize = 256;

/// Dead names a [`NameTable`] may hold beyond its live ones before the hub starts a
/// new one: a new epoch costs every stream one pass over what its node holds, so it
/// waits until dead ids outnumber the live ones and this many more.
const DEAD_NAMES_BEFORE_NEW_TABLE: usize = 4096;

/// Every Service of a generation by resource name. Persistent (the next generation
/// copies it at O(1)); foldhash because every stream looks names up in it.
type ServiceMap = imbl::GenericHashMap<
    Arc<str>,
    Listed,
    foldhash::fast::RandomState,
    imbl::shared_ptr::DefaultSharedPtr,
>;

/// A Service of a generation and its id in the generation's [`NameTable`].
#[derive(Clone, Debug)]
pub struct Listed {
    pub name: Arc<str>,
    pub id: u32,
    entry: Arc<ServiceEntry>,
}

/// One Service's resource for a class of nodes, encoded once.
#[derive(Debug)]
pub struct EncodedResource {
    pub name: Arc<str>,
    pub version: u64,
    /// An encoded `v1::Resource`.
    pub bytes: Bytes,
}

impl EncodedResource {
    fn new(name: Arc<str>, state: &switchyard_proto::state::ServiceState) -> Self {
        let service = v1::ServiceState::from(state);
        let version = version_hash(&service);
        let resource = v1::Resource {
            name: name.to_string(),
            version: format_version(version),
            service: Some(service),
        };
        Self {
            name,
            version,
            bytes: resource.encode_to_vec().into(),
        }
    }

    /// The wire message, for the query API.
    pub fn decode(&self) -> v1::Resource {
        v1::Resource::decode(self.bytes.clone()).expect("bytes were encoded from a v1::Resource")
    }
}

/// A Service with its slices and the resources computed for it so far.
#[derive(Debug)]
pub struct ServiceEntry {
    pub name: Arc<str>,
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    /// Which nodes see this Service alike; built on first use.
    index: OnceLock<VariantIndex>,
    /// The resource of [`VariantKey::Shared`] nodes, most nodes of a large cluster:
    /// looked up without a lock. `None` inside: not handled on such nodes.
    shared: OnceLock<Option<Arc<EncodedResource>>>,
    /// Resources of the other variants.
    variants: Mutex<HashMap<CacheKey, Option<Arc<EncodedResource>>>>,
}

/// A [`VariantKey`], plus the node's zone for per-node variants: a node's own result
/// still depends on its zone (zone hints apply when no node hint names it), and the
/// zone can change while the Service does not.
type CacheKey = (VariantKey, Option<String>);

impl ServiceEntry {
    fn new(name: Arc<str>, service: Arc<Service>, slices: Vec<Arc<EndpointSlice>>) -> Self {
        Self {
            name,
            service,
            slices,
            index: OnceLock::new(),
            shared: OnceLock::new(),
            variants: Mutex::default(),
        }
    }

    fn resource(
        &self,
        node: NodeContext<'_>,
        options: &ComputeOptions,
    ) -> Option<Arc<EncodedResource>> {
        let slices = || self.slices.iter().map(|s| &**s);
        let compute = || {
            compute::compute_service(&self.service, slices(), node, options)
                .map(|state| Arc::new(EncodedResource::new(self.name.clone(), &state)))
        };
        let index = self
            .index
            .get_or_init(|| VariantIndex::new(&self.service, slices()));
        let variant = index.key(node);
        if variant == VariantKey::Shared {
            return self.shared.get_or_init(compute).clone();
        }
        let zone = matches!(variant, VariantKey::Node(_)).then(|| node.zone.map(str::to_owned));
        let mut variants = self.variants.lock().unwrap_or_else(|e| e.into_inner());
        variants
            .entry((variant, zone.flatten()))
            .or_insert_with(compute)
            .clone()
    }
}

/// What one batch of source updates changed.
#[derive(Debug)]
pub struct ChangeRecord {
    pub seq: u64,
    /// Resource names (`namespace/name`) of the Services touched.
    pub services: HashSet<Arc<str>>,
    pub nodes: HashSet<String>,
    pub trigger_time: Option<SystemTime>,
    /// The change's trace span (`switchyard.change`), when traces are exported.
    pub trace: Option<SpanContext>,
}

/// What changed between a stream's last generation and the current one.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// Only these Services (by resource name) can differ for the node.
    Services {
        services: HashSet<Arc<str>>,
        trigger_time: Option<SystemTime>,
        trace: Option<SpanContext>,
    },
    /// Anything may differ: the node itself changed, or the stream is too far behind.
    All {
        trigger_time: Option<SystemTime>,
        trace: Option<SpanContext>,
    },
}

/// The desired state of every node at one point in time.
#[derive(Debug)]
pub struct Generation {
    pub seq: u64,
    pub snapshot: Arc<ClusterSnapshot>,
    /// Every Service of the snapshot by resource name, with its id in `names`.
    services: ServiceMap,
    /// Ids of every name of `services` (and of names since removed, until a new table).
    names: Arc<NameTable>,
    /// `services` sorted by name; built on first use and shared by every stream that
    /// diffs the whole generation.
    sorted: OnceLock<Arc<[Listed]>>,
    recent: VecDeque<Arc<ChangeRecord>>,
    options: Arc<ComputeOptions>,
}

impl Generation {
    pub fn empty(options: ComputeOptions) -> Self {
        Self {
            seq: 0,
            snapshot: Arc::default(),
            services: ServiceMap::default(),
            names: Arc::default(),
            sorted: OnceLock::new(),
            recent: VecDeque::new(),
            options: Arc::new(options),
        }
    }

    /// What the computation needs to know about `node`; resolve it once per diff.
    pub fn node_context<'a>(&'a self, node: &'a str) -> NodeContext<'a> {
        let zone = self
            .snapshot
            .nodes
            .get(node)
            .and_then(|n| n.zone.as_deref());
        NodeContext { name: node, zone }
    }

    /// The resource `node` must hold for the Service named `name` (`namespace/name`);
    /// `None` when it must hold none.
    pub fn resource(&self, name: &str, node: &str) -> Option<Arc<EncodedResource>> {
        self.resource_for(name, self.node_context(node))
    }

    /// [`Generation::resource`] with the node's context already resolved.
    pub fn resource_for(&self, name: &str, node: NodeContext<'_>) -> Option<Arc<EncodedResource>> {
        self.resource_of(self.services.get(name)?, node)
    }

    /// The resource `node` must hold for a Service of this generation.
    pub fn resource_of(
        &self,
        listed: &Listed,
        node: NodeContext<'_>,
    ) -> Option<Arc<EncodedResource>> {
        listed.entry.resource(node, &self.options)
    }

    /// The Service named `name`, handled or not, with its id.
    pub fn listed(&self, name: &str) -> Option<&Listed> {
        self.services.get(name)
    }

    /// Whether the Service named `name` exists, handled or not.
    pub fn contains(&self, name: &str) -> bool {
        self.services.contains_key(name)
    }

    /// The ids of this generation's names.
    pub fn names(&self) -> &Arc<NameTable> {
        &self.names
    }

    /// Every Service in the cluster, handled or not, sorted by name.
    pub fn sorted(&self) -> Arc<[Listed]> {
        self.sorted
            .get_or_init(|| {
                let mut listed: Vec<_> = self.services.values().cloned().collect();
                listed.sort_unstable_by(|a, b| a.name.cmp(&b.name));
                listed.into()
            })
            .clone()
    }

    /// Every resource `node` must hold.
    pub fn node_resources(&self, node: &str) -> Vec<Arc<EncodedResource>> {
        let context = self.node_context(node);
        let mut resources: Vec<_> = self
            .services
            .values()
            .filter_map(|listed| self.resource_of(listed, context))
            .collect();
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        resources
    }

    /// What may have changed for `node` since generation `seq`.
    pub fn changes_since(&self, seq: u64, node: &str) -> Changes {
        if seq == self.seq {
            return Changes::Services {
                services: HashSet::new(),
                trigger_time: None,
                trace: None,
            };
        }
        // Records have consecutive numbers ending at this generation's: the newer ones
        // are the last `behind`, found without a pass over all of them (every stream
        // asks on every change).
        let behind = self.seq.saturating_sub(seq) as usize;
        let covered = seq < self.seq && behind <= self.recent.len();
        let newer = self
            .recent
            .range(self.recent.len().saturating_sub(behind)..);
        let trigger_time = newer.clone().filter_map(|r| r.trigger_time).min();
        // The earliest traced change: the one the node has waited for longest.
        let trace = newer.clone().find_map(|r| r.trace.clone());
        if !covered || seq == 0 || newer.clone().any(|r| r.nodes.contains(node)) {
            return Changes::All {
                trigger_time,
                trace,
            };
        }
        let services = newer.flat_map(|r| r.services.iter().cloned()).collect();
        Changes::Services {
            services,
            trigger_time,
            trace,
        }
    }

    /// The next generation after `touched` changed the snapshot; `trace` is the
    /// change's span, if traced.
    fn next(
        &self,
        snapshot: &ClusterSnapshot,
        touched: Touched,
        trace: Option<SpanContext>,
    ) -> Self {
        let mut services = self.services.clone();
        let mut touched_names = HashSet::with_capacity(touched.services.len());
        // Sorted, so a first read gives ids in name order (a full pass reads held
        // versions in id order then).
        let mut touched_keys: Vec<_> = touched.services.iter().collect();
        touched_keys.sort_unstable();
        for key in touched_keys {
            let name: Arc<str> = match self.services.get_key_value(key.to_string().as_str()) {
                Some((name, _)) => name.clone(),
                None => key.to_string().into(),
            };
            touched_names.insert(name.clone());
            match snapshot.services.get(key) {
                Some(service) => {
                    let slices = snapshot
                        .slices
                        .get(key)
                        .map(|s| s.values().cloned().collect())
                        .unwrap_or_default();
                    let entry = ServiceEntry::new(name.clone(), service.clone(), slices);
                    let listed = Listed {
                        id: self.names.intern(&name),
                        name: name.clone(),
                        entry: Arc::new(entry),
                    };
                    services.insert(name, listed);
                }
                None => {
                    services.remove(&name);
                }
            }
        }
        let names = if self.names.len() > 2 * services.len() + DEAD_NAMES_BEFORE_NEW_TABLE {
            renumber(&mut services)
        } else {
            self.names.clone()
        };
        let seq = self.seq + 1;
        let mut recent = self.recent.clone();
        if recent.len() == RECENT_CHANGES {
            recent.pop_front();
        }
        recent.push_back(Arc::new(ChangeRecord {
            seq,
            services: touched_names,
            nodes: touched.nodes.into_iter().collect(),
            trigger_time: touched.trigger_time,
            trace,
        }));
        Self {
            seq,
            snapshot: Arc::new(snapshot.clone()),
            services,
            names,
            sorted: OnceLock::new(),
            recent,
            options: self.options.clone(),
        }
    }
}

/// Gives `services` ids of a new, dense [`NameTable`] (in name order) and returns it.
/// The computed resources stay: only the ids change.
fn renumber(services: &mut ServiceMap) -> Arc<NameTable> {
    let mut listed: Vec<Listed> = services.values().cloned().collect();
    listed.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let names = NameTable::with_names(listed.iter().map(|l| &l.name));
    for mut listed in listed {
        listed.id = names.id(&listed.name).expect("just interned");
        services.insert(listed.name.clone(), listed);
    }
    tracing::debug!(names = names.len(), "new name table");
    names
}

/// Read handles on what the hub publishes.
#[derive(Clone, Debug)]
pub struct HubHandle {
    pub generations: watch::Receiver<Arc<Generation>>,
    pub problems: ProblemsView,
    /// True once the generation holding the source's first full read
    /// ([`StoreUpdate::Synced`]) is published.
    pub ready: watch::Receiver<bool>,
}

/// Owns the store and publishes a new generation after every batch of source updates.
pub struct Hub {
    store: Store,
    updates: mpsc::Receiver<StoreUpdate>,
    publish: watch::Sender<Arc<Generation>>,
    ready: watch::Sender<bool>,
}

impl Hub {
    pub fn new(options: ComputeOptions, updates: mpsc::Receiver<StoreUpdate>) -> (Self, HubHandle) {
        let store = Store::new();
        let (publish, generations) = watch::channel(Arc::new(Generation::empty(options)));
        let (ready, ready_rx) = watch::channel(false);
        let handle = HubHandle {
            generations,
            problems: store.problems(),
            ready: ready_rx,
        };
        (
            Self {
                store,
                updates,
                publish,
                ready,
            },
            handle,
        )
    }

    /// Runs until every source has dropped its sender.
    pub async fn run(mut self) {
        let tracer = opentelemetry::global::tracer("switchyard-controller");
        let mut batch = Vec::new();
        while self.updates.recv_many(&mut batch, 4096).await > 0 {
            let received = SystemTime::now();
            let synced = batch.iter().any(|u| matches!(u, StoreUpdate::Synced));
            let touched = self.store.apply(batch.drain(..));
            if touched.is_empty() {
                if synced {
                    self.ready.send_replace(true);
                }
                continue;
            }
            let change = ChangeSpan::start(&tracer, &touched, received);
            let next = self.publish.borrow().next(
                self.store.snapshot(),
                touched,
                change.as_ref().map(ChangeSpan::context),
            );
            tracing::debug!(
                generation = next.seq,
                services = next.services.len(),
                "published"
            );
            if let Some(change) = change {
                change.published(&tracer, received, next.seq);
            }
            self.publish.send_replace(Arc::new(next));
            if synced {
                self.ready.send_replace(true);
            }
        }
    }
}

/// The root span of one traced change, `switchyard.change`: from the change's trigger
/// (the API event or manifest edit; the hub's receipt when unknown) to the generation
/// holding it. Each node's `switchyard.node_update` joins it as a child, and the agent's
/// spans join those.
struct ChangeSpan {
    span: BoxedSpan,
}

impl ChangeSpan {
    /// `None` when no trace exporter is installed (the global tracer is a no-op).
    fn start(tracer: &BoxedTracer, touched: &Touched, received: SystemTime) -> Option<Self> {
        let start = touched
            .trigger_time
            .filter(|t| *t <= received)
            .unwrap_or(received);
        let span = tracer
            .span_builder("switchyard.change")
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes([
                KeyValue::new("switchyard.services", touched.services.len() as i64),
                KeyValue::new("switchyard.nodes", touched.nodes.len() as i64),
                KeyValue::new("switchyard.trigger_known", touched.trigger_time.is_some()),
            ])
            .start(tracer);
        span.span_context().is_valid().then_some(Self { span })
    }

    fn context(&self) -> SpanContext {
        self.span.span_context().clone()
    }

    /// Records `switchyard.snapshot` (receipt → generation built) and ends the change.
    fn published(mut self, tracer: &BoxedTracer, received: SystemTime, seq: u64) {
        let parent = Context::new().with_remote_span_context(self.context());
        let mut snapshot = tracer
            .span_builder("switchyard.snapshot")
            .with_start_time(received)
            .with_attributes([KeyValue::new("switchyard.generation", seq as i64)])
            .start_with_context(tracer, &parent);
        let now = SystemTime::now();
        snapshot.end_with_timestamp(now);
        self.span
            .set_attribute(KeyValue::new("switchyard.generation", seq as i64));
        self.span.end_with_timestamp(now);
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::model::ServiceKey;
    use crate::model::{
        AddressFamily, Endpoint, EndpointPort, Node, Object, Protocol, ServicePort,
    };

    fn web() -> Service {
        let key = ServiceKey::new("default", "web");
        Service::cluster_ip(
            key,
            "10.96.0.1".parse().unwrap(),
            vec![ServicePort::tcp("", 80)],
        )
    }

    fn endpoint(address: &str, node: &str, zone_hints: &[&str], node_hints: &[&str]) -> Endpoint {
        Endpoint {
            address: address.parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: Some(node.into()),
            zone: None,
            zone_hints: zone_hints.iter().map(|z| z.to_string()).collect(),
            node_hints: node_hints.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn web_slice(endpoints: Vec<Endpoint>) -> Object {
        Object::EndpointSlice(EndpointSlice {
            key: ServiceKey::new("default", "web-1"),
            service: ServiceKey::new("default", "web"),
            address_family: AddressFamily::V4,
            ports: vec![EndpointPort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            endpoints,
            trigger_time: None,
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

    fn generation_after(
        store: &mut Store,
        previous: &Generation,
        objects: Vec<Object>,
    ) -> Generation {
        let touched = store.apply([StoreUpdate::Replace {
            origin: "test".into(),
            objects,
            at: UNIX_EPOCH,
        }]);
        previous.next(store.snapshot(), touched, None)
    }

    fn cluster_ips(generation: &Generation, node: &str) -> Vec<String> {
        let resource = generation.resource("default/web", node).unwrap().decode();
        resource.service.unwrap().ports[0]
            .cluster_endpoints
            .iter()
            .map(|e| e.ip.clone())
            .collect()
    }

    #[test]
    fn a_node_whose_zone_changes_gets_its_state_recomputed_for_the_new_zone() {
        // node-a is named by a node hint on no endpoint but hosts one, so its variant is
        // per node; zone hints decide what it sees.
        let endpoints = vec![
            endpoint("10.0.0.1", "node-a", &["zone-1"], &[]),
            endpoint("10.0.0.2", "node-b", &["zone-2"], &[]),
        ];
        let mut store = Store::new();
        let empty = Generation::empty(ComputeOptions::default());
        let objects = |zone| {
            vec![
                Object::Service(web()),
                web_slice(endpoints.clone()),
                node("node-a", zone),
            ]
        };
        let first = generation_after(&mut store, &empty, objects("zone-1"));
        assert_eq!(cluster_ips(&first, "node-a"), ["10.0.0.1"]);
        let second = generation_after(&mut store, &first, objects("zone-2"));
        assert_eq!(cluster_ips(&second, "node-a"), ["10.0.0.2"]);
    }

    #[test]
    fn nodes_that_see_a_service_alike_share_one_encoded_resource() {
        let mut store = Store::new();
        let empty = Generation::empty(ComputeOptions::default());
        let objects = vec![
            Object::Service(web()),
            web_slice(vec![endpoint("10.0.0.1", "node-a", &[], &[])]),
            node("node-a", "z"),
            node("node-b", "z"),
            node("node-c", "z"),
        ];
        let generation = generation_after(&mut store, &empty, objects);
        let b = generation.resource("default/web", "node-b").unwrap();
        let c = generation.resource("default/web", "node-c").unwrap();
        assert!(Arc::ptr_eq(&b, &c), "node-b and node-c share one buffer");
        let a = generation.resource("default/web", "node-a").unwrap();
        assert_ne!(
            a.version, b.version,
            "node-a hosts the endpoint, so it is local there"
        );
    }

    #[test]
    fn once_dead_names_outnumber_the_live_ones_a_new_dense_table_gives_new_ids() {
        let churn = |i: usize| {
            let key = ServiceKey::new("default", format!("churn-{i}"));
            let ports = vec![ServicePort::tcp("", 80)];
            Object::Service(Service::cluster_ip(
                key,
                "10.96.0.2".parse().unwrap(),
                ports,
            ))
        };
        let mut store = Store::new();
        let mut generation = Generation::empty(ComputeOptions::default());
        generation = generation_after(&mut store, &generation, vec![Object::Service(web())]);
        let first_table = generation.names().clone();
        let web_id = generation.listed("default/web").unwrap().id;
        let mut held = crate::name_ids::HeldVersions::from_declared(&first_table, []);
        held.insert("default/web".into(), Some(web_id), 1);
        held.insert("default/churn-0".into(), None, 2);
        // Bounded, so a hub that never renumbers fails the assertion instead of hanging.
        let mut i = 0;
        while Arc::ptr_eq(generation.names(), &first_table) && i < 10 * DEAD_NAMES_BEFORE_NEW_TABLE
        {
            let objects = vec![Object::Service(web()), churn(i)];
            generation = generation_after(&mut store, &generation, objects);
            i += 1;
        }
        assert_eq!(
            i,
            2 * 2 + DEAD_NAMES_BEFORE_NEW_TABLE,
            "a new table once dead names outnumber the live ones and the slack"
        );
        let table = generation.names();
        assert_eq!(table.len(), 2, "only the live names");
        for listed in generation.sorted().iter() {
            assert_eq!(table.id(&listed.name), Some(listed.id));
            assert!(
                generation
                    .resource_of(listed, generation.node_context("n"))
                    .is_some()
            );
        }
        held.adopt(table);
        let web_id = generation.listed("default/web").unwrap().id;
        assert_eq!(held.get_id(web_id), Some(1), "moved to its new id");
        assert_eq!(
            held.get("default/churn-0"),
            Some(2),
            "a removed name the node holds is kept, by name, until its removal"
        );
    }

    #[test]
    fn changes_since_lists_touched_services_and_falls_back_to_all_when_the_node_changed() {
        let mut store = Store::new();
        let g0 = Generation::empty(ComputeOptions::default());
        let g1 = generation_after(
            &mut store,
            &g0,
            vec![Object::Service(web()), node("node-a", "z")],
        );
        let g2 = generation_after(
            &mut store,
            &g1,
            vec![
                Object::Service(web()),
                node("node-a", "z"),
                web_slice(vec![]),
            ],
        );
        let key: Arc<str> = "default/web".into();
        assert_eq!(
            g2.changes_since(1, "node-a"),
            Changes::Services {
                services: HashSet::from_iter([key]),
                trigger_time: Some(UNIX_EPOCH),
                trace: None,
            }
        );
        assert_eq!(
            g2.changes_since(2, "node-a"),
            Changes::Services {
                services: HashSet::new(),
                trigger_time: None,
                trace: None,
            }
        );
        assert!(
            matches!(g2.changes_since(0, "node-a"), Changes::All { .. }),
            "a new stream diffs everything"
        );
        let g3 = generation_after(
            &mut store,
            &g2,
            vec![
                Object::Service(web()),
                node("node-a", "y"),
                web_slice(vec![]),
            ],
        );
        assert!(
            matches!(g3.changes_since(2, "node-a"), Changes::All { .. }),
            "node-a itself changed"
        );
        assert!(matches!(
            g3.changes_since(2, "node-b"),
            Changes::Services { .. }
        ));
    }
}
