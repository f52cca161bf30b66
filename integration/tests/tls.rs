//! mTLS with node identity, end to end: the real controller server with certificates
//! made in the test, and real tonic clients presenting them.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use switchyard_controller::{
    compute::ComputeOptions,
    model::Object,
    server::{ServerOptions, ServerTls, TlsFiles, identity::DEFAULT_OPERATOR_GROUP},
};
use switchyard_integration::{
    controller::TestController,
    fixtures::{ip, node, service},
    pki::{Ca, CertFiles},
    sim_agent::SimAgent,
};
use switchyard_proto::v1::{self, controller_query_client::ControllerQueryClient};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig},
};

const WAIT: Duration = Duration::from_secs(10);

/// A CA, the controller's certificate, and a folder for more.
struct Pki {
    dir: TempDir,
    ca: Ca,
    ca_file: PathBuf,
    server: CertFiles,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let ca_file = ca.write(&dir.path().join("ca.crt"));
    let server = ca.server(dir.path(), "controller");
    Pki {
        dir,
        ca,
        ca_file,
        server,
    }
}

async fn tls_controller(pki: &Pki, poll: Duration) -> TestController {
    let tls = ServerTls::load(TlsFiles {
        cert: pki.server.cert.clone(),
        key: pki.server.key.clone(),
        client_ca: Some(pki.ca_file.clone()),
    })
    .unwrap();
    let options = ServerOptions {
        tls_poll: poll,
        ..TestController::server_options()
    }
    .with_tls(tls, DEFAULT_OPERATOR_GROUP);
    let controller = TestController::start_with_server(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ComputeOptions::default(),
        options,
    )
    .await
    .unwrap();
    controller
        .replace(
            "cluster",
            vec![
                Object::Node(node("node-a")),
                Object::Node(node("node-b")),
                Object::Service(service("web", ip(100))),
            ],
        )
        .await;
    controller
}

/// A TLS channel trusting `ca` and presenting `identity` (if any).
async fn channel(
    controller: &TestController,
    ca: &str,
    identity: Option<&CertFiles>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(identity) = identity {
        tls = tls.identity(identity.identity());
    }
    Channel::from_shared(controller.https_endpoint())
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn list_nodes(channel: Channel) -> Result<Vec<String>, Status> {
    Ok(ControllerQueryClient::new(channel)
        .list_nodes(v1::ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| n.node_name)
        .collect())
}

async fn node_state(channel: Channel, node: &str) -> Result<usize, Status> {
    Ok(ControllerQueryClient::new(channel)
        .get_node_state(v1::GetNodeStateRequest {
            node_name: node.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .resources
        .len())
}

/// Opens a stream for `node`; the controller's refusal, if any.
async fn stream(channel: Channel, node: &str) -> Result<SimAgent, Status> {
    SimAgent::open(channel, node, HashMap::new())
        .await
        .map_err(|e| e.downcast::<Status>().expect("a gRPC status"))
}

#[tokio::test]
async fn a_client_without_a_certificate_or_with_another_cas_is_refused_in_the_handshake() {
    let pki = pki();
    let controller = tls_controller(&pki, Duration::from_secs(60)).await;

    // No client certificate: the handshake fails (with TLS 1.3 the client may learn it
    // only when it first reads), so no call gets through.
    let refused = match channel(&controller, &pki.ca.pem(), None).await {
        Err(_) => true,
        Ok(channel) => list_nodes(channel).await.is_err(),
    };
    assert!(refused, "a client without a certificate got an answer");

    // A certificate of another CA, even with a node's name.
    let other = Ca::new("someone else");
    let forged = other.node(pki.dir.path(), "node-a");
    let refused = match channel(&controller, &pki.ca.pem(), Some(&forged)).await {
        Err(_) => true,
        Ok(channel) => list_nodes(channel).await.is_err(),
    };
    assert!(refused, "a certificate of another CA got an answer");

    // Plain text to a TLS port.
    let plain = SimAgent::connect(&controller.endpoint(), "node-a", HashMap::new()).await;
    assert!(plain.is_err());
    assert!(controller.sessions.is_empty(), "no stream was opened");
}

#[tokio::test]
async fn a_node_streams_its_own_state_and_is_refused_another_nodes_by_name() {
    let pki = pki();
    let controller = tls_controller(&pki, Duration::from_secs(60)).await;
    let node_a = pki.ca.node(pki.dir.path(), "node-a");
    let ca = pki.ca.pem();

    let mut agent = stream(
        channel(&controller, &ca, Some(&node_a)).await.unwrap(),
        "node-a",
    )
    .await
    .unwrap();
    let response = agent.sync(WAIT).await.unwrap();
    assert_eq!(response.resources.len(), 1);

    let refused = stream(
        channel(&controller, &ca, Some(&node_a)).await.unwrap(),
        "node-b",
    )
    .await
    .err()
    .expect("node-a's certificate may not stream node-b");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused
            .message()
            .starts_with(r#"certificate CN="system:node:node-a", O="system:nodes" may not stream the state of node node-b"#),
        "{}",
        refused.message()
    );

    // An operator is not a node.
    let operator = pki.ca.operator(pki.dir.path(), "alice");
    let refused = stream(
        channel(&controller, &ca, Some(&operator)).await.unwrap(),
        "node-a",
    )
    .await
    .err()
    .expect("an operator may not stream");
    assert_eq!(refused.code(), Code::PermissionDenied);

    // A node certificate naming its node by DNS SAN (O=system:nodes) may stream.
    let by_san = pki.ca.client(
        pki.dir.path(),
        "node-b-san",
        "node-b",
        Some("system:nodes"),
        &["node-b"],
    );
    let mut agent = stream(
        channel(&controller, &ca, Some(&by_san)).await.unwrap(),
        "node-b",
    )
    .await
    .unwrap();
    agent.sync(WAIT).await.unwrap();
}

#[tokio::test]
async fn queries_need_an_operator_and_a_node_reads_only_its_own_state() {
    let pki = pki();
    let controller = tls_controller(&pki, Duration::from_secs(60)).await;
    let ca = pki.ca.pem();
    let dir = pki.dir.path();
    let operator = pki.ca.operator(dir, "alice");
    let node_a = pki.ca.node(dir, "node-a");
    let stranger = pki.ca.client(dir, "mallory", "mallory", Some("devs"), &[]);

    let nodes = list_nodes(channel(&controller, &ca, Some(&operator)).await.unwrap())
        .await
        .unwrap();
    assert_eq!(nodes, ["node-a", "node-b"]);
    for who in [&node_a, &stranger] {
        let denied = list_nodes(channel(&controller, &ca, Some(who)).await.unwrap())
            .await
            .unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
        assert!(
            denied.message().contains("O=\"switchyard:operators\""),
            "{}",
            denied.message()
        );
    }

    assert_eq!(
        node_state(
            channel(&controller, &ca, Some(&node_a)).await.unwrap(),
            "node-a"
        )
        .await
        .unwrap(),
        1
    );
    let denied = node_state(
        channel(&controller, &ca, Some(&node_a)).await.unwrap(),
        "node-b",
    )
    .await
    .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("node-b"), "{}", denied.message());
    assert_eq!(
        node_state(
            channel(&controller, &ca, Some(&operator)).await.unwrap(),
            "node-b"
        )
        .await
        .unwrap(),
        1
    );
}

/// Writes `contents` to `path` the way cert-manager and kubelet do: a new file renamed
/// over the old one.
fn replace_file(path: &std::path::Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn rotated_certificates_and_client_ca_are_used_without_a_restart() {
    let pki = pki();
    let controller = tls_controller(&pki, Duration::from_millis(100)).await;
    let dir = pki.dir.path();
    let old_operator = pki.ca.operator(dir, "alice");
    let old_ca = pki.ca.pem();

    // A half-written certificate: the previous configuration stays in force.
    replace_file(&pki.server.cert, b"-----BEGIN CERTIFICATE-----\nMIIB");
    tokio::time::sleep(Duration::from_millis(500)).await;
    list_nodes(
        channel(&controller, &old_ca, Some(&old_operator))
            .await
            .unwrap(),
    )
    .await
    .expect("the old certificate still serves");

    // A new CA signs everything: the server certificate and the clients'.
    let new = Ca::new("rotated CA");
    let new_dir = tempfile::tempdir().unwrap();
    let new_server = new.server(new_dir.path(), "controller");
    let new_operator = new.operator(new_dir.path(), "alice");
    replace_file(&pki.ca_file, new.pem().as_bytes());
    replace_file(&pki.server.key, &std::fs::read(&new_server.key).unwrap());
    replace_file(&pki.server.cert, &std::fs::read(&new_server.cert).unwrap());

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let rotated = match channel(&controller, &new.pem(), Some(&new_operator)).await {
            Ok(channel) => list_nodes(channel).await.is_ok(),
            Err(_) => false,
        };
        if rotated {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificates were never used"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stale = match channel(&controller, &old_ca, Some(&old_operator)).await {
        Err(_) => true,
        Ok(channel) => list_nodes(channel).await.is_err(),
    };
    assert!(stale, "the old CA's clients are refused after the rotation");
}
