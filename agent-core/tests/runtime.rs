//! The agent runtime against a fake controller over real tonic servers on loopback, with
//! the in-memory test dataplane (no kernel needed; each dataplane agent tests the real
//! kernel). Every wait is bounded.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    pin::Pin,
    time::Duration,
};

use futures::Stream;
use switchyard_agent_core::{
    Agent,
    dataplane::ProgrammedService,
    testing::{MemoryDataplane, MemoryKernel, start_memory_agent},
};
use switchyard_proto::{
    resource_version,
    v1::{
        self, NodeStateRequest, NodeStateResponse,
        agent_query_client::AgentQueryClient,
        node_state_discovery_server::{NodeStateDiscovery, NodeStateDiscoveryServer},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(10);

/// One agent stream as the fake controller sees it.
struct FakeStream {
    first: NodeStateRequest,
    requests: Streaming<NodeStateRequest>,
    responses: mpsc::Sender<Result<NodeStateResponse, Status>>,
    nonces: u64,
}

impl FakeStream {
    /// Sends a response and returns the agent's answer to it.
    async fn exchange(
        &mut self,
        resources: Vec<v1::Resource>,
        removed: Vec<&str>,
    ) -> NodeStateRequest {
        self.nonces += 1;
        let nonce = format!("n{}", self.nonces);
        let response = NodeStateResponse {
            system_version: self.nonces.to_string(),
            resources,
            removed_resources: removed.into_iter().map(String::from).collect(),
            nonce: nonce.clone(),
            trigger_time: Some(std::time::SystemTime::now().into()),
            node_being_deleted: false,
            dataplane: 0,
            sent_time: Some(std::time::SystemTime::now().into()),
            ..Default::default()
        };
        self.responses
            .send(Ok(response))
            .await
            .expect("stream open");
        let answer = tokio::time::timeout(WAIT, self.requests.message())
            .await
            .expect("the agent answers in time")
            .expect("stream healthy")
            .expect("stream open");
        assert_eq!(answer.response_nonce, nonce);
        answer
    }
}

#[derive(Clone)]
struct FakeController {
    streams: mpsc::UnboundedSender<FakeStream>,
}

#[tonic::async_trait]
impl NodeStateDiscovery for FakeController {
    type StreamNodeStateStream =
        Pin<Box<dyn Stream<Item = Result<NodeStateResponse, Status>> + Send>>;

    async fn stream_node_state(
        &self,
        request: Request<Streaming<NodeStateRequest>>,
    ) -> Result<Response<Self::StreamNodeStateStream>, Status> {
        let mut requests = request.into_inner();
        let first = requests
            .message()
            .await?
            .ok_or_else(|| Status::cancelled("no first message"))?;
        let (tx, rx) = mpsc::channel(4);
        let _ = self.streams.send(FakeStream {
            first,
            requests,
            responses: tx,
            nonces: 0,
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Controller {
    addr: SocketAddr,
    streams: mpsc::UnboundedReceiver<FakeStream>,
    _server: JoinHandle<()>,
}

impl Controller {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, streams) = mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(NodeStateDiscoveryServer::new(FakeController {
                    streams: tx,
                }))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        Self {
            addr,
            streams,
            _server: server,
        }
    }

    async fn next_stream(&mut self) -> FakeStream {
        tokio::time::timeout(WAIT, self.streams.recv())
            .await
            .expect("the agent connects in time")
            .expect("server running")
    }
}

async fn start_agent(
    controller: &Controller,
    kernel: &MemoryKernel,
    state_dir: &std::path::Path,
) -> Agent<MemoryDataplane> {
    start_memory_agent(
        format!("http://{}", controller.addr),
        "node-a",
        kernel,
        state_dir,
    )
    .await
}

fn endpoint(ip: &str, port: u32, local: bool, ready: bool) -> v1::Endpoint {
    v1::Endpoint {
        ip: ip.into(),
        port,
        node_name: if local { "node-a" } else { "node-b" }.into(),
        local,
        ready,
        serving: true,
        terminating: !ready,
    }
}

fn service(name: &str, cluster_ip: &str, endpoints: Vec<v1::Endpoint>) -> v1::ServiceState {
    let (namespace, name) = name.split_once('/').unwrap();
    v1::ServiceState {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ips: vec![cluster_ip.into()],
        ports: vec![v1::ServicePort {
            name: "http".into(),
            protocol: v1::Protocol::Tcp.into(),
            port: 80,
            cluster_endpoints: endpoints,
            has_usable_ipv4_endpoints: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn resource(state: v1::ServiceState) -> v1::Resource {
    v1::Resource {
        name: format!("{}/{}", state.namespace, state.name),
        version: resource_version(&state),
        service: Some(state),
    }
}

fn web() -> v1::Resource {
    resource(service(
        "default/web",
        "10.96.0.10",
        vec![endpoint("10.244.1.5", 8080, true, true)],
    ))
}

fn db() -> v1::Resource {
    resource(service(
        "default/db",
        "10.96.0.20",
        vec![endpoint("10.244.2.7", 5432, false, true)],
    ))
}

fn errors(answer: &NodeStateRequest) -> BTreeMap<String, String> {
    answer
        .errors
        .iter()
        .map(|e| (e.resource_name.clone(), e.message.clone()))
        .collect()
}

fn kernel_version(kernel: &MemoryKernel, name: &str) -> Option<String> {
    kernel
        .versions()
        .get(name)
        .copied()
        .flatten()
        .map(switchyard_proto::format_version)
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

/// A plain HTTP/1.1 GET: status, lower-cased headers, body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, HashMap<String, String>, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("HTTP answer in time")
        .expect("HTTP exchange");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a full HTTP response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

#[tokio::test]
async fn the_initial_sync_is_applied_and_acknowledged_with_apply_stats() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;

    let mut stream = controller.next_stream().await;
    let node = stream.first.node.clone().unwrap();
    assert_eq!(node.node_name, "node-a");
    assert_eq!(node.dataplane(), v1::Dataplane::Iptables);
    assert!(stream.first.initial_resource_versions.is_empty());

    let answer = stream.exchange(vec![web(), db()], vec![]).await;
    assert!(answer.errors.is_empty(), "ACK expected: {answer:?}");
    assert_eq!(answer.apply_stats.unwrap().resources_applied, 2);
    assert_eq!(kernel_version(&kernel, "default/web"), Some(web().version));
    assert_eq!(kernel_version(&kernel, "default/db"), Some(db().version));
    let applies = kernel.lock().applies.clone();
    assert_eq!(applies.len(), 1);
    assert_eq!(applies[0].upserted, ["default/web", "default/db"]);
    assert!(!applies[0].full);
    assert!(agent.connected());

    // A removal names exactly the resource removed.
    let answer = stream.exchange(vec![], vec!["default/db"]).await;
    assert!(answer.errors.is_empty());
    assert_eq!(kernel.lock().applies[1].removed, ["default/db"]);
    assert!(kernel_version(&kernel, "default/db").is_none());
}

#[tokio::test]
async fn a_resource_that_does_not_convert_is_nacked_by_name_and_the_others_are_applied() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let _agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;

    let mut bad = db();
    bad.service.as_mut().unwrap().cluster_ips = vec!["10.96.0.300".into()];
    let answer = stream.exchange(vec![web(), bad], vec![]).await;
    let errors = errors(&answer);
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["default/db"]);
    assert!(errors["default/db"].contains("cluster_ips"), "{errors:?}");
    assert_eq!(kernel.lock().applies[0].upserted, ["default/web"]);
    assert!(kernel_version(&kernel, "default/web").is_some());
    assert!(kernel_version(&kernel, "default/db").is_none());
}

#[tokio::test]
async fn dataplane_failures_are_nacked_and_the_stream_goes_on() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let _agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;

    // One resource fails.
    kernel
        .lock()
        .fail_resources
        .insert("default/db".into(), "chain too long".into());
    let answer = stream.exchange(vec![web(), db()], vec![]).await;
    assert_eq!(
        errors(&answer),
        BTreeMap::from([("default/db".to_string(), "chain too long".to_string())])
    );
    assert_eq!(answer.apply_stats.unwrap().resources_applied, 1);

    // The whole dataplane fails: every resource of the response is NACKed.
    kernel.lock().fail_resources.clear();
    kernel.lock().fail_all = Some("iptables-restore exited 4".into());
    let answer = stream.exchange(vec![db()], vec!["default/web"]).await;
    let errors_now = errors(&answer);
    assert_eq!(
        errors_now.keys().collect::<Vec<_>>(),
        ["default/db", "default/web"]
    );
    assert!(errors_now["default/db"].contains("iptables-restore exited 4"));

    // It recovers, and the stream still works.
    kernel.lock().fail_all = None;
    let answer = stream.exchange(vec![db()], vec![]).await;
    assert!(answer.errors.is_empty());
    assert_eq!(kernel_version(&kernel, "default/db"), Some(db().version));
    assert_eq!(kernel_version(&kernel, "default/web"), Some(web().version));
}

#[tokio::test]
async fn after_the_controller_drops_the_stream_the_agent_reconnects_declaring_what_it_applied() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;

    kernel
        .lock()
        .fail_resources
        .insert("default/db".into(), "no room".into());
    let answer = stream.exchange(vec![web(), db()], vec![]).await;
    assert_eq!(errors(&answer).len(), 1);
    let applies = kernel.apply_count();
    drop(stream);

    let stream = controller.next_stream().await;
    assert_eq!(
        stream.first.initial_resource_versions,
        HashMap::from([("default/web".to_string(), web().version)]),
        "only what was applied successfully is declared"
    );
    assert_eq!(
        kernel.apply_count(),
        applies,
        "no kernel change while disconnected"
    );
    eventually("the agent reports the stream up", || agent.connected()).await;
}

#[tokio::test]
async fn a_restarted_agent_declares_what_the_kernel_holds_and_rewrites_nothing() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;
    let answer = stream.exchange(vec![web(), db()], vec![]).await;
    assert!(answer.errors.is_empty());
    drop(agent);
    drop(stream);

    // While the agent was down: a leftover the cache never heard of, and one resource
    // changed under the agent's feet.
    kernel.lock().programmed.insert(
        "default/orphan".into(),
        ProgrammedService {
            version: Some(42),
            kernel_objects: vec!["rule".into()],
        },
    );
    kernel
        .lock()
        .programmed
        .get_mut("default/db")
        .unwrap()
        .version = Some(7);
    let applies = kernel.apply_count();

    let _agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;
    assert_eq!(
        stream.first.initial_resource_versions,
        HashMap::from([
            ("default/web".to_string(), web().version),
            ("default/db".to_string(), String::new()),
            ("default/orphan".to_string(), String::new()),
        ])
    );
    assert_eq!(kernel.apply_count(), applies, "a restart applies nothing");

    // The controller resends what it wants and removes what it does not.
    let answer = stream.exchange(vec![db()], vec!["default/orphan"]).await;
    assert!(answer.errors.is_empty());
    let last = kernel.lock().applies.last().cloned().unwrap();
    assert_eq!(last.upserted, ["default/db"]);
    assert_eq!(last.removed, ["default/orphan"]);
    assert_eq!(
        kernel.versions().keys().collect::<Vec<_>>(),
        ["default/db", "default/web"]
    );
}

#[tokio::test]
async fn drift_is_repaired_with_one_apply_naming_the_drifted_resources_and_counted() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;
    stream.exchange(vec![web(), db()], vec![]).await;

    assert!(agent.repair_drift().await.unwrap().is_empty());
    let applies = kernel.apply_count();

    kernel.lock().programmed.remove("default/web");
    kernel.lock().programmed.insert(
        "default/stray".into(),
        ProgrammedService {
            version: None,
            kernel_objects: vec!["stray rule".into()],
        },
    );
    let drift = agent.repair_drift().await.unwrap();
    assert_eq!(
        drift.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        ["default/stray", "default/web"]
    );
    assert_eq!(kernel.apply_count(), applies + 1);
    let repair = kernel.lock().applies.last().cloned().unwrap();
    assert_eq!(repair.upserted, ["default/web"]);
    assert_eq!(repair.removed, ["default/stray"]);
    assert_eq!(kernel_version(&kernel, "default/web"), Some(web().version));
    assert!(agent.repair_drift().await.unwrap().is_empty());
    assert!(
        agent
            .metrics_text()
            .contains("switchyard_drift_repairs_total 2"),
        "{}",
        agent.metrics_text()
    );
}

#[tokio::test]
async fn health_check_node_ports_answer_200_or_503_with_kube_proxys_body_and_follow_services() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let _agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;

    // The health-check port comes from the Service, so the test must pick a free one.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let lb = |endpoints: Vec<v1::Endpoint>| {
        let mut state = service("shop/lb", "10.96.0.30", vec![]);
        state.external_traffic_policy = v1::TrafficPolicy::Local.into();
        state.health_check_node_port = port.into();
        state.ports[0].local_endpoints = endpoints.clone();
        let mut second = state.ports[0].clone();
        second.name = "https".into();
        second.port = 443;
        second.local_endpoints = endpoints;
        state.ports.push(second);
        resource(state)
    };
    let two_local = vec![
        endpoint("10.244.1.5", 8080, true, true),
        endpoint("10.244.1.6", 8080, true, true),
        endpoint("10.244.1.7", 8080, true, false),
    ];
    assert!(
        stream
            .exchange(vec![lb(two_local)], vec![])
            .await
            .errors
            .is_empty()
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let (status, headers, body) = http_get(addr, "/anything").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-load-balancing-endpoint-weight"], "2");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "service": {"namespace": "shop", "name": "lb"},
            "localEndpoints": 2,
            "serviceProxyHealthy": true
        })
    );

    assert!(
        stream
            .exchange(vec![lb(vec![])], vec![])
            .await
            .errors
            .is_empty()
    );
    let (status, _, body) = http_get(addr, "/").await;
    assert_eq!(status, 503);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["localEndpoints"], 0);

    assert!(
        stream
            .exchange(vec![], vec!["shop/lb"])
            .await
            .errors
            .is_empty()
    );
    eventually("the health-check port closes", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
}

#[tokio::test]
async fn healthz_livez_and_metrics_are_served_on_one_listener() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;
    stream.exchange(vec![web()], vec![]).await;

    let (status, headers, body) = http_get(agent.http_addr(), "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["nodeHealthy"], true);
    assert!(json["lastUpdated"].is_string() && json["currentTime"].is_string());

    agent.set_node_eligible(false);
    assert_eq!(http_get(agent.http_addr(), "/healthz").await.0, 503);
    let (status, _, body) = http_get(agent.http_addr(), "/livez").await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["currentTime"].is_string());

    let (status, _, metrics) = http_get(agent.http_addr(), "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "switchyard_sync_proxy_rules_duration_seconds_count 1",
        "switchyard_network_programming_duration_seconds_count 1",
        "switchyard_network_programming_stage_duration_seconds_count{stage=\"controller\"} 1",
        "switchyard_network_programming_stage_duration_seconds_count{stage=\"transport\"} 1",
        "switchyard_network_programming_stage_duration_seconds_count{stage=\"agent\"} 1",
        "switchyard_network_programming_stage_duration_seconds_count{stage=\"kernel\"} 1",
        "switchyard_controller_connected 1",
        "switchyard_sync_proxy_rules_last_timestamp_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert_eq!(http_get(agent.http_addr(), "/nope").await.0, 404);
}

#[tokio::test]
async fn the_query_api_reports_desired_effective_state_and_drift() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;
    stream.exchange(vec![web(), db()], vec![]).await;

    let mut client = AgentQueryClient::connect(format!("http://{}", agent.query_addr()))
        .await
        .unwrap();
    let ask = |include_kernel_objects| v1::GetAgentStateRequest {
        include_kernel_objects,
    };
    let state = tokio::time::timeout(WAIT, client.get_agent_state(ask(true)))
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!(state.node_name, "node-a");
    assert_eq!(state.dataplane(), v1::Dataplane::Iptables);
    assert!(state.connected);
    assert_eq!(state.controller, format!("http://{}", controller.addr));
    let desired: BTreeMap<_, _> = state
        .desired
        .iter()
        .map(|r| (r.name.as_str(), r.version.as_str()))
        .collect();
    assert_eq!(
        desired,
        BTreeMap::from([
            ("default/db", db().version.as_str()),
            ("default/web", web().version.as_str())
        ])
    );
    assert_eq!(state.desired[1].service, web().service);
    assert_eq!(state.effective.len(), 2);
    assert!(!state.effective[0].kernel_objects.is_empty());
    assert_eq!(state.effective[1].version, web().version);
    assert!(state.drift.is_empty());
    let last = state.last_apply.unwrap();
    assert_eq!(last.resources, 2);
    assert!(!last.full_sync);

    kernel.lock().programmed.remove("default/db");
    let state = client
        .get_agent_state(ask(false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.effective.len(), 1);
    assert!(state.effective[0].kernel_objects.is_empty());
    assert_eq!(state.drift.len(), 1);
    assert_eq!(state.drift[0].name, "default/db");
    assert_eq!(state.drift[0].kind, "missing");
    assert_eq!(state.drift_repairs, 0);
}

#[tokio::test]
async fn a_full_sync_rewrites_everything_from_the_desired_cache() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;
    stream.exchange(vec![web(), db()], vec![]).await;
    agent.full_sync().await.unwrap();
    let last = kernel.lock().applies.last().cloned().unwrap();
    assert!(last.full);
    assert!(
        agent
            .metrics_text()
            .contains("switchyard_sync_full_proxy_rules_duration_seconds_count 1")
    );
}

#[tokio::test]
async fn without_a_kernel_read_back_on_start_every_cached_resource_is_declared_unknown() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;
    stream.exchange(vec![web(), db()], vec![]).await;
    drop(agent);
    drop(stream);

    kernel.lock().fail_read_back = Some("netlink: permission denied".into());
    let applies = kernel.apply_count();
    let _agent = start_agent(&controller, &kernel, dir.path()).await;
    let stream = controller.next_stream().await;
    assert_eq!(
        stream.first.initial_resource_versions,
        HashMap::from([
            ("default/web".to_string(), String::new()),
            ("default/db".to_string(), String::new()),
        ])
    );
    assert_eq!(kernel.apply_count(), applies);
}

#[tokio::test]
async fn the_query_port_serves_grpc_health_and_reflection_v1_and_v1alpha() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::{v1 as r1, v1alpha as r1a};

    let controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&controller, &kernel, dir.path()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", agent.query_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "switchyard.v1.AgentQuery".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);

    let request = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = r1::server_reflection_client::ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"switchyard.v1.AgentQuery".to_string()),
        "{names:?}"
    );

    let request = r1a::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            r1a::server_reflection_request::MessageRequest::FileContainingSymbol(
                "switchyard.v1.AgentQuery".into(),
            ),
        ),
    };
    let mut responses = r1a::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            response.message_response,
            Some(r1a::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{response:?}"
    );
}

#[tokio::test]
async fn a_response_with_nothing_convertible_is_nacked_without_calling_the_dataplane() {
    let mut controller = Controller::start().await;
    let kernel = MemoryKernel::default();
    let dir = tempfile::tempdir().unwrap();
    let _agent = start_agent(&controller, &kernel, dir.path()).await;
    let mut stream = controller.next_stream().await;
    let mut bad = web();
    bad.version = "not-a-version".into();
    let answer = stream.exchange(vec![bad], vec![]).await;
    assert_eq!(errors(&answer).keys().collect::<Vec<_>>(), ["default/web"]);
    assert_eq!(kernel.apply_count(), 0);
}
