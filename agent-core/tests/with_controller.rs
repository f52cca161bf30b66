//! The agent runtime against the real switchyard controller (hub + delta server) on
//! loopback, with the in-memory test dataplane: the protocol end to end, including the
//! controller's 256-resource responses and its use of the declared versions, and the
//! controller reading the node's kernel back through the agent's stream.

use std::time::Duration;

use switchyard_agent_core::{
    Agent,
    testing::{MemoryDataplane, MemoryKernel, start_memory_agent},
};
use switchyard_controller::model::Object;
use switchyard_integration::{
    controller::TestController, fixtures, queries::effective_state_pages,
};
use switchyard_proto::v1::{self, controller_query_client::ControllerQueryClient};

const WAIT: Duration = Duration::from_secs(20);

async fn start_agent(
    controller: &TestController,
    kernel: &MemoryKernel,
    state_dir: &std::path::Path,
) -> Agent<MemoryDataplane> {
    start_memory_agent(controller.endpoint(), "node-0000", kernel, state_dir).await
}

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

/// A controller serving one node `services` Services, and an agent for that node that
/// holds them all.
struct Synced {
    controller: TestController,
    objects: Vec<Object>,
    kernel: MemoryKernel,
    dir: tempfile::TempDir,
    agent: Agent<MemoryDataplane>,
}

async fn synced(services: usize) -> Synced {
    let controller = TestController::start().await.unwrap();
    let objects = fixtures::cluster(1, services, 1);
    controller.replace("test", objects.clone()).await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    eventually("every Service is in the kernel", || {
        kernel.versions().len() == services
    })
    .await;
    Synced {
        controller,
        objects,
        kernel,
        dir,
        agent,
    }
}

#[tokio::test]
async fn the_agent_syncs_from_the_real_controller_follows_changes_and_restarts_without_rewriting() {
    let Synced {
        controller,
        objects,
        kernel,
        dir,
        agent,
    } = synced(300).await;
    // More than one response: the controller sends at most 256 resources at a time.
    eventually("every response is applied", || kernel.apply_count() >= 2).await;
    assert!(agent.repair_drift().await.unwrap().is_empty());

    // A Service goes away: the controller removes it, the agent applies the removal.
    let fewer: Vec<Object> = objects
        .iter()
        .filter(|o| !matches!(o, Object::Service(s) if s.key.name == "svc-00007"))
        .cloned()
        .collect();
    controller.replace("test", fewer).await;
    eventually("the removed Service leaves the kernel", || {
        !kernel.versions().contains_key("default/svc-00007")
    })
    .await;
    let applies = kernel.apply_count();
    drop(agent);

    // A restarted agent declares what it holds; the controller has nothing to send.
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    eventually("the restarted agent connects", || agent.connected()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(kernel.apply_count(), applies, "a restart rewrites nothing");
    assert_eq!(kernel.versions().len(), 299);
}

/// `/healthz` of the agent's HTTP listener: the status line.
async fn healthz(agent: &Agent<MemoryDataplane>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(agent.http_addr())
        .await
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_node_being_deleted_fails_healthz_without_touching_the_kernel() {
    let Synced {
        controller,
        objects,
        kernel,
        dir: _state_dir,
        agent,
    } = synced(10).await;
    assert!(healthz(&agent).await.contains(" 200 "));
    let applies = kernel.apply_count();

    // The cluster autoscaler taints the node (or it gets a deletion timestamp).
    let with_node = |deleting: bool| -> Vec<Object> {
        objects
            .iter()
            .map(|o| match o {
                Object::Node(n) if n.name == "node-0000" => {
                    Object::Node(switchyard_controller::model::Node {
                        deleting,
                        ..n.clone()
                    })
                }
                other => other.clone(),
            })
            .collect()
    };
    controller.replace("test", with_node(true)).await;
    eventually("the agent learns its node is being deleted", || {
        !agent.node_eligible()
    })
    .await;
    assert!(healthz(&agent).await.contains(" 503 "));
    assert_eq!(kernel.apply_count(), applies, "no rule changes for it");

    controller.replace("test", with_node(false)).await;
    eventually("the node is live again", || agent.node_eligible()).await;
    assert!(healthz(&agent).await.contains(" 200 "));
    assert_eq!(kernel.apply_count(), applies);
}

#[tokio::test]
async fn the_controller_reads_a_nodes_kernel_back_over_the_agents_stream_in_pages() {
    let Synced {
        controller,
        kernel,
        agent,
        ..
    } = synced(300).await;
    // Drift behind the agent's back: one Service gone from the kernel, one altered.
    {
        let mut kernel = kernel.lock();
        kernel.programmed.remove("default/svc-00010");
        let altered = kernel.programmed.get_mut("default/svc-00020").unwrap();
        altered.kernel_objects.push("endpoint added by hand".into());
    }
    let applies = kernel.apply_count();
    let mut query = ControllerQueryClient::connect(controller.endpoint())
        .await
        .unwrap();

    let pages = effective_state_pages(&mut query, "node-0000", 128)
        .await
        .unwrap();
    assert_eq!(pages.len(), 3);
    let services: Vec<&v1::EffectiveService> = pages.iter().flat_map(|p| &p.effective).collect();
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let expected: Vec<String> = (0..300)
        .filter(|i| *i != 10)
        .map(|i| format!("default/svc-{i:05}"))
        .collect();
    assert_eq!(
        names, expected,
        "every Service the kernel holds, once, in order"
    );
    // What the kernel holds, object for object.
    let held = kernel.lock().programmed.clone();
    for service in &services {
        assert_eq!(service.kernel_objects, held[&service.name].kernel_objects);
        assert!(!service.version.is_empty());
    }
    let drift: Vec<(&str, &str)> = pages
        .iter()
        .flat_map(|p| &p.drift)
        .map(|d| (d.name.as_str(), d.kind.as_str()))
        .collect();
    assert_eq!(
        drift,
        [
            ("default/svc-00010", "missing"),
            ("default/svc-00020", "differs")
        ]
    );
    // The pages of one listing come from one read of the kernel.
    assert!(
        pages.iter().all(|p| p.read_at == pages[0].read_at),
        "{pages:?}"
    );
    for page in &pages {
        assert_eq!(page.node_name, "node-0000");
        assert_eq!(page.dataplane(), v1::Dataplane::Iptables);
        assert!(page.read_at.is_some());
        assert!(page.last_apply.is_some());
    }
    assert_eq!(kernel.apply_count(), applies, "a question changes nothing");

    // The stream still carries changes after the questions.
    controller
        .replace("test", fixtures::cluster(1, 301, 1))
        .await;
    eventually("a new Service reaches the kernel", || {
        kernel.versions().contains_key("default/svc-00300")
    })
    .await;

    // An agent that cannot read its kernel says why, through the controller.
    kernel.lock().fail_read_back = Some("netlink is on strike".into());
    let error = effective_state_pages(&mut query, "node-0000", 0)
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable);
    assert!(error.message().contains("netlink is on strike"), "{error}");

    // No agent, no answer: said at once, not after a timeout.
    let unavailable_at_once = |node: &'static str| {
        let mut query = query.clone();
        async move {
            let started = std::time::Instant::now();
            let error = effective_state_pages(&mut query, node, 0)
                .await
                .unwrap_err();
            assert_eq!(error.code(), tonic::Code::Unavailable, "{node}: {error}");
            assert!(error.message().contains("no agent of node"), "{error}");
            assert!(started.elapsed() < Duration::from_secs(5));
        }
    };
    unavailable_at_once("node-9999").await;
    drop(agent);
    let sessions = controller.sessions.clone();
    eventually("the stream closes", || {
        !sessions.get("node-0000").unwrap().is_connected()
    })
    .await;
    unavailable_at_once("node-0000").await;
}
