//! Per-node computation: which VIPs, ports and endpoints one node must program for one
//! Service, with kube-proxy's endpoint selection. Pure; no I/O.

use switchyard_proto::state::{NodeState, ServiceState};

use crate::model::{ClusterSnapshot, EndpointSlice, Service};

/// Which Services this controller handles, by their `service-proxy-name` label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ProxyNameFilter {
    /// Unlabelled Services and those labelled `switchyard`: switchyard replaces kube-proxy.
    #[default]
    Default,
    /// Only Services labelled with this name: switchyard runs beside kube-proxy.
    Only(String),
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
pub fn compute_service<'a>(
    service: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
    node: NodeContext<'_>,
    options: &ComputeOptions,
) -> Option<ServiceState> {
    let _ = (service, slices, node, options);
    todo!("compute_service")
}

/// The key under which `node`'s state for this Service can be shared with other nodes.
pub fn variant_key<'a>(
    service: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice> + Clone,
    node: NodeContext<'_>,
) -> VariantKey {
    let _ = (service, slices, node);
    todo!("variant_key")
}

/// Everything one node must program.
pub fn compute_node(
    snapshot: &ClusterSnapshot,
    node_name: &str,
    options: &ComputeOptions,
) -> NodeState {
    let _ = (snapshot, node_name, options);
    todo!("compute_node")
}
