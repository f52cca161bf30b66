//! Every Prometheus metric the agent exports, defined in this one place and passed to
//! whoever records them (no globals). Names mirror kube-proxy's under `switchyard_`.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// One histogram per stage label, built by [`stage_histogram`].
pub type StageHistograms = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// The agent's metrics and the registry that exports them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `switchyard_sync_proxy_rules_duration_seconds`: how long each apply took.
    pub sync_proxy_rules_duration: Histogram,
    /// `switchyard_sync_full_proxy_rules_duration_seconds`: how long each full sync took.
    pub sync_full_proxy_rules_duration: Histogram,
    /// `switchyard_network_programming_duration_seconds`: from the API change that caused
    /// a response (its `trigger_time`) to the kernel holding it.
    pub network_programming_duration: Histogram,
    /// `switchyard_network_programming_stage_duration_seconds{stage}`: where that time
    /// went, per response: `controller` (trigger → the controller sent it), `transport`
    /// (sent → received here; across machines it includes their clock offset), `agent`
    /// (agent-core's own work: received → ACK, less the kernel's part) and `kernel` (the
    /// dataplane's apply).
    pub network_programming_stage_duration: StageHistograms,
    /// `switchyard_sync_proxy_rules_last_timestamp_seconds`: when the last apply succeeded.
    pub sync_proxy_rules_last_timestamp: Gauge<f64, AtomicU64>,
    /// `switchyard_drift_repairs_total`: resources re-programmed because the kernel drifted.
    pub drift_repairs: Counter,
    /// `switchyard_controller_connected`: 1 while a stream to the controller is up.
    pub controller_connected: Gauge,
    /// `switchyard_controller_switches_total{reason}`: times the agent moved on from a
    /// controller to the next of its list (the same one when it lists only one), by why:
    /// [`SwitchReason`].
    pub controller_switches: Family<Vec<(String, String)>, Counter>,
    /// `switchyard_dataplane_switches_total{to, result}`: live switches tried, by the
    /// dataplane switched to and `switched`, `failed` or `unsupported`.
    pub dataplane_switches: Family<Vec<(String, String)>, Counter>,
    /// `switchyard_dataplane_info{dataplane}`: 1 for the dataplane in force.
    pub dataplane_info: Family<Vec<(String, String)>, Gauge>,
}

/// kube-proxy's buckets for network programming latency: 0.25 s … 5 min.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.25, 0.5];
    buckets.extend((1..60).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

/// Fine buckets for the stages of one change, which take microseconds to seconds:
/// 1, 1.5, 2, 3, 5 and 7 per decade from 20 µs to 30 s, so a quantile read from them
/// is within about 25 %.
fn stage_histogram() -> Histogram {
    let buckets = (-5..=1)
        .flat_map(|exponent| {
            [1.0, 1.5, 2.0, 3.0, 5.0, 7.0].map(|m| {
                // Rounded to what the label shows: 1.5e-5 → 0.000015, not 1.50…01e-5.
                let value: f64 = m * 10f64.powi(exponent);
                format!("{value:.6}").parse::<f64>().unwrap_or(value)
            })
        })
        .filter(|b| (0.000_02..=30.0).contains(b));
    Histogram::new(buckets)
}

/// Why the agent moved on from a controller, as the `reason` label of
/// `switchyard_controller_switches_total` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchReason {
    /// A stream that was up ended: the controller closed it, failed or went away.
    Lost,
    /// No stream came up: connecting or opening the stream failed, or was refused.
    ConnectFailed,
    /// The controller moved the agent to another replica (load shedding).
    Shed,
}

impl SwitchReason {
    pub fn name(self) -> &'static str {
        match self {
            SwitchReason::Lost => "lost",
            SwitchReason::ConnectFailed => "connect_failed",
            SwitchReason::Shed => "shed",
        }
    }
}

/// The stages of network programming latency, as the `stage` label names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Controller,
    Transport,
    Agent,
    Kernel,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Controller => "controller",
            Stage::Transport => "transport",
            Stage::Agent => "agent",
            Stage::Kernel => "kernel",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let sync_proxy_rules_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let sync_full_proxy_rules_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let network_programming_duration = Histogram::new(network_programming_buckets());
        let network_programming_stage_duration =
            StageHistograms::new_with_constructor(stage_histogram);
        let sync_proxy_rules_last_timestamp = Gauge::<f64, AtomicU64>::default();
        let drift_repairs = Counter::default();
        let controller_connected = Gauge::default();
        let controller_switches = Family::<Vec<(String, String)>, Counter>::default();
        let dataplane_switches = Family::<Vec<(String, String)>, Counter>::default();
        let dataplane_info = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "How long applying a change to the kernel took",
            sync_proxy_rules_duration.clone(),
        );
        registry.register(
            "sync_full_proxy_rules_duration_seconds",
            "How long rewriting everything the dataplane owns took",
            sync_full_proxy_rules_duration.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "From the API change that caused an update to the kernel holding it",
            network_programming_duration.clone(),
        );
        registry.register(
            "network_programming_stage_duration_seconds",
            "Network programming latency per stage: controller, transport, agent, kernel",
            network_programming_stage_duration.clone(),
        );
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "When the kernel last took a change successfully (Unix time)",
            sync_proxy_rules_last_timestamp.clone(),
        );
        registry.register(
            "drift_repairs",
            "Resources re-programmed because the kernel drifted from the desired state",
            drift_repairs.clone(),
        );
        registry.register(
            "controller_connected",
            "1 while a stream to the controller is up, else 0",
            controller_connected.clone(),
        );
        registry.register(
            "controller_switches",
            "Times the agent moved on from a controller to the next of its list, by reason: \
             lost, connect_failed, shed",
            controller_switches.clone(),
        );
        registry.register(
            "dataplane_switches",
            "Live dataplane switches tried, by target dataplane and result",
            dataplane_switches.clone(),
        );
        registry.register(
            "dataplane_info",
            "1 for the dataplane programming the kernel",
            dataplane_info.clone(),
        );
        Self {
            registry,
            sync_proxy_rules_duration,
            sync_full_proxy_rules_duration,
            network_programming_duration,
            network_programming_stage_duration,
            sync_proxy_rules_last_timestamp,
            drift_repairs,
            controller_connected,
            controller_switches,
            dataplane_switches,
            dataplane_info,
        }
    }

    /// Records how long one change spent in `stage`.
    pub fn observe_stage(&self, stage: Stage, took: std::time::Duration) {
        self.network_programming_stage_duration
            .get_or_create(&vec![("stage".to_string(), stage.name().to_string())])
            .observe(took.as_secs_f64());
    }

    /// Counts one move from a controller to the next of the list.
    pub fn controller_switched(&self, reason: SwitchReason) {
        self.controller_switches
            .get_or_create(&vec![("reason".to_string(), reason.name().to_string())])
            .inc();
    }

    /// Marks `dataplane` as the one in force.
    pub fn set_dataplane(&self, dataplane: &str) {
        self.dataplane_info.clear();
        self.dataplane_info
            .get_or_create(&vec![("dataplane".to_string(), dataplane.to_string())])
            .set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exported_under_kube_proxy_names_with_the_switchyard_prefix() {
        let metrics = Metrics::new();
        metrics.drift_repairs.inc();
        metrics.sync_proxy_rules_duration.observe(0.01);
        metrics.observe_stage(Stage::Kernel, std::time::Duration::from_micros(300));
        metrics.controller_switched(SwitchReason::Shed);
        let text = metrics.encode();
        for name in [
            "switchyard_sync_proxy_rules_duration_seconds_bucket",
            "switchyard_sync_full_proxy_rules_duration_seconds_count",
            "switchyard_network_programming_duration_seconds_sum",
            "switchyard_sync_proxy_rules_last_timestamp_seconds",
            "switchyard_drift_repairs_total 1",
            "switchyard_network_programming_stage_duration_seconds_count{stage=\"kernel\"} 1",
            "switchyard_controller_connected 0",
            "switchyard_controller_switches_total{reason=\"shed\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
