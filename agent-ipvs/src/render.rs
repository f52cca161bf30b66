//! Renders one Service into the kernel objects that carry it in the IPVS dataplane: IPVS
//! virtual services with their real servers, the VIPs bound to the dummy device, and
//! elements of switchyard's ipsets. Pure: no I/O.
//!
//! # What goes where
//! - **IPVS** does the load balancing: one virtual service per VIP, port and protocol
//!   (cluster, external and load-balancer IPs, and each node address for a node port),
//!   masquerade forwarding, persistence for ClientIP affinity. A VIP whose traffic policy
//!   selects no endpoint gets no virtual service.
//! - **The dummy device** `swy-ipvs0` carries every VIP as a local host route (see
//!   [`crate::link`] for why a route rather than an address), so the node accepts packets
//!   to it and IPVS sees them on LOCAL_IN.
//! - **ipsets** carry what IPVS cannot do, for a fixed set of iptables rules
//!   ([`crate::rules`]) whose count never grows with the Services: which VIPs to
//!   masquerade, reject (no usable endpoint anywhere) or drop (endpoints exist but the
//!   policy selects none here), load-balancer source ranges, and hairpin pairs.
//!
//! The semantics are the iptables agent's, decision for decision (which endpoint set
//! internal and external traffic use, reject vs drop, affinity), so the dataplanes agree.
//!
//! # Attribution
//! Every ipset element of a Service carries the Service's name as its comment, and one
//! element of `SWY-VERSIONS` records its version: read-back ([`crate::readback`])
//! attributes virtual services, VIPs and hairpin pairs to Services through them, from the
//! kernel alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use switchyard_agent_core::{
    dataplane::DesiredService,
    policy::{Family, PortPolicy, nets_of_family, of_family},
    state::{IpvsScheduler, Protocol, ServiceState, TrafficPolicy, format_version},
};

/// The dummy device that holds every VIP.
pub const DUMMY_DEVICE: &str = "swy-ipvs0";

/// Renderer settings, in kube-proxy's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderConfig {
    /// `--ipvs-scheduler`: for Services without a `switchyard.io/ipvs-scheduler`.
    pub scheduler: IpvsScheduler,
    /// The node addresses node ports answer on (already narrowed to
    /// `--nodeport-addresses`); the dataplane reads them from the kernel.
    pub node_addresses: Vec<IpAddr>,
}

impl Default for RenderConfig {
    fn default() -> Self {
        Self {
            scheduler: IpvsScheduler::Rr,
            node_addresses: Vec::new(),
        }
    }
}

/// What identifies an IPVS virtual service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    pub protocol: Protocol,
    pub addr: IpAddr,
    pub port: u16,
}

impl VsKey {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
}

impl fmt::Display for VsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.protocol,
            SocketAddr::new(self.addr, self.port)
        )
    }
}

/// One virtual service: switchyard programs the scheduler its Service asks for and its
/// real servers with masquerade forwarding at weight 1; read-back reports what the kernel
/// holds, so anything else shows as drift.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualService {
    /// The scheduler's name (a kernel may hold one switchyard never asks for).
    pub scheduler: String,
    /// Persistence timeout in seconds (ClientIP affinity); `None`: not persistent.
    pub persistence: Option<u32>,
    pub reals: BTreeMap<SocketAddr, RealServer>,
}

/// How a real server is programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealServer {
    pub weight: u32,
    /// Masquerade (NAT) forwarding, the only method switchyard uses.
    pub masquerade: bool,
}

impl RealServer {
    /// What switchyard programs: masquerade at weight 1.
    pub const IN_SERVICE: RealServer = RealServer {
        weight: 1,
        masquerade: true,
    };
}

/// The ipsets switchyard owns, each once per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// Cluster IP, protocol and port of every served cluster IP: masqueraded per
    /// `--cluster-cidr` / `--masquerade-all`.
    ClusterIp,
    /// External, load-balancer and node-port destinations under the Cluster external
    /// policy: always masqueraded (the endpoint may be on another node).
    External,
    /// The same under the Local external policy: the client's address is kept
    /// (masqueraded only for traffic the node itself sends).
    ExternalLocal,
    /// Destinations without any usable endpoint: rejected.
    Reject,
    /// Destinations whose traffic policy selects no endpoint here: dropped.
    Drop,
    /// Load-balancer destinations with source ranges.
    LbFirewall,
    /// Load-balancer destination and an allowed source range.
    LbSource,
    /// Endpoint, protocol and port, endpoint again: a pod reaching itself through a
    /// Service is masqueraded (hairpin).
    LoopBack,
    /// One element per Service (a 128-bit hash of its name as an IPv6 address) whose
    /// comment holds the Service's name and version.
    Versions,
}

impl SetKind {
    pub const ALL: [SetKind; 9] = [
        SetKind::ClusterIp,
        SetKind::External,
        SetKind::ExternalLocal,
        SetKind::Reject,
        SetKind::Drop,
        SetKind::LbFirewall,
        SetKind::LbSource,
        SetKind::LoopBack,
        SetKind::Versions,
    ];

    fn base(self) -> &'static str {
        match self {
            SetKind::ClusterIp => "SWY-CLUSTER-IP",
            SetKind::External => "SWY-EXTERNAL",
            SetKind::ExternalLocal => "SWY-EXTERNAL-LOCAL",
            SetKind::Reject => "SWY-REJECT",
            SetKind::Drop => "SWY-DROP",
            SetKind::LbFirewall => "SWY-LB-FW",
            SetKind::LbSource => "SWY-LB-SOURCE",
            SetKind::LoopBack => "SWY-LOOP-BACK",
            SetKind::Versions => "SWY-VERSIONS",
        }
    }

    /// The set's name for `family` (`SWY-REJECT`, `SWY-REJECT6`); the versions set is
    /// one set of IPv6-shaped keys.
    pub fn name(self, family: Family) -> String {
        match (self, family) {
            (SetKind::Versions, _) | (_, Family::V4) => self.base().to_string(),
            (_, Family::V6) => format!("{}6", self.base()),
        }
    }

    /// The ipset type.
    pub fn set_type(self) -> &'static str {
        match self {
            SetKind::LbSource => "hash:ip,port,net",
            SetKind::LoopBack => "hash:ip,port,ip",
            SetKind::Versions => "hash:ip",
            _ => "hash:ip,port",
        }
    }

    /// The families this kind exists in.
    pub fn families(self) -> &'static [Family] {
        match self {
            SetKind::Versions => &[Family::V6],
            _ => &Family::ALL,
        }
    }

    /// The kind whose set is called `name`, with its family.
    pub fn parse_name(name: &str) -> Option<(SetKind, Family)> {
        SetKind::ALL.into_iter().find_map(|kind| {
            kind.families()
                .iter()
                .find(|family| kind.name(**family) == name)
                .map(|family| (kind, *family))
        })
    }

    /// Whether elements of this kind name a VIP (or node address), protocol and port
    /// that a virtual service may carry.
    pub fn names_destination(self) -> bool {
        matches!(
            self,
            SetKind::ClusterIp
                | SetKind::External
                | SetKind::ExternalLocal
                | SetKind::Reject
                | SetKind::Drop
        )
    }
}

/// One element of one of switchyard's ipsets, in the notation `ipset save` prints.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetElement {
    pub kind: SetKind,
    pub family: Family,
    pub element: String,
}

impl SetElement {
    pub fn set_name(&self) -> String {
        self.kind.name(self.family)
    }
}

/// Everything one Service puts into the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePlan {
    /// The version recorded in `SWY-VERSIONS`.
    pub version: Option<u64>,
    pub virtual_services: BTreeMap<VsKey, VirtualService>,
    /// VIPs routed locally through the dummy device.
    pub addresses: BTreeSet<IpAddr>,
    /// Elements of the per-family sets (not the version).
    pub elements: BTreeSet<SetElement>,
}

impl ServicePlan {
    /// The kernel objects, one line each, sorted (the notation of read-back and drift):
    /// `vip 10.96.0.10` (its local route), `ipvs TCP 10.96.0.10:80 rr persistent 10800`,
    /// `ipvs TCP 10.96.0.10:80 -> 10.244.1.2:8080 masq 1`, `ipset SWY-REJECT
    /// 10.96.0.12,tcp:80`, `version 0123456789abcdef`.
    pub fn objects(&self) -> Vec<String> {
        let mut objects = Vec::new();
        for address in &self.addresses {
            objects.push(format!("vip {address}"));
        }
        for (key, vs) in &self.virtual_services {
            let persistent = vs
                .persistence
                .map(|t| format!(" persistent {t}"))
                .unwrap_or_default();
            objects.push(format!("ipvs {key} {}{persistent}", vs.scheduler));
            for (real, how) in &vs.reals {
                let method = if how.masquerade { "masq" } else { "other" };
                objects.push(format!("ipvs {key} -> {real} {method} {}", how.weight));
            }
        }
        for element in &self.elements {
            objects.push(format!("ipset {} {}", element.set_name(), element.element));
        }
        if let Some(version) = self.version {
            objects.push(format!("version {}", format_version(version)));
        }
        objects.sort();
        objects
    }
}

/// `proto:port` as ipset prints it.
pub fn proto_port(protocol: Protocol, port: u16) -> String {
    format!("{}:{port}", protocol.lowercase())
}

/// An `ip,proto:port` element.
pub fn ip_port(ip: IpAddr, protocol: Protocol, port: u16) -> String {
    format!("{ip},{}", proto_port(protocol, port))
}

/// The hairpin element of an endpoint: `ip,proto:port,ip`.
pub fn loop_back(endpoint: SocketAddr, protocol: Protocol) -> String {
    format!(
        "{},{},{}",
        endpoint.ip(),
        proto_port(protocol, endpoint.port()),
        endpoint.ip()
    )
}

/// A source-range element: `ip,proto:port,net` (a host net prints as a bare address).
pub fn lb_source(ip: IpAddr, protocol: Protocol, port: u16, net: IpNet) -> String {
    let net = net.trunc();
    let net = if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    };
    format!("{},{net}", ip_port(ip, protocol, port))
}

/// Renders one Service for both families.
pub fn render_service(service: &DesiredService, cfg: &RenderConfig) -> ServicePlan {
    let mut plan = ServicePlan {
        version: Some(service.version),
        ..ServicePlan::default()
    };
    for family in Family::ALL {
        render_family(&mut plan, family, &service.state, cfg);
    }
    plan
}

/// One destination (VIP or node address, and port) of one port of a Service.
struct Destination<'a> {
    addr: IpAddr,
    port: u16,
    /// The endpoints its traffic policy selects; empty: no virtual service.
    reals: &'a BTreeSet<SocketAddr>,
    /// The set that marks it when it is served.
    served: SetKind,
    /// Whether the VIP goes on the dummy device (node addresses do not).
    vip: bool,
}

fn render_family(plan: &mut ServicePlan, family: Family, svc: &ServiceState, cfg: &RenderConfig) {
    // A family is handled only if the Service has a cluster IP of it, as in iptables.
    let cluster_ips = of_family(&svc.cluster_ips, family);
    if cluster_ips.is_empty() {
        return;
    }
    let external_ips = of_family(&svc.external_ips, family);
    let lb_ips = of_family(&svc.load_balancer_ips, family);
    let node_addresses = of_family(&cfg.node_addresses, family);
    let source_ranges = nets_of_family(&svc.load_balancer_source_ranges, family);
    let scheduler = svc.ipvs_scheduler.unwrap_or(cfg.scheduler);
    let external_set = if svc.external_traffic_policy == TrafficPolicy::Local {
        SetKind::ExternalLocal
    } else {
        SetKind::External
    };

    for port in &svc.ports {
        // kube-proxy's decisions, shared with every dataplane: which set serves which
        // traffic; without a usable endpoint anywhere both sets are empty (reject).
        let policy = PortPolicy::new(svc, port, family);
        let has_endpoints = policy.has_endpoints;
        let internal_eps: BTreeSet<SocketAddr> =
            policy.internal_endpoints().iter().copied().collect();
        let external_eps: BTreeSet<SocketAddr> =
            policy.external_endpoints().iter().copied().collect();
        let (internal_eps, external_eps) = (&internal_eps, &external_eps);

        let mut destinations: Vec<Destination<'_>> = Vec::new();
        for ip in &cluster_ips {
            destinations.push(Destination {
                addr: *ip,
                port: port.port,
                reals: internal_eps,
                served: SetKind::ClusterIp,
                vip: true,
            });
        }
        for ip in external_ips.iter().chain(&lb_ips) {
            destinations.push(Destination {
                addr: *ip,
                port: port.port,
                reals: external_eps,
                served: external_set,
                vip: true,
            });
        }
        if let Some(node_port) = port.node_port {
            for ip in &node_addresses {
                destinations.push(Destination {
                    addr: *ip,
                    port: node_port,
                    reals: external_eps,
                    served: external_set,
                    vip: false,
                });
            }
        }

        for destination in destinations {
            let element = ip_port(destination.addr, port.protocol, destination.port);
            if destination.vip {
                plan.addresses.insert(destination.addr);
            }
            let kind = if !destination.reals.is_empty() {
                plan.virtual_services.insert(
                    VsKey {
                        protocol: port.protocol,
                        addr: destination.addr,
                        port: destination.port,
                    },
                    VirtualService {
                        scheduler: scheduler.name().to_string(),
                        persistence: svc.session_affinity_timeout,
                        reals: destination
                            .reals
                            .iter()
                            .map(|real| (*real, RealServer::IN_SERVICE))
                            .collect(),
                    },
                );
                for real in destination.reals {
                    plan.elements.insert(SetElement {
                        kind: SetKind::LoopBack,
                        family,
                        element: loop_back(*real, port.protocol),
                    });
                }
                destination.served
            } else if has_endpoints {
                SetKind::Drop
            } else {
                SetKind::Reject
            };
            plan.elements.insert(SetElement {
                kind,
                family,
                element,
            });
        }

        // Load-balancer source ranges, only where traffic would otherwise be served, as
        // in iptables (a range containing a node address also admits the LB IP itself:
        // VIP-like load balancers looping traffic back through the node).
        if has_endpoints && !source_ranges.is_empty() {
            let from_node = source_ranges
                .iter()
                .any(|r| cfg.node_addresses.iter().any(|ip| r.contains(ip)));
            for ip in &lb_ips {
                plan.elements.insert(SetElement {
                    kind: SetKind::LbFirewall,
                    family,
                    element: ip_port(*ip, port.protocol, port.port),
                });
                let own = IpNet::from(*ip);
                for range in source_ranges
                    .iter()
                    .chain(std::iter::once(&own).filter(|_| from_node))
                {
                    plan.elements.insert(SetElement {
                        kind: SetKind::LbSource,
                        family,
                        element: lb_source(*ip, port.protocol, port.port, *range),
                    });
                }
            }
        }
    }
}
