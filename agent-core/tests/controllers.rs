//! An agent listing several controllers (issue 10, controller replicas), against real
//! controllers on loopback and the in-memory test dataplane: failover to a survivor that
//! resends nothing, a dead address that costs one attempt, and a replica that sheds the
//! agent to another one.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use switchyard_agent_core::{
    Agent,
    testing::{MemoryDataplane, MemoryKernel, start_memory_agent, start_memory_agent_in_order},
};
use switchyard_integration::{controller::TestController, fixtures};
use switchyard_proto::v1::{
    NodeStateRequest, NodeStateResponse,
    node_state_discovery_server::{NodeStateDiscovery, NodeStateDiscoveryServer},
};
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataValue};

const NODE: &str = "node-0000";
const WAIT: Duration = Duration::from_secs(20);

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `switchyard_controller_switches_total{reason}` in the agent's `/metrics` text.
fn switches(agent: &Agent<MemoryDataplane>, reason: &str) -> u64 {
    let series = format!("switchyard_controller_switches_total{{reason=\"{reason}\"}} ");
    agent
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |n| n.parse().expect("a counter value"))
}

/// Whether `controller` has a stream of [`NODE`]'s agent now.
fn serves_the_node(controller: &TestController) -> bool {
    controller
        .sessions
        .get(NODE)
        .is_some_and(|session| session.is_connected())
}

#[tokio::test]
async fn an_agent_fails_over_to_a_surviving_controller_which_resends_nothing_unchanged() {
    let objects = fixtures::cluster(1, 50, 1);
    let mut controllers = Vec::new();
    for _ in 0..3 {
        let controller = TestController::start().await.unwrap();
        controller.replace("test", objects.clone()).await;
        controllers.push(Some(controller));
    }
    let addresses: Vec<String> = controllers
        .iter()
        .flatten()
        .map(TestController::endpoint)
        .collect();
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    // Shuffled, as agents do: the test finds out which one it picked.
    let agent = start_memory_agent(addresses.join(","), NODE, &kernel, dir.path()).await;
    eventually("the agent holds every Service", || {
        kernel.versions().len() == 50 && agent.connected()
    })
    .await;
    let serving: Vec<usize> = (0..3)
        .filter(|&i| controllers[i].as_ref().is_some_and(serves_the_node))
        .collect();
    assert_eq!(serving.len(), 1, "one stream, to one controller");
    let first = serving[0];
    assert_eq!(
        agent.controller(),
        addresses[first],
        "the query API names it"
    );
    let applies = kernel.apply_count();
    let versions = kernel.versions();

    // The controller the agent is on goes away.
    drop(controllers[first].take());
    let lost_at = Instant::now();
    let survivor = loop {
        if let Some(i) = (0..3).find(|&i| controllers[i].as_ref().is_some_and(serves_the_node))
            && agent.connected()
        {
            break i;
        }
        assert!(
            lost_at.elapsed() < Duration::from_secs(5),
            "no survivor serves the agent 5 s after its controller went away"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let survivor = controllers[survivor].as_ref().unwrap();
    assert_eq!(agent.controller(), survivor.endpoint());
    assert!(switches(&agent, "lost") >= 1, "{}", agent.metrics_text());

    // It resumed with the versions it holds: the survivor has nothing to send. (An
    // answer would have come at once; half a second leaves it time to show.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let session = survivor.sessions.get(NODE).unwrap();
        let protocol = session.protocol();
        assert_eq!(protocol.resources_sent, 0, "the survivor resent a Service");
        assert_eq!(protocol.removals_sent, 0, "the survivor sent a removal");
        assert_eq!(protocol.acked.len(), 50, "it knows what the agent holds");
    }
    assert_eq!(kernel.apply_count(), applies, "the kernel saw no apply");
    assert_eq!(kernel.versions(), versions);

    // The survivors go on serving changes.
    let more = fixtures::cluster(1, 51, 1);
    for controller in controllers.iter().flatten() {
        controller.replace("test", more.clone()).await;
    }
    eventually("the new Service reaches the kernel", || {
        kernel.versions().contains_key("default/svc-00050")
    })
    .await;
    let session = survivor.sessions.get(NODE).unwrap();
    assert_eq!(session.protocol().resources_sent, 1, "only the new Service");
    assert_eq!(kernel.versions().len(), 51);
}

/// An address nothing listens on: a port bound, then released.
async fn dead_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

#[tokio::test]
async fn a_dead_controller_first_in_the_list_costs_one_attempt() {
    let controller = TestController::start().await.unwrap();
    controller.replace("test", fixtures::cluster(1, 5, 1)).await;
    let dead = dead_address().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let agent = start_memory_agent_in_order(
        &[dead.clone(), controller.endpoint()],
        NODE,
        &kernel,
        dir.path(),
    )
    .await;
    eventually("the agent is connected", || agent.connected()).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "connected after {took:?}");
    assert!(serves_the_node(&controller));
    assert_eq!(agent.controller(), controller.endpoint());
    eventually("the agent holds every Service", || {
        kernel.versions().len() == 5
    })
    .await;
    assert_eq!(
        switches(&agent, "connect_failed"),
        1,
        "one attempt at {dead}"
    );
    assert_eq!(switches(&agent, "lost"), 0);
}

/// How the shedding replica ends each stream.
#[derive(Clone, Copy, Debug)]
enum Shed {
    /// Refuses the stream outright (a trailers-only answer).
    AtOnce,
    /// Accepts the stream, then ends it with the status.
    AfterAccepting,
}

/// A controller replica that sheds every agent: it ends each stream with `UNAVAILABLE`
/// and the reconnect trailer, and counts them.
struct Shedder {
    how: Shed,
    streams: Arc<AtomicUsize>,
}

fn shed_status() -> Status {
    let mut status = Status::unavailable("this replica serves its share of agents already");
    status.metadata_mut().insert(
        switchyard_proto::RECONNECT_METADATA,
        MetadataValue::from_static(switchyard_proto::RECONNECT_ELSEWHERE),
    );
    status
}

type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<NodeStateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NodeStateDiscovery for Shedder {
    type StreamNodeStateStream = ResponseStream;

    async fn stream_node_state(
        &self,
        _request: Request<Streaming<NodeStateRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        match self.how {
            Shed::AtOnce => Err(shed_status()),
            Shed::AfterAccepting => Ok(Response::new(Box::pin(tokio_stream::once(Err(
                shed_status(),
            ))))),
        }
    }
}

/// A running [`Shedder`] on loopback; stops when dropped.
struct ShedderServer {
    address: SocketAddr,
    streams: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl ShedderServer {
    async fn start(how: Shed) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let streams = Arc::new(AtomicUsize::new(0));
        let service = NodeStateDiscoveryServer::new(Shedder {
            how,
            streams: streams.clone(),
        });
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .expect("the shedding server runs");
        });
        Self {
            address,
            streams,
            server,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for ShedderServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test]
async fn a_replica_that_sheds_the_agent_sends_it_to_another_controller_at_once() {
    let controller = TestController::start().await.unwrap();
    controller.replace("test", fixtures::cluster(1, 5, 1)).await;
    for how in [Shed::AtOnce, Shed::AfterAccepting] {
        let shedder = ShedderServer::start(how).await;
        let kernel = MemoryKernel::default();
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let agent = start_memory_agent_in_order(
            &[shedder.endpoint(), controller.endpoint()],
            NODE,
            &kernel,
            dir.path(),
        )
        .await;
        eventually("the agent is on the real controller", || {
            agent.connected() && agent.controller() == controller.endpoint()
        })
        .await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "{how:?}: on it after {took:?}"
        );
        assert!(serves_the_node(&controller), "{how:?}");
        assert!(shedder.streams.load(Ordering::SeqCst) >= 1, "{how:?}");
        assert!(
            switches(&agent, "shed") >= 1,
            "{how:?}: {}",
            agent.metrics_text()
        );
        assert_eq!(switches(&agent, "connect_failed"), 0, "{how:?}");
        eventually("the agent holds every Service", || {
            kernel.versions().len() == 5
        })
        .await;
        // The next agent of the loop takes over the node's stream on the controller.
        drop(agent);
    }
}

#[tokio::test]
async fn an_agent_shed_twice_walks_down_its_list_and_never_back_to_a_replica_that_shed_it() {
    // Two replicas that both shed the agent, plus a real controller last: the agent
    // walks past both, each after at most half a second, and asks neither again.
    let controller = TestController::start().await.unwrap();
    controller.replace("test", fixtures::cluster(1, 3, 1)).await;
    let first = ShedderServer::start(Shed::AtOnce).await;
    let second = ShedderServer::start(Shed::AfterAccepting).await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let agent = start_memory_agent_in_order(
        &[first.endpoint(), second.endpoint(), controller.endpoint()],
        NODE,
        &kernel,
        dir.path(),
    )
    .await;
    eventually("the agent is on the real controller", || {
        agent.connected() && agent.controller() == controller.endpoint()
    })
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "on it after {took:?}");
    assert_eq!(switches(&agent, "shed"), 2);
    assert_eq!(first.streams.load(Ordering::SeqCst), 1);
    assert_eq!(second.streams.load(Ordering::SeqCst), 1);
}
