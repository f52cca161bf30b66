//! Renders a Service into the entries of the eBPF maps: which address, port and
//! protocol is a Service address for which path, what happens there, and the backend
//! sets entries point at. Pure: no I/O, no kernel ids (ranges and Service ids are
//! allocated when the entries are written).
//!
//! The decisions are the iptables agent's (`render_family` in agent-iptables), so the
//! dataplanes agree packet for packet:
//! - a family is handled only when the Service has a cluster IP of that family;
//! - no usable endpoint for the family: every address of the port rejects;
//! - cluster IPs use the internal set (`internalTrafficPolicy`), external IPs,
//!   load-balancer IPs and node ports the external set (`externalTrafficPolicy`); a set
//!   that is empty while endpoints exist elsewhere drops;
//! - from processes on the node (socket scope), an external address of an
//!   `externalTrafficPolicy: Local` Service uses the cluster set when there is one
//!   (iptables short-circuits local and pod sources to it), else the local set;
//! - from outside (tc scope), `Cluster` source-NATs to the node, `Local` keeps the
//!   client address and uses local endpoints, except for sources in a cluster CIDR,
//!   which use the cluster set; cluster IPs routed through the node are source-NATed
//!   from outside the cluster CIDR (or always with `--masquerade-all`), and a backend
//!   reached from itself (hairpin) always is;
//! - load-balancer source ranges admit only their sources on the load-balancer IPs
//!   (and the load-balancer IPs themselves when a range holds a node IP); from the node
//!   the node's own addresses are the source that counts;
//! - ClientIP affinity keeps its timeout per service port.
//!
//! # Kernel objects
//! Each entry reads as one line, the same from [`render_service`] and from the maps:
//! `sock tcp 10.96.0.10:80 forward random [10.244.1.2:8080 10.244.2.2:8080] affinity=10800s`,
//! `ext udp 0.0.0.0:30053 reject`, `range 203.0.113.0/24`; node ports show the family's
//! unspecified address. A Maglev set shows its size and a digest of its table.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use sha2::{Digest, Sha256};
pub use switchyard_agent_core::policy::Family;
use switchyard_agent_core::{
    dataplane::DesiredService,
    policy::{PortPolicy, nets_of_family, of_family},
};
use switchyard_proto::state::{LbAlgorithm, PortState, Protocol, ServiceState};

use crate::{abi, maglev};

/// Renderer settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderConfig {
    /// `--lb-algorithm`: for Services without a `switchyard.io/ebpf-lb` annotation.
    pub default_lb: LbAlgorithm,
    /// `--maglev-table-size`: entries of every Maglev table (a prime).
    pub maglev_size: u32,
    /// `--cluster-cidr`: pod CIDRs (the first of each family is used).
    pub cluster_cidrs: Vec<IpNet>,
    /// `--masquerade-all`: source-NAT every flow to a cluster IP routed through the node.
    pub masquerade_all: bool,
    /// The node's addresses: the source of the node's own traffic, for load-balancer
    /// source ranges.
    pub node_ips: Vec<IpAddr>,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            default_lb: LbAlgorithm::Random,
            maglev_size: maglev::DEFAULT_TABLE_SIZE,
            cluster_cidrs: Vec::new(),
            masquerade_all: false,
            node_ips: Vec::new(),
        }
    }
}

/// Which path an entry decides for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// connect()/sendmsg() of processes in the cgroup.
    Sock,
    /// Packets arriving on a device (tc).
    Ext,
    /// The same from a cluster CIDR, for `externalTrafficPolicy: Local`.
    ExtPod,
}

impl Scope {
    pub fn code(self) -> u8 {
        match self {
            Scope::Sock => abi::SCOPE_SOCK,
            Scope::Ext => abi::SCOPE_EXT,
            Scope::ExtPod => abi::SCOPE_EXT_POD,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            abi::SCOPE_SOCK => Some(Scope::Sock),
            abi::SCOPE_EXT => Some(Scope::Ext),
            abi::SCOPE_EXT_POD => Some(Scope::ExtPod),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scope::Sock => "sock",
            Scope::Ext => "ext",
            Scope::ExtPod => "ext-pod",
        }
    }
}

/// The IP protocol number of a Service protocol.
pub fn proto_number(protocol: Protocol) -> u8 {
    protocol.number()
}

/// `tcp`, `udp`, `sctp`, or `proto<N>` for a number switchyard never writes.
pub fn proto_name(number: u8) -> String {
    Protocol::from_number(number)
        .map_or_else(|| format!("proto{number}"), |p| p.lowercase().to_string())
}

/// A backend set: the slots of one range, in order, and how entries pick from it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BackendSet {
    pub backends: Vec<SocketAddr>,
    /// The Maglev table size, when the set picks through a Maglev table.
    pub maglev: Option<u32>,
}

impl BackendSet {
    /// The Maglev table of the set, when it has one.
    pub fn maglev_table(&self) -> Result<Option<Vec<u16>>, maglev::MaglevError> {
        self.maglev
            .map(|size| maglev::build(&self.backends, size))
            .transpose()
    }

    /// The set in the kernel-object notation (`random [a b]`, `maglev/16381/<digest> [a b]`),
    /// given its Maglev table when it has one.
    pub fn describe(&self, table: Option<&[u16]>) -> String {
        let list = self
            .backends
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        match (self.maglev, table) {
            (Some(size), Some(table)) => format!(
                "maglev/{size}/{} [{list}]",
                maglev::digest(table, &self.backends)
            ),
            (Some(size), None) => format!("maglev/{size}/missing [{list}]"),
            (None, _) => format!("random [{list}]"),
        }
    }
}

/// What an entry does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Forward to a backend of `sets[set]`.
    Forward { set: usize },
    /// No usable endpoint: refuse at once.
    Reject,
    /// Endpoints exist, none for this traffic policy: drop.
    Drop,
}

/// One service-map entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub scope: Scope,
    /// The VIP; the family's unspecified address for a node port.
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub action: Action,
    /// `abi::F_*` bits other than affinity and Maglev (which follow from the set and
    /// `affinity`).
    pub flags: u8,
    /// ClientIP affinity timeout (seconds), for forwarding entries.
    pub affinity: Option<u32>,
    /// Shared by every entry of one service port and family.
    pub affinity_id: u32,
}

impl Entry {
    pub fn key(&self) -> abi::SvcKey {
        abi::SvcKey {
            addr: abi::addr(self.addr),
            port: abi::port(self.port),
            proto: self.proto,
            scope: self.scope.code(),
        }
    }

    /// The entry in the kernel-object notation; `set` is its set's description.
    pub fn describe(&self, set: Option<&str>) -> String {
        let mut line = format!(
            "{} {} {}",
            self.scope.name(),
            proto_name(self.proto),
            SocketAddr::new(self.addr, self.port)
        );
        match self.action {
            Action::Forward { .. } => {
                line.push_str(" forward ");
                line.push_str(set.unwrap_or("[missing]"));
            }
            Action::Reject => line.push_str(" reject"),
            Action::Drop => line.push_str(" drop"),
        }
        for (bit, word) in [
            (abi::F_SNAT, "snat"),
            (abi::F_SNAT_NON_POD, "snat-non-pod"),
            (abi::F_SRC_RANGES, "source-ranges"),
            (abi::F_POD_SET, "pod-set"),
        ] {
            if self.flags & bit != 0 {
                line.push(' ');
                line.push_str(word);
            }
        }
        if let (Some(seconds), Action::Forward { .. }) = (self.affinity, self.action) {
            line.push_str(&format!(" affinity={seconds}s"));
        }
        line
    }
}

/// Everything one Service puts into the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntries {
    /// Sorted by scope, then key.
    pub entries: Vec<Entry>,
    /// The backend sets entries point at, each once.
    pub sets: Vec<BackendSet>,
    /// Load-balancer source ranges (and admitted load-balancer IPs, as host prefixes).
    pub ranges: Vec<IpNet>,
}

impl ServiceEntries {
    /// The kernel objects, sorted, with each Maglev set's table built to digest it.
    pub fn objects(&self) -> Result<Vec<String>, RenderError> {
        let mut described = Vec::with_capacity(self.sets.len());
        for set in &self.sets {
            let table = set.maglev_table()?;
            described.push(set.describe(table.as_deref()));
        }
        Ok(self.objects_with(&described))
    }

    /// The kernel objects given each set's description (as read back).
    pub fn objects_with(&self, sets: &[String]) -> Vec<String> {
        let mut objects: Vec<String> = self
            .entries
            .iter()
            .map(|e| {
                let set = match e.action {
                    Action::Forward { set } => sets.get(set).map(String::as_str),
                    _ => None,
                };
                e.describe(set)
            })
            .chain(self.ranges.iter().map(|r| format!("range {r}")))
            .collect();
        objects.sort();
        objects
    }

    /// UDP backends of the Service, for flushing conntrack entries of removed ones.
    pub fn udp_backends(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self
            .entries
            .iter()
            .filter(|e| e.proto == proto_number(Protocol::Udp))
            .filter_map(|e| match e.action {
                Action::Forward { set } => self.sets.get(set),
                _ => None,
            })
            .flat_map(|s| s.backends.iter().copied())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Why a Service cannot be rendered. Not retryable: the same state fails the same way.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A backend set does not fit a range (slot counts are 16-bit).
    #[error("port {port}: {count} backends exceed the 65535 a range holds")]
    TooManyBackends { port: u16, count: usize },
    /// A Maglev table cannot be built.
    #[error(transparent)]
    Maglev(#[from] maglev::MaglevError),
}

/// A stable 32-bit id of a service port in one family, for the affinity map.
pub fn affinity_id(service: &str, port: &PortState, family: Family) -> u32 {
    let digest = Sha256::digest(
        format!(
            "{service}\n{}\n{}\n{family:?}",
            port.name,
            proto_number(port.protocol)
        )
        .as_bytes(),
    );
    u32::from_be_bytes(digest[..4].try_into().expect("4 bytes"))
}

struct Builder<'a> {
    out: ServiceEntries,
    cfg: &'a RenderConfig,
    maglev: Option<u32>,
}

impl Builder<'_> {
    fn set(&mut self, port: u16, backends: &[SocketAddr]) -> Result<usize, RenderError> {
        if backends.len() > usize::from(u16::MAX) {
            return Err(RenderError::TooManyBackends {
                port,
                count: backends.len(),
            });
        }
        let set = BackendSet {
            backends: backends.to_vec(),
            maglev: self.maglev,
        };
        if let Some(i) = self.out.sets.iter().position(|s| *s == set) {
            return Ok(i);
        }
        if let Some(size) = self.maglev {
            maglev::build(&set.backends, size)?;
        }
        self.out.sets.push(set);
        Ok(self.out.sets.len() - 1)
    }
}

/// Renders one Service for both families.
pub fn render_service(
    name: &str,
    service: &DesiredService,
    cfg: &RenderConfig,
) -> Result<ServiceEntries, RenderError> {
    let svc = &service.state;
    let algorithm = svc.ebpf_lb.unwrap_or(cfg.default_lb);
    let mut b = Builder {
        out: ServiceEntries::default(),
        cfg,
        maglev: (algorithm == LbAlgorithm::Maglev).then_some(cfg.maglev_size),
    };
    for family in Family::ALL {
        render_family(&mut b, name, svc, family)?;
    }
    b.out.entries.sort_by_key(|e| (e.scope, e.key()));
    b.out.entries.dedup();
    b.out.ranges.sort();
    b.out.ranges.dedup();
    Ok(b.out)
}

fn render_family(
    b: &mut Builder<'_>,
    name: &str,
    svc: &ServiceState,
    family: Family,
) -> Result<(), RenderError> {
    let cluster_ips = of_family(&svc.cluster_ips, family);
    if cluster_ips.is_empty() {
        return Ok(());
    }
    let cfg = b.cfg;
    let external_ips = of_family(&svc.external_ips, family);
    let lb_ips = of_family(&svc.load_balancer_ips, family);
    let source_ranges = nets_of_family(&svc.load_balancer_source_ranges, family);
    let cluster_cidr = nets_of_family(&cfg.cluster_cidrs, family).first().copied();
    let uses_fw = !lb_ips.is_empty() && !source_ranges.is_empty();
    let ranges_admit_node = source_ranges
        .iter()
        .any(|r| cfg.node_ips.iter().any(|ip| r.contains(ip)));

    for port in &svc.ports {
        let proto = proto_number(port.protocol);
        let policy = PortPolicy::new(svc, port, family);
        let has_endpoints = policy.has_endpoints;
        let cluster_eps = &policy.cluster_endpoints;
        let internal_eps = policy.internal_endpoints();
        let external_eps = policy.external_endpoints();
        let has_external = policy.has_external();
        let etp_local = policy.external_local;
        let affinity = svc.session_affinity_timeout;
        let affinity_id = affinity_id(name, port, family);
        let entry = |scope, addr, port_number, action, flags| Entry {
            scope,
            addr,
            port: port_number,
            proto,
            action,
            flags,
            affinity: match action {
                Action::Forward { .. } => affinity,
                _ => None,
            },
            affinity_id,
        };

        // Cluster IPs: the internal set, from the node and routed through it.
        let internal = if !has_endpoints {
            Action::Reject
        } else if !policy.has_internal() {
            Action::Drop
        } else {
            Action::Forward {
                set: b.set(port.port, internal_eps)?,
            }
        };
        let routed_snat = if cfg.masquerade_all {
            abi::F_SNAT
        } else if cluster_cidr.is_some() {
            abi::F_SNAT_NON_POD
        } else {
            0
        };
        for ip in &cluster_ips {
            b.out
                .entries
                .push(entry(Scope::Sock, *ip, port.port, internal, 0));
            let flags = if matches!(internal, Action::Forward { .. }) {
                routed_snat
            } else {
                0
            };
            b.out
                .entries
                .push(entry(Scope::Ext, *ip, port.port, internal, flags));
        }

        // External IPs, load-balancer IPs, the node port: the external set.
        let mut external: Vec<(IpAddr, u16, bool)> = external_ips
            .iter()
            .map(|ip| (*ip, port.port, false))
            .chain(lb_ips.iter().map(|ip| (*ip, port.port, true)))
            .collect();
        if let Some(node_port) = port.node_port {
            external.push((family.unspecified(), node_port, false));
        }
        if external.is_empty() {
            continue;
        }
        // From processes on the node (socket scope).
        let from_node = if !has_endpoints {
            Action::Reject
        } else if etp_local && policy.uses_cluster_endpoints {
            Action::Forward {
                set: b.set(port.port, cluster_eps)?,
            }
        } else if has_external {
            Action::Forward {
                set: b.set(port.port, external_eps)?,
            }
        } else {
            Action::Drop
        };
        // From outside (tc scope).
        let (from_outside, outside_flags) = if !has_endpoints {
            (Action::Reject, 0)
        } else if has_external {
            let set = b.set(port.port, external_eps)?;
            (
                Action::Forward { set },
                if etp_local { 0 } else { abi::F_SNAT },
            )
        } else {
            (Action::Drop, 0)
        };
        let pod_set = if has_endpoints
            && etp_local
            && policy.uses_cluster_endpoints
            && cluster_cidr.is_some()
        {
            Some(Action::Forward {
                set: b.set(port.port, cluster_eps)?,
            })
        } else {
            None
        };
        for (addr, port_number, is_lb) in external {
            let firewalled = is_lb && uses_fw && has_endpoints;
            let sock_action = if firewalled && !ranges_admit_node {
                Action::Drop
            } else {
                from_node
            };
            b.out
                .entries
                .push(entry(Scope::Sock, addr, port_number, sock_action, 0));
            let mut flags = if matches!(from_outside, Action::Forward { .. }) {
                outside_flags
            } else {
                0
            };
            if firewalled {
                flags |= abi::F_SRC_RANGES;
            }
            if let Some(pod) = pod_set {
                flags |= abi::F_POD_SET;
                b.out
                    .entries
                    .push(entry(Scope::ExtPod, addr, port_number, pod, 0));
            }
            b.out
                .entries
                .push(entry(Scope::Ext, addr, port_number, from_outside, flags));
        }
        if uses_fw && has_endpoints {
            b.out.ranges.extend(source_ranges.iter().copied());
            if ranges_admit_node {
                b.out
                    .ranges
                    .extend(lb_ips.iter().map(|ip| IpNet::from(*ip)));
            }
        }
    }
    Ok(())
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests;
