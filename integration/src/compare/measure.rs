//! Takes the comparison's samples: one cluster per dataplane, size and round (the real
//! controller reading a manifests folder, `switchyard-agent --dataplane <d>` in the node
//! namespace, real backends), measured the way an operator would see it — the agent's
//! own metrics and query API, its process's memory, and real connections from a pod.
//!
//! The cluster is the end-to-end example ([`e2e::manifests`]) plus:
//! - `bench/svc-<i>`: `services` ClusterIP Services (10.100.0.0/16) of two remote
//!   endpoints each, in a file of their own that no measurement touches;
//! - `default/churn` 10.96.0.32: the one Service whose endpoints change;
//! - `default/late` 10.96.0.30: no endpoints until the programming-latency probe adds
//!   one (an endpoint turning ready is the change a cluster sees most);
//! - `default/rate` 10.96.0.31 → backend 2's port 9001, beside a direct target on port
//!   9000 of the same backend: both accept and drop, so the two connection rates differ
//!   only in the Service's translation.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::json;

use super::{Metric, Sample};
use crate::{
    bench::{accept_and_drop, median},
    e2e::{AgentSpec, Cluster, Layout, NODE, PATIENCE, manifests, slice, write},
    netns::ProbeOptions,
};

/// How much one cluster measures.
#[derive(Clone, Debug)]
pub struct Effort {
    /// One-Service changes timed (the median is the sample).
    pub changes: usize,
    /// Read-backs timed.
    pub read_backs: usize,
    /// Manifest edits timed to their first forwarded connection.
    pub edits: usize,
    /// Pairs of connect-rate windows (ClusterIP, then direct).
    pub rate_windows: usize,
    pub window: Duration,
    /// Requests whose spread over three backends is counted.
    pub spread_requests: usize,
}

impl Effort {
    /// The full benchmark.
    pub fn full() -> Self {
        Self {
            changes: 9,
            read_backs: 3,
            edits: 5,
            rate_windows: 3,
            window: Duration::from_secs(2),
            spread_requests: 300,
        }
    }

    /// `--quick`: enough to see every figure once.
    pub fn quick() -> Self {
        Self {
            changes: 3,
            read_backs: 1,
            edits: 2,
            rate_windows: 1,
            window: Duration::from_millis(500),
            spread_requests: 60,
        }
    }
}

const LATE: &str = "10.96.0.30:80";
const RATE: &str = "10.96.0.31:80";
const DIRECT: &str = "10.244.2.2:9000";
const WEB: &str = "10.96.0.10:80";

/// The `switchyard-agent` binary: `$SWITCHYARD_AGENT_BIN`, else next to the running
/// program (cargo puts every binary of the workspace in one directory).
pub fn agent_binary() -> Result<PathBuf, crate::netns::NetnsError> {
    crate::netns::crate_binary("switchyard-agent", "SWITCHYARD_AGENT_BIN")
}

/// `switchyard-agent --dataplane <dataplane>`, balancing for a cgroup of the cluster's
/// own and pinning under `bpffs` (flags the netfilter dataplanes ignore), so any of the
/// three can run and be switched to.
pub fn agent_spec(agent: &Path, dataplane: &str, bpffs: &Path) -> AgentSpec {
    AgentSpec::new(agent).cgroup("--cgroup-path").args([
        "--dataplane".to_string(),
        dataplane.into(),
        "--bpffs".into(),
        bpffs.display().to_string(),
    ])
}

/// `n` Services in namespace `bench`, ClusterIPs from 10.100.0.1, each with a slice of
/// backends 2 and 3 on port 8080: one JSON List (reads far faster than YAML at 10k).
pub fn bench_services(n: usize) -> String {
    let mut items = Vec::with_capacity(2 * n);
    for i in 0..n {
        let ip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
        let name = format!("svc-{i}");
        items.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]},
        }));
        items.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-1"), "namespace": "bench",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.2.2"], "nodeName": "swy-remote-node"},
                {"addresses": ["10.244.3.2"], "nodeName": "swy-remote-node"},
            ],
        }));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// A ClusterIP Service on port 80 with its slice on `endpoints` (none: rejects).
fn service(name: &str, ip: &str, target_port: u16, endpoints: &[u8]) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
         spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}\n---\n{}",
        slice(
            &format!("{name}-1"),
            name,
            "TCP",
            "http",
            target_port,
            endpoints
        )
    )
}

/// The cluster a measurement runs on.
pub fn layout(services: usize) -> Layout {
    let mut files = vec![
        (
            "churn.yaml".to_string(),
            service("churn", "10.96.0.32", 8080, &[2, 3]),
        ),
        (
            "late.yaml".to_string(),
            service("late", "10.96.0.30", 8080, &[]),
        ),
        (
            "rate.yaml".to_string(),
            service("rate", "10.96.0.31", 9001, &[2]),
        ),
    ];
    let await_service = if services > 0 {
        files.push(("bench.json".to_string(), bench_services(services)));
        format!("bench/svc-{}", services - 1)
    } else {
        "default/rate".to_string()
    };
    Layout {
        manifests: manifests(&[1, 2, 3]),
        files,
        await_service: Some(await_service),
        // An agent on iptables-legacy in user-mode Linux takes about a minute to sync
        // 10,000 Services (each response of 256 rewrites the whole table), and as long
        // to remove them.
        patience: crate::e2e::PATIENCE + Duration::from_millis(12) * services as u32,
        ..Layout::example()
    }
}

/// What one cluster measured, and what it could not.
#[derive(Debug, Default)]
pub struct Measured {
    pub samples: Vec<Sample>,
    pub errors: Vec<String>,
}

/// Starts the cluster for `dataplane` with `services` bench Services, takes every
/// sample, removes everything the agent made.
pub async fn measure(
    agent: &Path,
    dataplane: &str,
    services: usize,
    round: usize,
    effort: &Effort,
) -> Measured {
    let pins = tempfile::tempdir().expect("a temporary directory");
    let bpffs: PathBuf = pins.path().join("bpffs");
    let mut cluster =
        Cluster::start_with(agent_spec(agent, dataplane, &bpffs), layout(services)).await;
    let mut measured = Measured::default();
    let sample = |metric, value| Sample::new(dataplane, services, round, metric, value);
    let record =
        |measured: &mut Measured, what: &str, result: Result<Vec<(Metric, f64)>, String>| {
            match result {
                Ok(values) => measured
                    .samples
                    .extend(values.into_iter().map(|(m, v)| sample(m, v))),
                Err(e) => measured.errors.push(format!(
                    "{dataplane} at {services} Services, round {}: {what}: {e}",
                    round + 1
                )),
            }
        };

    record(&mut measured, "initial sync", initial_sync(&cluster).await);
    record(&mut measured, "read-back", read_back(&cluster, effort));
    record(
        &mut measured,
        "one-Service change",
        changes(&cluster, effort).await,
    );
    record(
        &mut measured,
        "manifest edit to first packet",
        programming_latency(&cluster, effort).await,
    );
    record(
        &mut measured,
        "connect rate",
        connect_rates(&cluster, effort),
    );
    record(&mut measured, "spread", spread(&cluster, effort));
    record(&mut measured, "agent memory", memory(&cluster));
    let mut failures = Vec::new();
    let restarted = restart(&mut cluster, &mut failures).await;
    if !failures.is_empty() {
        measured.errors.push(format!(
            "{dataplane} at {services} Services, round {}: requests failed across the agent restart: {}",
            round + 1,
            failures.join("; ")
        ));
    }
    record(&mut measured, "agent restart", restarted);
    if let Err(e) = cluster.stop_and_clean_up_agent() {
        measured
            .errors
            .push(format!("{dataplane}: removing what the agent made: {e}"));
    }
    measured
}

/// `name`'s value in Prometheus text (the first series of that name).
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let series = series.split('{').next()?;
            (series == name).then(|| value.parse().ok())?
        })
}

/// A histogram's `(count, sum)`.
fn histogram(cluster: &Cluster, name: &str) -> Result<(f64, f64), String> {
    let text = cluster.agent_metrics().map_err(|e| e.to_string())?;
    let count = metric_value(&text, &format!("{name}_count"));
    let sum = metric_value(&text, &format!("{name}_sum"));
    count
        .zip(sum)
        .ok_or_else(|| format!("the agent exports no {name}"))
}

const FULL_SYNC: &str = "switchyard_sync_full_proxy_rules_duration_seconds";
const SYNC: &str = "switchyard_sync_proxy_rules_duration_seconds";

/// The kernel time of every apply since the agent started, once it acknowledged every
/// Service the controller holds for the node: an agent on an empty node gets them as
/// one delta (or a few, should the controller split the state), not a full resync.
async fn initial_sync(cluster: &Cluster) -> Result<Vec<(Metric, f64)>, String> {
    let controller = cluster.controller.as_ref().ok_or("no controller")?;
    let held = controller
        .hub
        .generations
        .borrow()
        .node_resources(NODE)
        .len();
    until("the agent acknowledging every Service", || {
        Ok(cluster.node_stream().is_some_and(|s| s.acked >= held))
    })
    .await?;
    let (count, sum) = histogram(cluster, SYNC)?;
    let (full_count, full_sum) = histogram(cluster, FULL_SYNC)?;
    if count + full_count < 1.0 {
        return Err("no sync recorded".into());
    }
    Ok(vec![(Metric::InitialSync, sum + full_sum)])
}

fn read_back(cluster: &Cluster, effort: &Effort) -> Result<Vec<(Metric, f64)>, String> {
    let mut times = Vec::new();
    let mut objects = 0;
    for _ in 0..effort.read_backs {
        let start = Instant::now();
        let state = cluster.agent_state(true).map_err(|e| format!("{e:#}"))?;
        times.push(start.elapsed().as_secs_f64());
        objects = state
            .effective
            .iter()
            .map(|s| s.kernel_objects.len())
            .sum::<usize>();
        if !state.drift.is_empty() {
            return Err(format!(
                "the kernel drifted from the desired state: {:?}",
                state.drift.iter().take(3).collect::<Vec<_>>()
            ));
        }
    }
    Ok(vec![
        (Metric::ReadBack, median(times)),
        (Metric::KernelObjects, objects as f64),
    ])
}

/// Polls `check` every 2 ms until it holds, for at most [`PATIENCE`].
async fn until(what: &str, mut check: impl FnMut() -> Result<bool, String>) -> Result<(), String> {
    let deadline = Instant::now() + PATIENCE;
    while !check()? {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

async fn changes(cluster: &Cluster, effort: &Effort) -> Result<Vec<(Metric, f64)>, String> {
    let file = cluster.manifests.path().join("churn.yaml");
    let mut times = Vec::new();
    for i in 0..effort.changes {
        let (count, sum) = histogram(cluster, SYNC)?;
        let endpoints: &[u8] = if i % 2 == 0 { &[2] } else { &[2, 3] };
        write(&file, &service("churn", "10.96.0.32", 8080, endpoints));
        let mut after = (count, sum);
        until("the change's sync", || {
            after = histogram(cluster, SYNC)?;
            Ok(after.0 > count)
        })
        .await?;
        times.push((after.1 - sum) / (after.0 - count));
    }
    Ok(vec![(Metric::Change, median(times))])
}

async fn programming_latency(
    cluster: &Cluster,
    effort: &Effort,
) -> Result<Vec<(Metric, f64)>, String> {
    let file = cluster.manifests.path().join("late.yaml");
    let target: SocketAddr = LATE.parse().expect("an address");
    let quick = ProbeOptions {
        connect_timeout: Duration::from_millis(200),
        io_timeout: Duration::from_secs(1),
    };
    // The netfilter dataplanes reject with ICMP port-unreachable, which Linux rate-limits
    // per peer (a burst of 6, then one a second): a loop probing every 5 ms would have its
    // SYN dropped unanswered and wait out a 1 s retransmission. No client of a real
    // Service probes that hard; the limit is off in the node namespace.
    cluster
        .node()
        .sysctl("net.ipv4.icmp_ratelimit", "0")
        .map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for _ in 0..effort.edits {
        // A loop of refused connections (no endpoint: reject) that turn into answers.
        let probe = cluster
            .pod()
            .connection_loop(target, Duration::from_millis(5))
            .map_err(|e| e.to_string())?;
        until("the probe's first attempts", || {
            Ok(probe.stats().attempts >= 3)
        })
        .await?;
        if probe.stats().succeeded > 0 {
            return Err("`late` answered before it had an endpoint".into());
        }
        let written = Instant::now();
        write(&file, &service("late", "10.96.0.30", 8080, &[3]));
        until("the first answer from `late`", || {
            Ok(probe.stats().first_success.is_some())
        })
        .await?;
        let stats = probe.stop();
        let answered = stats.first_success.expect("answered");
        times.push(answered.saturating_duration_since(written).as_secs_f64());
        // Back to no endpoint, and refusing again, for the next edit.
        write(&file, &service("late", "10.96.0.30", 8080, &[]));
        until("`late` refusing again", || {
            Ok(cluster
                .pod()
                .tcp(target, &quick)
                .is_err_and(|e| e.is_refused()))
        })
        .await?;
    }
    Ok(vec![(Metric::ProgrammingLatency, median(times))])
}

fn connect_rates(cluster: &Cluster, effort: &Effort) -> Result<Vec<(Metric, f64)>, String> {
    for listen in ["10.244.2.2:9001", DIRECT] {
        accept_and_drop(cluster.topology.backend(2).ns(), listen.parse().unwrap())
            .map_err(|e| e.to_string())?;
    }
    // More ephemeral ports: a window opens more connections than the default range has.
    cluster
        .client()
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        .map_err(|e| e.to_string())?;
    let mut through = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..effort.rate_windows {
        for (target, rates) in [(RATE, &mut through), (DIRECT, &mut direct)] {
            for ns in [cluster.client(), cluster.node()] {
                let _ = ns.exec(["conntrack", "-F"]);
            }
            let rate = cluster
                .pod()
                .connect_rate(target.parse().unwrap(), effort.window)
                .map_err(|e| format!("{target}: {e}"))?;
            rates.push(rate);
        }
    }
    Ok(vec![
        (Metric::ClusterIpRate, median(through)),
        (Metric::DirectRate, median(direct)),
    ])
}

fn spread(cluster: &Cluster, effort: &Effort) -> Result<Vec<(Metric, f64)>, String> {
    let answers = cluster.pod().requests(
        WEB.parse().unwrap(),
        effort.spread_requests,
        false,
        &ProbeOptions::default(),
    );
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for answer in answers {
        let answer = answer.map_err(|e| e.to_string())?;
        let backend = answer.split_whitespace().next().unwrap_or_default();
        *counts.entry(backend.to_string()).or_default() += 1;
    }
    let total = effort.spread_requests as f64;
    let busiest = counts.values().max().copied().unwrap_or(0) as f64 / total;
    // A backend that never answered is the idlest, at 0.
    let idlest = if counts.len() < 3 {
        0.0
    } else {
        counts.values().min().copied().unwrap_or(0) as f64 / total
    };
    Ok(vec![
        (Metric::SpreadBusiest, busiest),
        (Metric::SpreadIdlest, idlest),
    ])
}

/// `VmRSS` and `VmHWM` of the agent process, in MiB.
fn memory(cluster: &Cluster) -> Result<Vec<(Metric, f64)>, String> {
    let path = format!("/proc/{}/status", cluster.agent_pid());
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let field = |name: &str| -> Result<f64, String> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map(|kib| kib / 1024.0)
            .ok_or_else(|| format!("no {name} in {path}"))
    };
    Ok(vec![
        (Metric::AgentRss, field("VmRSS:")?),
        (Metric::AgentPeakRss, field("VmHWM:")?),
    ])
}

/// Restarts the agent under a connection loop; the loop's first failures go to
/// `failures`.
async fn restart(
    cluster: &mut Cluster,
    failures: &mut Vec<String>,
) -> Result<Vec<(Metric, f64)>, String> {
    let traffic = cluster
        .pod()
        .connection_loop(WEB.parse().unwrap(), Duration::from_millis(10))
        .map_err(|e| e.to_string())?;
    if !traffic.wait_for_successes(10, PATIENCE) {
        return Err(format!(
            "no traffic before the restart: {:?}",
            traffic.stats()
        ));
    }
    let before = cluster.node_stream().ok_or("the agent is not connected")?;
    cluster.restart_agent();
    until("the restarted agent's stream", || {
        Ok(cluster
            .node_stream()
            .is_some_and(|s| s.id != before.id && s.connected && s.acked >= before.acked))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = traffic.stop();
    failures.extend(stats.failures.iter().take(3).cloned());
    Ok(vec![
        (Metric::RestartRequests, stats.attempts as f64),
        (Metric::RestartFailures, stats.failed as f64),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_is_read_from_prometheus_text() {
        let text = "# HELP x\n\
            switchyard_sync_proxy_rules_duration_seconds_sum 0.25\n\
            switchyard_sync_proxy_rules_duration_seconds_count 3\n\
            switchyard_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 1\n";
        assert_eq!(metric_value(text, &format!("{SYNC}_sum")), Some(0.25));
        assert_eq!(metric_value(text, &format!("{SYNC}_count")), Some(3.0));
        assert_eq!(metric_value(text, &format!("{FULL_SYNC}_count")), None);
    }

    #[test]
    fn bench_services_are_a_list_of_distinct_cluster_ips() {
        let list: serde_json::Value = serde_json::from_str(&bench_services(600)).unwrap();
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1200);
        let ips: std::collections::BTreeSet<&str> = items
            .iter()
            .filter_map(|i| i["spec"]["clusterIP"].as_str())
            .collect();
        assert_eq!(ips.len(), 600);
        assert!(ips.contains("10.100.2.100"), "{ips:?}");
    }
}
