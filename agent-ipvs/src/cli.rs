//! The IPVS dataplane as an agent binary builds it from its flags: kube-proxy's shared
//! ones and the `--ipvs-…` ones ([`IpvsArgs`]).

use std::time::Duration;

use clap::Args;
use switchyard_agent_core::{
    dataplane::DataplaneError,
    flags::{NetfilterArgs, ProxyArgs},
    state::IpvsScheduler,
};

use crate::{
    IpvsConfig, IpvsDataplane, netlink::Timeouts, render::RenderConfig, rules::RulesConfig,
};

/// The IPVS dataplane's own flags, in kube-proxy's spirit.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct IpvsArgs {
    /// The IPVS scheduler for Services without a `switchyard.io/ipvs-scheduler`
    /// annotation (its kernel module, ip_vs_<name>, must be available).
    #[arg(long, default_value = "rr", value_parser = parse_scheduler)]
    pub ipvs_scheduler: IpvsScheduler,
    /// Do not answer ARP for the VIPs (arp_ignore=1, arp_announce=2), as kube-proxy's
    /// --ipvs-strict-arp.
    #[arg(long)]
    pub ipvs_strict_arp: bool,
    /// Idle timeout of IPVS TCP connections; 0s leaves the kernel's.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub ipvs_tcp_timeout: Duration,
    /// Timeout of IPVS TCP connections after a FIN; 0s leaves the kernel's.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub ipvs_tcpfin_timeout: Duration,
    /// Timeout of IPVS UDP flows; 0s leaves the kernel's.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub ipvs_udp_timeout: Duration,
    /// CIDRs whose virtual services the agent never removes as orphans (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Vec<ipnet::IpNet>,
    /// How long a removed TCP or SCTP real server drains at weight 0 before it is deleted
    /// even with connections left.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub ipvs_graceful_termination_timeout: Duration,
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

/// The configuration the flags describe.
pub fn config(proxy: &ProxyArgs, netfilter: &NetfilterArgs, ipvs: &IpvsArgs) -> IpvsConfig {
    IpvsConfig {
        render: RenderConfig {
            scheduler: ipvs.ipvs_scheduler,
            ..RenderConfig::default()
        },
        rules: RulesConfig {
            cluster_cidrs: proxy.cluster_cidr.clone(),
            masquerade_all: proxy.masquerade_all,
            masquerade_bit: netfilter.iptables_masquerade_bit,
            ..RulesConfig::default()
        },
        nodeport_addresses: proxy.nodeport_addresses.clone(),
        exclude_cidrs: ipvs.ipvs_exclude_cidrs.clone(),
        strict_arp: ipvs.ipvs_strict_arp,
        timeouts: Timeouts {
            tcp: seconds(ipvs.ipvs_tcp_timeout),
            tcp_fin: seconds(ipvs.ipvs_tcpfin_timeout),
            udp: seconds(ipvs.ipvs_udp_timeout),
        },
        graceful_termination_timeout: ipvs.ipvs_graceful_termination_timeout,
        backend: netfilter.backend(),
        disable_ipv6: proxy.disable_ipv6,
        disable_conntrack: false,
    }
}

/// The dataplane the flags describe: opens its sockets in this thread's network
/// namespace and reads the node's addresses; writes nothing.
pub fn dataplane(
    proxy: &ProxyArgs,
    netfilter: &NetfilterArgs,
    ipvs: &IpvsArgs,
) -> Result<IpvsDataplane, DataplaneError> {
    IpvsDataplane::new(config(proxy, netfilter, ipvs))
}
