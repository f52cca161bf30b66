//! Table of kube-proxy behaviours for `compute_service`, plus `compute_node` and the
//! soundness of `variant_key`.

use std::net::SocketAddr;

use switchyard_proto::state::{Protocol, ServiceKey};

use super::*;
use crate::model::{AddressFamily, EndpointPort, IpvsScheduler, LbAlgorithm, Node, ServicePort};

// ---------------------------------------------------------------------------------------
// Fixtures: a ClusterIP Service `default/web` with one unnamed TCP port 80, a node
// `node-a` in `zone-a`, and endpoints written as (ip, node) with "" for no node.

fn svc() -> Service {
    Service {
        key: ServiceKey::new("default", "web"),
        service_type: ServiceType::ClusterIp,
        headless: false,
        cluster_ips: vec![ip("10.96.0.10")],
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        ports: vec![port("", Protocol::Tcp, 80)],
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

fn svc_with(change: impl FnOnce(&mut Service)) -> Service {
    let mut service = svc();
    change(&mut service);
    service
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn port(name: &str, protocol: Protocol, port: u16) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol,
        port,
        node_port: None,
    }
}

fn node_port(name: &str, port: u16, node_port: u16) -> ServicePort {
    ServicePort {
        node_port: Some(node_port),
        ..self::port(name, Protocol::Tcp, port)
    }
}

fn tcp(name: &str, port: u16) -> EndpointPort {
    EndpointPort {
        name: name.into(),
        protocol: Protocol::Tcp,
        port,
    }
}

fn udp(name: &str, port: u16) -> EndpointPort {
    EndpointPort {
        protocol: Protocol::Udp,
        ..tcp(name, port)
    }
}

fn sctp(name: &str, port: u16) -> EndpointPort {
    EndpointPort {
        protocol: Protocol::Sctp,
        ..tcp(name, port)
    }
}

/// A slice of `default/web` named `name`.
fn slice(name: &str, ports: Vec<EndpointPort>, endpoints: Vec<Endpoint>) -> EndpointSlice {
    let address_family = match endpoints.first().map(|e| e.address) {
        Some(IpAddr::V6(_)) => AddressFamily::V6,
        _ => AddressFamily::V4,
    };
    EndpointSlice {
        key: ServiceKey::new("default", name),
        service: ServiceKey::new("default", "web"),
        address_family,
        ports,
        endpoints,
        trigger_time: None,
    }
}

/// The usual slice: unnamed TCP port 8080.
fn slice8080(endpoints: Vec<Endpoint>) -> EndpointSlice {
    slice("web-1", vec![tcp("", 8080)], endpoints)
}

fn ready(address: &str, node: &str) -> Endpoint {
    Endpoint {
        address: ip(address),
        ready: true,
        serving: true,
        terminating: false,
        node_name: (!node.is_empty()).then(|| node.into()),
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
    }
}

fn serving_terminating(address: &str, node: &str) -> Endpoint {
    Endpoint {
        ready: false,
        terminating: true,
        ..ready(address, node)
    }
}

fn terminating_not_serving(address: &str, node: &str) -> Endpoint {
    Endpoint {
        serving: false,
        ..serving_terminating(address, node)
    }
}

fn not_ready(address: &str, node: &str) -> Endpoint {
    Endpoint {
        ready: false,
        serving: false,
        ..ready(address, node)
    }
}

fn for_zones(endpoint: Endpoint, zones: &[&str]) -> Endpoint {
    Endpoint {
        zone_hints: zones.iter().map(|z| z.to_string()).collect(),
        ..endpoint
    }
}

fn for_nodes(endpoint: Endpoint, nodes: &[&str]) -> Endpoint {
    Endpoint {
        node_hints: nodes.iter().map(|n| n.to_string()).collect(),
        ..endpoint
    }
}

fn only(name: &str) -> ComputeOptions {
    ComputeOptions {
        proxy_names: ProxyNameFilter::Only(name.into()),
    }
}

/// `ip:port` of each endpoint, as expectations are written.
fn addrs(endpoints: &[EndpointState]) -> Vec<String> {
    endpoints
        .iter()
        .map(|e| SocketAddr::new(e.ip, e.port).to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// The table: each case is one Service, its slices, the node it is computed for and what
// must come out. Every case is its own `#[test]`, built with the fixtures above.

enum Expect {
    /// `compute_service` returns `None`.
    Skipped,
    /// The Service's only port holds these endpoints (`ip:port`) and whether any family has a usable endpoint.
    Endpoints {
        cluster: &'static [&'static str],
        local: &'static [&'static str],
        any: bool,
    },
    /// Anything else, checked by a function.
    State(fn(&ServiceState)),
}

struct Case {
    service: Service,
    slices: Vec<EndpointSlice>,
    node: &'static str,
    zone: Option<&'static str>,
    options: ComputeOptions,
    expect: Expect,
}

impl Case {
    fn new(service: Service, slices: Vec<EndpointSlice>) -> Self {
        Self {
            service,
            slices,
            node: "node-a",
            zone: Some("zone-a"),
            options: ComputeOptions::default(),
            expect: Expect::Skipped,
        }
    }

    fn on(mut self, node: &'static str, zone: Option<&'static str>) -> Self {
        (self.node, self.zone) = (node, zone);
        self
    }

    fn options(mut self, options: ComputeOptions) -> Self {
        self.options = options;
        self
    }

    fn skipped(self) -> Self {
        Self {
            expect: Expect::Skipped,
            ..self
        }
    }

    fn endpoints(
        self,
        cluster: &'static [&'static str],
        local: &'static [&'static str],
        any: bool,
    ) -> Self {
        Self {
            expect: Expect::Endpoints {
                cluster,
                local,
                any,
            },
            ..self
        }
    }

    fn state(self, check: fn(&ServiceState)) -> Self {
        Self {
            expect: Expect::State(check),
            ..self
        }
    }

    fn run(self) {
        let node = NodeContext {
            name: self.node,
            zone: self.zone,
        };
        let result = compute_service(&self.service, &self.slices, node, &self.options);
        // The result never depends on the order slices come in.
        let reversed =
            compute_service(&self.service, self.slices.iter().rev(), node, &self.options);
        assert_eq!(result, reversed, "slice order changed the result");
        match (self.expect, result) {
            (Expect::Skipped, result) => assert_eq!(result, None),
            (_, None) => panic!("service was skipped"),
            (
                Expect::Endpoints {
                    cluster,
                    local,
                    any,
                },
                Some(state),
            ) => {
                assert_eq!(state.ports.len(), 1, "expected a single-port service");
                let port = &state.ports[0];
                assert_eq!(addrs(&port.cluster_endpoints), cluster, "cluster endpoints");
                assert_eq!(addrs(&port.local_endpoints), local, "local endpoints");
                assert_eq!(port.has_usable_endpoints(), any, "has usable endpoints");
            }
            (Expect::State(check), Some(state)) => check(&state),
        }
    }
}

// --- Which Services are handled -------------------------------------------------
#[test]
fn headless_service_is_skipped() {
    Case::new(
        svc_with(|s| {
            s.headless = true;
            s.cluster_ips.clear();
        }),
        vec![slice8080(vec![ready("10.0.0.1", "")])],
    )
    .skipped()
    .run();
}

#[test]
fn external_name_service_is_skipped() {
    Case::new(
        svc_with(|s| s.service_type = ServiceType::ExternalName),
        vec![],
    )
    .skipped()
    .run();
}

#[test]
fn service_without_cluster_ip_is_skipped() {
    Case::new(svc_with(|s| s.cluster_ips.clear()), vec![])
        .skipped()
        .run();
}

#[test]
fn service_without_ports_is_skipped() {
    Case::new(svc_with(|s| s.ports.clear()), vec![])
        .skipped()
        .run();
}

#[test]
fn other_proxy_name_is_skipped() {
    Case::new(
        svc_with(|s| s.proxy_name = Some("kube-proxy-ng".into())),
        vec![],
    )
    .skipped()
    .run();
}

#[test]
fn unlabelled_service_is_handled_when_replacing_kube_proxy() {
    Case::new(svc(), vec![]).endpoints(&[], &[], false).run();
}

#[test]
fn service_labelled_switchyard_is_handled_when_replacing_kube_proxy() {
    Case::new(
        svc_with(|s| s.proxy_name = Some("switchyard".into())),
        vec![],
    )
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn beside_kube_proxy_only_labelled_services_are_handled() {
    Case::new(svc(), vec![])
        .options(only("switchyard"))
        .skipped()
        .run();
}

#[test]
fn beside_kube_proxy_services_labelled_with_our_name_are_handled() {
    Case::new(
        svc_with(|s| s.proxy_name = Some("sy-canary".into())),
        vec![],
    )
    .options(only("sy-canary"))
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn beside_kube_proxy_services_labelled_for_another_proxy_are_skipped() {
    Case::new(
        svc_with(|s| s.proxy_name = Some("switchyard".into())),
        vec![],
    )
    .options(only("sy-canary"))
    .skipped()
    .run();
}

// --- VIPs, ports and Service-wide settings are carried ---------------------------
#[test]
fn cluster_ip_v4_service_carries_its_vip_key_and_port() {
    Case::new(svc(), vec![slice8080(vec![ready("10.0.0.1", "node-b")])])
        .state(|s| {
            assert_eq!(s.key, ServiceKey::new("default", "web"));
            assert_eq!(s.cluster_ips, vec![ip("10.96.0.10")]);
            assert_eq!(
                (
                    s.ports[0].name.as_str(),
                    s.ports[0].protocol,
                    s.ports[0].port,
                    s.ports[0].node_port
                ),
                ("", Protocol::Tcp, 80, None)
            );
            assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
            assert_eq!(s.internal_traffic_policy, TrafficPolicy::Cluster);
        })
        .run();
}

#[test]
fn dual_stack_cluster_ips_are_carried_primary_first() {
    Case::new(
        svc_with(|s| s.cluster_ips = vec![ip("fd00::10"), ip("10.96.0.10")]),
        vec![],
    )
    .state(|s| assert_eq!(s.cluster_ips, vec![ip("fd00::10"), ip("10.96.0.10")]))
    .run();
}

#[test]
fn ipv6_single_stack_service_uses_its_v6_endpoints() {
    Case::new(
        svc_with(|s| s.cluster_ips = vec![ip("fd00::10")]),
        vec![slice8080(vec![
            ready("fd00:1::2", ""),
            ready("fd00:1::1", ""),
        ])],
    )
    .endpoints(&["[fd00:1::1]:8080", "[fd00:1::2]:8080"], &[], true)
    .run();
}

#[test]
fn node_ports_are_carried_per_port() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::NodePort;
            s.ports = vec![node_port("http", 80, 30080), node_port("https", 443, 30443)];
        }),
        vec![],
    )
    .state(|s| {
        let node_ports: Vec<_> = s.ports.iter().map(|p| p.node_port).collect();
        assert_eq!(node_ports, vec![Some(30080), Some(30443)]);
    })
    .run();
}

#[test]
fn load_balancer_ingress_ips_are_carried() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::LoadBalancer;
            s.load_balancer_ips = vec![ip("203.0.113.9"), ip("2001:db8::9")];
        }),
        vec![],
    )
    .state(|s| {
        assert_eq!(
            s.load_balancer_ips,
            vec![ip("203.0.113.9"), ip("2001:db8::9")]
        )
    })
    .run();
}

#[test]
fn external_ips_are_carried() {
    Case::new(svc_with(|s| s.external_ips = vec![ip("192.0.2.7")]), vec![])
        .state(|s| assert_eq!(s.external_ips, vec![ip("192.0.2.7")]))
        .run();
}

#[test]
fn load_balancer_source_ranges_are_carried() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::LoadBalancer;
            s.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().expect("cidr")];
        }),
        vec![],
    )
    .state(|s| {
        assert_eq!(
            s.load_balancer_source_ranges,
            vec!["198.51.100.0/24".parse::<ipnet::IpNet>().expect("cidr")]
        );
    })
    .run();
}

#[test]
fn session_affinity_timeout_is_carried() {
    Case::new(
        svc_with(|s| s.session_affinity_timeout = Some(10800)),
        vec![],
    )
    .state(|s| assert_eq!(s.session_affinity_timeout, Some(10800)))
    .run();
}

#[test]
fn service_without_affinity_has_no_timeout() {
    Case::new(svc(), vec![])
        .state(|s| assert_eq!(s.session_affinity_timeout, None))
        .run();
}

#[test]
fn health_check_node_port_is_carried_for_load_balancer_with_local_external_policy() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::LoadBalancer;
            s.ports = vec![node_port("", 80, 30080)];
            s.external_traffic_policy = TrafficPolicy::Local;
            s.health_check_node_port = Some(32000);
        }),
        vec![],
    )
    .state(|s| {
        assert_eq!(s.health_check_node_port, Some(32000));
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
    })
    .run();
}

#[test]
fn health_check_node_port_is_dropped_under_cluster_external_policy() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::LoadBalancer;
            s.health_check_node_port = Some(32000);
        }),
        vec![],
    )
    .state(|s| assert_eq!(s.health_check_node_port, None))
    .run();
}

#[test]
fn health_check_node_port_is_dropped_for_node_port_services() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::NodePort;
            s.external_traffic_policy = TrafficPolicy::Local;
            s.health_check_node_port = Some(32000);
        }),
        vec![],
    )
    .state(|s| {
        assert_eq!(s.health_check_node_port, None);
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
    })
    .run();
}

#[test]
fn per_service_dataplane_choices_are_carried_to_every_node() {
    Case::new(
        svc_with(|s| {
            s.ipvs_scheduler = Some(IpvsScheduler::Mh);
            s.ebpf_lb = Some(LbAlgorithm::Maglev);
        }),
        vec![],
    )
    .state(|s| {
        assert_eq!(s.ipvs_scheduler, Some(IpvsScheduler::Mh));
        assert_eq!(s.ebpf_lb, Some(LbAlgorithm::Maglev));
    })
    .run();
}

#[test]
fn external_traffic_policy_local_is_ignored_without_external_reachability() {
    Case::new(
        svc_with(|s| s.external_traffic_policy = TrafficPolicy::Local),
        vec![slice8080(vec![
            ready("10.0.0.1", "node-a"),
            ready("10.0.0.2", "node-b"),
        ])],
    )
    .state(|s| {
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(
            addrs(&s.ports[0].cluster_endpoints),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
        assert!(s.ports[0].local_endpoints.is_empty());
    })
    .run();
}

#[test]
fn ports_keep_the_service_order() {
    Case::new(
        svc_with(|s| s.ports = vec![port("z", Protocol::Tcp, 9), port("a", Protocol::Tcp, 1)]),
        vec![slice(
            "web-1",
            vec![tcp("a", 1001), tcp("z", 1009)],
            vec![ready("10.0.0.1", "")],
        )],
    )
    .state(|s| {
        let names: Vec<_> = s
            .ports
            .iter()
            .map(|p| (p.name.as_str(), addrs(&p.cluster_endpoints)))
            .collect();
        assert_eq!(
            names,
            vec![
                ("z", vec!["10.0.0.1:1009".to_string()]),
                ("a", vec!["10.0.0.1:1001".to_string()])
            ]
        );
    })
    .run();
}

#[test]
fn udp_and_sctp_ports_are_kept_with_their_protocol() {
    Case::new(
        svc_with(|s| {
            s.ports = vec![
                port("dns", Protocol::Udp, 53),
                port("sig", Protocol::Sctp, 3868),
            ]
        }),
        vec![slice(
            "web-1",
            vec![udp("dns", 5353), sctp("sig", 3869)],
            vec![ready("10.0.0.1", "")],
        )],
    )
    .state(|s| {
        let ports: Vec<_> = s
            .ports
            .iter()
            .map(|p| (p.protocol, p.port, addrs(&p.cluster_endpoints)))
            .collect();
        assert_eq!(
            ports,
            vec![
                (Protocol::Udp, 53, vec!["10.0.0.1:5353".to_string()]),
                (Protocol::Sctp, 3868, vec!["10.0.0.1:3869".to_string()]),
            ]
        );
    })
    .run();
}

// --- Which slice ports feed a service port -----------------------------------------
#[test]
fn named_target_port_resolves_per_slice() {
    Case::new(
        svc_with(|s| s.ports = vec![port("http", Protocol::Tcp, 80)]),
        vec![
            slice(
                "web-old",
                vec![tcp("http", 8080)],
                vec![ready("10.0.0.1", "")],
            ),
            slice(
                "web-new",
                vec![tcp("http", 9090)],
                vec![ready("10.0.0.2", "")],
            ),
        ],
    )
    .endpoints(&["10.0.0.1:8080", "10.0.0.2:9090"], &[], true)
    .run();
}

#[test]
fn slice_port_with_other_protocol_does_not_match() {
    Case::new(
        svc(),
        vec![slice(
            "web-1",
            vec![udp("", 8080)],
            vec![ready("10.0.0.1", "")],
        )],
    )
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn slice_port_with_other_name_does_not_match() {
    Case::new(
        svc_with(|s| s.ports = vec![port("http", Protocol::Tcp, 80)]),
        vec![slice(
            "web-1",
            vec![tcp("metrics", 9100)],
            vec![ready("10.0.0.1", "")],
        )],
    )
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn same_port_name_with_tcp_and_udp_feeds_each_protocol_separately() {
    Case::new(
        svc_with(|s| {
            s.ports = vec![
                port("dns", Protocol::Tcp, 53),
                port("dns", Protocol::Udp, 53),
            ]
        }),
        vec![slice(
            "web-1",
            vec![tcp("dns", 1053), udp("dns", 2053)],
            vec![ready("10.0.0.1", "")],
        )],
    )
    .state(|s| {
        assert_eq!(addrs(&s.ports[0].cluster_endpoints), ["10.0.0.1:1053"]);
        assert_eq!(addrs(&s.ports[1].cluster_endpoints), ["10.0.0.1:2053"]);
    })
    .run();
}

#[test]
fn endpoint_port_zero_is_ignored() {
    Case::new(
        svc(),
        vec![
            slice8080(vec![]),
            slice("web-2", vec![tcp("", 0)], vec![ready("10.0.0.1", "")]),
        ],
    )
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn slices_of_other_services_are_ignored() {
    Case::new(
        svc(),
        vec![EndpointSlice {
            service: ServiceKey::new("default", "other"),
            ..slice8080(vec![ready("10.0.0.1", "")])
        }],
    )
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn duplicate_endpoint_across_slices_counted_once() {
    Case::new(
        svc(),
        vec![
            slice(
                "web-1",
                vec![tcp("", 8080)],
                vec![ready("10.0.0.1", "node-b")],
            ),
            slice(
                "web-2",
                vec![tcp("", 8080)],
                vec![ready("10.0.0.1", "node-b"), ready("10.0.0.2", "node-b")],
            ),
        ],
    )
    .endpoints(&["10.0.0.1:8080", "10.0.0.2:8080"], &[], true)
    .run();
}

#[test]
fn duplicate_endpoint_prefers_the_non_terminating_copy() {
    Case::new(
        svc(),
        vec![
            slice(
                "web-1",
                vec![tcp("", 8080)],
                vec![serving_terminating("10.0.0.1", "node-b")],
            ),
            slice(
                "web-2",
                vec![tcp("", 8080)],
                vec![ready("10.0.0.1", "node-c")],
            ),
        ],
    )
    .state(|s| {
        let eps = &s.ports[0].cluster_endpoints;
        assert_eq!(addrs(eps), ["10.0.0.1:8080"]);
        assert!(eps[0].ready && !eps[0].terminating);
        assert_eq!(eps[0].node_name.as_deref(), Some("node-c"));
    })
    .run();
}

#[test]
fn duplicate_terminating_endpoints_keep_the_first_slice_by_name() {
    Case::new(
        svc(),
        vec![
            slice(
                "web-b",
                vec![tcp("", 8080)],
                vec![serving_terminating("10.0.0.1", "node-b")],
            ),
            slice(
                "web-a",
                vec![tcp("", 8080)],
                vec![terminating_not_serving("10.0.0.1", "node-c")],
            ),
        ],
    )
    .state(|s| {
        let port = &s.ports[0];
        assert!(port.cluster_endpoints.is_empty());
        assert!(
            !port.has_usable_endpoints(),
            "the copy from web-a is not serving"
        );
    })
    .run();
}

#[test]
fn same_ip_with_different_target_ports_is_two_endpoints() {
    Case::new(
        svc_with(|s| s.ports = vec![port("http", Protocol::Tcp, 80)]),
        vec![
            slice(
                "web-1",
                vec![tcp("http", 8080)],
                vec![ready("10.0.0.1", "")],
            ),
            slice(
                "web-2",
                vec![tcp("http", 8081)],
                vec![ready("10.0.0.1", "")],
            ),
        ],
    )
    .endpoints(&["10.0.0.1:8080", "10.0.0.1:8081"], &[], true)
    .run();
}

#[test]
fn dual_stack_slices_both_feed_the_port() {
    Case::new(
        svc_with(|s| s.cluster_ips = vec![ip("10.96.0.10"), ip("fd00::10")]),
        vec![
            slice(
                "web-v6",
                vec![tcp("", 8080)],
                vec![ready("fd00:1::1", "node-b")],
            ),
            slice(
                "web-v4",
                vec![tcp("", 8080)],
                vec![ready("10.0.0.1", "node-b")],
            ),
        ],
    )
    .endpoints(&["10.0.0.1:8080", "[fd00:1::1]:8080"], &[], true)
    .run();
}

#[test]
fn endpoints_of_a_family_without_cluster_ip_are_ignored() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            ready("fd00:1::1", ""),
            serving_terminating("fd00:1::2", ""),
        ])],
    )
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn usable_endpoints_are_reported_per_family_so_each_vip_rejects_on_its_own() {
    Case::new(
        svc_with(|s| s.cluster_ips = vec![ip("10.96.0.10"), ip("fd00::10")]),
        vec![
            slice("web-v4", vec![tcp("", 8080)], vec![ready("10.0.0.1", "")]),
            slice(
                "web-v6",
                vec![tcp("", 8080)],
                vec![not_ready("fd00:1::1", "")],
            ),
        ],
    )
    .state(|s| {
        let port = &s.ports[0];
        assert!(port.usable_ipv4, "the IPv4 endpoint is ready");
        assert!(
            !port.usable_ipv6,
            "the only IPv6 endpoint is not ready: reject on the v6 VIP"
        );
        assert!(port.has_usable_endpoints_for(ip("10.96.0.10")));
        assert!(!port.has_usable_endpoints_for(ip("fd00::10")));
    })
    .run();
}

#[test]
fn dual_stack_fallback_is_decided_per_family() {
    Case::new(
        svc_with(|s| s.cluster_ips = vec![ip("10.96.0.10"), ip("fd00::10")]),
        vec![
            slice(
                "web-v4",
                vec![tcp("", 8080)],
                vec![serving_terminating("10.0.0.1", "")],
            ),
            slice("web-v6", vec![tcp("", 8080)], vec![ready("fd00:1::1", "")]),
        ],
    )
    .endpoints(&["10.0.0.1:8080", "[fd00:1::1]:8080"], &[], true)
    .run();
}

#[test]
fn dual_stack_topology_is_decided_per_family() {
    Case::new(
        svc_with(|s| s.cluster_ips = vec![ip("10.96.0.10"), ip("fd00::10")]),
        vec![
            slice(
                "web-v4",
                vec![tcp("", 8080)],
                vec![
                    for_zones(ready("10.0.0.1", "node-b"), &["zone-a"]),
                    for_zones(ready("10.0.0.2", "node-c"), &["zone-b"]),
                ],
            ),
            slice(
                "web-v6",
                vec![tcp("", 8080)],
                vec![
                    for_zones(ready("fd00:1::1", "node-b"), &["zone-a"]),
                    ready("fd00:1::2", "node-c"),
                ],
            ),
        ],
    )
    .endpoints(
        &["10.0.0.1:8080", "[fd00:1::1]:8080", "[fd00:1::2]:8080"],
        &[],
        true,
    )
    .run();
}

#[test]
fn dual_stack_local_fallback_is_decided_per_family() {
    Case::new(
        svc_with(|s| {
            s.cluster_ips = vec![ip("10.96.0.10"), ip("fd00::10")];
            s.internal_traffic_policy = TrafficPolicy::Local;
        }),
        vec![
            slice(
                "web-v4",
                vec![tcp("", 8080)],
                vec![serving_terminating("10.0.0.1", "node-a")],
            ),
            slice(
                "web-v6",
                vec![tcp("", 8080)],
                vec![ready("fd00:1::1", "node-a")],
            ),
        ],
    )
    .endpoints(&[], &["10.0.0.1:8080", "[fd00:1::1]:8080"], true)
    .run();
}

#[test]
fn external_ip_of_one_family_makes_only_that_family_externally_reachable() {
    Case::new(
        svc_with(|s| {
            s.cluster_ips = vec![ip("10.96.0.10"), ip("fd00::10")];
            s.external_ips = vec![ip("192.0.2.7")];
            s.internal_traffic_policy = TrafficPolicy::Local;
        }),
        vec![
            slice(
                "web-v4",
                vec![tcp("", 8080)],
                vec![ready("10.0.0.1", "node-b")],
            ),
            slice(
                "web-v6",
                vec![tcp("", 8080)],
                vec![ready("fd00:1::1", "node-b")],
            ),
        ],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn endpoints_are_sorted_by_ip_then_port() {
    Case::new(
        svc(),
        vec![slice(
            "web-1",
            vec![tcp("", 8080)],
            vec![
                ready("10.0.0.10", ""),
                ready("10.0.0.9", ""),
                ready("10.0.0.2", ""),
            ],
        )],
    )
    .endpoints(
        &["10.0.0.2:8080", "10.0.0.9:8080", "10.0.0.10:8080"],
        &[],
        true,
    )
    .run();
}

// --- Readiness and the terminating fallback ----------------------------------------
#[test]
fn ready_endpoints_are_used_and_terminating_ones_are_not() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            ready("10.0.0.1", ""),
            serving_terminating("10.0.0.2", ""),
        ])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn no_ready_endpoint_falls_back_to_serving_terminating() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            serving_terminating("10.0.0.1", ""),
            terminating_not_serving("10.0.0.2", ""),
            not_ready("10.0.0.3", ""),
        ])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn not_ready_not_serving_endpoints_are_excluded() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            ready("10.0.0.1", ""),
            not_ready("10.0.0.2", ""),
        ])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn serving_but_not_terminating_endpoint_is_no_fallback() {
    Case::new(
        svc(),
        vec![slice8080(vec![Endpoint {
            ready: false,
            ..ready("10.0.0.1", "")
        }])],
    )
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn only_unusable_endpoints_mean_no_endpoints_at_all() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            not_ready("10.0.0.1", "node-a"),
            terminating_not_serving("10.0.0.2", ""),
        ])],
    )
    .endpoints(&[], &[], false)
    .run();
}

#[test]
fn no_slices_means_no_endpoints() {
    Case::new(svc(), vec![]).endpoints(&[], &[], false).run();
}

#[test]
fn endpoint_conditions_and_node_are_carried() {
    Case::new(
        svc(),
        vec![slice8080(vec![serving_terminating("10.0.0.1", "node-b")])],
    )
    .state(|s| {
        assert_eq!(
            s.ports[0].cluster_endpoints,
            vec![EndpointState {
                ip: ip("10.0.0.1"),
                port: 8080,
                node_name: Some("node-b".into()),
                local: false,
                ready: false,
                serving: true,
                terminating: true,
            }]
        );
    })
    .run();
}

// --- Locality and traffic policies ---------------------------------------------------
#[test]
fn endpoint_on_this_node_is_marked_local() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            ready("10.0.0.1", "node-a"),
            ready("10.0.0.2", "node-b"),
        ])],
    )
    .state(|s| {
        let local: Vec<_> = s.ports[0]
            .cluster_endpoints
            .iter()
            .map(|e| e.local)
            .collect();
        assert_eq!(local, [true, false]);
    })
    .run();
}

#[test]
fn endpoints_without_node_name_are_never_local() {
    Case::new(
        svc_with(|s| s.internal_traffic_policy = TrafficPolicy::Local),
        vec![slice8080(vec![ready("10.0.0.1", "")])],
    )
    .endpoints(&[], &[], true)
    .run();
}

#[test]
fn cluster_policies_leave_the_local_set_empty() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::NodePort;
            s.ports = vec![node_port("", 80, 30080)];
        }),
        vec![slice8080(vec![ready("10.0.0.1", "node-a")])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn internal_traffic_policy_local_uses_only_local_endpoints() {
    Case::new(
        svc_with(|s| s.internal_traffic_policy = TrafficPolicy::Local),
        vec![slice8080(vec![
            ready("10.0.0.1", "node-a"),
            ready("10.0.0.2", "node-b"),
        ])],
    )
    .state(|s| {
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Local);
        assert!(
            s.ports[0].cluster_endpoints.is_empty(),
            "no traffic uses the Cluster policy"
        );
        assert_eq!(addrs(&s.ports[0].local_endpoints), ["10.0.0.1:8080"]);
        assert!(s.ports[0].local_endpoints[0].local);
    })
    .run();
}

#[test]
fn internal_traffic_policy_local_with_no_local_endpoint_yields_empty_local_set_but_has_any_endpoints()
 {
    Case::new(
        svc_with(|s| s.internal_traffic_policy = TrafficPolicy::Local),
        vec![slice8080(vec![ready("10.0.0.2", "node-b")])],
    )
    .endpoints(&[], &[], true)
    .run();
}

#[test]
fn internal_traffic_policy_local_on_node_port_keeps_the_cluster_set_for_external_traffic() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::NodePort;
            s.ports = vec![node_port("", 80, 30080)];
            s.internal_traffic_policy = TrafficPolicy::Local;
        }),
        vec![slice8080(vec![
            ready("10.0.0.1", "node-a"),
            ready("10.0.0.2", "node-b"),
        ])],
    )
    .endpoints(
        &["10.0.0.1:8080", "10.0.0.2:8080"],
        &["10.0.0.1:8080"],
        true,
    )
    .run();
}

#[test]
fn external_traffic_policy_local_on_load_balancer_fills_both_sets() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::LoadBalancer;
            s.ports = vec![node_port("", 80, 30080)];
            s.load_balancer_ips = vec![ip("203.0.113.9")];
            s.external_traffic_policy = TrafficPolicy::Local;
        }),
        vec![slice8080(vec![
            ready("10.0.0.1", "node-a"),
            ready("10.0.0.2", "node-b"),
        ])],
    )
    .endpoints(
        &["10.0.0.1:8080", "10.0.0.2:8080"],
        &["10.0.0.1:8080"],
        true,
    )
    .run();
}

#[test]
fn external_traffic_policy_local_applies_to_cluster_ip_with_external_ips() {
    Case::new(
        svc_with(|s| {
            s.external_ips = vec![ip("192.0.2.7")];
            s.external_traffic_policy = TrafficPolicy::Local;
        }),
        vec![slice8080(vec![
            ready("10.0.0.1", "node-a"),
            ready("10.0.0.2", "node-b"),
        ])],
    )
    .state(|s| {
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(addrs(&s.ports[0].local_endpoints), ["10.0.0.1:8080"]);
        assert_eq!(s.ports[0].cluster_endpoints.len(), 2);
    })
    .run();
}

#[test]
fn external_traffic_policy_local_on_a_port_without_node_port_or_external_vip_uses_no_local_set() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::LoadBalancer;
            s.external_traffic_policy = TrafficPolicy::Local;
        }),
        vec![slice8080(vec![ready("10.0.0.1", "node-a")])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn local_set_falls_back_independently_of_cluster_set() {
    Case::new(
        svc_with(|s| {
            s.service_type = ServiceType::NodePort;
            s.ports = vec![node_port("", 80, 30080)];
            s.external_traffic_policy = TrafficPolicy::Local;
        }),
        vec![slice8080(vec![
            serving_terminating("10.0.0.1", "node-a"),
            not_ready("10.0.0.3", "node-a"),
            ready("10.0.0.2", "node-b"),
        ])],
    )
    .endpoints(&["10.0.0.2:8080"], &["10.0.0.1:8080"], true)
    .run();
}

#[test]
fn local_set_prefers_ready_local_endpoints_over_terminating_ones() {
    Case::new(
        svc_with(|s| s.internal_traffic_policy = TrafficPolicy::Local),
        vec![slice8080(vec![
            serving_terminating("10.0.0.1", "node-a"),
            ready("10.0.0.2", "node-a"),
        ])],
    )
    .endpoints(&[], &["10.0.0.2:8080"], true)
    .run();
}

#[test]
fn serving_terminating_endpoints_elsewhere_still_count_as_any_endpoints() {
    Case::new(
        svc_with(|s| s.internal_traffic_policy = TrafficPolicy::Local),
        vec![slice8080(vec![serving_terminating("10.0.0.2", "node-b")])],
    )
    .endpoints(&[], &[], true)
    .run();
}

#[test]
fn local_set_ignores_topology_hints() {
    Case::new(
        svc_with(|s| s.internal_traffic_policy = TrafficPolicy::Local),
        vec![slice8080(vec![
            for_zones(ready("10.0.0.1", "node-a"), &["zone-b"]),
            for_zones(ready("10.0.0.2", "node-b"), &["zone-a"]),
        ])],
    )
    .endpoints(&[], &["10.0.0.1:8080"], true)
    .run();
}

#[test]
fn node_without_a_name_has_no_local_endpoints() {
    Case::new(
        svc_with(|s| s.internal_traffic_policy = TrafficPolicy::Local),
        vec![slice8080(vec![ready("10.0.0.1", "")])],
    )
    .on("", None)
    .endpoints(&[], &[], true)
    .run();
}

// --- Topology hints (cluster set only) -----------------------------------------------
#[test]
fn zone_hints_restrict_the_cluster_set_to_this_zone() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_zones(ready("10.0.0.1", "node-b"), &["zone-a"]),
            for_zones(ready("10.0.0.2", "node-c"), &["zone-b"]),
        ])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn zone_hints_ignored_when_none_names_this_zone() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_zones(ready("10.0.0.1", "node-b"), &["zone-b"]),
            for_zones(ready("10.0.0.2", "node-c"), &["zone-c"]),
        ])],
    )
    .endpoints(&["10.0.0.1:8080", "10.0.0.2:8080"], &[], true)
    .run();
}

#[test]
fn zone_hints_ignored_when_a_ready_endpoint_lacks_one() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_zones(ready("10.0.0.1", "node-b"), &["zone-a"]),
            ready("10.0.0.2", "node-c"),
        ])],
    )
    .endpoints(&["10.0.0.1:8080", "10.0.0.2:8080"], &[], true)
    .run();
}

#[test]
fn zone_hints_of_endpoints_that_are_not_ready_do_not_count() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_zones(ready("10.0.0.1", "node-b"), &["zone-a"]),
            for_zones(ready("10.0.0.2", "node-c"), &["zone-b"]),
            not_ready("10.0.0.3", "node-d"),
        ])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn zone_hints_ignored_on_a_node_without_zone() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_zones(ready("10.0.0.1", "node-b"), &["zone-a"]),
            for_zones(ready("10.0.0.2", "node-c"), &["zone-b"]),
        ])],
    )
    .on("node-a", None)
    .endpoints(&["10.0.0.1:8080", "10.0.0.2:8080"], &[], true)
    .run();
}

#[test]
fn node_hints_restrict_the_cluster_set_to_this_node() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_nodes(ready("10.0.0.1", "node-a"), &["node-a"]),
            for_nodes(ready("10.0.0.2", "node-b"), &["node-b"]),
        ])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn node_hints_used_only_when_every_ready_endpoint_has_one() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_nodes(ready("10.0.0.1", "node-a"), &["node-a"]),
            ready("10.0.0.2", "node-b"),
        ])],
    )
    .endpoints(&["10.0.0.1:8080", "10.0.0.2:8080"], &[], true)
    .run();
}

#[test]
fn node_hints_win_over_zone_hints() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_zones(
                for_nodes(ready("10.0.0.1", "node-a"), &["node-a"]),
                &["zone-a"],
            ),
            for_zones(
                for_nodes(ready("10.0.0.2", "node-b"), &["node-b"]),
                &["zone-a"],
            ),
        ])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn node_hints_not_naming_this_node_fall_through_to_zone_hints() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_zones(
                for_nodes(ready("10.0.0.1", "node-b"), &["node-b"]),
                &["zone-a"],
            ),
            for_zones(
                for_nodes(ready("10.0.0.2", "node-c"), &["node-c"]),
                &["zone-b"],
            ),
        ])],
    )
    .endpoints(&["10.0.0.1:8080"], &[], true)
    .run();
}

#[test]
fn terminating_fallback_ignores_topology() {
    Case::new(
        svc(),
        vec![slice8080(vec![
            for_zones(serving_terminating("10.0.0.1", "node-b"), &["zone-b"]),
            for_zones(serving_terminating("10.0.0.2", "node-c"), &["zone-a"]),
        ])],
    )
    .endpoints(&["10.0.0.1:8080", "10.0.0.2:8080"], &[], true)
    .run();
}

// ---------------------------------------------------------------------------------------
// compute_node

fn snapshot(
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    nodes: &[(&str, Option<&str>)],
) -> ClusterSnapshot {
    let mut snapshot = ClusterSnapshot::default();
    for service in services {
        snapshot
            .services
            .insert(service.key.clone(), Arc::new(service));
    }
    for slice in slices {
        snapshot
            .slices
            .entry(slice.service.clone())
            .or_default()
            .insert(slice.key.clone(), Arc::new(slice));
    }
    for (name, zone) in nodes {
        let node = Node {
            name: name.to_string(),
            zone: zone.map(Into::into),
            deleting: false,
            dataplane: None,
            label_problems: Vec::new(),
            addresses: vec![],
        };
        snapshot.nodes.insert(node.name.clone(), Arc::new(node));
    }
    snapshot
}

use std::sync::Arc;

#[test]
fn compute_node_holds_every_handled_service_and_skips_the_rest() {
    let other = svc_with(|s| {
        s.key = ServiceKey::new("default", "other");
        s.proxy_name = Some("someone-else".into());
    });
    let lonely = svc_with(|s| s.key = ServiceKey::new("kube-system", "dns"));
    let snap = snapshot(
        vec![svc(), other, lonely],
        vec![slice8080(vec![ready("10.0.0.1", "node-a")])],
        &[("node-a", Some("zone-a"))],
    );
    let state = compute_node(&snap, "node-a", &ComputeOptions::default());
    let keys: Vec<_> = state.keys().map(ToString::to_string).collect();
    assert_eq!(keys, ["default/web", "kube-system/dns"]);
    let web = &state[&ServiceKey::new("default", "web")];
    assert_eq!(addrs(&web.ports[0].cluster_endpoints), ["10.0.0.1:8080"]);
    assert!(web.ports[0].cluster_endpoints[0].local);
    let dns = &state[&ServiceKey::new("kube-system", "dns")];
    assert!(
        !dns.ports[0].has_usable_endpoints(),
        "a Service without slices has no endpoints"
    );
}

#[test]
fn compute_node_reads_the_zone_from_the_snapshot() {
    let snap = snapshot(
        vec![svc()],
        vec![slice8080(vec![
            for_zones(ready("10.0.0.1", "node-b"), &["zone-a"]),
            for_zones(ready("10.0.0.2", "node-c"), &["zone-b"]),
        ])],
        &[("node-a", Some("zone-a")), ("node-z", Some("zone-b"))],
    );
    let key = ServiceKey::new("default", "web");
    let endpoints = |node| {
        addrs(
            &compute_node(&snap, node, &ComputeOptions::default())[&key].ports[0].cluster_endpoints,
        )
    };
    assert_eq!(endpoints("node-a"), ["10.0.0.1:8080"]);
    assert_eq!(endpoints("node-z"), ["10.0.0.2:8080"]);
}

#[test]
fn compute_node_for_an_unknown_node_ignores_zone_hints_and_has_nothing_local() {
    let snap = snapshot(
        vec![svc()],
        vec![slice8080(vec![
            for_zones(ready("10.0.0.1", "node-b"), &["zone-a"]),
            for_zones(ready("10.0.0.2", "node-c"), &["zone-b"]),
        ])],
        &[("node-a", Some("zone-a"))],
    );
    let state = compute_node(&snap, "node-unknown", &ComputeOptions::default());
    let port = &state[&ServiceKey::new("default", "web")].ports[0];
    assert_eq!(
        addrs(&port.cluster_endpoints),
        ["10.0.0.1:8080", "10.0.0.2:8080"]
    );
    assert!(port.cluster_endpoints.iter().all(|e| !e.local));
}

#[test]
fn compute_node_of_an_empty_snapshot_is_empty() {
    let state = compute_node(
        &ClusterSnapshot::default(),
        "node-a",
        &ComputeOptions::default(),
    );
    assert!(state.is_empty());
}

// ---------------------------------------------------------------------------------------
// variant_key

fn key_of(slices: &[EndpointSlice], node: &str, zone: Option<&str>) -> VariantKey {
    variant_key(&svc(), slices, NodeContext { name: node, zone })
}

#[test]
fn variant_key_is_shared_without_local_endpoints_or_hints() {
    let slices = [slice8080(vec![ready("10.0.0.1", "node-b")])];
    assert_eq!(
        key_of(&slices, "node-a", Some("zone-a")),
        VariantKey::Shared
    );
}

#[test]
fn variant_key_names_the_node_that_hosts_an_endpoint() {
    let slices = [slice8080(vec![not_ready("10.0.0.1", "node-a")])];
    assert_eq!(
        key_of(&slices, "node-a", Some("zone-a")),
        VariantKey::Node("node-a".into())
    );
}

#[test]
fn variant_key_names_the_node_a_node_hint_names() {
    let slices = [slice8080(vec![for_nodes(
        ready("10.0.0.1", "node-b"),
        &["node-a"],
    )])];
    assert_eq!(
        key_of(&slices, "node-a", None),
        VariantKey::Node("node-a".into())
    );
}

#[test]
fn variant_key_names_the_zone_a_zone_hint_names() {
    let slices = [slice8080(vec![for_zones(
        ready("10.0.0.1", "node-b"),
        &["zone-a"],
    )])];
    assert_eq!(
        key_of(&slices, "node-a", Some("zone-a")),
        VariantKey::Zone("zone-a".into())
    );
    assert_eq!(
        key_of(&slices, "node-c", Some("zone-c")),
        VariantKey::Shared
    );
    assert_eq!(key_of(&slices, "node-d", None), VariantKey::Shared);
}

/// A tiny deterministic generator (xorshift), so the property test needs no crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const NODES: [(&str, Option<&str>); 7] = [
    ("node-a", Some("zone-a")),
    ("node-b", Some("zone-a")),
    ("node-c", Some("zone-b")),
    ("node-d", Some("zone-b")),
    ("node-e", Some("zone-c")),
    ("node-f", None),
    ("node-g", None),
];

fn random_service(rng: &mut Rng) -> Service {
    svc_with(|s| {
        s.service_type = *rng.pick(&[
            ServiceType::ClusterIp,
            ServiceType::NodePort,
            ServiceType::LoadBalancer,
        ]);
        s.ports = vec![
            port("http", Protocol::Tcp, 80),
            port("dns", Protocol::Udp, 53),
        ];
        if s.service_type != ServiceType::ClusterIp {
            s.ports[0].node_port = Some(30080);
            s.ports[1].node_port = rng.chance(50).then_some(30053);
        }
        s.cluster_ips = rng
            .pick(&[
                vec!["10.96.0.10"],
                vec!["fd00::10"],
                vec!["10.96.0.10", "fd00::10"],
            ])
            .iter()
            .map(|a| ip(a))
            .collect();
        if rng.chance(30) {
            let external = *rng.pick(&["192.0.2.7", "2001:db8::7"]);
            s.external_ips = vec![ip(external)];
        }
        let policies = [TrafficPolicy::Cluster, TrafficPolicy::Local];
        s.external_traffic_policy = *rng.pick(&policies);
        s.internal_traffic_policy = *rng.pick(&policies);
    })
}

fn random_slices(rng: &mut Rng) -> Vec<EndpointSlice> {
    let hints_zones = rng.chance(50);
    let hints_nodes = rng.chance(40);
    (0..rng.below(3) + 1)
        .map(|s| {
            let endpoints = (0..rng.below(5))
                .map(|e| {
                    let address = if rng.chance(70) {
                        format!("10.0.{}.{}", rng.below(2), rng.below(6) + e)
                    } else {
                        format!("fd00:{}::{}", rng.below(2), rng.below(6) + e)
                    };
                    let node = if rng.chance(10) {
                        ""
                    } else {
                        rng.pick(&NODES).0
                    };
                    let mut endpoint = match rng.below(4) {
                        0 => serving_terminating(&address, node),
                        1 => not_ready(&address, node),
                        _ => ready(&address, node),
                    };
                    if hints_zones && rng.chance(90) {
                        let zone = *rng.pick(&["zone-a", "zone-b", "zone-c", "zone-x"]);
                        endpoint = for_zones(endpoint, &[zone]);
                    }
                    if hints_nodes && rng.chance(90) {
                        endpoint = for_nodes(endpoint, &[rng.pick(&NODES).0]);
                    }
                    endpoint
                })
                .collect();
            let ports = vec![tcp("http", 8080 + rng.below(2) as u16), udp("dns", 5353)];
            slice(&format!("web-{s}"), ports, endpoints)
        })
        .collect()
}

#[test]
fn nodes_with_equal_variant_keys_get_identical_states() {
    let options = ComputeOptions::default();
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let mut shared_pairs = 0;
    for _ in 0..400 {
        let service = random_service(&mut rng);
        let slices = random_slices(&mut rng);
        let computed: Vec<_> = NODES
            .iter()
            .map(|&(name, zone)| {
                let node = NodeContext { name, zone };
                (
                    variant_key(&service, &slices, node),
                    compute_service(&service, &slices, node, &options),
                )
            })
            .collect();
        for (i, (key_a, state_a)) in computed.iter().enumerate() {
            for (key_b, state_b) in &computed[i + 1..] {
                if key_a == key_b {
                    shared_pairs += 1;
                    assert_eq!(
                        state_a, state_b,
                        "key {key_a:?} shared by nodes with different states\n{service:#?}\n{slices:#?}"
                    );
                }
            }
        }
    }
    assert!(
        shared_pairs > 1000,
        "the generator should produce many shared keys, got {shared_pairs}"
    );
}

#[test]
fn variant_keys_share_most_nodes_of_a_service_without_hints() {
    let slices = [slice8080(vec![
        ready("10.0.0.1", "node-a"),
        ready("10.0.0.2", "node-b"),
    ])];
    let keys: std::collections::BTreeSet<_> =
        NODES.iter().map(|&(n, z)| key_of(&slices, n, z)).collect();
    // node-a and node-b each get their own key; everyone else shares one.
    assert_eq!(keys.len(), 3);
}
