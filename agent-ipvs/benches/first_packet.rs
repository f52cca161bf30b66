//! First-packet cost through IPVS: new TCP connections per second from the client
//! namespace through a ClusterIP with N = 0, 1,000 and 10,000 other Services programmed,
//! against a direct connection to the backend, with the iptables agent (legacy) measured
//! on the same kernel as the anchor (user-mode Linux when the host has no IPVS).
//! `cargo bench -p switchyard-agent-ipvs --bench first_packet` (as root).
//!
//! IPVS finds a virtual service by hash, so the rate should not depend on N; iptables
//! walks its dispatch chain linearly (the measured Service sorts last in it).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use switchyard_agent_core::{dataplane::Dataplane, fixtures::*, netfilter::Backend};
use switchyard_agent_iptables::{IptablesConfig, IptablesDataplane, RenderConfig};
use switchyard_agent_ipvs::{IpvsConfig, IpvsDataplane};
use switchyard_integration::{
    bench::{accept_and_drop, connect_rate, median_of},
    netns::Topology,
    uml,
};

const TARGET_VIP: &str = FIRST_PACKET_VIP;
const BACKEND: &str = FIRST_PACKET_BACKEND;
const BACKEND_PORT: u16 = FIRST_PACKET_BACKEND_PORT;
/// The client's second address, for direct connections.
const DIRECT_SOURCE: &str = "10.201.0.3";
const WINDOW: Duration = Duration::from_secs(2);
const ROUNDS: usize = 3;

fn run<D: Dataplane>(name: &str, topology: &Topology, make: impl FnOnce() -> D + Send) {
    let (client, node) = (topology.client(), topology.node());
    // Direct connections from an address of their own (see `connect_rate`).
    let rate = |source: Option<IpAddr>, target| {
        median_of(ROUNDS, || {
            connect_rate(client, &[client, node], source, target, WINDOW)
        })
    };
    let vip: SocketAddr = format!("{TARGET_VIP}:80").parse().unwrap();
    let direct: SocketAddr = format!("{BACKEND}:{BACKEND_PORT}").parse().unwrap();
    let own: IpAddr = DIRECT_SOURCE.parse().unwrap();
    let bare = rate(Some(own), direct);
    println!("{name}: no rules: direct {bare:.0} connections/s");
    let mut dp = node.run(make).unwrap();
    for n in [0usize, 1000, 10000] {
        let want = first_packet_services(n);
        node.run(|| dp.apply(&want, &full()).unwrap()).unwrap();
        let through_vip = rate(None, vip);
        let direct_now = rate(Some(own), direct);
        println!(
            "{name} n={n}: ClusterIP {through_vip:.0} connections/s ({:.0}% of direct without rules), direct across the same state {direct_now:.0}/s",
            100.0 * through_vip / bare
        );
    }
    node.run(|| dp.cleanup().unwrap()).unwrap();
}

fn main() {
    uml::main_in_ipvs_kernel(
        uml::Guest::new()
            .mem_mib(4096)
            .timeout(Duration::from_secs(1800)),
        || {
            let topology = Topology::builder()
                .backends(1)
                .ipv6(false)
                .build()
                .expect("topology (run as root)");
            accept_and_drop(
                topology.backend(1).ns(),
                SocketAddr::new(BACKEND.parse().unwrap(), BACKEND_PORT),
            )
            .unwrap();
            topology
                .client()
                .sysctl("net.ipv4.ip_local_port_range", "1024 65535")
                .unwrap();
            topology
                .client()
                .ip(["addr", "add", &format!("{DIRECT_SOURCE}/24"), "dev", "eth0"])
                .unwrap();
            run("IPVS", &topology, || {
                IpvsDataplane::new(IpvsConfig {
                    backend: Some(Backend::Legacy),
                    disable_ipv6: true,
                    ..IpvsConfig::default()
                })
                .unwrap()
            });
            run("iptables-legacy", &topology, || {
                IptablesDataplane::new(IptablesConfig {
                    render: RenderConfig {
                        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
                        ..RenderConfig::default()
                    },
                    backend: Some(Backend::Legacy),
                    disable_ipv6: true,
                    ..IptablesConfig::default()
                })
            });
        },
    );
}
