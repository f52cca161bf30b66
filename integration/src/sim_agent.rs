//! A simulated agent: speaks the real `NodeStateDiscovery` protocol over a real tonic
//! client and keeps what it was sent in memory instead of programming a kernel.

use std::{collections::BTreeMap, collections::HashMap, time::Duration};

use anyhow::{Context, anyhow};
use switchyard_proto::v1::{
    self, NodeIdentity, NodeStateRequest, NodeStateResponse,
    node_state_discovery_client::NodeStateDiscoveryClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

/// One agent's end of a stream.
pub struct SimAgent {
    pub node: String,
    requests: mpsc::Sender<NodeStateRequest>,
    responses: Streaming<NodeStateResponse>,
    /// Resource name → (version, state) the agent holds.
    pub held: BTreeMap<String, (String, v1::ServiceState)>,
}

impl SimAgent {
    /// Connects a new channel and opens the stream for `node`.
    pub async fn connect(
        endpoint: &str,
        node: &str,
        held: HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(endpoint.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Self::open(channel, node, held).await
    }

    /// Opens the stream for `node` on an existing channel.
    pub async fn open(
        channel: Channel,
        node: &str,
        held: HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let first = NodeStateRequest {
            node: Some(NodeIdentity {
                node_name: node.into(),
                dataplane: v1::Dataplane::Iptables.into(),
                agent_version: "sim".into(),
            }),
            initial_resource_versions: held,
            ..Default::default()
        };
        Self::open_with(channel, first).await
    }

    /// Opens a stream whose first message is `first`, whatever it holds (a hostile
    /// peer's, in tests of what the controller refuses).
    pub async fn open_with(channel: Channel, first: NodeStateRequest) -> anyhow::Result<Self> {
        let node = first
            .node
            .as_ref()
            .map(|n| n.node_name.clone())
            .unwrap_or_default();
        let (requests, rx) = mpsc::channel(4);
        requests.send(first).await?;
        let responses = NodeStateDiscoveryClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .stream_node_state(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            node,
            requests,
            responses,
            held: BTreeMap::new(),
        })
    }

    /// The next response, or an error if none arrives within `wait`.
    pub async fn next(&mut self, wait: Duration) -> anyhow::Result<NodeStateResponse> {
        match tokio::time::timeout(wait, self.responses.message()).await {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => Err(anyhow!("{}: stream ended", self.node)),
            Ok(Err(status)) => {
                Err(anyhow::Error::from(status).context(format!("{}: stream failed", self.node)))
            }
            Err(_) => Err(anyhow!("{}: no response within {wait:?}", self.node)),
        }
    }

    /// Whether a response arrives within `wait` (consuming it).
    pub async fn receives_within(&mut self, wait: Duration) -> Option<NodeStateResponse> {
        self.next(wait).await.ok()
    }

    /// Applies a response to what the agent holds.
    pub fn apply(&mut self, response: &NodeStateResponse) {
        for resource in &response.resources {
            let state = resource.service.clone().unwrap_or_default();
            self.held
                .insert(resource.name.clone(), (resource.version.clone(), state));
        }
        for name in &response.removed_resources {
            self.held.remove(name);
        }
    }

    pub async fn ack(&self, nonce: &str) -> anyhow::Result<()> {
        self.answer(nonce, vec![]).await
    }

    pub async fn nack(&self, nonce: &str, errors: Vec<v1::ResourceError>) -> anyhow::Result<()> {
        self.answer(nonce, errors).await
    }

    async fn answer(&self, nonce: &str, errors: Vec<v1::ResourceError>) -> anyhow::Result<()> {
        let request = NodeStateRequest {
            response_nonce: nonce.into(),
            errors,
            ..Default::default()
        };
        self.requests.send(request).await.context("stream closed")
    }

    /// Receives, applies and ACKs one response.
    pub async fn sync(&mut self, wait: Duration) -> anyhow::Result<NodeStateResponse> {
        let response = self.next(wait).await?;
        self.apply(&response);
        self.ack(&response.nonce).await?;
        Ok(response)
    }

    /// Name → version of everything held, as sent on reconnect.
    pub fn versions(&self) -> HashMap<String, String> {
        self.held
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect()
    }
}
