//! Live dataplane switches involving IPVS — with iptables, and with eBPF — with real
//! packets on a real IPVS kernel (user-mode Linux when the host has none): the `switchyard-agent` binary on
//! `--dataplane auto`, a connection loop from a pod through a ClusterIP, the Node label
//! flipped on disk. No connection may fail, and afterwards no object of the old dataplane
//! may be left in the kernel.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::PinDir;
use switchyard_integration::{
    e2e::{AgentSpec, Cluster, PATIENCE},
    netns::ProbeOptions,
    uml::{Guest, in_ipvs_kernel_with},
};
use switchyard_proto::v1;

fn run(body: impl AsyncFnOnce() + Send) {
    let guest = Guest::new().mem_mib(2048).timeout(Duration::from_secs(300));
    in_ipvs_kernel_with(guest, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(body());
    });
}

fn agent() -> AgentSpec {
    AgentSpec::new(env!("CARGO_BIN_EXE_switchyard-agent")).args([
        "--dataplane",
        "auto",
        "--disable-ipv6",
        "--drift-interval",
        "2s",
    ])
}

/// [`agent`] balancing for a cgroup of the cluster's own and pinning under `pins`, so it
/// can switch to eBPF too.
fn agent_with_ebpf(pins: &PinDir) -> AgentSpec {
    agent()
        .cgroup("--cgroup-path")
        .args(["--bpffs".to_string(), pins.path.display().to_string()])
}

/// What each netfilter dataplane owns in the node namespace: (iptables chains `SWY-`,
/// IPVS objects: virtual services, `SWYV-` chains, `SWY-` sets, the dummy device).
fn objects(cluster: &Cluster) -> (usize, usize) {
    let node = cluster.node();
    let save = node.exec(["iptables-legacy-save"]).unwrap();
    let iptables = save.lines().filter(|l| l.starts_with(":SWY-")).count();
    let ipvs_chains = save.lines().filter(|l| l.starts_with(":SWYV-")).count();
    let services = node
        .exec(["ipvsadm", "-Ln"])
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("TCP") || l.starts_with("UDP"))
        .count();
    let sets = node
        .exec(["ipset", "list", "-n"])
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("SWY-"))
        .count();
    let device = usize::from(node.exec(["ip", "link", "show", "swy-ipvs0"]).is_ok());
    (iptables, ipvs_chains + services + sets + device)
}

/// Limits that let a connection's SYN be sent twice (Linux retransmits it after 1 s), but
/// not three times (after 3 s): between IPVS and eBPF's socket-level balancing, a new
/// connection that reuses the source port of a connection IPVS still has an entry for
/// waits one retransmission (the README's "Switching a node's dataplane" says why). With
/// the default 1 s limit such a connection counts as failed: about one in six switches
/// from IPVS to eBPF under a connection every 8 ms.
fn one_syn_retransmission() -> ProbeOptions {
    ProbeOptions {
        connect_timeout: Duration::from_millis(2500),
        ..ProbeOptions::default()
    }
}

/// Switches the node and lets the old dataplane's cleanup settle.
async fn switch(cluster: &Cluster, label: &str, to: v1::Dataplane) {
    cluster.switch_dataplane(label, to).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[test]
fn iptables_and_ipvs_switch_both_ways_under_traffic_without_a_failed_connection() {
    run(async || {
        let cluster = Cluster::start(agent()).await;
        assert_eq!(cluster.dataplane_in_force(), Some(v1::Dataplane::Iptables));
        let (iptables, ipvs) = objects(&cluster);
        assert!(iptables > 5 && ipvs == 0, "iptables without a label");

        let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let traffic = cluster
            .pod()
            .connection_loop(target, Duration::from_millis(20))
            .unwrap();
        assert!(traffic.wait_for_successes(10, PATIENCE));

        switch(&cluster, "ipvs", v1::Dataplane::Ipvs).await;
        let (iptables, ipvs) = objects(&cluster);
        assert_eq!(iptables, 0, "iptables left nothing behind");
        assert!(ipvs > 10, "{ipvs} IPVS objects");

        switch(&cluster, "iptables", v1::Dataplane::Iptables).await;
        let (iptables, ipvs) = objects(&cluster);
        assert!(iptables > 5);
        assert_eq!(ipvs, 0, "IPVS left nothing behind");

        let stats = traffic.stop();
        assert_eq!(stats.failed, 0, "{:?}", stats.failures);
        assert!(stats.succeeded > 20, "{stats:?}");
    });
}

#[test]
fn ipvs_and_ebpf_switch_both_ways_under_traffic_without_a_failed_connection() {
    run(async || {
        let pins = PinDir::new();
        let cluster = Cluster::start(agent_with_ebpf(&pins)).await;
        let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let traffic = cluster
            .pod()
            .connection_loop_with(target, Duration::from_millis(20), one_syn_retransmission())
            .unwrap();
        assert!(traffic.wait_for_successes(10, PATIENCE));
        switch(&cluster, "ipvs", v1::Dataplane::Ipvs).await;
        assert!(pins.pins().is_empty(), "no eBPF before the label asks");

        switch(&cluster, "ebpf", v1::Dataplane::Ebpf).await;
        let (iptables, ipvs) = objects(&cluster);
        assert_eq!((iptables, ipvs), (0, 0), "IPVS left nothing behind");
        assert!(
            common::conntrack_held(&cluster, "iptables-legacy-save"),
            "but kept connection tracking on"
        );
        assert!(!pins.pins().is_empty(), "eBPF pinned its maps and links");

        switch(&cluster, "ipvs", v1::Dataplane::Ipvs).await;
        let (_, ipvs) = objects(&cluster);
        assert!(ipvs > 10, "{ipvs} IPVS objects");
        assert!(!common::conntrack_held(&cluster, "iptables-legacy-save"));
        assert!(
            pins.pins().is_empty(),
            "eBPF left nothing behind: {:?}",
            pins.pins()
        );

        let stats = traffic.stop();
        assert_eq!(stats.failed, 0, "{:?}", stats.failures);
        assert!(stats.succeeded > 20, "{stats:?}");
    });
}
