//! The agent runtime over mTLS to the real controller, with certificates made in the
//! test: a node's certificate streams its own node; another node's name is refused and
//! the agent keeps its kernel as it is; `--dry-run`'s query reads the node's own state.

use std::time::Duration;

use switchyard_agent_core::{
    AgentArgs,
    client::ClientTls,
    testing::{MemoryKernel, start_memory_agent_tls},
};
use switchyard_controller::{
    compute::ComputeOptions,
    server::{ServerTls, TlsFiles, identity::DEFAULT_OPERATOR_GROUP},
};
use switchyard_integration::{controller::TestController, fixtures, pki::Ca};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(20);

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_agent_with_its_node_certificate_syncs_and_one_naming_another_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let ca_file = ca.write(&dir.path().join("ca.crt"));
    let server = ca.server(dir.path(), "controller");
    let tls = ServerTls::load(TlsFiles {
        cert: server.cert,
        key: server.key,
        client_ca: Some(ca_file.clone()),
    })
    .unwrap();
    let controller = TestController::start_with_server(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ComputeOptions::default(),
        TestController::server_options().with_tls(tls, DEFAULT_OPERATOR_GROUP),
    )
    .await
    .unwrap();
    // Two nodes, five Services, an endpoint each.
    controller.replace("test", fixtures::cluster(2, 5, 1)).await;

    let node = ca.node(dir.path(), "node-0000");
    let client_tls = ClientTls {
        ca: Some(ca_file.clone()),
        cert: Some(node.cert.clone()),
        key: Some(node.key.clone()),
    };
    let kernel = MemoryKernel::default();
    let state = tempfile::tempdir().unwrap();
    let agent = start_memory_agent_tls(
        controller.https_endpoint(),
        client_tls.clone(),
        "node-0000",
        &kernel,
        state.path(),
    )
    .await;
    eventually("every Service is in the kernel", || {
        kernel.versions().len() == 5
    })
    .await;
    assert!(agent.connected());

    // The same certificate, another node's name: refused, and the kernel is untouched.
    let other_kernel = MemoryKernel::default();
    let other_state = tempfile::tempdir().unwrap();
    let impostor = start_memory_agent_tls(
        controller.https_endpoint(),
        client_tls.clone(),
        "node-0001",
        &other_kernel,
        other_state.path(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!impostor.connected());
    assert_eq!(other_kernel.apply_count(), 0);
    assert!(controller.sessions.get("node-0001").is_none());

    // --dry-run reads the node's own state through the query API, every page of it.
    let args = <AgentArgs as clap::FromArgMatches>::from_arg_matches(
        &<AgentArgs as clap::Args>::augment_args(clap::Command::new("agent")).get_matches_from([
            "agent",
            "--controller",
            &controller.https_endpoint(),
            "--node-name",
            "node-0000",
            "--ca",
            ca_file.to_str().unwrap(),
            "--tls-cert",
            node.cert.to_str().unwrap(),
            "--tls-key",
            node.key.to_str().unwrap(),
        ]),
    )
    .unwrap();
    let desired = switchyard_agent_core::desired_from_controller(&args)
        .await
        .unwrap();
    assert_eq!(desired.len(), 5);
    let mut other = args.clone();
    other.node_name = Some("node-0001".into());
    let refused = switchyard_agent_core::desired_from_controller(&other)
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("may not read the state of node node-0001"),
        "{refused:#}"
    );
}
