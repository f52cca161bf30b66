//! The cluster as the controller sees it: validated Services, EndpointSlices and Nodes,
//! free of Kubernetes API types, and the snapshot that the per-node computation reads.
//!
//! Sources turn API objects into these types (see `convert`); anything that reaches
//! here has already been validated, so the computation never fails.

use std::{net::IpAddr, sync::Arc, time::SystemTime};

use ipnet::IpNet;
pub use switchyard_proto::state::{
    DataplaneKind, IpvsScheduler, LbAlgorithm, Protocol, ServiceKey, TrafficPolicy,
};

/// Label naming the proxy that should handle a Service (`service.kubernetes.io/service-proxy-name`).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label on an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Node label holding the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Service annotation: the IPVS scheduler for this Service (overrides the IPVS agent's
/// `--ipvs-scheduler`).
pub const IPVS_SCHEDULER_ANNOTATION: &str = "switchyard.io/ipvs-scheduler";
/// Service annotation: `random` or `maglev` backend choice in the eBPF dataplane
/// (overrides the eBPF agent's `--lb-algorithm`).
pub const EBPF_LB_ANNOTATION: &str = "switchyard.io/ebpf-lb";
/// Node label: the dataplane the node's agent should program with (`iptables`, `ipvs`,
/// `ebpf`), followed by agents started with `--dataplane auto`.
pub const DATAPLANE_LABEL: &str = "switchyard.io/dataplane";
/// EndpointSlice annotation: when the change that produced this slice happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    pub service_type: ServiceType,
    /// `clusterIP: None`.
    pub headless: bool,
    /// `spec.clusterIPs`, both families, primary first; empty when headless or ExternalName.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    pub ports: Vec<ServicePort>,
    /// ClientIP affinity timeout in seconds; `None` without ClientIP affinity.
    pub session_affinity_timeout: Option<u32>,
    /// Already `Cluster` unless the Service is reachable from outside (node ports,
    /// load-balancer or external IPs), as kube-proxy's `ExternalPolicyLocal` reads it.
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// `None` also for a LoadBalancer with eTP Local when no API server allocated one
    /// (manifests may leave it out).
    pub health_check_node_port: Option<u16>,
    /// The `service.kubernetes.io/service-proxy-name` label, if any.
    pub proxy_name: Option<String>,
    /// From the `switchyard.io/ipvs-scheduler` annotation; `None` when absent or invalid.
    pub ipvs_scheduler: Option<IpvsScheduler>,
    /// From the `switchyard.io/ebpf-lb` annotation; `None` when absent or invalid.
    pub ebpf_lb: Option<LbAlgorithm>,
    /// Annotations that were ignored, each with why: the Service is used with the
    /// agents' defaults there, and the query API lists these as problems.
    pub annotation_problems: Vec<String>,
}

impl Service {
    /// A ClusterIP Service with every other field at its API default (Cluster traffic
    /// policies, no affinity, no external addresses): the start of tests and generated
    /// clusters.
    pub fn cluster_ip(key: ServiceKey, cluster_ip: IpAddr, ports: Vec<ServicePort>) -> Self {
        Self {
            key,
            service_type: ServiceType::ClusterIp,
            headless: false,
            cluster_ips: vec![cluster_ip],
            external_ips: vec![],
            load_balancer_ips: vec![],
            load_balancer_source_ranges: vec![],
            ports,
            session_affinity_timeout: None,
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            proxy_name: None,
            ipvs_scheduler: None,
            ebpf_lb: None,
            annotation_problems: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// May be empty only when the Service has a single port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

impl ServicePort {
    /// A TCP port without a node port.
    pub fn tcp(name: &str, port: u16) -> Self {
        Self {
            name: name.into(),
            protocol: Protocol::Tcp,
            port,
            node_port: None,
        }
    }
}

/// The name of an EndpointSlice: `namespace/name`.
pub type SliceKey = ServiceKey;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddressFamily {
    V4,
    V6,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: SliceKey,
    /// From the `kubernetes.io/service-name` label.
    pub service: ServiceKey,
    /// FQDN slices are not representable: sources skip them.
    pub address_family: AddressFamily,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
    /// From the `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub trigger_time: Option<SystemTime>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPort {
    /// Matches a ServicePort's name ("" for an unnamed port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Only the first address is used, as kube-proxy does.
    pub address: IpAddr,
    /// `conditions.ready`, nil read as true.
    pub ready: bool,
    /// `conditions.serving`, nil read as `ready`.
    pub serving: bool,
    /// `conditions.terminating`, nil read as false.
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones[].name`; empty when there is no hint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`; empty when there is no hint.
    pub node_hints: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// Whether the Node is being deleted: a deletion timestamp, or the cluster
    /// autoscaler's `ToBeDeletedByClusterAutoscaler` taint (as kube-proxy reads it).
    pub deleting: bool,
    pub addresses: Vec<IpAddr>,
    /// From the `switchyard.io/dataplane` label; `None` when absent or invalid.
    pub dataplane: Option<DataplaneKind>,
    /// Labels that were ignored, each with why (the query API lists them as problems).
    pub label_problems: Vec<String>,
}

/// Any object a source can hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

/// Identifies an object across kinds: `(kind, namespace, name)`; nodes have an empty namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        };
        if self.namespace.is_empty() {
            write!(f, "{kind} {}", self.name)
        } else {
            write!(f, "{kind} {}/{}", self.namespace, self.name)
        }
    }
}

impl Object {
    pub fn object_ref(&self) -> ObjectRef {
        let (kind, namespace, name) = match self {
            Object::Service(s) => (ObjectKind::Service, &s.key.namespace[..], &s.key.name[..]),
            Object::EndpointSlice(s) => (
                ObjectKind::EndpointSlice,
                &s.key.namespace[..],
                &s.key.name[..],
            ),
            Object::Node(n) => (ObjectKind::Node, "", &n.name[..]),
        };
        ObjectRef {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// An immutable view of the whole cluster, shared cheaply between tasks. Persistent
/// maps: each generation is a copy of the last at O(1), changed at O(log n) per object.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub services: imbl::OrdMap<ServiceKey, Arc<Service>>,
    /// EndpointSlices grouped by the Service they belong to, then by slice name.
    pub slices: imbl::OrdMap<ServiceKey, imbl::OrdMap<SliceKey, Arc<EndpointSlice>>>,
    pub nodes: imbl::OrdMap<String, Arc<Node>>,
}
