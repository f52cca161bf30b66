//! The dataplane flags several agents share, with kube-proxy's names, for the binaries
//! to `#[command(flatten)]`: [`ProxyArgs`] (every dataplane) and [`NetfilterArgs`] (those
//! that program iptables: the iptables and IPVS agents). A dataplane crate's own flags
//! live in its `cli` module; the one agent binary flattens them all.

use clap::{Args, ValueEnum};
use ipnet::IpNet;

use crate::netfilter::Backend;

/// Flags every dataplane reads.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyArgs {
    /// Pod CIDRs (comma-separated, one per family): traffic to cluster IPs from outside
    /// them is masqueraded (source-NATed by the eBPF dataplane).
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// Masquerade all traffic sent to cluster IPs.
    #[arg(long)]
    pub masquerade_all: bool,
    /// Node ports answer only on node addresses inside these CIDRs (comma-separated);
    /// default: every address but loopback and link-local ones.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<IpNet>,
    /// Program IPv4 only (for nodes without usable IPv6).
    #[arg(long)]
    pub disable_ipv6: bool,
}

/// Which iptables implementation to program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// Detect it as kube-proxy does (legacy where the kernel cannot do nf_tables).
    #[default]
    Auto,
    Nft,
    Legacy,
}

/// Flags of the dataplanes that program iptables.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct NetfilterArgs {
    /// Which iptables backend to program; auto detects it as kube-proxy does.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub iptables_backend: BackendArg,
    /// Bit of the packet mark that asks for masquerading (14: 0x4000).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub iptables_masquerade_bit: u8,
}

impl Default for NetfilterArgs {
    fn default() -> Self {
        Self {
            iptables_backend: BackendArg::Auto,
            iptables_masquerade_bit: 14,
        }
    }
}

impl NetfilterArgs {
    /// The backend the flags force; `None`: detect it.
    pub fn backend(&self) -> Option<Backend> {
        match self.iptables_backend {
            BackendArg::Auto => None,
            BackendArg::Nft => Some(Backend::Nft),
            BackendArg::Legacy => Some(Backend::Legacy),
        }
    }
}
