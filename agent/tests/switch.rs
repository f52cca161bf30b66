//! Live dataplane switches with real packets on this machine's kernel: the
//! `switchyard-agent` binary on `--dataplane auto` in the node namespace, a connection
//! loop from a pod through a ClusterIP, and the Node's `switchyard.io/dataplane` label
//! flipped on disk. No connection may fail, and afterwards no object of the old
//! dataplane may be left in the kernel. (Switches involving IPVS run in user-mode Linux:
//! `switch_uml.rs`.)

mod common;

use std::{net::SocketAddr, time::Duration};

use common::PinDir;

use switchyard_integration::e2e::{AgentSpec, Cluster, PATIENCE};
use switchyard_proto::v1;

fn agent(pins: &PinDir) -> AgentSpec {
    AgentSpec::new(env!("CARGO_BIN_EXE_switchyard-agent"))
        .cgroup("--cgroup-path")
        .args([
            "--dataplane".to_string(),
            "auto".into(),
            "--disable-ipv6".into(),
            "--bpffs".into(),
            pins.path.display().to_string(),
            "--drift-interval".into(),
            "2s".into(),
        ])
}

/// switchyard's iptables chains in the node namespace.
fn iptables_chains(cluster: &Cluster) -> usize {
    let save = cluster.node().exec(["iptables-save"]).unwrap();
    save.lines().filter(|l| l.starts_with(":SWY-")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_and_ebpf_switch_both_ways_under_traffic_without_a_failed_connection() {
    let pins = PinDir::new();
    let cluster = Cluster::start(agent(&pins)).await;
    assert_eq!(cluster.dataplane_in_force(), Some(v1::Dataplane::Iptables));
    assert!(iptables_chains(&cluster) > 5, "iptables without a label");
    assert!(pins.pins().is_empty(), "no eBPF before the label asks");

    let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let traffic = cluster
        .pod()
        .connection_loop(target, Duration::from_millis(20))
        .unwrap();
    assert!(traffic.wait_for_successes(10, PATIENCE));

    cluster.switch_dataplane("ebpf", v1::Dataplane::Ebpf).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(iptables_chains(&cluster), 0, "iptables left nothing behind");
    assert!(!pins.pins().is_empty(), "eBPF's maps and links are pinned");

    cluster
        .switch_dataplane("iptables", v1::Dataplane::Iptables)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(iptables_chains(&cluster) > 5);
    assert!(
        pins.pins().is_empty(),
        "eBPF left nothing pinned: {:?}",
        pins.pins()
    );

    let stats = traffic.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert!(stats.succeeded > 50, "{stats:?}");
    // Both dataplanes served: every backend answered.
    assert_eq!(stats.by_backend.len(), 3, "{stats:?}");
}
