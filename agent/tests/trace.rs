//! One trace per change, across processes: the controller (in this process, exporting
//! through the same telemetry setup as its binary) and the `switchyard-agent` binary
//! (iptables, in the node namespace) export OTLP to a collector inside this test — a
//! tonic server implementing the OTLP trace service from `opentelemetry-proto`. One
//! manifest edit must yield one trace holding the controller's and the agent's spans,
//! parented and timed in the order the change travelled.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use switchyard_controller::telemetry::{self, LogFormat};
use switchyard_integration::e2e::{AgentSpec, Cluster, set};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Where the agent exports, on the node namespace's own loopback.
const AGENT_COLLECTOR: &str = "127.0.0.1:4317";

/// One exported span and the service that exported it.
#[derive(Clone, Debug)]
struct Exported {
    service: String,
    span: Span,
}

impl Exported {
    fn start(&self) -> u64 {
        self.span.start_time_unix_nano
    }
    fn end(&self) -> u64 {
        self.span.end_time_unix_nano
    }
    fn int(&self, key: &str) -> Option<i64> {
        self.span
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Value::IntValue(v) => Some(*v),
                _ => None,
            })
    }
}

/// The OTLP trace service: keeps every span it receives.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Exported>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut kept = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    kept.push(Exported {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
    }

    fn spans(&self) -> Vec<Exported> {
        self.0.lock().unwrap().clone()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_manifest_edit_yields_one_trace_with_controller_and_agent_spans_in_order() {
    let collector = Collector::default();
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_endpoint = format!("http://{}", host.local_addr().unwrap());
    collector.serve(host);
    // The controller runs in this process: its spans go through the global provider
    // its binary installs with --otlp-endpoint.
    let telemetry = telemetry::init(
        "switchyard-controller",
        LogFormat::Text,
        Some(&host_endpoint),
    )
    .unwrap();

    let spec = AgentSpec::new(env!("CARGO_BIN_EXE_switchyard-agent")).args([
        "--dataplane",
        "iptables",
        "--otlp-endpoint",
        &format!("http://{AGENT_COLLECTOR}"),
    ]);
    let mut cluster = Cluster::start(spec).await;
    // Spans are exported in batches, seconds later: the collector is up long before.
    let address: SocketAddr = AGENT_COLLECTOR.parse().unwrap();
    collector.serve(cluster.node().tcp_listener(address).unwrap());

    let edited = nanos(SystemTime::now());
    cluster.set_web_endpoints(&[1, 2]);
    cluster
        .eventually("backend-3 out of web", |c| {
            c.spread(c.pod(), "10.96.0.10", 80, 20, false).0 == set(&["backend-1", "backend-2"])
        })
        .await;
    // Export what is pending: the controller flushes, the agent exports on exit.
    telemetry.flush();
    cluster.stop_and_clean_up_agent().unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans: Vec<Exported> = collector
            .spans()
            .into_iter()
            .filter(|s| s.start() >= edited || s.end() >= edited)
            .collect();
        if spans.iter().any(|s| s.span.name == "switchyard.kernel") {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agent spans exported after the edit; have: {:?}",
            spans.iter().map(|s| &s.span.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // One edit, one change, one trace.
    let changes: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.span.name == "switchyard.change")
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    let change = changes[0];
    let trace: Vec<&Exported> = spans
        .iter()
        .filter(|s| s.span.trace_id == change.span.trace_id)
        .collect();
    let by_name: HashMap<&str, &Exported> =
        trace.iter().map(|s| (s.span.name.as_str(), *s)).collect();
    let names = |service: &str| {
        let mut names: Vec<&str> = trace
            .iter()
            .filter(|s| s.service == service)
            .map(|s| s.span.name.as_str())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        names("switchyard-controller"),
        [
            "switchyard.change",
            "switchyard.compute",
            "switchyard.node_update",
            "switchyard.snapshot"
        ]
    );
    assert_eq!(
        names("switchyard-agent"),
        ["switchyard.agent_apply", "switchyard.kernel"]
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.service == "switchyard-agent")
            .all(|s| s.span.trace_id == change.span.trace_id),
        "every agent span after the edit belongs to the edit's trace"
    );

    // Parents: change ← snapshot, change ← node_update ← compute,
    // node_update ← agent_apply ← kernel.
    let span = |name: &str| by_name[name];
    let parent_of = |child: &str, parent: &str| {
        assert_eq!(
            span(child).span.parent_span_id,
            span(parent).span.span_id,
            "{child} is a child of {parent}"
        );
    };
    assert!(
        change.span.parent_span_id.is_empty(),
        "the change is the root"
    );
    parent_of("switchyard.snapshot", "switchyard.change");
    parent_of("switchyard.node_update", "switchyard.change");
    parent_of("switchyard.compute", "switchyard.node_update");
    parent_of("switchyard.agent_apply", "switchyard.node_update");
    parent_of("switchyard.kernel", "switchyard.agent_apply");

    // Times, in the order the change travelled (one machine, one clock).
    let in_order = [
        ("change starts", change.start()),
        ("snapshot starts", span("switchyard.snapshot").start()),
        ("snapshot ends", span("switchyard.snapshot").end()),
        ("node update starts", span("switchyard.node_update").start()),
        ("agent apply starts", span("switchyard.agent_apply").start()),
        ("kernel starts", span("switchyard.kernel").start()),
        ("kernel ends", span("switchyard.kernel").end()),
        ("agent apply ends", span("switchyard.agent_apply").end()),
        (
            "node update ends (ACK)",
            span("switchyard.node_update").end(),
        ),
    ];
    for pair in in_order.windows(2) {
        assert!(
            pair[0].1 <= pair[1].1,
            "{} before {}: {in_order:?}",
            pair[0].0,
            pair[1].0
        );
    }
    let update = span("switchyard.node_update");
    assert_eq!(
        update.int("switchyard.upserts"),
        Some(1),
        "only web changed"
    );
    assert_eq!(update.int("switchyard.rejected"), Some(0), "ACKed");
}
