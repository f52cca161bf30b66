//! The agent's local query API (`switchyard.v1.AgentQuery`): what the node should hold,
//! what the kernel holds, the drift between them and how the last apply went; served
//! with gRPC health and server reflection (v1 and v1alpha) on one listener.

use std::sync::Arc;

use switchyard_proto::{format_version, v1};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::{dataplane::Dataplane, engine::Engine, http::AbortOnDrop};

/// Serves `GetAgentState` from the runtime's engine.
pub struct QueryService<D> {
    engine: Arc<Engine<D>>,
    node_name: String,
    controller: String,
}

impl<D: Dataplane> QueryService<D> {
    pub(crate) fn new(engine: Arc<Engine<D>>, node_name: String, controller: String) -> Self {
        Self {
            engine,
            node_name,
            controller,
        }
    }
}

#[tonic::async_trait]
impl<D: Dataplane> v1::agent_query_server::AgentQuery for QueryService<D> {
    async fn get_agent_state(
        &self,
        request: Request<v1::GetAgentStateRequest>,
    ) -> Result<Response<v1::GetAgentStateResponse>, Status> {
        let include_objects = request.into_inner().include_kernel_objects;
        let view = self.engine.view();
        let (kernel, drift) = self
            .engine
            .drift()
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the kernel back: {e}")))?;
        let desired = view
            .desired
            .iter()
            .map(|(name, service)| v1::Resource {
                name: name.clone(),
                version: format_version(service.version),
                service: Some(service.state.as_ref().into()),
            })
            .collect();
        let effective = kernel
            .into_iter()
            .map(|(name, programmed)| v1::EffectiveService {
                name,
                version: programmed.version.map(format_version).unwrap_or_default(),
                kernel_objects: if include_objects {
                    programmed.kernel_objects
                } else {
                    Vec::new()
                },
            })
            .collect();
        let drift = drift
            .into_iter()
            .map(|d| v1::Drift {
                name: d.name,
                kind: d.kind.to_string(),
                detail: d.detail,
            })
            .collect();
        let last_apply = view.last_apply.map(|a| v1::ApplyTimings {
            at: Some(a.at.into()),
            duration: prost_types::Duration::try_from(a.duration).ok(),
            resources: a.resources,
            full_sync: a.full_sync,
        });
        Ok(Response::new(v1::GetAgentStateResponse {
            node_name: self.node_name.clone(),
            dataplane: self.engine.kind().into(),
            controller: self.controller.clone(),
            connected: view.connected,
            desired,
            effective,
            drift,
            last_apply,
            drift_repairs: view.drift_repairs,
        }))
    }
}

/// Serves the query API, gRPC health and reflection on `listener` until the guard drops.
pub(crate) async fn serve<D: Dataplane>(
    listener: TcpListener,
    service: QueryService<D>,
) -> AbortOnDrop {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<v1::agent_query_server::AgentQueryServer<QueryService<D>>>()
        .await;
    let reflection_v1 = switchyard_proto::reflection::v1();
    let reflection_v1alpha = switchyard_proto::reflection::v1alpha();
    let router = tonic::transport::Server::builder()
        .add_service(v1::agent_query_server::AgentQueryServer::new(service))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    AbortOnDrop(tokio::spawn(async move {
        // Keep the reporter alive for as long as the server runs.
        let _health = health;
        if let Err(error) = router
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
        {
            tracing::error!(%error, "the query API stopped");
        }
    }))
}
