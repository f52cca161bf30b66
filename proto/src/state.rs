//! The domain form of a node's load-balancing state, its conversions to and from the
//! wire types, and the content hash that versions each resource.
//!
//! The controller builds these values; agents receive them and program the kernel from
//! them. Vectors are kept in canonical order (the controller sorts them), so the same
//! state always encodes to the same bytes and hence the same version.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::{names, v1};

/// The resource name of a Service: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for ServiceKey {
    type Err = StateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::new(ns, name))
            }
            _ => Err(StateError::invalid("name", s, "expected namespace/name")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number (`IPPROTO_TCP` 6, `IPPROTO_UDP` 17, `IPPROTO_SCTP` 132).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// The protocol with IP protocol number `n`, if it is one of the three.
    pub fn from_number(n: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.number() == n)
    }

    /// The lowercase name tools print (`tcp`, `udp`, `sctp`).
    pub fn lowercase(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// An IPVS scheduler, by the name of its kernel module (`ip_vs_<name>`) and of
/// `ipvsadm -s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpvsScheduler {
    /// Round robin.
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Locality-based least connections.
    Lblc,
    /// Locality-based least connections with replication.
    Lblcr,
    /// Destination hashing.
    Dh,
    /// Source hashing.
    Sh,
    /// Shortest expected delay.
    Sed,
    /// Never queue.
    Nq,
    /// Weighted failover.
    Fo,
    /// Weighted overflow.
    Ovf,
    /// Maglev hashing.
    Mh,
    /// Weighted random twos choice (kernel 6.2 and later).
    Twos,
}

impl IpvsScheduler {
    pub const ALL: [IpvsScheduler; 14] = [
        Self::Rr,
        Self::Wrr,
        Self::Lc,
        Self::Wlc,
        Self::Lblc,
        Self::Lblcr,
        Self::Dh,
        Self::Sh,
        Self::Sed,
        Self::Nq,
        Self::Fo,
        Self::Ovf,
        Self::Mh,
        Self::Twos,
    ];

    /// The name IPVS knows it by (`rr`, `wlc`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Rr => "rr",
            Self::Wrr => "wrr",
            Self::Lc => "lc",
            Self::Wlc => "wlc",
            Self::Lblc => "lblc",
            Self::Lblcr => "lblcr",
            Self::Dh => "dh",
            Self::Sh => "sh",
            Self::Sed => "sed",
            Self::Nq => "nq",
            Self::Fo => "fo",
            Self::Ovf => "ovf",
            Self::Mh => "mh",
            Self::Twos => "twos",
        }
    }
}

impl fmt::Display for IpvsScheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for IpvsScheduler {
    type Err = StateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|scheduler| scheduler.name() == s)
            .ok_or_else(|| StateError::invalid("ipvs_scheduler", s, "not an IPVS scheduler"))
    }
}

/// How the eBPF dataplane picks a backend for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LbAlgorithm {
    /// Uniformly at random.
    Random,
    /// Maglev consistent hashing: a backend change moves about 1/N of flows.
    Maglev,
}

impl LbAlgorithm {
    pub const ALL: [LbAlgorithm; 2] = [Self::Random, Self::Maglev];

    /// `random` or `maglev`, as the annotation and the flag spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Maglev => "maglev",
        }
    }
}

impl fmt::Display for LbAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LbAlgorithm {
    type Err = StateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|algorithm| algorithm.name() == s)
            .ok_or_else(|| StateError::invalid("ebpf_lb_algorithm", s, "not random or maglev"))
    }
}

/// A dataplane, as the Node label `switchyard.io/dataplane` and the agent's
/// `--dataplane` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DataplaneKind {
    Iptables,
    Ipvs,
    Ebpf,
}

impl DataplaneKind {
    pub const ALL: [DataplaneKind; 3] = [Self::Iptables, Self::Ipvs, Self::Ebpf];

    /// `iptables`, `ipvs` or `ebpf`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Ipvs => "ipvs",
            Self::Ebpf => "ebpf",
        }
    }

    pub fn to_wire(self) -> v1::Dataplane {
        match self {
            Self::Iptables => v1::Dataplane::Iptables,
            Self::Ipvs => v1::Dataplane::Ipvs,
            Self::Ebpf => v1::Dataplane::Ebpf,
        }
    }

    /// `None` for unspecified.
    pub fn from_wire(wire: v1::Dataplane) -> Option<Self> {
        match wire {
            v1::Dataplane::Iptables => Some(Self::Iptables),
            v1::Dataplane::Ipvs => Some(Self::Ipvs),
            v1::Dataplane::Ebpf => Some(Self::Ebpf),
            v1::Dataplane::Unspecified => None,
        }
    }
}

impl fmt::Display for DataplaneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataplaneKind {
    type Err = StateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| StateError::invalid("dataplane", s, "not iptables, ipvs or ebpf"))
    }
}

/// Every Service a node must program, by resource name.
pub type NodeState = BTreeMap<ServiceKey, ServiceState>;

/// One Service as one node must program it: VIPs, ports and the endpoints already
/// selected for this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    pub key: ServiceKey,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub ports: Vec<PortState>,
    /// ClientIP affinity timeout in seconds; `None`: no affinity.
    pub session_affinity_timeout: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    pub health_check_node_port: Option<u16>,
    /// The IPVS scheduler the Service asks for; `None`: the IPVS agent's default.
    pub ipvs_scheduler: Option<IpvsScheduler>,
    /// How the eBPF dataplane picks backends for this Service; `None`: the eBPF agent's
    /// default.
    pub ebpf_lb: Option<LbAlgorithm>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortState {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Endpoints for traffic under the Cluster policy; empty when no policy is Cluster.
    pub cluster_endpoints: Vec<EndpointState>,
    /// Endpoints on this node for traffic under the Local policy; empty when no policy
    /// is Local.
    pub local_endpoints: Vec<EndpointState>,
    /// Whether any IPv4 endpoint of this port is usable anywhere in the cluster: traffic
    /// to an IPv4 VIP is rejected without one, and dropped when there is one but the
    /// set its traffic policy selects is empty.
    pub usable_ipv4: bool,
    /// The same for IPv6.
    pub usable_ipv6: bool,
}

impl PortState {
    /// Whether traffic to a VIP of `ip`'s family has a usable endpoint anywhere.
    pub fn has_usable_endpoints_for(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() {
            self.usable_ipv4
        } else {
            self.usable_ipv6
        }
    }

    /// Whether any family has a usable endpoint.
    pub fn has_usable_endpoints(&self) -> bool {
        self.usable_ipv4 || self.usable_ipv6
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointState {
    pub ip: IpAddr,
    pub port: u16,
    pub node_name: Option<String>,
    pub local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// Why a wire message could not become a domain value. Never retryable: the same bytes
/// fail the same way, so an agent NACKs the resource.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// A field held a value outside its domain (`value` is bounded and escaped).
    #[error("{field}: invalid value {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A required field was absent.
    #[error("{0} is missing")]
    Missing(&'static str),
}

impl StateError {
    fn invalid(field: &'static str, value: impl fmt::Display, reason: &'static str) -> Self {
        Self::Invalid {
            field,
            value: names::quote_bounded(&value.to_string()),
            reason,
        }
    }
}

/// The version of a resource: a hash of the canonical encoding of its state.
///
/// Controller and agents compute it the same way, so an agent that rebuilds a state
/// from what the kernel holds recovers the version the controller sent.
pub fn resource_version(state: &v1::ServiceState) -> String {
    format_version(version_hash(state))
}

/// [`resource_version`] as a number, for compact bookkeeping.
pub fn version_hash(state: &v1::ServiceState) -> u64 {
    let digest = Sha256::digest(state.encode_to_vec());
    u64::from_be_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    )
}

/// The wire form of a version number: 16 lowercase hex digits.
pub fn format_version(version: u64) -> String {
    format!("{version:016x}")
}

/// Reads a version sent by a peer; `None` for anything [`format_version`] cannot produce.
pub fn parse_version(version: &str) -> Option<u64> {
    if version.len() == 16 {
        u64::from_str_radix(version, 16).ok()
    } else {
        None
    }
}

impl From<Protocol> for v1::Protocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => v1::Protocol::Tcp,
            Protocol::Udp => v1::Protocol::Udp,
            Protocol::Sctp => v1::Protocol::Sctp,
        }
    }
}

impl From<TrafficPolicy> for v1::TrafficPolicy {
    fn from(p: TrafficPolicy) -> Self {
        match p {
            TrafficPolicy::Cluster => v1::TrafficPolicy::Cluster,
            TrafficPolicy::Local => v1::TrafficPolicy::Local,
        }
    }
}

impl From<&EndpointState> for v1::Endpoint {
    fn from(e: &EndpointState) -> Self {
        Self {
            ip: e.ip.to_string(),
            port: e.port.into(),
            node_name: e.node_name.clone().unwrap_or_default(),
            local: e.local,
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
        }
    }
}

impl From<&PortState> for v1::ServicePort {
    fn from(p: &PortState) -> Self {
        Self {
            name: p.name.clone(),
            protocol: v1::Protocol::from(p.protocol).into(),
            port: p.port.into(),
            node_port: p.node_port.map_or(0, u32::from),
            cluster_endpoints: p.cluster_endpoints.iter().map(Into::into).collect(),
            local_endpoints: p.local_endpoints.iter().map(Into::into).collect(),
            has_usable_ipv4_endpoints: p.usable_ipv4,
            has_usable_ipv6_endpoints: p.usable_ipv6,
        }
    }
}

impl From<&ServiceState> for v1::ServiceState {
    fn from(s: &ServiceState) -> Self {
        let strings = |ips: &[IpAddr]| ips.iter().map(ToString::to_string).collect();
        Self {
            namespace: s.key.namespace.clone(),
            name: s.key.name.clone(),
            cluster_ips: strings(&s.cluster_ips),
            external_ips: strings(&s.external_ips),
            load_balancer_ips: strings(&s.load_balancer_ips),
            load_balancer_source_ranges: s
                .load_balancer_source_ranges
                .iter()
                .map(ToString::to_string)
                .collect(),
            ports: s.ports.iter().map(Into::into).collect(),
            session_affinity_timeout_seconds: s.session_affinity_timeout,
            external_traffic_policy: v1::TrafficPolicy::from(s.external_traffic_policy).into(),
            internal_traffic_policy: v1::TrafficPolicy::from(s.internal_traffic_policy).into(),
            health_check_node_port: s.health_check_node_port.map_or(0, u32::from),
            ipvs_scheduler: s
                .ipvs_scheduler
                .map(|scheduler| scheduler.name().to_string())
                .unwrap_or_default(),
            ebpf_lb_algorithm: match s.ebpf_lb {
                None => v1::LbAlgorithm::Unspecified,
                Some(LbAlgorithm::Random) => v1::LbAlgorithm::Random,
                Some(LbAlgorithm::Maglev) => v1::LbAlgorithm::Maglev,
            }
            .into(),
        }
    }
}

fn parse<T: FromStr>(
    field: &'static str,
    value: &str,
    reason: &'static str,
) -> Result<T, StateError> {
    value
        .parse()
        .map_err(|_| StateError::invalid(field, value, reason))
}

fn checked(
    field: &'static str,
    value: &str,
    check: fn(&str) -> Result<(), &'static str>,
) -> Result<(), StateError> {
    check(value).map_err(|reason| StateError::Invalid {
        field,
        value: names::quote_bounded(value),
        reason,
    })
}

fn port(field: &'static str, value: u32) -> Result<u16, StateError> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(StateError::invalid(field, value, "not a port in 1..=65535")),
    }
}

fn optional_port(field: &'static str, value: u32) -> Result<Option<u16>, StateError> {
    if value == 0 {
        Ok(None)
    } else {
        port(field, value).map(Some)
    }
}

fn ips(field: &'static str, values: &[String]) -> Result<Vec<IpAddr>, StateError> {
    values
        .iter()
        .map(|v| parse(field, v, "not an IP address"))
        .collect()
}

impl TryFrom<v1::Protocol> for Protocol {
    type Error = StateError;

    fn try_from(p: v1::Protocol) -> Result<Self, Self::Error> {
        match p {
            v1::Protocol::Tcp => Ok(Protocol::Tcp),
            v1::Protocol::Udp => Ok(Protocol::Udp),
            v1::Protocol::Sctp => Ok(Protocol::Sctp),
            v1::Protocol::Unspecified => Err(StateError::Missing("protocol")),
        }
    }
}

fn traffic_policy(field: &'static str, value: i32) -> Result<TrafficPolicy, StateError> {
    match v1::TrafficPolicy::try_from(value) {
        Ok(v1::TrafficPolicy::Cluster) => Ok(TrafficPolicy::Cluster),
        Ok(v1::TrafficPolicy::Local) => Ok(TrafficPolicy::Local),
        Err(_) => Err(StateError::invalid(field, value, "unknown traffic policy")),
    }
}

impl TryFrom<&v1::Endpoint> for EndpointState {
    type Error = StateError;

    fn try_from(e: &v1::Endpoint) -> Result<Self, Self::Error> {
        if !e.node_name.is_empty() {
            checked("endpoint.node_name", &e.node_name, names::dns1123_subdomain)?;
        }
        Ok(Self {
            ip: parse("endpoint.ip", &e.ip, "not an IP address")?,
            port: port("endpoint.port", e.port)?,
            node_name: (!e.node_name.is_empty()).then(|| e.node_name.clone()),
            local: e.local,
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
        })
    }
}

impl TryFrom<&v1::ServicePort> for PortState {
    type Error = StateError;

    fn try_from(p: &v1::ServicePort) -> Result<Self, Self::Error> {
        let protocol = v1::Protocol::try_from(p.protocol)
            .map_err(|_| StateError::invalid("port.protocol", p.protocol, "unknown protocol"))?;
        let endpoints = |list: &[v1::Endpoint]| -> Result<Vec<_>, StateError> {
            list.iter().map(EndpointState::try_from).collect()
        };
        if !p.name.is_empty() {
            checked("port.name", &p.name, names::dns1123_label)?;
        }
        Ok(Self {
            name: p.name.clone(),
            protocol: protocol.try_into()?,
            port: port("port.port", p.port)?,
            node_port: optional_port("port.node_port", p.node_port)?,
            cluster_endpoints: endpoints(&p.cluster_endpoints)?,
            local_endpoints: endpoints(&p.local_endpoints)?,
            usable_ipv4: p.has_usable_ipv4_endpoints,
            usable_ipv6: p.has_usable_ipv6_endpoints,
        })
    }
}

impl TryFrom<&v1::ServiceState> for ServiceState {
    type Error = StateError;

    fn try_from(s: &v1::ServiceState) -> Result<Self, Self::Error> {
        if s.namespace.is_empty() {
            return Err(StateError::Missing("namespace"));
        }
        if s.name.is_empty() {
            return Err(StateError::Missing("name"));
        }
        // Names end up in kernel text (rule comments, map keys): only what the API
        // server accepts gets through, whatever the peer sent.
        checked("namespace", &s.namespace, names::dns1123_label)?;
        checked("name", &s.name, names::dns1035_label)?;
        Ok(Self {
            key: ServiceKey::new(&s.namespace, &s.name),
            cluster_ips: ips("cluster_ips", &s.cluster_ips)?,
            external_ips: ips("external_ips", &s.external_ips)?,
            load_balancer_ips: ips("load_balancer_ips", &s.load_balancer_ips)?,
            load_balancer_source_ranges: s
                .load_balancer_source_ranges
                .iter()
                .map(|r| parse("load_balancer_source_ranges", r, "not a CIDR"))
                .collect::<Result<_, _>>()?,
            ports: s
                .ports
                .iter()
                .map(PortState::try_from)
                .collect::<Result<_, _>>()?,
            session_affinity_timeout: s.session_affinity_timeout_seconds,
            external_traffic_policy: traffic_policy(
                "external_traffic_policy",
                s.external_traffic_policy,
            )?,
            internal_traffic_policy: traffic_policy(
                "internal_traffic_policy",
                s.internal_traffic_policy,
            )?,
            health_check_node_port: optional_port(
                "health_check_node_port",
                s.health_check_node_port,
            )?,
            ipvs_scheduler: if s.ipvs_scheduler.is_empty() {
                None
            } else {
                Some(s.ipvs_scheduler.parse()?)
            },
            ebpf_lb: match v1::LbAlgorithm::try_from(s.ebpf_lb_algorithm) {
                Ok(v1::LbAlgorithm::Unspecified) => None,
                Ok(v1::LbAlgorithm::Random) => Some(LbAlgorithm::Random),
                Ok(v1::LbAlgorithm::Maglev) => Some(LbAlgorithm::Maglev),
                Err(_) => {
                    return Err(StateError::invalid(
                        "ebpf_lb_algorithm",
                        s.ebpf_lb_algorithm,
                        "unknown load-balancing algorithm",
                    ));
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ServiceState {
        ServiceState {
            key: ServiceKey::new("default", "web"),
            cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            external_ips: vec!["192.0.2.7".parse().unwrap()],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec!["203.0.113.0/24".parse().unwrap()],
            ports: vec![PortState {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port: Some(30080),
                cluster_endpoints: vec![EndpointState {
                    ip: "10.244.1.5".parse().unwrap(),
                    port: 8080,
                    node_name: Some("node-a".into()),
                    local: true,
                    ready: true,
                    serving: true,
                    terminating: false,
                }],
                local_endpoints: vec![],
                usable_ipv4: true,
                usable_ipv6: false,
            }],
            session_affinity_timeout: Some(10800),
            external_traffic_policy: TrafficPolicy::Local,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: Some(32000),
            ipvs_scheduler: Some(IpvsScheduler::Sh),
            ebpf_lb: Some(LbAlgorithm::Maglev),
        }
    }

    #[test]
    fn state_survives_a_round_trip_through_the_wire_form() {
        let state = sample();
        let wire = v1::ServiceState::from(&state);
        assert_eq!(ServiceState::try_from(&wire).unwrap(), state);
    }

    #[test]
    fn equal_states_have_equal_versions_and_any_change_moves_the_version() {
        let a = v1::ServiceState::from(&sample());
        assert_eq!(resource_version(&a), resource_version(&a.clone()));
        let mut changed = sample();
        changed.ports[0].cluster_endpoints[0].terminating = true;
        assert_ne!(resource_version(&a), resource_version(&(&changed).into()));
        assert_eq!(resource_version(&a).len(), 16);
        assert_eq!(parse_version(&resource_version(&a)), Some(version_hash(&a)));
        assert_eq!(parse_version("not-a-version"), None);
    }

    #[test]
    fn invalid_wire_values_are_reported_with_their_field() {
        let mut wire = v1::ServiceState::from(&sample());
        wire.cluster_ips[0] = "10.96.0.300".into();
        let err = ServiceState::try_from(&wire).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cluster_ips: invalid value \"10.96.0.300\""),
            "{err}"
        );

        let mut wire = v1::ServiceState::from(&sample());
        wire.ports[0].port = 70000;
        assert!(ServiceState::try_from(&wire).is_err());

        let mut wire = v1::ServiceState::from(&sample());
        wire.ports[0].protocol = 0;
        assert_eq!(
            ServiceState::try_from(&wire).unwrap_err(),
            StateError::Missing("protocol")
        );
    }

    #[test]
    fn per_service_dataplane_choices_survive_the_wire_and_unset_ones_add_no_bytes() {
        let mut plain = sample();
        plain.ipvs_scheduler = None;
        plain.ebpf_lb = None;
        let wire = v1::ServiceState::from(&plain);
        assert_eq!(wire.ipvs_scheduler, "");
        assert_eq!(wire.ebpf_lb_algorithm, 0);
        assert_eq!(ServiceState::try_from(&wire).unwrap(), plain);
        // Unset, the new fields leave the encoding (and so every existing version) as it was.
        let mut without = wire.clone();
        without.ipvs_scheduler.clear();
        assert_eq!(wire.encode_to_vec(), without.encode_to_vec());

        for scheduler in IpvsScheduler::ALL {
            assert_eq!(scheduler.name().parse::<IpvsScheduler>(), Ok(scheduler));
        }
        let mut wire = v1::ServiceState::from(&sample());
        wire.ipvs_scheduler = "fastest".into();
        assert!(ServiceState::try_from(&wire).is_err());
        let mut wire = v1::ServiceState::from(&sample());
        wire.ebpf_lb_algorithm = 7;
        assert!(ServiceState::try_from(&wire).is_err());
    }

    #[test]
    fn names_that_could_reach_kernel_text_are_refused_with_the_field_named() {
        type Breaker = fn(&mut v1::ServiceState);
        let cases: [(&str, Breaker); 4] = [
            ("namespace", |w| w.namespace = "shop\" -j ACCEPT\n-A".into()),
            ("name", |w| w.name = "web\"\n*filter".into()),
            ("port.name", |w| w.ports[0].name = "http\"".into()),
            ("endpoint.node_name", |w| {
                w.ports[0].cluster_endpoints[0].node_name = "node a".into()
            }),
        ];
        for (field, break_it) in cases {
            let mut wire = v1::ServiceState::from(&sample());
            break_it(&mut wire);
            let err = ServiceState::try_from(&wire).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{field}: invalid value ")),
                "{err}"
            );
            assert!(
                !err.contains('\n'),
                "the message holds no raw newline: {err}"
            );
        }
    }

    #[test]
    fn service_keys_parse_only_namespace_slash_name() {
        assert_eq!(
            "a/b".parse::<ServiceKey>().unwrap(),
            ServiceKey::new("a", "b")
        );
        for bad in ["", "a", "/b", "a/", "a/b/c"] {
            assert!(bad.parse::<ServiceKey>().is_err(), "{bad}");
        }
    }
}
