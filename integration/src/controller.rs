//! Runs the real controller (hub + gRPC server) in-process on `127.0.0.1:0`, fed by the
//! test through the same update channel a source uses.

use std::{net::SocketAddr, time::SystemTime};

use switchyard_controller::{
    compute::ComputeOptions,
    hub::{Hub, HubHandle},
    model::Object,
    server::{self, ServerOptions, Sessions},
    sources::{StoreSender, StoreUpdate},
};
use switchyard_controller::{
    coordination::{Coordination, EtcdOptions, events::Reporter},
    server::metrics::CoordinationMetrics,
};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};

/// A running controller; shuts down when dropped.
pub struct TestController {
    pub address: SocketAddr,
    pub updates: StoreSender,
    pub hub: HubHandle,
    /// What the server knows of each node's stream (what the query API reports).
    pub sessions: Sessions,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    /// A replica's coordination through etcd; aborted when dropped, as a crash leaves it
    /// (the lease expires rather than being revoked).
    coordination: Option<(JoinHandle<()>, watch::Sender<bool>)>,
    /// A replica's view of the registry and its leadership.
    pub replica: Option<Coordination>,
}

impl TestController {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ComputeOptions::default()).await
    }

    pub async fn start_with(options: ComputeOptions) -> anyhow::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?, options).await
    }

    /// Serves on a listener bound elsewhere, e.g. inside a test network namespace
    /// (`Netns::tcp_listener`), so an agent there reaches the controller on its own
    /// loopback.
    pub async fn start_on(listener: TcpListener, options: ComputeOptions) -> anyhow::Result<Self> {
        Self::start_with_server(listener, options, Self::server_options()).await
    }

    /// The server options tests use: every simulated agent connects from 127.0.0.1, so
    /// the per-peer stream limit is lifted.
    pub fn server_options() -> ServerOptions {
        ServerOptions {
            max_streams_per_peer: usize::MAX,
            ..ServerOptions::default()
        }
    }

    /// Serves with `server` options (TLS, limits). The source counts as synced from the
    /// start: the test feeds objects through [`TestController::replace`].
    pub async fn start_with_server(
        listener: TcpListener,
        options: ComputeOptions,
        server: ServerOptions,
    ) -> anyhow::Result<Self> {
        let controller = Self::start_unsynced(listener, options, server).await?;
        controller.send(StoreUpdate::Synced).await;
        Ok(controller)
    }

    /// Like [`TestController::start_with_server`], but no stream is served anything
    /// until the test sends [`StoreUpdate::Synced`], as with a source still listing.
    pub async fn start_unsynced(
        listener: TcpListener,
        options: ComputeOptions,
        server: ServerOptions,
    ) -> anyhow::Result<Self> {
        let (updates, updates_rx) = tokio::sync::mpsc::channel(1024);
        let (hub, handle) = Hub::new(options, updates_rx);
        tokio::spawn(hub.run());
        let address = listener.local_addr()?;
        let (shutdown, stop) = oneshot::channel();
        let server_handle = handle.clone();
        let sessions = Sessions::default();
        let server_sessions = sessions.clone();
        let server = tokio::spawn(async move {
            let stop = async {
                let _ = stop.await;
            };
            if let Err(error) =
                server::serve(listener, server_handle, server_sessions, server, stop).await
            {
                tracing::error!(%error, "test controller failed");
            }
        });
        Ok(Self {
            address,
            updates,
            hub: handle,
            sessions,
            shutdown: Some(shutdown),
            server,
            coordination: None,
            replica: None,
        })
    }

    /// A controller replica coordinated through the etcd at `etcd` as `replica`, with a
    /// lease of `lease_ttl`. Dropping it is a crash: its streams end, its lease expires.
    pub async fn start_replica(
        etcd: &str,
        replica: &str,
        lease_ttl: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Self::start_replica_on(listener, etcd, replica, lease_ttl, None).await
    }

    /// [`TestController::start_replica`] on a listener bound elsewhere; as leader it
    /// reports Events through `reporter`, if given.
    pub async fn start_replica_on(
        listener: TcpListener,
        etcd: &str,
        replica: &str,
        lease_ttl: std::time::Duration,
        reporter: Option<Reporter>,
    ) -> anyhow::Result<Self> {
        let coordination = Coordination::new(replica);
        let mut server = Self::server_options();
        server.coordination = Some(coordination.clone());
        let mut controller =
            Self::start_with_server(listener, ComputeOptions::default(), server).await?;
        let options = EtcdOptions {
            endpoints: vec![etcd.to_owned()],
            tls: None,
            replica: replica.to_owned(),
            advertise: controller.address.to_string(),
            prefix: "/switchyard".into(),
            lease_ttl,
        };
        let (stop, stopped) = watch::channel(false);
        controller.replica = Some(coordination.clone());
        let task = tokio::spawn(switchyard_controller::coordination::run(
            options,
            coordination,
            controller.sessions.clone(),
            controller.hub.generations.clone(),
            CoordinationMetrics::default(),
            stopped,
            reporter,
        ));
        controller.coordination = Some((task, stop));
        Ok(controller)
    }

    /// Leaves the replicas as a graceful shutdown does: the lease is revoked.
    pub async fn leave(&mut self) {
        if let Some((task, stop)) = self.coordination.take() {
            stop.send_replace(true);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The address for clients of a controller started with TLS.
    pub fn https_endpoint(&self) -> String {
        format!("https://{}", self.address)
    }

    /// Replaces everything from `origin` and waits until the hub has published it.
    pub async fn replace(&self, origin: &str, objects: Vec<Object>) {
        let mut generations = self.hub.generations.clone();
        let before = generations.borrow_and_update().seq;
        let update = StoreUpdate::Replace {
            origin: origin.into(),
            objects,
            at: SystemTime::now(),
        };
        self.updates.send(update).await.expect("hub is running");
        // An update that changes nothing publishes nothing: wait briefly, then move on.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while generations.borrow_and_update().seq == before {
                if generations.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }

    pub async fn send(&self, update: StoreUpdate) {
        self.updates.send(update).await.expect("hub is running");
    }
}

impl Drop for TestController {
    fn drop(&mut self) {
        if let Some((task, _)) = self.coordination.take() {
            task.abort();
        }
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        self.server.abort();
    }
}
