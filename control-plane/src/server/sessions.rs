//! What the controller knows of each node's agent: identity, what it acknowledged,
//! its last NACK. Written by the node's stream, read by the query API.
//!
//! # Bounds
//! A stream's declarations and acknowledgements are dropped when it closes: a closed
//! session keeps only a summary (the version of what the agent held, counters, its last
//! NACK, already bounded). Closed sessions of nodes that are not in the cluster are
//! forgotten after a grace period ([`Sessions::forget_stale`]), and never more than
//! [`MAX_FORGETTABLE`] of them are kept, so peers inventing node names cannot grow the
//! controller.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use switchyard_proto::{format_version, v1};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::name_ids::HeldVersions;

/// Most closed sessions of nodes outside the cluster kept at once; the oldest go first.
pub const MAX_FORGETTABLE: usize = 4096;
/// Most questions queued for one agent's stream; more are refused at once.
pub const MAX_QUEUED_ASKS: usize = 4;

/// A question for a node's agent, asked over its stream (`GetNodeEffectiveState`), and
/// where the answer goes. The stream sets `query_id`.
#[derive(Debug)]
pub struct Ask {
    pub query: v1::EffectiveStateQuery,
    pub reply: oneshot::Sender<v1::EffectiveStateReport>,
}

/// Why a question could not be put to an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    #[error("the agent's stream has closed")]
    Closed,
    #[error("the agent already has {MAX_QUEUED_ASKS} questions queued")]
    Busy,
}

/// The last NACK an agent sent (bounded by the stream before it gets here).
#[derive(Clone, Debug)]
pub struct Nack {
    pub nonce: String,
    pub time: SystemTime,
    pub errors: Vec<v1::ResourceError>,
    /// Errors left out beyond those kept.
    pub omitted: usize,
}

/// Protocol state of one node, shared between its stream and the query API.
#[derive(Debug, Default)]
pub struct NodeProtocol {
    /// Resource name → version the agent holds, as acknowledged (or declared on connect).
    /// Emptied when the stream closes. Changed through [`NodeProtocol::ack`] and
    /// [`NodeProtocol::unack`], which keep `acked_hash` with it.
    pub acked: HeldVersions,
    /// [`StateHash`] of `acked`.
    pub acked_hash: StateHash,
    /// Services queued for the node or in flight to it, as its stream last counted them.
    pub pending: usize,
    /// The generation whose changes the stream last took in (with `pending`).
    pub generation: u64,
    /// Versions the agent rejected; not resent until the desired version moves on.
    /// Emptied when the stream closes.
    pub nacked: foldhash::HashMap<Arc<str>, u64>,
    pub last_nack: Option<Nack>,
    /// Since when the agent has been missing some desired change; `None` when in sync.
    pub out_of_sync_since: Option<SystemTime>,
    /// Upserted resources and removals sent on this stream.
    pub resources_sent: u64,
    pub removals_sent: u64,
    /// Set when the stream closed: what the agent held then.
    pub closed: Option<Closed>,
}

impl NodeProtocol {
    /// Records that the agent holds `version` of `name`, whose id in the table of
    /// `acked` is `id` if the caller knows it.
    pub fn ack(&mut self, name: Arc<str>, id: Option<u32>, version: u64) {
        self.acked_hash.add(&name, version);
        if let Some(old) = self.acked.insert(name.clone(), id, version) {
            self.acked_hash.remove(&name, old);
        }
    }

    /// Records that the agent no longer holds `name`.
    pub fn unack(&mut self, name: &str) {
        if let Some(old) = self.acked.remove(name) {
            self.acked_hash.remove(name, old);
        }
    }
}

/// What a closed stream leaves behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub at: SystemTime,
    /// [`state_version`] of what the agent held.
    pub acked_version: String,
    pub acked_resources: usize,
}

/// A version for a whole set of resources: [`StateHash`] of its `name`/`version` pairs.
pub fn state_version<'a>(resources: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let mut hash = StateHash::default();
    for (name, version) in resources {
        hash.add(name, version);
    }
    hash.version()
}

/// The version of a set of resources that follows each change in O(1): the wrapping sum
/// of a hash of every `name`/`version` pair, so adding or removing a resource is one
/// addition or subtraction, the order does not matter, and equal sets give equal
/// versions in every replica (fixed seed). What the query API shows as `desired_version`
/// and `acked_version`; a stream keeps its node's acknowledged one up to date.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateHash(u64);

impl StateHash {
    fn term(name: &str, version: u64) -> u64 {
        use std::hash::BuildHasher;
        foldhash::quality::FixedState::with_seed(0x7377_7974_6172_6473).hash_one((name, version))
    }

    pub fn add(&mut self, name: &str, version: u64) {
        self.0 = self.0.wrapping_add(Self::term(name, version));
    }

    pub fn remove(&mut self, name: &str, version: u64) {
        self.0 = self.0.wrapping_sub(Self::term(name, version));
    }

    pub fn version(&self) -> String {
        format_version(self.0)
    }
}

/// One agent's stream for one node.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub node: String,
    pub identity: v1::NodeIdentity,
    pub peer: String,
    pub connected_since: SystemTime,
    /// Apart from `protocol`, so it can be read while `protocol` is held.
    connected: AtomicBool,
    protocol: Mutex<NodeProtocol>,
    /// The dataplanes the agent programs with now and the Node's label asks for.
    dataplanes: Mutex<Dataplanes>,
    /// Set to the newer stream's peer when a newer stream for the same node takes over.
    superseded: watch::Sender<Option<String>>,
    /// Questions for the agent, forwarded by the stream's task.
    asks: mpsc::Sender<Ask>,
    /// Notified to end the stream so the agent moves to another replica.
    shed: Notify,
}

/// A node's dataplane as its agent reports it and as its label asks for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dataplanes {
    /// The agent's dataplane now (its identity's, then what its answers report).
    pub in_force: v1::Dataplane,
    /// The `switchyard.io/dataplane` label as last sent.
    pub wanted: v1::Dataplane,
}

impl Session {
    /// The dataplanes in force and wanted.
    pub fn dataplanes(&self) -> Dataplanes {
        *self.dataplanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what the agent reports programming with (unspecified: no news).
    pub fn set_dataplane_in_force(&self, dataplane: v1::Dataplane) {
        if dataplane != v1::Dataplane::Unspecified {
            self.dataplanes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .in_force = dataplane;
        }
    }

    /// Records the label sent to the agent.
    pub fn set_dataplane_wanted(&self, dataplane: v1::Dataplane) {
        self.dataplanes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wanted = dataplane;
    }

    pub fn protocol(&self) -> MutexGuard<'_, NodeProtocol> {
        self.protocol.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Puts `query` to the agent over its stream; the receiver resolves with its answer,
    /// or fails when the stream ends first.
    pub fn ask(
        &self,
        query: v1::EffectiveStateQuery,
    ) -> Result<oneshot::Receiver<v1::EffectiveStateReport>, AskError> {
        let (reply, answer) = oneshot::channel();
        self.asks
            .try_send(Ask { query, reply })
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => AskError::Busy,
                mpsc::error::TrySendError::Closed(_) => AskError::Closed,
            })?;
        Ok(answer)
    }

    /// Ends the stream with `UNAVAILABLE` and the reconnect-elsewhere trailer, so the
    /// agent moves to another replica (load balancing).
    pub fn shed(&self) {
        self.shed.notify_one();
    }

    /// Resolves once [`Session::shed`] was called.
    pub async fn shed_requested(&self) {
        self.shed.notified().await
    }

    /// Resolves with the new stream's peer once a newer stream takes this node over.
    pub fn superseded(&self) -> watch::Receiver<Option<String>> {
        self.superseded.subscribe()
    }
}

/// Every node's latest session, connected or not.
#[derive(Clone, Debug, Default)]
pub struct Sessions {
    inner: Arc<Mutex<SessionsInner>>,
}

#[derive(Debug, Default)]
struct SessionsInner {
    next_id: u64,
    by_node: HashMap<String, Arc<Session>>,
}

impl Sessions {
    fn inner(&self) -> MutexGuard<'_, SessionsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new stream for a node; an older connected stream for the same node is
    /// told to close. The receiver holds the questions put to the agent
    /// ([`Session::ask`]), for the stream to forward.
    pub fn open(
        &self,
        identity: v1::NodeIdentity,
        peer: String,
        acked: HeldVersions,
    ) -> (Arc<Session>, mpsc::Receiver<Ask>) {
        let (asks, asked) = mpsc::channel(MAX_QUEUED_ASKS);
        let mut inner = self.inner();
        inner.next_id += 1;
        let node = identity.node_name.clone();
        let in_force = identity.dataplane();
        let session = Arc::new(Session {
            id: inner.next_id,
            node: node.clone(),
            identity,
            peer: peer.clone(),
            connected_since: SystemTime::now(),
            connected: AtomicBool::new(true),
            protocol: Mutex::new(NodeProtocol {
                acked_hash: acked.entries().into_iter().fold(
                    StateHash::default(),
                    |mut hash, (name, version)| {
                        hash.add(&name, version);
                        hash
                    },
                ),
                acked,
                ..Default::default()
            }),
            dataplanes: Mutex::new(Dataplanes {
                in_force,
                wanted: v1::Dataplane::Unspecified,
            }),
            superseded: watch::Sender::new(None),
            asks,
            shed: Notify::new(),
        });
        if let Some(old) = inner.by_node.insert(node, session.clone()) {
            old.superseded.send_replace(Some(peer));
        }
        (session, asked)
    }

    /// Marks a stream closed and drops what it declared and acknowledged, keeping a
    /// summary for the query API until the node reconnects.
    pub fn close(&self, session: &Session) {
        let mut protocol = session.protocol();
        let acked_version = protocol.acked_hash.version();
        protocol.closed = Some(Closed {
            at: SystemTime::now(),
            acked_version,
            acked_resources: protocol.acked.len(),
        });
        protocol.acked.release();
        protocol.acked_hash = StateHash::default();
        protocol.nacked = Default::default();
        protocol.pending = 0;
        session.connected.store(false, Ordering::Release);
    }

    pub fn get(&self, node: &str) -> Option<Arc<Session>> {
        self.inner().by_node.get(node).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.inner().by_node.values().cloned().collect()
    }

    /// How many sessions are kept, connected or not.
    pub fn len(&self) -> usize {
        self.inner().by_node.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets closed sessions of nodes not in the cluster (`in_cluster` says which are)
    /// once they have been closed for `grace`, and the oldest beyond
    /// [`MAX_FORGETTABLE`]. Returns the nodes forgotten.
    pub fn forget_stale(
        &self,
        now: SystemTime,
        grace: Duration,
        in_cluster: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut inner = self.inner();
        let mut forgettable: Vec<(SystemTime, String)> = inner
            .by_node
            .iter()
            .filter(|(node, _)| !in_cluster(node))
            .filter_map(|(node, session)| {
                let closed_at = session.protocol().closed.as_ref()?.at;
                Some((closed_at, node.clone()))
            })
            .collect();
        forgettable.sort();
        let excess = forgettable.len().saturating_sub(MAX_FORGETTABLE);
        let forgotten: Vec<String> = forgettable
            .into_iter()
            .enumerate()
            .filter(|(i, (closed_at, _))| {
                *i < excess || now.duration_since(*closed_at).unwrap_or_default() >= grace
            })
            .map(|(_, (_, node))| node)
            .collect();
        for node in &forgotten {
            inner.by_node.remove(node);
        }
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(node: &str) -> v1::NodeIdentity {
        v1::NodeIdentity {
            node_name: node.into(),
            ..Default::default()
        }
    }

    fn declared(n: usize) -> HeldVersions {
        let table = Arc::default();
        HeldVersions::from_declared(
            &table,
            (0..n).map(|i| (Arc::from(format!("ns/svc-{i}")), i as u64)),
        )
    }

    #[test]
    fn a_closed_session_keeps_a_summary_and_drops_what_the_peer_declared() {
        let sessions = Sessions::default();
        let (session, _asked) = sessions.open(identity("node-a"), "peer".into(), declared(10_000));
        let expected = state_version(
            session
                .protocol()
                .acked
                .entries()
                .iter()
                .map(|(n, v)| (&**n, *v))
                .collect::<Vec<_>>(),
        );
        sessions.close(&session);
        let protocol = session.protocol();
        assert!(protocol.acked.is_empty() && protocol.acked.reserved() == 0);
        assert!(protocol.nacked.capacity() == 0);
        let closed = protocol.closed.as_ref().unwrap();
        assert_eq!(closed.acked_version, expected);
        assert_eq!(closed.acked_resources, 10_000);
        assert!(
            !session.is_connected(),
            "readable while the protocol is held"
        );
    }

    #[test]
    fn closed_sessions_of_nodes_outside_the_cluster_are_forgotten_after_the_grace_period() {
        let sessions = Sessions::default();
        for node in ["gone", "member", "live"] {
            let (session, _asked) = sessions.open(identity(node), "peer".into(), declared(1));
            if node != "live" {
                sessions.close(&session);
            }
        }
        let grace = Duration::from_secs(60);
        let now = SystemTime::now();
        let outside = |node: &str| node == "member";
        assert!(
            sessions.forget_stale(now, grace, outside).is_empty(),
            "within grace"
        );
        let later = now + grace + Duration::from_secs(1);
        assert_eq!(sessions.forget_stale(later, grace, outside), ["gone"]);
        let mut left: Vec<_> = sessions.all().iter().map(|s| s.node.clone()).collect();
        left.sort();
        assert_eq!(
            left,
            ["live", "member"],
            "connected and in-cluster sessions stay"
        );
    }

    #[test]
    fn no_more_than_the_cap_of_forgettable_sessions_is_kept() {
        let sessions = Sessions::default();
        for i in 0..MAX_FORGETTABLE + 10 {
            let (session, _asked) =
                sessions.open(identity(&format!("n{i}")), "peer".into(), declared(0));
            sessions.close(&session);
        }
        let forgotten =
            sessions.forget_stale(SystemTime::now(), Duration::from_secs(3600), |_| false);
        assert_eq!(forgotten.len(), 10);
        assert_eq!(sessions.len(), MAX_FORGETTABLE);
    }

    #[test]
    fn a_newer_stream_supersedes_the_older_one() {
        let sessions = Sessions::default();
        let (old, _asked) = sessions.open(identity("node-a"), "old".into(), declared(0));
        let superseded = old.superseded();
        sessions.open(identity("node-a"), "new".into(), declared(0));
        assert_eq!(superseded.borrow().as_deref(), Some("new"));
        assert_eq!(sessions.get("node-a").unwrap().peer, "new");
    }
}
