//! Per-node computation: which VIPs, ports and endpoints one node must program for one
//! Service, with kube-proxy's endpoint selection. Pure; no I/O.
//!
//! Entry points: [`compute_service`] for one Service on one node, [`compute_node`] for
//! every Service on one node, and [`variant_key`] to share results between nodes.
//!
//! The selection mirrors kube-proxy (`pkg/proxy/topology.go`, `CategorizeEndpoints`):
//!
//! - endpoints of a service port come from every slice of the Service that lists a port
//!   with the same name and protocol; that slice port's number is the endpoint's target
//!   port, so named target ports resolve per slice;
//! - the *cluster* set (used when some traffic follows the Cluster policy) holds the ready
//!   endpoints allowed by topology hints, or, when no endpoint is ready anywhere, every
//!   serving-and-terminating endpoint (topology ignored);
//! - the *local* set (used when some traffic follows the Local policy) holds this node's
//!   ready endpoints, or, when it has none, this node's serving-and-terminating endpoints;
//!   hints never apply to it;
//! - `usable_ipv4` / `usable_ipv6` say whether any endpoint of that family anywhere is
//!   usable (ready, or serving and terminating): with none the dataplane rejects traffic
//!   to that family's VIPs, otherwise an empty set drops.
//!
//! kube-proxy runs one proxier per IP family, so all of the above is decided per family:
//! a family's fallback and topology look only at that family's endpoints, and endpoints
//! of a family the Service has no cluster IP for are ignored. The two families' results
//! are concatenated (IPv4 first), and the dataplane splits them again.

use std::{
    collections::{BTreeMap, btree_map::Entry},
    net::IpAddr,
};

use switchyard_proto::state::{EndpointState, NodeState, PortState, ServiceState};

use crate::model::{
    ClusterSnapshot, Endpoint, EndpointSlice, Service, ServicePort, ServiceType, TrafficPolicy,
};

/// The proxy name a Service may carry to be handled by switchyard when it replaces
/// kube-proxy.
pub const PROXY_NAME: &str = "switchyard";

/// Which Services this controller handles, by their `service-proxy-name` label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProxyNameFilter {
    /// Unlabelled Services and those labelled `switchyard`: switchyard replaces kube-proxy.
    #[default]
    Default,
    /// Only Services labelled with this name: switchyard runs beside kube-proxy.
    Only(String),
}

impl ProxyNameFilter {
    /// Whether a Service with this `service-proxy-name` label is ours.
    pub fn accepts(&self, proxy_name: Option<&str>) -> bool {
        match self {
            Self::Default => proxy_name.is_none_or(|name| name == PROXY_NAME),
            Self::Only(only) => proxy_name == Some(only.as_str()),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ComputeOptions {
    pub proxy_names: ProxyNameFilter,
}

/// What the computation needs to know about the node it computes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeContext<'a> {
    pub name: &'a str,
    /// `None` when the node is unknown or has no zone label.
    pub zone: Option<&'a str>,
}

impl NodeContext<'_> {
    /// The zone as kube-proxy reads it from the node's labels: missing reads as "".
    fn zone_label(&self) -> &str {
        self.zone.unwrap_or("")
    }

    /// kube-proxy's `isLocal`: an endpoint is local when it names this (named) node.
    fn hosts(&self, endpoint: &Endpoint) -> bool {
        !self.name.is_empty() && endpoint.node_name.as_deref() == Some(self.name)
    }
}

/// Nodes with equal keys get identical states for a Service, so the caller computes
/// once per key instead of once per node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VariantKey {
    /// The node has no endpoint of the Service and no hint names it or its zone.
    Shared,
    /// Only the node's zone matters.
    Zone(String),
    /// The node itself matters (it hosts an endpoint, or a node hint names it).
    Node(String),
}

/// The state one node must program for one Service; `None` when this proxy must not
/// handle it (headless, ExternalName, another proxy's).
///
/// Also `None` for a Service without any cluster IP (kube-proxy's `ShouldSkipService`)
/// or without ports (nothing to program; the API server rejects such Services anyway).
/// Slices whose `service` is not this Service are ignored. The result does not depend
/// on the order of `slices`.
///
/// Two fields are normalised to what kube-proxy acts on:
/// - `external_traffic_policy` is `Local` only when the Service is externally
///   accessible (NodePort, LoadBalancer, or ClusterIP with external IPs) — the API's
///   `ExternalPolicyLocal`;
/// - `health_check_node_port` is kept only for a LoadBalancer with that policy — the
///   API's `NeedsHealthCheck`.
pub fn compute_service<'a>(
    service: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
    node: NodeContext<'_>,
    options: &ComputeOptions,
) -> Option<ServiceState> {
    if !handles(service, options) {
        return None;
    }
    let mut slices: Vec<&EndpointSlice> = slices
        .into_iter()
        .filter(|slice| slice.service == service.key)
        .collect();
    // kube-proxy walks slices in map order; a fixed order makes duplicates resolve
    // deterministically (see `gather`).
    slices.sort_by(|a, b| a.key.cmp(&b.key));

    let external_local = external_policy_local(service);
    let ports = service
        .ports
        .iter()
        .map(|port| {
            let candidates = gather(service, port, &slices, node);
            categorize(service, port, external_local, &candidates, node)
        })
        .collect();

    let needs_health_check = service.service_type == ServiceType::LoadBalancer && external_local;
    Some(ServiceState {
        key: service.key.clone(),
        cluster_ips: service.cluster_ips.clone(),
        external_ips: service.external_ips.clone(),
        load_balancer_ips: service.load_balancer_ips.clone(),
        load_balancer_source_ranges: service.load_balancer_source_ranges.clone(),
        ports,
        session_affinity_timeout: service.session_affinity_timeout,
        external_traffic_policy: if external_local {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        },
        internal_traffic_policy: service.internal_traffic_policy,
        health_check_node_port: service
            .health_check_node_port
            .filter(|_| needs_health_check),
        ipvs_scheduler: service.ipvs_scheduler,
        ebpf_lb: service.ebpf_lb,
    })
}

/// The key under which `node`'s state for this Service can be shared with other nodes.
///
/// Sound for one snapshot: two nodes with equal keys get equal [`compute_service`]
/// results. `Node` keys assume a node's zone is fixed within the snapshot.
pub fn variant_key<'a>(
    service: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
    node: NodeContext<'_>,
) -> VariantKey {
    VariantIndex::new(service, slices).key(node)
}

/// [`variant_key`] for many nodes: reads a Service's endpoints once, then classifies
/// each node with two set lookups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VariantIndex {
    /// Nodes that host an endpoint or that some node hint names. Looked up once per
    /// node and Service during a sync, hence foldhash rather than SipHash.
    nodes: foldhash::HashSet<String>,
    /// Zones that some zone hint names.
    zones: foldhash::HashSet<String>,
}

impl VariantIndex {
    pub fn new<'a>(
        service: &Service,
        slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
    ) -> Self {
        let mut index = Self::default();
        let endpoints = slices
            .into_iter()
            .filter(|slice| slice.service == service.key)
            .flat_map(|slice| &slice.endpoints);
        for endpoint in endpoints {
            // An unnamed node never hosts an endpoint (kube-proxy's `isLocal`).
            index
                .nodes
                .extend(endpoint.node_name.iter().filter(|n| !n.is_empty()).cloned());
            index.nodes.extend(endpoint.node_hints.iter().cloned());
            index.zones.extend(endpoint.zone_hints.iter().cloned());
        }
        index
    }

    /// The key under which `node`'s state can be shared with other nodes.
    pub fn key(&self, node: NodeContext<'_>) -> VariantKey {
        if self.nodes.contains(node.name) {
            VariantKey::Node(node.name.to_owned())
        } else if self.zones.contains(node.zone_label()) {
            VariantKey::Zone(node.zone_label().to_owned())
        } else {
            VariantKey::Shared
        }
    }
}

/// Everything one node must program: every handled Service of the snapshot. A node
/// missing from the snapshot is computed without a zone.
pub fn compute_node(
    snapshot: &ClusterSnapshot,
    node_name: &str,
    options: &ComputeOptions,
) -> NodeState {
    let node = NodeContext {
        name: node_name,
        zone: snapshot
            .nodes
            .get(node_name)
            .and_then(|node| node.zone.as_deref()),
    };
    snapshot
        .services
        .iter()
        .filter_map(|(key, service)| {
            let slices = snapshot
                .slices
                .get(key)
                .into_iter()
                .flat_map(|by_name| by_name.values())
                .map(|slice| slice.as_ref())
                .collect::<Vec<_>>();
            let state = compute_service(service, slices.iter().copied(), node, options)?;
            Some((key.clone(), state))
        })
        .collect()
}

/// Whether this proxy programs the Service at all.
/// Why no node programs `service` although it is meant to be proxied, for the query
/// API's problems; `None` when it is programmed or skipped on purpose (headless,
/// ExternalName, another proxy's: those are how Kubernetes says "no proxying").
pub fn dropped_reason(service: &Service) -> Option<&'static str> {
    if service.headless || service.service_type == ServiceType::ExternalName {
        return None;
    }
    if service.cluster_ips.is_empty() {
        Some("it has no cluster IP (spec.clusterIP is empty; kube-proxy skips such Services too)")
    } else if service.ports.is_empty() {
        Some("it has no ports (spec.ports is empty)")
    } else {
        None
    }
}

fn handles(service: &Service, options: &ComputeOptions) -> bool {
    !service.headless
        && service.service_type != ServiceType::ExternalName
        && !service.cluster_ips.is_empty()
        && !service.ports.is_empty()
        && options.proxy_names.accepts(service.proxy_name.as_deref())
}

/// The API's `ExternalPolicyLocal`: eTP Local counts only for externally accessible
/// Services.
fn external_policy_local(service: &Service) -> bool {
    let externally_accessible = match service.service_type {
        ServiceType::NodePort | ServiceType::LoadBalancer => true,
        ServiceType::ClusterIp => !service.external_ips.is_empty(),
        ServiceType::ExternalName => false,
    };
    externally_accessible && service.external_traffic_policy == TrafficPolicy::Local
}

/// One endpoint of one service port, after deduplication.
#[derive(Debug)]
struct Candidate<'a> {
    ip: IpAddr,
    port: u16,
    endpoint: &'a Endpoint,
    local: bool,
}

impl Candidate<'_> {
    fn ready(&self) -> bool {
        self.endpoint.ready
    }

    fn serving_terminating(&self) -> bool {
        self.endpoint.serving && self.endpoint.terminating
    }

    fn state(&self) -> EndpointState {
        EndpointState {
            ip: self.ip,
            port: self.port,
            node_name: self.endpoint.node_name.clone(),
            local: self.local,
            ready: self.endpoint.ready,
            serving: self.endpoint.serving,
            terminating: self.endpoint.terminating,
        }
    }
}

/// Every endpoint of `port`, one per (ip, target port), in that order (so IPv4 first),
/// leaving out families the Service has no cluster IP for.
///
/// Like kube-proxy's endpoint slice cache, an endpoint seen in several slices (it moved,
/// or a new pod reused a terminating pod's IP) keeps a non-terminating copy if there is
/// one; otherwise the first copy in slice-name order wins (kube-proxy's map order).
fn gather<'a>(
    service: &Service,
    port: &ServicePort,
    slices: &[&'a EndpointSlice],
    node: NodeContext<'_>,
) -> Vec<Candidate<'a>> {
    let mut by_address: BTreeMap<(IpAddr, u16), &'a Endpoint> = BTreeMap::new();
    for slice in slices {
        let target_ports = slice
            .ports
            .iter()
            .filter(|p| p.name == port.name && p.protocol == port.protocol && p.port != 0);
        for target in target_ports {
            let served = slice.endpoints.iter().filter(|endpoint| {
                let v4 = endpoint.address.is_ipv4();
                service.cluster_ips.iter().any(|ip| ip.is_ipv4() == v4)
            });
            for endpoint in served {
                match by_address.entry((endpoint.address, target.port)) {
                    Entry::Vacant(entry) => {
                        entry.insert(endpoint);
                    }
                    Entry::Occupied(mut entry) => {
                        if entry.get().terminating && !endpoint.terminating {
                            entry.insert(endpoint);
                        }
                    }
                }
            }
        }
    }
    by_address
        .into_iter()
        .map(|((ip, port), endpoint)| Candidate {
            ip,
            port,
            endpoint,
            local: node.hosts(endpoint),
        })
        .collect()
}

/// kube-proxy's `CategorizeEndpoints` for one service port, once per IP family.
fn categorize(
    service: &Service,
    port: &ServicePort,
    external_local: bool,
    candidates: &[Candidate<'_>],
    node: NodeContext<'_>,
) -> PortState {
    let mut state = PortState {
        name: port.name.clone(),
        protocol: port.protocol,
        port: port.port,
        node_port: port.node_port,
        cluster_endpoints: Vec::new(),
        local_endpoints: Vec::new(),
        usable_ipv4: false,
        usable_ipv6: false,
    };
    // Candidates are sorted by IP, and every IPv4 address sorts before every IPv6 one.
    let (v4, v6) = candidates.split_at(candidates.partition_point(|c| c.ip.is_ipv4()));
    for (ipv4, family) in [(true, v4), (false, v6)] {
        let same_family = |ip: &IpAddr| ip.is_ipv4() == ipv4;
        // kube-proxy's per-family `ServicePort.ExternallyAccessible`.
        let externally_accessible = port.node_port.is_some()
            || service.external_ips.iter().any(same_family)
            || service.load_balancer_ips.iter().any(same_family);
        let internal_local = service.internal_traffic_policy == TrafficPolicy::Local;
        if !internal_local || externally_accessible {
            state.cluster_endpoints.extend(cluster_set(family, node));
        }
        if internal_local || (external_local && externally_accessible) {
            state.local_endpoints.extend(local_set(family));
        }
        let usable = family.iter().any(|c| c.ready() || c.serving_terminating());
        if ipv4 {
            state.usable_ipv4 = usable;
        } else {
            state.usable_ipv6 = usable;
        }
    }
    state
}

/// Ready endpoints that topology allows; with none ready anywhere, every
/// serving-and-terminating endpoint.
fn cluster_set(candidates: &[Candidate<'_>], node: NodeContext<'_>) -> Vec<EndpointState> {
    let topology = Topology::from_hints(candidates, node);
    let ready: Vec<_> = candidates
        .iter()
        .filter(|c| c.ready() && topology.allows(c.endpoint, node))
        .map(Candidate::state)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    // Topology already fell back to "all" when no ready endpoint suits this node, so an
    // empty set here means nothing is ready anywhere.
    candidates
        .iter()
        .filter(|c| c.serving_terminating())
        .map(Candidate::state)
        .collect()
}

/// This node's ready endpoints, else this node's serving-and-terminating ones.
fn local_set(candidates: &[Candidate<'_>]) -> Vec<EndpointState> {
    let local = || candidates.iter().filter(|c| c.local);
    let use_ready = local().any(Candidate::ready);
    local()
        .filter(|c| {
            if use_ready {
                c.ready()
            } else {
                c.serving_terminating()
            }
        })
        .map(Candidate::state)
        .collect()
}

/// kube-proxy's topology modes (`topologyModeFromHints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// No hints apply: every ready endpoint.
    All,
    /// Only endpoints hinted for this node.
    SameNode,
    /// Only endpoints hinted for this node's zone.
    SameZone,
}

impl Topology {
    /// Node hints when every ready endpoint has one and one names this node; else zone
    /// hints under the same rule; else none. Endpoints that are not ready do not count.
    fn from_hints(candidates: &[Candidate<'_>], node: NodeContext<'_>) -> Self {
        let zone = node.zone_label();
        let mut any_ready = false;
        let (mut all_node_hinted, mut names_node) = (true, false);
        let (mut all_zone_hinted, mut names_zone) = (true, false);
        for endpoint in candidates.iter().filter(|c| c.ready()).map(|c| c.endpoint) {
            any_ready = true;
            if endpoint.node_hints.is_empty() {
                all_node_hinted = false;
            } else if endpoint.node_hints.iter().any(|h| h == node.name) {
                names_node = true;
            }
            if endpoint.zone_hints.is_empty() {
                all_zone_hinted = false;
            } else if endpoint.zone_hints.iter().any(|h| h == zone) {
                names_zone = true;
            }
        }
        if !any_ready {
            Self::All
        } else if all_node_hinted && names_node {
            Self::SameNode
        } else if all_zone_hinted && names_zone {
            Self::SameZone
        } else {
            Self::All
        }
    }

    fn allows(self, endpoint: &Endpoint, node: NodeContext<'_>) -> bool {
        match self {
            Self::All => true,
            Self::SameNode => endpoint.node_hints.iter().any(|h| h == node.name),
            Self::SameZone => endpoint.zone_hints.iter().any(|h| h == node.zone_label()),
        }
    }
}

#[cfg(test)]
mod tests;
