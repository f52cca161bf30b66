//! The eBPF dataplane as an agent binary builds it from its flags: kube-proxy's shared
//! ones and its own ([`EbpfArgs`]); with the host facts it needs (cgroup v2 mount,
//! devices, node addresses) found when not given.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use switchyard_agent_core::{
    dataplane::{
        ApplyOutcome, Change, Dataplane, DataplaneError, Desired, DesiredService, Programmed,
    },
    flags::ProxyArgs,
};
use switchyard_proto::{state::LbAlgorithm, v1};

use crate::{
    Attach, EbpfConfig, EbpfDataplane, RenderConfig, SnatSource, TcAttachMode, host, loader, maglev,
};

/// The eBPF dataplane's own flags.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct EbpfArgs {
    /// The cgroup v2 directory whose processes (host and pods, in any network
    /// namespace) get socket-level load balancing [default: the root of the cgroup2
    /// mount found in /proc/self/mountinfo].
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
    /// Devices whose traffic from outside the node is load-balanced in tc
    /// (comma-separated) [default: every device that is up and has an address other
    /// than loopback and link-local].
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// The bpffs directory for the pinned maps and links (a bpffs is mounted there when
    /// it is not on one).
    #[arg(long, default_value = "/sys/fs/bpf/switchyard")]
    pub bpffs: PathBuf,
    /// How backends are picked for Services without a `switchyard.io/ebpf-lb` annotation.
    #[arg(long, value_enum, default_value_t = Algorithm::Random)]
    pub lb_algorithm: Algorithm,
    /// Entries of each Maglev table: a prime, at most 131071.
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = maglev_size)]
    pub maglev_table_size: u32,
    /// Source ports of source-NATed flows, `MIN-MAX`.
    #[arg(long, default_value = "61000-65535", value_parser = port_range)]
    pub snat_ports: (u16, u16),
    /// How the tc programs attach: TCX links where the kernel has them (Linux 6.6) and
    /// cls_bpf filters on a clsact qdisc otherwise (auto), or always one of them.
    #[arg(long, value_enum, default_value_t = TcAttach::Auto)]
    pub tc_attach: TcAttach,
    /// Where source NAT takes the node's address: the source bpf_fib_lookup names for
    /// the route where the kernel offers it (BPF_FIB_LOOKUP_SRC) and the out device's
    /// address otherwise (auto), or always the out device's address (devices).
    #[arg(long, value_enum, default_value_t = SnatFrom::Auto)]
    pub snat_source: SnatFrom,
}

/// `--snat-source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SnatFrom {
    Auto,
    Devices,
}

impl From<SnatFrom> for SnatSource {
    fn from(source: SnatFrom) -> Self {
        match source {
            SnatFrom::Auto => SnatSource::Auto,
            SnatFrom::Devices => SnatSource::Devices,
        }
    }
}

/// `--tc-attach`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TcAttach {
    Auto,
    Tcx,
    Classic,
}

impl From<TcAttach> for TcAttachMode {
    fn from(mode: TcAttach) -> Self {
        match mode {
            TcAttach::Auto => TcAttachMode::Auto,
            TcAttach::Tcx => TcAttachMode::Tcx,
            TcAttach::Classic => TcAttachMode::Classic,
        }
    }
}

/// `--lb-algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Algorithm {
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
pub struct Unpin {
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

/// What the entries say, from the flags (node addresses are filled in when the
/// dataplane starts).
pub fn render_config(proxy: &ProxyArgs, ebpf: &EbpfArgs) -> RenderConfig {
    RenderConfig {
        default_lb: match ebpf.lb_algorithm {
            Algorithm::Random => LbAlgorithm::Random,
            Algorithm::Maglev => LbAlgorithm::Maglev,
        },
        maglev_size: ebpf.maglev_table_size,
        cluster_cidrs: proxy.cluster_cidr.clone(),
        masquerade_all: proxy.masquerade_all,
        node_ips: Vec::new(),
    }
}

/// The map entries `desired` renders to, touching nothing.
pub fn dry_run(proxy: &ProxyArgs, ebpf: &EbpfArgs, desired: &Desired) -> String {
    EbpfDataplane::dry_run(&render_config(proxy, ebpf), desired)
}

/// The dataplane `--cleanup` runs: it removes the pins (detaching the programs) without
/// loading or attaching anything first.
pub fn cleanup_dataplane(ebpf: &EbpfArgs) -> Unpin {
    Unpin {
        bpffs: ebpf.bpffs.clone(),
    }
}

/// The dataplane the flags describe: finds the cgroup, devices and node addresses,
/// loads the programs and attaches them (reusing what is pinned), applies nothing.
pub fn dataplane(proxy: &ProxyArgs, ebpf: &EbpfArgs) -> anyhow::Result<EbpfDataplane> {
    let addrs = host::interface_addrs().context("listing the node's addresses")?;
    let cgroup = match &ebpf.cgroup_path {
        Some(path) => path.clone(),
        None => host::cgroup2_mount().context("finding the cgroup v2 hierarchy")?,
    };
    let devices = if ebpf.devices.is_empty() {
        host::default_devices(&addrs)
    } else {
        ebpf.devices.clone()
    };
    let mut config = EbpfConfig::new(Attach {
        bpffs: ebpf.bpffs.clone(),
        cgroup,
        devices,
    });
    config.render = RenderConfig {
        node_ips: host::node_ips(&addrs),
        ..render_config(proxy, ebpf)
    };
    config.nodeport_addresses = proxy.nodeport_addresses.clone();
    config.snat_ports = ebpf.snat_ports;
    config.tc_attach = ebpf.tc_attach.into();
    config.snat_source = ebpf.snat_source.into();
    EbpfDataplane::new(config).context("setting up the eBPF programs and maps")
}
