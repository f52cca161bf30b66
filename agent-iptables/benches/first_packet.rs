//! First-packet cost of the iptables agent's rules: how many new TCP connections per
//! second a client opens through a ClusterIP, with N = 0, 1,000 and 10,000 other
//! Services programmed on the node, against a direct connection to the backend across
//! the same node. `cargo bench -p switchyard-agent-iptables --bench first_packet` (as
//! root).
//!
//! Only a connection's first packet walks the nat chains (later ones follow conntrack),
//! so the connect rate is where a long dispatch chain shows. Each connect is closed with
//! an RST so neither side piles up TIME_WAIT sockets. The measured Service sorts last in
//! the dispatch chain: the worst case of the linear walk that kube-proxy's iptables mode
//! also has. A direct connection's first packet walks the whole chain too (it matches no
//! VIP), so it is measured under each ruleset as well as with none.
//!
//! `SWY_BACKEND=legacy` measures iptables-legacy; the default is nft.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    FIRST_PACKET_BACKEND, FIRST_PACKET_BACKEND_PORT, FIRST_PACKET_VIP, first_packet_services, full,
};
use switchyard_agent_core::dataplane::Dataplane;
use switchyard_agent_iptables::{Backend, IptablesConfig, IptablesDataplane, RenderConfig};
use switchyard_integration::{
    bench::{accept_and_drop, connect_rate, median_of},
    netns::Topology,
};

const TARGET_VIP: &str = FIRST_PACKET_VIP;
const BACKEND: &str = FIRST_PACKET_BACKEND;
const BACKEND_PORT: u16 = FIRST_PACKET_BACKEND_PORT;
/// How long one rate measurement runs; the figure is the median of [`ROUNDS`].
const WINDOW: Duration = Duration::from_secs(2);
const ROUNDS: usize = 3;

fn main() {
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
    let vip: SocketAddr = format!("{TARGET_VIP}:80").parse().unwrap();
    let direct: SocketAddr = format!("{BACKEND}:{BACKEND_PORT}").parse().unwrap();
    let client = topology.client();

    let node = topology.node();
    client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        .unwrap();
    let rate = |target| {
        median_of(ROUNDS, || {
            connect_rate(client, &[client, node], None, target, WINDOW)
        })
    };
    let bare = rate(direct);
    println!("no rules: direct {bare:.0} connections/s");
    let mut dp = IptablesDataplane::new(IptablesConfig {
        render: RenderConfig {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..RenderConfig::default()
        },
        command_prefix: vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            node.name().into(),
        ],
        backend: std::env::var("SWY_BACKEND").ok().map(|b| {
            if b == "legacy" {
                Backend::Legacy
            } else {
                Backend::Nft
            }
        }),
        disable_ipv6: true,
        ..IptablesConfig::default()
    });
    for n in [0usize, 1000, 10000] {
        dp.apply(&first_packet_services(n), &full()).unwrap();
        let through_vip = rate(vip);
        let direct_now = rate(direct);
        println!(
            "{:?} n={n}: ClusterIP {through_vip:.0} connections/s ({:.0}% of direct without rules), direct across the same rules {direct_now:.0}/s",
            dp.backend(),
            100.0 * through_vip / bare
        );
    }
    dp.cleanup().unwrap();
}
