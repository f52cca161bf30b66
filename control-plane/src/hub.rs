//! Keeps the desired state of every node as a series of immutable [`Generation`]s and
//! publishes each one to the delta streams.
//!
//! A generation does not hold one state per node: for each Service it caches one
//! encoded resource per [`VariantKey`], computed the first time a node needs it, so
//! a thousand nodes that see a Service alike share one computation and one buffer.
//! Streams learn what changed from the generation's recent change records and diff
//! only those Services.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use bytes::Bytes;
use prost::Message;
use switchyard_proto::{format_version, v1, version_hash};
use tokio::sync::{mpsc, watch};

use crate::{
    compute::{self, ComputeOptions, NodeContext, VariantKey},
    model::{ClusterSnapshot, EndpointSlice, Service, ServiceKey},
    sources::StoreUpdate,
    store::{ProblemsView, Store, Touched},
};

/// How many change records a generation remembers; a stream further behind diffs
/// every Service instead.
const RECENT_CHANGES: usize = 256;

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
        Self { name, version, bytes: resource.encode_to_vec().into() }
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
    /// `None`: this proxy does not handle the Service on nodes of that variant.
    variants: Mutex<HashMap<VariantKey, Option<Arc<EncodedResource>>>>,
}

impl ServiceEntry {
    fn resource(&self, node: NodeContext<'_>, options: &ComputeOptions) -> Option<Arc<EncodedResource>> {
        let slices = || self.slices.iter().map(|s| &**s);
        let key = compute::variant_key(&self.service, slices(), node);
        let mut variants = self.variants.lock().unwrap_or_else(|e| e.into_inner());
        variants
            .entry(key)
            .or_insert_with(|| {
                compute::compute_service(&self.service, slices(), node, options)
                    .map(|state| Arc::new(EncodedResource::new(self.name.clone(), &state)))
            })
            .clone()
    }
}

/// What one batch of source updates changed.
#[derive(Debug)]
pub struct ChangeRecord {
    pub seq: u64,
    pub services: HashSet<ServiceKey>,
    pub nodes: HashSet<String>,
    pub trigger_time: Option<SystemTime>,
}

/// What changed between a stream's last generation and the current one.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// Only these Services can differ for the node.
    Services { services: HashSet<ServiceKey>, trigger_time: Option<SystemTime> },
    /// Anything may differ: the node itself changed, or the stream is too far behind.
    All { trigger_time: Option<SystemTime> },
}

/// The desired state of every node at one point in time.
#[derive(Debug)]
pub struct Generation {
    pub seq: u64,
    pub snapshot: Arc<ClusterSnapshot>,
    services: HashMap<ServiceKey, Arc<ServiceEntry>>,
    recent: VecDeque<Arc<ChangeRecord>>,
    options: Arc<ComputeOptions>,
}

impl Generation {
    pub fn empty(options: ComputeOptions) -> Self {
        Self {
            seq: 0,
            snapshot: Arc::default(),
            services: HashMap::new(),
            recent: VecDeque::new(),
            options: Arc::new(options),
        }
    }

    fn node_context<'a>(&'a self, node: &'a str) -> NodeContext<'a> {
        let zone = self.snapshot.nodes.get(node).and_then(|n| n.zone.as_deref());
        NodeContext { name: node, zone }
    }

    /// The resource `node` must hold for `service`; `None` when it must hold none.
    pub fn resource(&self, service: &ServiceKey, node: &str) -> Option<Arc<EncodedResource>> {
        self.services.get(service)?.resource(self.node_context(node), &self.options)
    }

    /// Every Service in the cluster, handled or not.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &Arc<ServiceEntry>)> {
        self.services.iter()
    }

    /// Every resource `node` must hold.
    pub fn node_resources(&self, node: &str) -> Vec<Arc<EncodedResource>> {
        let context = self.node_context(node);
        let mut resources: Vec<_> = self
            .services
            .values()
            .filter_map(|entry| entry.resource(context, &self.options))
            .collect();
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        resources
    }

    /// What may have changed for `node` since generation `seq`.
    pub fn changes_since(&self, seq: u64, node: &str) -> Changes {
        if seq == self.seq {
            return Changes::Services { services: HashSet::new(), trigger_time: None };
        }
        let covered = self.recent.front().is_some_and(|r| r.seq <= seq + 1);
        let newer = self.recent.iter().filter(|r| r.seq > seq);
        let trigger_time = newer.clone().filter_map(|r| r.trigger_time).min();
        if !covered || seq == 0 || newer.clone().any(|r| r.nodes.contains(node)) {
            return Changes::All { trigger_time };
        }
        let services = newer.flat_map(|r| r.services.iter().cloned()).collect();
        Changes::Services { services, trigger_time }
    }

    /// The next generation after `touched` changed the snapshot.
    fn next(&self, snapshot: &ClusterSnapshot, touched: Touched) -> Self {
        let mut services = self.services.clone();
        for key in &touched.services {
            match snapshot.services.get(key) {
                Some(service) => {
                    let slices = snapshot
                        .slices
                        .get(key)
                        .map(|s| s.values().cloned().collect())
                        .unwrap_or_default();
                    let entry = ServiceEntry {
                        name: key.to_string().into(),
                        service: service.clone(),
                        slices,
                        variants: Mutex::default(),
                    };
                    services.insert(key.clone(), Arc::new(entry));
                }
                None => {
                    services.remove(key);
                }
            }
        }
        let seq = self.seq + 1;
        let mut recent = self.recent.clone();
        if recent.len() == RECENT_CHANGES {
            recent.pop_front();
        }
        recent.push_back(Arc::new(ChangeRecord {
            seq,
            services: touched.services.into_iter().collect(),
            nodes: touched.nodes.into_iter().collect(),
            trigger_time: touched.trigger_time,
        }));
        Self {
            seq,
            snapshot: Arc::new(snapshot.clone()),
            services,
            recent,
            options: self.options.clone(),
        }
    }
}

/// Read handles on what the hub publishes.
#[derive(Clone, Debug)]
pub struct HubHandle {
    pub generations: watch::Receiver<Arc<Generation>>,
    pub problems: ProblemsView,
}

/// Owns the store and publishes a new generation after every batch of source updates.
pub struct Hub {
    store: Store,
    updates: mpsc::Receiver<StoreUpdate>,
    publish: watch::Sender<Arc<Generation>>,
}

impl Hub {
    pub fn new(options: ComputeOptions, updates: mpsc::Receiver<StoreUpdate>) -> (Self, HubHandle) {
        let store = Store::new();
        let (publish, generations) = watch::channel(Arc::new(Generation::empty(options)));
        let handle = HubHandle { generations, problems: store.problems() };
        (Self { store, updates, publish }, handle)
    }

    /// Runs until every source has dropped its sender.
    pub async fn run(mut self) {
        let mut batch = Vec::new();
        while self.updates.recv_many(&mut batch, 4096).await > 0 {
            let touched = self.store.apply(batch.drain(..));
            if touched.is_empty() {
                continue;
            }
            let next = self.publish.borrow().next(self.store.snapshot(), touched);
            tracing::debug!(generation = next.seq, services = next.services.len(), "published");
            self.publish.send_replace(Arc::new(next));
        }
    }
}
