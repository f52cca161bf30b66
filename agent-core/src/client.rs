//! The stream client: connects to a controller, declares what the node holds, applies
//! each response and answers it with an ACK or a NACK, and reconnects forever, moving
//! along its list of controllers. Entry point: [`run`]; [`connect`] opens the channel
//! every caller of a controller shares (plain, or TLS for `https://` addresses);
//! [`Rotation`] decides which controller comes next and after what delay.
//!
//! # Several controllers
//! The agent lists one controller or several replicas (`--controller a,b,c`). It tries
//! them in an order shuffled once per process (so a fleet of agents spreads over the
//! replicas), one at a time, and stays on the one whose stream is up. Where a stream
//! ends decides what comes next ([`Rotation::after`]):
//! - **A failed connect or a lost stream** moves to the *next* controller of the list,
//!   after the next delay of the [`Backoff`] (jittered, exponential, 100 ms up to 10 s):
//!   a dead replica costs one attempt, not a backoff spiral. The backoff starts over
//!   once a stream is up.
//! - **A refusal** (`PERMISSION_DENIED`, `INVALID_ARGUMENT`, `UNAUTHENTICATED`,
//!   `RESOURCE_EXHAUSTED`, see below) also moves on, after the backoff's longest delay.
//! - **Load shedding**: a replica that ends the stream with `UNAVAILABLE` and the
//!   trailer [`switchyard_proto::RECONNECT_METADATA`] `=`
//!   [`switchyard_proto::RECONNECT_ELSEWHERE`] sends the agent to the next controller
//!   of its list (never back to the one that shed it, when there is another) after a
//!   random 0–500 ms, to spread the herd, without advancing the backoff; with one
//!   controller listed, the agent comes back to it after that delay. Should more sheds
//!   come in a row than there are controllers listed (every replica shed the agent and
//!   none served it), the spread doubles with each further one, up to the backoff's cap.
//!
//! Every move is counted in `switchyard_controller_switches_total{reason}` (`lost`,
//! `connect_failed`, `shed`), and the query API names the controller the agent is on
//! (or tried last). On another replica the agent resumes as after any reconnect: its
//! first message declares the versions it holds (`initial_resource_versions`), so the
//! replica sends only what differs, nothing when it computes the same state.
//!
//! # TLS and identity
//! With `https://` controller addresses (all of them: the list must agree) the agent
//! verifies the controller against its `--ca` and, given `--tls-cert` and `--tls-key`,
//! presents its node's certificate (kubelet's form: `CN=system:node:NAME`,
//! `O=system:nodes`). The files are read again at every connection, so rotated
//! certificates are used from the next one on. A controller that refuses the stream
//! (another node's certificate, an invalid name) answers `PERMISSION_DENIED` or
//! `INVALID_ARGUMENT`: the agent logs why, in the controller's words, and waits its
//! longest backoff before asking again.
//!
//! # Fail-static
//! While no controller is reachable the client only retries: it never touches the
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
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use switchyard_proto::v1::{
    self, ApplyStats, NodeIdentity, NodeStateRequest, NodeStateResponse, ResourceError,
    node_state_discovery_client::NodeStateDiscoveryClient,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    cache::convert, dataplane::Dataplane, engine::Engine, metrics::SwitchReason, telemetry,
};

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
    /// The TLS flags do not fit the controller addresses (checked at start).
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

    /// [`ClientTls::check`] for a list of controllers, which must not be empty, nor hold
    /// an empty address, and must agree on TLS: all `https://` or none.
    pub fn check_all(&self, controllers: &[String]) -> Result<(), ClientError> {
        if controllers.iter().all(|c| c.trim().is_empty()) {
            return Err(ClientError::TlsConfig(
                "no controller address (--controller)".into(),
            ));
        }
        if controllers.iter().any(|c| c.trim().is_empty()) {
            return Err(ClientError::TlsConfig(format!(
                "an empty controller address in --controller {:?}",
                controllers.join(",")
            )));
        }
        let https = |c: &&String| c.trim().starts_with("https://");
        if let (Some(with), Some(without)) = (
            controllers.iter().find(https),
            controllers.iter().find(|c| !https(c)),
        ) {
            return Err(ClientError::TlsConfig(format!(
                "the controllers disagree on TLS: {with} is https:// but {without} is not; \
                 list only https:// or only http:// addresses"
            )));
        }
        controllers.iter().try_for_each(|c| self.check(c.trim()))
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

/// Whether a controller ended the stream to move the agent to another replica:
/// `UNAVAILABLE` with the trailer [`switchyard_proto::RECONNECT_METADATA`] set to
/// [`switchyard_proto::RECONNECT_ELSEWHERE`].
pub fn is_shed(error: &ClientError) -> bool {
    matches!(error, ClientError::Stream(status) if status.code() == Code::Unavailable
        && status
            .metadata()
            .get(switchyard_proto::RECONNECT_METADATA)
            .and_then(|value| value.to_str().ok())
            == Some(switchyard_proto::RECONNECT_ELSEWHERE))
}

/// The controller addresses of a comma-separated list (`AgentOptions::controller`),
/// trimmed, in the order given.
pub fn controller_list(addresses: &str) -> Vec<String> {
    addresses.split(',').map(|a| a.trim().to_owned()).collect()
}

/// Who the agent is on the stream.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub node_name: String,
    pub agent_version: String,
    pub tls: ClientTls,
}

/// The controller the client is connected to now, or tried last: written by the client,
/// read by the query API.
#[derive(Clone, Debug, Default)]
pub struct CurrentController(Arc<Mutex<String>>);

impl CurrentController {
    pub fn new(address: &str) -> Self {
        Self(Arc::new(Mutex::new(address.to_owned())))
    }

    pub fn get(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, address: &str) {
        let mut current = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if *current != address {
            address.clone_into(&mut current);
        }
    }
}

/// The order in which the client tries its controllers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControllerOrder {
    /// Shuffled once, so that agents spread over the replicas (what agents do).
    #[default]
    Shuffled,
    /// As listed (for tests that decide which controller comes first).
    AsGiven,
}

/// How the random spread after a shed is drawn: 0 up to this.
pub const SHED_SPREAD: Duration = Duration::from_millis(500);
/// A stream up this long counts as having served the agent even without a response
/// (an agent that holds everything may hear nothing for hours).
pub const SERVED_AFTER: Duration = Duration::from_secs(10);

/// How one attempt at a stream ended, as [`Rotation::after`] weighs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The stream came up (the controller accepted it).
    pub up: bool,
    /// The stream carried a response, or stayed up [`SERVED_AFTER`].
    pub served: bool,
    /// Why it ended.
    pub end: End,
}

/// Why an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Connecting failed, or the stream failed or closed.
    Failed,
    /// The controller refused this agent ([`is_refusal`]).
    Refused,
    /// The controller sent the agent to another replica ([`is_shed`]).
    Shed,
}

impl Attempt {
    fn of(result: &Result<(), ClientError>, up: Option<Instant>, responses: u64) -> Self {
        let end = match result {
            Err(error) if is_shed(error) => End::Shed,
            Err(error) if is_refusal(error) => End::Refused,
            _ => End::Failed,
        };
        Self {
            up: up.is_some(),
            served: responses > 0 || up.is_some_and(|up| up.elapsed() >= SERVED_AFTER),
            end,
        }
    }

    /// The `reason` the move is counted under.
    pub fn reason(&self) -> SwitchReason {
        match (self.end, self.up) {
            (End::Shed, _) => SwitchReason::Shed,
            (_, true) => SwitchReason::Lost,
            (_, false) => SwitchReason::ConnectFailed,
        }
    }
}

/// The controllers in the order they are tried, the one tried now, and the delays
/// between attempts. A pure step function ([`Rotation::after`]) over how each attempt
/// ended; the only randomness is the jitter of the delays (and the shuffle of
/// [`Rotation::shuffled`]).
#[derive(Debug)]
pub struct Rotation {
    controllers: Vec<String>,
    current: usize,
    backoff: Backoff,
    /// Sheds since a stream last served the agent or ended otherwise.
    sheds_in_a_row: usize,
}

impl Rotation {
    /// Tries `controllers` in the order given, starting with the first. An empty list
    /// stands for one empty address (which fails to connect, as any invalid one).
    pub fn new(controllers: Vec<String>) -> Self {
        let controllers = if controllers.is_empty() {
            vec![String::new()]
        } else {
            controllers
        };
        Self {
            controllers,
            current: 0,
            backoff: Backoff::default(),
            sheds_in_a_row: 0,
        }
    }

    /// Tries `controllers` in a random order, drawn now and kept.
    pub fn shuffled(mut controllers: Vec<String>) -> Self {
        fastrand::shuffle(&mut controllers);
        Self::new(controllers)
    }

    /// `controllers` in `order`.
    pub fn in_order(controllers: Vec<String>, order: ControllerOrder) -> Self {
        match order {
            ControllerOrder::Shuffled => Self::shuffled(controllers),
            ControllerOrder::AsGiven => Self::new(controllers),
        }
    }

    /// The controller to try now.
    pub fn current(&self) -> &str {
        &self.controllers[self.current]
    }

    /// Every controller, in the order they are tried.
    pub fn controllers(&self) -> &[String] {
        &self.controllers
    }

    /// Moves to the next controller after `attempt` and says how long to wait before
    /// trying it: the backoff's next delay after a failure (the backoff starting over
    /// if the stream had come up), its longest after a refusal, and a random spread of
    /// up to [`SHED_SPREAD`] after a shed (doubling for each shed in a row beyond one
    /// per controller).
    pub fn after(&mut self, attempt: Attempt) -> Duration {
        if attempt.up {
            self.backoff.reset();
        }
        if attempt.end != End::Shed || attempt.served {
            self.sheds_in_a_row = 0;
        }
        self.current = (self.current + 1) % self.controllers.len();
        match attempt.end {
            End::Failed => self.backoff.next_delay(),
            End::Refused => self.backoff.longest(),
            End::Shed => {
                self.sheds_in_a_row += 1;
                self.shed_delay()
            }
        }
    }

    fn shed_delay(&self) -> Duration {
        let beyond = self.sheds_in_a_row.saturating_sub(self.controllers.len());
        if beyond == 0 {
            return SHED_SPREAD.mul_f64(fastrand::f64());
        }
        let step = SHED_SPREAD
            .saturating_mul(1 << beyond.min(16) as u32)
            .min(self.backoff.max);
        step / 2 + step.mul_f64(fastrand::f64() / 2.0)
    }
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

/// Streams from the controllers of `rotation` forever, one at a time, moving along the
/// list as [`Rotation::after`] says; `current` names the one tried now.
pub(crate) async fn run<D: Dataplane>(
    engine: Arc<Engine<D>>,
    config: ClientConfig,
    mut rotation: Rotation,
    current: CurrentController,
) {
    loop {
        let controller = rotation.current().to_owned();
        current.set(&controller);
        let mut up = None;
        let mut responses = 0;
        let result = session(&engine, &config, &controller, &mut up, &mut responses).await;
        engine.set_connected(false);
        let attempt = Attempt::of(&result, up, responses);
        let delay = rotation.after(attempt);
        engine.metrics.controller_switched(attempt.reason());
        let next = rotation.current();
        match (&result, attempt.end) {
            (Err(ClientError::Stream(status)), End::Refused) => tracing::error!(
                %controller,
                code = ?status.code(),
                controller_says = status.message(),
                node = %config.node_name,
                %next,
                ?delay,
                "the controller refused this agent's stream (check --node-name and the \
                 node certificate); rules stay as they are"
            ),
            (Err(error), End::Shed) => tracing::info!(
                %controller,
                %error,
                %next,
                ?delay,
                "the controller moved this agent to another replica"
            ),
            (Ok(()), _) => tracing::info!(%controller, %next, ?delay, "stream ended; reconnecting"),
            (Err(error), _) if attempt.up => tracing::warn!(
                %controller,
                %error,
                %next,
                ?delay,
                "stream lost; rules stay as they are"
            ),
            (Err(error), _) => tracing::warn!(
                %controller,
                %error,
                %next,
                ?delay,
                "controller unreachable; rules stay as they are"
            ),
        }
        tokio::time::sleep(delay).await;
    }
}

/// One stream with `controller`, until it ends. `up` is set when the controller accepts
/// the stream, and `responses` counts the responses it carried.
async fn session<D: Dataplane>(
    engine: &Engine<D>,
    config: &ClientConfig,
    controller: &str,
    up: &mut Option<Instant>,
    responses: &mut u64,
) -> Result<(), ClientError> {
    let channel = connect(controller, &config.tls).await?;
    // The last kernel read-back, for the next pages of the controller's question.
    let mut read_back = None;
    let (tx, rx) = mpsc::channel(4);
    let declared = engine.declared_versions().await;
    tracing::info!(declared = declared.len(), %controller, "opening the stream");
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
    let mut stream = NodeStateDiscoveryClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .stream_node_state(ReceiverStream::new(rx))
        .await
        .map_err(ClientError::Stream)?
        .into_inner();
    engine.set_connected(true);
    *up = Some(Instant::now());
    // A dataplane the policy wants (a changed flag) is switched to once the stream is up.
    switch_if_wanted(engine, &tx).await?;
    loop {
        let Some(response) = stream.message().await.map_err(ClientError::Stream)? else {
            return Ok(());
        };
        *responses += 1;
        if let Some(query) = &response.effective_state_query {
            // A question, not a state change: nothing to apply, no nonce to answer.
            let report = crate::query::report(engine, query, &mut read_back).await;
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    const CONNECT_FAILED: Attempt = Attempt {
        up: false,
        served: false,
        end: End::Failed,
    };
    const LOST: Attempt = Attempt {
        up: true,
        served: true,
        end: End::Failed,
    };
    const SHED_AT_ONCE: Attempt = Attempt {
        up: false,
        served: false,
        end: End::Shed,
    };

    #[test]
    fn a_failed_connect_moves_to_the_next_controller_and_the_backoff_grows_until_a_stream_is_up() {
        let mut rotation = Rotation::new(list(&["a", "b", "c"]));
        assert_eq!(rotation.current(), "a");
        let first = rotation.after(CONNECT_FAILED);
        assert_eq!(
            rotation.current(),
            "b",
            "a dead controller costs one attempt"
        );
        assert!(first >= ms(50) && first <= ms(100), "{first:?}");
        let second = rotation.after(CONNECT_FAILED);
        assert_eq!(rotation.current(), "c");
        assert!(second >= ms(100) && second <= ms(200), "{second:?}");
        let third = rotation.after(CONNECT_FAILED);
        assert_eq!(rotation.current(), "a", "the list wraps around");
        assert!(third >= ms(200) && third <= ms(400), "{third:?}");
        // A stream that was up and is lost: the next controller, the backoff from scratch.
        let lost = rotation.after(LOST);
        assert_eq!(rotation.current(), "b");
        assert!(lost >= ms(50) && lost <= ms(100), "{lost:?}");
        assert_eq!(CONNECT_FAILED.reason(), SwitchReason::ConnectFailed);
        assert_eq!(LOST.reason(), SwitchReason::Lost);
    }

    #[test]
    fn a_refusal_waits_the_longest_backoff_and_moves_on() {
        let mut rotation = Rotation::new(list(&["a", "b"]));
        let refused = Attempt {
            up: false,
            served: false,
            end: End::Refused,
        };
        let delay = rotation.after(refused);
        assert!(delay >= Duration::from_secs(5), "{delay:?}");
        assert_eq!(rotation.current(), "b");
        assert_eq!(refused.reason(), SwitchReason::ConnectFailed);
    }

    #[test]
    fn a_shed_moves_to_another_controller_after_a_short_spread_without_growing_the_backoff() {
        let mut rotation = Rotation::new(list(&["a", "b", "c"]));
        rotation.after(CONNECT_FAILED);
        rotation.after(CONNECT_FAILED);
        assert_eq!(rotation.current(), "c");
        // c accepts the stream, serves it, then sheds it.
        let shed = Attempt {
            up: true,
            served: true,
            end: End::Shed,
        };
        let delay = rotation.after(shed);
        assert!(delay <= SHED_SPREAD, "{delay:?}");
        assert_eq!(rotation.current(), "a", "not back to the one that shed it");
        assert_eq!(shed.reason(), SwitchReason::Shed);
        // The backoff was not advanced by the shed (it started over with the stream).
        let next = rotation.after(CONNECT_FAILED);
        assert!(next >= ms(50) && next <= ms(100), "{next:?}");

        // A shed at once (no stream up) leaves the backoff where failures took it.
        let mut rotation = Rotation::new(list(&["a", "b", "c"]));
        rotation.after(CONNECT_FAILED);
        rotation.after(CONNECT_FAILED);
        assert!(rotation.after(SHED_AT_ONCE) <= SHED_SPREAD);
        let next = rotation.after(CONNECT_FAILED);
        assert!(next >= ms(200) && next <= ms(400), "{next:?}");
    }

    #[test]
    fn the_shed_spread_is_random_over_half_a_second() {
        let mut rotation = Rotation::new(list(&["a", "b"]));
        let delays: Vec<Duration> = (0..50)
            .map(|_| {
                let served = Attempt {
                    served: true,
                    ..SHED_AT_ONCE
                };
                rotation.after(served)
            })
            .collect();
        assert!(delays.iter().all(|d| *d <= SHED_SPREAD), "{delays:?}");
        assert!(delays.iter().any(|d| *d < ms(250)), "{delays:?}");
        assert!(delays.iter().any(|d| *d > ms(250)), "{delays:?}");
    }

    #[test]
    fn with_one_controller_a_shed_comes_back_to_it_after_the_short_spread() {
        let mut rotation = Rotation::new(list(&["only"]));
        let delay = rotation.after(SHED_AT_ONCE);
        assert_eq!(rotation.current(), "only");
        assert!(delay <= SHED_SPREAD, "{delay:?}");
    }

    #[test]
    fn sheds_in_a_row_beyond_one_per_controller_double_the_spread_up_to_the_cap() {
        let mut rotation = Rotation::new(list(&["a", "b"]));
        // One round: every controller shed the agent at once, each after a short spread.
        assert!(rotation.after(SHED_AT_ONCE) <= SHED_SPREAD);
        assert!(rotation.after(SHED_AT_ONCE) <= SHED_SPREAD);
        // Beyond it, the spread doubles: 0.5–1 s, then 1–2 s, … up to the 10 s cap.
        let third = rotation.after(SHED_AT_ONCE);
        assert!(third >= ms(500) && third <= ms(1000), "{third:?}");
        let fourth = rotation.after(SHED_AT_ONCE);
        assert!(fourth >= ms(1000) && fourth <= ms(2000), "{fourth:?}");
        for _ in 0..40 {
            assert!(rotation.after(SHED_AT_ONCE) <= Duration::from_secs(10));
        }
        assert!(rotation.after(SHED_AT_ONCE) >= Duration::from_secs(5));
        // A stream that served the agent ends the streak.
        let served = Attempt {
            up: true,
            served: true,
            end: End::Shed,
        };
        assert!(rotation.after(served) <= SHED_SPREAD);
        // So does any other ending.
        rotation.after(SHED_AT_ONCE);
        rotation.after(SHED_AT_ONCE);
        rotation.after(LOST);
        assert!(rotation.after(SHED_AT_ONCE) <= SHED_SPREAD);
    }

    #[test]
    fn the_shuffled_order_holds_every_controller_once_and_is_kept() {
        let names: Vec<String> = (0..8).map(|i| format!("http://c{i}:9740")).collect();
        let mut orders = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let mut rotation = Rotation::shuffled(names.clone());
            let mut order = rotation.controllers().to_vec();
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, names, "a permutation of the list");
            // Two rounds of failures walk the same order twice.
            let walked: Vec<String> = (0..16)
                .map(|_| {
                    let current = rotation.current().to_owned();
                    rotation.after(CONNECT_FAILED);
                    current
                })
                .collect();
            assert_eq!(walked[..8], order[..]);
            assert_eq!(walked[8..], order[..]);
            orders.insert(std::mem::take(&mut order));
        }
        assert!(orders.len() > 1, "the order is random: {orders:?}");
        let given = Rotation::in_order(names.clone(), ControllerOrder::AsGiven);
        assert_eq!(given.controllers(), names);
    }

    #[test]
    fn a_shed_is_unavailable_with_the_reconnect_trailer() {
        let with = |code: Code, value: &'static str| {
            let mut status = tonic::Status::new(code, "over capacity");
            status.metadata_mut().insert(
                switchyard_proto::RECONNECT_METADATA,
                tonic::metadata::MetadataValue::from_static(value),
            );
            ClientError::Stream(status)
        };
        assert!(is_shed(&with(
            Code::Unavailable,
            switchyard_proto::RECONNECT_ELSEWHERE
        )));
        assert!(!is_shed(&with(Code::Unavailable, "somewhere")));
        assert!(!is_shed(&with(
            Code::PermissionDenied,
            switchyard_proto::RECONNECT_ELSEWHERE
        )));
        assert!(!is_shed(&ClientError::Stream(tonic::Status::unavailable(
            "shutting down"
        ))));
        assert!(!is_shed(&ClientError::Closed));
    }

    #[test]
    fn every_controller_is_checked_and_all_must_agree_on_tls() {
        let ca = ClientTls {
            ca: Some(PathBuf::from("ca.pem")),
            ..Default::default()
        };
        let plain = ClientTls::default();
        let cases: [(&ClientTls, &[&str], Option<&str>); 7] = [
            (&plain, &["http://a:9740", "http://b:9740"], None),
            (&ca, &["https://a:9740", "https://b:9740"], None),
            (
                &ca,
                &["https://a:9740", "http://b:9740"],
                Some(
                    "the controllers disagree on TLS: https://a:9740 is https:// but http://b:9740 is not",
                ),
            ),
            (
                &plain,
                &["http://a:9740", "https://b:9740"],
                Some("disagree on TLS"),
            ),
            (&plain, &["https://a:9740"], Some("needs --ca")),
            (
                &plain,
                &["http://a:9740", ""],
                Some("an empty controller address"),
            ),
            (&plain, &[], Some("no controller address")),
        ];
        for (tls, controllers, problem) in cases {
            let controllers = list(controllers);
            match (tls.check_all(&controllers), problem) {
                (Ok(()), None) => {}
                (Err(error), Some(problem)) => {
                    assert!(
                        error.to_string().contains(problem),
                        "{controllers:?}: {error}"
                    )
                }
                (result, _) => panic!("{controllers:?} {tls:?}: {result:?}"),
            }
        }
        assert_eq!(
            controller_list("http://a:1, http://b:2,http://c:3"),
            ["http://a:1", "http://b:2", "http://c:3"]
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
