//! The `switchyard-agent-ebpf` binary: agent-core's runtime over the eBPF dataplane (the
//! same as `switchyard-agent --dataplane ebpf`).

use clap::Parser;
use switchyard_agent_core::{AgentArgs, agent::main_with, dataplane::Desired, flags::ProxyArgs};
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
    let (proxy, ebpf) = (&args.proxy, &args.ebpf);
    if args.dry_run {
        let render = |desired: &Desired| Ok(cli::dry_run(proxy, ebpf, desired));
        return main_with(args.agent, Some(Box::new(render)), || {
            cli::dataplane(proxy, ebpf)
        });
    }
    if args.agent.cleanup {
        return main_with(args.agent, None, || Ok(cli::cleanup_dataplane(ebpf)));
    }
    main_with(args.agent, None, || cli::dataplane(proxy, ebpf))
}
