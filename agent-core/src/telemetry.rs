//! Trace export for the agent: with `--otlp-endpoint`, applying a traced change is
//! recorded as `switchyard.agent_apply` (response received → answer sent) with its
//! child `switchyard.kernel` (the dataplane's apply), both joining the controller's
//! trace through the W3C Trace Context the response carries ([`apply_spans`]).

use std::time::{Duration, SystemTime};

use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator as _,
    trace::{Span as _, TraceContextExt as _, Tracer as _},
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use switchyard_proto::v1::NodeStateResponse;

/// The installed exporter; exports what is pending when dropped (the agent's exit).
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "exporting the last OpenTelemetry spans failed");
        }
    }
}

/// Installs the global tracer provider exporting to `endpoint` over OTLP/gRPC, its spans
/// naming `node` (`k8s.node.name`); without an endpoint, spans are not recorded at all.
pub fn init(endpoint: Option<&str>, node: &str) -> anyhow::Result<Traces> {
    let Some(endpoint) = endpoint else {
        return Ok(Traces { provider: None });
    };
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("switchyard-agent")
        .with_attribute(KeyValue::new("k8s.node.name", node.to_owned()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Traces {
        provider: Some(provider),
    })
}

/// The controller's span this response continues, when it carries a valid one.
pub(crate) fn parent(response: &NodeStateResponse) -> Option<Context> {
    if response.trace_context.is_empty() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&response.trace_context);
    cx.span().span_context().is_valid().then_some(cx)
}

/// What applying one traced response took.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Applied {
    pub received: SystemTime,
    /// When the kernel held the change and how long the dataplane took; `None` when
    /// the dataplane failed as a whole.
    pub kernel: Option<(SystemTime, Duration)>,
    pub resources: u32,
    pub rejected: usize,
}

/// Records `switchyard.agent_apply`, ending now, and its `switchyard.kernel`, as
/// children of `parent`.
pub(crate) fn apply_spans(parent: &Context, applied: Applied) {
    let tracer = opentelemetry::global::tracer("switchyard-agent");
    let mut apply = tracer
        .span_builder("switchyard.agent_apply")
        .with_kind(opentelemetry::trace::SpanKind::Consumer)
        .with_start_time(applied.received)
        .with_attributes([
            KeyValue::new("switchyard.resources_applied", i64::from(applied.resources)),
            KeyValue::new("switchyard.rejected", applied.rejected as i64),
        ])
        .start_with_context(&tracer, parent);
    if let Some((done, took)) = applied.kernel {
        let cx = Context::new().with_remote_span_context(apply.span_context().clone());
        tracer
            .span_builder("switchyard.kernel")
            .with_start_time(done.checked_sub(took).unwrap_or(done))
            .start_with_context(&tracer, &cx)
            .end_with_timestamp(done);
    }
    apply.end();
}
