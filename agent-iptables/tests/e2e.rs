//! The iptables agent end to end with real packets: the controller (in-process) reads a
//! real manifests folder; the `switchyard-agent-iptables` binary runs in a node network
//! namespace and programs its iptables; a client namespace and three backend namespaces
//! send and answer real TCP and UDP traffic.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use switchyard_controller::{compute::ComputeOptions, sources::manifests::ManifestSource};
use switchyard_integration::{
    controller::TestController,
    netns::{
        Backend, ConnectionLoop, Netns, NsChild, ProbeOptions, Topology, tcp_request,
        tcp_request_with, udp_request,
    },
};

const NODE: &str = "node-a";
const PATIENCE: Duration = Duration::from_secs(20);

/// Three ready endpoints, backend-1 on this node, serving `port`.
fn slice(
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

fn manifests(web_endpoints: &[u8]) -> String {
    [
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\n"),
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
fn write(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// Everything one test runs: namespaces, backends, controller, agent.
struct Cluster {
    topology: Topology,
    _backends: Vec<Backend>,
    controller: Option<TestController>,
    agent: NsChild,
    manifests: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let topology = Topology::builder()
            .backends(3)
            .local_backend(1)
            .node_name(NODE)
            .build()
            .unwrap();
        let backends = topology.start_backends(&[8080], &[5353]).unwrap();

        let manifests = tempfile::tempdir().unwrap();
        write(
            &manifests.path().join("cluster.yaml"),
            &manifests_text(&[1, 2, 3]),
        );
        let state = tempfile::tempdir().unwrap();
        let controller = start_controller(&topology, manifests.path(), 0).await;
        let agent = spawn_agent(&topology, &controller, state.path());
        let cluster = Self {
            topology,
            _backends: backends,
            controller: Some(controller),
            agent,
            manifests,
            state,
        };
        cluster
            .eventually("web reachable from the client", |c| {
                c.tcp(c.client(), "10.96.0.10", 80).is_ok()
            })
            .await;
        cluster
    }

    /// The controller's view of this node's current stream: (stream id, connected,
    /// resources acknowledged, upserts sent, removals sent).
    fn node_stream(&self) -> Option<(u64, bool, usize, u64, u64)> {
        let controller = self.controller.as_ref()?;
        let session = controller.sessions.get(NODE)?;
        let protocol = session.protocol();
        Some((
            session.id,
            session.is_connected(),
            protocol.acked.len(),
            protocol.resources_sent,
            protocol.removals_sent,
        ))
    }

    /// Stops the agent (SIGTERM) and starts a new one over the same state directory.
    fn restart_agent(&mut self) {
        self.agent.terminate(Duration::from_secs(5)).unwrap();
        let controller = self.controller.as_ref().expect("controller running");
        self.agent = spawn_agent(&self.topology, controller, self.state.path());
    }

    fn client(&self) -> &Netns {
        self.topology.client()
    }

    fn node(&self) -> &Netns {
        self.topology.node()
    }

    fn tcp(&self, ns: &Netns, ip: &str, port: u16) -> Result<String, String> {
        tcp_request(ns, ip.parse::<IpAddr>().unwrap(), port).map_err(|e| e.to_string())
    }

    /// Which backends answered `n` requests, and from which client addresses.
    fn spread(
        &self,
        ns: &Netns,
        ip: &str,
        port: u16,
        n: usize,
        udp: bool,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut backends = BTreeSet::new();
        let mut peers = BTreeSet::new();
        for _ in 0..n {
            let addr: IpAddr = ip.parse().unwrap();
            let answer = if udp {
                udp_request(ns, addr, port)
            } else {
                tcp_request(ns, addr, port)
            }
            .unwrap_or_else(|e| panic!("{ip}:{port}: {e}"));
            // "backend-1 from 10.201.0.2:53422"
            let mut words = answer.split_whitespace();
            backends.insert(words.next().unwrap().to_string());
            let peer = words.nth(1).unwrap();
            peers.insert(peer.rsplit_once(':').unwrap().0.to_string());
        }
        (backends, peers)
    }

    async fn eventually(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !check(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The controller (in-process), listening on the node's own loopback where the agent
/// looks for it (`port` 0: any), fed by a manifests source on `dir`.
async fn start_controller(topology: &Topology, dir: &Path, port: u16) -> TestController {
    let listener = topology
        .node()
        .tcp_listener(SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let controller = TestController::start_on(listener, ComputeOptions::default())
        .await
        .unwrap();
    tokio::spawn(ManifestSource::new(dir).run(controller.updates.clone()));
    controller
}

/// The agent binary, inside the node namespace.
fn spawn_agent(topology: &Topology, controller: &TestController, state: &Path) -> NsChild {
    topology
        .node()
        .spawn([
            env!("CARGO_BIN_EXE_switchyard-agent-iptables"),
            "--controller",
            &controller.endpoint(),
            "--node-name",
            NODE,
            "--state-dir",
            state.to_str().unwrap(),
            "--query-listen",
            "127.0.0.1:0",
            "--healthz-listen",
            "127.0.0.1:0",
            "--disable-ipv6",
        ])
        .unwrap()
}

fn manifests_text(web_endpoints: &[u8]) -> String {
    manifests(web_endpoints)
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// A plain HTTP GET from inside `ns`: status line and body.
fn http_get(ns: &Netns, addr: SocketAddr) -> (String, String) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_balance_tcp_and_udp_over_every_backend_and_follow_endpoint_changes() {
    let cluster = Cluster::start().await;
    let all = set(&["backend-1", "backend-2", "backend-3"]);

    let (from_client, peers) = cluster.spread(cluster.client(), "10.96.0.10", 80, 40, false);
    assert_eq!(from_client, all, "TCP from the client namespace");
    assert_eq!(
        peers,
        set(&["10.201.0.2"]),
        "pod-bound cluster traffic keeps the client address"
    );
    let (from_node, _) = cluster.spread(cluster.node(), "10.96.0.10", 80, 40, false);
    assert_eq!(from_node, all, "TCP from the node itself (OUTPUT path)");
    let (udp, _) = cluster.spread(cluster.client(), "10.96.0.11", 53, 40, true);
    assert_eq!(udp, all, "UDP from the client namespace");

    // A Service without endpoints refuses at once instead of timing out.
    let started = Instant::now();
    let refused = tcp_request(
        cluster.client(),
        "10.96.0.12".parse::<IpAddr>().unwrap(),
        80,
    )
    .unwrap_err();
    assert!(refused.is_refused(), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // Removing an endpoint on disk stops traffic to it.
    write(
        &cluster.manifests.path().join("cluster.yaml"),
        &manifests_text(&[1, 2]),
    );
    cluster
        .eventually("backend-3 out of web", |c| {
            c.spread(c.client(), "10.96.0.10", 80, 20, false).0 == set(&["backend-1", "backend-2"])
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_traffic_with_local_policy_reaches_only_the_local_endpoint_and_keeps_the_source() {
    let cluster = Cluster::start().await;

    for (ip, port, what) in [
        ("10.201.0.1", 30080, "node port"),
        ("10.202.0.10", 80, "external IP"),
    ] {
        let (backends, peers) = cluster.spread(cluster.client(), ip, port, 20, false);
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
    // Cluster traffic to the same Service still uses every endpoint.
    let (internal, _) = cluster.spread(cluster.client(), "10.96.0.13", 80, 40, false);
    assert_eq!(internal, set(&["backend-1", "backend-2", "backend-3"]));

    let (status, body) = http_get(cluster.client(), "10.201.0.1:32100".parse().unwrap());
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("\"localEndpoints\": 1"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_sticks_to_one_backend() {
    let cluster = Cluster::start().await;
    let (backends, _) = cluster.spread(cluster.client(), "10.96.0.14", 80, 20, false);
    assert_eq!(backends.len(), 1, "{backends:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_or_losing_the_agent_and_the_controller_fails_no_connection() {
    let mut cluster = Cluster::start().await;
    let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let traffic =
        ConnectionLoop::start(cluster.client(), target, Duration::from_millis(20)).unwrap();
    assert!(traffic.wait_for_successes(10, PATIENCE));

    // The agent restarts: the rules stay in place throughout, and the new stream resumes
    // from the versions the agent read back from the kernel, so nothing is resent.
    let (before, _, held, _, _) = cluster.node_stream().expect("agent connected");
    cluster.restart_agent();
    cluster
        .eventually("the restarted agent's stream", |c| {
            c.node_stream()
                .is_some_and(|(id, connected, _, _, _)| id != before && connected)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, _, acked, sent, removed) = cluster.node_stream().unwrap();
    assert_eq!(acked, held, "the new stream holds every Service");
    assert_eq!(
        (sent, removed),
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
    write(
        &cluster.manifests.path().join("cluster.yaml"),
        &manifests_text(&[2, 3]),
    );
    cluster
        .eventually("backend-1 out of web after the reconnect", |c| {
            c.spread(c.client(), "10.96.0.10", 80, 20, false).0 == set(&["backend-2", "backend-3"])
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_added_on_disk_forwards_within_a_second() {
    let cluster = Cluster::start().await;
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
        tcp_request_with(cluster.client(), target, &quick).is_err(),
        "nothing answers before the Service exists"
    );
    let written = Instant::now();
    write(&cluster.manifests.path().join("fresh.yaml"), &fresh);
    // Poll every 10 ms: the figure is the time from the write to the first answer.
    let answer = loop {
        match tcp_request_with(cluster.client(), target, &quick) {
            Ok(answer) => break answer,
            Err(_) if written.elapsed() < PATIENCE => std::thread::sleep(Duration::from_millis(10)),
            Err(err) => panic!("fresh never answered: {err}"),
        }
    };
    let took = written.elapsed();
    eprintln!("manifest written to first answer through the new ClusterIP: {took:?}");
    assert!(answer.starts_with("backend-2 "), "{answer}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}
