//! Which endpoints serve which traffic to a Service port, and what happens when none
//! does: kube-proxy's decisions (its "categorize endpoints" and traffic policies), made
//! once here so that every dataplane (iptables chains, IPVS services, eBPF map entries)
//! renders the same behaviour. Pure.
//!
//! Per port and address family:
//! - no usable endpoint of the family anywhere: every address of the port rejects;
//! - traffic to cluster IPs uses the internal set (`internalTrafficPolicy`), traffic to
//!   node ports, external and load-balancer IPs the external set
//!   (`externalTrafficPolicy`); `Local` means the node's own endpoints;
//! - a set that is empty while endpoints exist elsewhere drops.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use crate::state::{EndpointState, PortState, ServiceState, TrafficPolicy};
use ipnet::IpNet;

/// Address family; dataplanes handle a Service per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The family's unspecified address (`0.0.0.0`, `::`).
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::from([0u8; 4]),
            Family::V6 => IpAddr::from([0u8; 16]),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// The addresses of `ips` in `family`, in order.
pub fn of_family(ips: &[IpAddr], family: Family) -> Vec<IpAddr> {
    ips.iter()
        .copied()
        .filter(|ip| Family::of(*ip) == family)
        .collect()
}

/// The CIDRs of `nets` in `family`, host bits cleared.
pub fn nets_of_family(nets: &[IpNet], family: Family) -> Vec<IpNet> {
    nets.iter()
        .filter(|n| Family::of(n.addr()) == family)
        .map(IpNet::trunc)
        .collect()
}

fn endpoints_of(endpoints: &[EndpointState], family: Family) -> Vec<SocketAddr> {
    endpoints
        .iter()
        .filter(|e| Family::of(e.ip) == family)
        .map(|e| SocketAddr::new(e.ip, e.port))
        .collect()
}

/// One port of a Service in one family: its endpoint sets and which traffic each serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicy {
    /// Endpoints for traffic under the Cluster policy.
    pub cluster_endpoints: Vec<SocketAddr>,
    /// The node's own endpoints, for traffic under the Local policy.
    pub local_endpoints: Vec<SocketAddr>,
    /// Some endpoint of the port is usable in this family somewhere in the cluster;
    /// without one every address of the port rejects.
    pub has_endpoints: bool,
    /// The port has a node port, or the Service external or load-balancer IPs of this
    /// family.
    pub externally_accessible: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// The cluster endpoints serve some of the port's traffic (kube-proxy's "uses the
    /// cluster chain").
    pub uses_cluster_endpoints: bool,
    /// The local endpoints serve some of the port's traffic.
    pub uses_local_endpoints: bool,
}

impl PortPolicy {
    pub fn new(service: &ServiceState, port: &PortState, family: Family) -> Self {
        let cluster_endpoints = endpoints_of(&port.cluster_endpoints, family);
        let local_endpoints = endpoints_of(&port.local_endpoints, family);
        let has_endpoints = match family {
            Family::V4 => port.usable_ipv4,
            Family::V6 => port.usable_ipv6,
        } || !cluster_endpoints.is_empty()
            || !local_endpoints.is_empty();
        let externally_accessible = port.node_port.is_some()
            || !of_family(&service.external_ips, family).is_empty()
            || !of_family(&service.load_balancer_ips, family).is_empty();
        let internal_local = service.internal_traffic_policy == TrafficPolicy::Local;
        let external_local = service.external_traffic_policy == TrafficPolicy::Local;
        let uses_cluster_endpoints =
            !cluster_endpoints.is_empty() && (!internal_local || externally_accessible);
        let uses_local_endpoints = !local_endpoints.is_empty()
            && (internal_local || (external_local && externally_accessible));
        Self {
            cluster_endpoints,
            local_endpoints,
            has_endpoints,
            externally_accessible,
            internal_local,
            external_local,
            uses_cluster_endpoints,
            uses_local_endpoints,
        }
    }

    /// The endpoints for traffic to cluster IPs.
    pub fn internal_endpoints(&self) -> &[SocketAddr] {
        if self.internal_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// The endpoints for traffic to node ports, external and load-balancer IPs.
    pub fn external_endpoints(&self) -> &[SocketAddr] {
        if self.external_local {
            &self.local_endpoints
        } else {
            &self.cluster_endpoints
        }
    }

    /// Traffic to cluster IPs is forwarded (else rejected without endpoints, dropped
    /// without internal ones).
    pub fn has_internal(&self) -> bool {
        self.has_endpoints && !self.internal_endpoints().is_empty()
    }

    /// Traffic to external addresses is forwarded.
    pub fn has_external(&self) -> bool {
        self.has_endpoints && !self.external_endpoints().is_empty()
    }
}
