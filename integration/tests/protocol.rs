//! The delta protocol over loopback with a real tonic client: initial sync, one change
//! reaching exactly the affected nodes, resume, NACK, stalled agents, superseded streams.

use std::{collections::HashMap, time::Duration};

use switchyard_controller::model::{Object, TrafficPolicy};
use switchyard_integration::{
    controller::TestController,
    fixtures::{endpoint, ip, node, service, slice},
    sim_agent::SimAgent,
};
use switchyard_proto::v1::{self, controller_query_client::ControllerQueryClient};

const WAIT: Duration = Duration::from_secs(10);
/// How long to wait before concluding that nothing more will arrive.
const QUIET: Duration = Duration::from_millis(300);

/// Three nodes; `web` with an endpoint on each; `local-only` (a ClusterIP Service with
/// internalTrafficPolicy Local, so only the local set matters) with one endpoint on
/// node-b. An externally reachable Service would keep its cluster set too, as
/// kube-proxy does for short-circuiting.
fn three_node_cluster(web_endpoints: usize) -> Vec<Object> {
    let mut local_only = service("local-only", ip(200));
    local_only.internal_traffic_policy = TrafficPolicy::Local;
    let nodes = ["node-a", "node-b", "node-c"];
    let web_eps = (0..web_endpoints)
        .map(|i| endpoint(ip(1000 + i as u32), nodes[i % 3]))
        .collect();
    vec![
        Object::Node(node("node-a")),
        Object::Node(node("node-b")),
        Object::Node(node("node-c")),
        Object::Service(service("web", ip(100))),
        Object::EndpointSlice(slice("web", web_eps)),
        Object::Service(local_only),
        Object::EndpointSlice(slice("local-only", vec![endpoint(ip(2000), "node-b")])),
    ]
}

/// A controller holding `three_node_cluster(3)` and an agent for `node` connected to
/// it, before its first response.
async fn cluster_with_agent(node: &str) -> (TestController, SimAgent) {
    let controller = TestController::start().await.unwrap();
    controller.replace("cluster", three_node_cluster(3)).await;
    let agent = SimAgent::connect(&controller.endpoint(), node, HashMap::new())
        .await
        .unwrap();
    (controller, agent)
}

async fn synced_agents(controller: &TestController, nodes: &[&str]) -> Vec<SimAgent> {
    let mut agents = Vec::new();
    for n in nodes {
        let mut agent = SimAgent::connect(&controller.endpoint(), n, HashMap::new())
            .await
            .unwrap();
        agent.sync(WAIT).await.unwrap();
        agents.push(agent);
    }
    agents
}

#[tokio::test]
async fn initial_sync_sends_every_service_with_endpoints_selected_for_the_node() {
    let controller = TestController::start().await.unwrap();
    controller.replace("cluster", three_node_cluster(3)).await;
    let mut agent = SimAgent::connect(&controller.endpoint(), "node-b", HashMap::new())
        .await
        .unwrap();
    let response = agent.sync(WAIT).await.unwrap();

    let names: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["default/local-only", "default/web"]);
    assert!(response.removed_resources.is_empty());
    assert!(!response.nonce.is_empty());
    let web = &agent.held["default/web"].1;
    assert_eq!(web.cluster_ips, ["10.0.0.100"]);
    assert_eq!(web.ports[0].cluster_endpoints.len(), 3);
    let local = &agent.held["default/local-only"].1;
    assert_eq!(
        local.ports[0].local_endpoints.len(),
        1,
        "node-b hosts the only endpoint"
    );
    assert!(local.ports[0].local_endpoints[0].local);
    for resource in &response.resources {
        let expected = switchyard_proto::resource_version(resource.service.as_ref().unwrap());
        assert_eq!(resource.version, expected, "version is the content hash");
    }
    assert!(
        agent.receives_within(QUIET).await.is_none(),
        "nothing more after an ACK with no change"
    );
}

#[tokio::test]
async fn one_endpoint_change_sends_exactly_one_resource_to_each_affected_node_and_none_to_others() {
    let controller = TestController::start().await.unwrap();
    controller.replace("cluster", three_node_cluster(3)).await;
    let mut agents = synced_agents(&controller, &["node-a", "node-b", "node-c"]).await;

    // A fourth web endpoint changes web's cluster set on every node.
    controller.replace("cluster", three_node_cluster(4)).await;
    for agent in &mut agents {
        let response = agent.sync(WAIT).await.unwrap();
        let names: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["default/web"], "{}", agent.node);
        assert!(response.removed_resources.is_empty());
    }

    // Moving local-only's endpoint from node-b to node-c changes only those two nodes.
    let mut objects = three_node_cluster(4);
    objects.pop();
    objects.push(Object::EndpointSlice(slice(
        "local-only",
        vec![endpoint(ip(2000), "node-c")],
    )));
    controller.replace("cluster", objects).await;
    for agent in &mut agents {
        if agent.node == "node-a" {
            assert!(
                agent.receives_within(QUIET).await.is_none(),
                "node-a sees local-only the same"
            );
        } else {
            let response = agent.sync(WAIT).await.unwrap();
            let names: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names, ["default/local-only"], "{}", agent.node);
        }
    }
    assert_eq!(
        agents[2].held["default/local-only"].1.ports[0]
            .local_endpoints
            .len(),
        1
    );
    assert!(
        agents[1].held["default/local-only"].1.ports[0]
            .local_endpoints
            .is_empty()
    );
}

#[tokio::test]
async fn a_reconnecting_agent_with_its_versions_receives_only_what_differs() {
    let (controller, mut agent) = cluster_with_agent("node-a").await;
    agent.sync(WAIT).await.unwrap();
    let held = agent.versions();
    drop(agent);

    // Same state: the resumed stream sends nothing at all.
    let mut resumed = SimAgent::connect(&controller.endpoint(), "node-a", held.clone())
        .await
        .unwrap();
    assert!(
        resumed.receives_within(QUIET).await.is_none(),
        "nothing differs, nothing is sent"
    );
    drop(resumed);

    // While disconnected, web changes and local-only disappears; the agent also claims a
    // resource the cluster never had.
    let mut objects = three_node_cluster(4);
    objects.truncate(5);
    controller.replace("cluster", objects).await;
    let mut held = held;
    held.insert("default/ghost".into(), "0123456789abcdef".into());
    let mut resumed = SimAgent::connect(&controller.endpoint(), "node-a", held)
        .await
        .unwrap();
    let response = resumed.next(WAIT).await.unwrap();
    let names: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["default/web"]);
    assert_eq!(
        response.removed_resources,
        ["default/ghost", "default/local-only"]
    );
}

#[tokio::test]
async fn upserts_of_new_services_come_before_changes_and_removals_come_last() {
    let (controller, mut agent) = cluster_with_agent("node-a").await;
    agent.sync(WAIT).await.unwrap();

    let mut objects = three_node_cluster(4);
    objects.truncate(5); // drops local-only
    objects.push(Object::Service(service("api", ip(300))));
    controller.replace("cluster", objects).await;
    let response = agent.next(WAIT).await.unwrap();
    let names: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["default/api", "default/web"], "new before modified");
    assert_eq!(response.removed_resources, ["default/local-only"]);
}

#[tokio::test]
async fn a_nack_leaves_the_version_uncommitted_and_shows_in_the_query_api() {
    let (controller, mut agent) = cluster_with_agent("node-a").await;
    let response = agent.next(WAIT).await.unwrap();
    let error = v1::ResourceError {
        resource_name: "default/web".into(),
        message: "iptables-restore: exit 2".into(),
    };
    agent.nack(&response.nonce, vec![error]).await.unwrap();

    let mut query = ControllerQueryClient::connect(controller.endpoint())
        .await
        .unwrap();
    let state = tokio::time::timeout(WAIT, async {
        loop {
            let state = query
                .get_node_state(v1::GetNodeStateRequest {
                    node_name: "node-a".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if state.status.as_ref().is_some_and(|s| s.last_nack.is_some()) {
                break state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the NACK shows in the query API");
    let status = state.status.unwrap();
    assert_eq!(status.pending_changes, 1, "web is not acknowledged");
    assert_eq!(
        status.last_nack.unwrap().errors[0].message,
        "iptables-restore: exit 2"
    );
    assert!(state.acked_versions.contains_key("default/local-only"));
    assert!(!state.acked_versions.contains_key("default/web"));
    assert_ne!(status.acked_version, status.desired_version);
    // The rejected version is not resent until it changes.
    assert!(agent.receives_within(QUIET).await.is_none());

    controller.replace("cluster", three_node_cluster(4)).await;
    let retry = agent.sync(WAIT).await.unwrap();
    assert_eq!(retry.resources.len(), 1);
    assert_eq!(retry.resources[0].name, "default/web");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = query
        .list_nodes(v1::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.node_name == "node-a")
        .unwrap();
    assert_eq!(status.pending_changes, 0);
    assert_eq!(status.acked_version, status.desired_version);
    assert!(status.connected);
}

#[tokio::test]
async fn a_stalled_agent_does_not_delay_a_hundred_others() {
    let controller = TestController::start().await.unwrap();
    let mut objects = three_node_cluster(3);
    objects.extend((0..100).map(|i| Object::Node(node(&format!("n{i:03}")))));
    controller.replace("cluster", objects.clone()).await;

    // The stalled agent receives its first response and never answers nor reads again.
    let mut stalled = SimAgent::connect(&controller.endpoint(), "node-a", HashMap::new())
        .await
        .unwrap();
    let first = stalled.next(WAIT).await.unwrap();
    let mut agents = Vec::new();
    for i in 0..100 {
        let mut agent =
            SimAgent::connect(&controller.endpoint(), &format!("n{i:03}"), HashMap::new())
                .await
                .unwrap();
        agent.sync(WAIT).await.unwrap();
        agents.push(agent);
    }
    for round in 4..7 {
        objects[4] = Object::EndpointSlice(slice(
            "web",
            (0..round)
                .map(|i| endpoint(ip(1000 + i), "node-b"))
                .collect(),
        ));
        controller.replace("cluster", objects.clone()).await;
        let started = std::time::Instant::now();
        for agent in &mut agents {
            let response = agent.sync(WAIT).await.unwrap();
            assert_eq!(response.resources.len(), 1);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "round {round} took {:?}",
            started.elapsed()
        );
    }
    // Nothing was queued for the agent that never answered...
    assert!(
        stalled.receives_within(QUIET).await.is_none(),
        "nothing is queued for an agent that did not ACK"
    );
    // ...and once it answers, one response brings it to the latest state.
    stalled.apply(&first);
    stalled.ack(&first.nonce).await.unwrap();
    let catch_up = stalled.sync(WAIT).await.unwrap();
    assert_eq!(catch_up.resources.len(), 1, "only web changed since");
    let web = &stalled.held["default/web"].1;
    assert_eq!(
        web.ports[0].cluster_endpoints.len(),
        6,
        "the last round, not an earlier one"
    );
    assert!(stalled.receives_within(QUIET).await.is_none());
}

#[tokio::test]
async fn a_lagging_agent_receives_the_latest_state_not_every_step() {
    let (controller, mut agent) = cluster_with_agent("node-a").await;
    let first = agent.next(WAIT).await.unwrap();
    for n in 4..10 {
        controller.replace("cluster", three_node_cluster(n)).await;
    }
    agent.apply(&first);
    agent.ack(&first.nonce).await.unwrap();
    let catch_up = agent.sync(WAIT).await.unwrap();
    assert_eq!(catch_up.resources.len(), 1);
    assert_eq!(
        agent.held["default/web"].1.ports[0].cluster_endpoints.len(),
        9
    );
    assert!(agent.receives_within(QUIET).await.is_none());
}

#[tokio::test]
async fn a_newer_stream_for_the_same_node_closes_the_older_with_a_clear_status() {
    let controller = TestController::start().await.unwrap();
    controller.replace("cluster", three_node_cluster(3)).await;
    let mut old = SimAgent::connect(&controller.endpoint(), "node-a", HashMap::new())
        .await
        .unwrap();
    old.sync(WAIT).await.unwrap();
    let mut new = SimAgent::connect(&controller.endpoint(), "node-a", HashMap::new())
        .await
        .unwrap();
    new.sync(WAIT).await.unwrap();
    let error = old.next(WAIT).await.unwrap_err();
    let status = error
        .downcast_ref::<tonic::Status>()
        .expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::Aborted);
    assert!(
        status.message().contains("newer stream for node node-a"),
        "{}",
        status.message()
    );
    // The newer stream still works.
    controller.replace("cluster", three_node_cluster(4)).await;
    new.sync(WAIT).await.unwrap();
}

#[tokio::test]
async fn a_stream_that_does_not_name_its_node_is_refused() {
    let controller = TestController::start().await.unwrap();
    let mut agent = SimAgent::connect(&controller.endpoint(), "", HashMap::new()).await;
    let error = match agent.as_mut() {
        Ok(agent) => agent.next(WAIT).await.unwrap_err(),
        Err(_) => agent.err().unwrap(),
    };
    let status = error
        .downcast_ref::<tonic::Status>()
        .expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn the_query_api_shows_one_service_across_nodes_and_source_problems() {
    let controller = TestController::start().await.unwrap();
    controller.replace("cluster", three_node_cluster(3)).await;
    controller
        .send(switchyard_controller::sources::StoreUpdate::Problem {
            origin: "broken.yaml".into(),
            object: None,
            message: "line 3: mapping values are not allowed here".into(),
        })
        .await;
    let _agent = synced_agents(&controller, &["node-b"]).await;
    let mut query = ControllerQueryClient::connect(controller.endpoint())
        .await
        .unwrap();

    let service = query
        .get_service(v1::GetServiceRequest {
            namespace: "default".into(),
            name: "local-only".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let nodes: Vec<_> = service.nodes.iter().map(|n| n.node_name.as_str()).collect();
    assert_eq!(nodes, ["node-a", "node-b", "node-c"]);
    let b = &service.nodes[1];
    assert_eq!(
        b.resource.as_ref().unwrap().service.as_ref().unwrap().ports[0]
            .local_endpoints
            .len(),
        1
    );
    assert_eq!(b.acked_version, b.resource.as_ref().unwrap().version);
    assert!(
        service.nodes[0].acked_version.is_empty(),
        "node-a has no agent"
    );

    let missing = query
        .get_service(v1::GetServiceRequest {
            namespace: "default".into(),
            name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let problems = query
        .list_source_problems(v1::ListSourceProblemsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(problems.problems.len(), 1);
    assert_eq!(problems.problems[0].origin, "broken.yaml");

    let nodes = query
        .list_nodes(v1::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 3);
    let b = nodes.iter().find(|n| n.node_name == "node-b").unwrap();
    assert!(b.connected && b.in_cluster);
    assert_eq!(b.dataplane(), v1::Dataplane::Iptables);
    assert_eq!(b.services, 2);
    let a = nodes.iter().find(|n| n.node_name == "node-a").unwrap();
    assert!(!a.connected);
    assert_eq!(a.pending_changes, 2);
}

#[tokio::test]
async fn a_large_sync_arrives_in_bounded_responses_with_removals_in_the_last() {
    let controller = TestController::start().await.unwrap();
    controller
        .replace(
            "cluster",
            switchyard_integration::fixtures::cluster(3, 600, 2),
        )
        .await;
    let held = HashMap::from([("default/ghost".to_string(), "0123456789abcdef".to_string())]);
    let mut agent = SimAgent::connect(&controller.endpoint(), "node-0000", held)
        .await
        .unwrap();
    let mut sizes = Vec::new();
    let mut removals = Vec::new();
    while let Some(response) = agent.receives_within(QUIET).await {
        sizes.push(response.resources.len());
        removals.push(response.removed_resources.clone());
        agent.apply(&response);
        agent.ack(&response.nonce).await.unwrap();
    }
    assert_eq!(sizes, [256, 256, 88]);
    assert_eq!(
        removals,
        [vec![], vec![], vec!["default/ghost".to_string()]]
    );
    assert_eq!(agent.held.len(), 600);
}

#[tokio::test]
async fn after_services_come_and_go_by_thousands_a_connected_agent_is_renumbered_without_a_resend()
{
    let (controller, mut agent) = cluster_with_agent("node-a").await;
    agent.sync(WAIT).await.unwrap();
    // `aaa` comes with the churn and stays: in the first table its id follows the first
    // Services', in the next it comes first, so ids held over unchanged would be wrong.
    let with_aaa = |mut objects: Vec<Object>| {
        objects.push(Object::Service(service("aaa", ip(4000))));
        objects
    };
    let mut churned = with_aaa(three_node_cluster(3));
    churned
        .extend((0..4200).map(|i| Object::Service(service(&format!("churn-{i}"), ip(5000 + i)))));
    controller.replace("cluster", churned).await;
    while agent.versions().len() < 4203 {
        let response = agent.sync(WAIT).await.unwrap();
        assert!(response.removed_resources.is_empty());
    }
    let table = controller.hub.generations.borrow().names().clone();
    assert!(table.len() >= 4203);

    // Every churn Service goes: dead names now outnumber the live ones, and the hub
    // numbers the two left anew.
    controller
        .replace("cluster", with_aaa(three_node_cluster(3)))
        .await;
    let response = agent.sync(WAIT).await.unwrap();
    let renumbered = controller.hub.generations.borrow().names().clone();
    assert!(!std::sync::Arc::ptr_eq(&table, &renumbered), "a new table");
    assert_eq!(renumbered.len(), 3);
    assert_ne!(table.id("default/aaa"), renumbered.id("default/aaa"));
    assert!(
        response.resources.is_empty(),
        "nothing the agent holds is resent: {:?}",
        response
            .resources
            .iter()
            .map(|r| &r.name)
            .collect::<Vec<_>>()
    );
    assert_eq!(response.removed_resources.len(), 4200);
    assert!(agent.receives_within(QUIET).await.is_none());

    // Versions held by the new ids: one change sends exactly that Service.
    controller
        .replace("cluster", with_aaa(three_node_cluster(4)))
        .await;
    let response = agent.sync(WAIT).await.unwrap();
    let names: Vec<_> = response.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["default/web"]);
    let mut held: Vec<_> = agent.versions().into_keys().collect();
    held.sort();
    assert_eq!(held, ["default/aaa", "default/local-only", "default/web"]);
}
