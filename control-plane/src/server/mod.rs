//! The controller's gRPC endpoint: the delta stream for agents, the query API, gRPC
//! health and server reflection (v1 and v1alpha) on one listener, optionally over TLS
//! with client certificates; and the plain HTTP endpoint for probes ([`http`]).
//!
//! Entry point: [`serve`] with [`ServerOptions`].

use std::{future::Future, time::Duration};

use switchyard_proto::{encoded, v1};
use tokio::{net::TcpListener, sync::watch};

use crate::hub::HubHandle;

pub mod delta;
pub mod http;
pub mod identity;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod query;
pub mod sessions;
pub mod tls;

pub use identity::Access;
pub use metrics::{ControllerMetrics, SharedMetrics};
pub use sessions::Sessions;
pub use tls::{ServerTls, TlsFiles};

/// Largest request an agent may send (a stream's first message declares every resource
/// it holds: about 50,000 typical names fit).
pub const MAX_AGENT_MESSAGE: usize = 4 << 20;
/// Largest query request (they hold a name and a page token).
pub const MAX_QUERY_MESSAGE: usize = 64 << 10;
/// Most HTTP/2 streams one connection may open at once (an agent uses one).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Most unary calls in progress per connection; more are refused at once.
pub const MAX_CALLS_PER_CONNECTION: usize = 32;
/// Most query calls running at once across all connections.
pub const MAX_QUERIES: usize = 4;
/// How long any call may take to answer (a stream's call answers once the agent has
/// named its node, which it must do within 30 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest HTTP/2 header block accepted.
pub const MAX_HEADER_BYTES: u32 = 16 << 10;

/// How the gRPC server runs and what it allows.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// TLS, with or without client certificates; `None`: plain TCP.
    pub tls: Option<ServerTls>,
    /// How often the TLS files are checked for change besides file-system events.
    pub tls_poll: Duration,
    /// Who may stream and query; follows `tls` (see [`ServerOptions::with_tls`]).
    pub access: Access,
    /// Most agent streams one peer (a certificate, or an address without one) may hold.
    pub max_streams_per_peer: usize,
    /// How long a closed session of a node that is not in the cluster stays listed.
    pub session_grace: Duration,
    /// Where the agent streams are counted (what `/metrics` exports).
    pub metrics: SharedMetrics,
    /// With replicas (`--etcd-endpoints`): the registry the query API answers every
    /// replica's nodes from.
    pub coordination: Option<crate::coordination::Coordination>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            tls: None,
            tls_poll: Duration::from_secs(60),
            access: Access::open(),
            max_streams_per_peer: 16,
            session_grace: Duration::from_secs(10 * 60),
            metrics: SharedMetrics::default(),
            coordination: None,
        }
    }
}

impl ServerOptions {
    /// Serves over `tls`; with client certificates required, queries need `operator_group`.
    pub fn with_tls(mut self, tls: ServerTls, operator_group: impl Into<String>) -> Self {
        self.access = if tls.requires_client_certificates() {
            Access::identified(operator_group)
        } else {
            Access::open()
        };
        self.tls = Some(tls);
        self
    }
}

/// Longest a shutdown waits for agent streams to end before closing their connections.
const STREAMS_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Serves every controller service on `listener` until `shutdown` resolves; then every
/// agent stream is closed with `UNAVAILABLE` and the server returns once connections
/// have drained (callers bound that wait: an agent may not read its close).
pub async fn serve(
    listener: TcpListener,
    hub: HubHandle,
    sessions: Sessions,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (stop, stopped) = watch::channel(false);
    let delta = delta::DeltaService::new(
        hub.generations.clone(),
        sessions.clone(),
        hub.ready.clone(),
        options.access.clone(),
        limits::StreamSlots::new(options.max_streams_per_peer),
        stopped,
        options.metrics.clone(),
    );
    let query = query::QueryService::new(
        hub.generations.clone(),
        sessions.clone(),
        hub.problems,
        options.access.clone(),
    )
    .with_coordination(options.coordination.clone());

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

    let _tls_watch = options
        .tls
        .as_ref()
        .map(|tls| AbortOnDrop(tls.watch(options.tls_poll)));
    let open_streams = sessions.clone();
    let _janitor = AbortOnDrop(tokio::spawn(forget_stale_sessions(
        sessions,
        hub.generations,
        options.session_grace,
    )));

    let incoming = listener::incoming(listener, options.tls.clone());
    tonic::transport::Server::builder()
        .timeout(CALL_TIMEOUT)
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
        .load_shed(true)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_BYTES)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(
            encoded::node_state_discovery_server::NodeStateDiscoveryServer::new(delta)
                .max_decoding_message_size(MAX_AGENT_MESSAGE),
        )
        .add_service(limits::Gated::new(
            v1::controller_query_server::ControllerQueryServer::new(query)
                .max_decoding_message_size(MAX_QUERY_MESSAGE),
            MAX_QUERIES,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            stop.send_replace(true);
            // The connections close once this returns. An agent that writes to its
            // connection after the close (an ACK, a window update) reads a broken pipe
            // instead of the UNAVAILABLE its stream was given, so first let every stream
            // end and its status go out.
            let deadline = tokio::time::Instant::now() + STREAMS_CLOSE_WAIT;
            while open_streams.all().iter().any(|s| s.is_connected())
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        })
        .await
}

/// Forgets closed sessions of nodes outside the cluster after `grace`, checking a few
/// times per grace period.
async fn forget_stale_sessions(
    sessions: Sessions,
    generations: watch::Receiver<std::sync::Arc<crate::hub::Generation>>,
    grace: Duration,
) {
    let every = (grace / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        let generation = generations.borrow().clone();
        let forgotten = sessions.forget_stale(std::time::SystemTime::now(), grace, |node| {
            generation.snapshot.nodes.contains_key(node)
        });
        if !forgotten.is_empty() {
            tracing::info!(
                count = forgotten.len(),
                first = %forgotten[0],
                "forgot closed sessions of nodes not in the cluster"
            );
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
