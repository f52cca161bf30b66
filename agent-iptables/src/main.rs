//! The `switchyard-agent-iptables` binary: agent-core's runtime over the iptables
//! dataplane (the same as `switchyard-agent --dataplane iptables`).

use clap::Parser;
use switchyard_agent_core::{
    AgentArgs,
    agent::{DryRun, main_with},
    dataplane::Desired,
    flags::{NetfilterArgs, ProxyArgs},
};
use switchyard_agent_iptables::cli;

/// Programs Service load balancing into iptables the way kube-proxy's iptables mode
/// does, from the state the switchyard controller streams for this node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    proxy: ProxyArgs,
    #[command(flatten)]
    netfilter: NetfilterArgs,
    /// Print the rules this node's state renders to, fetched from the controller's
    /// query API, and exit without touching the kernel.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dataplane = || cli::dataplane(&args.proxy, &args.netfilter);
    let dry_run: Option<DryRun> = args
        .dry_run
        .then(|| Box::new(|desired: &Desired| Ok(dataplane().dry_run(desired))) as DryRun);
    main_with(args.agent, dry_run, || Ok(dataplane()))
}
