//! The `switchyard-agent-iptables` binary: agent-core's runtime over the iptables dataplane.

use clap::{Parser, ValueEnum};
use switchyard_agent_core::AgentArgs;
use switchyard_agent_iptables::{Backend, IptablesConfig, IptablesDataplane, RenderConfig};

/// Programs Service load balancing into iptables the way kube-proxy's iptables mode
/// does, from the state the switchyard controller streams for this node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// Which iptables backend to program; auto detects it as kube-proxy does.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    iptables_backend: BackendArg,
    /// Pod CIDRs (comma-separated, one per family): traffic to cluster IPs from outside
    /// them is masqueraded.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<ipnet::IpNet>,
    /// Masquerade all traffic sent to cluster IPs.
    #[arg(long)]
    masquerade_all: bool,
    /// Node ports answer only on local addresses inside these CIDRs; default: every
    /// local address.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<ipnet::IpNet>,
    /// Bit of the packet mark that asks for masquerading (14: 0x4000).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..=31))]
    iptables_masquerade_bit: u8,
    /// Program IPv4 only (for nodes without a usable ip6tables).
    #[arg(long)]
    disable_ipv6: bool,
    /// Print the rules this node's state renders to, fetched from the controller's
    /// query API, and exit without touching the kernel.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Auto,
    Nft,
    Legacy,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = IptablesConfig {
        render: RenderConfig {
            cluster_cidrs: args.cluster_cidr.clone(),
            masquerade_all: args.masquerade_all,
            nodeport_addresses: args.nodeport_addresses.clone(),
            masquerade_bit: args.iptables_masquerade_bit,
            ..RenderConfig::default()
        },
        backend: match args.iptables_backend {
            BackendArg::Auto => None,
            BackendArg::Nft => Some(Backend::Nft),
            BackendArg::Legacy => Some(Backend::Legacy),
        },
        disable_ipv6: args.disable_ipv6,
        ..IptablesConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new()?;
    if args.dry_run {
        return runtime.block_on(dry_run(args, config));
    }
    runtime.block_on(switchyard_agent_core::run(
        args.agent,
        IptablesDataplane::new(config),
    ))
}

async fn dry_run(args: Args, config: IptablesConfig) -> anyhow::Result<()> {
    let desired = switchyard_agent_core::desired_from_controller(&args.agent).await?;
    // Detecting the backend only reads the kernel; nothing is written.
    print!("{}", IptablesDataplane::new(config).dry_run(&desired));
    Ok(())
}
