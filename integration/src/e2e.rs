//! The end-to-end scenarios every agent must pass, whatever its dataplane: the real
//! controller (in-process) reading a real manifests folder, an agent binary in the node
//! namespace programming its kernel, and real TCP and UDP traffic from client and node
//! namespaces to backend namespaces.
//!
//! An agent crate's `tests/e2e.rs` names its binary in an [`AgentSpec`] and calls each
//! scenario (`cluster_ips_balance_…`, `external_traffic_…`, …); the checks are the same
//! for iptables, IPVS and eBPF, so the three dataplanes are held to one behaviour.
//!
//! Requests come from an [`Origin`]: a pod on the node ([`Cluster::pod`], the client
//! namespace), the node itself ([`Cluster::on_node`]) or the outside world
//! ([`Cluster::outside`], the client namespace again). For an agent that balances per
//! cgroup ([`AgentSpec::cgroup`], the eBPF agent's socket-level translation) the cluster
//! makes a cgroup of its own, hands it to the agent, and sends pod and node traffic from
//! processes inside it; traffic from outside stays outside it. For the other agents the
//! three differ only in the namespace.
//!
//! The example cluster ([`manifests`]), on node [`NODE`] with backends 1–3 (backend 1
//! local to the node):
//! - `default/web` 10.96.0.10:80/TCP → 8080 on backends 1–3;
//! - `default/dns` 10.96.0.11:53/UDP → 5353 on backends 1–3;
//! - `default/empty` 10.96.0.12:80 with no endpoints (reject);
//! - `default/edge` LoadBalancer 10.96.0.13, external IP 10.202.0.10, node port 30080,
//!   `externalTrafficPolicy: Local`, health-check node port 32100;
//! - `default/sticky` 10.96.0.14:80 with ClientIP affinity.
//!
//! A cluster runs one controller by default, or several replicas coordinated through
//! etcd ([`Layout::replicas`]): each in-process, listening on the node's loopback, fed
//! by the same manifests folder, and every one of them listed in the agent's
//! `--controller`. [`Cluster::crash_replica`] drops one as a crash leaves it, and
//! [`Cluster::join_replica`] starts one on an address the agent already lists.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use switchyard_controller::{compute::ComputeOptions, sources::manifests::ManifestSource};
use tokio::task::AbortHandle;

use crate::{
    cgroup::Cgroup,
    controller::TestController,
    netns::{
        Backend, ConnectionLoop, Netns, NetnsError, NsChild, ProbeError, ProbeOptions, Topology,
        tcp_request_with, udp_request_with,
    },
};

/// The node's name in the example cluster.
pub const NODE: &str = "node-a";
/// How long a scenario waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// Where the agent's query API listens, on the node namespace's loopback (its default).
pub const AGENT_QUERY: &str = "127.0.0.1:9741";
/// Where the agent's `/healthz` and `/metrics` listen, on the node namespace's loopback
/// (kube-proxy's port).
pub const AGENT_HTTP: &str = "127.0.0.1:10256";

/// How to start the agent under test in the node namespace.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// The agent binary (`env!("CARGO_BIN_EXE_…")`).
    pub binary: PathBuf,
    /// Flags after the common ones (controller, node name, state dir, listeners).
    pub extra_args: Vec<String>,
    /// Enter the node namespace with `nsenter --net=` instead of `ip netns exec`, which
    /// remounts `/sys` and so hides the cgroup2 mount from the agent (DESIGN §9).
    pub nsenter: bool,
    /// The flag that names the cgroup the agent balances for (e.g. `--cgroup-path`):
    /// the cluster creates one and sends pod and node traffic from inside it.
    pub cgroup_flag: Option<String>,
}

impl AgentSpec {
    /// `binary` with no extra flags, started through `ip netns exec`.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            extra_args: Vec::new(),
            nsenter: false,
            cgroup_flag: None,
        }
    }

    /// The agent balances for the processes of a cgroup named by `flag`: the cluster
    /// gives it one of its own (never the host's root) and starts it with `nsenter`.
    pub fn cgroup(mut self, flag: impl Into<String>) -> Self {
        self.cgroup_flag = Some(flag.into());
        self.nsenter = true;
        self
    }

    /// Adds flags after the common ones.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// Three ready endpoints serving `port`, backend 1 on [`NODE`], the others elsewhere.
pub fn slice(
    name: &str,
    service: &str,
    protocol: &str,
    port_name: &str,
    port: u16,
    ips: &[u8],
) -> String {
    let endpoints: String = ips
        .iter()
        .map(|i| {
            let node = if *i == 1 { NODE } else { "swy-remote-node" };
            format!("  - addresses: [\"10.244.{i}.2\"]\n    nodeName: {node}\n")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: IPv4\nports: [{{name: {port_name}, port: {port}, protocol: {protocol}}}]\n\
         endpoints:\n{endpoints}"
    )
}

/// The example cluster, with `web` served by the backends `web_endpoints`.
pub fn manifests(web_endpoints: &[u8]) -> String {
    manifests_labelled(web_endpoints, None)
}

/// [`manifests`] with the Node labelled `switchyard.io/dataplane: <dataplane>`.
pub fn manifests_labelled(web_endpoints: &[u8], dataplane: Option<&str>) -> String {
    let labels = dataplane
        .map(|d| format!(", labels: {{switchyard.io/dataplane: {d}}}"))
        .unwrap_or_default();
    [
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}{labels}}}\n"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice("web-1", "web", "TCP", "http", 8080, web_endpoints),
        "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\n\
         spec: {clusterIP: 10.96.0.11, ports: [{name: dns, port: 53, protocol: UDP}]}\n"
            .into(),
        slice("dns-1", "dns", "UDP", "dns", 5353, &[1, 2, 3]),
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\n\
         spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}\n"
            .into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: edge}\n\
         spec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.13\n  externalIPs: [10.202.0.10]\n  \
         externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n  \
         ports: [{name: http, port: 80, nodePort: 30080}]\n"
            .into(),
        slice("edge-1", "edge", "TCP", "http", 8080, &[1, 2, 3]),
        "apiVersion: v1\nkind: Service\nmetadata: {name: sticky}\n\
         spec: {clusterIP: 10.96.0.14, sessionAffinity: ClientIP, ports: [{name: http, port: 80}]}\n"
            .into(),
        slice("sticky-1", "sticky", "TCP", "http", 8080, &[1, 2, 3]),
    ]
    .join("---\n")
}

/// Replaces a file the way an editor saves it.
pub fn write(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// A set of backend names, for comparing with what answered.
pub fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// Where requests come from: a namespace, and the cgroup their process runs in when the
/// agent balances per cgroup (then each request is made by a `swy-probe` process there).
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    pub ns: &'a Netns,
    pub cgroup: Option<&'a Cgroup>,
}

impl<'a> From<&'a Netns> for Origin<'a> {
    fn from(ns: &'a Netns) -> Self {
        Self { ns, cgroup: None }
    }
}

fn harness(e: NetnsError) -> ProbeError {
    ProbeError::Netns(e)
}

impl Origin<'_> {
    /// `n` requests (TCP: HTTP/1.0 over a fresh connection; UDP: a datagram from a fresh
    /// connected socket), in order.
    pub fn requests(
        &self,
        addr: SocketAddr,
        n: usize,
        udp: bool,
        options: &ProbeOptions,
    ) -> Vec<Result<String, ProbeError>> {
        match self.cgroup {
            Some(cgroup) => {
                let probe = cgroup.probe(self.ns);
                let results = if udp {
                    probe.udp(addr, n, options)
                } else {
                    probe.tcp(addr, n, options)
                };
                results.unwrap_or_else(|e| vec![Err(harness(e))])
            }
            None => (0..n)
                .map(|_| {
                    if udp {
                        udp_request_with(self.ns, addr, options)
                    } else {
                        tcp_request_with(self.ns, addr, options)
                    }
                })
                .collect(),
        }
    }

    /// One TCP request.
    pub fn tcp(&self, addr: SocketAddr, options: &ProbeOptions) -> Result<String, ProbeError> {
        self.requests(addr, 1, false, options)
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                Err(harness(NetnsError::io(
                    "probe",
                    std::io::Error::other("no result"),
                )))
            })
    }

    /// New TCP connections per second to `target` over `window`, each closed with an
    /// RST (see [`crate::bench::connect_rate`]).
    pub fn connect_rate(&self, target: SocketAddr, window: Duration) -> Result<f64, ProbeError> {
        match self.cgroup {
            Some(cgroup) => cgroup.probe(self.ns).connect_rate(target, window),
            None => Ok(crate::bench::connect_rate(
                self.ns,
                &[],
                None,
                target,
                window,
            )),
        }
    }

    /// A request to `target` every `interval` until the loop stops.
    pub fn connection_loop(
        &self,
        target: SocketAddr,
        interval: Duration,
    ) -> Result<ConnectionLoop, NetnsError> {
        self.connection_loop_with(target, interval, ProbeOptions::default())
    }

    /// [`Origin::connection_loop`] with explicit limits.
    pub fn connection_loop_with(
        &self,
        target: SocketAddr,
        interval: Duration,
        options: ProbeOptions,
    ) -> Result<ConnectionLoop, NetnsError> {
        match self.cgroup {
            Some(cgroup) => cgroup
                .probe(self.ns)
                .connection_loop_with(target, interval, &options),
            None => ConnectionLoop::start_with(self.ns, target, interval, options),
        }
    }
}

/// The controller's view of one node's current stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeStream {
    pub id: u64,
    pub connected: bool,
    /// Resources the agent acknowledged.
    pub acked: usize,
    /// Upserts and removals sent on this stream.
    pub resources_sent: u64,
    pub removals_sent: u64,
}

/// One controller replica of a [`Cluster`] laid out with [`Layout::replicas`]: a
/// [`TestController`] coordinated through etcd, listening on the node's loopback and
/// fed by the cluster's manifests folder. Dropping it is a crash: its streams break, its
/// manifests source stops, and its lease is left to expire.
pub struct Replica {
    /// Its `--replica-name`.
    pub name: String,
    pub controller: TestController,
    source: AbortHandle,
}

impl Replica {
    /// Whether the node's agent streams from this replica now.
    pub fn serves_node(&self) -> bool {
        self.controller
            .sessions
            .get(NODE)
            .is_some_and(|session| session.is_connected())
    }

    /// Where the agent reaches it (one entry of its `--controller`).
    pub fn endpoint(&self) -> String {
        self.controller.endpoint()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.source.abort();
    }
}

/// Controller replicas coordinated through etcd, in place of the one controller.
#[derive(Clone, Debug)]
pub struct Replicas {
    /// etcd's client URL (e.g. [`crate::etcd::Etcd::endpoint`]).
    pub etcd: String,
    /// The replicas the cluster starts with, by name.
    pub names: Vec<String>,
    /// Their lease's time to live: how long a crashed replica stays registered.
    pub lease: Duration,
    /// Addresses on the node's loopback that the agent lists after the replicas' but
    /// where nothing listens yet, for [`Cluster::join_replica`].
    pub spare: usize,
}

impl Replicas {
    /// `names` through the etcd at `etcd`, with a 3 s lease and no spare address.
    pub fn new(etcd: impl Into<String>, names: &[&str]) -> Self {
        Self {
            etcd: etcd.into(),
            names: names.iter().map(|n| n.to_string()).collect(),
            lease: Duration::from_secs(3),
            spare: 0,
        }
    }

    /// Lists `n` more addresses to the agent, dead until a replica joins on them.
    pub fn spare(mut self, n: usize) -> Self {
        self.spare = n;
        self
    }
}

/// Everything one scenario runs: namespaces, backends, controller (or replicas), agent.
pub struct Cluster {
    pub topology: Topology,
    _backends: Vec<Backend>,
    /// The one controller; `None` with [`Layout::replicas`] (see [`Cluster::replicas`]).
    pub controller: Option<TestController>,
    /// The live replicas, with [`Layout::replicas`].
    replicas: Vec<Replica>,
    /// How the replicas coordinate, for [`Cluster::join_replica`].
    coordination: Option<Replicas>,
    /// Addresses the agent lists where no replica runs yet.
    spare: Vec<SocketAddr>,
    /// The agent's `--controller`, fixed at start: every address it may use.
    controllers: String,
    agent: NsChild,
    spec: AgentSpec,
    pub manifests: tempfile::TempDir,
    state: tempfile::TempDir,
    /// The cgroup the agent balances for, when it balances per cgroup.
    pub cgroup: Option<Cgroup>,
    /// How long the agent may take to forward at start, and to clean up.
    patience: Duration,
}

/// What a [`Cluster`] lays out: the manifests, the backends and the ports each serves,
/// IPv6 or not, and the request that says the agent is ready.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The manifests folder's one file.
    pub manifests: String,
    /// Per backend (1-based, in order): the TCP and the UDP ports it serves.
    pub backends: Vec<(Vec<u16>, Vec<u16>)>,
    /// Give every namespace an IPv6 address too.
    pub ipv6: bool,
    /// A ClusterIP and port that answers TCP from a pod once the agent is ready.
    pub ready: SocketAddr,
    /// More files for the manifests folder: name and contents.
    pub files: Vec<(String, String)>,
    /// A Service (`namespace/name`) the controller must hold before the agent starts, so
    /// the agent's first sync is of the whole cluster.
    pub await_service: Option<String>,
    /// How long the agent may take to forward after it starts, and to clean up
    /// ([`PATIENCE`] unless a large cluster needs more).
    pub patience: Duration,
    /// Controller replicas through etcd instead of the one controller (`None`).
    pub replicas: Option<Replicas>,
}

impl Layout {
    /// The example cluster of [`manifests`] on three backends.
    pub fn example() -> Self {
        Self {
            manifests: manifests(&[1, 2, 3]),
            backends: vec![(vec![8080], vec![5353]); 3],
            ipv6: false,
            ready: "10.96.0.10:80".parse().expect("an address"),
            files: Vec::new(),
            await_service: None,
            patience: PATIENCE,
            replicas: None,
        }
    }
}

impl Cluster {
    /// Lays out the topology, starts the backends, the controller on the example cluster
    /// and the agent, and waits until `web` answers from the client.
    pub async fn start(spec: AgentSpec) -> Self {
        Self::start_with(spec, Layout::example()).await
    }

    /// [`Cluster::start`] with another layout (backend 1 is the one on [`NODE`]).
    pub async fn start_with(spec: AgentSpec, layout: Layout) -> Self {
        let topology = Topology::builder()
            .backends(layout.backends.len() as u8)
            .local_backend(1)
            .ipv6(layout.ipv6)
            .node_name(NODE)
            .build()
            .unwrap();
        let backends = topology
            .backends()
            .iter()
            .zip(&layout.backends)
            .map(|(backend, (tcp, udp))| backend.start(tcp, udp).unwrap())
            .collect();

        let manifests_dir = tempfile::tempdir().unwrap();
        write(
            &manifests_dir.path().join("cluster.yaml"),
            &layout.manifests,
        );
        for (name, contents) in &layout.files {
            write(&manifests_dir.path().join(name), contents);
        }
        let state = tempfile::tempdir().unwrap();
        let cgroup = spec
            .cgroup_flag
            .as_ref()
            .map(|_| Cgroup::create("agent").expect("a cgroup for the agent (cgroup v2 mounted)"));
        let spec = match (&spec.cgroup_flag, &cgroup) {
            (Some(flag), Some(cgroup)) => spec
                .clone()
                .args([flag.clone(), cgroup.path().display().to_string()]),
            _ => spec,
        };
        let (controller, replicas, spare) = match &layout.replicas {
            None => (
                Some(start_controller(&topology, manifests_dir.path(), 0).await),
                Vec::new(),
                Vec::new(),
            ),
            Some(coordination) => {
                let mut replicas = Vec::new();
                for name in &coordination.names {
                    replicas.push(
                        start_replica(&topology, manifests_dir.path(), coordination, name, 0).await,
                    );
                }
                let spare = (0..coordination.spare)
                    .map(|_| {
                        topology
                            .node()
                            .tcp_listener(SocketAddr::from(([127, 0, 0, 1], 0)))
                            .and_then(|l| {
                                l.local_addr()
                                    .map_err(|e| NetnsError::io("spare replica address", e))
                            })
                            .unwrap()
                    })
                    .collect();
                (None, replicas, spare)
            }
        };
        let hubs: Vec<&TestController> = controller
            .iter()
            .chain(replicas.iter().map(|r| &r.controller))
            .collect();
        if let Some(service) = &layout.await_service {
            for hub in &hubs {
                let mut generations = hub.hub.generations.clone();
                tokio::time::timeout(PATIENCE * 6, generations.wait_for(|g| g.contains(service)))
                    .await
                    .unwrap_or_else(|_| panic!("the controller never held {service}"))
                    .expect("the hub runs");
            }
        }
        if !replicas.is_empty() {
            // Every replica computes from the same folder: none may serve the agent a
            // partial cluster.
            let deadline = Instant::now() + PATIENCE;
            while !same_names(&replicas) {
                assert!(
                    Instant::now() < deadline,
                    "the replicas never held the same Services"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let controllers = hubs
            .iter()
            .map(|c| c.endpoint())
            .chain(spare.iter().map(|a: &SocketAddr| format!("http://{a}")))
            .collect::<Vec<_>>()
            .join(",");
        let agent = spawn_agent(&topology, &spec, &controllers, state.path());
        let cluster = Self {
            topology,
            _backends: backends,
            controller,
            replicas,
            coordination: layout.replicas.clone(),
            spare,
            controllers,
            agent,
            spec,
            manifests: manifests_dir,
            state,
            cgroup,
            patience: layout.patience,
        };
        let ready = layout.ready;
        cluster
            .eventually_within(layout.patience, "the agent forwarding for a pod", |c| {
                c.pod().tcp(ready, &ProbeOptions::default()).is_ok()
            })
            .await;
        cluster
    }

    /// A pod on the node: the client namespace (in the agent's cgroup, if any).
    pub fn pod(&self) -> Origin<'_> {
        Origin {
            ns: self.topology.client(),
            cgroup: self.cgroup.as_ref(),
        }
    }

    /// A process on the node itself (in the agent's cgroup, if any).
    pub fn on_node(&self) -> Origin<'_> {
        Origin {
            ns: self.topology.node(),
            cgroup: self.cgroup.as_ref(),
        }
    }

    /// A client outside the node: the client namespace, outside any cgroup of the agent.
    pub fn outside(&self) -> Origin<'_> {
        self.topology.client().into()
    }

    /// The controller's view of this node's current stream.
    pub fn node_stream(&self) -> Option<NodeStream> {
        let controller = self.controller.as_ref()?;
        let session = controller.sessions.get(NODE)?;
        let protocol = session.protocol();
        Some(NodeStream {
            id: session.id,
            connected: session.is_connected(),
            acked: protocol.acked.len(),
            resources_sent: protocol.resources_sent,
            removals_sent: protocol.removals_sent,
        })
    }

    /// The agent's process id.
    pub fn agent_pid(&self) -> u32 {
        self.agent.id()
    }

    /// The agent's Prometheus metrics, as `/metrics` serves them.
    pub fn agent_metrics(&self) -> Result<String, NetnsError> {
        let addr: SocketAddr = AGENT_HTTP.parse().expect("an address");
        self.node()
            .run(move || {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                Ok(response
                    .split_once("\r\n\r\n")
                    .map_or(String::new(), |(_, body)| body.to_string()))
            })?
            .map_err(|e| NetnsError::io("GET /metrics from the agent", e))
    }

    /// The agent's `AgentQuery/GetAgentState`, with every Service's kernel objects when
    /// `kernel_objects`.
    pub fn agent_state(
        &self,
        kernel_objects: bool,
    ) -> anyhow::Result<switchyard_proto::v1::GetAgentStateResponse> {
        use switchyard_proto::v1::{GetAgentStateRequest, agent_query_client::AgentQueryClient};
        self.in_node(|| async move {
            // An iptables node with 10,000 Services reads back about 12 MB of kernel
            // objects: more than the 4 MiB gRPC clients take by default.
            let mut client = AgentQueryClient::connect(format!("http://{AGENT_QUERY}"))
                .await?
                .max_decoding_message_size(256 << 20);
            let state = client
                .get_agent_state(GetAgentStateRequest {
                    include_kernel_objects: kernel_objects,
                })
                .await?;
            Ok(state.into_inner())
        })
    }

    /// Runs `work` (gRPC calls) on a runtime of its own inside the node namespace, where
    /// the agent's query API and the controllers listen.
    fn in_node<T: Send, F: std::future::Future<Output = anyhow::Result<T>>>(
        &self,
        work: impl FnOnce() -> F + Send,
    ) -> anyhow::Result<T> {
        self.node().run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(work())
        })?
    }

    /// `ControllerQuery/GetNodeEffectiveState` of the node, every page with kernel
    /// objects: what the agent reads back, asked of the controller over its stream.
    pub fn effective_state_from_controller(
        &self,
    ) -> anyhow::Result<Vec<switchyard_proto::v1::GetNodeEffectiveStateResponse>> {
        use switchyard_proto::v1::controller_query_client::ControllerQueryClient;
        let controller = self.controller.as_ref().expect("controller running");
        let endpoint = controller.endpoint();
        self.in_node(|| async move {
            // A default client: each page fits its 4 MiB.
            let mut client = ControllerQueryClient::connect(endpoint).await?;
            Ok(crate::queries::effective_state_pages(&mut client, NODE, 0).await?)
        })
    }

    /// Stops the agent (SIGTERM), which leaves the kernel as it is, then runs the same
    /// binary with `--cleanup` and the same flags, which removes everything it made.
    pub fn stop_and_clean_up_agent(&mut self) -> Result<(), NetnsError> {
        self.agent.terminate(Duration::from_secs(5))?;
        let mut spec = self.spec.clone();
        spec.extra_args.push("--cleanup".into());
        let mut cleanup = spawn_agent(&self.topology, &spec, &self.controllers, self.state.path());
        let deadline = Instant::now() + self.patience;
        loop {
            if let Some(status) = cleanup.try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(NetnsError::io(
                        "agent --cleanup",
                        std::io::Error::other(status.to_string()),
                    ))
                };
            }
            if Instant::now() > deadline {
                return Err(NetnsError::io(
                    "agent --cleanup",
                    std::io::Error::other(format!("still running after {:?}", self.patience)),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agent (SIGTERM) and starts a new one over the same state directory.
    pub fn restart_agent(&mut self) {
        self.agent.terminate(Duration::from_secs(5)).unwrap();
        self.agent = spawn_agent(
            &self.topology,
            &self.spec,
            &self.controllers,
            self.state.path(),
        );
    }

    /// The live replicas, in the order started (with [`Layout::replicas`]).
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// The replica named `name`, if it runs.
    pub fn replica(&self, name: &str) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.name == name)
    }

    /// The replica the node's agent streams from now, by its own sessions.
    pub fn serving_replica(&self) -> Option<&Replica> {
        self.replicas.iter().find(|r| r.serves_node())
    }

    /// Crashes the replica named `name`: dropped, its streams break and its lease is
    /// left to expire. Panics if no such replica runs.
    pub fn crash_replica(&mut self, name: &str) {
        let at = self
            .replicas
            .iter()
            .position(|r| r.name == name)
            .unwrap_or_else(|| panic!("no replica {name} runs"));
        drop(self.replicas.remove(at));
    }

    /// Starts replica `name` on the next spare address (one the agent lists but where
    /// nothing listened) and waits until it holds the Services the other replicas hold.
    pub async fn join_replica(&mut self, name: &str) -> &Replica {
        let coordination = self
            .coordination
            .clone()
            .expect("a cluster laid out with replicas");
        assert!(!self.spare.is_empty(), "no spare address left to join on");
        let address = self.spare.remove(0);
        let replica = start_replica(
            &self.topology,
            self.manifests.path(),
            &coordination,
            name,
            address.port(),
        )
        .await;
        self.replicas.push(replica);
        let deadline = Instant::now() + PATIENCE;
        while !same_names(&self.replicas) {
            assert!(
                Instant::now() < deadline,
                "{name} never held what the other replicas hold"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.replicas.last().expect("just pushed")
    }

    /// [`NODE`] as `replica`'s `ControllerQuery/ListNodes` shows it (asked from the node
    /// namespace, where the replica listens); `None` if it does not list the node.
    pub fn listed_node(
        &self,
        replica: &Replica,
    ) -> anyhow::Result<Option<switchyard_proto::v1::NodeStatus>> {
        use switchyard_proto::v1::{
            ListNodesRequest, controller_query_client::ControllerQueryClient,
        };
        let endpoint = replica.endpoint();
        self.in_node(|| async move {
            let mut client = ControllerQueryClient::connect(endpoint).await?;
            let nodes = client
                .list_nodes(ListNodesRequest {
                    page_size: 500,
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .nodes;
            Ok(nodes.into_iter().find(|n| n.node_name == NODE))
        })
    }

    pub fn client(&self) -> &Netns {
        self.topology.client()
    }

    pub fn node(&self) -> &Netns {
        self.topology.node()
    }

    /// One TCP request: the backend's answer (`backend-1 from 10.201.0.2:…`).
    pub fn tcp<'a>(
        &self,
        from: impl Into<Origin<'a>>,
        ip: &str,
        port: u16,
    ) -> Result<String, String> {
        let addr = SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port);
        from.into()
            .tcp(addr, &ProbeOptions::default())
            .map_err(|e| e.to_string())
    }

    /// Which backends answered `n` requests, and from which client addresses.
    pub fn spread<'a>(
        &self,
        from: impl Into<Origin<'a>>,
        ip: &str,
        port: u16,
        n: usize,
        udp: bool,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut backends = BTreeSet::new();
        let mut peers = BTreeSet::new();
        let addr = SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port);
        for answer in from.into().requests(addr, n, udp, &ProbeOptions::default()) {
            let answer = answer.unwrap_or_else(|e| panic!("{ip}:{port}: {e}"));
            // "backend-1 from 10.201.0.2:53422"
            let mut words = answer.split_whitespace();
            backends.insert(words.next().unwrap().to_string());
            let peer = words.nth(1).unwrap();
            peers.insert(peer.rsplit_once(':').unwrap().0.to_string());
        }
        (backends, peers)
    }

    /// Polls `check` every 100 ms until it holds; panics after [`PATIENCE`].
    pub async fn eventually(&self, what: &str, check: impl Fn(&Self) -> bool) {
        self.eventually_within(PATIENCE, what, check).await;
    }

    /// [`Cluster::eventually`], panicking after `patience`.
    pub async fn eventually_within(
        &self,
        patience: Duration,
        what: &str,
        check: impl Fn(&Self) -> bool,
    ) {
        let deadline = Instant::now() + patience;
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Labels the Node `switchyard.io/dataplane: <dataplane>` (`None`: no label), with
    /// `web` on every backend.
    pub fn set_dataplane_label(&self, dataplane: Option<&str>) {
        write(
            &self.manifests.path().join("cluster.yaml"),
            &manifests_labelled(&[1, 2, 3], dataplane),
        );
    }

    /// The dataplane the node's agent reports programming with, as the controller sees
    /// it.
    /// Labels the Node for `label` and waits until its agent reports `to` in force.
    pub async fn switch_dataplane(&self, label: &str, to: switchyard_proto::v1::Dataplane) {
        self.set_dataplane_label(Some(label));
        self.eventually(&format!("the agent on {label}"), |c| {
            c.dataplane_in_force() == Some(to)
        })
        .await;
    }

    pub fn dataplane_in_force(&self) -> Option<switchyard_proto::v1::Dataplane> {
        let controller = self.controller.as_ref()?;
        Some(controller.sessions.get(NODE)?.dataplanes().in_force)
    }

    /// Rewrites the cluster manifest with `web` served by `web_endpoints`.
    pub fn set_web_endpoints(&self, web_endpoints: &[u8]) {
        write(
            &self.manifests.path().join("cluster.yaml"),
            &manifests(web_endpoints),
        );
    }
}

/// The controller (in-process), listening on the node's own loopback where the agent
/// looks for it (`port` 0: any), fed by a manifests source on `dir`.
pub async fn start_controller(topology: &Topology, dir: &Path, port: u16) -> TestController {
    let listener = node_listener(topology, port).await;
    let controller = TestController::start_on(listener, ComputeOptions::default())
        .await
        .unwrap();
    tokio::spawn(ManifestSource::new(dir).run(controller.updates.clone()));
    controller
}

/// A controller replica named `name` like [`start_controller`]'s controller, coordinated
/// through `coordination`'s etcd (the replica's etcd client runs in this process, in the
/// host namespace, and reaches etcd there).
pub async fn start_replica(
    topology: &Topology,
    dir: &Path,
    coordination: &Replicas,
    name: &str,
    port: u16,
) -> Replica {
    let listener = node_listener(topology, port).await;
    let controller = TestController::start_replica_on(
        listener,
        &coordination.etcd,
        name,
        coordination.lease,
        None,
    )
    .await
    .unwrap();
    let source = tokio::spawn(ManifestSource::new(dir).run(controller.updates.clone()));
    Replica {
        name: name.to_owned(),
        controller,
        source: source.abort_handle(),
    }
}

/// Whether every replica's hub holds the same Services, at least one.
fn same_names(replicas: &[Replica]) -> bool {
    let names: Vec<Vec<_>> = replicas
        .iter()
        .map(|r| {
            let sorted = r.controller.hub.generations.borrow().sorted();
            sorted.iter().map(|listed| listed.name.clone()).collect()
        })
        .collect();
    names.first().is_some_and(|first| !first.is_empty()) && names.windows(2).all(|w| w[0] == w[1])
}

/// A listener on the node namespace's loopback (`port` 0: any).
async fn node_listener(topology: &Topology, port: u16) -> tokio::net::TcpListener {
    // A controller just dropped on `port` may hold its listener until its aborted task
    // is next polled: retry for a moment rather than race it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let listener = loop {
        match topology
            .node()
            .tcp_listener(SocketAddr::from(([127, 0, 0, 1], port)))
        {
            Ok(listener) => break listener,
            Err(e) if port != 0 && Instant::now() < deadline => {
                tracing::debug!(%e, "controller port still held; retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    listener.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(listener).unwrap()
}

/// The agent binary inside the node namespace.
fn spawn_agent(topology: &Topology, spec: &AgentSpec, controllers: &str, state: &Path) -> NsChild {
    let mut argv: Vec<OsString> = vec![
        spec.binary.clone().into(),
        "--controller".into(),
        controllers.into(),
        "--node-name".into(),
        NODE.into(),
        "--state-dir".into(),
        state.into(),
        "--query-listen".into(),
        AGENT_QUERY.into(),
        "--healthz-listen".into(),
        AGENT_HTTP.into(),
    ];
    argv.extend(spec.extra_args.iter().map(OsString::from));
    if spec.nsenter {
        let mut command = std::process::Command::new("nsenter");
        command
            .arg(format!("--net={}", topology.node().path().display()))
            .arg("--")
            .args(&argv)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        NsChild::spawn(command).unwrap()
    } else {
        topology.node().spawn(argv).unwrap()
    }
}

/// A plain HTTP GET from inside `ns`: status line and body.
pub fn http_get(ns: &Netns, addr: SocketAddr) -> (String, String) {
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (
            head.lines().next().unwrap_or_default().to_string(),
            body.to_string(),
        )
    })
    .unwrap()
}

/// ClusterIPs balance TCP (from the client and from the node) and UDP over every
/// backend, a Service without endpoints refuses at once, an endpoint removed on disk
/// stops receiving traffic, and the controller shows the kernel objects the agent reads
/// back on the node (`GetNodeEffectiveState`).
pub async fn cluster_ips_balance_tcp_and_udp_and_follow_endpoint_changes(spec: AgentSpec) {
    let cluster = Cluster::start(spec).await;
    let all = set(&["backend-1", "backend-2", "backend-3"]);

    let (from_client, peers) = cluster.spread(cluster.pod(), "10.96.0.10", 80, 40, false);
    assert_eq!(from_client, all, "TCP from the client namespace");
    assert_eq!(
        peers,
        set(&["10.201.0.2"]),
        "pod-bound cluster traffic keeps the client address"
    );
    let (from_node, _) = cluster.spread(cluster.on_node(), "10.96.0.10", 80, 40, false);
    assert_eq!(from_node, all, "TCP from the node itself (OUTPUT path)");
    let (udp, _) = cluster.spread(cluster.pod(), "10.96.0.11", 53, 40, true);
    assert_eq!(udp, all, "UDP from the client namespace");

    // A Service without endpoints refuses at once instead of timing out.
    let started = Instant::now();
    let refused = cluster
        .pod()
        .tcp("10.96.0.12:80".parse().unwrap(), &ProbeOptions::default())
        .unwrap_err();
    assert!(refused.is_refused(), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // Removing an endpoint on disk stops traffic to it.
    cluster.set_web_endpoints(&[1, 2]);
    cluster
        .eventually("backend-3 out of web", |c| {
            c.spread(c.pod(), "10.96.0.10", 80, 20, false).0 == set(&["backend-1", "backend-2"])
        })
        .await;

    // The controller shows the node's kernel as the agent reads it on the node.
    let pages = cluster.effective_state_from_controller().unwrap();
    let local = cluster.agent_state(true).unwrap();
    let remote: Vec<_> = pages.iter().flat_map(|p| p.effective.clone()).collect();
    assert_eq!(
        remote, local.effective,
        "the node's kernel, via the controller"
    );
    assert!(
        remote
            .iter()
            .any(|s| s.name == "default/web" && !s.kernel_objects.is_empty())
    );
    assert!(pages.iter().all(|p| p.drift.is_empty()), "{pages:?}");
    assert_eq!(pages[0].dataplane, local.dataplane);
}

/// Node port and external IP of an `externalTrafficPolicy: Local` Service reach only the
/// local endpoint and keep the client's address; cluster traffic to it still uses every
/// endpoint; the health-check node port answers 200 with the local endpoint count.
pub async fn external_traffic_with_local_policy_reaches_only_the_local_endpoint(spec: AgentSpec) {
    let cluster = Cluster::start(spec).await;

    for (ip, port, what) in [
        ("10.201.0.1", 30080, "node port"),
        ("10.202.0.10", 80, "external IP"),
    ] {
        let (backends, peers) = cluster.spread(cluster.outside(), ip, port, 20, false);
        assert_eq!(
            backends,
            set(&["backend-1"]),
            "{what} goes to the local endpoint only"
        );
        assert_eq!(
            peers,
            set(&["10.201.0.2"]),
            "{what} preserves the client address"
        );
    }
    let (internal, _) = cluster.spread(cluster.pod(), "10.96.0.13", 80, 40, false);
    assert_eq!(internal, set(&["backend-1", "backend-2", "backend-3"]));

    let (status, body) = http_get(cluster.client(), "10.201.0.1:32100".parse().unwrap());
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
}

/// ClientIP affinity keeps one client on one backend.
pub async fn client_ip_affinity_sticks_to_one_backend(spec: AgentSpec) {
    let cluster = Cluster::start(spec).await;
    let (backends, _) = cluster.spread(cluster.pod(), "10.96.0.14", 80, 20, false);
    assert_eq!(backends.len(), 1, "{backends:?}");
}

/// Under a connection loop: an agent restart (which resends nothing), a controller
/// restart and a 10 s controller outage fail no connection; afterwards a change on disk
/// still reaches the kernel.
pub async fn restarting_or_losing_the_agent_and_the_controller_fails_no_connection(
    spec: AgentSpec,
) {
    let mut cluster = Cluster::start(spec).await;
    let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let traffic = cluster
        .pod()
        .connection_loop(target, Duration::from_millis(20))
        .unwrap();
    assert!(traffic.wait_for_successes(10, PATIENCE));

    // The agent restarts: the kernel state stays in place throughout, and the new stream
    // resumes from the versions the agent read back from the kernel, so nothing is resent.
    let before = cluster.node_stream().expect("agent connected");
    cluster.restart_agent();
    cluster
        .eventually("the restarted agent's stream", |c| {
            c.node_stream()
                .is_some_and(|s| s.id != before.id && s.connected)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = cluster.node_stream().unwrap();
    assert_eq!(
        after.acked, before.acked,
        "the new stream holds every Service"
    );
    assert_eq!(
        (after.resources_sent, after.removals_sent),
        (0, 0),
        "nothing unchanged is resent after an agent restart"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The controller restarts on the same address, then is gone for 10 s.
    let port = cluster.controller.take().unwrap().address.port();
    let controller = start_controller(&cluster.topology, cluster.manifests.path(), port).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(controller);
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.controller =
        Some(start_controller(&cluster.topology, cluster.manifests.path(), port).await);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stats = traffic.stop();
    assert!(stats.succeeded > 200, "{stats:?}");
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert_eq!(stats.by_backend.len(), 3, "{stats:?}");

    // The agent found the controller again: a change on disk reaches the kernel.
    cluster.set_web_endpoints(&[2, 3]);
    cluster
        .eventually("backend-1 out of web after the reconnect", |c| {
            c.spread(c.pod(), "10.96.0.10", 80, 20, false).0 == set(&["backend-2", "backend-3"])
        })
        .await;
}

/// A Service written to the manifests folder answers through its ClusterIP within a
/// second of the write; returns the time it took.
pub async fn a_service_added_on_disk_forwards_within_a_second(spec: AgentSpec) -> Duration {
    let cluster = Cluster::start(spec).await;
    let fresh = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: fresh}}\n\
         spec: {{clusterIP: 10.96.0.20, ports: [{{name: http, port: 80}}]}}\n---\n{}",
        slice("fresh-1", "fresh", "TCP", "http", 8080, &[2])
    );
    let target: SocketAddr = "10.96.0.20:80".parse().unwrap();
    let quick = ProbeOptions {
        connect_timeout: Duration::from_millis(100),
        io_timeout: Duration::from_secs(1),
    };
    assert!(
        cluster.pod().tcp(target, &quick).is_err(),
        "nothing answers before the Service exists"
    );
    let written = Instant::now();
    write(&cluster.manifests.path().join("fresh.yaml"), &fresh);
    // Poll every 10 ms: the figure is the time from the write to the first answer.
    let answer = loop {
        match cluster.pod().tcp(target, &quick) {
            Ok(answer) => break answer,
            Err(_) if written.elapsed() < PATIENCE => std::thread::sleep(Duration::from_millis(10)),
            Err(err) => panic!("fresh never answered: {err}"),
        }
    };
    let took = written.elapsed();
    eprintln!("manifest written to first answer through the new ClusterIP: {took:?}");
    assert!(answer.starts_with("backend-2 "), "{answer}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    took
}
