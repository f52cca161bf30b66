//! Services and kernel guards shared by the kernel tests.
#![allow(dead_code)]

use std::{
    net::IpAddr,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use switchyard_agent_core::dataplane::{Change, Desired, DesiredService};
use switchyard_agent_iptables::{Backend, IptablesConfig, IptablesDataplane, RenderConfig};
use switchyard_proto::state::{
    EndpointState, PortState, Protocol, ServiceKey, ServiceState, TrafficPolicy,
};

/// A network namespace that exists for the guard's lifetime (deleted on drop, even on
/// panic).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "swy-ipt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("`ip` (Debian package iproute2) is needed for kernel tests");
        assert!(status.success(), "ip netns add {name} failed (run as root)");
        let ns = Self { name };
        ns.sh("ip link set lo up");
        ns
    }

    pub fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .map(String::from)
            .to_vec()
    }

    /// Runs a shell command inside the namespace; panics on failure; returns stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

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

/// A Service exercising every rule kind: dual-stack, three endpoints with affinity,
/// UDP and SCTP ports, node port, external and load-balancer IPs with source ranges,
/// `externalTrafficPolicy: Local` with a health-check node port.
pub fn kitchen_sink() -> ServiceState {
    let mut s = service(
        "shop/front",
        &["10.96.0.20", "fd00:96::20"],
        vec![
            port(
                "http",
                Protocol::Tcp,
                80,
                vec![
                    ep("10.244.0.5", 8080, true),
                    ep("10.244.1.5", 8080, false),
                    ep("10.244.2.5", 8080, false),
                    ep("fd00:244::5", 8080, true),
                ],
            ),
            port("dns", Protocol::Udp, 53, vec![ep("10.244.0.5", 5353, true)]),
            port(
                "sig",
                Protocol::Sctp,
                3868,
                vec![ep("10.244.1.5", 3868, false)],
            ),
        ],
    );
    s.ports[0].node_port = Some(30080);
    s.ports[0].local_endpoints = vec![ep("10.244.0.5", 8080, true), ep("fd00:244::5", 8080, true)];
    s.ports[1].node_port = Some(30053);
    s.ports[1].local_endpoints = vec![ep("10.244.0.5", 5353, true)];
    // No local endpoint for SCTP: external traffic dropped, pod traffic short-circuits.
    s.ports[2].node_port = Some(30868);
    s.external_ips = vec!["192.0.2.10".parse().unwrap()];
    s.load_balancer_ips = vec![
        "198.51.100.10".parse().unwrap(),
        "2001:db8::10".parse().unwrap(),
    ];
    s.load_balancer_source_ranges = vec![
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:1::/48".parse().unwrap(),
    ];
    s.session_affinity_timeout = Some(10800);
    s.external_traffic_policy = TrafficPolicy::Local;
    s.health_check_node_port = Some(32000);
    s
}

/// The iptables dataplane programming `ns`, as the kernel tests and the bench use it.
pub fn dataplane(ns: &NetNs, backend: Backend) -> IptablesDataplane {
    dataplane_with_chunks(ns, backend, 0)
}

pub fn dataplane_with_chunks(
    ns: &NetNs,
    backend: Backend,
    chunk_chains: usize,
) -> IptablesDataplane {
    IptablesDataplane::new(IptablesConfig {
        command_prefix: ns.prefix(),
        ..config(backend, chunk_chains)
    })
}

/// The tests' configuration (cluster CIDR, a node IP), running commands unprefixed.
pub fn config(backend: Backend, chunk_chains: usize) -> IptablesConfig {
    IptablesConfig {
        chunk_chains,
        render: RenderConfig {
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/48".parse().unwrap(),
            ],
            node_ips: vec!["203.0.113.7".parse().unwrap()],
            ..RenderConfig::default()
        },
        backend: Some(backend),
        ..IptablesConfig::default()
    }
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

/// `n` ClusterIP Services `bench/s<i>` with two endpoints each (one local), as the
/// benches program them.
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
