//! The iptables agent end to end with real packets: the shared scenarios of
//! `switchyard_integration::e2e` (controller in-process on a real manifests folder, the
//! `switchyard-agent-iptables` binary in a node network namespace, real TCP and UDP
//! traffic from client and node namespaces to three backend namespaces).

use switchyard_integration::e2e::{self, AgentSpec};

fn agent() -> AgentSpec {
    AgentSpec::new(env!("CARGO_BIN_EXE_switchyard-agent-iptables")).args(["--disable-ipv6"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_balance_tcp_and_udp_over_every_backend_and_follow_endpoint_changes() {
    e2e::cluster_ips_balance_tcp_and_udp_and_follow_endpoint_changes(agent()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_traffic_with_local_policy_reaches_only_the_local_endpoint_and_keeps_the_source() {
    e2e::external_traffic_with_local_policy_reaches_only_the_local_endpoint(agent()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_sticks_to_one_backend() {
    e2e::client_ip_affinity_sticks_to_one_backend(agent()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_or_losing_the_agent_and_the_controller_fails_no_connection() {
    e2e::restarting_or_losing_the_agent_and_the_controller_fails_no_connection(agent()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_added_on_disk_forwards_within_a_second() {
    e2e::a_service_added_on_disk_forwards_within_a_second(agent()).await;
}
