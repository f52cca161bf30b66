//! Turns Kubernetes API objects into the validated [`crate::model`] types, with an error
//! naming the field for anything kube-proxy would not accept. Pure; no I/O.
//!
//! Entry points: [`service`], [`endpoint_slice`], [`node`]. Validation follows the API
//! server's rules for the fields a proxy reads, so an object from a manifest that a real
//! cluster would refuse is refused here too, with the same field path. Nothing here
//! applies defaults that belong to the API server's admission (e.g. the `default`
//! namespace): callers that read raw manifests apply those first.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use switchyard_proto::names::{self, quote_bounded};

use crate::model::{
    AddressFamily, DATAPLANE_LABEL, DataplaneKind, EBPF_LB_ANNOTATION, Endpoint, EndpointPort,
    EndpointSlice, IPVS_SCHEDULER_ANNOTATION, IpvsScheduler, LbAlgorithm, Node, Protocol,
    SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, Service, ServiceKey, ServicePort, ServiceType,
    TRIGGER_TIME_ANNOTATION, TrafficPolicy, ZONE_LABEL,
};

/// Why an API object cannot be used. Never retryable: the same object fails the same
/// way until someone edits it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    /// A field holds a value the API (or kube-proxy) does not accept.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours), as the API server
/// fills it in.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// Largest accepted ClientIP affinity timeout (one day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConvertError {
    ConvertError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Converts a Service.
///
/// - `type` absent → ClusterIP; only the four API types are accepted.
/// - `headless` when `clusterIP` (or `clusterIPs[0]`) is `None`; `cluster_ips` come from
///   `spec.clusterIPs`, falling back to `spec.clusterIP`, and are empty for headless and
///   ExternalName Services.
/// - `externalTrafficPolicy` / `internalTrafficPolicy`: `Cluster` or `Local`, absent →
///   Cluster. The API never accepted the pre-1.7 annotation value `Global` in these
///   fields, so neither do we. As in kube-proxy, an external policy of Local only counts
///   for Services that have external addresses (NodePort, LoadBalancer, external IPs).
/// - Load-balancer IPs: `status.loadBalancer.ingress[].ip`, skipping hostname-only
///   entries and those with `ipMode: Proxy` (kube-proxy does not capture those).
/// - `sessionAffinity: ClientIP` without a timeout gets the API default of 10800 s.
/// - Names follow the API server: the namespace an RFC 1123 label, the name an RFC 1035
///   label, port names RFC 1123 labels, named target ports IANA service names (numbered
///   ones in 1..=65535). Every IP must be one the API server accepts for
///   a Service (no unspecified, loopback, link-local, multicast, broadcast or
///   IPv4-mapped address).
/// - The `switchyard.io/ipvs-scheduler` and `switchyard.io/ebpf-lb` annotations choose the
///   IPVS scheduler and the eBPF backend choice; an unknown value does not refuse the
///   Service: it keeps the agents' defaults and the value is listed in
///   `annotation_problems`.
pub fn service(object: &core::Service) -> Result<Service, ConvertError> {
    let key = namespaced_key(&object.metadata, names::dns1035_label)?;
    let default_spec = core::ServiceSpec::default();
    let spec = object.spec.as_ref().unwrap_or(&default_spec);

    let service_type = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            return Err(invalid(
                "spec.type",
                format!(
                    "{other:?} is not one of \"ClusterIP\", \"NodePort\", \"LoadBalancer\", \"ExternalName\""
                ),
            ));
        }
    };

    let (headless, cluster_ips) = cluster_ips(spec, service_type)?;

    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| parse_ip(&format!("spec.externalIPs[{i}]"), ip))
        .collect::<Result<Vec<_>, _>>()?;

    let load_balancer_ips = load_balancer_ips(object)?;

    let load_balancer_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, range)| {
            range.trim().parse::<IpNet>().map_err(|_| {
                invalid(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("{range:?} is not a CIDR"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let ports = service_ports(spec, service_type)?;
    let session_affinity_timeout = session_affinity(spec)?;

    let has_external_addresses = matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    ) || !external_ips.is_empty();
    let external_traffic_policy = match traffic_policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )? {
        TrafficPolicy::Local if has_external_addresses => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let internal_traffic_policy = traffic_policy(
        "spec.internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;

    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(port) => {
            let field = "spec.healthCheckNodePort";
            let port = parse_port(field, port)?;
            if service_type != ServiceType::LoadBalancer
                || external_traffic_policy != TrafficPolicy::Local
            {
                return Err(invalid(
                    field,
                    "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
                ));
            }
            Some(port)
        }
    };

    let proxy_name = object
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_PROXY_NAME_LABEL))
        .cloned();

    let mut annotation_problems = Vec::new();
    let ipvs_scheduler = annotation(
        &object.metadata,
        IPVS_SCHEDULER_ANNOTATION,
        "an IPVS scheduler",
        &IpvsScheduler::ALL.map(IpvsScheduler::name),
        "--ipvs-scheduler",
        &mut annotation_problems,
    );
    let ebpf_lb = annotation(
        &object.metadata,
        EBPF_LB_ANNOTATION,
        "an eBPF load-balancing algorithm",
        &LbAlgorithm::ALL.map(LbAlgorithm::name),
        "--lb-algorithm",
        &mut annotation_problems,
    );

    Ok(Service {
        key,
        service_type,
        headless,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        load_balancer_source_ranges,
        ports,
        session_affinity_timeout,
        external_traffic_policy,
        internal_traffic_policy,
        health_check_node_port,
        proxy_name,
        ipvs_scheduler,
        ebpf_lb,
        annotation_problems,
    })
}

/// Reads an annotation whose value must be one of `allowed` (which `T` parses). Absent:
/// `None`. Not allowed: `None`, and a problem saying that `flag`'s default applies.
fn annotation<T: std::str::FromStr>(
    metadata: &ObjectMeta,
    key: &str,
    what: &str,
    allowed: &[&str],
    flag: &str,
    problems: &mut Vec<String>,
) -> Option<T> {
    let value = metadata.annotations.as_ref()?.get(key)?;
    match value.parse() {
        Ok(parsed) => Some(parsed),
        Err(_) => {
            problems.push(format!(
                "metadata.annotations[{key:?}]: {} is not {what} (one of {}); the agent's {flag} applies",
                quote_bounded(value),
                allowed.join(", "),
            ));
            None
        }
    }
}

/// `(headless, cluster_ips)` from `spec.clusterIPs`, falling back to `spec.clusterIP`.
fn cluster_ips(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
) -> Result<(bool, Vec<IpAddr>), ConvertError> {
    if service_type == ServiceType::ExternalName {
        return Ok((false, Vec::new()));
    }
    let single = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty());
    let (field, values): (&str, Vec<&str>) = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => {
            if let Some(single) = single
                && single != ips[0]
            {
                return Err(invalid(
                    "spec.clusterIPs[0]",
                    format!("{:?} must equal spec.clusterIP {single:?}", ips[0]),
                ));
            }
            ("spec.clusterIPs", ips.iter().map(String::as_str).collect())
        }
        _ => ("spec.clusterIP", single.into_iter().collect()),
    };
    let indexed = |i: usize| {
        if field == "spec.clusterIP" {
            field.to_string()
        } else {
            format!("{field}[{i}]")
        }
    };
    if values.first() == Some(&"None") {
        if values.len() > 1 {
            return Err(invalid(
                indexed(1),
                "must be empty when the first entry is \"None\"",
            ));
        }
        return Ok((true, Vec::new()));
    }
    if values.len() > 2 {
        return Err(invalid(indexed(2), "at most two cluster IPs are allowed"));
    }
    let ips = values
        .iter()
        .enumerate()
        .map(|(i, ip)| parse_ip(&indexed(i), ip))
        .collect::<Result<Vec<_>, _>>()?;
    if let [a, b] = ips[..]
        && a.is_ipv4() == b.is_ipv4()
    {
        return Err(invalid(
            indexed(1),
            format!("{b} must be of the other IP family than {a}"),
        ));
    }
    Ok((false, ips))
}

fn load_balancer_ips(object: &core::Service) -> Result<Vec<IpAddr>, ConvertError> {
    let ingress = object
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let mut ips = Vec::new();
    for (i, entry) in ingress.into_iter().flatten().enumerate() {
        let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        let ip = parse_ip(&format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
        match entry.ip_mode.as_deref() {
            None | Some("VIP") => ips.push(ip),
            Some("Proxy") => {}
            Some(other) => {
                return Err(invalid(
                    format!("status.loadBalancer.ingress[{i}].ipMode"),
                    format!("{other:?} is not one of \"VIP\", \"Proxy\""),
                ));
            }
        }
    }
    Ok(ips)
}

fn service_ports(
    spec: &core::ServiceSpec,
    service_type: ServiceType,
) -> Result<Vec<ServicePort>, ConvertError> {
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    let mut node_ports = HashSet::new();
    let mut out = Vec::with_capacity(ports.len());
    for (i, port) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let name = port.name.clone().unwrap_or_default();
        if name.is_empty() && ports.len() > 1 {
            return Err(invalid(
                format!("{field}.name"),
                "must be set when a Service has several ports",
            ));
        }
        if !name.is_empty() {
            check_name(&format!("{field}.name"), &name, names::dns1123_label)?;
        }
        if !name.is_empty() && !names.insert(name.clone()) {
            return Err(invalid(
                format!("{field}.name"),
                format!("duplicate name {name:?}"),
            ));
        }
        let protocol = parse_protocol(&format!("{field}.protocol"), port.protocol.as_deref())?;
        let number = parse_port(&format!("{field}.port"), port.port)?;
        target_port(&format!("{field}.targetPort"), port.target_port.as_ref())?;
        if !numbers.insert((number, protocol)) {
            return Err(invalid(
                format!("{field}.port"),
                format!("duplicate port {number}/{protocol}"),
            ));
        }
        let node_port = match port.node_port {
            None | Some(0) => None,
            Some(node_port) => {
                let node_field = format!("{field}.nodePort");
                let node_port = parse_port(&node_field, node_port)?;
                if !matches!(
                    service_type,
                    ServiceType::NodePort | ServiceType::LoadBalancer
                ) {
                    return Err(invalid(
                        node_field,
                        "may only be set when type is NodePort or LoadBalancer",
                    ));
                }
                if !node_ports.insert((node_port, protocol)) {
                    return Err(invalid(
                        node_field,
                        format!("duplicate node port {node_port}/{protocol}"),
                    ));
                }
                Some(node_port)
            }
        };
        out.push(ServicePort {
            name,
            protocol,
            port: number,
            node_port,
        });
    }
    Ok(out)
}

/// Checks `spec.ports[].targetPort` as the API server does: a number in 1..=65535 or an
/// IANA service name (a container port's name). switchyard takes the port each endpoint
/// serves from its EndpointSlice, so the value itself is not used; a manifest with one
/// the API server would refuse is refused all the same. Absent: defaults to the port.
fn target_port(field: &str, value: Option<&IntOrString>) -> Result<(), ConvertError> {
    match value {
        None => Ok(()),
        Some(IntOrString::Int(number)) => parse_port(field, *number).map(|_| ()),
        Some(IntOrString::String(name)) => check_name(field, name, names::iana_svc_name),
    }
}

fn session_affinity(spec: &core::ServiceSpec) -> Result<Option<u32>, ConvertError> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT)),
                Some(t) if t > 0 && t as u32 <= MAX_AFFINITY_TIMEOUT => Ok(Some(t as u32)),
                Some(t) => Err(invalid(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is not in 1..={MAX_AFFINITY_TIMEOUT}"),
                )),
            }
        }
        Some(other) => Err(invalid(
            "spec.sessionAffinity",
            format!("{other:?} is not one of \"None\", \"ClientIP\""),
        )),
    }
}

fn traffic_policy(field: &str, value: Option<&str>) -> Result<TrafficPolicy, ConvertError> {
    match value {
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(invalid(
            field,
            format!("{other:?} is not one of \"Cluster\", \"Local\""),
        )),
    }
}

/// Converts an EndpointSlice. `Ok(None)` for slices a proxy ignores (FQDN address type).
///
/// - The Service comes from the `kubernetes.io/service-name` label; without it the slice
///   belongs to nothing and is an error.
/// - Each endpoint uses only its first address, which must be an IP of the slice's
///   family. Conditions: `ready` nil → true, `serving` nil → `ready`, `terminating`
///   nil → false.
/// - Ports without a number (allowed by the API for slices not derived from a Service)
///   cannot be programmed and are left out.
/// - `trigger_time` from the `endpoints.kubernetes.io/last-change-trigger-time`
///   annotation; an unparsable value is ignored, as kube-proxy does.
pub fn endpoint_slice(
    object: &discovery::EndpointSlice,
) -> Result<Option<EndpointSlice>, ConvertError> {
    let key = namespaced_key(&object.metadata, names::dns1123_subdomain)?;
    let address_family = match object.address_type.as_str() {
        "IPv4" => AddressFamily::V4,
        "IPv6" => AddressFamily::V6,
        "FQDN" => return Ok(None),
        other => {
            return Err(invalid(
                "addressType",
                format!("{other:?} is not one of \"IPv4\", \"IPv6\", \"FQDN\""),
            ));
        }
    };

    let service_name = object
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|name| !name.is_empty())
        .ok_or_else(|| {
            invalid(
                format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
                "must name the slice's Service",
            )
        })?;
    check_name(
        &format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
        service_name,
        names::dns1035_label,
    )?;
    let service = ServiceKey::new(key.namespace.clone(), service_name.clone());

    let mut names = HashSet::new();
    let mut ports = Vec::new();
    for (i, port) in object.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let name = port.name.clone().unwrap_or_default();
        if !name.is_empty() {
            check_name(&format!("{field}.name"), &name, names::dns1123_label)?;
        }
        if !names.insert(name.clone()) {
            return Err(invalid(
                format!("{field}.name"),
                format!("duplicate name {name:?}"),
            ));
        }
        let protocol = parse_protocol(&format!("{field}.protocol"), port.protocol.as_deref())?;
        let Some(number) = port.port else { continue };
        let number = parse_port(&format!("{field}.port"), number)?;
        ports.push(EndpointPort {
            name,
            protocol,
            port: number,
        });
    }

    let endpoints = object
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| convert_endpoint(i, endpoint, address_family))
        .collect::<Result<Vec<_>, _>>()?;

    let trigger_time = object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
        .and_then(|value| parse_rfc3339(value));

    Ok(Some(EndpointSlice {
        key,
        service,
        address_family,
        ports,
        endpoints,
        trigger_time,
    }))
}

fn convert_endpoint(
    index: usize,
    endpoint: &discovery::Endpoint,
    family: AddressFamily,
) -> Result<Endpoint, ConvertError> {
    let field = format!("endpoints[{index}].addresses");
    let first = endpoint
        .addresses
        .first()
        .ok_or_else(|| invalid(field.clone(), "must hold at least one address"))?;
    let field = format!("{field}[0]");
    let address = parse_ip(&field, first)?;
    let (matches, family_name) = match family {
        AddressFamily::V4 => (address.is_ipv4(), "IPv4"),
        AddressFamily::V6 => (address.is_ipv6(), "IPv6"),
    };
    if !matches {
        return Err(invalid(
            field,
            format!("{first:?} is not an {family_name} address"),
        ));
    }
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    let node_name = endpoint.node_name.clone().filter(|n| !n.is_empty());
    if let Some(node_name) = &node_name {
        check_name(
            &format!("endpoints[{index}].nodeName"),
            node_name,
            names::dns1123_subdomain,
        )?;
    }
    let hints = endpoint.hints.as_ref();
    Ok(Endpoint {
        address,
        ready,
        serving,
        terminating,
        node_name,
        zone: endpoint.zone.clone().filter(|z| !z.is_empty()),
        zone_hints: hints
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| z.name.clone())
            .collect(),
        node_hints: hints
            .and_then(|h| h.for_nodes.as_ref())
            .into_iter()
            .flatten()
            .map(|n| n.name.clone())
            .collect(),
    })
}

/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Converts a Node: its zone label, whether it is being deleted, and every
/// `status.addresses[].address` that is an IP (hostnames are left out), first
/// occurrence kept.
pub fn node(object: &core::Node) -> Result<Node, ConvertError> {
    let name = object
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("metadata.name", "must be set"))?;
    check_name("metadata.name", &name, names::dns1123_subdomain)?;
    let zone = object
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned();
    let mut seen = BTreeSet::new();
    let addresses = object
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .filter(|ip| seen.insert(*ip))
        .collect();
    let mut label_problems = Vec::new();
    let dataplane = object
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(DATAPLANE_LABEL))
        .and_then(|value| match value.parse::<DataplaneKind>() {
            Ok(kind) => Some(kind),
            Err(_) => {
                label_problems.push(format!(
                    "metadata.labels[{DATAPLANE_LABEL:?}]: {} is not a dataplane (one of iptables, ipvs, ebpf); agents on --dataplane auto use iptables",
                    quote_bounded(value)
                ));
                None
            }
        });
    Ok(Node {
        name,
        zone,
        deleting: object.metadata.deletion_timestamp.is_some()
            || object
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT)),
        addresses,
        dataplane,
        label_problems,
    })
}

/// The object's `namespace/name`, the name checked with `name_check` (the rule the API
/// server applies to that kind) and the namespace as an RFC 1123 label.
fn namespaced_key(
    metadata: &ObjectMeta,
    name_check: fn(&str) -> Result<(), &'static str>,
) -> Result<ServiceKey, ConvertError> {
    let name = metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("metadata.name", "must be set"))?;
    let namespace = metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("metadata.namespace", "must be set"))?;
    check_name("metadata.namespace", namespace, names::dns1123_label)?;
    check_name("metadata.name", name, name_check)?;
    Ok(ServiceKey::new(namespace, name))
}

fn check_name(
    field: &str,
    value: &str,
    check: fn(&str) -> Result<(), &'static str>,
) -> Result<(), ConvertError> {
    check(value).map_err(|reason| invalid(field, format!("{} {reason}", quote_bounded(value))))
}

/// An IP the API server accepts for a Service or an endpoint.
fn parse_ip(field: &str, value: &str) -> Result<IpAddr, ConvertError> {
    let ip: IpAddr = value.parse().map_err(|_| {
        invalid(
            field,
            format!("{} is not an IP address", quote_bounded(value)),
        )
    })?;
    match special_ip(ip) {
        Some(reason) => Err(invalid(field, format!("{ip} {reason}"))),
        None => Ok(ip),
    }
}

/// Why no Service or endpoint may use `ip`, as the API server's `ValidateNonSpecialIP`
/// and its endpoint checks put it; `None` for a usable address.
pub fn special_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("may not be unspecified (0.0.0.0 or ::)"),
        _ if ip.is_loopback() => Some("may not be in the loopback range (127.0.0.0/8, ::1)"),
        _ if ip.is_multicast() => Some("may not be a multicast address"),
        IpAddr::V4(v4) if v4.is_link_local() => {
            Some("may not be in the link-local range (169.254.0.0/16)")
        }
        IpAddr::V4(v4) if v4.is_broadcast() => Some("may not be the broadcast address"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            Some("may not be in the link-local range (fe80::/10)")
        }
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("may not be an IPv4-mapped IPv6 address (::ffff:0:0/96)")
        }
        _ => None,
    }
}

fn parse_port(field: &str, value: i32) -> Result<u16, ConvertError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(field, format!("{value} is not a port in 1..=65535")))
}

fn parse_protocol(field: &str, value: Option<&str>) -> Result<Protocol, ConvertError> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(invalid(
            field,
            format!("{other:?} is not one of \"TCP\", \"UDP\", \"SCTP\""),
        )),
    }
}

fn parse_rfc3339(value: &str) -> Option<SystemTime> {
    let ts: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    let seconds = ts.as_second();
    let nanos = u32::try_from(ts.subsec_nanosecond()).ok()?;
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds as u64, nanos))
    } else {
        // `subsec_nanosecond` is negative (and rejected above) before 1970 unless zero.
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(seconds.unsigned_abs()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{
                ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, NodeAddress, NodeStatus,
                ServiceStatus, SessionAffinityConfig,
            },
            discovery::v1::{EndpointConditions, EndpointHints, ForNode, ForZone},
        },
        apimachinery::pkg::apis::meta::v1::Time,
    };

    use super::*;

    fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(Into::into),
            ..Default::default()
        }
    }

    fn port(name: &str, number: i32) -> core::ServicePort {
        core::ServicePort {
            name: (!name.is_empty()).then(|| name.into()),
            port: number,
            ..Default::default()
        }
    }

    /// A valid ClusterIP Service with one unnamed TCP port 80.
    fn svc() -> core::Service {
        core::Service {
            metadata: meta(Some("default"), "web"),
            spec: Some(core::ServiceSpec {
                cluster_ip: Some("10.96.0.10".into()),
                cluster_ips: Some(vec!["10.96.0.10".into()]),
                ports: Some(vec![port("", 80)]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn with_spec(f: impl FnOnce(&mut core::ServiceSpec)) -> core::Service {
        let mut s = svc();
        f(s.spec.as_mut().unwrap());
        s
    }

    fn err(field: &str, message: &str) -> ConvertError {
        invalid(field, message)
    }

    #[test]
    fn a_plain_cluster_ip_service_converts_with_defaults() {
        let s = service(&svc()).unwrap();
        assert_eq!(
            s,
            Service::cluster_ip(
                ServiceKey::new("default", "web"),
                "10.96.0.10".parse().unwrap(),
                vec![ServicePort::tcp("", 80)],
            )
        );
    }

    #[test]
    fn a_load_balancer_service_keeps_every_external_field() {
        let mut object = with_spec(|spec| {
            spec.type_ = Some("LoadBalancer".into());
            spec.cluster_ip = Some("10.96.0.20".into());
            spec.cluster_ips = Some(vec!["10.96.0.20".into(), "fd00:10:96::20".into()]);
            spec.external_ips = Some(vec!["192.0.2.7".into()]);
            spec.load_balancer_source_ranges =
                Some(vec!["203.0.113.0/24".into(), " 2001:db8::/32 ".into()]);
            spec.external_traffic_policy = Some("Local".into());
            spec.internal_traffic_policy = Some("Local".into());
            spec.health_check_node_port = Some(32000);
            spec.session_affinity = Some("ClientIP".into());
            spec.session_affinity_config = Some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(600),
                }),
            });
            let mut http = port("http", 80);
            http.node_port = Some(30080);
            let mut dns = port("dns", 53);
            dns.protocol = Some("UDP".into());
            let mut sctp = port("sig", 9000);
            sctp.protocol = Some("SCTP".into());
            spec.ports = Some(vec![http, dns, sctp]);
        });
        object.metadata.labels = Some(BTreeMap::from([(
            SERVICE_PROXY_NAME_LABEL.to_string(),
            "other".to_string(),
        )]));
        object.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![
                    LoadBalancerIngress {
                        ip: Some("198.51.100.1".into()),
                        ..Default::default()
                    },
                    LoadBalancerIngress {
                        hostname: Some("lb.example.com".into()),
                        ..Default::default()
                    },
                    LoadBalancerIngress {
                        ip: Some("198.51.100.2".into()),
                        ip_mode: Some("Proxy".into()),
                        ..Default::default()
                    },
                    LoadBalancerIngress {
                        ip: Some("198.51.100.3".into()),
                        ip_mode: Some("VIP".into()),
                        ..Default::default()
                    },
                ]),
            }),
            ..Default::default()
        });
        let s = service(&object).unwrap();
        assert_eq!(s.service_type, ServiceType::LoadBalancer);
        assert_eq!(
            s.cluster_ips,
            vec![
                "10.96.0.20".parse::<IpAddr>().unwrap(),
                "fd00:10:96::20".parse().unwrap()
            ]
        );
        assert_eq!(s.external_ips, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            s.load_balancer_ips,
            vec![
                "198.51.100.1".parse::<IpAddr>().unwrap(),
                "198.51.100.3".parse().unwrap()
            ]
        );
        assert_eq!(
            s.load_balancer_source_ranges,
            vec![
                "203.0.113.0/24".parse::<IpNet>().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ]
        );
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.health_check_node_port, Some(32000));
        assert_eq!(s.session_affinity_timeout, Some(600));
        assert_eq!(s.proxy_name.as_deref(), Some("other"));
        let summary: Vec<_> = s
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.protocol, p.port, p.node_port))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("http", Protocol::Tcp, 80, Some(30080)),
                ("dns", Protocol::Udp, 53, None),
                ("sig", Protocol::Sctp, 9000, None),
            ]
        );
    }

    #[test]
    fn service_field_defaults_and_normalisations_follow_the_api() {
        type Check = fn(&Service) -> bool;
        let cases: Vec<(&str, core::Service, Check)> = vec![
            (
                "clusterIP None makes a headless service without cluster IPs",
                with_spec(|s| {
                    s.cluster_ip = Some("None".into());
                    s.cluster_ips = Some(vec!["None".into()]);
                }),
                |s| s.headless && s.cluster_ips.is_empty(),
            ),
            (
                "clusterIP alone is used when clusterIPs is absent",
                with_spec(|s| {
                    s.cluster_ips = None;
                    s.cluster_ip = Some("10.96.1.1".into());
                }),
                |s| s.cluster_ips == ["10.96.1.1".parse::<IpAddr>().unwrap()],
            ),
            (
                "clusterIP None alone makes a headless service",
                with_spec(|s| {
                    s.cluster_ips = None;
                    s.cluster_ip = Some("None".into());
                }),
                |s| s.headless,
            ),
            (
                "no cluster IP at all gives an empty list",
                with_spec(|s| {
                    s.cluster_ips = None;
                    s.cluster_ip = None;
                }),
                |s| !s.headless && s.cluster_ips.is_empty(),
            ),
            (
                "an ExternalName service has no cluster IPs",
                with_spec(|s| {
                    s.type_ = Some("ExternalName".into());
                    s.external_name = Some("db.example.com".into());
                }),
                |s| s.service_type == ServiceType::ExternalName && s.cluster_ips.is_empty(),
            ),
            (
                "NodePort type is recognised",
                with_spec(|s| s.type_ = Some("NodePort".into())),
                |s| s.service_type == ServiceType::NodePort,
            ),
            (
                "ClientIP affinity without a timeout gets the API default",
                with_spec(|s| s.session_affinity = Some("ClientIP".into())),
                |s| s.session_affinity_timeout == Some(DEFAULT_AFFINITY_TIMEOUT),
            ),
            (
                "affinity None means no affinity",
                with_spec(|s| s.session_affinity = Some("None".into())),
                |s| s.session_affinity_timeout.is_none(),
            ),
            (
                "the largest affinity timeout is accepted",
                with_spec(|s| {
                    s.session_affinity = Some("ClientIP".into());
                    s.session_affinity_config = Some(SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(86_400),
                        }),
                    });
                }),
                |s| s.session_affinity_timeout == Some(86_400),
            ),
            (
                "external policy Local on a ClusterIP service without external IPs counts as Cluster",
                with_spec(|s| s.external_traffic_policy = Some("Local".into())),
                |s| s.external_traffic_policy == TrafficPolicy::Cluster,
            ),
            (
                "external policy Local counts on a ClusterIP service with external IPs",
                with_spec(|s| {
                    s.external_traffic_policy = Some("Local".into());
                    s.external_ips = Some(vec!["192.0.2.1".into()]);
                }),
                |s| s.external_traffic_policy == TrafficPolicy::Local,
            ),
            (
                "explicit Cluster policies are accepted",
                with_spec(|s| {
                    s.external_traffic_policy = Some("Cluster".into());
                    s.internal_traffic_policy = Some("Cluster".into());
                }),
                |s| {
                    s.external_traffic_policy == TrafficPolicy::Cluster
                        && s.internal_traffic_policy == TrafficPolicy::Cluster
                },
            ),
            (
                "a zero nodePort means none",
                with_spec(|s| {
                    s.ports = Some(vec![core::ServicePort {
                        node_port: Some(0),
                        ..port("", 80)
                    }])
                }),
                |s| s.ports[0].node_port.is_none(),
            ),
            (
                "a service without ports is accepted",
                with_spec(|s| s.ports = None),
                |s| s.ports.is_empty(),
            ),
            (
                "a service without spec is a ClusterIP service with nothing in it",
                core::Service {
                    metadata: meta(Some("default"), "empty"),
                    ..Default::default()
                },
                |s| s.service_type == ServiceType::ClusterIp && s.cluster_ips.is_empty(),
            ),
        ];
        for (name, object, check) in cases {
            let converted = service(&object).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(check(&converted), "{name}: {converted:?}");
        }
    }

    #[test]
    fn invalid_services_are_refused_with_the_field_named() {
        let two_ports = |a: core::ServicePort, b: core::ServicePort| {
            with_spec(move |s| s.ports = Some(vec![a, b]))
        };
        let cases: Vec<(&str, core::Service, ConvertError)> = vec![
            (
                "missing name",
                core::Service {
                    metadata: meta(Some("default"), ""),
                    ..svc()
                },
                err("metadata.name", "must be set"),
            ),
            (
                "missing namespace",
                core::Service {
                    metadata: meta(None, "web"),
                    ..svc()
                },
                err("metadata.namespace", "must be set"),
            ),
            (
                "unknown type",
                with_spec(|s| s.type_ = Some("Magic".into())),
                err(
                    "spec.type",
                    r#""Magic" is not one of "ClusterIP", "NodePort", "LoadBalancer", "ExternalName""#,
                ),
            ),
            (
                "second cluster IP not an IP",
                with_spec(|s| s.cluster_ips = Some(vec!["10.96.0.10".into(), "10.0.0.300".into()])),
                err("spec.clusterIPs[1]", r#""10.0.0.300" is not an IP address"#),
            ),
            (
                "clusterIP not an IP",
                with_spec(|s| {
                    s.cluster_ips = None;
                    s.cluster_ip = Some("ten".into());
                }),
                err("spec.clusterIP", r#""ten" is not an IP address"#),
            ),
            (
                "clusterIPs disagreeing with clusterIP",
                with_spec(|s| s.cluster_ip = Some("10.96.0.11".into())),
                err(
                    "spec.clusterIPs[0]",
                    r#""10.96.0.10" must equal spec.clusterIP "10.96.0.11""#,
                ),
            ),
            (
                "two cluster IPs of one family",
                with_spec(|s| s.cluster_ips = Some(vec!["10.96.0.10".into(), "10.96.0.11".into()])),
                err(
                    "spec.clusterIPs[1]",
                    "10.96.0.11 must be of the other IP family than 10.96.0.10",
                ),
            ),
            (
                "three cluster IPs",
                with_spec(|s| {
                    s.cluster_ips = Some(vec![
                        "10.96.0.10".into(),
                        "fd00::1".into(),
                        "10.96.0.12".into(),
                    ])
                }),
                err("spec.clusterIPs[2]", "at most two cluster IPs are allowed"),
            ),
            (
                "None followed by an IP",
                with_spec(|s| {
                    s.cluster_ip = Some("None".into());
                    s.cluster_ips = Some(vec!["None".into(), "fd00::1".into()]);
                }),
                err(
                    "spec.clusterIPs[1]",
                    r#"must be empty when the first entry is "None""#,
                ),
            ),
            (
                "external IP not an IP",
                with_spec(|s| s.external_ips = Some(vec!["1.2.3.4".into(), "example.com".into()])),
                err(
                    "spec.externalIPs[1]",
                    r#""example.com" is not an IP address"#,
                ),
            ),
            (
                "source range not a CIDR",
                with_spec(|s| s.load_balancer_source_ranges = Some(vec!["10.0.0.1".into()])),
                err(
                    "spec.loadBalancerSourceRanges[0]",
                    r#""10.0.0.1" is not a CIDR"#,
                ),
            ),
            (
                "port zero",
                with_spec(|s| s.ports = Some(vec![port("", 0)])),
                err("spec.ports[0].port", "0 is not a port in 1..=65535"),
            ),
            (
                "port too large",
                with_spec(|s| s.ports = Some(vec![port("", 65_536)])),
                err("spec.ports[0].port", "65536 is not a port in 1..=65535"),
            ),
            (
                "negative port",
                with_spec(|s| s.ports = Some(vec![port("", -1)])),
                err("spec.ports[0].port", "-1 is not a port in 1..=65535"),
            ),
            (
                "unnamed port among several",
                two_ports(port("http", 80), port("", 443)),
                err(
                    "spec.ports[1].name",
                    "must be set when a Service has several ports",
                ),
            ),
            (
                "duplicate port name",
                two_ports(port("http", 80), port("http", 8080)),
                err("spec.ports[1].name", r#"duplicate name "http""#),
            ),
            (
                "duplicate port and protocol",
                two_ports(port("a", 80), port("b", 80)),
                err("spec.ports[1].port", "duplicate port 80/TCP"),
            ),
            (
                "invalid protocol",
                with_spec(|s| {
                    s.ports = Some(vec![core::ServicePort {
                        protocol: Some("ICMP".into()),
                        ..port("", 80)
                    }])
                }),
                err(
                    "spec.ports[0].protocol",
                    r#""ICMP" is not one of "TCP", "UDP", "SCTP""#,
                ),
            ),
            (
                "lower-case protocol",
                with_spec(|s| {
                    s.ports = Some(vec![core::ServicePort {
                        protocol: Some("tcp".into()),
                        ..port("", 80)
                    }])
                }),
                err(
                    "spec.ports[0].protocol",
                    r#""tcp" is not one of "TCP", "UDP", "SCTP""#,
                ),
            ),
            (
                "node port out of range",
                with_spec(|s| {
                    s.type_ = Some("NodePort".into());
                    s.ports = Some(vec![core::ServicePort {
                        node_port: Some(70_000),
                        ..port("", 80)
                    }])
                }),
                err("spec.ports[0].nodePort", "70000 is not a port in 1..=65535"),
            ),
            (
                "node port on a ClusterIP service",
                with_spec(|s| {
                    s.ports = Some(vec![core::ServicePort {
                        node_port: Some(30_000),
                        ..port("", 80)
                    }])
                }),
                err(
                    "spec.ports[0].nodePort",
                    "may only be set when type is NodePort or LoadBalancer",
                ),
            ),
            (
                "duplicate node port",
                with_spec(|s| {
                    s.type_ = Some("NodePort".into());
                    s.ports = Some(vec![
                        core::ServicePort {
                            node_port: Some(30_000),
                            ..port("a", 80)
                        },
                        core::ServicePort {
                            node_port: Some(30_000),
                            ..port("b", 81)
                        },
                    ])
                }),
                err("spec.ports[1].nodePort", "duplicate node port 30000/TCP"),
            ),
            (
                "unknown session affinity",
                with_spec(|s| s.session_affinity = Some("Cookie".into())),
                err(
                    "spec.sessionAffinity",
                    r#""Cookie" is not one of "None", "ClientIP""#,
                ),
            ),
            (
                "zero affinity timeout",
                with_spec(|s| {
                    s.session_affinity = Some("ClientIP".into());
                    s.session_affinity_config = Some(SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(0),
                        }),
                    });
                }),
                err(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    "0 is not in 1..=86400",
                ),
            ),
            (
                "affinity timeout over a day",
                with_spec(|s| {
                    s.session_affinity = Some("ClientIP".into());
                    s.session_affinity_config = Some(SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(86_401),
                        }),
                    });
                }),
                err(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    "86401 is not in 1..=86400",
                ),
            ),
            (
                "legacy Global external policy",
                with_spec(|s| s.external_traffic_policy = Some("Global".into())),
                err(
                    "spec.externalTrafficPolicy",
                    r#""Global" is not one of "Cluster", "Local""#,
                ),
            ),
            (
                "unknown internal policy",
                with_spec(|s| s.internal_traffic_policy = Some("Nearby".into())),
                err(
                    "spec.internalTrafficPolicy",
                    r#""Nearby" is not one of "Cluster", "Local""#,
                ),
            ),
            (
                "health check node port out of range",
                with_spec(|s| {
                    s.type_ = Some("LoadBalancer".into());
                    s.external_traffic_policy = Some("Local".into());
                    s.health_check_node_port = Some(-5);
                }),
                err("spec.healthCheckNodePort", "-5 is not a port in 1..=65535"),
            ),
            (
                "health check node port without external policy Local",
                with_spec(|s| {
                    s.type_ = Some("LoadBalancer".into());
                    s.health_check_node_port = Some(32_000);
                }),
                err(
                    "spec.healthCheckNodePort",
                    "may only be set when type is LoadBalancer and externalTrafficPolicy is Local",
                ),
            ),
            (
                "load balancer ingress IP not an IP",
                core::Service {
                    status: Some(ServiceStatus {
                        load_balancer: Some(LoadBalancerStatus {
                            ingress: Some(vec![LoadBalancerIngress {
                                ip: Some("lb".into()),
                                ..Default::default()
                            }]),
                        }),
                        ..Default::default()
                    }),
                    ..svc()
                },
                err(
                    "status.loadBalancer.ingress[0].ip",
                    r#""lb" is not an IP address"#,
                ),
            ),
            (
                "unknown load balancer ipMode",
                core::Service {
                    status: Some(ServiceStatus {
                        load_balancer: Some(LoadBalancerStatus {
                            ingress: Some(vec![LoadBalancerIngress {
                                ip: Some("198.51.100.1".into()),
                                ip_mode: Some("Tunnel".into()),
                                ..Default::default()
                            }]),
                        }),
                        ..Default::default()
                    }),
                    ..svc()
                },
                err(
                    "status.loadBalancer.ingress[0].ipMode",
                    r#""Tunnel" is not one of "VIP", "Proxy""#,
                ),
            ),
        ];
        for (name, object, expected) in cases {
            assert_eq!(service(&object), Err(expected), "{name}");
        }
    }

    #[test]
    fn names_that_break_the_api_servers_rules_are_refused_with_the_field_named() {
        let injected = "web\" -j ACCEPT\n-A SWY-SERVICES";
        let with_meta = |namespace: &str, name: &str| core::Service {
            metadata: meta(Some(namespace), name),
            ..svc()
        };
        let cases: Vec<(&str, core::Service, &str)> = vec![
            (
                "quote and newline in the name",
                with_meta("default", injected),
                "metadata.name",
            ),
            (
                "upper case name",
                with_meta("default", "Web"),
                "metadata.name",
            ),
            (
                "name starting with a digit (RFC 1035)",
                with_meta("default", "1web"),
                "metadata.name",
            ),
            (
                "64-character name",
                with_meta("default", &"a".repeat(64)),
                "metadata.name",
            ),
            (
                "dot in the namespace",
                with_meta("kube.system", "web"),
                "metadata.namespace",
            ),
            (
                "port name with a quote",
                with_spec(|s| s.ports = Some(vec![port("http\"", 80)])),
                "spec.ports[0].name",
            ),
            (
                "target port name with a quote and a newline",
                with_spec(|s| {
                    let mut p = port("http", 80);
                    p.target_port = Some(IntOrString::String("web\"\n-A X".into()));
                    s.ports = Some(vec![p]);
                }),
                "spec.ports[0].targetPort",
            ),
            (
                "target port name longer than an IANA service name",
                with_spec(|s| {
                    let mut p = port("http", 80);
                    p.target_port = Some(IntOrString::String("a-very-long-port-name".into()));
                    s.ports = Some(vec![p]);
                }),
                "spec.ports[0].targetPort",
            ),
            (
                "target port 0",
                with_spec(|s| {
                    let mut p = port("http", 80);
                    p.target_port = Some(IntOrString::Int(0));
                    s.ports = Some(vec![p]);
                }),
                "spec.ports[0].targetPort",
            ),
            (
                "target port out of range",
                with_spec(|s| {
                    let mut p = port("http", 80);
                    p.target_port = Some(IntOrString::Int(65_536));
                    s.ports = Some(vec![p]);
                }),
                "spec.ports[0].targetPort",
            ),
        ];
        for (what, object, field) in cases {
            let error = service(&object).expect_err(what);
            let ConvertError::Invalid {
                field: got,
                message,
            } = &error;
            assert_eq!(got, field, "{what}: {error}");
            assert!(
                !message.contains('\n'),
                "{what}: the message holds no raw newline"
            );
        }

        let mut bad_slice = slice();
        bad_slice.metadata.name = Some("web_abc".into());
        let error = endpoint_slice(&bad_slice).unwrap_err();
        assert!(error.to_string().starts_with("metadata.name: "), "{error}");
        let mut bad_slice = slice();
        bad_slice.endpoints[0].node_name = Some("node a".into());
        let error = endpoint_slice(&bad_slice).unwrap_err();
        assert!(
            error.to_string().starts_with("endpoints[0].nodeName: "),
            "{error}"
        );
        let mut bad_slice = slice();
        bad_slice
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(SERVICE_NAME_LABEL.into(), "web\"x".into());
        let error = endpoint_slice(&bad_slice).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("metadata.labels[\"kubernetes.io/service-name\"]"),
            "{error}"
        );
        let mut bad_node = k8s_node();
        bad_node.metadata.name = Some("node\nforged log line".into());
        let error = node(&bad_node).unwrap_err().to_string();
        assert!(error.starts_with("metadata.name: "), "{error}");
        assert!(!error.contains('\n'), "{error}");
    }

    #[test]
    fn valid_target_ports_are_accepted_by_number_or_name() {
        for target in [
            IntOrString::Int(8080),
            IntOrString::Int(65_535),
            IntOrString::String("http-alt".into()),
        ] {
            let object = with_spec(|s| {
                let mut p = port("http", 80);
                p.target_port = Some(target.clone());
                s.ports = Some(vec![p]);
            });
            assert!(service(&object).is_ok(), "{target:?}");
        }
    }

    #[test]
    fn addresses_the_api_server_refuses_are_refused_with_the_field_named() {
        for ip in [
            "0.0.0.0",
            "::",
            "127.0.0.1",
            "::1",
            "224.0.0.1",
            "ff02::1",
            "169.254.169.254",
            "fe80::1",
            "255.255.255.255",
            "::ffff:10.0.0.1",
        ] {
            let cluster = with_spec(|s| {
                s.cluster_ip = Some(ip.into());
                s.cluster_ips = Some(vec![ip.into()]);
            });
            let error = service(&cluster).expect_err(ip);
            assert!(
                error.to_string().starts_with("spec.clusterIPs[0]: "),
                "{ip}: {error}"
            );
            let external = with_spec(|s| s.external_ips = Some(vec![ip.into()]));
            let error = service(&external).expect_err(ip);
            assert!(
                error.to_string().starts_with("spec.externalIPs[0]: "),
                "{ip}: {error}"
            );
        }
        let mut bad_slice = slice();
        bad_slice.endpoints[0].addresses = vec!["127.0.0.1".into()];
        let error = endpoint_slice(&bad_slice).unwrap_err().to_string();
        assert!(
            error.starts_with("endpoints[0].addresses[0]: 127.0.0.1 may not be in the loopback"),
            "{error}"
        );
    }

    #[test]
    fn dataplane_annotations_choose_per_service_and_unknown_values_keep_the_default() {
        let annotated = |pairs: &[(&str, &str)]| {
            let mut s = svc();
            s.metadata.annotations = Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            service(&s).unwrap()
        };
        let plain = service(&svc()).unwrap();
        assert_eq!((plain.ipvs_scheduler, plain.ebpf_lb), (None, None));
        assert!(plain.annotation_problems.is_empty());

        let chosen = annotated(&[
            (IPVS_SCHEDULER_ANNOTATION, "sh"),
            (EBPF_LB_ANNOTATION, "maglev"),
        ]);
        assert_eq!(chosen.ipvs_scheduler, Some(IpvsScheduler::Sh));
        assert_eq!(chosen.ebpf_lb, Some(LbAlgorithm::Maglev));
        assert!(chosen.annotation_problems.is_empty());

        let unknown = annotated(&[
            (IPVS_SCHEDULER_ANNOTATION, "fastest"),
            (EBPF_LB_ANNOTATION, "Maglev"),
        ]);
        assert_eq!((unknown.ipvs_scheduler, unknown.ebpf_lb), (None, None));
        assert_eq!(
            unknown.annotation_problems.len(),
            2,
            "{:?}",
            unknown.annotation_problems
        );
        assert!(
            unknown.annotation_problems[0].starts_with(
                "metadata.annotations[\"switchyard.io/ipvs-scheduler\"]: \"fastest\" is not an IPVS scheduler (one of rr, wrr,"
            ),
            "{}",
            unknown.annotation_problems[0]
        );
        assert!(unknown.annotation_problems[0].ends_with("the agent's --ipvs-scheduler applies"));
        assert!(unknown.annotation_problems[1].contains(
            "\"Maglev\" is not an eBPF load-balancing algorithm (one of random, maglev)"
        ));
    }

    #[test]
    fn convert_errors_display_as_field_then_message() {
        let e = service(&with_spec(|s| {
            s.cluster_ips = Some(vec!["10.96.0.10".into(), "10.0.0.300".into()])
        }))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"spec.clusterIPs[1]: "10.0.0.300" is not an IP address"#
        );
    }

    fn endpoint(address: &str) -> discovery::Endpoint {
        discovery::Endpoint {
            addresses: vec![address.into()],
            ..Default::default()
        }
    }

    fn conditions(
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Option<EndpointConditions> {
        Some(EndpointConditions {
            ready,
            serving,
            terminating,
        })
    }

    /// A valid IPv4 slice of Service `default/web` with one endpoint and port `http`.
    fn slice() -> discovery::EndpointSlice {
        let mut metadata = meta(Some("default"), "web-abc12");
        metadata.labels = Some(BTreeMap::from([(
            SERVICE_NAME_LABEL.to_string(),
            "web".to_string(),
        )]));
        discovery::EndpointSlice {
            metadata,
            address_type: "IPv4".into(),
            endpoints: vec![endpoint("10.244.1.5")],
            ports: Some(vec![discovery::EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        }
    }

    fn with_slice(f: impl FnOnce(&mut discovery::EndpointSlice)) -> discovery::EndpointSlice {
        let mut s = slice();
        f(&mut s);
        s
    }

    #[test]
    fn a_slice_converts_with_its_service_ports_hints_and_topology() {
        let object = with_slice(|s| {
            s.metadata.annotations = Some(BTreeMap::from([(
                TRIGGER_TIME_ANNOTATION.to_string(),
                "2024-05-01T10:00:00.5Z".to_string(),
            )]));
            s.endpoints = vec![discovery::Endpoint {
                addresses: vec!["10.244.1.5".into(), "10.244.1.6".into()],
                node_name: Some("node-a".into()),
                zone: Some("zone-1".into()),
                hints: Some(EndpointHints {
                    for_zones: Some(vec![ForZone {
                        name: "zone-1".into(),
                    }]),
                    for_nodes: Some(vec![ForNode {
                        name: "node-a".into(),
                    }]),
                }),
                ..Default::default()
            }];
            s.ports = Some(vec![
                discovery::EndpointPort {
                    name: Some("http".into()),
                    port: Some(8080),
                    ..Default::default()
                },
                discovery::EndpointPort {
                    name: Some("any".into()),
                    port: None,
                    ..Default::default()
                },
            ]);
        });
        let converted = endpoint_slice(&object).unwrap().unwrap();
        assert_eq!(
            converted,
            EndpointSlice {
                key: ServiceKey::new("default", "web-abc12"),
                service: ServiceKey::new("default", "web"),
                address_family: AddressFamily::V4,
                ports: vec![EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080,
                }],
                endpoints: vec![Endpoint {
                    address: "10.244.1.5".parse().unwrap(),
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some("node-a".into()),
                    zone: Some("zone-1".into()),
                    zone_hints: vec!["zone-1".into()],
                    node_hints: vec!["node-a".into()],
                }],
                trigger_time: Some(
                    SystemTime::UNIX_EPOCH + Duration::new(1_714_557_600, 500_000_000)
                ),
            }
        );
    }

    #[test]
    fn endpoint_conditions_read_nil_as_the_api_documents() {
        // (conditions, expected ready, serving, terminating)
        let cases = [
            (None, (true, true, false)),
            (conditions(None, None, None), (true, true, false)),
            (conditions(Some(false), None, None), (false, false, false)),
            (conditions(Some(true), None, None), (true, true, false)),
            (
                conditions(Some(false), Some(true), Some(true)),
                (false, true, true),
            ),
            (conditions(None, Some(false), None), (true, false, false)),
            (
                conditions(Some(false), Some(false), Some(true)),
                (false, false, true),
            ),
            (
                conditions(Some(true), Some(true), Some(false)),
                (true, true, false),
            ),
        ];
        for (given, (ready, serving, terminating)) in cases {
            let object = with_slice(|s| s.endpoints[0].conditions = given.clone());
            let e = &endpoint_slice(&object).unwrap().unwrap().endpoints[0];
            assert_eq!(
                (e.ready, e.serving, e.terminating),
                (ready, serving, terminating),
                "{given:?}"
            );
        }
    }

    #[test]
    fn an_fqdn_slice_is_skipped() {
        let object = with_slice(|s| {
            s.address_type = "FQDN".into();
            s.endpoints = vec![endpoint("db.example.com")];
        });
        assert_eq!(endpoint_slice(&object), Ok(None));
    }

    #[test]
    fn an_ipv6_slice_takes_ipv6_endpoints() {
        let object = with_slice(|s| {
            s.address_type = "IPv6".into();
            s.endpoints = vec![endpoint("fd00:10:244:1::5")];
        });
        let converted = endpoint_slice(&object).unwrap().unwrap();
        assert_eq!(converted.address_family, AddressFamily::V6);
        assert_eq!(
            converted.endpoints[0].address,
            "fd00:10:244:1::5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn an_unparsable_trigger_time_is_ignored() {
        let object = with_slice(|s| {
            s.metadata.annotations = Some(BTreeMap::from([(
                TRIGGER_TIME_ANNOTATION.to_string(),
                "yesterday".to_string(),
            )]));
        });
        assert_eq!(endpoint_slice(&object).unwrap().unwrap().trigger_time, None);
    }

    #[test]
    fn a_trigger_time_with_an_offset_is_read_as_utc() {
        let object = with_slice(|s| {
            s.metadata.annotations = Some(BTreeMap::from([(
                TRIGGER_TIME_ANNOTATION.to_string(),
                "2024-05-01T12:00:00+02:00".to_string(),
            )]));
        });
        assert_eq!(
            endpoint_slice(&object).unwrap().unwrap().trigger_time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_557_600))
        );
    }

    #[test]
    fn a_slice_without_ports_or_endpoints_is_valid() {
        let object = with_slice(|s| {
            s.ports = None;
            s.endpoints = vec![];
        });
        let converted = endpoint_slice(&object).unwrap().unwrap();
        assert!(converted.ports.is_empty() && converted.endpoints.is_empty());
    }

    #[test]
    fn an_unnamed_endpoint_port_defaults_to_tcp_and_empty_name() {
        let object = with_slice(|s| {
            s.ports = Some(vec![discovery::EndpointPort {
                port: Some(53),
                ..Default::default()
            }]);
        });
        assert_eq!(
            endpoint_slice(&object).unwrap().unwrap().ports,
            vec![EndpointPort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 53,
            }]
        );
    }

    #[test]
    fn invalid_slices_are_refused_with_the_field_named() {
        let cases: Vec<(&str, discovery::EndpointSlice, ConvertError)> = vec![
            (
                "missing name",
                with_slice(|s| s.metadata.name = None),
                err("metadata.name", "must be set"),
            ),
            (
                "missing namespace",
                with_slice(|s| s.metadata.namespace = None),
                err("metadata.namespace", "must be set"),
            ),
            (
                "missing service-name label",
                with_slice(|s| s.metadata.labels = None),
                err(
                    r#"metadata.labels["kubernetes.io/service-name"]"#,
                    "must name the slice's Service",
                ),
            ),
            (
                "empty service-name label",
                with_slice(|s| {
                    s.metadata.labels = Some(BTreeMap::from([(
                        SERVICE_NAME_LABEL.to_string(),
                        String::new(),
                    )]))
                }),
                err(
                    r#"metadata.labels["kubernetes.io/service-name"]"#,
                    "must name the slice's Service",
                ),
            ),
            (
                "unknown address type",
                with_slice(|s| s.address_type = "IPX".into()),
                err(
                    "addressType",
                    r#""IPX" is not one of "IPv4", "IPv6", "FQDN""#,
                ),
            ),
            (
                "endpoint address not an IP",
                with_slice(|s| s.endpoints.push(endpoint("pod-1"))),
                err(
                    "endpoints[1].addresses[0]",
                    r#""pod-1" is not an IP address"#,
                ),
            ),
            (
                "IPv6 address in an IPv4 slice",
                with_slice(|s| s.endpoints[0] = endpoint("fd00::5")),
                err(
                    "endpoints[0].addresses[0]",
                    r#""fd00::5" is not an IPv4 address"#,
                ),
            ),
            (
                "IPv4 address in an IPv6 slice",
                with_slice(|s| s.address_type = "IPv6".into()),
                err(
                    "endpoints[0].addresses[0]",
                    r#""10.244.1.5" is not an IPv6 address"#,
                ),
            ),
            (
                "endpoint without addresses",
                with_slice(|s| s.endpoints[0].addresses.clear()),
                err("endpoints[0].addresses", "must hold at least one address"),
            ),
            (
                "port zero",
                with_slice(|s| s.ports.as_mut().unwrap()[0].port = Some(0)),
                err("ports[0].port", "0 is not a port in 1..=65535"),
            ),
            (
                "port too large",
                with_slice(|s| s.ports.as_mut().unwrap()[0].port = Some(100_000)),
                err("ports[0].port", "100000 is not a port in 1..=65535"),
            ),
            (
                "invalid protocol",
                with_slice(|s| s.ports.as_mut().unwrap()[0].protocol = Some("QUIC".into())),
                err(
                    "ports[0].protocol",
                    r#""QUIC" is not one of "TCP", "UDP", "SCTP""#,
                ),
            ),
            (
                "duplicate port name",
                with_slice(|s| {
                    let p = s.ports.as_ref().unwrap()[0].clone();
                    s.ports.as_mut().unwrap().push(p);
                }),
                err("ports[1].name", r#"duplicate name "http""#),
            ),
        ];
        for (name, object, expected) in cases {
            assert_eq!(endpoint_slice(&object), Err(expected), "{name}");
        }
    }

    fn k8s_node() -> core::Node {
        core::Node {
            metadata: ObjectMeta {
                name: Some("node-a".into()),
                labels: Some(BTreeMap::from([(
                    ZONE_LABEL.to_string(),
                    "zone-1".to_string(),
                )])),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.168.0.10".into(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "node-a".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "fd00::10".into(),
                    },
                    NodeAddress {
                        type_: "ExternalIP".into(),
                        address: "192.168.0.10".into(),
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_node_keeps_its_zone_and_ip_addresses_only() {
        assert_eq!(
            node(&k8s_node()),
            Ok(Node {
                name: "node-a".into(),
                zone: Some("zone-1".into()),
                deleting: false,
                dataplane: None,
                label_problems: Vec::new(),
                addresses: vec!["192.168.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            })
        );
    }

    #[test]
    fn a_node_with_a_deletion_timestamp_is_deleting() {
        let mut object = k8s_node();
        object.metadata.deletion_timestamp = Some(Time("2024-05-01T10:00:00Z".parse().unwrap()));
        assert!(node(&object).unwrap().deleting);
    }

    #[test]
    fn a_node_the_cluster_autoscaler_tainted_for_deletion_is_deleting() {
        let taint = |key: &str| k8s_openapi::api::core::v1::Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let mut object = k8s_node();
        object.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![taint("node.kubernetes.io/unschedulable")]),
            ..Default::default()
        });
        assert!(!node(&object).unwrap().deleting, "other taints don't count");
        object.spec.as_mut().unwrap().taints = Some(vec![
            taint("node.kubernetes.io/unschedulable"),
            taint(TO_BE_DELETED_TAINT),
        ]);
        assert!(node(&object).unwrap().deleting);
    }

    #[test]
    fn a_node_without_labels_or_status_has_no_zone_and_no_addresses() {
        let object = core::Node {
            metadata: meta(None, "bare"),
            ..Default::default()
        };
        assert_eq!(
            node(&object),
            Ok(Node {
                name: "bare".into(),
                zone: None,
                deleting: false,
                dataplane: None,
                label_problems: Vec::new(),
                addresses: vec![],
            })
        );
    }

    #[test]
    fn the_dataplane_label_is_read_and_an_unknown_value_is_ignored_with_a_problem() {
        let labelled = |value: &str| {
            let mut object = k8s_node();
            object
                .metadata
                .labels
                .get_or_insert_default()
                .insert(DATAPLANE_LABEL.into(), value.into());
            node(&object).unwrap()
        };
        for kind in DataplaneKind::ALL {
            let n = labelled(kind.name());
            assert_eq!(n.dataplane, Some(kind));
            assert!(n.label_problems.is_empty());
        }
        let n = labelled("xdp");
        assert_eq!(n.dataplane, None);
        assert_eq!(n.label_problems.len(), 1);
        assert!(
            n.label_problems[0].starts_with(
                "metadata.labels[\"switchyard.io/dataplane\"]: \"xdp\" is not a dataplane"
            ),
            "{}",
            n.label_problems[0]
        );
        assert_eq!(node(&k8s_node()).unwrap().dataplane, None);
    }

    #[test]
    fn a_node_without_a_name_is_refused() {
        let mut object = k8s_node();
        object.metadata.name = None;
        assert_eq!(node(&object), Err(err("metadata.name", "must be set")));
    }
}
