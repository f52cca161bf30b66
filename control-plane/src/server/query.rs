//! The `ControllerQuery` service: nodes, their desired and acknowledged state, one
//! Service across nodes, and source problems, for people and scripts.

use std::{collections::BTreeSet, sync::Arc, time::SystemTime};

use sha2::{Digest, Sha256};
use switchyard_proto::{
    format_version,
    v1::{self, controller_query_server::ControllerQuery},
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::sessions::{Session, Sessions};
use crate::{
    hub::{EncodedResource, Generation},
    model::ServiceKey,
    store::ProblemsView,
};

#[derive(Clone, Debug)]
pub struct QueryService {
    generations: watch::Receiver<Arc<Generation>>,
    sessions: Sessions,
    problems: ProblemsView,
}

impl QueryService {
    pub fn new(
        generations: watch::Receiver<Arc<Generation>>,
        sessions: Sessions,
        problems: ProblemsView,
    ) -> Self {
        Self {
            generations,
            sessions,
            problems,
        }
    }

    /// Nodes in the cluster and nodes with an agent, in name order.
    fn node_names(&self, generation: &Generation) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = generation.snapshot.nodes.keys().cloned().collect();
        names.extend(self.sessions.all().into_iter().map(|s| s.node.clone()));
        names
    }
}

/// A version for a whole set of resources: hash of the sorted `name=version` lines.
fn state_version<'a>(resources: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    let mut pairs: Vec<_> = resources.into_iter().collect();
    pairs.sort_unstable();
    let mut hash = Sha256::new();
    for (name, version) in pairs {
        hash.update(format!("{name}={version:016x}\n"));
    }
    let digest = hash.finalize();
    format_version(u64::from_be_bytes(
        digest[..8].try_into().expect("32-byte digest"),
    ))
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
    status.connected = session.is_connected();
    status.dataplane = session.dataplanes().in_force.into();
    status.agent_version = session.identity.agent_version.clone();
    status.peer = session.peer.clone();
    status.connected_since = Some(session.connected_since.into());
    let protocol = session.protocol();
    status.resources_sent = protocol.resources_sent;
    status.removals_sent = protocol.removals_sent;
    let stale = desired
        .iter()
        .filter(|r| protocol.acked.get(&r.name) != Some(&r.version))
        .count();
    let desired_names: BTreeSet<&str> = desired.iter().map(|r| &*r.name).collect();
    let extra = protocol
        .acked
        .keys()
        .filter(|n| !desired_names.contains(&***n))
        .count();
    status.pending_changes = (stale + extra) as u32;
    if !protocol.acked.is_empty() || desired.is_empty() {
        status.acked_version = if status.pending_changes == 0 {
            desired_version
        } else {
            state_version(protocol.acked.iter().map(|(n, v)| (&**n, *v)))
        };
    }
    if status.pending_changes > 0 {
        let since = protocol
            .out_of_sync_since
            .unwrap_or(session.connected_since);
        let lag = SystemTime::now().duration_since(since).unwrap_or_default();
        status.lag = lag.try_into().ok();
    }
    status.last_nack = protocol.last_nack.as_ref().map(|n| v1::Nack {
        nonce: n.nonce.clone(),
        time: Some(n.time.into()),
        errors: n.errors.clone(),
    });
    status
}

#[tonic::async_trait]
impl ControllerQuery for QueryService {
    async fn list_nodes(
        &self,
        _: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        let generation = self.generations.borrow().clone();
        let nodes = self
            .node_names(&generation)
            .into_iter()
            .map(|node| {
                let desired = generation.node_resources(&node);
                node_status(
                    &node,
                    &generation,
                    self.sessions.get(&node).as_deref(),
                    &desired,
                )
            })
            .collect();
        Ok(Response::new(v1::ListNodesResponse { nodes }))
    }

    async fn get_node_state(
        &self,
        request: Request<v1::GetNodeStateRequest>,
    ) -> Result<Response<v1::GetNodeStateResponse>, Status> {
        let node = request.into_inner().node_name;
        let generation = self.generations.borrow().clone();
        let session = self.sessions.get(&node);
        if !generation.snapshot.nodes.contains_key(&node) && session.is_none() {
            return Err(Status::not_found(format!(
                "node {node:?} is neither in the cluster nor connected"
            )));
        }
        let desired = generation.node_resources(&node);
        let status = node_status(&node, &generation, session.as_deref(), &desired);
        let acked_versions = session
            .map(|s| {
                s.protocol()
                    .acked
                    .iter()
                    .map(|(n, v)| (n.to_string(), format_version(*v)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(v1::GetNodeStateResponse {
            status: Some(status),
            resources: desired.iter().map(|r| r.decode()).collect(),
            acked_versions,
        }))
    }

    async fn get_service(
        &self,
        request: Request<v1::GetServiceRequest>,
    ) -> Result<Response<v1::GetServiceResponse>, Status> {
        let request = request.into_inner();
        let key = ServiceKey::new(request.namespace, request.name);
        let generation = self.generations.borrow().clone();
        if !generation.snapshot.services.contains_key(&key) {
            return Err(Status::not_found(format!("service {key} does not exist")));
        }
        let name = key.to_string();
        let nodes = self
            .node_names(&generation)
            .into_iter()
            .filter_map(|node| {
                let resource = generation.resource(&name, &node)?;
                let acked_version = self
                    .sessions
                    .get(&node)
                    .and_then(|s| s.protocol().acked.get(name.as_str()).copied())
                    .map(format_version)
                    .unwrap_or_default();
                Some(v1::NodeService {
                    node_name: node,
                    resource: Some(resource.decode()),
                    acked_version,
                })
            })
            .collect();
        Ok(Response::new(v1::GetServiceResponse { nodes }))
    }

    async fn list_source_problems(
        &self,
        _: Request<v1::ListSourceProblemsRequest>,
    ) -> Result<Response<v1::ListSourceProblemsResponse>, Status> {
        let problems = self
            .problems
            .list()
            .into_iter()
            .map(|p| v1::SourceProblem {
                origin: p.origin,
                object: p.object.map(|o| o.to_string()).unwrap_or_default(),
                message: p.message,
                since: Some(p.since.into()),
            })
            .collect();
        Ok(Response::new(v1::ListSourceProblemsResponse { problems }))
    }
}
