//! The `switchyard-agent-ipvs` binary: agent-core's runtime over the IPVS dataplane (the
//! same as `switchyard-agent --dataplane ipvs`).

use clap::Parser;
use switchyard_agent_core::{
    AgentArgs,
    agent::{DryRun, main_with},
    dataplane::Desired,
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
    let dataplane = || anyhow::Ok(cli::dataplane(&args.proxy, &args.netfilter, &args.ipvs)?);
    let dry_run: Option<DryRun> = args
        .dry_run
        .then(|| Box::new(|desired: &Desired| Ok(dataplane()?.dry_run(desired))) as DryRun);
    main_with(args.agent, dry_run, dataplane)
}
