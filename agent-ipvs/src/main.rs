//! The `switchyard-agent-ipvs` binary: agent-core's runtime over the IPVS dataplane.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use switchyard_agent_core::{AgentArgs, netfilter::Backend, state::IpvsScheduler};
use switchyard_agent_ipvs::{
    IpvsConfig, IpvsDataplane, netlink::Timeouts, render::RenderConfig, rules::RulesConfig,
};

/// Programs Service load balancing into IPVS the way kube-proxy's IPVS mode does (plus
/// reject for Services without endpoints and a per-Service scheduler), from the state the
/// switchyard controller streams for this node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// The IPVS scheduler for Services without a `switchyard.io/ipvs-scheduler`
    /// annotation (its kernel module, ip_vs_<name>, must be available).
    #[arg(long, default_value = "rr", value_parser = parse_scheduler)]
    ipvs_scheduler: IpvsScheduler,
    /// Do not answer ARP for the VIPs on the dummy device (arp_ignore=1,
    /// arp_announce=2), as kube-proxy's --ipvs-strict-arp.
    #[arg(long)]
    ipvs_strict_arp: bool,
    /// Idle timeout of IPVS TCP connections; 0s leaves the kernel's.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ipvs_tcp_timeout: Duration,
    /// Timeout of IPVS TCP connections after a FIN; 0s leaves the kernel's.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ipvs_tcpfin_timeout: Duration,
    /// Timeout of IPVS UDP flows; 0s leaves the kernel's.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ipvs_udp_timeout: Duration,
    /// CIDRs whose virtual services the agent never removes as orphans (comma-separated).
    #[arg(long, value_delimiter = ',')]
    ipvs_exclude_cidrs: Vec<ipnet::IpNet>,
    /// How long a removed TCP or SCTP real server drains at weight 0 before it is deleted
    /// even with connections left.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    ipvs_graceful_termination_timeout: Duration,
    /// Which iptables backend programs the rules IPVS cannot do; auto detects it (legacy
    /// where the kernel has no nf_tables).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    iptables_backend: BackendArg,
    /// Pod CIDRs (comma-separated, one per family): traffic to cluster IPs from outside
    /// them is masqueraded.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<ipnet::IpNet>,
    /// Masquerade all traffic sent to cluster IPs.
    #[arg(long)]
    masquerade_all: bool,
    /// Node ports answer only on node addresses inside these CIDRs; default: every
    /// address but loopback and link-local ones.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<ipnet::IpNet>,
    /// Bit of the packet mark that asks for masquerading (14: 0x4000).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..=31))]
    iptables_masquerade_bit: u8,
    /// Program IPv4 only.
    #[arg(long)]
    disable_ipv6: bool,
    /// Print what this node's state renders to (fixed rules, sets, every Service's
    /// virtual services, VIPs and set elements), fetched from the controller's query
    /// API, and exit without touching the kernel.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Auto,
    Nft,
    Legacy,
}

fn parse_scheduler(value: &str) -> Result<IpvsScheduler, String> {
    value.parse().map_err(|_| {
        format!(
            "not an IPVS scheduler; one of: {}",
            IpvsScheduler::ALL.map(IpvsScheduler::name).join(", ")
        )
    })
}

fn seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = IpvsConfig {
        render: RenderConfig {
            scheduler: args.ipvs_scheduler,
            ..RenderConfig::default()
        },
        rules: RulesConfig {
            cluster_cidrs: args.cluster_cidr.clone(),
            masquerade_all: args.masquerade_all,
            masquerade_bit: args.iptables_masquerade_bit,
            ..RulesConfig::default()
        },
        nodeport_addresses: args.nodeport_addresses.clone(),
        exclude_cidrs: args.ipvs_exclude_cidrs.clone(),
        strict_arp: args.ipvs_strict_arp,
        timeouts: Timeouts {
            tcp: seconds(args.ipvs_tcp_timeout),
            tcp_fin: seconds(args.ipvs_tcpfin_timeout),
            udp: seconds(args.ipvs_udp_timeout),
        },
        graceful_termination_timeout: args.ipvs_graceful_termination_timeout,
        backend: match args.iptables_backend {
            BackendArg::Auto => None,
            BackendArg::Nft => Some(Backend::Nft),
            BackendArg::Legacy => Some(Backend::Legacy),
        },
        disable_ipv6: args.disable_ipv6,
        disable_conntrack: false,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    // Opening the sockets and reading addresses only reads the kernel.
    let dataplane = IpvsDataplane::new(config)?;
    if args.dry_run {
        let desired =
            runtime.block_on(switchyard_agent_core::desired_from_controller(&args.agent))?;
        print!("{}", dataplane.dry_run(&desired));
        return Ok(());
    }
    runtime.block_on(switchyard_agent_core::run(args.agent, dataplane))
}
