//! The entry point every agent binary calls: flags ([`AgentArgs`]), wiring ([`Agent`])
//! and the process lifetime ([`run`]).
//!
//! # Periodic work
//! - Drift repair every `--drift-interval` (30 s, kube-proxy's `--sync-period`): read the
//!   kernel back, compare, re-apply only what drifted.
//! - A full sync every `--full-sync-period` (1 h, like kube-proxy's iptables and
//!   nftables proxiers, which do partial syncs and a full resync hourly; `0s` turns it
//!   off): `apply` with `full: true`.
//!
//! Both run only while a stream to the controller is up (fail-static: with the
//! controller unreachable the kernel is left exactly as it is). The health timeout is
//! twice the drift interval, as kube-proxy's is twice its sync period. Exiting never
//! touches the kernel.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, ValueEnum};
use tokio::net::TcpListener;

use crate::{
    cache::CacheFile,
    client::{
        self, ClientConfig, ClientTls, ControllerOrder, CurrentController, Rotation, dataplane_name,
    },
    dataplane::{Dataplane, DataplaneError, Desired},
    drift::Drift,
    engine::Engine,
    health::{self, ProxyHealth},
    healthcheck::HealthChecks,
    http::AbortOnDrop,
    metrics::Metrics,
    query::{self, QueryService},
    switch::DataplanePolicy,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The flags every agent shares; `#[command(flatten)]` them into the binary's own.
#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// The controllers' gRPC addresses: one, or several replicas, comma-separated or
    /// repeated (--controller a,b --controller c); https:// for TLS (then --ca is
    /// needed, and every address must be https://). Tried in a random order; the agent
    /// moves to the next when one fails, drops its stream or sheds it.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http://127.0.0.1:9740",
        value_name = "URL"
    )]
    pub controller: Vec<String>,
    /// CA certificates (PEM) that sign the controller's certificate (https:// only).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This node's client certificate (PEM), kubelet's form: CN=system:node:NAME,
    /// O=system:nodes. Read again at every connection.
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// This node's name, as the controller knows it. Defaults to the host name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the desired cache is kept across restarts [default: /run/switchyard/<dataplane>].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Address of the local query API (gRPC, with health and reflection).
    #[arg(long, default_value = "127.0.0.1:9741")]
    pub query_listen: SocketAddr,
    /// Address of /healthz, /livez and /metrics (kube-proxy's healthz port).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_listen: SocketAddr,
    /// How often the kernel is read back and drift repaired (kube-proxy's --sync-period).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drift_interval: Duration,
    /// How often everything is rewritten from the desired state; 0s: never.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub full_sync_period: Duration,
    /// Remove everything this dataplane installed, delete the desired cache, and exit
    /// (kube-proxy's --cleanup).
    #[arg(long)]
    pub cleanup: bool,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint for trace export (e.g. http://otel-collector:4317): each
    /// change the controller traces gets this agent's apply and kernel spans. None: no
    /// export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

impl AgentArgs {
    /// The controller addresses `--controller` lists, trimmed, in the order given.
    pub fn controllers(&self) -> Vec<String> {
        client::controller_list(&self.controller.join(","))
    }

    /// Checks `--controller` against the TLS flags: every address must fit them, and
    /// all must agree on TLS (all `https://` or none).
    pub fn check_controllers(&self) -> Result<Vec<String>, client::ClientError> {
        let controllers = self.controllers();
        self.tls().check_all(&controllers)?;
        Ok(controllers)
    }

    /// The TLS files the flags name.
    pub fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

/// Everything the runtime needs, resolved from [`AgentArgs`].
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The controllers' gRPC addresses, comma-separated: one, or several replicas, which
    /// the client tries in a shuffled order ([`client`]'s rules).
    pub controller: String,
    /// TLS to the controller; empty for a plain `http://` address.
    pub tls: ClientTls,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub drift_interval: Duration,
    pub full_sync_period: Duration,
    pub agent_version: String,
    /// Which dataplane the node should use, for a dataplane that can switch
    /// ([`crate::switch::Switchable`]); `None`: the one given, always.
    pub policy: Option<DataplanePolicy>,
}

/// A running agent: the stream client, periodic drift repair and full sync, the query
/// API, the health endpoints and the health-check node ports. Dropping it stops them
/// all and leaves the kernel as it is.
pub struct Agent<D> {
    engine: Arc<Engine<D>>,
    health: Arc<ProxyHealth>,
    controller: CurrentController,
    query_addr: SocketAddr,
    http_addr: SocketAddr,
    _tasks: Vec<AbortOnDrop>,
}

impl<D: Dataplane> Agent<D> {
    /// Resumes from the kernel and the cache (no apply), then starts every task. The
    /// listeners are bound by the caller.
    pub async fn start(
        options: AgentOptions,
        dataplane: D,
        query_listener: TcpListener,
        http_listener: TcpListener,
    ) -> std::io::Result<Self> {
        Self::start_with_order(
            options,
            ControllerOrder::Shuffled,
            dataplane,
            query_listener,
            http_listener,
        )
        .await
    }

    /// [`Agent::start`], trying the controllers in `order`.
    pub(crate) async fn start_with_order(
        options: AgentOptions,
        order: ControllerOrder,
        dataplane: D,
        query_listener: TcpListener,
        http_listener: TcpListener,
    ) -> std::io::Result<Self> {
        let query_addr = query_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(ProxyHealth::new(options.drift_interval * 2));
        let healthchecks = HealthChecks::new(health.clone());
        let engine = Engine::start(
            dataplane,
            options.policy,
            CacheFile::in_dir(&options.state_dir),
            metrics.clone(),
            health.clone(),
            healthchecks,
        )
        .await;
        let rotation = Rotation::in_order(client::controller_list(&options.controller), order);
        let controller = CurrentController::new(rotation.current());
        let mut tasks = vec![
            health::serve(http_listener, health.clone(), metrics),
            query::serve(
                query_listener,
                QueryService::new(
                    engine.clone(),
                    options.node_name.clone(),
                    controller.clone(),
                ),
            )
            .await,
            AbortOnDrop(tokio::spawn(client::run(
                engine.clone(),
                ClientConfig {
                    node_name: options.node_name.clone(),
                    agent_version: options.agent_version.clone(),
                    tls: options.tls.clone(),
                },
                rotation,
                controller.clone(),
            ))),
        ];
        if !options.drift_interval.is_zero() {
            let engine = engine.clone();
            tasks.push(periodic(options.drift_interval, move || {
                let engine = engine.clone();
                async move {
                    if engine.view().connected {
                        if let Err(error) = engine.repair_drift().await {
                            tracing::warn!(%error, "drift check failed");
                        }
                        // A switch that failed is tried again here.
                        if let Err(error) = engine.reconcile_dataplane().await {
                            tracing::error!(%error, "switching dataplanes failed; the old one stays in force");
                        }
                    }
                }
            }));
        }
        if !options.full_sync_period.is_zero() {
            let engine = engine.clone();
            tasks.push(periodic(options.full_sync_period, move || {
                let engine = engine.clone();
                async move {
                    if engine.view().connected
                        && let Err(error) = engine.full_sync().await
                    {
                        tracing::warn!(%error, "full sync failed");
                    }
                }
            }));
        }
        Ok(Self {
            engine,
            health,
            controller,
            query_addr,
            http_addr,
            _tasks: tasks,
        })
    }

    /// Where the query API listens.
    pub fn query_addr(&self) -> SocketAddr {
        self.query_addr
    }

    /// Where /healthz, /livez and /metrics listen.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Whether a stream to the controller is up.
    pub fn connected(&self) -> bool {
        self.engine.view().connected
    }

    /// The controller the agent is connected to now, or tried last.
    pub fn controller(&self) -> String {
        self.controller.get()
    }

    /// Checks for drift now and repairs it; returns what was found.
    pub async fn repair_drift(&self) -> Result<Vec<Drift>, DataplaneError> {
        self.engine.repair_drift().await
    }

    /// Rewrites everything now.
    pub async fn full_sync(&self) -> Result<(), DataplaneError> {
        self.engine.full_sync().await
    }

    /// Switches now to the dataplane the policy wants, if it is not in force (the drift
    /// check does this periodically); returns the new one, if it switched.
    pub async fn reconcile_dataplane(
        &self,
    ) -> Result<Option<switchyard_proto::state::DataplaneKind>, DataplaneError> {
        self.engine.reconcile_dataplane().await
    }

    /// The dataplane programming the kernel now.
    pub fn dataplane(&self) -> switchyard_proto::v1::Dataplane {
        self.engine.kind()
    }

    /// Marks the node as being deleted (`/healthz` answers 503) or not. The controller
    /// says so in every response (`node_being_deleted`); this is for a binary that
    /// learns it some other way.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.health.set_node_eligible(eligible);
    }

    /// Whether the node may receive traffic: false while it is being deleted.
    pub fn node_eligible(&self) -> bool {
        self.health.node_eligible()
    }

    /// The agent's metrics in Prometheus text form.
    pub fn metrics_text(&self) -> String {
        self.engine.metrics.encode()
    }
}

fn periodic<F, Fut>(every: Duration, mut tick: F) -> AbortOnDrop
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    AbortOnDrop(tokio::spawn(async move {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            tick().await;
        }
    }))
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` (default `info`). Binaries call it
/// first thing, so what building their dataplane logs is not lost; [`run_with`] calls it
/// again, which keeps the subscriber already installed.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr, as kube-proxy's do; stdout stays free for what a command prints.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A binary that installed its own subscriber keeps it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn terminated() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = term.recv() => Ok(()),
    }
}

/// Renders this node's state (`--dry-run`), for [`main_with`].
pub type DryRun<'a> = Box<dyn FnOnce(&Desired) -> anyhow::Result<String> + 'a>;

/// What a one-dataplane agent binary's `main` does with its parsed flags: logging first
/// (what the dataplane logs while it is built is kept), then with `dry_run` print what it
/// renders this node's state, fetched from the controller, to and touch nothing;
/// otherwise [`run`] over the dataplane `dataplane` builds.
pub fn main_with<D: Dataplane>(
    agent: AgentArgs,
    dry_run: Option<DryRun<'_>>,
    dataplane: impl FnOnce() -> anyhow::Result<D>,
) -> anyhow::Result<()> {
    init_logging(agent.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(render) = dry_run {
        let desired = runtime.block_on(desired_from_controller(&agent))?;
        print!("{}", render(&desired)?);
        return Ok(());
    }
    let dataplane = dataplane()?;
    runtime.block_on(run(agent, dataplane))
}

/// Runs an agent over `dataplane` until Ctrl-C or SIGTERM. Exiting leaves the kernel as
/// it is (fail-static); the next start resumes from it.
pub async fn run<D: Dataplane>(args: AgentArgs, dataplane: D) -> anyhow::Result<()> {
    let name = dataplane_name(dataplane.kind());
    run_with(args, dataplane, None, name).await
}

/// [`run`] for a dataplane that can switch: `policy` says which one the node should use;
/// the state directory defaults to `/run/switchyard/<state_name>`.
pub async fn run_with<D: Dataplane>(
    args: AgentArgs,
    dataplane: D,
    policy: Option<DataplanePolicy>,
    state_name: &str,
) -> anyhow::Result<()> {
    use anyhow::Context;
    // Flags that cannot work are refused before anything else.
    let controllers = args.check_controllers()?;
    init_logging(args.log_format);
    let kind = dataplane.kind();
    let tls = args.tls();
    let node_name = match args.node_name {
        Some(name) => name,
        None => hostname::get()
            .context("reading the host name (set --node-name or NODE_NAME)")?
            .to_string_lossy()
            .into_owned(),
    };
    let _traces = crate::telemetry::init(args.otlp_endpoint.as_deref(), &node_name)
        .context("setting up trace export (--otlp-endpoint)")?;
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| default_state_dir(state_name));
    if args.cleanup {
        return cleanup(dataplane, &state_dir).await;
    }
    let query_listener = TcpListener::bind(args.query_listen)
        .await
        .with_context(|| format!("binding the query API to {}", args.query_listen))?;
    let http_listener = TcpListener::bind(args.healthz_listen)
        .await
        .with_context(|| format!("binding /healthz to {}", args.healthz_listen))?;
    let options = AgentOptions {
        controller: controllers.join(","),
        tls,
        node_name,
        state_dir,
        drift_interval: args.drift_interval,
        full_sync_period: args.full_sync_period,
        agent_version: concat!("switchyard-agent-core/", env!("CARGO_PKG_VERSION")).into(),
        policy,
    };
    tracing::info!(
        ?options,
        dataplane = dataplane_name(kind),
        "starting the agent"
    );
    let agent = Agent::start(options, dataplane, query_listener, http_listener).await?;
    tracing::info!(query = %agent.query_addr(), healthz = %agent.http_addr(), "agent running");
    terminated().await.context("waiting for a signal")?;
    tracing::info!("stopping; the kernel keeps its rules");
    drop(agent);
    Ok(())
}

/// What the controller says this node must hold, for a binary's `--dry-run`: asks a
/// controller's query API (`GetNodeState`, every page) for `--node-name`'s state, with
/// the agent's TLS flags (a node certificate may read its own node). Tries the
/// controllers of `--controller` in the order given until one answers. Touches nothing.
pub async fn desired_from_controller(
    args: &AgentArgs,
) -> anyhow::Result<crate::dataplane::Desired> {
    use anyhow::Context;
    let node = args
        .node_name
        .clone()
        .context("--dry-run needs --node-name (or NODE_NAME)")?;
    let controllers = args.check_controllers()?;
    let tls = args.tls();
    let mut failures = Vec::new();
    for controller in &controllers {
        match node_state_from(controller, &tls, &node).await {
            Ok(desired) => return Ok(desired),
            Err(error) => {
                tracing::warn!(%controller, error = format!("{error:#}"), "no answer; trying the next controller");
                failures.push((controller, error));
            }
        }
    }
    if failures.len() == 1 {
        let (_, error) = failures.remove(0);
        return Err(error);
    }
    let failures: Vec<String> = failures
        .iter()
        .map(|(controller, error)| format!("{controller}: {error:#}"))
        .collect();
    anyhow::bail!(
        "no controller answered for node {node}: {}",
        failures.join("; ")
    )
}

/// Node `node`'s state, every page of it, from the controller at `controller`.
async fn node_state_from(
    controller: &str,
    tls: &ClientTls,
    node: &str,
) -> anyhow::Result<crate::dataplane::Desired> {
    use anyhow::Context;
    use switchyard_proto::v1::{self, controller_query_client::ControllerQueryClient};
    let channel = client::connect(controller, tls)
        .await
        .with_context(|| format!("connecting to the controller at {controller}"))?;
    let mut query = ControllerQueryClient::new(channel).max_decoding_message_size(16 << 20);
    let mut desired = crate::dataplane::Desired::new();
    let mut page_token = String::new();
    loop {
        let page = query
            .get_node_state(v1::GetNodeStateRequest {
                node_name: node.to_owned(),
                page_size: 0,
                page_token,
            })
            .await
            .with_context(|| format!("asking the controller for node {node}'s state"))?
            .into_inner();
        for resource in &page.resources {
            let service = crate::cache::convert(resource).map_err(anyhow::Error::msg)?;
            desired.insert(resource.name.clone(), service);
        }
        if page.next_page_token.is_empty() {
            return Ok(desired);
        }
        page_token = page.next_page_token;
    }
}

/// `/run/switchyard/<name>`: where the desired cache lives unless `--state-dir` says.
pub fn default_state_dir(name: &str) -> PathBuf {
    PathBuf::from("/run/switchyard").join(name)
}

async fn cleanup<D: Dataplane>(
    mut dataplane: D,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let kind = dataplane.kind();
    tokio::task::spawn_blocking(move || {
        dataplane.cleanup()?;
        dataplane.hold_connection_tracking(false)
    })
    .await
    .context("the cleanup task panicked")?
    .with_context(|| {
        format!(
            "removing what the {} dataplane installed",
            dataplane_name(kind)
        )
    })?;
    let cache = CacheFile::in_dir(state_dir);
    match std::fs::remove_file(cache.path()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", cache.path().display())),
    }
    tracing::info!(dataplane = dataplane_name(kind), "cleaned up");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemoryDataplane;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn parse(flags: &[&str]) -> Result<AgentArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("agent").chain(flags.iter().copied())).map(|c| c.agent)
    }

    #[test]
    fn controller_takes_a_comma_separated_list_repeated_and_defaults_to_the_local_one() {
        let cases: [(&[&str], &[&str]); 5] = [
            (&[], &["http://127.0.0.1:9740"]),
            (&["--controller", "http://a:9740"], &["http://a:9740"]),
            (
                &[
                    "--controller",
                    "http://a,http://b",
                    "--controller",
                    "http://c",
                ],
                &["http://a", "http://b", "http://c"],
            ),
            (
                &["--controller=http://a", "--controller=http://b"],
                &["http://a", "http://b"],
            ),
            (
                &["--controller", "http://a, http://b"],
                &["http://a", "http://b"],
            ),
        ];
        for (flags, expected) in cases {
            let args = parse(flags).unwrap();
            assert_eq!(args.controllers(), expected, "{flags:?}");
            assert_eq!(args.check_controllers().unwrap(), expected, "{flags:?}");
        }
    }

    #[test]
    fn controllers_that_disagree_on_tls_or_do_not_fit_the_tls_flags_are_refused() {
        let cases: [(&[&str], Option<&str>); 6] = [
            (
                &["--controller", "https://a,https://b", "--ca", "ca.pem"],
                None,
            ),
            (
                &["--controller", "https://a,http://b", "--ca", "ca.pem"],
                Some("the controllers disagree on TLS: https://a is https:// but http://b is not"),
            ),
            (
                &["--controller", "http://a", "--controller", "https://b"],
                Some("disagree on TLS"),
            ),
            (
                &["--controller", "https://a,https://b"],
                Some("an https:// controller needs --ca"),
            ),
            (
                &["--controller", "http://a,http://b", "--ca", "ca.pem"],
                Some("need an https:// controller address"),
            ),
            (
                &["--controller", "http://a,,http://b"],
                Some("an empty controller address"),
            ),
        ];
        for (flags, problem) in cases {
            let args = parse(flags).unwrap();
            match (args.check_controllers(), problem) {
                (Ok(_), None) => {}
                (Err(error), Some(problem)) => {
                    assert!(error.to_string().contains(problem), "{flags:?}: {error}")
                }
                (result, _) => panic!("{flags:?}: {result:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_agent_refuses_to_start_or_dry_run_with_controllers_that_disagree_on_tls() {
        let args = parse(&[
            "--controller",
            "https://a:9740,http://b:9740",
            "--ca",
            "ca.pem",
            "--node-name",
            "node-a",
            // Nothing may be bound: the check comes first.
            "--query-listen",
            "192.0.2.1:1",
        ])
        .unwrap();
        let error = run(args.clone(), MemoryDataplane::default())
            .await
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("disagree on TLS"),
            "{error:#}"
        );
        let error = desired_from_controller(&args).await.unwrap_err();
        assert!(
            format!("{error:#}").contains("disagree on TLS"),
            "{error:#}"
        );
    }
}
