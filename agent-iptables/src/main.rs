//! The `switchyard-agent-iptables` binary: agent-core's runtime over the iptables
//! dataplane (the same as `switchyard-agent --dataplane iptables`).

use clap::Parser;
use switchyard_agent_core::{
    AgentArgs,
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
    switchyard_agent_core::agent::init_logging(args.agent.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    let dataplane = cli::dataplane(&args.proxy, &args.netfilter);
    if args.dry_run {
        let desired =
            runtime.block_on(switchyard_agent_core::desired_from_controller(&args.agent))?;
        print!("{}", dataplane.dry_run(&desired));
        return Ok(());
    }
    runtime.block_on(switchyard_agent_core::run(args.agent, dataplane))
}
