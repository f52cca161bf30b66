//! The controller's gRPC endpoint: the delta stream for agents, the query API, gRPC
//! health and server reflection (v1 and v1alpha) on one listener.

use std::future::Future;

use switchyard_proto::{encoded, v1};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::hub::HubHandle;

pub mod delta;
pub mod query;
pub mod sessions;

pub use sessions::Sessions;

/// Serves every controller service on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    hub: HubHandle,
    sessions: Sessions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let delta = delta::DeltaService::new(hub.generations.clone(), sessions.clone());
    let query = query::QueryService::new(hub.generations, sessions, hub.problems);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<v1::controller_query_server::ControllerQueryServer<query::QueryService>>()
        .await;
    health
        .set_service_status(
            "switchyard.v1.NodeStateDiscovery",
            tonic_health::ServingStatus::Serving,
        )
        .await;

    let reflection_v1 = switchyard_proto::reflection::v1();
    let reflection_v1alpha = switchyard_proto::reflection::v1alpha();

    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(encoded::node_state_discovery_server::NodeStateDiscoveryServer::new(delta))
        .add_service(v1::controller_query_server::ControllerQueryServer::new(
            query,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
