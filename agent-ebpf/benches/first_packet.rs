//! First-packet cost of the eBPF dataplane: how many new TCP connections per second a
//! pod opens through a ClusterIP, with N = 0, 1,000 and 10,000 other Services in the
//! maps, against a direct connection to the backend from a process outside any
//! program's reach; and the iptables agent on the same state in the same run.
//! `cargo bench -p switchyard-agent-ebpf --bench first_packet` (as root; needs
//! `swy-probe`: `cargo build --release -p switchyard-integration --bin swy-probe`, or
//! `SWY_PROBE_BIN`).
//!
//! Socket-level balancing translates once, at connect(): the cost is one service lookup
//! and one slot lookup whatever N is, and no packet is translated afterwards. Clients are
//! `swy-probe` processes (a test thread cannot join a cgroup alone): one inside the cgroup
//! the programs are attached to, one in a cgroup without programs, both in the client
//! namespace; each connect is closed with an RST so no TIME_WAIT piles up.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use switchyard_agent_core::dataplane::Dataplane;
use switchyard_agent_ebpf::{Attach, EbpfConfig, EbpfDataplane};
use switchyard_agent_iptables::{IptablesConfig, IptablesDataplane};
use switchyard_integration::{
    bench::{accept_and_drop, median},
    cgroup::{Cgroup, CgroupProbe},
    netns::{Netns, Topology},
};

/// How long one rate measurement runs; the figure is the median of [`ROUNDS`].
const WINDOW: Duration = Duration::from_secs(2);
const ROUNDS: usize = 3;

/// Connections per second from `probe` to each target, windows interleaved (the
/// machine's drift hits every target alike), the median of [`ROUNDS`] per target;
/// conntrack tables are flushed before each window (a window opens more connections
/// than there are ephemeral ports).
fn rates<const N: usize>(
    probes: [(CgroupProbe<'_>, SocketAddr); N],
    namespaces: &[&Netns],
) -> [f64; N] {
    let mut runs: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(ROUNDS));
    for _ in 0..ROUNDS {
        for ((probe, target), samples) in probes.iter().zip(runs.iter_mut()) {
            for ns in namespaces {
                let _ = ns.exec(["conntrack", "-F"]);
            }
            samples.push(
                probe
                    .connect_rate(*target, WINDOW)
                    .unwrap_or_else(|e| panic!("connect {target}: {e}")),
            );
        }
    }
    runs.map(median)
}

fn main() {
    let topology = Topology::builder().backends(1).ipv6(false).build();
    let topology = topology.expect("a test topology (run as root, with iproute2)");
    let vip = SocketAddr::new(FIRST_PACKET_VIP.parse().unwrap(), 80);
    let direct = SocketAddr::new(
        FIRST_PACKET_BACKEND.parse().unwrap(),
        FIRST_PACKET_BACKEND_PORT,
    );
    accept_and_drop(topology.backend(1).ns(), direct).unwrap();
    let client = topology.client();
    let node = topology.node();
    client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        .unwrap();
    let namespaces = [client, node];

    let plain = Cgroup::create("plain").unwrap();
    let attached = Cgroup::create("ebpf").unwrap();
    let pins = PinDir::new();
    let config = EbpfConfig::new(Attach {
        bpffs: pins.path().to_path_buf(),
        cgroup: attached.path().to_path_buf(),
        devices: node_devices(&topology),
    });
    let [bare] = rates([(plain.probe(client), direct)], &namespaces);
    println!("direct, no programs and no rules: {bare:.0} connections/s");
    let mut ebpf = node
        .run(|| EbpfDataplane::new(config))
        .unwrap()
        .expect("eBPF dataplane");
    // Every eBPF figure before any iptables rule: a nat table leaves conntrack hooks
    // in the namespace, which would slow every later packet.
    for n in [0usize, 1000, 10000] {
        let want = first_packet_services(n);
        node.run(|| ebpf.apply(&want, &full()).unwrap()).unwrap();
        let [through_vip, direct_attached, direct_plain] = rates(
            [
                (attached.probe(client), vip),
                (attached.probe(client), direct),
                (plain.probe(client), direct),
            ],
            &namespaces,
        );
        println!(
            "eBPF n={n}: ClusterIP {through_vip:.0} connections/s = {:.0}% of a direct connection from the same cgroup ({direct_attached:.0}/s), {:.0}% of one from outside it ({direct_plain:.0}/s; no programs there but tc on the devices), {:.0}% of direct with no programs at all",
            100.0 * through_vip / direct_attached,
            100.0 * through_vip / direct_plain,
            100.0 * through_vip / bare,
        );
    }
    ebpf.cleanup().unwrap();
    // The iptables agent as its own bench sets it up, commands run in the node.
    let mut config = IptablesConfig {
        command_prefix: ["ip", "netns", "exec", node.name()]
            .map(String::from)
            .to_vec(),
        disable_ipv6: true,
        ..IptablesConfig::default()
    };
    config.render.cluster_cidrs = vec!["10.244.0.0/16".parse().unwrap()];
    let mut iptables = IptablesDataplane::new(config);
    for n in [0usize, 1000, 10000] {
        iptables.apply(&first_packet_services(n), &full()).unwrap();
        let [through_vip, direct_rules] = rates(
            [(plain.probe(client), vip), (plain.probe(client), direct)],
            &namespaces,
        );
        println!(
            "iptables ({:?}) n={n}: ClusterIP {through_vip:.0}/s = {:.0}% of direct across the same rules ({direct_rules:.0}/s), {:.0}% of direct with no rules",
            iptables.backend(),
            100.0 * through_vip / direct_rules,
            100.0 * through_vip / bare,
        );
    }
    iptables.cleanup().unwrap();
}
