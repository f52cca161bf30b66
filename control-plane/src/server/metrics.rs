//! The controller's Prometheus metrics, served as `/metrics` on the plain HTTP port
//! (`--http-listen`), defined in this one place and passed to whoever records them (no
//! globals), under `switchyard_controller_`: agent streams opened, refused (and why),
//! closed (and why) and open now, answers and NACKs, resources and bytes sent, the
//! Services pending per node when a response is built, how long building one takes, the
//! time from a change to each agent's ACK of it, the Kubernetes watches' events by kind,
//! source problems. What an operator checks first when agents do not get their state,
//! lag behind, or a peer misbehaves.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::ConstGauge,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{sources::kube::WatchEvents, store::ProblemsView};

/// Why a stream was refused before it started (the label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The first message did not name a valid node, or declared too much.
    InvalidRequest,
    /// The client's certificate does not name the node it asked for.
    PermissionDenied,
    /// The peer already holds `--max-streams-per-peer` streams.
    TooManyStreams,
    /// No first message came in time, or the stream closed before one.
    NoFirstMessage,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::InvalidRequest => "invalid_request",
            Refusal::PermissionDenied => "permission_denied",
            Refusal::TooManyStreams => "too_many_streams",
            Refusal::NoFirstMessage => "no_first_message",
        }
    }
}

/// Why a stream ended (the label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// The agent closed its side, or its connection went.
    AgentClosed,
    /// Reading from the agent failed.
    StreamError,
    /// A newer stream for the same node replaced it.
    Superseded,
    /// The controller is shutting down.
    Shutdown,
    /// This replica moved the agent to another one to even the load (`--etcd-endpoints`).
    Shed,
}

impl Closing {
    fn label(self) -> &'static str {
        match self {
            Closing::AgentClosed => "agent_closed",
            Closing::StreamError => "stream_error",
            Closing::Superseded => "superseded",
            Closing::Shutdown => "shutdown",
            Closing::Shed => "shed",
        }
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// One response sent to an agent, for [`ControllerMetrics::sent`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub resources: usize,
    pub removals: usize,
    /// Encoded size.
    pub bytes: usize,
    /// Services queued for the node when it was built (those it carries included).
    pub pending: usize,
    /// Computing and encoding it.
    pub build: Duration,
}

/// The controller's metrics and the registry that exports them.
#[derive(Debug)]
pub struct ControllerMetrics {
    registry: Registry,
    streams_opened: Counter,
    streams_refused: Family<Labels, Counter>,
    streams_closed: Family<Labels, Counter>,
    agent_streams: Gauge,
    answers: Counter,
    nacks: Counter,
    resources_sent: Counter,
    removals_sent: Counter,
    bytes_sent: Counter,
    pending_services: Histogram,
    response_build: Histogram,
    change_to_ack: Histogram,
    watch_events: WatchEvents,
    coordination: CoordinationMetrics,
}

/// What replicas coordinated through etcd report (`--etcd-endpoints`); all zero without.
#[derive(Clone, Debug, Default)]
pub struct CoordinationMetrics {
    /// 1 while this replica holds its etcd lease.
    pub etcd_up: Gauge,
    /// 1 while this replica is the leader.
    pub leader: Gauge,
    /// Live replicas, as registered in etcd.
    pub replicas: Gauge,
    /// Agent sessions registered in etcd, every replica's.
    pub registered_sessions: Gauge,
    /// Times this replica became leader.
    pub leaderships: Counter,
    /// Times the connection to etcd was lost.
    pub etcd_losses: Counter,
    /// Events the leader created on Nodes.
    pub events: Counter,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard_controller");
        let metrics = Self {
            streams_opened: Counter::default(),
            streams_refused: Family::default(),
            streams_closed: Family::default(),
            agent_streams: Gauge::default(),
            answers: Counter::default(),
            nacks: Counter::default(),
            resources_sent: Counter::default(),
            removals_sent: Counter::default(),
            bytes_sent: Counter::default(),
            // 1 … 32,768 Services, doubling.
            pending_services: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            // 10 µs … 10 s, doubling.
            response_build: Histogram::new(exponential_buckets(0.000_01, 2.0, 21)),
            // 100 µs … 100 s, doubling.
            change_to_ack: Histogram::new(exponential_buckets(0.000_1, 2.0, 21)),
            watch_events: WatchEvents::default(),
            coordination: CoordinationMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "streams_opened",
            "Agent streams accepted",
            metrics.streams_opened.clone(),
        );
        registry.register(
            "streams_refused",
            "Agent streams refused before they started, by reason",
            metrics.streams_refused.clone(),
        );
        registry.register(
            "streams_closed",
            "Agent streams ended, by reason",
            metrics.streams_closed.clone(),
        );
        registry.register(
            "agent_streams",
            "Agent streams open now (a node reconnecting holds two for a moment)",
            metrics.agent_streams.clone(),
        );
        registry.register(
            "answers",
            "Answers (ACK or NACK) agents sent to responses",
            metrics.answers.clone(),
        );
        registry.register(
            "nacks",
            "Answers that rejected at least one resource",
            metrics.nacks.clone(),
        );
        registry.register(
            "resources_sent",
            "Services sent to agents (added or modified)",
            metrics.resources_sent.clone(),
        );
        registry.register(
            "removals_sent",
            "Service removals sent to agents",
            metrics.removals_sent.clone(),
        );
        registry.register(
            "response_bytes_sent",
            "Encoded bytes of the responses sent to agents",
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "pending_services",
            "Services that may differ on a node, queued for it, when a response is built",
            metrics.pending_services.clone(),
        );
        registry.register(
            "response_build_seconds",
            "Computing and encoding one response for one node",
            metrics.response_build.clone(),
        );
        registry.register(
            "change_to_ack_seconds",
            "From the change a response carries (its trigger time) to the agent's answer to it",
            metrics.change_to_ack.clone(),
        );
        registry.register(
            "watch_events",
            "Events the Kubernetes API watches delivered, by kind and event (relist, listed, apply, delete, expired, error)",
            metrics.watch_events.clone(),
        );
        let coordination = &metrics.coordination;
        registry.register(
            "etcd_up",
            "1 while this replica holds its etcd lease (--etcd-endpoints)",
            coordination.etcd_up.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader of the replicas",
            coordination.leader.clone(),
        );
        registry.register(
            "replicas",
            "Live controller replicas registered in etcd",
            coordination.replicas.clone(),
        );
        registry.register(
            "registered_sessions",
            "Agent sessions registered in etcd, every replica's",
            coordination.registered_sessions.clone(),
        );
        registry.register(
            "leaderships",
            "Times this replica became the leader",
            coordination.leaderships.clone(),
        );
        registry.register(
            "etcd_losses",
            "Times this replica lost its etcd lease or connection",
            coordination.etcd_losses.clone(),
        );
        registry.register(
            "node_events",
            "Events this replica created on Nodes as leader (NACKs, disconnected or lagging agents)",
            coordination.events.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The gauges and counters of the replicas' coordination.
    pub fn coordination(&self) -> CoordinationMetrics {
        self.coordination.clone()
    }

    /// The counters the Kubernetes source counts its watch events into.
    pub fn watch_events(&self) -> WatchEvents {
        self.watch_events.clone()
    }

    /// Adds `switchyard_controller_source_problems`, read from `problems` at each scrape.
    pub fn watch_problems(&mut self, problems: ProblemsView) {
        self.registry
            .register_collector(Box::new(ProblemsCollector(problems)));
    }

    pub fn stream_opened(&self) {
        self.streams_opened.inc();
        self.agent_streams.inc();
    }

    pub fn stream_refused(&self, why: Refusal) {
        self.streams_refused
            .get_or_create(&vec![("reason", why.label())])
            .inc();
    }

    pub fn stream_closed(&self, why: Closing) {
        self.agent_streams.dec();
        self.streams_closed
            .get_or_create(&vec![("reason", why.label())])
            .inc();
    }

    /// An agent's answer to a response; `rejected` when it NACKed something.
    pub fn answered(&self, rejected: bool) {
        self.answers.inc();
        if rejected {
            self.nacks.inc();
        }
    }

    /// A response went out: what it carried, and how long building it took.
    pub fn sent(&self, sent: Sent) {
        self.resources_sent.inc_by(sent.resources as u64);
        self.removals_sent.inc_by(sent.removals as u64);
        self.bytes_sent.inc_by(sent.bytes as u64);
        self.pending_services.observe(sent.pending as f64);
        self.response_build.observe(sent.build.as_secs_f64());
    }

    /// An agent answered a response carrying a change made `since` ago.
    pub fn change_answered(&self, since: Duration) {
        self.change_to_ack.observe(since.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Counts the source problems when scraped, so nothing has to keep a gauge in step.
#[derive(Debug)]
struct ProblemsCollector(ProblemsView);

impl Collector for ProblemsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let count = ConstGauge::new(self.0.len() as i64);
        let metric = encoder.encode_descriptor(
            "source_problems",
            "Objects or files the controller could not use, and notes on Services no node programs (as ListSourceProblems lists them)",
            None,
            count.metric_type(),
        )?;
        count.encode(metric)
    }
}

/// Shared by the delta service and the HTTP endpoint.
pub type SharedMetrics = Arc<ControllerMetrics>;

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(name))
    }

    #[test]
    fn streams_are_counted_by_what_happened_to_them() {
        let metrics = ControllerMetrics::new();
        metrics.stream_opened();
        metrics.stream_opened();
        metrics.stream_closed(Closing::Superseded);
        metrics.stream_refused(Refusal::PermissionDenied);
        metrics.stream_refused(Refusal::PermissionDenied);
        metrics.answered(false);
        metrics.answered(true);
        metrics.sent(Sent {
            resources: 3,
            removals: 1,
            bytes: 420,
            pending: 5,
            build: Duration::from_micros(150),
        });
        metrics.change_answered(Duration::from_millis(3));
        metrics
            .watch_events()
            .get_or_create(&vec![("kind", "Node"), ("event", "apply")])
            .inc();
        let text = metrics.encode();
        for expected in [
            "switchyard_controller_streams_opened_total 2",
            "switchyard_controller_agent_streams 1",
            "switchyard_controller_streams_closed_total{reason=\"superseded\"} 1",
            "switchyard_controller_streams_refused_total{reason=\"permission_denied\"} 2",
            "switchyard_controller_answers_total 2",
            "switchyard_controller_nacks_total 1",
            "switchyard_controller_resources_sent_total 3",
            "switchyard_controller_removals_sent_total 1",
            "switchyard_controller_response_bytes_sent_total 420",
            "switchyard_controller_pending_services_sum 5.0",
            "switchyard_controller_pending_services_bucket{le=\"4.0\"} 0",
            "switchyard_controller_pending_services_bucket{le=\"8.0\"} 1",
            "switchyard_controller_response_build_seconds_count 1",
            "switchyard_controller_change_to_ack_seconds_bucket{le=\"0.0016\"} 0",
            "switchyard_controller_change_to_ack_seconds_bucket{le=\"0.0032\"} 1",
            "switchyard_controller_watch_events_total{kind=\"Node\",event=\"apply\"} 1",
        ] {
            assert!(text.lines().any(|l| l == expected), "{expected} in\n{text}");
        }
        assert!(line(&text, "switchyard_controller_source_problems").is_none());
    }

    #[test]
    fn source_problems_are_read_when_scraped() {
        let mut metrics = ControllerMetrics::new();
        metrics.watch_problems(ProblemsView::default());
        let text = metrics.encode();
        assert_eq!(
            line(&text, "switchyard_controller_source_problems"),
            Some("switchyard_controller_source_problems 0"),
            "{text}"
        );
    }
}
