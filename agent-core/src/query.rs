//! The agent's local query API (`switchyard.v1.AgentQuery`): what the node should hold,
//! what the kernel holds, the drift between them and how the last apply went; served
//! with gRPC health and server reflection (v1 and v1alpha) on one listener.

use std::{
    ops::{Bound, RangeBounds},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use switchyard_proto::{format_version, v1};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::{
    client::CurrentController,
    dataplane::{Dataplane, Programmed, ProgrammedService},
    drift::Drift,
    engine::{ApplyTiming, Engine},
    http::AbortOnDrop,
};

/// Serves `GetAgentState` from the runtime's engine.
pub struct QueryService<D> {
    engine: Arc<Engine<D>>,
    node_name: String,
    /// The controller the stream client is on now, or tried last.
    controller: CurrentController,
}

impl<D: Dataplane> QueryService<D> {
    pub(crate) fn new(
        engine: Arc<Engine<D>>,
        node_name: String,
        controller: CurrentController,
    ) -> Self {
        Self {
            engine,
            node_name,
            controller,
        }
    }
}

#[tonic::async_trait]
impl<D: Dataplane> v1::agent_query_server::AgentQuery for QueryService<D> {
    async fn get_agent_state(
        &self,
        request: Request<v1::GetAgentStateRequest>,
    ) -> Result<Response<v1::GetAgentStateResponse>, Status> {
        let include_objects = request.into_inner().include_kernel_objects;
        let view = self.engine.view();
        let (kernel, drift) = self
            .engine
            .drift()
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the kernel back: {e}")))?;
        let desired = view
            .desired
            .iter()
            .map(|(name, service)| v1::Resource {
                name: name.clone(),
                version: format_version(service.version),
                service: Some(service.state.as_ref().into()),
            })
            .collect();
        let effective = kernel
            .into_iter()
            .map(|(name, programmed)| effective_service(name, programmed, include_objects))
            .collect();
        let drift = drift.into_iter().map(drift_to_wire).collect();
        let last_apply = view.last_apply.map(apply_timings);
        Ok(Response::new(v1::GetAgentStateResponse {
            node_name: self.node_name.clone(),
            dataplane: self.engine.kind().into(),
            controller: self.controller.get(),
            connected: view.connected,
            desired,
            effective,
            drift,
            last_apply,
            drift_repairs: view.drift_repairs,
        }))
    }
}

fn effective_service(
    name: String,
    programmed: ProgrammedService,
    include_objects: bool,
) -> v1::EffectiveService {
    v1::EffectiveService {
        name,
        version: programmed.version.map(format_version).unwrap_or_default(),
        kernel_objects: if include_objects {
            programmed.kernel_objects
        } else {
            Vec::new()
        },
    }
}

fn drift_to_wire(drift: Drift) -> v1::Drift {
    v1::Drift {
        name: drift.name,
        kind: drift.kind.to_string(),
        detail: drift.detail,
    }
}

fn apply_timings(apply: ApplyTiming) -> v1::ApplyTimings {
    v1::ApplyTimings {
        at: Some(apply.at.into()),
        duration: prost_types::Duration::try_from(apply.duration).ok(),
        resources: apply.resources,
        full_sync: apply.full_sync,
    }
}

/// Services per report page when the query names no size, and the most it may name.
const DEFAULT_REPORT_PAGE: usize = 500;
const MAX_REPORT_PAGE: usize = 5000;
/// A report page stops before it outgrows this many encoded bytes: the controller
/// accepts agent messages of up to 4 MiB, and the drift of the page comes on top.
pub const MAX_REPORT_BYTES: usize = 3 << 20;

/// How long a read-back answers the next pages of a question: a page token continues
/// the same read, so the pages of one listing are consistent and the kernel (about a
/// second for iptables-save at 10,000 Services) is read once, not once per page.
const READ_BACK_REUSE: Duration = Duration::from_secs(10);

/// A kernel read-back kept for the next pages of the same question.
#[derive(Debug)]
pub(crate) struct ReadBack {
    taken: Instant,
    read_at: SystemTime,
    kernel: Programmed,
    drift: Vec<Drift>,
}

/// Answers the controller's `query` (asked for `ControllerQuery/GetNodeEffectiveState`)
/// with one page of the kernel read back: read now for a first page, or taken from
/// `last` for a following one (see [`READ_BACK_REUSE`]).
pub(crate) async fn report<D: Dataplane>(
    engine: &Engine<D>,
    query: &v1::EffectiveStateQuery,
    last: &mut Option<ReadBack>,
) -> v1::EffectiveStateReport {
    let mut report = v1::EffectiveStateReport {
        query_id: query.query_id,
        dataplane: engine.kind().into(),
        ..Default::default()
    };
    let reusable = !query.page_token.is_empty()
        && last
            .as_ref()
            .is_some_and(|r| r.taken.elapsed() < READ_BACK_REUSE);
    if !reusable {
        let read_at = SystemTime::now();
        match engine.drift().await {
            Ok((kernel, drift)) => {
                *last = Some(ReadBack {
                    taken: Instant::now(),
                    read_at,
                    kernel,
                    drift,
                })
            }
            Err(error) => {
                *last = None;
                report.read_at = Some(read_at.into());
                report.error = format!("cannot read the kernel back: {error}");
                return report;
            }
        }
    }
    let read = last.as_ref().expect("read above or reused");
    let view = engine.view();
    let page = report_page(&read.kernel, &read.drift, query);
    report.read_at = Some(read.read_at.into());
    report.effective = page.effective;
    report.drift = page.drift;
    report.next_page_token = page.next_page_token;
    report.last_apply = view.last_apply.map(apply_timings);
    report.drift_repairs = view.drift_repairs;
    report
}

/// One page of a report.
#[derive(Debug, Default, PartialEq)]
struct ReportPage {
    effective: Vec<v1::EffectiveService>,
    drift: Vec<v1::Drift>,
    next_page_token: String,
}

/// The Services of `kernel` after the query's page token, in name order, up to its page
/// size or [`MAX_REPORT_BYTES`] (always at least one), and the drift of the names the
/// page covers: after the token up to its last Service, or to the end on the last page.
/// Pure.
fn report_page(
    kernel: &Programmed,
    drift: &[Drift],
    query: &v1::EffectiveStateQuery,
) -> ReportPage {
    let size = match query.page_size {
        0 => DEFAULT_REPORT_PAGE,
        n => (n as usize).min(MAX_REPORT_PAGE),
    };
    let after = (!query.page_token.is_empty()).then_some(query.page_token.as_str());
    let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut page = ReportPage::default();
    let mut bytes = 0;
    let mut last: Option<String> = None;
    let mut more = false;
    for (name, programmed) in kernel.range::<str, _>((lower, Bound::Unbounded)) {
        let service = effective_service(
            name.clone(),
            programmed.clone(),
            query.include_kernel_objects,
        );
        let len = prost::Message::encoded_len(&service);
        if page.effective.len() >= size || (last.is_some() && bytes + len > MAX_REPORT_BYTES) {
            more = true;
            break;
        }
        bytes += len;
        last = Some(name.clone());
        page.effective.push(service);
    }
    let upper = match (&last, more) {
        (Some(last), true) => Bound::Included(last.as_str()),
        _ => Bound::Unbounded,
    };
    page.drift = drift
        .iter()
        .filter(|d| RangeBounds::<str>::contains(&(lower, upper), d.name.as_str()))
        .cloned()
        .map(drift_to_wire)
        .collect();
    if more {
        page.next_page_token = last.unwrap_or_default();
    }
    page
}

/// Serves the query API, gRPC health and reflection on `listener` until the guard drops.
pub(crate) async fn serve<D: Dataplane>(
    listener: TcpListener,
    service: QueryService<D>,
) -> AbortOnDrop {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<v1::agent_query_server::AgentQueryServer<QueryService<D>>>()
        .await;
    let reflection_v1 = switchyard_proto::reflection::v1();
    let reflection_v1alpha = switchyard_proto::reflection::v1alpha();
    let router = tonic::transport::Server::builder()
        .add_service(v1::agent_query_server::AgentQueryServer::new(service))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    AbortOnDrop(tokio::spawn(async move {
        // Keep the reporter alive for as long as the server runs.
        let _health = health;
        if let Err(error) = router
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
        {
            tracing::error!(%error, "the query API stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::DriftKind;

    fn kernel(names: &[&str], objects_each: usize, object_len: usize) -> Programmed {
        names
            .iter()
            .map(|n| {
                let service = ProgrammedService {
                    version: Some(7),
                    kernel_objects: vec!["x".repeat(object_len); objects_each],
                };
                (n.to_string(), service)
            })
            .collect()
    }

    fn drift(name: &str, kind: DriftKind) -> Drift {
        Drift {
            name: name.into(),
            kind,
            detail: String::new(),
        }
    }

    fn names<T>(items: &[T], name: impl Fn(&T) -> &str) -> Vec<&str> {
        items.iter().map(name).collect()
    }

    #[test]
    fn a_report_pages_services_in_name_order_with_the_drift_of_the_names_each_page_covers() {
        let kernel = kernel(&["a/1", "a/3", "b/1", "c/1"], 1, 10);
        let drift = vec![
            drift("a/0", DriftKind::Missing),
            drift("a/3", DriftKind::Differs),
            drift("b/0", DriftKind::Missing),
            drift("c/1", DriftKind::Unexpected),
            drift("d/0", DriftKind::Missing),
        ];
        let mut query = v1::EffectiveStateQuery {
            page_size: 2,
            ..Default::default()
        };
        let first = report_page(&kernel, &drift, &query);
        assert_eq!(names(&first.effective, |e| &e.name), ["a/1", "a/3"]);
        assert_eq!(names(&first.drift, |d| &d.name), ["a/0", "a/3"]);
        assert_eq!(first.drift[1].kind, "differs");
        assert_eq!(first.next_page_token, "a/3");
        assert!(
            first.effective[0].kernel_objects.is_empty(),
            "objects only when asked"
        );
        assert_eq!(first.effective[0].version, format_version(7));

        query.page_token = first.next_page_token;
        query.include_kernel_objects = true;
        let last = report_page(&kernel, &drift, &query);
        assert_eq!(names(&last.effective, |e| &e.name), ["b/1", "c/1"]);
        // The last page covers every name after the token, in the kernel or not.
        assert_eq!(names(&last.drift, |d| &d.name), ["b/0", "c/1", "d/0"]);
        assert_eq!(last.next_page_token, "");
        assert_eq!(last.effective[0].kernel_objects, ["x".repeat(10)]);
    }

    #[test]
    fn a_report_page_stops_before_it_outgrows_the_bytes_the_controller_accepts() {
        // 40 Services of ~200 KB of kernel objects each: 8 MB in all.
        let all: Vec<String> = (0..40).map(|i| format!("ns/s{i:02}")).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let query = v1::EffectiveStateQuery {
            include_kernel_objects: true,
            page_size: 5000,
            ..Default::default()
        };
        let page = report_page(&kernel(&all, 200, 1000), &[], &query);
        let bytes: usize = page.effective.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes <= MAX_REPORT_BYTES, "{bytes}");
        assert!(page.effective.len() >= 10, "{}", page.effective.len());
        assert_eq!(page.next_page_token, page.effective.last().unwrap().name);

        // One Service larger than the bound still comes alone rather than never.
        let huge = report_page(&kernel(&["ns/huge", "ns/next"], 4000, 1000), &[], &query);
        assert_eq!(names(&huge.effective, |e| &e.name), ["ns/huge"]);
        assert_eq!(huge.next_page_token, "ns/huge");
    }
}
