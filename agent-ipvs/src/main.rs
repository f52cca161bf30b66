//! The `switchyard-agent-ipvs` binary: agent-core's runtime over the IPVS dataplane (the
//! same as `switchyard-agent --dataplane ipvs`).

use clap::Parser;
use switchyard_agent_core::{
    AgentArgs,
    flags::{NetfilterArgs, ProxyArgs},
};
use switchyard_agent_ipvs::cli::{self, IpvsArgs};

/// Programs Service load balancing into IPVS the way kube-proxy's IPVS mode does (plus
/// reject for Services without endpoints and a per-Service scheduler), from the state the
/// switchyard controller streams for this node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    proxy: ProxyArgs,
    #[command(flatten)]
    netfilter: NetfilterArgs,
    #[command(flatten)]
    ipvs: IpvsArgs,
    /// Print what this node's state renders to (fixed rules, sets, every Service's
    /// virtual services, VIPs and set elements), fetched from the controller's query
    /// API, and exit without touching the kernel.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    switchyard_agent_core::agent::init_logging(args.agent.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    let dataplane = cli::dataplane(&args.proxy, &args.netfilter, &args.ipvs)?;
    if args.dry_run {
        let desired =
            runtime.block_on(switchyard_agent_core::desired_from_controller(&args.agent))?;
        print!("{}", dataplane.dry_run(&desired));
        return Ok(());
    }
    runtime.block_on(switchyard_agent_core::run(args.agent, dataplane))
}
