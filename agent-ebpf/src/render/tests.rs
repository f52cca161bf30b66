//! Table tests of the renderer: each case one kube-proxy behaviour, as kernel objects.

use std::net::IpAddr;

use switchyard_agent_core::{
    dataplane::DesiredService,
    fixtures::{ep, port, service},
};
use switchyard_proto::state::{LbAlgorithm, PortState, Protocol, ServiceState, TrafficPolicy};

use super::*;

/// `ns/web` on `vip` with `ports`.
fn on(vip: &[&str], ports: Vec<PortState>) -> ServiceState {
    service("ns/web", vip, ports)
}

/// TCP port 80 "http" served on 8080 by `backends`.
fn http(backends: &[(&str, bool)]) -> PortState {
    let endpoints = backends
        .iter()
        .map(|(ip, local)| ep(ip, 8080, *local))
        .collect();
    port("http", Protocol::Tcp, 80, endpoints)
}

fn web() -> ServiceState {
    on(
        &["10.96.0.10"],
        vec![http(&[("10.244.1.2", true), ("10.244.2.2", false)])],
    )
}

fn objects(state: ServiceState, cfg: &RenderConfig) -> Vec<String> {
    let desired = DesiredService::new(1, state);
    render_service("ns/web", &desired, cfg)
        .unwrap()
        .objects()
        .unwrap()
}

fn lines(text: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = text.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

const BOTH: &str = "random [10.244.1.2:8080 10.244.2.2:8080]";

#[test]
fn kube_proxy_behaviours_render_to_these_entries() {
    struct Case {
        about: &'static str,
        state: ServiceState,
        cfg: RenderConfig,
        want: Vec<String>,
    }
    let cidr = RenderConfig {
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        ..RenderConfig::default()
    };
    let cases = vec![
        Case {
            about: "a cluster IP forwards to every endpoint from the node and from outside",
            state: web(),
            cfg: RenderConfig::default(),
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH}"),
            ]),
        },
        Case {
            about: "routed cluster traffic from outside the cluster CIDR is source-NATed",
            state: web(),
            cfg: cidr.clone(),
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH} snat-non-pod"),
            ]),
        },
        Case {
            about: "--masquerade-all source-NATs all routed cluster traffic",
            state: web(),
            cfg: RenderConfig {
                masquerade_all: true,
                ..cidr.clone()
            },
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH} snat"),
            ]),
        },
        Case {
            about: "no usable endpoint rejects on every address, node port included",
            state: {
                let mut s = on(&["10.96.0.12"], vec![http(&[])]);
                s.ports[0].node_port = Some(30081);
                s.external_ips = vec!["192.0.2.1".parse().unwrap()];
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                "sock tcp 10.96.0.12:80 reject",
                "ext tcp 10.96.0.12:80 reject",
                "sock tcp 192.0.2.1:80 reject",
                "ext tcp 192.0.2.1:80 reject",
                "sock tcp 0.0.0.0:30081 reject",
                "ext tcp 0.0.0.0:30081 reject",
            ]),
        },
        Case {
            about: "internalTrafficPolicy Local without a local endpoint drops cluster traffic",
            state: {
                let mut s = web();
                s.internal_traffic_policy = TrafficPolicy::Local;
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&["sock tcp 10.96.0.10:80 drop", "ext tcp 10.96.0.10:80 drop"]),
        },
        Case {
            about: "internalTrafficPolicy Local uses the local set for cluster traffic only",
            state: {
                let mut s = web();
                s.internal_traffic_policy = TrafficPolicy::Local;
                s.ports[0].local_endpoints = vec![ep("10.244.1.2", 8080, true)];
                s.ports[0].node_port = Some(30080);
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                "sock tcp 10.96.0.10:80 forward random [10.244.1.2:8080]",
                "ext tcp 10.96.0.10:80 forward random [10.244.1.2:8080]",
                &format!("sock tcp 0.0.0.0:30080 forward {BOTH}"),
                &format!("ext tcp 0.0.0.0:30080 forward {BOTH} snat"),
            ]),
        },
        Case {
            about: "externalTrafficPolicy Cluster source-NATs external traffic",
            state: {
                let mut s = web();
                s.ports[0].node_port = Some(30080);
                s.external_ips = vec!["192.0.2.1".parse().unwrap()];
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("sock tcp 192.0.2.1:80 forward {BOTH}"),
                &format!("ext tcp 192.0.2.1:80 forward {BOTH} snat"),
                &format!("sock tcp 0.0.0.0:30080 forward {BOTH}"),
                &format!("ext tcp 0.0.0.0:30080 forward {BOTH} snat"),
            ]),
        },
        Case {
            about: "externalTrafficPolicy Local: outside to local endpoints with the source kept, \
                    the node and pods to the cluster set",
            state: {
                let mut s = web();
                s.external_traffic_policy = TrafficPolicy::Local;
                s.ports[0].node_port = Some(30080);
                s.ports[0].local_endpoints = vec![ep("10.244.1.2", 8080, true)];
                s
            },
            cfg: cidr.clone(),
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH} snat-non-pod"),
                &format!("sock tcp 0.0.0.0:30080 forward {BOTH}"),
                "ext tcp 0.0.0.0:30080 forward random [10.244.1.2:8080] pod-set",
                &format!("ext-pod tcp 0.0.0.0:30080 forward {BOTH}"),
            ]),
        },
        Case {
            about: "externalTrafficPolicy Local without a local endpoint drops from outside",
            state: {
                let mut s = web();
                s.external_traffic_policy = TrafficPolicy::Local;
                s.ports[0].node_port = Some(30080);
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("sock tcp 0.0.0.0:30080 forward {BOTH}"),
                "ext tcp 0.0.0.0:30080 drop",
            ]),
        },
        Case {
            about: "load-balancer source ranges guard the load-balancer IP only",
            state: {
                let mut s = web();
                s.load_balancer_ips = vec!["198.51.100.10".parse().unwrap()];
                s.external_ips = vec!["192.0.2.1".parse().unwrap()];
                s.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("sock tcp 192.0.2.1:80 forward {BOTH}"),
                &format!("ext tcp 192.0.2.1:80 forward {BOTH} snat"),
                "sock tcp 198.51.100.10:80 drop",
                &format!("ext tcp 198.51.100.10:80 forward {BOTH} snat source-ranges"),
                "range 203.0.113.0/24",
            ]),
        },
        Case {
            about: "a source range holding a node IP admits the node and the load-balancer IP",
            state: {
                let mut s = web();
                s.load_balancer_ips = vec!["198.51.100.10".parse().unwrap()];
                s.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
                s
            },
            cfg: RenderConfig {
                node_ips: vec!["203.0.113.7".parse().unwrap()],
                ..RenderConfig::default()
            },
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("sock tcp 198.51.100.10:80 forward {BOTH}"),
                &format!("ext tcp 198.51.100.10:80 forward {BOTH} snat source-ranges"),
                "range 198.51.100.10/32",
                "range 203.0.113.0/24",
            ]),
        },
        Case {
            about: "ClientIP affinity rides on forwarding entries",
            state: {
                let mut s = web();
                s.session_affinity_timeout = Some(10800);
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH} affinity=10800s"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH} affinity=10800s"),
            ]),
        },
        Case {
            about: "a family without a cluster IP gets nothing, even with endpoints",
            state: {
                let mut s = web();
                s.ports[0]
                    .cluster_endpoints
                    .push(ep("fd00:244::2", 8080, false));
                s.ports[0].usable_ipv6 = true;
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                &format!("sock tcp 10.96.0.10:80 forward {BOTH}"),
                &format!("ext tcp 10.96.0.10:80 forward {BOTH}"),
            ]),
        },
        Case {
            about: "dual stack renders each family with its own endpoints and node port",
            state: {
                let mut s = on(
                    &["10.96.0.10", "fd00:96::10"],
                    vec![port(
                        "dns",
                        Protocol::Udp,
                        53,
                        vec![ep("10.244.1.2", 5353, true), ep("fd00:244::2", 5353, true)],
                    )],
                );
                s.ports[0].node_port = Some(30053);
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                "sock udp 10.96.0.10:53 forward random [10.244.1.2:5353]",
                "ext udp 10.96.0.10:53 forward random [10.244.1.2:5353]",
                "sock udp 0.0.0.0:30053 forward random [10.244.1.2:5353]",
                "ext udp 0.0.0.0:30053 forward random [10.244.1.2:5353] snat",
                "sock udp [fd00:96::10]:53 forward random [[fd00:244::2]:5353]",
                "ext udp [fd00:96::10]:53 forward random [[fd00:244::2]:5353]",
                "sock udp [::]:30053 forward random [[fd00:244::2]:5353]",
                "ext udp [::]:30053 forward random [[fd00:244::2]:5353] snat",
            ]),
        },
        Case {
            about: "an IPv6 family with usable endpoints elsewhere but none here drops",
            state: {
                let mut s = on(&["fd00:96::10"], vec![http(&[])]);
                s.ports[0].usable_ipv6 = true;
                s
            },
            cfg: RenderConfig::default(),
            want: lines(&[
                "sock tcp [fd00:96::10]:80 drop",
                "ext tcp [fd00:96::10]:80 drop",
            ]),
        },
    ];
    for case in cases {
        assert_eq!(objects(case.state, &case.cfg), case.want, "{}", case.about);
    }
}

#[test]
fn maglev_comes_from_the_annotation_or_the_default_with_the_configured_size() {
    let digest = |size: u32| {
        let backends = [
            "10.244.1.2:8080".parse().unwrap(),
            "10.244.2.2:8080".parse().unwrap(),
        ];
        maglev::digest(&maglev::build(&backends, size).unwrap(), &backends)
    };
    let mut annotated = web();
    annotated.ebpf_lb = Some(LbAlgorithm::Maglev);
    let got = objects(annotated.clone(), &RenderConfig::default());
    let set = format!(
        "maglev/16381/{} [10.244.1.2:8080 10.244.2.2:8080]",
        digest(16381)
    );
    assert!(
        got.contains(&format!("sock tcp 10.96.0.10:80 forward {set}")),
        "{got:#?}"
    );

    let small = RenderConfig {
        default_lb: LbAlgorithm::Maglev,
        maglev_size: 251,
        ..RenderConfig::default()
    };
    let got = objects(web(), &small);
    assert!(
        got[0].contains(&format!("maglev/251/{}", digest(251))),
        "{got:#?}"
    );

    let mut random = web();
    random.ebpf_lb = Some(LbAlgorithm::Random);
    assert!(objects(random, &small)[0].contains("random ["));
}

#[test]
fn entries_sharing_a_backend_list_share_one_set_and_keys_are_the_map_form() {
    let mut s = web();
    s.ports[0].node_port = Some(30080);
    s.external_ips = vec!["192.0.2.1".parse().unwrap()];
    let desired = DesiredService::new(1, s);
    let out = render_service("ns/web", &desired, &RenderConfig::default()).unwrap();
    assert_eq!(out.sets.len(), 1, "{:#?}", out.sets);
    let cluster_ip = out
        .entries
        .iter()
        .find(|e| e.scope == Scope::Sock && e.port == 80 && e.addr.to_string() == "10.96.0.10")
        .unwrap();
    let key = cluster_ip.key();
    assert_eq!(key.scope, abi::SCOPE_SOCK);
    assert_eq!(abi::ip(&key.addr), "10.96.0.10".parse::<IpAddr>().unwrap());
    assert_eq!(abi::host_port(key.port), 80);
    assert_eq!(key.proto, 6);
    let ids: std::collections::BTreeSet<u32> = out.entries.iter().map(|e| e.affinity_id).collect();
    assert_eq!(ids.len(), 1, "one service port, one affinity id");
}

#[test]
fn only_udp_backends_are_listed_for_conntrack_flushing() {
    let mut s = web();
    s.ports.push(port(
        "dns",
        Protocol::Udp,
        53,
        vec![ep("10.244.3.2", 5353, false)],
    ));
    let desired = DesiredService::new(1, s);
    let out = render_service("ns/web", &desired, &RenderConfig::default()).unwrap();
    assert_eq!(
        out.udp_backends(),
        vec!["10.244.3.2:5353".parse::<SocketAddr>().unwrap()]
    );
}
