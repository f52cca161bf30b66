//! Churn benchmark: network programming latency on one node holding many Services while
//! endpoints keep changing, through the real controller (in-process, fed as a source
//! feeds it) and the real agent runtime with each dataplane in turn.
//!
//! A change is one EndpointSlice of one Service getting a new endpoint, stamped with the
//! time it happened (what the `endpoints.kubernetes.io/last-change-trigger-time`
//! annotation carries), sent at a steady rate. Its latency runs from that stamp until
//! the dataplane's apply naming the Service returns — measured exactly, by a wrapper
//! around the dataplane. The split into stages (controller, transport, agent, kernel)
//! comes from the agent's own `switchyard_network_programming_stage_duration_seconds`
//! histogram, interpolated within its buckets as Prometheus' `histogram_quantile` does.
//!
//! `memory` is agent-core's in-memory dataplane (the floor: everything but the kernel);
//! `iptables` and `ebpf` program this machine's kernel inside a network namespace and a
//! cgroup of the benchmark's own. IPVS needs a kernel with IPVS (user-mode Linux here)
//! and is not run by this binary.
//!
//! Lives in the agent crate, not in `integration`, because it links the agent runtime
//! and its dataplanes, whose tests depend on `integration`.
//!
//! ```sh
//! cargo bench -p switchyard-agent --bench churn -- --services 10000 --rates 1,20,100 --seconds 60
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use clap::Parser;
use switchyard_agent_core::{
    agent::{Agent, AgentOptions},
    client::ClientTls,
    dataplane::{
        ApplyOutcome, Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed,
    },
    testing::MemoryDataplane,
};
use switchyard_controller::{model::Object, sources::StoreUpdate};
use switchyard_integration::{cgroup::Cgroup, controller::TestController, fixtures};

#[derive(Debug, Parser)]
#[command(about = "Network programming latency under endpoint churn, per dataplane")]
struct Args {
    /// Services on the node.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// Endpoint changes per second, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,20,100")]
    rates: Vec<f64>,
    /// How long each run sends changes.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Dataplanes to run: memory, iptables, ebpf.
    #[arg(long, value_delimiter = ',', default_value = "memory,iptables,ebpf")]
    dataplanes: Vec<String>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One apply the dataplane returned from: when it started and ended, and what it named.
struct ApplyRecord {
    started: SystemTime,
    ended: SystemTime,
    names: Vec<String>,
}

/// What the timing wrapper saw.
#[derive(Default)]
struct Applies {
    records: Vec<ApplyRecord>,
    /// Resources the dataplane holds (to know when the initial sync is complete).
    held: HashSet<String>,
}

/// A dataplane that times every apply of the one it wraps.
struct Timed {
    inner: Box<dyn Dataplane>,
    applies: Arc<Mutex<Applies>>,
}

impl Dataplane for Timed {
    fn kind(&self) -> switchyard_proto::v1::Dataplane {
        self.inner.kind()
    }

    fn apply(
        &mut self,
        desired: &Desired,
        change: &Change,
    ) -> Result<ApplyOutcome, DataplaneError> {
        let started = SystemTime::now();
        let outcome = self.inner.apply(desired, change);
        let ended = SystemTime::now();
        let mut applies = self.applies.lock().unwrap_or_else(PoisonError::into_inner);
        let names = change
            .to_write(desired)
            .into_iter()
            .cloned()
            .collect::<Vec<_>>();
        for name in &names {
            applies.held.insert(name.clone());
        }
        for name in &change.removed {
            applies.held.remove(name);
        }
        if !change.full {
            applies.records.push(ApplyRecord {
                started,
                ended,
                names,
            });
        }
        outcome
    }

    fn read_back(&mut self) -> Result<Programmed, DataplaneError> {
        self.inner.read_back()
    }

    fn expected(&self, name: &str, service: &DesiredService) -> Vec<String> {
        self.inner.expected(name, service)
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        self.inner.cleanup()
    }
}

/// The dataplane flags a real agent would be given, parsed as the agent parses them.
#[derive(Debug, Parser)]
struct DataplaneFlags {
    #[command(flatten)]
    proxy: switchyard_agent_core::flags::ProxyArgs,
    #[command(flatten)]
    netfilter: switchyard_agent_core::flags::NetfilterArgs,
    #[command(flatten)]
    ebpf: switchyard_agent_ebpf::cli::EbpfArgs,
}

/// What a kernel dataplane needs beside its flags, removed on drop.
struct KernelScope {
    _cgroup: Cgroup,
    pins: tempfile::TempDir,
}

fn build(name: &str, scope: &KernelScope) -> anyhow::Result<Box<dyn Dataplane>> {
    let pins = scope.pins.path().join("bpffs");
    let flags = DataplaneFlags::try_parse_from([
        "churn".into(),
        "--cgroup-path".into(),
        scope._cgroup.path().display().to_string(),
        "--bpffs".into(),
        pins.display().to_string(),
        "--iptables-backend".into(),
        "nft".into(),
    ])?;
    Ok(match name {
        "memory" => Box::new(MemoryDataplane::default()),
        "iptables" => Box::new(switchyard_agent_iptables::cli::dataplane(
            &flags.proxy,
            &flags.netfilter,
        )),
        "ebpf" => Box::new(switchyard_agent_ebpf::cli::dataplane(
            &flags.proxy,
            &flags.ebpf,
        )?),
        other => bail!("unknown dataplane {other:?} (memory, iptables, ebpf)"),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Kernel dataplanes program a network namespace of the benchmark's own: every thread
    // started from here on (the runtime's, the dataplane's commands) lives in it.
    // SAFETY: no other thread exists yet, so none can be surprised by the change.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .context("unsharing the network namespace (run as root)")?;
    let lo = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("ip link set lo up")?;
    if !lo.success() {
        bail!("ip link set lo up: {lo}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "{} Services × {} endpoints on one node; {} s per rate",
        args.services, args.endpoints, args.seconds
    );
    println!(
        "{:<9} {:>6} {:>7} {:>9} {:>9} {:>9}   stage p50 / p99 (ms): controller, transport, agent, kernel",
        "dataplane", "rate/s", "changes", "p50 ms", "p99 ms", "max ms"
    );
    for dataplane in &args.dataplanes {
        for &rate in &args.rates {
            let row = runtime.block_on(run(&args, dataplane, rate))?;
            println!("{row}");
        }
    }
    Ok(())
}

/// One dataplane at one rate: a fresh controller, agent and kernel state.
async fn run(args: &Args, dataplane: &str, rate: f64) -> anyhow::Result<String> {
    let scope = KernelScope {
        _cgroup: Cgroup::create("churn")?,
        pins: tempfile::tempdir()?,
    };
    let applies = Arc::new(Mutex::new(Applies::default()));
    let inner = build(dataplane, &scope)?;
    let timed = Timed {
        inner,
        applies: applies.clone(),
    };

    let controller = TestController::start().await?;
    controller
        .replace("bench", fixtures::cluster(1, args.services, args.endpoints))
        .await;
    let state = tempfile::tempdir()?;
    let agent = Agent::start(
        AgentOptions {
            controller: controller.endpoint(),
            tls: ClientTls::default(),
            node_name: "node-0000".into(),
            state_dir: state.path().to_path_buf(),
            drift_interval: Duration::ZERO,
            full_sync_period: Duration::ZERO,
            agent_version: "churn-bench".into(),
            policy: None,
        },
        timed,
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    )
    .await?;
    let synced = Instant::now();
    while held(&applies) < args.services {
        if synced.elapsed() > Duration::from_secs(600) {
            bail!("{dataplane}: initial sync incomplete after 10 min");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = agent.metrics_text();
    applies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .records
        .clear();

    // The changes: Service k (in turn) gets endpoint e; each stamped when made.
    let interval = Duration::from_secs_f64(1.0 / rate);
    let count = (rate * args.seconds as f64).round() as usize;
    let mut made = Vec::with_capacity(count);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for k in 0..count {
        tick.tick().await;
        let service = k % args.services;
        let name = format!("svc-{service:05}");
        let endpoints = (0..args.endpoints)
            .map(|e| {
                let i = (1 << 22) + (k * args.endpoints + e) as u32;
                fixtures::endpoint(fixtures::ip(i), "node-0000")
            })
            .collect();
        let at = SystemTime::now();
        controller
            .send(StoreUpdate::Upsert {
                origin: "bench".into(),
                object: Object::EndpointSlice(fixtures::slice(&name, endpoints)),
                at,
            })
            .await;
        made.push((format!("default/{name}"), at));
    }
    // Let the last changes land.
    let deadline = Instant::now() + Duration::from_secs(30);
    let latencies = loop {
        if let Some(latencies) = latencies(&applies, &made) {
            break latencies;
        }
        if Instant::now() > deadline {
            bail!("{dataplane} at {rate}/s: some changes never reached the dataplane");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = agent.metrics_text();
    drop(agent);
    drop(controller);
    let mut dataplane_left = build(dataplane, &scope)?;
    dataplane_left
        .cleanup()
        .map_err(|e| anyhow::anyhow!("cleaning up after {dataplane}: {e}"))?;

    let stages = ["controller", "transport", "agent", "kernel"]
        .iter()
        .map(|stage| {
            let buckets = stage_buckets(&after, stage, &stage_buckets(&before, stage, &[]));
            format!(
                "{} / {}",
                ms(quantile(&buckets, 0.5)),
                ms(quantile(&buckets, 0.99))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok(format!(
        "{:<9} {:>6} {:>7} {:>9} {:>9} {:>9}   {stages}",
        dataplane,
        rate,
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(latencies.last().copied()),
    ))
}

fn held(applies: &Mutex<Applies>) -> usize {
    applies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .held
        .len()
}

/// Each change's latency, sorted: from its stamp to the end of the first apply that
/// started after it and named its Service. `None` while a change has not landed.
fn latencies(applies: &Mutex<Applies>, made: &[(String, SystemTime)]) -> Option<Vec<Duration>> {
    let applies = applies.lock().unwrap_or_else(PoisonError::into_inner);
    let mut by_name: BTreeMap<&str, Vec<&ApplyRecord>> = BTreeMap::new();
    for record in &applies.records {
        for name in &record.names {
            by_name.entry(name).or_default().push(record);
        }
    }
    let mut latencies = made
        .iter()
        .map(|(name, at)| {
            by_name
                .get(name.as_str())?
                .iter()
                .find(|r| r.started >= *at)
                .and_then(|r| r.ended.duration_since(*at).ok())
        })
        .collect::<Option<Vec<_>>>()?;
    latencies.sort();
    Some(latencies)
}

fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1e3))
}

/// One stage's cumulative bucket counts (upper bound, count) from a metrics exposition,
/// less `minus` (the counts before the run).
fn stage_buckets(text: &str, stage: &str, minus: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let series = "switchyard_network_programming_stage_duration_seconds_bucket{";
    let label = format!("stage=\"{stage}\"");
    text.lines()
        .filter(|l| l.starts_with(series) && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count: f64 = l.rsplit(' ').next()?.parse().ok()?;
            let before = minus
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            Some((le, count - before))
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly within the bucket it
/// falls in (as `histogram_quantile` does).
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<Duration> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(Duration::from_secs_f64(lower.0));
            }
            let within = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some(Duration::from_secs_f64(lower.0 + (le - lower.0) * within));
        }
        lower = (le, count);
    }
    None
}
