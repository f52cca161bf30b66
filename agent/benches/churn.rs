//! Churn benchmark: network programming latency on one node holding many Services while
//! endpoints keep changing, through the real controller (in-process, fed as a source
//! feeds it) and the real agent runtime with each dataplane in turn.
//!
//! A change is one EndpointSlice of one Service getting a new endpoint, stamped with the
//! time it happened, at a steady rate. With `--source api` (the default) it reaches the
//! controller as a watch event would, carrying that time as the
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation does; with
//! `--source manifests` it is a file of a manifests folder rewritten (one file per
//! Service), so the latency includes the folder's watch, read and parse. A change's
//! latency runs from that stamp until the dataplane's apply naming the Service returns —
//! measured exactly, by a wrapper around the dataplane. The split into stages (controller, transport, agent, kernel)
//! comes from the agent's own `switchyard_network_programming_stage_duration_seconds`
//! histogram, interpolated within its buckets as Prometheus' `histogram_quantile` does.
//!
//! `memory` is agent-core's in-memory dataplane (the floor: everything but the kernel);
//! `iptables`, `ipvs` and `ebpf` program the kernel inside a network namespace (and, for
//! eBPF, a cgroup) of the benchmark's own. Without IPVS in the running kernel the `ipvs`
//! runs happen in a user-mode Linux guest: slower in every stage than the host, so
//! compare its rows with each other, not with the host's.
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
use switchyard_controller::{
    model::Object,
    sources::{StoreUpdate, manifests::ManifestSource},
};
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
    /// Dataplanes to run: memory, iptables, ipvs, ebpf.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "memory,iptables,ipvs,ebpf"
    )]
    dataplanes: Vec<String>,
    /// Where changes come from: `api` (fed to the controller as watch events) or
    /// `manifests` (files rewritten in a manifests folder the controller watches).
    #[arg(long, value_enum, default_value_t = Source::Api)]
    source: Source,
    /// Print the rows only (how a guest's run reports to the host).
    #[arg(long, hide = true)]
    rows_only: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    Api,
    Manifests,
}

/// Service `i` of the generated cluster and its one EndpointSlice, as a manifest file.
fn manifest(i: usize, endpoints: &[std::net::IpAddr]) -> String {
    let name = format!("svc-{i:05}");
    let endpoints = endpoints
        .iter()
        .map(|ip| {
            format!(r#"{{"addresses": ["{ip}"], "conditions": {{"ready": true}}, "nodeName": "node-0000"}}"#)
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"{{"apiVersion": "v1", "kind": "List", "items": [
{{"apiVersion": "v1", "kind": "Service",
  "metadata": {{"name": "{name}", "namespace": "default"}},
  "spec": {{"clusterIP": "{ip}", "ports": [{{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}}]}}}},
{{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
  "metadata": {{"name": "{name}-1", "namespace": "default", "labels": {{"kubernetes.io/service-name": "{name}"}}}},
  "addressType": "IPv4", "ports": [{{"name": "http", "protocol": "TCP", "port": 8080}}],
  "endpoints": [{endpoints}]}}
]}}
"#,
        ip = fixtures::ip(i as u32),
    )
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
    ipvs: switchyard_agent_ipvs::cli::IpvsArgs,
    #[command(flatten)]
    ebpf: switchyard_agent_ebpf::cli::EbpfArgs,
}

/// What the eBPF dataplane needs beside its flags (a cgroup to balance for, a pin
/// directory), removed on drop.
struct EbpfScope {
    cgroup: Cgroup,
    pins: tempfile::TempDir,
}

fn build(name: &str, ebpf: Option<&EbpfScope>) -> anyhow::Result<Box<dyn Dataplane>> {
    let mut argv = vec!["churn".to_string()];
    if let Some(scope) = ebpf {
        argv.extend([
            "--cgroup-path".into(),
            scope.cgroup.path().display().to_string(),
            "--bpffs".into(),
            scope.pins.path().join("bpffs").display().to_string(),
        ]);
    }
    let flags = DataplaneFlags::try_parse_from(argv)?;
    let dataplane_error = |e: DataplaneError| anyhow::anyhow!("{e}");
    Ok(match name {
        "memory" => Box::new(MemoryDataplane::default()),
        "iptables" => Box::new(switchyard_agent_iptables::cli::dataplane(
            &flags.proxy,
            &flags.netfilter,
        )),
        "ipvs" => Box::new(
            switchyard_agent_ipvs::cli::dataplane(&flags.proxy, &flags.netfilter, &flags.ipvs)
                .map_err(dataplane_error)?,
        ),
        "ebpf" => Box::new(switchyard_agent_ebpf::cli::dataplane(
            &flags.proxy,
            &flags.ebpf,
        )?),
        other => bail!("unknown dataplane {other:?} (memory, iptables, ipvs, ebpf)"),
    })
}

/// Runs the `ipvs` rows in a user-mode Linux guest (this binary again, inside it) and
/// returns what it printed.
fn ipvs_in_guest(args: &Args) -> anyhow::Result<String> {
    let per_run = args.seconds + 90;
    let guest = switchyard_integration::uml::Guest::new()
        .mem_mib(3072)
        .timeout(Duration::from_secs(120 + per_run * args.rates.len() as u64));
    let rates = args
        .rates
        .iter()
        .map(f64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let exe = std::env::current_exe()?;
    let output = guest.run(
        &exe,
        [
            "--rows-only".to_string(),
            "--source".into(),
            format!("{:?}", args.source).to_lowercase(),
            "--dataplanes".into(),
            "ipvs".into(),
            "--services".into(),
            args.services.to_string(),
            "--endpoints".into(),
            args.endpoints.to_string(),
            "--rates".into(),
            rates,
            "--seconds".into(),
            args.seconds.to_string(),
        ],
    )?;
    if !output.success() {
        bail!(
            "the ipvs run in user-mode Linux failed ({}):\n{}\n{}",
            output.status,
            output.stdout,
            output.stderr
        );
    }
    Ok(output
        .stdout
        .lines()
        .map(|row| format!("{row}   (user-mode Linux)"))
        .collect::<Vec<_>>()
        .join("\n"))
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
    if !args.rows_only {
        println!(
            "{} Services × {} endpoints on one node; {} s per rate",
            args.services, args.endpoints, args.seconds
        );
        println!(
            "{:<9} {:>6} {:>7} {:>9} {:>9} {:>9}   stage p50 / p99 (ms): controller, transport, agent, kernel",
            "dataplane", "rate/s", "changes", "p50 ms", "p99 ms", "max ms"
        );
    }
    let guest_needed = !switchyard_integration::uml::in_guest()
        && !switchyard_integration::uml::running_kernel_has_ipvs();
    for dataplane in &args.dataplanes {
        if dataplane == "ipvs" && guest_needed {
            println!("{}", ipvs_in_guest(&args)?);
            continue;
        }
        for &rate in &args.rates {
            let row = runtime.block_on(run(&args, dataplane, rate))?;
            println!("{row}");
        }
    }
    Ok(())
}

/// One dataplane at one rate: a fresh controller, agent and kernel state.
async fn run(args: &Args, dataplane: &str, rate: f64) -> anyhow::Result<String> {
    let ebpf = match dataplane {
        "ebpf" => Some(EbpfScope {
            cgroup: Cgroup::create("churn")?,
            pins: tempfile::tempdir()?,
        }),
        _ => None,
    };
    let applies = Arc::new(Mutex::new(Applies::default()));
    let inner = build(dataplane, ebpf.as_ref())?;
    let timed = Timed {
        inner,
        applies: applies.clone(),
    };

    let folder = tempfile::tempdir()?;
    let controller = match args.source {
        Source::Api => {
            let controller = TestController::start().await?;
            controller
                .replace("bench", fixtures::cluster(1, args.services, args.endpoints))
                .await;
            controller
        }
        Source::Manifests => {
            std::fs::write(
                folder.path().join("node.yaml"),
                "apiVersion: v1\nkind: Node\nmetadata: {name: node-0000}\n",
            )?;
            for i in 0..args.services {
                let endpoints: Vec<_> = (0..args.endpoints)
                    .map(|e| fixtures::ip((1 << 20) + (i * args.endpoints + e) as u32))
                    .collect();
                std::fs::write(
                    folder.path().join(format!("svc-{i:05}.json")),
                    manifest(i, &endpoints),
                )?;
            }
            let controller = TestController::start_unsynced(
                tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                Default::default(),
                TestController::server_options(),
            )
            .await?;
            let source = ManifestSource::new(folder.path()).run(controller.updates.clone());
            tokio::spawn(source);
            controller
        }
    };
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
        let ips: Vec<_> = (0..args.endpoints)
            .map(|e| fixtures::ip((1 << 22) + (k * args.endpoints + e) as u32))
            .collect();
        let at = SystemTime::now();
        match args.source {
            Source::Api => {
                let endpoints = ips
                    .iter()
                    .map(|ip| fixtures::endpoint(*ip, "node-0000"))
                    .collect();
                controller
                    .send(StoreUpdate::Upsert {
                        origin: "bench".into(),
                        object: Object::EndpointSlice(fixtures::slice(&name, endpoints)),
                        at,
                    })
                    .await;
            }
            Source::Manifests => std::fs::write(
                folder.path().join(format!("{name}.json")),
                manifest(service, &ips),
            )?,
        }
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
    let mut dataplane_left = build(dataplane, ebpf.as_ref())?;
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
