//! The IPVS agent end to end with real packets, on a real IPVS kernel (user-mode Linux
//! when the host has none): the shared scenarios of `switchyard_integration::e2e`, which
//! every agent passes — controller in-process on a real manifests folder, the
//! `switchyard-agent-ipvs` binary in a node namespace, TCP and UDP from client and node
//! namespaces to three backend namespaces.

use std::time::Duration;

use switchyard_integration::{
    e2e::{self, AgentSpec},
    uml::{Guest, in_ipvs_kernel_with},
};

fn agent() -> AgentSpec {
    AgentSpec::new(env!("CARGO_BIN_EXE_switchyard-agent-ipvs")).args(["--disable-ipv6"])
}

/// Runs one async scenario in an IPVS kernel.
fn scenario<F: Future<Output = ()>>(run: impl FnOnce(AgentSpec) -> F + Send) {
    let guest = Guest::new().mem_mib(2048).timeout(Duration::from_secs(300));
    in_ipvs_kernel_with(guest, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(agent()));
    });
}

#[test]
fn cluster_ips_balance_tcp_and_udp_over_every_backend_and_follow_endpoint_changes() {
    scenario(e2e::cluster_ips_balance_tcp_and_udp_and_follow_endpoint_changes);
}

#[test]
fn external_traffic_with_local_policy_reaches_only_the_local_endpoint_and_keeps_the_source() {
    scenario(e2e::external_traffic_with_local_policy_reaches_only_the_local_endpoint);
}

#[test]
fn client_ip_affinity_sticks_to_one_backend() {
    scenario(e2e::client_ip_affinity_sticks_to_one_backend);
}

#[test]
fn restarting_or_losing_the_agent_and_the_controller_fails_no_connection() {
    scenario(e2e::restarting_or_losing_the_agent_and_the_controller_fails_no_connection);
}

#[test]
fn a_service_added_on_disk_forwards_within_a_second() {
    scenario(|spec| async move {
        e2e::a_service_added_on_disk_forwards_within_a_second(spec).await;
    });
}

#[test]
fn a_real_server_deleted_by_hand_comes_back_within_the_drift_interval() {
    scenario(|spec| async move {
        let cluster = e2e::Cluster::start(spec.args(["--drift-interval", "2s"])).await;
        let reals = |c: &e2e::Cluster| {
            c.node()
                .exec(["ipvsadm", "-Ln", "-t", "10.96.0.10:80"])
                .unwrap()
        };
        assert!(reals(&cluster).contains("10.244.2.2:8080"));
        // Delete and look in one shell, before the next drift check can repair it.
        let after = cluster
            .node()
            .exec([
                "sh",
                "-c",
                "ipvsadm -d -t 10.96.0.10:80 -r 10.244.2.2:8080 && ipvsadm -Ln -t 10.96.0.10:80",
            ])
            .unwrap();
        assert!(!after.contains("10.244.2.2:8080"), "{after}");
        cluster
            .eventually("the deleted real server back", |c| {
                reals(c).contains("10.244.2.2:8080")
            })
            .await;
    });
}
