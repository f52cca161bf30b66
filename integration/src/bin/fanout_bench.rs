//! Controller fan-out benchmark: K simulated agents over loopback gRPC, N Services × E
//! endpoints, on R controller replicas. Reports initial sync time to all agents, time
//! until all agents ACK one endpoint change (p50/p99), bytes per node per change, each
//! replica's peak RSS, and how long `ListNodes` over every node takes.
//!
//! Each replica (hub + gRPC server, fed directly through the source channel) runs in a
//! child process so its memory is measured alone; with `--replicas` above 1 they
//! coordinate through a real etcd this process starts on loopback, and agent `n` streams
//! from replica `n % R`. The agents decode only names, versions and nonces, so the
//! 2-core machine spends its time in the controllers.

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use prost::Message;
use switchyard_controller::{model::Object, sources::StoreUpdate};
use switchyard_integration::{controller::TestController, fixtures};
use switchyard_proto::v1::{self, NodeIdentity, NodeStateRequest};
use tokio::sync::{Barrier, Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
#[command(about = "Controller fan-out benchmark")]
struct Args {
    /// Simulated agents (one node and one TCP connection each).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per Service, spread over the nodes.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Endpoint changes to time, one at a time.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Controller replicas, coordinated through etcd when more than one.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Seconds to wait after the initial sync before the first timed change: right
    /// after it, every replica writes all its agents' records back in sync to etcd, and
    /// the changes timed are meant to be steady-state ones.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Run the controllers from this build of fanout-bench instead of this one, so two
    /// controller builds are compared under the same simulated agents (which share the
    /// cores with them and cost what this build's agents cost). The child protocol on
    /// stdin and stdout is the one this build speaks.
    #[arg(long, value_name = "PATH")]
    controller_binary: Option<PathBuf>,
    /// Internal: run as the controller child process.
    #[arg(long, hide = true)]
    child: bool,
    /// Internal: the child is this replica, coordinated through this etcd.
    #[arg(long, hide = true, num_args = 2, value_names = ["NAME", "ETCD"])]
    replica: Vec<String>,
}

/// The controller's allocator (see control-plane/src/main.rs): the replicas here run the
/// controller in this binary, so they measure what `switchyard-controller` runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `NodeStateResponse` without the Service bodies: resources stay undecoded bytes.
#[derive(Clone, PartialEq, Message)]
struct LiteResponse {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    resources: Vec<Bytes>,
    #[prost(string, repeated, tag = "3")]
    removed_resources: Vec<String>,
    #[prost(string, tag = "4")]
    nonce: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.child && args.replicas > 1 {
        // Replicas share this machine's cores: each gets its part of them as worker
        // threads (as TOKIO_WORKER_THREADS would set for a controller), not a full set
        // each, which would only add context switches.
        runtime.worker_threads((cores / args.replicas).max(1));
    }
    let runtime = runtime.enable_all().build()?;
    if args.child {
        runtime.block_on(child(args))
    } else {
        runtime.block_on(driver(args))
    }
}

/// The controller side: loads the cluster, then applies one endpoint change per
/// `change` line on stdin, answering on stdout.
async fn child(args: Args) -> anyhow::Result<()> {
    rlimit::increase_nofile_limit(65_536)?;
    let controller = match &args.replica[..] {
        [name, etcd] => TestController::start_replica(etcd, name, Duration::from_secs(10)).await?,
        _ => TestController::start().await?,
    };
    let mut objects = fixtures::cluster(args.agents, args.services, args.endpoints);
    let loaded = Instant::now();
    controller.replace("bench", objects.clone()).await;
    println!("ready {} {:?}", controller.address, loaded.elapsed());
    let mut lines = BufReader::new(std::io::stdin()).lines();
    while let Some(line) = tokio::task::block_in_place(|| lines.next()).transpose()? {
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["change", i] => {
                let i: usize = i.parse()?;
                // Slices follow their Service: object 2 + 2s + 1 is Service s's slice.
                let index = args.agents + 2 * (i % args.services) + 1;
                let Object::EndpointSlice(slice) = &mut objects[index] else {
                    bail!("not a slice")
                };
                slice.endpoints[0].address = fixtures::ip((2 << 20) + i as u32);
                let update = StoreUpdate::Upsert {
                    origin: "bench".into(),
                    object: objects[index].clone(),
                    at: SystemTime::now(),
                };
                controller.send(update).await;
                println!("sent");
            }
            ["rss"] => {
                let (user, system) = cpu_seconds()?;
                println!("rss {} {user:.2} {system:.2}", peak_rss_kib("self")?)
            }
            _ => bail!("unknown command {line:?}"),
        }
    }
    Ok(())
}

/// User and system CPU time of this process, in seconds.
fn cpu_seconds() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> { Ok(fields[i].parse::<f64>()? / 100.0) };
    Ok((ticks(11)?, ticks(12)?))
}

fn peak_rss_kib(pid: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?)
}

/// What all agents together received, counted without waking the driver for each
/// response (5,000 wakeups per change cost the simulated agents a fifth of their CPU):
/// an agent notifies only when a count reaches what the driver waits for.
#[derive(Debug)]
struct Progress {
    responses: AtomicUsize,
    resources: AtomicUsize,
    bytes: AtomicUsize,
    /// Responses carrying resources, and their bytes.
    with_resources: AtomicUsize,
    with_resources_bytes: AtomicUsize,
    wake_at_responses: AtomicUsize,
    wake_at_resources: AtomicUsize,
    reached: Notify,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            responses: AtomicUsize::new(0),
            resources: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            with_resources: AtomicUsize::new(0),
            with_resources_bytes: AtomicUsize::new(0),
            wake_at_responses: AtomicUsize::new(usize::MAX),
            wake_at_resources: AtomicUsize::new(usize::MAX),
            reached: Notify::new(),
        }
    }
}

impl Progress {
    fn received(&self, bytes: usize, resources: usize) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if resources > 0 {
            self.with_resources.fetch_add(1, Ordering::Relaxed);
            self.with_resources_bytes
                .fetch_add(bytes, Ordering::Relaxed);
        }
        let all_resources = self.resources.fetch_add(resources, Ordering::AcqRel) + resources;
        let all_responses = self.responses.fetch_add(1, Ordering::AcqRel) + 1;
        if all_resources >= self.wake_at_resources.load(Ordering::Acquire)
            || all_responses >= self.wake_at_responses.load(Ordering::Acquire)
        {
            self.reached.notify_one();
        }
    }

    /// Waits until `count` reaches `target`, waking at `wake_at` as it grows.
    async fn until(
        &self,
        count: &AtomicUsize,
        wake_at: &AtomicUsize,
        target: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        wake_at.store(target, Ordering::Release);
        let deadline = tokio::time::Instant::now() + timeout;
        while count.load(Ordering::Acquire) < target {
            tokio::time::timeout_at(deadline, self.reached.notified())
                .await
                .with_context(|| {
                    format!("timed out at {} of {target}", count.load(Ordering::Acquire))
                })?;
        }
        wake_at.store(usize::MAX, Ordering::Release);
        Ok(())
    }
}

async fn agent(
    endpoint: String,
    node: String,
    progress: Arc<Progress>,
    connected: Arc<Barrier>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Channel::from_shared(endpoint)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let (requests, rx) = mpsc::channel(4);
    requests
        .send(NodeStateRequest {
            node: Some(NodeIdentity {
                node_name: node.clone(),
                dataplane: v1::Dataplane::Iptables.into(),
                agent_version: "fanout-bench".into(),
            }),
            ..Default::default()
        })
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
    grpc.ready().await?;
    connected.wait().await;
    let codec = tonic_prost::ProstCodec::<NodeStateRequest, LiteResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/switchyard.v1.NodeStateDiscovery/StreamNodeState",
    );
    let mut responses = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
        .await?
        .into_inner();
    while let Some(response) = responses.message().await? {
        let (bytes, resources) = (response.encoded_len(), response.resources.len());
        requests
            .send(NodeStateRequest {
                response_nonce: response.nonce,
                ..Default::default()
            })
            .await?;
        progress.received(bytes, resources);
    }
    Ok(())
}

/// Times `ListNodes` over every page (500 nodes each) with every agent in sync, three
/// times, and checks it lists them all.
async fn list_nodes(endpoint: &str, agents: usize) -> anyhow::Result<()> {
    let mut query =
        v1::controller_query_client::ControllerQueryClient::connect(endpoint.to_owned())
            .await?
            .max_decoding_message_size(64 << 20);
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let (mut listed, mut page_token) = (0, String::new());
        loop {
            let page = query
                .list_nodes(v1::ListNodesRequest {
                    page_size: 500,
                    page_token,
                })
                .await?
                .into_inner();
            listed += page.nodes.iter().filter(|n| n.connected).count();
            page_token = page.next_page_token;
            if page_token.is_empty() {
                break;
            }
        }
        times.push(started.elapsed());
        if listed != agents {
            bail!("ListNodes listed {listed} connected nodes, not {agents}");
        }
    }
    times.sort();
    println!(
        "ListNodes, all {agents} nodes in pages of 500: median {:.1?} (of 3; min {:.1?})",
        times[1], times[0]
    );
    Ok(())
}

/// This process's user + system CPU seconds so far.
fn own_cpu() -> anyhow::Result<f64> {
    let (user, system) = cpu_seconds()?;
    Ok(user + system)
}

/// What a replica answers to `rss`: its peak RSS and CPU seconds so far.
struct Usage {
    peak_kib: u64,
    user: f64,
    system: f64,
}

/// Each replica's user + system CPU seconds so far.
async fn replicas_cpu(replicas: &mut [Replica]) -> anyhow::Result<Vec<f64>> {
    let mut cpu = Vec::new();
    for replica in replicas {
        let usage = replica.usage().await?;
        cpu.push(usage.user + usage.system);
    }
    Ok(cpu)
}

fn replicas_len(replicas: usize) -> usize {
    replicas.max(1)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One controller child process and its stdout lines.
struct Replica {
    child: std::process::Child,
    to_child: std::process::ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    address: String,
}

impl Replica {
    async fn spawn(args: &Args, replica: Option<(&str, &str)>) -> anyhow::Result<(Self, String)> {
        let binary = match &args.controller_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()?,
        };
        let mut command = Command::new(&binary);
        command
            .args(["--child", "--agents", &args.agents.to_string()])
            .args([
                "--services",
                &args.services.to_string(),
                "--endpoints",
                &args.endpoints.to_string(),
                "--replicas",
                &args.replicas.to_string(),
            ]);
        if let Some((name, etcd)) = replica {
            command.args(["--replica", name, etcd]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting a controller from {}", binary.display()))?;
        let to_child = child.stdin.take().context("child stdin")?;
        let (lines_tx, mut lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().context("child stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ready = lines.recv().await.context("controller exited")?;
        let mut words = ready.split_whitespace().skip(1);
        let address = words.next().context("address")?.to_string();
        let loaded = words.next().unwrap_or("?").to_string();
        Ok((
            Self {
                child,
                to_child,
                lines,
                address,
            },
            loaded,
        ))
    }

    async fn ask(&mut self, line: &str) -> anyhow::Result<String> {
        writeln!(self.to_child, "{line}")?;
        self.lines.recv().await.context("controller exited")
    }

    /// Its peak RSS and CPU seconds so far.
    async fn usage(&mut self) -> anyhow::Result<Usage> {
        let answer = self.ask("rss").await?;
        let mut fields = answer.split_whitespace().skip(1);
        let mut next = || fields.next().context("a short rss answer");
        Ok(Usage {
            peak_kib: next()?.parse()?,
            user: next()?.parse()?,
            system: next()?.parse()?,
        })
    }
}

async fn driver(args: Args) -> anyhow::Result<()> {
    rlimit::increase_nofile_limit(65_536)?;
    let etcd = if args.replicas > 1 {
        Some(switchyard_integration::etcd::Etcd::start()?)
    } else {
        None
    };
    let mut replicas = Vec::new();
    let mut loaded = Vec::new();
    for r in 0..args.replicas.max(1) {
        let name = format!("r{r}");
        let endpoint = etcd.as_ref().map(|e| e.endpoint());
        let (replica, took) =
            Replica::spawn(&args, endpoint.as_deref().map(|e| (name.as_str(), e))).await?;
        replicas.push(replica);
        loaded.push(took);
    }
    println!(
        "cluster: {} nodes, {} services x {} endpoints; {} replica(s) loaded it in {}",
        args.agents,
        args.services,
        args.endpoints,
        replicas.len(),
        loaded.join(", ")
    );

    let progress = Arc::new(Progress::default());
    let connected = Arc::new(Barrier::new(args.agents + 1));
    let (stop, stopped) = watch::channel(());
    for n in 0..args.agents {
        let endpoint = format!("http://{}", replicas[n % replicas.len()].address);
        let (progress, connected, mut stopped) =
            (progress.clone(), connected.clone(), stopped.clone());
        tokio::spawn(async move {
            tokio::select! {
                result = agent(endpoint, format!("node-{n:04}"), progress, connected) => {
                    if let Err(error) = result { eprintln!("agent node-{n:04}: {error:#}"); }
                }
                _ = stopped.changed() => {}
            }
        });
    }
    connected.wait().await;
    let started = Instant::now();
    // Initial state arrives in several responses per agent; done when all agents
    // together hold every Service.
    progress
        .until(
            &progress.resources,
            &progress.wake_at_resources,
            args.agents * args.services,
            Duration::from_secs(600),
        )
        .await
        .context("initial sync")?;
    let initial = started.elapsed();
    let initial_bytes = progress.bytes.load(Ordering::Acquire);
    println!(
        "initial sync to all {} agents: {:.2?} ({:.1} MiB sent in all)",
        args.agents,
        initial,
        initial_bytes as f64 / (1 << 20) as f64
    );

    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let cpu_before = replicas_cpu(&mut replicas).await?;
    let agents_cpu_before = own_cpu()?;
    let mut latencies = Vec::with_capacity(args.changes);
    let with_resources_before = progress.with_resources.load(Ordering::Acquire);
    let with_resources_bytes_before = progress.with_resources_bytes.load(Ordering::Acquire);
    for i in 0..args.changes {
        let responses_before = progress.responses.load(Ordering::Acquire);
        let sent = Instant::now();
        // Every replica watches the same API: each applies the change.
        for replica in &mut replicas {
            writeln!(replica.to_child, "change {i}")?;
        }
        for replica in &mut replicas {
            replica.lines.recv().await.context("controller exited")?;
        }
        progress
            .until(
                &progress.responses,
                &progress.wake_at_responses,
                responses_before + args.agents,
                Duration::from_secs(60),
            )
            .await
            .context("change")?;
        latencies.push(sent.elapsed());
    }
    let cpu_after = replicas_cpu(&mut replicas).await?;
    let agents_cpu = own_cpu()? - agents_cpu_before;
    latencies.sort();
    let with_resources = progress.with_resources.load(Ordering::Acquire) - with_resources_before;
    let with_resources_bytes =
        progress.with_resources_bytes.load(Ordering::Acquire) - with_resources_bytes_before;
    let mean_bytes = with_resources_bytes as f64 / with_resources.max(1) as f64;
    println!(
        "one endpoint change, all {} agents ACKed: p50 {:.1?}, p99 {:.1?}, max {:.1?} over {} changes",
        args.agents,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        args.changes
    );
    println!("bytes per node per change (gRPC payload): {mean_bytes:.0} B");
    // What each replica spent per change, of the two cores every process here shares:
    // the controller's own cost, apart from the simulated agents' and etcd's.
    let per_change: Vec<String> = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|(before, after)| {
            format!(
                "{:.0} ms",
                (after - before) * 1000.0 / args.changes.max(1) as f64
            )
        })
        .collect();
    println!(
        "CPU per change (user + system), each replica: {}; the {} simulated agents: {:.0} ms",
        per_change.join(", "),
        args.agents,
        agents_cpu * 1000.0 / args.changes.max(1) as f64
    );
    // Every replica lists every node (with replicas, most from the etcd registry).
    for replica in &replicas {
        list_nodes(&format!("http://{}", replica.address), args.agents).await?;
    }
    for (r, replica) in replicas.iter_mut().enumerate() {
        let Usage {
            peak_kib,
            user,
            system,
        } = replica.usage().await?;
        let served = args.agents.div_ceil(replicas_len(args.replicas)) as f64;
        println!(
            "replica r{r} peak RSS: {:.0} MiB ({:.2} MiB per agent it serves); CPU over the whole run: {user:.2} s user, {system:.2} s system",
            peak_kib as f64 / 1024.0,
            peak_kib as f64 / 1024.0 / served
        );
    }
    // Agents first, so none reports the controller going away as an error (thousands
    // of agent tasks take a moment to see the stop on two cores).
    drop(stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for mut replica in replicas {
        drop(replica.to_child);
        replica.child.kill().ok();
        replica.child.wait()?;
    }
    Ok(())
}
