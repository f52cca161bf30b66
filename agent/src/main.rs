//! `switchyard-agent`: the one agent operators deploy. It links the three dataplanes and
//! picks one per node — by `--dataplane`, or with `--dataplane auto` by the Node's
//! `switchyard.io/dataplane` label, which the controller sends — and switches between
//! them live (agent-core's `switch`). Nothing else lives here: flags and the choice.
//!
//! The per-dataplane binaries (`switchyard-agent-iptables`, `-ipvs`, `-ebpf`) stay as
//! thin wrappers for a node that only ever runs one; they never switch.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, ValueEnum};
use switchyard_agent_core::{
    AgentArgs, agent,
    dataplane::{Dataplane, DataplaneError},
    flags::{NetfilterArgs, ProxyArgs},
    state::DataplaneKind,
    switch::{DataplanePolicy, DataplaneRecord, Factory, Switchable},
};
use switchyard_agent_ebpf::cli::EbpfArgs;
use switchyard_agent_ipvs::cli::IpvsArgs;

/// Programs Service load balancing into the kernel with iptables, IPVS or eBPF, chosen
/// per node, from the state the switchyard controller streams for the node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// The dataplane: iptables, ipvs, ebpf, or auto — the Node's `switchyard.io/dataplane`
    /// label (iptables without one). A changed label, or a changed flag after a restart,
    /// switches the node live: the new dataplane is programmed and read back before the
    /// old one removes what it created.
    #[arg(long, value_enum, default_value_t = Choice::Auto, env = "SWITCHYARD_DATAPLANE")]
    dataplane: Choice,
    #[command(flatten)]
    proxy: ProxyArgs,
    #[command(flatten)]
    netfilter: NetfilterArgs,
    #[command(flatten)]
    ipvs: IpvsArgs,
    #[command(flatten)]
    ebpf: EbpfArgs,
    /// Print what this node's state renders to with the dataplane it would use, fetched
    /// from the controller's query API, and exit without touching the kernel.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Choice {
    Auto,
    Iptables,
    Ipvs,
    Ebpf,
}

impl Choice {
    fn policy(self) -> DataplanePolicy {
        match self {
            Choice::Auto => DataplanePolicy::FollowLabel,
            Choice::Iptables => DataplanePolicy::Fixed(DataplaneKind::Iptables),
            Choice::Ipvs => DataplanePolicy::Fixed(DataplaneKind::Ipvs),
            Choice::Ebpf => DataplanePolicy::Fixed(DataplaneKind::Ebpf),
        }
    }
}

/// The dataplane flags, enough to build any of the three.
#[derive(Clone, Debug)]
struct Builder {
    proxy: ProxyArgs,
    netfilter: NetfilterArgs,
    ipvs: IpvsArgs,
    ebpf: EbpfArgs,
}

impl Builder {
    fn build(&self, kind: DataplaneKind) -> Result<Box<dyn Dataplane>, DataplaneError> {
        Ok(match kind {
            DataplaneKind::Iptables => Box::new(switchyard_agent_iptables::cli::dataplane(
                &self.proxy,
                &self.netfilter,
            )),
            DataplaneKind::Ipvs => Box::new(switchyard_agent_ipvs::cli::dataplane(
                &self.proxy,
                &self.netfilter,
                &self.ipvs,
            )?),
            DataplaneKind::Ebpf => Box::new(
                switchyard_agent_ebpf::cli::dataplane(&self.proxy, &self.ebpf).map_err(|e| {
                    DataplaneError::Command {
                        command: "setting up the eBPF dataplane".into(),
                        message: format!("{e:#}"),
                    }
                })?,
            ),
        })
    }

    /// Removes what every dataplane created; one the kernel cannot run (no IPVS, no
    /// eBPF) created nothing.
    fn cleanup_all(&self) -> anyhow::Result<()> {
        let mut iptables = switchyard_agent_iptables::cli::dataplane(&self.proxy, &self.netfilter);
        iptables
            .cleanup()
            .context("removing what the iptables dataplane installed")?;
        iptables
            .hold_connection_tracking(false)
            .context("removing the connection-tracking hold")?;
        match switchyard_agent_ipvs::cli::dataplane(&self.proxy, &self.netfilter, &self.ipvs) {
            Ok(mut ipvs) => ipvs
                .cleanup()
                .context("removing what the IPVS dataplane installed")?,
            Err(error) => tracing::info!(%error, "no IPVS here: nothing of it to remove"),
        }
        switchyard_agent_ebpf::cli::cleanup_dataplane(&self.ebpf)
            .cleanup()
            .context("removing what the eBPF dataplane installed")?;
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    switchyard_agent_core::agent::init_logging(args.agent.log_format);
    let builder = Builder {
        proxy: args.proxy.clone(),
        netfilter: args.netfilter.clone(),
        ipvs: args.ipvs.clone(),
        ebpf: args.ebpf.clone(),
    };
    let state_dir = args
        .agent
        .state_dir
        .clone()
        .unwrap_or_else(|| agent::default_state_dir("agent"));
    args.agent.state_dir = Some(state_dir.clone());
    let policy = args.dataplane.policy();
    let record = DataplaneRecord::load(&state_dir);
    let runtime = tokio::runtime::Runtime::new()?;

    if args.agent.cleanup {
        builder.cleanup_all()?;
        for file in ["desired.pb", "dataplane"] {
            match std::fs::remove_file(state_dir.join(file)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).context(format!("removing {}", state_dir.join(file).display()));
                }
            }
        }
        return Ok(());
    }
    if args.dry_run {
        let kind = policy.wanted(record.label);
        let desired =
            runtime.block_on(switchyard_agent_core::desired_from_controller(&args.agent))?;
        let text = match kind {
            DataplaneKind::Iptables => {
                switchyard_agent_iptables::cli::dataplane(&builder.proxy, &builder.netfilter)
                    .dry_run(&desired)
            }
            DataplaneKind::Ipvs => switchyard_agent_ipvs::cli::dataplane(
                &builder.proxy,
                &builder.netfilter,
                &builder.ipvs,
            )?
            .dry_run(&desired),
            DataplaneKind::Ebpf => {
                switchyard_agent_ebpf::cli::dry_run(&builder.proxy, &builder.ebpf, &desired)
            }
        };
        print!("# dataplane {kind}\n{text}");
        return Ok(());
    }

    // Start with what the kernel holds (a restart resumes without rewriting anything);
    // the policy's choice follows once the controller's state is in.
    let initial = record
        .in_force
        .unwrap_or_else(|| policy.wanted(record.label));
    let factory: Factory = Box::new(move |kind| builder.build(kind));
    let dataplane = Switchable::new(initial, factory)
        .with_context(|| format!("setting up the {initial} dataplane"))?;
    runtime.block_on(agent::run_with(
        args.agent,
        dataplane,
        Some(policy),
        "agent",
    ))
}
