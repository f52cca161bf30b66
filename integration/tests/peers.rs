//! What a hostile or broken peer controls on the delta stream, and the bounds the real
//! controller puts on it: names, declarations, message sizes, streams per peer, NACKs,
//! what a closed stream leaves behind, and nothing served before the source is synced.

use std::{collections::HashMap, time::Duration};

use switchyard_controller::{
    compute::ComputeOptions,
    model::Object,
    server::{
        ServerOptions,
        delta::{MAX_DECLARED, MAX_NACK_ERRORS, MAX_NACK_MESSAGE},
    },
    sources::StoreUpdate,
};
use switchyard_integration::{
    controller::TestController,
    fixtures::{ip, node, service},
    sim_agent::SimAgent,
};
use switchyard_proto::v1::{
    self, NodeIdentity, NodeStateRequest, controller_query_client::ControllerQueryClient,
};
use tokio::net::TcpListener;
use tonic::{Code, Status, transport::Channel};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(300);

async fn controller_with(server: ServerOptions) -> TestController {
    let controller = TestController::start_with_server(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ComputeOptions::default(),
        server,
    )
    .await
    .unwrap();
    controller
        .replace(
            "cluster",
            vec![
                Object::Node(node("node-a")),
                Object::Service(service("web", ip(100))),
                Object::Service(service("api", ip(101))),
            ],
        )
        .await;
    controller
}

async fn channel(controller: &TestController) -> Channel {
    Channel::from_shared(controller.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn first(node: &str, held: HashMap<String, String>) -> NodeStateRequest {
    NodeStateRequest {
        node: Some(NodeIdentity {
            node_name: node.into(),
            dataplane: v1::Dataplane::Iptables.into(),
            agent_version: "sim".into(),
        }),
        initial_resource_versions: held,
        ..Default::default()
    }
}

/// Opens a stream with `request` as its first message: the controller's refusal.
async fn refusal(controller: &TestController, request: NodeStateRequest) -> Status {
    match SimAgent::open_with(channel(controller).await, request).await {
        Ok(mut agent) => match agent.next(WAIT).await {
            Ok(response) => panic!("accepted: {response:?}"),
            Err(error) => error.downcast::<Status>().expect("a gRPC status"),
        },
        Err(error) => error.downcast::<Status>().expect("a gRPC status"),
    }
}

async fn list_nodes(controller: &TestController) -> Vec<v1::NodeStatus> {
    ControllerQueryClient::connect(controller.endpoint())
        .await
        .unwrap()
        .list_nodes(v1::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes
}

#[tokio::test]
async fn node_names_that_are_not_dns_subdomains_are_refused_without_echo_or_forged_lines() {
    let controller = controller_with(TestController::server_options()).await;
    let huge = "x".repeat(1 << 20);
    for name in [
        "node-a\n2026-01-01T00:00:00Z INFO forged line",
        "Node-A",
        "node a",
        "node-a/../../etc",
        huge.as_str(),
    ] {
        let status = refusal(&controller, first(name, HashMap::new())).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let message = status.message();
        assert!(message.starts_with("node.node_name \""), "{message}");
        assert!(!message.contains('\n'), "{message}");
        assert!(message.len() < 300, "bounded: {} bytes", message.len());
    }
    let status = refusal(&controller, NodeStateRequest::default()).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        controller.sessions.is_empty(),
        "nothing kept of refused streams"
    );
}

#[tokio::test]
async fn declarations_are_bounded_in_number_and_must_be_resource_names() {
    let controller = controller_with(TestController::server_options()).await;
    let too_many: HashMap<String, String> = (0..=MAX_DECLARED)
        .map(|i| (format!("ns/s{i}"), "0000000000000000".to_string()))
        .collect();
    let status = refusal(&controller, first("node-a", too_many)).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status.message(),
        format!(
            "initial_resource_versions holds {} entries, more than {MAX_DECLARED}",
            MAX_DECLARED + 1
        )
    );

    let forged = HashMap::from([("default/web\n-A INPUT -j ACCEPT".to_string(), String::new())]);
    let status = refusal(&controller, first("node-a", forged)).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(!status.message().contains('\n'), "{}", status.message());

    // Versions that do not parse are fine: they match nothing, so the resource is resent.
    let odd_version = HashMap::from([("default/web".to_string(), "not a version".to_string())]);
    let mut agent = SimAgent::open_with(channel(&controller).await, first("node-a", odd_version))
        .await
        .unwrap();
    let response = agent.sync(WAIT).await.unwrap();
    assert_eq!(response.resources.len(), 2);
}

#[tokio::test]
async fn a_message_over_the_size_bound_is_refused() {
    let controller = controller_with(TestController::server_options()).await;
    let mut request = first("node-a", HashMap::new());
    request.node.as_mut().unwrap().agent_version = "v".repeat(5 << 20);
    let status = refusal(&controller, request).await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().len() < 300, "{}", status.message());
}

#[tokio::test]
async fn a_long_agent_version_is_kept_cut_and_escaped() {
    let controller = controller_with(TestController::server_options()).await;
    let mut request = first("node-a", HashMap::new());
    request.node.as_mut().unwrap().agent_version = format!("v1\n{}", "x".repeat(10_000));
    let mut agent = SimAgent::open_with(channel(&controller).await, request)
        .await
        .unwrap();
    agent.sync(WAIT).await.unwrap();
    let nodes = list_nodes(&controller).await;
    let version = &nodes[0].agent_version;
    assert!(version.starts_with("v1\\n"), "{version}");
    assert!(version.chars().count() <= 140, "{}", version.len());
}

#[tokio::test]
async fn each_peer_holds_a_bounded_number_of_streams() {
    let controller = controller_with(ServerOptions {
        max_streams_per_peer: 2,
        ..TestController::server_options()
    })
    .await;
    let mut a = SimAgent::connect(&controller.endpoint(), "node-a", HashMap::new())
        .await
        .unwrap();
    a.sync(WAIT).await.unwrap();
    let mut b = SimAgent::connect(&controller.endpoint(), "node-b", HashMap::new())
        .await
        .unwrap();
    b.sync(WAIT).await.unwrap();
    let status = refusal(&controller, first("node-c", HashMap::new())).await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("already holds 2 agent streams"),
        "{}",
        status.message()
    );
    drop(b);
    // The slot frees once the controller sees the stream close.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(mut c) = SimAgent::connect(&controller.endpoint(), "node-c", HashMap::new()).await
            && c.sync(WAIT).await.is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_nack_is_kept_bounded_and_counts_only_for_resources_in_flight() {
    let controller = controller_with(TestController::server_options()).await;
    let mut agent = SimAgent::connect(&controller.endpoint(), "node-a", HashMap::new())
        .await
        .unwrap();
    let response = agent.next(WAIT).await.unwrap();
    // 200 errors of 10 KB for resources that were sent, and some for one that was not.
    let mut errors: Vec<v1::ResourceError> = (0..200)
        .map(|i| v1::ResourceError {
            resource_name: if i % 2 == 0 {
                "default/web"
            } else {
                "default/api"
            }
            .into(),
            message: format!("{i}\n{}", "e".repeat(10_000)),
        })
        .collect();
    errors.push(v1::ResourceError {
        resource_name: "default/never-sent".into(),
        message: "x".into(),
    });
    agent.nack(&response.nonce, errors).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let nack = loop {
        if let Some(nack) = list_nodes(&controller).await[0].last_nack.clone() {
            break nack;
        }
        assert!(tokio::time::Instant::now() < deadline, "no NACK recorded");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(nack.errors.len(), MAX_NACK_ERRORS);
    for error in &nack.errors {
        assert!(error.message.chars().count() <= MAX_NACK_MESSAGE + 1);
        assert!(!error.message.contains('\n'));
        assert_ne!(error.resource_name, "default/never-sent");
    }

    // An answer that names only resources not in flight is an ACK.
    let mut agent = SimAgent::connect(&controller.endpoint(), "node-a", HashMap::new())
        .await
        .unwrap();
    let response = agent.next(WAIT).await.unwrap();
    agent.apply(&response);
    agent
        .nack(
            &response.nonce,
            vec![v1::ResourceError {
                resource_name: "default/never-sent".into(),
                message: "x".into(),
            }],
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while list_nodes(&controller).await[0].pending_changes != 0 {
        assert!(tokio::time::Instant::now() < deadline, "never in sync");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_closed_stream_keeps_no_declarations_and_unknown_nodes_are_forgotten_after_the_grace_period()
 {
    let controller = controller_with(ServerOptions {
        session_grace: Duration::from_millis(300),
        ..TestController::server_options()
    })
    .await;
    let declared: HashMap<String, String> = (0..20_000)
        .map(|i| (format!("ns/svc-{i}"), "0123456789abcdef".to_string()))
        .collect();
    for node in ["ghost", "node-a"] {
        let mut agent = SimAgent::connect(&controller.endpoint(), node, declared.clone())
            .await
            .unwrap();
        agent.sync(WAIT).await.unwrap();
        drop(agent);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let closed = ["ghost", "node-a"].iter().all(|node| {
            controller
                .sessions
                .get(node)
                .is_none_or(|s| !s.is_connected())
        });
        if closed {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "streams never closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for session in controller.sessions.all() {
        let protocol = session.protocol();
        assert!(
            protocol.acked.is_empty() && protocol.acked.reserved() == 0,
            "{}",
            session.node
        );
    }
    // The node outside the cluster goes; the cluster's node stays listed, disconnected.
    let deadline = tokio::time::Instant::now() + WAIT;
    while controller.sessions.get("ghost").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ghost never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let nodes = list_nodes(&controller).await;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_name, "node-a");
    assert!(!nodes[0].connected);
    assert!(
        !nodes[0].acked_version.is_empty(),
        "what it held is summarised"
    );
}

#[tokio::test]
async fn no_stream_is_served_before_the_source_is_synced() {
    let controller = TestController::start_unsynced(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        ComputeOptions::default(),
        TestController::server_options(),
    )
    .await
    .unwrap();
    controller
        .replace("services", vec![Object::Service(service("web", ip(100)))])
        .await;
    let mut agent = SimAgent::connect(&controller.endpoint(), "node-a", HashMap::new())
        .await
        .unwrap();
    assert!(
        agent.receives_within(QUIET).await.is_none(),
        "a half-listed cluster was served"
    );
    controller
        .replace("nodes", vec![Object::Node(node("node-a"))])
        .await;
    controller.send(StoreUpdate::Synced).await;
    let response = agent.next(WAIT).await.unwrap();
    assert_eq!(response.resources.len(), 1);
}
