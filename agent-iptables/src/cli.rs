//! The iptables dataplane as an agent binary builds it from its flags (kube-proxy's
//! shared ones; the iptables dataplane has none of its own).

use switchyard_agent_core::flags::{NetfilterArgs, ProxyArgs};

use crate::{IptablesConfig, IptablesDataplane, RenderConfig};

/// The configuration the flags describe.
pub fn config(proxy: &ProxyArgs, netfilter: &NetfilterArgs) -> IptablesConfig {
    IptablesConfig {
        render: RenderConfig {
            cluster_cidrs: proxy.cluster_cidr.clone(),
            masquerade_all: proxy.masquerade_all,
            nodeport_addresses: proxy.nodeport_addresses.clone(),
            masquerade_bit: netfilter.iptables_masquerade_bit,
            ..RenderConfig::default()
        },
        backend: netfilter.backend(),
        disable_ipv6: proxy.disable_ipv6,
        ..IptablesConfig::default()
    }
}

/// The dataplane the flags describe (detecting the backend reads the kernel; nothing is
/// written).
pub fn dataplane(proxy: &ProxyArgs, netfilter: &NetfilterArgs) -> IptablesDataplane {
    IptablesDataplane::new(config(proxy, netfilter))
}
