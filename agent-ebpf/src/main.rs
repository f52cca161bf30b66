//! The `switchyard-agent-ebpf` binary: agent-core's runtime over the eBPF dataplane (the
//! same as `switchyard-agent --dataplane ebpf`).

use clap::Parser;
use switchyard_agent_core::{AgentArgs, flags::ProxyArgs};
use switchyard_agent_ebpf::cli::{self, EbpfArgs};

/// Programs Service load balancing with eBPF: Service addresses are translated at
/// connect() for processes in the cgroup, traffic from outside the node in tc on the
/// devices, all from maps pinned under bpffs (forwarding outlives the agent), from the
/// state the switchyard controller streams for this node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    proxy: ProxyArgs,
    #[command(flatten)]
    ebpf: EbpfArgs,
    /// Print the map entries this node's state renders to, fetched from the
    /// controller's query API, and exit without touching the kernel.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    switchyard_agent_core::agent::init_logging(args.agent.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    if args.dry_run {
        let desired =
            runtime.block_on(switchyard_agent_core::desired_from_controller(&args.agent))?;
        print!("{}", cli::dry_run(&args.proxy, &args.ebpf, &desired));
        return Ok(());
    }
    if args.agent.cleanup {
        let dataplane = cli::cleanup_dataplane(&args.ebpf);
        return runtime.block_on(switchyard_agent_core::run(args.agent, dataplane));
    }
    let dataplane = cli::dataplane(&args.proxy, &args.ebpf)?;
    runtime.block_on(switchyard_agent_core::run(args.agent, dataplane))
}
