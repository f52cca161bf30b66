//! The controller binary as operators run it: probes and metrics on the plain HTTP port,
//! SIGINT or SIGTERM closing agent streams and exiting within seconds, and three
//! replicas coordinated through a real etcd surviving `kill -9` of the one serving a
//! node.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use switchyard_proto::v1::{
    self, NodeIdentity, NodeStateRequest, node_state_discovery_client::NodeStateDiscoveryClient,
};
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(20);

struct Controller {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    /// Everything the controller wrote to stderr, drained so it never blocks on a pipe.
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A manifests folder with node-a and one Service, web.
fn one_service_cluster() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n",
    )
    .unwrap();
    dir
}

fn start() -> Controller {
    let dir = one_service_cluster();
    // A typo an operator makes: reported, counted in /metrics.
    std::fs::write(
        dir.path().join("typo.yaml"),
        "apiVersion: v1\nkind: Servce\nmetadata: {name: api}\n",
    )
    .unwrap();
    spawn(dir, &[])
}

/// The controller binary on the manifests in `dir`, with `extra` flags, once it says
/// where it listens.
fn spawn(dir: tempfile::TempDir, extra: &[String]) -> Controller {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-controller"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--manifests")
        .arg(dir.path())
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let log = Arc::new(Mutex::new(String::new()));
    let deadline = Instant::now() + WAIT;
    let (grpc, http) = loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0 && Instant::now() < deadline,
            "the controller ended before saying where it listens: {}",
            log.lock().unwrap()
        );
        log.lock().unwrap().push_str(&line);
        if let Some(rest) = line.strip_prefix("switchyard-controller is serving on ") {
            let grpc = rest.split(' ').next().unwrap().parse().unwrap();
            let http = rest
                .split("probes on http://")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .unwrap()
                .parse()
                .unwrap();
            break (grpc, http);
        }
    };
    let drained = log.clone();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        drained.lock().unwrap().push_str(&rest);
    });
    Controller {
        child,
        grpc,
        http,
        log,
        _dir: dir,
    }
}

/// `GET path` on the plain HTTP port: the status code and body.
fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: controller\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name` (with its labels) in a Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}

/// Opens an agent stream naming `node`: the stream, or the status it was refused with.
async fn open_stream(
    controller: &Controller,
    node: &str,
) -> (
    tokio::sync::mpsc::Sender<NodeStateRequest>,
    Result<tonic::Streaming<v1::NodeStateResponse>, tonic::Status>,
) {
    open_stream_holding(controller, node, HashMap::new()).await
}

/// [`open_stream`] for an agent that declares it holds `held` (name → version).
async fn open_stream_holding(
    controller: &Controller,
    node: &str,
    held: HashMap<String, String>,
) -> (
    tokio::sync::mpsc::Sender<NodeStateRequest>,
    Result<tonic::Streaming<v1::NodeStateResponse>, tonic::Status>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(NodeStateRequest {
        node: Some(NodeIdentity {
            node_name: node.into(),
            dataplane: v1::Dataplane::Iptables.into(),
            agent_version: "test".into(),
        }),
        initial_resource_versions: held,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = NodeStateDiscoveryClient::connect(format!("http://{}", controller.grpc))
        .await
        .unwrap();
    let responses = client
        .stream_node_state(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, responses)
}

/// node-a's stream and its first response, which holds the one Service.
async fn stream_of_node_a(
    controller: &Controller,
) -> (
    tokio::sync::mpsc::Sender<NodeStateRequest>,
    tonic::Streaming<v1::NodeStateResponse>,
    v1::NodeStateResponse,
) {
    let (tx, responses) = open_stream(controller, "node-a").await;
    let mut responses = responses.unwrap();
    let first = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.resources.len(), 1);
    (tx, responses, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_streams_refusals_answers_bytes_timings_and_source_problems() {
    let controller = start();
    let (tx, _responses, first) = stream_of_node_a(&controller).await;
    tx.send(NodeStateRequest {
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_refused_tx, refused) = open_stream(&controller, "Not_A_Node").await;
    assert_eq!(
        refused.unwrap_err().code(),
        tonic::Code::InvalidArgument,
        "a node name that is no DNS subdomain is refused"
    );
    let expected = [
        ("switchyard_controller_streams_opened_total", 1.0),
        ("switchyard_controller_agent_streams", 1.0),
        ("switchyard_controller_resources_sent_total", 1.0),
        ("switchyard_controller_answers_total", 1.0),
        ("switchyard_controller_nacks_total", 0.0),
        ("switchyard_controller_pending_services_count", 1.0),
        ("switchyard_controller_response_build_seconds_count", 1.0),
        ("switchyard_controller_change_to_ack_seconds_count", 1.0),
        (
            "switchyard_controller_streams_refused_total{reason=\"invalid_request\"}",
            1.0,
        ),
        ("switchyard_controller_source_problems", 1.0),
    ];
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, metrics) = get(controller.http, "/metrics");
        assert_eq!(status, 200);
        let wrong: Vec<_> = expected
            .iter()
            .filter(|(name, value)| sample(&metrics, name) != Some(*value))
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{wrong:?} differ in\n{metrics}\n{}",
            controller.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bytes = sample(
        &get(controller.http, "/metrics").1,
        "switchyard_controller_response_bytes_sent_total",
    );
    assert!(bytes.is_some_and(|b| b > 50.0), "{bytes:?}");
    drop(tx);
    let deadline = Instant::now() + WAIT;
    while sample(
        &get(controller.http, "/metrics").1,
        "switchyard_controller_streams_closed_total{reason=\"agent_closed\"}",
    ) != Some(1.0)
    {
        assert!(
            Instant::now() < deadline,
            "the closed stream is never counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn probes_answer_on_the_plain_http_port() {
    let controller = start();
    assert_eq!(get(controller.http, "/healthz").0, 200);
    let deadline = Instant::now() + WAIT;
    while get(controller.http, "/readyz").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready: {}",
            controller.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = get(controller.http, "/metrics");
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_and_sigterm_close_agent_streams_and_exit_within_seconds() {
    use rustix::process::{Pid, Signal, kill_process};
    for signal in [Signal::INT, Signal::TERM] {
        let mut controller = start();
        let (tx, mut responses, _) = stream_of_node_a(&controller).await;

        // The agent keeps its stream open (it neither answers nor closes).
        let pid = Pid::from_raw(controller.child.id() as i32).unwrap();
        let sent = Instant::now();
        kill_process(pid, signal).unwrap();
        let ended = tokio::time::timeout(WAIT, responses.message())
            .await
            .unwrap();
        match ended {
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(status.message().contains("shutting down"), "{status:?}");
            }
            Ok(None) => {}
            Ok(Some(response)) => panic!("{signal:?}: more state after the signal: {response:?}"),
        }
        let exit = loop {
            if let Some(exit) = controller.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                sent.elapsed() < Duration::from_secs(5),
                "{signal:?}: still running after {:?}: {}",
                sent.elapsed(),
                controller.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "{signal:?}: {exit:?}");
        eprintln!("{signal:?}: exited {:?} after the signal", sent.elapsed());
        drop(tx);
    }
}

/// A real etcd on loopback (the integration crate's, shared as a file: that crate
/// depends on this one).
#[path = "../../integration/src/etcd.rs"]
mod etcd;

/// `ListNodes` of one controller: node → status.
async fn list_nodes(controller: &Controller) -> HashMap<String, v1::NodeStatus> {
    let mut query = v1::controller_query_client::ControllerQueryClient::connect(format!(
        "http://{}",
        controller.grpc
    ))
    .await
    .unwrap();
    let nodes = query
        .list_nodes(v1::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .nodes;
    nodes
        .into_iter()
        .map(|n| (n.node_name.clone(), n))
        .collect()
}

/// Whether every one of `controllers` lists node-a connected, in sync, on `replica`.
async fn all_list_node_a_on(controllers: &[&Controller], replica: &str) -> bool {
    for controller in controllers {
        let listed = list_nodes(controller).await;
        let Some(status) = listed.get("node-a") else {
            return false;
        };
        if !status.connected
            || status.replica != replica
            || status.pending_changes != 0
            || status.acked_version != status.desired_version
        {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_kill_9_of_the_one_serving_a_node_without_a_resend() {
    let etcd = etcd::Etcd::start().unwrap();
    let mut replicas: Vec<Controller> = (0..3)
        .map(|r| {
            let dir = one_service_cluster();
            let flags = [
                "--etcd-endpoints".to_string(),
                etcd.endpoint(),
                "--replica-name".into(),
                format!("r{r}"),
                "--etcd-lease-ttl".into(),
                "3s".into(),
            ];
            spawn(dir, &flags)
        })
        .collect();

    // node-a's agent on r0 takes the one Service and ACKs it.
    let (tx, _responses, first) = stream_of_node_a(&replicas[0]).await;
    let held: HashMap<String, String> = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert_eq!(held.len(), 1);
    tx.send(NodeStateRequest {
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while !all_list_node_a_on(&replicas.iter().collect::<Vec<_>>(), "r0").await {
        assert!(
            Instant::now() < deadline,
            "the replicas never agreed node-a is on r0"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // kill -9 r0: no goodbye, its lease left to expire.
    let mut killed = replicas.remove(0);
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    let killed_at = Instant::now();
    drop(tx);

    // The agent resumes on r1 with what it holds: nothing is resent.
    let (_tx, responses) = open_stream_holding(&replicas[0], "node-a", held).await;
    let mut responses = responses.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), responses.message())
            .await
            .is_err(),
        "the survivor sends nothing the agent holds"
    );
    let survivors: Vec<&Controller> = replicas.iter().collect();
    while !all_list_node_a_on(&survivors, "r1").await {
        assert!(
            Instant::now() < deadline,
            "the survivors never agreed node-a is on r1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = &list_nodes(&replicas[1]).await["node-a"];
    assert_eq!(
        (status.resources_sent, status.removals_sent),
        (0, 0),
        "{status:?}"
    );
    // r0's lease expires: the survivors count two replicas.
    for survivor in &survivors {
        while sample(
            &get(survivor.http, "/metrics").1,
            "switchyard_controller_replicas",
        ) != Some(2.0)
        {
            assert!(
                killed_at.elapsed() < Duration::from_secs(3 + 5),
                "r0 still registered after its 3 s lease"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // SIGTERM r2: it revokes its lease, so r1 stops counting it at once, well before
    // the 3 s lease would expire.
    let mut leaving = replicas.remove(1);
    let _ = Command::new("kill")
        .args(["-TERM", &leaving.child.id().to_string()])
        .status();
    let left_at = Instant::now();
    leaving.child.wait().unwrap();
    while sample(
        &get(replicas[0].http, "/metrics").1,
        "switchyard_controller_replicas",
    ) != Some(1.0)
    {
        assert!(
            left_at.elapsed() < Duration::from_millis(2500),
            "r2 still registered {:?} after a graceful exit",
            left_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let survivors: Vec<&Controller> = replicas.iter().collect();
    // Exactly one survivor leads (r0 or r2 may have been the leader).
    let leaders = || -> f64 {
        survivors
            .iter()
            .filter_map(|s| sample(&get(s.http, "/metrics").1, "switchyard_controller_leader"))
            .sum()
    };
    while leaders() != 1.0 {
        assert!(
            killed_at.elapsed() < Duration::from_secs(3 + 5),
            "{} leaders among the survivors",
            leaders()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
