//! The `switchyard-controller` binary: wires a source, the hub and the gRPC server.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Parser;
use switchyard_controller::{
    compute::{ComputeOptions, ProxyNameFilter},
    hub::Hub,
    server::{self, Sessions},
    sources::{kube::KubeSource, manifests::ManifestSource},
    telemetry::{self, LogFormat},
};
use tokio::{net::TcpListener, sync::mpsc};

/// Computes every node's Service load-balancing state and streams it to switchyard agents.
///
/// With no flags it reads the example manifests in deploy/examples (no cluster needed);
/// with --source kubernetes it watches the cluster that kubeconfig or the in-cluster
/// service account points at.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where Services, EndpointSlices and Nodes come from.
    #[arg(long, value_enum, default_value_t = Source::Manifests, env = "SWITCHYARD_SOURCE")]
    source: Source,
    /// Folder of YAML/JSON manifests read with --source manifests; watched for changes.
    #[arg(long, default_value = "deploy/examples", env = "SWITCHYARD_MANIFESTS")]
    manifests: PathBuf,
    /// Address of the gRPC endpoint (agent streams, query API, health, reflection).
    #[arg(long, default_value = "127.0.0.1:9740", env = "SWITCHYARD_LISTEN")]
    listen: SocketAddr,
    /// Run beside kube-proxy: handle only Services labelled
    /// service.kubernetes.io/service-proxy-name=<NAME>. Without it, switchyard handles
    /// unlabelled Services and those labelled "switchyard".
    #[arg(long, value_name = "NAME")]
    proxy_name: Option<String>,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// OTLP/gRPC endpoint for trace export (e.g. http://otel-collector:4317); none: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    Manifests,
    Kubernetes,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = telemetry::init(
        "switchyard-controller",
        args.log_format,
        args.otlp_endpoint.as_deref(),
    )?;

    let options = ComputeOptions {
        proxy_names: args
            .proxy_name
            .clone()
            .map_or(ProxyNameFilter::Default, ProxyNameFilter::Only),
    };
    let (updates, updates_rx) = mpsc::channel(4096);
    let (hub, handle) = Hub::new(options, updates_rx);
    let sessions = Sessions::default();

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;

    let source = match args.source {
        Source::Manifests => {
            let source = ManifestSource::new(&args.manifests);
            tracing::info!(folder = %args.manifests.display(), "reading manifests");
            tokio::spawn(async move { source.run(updates).await.map_err(anyhow::Error::from) })
        }
        Source::Kubernetes => {
            let source = KubeSource::try_default()
                .await
                .context("cannot reach the Kubernetes API")?;
            tracing::info!("watching the Kubernetes API");
            tokio::spawn(async move { source.run(updates).await.map_err(anyhow::Error::from) })
        }
    };
    tokio::spawn(hub.run());

    tracing::info!(%address, "serving agents and queries");
    eprintln!(
        "switchyard-controller is serving on {address}. Try:\n  \
         grpcurl -plaintext {address} switchyard.v1.ControllerQuery/ListNodes\n  \
         grpcurl -plaintext -d '{{\"node_name\":\"node-a\"}}' {address} switchyard.v1.ControllerQuery/GetNodeState"
    );
    let server = server::serve(listener, handle, sessions, async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
    });
    tokio::select! {
        served = server => served.context("gRPC server failed")?,
        ended = source => ended.context("source task panicked")?.context("source failed")?,
    }
    Ok(())
}
