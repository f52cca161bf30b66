//! The query API against the real controller: every list in pages that together hold
//! everything once, answers that fit a default client's 4 MiB whatever the cluster, and
//! agent streams that keep flowing while a heavy query runs.

use std::{collections::HashMap, time::Duration};

use switchyard_controller::{model::Object, sources::StoreUpdate};
use switchyard_integration::{
    controller::TestController,
    fixtures::{self, endpoint, ip, node, service, slice},
    sim_agent::SimAgent,
};
use switchyard_proto::v1::{self, controller_query_client::ControllerQueryClient};
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);

async fn query(controller: &TestController) -> ControllerQueryClient<Channel> {
    // A default client: answers over 4 MiB fail to decode.
    ControllerQueryClient::connect(controller.endpoint())
        .await
        .unwrap()
}

#[tokio::test]
async fn every_list_comes_in_pages_that_together_hold_everything_once() {
    let controller = TestController::start().await.unwrap();
    controller
        .replace("cluster", fixtures::cluster(30, 40, 30))
        .await;
    for i in 0..12 {
        controller
            .send(StoreUpdate::Problem {
                origin: format!("bad-{i:02}.yaml"),
                object: None,
                message: format!("problem {i}"),
            })
            .await;
    }
    let mut agent = SimAgent::connect(&controller.endpoint(), "node-0003", HashMap::new())
        .await
        .unwrap();
    let mut acked = 0;
    while acked < 40 {
        acked += agent.sync(WAIT).await.unwrap().resources.len();
    }
    let mut query = query(&controller).await;

    let mut nodes = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = query
            .list_nodes(v1::ListNodesRequest {
                page_size: 7,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.nodes.len() <= 7);
        nodes.extend(page.nodes.into_iter().map(|n| n.node_name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 5);
    let expected: Vec<String> = (0..30).map(|n| format!("node-{n:04}")).collect();
    assert_eq!(nodes, expected);

    let mut resources = Vec::new();
    let mut acked_versions = HashMap::new();
    let mut token = String::new();
    loop {
        let page = query
            .get_node_state(v1::GetNodeStateRequest {
                node_name: "node-0003".into(),
                page_size: 9,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            page.status.unwrap().services,
            40,
            "the whole node's status on each page"
        );
        resources.extend(page.resources.into_iter().map(|r| r.name));
        for (name, version) in page.acked_versions {
            assert!(
                acked_versions.insert(name, version).is_none(),
                "listed once"
            );
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = (0..40).map(|s| format!("default/svc-{s:05}")).collect();
    assert_eq!(resources, expected);
    assert_eq!(acked_versions.len(), 40);

    let mut holders = Vec::new();
    let mut token = String::new();
    loop {
        let page = query
            .get_service(v1::GetServiceRequest {
                namespace: "default".into(),
                name: "svc-00001".into(),
                page_size: 4,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        holders.extend(page.nodes.into_iter().map(|n| n.node_name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(holders.len(), 30);

    let mut problems = Vec::new();
    let mut token = String::new();
    loop {
        let page = query
            .list_source_problems(v1::ListSourceProblemsRequest {
                page_size: 5,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        problems.extend(page.problems.into_iter().map(|p| p.origin));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = (0..12).map(|i| format!("bad-{i:02}.yaml")).collect();
    assert_eq!(problems, expected);

    let refused = query
        .list_nodes(v1::ListNodesRequest {
            page_size: 1,
            page_token: "x".repeat(20_000),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().len() < 100);
}

#[tokio::test]
async fn a_service_seen_by_many_nodes_comes_in_pages_a_default_client_can_read() {
    // 300 nodes, one Service with 2,000 endpoints: each node's copy is about 80 KB, so
    // all of them at once would be 24 MB.
    let controller = TestController::start().await.unwrap();
    let nodes: Vec<String> = (0..300).map(|n| format!("node-{n:04}")).collect();
    let mut objects: Vec<Object> = nodes.iter().map(|n| Object::Node(node(n))).collect();
    objects.push(Object::Service(service("big", ip(1))));
    let endpoints = (0..2000)
        .map(|i| endpoint(ip(100_000 + i), &nodes[i as usize % nodes.len()]))
        .collect();
    objects.push(Object::EndpointSlice(slice("big", endpoints)));
    controller.replace("cluster", objects).await;
    let mut query = query(&controller).await;
    let mut seen = 0;
    let mut pages = 0;
    let mut token = String::new();
    loop {
        let page = query
            .get_service(v1::GetServiceRequest {
                namespace: "default".into(),
                name: "big".into(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .expect("every page fits 4 MiB")
            .into_inner();
        pages += 1;
        seen += page.nodes.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, 300);
    assert!(pages >= 7, "{pages} pages");
}

#[tokio::test]
async fn agent_streams_keep_flowing_while_a_heavy_query_runs() {
    // This test runs the controller on one thread: were a query computed there, no
    // stream could be served until it finished.
    let controller = TestController::start().await.unwrap();
    controller
        .replace("cluster", fixtures::cluster(500, 2000, 1))
        .await;
    let mut agent = SimAgent::connect(&controller.endpoint(), "node-0001", HashMap::new())
        .await
        .unwrap();
    let mut held = 0;
    while held < 2000 {
        held += agent.sync(WAIT).await.unwrap().resources.len();
    }
    let mut query = query(&controller).await;
    let heavy = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        query
            .list_nodes(v1::ListNodesRequest {
                page_size: 500,
                page_token: String::new(),
            })
            .await
            .unwrap();
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let changed = tokio::time::Instant::now();
    controller
        .send(StoreUpdate::Upsert {
            origin: "cluster".into(),
            object: Object::Service(service("late", ip(9999))),
            at: std::time::SystemTime::now(),
        })
        .await;
    let response = agent.sync(WAIT).await.unwrap();
    let latency = changed.elapsed();
    assert_eq!(response.resources[0].name, "default/late");
    let query_took = heavy.await.unwrap();
    eprintln!("change seen after {latency:?}; the query took {query_took:?}");
    assert!(
        latency < query_took || latency < Duration::from_millis(500),
        "the change took {latency:?} while the query took {query_took:?}"
    );
}

/// `ListNodes` answers a node that holds exactly the desired state from what its stream
/// keeps (no pass over the node's Services); what it says must be what the full
/// computation of `GetNodeState` says, in sync and after a change is acknowledged.
#[tokio::test]
async fn list_nodes_says_of_an_in_sync_node_what_the_full_computation_says() {
    let controller = TestController::start().await.unwrap();
    let mut objects = fixtures::cluster(3, 300, 3);
    controller.replace("cluster", objects.clone()).await;
    let mut agent = SimAgent::connect(&controller.endpoint(), "node-0001", HashMap::new())
        .await
        .unwrap();
    let mut acked = 0;
    while acked < 300 {
        acked += agent.sync(WAIT).await.unwrap().resources.len();
    }
    let query = query(&controller).await;
    let compare = |mut query: ControllerQueryClient<Channel>| async move {
        let listed = query
            .list_nodes(v1::ListNodesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .nodes
            .into_iter()
            .find(|n| n.node_name == "node-0001")
            .unwrap();
        let full = query
            .get_node_state(v1::GetNodeStateRequest {
                node_name: "node-0001".into(),
                page_size: 1,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(listed, full);
        assert_eq!(listed.pending_changes, 0);
        assert_eq!(listed.desired_version, listed.acked_version);
        listed
    };
    let before = compare(query.clone()).await;

    // One Service removed and one endpoint moved: acknowledged, then listed alike.
    objects.retain(|o| !matches!(o, Object::Service(s) if s.key.name == "svc-00007"));
    controller.replace("cluster", objects).await;
    agent.sync(WAIT).await.unwrap();
    let after = compare(query.clone()).await;
    assert_ne!(after.desired_version, before.desired_version);
    assert_eq!(after.services, 299);
}
