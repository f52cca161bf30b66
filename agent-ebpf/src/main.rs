//! The `switchyard-agent-ebpf` binary: agent-core's runtime over the eBPF dataplane.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use switchyard_agent_core::{
    AgentArgs,
    dataplane::{
        ApplyOutcome, Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed,
    },
};
use switchyard_agent_ebpf::{
    Attach, EbpfConfig, EbpfDataplane, RenderConfig, host, loader, maglev,
};
use switchyard_proto::{state::LbAlgorithm, v1};

/// Programs Service load balancing with eBPF: Service addresses are translated at
/// connect() for processes in the cgroup, traffic from outside the node in tc on the
/// devices, all from maps pinned under bpffs (forwarding outlives the agent), from the
/// state the switchyard controller streams for this node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// The cgroup v2 directory whose processes (host and pods, in any network
    /// namespace) get socket-level load balancing [default: the root of the cgroup2
    /// mount found in /proc/self/mountinfo].
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// Devices whose traffic from outside the node is load-balanced in tc
    /// (comma-separated) [default: every device that is up and has an address other
    /// than loopback and link-local].
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Node ports answer only on local addresses inside these CIDRs; default: every
    /// local address.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<ipnet::IpNet>,
    /// The bpffs directory for the pinned maps and links (a bpffs is mounted there when
    /// it is not on one).
    #[arg(long, default_value = "/sys/fs/bpf/switchyard")]
    bpffs: PathBuf,
    /// How backends are picked for Services without a `switchyard.io/ebpf-lb` annotation.
    #[arg(long, value_enum, default_value_t = Algorithm::Random)]
    lb_algorithm: Algorithm,
    /// Entries of each Maglev table: a prime, at most 131071.
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = maglev_size)]
    maglev_table_size: u32,
    /// Pod CIDRs (comma-separated, one per family): routed cluster traffic from outside
    /// them is source-NATed, and with `externalTrafficPolicy: Local` they reach external
    /// addresses through every endpoint.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<ipnet::IpNet>,
    /// Source-NAT all cluster traffic routed through the node.
    #[arg(long)]
    masquerade_all: bool,
    /// Source ports of source-NATed flows, `MIN-MAX`.
    #[arg(long, default_value = "61000-65535", value_parser = port_range)]
    snat_ports: (u16, u16),
    /// Print the map entries this node's state renders to, fetched from the
    /// controller's query API, and exit without touching the kernel.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Algorithm {
    Random,
    Maglev,
}

fn maglev_size(text: &str) -> Result<u32, String> {
    let size: u32 = text.parse().map_err(|e| format!("{e}"))?;
    maglev::table_size(size).map_err(|e| e.to_string())
}

fn port_range(text: &str) -> Result<(u16, u16), String> {
    let (min, max) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not MIN-MAX"))?;
    let min: u16 = min.parse().map_err(|e| format!("{min:?}: {e}"))?;
    let max: u16 = max.parse().map_err(|e| format!("{max:?}: {e}"))?;
    if min == 0 || min >= max {
        return Err(format!("{text:?}: need 0 < MIN < MAX"));
    }
    Ok((min, max))
}

/// The dataplane `--cleanup` runs: it removes the pins (detaching the programs) without
/// loading or attaching anything first.
struct Unpin {
    bpffs: PathBuf,
}

impl Dataplane for Unpin {
    fn kind(&self) -> v1::Dataplane {
        v1::Dataplane::Ebpf
    }

    fn apply(&mut self, _: &Desired, _: &Change) -> Result<ApplyOutcome, DataplaneError> {
        Err(DataplaneError::ReadBack("--cleanup applies nothing".into()))
    }

    fn read_back(&mut self) -> Result<Programmed, DataplaneError> {
        Ok(Programmed::new())
    }

    fn expected(&self, _: &str, _: &DesiredService) -> Vec<String> {
        Vec::new()
    }

    fn cleanup(&mut self) -> Result<(), DataplaneError> {
        loader::cleanup(&self.bpffs).map_err(|e| DataplaneError::Io {
            operation: format!("removing the pins under {}", self.bpffs.display()),
            source: std::io::Error::other(e),
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    let render = RenderConfig {
        default_lb: match args.lb_algorithm {
            Algorithm::Random => LbAlgorithm::Random,
            Algorithm::Maglev => LbAlgorithm::Maglev,
        },
        maglev_size: args.maglev_table_size,
        cluster_cidrs: args.cluster_cidr.clone(),
        masquerade_all: args.masquerade_all,
        node_ips: Vec::new(),
    };
    if args.dry_run {
        return runtime.block_on(async {
            let desired = switchyard_agent_core::desired_from_controller(&args.agent).await?;
            print!("{}", EbpfDataplane::dry_run(&render, &desired));
            Ok(())
        });
    }
    if args.agent.cleanup {
        let bpffs = args.bpffs.clone();
        return runtime.block_on(switchyard_agent_core::run(args.agent, Unpin { bpffs }));
    }
    let addrs = host::interface_addrs().context("listing the node's addresses")?;
    let cgroup = match args.cgroup_path {
        Some(path) => path,
        None => host::cgroup2_mount().context("finding the cgroup v2 hierarchy")?,
    };
    let devices = if args.devices.is_empty() {
        host::default_devices(&addrs)
    } else {
        args.devices
    };
    let mut config = EbpfConfig::new(Attach {
        bpffs: args.bpffs,
        cgroup,
        devices,
    });
    config.render = RenderConfig {
        node_ips: host::node_ips(&addrs),
        ..render
    };
    config.nodeport_addresses = args.nodeport_addresses;
    config.snat_ports = args.snat_ports;
    let dataplane = EbpfDataplane::new(config).context("setting up the eBPF programs and maps")?;
    runtime.block_on(switchyard_agent_core::run(args.agent, dataplane))
}
