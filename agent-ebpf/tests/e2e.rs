//! The eBPF agent end to end with real packets: the shared scenarios of
//! `switchyard_integration::e2e` (controller in-process on a real manifests folder, the
//! `switchyard-agent-ebpf` binary in a node network namespace, attached to a cgroup the
//! cluster makes, real TCP and UDP traffic from pods, the node and the outside to three
//! backend namespaces), plus what only socket-level balancing shows. Each test pins its
//! maps and links in a bpffs of its own.

mod common;

use std::net::SocketAddr;

use common::{PinDir, assert_no_netfilter_objects};
use switchyard_integration::e2e::{self, AgentSpec, Cluster};

fn agent(pins: &PinDir) -> AgentSpec {
    AgentSpec::new(env!("CARGO_BIN_EXE_switchyard-agent-ebpf"))
        .cgroup("--cgroup-path")
        .args(["--bpffs".to_string(), pins.path().display().to_string()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_balance_tcp_and_udp_over_every_backend_and_follow_endpoint_changes() {
    let pins = PinDir::new();
    e2e::cluster_ips_balance_tcp_and_udp_and_follow_endpoint_changes(agent(&pins)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_traffic_with_local_policy_reaches_only_the_local_endpoint_and_keeps_the_source() {
    let pins = PinDir::new();
    e2e::external_traffic_with_local_policy_reaches_only_the_local_endpoint(agent(&pins)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_sticks_to_one_backend() {
    let pins = PinDir::new();
    e2e::client_ip_affinity_sticks_to_one_backend(agent(&pins)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_or_losing_the_agent_and_the_controller_fails_no_connection() {
    let pins = PinDir::new();
    e2e::restarting_or_losing_the_agent_and_the_controller_fails_no_connection(agent(&pins)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_added_on_disk_forwards_within_a_second() {
    let pins = PinDir::new();
    e2e::a_service_added_on_disk_forwards_within_a_second(agent(&pins)).await;
}

/// What only socket-level balancing shows: unconnected UDP replies and `getpeername`
/// carry the Service address, and no netfilter or IPVS object names any Service address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_see_the_service_address_and_no_netfilter_object_exists() {
    let pins = PinDir::new();
    let cluster = Cluster::start(agent(&pins)).await;
    let cgroup = cluster
        .cgroup
        .as_ref()
        .expect("the agent balances for a cgroup");
    let pod = cgroup.probe(cluster.topology.client());
    let dns: SocketAddr = "10.96.0.11:53".parse().unwrap();
    for _ in 0..5 {
        let (reply, from) = pod.udp_unconnected(dns).unwrap();
        assert_eq!(from, dns, "{reply}");
    }
    let web: SocketAddr = "10.96.0.10:80".parse().unwrap();
    assert_eq!(pod.tcp_peer(web).unwrap(), web);
    assert_eq!(
        cgroup.probe(cluster.topology.node()).tcp_peer(web).unwrap(),
        web
    );
    assert_no_netfilter_objects(
        cluster.topology.node(),
        &["10.96.0.1", "10.202.0.10", "30080", "8080"],
    );
}
