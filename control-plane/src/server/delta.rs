//! The `NodeStateDiscovery` stream: one task per node that sends the node what differs
//! from what it acknowledged, waits for the ACK or NACK, and repeats.
//!
//! At most one response is in flight per stream, so a slow agent costs memory for one
//! response and never delays another stream; when it catches up it receives the latest
//! state, not every generation in between.
//!
//! # What a peer controls, and its bounds
//! The first message is checked before anything is kept ([`identify`]): the node name
//! must be a DNS subdomain (so it can neither forge a log line nor hide in one), the
//! declared versions are at most [`MAX_DECLARED`] valid resource names, the agent
//! version is cut and escaped. With client certificates, the stream must be the
//! certificate's own node ([`Access::stream`]); each peer (certificate, or address
//! without one) holds at most a configured number of streams. A NACK counts only for
//! resources in flight, and at most [`MAX_NACK_ERRORS`] of its errors, each cut to
//! [`MAX_NACK_MESSAGE`] characters, are kept and logged. Nothing a peer sent is echoed
//! back unbounded.
//!
//! No stream receives anything before the source's first full read is published
//! (readiness), so agents of a restarting controller never see a half-listed cluster.
//!
//! # Questions
//! The query API may put a question to the agent over its stream ([`Session::ask`]):
//! a response carrying only `effective_state_query`, which the agent answers with a
//! report instead of an ACK. At most [`MAX_QUEUED_ASKS`](super::sessions::MAX_QUEUED_ASKS)
//! wait to be forwarded and [`MAX_WAITING_ASKS`] for their answer; a report nobody waits
//! for is dropped, and the 4 MiB bound on the agent's messages bounds each report.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::Stream;
use opentelemetry::{
    Context, KeyValue,
    global::BoxedSpan,
    propagation::TextMapPropagator as _,
    trace::{self, Span as _, SpanContext, SpanKind, TraceContextExt as _, Tracer as _},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use switchyard_proto::{
    encoded::{EncodedNodeStateResponse, node_state_discovery_server::NodeStateDiscovery},
    names::{self, escape_bounded, quote_bounded},
    parse_version,
    state::ServiceKey,
    v1,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    identity::Access,
    limits::StreamSlots,
    listener::PeerInfo,
    metrics::{Closing, Refusal, Sent, SharedMetrics},
    sessions::{Ask, Nack, Session, Sessions},
};
use crate::{
    compute::NodeContext,
    hub::{Changes, EncodedResource, Generation, Listed},
    name_ids::HeldVersions,
};

/// Most resources in one response. Bounds what one stream holds in send buffers: an
/// initial sync of 10,000 Services goes out as 40 responses, not one of several MB, so a
/// thousand agents syncing at once do not need gigabytes of buffers.
const MAX_RESOURCES_PER_RESPONSE: usize = 256;

/// How long a new stream may take to say which node it is.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// Most entries of `initial_resource_versions`: well above any cluster's Services (the
/// 4 MiB message bound allows about 50,000 of typical names anyway).
pub const MAX_DECLARED: usize = 100_000;
/// Most characters of an agent's free-form version kept.
pub const MAX_AGENT_VERSION: usize = 128;
/// Most errors of one NACK kept for the query API and logged.
pub const MAX_NACK_ERRORS: usize = 16;
/// Most characters of one NACK error message kept.
pub const MAX_NACK_MESSAGE: usize = 512;
/// Most questions one stream waits on the agent's answers for; beyond, the oldest
/// asker's wait is ended (it has given up by then: each waits 15 s at most).
pub const MAX_WAITING_ASKS: usize = 16;

/// Serves `NodeStateDiscovery` from the hub's generations.
#[derive(Clone, Debug)]
pub struct DeltaService {
    generations: watch::Receiver<Arc<Generation>>,
    sessions: Sessions,
    ready: watch::Receiver<bool>,
    access: Access,
    slots: StreamSlots,
    shutdown: watch::Receiver<bool>,
    metrics: SharedMetrics,
}

impl DeltaService {
    /// `ready` turns true once the source's first full read is published; `shutdown`
    /// turns true when every stream must end.
    pub fn new(
        generations: watch::Receiver<Arc<Generation>>,
        sessions: Sessions,
        ready: watch::Receiver<bool>,
        access: Access,
        slots: StreamSlots,
        shutdown: watch::Receiver<bool>,
        metrics: SharedMetrics,
    ) -> Self {
        Self {
            generations,
            sessions,
            ready,
            access,
            slots,
            shutdown,
            metrics,
        }
    }
}

/// What a valid first message declares.
#[derive(Debug, PartialEq, Eq)]
pub struct Declared {
    pub identity: v1::NodeIdentity,
    /// Resource name → version the agent holds (0 for a version that does not parse,
    /// which matches nothing: resent or removed).
    pub held: foldhash::HashMap<Arc<str>, u64>,
}

/// Checks a stream's first message. Pure.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the field, with any value quoted bounded and escaped.
pub fn identify(first: v1::NodeStateRequest) -> Result<Declared, Status> {
    let mut identity = first
        .node
        .filter(|n| !n.node_name.is_empty())
        .ok_or_else(|| {
            Status::invalid_argument("the first message must name the node (node.node_name)")
        })?;
    names::dns1123_subdomain(&identity.node_name).map_err(|reason| {
        Status::invalid_argument(format!(
            "node.node_name {} {reason}",
            quote_bounded(&identity.node_name)
        ))
    })?;
    identity.agent_version = escape_bounded(&identity.agent_version, MAX_AGENT_VERSION);
    let declared = first.initial_resource_versions;
    if declared.len() > MAX_DECLARED {
        return Err(Status::invalid_argument(format!(
            "initial_resource_versions holds {} entries, more than {MAX_DECLARED}",
            declared.len()
        )));
    }
    let mut held = foldhash::HashMap::default();
    held.reserve(declared.len());
    for (name, version) in declared {
        if let Err(reason) = resource_name(&name) {
            return Err(Status::invalid_argument(format!(
                "initial_resource_versions: {} is not a resource name: {reason}",
                quote_bounded(&name)
            )));
        }
        held.insert(Arc::from(name), parse_version(&version).unwrap_or(0));
    }
    Ok(Declared { identity, held })
}

/// What an agent's answer to a response says, as the controller keeps it.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer<'a> {
    /// Resources of the response the agent rejected.
    pub rejected: HashSet<&'a str>,
    /// The first [`MAX_NACK_ERRORS`] errors, messages cut to [`MAX_NACK_MESSAGE`] and
    /// escaped: what the query API shows and the log says.
    pub kept: Vec<v1::ResourceError>,
    /// Errors left out of `kept`.
    pub omitted: usize,
}

/// Reads an answer's errors against the resources `sent` in the response it answers:
/// errors naming anything else are ignored (an answer naming only those is an ACK).
/// Pure.
pub fn read_answer<'a>(sent: &HashSet<&str>, errors: &'a [v1::ResourceError]) -> Answer<'a> {
    let relevant: Vec<&v1::ResourceError> = errors
        .iter()
        .filter(|e| sent.contains(e.resource_name.as_str()))
        .collect();
    let kept: Vec<v1::ResourceError> = relevant
        .iter()
        .take(MAX_NACK_ERRORS)
        .map(|e| v1::ResourceError {
            resource_name: e.resource_name.clone(),
            message: escape_bounded(&e.message, MAX_NACK_MESSAGE),
        })
        .collect();
    Answer {
        rejected: relevant.iter().map(|e| e.resource_name.as_str()).collect(),
        omitted: relevant.len() - kept.len(),
        kept,
    }
}

/// Whether `name` is one the controller could have sent: `namespace/name` of a valid
/// Service.
fn resource_name(name: &str) -> Result<(), &'static str> {
    let key: ServiceKey = name.parse().map_err(|_| "expected namespace/name")?;
    names::dns1123_label(&key.namespace)?;
    names::dns1035_label(&key.name)
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EncodedNodeStateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NodeStateDiscovery for DeltaService {
    type StreamNodeStateStream = ResponseStream;

    async fn stream_node_state(
        &self,
        request: Request<Streaming<v1::NodeStateRequest>>,
    ) -> Result<Response<Self::StreamNodeStateStream>, Status> {
        let peer = PeerInfo::of(&request);
        let mut inbound = request.into_inner();
        let refused = |why| self.metrics.stream_refused(why);
        let first = match tokio::time::timeout(IDENTIFY_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => {
                refused(Refusal::NoFirstMessage);
                return Err(Status::cancelled("stream closed before naming a node"));
            }
            Ok(Err(status)) => {
                refused(Refusal::NoFirstMessage);
                return Err(status);
            }
            Err(_) => {
                refused(Refusal::NoFirstMessage);
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
        let described = peer.describe();
        let Declared { identity, held } = identify(first).inspect_err(|status| {
            refused(Refusal::InvalidRequest);
            tracing::warn!(peer = %described, message = status.message(), "refusing a stream");
        })?;
        let node = identity.node_name.clone();
        self.access
            .stream(peer.identity.as_deref(), &node)
            .inspect_err(|status| {
                refused(Refusal::PermissionDenied);
                tracing::warn!(%node, peer = %described, message = status.message(), "refusing a stream");
            })?;
        let slot = self.slots.try_take(peer.key()).ok_or_else(|| {
            refused(Refusal::TooManyStreams);
            tracing::warn!(%node, peer = %described, "refusing a stream: too many from this peer");
            Status::resource_exhausted(format!(
                "{described} already holds {} agent streams, the most this controller allows \
                 one peer (--max-streams-per-peer)",
                self.slots.limit()
            ))
        })?;
        tracing::info!(%node, peer = %described, dataplane = ?identity.dataplane(), declared = held.len(), "agent connected");
        // The table only: converting up to 100,000 declared names must not hold the
        // generation's borrow, which keeps the hub from publishing the next one.
        let table = self.generations.borrow().names().clone();
        let held = HeldVersions::from_declared(&table, held);
        let (session, asked) = self.sessions.open(identity, described, held);
        self.metrics.stream_opened();
        let (tx, rx) = mpsc::channel(2);
        let stream = NodeStream {
            session,
            sessions: self.sessions.clone(),
            generations: self.generations.clone(),
            ready: self.ready.clone(),
            shutdown: self.shutdown.clone(),
            metrics: self.metrics.clone(),
            _slot: slot,
            tx,
            in_flight: None,
            backlog: Backlog::default(),
            seen: 0,
            nonces: 0,
            node_facts,
            node_seen: None,
            asked,
            waiting: HashMap::new(),
            asks: 0,
        };
        tokio::spawn(stream.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A response the agent has not answered yet.
#[derive(Debug)]
struct InFlight {
    nonce: String,
    /// Name, id in the name table of the node's held versions, version.
    upserts: Vec<(Arc<str>, u32, u64)>,
    removals: Vec<Arc<str>>,
    /// The earliest change it carries, for the time from change to ACK.
    trigger_time: Option<SystemTime>,
    /// Its span when the change is traced; ends with the answer.
    span: Option<NodeUpdateSpan>,
}

/// `switchyard.node_update`: one response to one node, from the start of its
/// computation to the agent's answer, a child of the change's `switchyard.change`.
/// Its first child, `switchyard.compute`, is the per-node diff and encoding; the agent's
/// spans join it through the response's `trace_context`.
#[derive(Debug)]
struct NodeUpdateSpan {
    span: BoxedSpan,
}

impl NodeUpdateSpan {
    fn start(
        change: SpanContext,
        node: &str,
        nonce: &str,
        upserts: usize,
        removals: usize,
        computing_since: std::time::Instant,
    ) -> Self {
        let tracer = opentelemetry::global::tracer("switchyard-controller");
        let started = SystemTime::now() - computing_since.elapsed();
        let parent = Context::new().with_remote_span_context(change);
        let span = tracer
            .span_builder("switchyard.node_update")
            .with_kind(SpanKind::Producer)
            .with_start_time(started)
            .with_attributes([
                KeyValue::new("switchyard.node", node.to_owned()),
                KeyValue::new("switchyard.nonce", nonce.to_owned()),
                KeyValue::new("switchyard.upserts", upserts as i64),
                KeyValue::new("switchyard.removals", removals as i64),
            ])
            .start_with_context(&tracer, &parent);
        let parent = Context::new().with_remote_span_context(span.span_context().clone());
        tracer
            .span_builder("switchyard.compute")
            .with_start_time(started)
            .start_with_context(&tracer, &parent)
            .end();
        Self { span }
    }

    /// The W3C Trace Context headers that make the agent's spans its children.
    fn propagation(&self) -> HashMap<String, String> {
        let mut headers = HashMap::new();
        let cx = Context::new().with_remote_span_context(self.span.span_context().clone());
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
        headers
    }

    fn answered(mut self, rejected: usize) {
        self.span
            .set_attribute(KeyValue::new("switchyard.rejected", rejected as i64));
        if rejected > 0 {
            self.span.set_status(trace::Status::error("NACK"));
        }
        self.span.end();
    }
}

struct NodeStream {
    session: Arc<Session>,
    sessions: Sessions,
    generations: watch::Receiver<Arc<Generation>>,
    ready: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    metrics: SharedMetrics,
    /// This stream's place among its peer's streams, freed when it ends.
    _slot: super::limits::Slot,
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
    /// The Node as the current generation has it; looked up again only when a change
    /// touched it (a lookup among thousands of nodes per change and stream added up).
    node_seen: Option<NodeSeen>,
    /// Questions for the agent (`GetNodeEffectiveState`) to forward.
    asked: mpsc::Receiver<Ask>,
    /// Forwarded questions by id, until the agent answers or the asker gives up.
    waiting: HashMap<u64, oneshot::Sender<v1::EffectiveStateReport>>,
    asks: u64,
}

/// What ends a stream from outside its loop.
struct Ending {
    superseded: watch::Receiver<Option<String>>,
    session: Arc<Session>,
    shutdown: watch::Receiver<bool>,
    /// A clone of the stream's sender, to learn when the agent's side is gone.
    tx: mpsc::Sender<Result<EncodedNodeStateResponse, Status>>,
}

#[derive(Debug)]
enum Ended {
    /// By a newer stream for the node, from this peer.
    Superseded(String),
    Shed,
    Shutdown,
    AgentClosed,
}

impl Ending {
    async fn wait(mut self) -> Ended {
        let shutdown = async {
            while !*self.shutdown.borrow_and_update() {
                if self.shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = self.superseded.changed() => {
                Ended::Superseded(self.superseded.borrow().clone().unwrap_or_default())
            }
            _ = self.session.shed_requested() => Ended::Shed,
            _ = shutdown => Ended::Shutdown,
            _ = self.tx.closed() => Ended::AgentClosed,
        }
    }
}

/// What every response says of the Node itself, beside its Services: a change of these
/// alone is sent as a response without resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NodeFacts {
    being_deleted: bool,
    /// The `switchyard.io/dataplane` label.
    dataplane: v1::Dataplane,
}

/// What a stream's diff needs of its Node.
#[derive(Debug)]
struct NodeSeen {
    zone: Option<String>,
    facts: NodeFacts,
}

impl NodeSeen {
    fn of(generation: &Generation, node: &str) -> Self {
        let node = generation.snapshot.nodes.get(node);
        Self {
            zone: node.and_then(|n| n.zone.clone()),
            facts: NodeFacts {
                being_deleted: node.is_some_and(|n| n.deleting),
                dataplane: node
                    .and_then(|n| n.dataplane)
                    .map_or(v1::Dataplane::Unspecified, |d| d.to_wire()),
            },
        }
    }
}

/// Services that may differ on the node, and the removals held back until every upsert
/// is out.
#[derive(Debug, Default)]
struct Backlog {
    /// A pass over every Service of a generation: its shared sorted Services, the
    /// position reached and that generation's number, so a full diff costs a stream no
    /// copy and, while no newer generation came, no lookup by name.
    full_pass: Option<(Arc<[Listed]>, usize, u64)>,
    /// Services changed since, by name.
    names: BTreeSet<Arc<str>>,
    removals: BTreeSet<Arc<str>>,
    /// The earliest change the backlog carries.
    trigger_time: Option<SystemTime>,
    /// The span of the earliest traced change it carries.
    trace: Option<SpanContext>,
}

/// What a backlog holds next: a Service of the generation of its full pass, or a name
/// to look up in the current one.
enum Next {
    Listed(Listed),
    Name(Arc<str>),
}

impl Backlog {
    /// The next Service to diff against generation `seq`: as listed in the full pass
    /// when that is of `seq` too, by name otherwise (its id and entry may have changed).
    fn pop(&mut self, seq: u64) -> Option<Next> {
        if let Some((listed, next, of)) = &mut self.full_pass {
            if let Some(listed) = listed.get(*next) {
                *next += 1;
                return Some(if *of == seq {
                    Next::Listed(listed.clone())
                } else {
                    Next::Name(listed.name.clone())
                });
            }
            self.full_pass = None;
        }
        self.names.pop_first().map(Next::Name)
    }

    /// Services queued: the rest of a full pass, the names changed since, the removals.
    fn len(&self) -> usize {
        let full = self
            .full_pass
            .as_ref()
            .map_or(0, |(names, next, _)| names.len().saturating_sub(*next));
        full + self.names.len() + self.removals.len()
    }

    fn upserts_done(&self) -> bool {
        self.names.is_empty()
            && self
                .full_pass
                .as_ref()
                .is_none_or(|(names, next, _)| *next >= names.len())
    }
}

impl NodeStream {
    async fn run(mut self, mut inbound: Streaming<v1::NodeStateRequest>) {
        let node = self.session.node.clone();
        // What ends the stream from outside, waited on by one future for the stream's
        // life rather than by new waits on shared notifiers in every turn of the loop
        // (twice per change and stream).
        let ending = Ending {
            superseded: self.session.superseded(),
            session: self.session.clone(),
            shutdown: self.shutdown.clone(),
            tx: self.tx.clone(),
        }
        .wait();
        tokio::pin!(ending);
        let closing = loop {
            if *self.shutdown.borrow() {
                let status = Status::unavailable("the controller is shutting down");
                let _ = self.tx.send(Err(status)).await;
                break Closing::Shutdown;
            }
            let ready = *self.ready.borrow_and_update();
            if self.in_flight.is_none() && ready {
                let generation = self.generations.borrow_and_update().clone();
                if let Some(response) = self.diff(&generation)
                    && self.tx.send(Ok(response)).await.is_err()
                {
                    break Closing::AgentClosed;
                }
            }
            tokio::select! {
                ended = &mut ending => {
                    let (closing, status) = match ended {
                        Ended::Superseded(by) => {
                            tracing::info!(%node, %by, "stream superseded by a newer one");
                            let status = Status::aborted(format!(
                                "a newer stream for node {node} (from {by}) replaced this one"
                            ));
                            (Closing::Superseded, status)
                        }
                        Ended::Shed => {
                            tracing::info!(%node, "moving the agent to another replica");
                            let mut status = Status::unavailable(
                                "this controller replica sheds streams to even the load: reconnect to another",
                            );
                            status.metadata_mut().insert(
                                switchyard_proto::RECONNECT_METADATA,
                                switchyard_proto::RECONNECT_ELSEWHERE.parse().expect("ASCII"),
                            );
                            (Closing::Shed, status)
                        }
                        Ended::Shutdown => (
                            Closing::Shutdown,
                            Status::unavailable("the controller is shutting down"),
                        ),
                        Ended::AgentClosed => break Closing::AgentClosed,
                    };
                    let _ = self.tx.send(Err(status)).await;
                    break closing;
                }
                Some(ask) = self.asked.recv() => {
                    let question = self.forward(ask);
                    if self.tx.send(Ok(question)).await.is_err() {
                        break Closing::AgentClosed;
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(request)) => self.answer(request),
                    Ok(None) => break Closing::AgentClosed,
                    Err(status) => {
                        tracing::debug!(%node, %status, "stream from agent failed");
                        break Closing::StreamError;
                    }
                },
                changed = self.generations.changed(), if self.in_flight.is_none() && ready => {
                    if changed.is_err() {
                        break Closing::Shutdown;
                    }
                }
                changed = self.ready.changed(), if !ready => {
                    if changed.is_err() {
                        break Closing::Shutdown;
                    }
                }
            }
        };
        tracing::info!(%node, reason = ?closing, "agent disconnected");
        self.metrics.stream_closed(closing);
        self.sessions.close(&self.session);
    }

    /// Queues every Service that changed for this node since the last generation seen;
    /// true when anything may have (the Node itself among them).
    fn fold(&mut self, generation: &Generation) -> bool {
        let changes = generation.changes_since(self.seen, &self.session.node);
        self.seen = generation.seq;
        let backlog = &mut self.backlog;
        let all = matches!(changes, Changes::All { .. });
        let (trigger_time, trace) = match changes {
            Changes::Services {
                services,
                trigger_time,
                trace,
            } => {
                backlog.names.extend(services);
                (trigger_time, trace)
            }
            Changes::All {
                trigger_time,
                trace,
            } => {
                backlog.full_pass = Some((generation.sorted(), 0, generation.seq));
                // Whatever the node holds that the cluster no longer has must go too.
                let protocol = self.session.protocol();
                let held = protocol.acked.entries();
                let gone = held.into_iter().filter(|(n, _)| !generation.contains(n));
                backlog.names.extend(gone.map(|(name, _)| name));
                (trigger_time, trace)
            }
        };
        if let Some(t) = trigger_time {
            backlog.trigger_time = Some(backlog.trigger_time.map_or(t, |b| b.min(t)));
        }
        if backlog.trace.is_none() {
            backlog.trace = trace;
        }
        all
    }

    /// The next response bringing the node toward `generation`, or `None` when it holds
    /// everything it can. Upserts go out in chunks of [`MAX_RESOURCES_PER_RESPONSE`];
    /// removals wait until no upsert is left (make-before-break).
    fn diff(&mut self, generation: &Generation) -> Option<EncodedNodeStateResponse> {
        let started = std::time::Instant::now();
        if self.fold(generation) || self.node_seen.is_none() {
            self.node_seen = Some(NodeSeen::of(generation, &self.session.node));
        }
        let seen = self.node_seen.as_ref().expect("just set");
        let pending = self.backlog.len();
        let node = NodeContext {
            name: &self.session.node,
            zone: seen.zone.as_deref(),
        };
        let mut protocol = self.session.protocol();
        protocol.acked.adopt(generation.names());
        let backlog = &mut self.backlog;
        let mut added = Vec::new();
        let mut modified = Vec::new();
        while added.len() + modified.len() < MAX_RESOURCES_PER_RESPONSE {
            let listed = match backlog.pop(generation.seq) {
                None => break,
                Some(Next::Listed(listed)) => listed,
                Some(Next::Name(name)) => match generation.listed(&name) {
                    Some(listed) => listed.clone(),
                    None => {
                        // Gone from the cluster: the node must drop it if it holds it.
                        if protocol.acked.get(&name).is_some() {
                            backlog.removals.insert(name);
                        }
                        continue;
                    }
                },
            };
            let held = protocol.acked.get_id(listed.id);
            match generation.resource_of(&listed, node) {
                Some(resource) => {
                    if !backlog.removals.is_empty() {
                        backlog.removals.remove(&listed.name);
                    }
                    let rejected = !protocol.nacked.is_empty()
                        && protocol.nacked.get(&listed.name) == Some(&resource.version);
                    match held {
                        Some(v) if v == resource.version => {}
                        _ if rejected => {}
                        None => added.push((resource, listed.id)),
                        Some(_) => modified.push((resource, listed.id)),
                    }
                }
                // Not handled on this node (any more).
                None if held.is_some() => {
                    backlog.removals.insert(listed.name);
                }
                None => {}
            }
        }
        let mut removals = Vec::new();
        if backlog.upserts_done() {
            removals.extend(std::mem::take(&mut backlog.removals));
        }
        let facts = seen.facts;
        self.session.set_dataplane_wanted(facts.dataplane);
        protocol.pending = backlog.len() + added.len() + modified.len() + removals.len();
        protocol.generation = generation.seq;
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

        let (trigger_time, trace) = if backlog.upserts_done() && backlog.removals.is_empty() {
            (backlog.trigger_time.take(), backlog.trace.take())
        } else {
            (backlog.trigger_time, backlog.trace.clone())
        };
        let by_name = |a: &(Arc<EncodedResource>, u32), b: &(Arc<EncodedResource>, u32)| {
            a.0.name.cmp(&b.0.name)
        };
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
        let span = trace.map(|change| {
            NodeUpdateSpan::start(
                change,
                &self.session.node,
                &nonce,
                upserts.len(),
                removals.len(),
                started,
            )
        });
        let response = EncodedNodeStateResponse {
            system_version: generation.seq.to_string(),
            resources: upserts.iter().map(|(r, _)| r.bytes.clone()).collect(),
            removed_resources: removals.iter().map(|n| n.to_string()).collect(),
            nonce: nonce.clone(),
            trigger_time: trigger_time.map(Into::into),
            node_being_deleted: facts.being_deleted,
            dataplane: facts.dataplane.into(),
            // Built the instant before it is queued for the agent.
            sent_time: Some(SystemTime::now().into()),
            effective_state_query: None,
            trace_context: span
                .as_ref()
                .map(NodeUpdateSpan::propagation)
                .unwrap_or_default(),
        };
        self.metrics.sent(Sent {
            resources: upserts.len(),
            removals: removals.len(),
            bytes: prost::Message::encoded_len(&response),
            pending,
            build: started.elapsed(),
        });
        self.in_flight = Some(InFlight {
            nonce,
            upserts: upserts
                .iter()
                .map(|(r, id)| (r.name.clone(), *id, r.version))
                .collect(),
            removals,
            trigger_time,
            span,
        });
        Some(response)
    }

    /// The response that puts `ask` to the agent: the question and the node facts as
    /// last sent, nothing to apply, no nonce. Any in-flight response stays in flight.
    fn forward(&mut self, mut ask: Ask) -> EncodedNodeStateResponse {
        self.waiting.retain(|_, reply| !reply.is_closed());
        if self.waiting.len() >= MAX_WAITING_ASKS
            && let Some(oldest) = self.waiting.keys().min().copied()
        {
            self.waiting.remove(&oldest);
        }
        self.asks += 1;
        ask.query.query_id = self.asks;
        self.waiting.insert(self.asks, ask.reply);
        EncodedNodeStateResponse {
            node_being_deleted: self.node_facts.being_deleted,
            dataplane: self.node_facts.dataplane.into(),
            sent_time: Some(SystemTime::now().into()),
            effective_state_query: Some(ask.query),
            ..Default::default()
        }
    }

    /// Commits the in-flight response on ACK; on NACK commits all but the rejected
    /// resources. Errors naming resources not in flight are ignored. A report answering
    /// a question goes to whoever asked it, if they still wait.
    fn answer(&mut self, mut request: v1::NodeStateRequest) {
        self.session
            .set_dataplane_in_force(request.dataplane_in_force());
        let node = &self.session.node;
        if let Some(report) = request.effective_state_report.take() {
            match self.waiting.remove(&report.query_id) {
                Some(reply) => drop(reply.send(report)),
                None => {
                    tracing::debug!(%node, query = report.query_id, "ignoring a report nobody waits for")
                }
            }
            return;
        }
        let Some(in_flight) = self
            .in_flight
            .take_if(|f| f.nonce == request.response_nonce)
        else {
            tracing::debug!(%node, nonce = %quote_bounded(&request.response_nonce), "ignoring answer to a stale nonce");
            return;
        };
        // An ACK (no errors) needs no lookup of what was sent.
        let sent: HashSet<&str> = if request.errors.is_empty() {
            HashSet::new()
        } else {
            in_flight
                .upserts
                .iter()
                .map(|(name, _, _)| &**name)
                .chain(in_flight.removals.iter().map(|name| &**name))
                .collect()
        };
        let answer = read_answer(&sent, &request.errors);
        let rejected = &answer.rejected;
        self.metrics.answered(!rejected.is_empty());
        if let Some(span) = in_flight.span {
            span.answered(rejected.len());
        }
        if let Some(since) = in_flight
            .trigger_time
            .and_then(|t| SystemTime::now().duration_since(t).ok())
        {
            self.metrics.change_answered(since);
        }
        let mut protocol = self.session.protocol();
        for (name, id, version) in in_flight.upserts {
            if rejected.contains(&*name) {
                protocol.nacked.insert(name, version);
            } else {
                if !protocol.nacked.is_empty() {
                    protocol.nacked.remove(&name);
                }
                protocol.ack(name, Some(id), version);
            }
        }
        for name in in_flight.removals {
            if !rejected.contains(&*name) {
                protocol.nacked.remove(&name);
                protocol.unack(&name);
            }
        }
        protocol.pending = self.backlog.len();
        if rejected.is_empty() {
            tracing::debug!(%node, nonce = %in_flight.nonce, "ACK");
        } else {
            let first = &answer.kept[0];
            tracing::warn!(
                %node,
                nonce = %in_flight.nonce,
                rejected = rejected.len(),
                errors = answer.kept.len() + answer.omitted,
                first = %first.resource_name,
                error = %first.message,
                "NACK"
            );
            protocol.last_nack = Some(Nack {
                nonce: in_flight.nonce,
                time: SystemTime::now(),
                omitted: answer.omitted,
                errors: answer.kept,
            });
        }
    }
}
