//! The stream client: connects to the controller, declares what the node holds, applies
//! each response and answers it with an ACK or a NACK, and reconnects forever with
//! backoff. Entry point: [`run`]; [`connect`] opens the channel every caller of the
//! controller shares (plain, or TLS for `https://` addresses).
//!
//! # TLS and identity
//! With an `https://` controller address the agent verifies the controller against its
//! `--ca` and, given `--tls-cert` and `--tls-key`, presents its node's certificate
//! (kubelet's form: `CN=system:node:NAME`, `O=system:nodes`). The files are read again at
//! every connection, so rotated certificates are used from the next one on. A controller
//! that refuses the stream (another node's certificate, an invalid name) answers
//! `PERMISSION_DENIED` or `INVALID_ARGUMENT`: the agent logs why, in the controller's
//! words, and waits its longest backoff before asking again.
//!
//! # Fail-static
//! While the controller is unreachable the client only retries: it never touches the
//! kernel, so the rules in force keep serving traffic.
//!
//! # Per response
//! Each resource is converted with `TryFrom`; one that fails is NACKed with its error and
//! not applied. The rest are merged into the desired cache (upserts, then removals) and
//! handed to `Dataplane::apply` with a `Change` naming exactly them. The answer ACKs the
//! nonce, or NACKs it with the conversion errors plus the resources the dataplane
//! reported in `ApplyOutcome::failed`. If the dataplane fails as a whole, every resource
//! of the response is NACKed with that error and the stream goes on. A response that
//! carries `effective_state_query` is a question instead: the client reads the kernel
//! back and answers with one page of it (`query::report`), applying nothing.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use switchyard_proto::v1::{
    self, ApplyStats, NodeIdentity, NodeStateRequest, NodeStateResponse, ResourceError,
    node_state_discovery_client::NodeStateDiscoveryClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{cache::convert, dataplane::Dataplane, engine::Engine, telemetry};

/// Why one stream ended. Always retryable: the client backs off and reconnects.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The controller address is not a valid URI.
    #[error("invalid controller address {address:?}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting failed (the message holds every cause, e.g. the TLS alert).
    #[error("connect to the controller: {}", chain(.0))]
    Connect(#[source] tonic::transport::Error),
    /// A TLS file could not be read.
    #[error("read the {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TLS flags do not fit the controller address (checked at start).
    #[error("{0}")]
    TlsConfig(String),
    /// The stream failed or the controller closed it.
    #[error("stream: {0}")]
    Stream(#[source] tonic::Status),
    /// The controller ended the stream.
    #[error("the controller closed the stream")]
    Closed,
}

/// `error` and each of its causes, `: `-separated (tonic's transport errors say only
/// "transport error" at the top).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The agent's TLS files (`--ca`, `--tls-cert`, `--tls-key`), read at every connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates (PEM) that sign the controller's certificate.
    pub ca: Option<PathBuf>,
    /// This node's client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// Checks the flags against the controller address: `https://` needs `--ca`,
    /// certificate and key come together, and TLS flags need `https://`.
    pub fn check(&self, controller: &str) -> Result<(), ClientError> {
        let https = controller.starts_with("https://");
        let any = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        let problem = if self.cert.is_some() != self.key.is_some() {
            Some("--tls-cert and --tls-key go together")
        } else if https && self.ca.is_none() {
            Some("an https:// controller needs --ca, the CA that signs its certificate")
        } else if !https && any {
            Some("--ca, --tls-cert and --tls-key need an https:// controller address")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(ClientError::TlsConfig(format!(
                "{problem} (controller {controller})"
            ))),
            None => Ok(()),
        }
    }

    async fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, ClientError> {
        tokio::fs::read(path)
            .await
            .map_err(|source| ClientError::TlsFile {
                what,
                path: path.clone(),
                source,
            })
    }

    /// The TLS configuration from the files as they are now; `None` without `--ca`.
    async fn config(&self) -> Result<Option<ClientTlsConfig>, ClientError> {
        let Some(ca) = &self.ca else { return Ok(None) };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(Self::read("CA", ca).await?));
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config = config.identity(Identity::from_pem(
                Self::read("certificate", cert).await?,
                Self::read("key", key).await?,
            ));
        }
        Ok(Some(config))
    }
}

/// Opens a channel to the controller at `address`: TLS when `tls` has a CA (then the
/// address is `https://`), plain otherwise. Reads the TLS files now.
pub async fn connect(address: &str, tls: &ClientTls) -> Result<Channel, ClientError> {
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(|source| ClientError::Address {
            address: address.to_owned(),
            source,
        })?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(config) = tls.config().await? {
        endpoint = endpoint.tls_config(config).map_err(ClientError::Connect)?;
    }
    endpoint.connect().await.map_err(ClientError::Connect)
}

/// Whether the controller refused this agent for what it is (identity, node name,
/// declarations), so that asking again at once would be refused the same way.
pub fn is_refusal(error: &ClientError) -> bool {
    matches!(error, ClientError::Stream(status) if matches!(
        status.code(),
        Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated | Code::ResourceExhausted
    ))
}

/// Who the agent is on the stream.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub controller: String,
    pub node_name: String,
    pub agent_version: String,
    pub tls: ClientTls,
}

/// Exponential backoff with jitter: 100 ms doubling to a 10 s cap, each delay drawn
/// from the upper half of the current step.
#[derive(Debug)]
pub struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            current: min,
            min,
            max,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.current;
        self.current = (self.current * 2).min(self.max);
        step / 2 + step.mul_f64(fastrand::f64() / 2.0)
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The longest delay: after a refusal, asking again soon helps no one.
    pub fn longest(&mut self) -> Duration {
        self.current = self.max;
        self.next_delay()
    }
}

/// Streams from the controller forever, reconnecting with [`Backoff`].
pub(crate) async fn run<D: Dataplane>(engine: Arc<Engine<D>>, config: ClientConfig) {
    let mut backoff = Backoff::default();
    loop {
        let result = session(&engine, &config, &mut backoff).await;
        engine.set_connected(false);
        let delay = match &result {
            Ok(()) => {
                let delay = backoff.next_delay();
                tracing::info!(?delay, "stream ended; reconnecting");
                delay
            }
            Err(error @ ClientError::Stream(status)) if is_refusal(error) => {
                let delay = backoff.longest();
                tracing::error!(
                    code = ?status.code(),
                    controller_says = status.message(),
                    node = %config.node_name,
                    ?delay,
                    "the controller refused this agent's stream (check --node-name and the \
                     node certificate); rules stay as they are"
                );
                delay
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, "controller unreachable; rules stay as they are");
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

async fn session<D: Dataplane>(
    engine: &Engine<D>,
    config: &ClientConfig,
    backoff: &mut Backoff,
) -> Result<(), ClientError> {
    let channel = connect(&config.controller, &config.tls).await?;
    let (tx, rx) = mpsc::channel(4);
    let declared = engine.declared_versions().await;
    tracing::info!(declared = declared.len(), controller = %config.controller, "opening the stream");
    let first = NodeStateRequest {
        node: Some(NodeIdentity {
            node_name: config.node_name.clone(),
            dataplane: engine.kind().into(),
            agent_version: config.agent_version.clone(),
        }),
        initial_resource_versions: declared.into_iter().collect(),
        dataplane_in_force: engine.kind().into(),
        declared_label: engine.label().into(),
        ..Default::default()
    };
    tx.send(first).await.map_err(|_| ClientError::Closed)?;
    let mut responses = NodeStateDiscoveryClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .stream_node_state(ReceiverStream::new(rx))
        .await
        .map_err(ClientError::Stream)?
        .into_inner();
    engine.set_connected(true);
    backoff.reset();
    // A dataplane the policy wants (a changed flag) is switched to once the stream is up.
    switch_if_wanted(engine, &tx).await?;
    loop {
        let Some(response) = responses.message().await.map_err(ClientError::Stream)? else {
            return Ok(());
        };
        if let Some(query) = &response.effective_state_query {
            // A question, not a state change: nothing to apply, no nonce to answer.
            let report = crate::query::report(engine, query).await;
            let answer = NodeStateRequest {
                dataplane_in_force: engine.kind().into(),
                effective_state_report: Some(report),
                ..Default::default()
            };
            tx.send(answer).await.map_err(|_| ClientError::Closed)?;
            continue;
        }
        engine.note_label(response.dataplane());
        let answer = handle_response(engine, response).await;
        tx.send(answer).await.map_err(|_| ClientError::Closed)?;
        switch_if_wanted(engine, &tx).await?;
    }
}

/// Switches to the dataplane the policy wants, if it is not in force, and tells the
/// controller (a message answering no nonce). A failed switch leaves the old dataplane
/// in force; it is tried again after the next response or drift check.
async fn switch_if_wanted<D: Dataplane>(
    engine: &Engine<D>,
    tx: &mpsc::Sender<NodeStateRequest>,
) -> Result<(), ClientError> {
    match engine.reconcile_dataplane().await {
        Ok(Some(_)) => {
            let status = NodeStateRequest {
                dataplane_in_force: engine.kind().into(),
                ..Default::default()
            };
            tx.send(status).await.map_err(|_| ClientError::Closed)?;
        }
        Ok(None) => {}
        Err(error) => {
            tracing::error!(%error, "switching dataplanes failed; the old one stays in force")
        }
    }
    Ok(())
}

/// Applies one response and builds its ACK or NACK.
pub(crate) async fn handle_response<D: Dataplane>(
    engine: &Engine<D>,
    response: NodeStateResponse,
) -> NodeStateRequest {
    let received = SystemTime::now();
    engine.health.queued_update();
    engine
        .health
        .set_node_eligible(!response.node_being_deleted);
    let mut errors = Vec::new();
    let mut upserts = Vec::new();
    for resource in &response.resources {
        match convert(resource) {
            Ok(service) => upserts.push((resource.name.clone(), service)),
            Err(message) => {
                tracing::warn!(name = %switchyard_proto::names::quote_bounded(&resource.name), %message, "rejecting a resource that does not convert");
                errors.push(ResourceError {
                    resource_name: resource.name.clone(),
                    message,
                });
            }
        }
    }
    let mut kernel = None;
    let (applied, duration) = match engine
        .apply_delta(upserts, response.removed_resources.clone())
        .await
    {
        Ok(report) => {
            errors.extend(report.failed.into_iter().map(|(resource_name, message)| {
                ResourceError {
                    resource_name,
                    message,
                }
            }));
            engine.health.updated();
            if let Some(kernel_done) = report.kernel_done {
                let latency = Latency::of(&response, received, kernel_done);
                latency.record(&engine.metrics, report.duration);
                kernel = Some((kernel_done, report.duration));
            }
            (report.applied, report.duration)
        }
        Err(error) => {
            tracing::error!(%error, nonce = %response.nonce, "the dataplane failed; NACKing the whole response");
            let message = error.to_string();
            errors = response
                .resources
                .iter()
                .map(|r| r.name.clone())
                .chain(response.removed_resources.iter().cloned())
                .map(|resource_name| ResourceError {
                    resource_name,
                    message: message.clone(),
                })
                .collect();
            (0, Duration::ZERO)
        }
    };
    if errors.is_empty() {
        tracing::debug!(nonce = %response.nonce, applied, "ACK");
    } else {
        tracing::warn!(nonce = %response.nonce, rejected = errors.len(), "NACK");
    }
    if let Some(parent) = telemetry::parent(&response) {
        let applied = telemetry::Applied {
            received,
            kernel,
            resources: applied,
            rejected: errors.len(),
        };
        telemetry::apply_spans(&parent, applied);
    }
    NodeStateRequest {
        response_nonce: response.nonce,
        dataplane_in_force: engine.kind().into(),
        errors,
        apply_stats: Some(ApplyStats {
            apply_duration: prost_types::Duration::try_from(duration).ok(),
            resources_applied: applied,
        }),
        ..Default::default()
    }
}

/// The points in time one response's change passed, for network programming latency
/// and its stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Latency {
    /// The API change (or manifest edit) behind the response, if the controller knew it.
    pub trigger: Option<SystemTime>,
    /// When the controller sent the response.
    pub sent: Option<SystemTime>,
    pub received: SystemTime,
    /// When the kernel held the change.
    pub kernel_done: SystemTime,
}

impl Latency {
    fn of(response: &NodeStateResponse, received: SystemTime, kernel_done: SystemTime) -> Self {
        let time = |t: Option<prost_types::Timestamp>| t.and_then(|t| SystemTime::try_from(t).ok());
        Self {
            trigger: time(response.trigger_time),
            sent: time(response.sent_time),
            received,
            kernel_done,
        }
    }

    /// Observes the whole latency and its stages; `kernel` is the dataplane's part.
    /// The agent's own part ends now (the ACK goes out next). A stage whose clock
    /// went backwards (another machine's clock behind this one's) is left out.
    fn record(&self, metrics: &crate::metrics::Metrics, kernel: Duration) {
        use crate::metrics::Stage;
        let span = |from: SystemTime, to: SystemTime| to.duration_since(from).ok();
        if let Some(latency) = self.trigger.and_then(|t| span(t, self.kernel_done)) {
            metrics
                .network_programming_duration
                .observe(latency.as_secs_f64());
        }
        if let Some(took) = self.trigger.zip(self.sent).and_then(|(t, s)| span(t, s)) {
            metrics.observe_stage(Stage::Controller, took);
        }
        if let Some(took) = self.sent.and_then(|s| span(s, self.received)) {
            metrics.observe_stage(Stage::Transport, took);
        }
        if let Some(took) = span(self.received, SystemTime::now()) {
            metrics.observe_stage(Stage::Agent, took.saturating_sub(kernel));
        }
        metrics.observe_stage(Stage::Kernel, kernel);
    }
}

/// The dataplane kinds' names, as used in default paths.
pub fn dataplane_name(kind: v1::Dataplane) -> &'static str {
    match kind {
        v1::Dataplane::Iptables => "iptables",
        v1::Dataplane::Ipvs => "ipvs",
        v1::Dataplane::Ebpf => "ebpf",
        v1::Dataplane::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count of one stage's bucket `le` in the exposition `text`.
    fn bucket_count(text: &str, stage: &str, le: &str) -> u64 {
        let series = "switchyard_network_programming_stage_duration_seconds_bucket{";
        text.lines()
            .find(|l| {
                l.starts_with(series)
                    && l.contains(&format!("le=\"{le}\""))
                    && l.contains(&format!("stage=\"{stage}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {stage} bucket le={le} in:\n{text}"))
    }

    #[test]
    fn latency_is_split_into_controller_transport_agent_and_kernel_stages() {
        let metrics = crate::metrics::Metrics::new();
        let t0 = SystemTime::now() - Duration::from_millis(100);
        Latency {
            trigger: Some(t0),
            sent: Some(t0 + Duration::from_millis(2)),
            received: t0 + Duration::from_millis(3),
            kernel_done: t0 + Duration::from_millis(10),
        }
        .record(&metrics, Duration::from_millis(6));
        let text = metrics.encode();
        // 2 ms in the controller, 1 ms in transport, 6 ms in the kernel.
        assert_eq!(bucket_count(&text, "controller", "0.0015"), 0);
        assert_eq!(bucket_count(&text, "controller", "0.002"), 1);
        assert_eq!(bucket_count(&text, "transport", "0.0007"), 0);
        assert_eq!(bucket_count(&text, "transport", "0.001"), 1);
        assert_eq!(bucket_count(&text, "kernel", "0.005"), 0);
        assert_eq!(bucket_count(&text, "kernel", "0.007"), 1);
        // The agent's part runs from receipt until now (~97 ms), less the kernel's 6 ms.
        assert_eq!(bucket_count(&text, "agent", "0.07"), 0);
        assert_eq!(bucket_count(&text, "agent", "0.2"), 1);
        assert!(text.contains("switchyard_network_programming_duration_seconds_count 1"));
    }

    #[test]
    fn a_clock_behind_the_senders_drops_that_stage_only() {
        let metrics = crate::metrics::Metrics::new();
        let now = SystemTime::now();
        Latency {
            trigger: None,
            sent: Some(now + Duration::from_secs(5)),
            received: now,
            kernel_done: now,
        }
        .record(&metrics, Duration::from_millis(1));
        let text = metrics.encode();
        assert!(!text.contains("stage=\"transport\""), "{text}");
        assert!(!text.contains("stage=\"controller\""), "{text}");
        assert!(text.contains("stage=\"kernel\""), "{text}");
        assert!(text.contains("switchyard_network_programming_duration_seconds_count 0"));
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            let d = backoff.next_delay();
            assert!(d <= Duration::from_secs(10), "{d:?}");
        }
        assert!(backoff.next_delay() >= Duration::from_secs(5));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
        assert!(
            backoff.longest() >= Duration::from_secs(5),
            "a refusal waits longest"
        );
    }

    #[test]
    fn tls_flags_must_fit_the_controller_address() {
        let path = |p: &str| Some(PathBuf::from(p));
        let cases = [
            ("http://c:9740", ClientTls::default(), None),
            (
                "https://c:9740",
                ClientTls {
                    ca: path("ca.pem"),
                    ..Default::default()
                },
                None,
            ),
            (
                "https://c:9740",
                ClientTls {
                    ca: path("ca.pem"),
                    cert: path("c.pem"),
                    key: path("k.pem"),
                },
                None,
            ),
            ("https://c:9740", ClientTls::default(), Some("needs --ca")),
            (
                "http://c:9740",
                ClientTls {
                    ca: path("ca.pem"),
                    ..Default::default()
                },
                Some("need an https://"),
            ),
            (
                "https://c:9740",
                ClientTls {
                    ca: path("ca.pem"),
                    cert: path("c.pem"),
                    key: None,
                },
                Some("go together"),
            ),
        ];
        for (address, tls, problem) in cases {
            match (tls.check(address), problem) {
                (Ok(()), None) => {}
                (Err(error), Some(problem)) => {
                    assert!(error.to_string().contains(problem), "{address}: {error}")
                }
                (result, _) => panic!("{address} {tls:?}: {result:?}"),
            }
        }
    }
}
