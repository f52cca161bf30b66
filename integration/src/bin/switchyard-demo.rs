//! `switchyard-demo`: the whole thing on one machine, as root, with no cluster.
//!
//! The controller (in-process, the real hub and gRPC server) reads the example cluster
//! in `deploy/examples` plus the demo's own Service in `deploy/demo`; the agent of the
//! chosen dataplane (`switchyard-agent-iptables`, or `switchyard-agent-ipvs` with
//! `--dataplane ipvs`) runs as `node-a` in a throwaway node network namespace, beside a
//! client namespace and three backend namespaces. The demo prints what the controller
//! and the agent report (the query APIs grpcurl would call), the kernel objects of the
//! demo Service as the agent reads them back, and real requests through its ClusterIP,
//! then removes everything it created (also on Ctrl-C). With `--dataplane ipvs` on a
//! kernel without IPVS, the whole demo runs inside user-mode Linux.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use switchyard_controller::{compute::ComputeOptions, sources::manifests::ManifestSource};
use switchyard_integration::{
    controller::TestController,
    netns::{self, NsChild, Topology, tcp_request},
    uml,
};
use switchyard_proto::v1::{
    self, agent_query_client::AgentQueryClient, controller_query_client::ControllerQueryClient,
};

const NODE: &str = "node-a";
const SERVICE_NS: &str = "demo";
const SERVICE: &str = "hello";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 99, 10);
const NO_ENDPOINTS: (&str, Ipv4Addr) = ("shop/reports", Ipv4Addr::new(10, 96, 10, 130));
const BACKEND_PORT: u16 = 8080;
/// Where the agent's query API listens, on the node namespace's loopback.
const AGENT_QUERY: &str = "127.0.0.1:9741";
const PATIENCE: Duration = Duration::from_secs(30);

/// Brings up controller, iptables agent, node/client/backend namespaces; shows their
/// state and real traffic through a ClusterIP; cleans up on exit.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The example cluster (watched: edits apply while --keep runs).
    #[arg(long, default_value = "deploy/examples")]
    examples: PathBuf,
    /// The demo's own Service (demo/hello), whose endpoints are the demo's backends.
    #[arg(long, default_value = "deploy/demo")]
    demo_manifests: PathBuf,
    /// Which agent programs the node.
    #[arg(long, value_enum, default_value_t = DemoDataplane::Iptables)]
    dataplane: DemoDataplane,
    /// The agent binary (default: switchyard-agent-<dataplane> next to this executable).
    #[arg(long, env = "SWITCHYARD_AGENT_BIN")]
    agent: Option<PathBuf>,
    /// How many requests to send through the ClusterIP.
    #[arg(long, default_value_t = 10)]
    requests: usize,
    /// Keep everything running after the demo until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DemoDataplane {
    Iptables,
    Ipvs,
}

impl DemoDataplane {
    fn name(self) -> &'static str {
        match self {
            DemoDataplane::Iptables => "iptables",
            DemoDataplane::Ipvs => "ipvs",
        }
    }
}

fn main() {
    let args = Args::parse();
    if args.dataplane == DemoDataplane::Ipvs && !uml::in_guest() && !uml::running_kernel_has_ipvs()
    {
        if args.keep {
            eprintln!(
                "switchyard-demo: --keep needs a kernel with IPVS; this one has none, and the demo in user-mode Linux ends when it is done"
            );
            std::process::exit(2);
        }
        uml::main_in_ipvs_kernel(uml::Guest::new().mem_mib(2048), || {});
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(demo(args));
}

async fn demo(args: Args) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    // Dropping `run` on a signal drops its namespaces, processes and temp files.
    let result = tokio::select! {
        result = run(args) => result,
        _ = tokio::signal::ctrl_c() => { eprintln!("\ninterrupted; cleaning up"); Ok(()) }
        _ = term.recv() => { eprintln!("\nterminated; cleaning up"); Ok(()) }
    };
    if let Err(error) = result {
        eprintln!("switchyard-demo: {error:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    check_prerequisites(args.dataplane)?;
    let agent_bin = agent_binary(args.agent.as_deref(), args.dataplane)?;
    for dir in [&args.examples, &args.demo_manifests] {
        if !dir.is_dir() {
            bail!(
                "{} is not a folder (run from the repository root, or pass --examples / --demo-manifests)",
                dir.display()
            );
        }
    }

    section("Setting up");
    let topology = Topology::builder()
        .backends(3)
        .local_backend(1)
        .node_name(NODE)
        .build()
        .context("create the demo network namespaces")?;
    let _backends = topology
        .start_backends(&[BACKEND_PORT], &[])
        .context("start the backends")?;
    println!(
        "namespaces: node {} ({}), client {} ({}), backends {}",
        topology.node().name(),
        topology.node_ip(),
        topology.client().name(),
        topology.client_ip(),
        topology
            .backends()
            .iter()
            .map(|b| format!("{} {}", b.name(), b.ip()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let listener = topology
        .node()
        .tcp_listener(SocketAddr::from(([127, 0, 0, 1], 9740)))?;
    listener.set_nonblocking(true)?;
    let controller = TestController::start_on(
        tokio::net::TcpListener::from_std(listener)?,
        ComputeOptions::default(),
    )
    .await?;
    for dir in [&args.examples, &args.demo_manifests] {
        let source = ManifestSource::new(dir.clone());
        let updates = controller.updates.clone();
        let dir = dir.display().to_string();
        tokio::spawn(async move {
            if let Err(error) = source.run(updates).await {
                eprintln!("switchyard-demo: manifests source {dir}: {error}");
            }
        });
    }
    println!(
        "controller: in-process, {} inside the node namespace, reading {} and {}",
        controller.address,
        args.examples.display(),
        args.demo_manifests.display()
    );

    let work = tempfile::Builder::new()
        .prefix("switchyard-demo-")
        .tempdir()?;
    let log_path = work.path().join("agent.log");
    let mut agent = spawn_agent(
        &topology,
        &agent_bin,
        &controller.endpoint(),
        work.path(),
        &log_path,
    )?;
    println!(
        "agent: {} --node-name {NODE} in the node namespace (log: {})",
        agent_bin.display(),
        log_path.display()
    );

    let started = Instant::now();
    loop {
        if tcp_request(topology.client(), CLUSTER_IP, 80).is_ok() {
            break;
        }
        if let Some(status) = agent.try_wait()? {
            bail!(
                "the agent exited ({status}) before traffic flowed; its log:\n{}",
                tail(&log_path)
            );
        }
        if started.elapsed() > PATIENCE {
            bail!(
                "{SERVICE_NS}/{SERVICE} ({CLUSTER_IP}:80) not reachable from the client after {PATIENCE:?}; agent log:\n{}",
                tail(&log_path)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "traffic flows through {CLUSTER_IP}:80 after {} ms",
        started.elapsed().as_millis()
    );

    let endpoint = controller.endpoint();
    let controller_view = topology
        .node()
        .run(move || block_on(controller_state(endpoint)))??;
    print!("{controller_view}");
    let agent_view = topology.node().run(|| block_on(agent_state()))??;
    print!("{agent_view}");
    let endpoint = controller.endpoint();
    let objects = topology
        .node()
        .run(|| block_on(kernel_objects(endpoint)))??;
    print!("{objects}");
    print!("{}", traffic(&topology, args.requests));

    if args.keep {
        section("Still running (--keep); Ctrl-C cleans up");
        println!(
            "the controller and the agent listen inside the node namespace; for grpcurl:\n  \
             ip netns exec {ns} grpcurl -plaintext {controller} switchyard.v1.ControllerQuery/ListNodes\n  \
             ip netns exec {ns} grpcurl -plaintext -d '{{\"node_name\":\"{NODE}\"}}' {controller} switchyard.v1.ControllerQuery/GetNodeEffectiveState\n  \
             ip netns exec {ns} grpcurl -plaintext {AGENT_QUERY} switchyard.v1.AgentQuery/GetAgentState\n  \
             ip netns exec {client} curl -s http://{CLUSTER_IP}/\n\
             edit a file in {examples} or {demo} and the agent follows within a second",
            ns = topology.node().name(),
            controller = controller.address,
            client = topology.client().name(),
            examples = args.examples.display(),
            demo = args.demo_manifests.display(),
        );
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(status) = agent.try_wait()? {
                bail!("the agent exited ({status}); its log:\n{}", tail(&log_path));
            }
        }
    }

    section("Cleaning up");
    agent.terminate(Duration::from_secs(5))?;
    drop(controller);
    println!("agent stopped, controller stopped; namespaces and temp files are removed on exit");
    Ok(())
}

fn section(title: &str) {
    println!("\n=== {title} ===");
}

fn check_prerequisites(dataplane: DemoDataplane) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("must run as root: it creates network namespaces and programs the kernel in them");
    }
    netns::require_tool("ip", &["-V"], "iproute2")?;
    netns::require_tool("iptables", &["--version"], "iptables")?;
    netns::require_tool("iptables-restore", &["--version"], "iptables")?;
    netns::require_tool("conntrack", &["--version"], "conntrack")?;
    if dataplane == DemoDataplane::Ipvs {
        netns::require_tool("ipset", &["--version"], "ipset")?;
        netns::require_tool("ipvsadm", &["--version"], "ipvsadm")?;
    }
    netns::backend_binary()?;
    Ok(())
}

fn agent_binary(given: Option<&Path>, dataplane: DemoDataplane) -> anyhow::Result<PathBuf> {
    let name = format!("switchyard-agent-{}", dataplane.name());
    let path = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("the running executable has no folder")?
            .join(&name),
    };
    if !path.is_file() {
        bail!(
            "agent binary {} not found: build it with `cargo build --release -p {name}` \
             (scripts/run.sh does), or pass --agent PATH",
            path.display()
        );
    }
    Ok(path)
}

fn spawn_agent(
    topology: &Topology,
    binary: &Path,
    controller: &str,
    state: &Path,
    log: &Path,
) -> anyhow::Result<NsChild> {
    let log_file = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut cmd = topology.node().command(binary);
    cmd.args([
        "--controller",
        controller,
        "--node-name",
        NODE,
        "--state-dir",
        state.to_str().context("temp dir path is not UTF-8")?,
        "--query-listen",
        AGENT_QUERY,
        "--healthz-listen",
        "127.0.0.1:10256",
        "--disable-ipv6",
    ])
    .stdin(Stdio::null())
    .stdout(log_file.try_clone()?)
    .stderr(log_file);
    Ok(NsChild::spawn(cmd)?)
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs a future on a small runtime of the current thread (so its sockets open in the
/// namespace this thread has entered).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a runtime")
        .block_on(future)
}

fn duration(d: Option<&prost_types::Duration>) -> String {
    match d {
        Some(d) => {
            let ms = d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6;
            format!("{ms:.1} ms")
        }
        None => "-".into(),
    }
}

fn short(version: &str) -> &str {
    if version.is_empty() { "-" } else { version }
}

fn dataplane(value: i32) -> &'static str {
    match v1::Dataplane::try_from(value) {
        Ok(v1::Dataplane::Iptables) => "iptables",
        Ok(v1::Dataplane::Ipvs) => "ipvs",
        Ok(v1::Dataplane::Ebpf) => "ebpf",
        Ok(v1::Dataplane::Unspecified) => "-",
        Err(_) => "?",
    }
}

async fn controller_state(endpoint: String) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let mut query = ControllerQueryClient::connect(endpoint.clone()).await?;

    writeln!(
        out,
        "\n=== Controller: ControllerQuery/ListNodes ({endpoint}) ==="
    )?;
    let nodes = query
        .list_nodes(v1::ListNodesRequest::default())
        .await?
        .into_inner();
    writeln!(
        out,
        "{:<8} {:<9} {:<18} {:>8}  {:<18} {:<18} {:>7}  {:<8}",
        "NODE", "CONNECTED", "DATAPLANE", "SERVICES", "DESIRED", "ACKED", "PENDING", "LAG"
    )?;
    for n in &nodes.nodes {
        writeln!(
            out,
            "{:<8} {:<9} {:<18} {:>8}  {:<18} {:<18} {:>7}  {:<8}",
            n.node_name,
            if n.connected { "yes" } else { "no" },
            dataplane(n.dataplane),
            n.services,
            short(&n.desired_version),
            short(&n.acked_version),
            n.pending_changes,
            duration(n.lag.as_ref()),
        )?;
        if let Some(nack) = &n.last_nack {
            writeln!(out, "  last NACK: {} errors", nack.errors.len())?;
        }
    }
    writeln!(
        out,
        "(node-b and node-c are the example cluster's other nodes: no agent runs for them \
         here, so nothing is acknowledged and the dataplane, which an agent reports, is unknown)"
    )?;

    writeln!(
        out,
        "\n=== Controller: ControllerQuery/GetService {SERVICE_NS}/{SERVICE}, as {NODE} sees it ==="
    )?;
    let service = query
        .get_service(v1::GetServiceRequest {
            namespace: SERVICE_NS.into(),
            name: SERVICE.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let Some(mine) = service.nodes.iter().find(|n| n.node_name == NODE) else {
        bail!("the controller has no {SERVICE_NS}/{SERVICE} for {NODE}");
    };
    if let Some(resource) = &mine.resource {
        writeln!(
            out,
            "resource {}  version {}  acked by the agent: {}",
            resource.name,
            resource.version,
            short(&mine.acked_version)
        )?;
        if let Some(s) = &resource.service {
            writeln!(out, "cluster IPs: {}", s.cluster_ips.join(", "))?;
            for p in &s.ports {
                let protocol = v1::Protocol::try_from(p.protocol)
                    .map(|p| p.as_str_name().trim_start_matches("PROTOCOL_"))
                    .unwrap_or("?");
                writeln!(out, "port {} {}/{protocol}:", p.name, p.port)?;
                for e in &p.cluster_endpoints {
                    writeln!(
                        out,
                        "  endpoint {}:{}  node {}{}{}",
                        e.ip,
                        e.port,
                        e.node_name,
                        if e.local { "  (local)" } else { "" },
                        if e.ready { "  ready" } else { "  not ready" },
                    )?;
                }
            }
        }
    }

    let problems = query
        .list_source_problems(v1::ListSourceProblemsRequest::default())
        .await?
        .into_inner();
    writeln!(
        out,
        "\n=== Controller: ControllerQuery/ListSourceProblems ==="
    )?;
    if problems.problems.is_empty() {
        writeln!(out, "none")?;
    }
    for p in &problems.problems {
        writeln!(out, "{} {}: {}", p.origin, p.object, p.message)?;
    }
    Ok(out)
}

async fn agent_state() -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let mut query = AgentQueryClient::connect(format!("http://{AGENT_QUERY}")).await?;
    let state = query
        .get_agent_state(v1::GetAgentStateRequest {
            include_kernel_objects: false,
        })
        .await?
        .into_inner();
    writeln!(
        out,
        "\n=== Agent: AgentQuery/GetAgentState ({AGENT_QUERY} in the node namespace) ==="
    )?;
    writeln!(
        out,
        "node {}  dataplane {}  controller {}  connected {}",
        state.node_name,
        dataplane(state.dataplane),
        state.controller,
        state.connected
    )?;
    writeln!(
        out,
        "desired Services: {}  effective (in the kernel): {}  drift: {}  drift repairs: {}",
        state.desired.len(),
        state.effective.len(),
        state.drift.len(),
        state.drift_repairs
    )?;
    if let Some(apply) = &state.last_apply {
        writeln!(
            out,
            "last apply: {} for {} Service{}{}",
            duration(apply.duration.as_ref()),
            apply.resources,
            if apply.resources == 1 { "" } else { "s" },
            if apply.full_sync { " (full sync)" } else { "" }
        )?;
    }
    let name = format!("{SERVICE_NS}/{SERVICE}");
    let desired = state.desired.iter().find(|r| r.name == name);
    let effective = state.effective.iter().find(|e| e.name == name);
    writeln!(
        out,
        "{name}: desired version {}, effective version {}",
        desired.map_or("-", |r| r.version.as_str()),
        effective.map_or("-", |e| e.version.as_str()),
    )?;
    for d in &state.drift {
        writeln!(out, "drift: {} {} {}", d.name, d.kind, d.detail)?;
    }
    Ok(out)
}

/// The demo Service's kernel objects, as the agent reads them back (iptables rules,
/// IPVS virtual services and set elements, …): `GetAgentState` with kernel objects.
async fn kernel_objects(controller: String) -> anyhow::Result<String> {
    // Asked of the controller, which relays the question to the agent over its stream.
    let mut query = ControllerQueryClient::connect(controller).await?;
    let state = query
        .get_node_effective_state(v1::GetNodeEffectiveStateRequest {
            node_name: NODE.into(),
            include_kernel_objects: true,
            page_size: 5000,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    let name = format!("{SERVICE_NS}/{SERVICE}");
    let mut out = format!(
        "\n=== Controller: ControllerQuery/GetNodeEffectiveState {NODE}: the kernel objects of {name}, read back by the {} agent ===\n",
        dataplane(state.dataplane)
    );
    let objects = state
        .effective
        .iter()
        .find(|e| e.name == name)
        .map(|e| e.kernel_objects.clone())
        .unwrap_or_default();
    for object in objects.iter().filter(|o| !o.starts_with("ipv6 ")).take(16) {
        out.push_str(object);
        out.push('\n');
    }
    if objects.len() > 16 {
        out.push_str(&format!("… {} more\n", objects.len() - 16));
    }
    if objects.is_empty() {
        out.push_str("(none found)\n");
    }
    Ok(out)
}

/// Requests from the client namespace through the ClusterIP, and one to a Service
/// without endpoints.
fn traffic(topology: &Topology, n: usize) -> String {
    let mut out = format!(
        "\n=== Traffic: {n} TCP requests from the client ({}) to {SERVICE_NS}/{SERVICE} {CLUSTER_IP}:80 ===\n",
        topology.client_ip()
    );
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=n {
        match tcp_request(topology.client(), CLUSTER_IP, 80) {
            Ok(answer) => {
                let answer = answer.trim();
                let backend = answer.split_whitespace().next().unwrap_or("?").to_owned();
                let ip = topology
                    .backends()
                    .iter()
                    .find(|b| b.name() == backend)
                    .map(|b| format!(" ({}:{BACKEND_PORT})", b.ip()))
                    .unwrap_or_default();
                out.push_str(&format!("request {i:>2}: {answer}{ip}\n"));
                *answered.entry(backend).or_default() += 1;
            }
            Err(error) => out.push_str(&format!("request {i:>2}: failed: {error}\n")),
        }
    }
    out.push_str(&format!(
        "answered by: {}\n",
        answered
            .iter()
            .map(|(b, c)| format!("{b} ×{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let (name, ip) = NO_ENDPOINTS;
    out.push_str(&format!(
        "\n=== Traffic: a request to {name} {ip}:80 (an example Service without endpoints) ===\n"
    ));
    match tcp_request(topology.client(), IpAddr::V4(ip), 80) {
        Ok(answer) => out.push_str(&format!("unexpected answer: {}\n", answer.trim())),
        Err(error) if error.is_refused() => out.push_str(&format!(
            "{error} (rejected by the node's rules, not left to time out)\n"
        )),
        Err(error) => out.push_str(&format!("failed, but not refused: {error}\n")),
    }
    out
}
