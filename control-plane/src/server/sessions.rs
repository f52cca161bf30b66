//! What the controller knows of each node's agent: identity, what it acknowledged,
//! its last NACK. Written by the node's stream, read by the query API.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use switchyard_proto::v1;
use tokio::sync::watch;

/// The last NACK an agent sent.
#[derive(Clone, Debug)]
pub struct Nack {
    pub nonce: String,
    pub time: SystemTime,
    pub errors: Vec<v1::ResourceError>,
}

/// Protocol state of one node, shared between its stream and the query API.
#[derive(Debug, Default)]
pub struct NodeProtocol {
    /// Resource name → version the agent holds, as acknowledged (or declared on connect).
    pub acked: foldhash::HashMap<Arc<str>, u64>,
    /// Versions the agent rejected; not resent until the desired version moves on.
    pub nacked: foldhash::HashMap<Arc<str>, u64>,
    pub last_nack: Option<Nack>,
    /// Since when the agent has been missing some desired change; `None` when in sync.
    pub out_of_sync_since: Option<SystemTime>,
    /// Upserted resources and removals sent on this stream.
    pub resources_sent: u64,
    pub removals_sent: u64,
}

/// One agent's stream for one node.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub node: String,
    pub identity: v1::NodeIdentity,
    pub peer: String,
    pub connected_since: SystemTime,
    connected: Mutex<bool>,
    protocol: Mutex<NodeProtocol>,
    /// The dataplanes the agent programs with now and the Node's label asks for.
    dataplanes: Mutex<Dataplanes>,
    /// Set to true when a newer stream for the same node takes over.
    superseded: watch::Sender<Option<String>>,
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
        *self.connected.lock().unwrap_or_else(|e| e.into_inner())
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
    /// Registers a new stream for a node; an older connected stream for the same node is
    /// told to close.
    pub fn open(
        &self,
        identity: v1::NodeIdentity,
        peer: String,
        acked: foldhash::HashMap<Arc<str>, u64>,
    ) -> Arc<Session> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.next_id += 1;
        let node = identity.node_name.clone();
        let in_force = identity.dataplane();
        let session = Arc::new(Session {
            id: inner.next_id,
            node: node.clone(),
            identity,
            peer: peer.clone(),
            connected_since: SystemTime::now(),
            connected: Mutex::new(true),
            protocol: Mutex::new(NodeProtocol {
                acked,
                ..Default::default()
            }),
            dataplanes: Mutex::new(Dataplanes {
                in_force,
                wanted: v1::Dataplane::Unspecified,
            }),
            superseded: watch::Sender::new(None),
        });
        if let Some(old) = inner.by_node.insert(node, session.clone()) {
            old.superseded.send_replace(Some(peer));
        }
        session
    }

    /// Marks a stream closed; its acknowledged state stays visible until the node reconnects.
    pub fn close(&self, session: &Session) {
        *session.connected.lock().unwrap_or_else(|e| e.into_inner()) = false;
    }

    pub fn get(&self, node: &str) -> Option<Arc<Session>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_node
            .get(node)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_node
            .values()
            .cloned()
            .collect()
    }
}
