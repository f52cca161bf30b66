//! The `ControllerQuery` service: nodes, their desired and acknowledged state, one
//! Service across nodes, source problems, and a node's kernel as its agent reads it
//! back (asked over the agent's stream), for people and scripts.
//!
//! # Cost
//! A query must not be able to take the controller down. Every list is paginated (see
//! `query.proto`) and a page stops before it outgrows [`MAX_PAGE_BYTES`], so neither the
//! answer nor what is built for it grows with the whole cluster times the node count.
//! The work runs on the blocking pool, never on the executor that serves agent streams,
//! and stops early when the caller goes away. How many queries run at once is bounded
//! by the server ([`super::limits::Gated`]).

use std::{
    collections::BTreeSet,
    ops::{Bound, RangeBounds},
    sync::{Arc, Weak},
    time::{Duration, SystemTime},
};

use prost::Message;
use switchyard_proto::{
    format_version,
    names::{self, quote_bounded},
    v1::{self, controller_query_server::ControllerQuery},
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{
    identity::Access,
    listener::PeerInfo,
    sessions::{AskError, NodeProtocol, Session, Sessions, state_version},
};
use crate::{
    coordination::Coordination,
    hub::{EncodedResource, Generation},
    model::ServiceKey,
    store::ProblemsView,
};

/// A page stops growing past this many encoded bytes (grpcurl's default limit is 4 MiB).
pub const MAX_PAGE_BYTES: usize = 3 << 20;
/// Longest page token accepted; tokens this controller issues are shorter.
const MAX_TOKEN: usize = 16 << 10;

#[derive(Clone, Debug)]
pub struct QueryService {
    generations: watch::Receiver<Arc<Generation>>,
    sessions: Sessions,
    problems: ProblemsView,
    access: Access,
    /// The registry of every replica's sessions, with replicas (`--etcd-endpoints`).
    coordination: Option<Coordination>,
}

impl QueryService {
    pub fn new(
        generations: watch::Receiver<Arc<Generation>>,
        sessions: Sessions,
        problems: ProblemsView,
        access: Access,
    ) -> Self {
        Self {
            generations,
            sessions,
            problems,
            access,
            coordination: None,
        }
    }

    /// Answers for every replica's nodes from `coordination`'s registry.
    pub fn with_coordination(mut self, coordination: Option<Coordination>) -> Self {
        self.coordination = coordination;
        self
    }
}

/// Nodes in the cluster and nodes with an agent, in name order.
fn node_names(
    generation: &Generation,
    sessions: &Sessions,
    coordination: Option<&Coordination>,
) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = generation.snapshot.nodes.keys().cloned().collect();
    names.extend(sessions.all().into_iter().map(|s| s.node.clone()));
    if let Some(coordination) = coordination {
        names.extend(coordination.registered_nodes());
    }
    names
}

/// A node's status as the replica serving it registered it, when that is another
/// replica (or this one's registry is all there is): its lag grown since it was
/// written, and marked possibly stale while etcd is unreachable.
fn registered_status(
    coordination: &Coordination,
    node: &str,
    generation: &Generation,
) -> Option<v1::NodeStatus> {
    let (record, stale) = coordination.registered(node)?;
    let mut status = record.status?;
    if status.replica == coordination.replica && !stale {
        // This replica's own record of a stream that just closed here.
        return None;
    }
    status.node_name = node.to_owned();
    status.in_cluster = generation.snapshot.nodes.contains_key(node);
    if status.pending_changes > 0
        && let Some(written) = record.written.and_then(|t| SystemTime::try_from(t).ok())
    {
        let since = SystemTime::now()
            .duration_since(written)
            .unwrap_or_default();
        let lag = status
            .lag
            .and_then(|l| Duration::try_from(l).ok())
            .unwrap_or_default();
        status.lag = (lag + since).try_into().ok();
    }
    status.possibly_stale = stale;
    Some(status)
}

/// A node's status as this replica can tell: its own connected stream (cheap when in
/// sync); else the session another replica registered; else the full computation (a
/// stream closed here, or no agent anywhere). `desired` is the node's desired state,
/// computed only when needed.
fn status_of(
    node: &str,
    generation: &Generation,
    sessions: &Sessions,
    coordination: Option<&Coordination>,
    desired: impl FnOnce() -> Vec<Arc<EncodedResource>>,
) -> v1::NodeStatus {
    let session = sessions.get(node);
    if let Some(live) = session.as_deref().filter(|s| s.is_connected()) {
        let mut status = in_sync_status(node, generation, live)
            .unwrap_or_else(|| node_status(node, generation, Some(live), &desired()));
        if let Some(coordination) = coordination {
            status.replica = coordination.replica.clone();
        }
        return status;
    }
    if let Some(status) = coordination.and_then(|c| registered_status(c, node, generation)) {
        return status;
    }
    let mut status = node_status(node, generation, session.as_deref(), &desired());
    status.possibly_stale = coordination.is_some_and(|c| !c.etcd_up());
    status
}

/// How many items a page holds and where it starts.
#[derive(Debug, PartialEq, Eq)]
struct PageRequest {
    size: usize,
    /// The last item of the previous page.
    after: Option<String>,
}

impl PageRequest {
    fn new(page_size: u32, token: String, default: usize, max: usize) -> Result<Self, Status> {
        if token.len() > MAX_TOKEN {
            return Err(Status::invalid_argument(
                "page_token is not one this controller issued",
            ));
        }
        Ok(Self {
            size: match page_size {
                0 => default,
                n => (n as usize).min(max),
            },
            after: (!token.is_empty()).then_some(token),
        })
    }

    /// The range of keys after the previous page.
    fn range(&self) -> (Bound<&str>, Bound<&str>) {
        match &self.after {
            Some(after) => (Bound::Excluded(after.as_str()), Bound::Unbounded),
            None => (Bound::Unbounded, Bound::Unbounded),
        }
    }
}

/// Fills a page up to its size or [`MAX_PAGE_BYTES`], whichever comes first (always at
/// least one item).
struct Page<T> {
    items: Vec<T>,
    size: usize,
    bytes: usize,
    last: Option<String>,
    more: bool,
}

impl<T: Message> Page<T> {
    fn new(size: usize) -> Self {
        Self {
            items: Vec::new(),
            size,
            bytes: 0,
            last: None,
            more: false,
        }
    }

    fn full(&self) -> bool {
        self.items.len() >= self.size || self.bytes >= MAX_PAGE_BYTES
    }

    /// Adds an item unless the page is full; `false` (and `more` set) when full.
    fn push(&mut self, key: &str, item: T) -> bool {
        let len = item.encoded_len();
        if self.full() || (!self.items.is_empty() && self.bytes + len > MAX_PAGE_BYTES) {
            self.more = true;
            return false;
        }
        self.bytes += len;
        self.items.push(item);
        self.last = Some(key.to_owned());
        true
    }

    fn next_token(&self) -> String {
        match (&self.last, self.more) {
            (Some(last), true) => last.clone(),
            _ => String::new(),
        }
    }
}

/// Whether the caller still waits; checked by long loops on the blocking pool.
struct Caller(Weak<()>);

impl Caller {
    fn gone(&self) -> Result<(), Status> {
        if self.0.strong_count() == 0 {
            Err(Status::cancelled("the caller went away"))
        } else {
            Ok(())
        }
    }
}

/// Runs `work` on the blocking pool; it sees the caller leave when this future drops.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce(Caller) -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    let waiting = Arc::new(());
    let caller = Caller(Arc::downgrade(&waiting));
    let result = tokio::task::spawn_blocking(move || work(caller))
        .await
        .map_err(|e| Status::internal(format!("the query failed: {e}")))?;
    drop(waiting);
    result
}

/// Every resource `node` must hold, in name order.
fn desired(generation: &Generation, node: &str) -> Vec<Arc<EncodedResource>> {
    let context = generation.node_context(node);
    generation
        .sorted()
        .iter()
        .filter_map(|listed| generation.resource_of(listed, context))
        .collect()
}

fn node_status(
    node: &str,
    generation: &Generation,
    session: Option<&Session>,
    desired: &[Arc<EncodedResource>],
) -> v1::NodeStatus {
    let desired_version = state_version(desired.iter().map(|r| (&*r.name, r.version)));
    let mut status = v1::NodeStatus {
        node_name: node.to_string(),
        in_cluster: generation.snapshot.nodes.contains_key(node),
        dataplane_wanted: generation
            .snapshot
            .nodes
            .get(node)
            .and_then(|n| n.dataplane)
            .map_or(v1::Dataplane::Unspecified, |d| d.to_wire())
            .into(),
        desired_version: desired_version.clone(),
        services: desired.len() as u32,
        pending_changes: desired.len() as u32,
        ..Default::default()
    };
    let Some(session) = session else {
        return status;
    };
    status.dataplane = session.dataplanes().in_force.into();
    status.agent_version = session.identity.agent_version.clone();
    status.peer = session.peer.clone();
    status.connected_since = Some(session.connected_since.into());
    status.connected = session.is_connected();
    let protocol = session.protocol();
    status.resources_sent = protocol.resources_sent;
    status.removals_sent = protocol.removals_sent;
    status.last_nack = protocol.last_nack.as_ref().map(|n| v1::Nack {
        nonce: n.nonce.clone(),
        time: Some(n.time.into()),
        errors: n.errors.clone(),
    });
    if let Some(closed) = &protocol.closed {
        let in_sync = closed.acked_version == desired_version;
        status.pending_changes = if in_sync { 0 } else { desired.len() as u32 };
        if closed.acked_resources > 0 || desired.is_empty() {
            status.acked_version = closed.acked_version.clone();
        }
        return status;
    }
    let mut stale = 0;
    let mut held_and_desired = 0;
    for resource in desired {
        match protocol.acked.get(&resource.name) {
            Some(version) => {
                held_and_desired += 1;
                if version != resource.version {
                    stale += 1;
                }
            }
            None => stale += 1,
        }
    }
    let extra = protocol.acked.len() - held_and_desired;
    status.pending_changes = (stale + extra) as u32;
    if !protocol.acked.is_empty() || desired.is_empty() {
        status.acked_version = if status.pending_changes == 0 {
            desired_version
        } else {
            protocol.acked_hash.version()
        };
    }
    if status.pending_changes > 0 {
        let since = protocol
            .out_of_sync_since
            .unwrap_or(session.connected_since);
        let lag = SystemTime::now().duration_since(since).unwrap_or_default();
        status.lag = lag.try_into().ok();
    }
    status
}

/// A connected node's status from what its stream keeps up to date, when the node holds
/// exactly what the current generation wants (nothing queued, in flight or rejected):
/// then the desired version is the acknowledged one, and listing a thousand nodes of
/// 10,000 Services costs no pass over their Services. `None` otherwise.
fn in_sync_status(
    node: &str,
    generation: &Generation,
    session: &Session,
) -> Option<v1::NodeStatus> {
    let (status, in_sync) = summary(node, generation, session);
    in_sync.then_some(status)
}

/// What a replica registers in etcd for one of its connected nodes, from what the
/// stream keeps (no pass over the node's Services): in sync, as [`in_sync_status`];
/// otherwise without `desired_version`, with the changes queued, in flight or rejected
/// as `pending_changes` and the lag so far.
pub fn registry_status(node: &str, generation: &Generation, session: &Session) -> v1::NodeStatus {
    summary(node, generation, session).0
}

/// Whether a session's node holds all of `generation` its stream knows of, as its
/// status says (`pending_changes` 0), from what the stream keeps.
pub fn in_sync(generation: &Generation, session: &Session, protocol: &NodeProtocol) -> bool {
    session.is_connected()
        && protocol.generation == generation.seq
        && protocol.pending == 0
        && protocol.nacked.is_empty()
        && protocol.closed.is_none()
}

/// The cheap status of a node's session, and whether the node is in sync.
fn summary(node: &str, generation: &Generation, session: &Session) -> (v1::NodeStatus, bool) {
    let protocol = session.protocol();
    let in_sync = in_sync(generation, session, &protocol);
    let acked_version = protocol.acked_hash.version();
    let mut status = v1::NodeStatus {
        node_name: node.to_string(),
        in_cluster: generation.snapshot.nodes.contains_key(node),
        connected: session.is_connected(),
        dataplane: session.dataplanes().in_force.into(),
        dataplane_wanted: generation
            .snapshot
            .nodes
            .get(node)
            .and_then(|n| n.dataplane)
            .map_or(v1::Dataplane::Unspecified, |d| d.to_wire())
            .into(),
        agent_version: session.identity.agent_version.clone(),
        peer: session.peer.clone(),
        connected_since: Some(session.connected_since.into()),
        services: protocol.acked.len() as u32,
        last_nack: protocol.last_nack.as_ref().map(|n| v1::Nack {
            nonce: n.nonce.clone(),
            time: Some(n.time.into()),
            errors: n.errors.clone(),
        }),
        resources_sent: protocol.resources_sent,
        removals_sent: protocol.removals_sent,
        ..Default::default()
    };
    if in_sync {
        status.desired_version = acked_version.clone();
    } else {
        status.pending_changes = (protocol.pending + protocol.nacked.len()).max(1) as u32;
        let since = protocol
            .out_of_sync_since
            .unwrap_or(session.connected_since);
        status.lag = SystemTime::now()
            .duration_since(since)
            .unwrap_or_default()
            .try_into()
            .ok();
    }
    status.acked_version = acked_version;
    (status, in_sync)
}

fn list_nodes(
    generation: &Generation,
    sessions: &Sessions,
    coordination: Option<&Coordination>,
    page: PageRequest,
    caller: &Caller,
) -> Result<v1::ListNodesResponse, Status> {
    let names = node_names(generation, sessions, coordination);
    let mut out = Page::new(page.size);
    for node in names.range::<str, _>(page.range()) {
        caller.gone()?;
        if out.full() {
            out.more = true;
            break;
        }
        let status = status_of(node, generation, sessions, coordination, || {
            desired(generation, node)
        });
        if !out.push(node, status) {
            break;
        }
    }
    Ok(v1::ListNodesResponse {
        next_page_token: out.next_token(),
        nodes: out.items,
    })
}

fn get_node_state(
    generation: &Generation,
    sessions: &Sessions,
    coordination: Option<&Coordination>,
    node: &str,
    page: PageRequest,
    caller: &Caller,
) -> Result<v1::GetNodeStateResponse, Status> {
    let desired = desired(generation, node);
    caller.gone()?;
    let session = sessions.get(node).filter(|s| s.is_connected());
    let session = session.as_deref();
    let mut status = status_of(node, generation, sessions, coordination, || desired.clone());
    if status.desired_version.is_empty() {
        // Another replica registered it out of sync: the desired state is computed here.
        status.desired_version = state_version(desired.iter().map(|r| (&*r.name, r.version)));
    }
    let mut out = Page::new(page.size);
    let start = match &page.after {
        Some(after) => desired.partition_point(|r| *r.name <= **after),
        None => 0,
    };
    for resource in &desired[start..] {
        if !out.push(&resource.name, resource.decode()) {
            break;
        }
    }
    let next_page_token = out.next_token();
    let upper = match (&out.last, out.more) {
        (Some(last), true) => Bound::Included(last.as_str()),
        _ => Bound::Unbounded,
    };
    let lower = page.range().0;
    let acked_versions = session
        .map(|s| {
            s.protocol()
                .acked
                .entries()
                .into_iter()
                .filter(|(name, _)| RangeBounds::<str>::contains(&(lower, upper), &**name))
                .map(|(n, v)| (n.to_string(), format_version(v)))
                .collect()
        })
        .unwrap_or_default();
    Ok(v1::GetNodeStateResponse {
        status: Some(status),
        resources: out.items,
        acked_versions,
        next_page_token,
    })
}

fn get_service(
    generation: &Generation,
    sessions: &Sessions,
    key: &ServiceKey,
    page: PageRequest,
    caller: &Caller,
) -> Result<v1::GetServiceResponse, Status> {
    let name = key.to_string();
    let names = node_names(generation, sessions, None);
    let mut out = Page::new(page.size);
    for node in names.range::<str, _>(page.range()) {
        caller.gone()?;
        if out.full() {
            out.more = true;
            break;
        }
        let Some(resource) = generation.resource(&name, node) else {
            continue;
        };
        let acked_version = sessions
            .get(node)
            .and_then(|s| s.protocol().acked.get(name.as_str()))
            .map(format_version)
            .unwrap_or_default();
        let item = v1::NodeService {
            node_name: node.clone(),
            resource: Some(resource.decode()),
            acked_version,
        };
        if !out.push(node, item) {
            break;
        }
    }
    Ok(v1::GetServiceResponse {
        next_page_token: out.next_token(),
        nodes: out.items,
    })
}

/// A problem's place in the list, as its page token spells it.
fn problem_key(problem: &v1::SourceProblem) -> String {
    format!(
        "{}\u{1f}{}\u{1f}{}",
        problem.origin, problem.object, problem.message
    )
}

fn list_source_problems(
    problems: &ProblemsView,
    page: PageRequest,
) -> v1::ListSourceProblemsResponse {
    let mut all: Vec<(String, v1::SourceProblem)> = problems
        .list()
        .into_iter()
        .map(|p| {
            let problem = v1::SourceProblem {
                origin: p.origin,
                object: p.object.map(|o| o.to_string()).unwrap_or_default(),
                message: p.message,
                since: Some(p.since.into()),
            };
            (problem_key(&problem), problem)
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let start = match &page.after {
        Some(after) => all.partition_point(|(key, _)| key <= after),
        None => 0,
    };
    let mut out = Page::new(page.size);
    for (key, problem) in all.into_iter().skip(start) {
        if !out.push(&key, problem) {
            break;
        }
    }
    v1::ListSourceProblemsResponse {
        next_page_token: out.next_token(),
        problems: out.items,
    }
}

/// Checks a requested `node_name`: a DNS subdomain, or `INVALID_ARGUMENT` quoting it.
fn node_name(node: &str) -> Result<(), Status> {
    names::dns1123_subdomain(node).map_err(|reason| {
        Status::invalid_argument(format!("node_name {} {reason}", quote_bounded(node)))
    })
}

/// How long `GetNodeEffectiveState` waits for the agent's answer (it reads the whole
/// kernel: about a second for iptables-save at 10,000 Services).
pub const EFFECTIVE_STATE_WAIT: Duration = Duration::from_secs(15);

/// The answer to `GetNodeEffectiveState` from the agent's report.
fn effective_state_response(
    session: &Session,
    report: v1::EffectiveStateReport,
) -> Result<v1::GetNodeEffectiveStateResponse, Status> {
    if !report.error.is_empty() {
        return Err(Status::unavailable(format!(
            "the agent of node {} answered: {}",
            session.node,
            names::escape_bounded(&report.error, 1024)
        )));
    }
    Ok(v1::GetNodeEffectiveStateResponse {
        node_name: session.node.clone(),
        dataplane: report.dataplane,
        peer: session.peer.clone(),
        read_at: report.read_at,
        effective: report.effective,
        drift: report.drift,
        last_apply: report.last_apply,
        drift_repairs: report.drift_repairs,
        next_page_token: report.next_page_token,
    })
}

#[tonic::async_trait]
impl ControllerQuery for QueryService {
    async fn get_node_effective_state(
        &self,
        request: Request<v1::GetNodeEffectiveStateRequest>,
    ) -> Result<Response<v1::GetNodeEffectiveStateResponse>, Status> {
        // The kernel's objects are the operators' to read, not even the node's own.
        self.access.query(
            PeerInfo::of(&request).identity.as_deref(),
            "GetNodeEffectiveState",
        )?;
        let request = request.into_inner();
        let node = request.node_name;
        node_name(&node)?;
        // Checked here, as for every paged method; the agent reads it as a name.
        let page = PageRequest::new(request.page_size, request.page_token, 500, 5000)?;
        let session = self
            .sessions
            .get(&node)
            .filter(|s| s.is_connected())
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "no agent of node {node} is connected to this controller"
                ))
            })?;
        let answer = session
            .ask(v1::EffectiveStateQuery {
                query_id: 0,
                include_kernel_objects: request.include_kernel_objects,
                page_size: page.size as u32,
                page_token: page.after.unwrap_or_default(),
            })
            .map_err(|error| match error {
                AskError::Busy => Status::resource_exhausted(format!("node {node}: {error}")),
                AskError::Closed => Status::unavailable(format!("node {node}: {error}")),
            })?;
        let report = match tokio::time::timeout(EFFECTIVE_STATE_WAIT, answer).await {
            Ok(Ok(report)) => report,
            Ok(Err(_)) => {
                return Err(Status::unavailable(format!(
                    "the stream of node {node} ended before its agent answered"
                )));
            }
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "the agent of node {node} did not answer within {EFFECTIVE_STATE_WAIT:?} \
                     (agents older than this controller do not answer at all)"
                )));
            }
        };
        effective_state_response(&session, report).map(Response::new)
    }

    async fn list_nodes(
        &self,
        request: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        self.access
            .query(PeerInfo::of(&request).identity.as_deref(), "ListNodes")?;
        let request = request.into_inner();
        let page = PageRequest::new(request.page_size, request.page_token, 100, 500)?;
        let generation = self.generations.borrow().clone();
        let sessions = self.sessions.clone();
        let coordination = self.coordination.clone();
        let response = blocking(move |caller| {
            list_nodes(&generation, &sessions, coordination.as_ref(), page, &caller)
        })
        .await?;
        Ok(Response::new(response))
    }

    async fn get_node_state(
        &self,
        request: Request<v1::GetNodeStateRequest>,
    ) -> Result<Response<v1::GetNodeStateResponse>, Status> {
        let peer = PeerInfo::of(&request);
        let request = request.into_inner();
        let node = request.node_name;
        node_name(&node)?;
        self.access.query_node(peer.identity.as_deref(), &node)?;
        let page = PageRequest::new(request.page_size, request.page_token, 500, 5000)?;
        let generation = self.generations.borrow().clone();
        let known = self.sessions.get(&node).is_some()
            || self
                .coordination
                .as_ref()
                .is_some_and(|c| c.registered(&node).is_some());
        if !generation.snapshot.nodes.contains_key(&node) && !known {
            return Err(Status::not_found(format!(
                "node {node} is neither in the cluster nor connected"
            )));
        }
        let sessions = self.sessions.clone();
        let coordination = self.coordination.clone();
        let response = blocking(move |caller| {
            get_node_state(
                &generation,
                &sessions,
                coordination.as_ref(),
                &node,
                page,
                &caller,
            )
        })
        .await?;
        Ok(Response::new(response))
    }

    async fn get_service(
        &self,
        request: Request<v1::GetServiceRequest>,
    ) -> Result<Response<v1::GetServiceResponse>, Status> {
        self.access
            .query(PeerInfo::of(&request).identity.as_deref(), "GetService")?;
        let request = request.into_inner();
        for (field, value, check) in [
            (
                "namespace",
                &request.namespace,
                names::dns1123_label as fn(&str) -> _,
            ),
            ("name", &request.name, names::dns1035_label),
        ] {
            check(value).map_err(|reason| {
                Status::invalid_argument(format!("{field} {} {reason}", quote_bounded(value)))
            })?;
        }
        let page = PageRequest::new(request.page_size, request.page_token, 100, 1000)?;
        let key = ServiceKey::new(request.namespace, request.name);
        let generation = self.generations.borrow().clone();
        if !generation.snapshot.services.contains_key(&key) {
            return Err(Status::not_found(format!("service {key} does not exist")));
        }
        let sessions = self.sessions.clone();
        let response =
            blocking(move |caller| get_service(&generation, &sessions, &key, page, &caller))
                .await?;
        Ok(Response::new(response))
    }

    async fn list_source_problems(
        &self,
        request: Request<v1::ListSourceProblemsRequest>,
    ) -> Result<Response<v1::ListSourceProblemsResponse>, Status> {
        self.access.query(
            PeerInfo::of(&request).identity.as_deref(),
            "ListSourceProblems",
        )?;
        let request = request.into_inner();
        let page = PageRequest::new(request.page_size, request.page_token, 500, 5000)?;
        let problems = self.problems.clone();
        let response = blocking(move |_| Ok(list_source_problems(&problems, page))).await?;
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_requests_default_cap_and_refuse_oversized_tokens() {
        assert_eq!(
            PageRequest::new(0, String::new(), 100, 500).unwrap(),
            PageRequest {
                size: 100,
                after: None
            }
        );
        assert_eq!(
            PageRequest::new(10_000, "n".into(), 100, 500).unwrap().size,
            500
        );
        let error = PageRequest::new(1, "x".repeat(MAX_TOKEN + 1), 100, 500).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(error.message().len() < 100, "no echo: {}", error.message());
    }

    #[test]
    fn a_page_stops_at_its_size_or_byte_budget_and_always_holds_one_item() {
        let item = |n: usize| v1::SourceProblem {
            message: "x".repeat(n),
            ..Default::default()
        };
        let mut page = Page::new(2);
        assert!(page.push("a", item(1)));
        assert!(page.push("b", item(1)));
        assert!(!page.push("c", item(1)));
        assert_eq!(page.next_token(), "b");

        let mut page = Page::new(100);
        assert!(
            page.push("big", item(MAX_PAGE_BYTES + 10)),
            "one item always fits"
        );
        assert!(!page.push("next", item(1)));
        assert_eq!(page.next_token(), "big");

        let mut page = Page::new(100);
        assert!(page.push("a", item(MAX_PAGE_BYTES / 2)));
        assert!(
            !page.push("b", item(MAX_PAGE_BYTES / 2 + 100)),
            "over the budget"
        );
        assert_eq!(page.items.len(), 1);

        let mut page: Page<v1::SourceProblem> = Page::new(100);
        page.push("a", item(1));
        assert_eq!(page.next_token(), "", "the last page has no token");
    }
}
