//! Live dataplane switches with real packets on this machine's kernel: the
//! `switchyard-agent` binary on `--dataplane auto` in the node namespace, a connection
//! loop from a pod through a ClusterIP, and the Node's `switchyard.io/dataplane` label
//! flipped on disk. No connection may fail, and afterwards no object of the old
//! dataplane may be left in the kernel. (Switches involving IPVS run in user-mode Linux:
//! `switch_uml.rs`.)

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

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

/// Whether the chain that keeps connection tracking on is in the node namespace.
fn conntrack_held(cluster: &Cluster) -> bool {
    common::conntrack_held(cluster, "iptables-save")
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
    assert!(conntrack_held(&cluster), "but kept connection tracking on");
    assert!(!pins.pins().is_empty(), "eBPF's maps and links are pinned");

    cluster
        .switch_dataplane("iptables", v1::Dataplane::Iptables)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(iptables_chains(&cluster) > 5);
    assert!(
        !conntrack_held(&cluster),
        "iptables tracks connections itself"
    );
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

/// A connection iptables translated, from outside the balanced cgroup, keeps going
/// through the switch to eBPF: its packets carry the Service address until the end, and
/// only conntrack's NAT entry sends them to the backend. A namespace where nothing but
/// the old rules used connection tracking would stop tracking when they go (the entry
/// would then be ignored); the hold the switch leaves behind keeps it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_iptables_translated_survives_the_switch_to_ebpf() {
    let pins = PinDir::new();
    let cluster = Cluster::start(agent(&pins)).await;
    assert_eq!(cluster.dataplane_in_force(), Some(v1::Dataplane::Iptables));
    assert!(
        !conntrack_held(&cluster),
        "no hold while iptables is in force"
    );
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let mut stream = cluster
        .client()
        .run(|| TcpStream::connect_timeout(&vip, Duration::from_secs(2)))
        .unwrap()
        .expect("connected through iptables");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    // A header line every 200 ms, during and after the switch: packets mid-stream, and
    // the backend (which waits 2 s for each line) keeps the request open.
    let stop = Arc::new(AtomicBool::new(false));
    let keepalive = {
        let mut stream = stream.try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                stream.write_all(b"X-Held: yes\r\n")?;
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })
    };
    cluster.switch_dataplane("ebpf", v1::Dataplane::Ebpf).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(iptables_chains(&cluster), 0, "iptables' rules are gone");
    assert!(conntrack_held(&cluster));
    stop.store(true, Ordering::Relaxed);
    keepalive.join().unwrap().expect("header lines written");
    stream.write_all(b"\r\n").unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("the backend answers the held connection after the switch");
    assert!(response.starts_with("HTTP/1.0 200"), "{response:?}");
    assert!(response.contains("backend-"), "{response:?}");
}
