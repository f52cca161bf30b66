//! What the eBPF kernel tests and benches share: Service builders, a private pin
//! directory, and a lab (node, client and backend namespaces, a cgroup of the test's
//! own) with the dataplane attached inside the node namespace.
#![allow(dead_code)]

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use switchyard_agent_core::dataplane::{Change, Dataplane, Desired, DesiredService};
use switchyard_agent_ebpf::{Attach, EbpfConfig, EbpfDataplane, RenderConfig};
use switchyard_integration::{
    cgroup::{Cgroup, CgroupProbe},
    netns::{Backend, Netns, Topology},
};
use switchyard_proto::state::{
    EndpointState, PortState, Protocol, ServiceKey, ServiceState, TrafficPolicy,
};

pub fn ep(ip: &str, port: u16, local: bool) -> EndpointState {
    EndpointState {
        ip: ip.parse().unwrap(),
        port,
        node_name: Some(if local { "node-a" } else { "node-b" }.into()),
        local,
        ready: true,
        serving: true,
        terminating: false,
    }
}

pub fn port(name: &str, protocol: Protocol, port: u16, endpoints: Vec<EndpointState>) -> PortState {
    let usable_ipv4 = endpoints.iter().any(|e| e.ip.is_ipv4());
    let usable_ipv6 = endpoints.iter().any(|e| e.ip.is_ipv6());
    PortState {
        name: name.into(),
        protocol,
        port,
        node_port: None,
        cluster_endpoints: endpoints,
        local_endpoints: vec![],
        usable_ipv4,
        usable_ipv6,
    }
}

pub fn service(ns_name: &str, cluster_ips: &[&str], ports: Vec<PortState>) -> ServiceState {
    let (ns, name) = ns_name.split_once('/').unwrap();
    ServiceState {
        key: ServiceKey::new(ns, name),
        cluster_ips: cluster_ips
            .iter()
            .map(|ip| ip.parse::<IpAddr>().unwrap())
            .collect(),
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        ports,
        session_affinity_timeout: None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
        ipvs_scheduler: None,
        ebpf_lb: None,
    }
}

pub fn desired(state: ServiceState) -> DesiredService {
    DesiredService {
        version: version_of(&state),
        state,
    }
}

pub fn version_of(state: &ServiceState) -> u64 {
    switchyard_proto::state::version_hash(&state.into())
}

pub fn full() -> Change {
    Change {
        full: true,
        ..Change::default()
    }
}

pub fn upsert(names: &[&str]) -> Change {
    Change {
        upserted: names.iter().map(|n| n.to_string()).collect(),
        ..Change::default()
    }
}

pub fn remove(names: &[&str]) -> Change {
    Change {
        removed: names.iter().map(|n| n.to_string()).collect(),
        ..Change::default()
    }
}

/// Puts `state` into `want` under its name with its version.
pub fn put(want: &mut Desired, state: ServiceState) {
    want.insert(state.key.to_string(), desired(state));
}

/// `n` ClusterIP Services `bench/s<i>` with two endpoints each (one local), as the
/// benches program them (the same as the iptables benches).
pub fn bench_services(n: usize) -> Desired {
    let mut want = Desired::new();
    for i in 0..n {
        let ip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
        let a = format!("10.244.{}.{}", (i / 128) % 256, (i % 128) * 2);
        let b = format!("10.245.{}.{}", (i / 128) % 256, (i % 128) * 2);
        let s = service(
            &format!("bench/s{i}"),
            &[&ip],
            vec![port(
                "http",
                Protocol::Tcp,
                80,
                vec![ep(&a, 8080, true), ep(&b, 8080, false)],
            )],
        );
        want.insert(format!("bench/s{i}"), desired(s));
    }
    want
}

/// A private pin directory: a tempdir the dataplane mounts a bpffs on; on drop
/// everything pinned there is unpinned (detaching the programs) and the bpffs unmounted.
pub struct PinDir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("bpffs");
        Self { _tmp: tmp, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = switchyard_agent_ebpf::loader::cleanup(&self.path) {
            eprintln!("pin dir {}: {e}", self.path.display());
        }
    }
}

/// Every address of the lab's node netns the agent would attach to.
pub fn node_devices(topology: &Topology) -> Vec<String> {
    let mut devices = vec!["to-client".to_string()];
    devices.extend(
        topology
            .backends()
            .iter()
            .map(|b| format!("to-b{}", b.index())),
    );
    devices
}

/// A node namespace between a client and backends (integration's [`Topology`]), a
/// cgroup of the test's own whose processes get socket-level load balancing, and the
/// dataplane attached in the node namespace with its pins in a private directory.
pub struct Lab {
    pub dataplane: Option<EbpfDataplane>,
    pub config: EbpfConfig,
    pub backends: Vec<Backend>,
    pub cgroup: Cgroup,
    pub topology: Topology,
    pub pins: PinDir,
}

impl Lab {
    /// `n` backends (backend 1 local) serving TCP 8080 and UDP 5353.
    pub fn start(n: u8) -> Self {
        Self::start_with(n, |_| {})
    }

    pub fn start_with(n: u8, configure: impl FnOnce(&mut EbpfConfig)) -> Self {
        let topology = Topology::builder()
            .backends(n)
            .local_backend(1)
            .ipv6(true)
            .build()
            .expect("topology (run as root with iproute2)");
        let backends = topology.start_backends(&[8080], &[5353]).expect("backends");
        let cgroup = Cgroup::create("ebpf").expect("cgroup");
        let pins = PinDir::new();
        let mut config = EbpfConfig::new(Attach {
            bpffs: pins.path().to_path_buf(),
            cgroup: cgroup.path().to_path_buf(),
            devices: node_devices(&topology),
        });
        config.render = RenderConfig {
            node_ips: vec![topology.node_ip().into()],
            ..RenderConfig::default()
        };
        configure(&mut config);
        let mut lab = Self {
            dataplane: None,
            config,
            backends,
            cgroup,
            topology,
            pins,
        };
        lab.attach();
        lab
    }

    /// Creates the dataplane (again) in the node namespace: an agent (re)start.
    pub fn attach(&mut self) {
        let config = self.config.clone();
        let dp = self
            .topology
            .node()
            .run(move || EbpfDataplane::new(config))
            .unwrap()
            .expect("eBPF dataplane");
        self.dataplane = Some(dp);
    }

    pub fn dp(&mut self) -> &mut EbpfDataplane {
        self.dataplane.as_mut().expect("attached")
    }

    /// Applies a change from inside the node namespace (a full sync reads its addresses).
    pub fn apply(&mut self, want: &Desired, change: &Change) {
        let mut dp = self.dataplane.take().expect("attached");
        let (dp, outcome) = self
            .topology
            .node()
            .run(|| {
                let outcome = dp.apply(want, change);
                (dp, outcome)
            })
            .unwrap();
        self.dataplane = Some(dp);
        let outcome = outcome.expect("apply");
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    }

    /// Probes from a pod on the node: the client namespace, inside the cgroup.
    pub fn pod(&self) -> CgroupProbe<'_> {
        self.cgroup.probe(self.topology.client())
    }

    /// Probes from the node itself, inside the cgroup.
    pub fn host(&self) -> CgroupProbe<'_> {
        self.cgroup.probe(self.topology.node())
    }

    /// The client namespace as the outside world (not in the cgroup).
    pub fn outside(&self) -> &Netns {
        self.topology.client()
    }
}

/// "backend-2 from 10.201.0.2:4711" → ("backend-2", 10.201.0.2).
pub fn answer(text: &str) -> (String, IpAddr) {
    let mut words = text.split_whitespace();
    let name = words.next().unwrap_or_default().to_string();
    let peer: SocketAddr = words
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a swy-backend answer: {text:?}"));
    (name, peer.ip())
}

/// No iptables, nftables or IPVS object in the node namespace names a Service address.
pub fn assert_no_netfilter_objects(node: &Netns, needles: &[&str]) {
    let mut dumps = Vec::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        dumps.push(
            node.exec([tool])
                .unwrap_or_else(|e| panic!("{e} (install the Debian package iptables)")),
        );
    }
    dumps.push(
        node.exec(["nft", "list", "ruleset"])
            .unwrap_or_else(|e| panic!("{e} (install the Debian package nftables)")),
    );
    dumps.push(node.exec(["cat", "/proc/net/ip_vs"]).unwrap_or_default());
    for dump in dumps {
        for needle in needles {
            assert!(!dump.contains(needle), "{needle} appears in:\n{dump}");
        }
    }
}
