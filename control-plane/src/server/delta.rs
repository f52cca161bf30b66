//! The `NodeStateDiscovery` stream: one task per node that sends the node what differs
//! from what it acknowledged, waits for the ACK or NACK, and repeats.
//!
//! At most one response is in flight per stream, so a slow agent costs memory for one
//! response and never delays another stream; when it catches up it receives the latest
//! state, not every generation in between.

use std::{
    collections::{BTreeSet, HashMap},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::Stream;
use switchyard_proto::{
    encoded::{EncodedNodeStateResponse, node_state_discovery_server::NodeStateDiscovery},
    parse_version, v1,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::sessions::{Nack, Session, Sessions};
use crate::hub::{Changes, EncodedResource, Generation};

/// Most resources in one response. Bounds what one stream holds in send buffers: an
/// initial sync of 10,000 Services goes out as 40 responses, not one of several MB, so a
/// thousand agents syncing at once do not need gigabytes of buffers.
const MAX_RESOURCES_PER_RESPONSE: usize = 256;

/// How long a new stream may take to say which node it is.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `NodeStateDiscovery` from the hub's generations.
#[derive(Clone, Debug)]
pub struct DeltaService {
    generations: watch::Receiver<Arc<Generation>>,
    sessions: Sessions,
}

impl DeltaService {
    pub fn new(generations: watch::Receiver<Arc<Generation>>, sessions: Sessions) -> Self {
        Self {
            generations,
            sessions,
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EncodedNodeStateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NodeStateDiscovery for DeltaService {
    type StreamNodeStateStream = ResponseStream;

    async fn stream_node_state(
        &self,
        request: Request<Streaming<v1::NodeStateRequest>>,
    ) -> Result<Response<Self::StreamNodeStateStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(IDENTIFY_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed before naming a node")),
            Ok(Err(status)) => return Err(status),
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no first message naming the node",
                ));
            }
        };
        // The agent already acts on the label it declares: it is sent only if it differs.
        let node_facts = NodeFacts {
            being_deleted: false,
            dataplane: first.declared_label(),
        };
        let identity = first
            .node
            .filter(|n| !n.node_name.is_empty())
            .ok_or_else(|| {
                Status::invalid_argument("the first message must name the node (node.node_name)")
            })?;
        // Versions that do not parse map to 0, which matches nothing: resent or removed.
        let held = first
            .initial_resource_versions
            .into_iter()
            .map(|(name, version)| (Arc::from(name), parse_version(&version).unwrap_or(0)))
            .collect();
        tracing::info!(node = %identity.node_name, %peer, dataplane = ?identity.dataplane(), "agent connected");
        let session = self.sessions.open(identity, peer, held);
        let (tx, rx) = mpsc::channel(2);
        let stream = NodeStream {
            session,
            sessions: self.sessions.clone(),
            generations: self.generations.clone(),
            tx,
            in_flight: None,
            backlog: Backlog::default(),
            seen: 0,
            nonces: 0,
            node_facts,
        };
        tokio::spawn(stream.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A response the agent has not answered yet.
#[derive(Debug)]
struct InFlight {
    nonce: String,
    upserts: Vec<(Arc<str>, u64)>,
    removals: Vec<Arc<str>>,
}

struct NodeStream {
    session: Arc<Session>,
    sessions: Sessions,
    generations: watch::Receiver<Arc<Generation>>,
    tx: mpsc::Sender<Result<EncodedNodeStateResponse, Status>>,
    in_flight: Option<InFlight>,
    /// What is still to be checked against the node's acknowledged versions.
    backlog: Backlog,
    /// The generation whose changes were last folded into the backlog.
    seen: u64,
    nonces: u64,
    /// What the last response said of the Node itself; an agent starts out taking its
    /// node as live and unlabelled.
    node_facts: NodeFacts,
}

/// What every response says of the Node itself, beside its Services: a change of these
/// alone is sent as a response without resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NodeFacts {
    being_deleted: bool,
    /// The `switchyard.io/dataplane` label.
    dataplane: v1::Dataplane,
}

/// Services that may differ on the node, and the removals held back until every upsert
/// is out.
#[derive(Debug, Default)]
struct Backlog {
    /// A pass over every Service of a generation: its shared sorted names and the
    /// position reached, so a full diff costs a stream no copy of the names.
    full_pass: Option<(Arc<[Arc<str>]>, usize)>,
    /// Services changed since, by name.
    names: BTreeSet<Arc<str>>,
    removals: BTreeSet<Arc<str>>,
    /// The earliest change the backlog carries.
    trigger_time: Option<SystemTime>,
}

impl Backlog {
    fn pop(&mut self) -> Option<Arc<str>> {
        if let Some((names, next)) = &mut self.full_pass {
            if let Some(name) = names.get(*next) {
                *next += 1;
                return Some(name.clone());
            }
            self.full_pass = None;
        }
        self.names.pop_first()
    }

    fn upserts_done(&self) -> bool {
        self.names.is_empty()
            && self
                .full_pass
                .as_ref()
                .is_none_or(|(names, next)| *next >= names.len())
    }
}

impl NodeStream {
    async fn run(mut self, mut inbound: Streaming<v1::NodeStateRequest>) {
        let mut superseded = self.session.superseded();
        let node = self.session.node.clone();
        loop {
            if self.in_flight.is_none() {
                let generation = self.generations.borrow_and_update().clone();
                if let Some(response) = self.diff(&generation)
                    && self.tx.send(Ok(response)).await.is_err()
                {
                    break;
                }
            }
            tokio::select! {
                _ = superseded.changed() => {
                    let by = superseded.borrow().clone().unwrap_or_default();
                    tracing::info!(%node, %by, "stream superseded by a newer one");
                    let status = Status::aborted(format!(
                        "a newer stream for node {node} (from {by}) replaced this one"
                    ));
                    let _ = self.tx.send(Err(status)).await;
                    break;
                }
                message = inbound.message() => match message {
                    Ok(Some(request)) => self.answer(request),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%node, %status, "stream from agent failed");
                        break;
                    }
                },
                changed = self.generations.changed(), if self.in_flight.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = self.tx.closed() => break,
            }
        }
        tracing::info!(%node, "agent disconnected");
        self.sessions.close(&self.session);
    }

    /// Queues every Service that changed for this node since the last generation seen.
    fn fold(&mut self, generation: &Generation) {
        let changes = generation.changes_since(self.seen, &self.session.node);
        self.seen = generation.seq;
        let backlog = &mut self.backlog;
        let trigger_time = match changes {
            Changes::Services {
                services,
                trigger_time,
            } => {
                backlog.names.extend(services);
                trigger_time
            }
            Changes::All { trigger_time } => {
                backlog.full_pass = Some((generation.sorted_names(), 0));
                // Whatever the node holds that the cluster no longer has must go too.
                let protocol = self.session.protocol();
                let gone = protocol.acked.keys().filter(|n| !generation.contains(n));
                backlog.names.extend(gone.cloned());
                trigger_time
            }
        };
        if let Some(t) = trigger_time {
            backlog.trigger_time = Some(backlog.trigger_time.map_or(t, |b| b.min(t)));
        }
    }

    /// The next response bringing the node toward `generation`, or `None` when it holds
    /// everything it can. Upserts go out in chunks of [`MAX_RESOURCES_PER_RESPONSE`];
    /// removals wait until no upsert is left (make-before-break).
    fn diff(&mut self, generation: &Generation) -> Option<EncodedNodeStateResponse> {
        self.fold(generation);
        let node = generation.node_context(&self.session.node);
        let mut protocol = self.session.protocol();
        let backlog = &mut self.backlog;
        let mut added = Vec::new();
        let mut modified = Vec::new();
        while added.len() + modified.len() < MAX_RESOURCES_PER_RESPONSE {
            let Some(name) = backlog.pop() else { break };
            let held = protocol.acked.get(&name).copied();
            match generation.resource_for(&name, node) {
                Some(resource) => {
                    backlog.removals.remove(&name);
                    let rejected = protocol.nacked.get(&name) == Some(&resource.version);
                    match held {
                        Some(v) if v == resource.version => {}
                        _ if rejected => {}
                        None => added.push(resource),
                        Some(_) => modified.push(resource),
                    }
                }
                None if held.is_some() => {
                    backlog.removals.insert(name);
                }
                None => {}
            }
        }
        let mut removals = Vec::new();
        if backlog.upserts_done() {
            removals.extend(std::mem::take(&mut backlog.removals));
        }
        let node = generation.snapshot.nodes.get(&self.session.node);
        let facts = NodeFacts {
            being_deleted: node.is_some_and(|n| n.deleting),
            dataplane: node
                .and_then(|n| n.dataplane)
                .map_or(v1::Dataplane::Unspecified, |d| d.to_wire()),
        };
        self.session.set_dataplane_wanted(facts.dataplane);
        if added.is_empty() && modified.is_empty() && removals.is_empty() {
            if protocol.nacked.is_empty() {
                protocol.out_of_sync_since = None;
            }
            if facts == self.node_facts {
                return None;
            }
        } else {
            protocol
                .out_of_sync_since
                .get_or_insert_with(SystemTime::now);
        }
        drop(protocol);
        self.node_facts = facts;

        let trigger_time = if backlog.upserts_done() && backlog.removals.is_empty() {
            backlog.trigger_time.take()
        } else {
            backlog.trigger_time
        };
        let by_name = |a: &Arc<EncodedResource>, b: &Arc<EncodedResource>| a.name.cmp(&b.name);
        added.sort_by(by_name);
        modified.sort_by(by_name);
        let upserts: Vec<_> = added.into_iter().chain(modified).collect();
        self.nonces += 1;
        let nonce = format!("{}-{}", self.session.id, self.nonces);
        {
            let mut protocol = self.session.protocol();
            protocol.resources_sent += upserts.len() as u64;
            protocol.removals_sent += removals.len() as u64;
        }
        let response = EncodedNodeStateResponse {
            system_version: generation.seq.to_string(),
            resources: upserts.iter().map(|r| r.bytes.clone()).collect(),
            removed_resources: removals.iter().map(|n| n.to_string()).collect(),
            nonce: nonce.clone(),
            trigger_time: trigger_time.map(Into::into),
            node_being_deleted: facts.being_deleted,
            dataplane: facts.dataplane.into(),
        };
        self.in_flight = Some(InFlight {
            nonce,
            upserts: upserts
                .iter()
                .map(|r| (r.name.clone(), r.version))
                .collect(),
            removals,
        });
        Some(response)
    }

    /// Commits the in-flight response on ACK; on NACK commits all but the rejected resources.
    fn answer(&mut self, request: v1::NodeStateRequest) {
        self.session
            .set_dataplane_in_force(request.dataplane_in_force());
        let node = &self.session.node;
        let Some(in_flight) = self
            .in_flight
            .take_if(|f| f.nonce == request.response_nonce)
        else {
            tracing::debug!(%node, nonce = %request.response_nonce, "ignoring answer to a stale nonce");
            return;
        };
        let rejected: HashMap<&str, &str> = request
            .errors
            .iter()
            .map(|e| (e.resource_name.as_str(), e.message.as_str()))
            .collect();
        let mut protocol = self.session.protocol();
        for (name, version) in in_flight.upserts {
            if rejected.contains_key(&*name) {
                protocol.nacked.insert(name, version);
            } else {
                protocol.nacked.remove(&name);
                protocol.acked.insert(name, version);
            }
        }
        for name in in_flight.removals {
            if !rejected.contains_key(&*name) {
                protocol.nacked.remove(&name);
                protocol.acked.remove(&name);
            }
        }
        if rejected.is_empty() {
            tracing::debug!(%node, nonce = %in_flight.nonce, "ACK");
        } else {
            tracing::warn!(%node, nonce = %in_flight.nonce, errors = ?rejected, "NACK");
            protocol.last_nack = Some(Nack {
                nonce: in_flight.nonce,
                time: SystemTime::now(),
                errors: request.errors,
            });
        }
    }
}
