//! The side-by-side comparison of the three dataplanes (`switchyard-compare`,
//! `scripts/compare.sh`): what one run measured ([`Comparison`]: per kernel, per
//! dataplane, per cluster size, every round's [`Sample`]), the medians the report shows,
//! and where the pieces live — [`measure`] runs clusters and takes samples, [`report`]
//! writes `report.md`, [`charts`] draws its SVG charts.
//!
//! Everything here is plain data with serde: the part measured inside a user-mode Linux
//! guest travels to the host as `results.json` and joins the host's part there.

pub mod charts;
pub mod measure;
pub mod report;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bench::median;

/// One run of the comparison: the machine, and what each kernel measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Comparison {
    pub machine: Machine,
    /// `--quick`: small sizes, one short round; the timings are indicative only.
    pub quick: bool,
    /// The cargo profile the agent was built with (`release`, or `dev` for `--quick`).
    pub profile: String,
    pub kernels: Vec<KernelRun>,
}

/// The machine the run was on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    /// The host kernel's release (`uname -r`).
    pub host_kernel: String,
    /// When the run started (UTC, RFC 3339).
    pub date: String,
}

/// What one kernel measured: the host's own, or a user-mode Linux guest's.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KernelRun {
    /// `host` or `user-mode Linux`.
    pub name: String,
    /// The kernel release.
    pub kernel: String,
    /// eBPF programs are JIT-compiled (the host) rather than interpreted (the guest).
    pub ebpf_jit: bool,
    /// The dataplanes measured, in the order they ran in each round.
    pub dataplanes: Vec<String>,
    /// Cluster sizes: how many Services besides the example cluster's.
    pub sizes: Vec<usize>,
    pub rounds: usize,
    pub samples: Vec<Sample>,
    pub conformance: Option<ConformanceRun>,
    /// What could not be measured, and why (a dataplane that did not start, a probe
    /// that failed): reported, never hidden.
    pub errors: Vec<String>,
}

/// One measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub dataplane: String,
    pub services: usize,
    pub round: usize,
    pub metric: Metric,
    pub value: f64,
}

impl Sample {
    pub fn new(dataplane: &str, services: usize, round: usize, metric: Metric, value: f64) -> Self {
        Self {
            dataplane: dataplane.into(),
            services,
            round,
            metric,
            value,
        }
    }
}

/// The conformance matrix run on one kernel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConformanceRun {
    /// `conformance: X of Y scenarios agree across iptables, ipvs and ebpf`.
    pub summary: String,
    /// Markdown: one row per probe, a column per dataplane.
    pub table: String,
    /// Each probe some dataplane got wrong, with every outcome.
    pub differences: Vec<String>,
}

/// What a [`Sample`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// An agent started on an empty node, until every Service is in the kernel: the kernel
    /// time of its applies (seconds, from the agent's
    /// `switchyard_sync_proxy_rules_duration_seconds`).
    InitialSync,
    /// One Service's endpoints changed, the others in place (seconds, from
    /// `switchyard_sync_proxy_rules_duration_seconds`).
    Change,
    /// Reading everything back from the kernel (seconds, an `AgentQuery/GetAgentState`
    /// with kernel objects).
    ReadBack,
    /// New TCP connections per second from a pod through a ClusterIP.
    ClusterIpRate,
    /// New TCP connections per second from the same pod straight to the same backend.
    DirectRate,
    /// Kernel objects the dataplane reads back (rules, virtual servers and real servers,
    /// map entries, set members).
    KernelObjects,
    /// The agent's resident memory after the measurements (MiB).
    AgentRss,
    /// The agent's peak resident memory (MiB).
    AgentPeakRss,
    /// A manifest edit (an endpoint added to a Service that had none) to the first
    /// connection a pod gets through: network programming latency (seconds).
    ProgrammingLatency,
    /// The share of requests the busiest of three backends answered (1/3 is even).
    SpreadBusiest,
    /// The share of requests the idlest of three backends answered.
    SpreadIdlest,
    /// Requests a pod's connection loop sent across an agent restart.
    RestartRequests,
    /// Of those, the ones that failed (the goal is 0).
    RestartFailures,
}

impl Metric {
    pub const ALL: [Metric; 13] = [
        Metric::InitialSync,
        Metric::Change,
        Metric::ReadBack,
        Metric::ClusterIpRate,
        Metric::DirectRate,
        Metric::KernelObjects,
        Metric::AgentRss,
        Metric::AgentPeakRss,
        Metric::ProgrammingLatency,
        Metric::SpreadBusiest,
        Metric::SpreadIdlest,
        Metric::RestartRequests,
        Metric::RestartFailures,
    ];

    /// What the report calls it.
    pub fn title(self) -> &'static str {
        match self {
            Metric::InitialSync => "initial sync",
            Metric::Change => "one-Service change",
            Metric::ReadBack => "read-back",
            Metric::ClusterIpRate => "new connections/s through a ClusterIP",
            Metric::DirectRate => "new connections/s direct",
            Metric::KernelObjects => "kernel objects",
            Metric::AgentRss => "agent memory (RSS)",
            Metric::AgentPeakRss => "agent peak memory",
            Metric::ProgrammingLatency => "manifest edit to first packet",
            Metric::SpreadBusiest => "busiest backend's share",
            Metric::SpreadIdlest => "idlest backend's share",
            Metric::RestartRequests => "requests across an agent restart",
            Metric::RestartFailures => "failed across an agent restart",
        }
    }

    /// A file-name-safe name (`initial-sync`).
    pub fn slug(self) -> &'static str {
        match self {
            Metric::InitialSync => "initial-sync",
            Metric::Change => "change",
            Metric::ReadBack => "read-back",
            Metric::ClusterIpRate => "clusterip-rate",
            Metric::DirectRate => "direct-rate",
            Metric::KernelObjects => "kernel-objects",
            Metric::AgentRss => "agent-rss",
            Metric::AgentPeakRss => "agent-peak-rss",
            Metric::ProgrammingLatency => "programming-latency",
            Metric::SpreadBusiest => "spread-busiest",
            Metric::SpreadIdlest => "spread-idlest",
            Metric::RestartRequests => "restart-requests",
            Metric::RestartFailures => "restart-failures",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Metric::InitialSync | Metric::Change | Metric::ReadBack => Unit::Seconds,
            Metric::ProgrammingLatency => Unit::Seconds,
            Metric::ClusterIpRate | Metric::DirectRate => Unit::PerSecond,
            Metric::KernelObjects | Metric::RestartRequests | Metric::RestartFailures => {
                Unit::Count
            }
            Metric::AgentRss | Metric::AgentPeakRss => Unit::Mebibytes,
            Metric::SpreadBusiest | Metric::SpreadIdlest => Unit::Share,
        }
    }
}

/// How a metric's values read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Seconds,
    PerSecond,
    Count,
    Mebibytes,
    Share,
}

impl Unit {
    /// `value` for a table cell: `1.64 s`, `2.17 ms`, `41 µs`, `12,400/s`, `10,012`,
    /// `18.2 MiB`, `34 %`.
    pub fn format(self, value: f64) -> String {
        match self {
            Unit::Seconds if value >= 1.0 => format!("{value:.2} s"),
            Unit::Seconds if value >= 1e-3 => milliseconds(value * 1e3),
            Unit::Seconds => format!("{:.0} µs", value * 1e6),
            Unit::PerSecond => format!("{}/s", thousands(value.round() as u64)),
            Unit::Count => thousands(value.round() as u64),
            Unit::Mebibytes => format!("{value:.1} MiB"),
            Unit::Share => format!("{:.0} %", value * 100.0),
        }
    }
}

/// Three significant digits below 100 ms: `2.17 ms`, `39.1 ms`, `190 ms`.
fn milliseconds(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// `12400` → `12,400`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl KernelRun {
    /// Every round's value of `metric` for `dataplane` at `services`.
    pub fn values(&self, dataplane: &str, services: usize, metric: Metric) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.dataplane == dataplane && s.services == services && s.metric == metric)
            .map(|s| s.value)
            .collect()
    }

    /// The median over rounds; `None` when nothing was measured.
    pub fn median(&self, dataplane: &str, services: usize, metric: Metric) -> Option<f64> {
        let values = self.values(dataplane, services, metric);
        (!values.is_empty()).then(|| median(values))
    }

    /// Connections through a ClusterIP per direct connection: the median of each round's
    /// ratio (the two windows of a round are taken back to back, so drift cancels).
    pub fn rate_ratio(&self, dataplane: &str, services: usize) -> Option<f64> {
        let by_round = |metric| {
            self.samples
                .iter()
                .filter(move |s| {
                    s.dataplane == dataplane && s.services == services && s.metric == metric
                })
                .map(|s| (s.round, s.value))
        };
        let direct: std::collections::BTreeMap<usize, f64> = by_round(Metric::DirectRate).collect();
        let ratios: Vec<f64> = by_round(Metric::ClusterIpRate)
            .filter_map(|(round, rate)| direct.get(&round).filter(|d| **d > 0.0).map(|d| rate / d))
            .collect();
        (!ratios.is_empty()).then(|| median(ratios))
    }

    /// `host, Linux 6.18.0 (eBPF JIT)`.
    pub fn label(&self) -> String {
        format!(
            "{}, Linux {} (eBPF {})",
            self.name,
            self.kernel,
            if self.ebpf_jit {
                "JIT-compiled"
            } else {
                "interpreted, no JIT"
            }
        )
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

/// `0`, `1k`, `10k`, `250`.
pub fn size_label(services: usize) -> String {
    if services >= 1000 && services.is_multiple_of(1000) {
        format!("{}k", services / 1000)
    } else {
        services.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dataplane: &str, round: usize, metric: Metric, value: f64) -> Sample {
        Sample::new(dataplane, 1000, round, metric, value)
    }

    #[test]
    fn medians_and_ratios_come_from_the_rounds_of_one_cell() {
        let run = KernelRun {
            samples: vec![
                sample("ipvs", 0, Metric::InitialSync, 3.0),
                sample("ipvs", 1, Metric::InitialSync, 1.0),
                sample("ipvs", 2, Metric::InitialSync, 2.0),
                sample("iptables", 0, Metric::InitialSync, 9.0),
                sample("ipvs", 0, Metric::ClusterIpRate, 900.0),
                sample("ipvs", 0, Metric::DirectRate, 1000.0),
                sample("ipvs", 1, Metric::ClusterIpRate, 400.0),
                sample("ipvs", 1, Metric::DirectRate, 500.0),
                sample("ipvs", 2, Metric::ClusterIpRate, 600.0),
            ],
            ..KernelRun::default()
        };
        assert_eq!(run.median("ipvs", 1000, Metric::InitialSync), Some(2.0));
        assert_eq!(run.median("ipvs", 0, Metric::InitialSync), None);
        assert_eq!(run.median("ebpf", 1000, Metric::InitialSync), None);
        // Round 2 has no direct rate: only rounds 0 (0.9) and 1 (0.8) pair up.
        assert_eq!(run.rate_ratio("ipvs", 1000), Some(0.9));
    }

    #[test]
    fn values_read_as_an_operator_writes_them() {
        for (unit, value, text) in [
            (Unit::Seconds, 1.644, "1.64 s"),
            (Unit::Seconds, 0.00217, "2.17 ms"),
            (Unit::Seconds, 0.0391, "39.1 ms"),
            (Unit::Seconds, 0.190, "190 ms"),
            (Unit::Seconds, 0.0000057, "6 µs"),
            (Unit::PerSecond, 12400.4, "12,400/s"),
            (Unit::Count, 1_000_012.0, "1,000,012"),
            (Unit::Count, 12.0, "12"),
            (Unit::Mebibytes, 18.24, "18.2 MiB"),
            (Unit::Share, 0.3412, "34 %"),
        ] {
            assert_eq!(unit.format(value), text, "{unit:?} {value}");
        }
        assert_eq!(size_label(10_000), "10k");
        assert_eq!(size_label(0), "0");
        assert_eq!(size_label(250), "250");
    }
}
