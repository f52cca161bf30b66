//! The IPVS rendering, case by case against the iptables agent's decisions (which set
//! internal and external traffic use, reject vs drop, affinity, source ranges), plus a
//! golden file of the Service that exercises everything (`tests/golden/kitchen_sink.objects`;
//! `SWY_BLESS=1` rewrites it).

use std::net::IpAddr;

use switchyard_agent_core::fixtures::*;
use switchyard_agent_ipvs::render::{RenderConfig, ServicePlan, render_service};
use switchyard_proto::state::{IpvsScheduler, Protocol, ServiceState, TrafficPolicy};

fn cfg() -> RenderConfig {
    RenderConfig {
        scheduler: IpvsScheduler::Rr,
        node_addresses: vec![
            "10.201.0.1".parse().unwrap(),
            "203.0.113.7".parse().unwrap(),
            "fd00:201::1".parse().unwrap(),
        ],
    }
}

fn plan(state: ServiceState) -> ServicePlan {
    let mut service = desired(state);
    service.version = 0x0123_4567_89ab_cdef;
    render_service(&service, &cfg())
}

fn objects(state: ServiceState) -> Vec<String> {
    plan(state).objects()
}

fn has(objects: &[String], line: &str) -> bool {
    objects.iter().any(|o| o == line)
}

#[test]
fn a_cluster_ip_becomes_one_virtual_service_with_every_endpoint_as_a_masqueraded_real() {
    let o = objects(service(
        "default/web",
        &["10.96.0.10"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    ));
    assert_eq!(
        o,
        [
            "ipset SWY-CLUSTER-IP 10.96.0.10,tcp:80",
            "ipset SWY-LOOP-BACK 10.244.0.5,tcp:8080,10.244.0.5",
            "ipset SWY-LOOP-BACK 10.244.1.5,tcp:8080,10.244.1.5",
            "ipset SWY-LOOP-BACK 10.244.2.5,tcp:8080,10.244.2.5",
            "ipvs TCP 10.96.0.10:80 -> 10.244.0.5:8080 masq 1",
            "ipvs TCP 10.96.0.10:80 -> 10.244.1.5:8080 masq 1",
            "ipvs TCP 10.96.0.10:80 -> 10.244.2.5:8080 masq 1",
            "ipvs TCP 10.96.0.10:80 rr",
            "version 0123456789abcdef",
            "vip 10.96.0.10",
        ]
    );
}

#[test]
fn udp_and_sctp_ports_get_virtual_services_of_their_protocol() {
    let o = objects(service(
        "default/mixed",
        &["10.96.0.11"],
        vec![
            port("dns", Protocol::Udp, 53, vec![ep("10.244.0.5", 5353, true)]),
            port(
                "sig",
                Protocol::Sctp,
                3868,
                vec![ep("10.244.0.5", 3868, true)],
            ),
        ],
    ));
    assert!(has(&o, "ipvs UDP 10.96.0.11:53 rr"));
    assert!(has(
        &o,
        "ipvs SCTP 10.96.0.11:3868 -> 10.244.0.5:3868 masq 1"
    ));
    assert!(has(&o, "ipset SWY-CLUSTER-IP 10.96.0.11,udp:53"));
    assert!(has(
        &o,
        "ipset SWY-LOOP-BACK 10.244.0.5,sctp:3868,10.244.0.5"
    ));
}

#[test]
fn a_port_without_usable_endpoints_is_rejected_and_has_no_virtual_service() {
    let o = objects(service(
        "default/empty",
        &["10.96.0.12"],
        vec![port("http", Protocol::Tcp, 80, vec![])],
    ));
    assert_eq!(
        o,
        [
            "ipset SWY-REJECT 10.96.0.12,tcp:80",
            "version 0123456789abcdef",
            "vip 10.96.0.12",
        ]
    );
}

#[test]
fn internal_local_policy_without_local_endpoints_drops_when_usable_elsewhere() {
    let mut s = service(
        "default/local",
        &["10.96.0.13"],
        vec![port(
            "http",
            Protocol::Tcp,
            80,
            vec![ep("10.244.1.5", 8080, false)],
        )],
    );
    s.internal_traffic_policy = TrafficPolicy::Local;
    let o = objects(s.clone());
    assert!(has(&o, "ipset SWY-DROP 10.96.0.13,tcp:80"), "{o:#?}");
    assert!(!o.iter().any(|l| l.starts_with("ipvs ")), "{o:#?}");

    s.ports[0].local_endpoints = vec![ep("10.244.0.5", 8080, true)];
    let o = objects(s);
    assert!(
        has(&o, "ipvs TCP 10.96.0.13:80 -> 10.244.0.5:8080 masq 1"),
        "{o:#?}"
    );
    assert!(!has(&o, "ipvs TCP 10.96.0.13:80 -> 10.244.1.5:8080 masq 1"));
}

#[test]
fn node_ports_get_a_virtual_service_per_node_address_and_are_masqueraded_under_the_cluster_policy()
{
    let mut s = service(
        "default/np",
        &["10.96.0.14"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.ports[0].node_port = Some(30080);
    let o = objects(s);
    for node in ["10.201.0.1", "203.0.113.7"] {
        assert!(has(&o, &format!("ipvs TCP {node}:30080 rr")), "{o:#?}");
        assert!(has(&o, &format!("ipset SWY-EXTERNAL {node},tcp:30080")));
        assert!(
            !has(&o, &format!("vip {node}")),
            "node addresses are not VIPs"
        );
    }
    assert!(
        !o.iter().any(|l| l.contains("fd00:201::1")),
        "an IPv4-only Service has no IPv6 node port: {o:#?}"
    );
}

#[test]
fn external_local_policy_sends_external_traffic_to_local_endpoints_only_and_keeps_the_source() {
    let mut s = service(
        "default/edge",
        &["10.96.0.15"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.external_ips = vec!["192.0.2.10".parse().unwrap()];
    s.ports[0].node_port = Some(30081);
    s.ports[0].local_endpoints = vec![ep("10.244.0.5", 8080, true)];
    s.external_traffic_policy = TrafficPolicy::Local;
    let o = objects(s.clone());
    let reals = |vs: &str| {
        o.iter()
            .filter(|l| l.starts_with(&format!("ipvs {vs} ->")))
            .count()
    };
    assert_eq!(
        reals("TCP 10.96.0.15:80"),
        3,
        "cluster traffic uses every endpoint"
    );
    assert_eq!(reals("TCP 192.0.2.10:80"), 1, "{o:#?}");
    assert_eq!(reals("TCP 10.201.0.1:30081"), 1);
    assert!(has(&o, "ipset SWY-EXTERNAL-LOCAL 192.0.2.10,tcp:80"));
    assert!(has(&o, "ipset SWY-EXTERNAL-LOCAL 10.201.0.1,tcp:30081"));
    assert!(has(&o, "vip 192.0.2.10"));

    // No local endpoint: external traffic is dropped, cluster traffic still served.
    s.ports[0].local_endpoints.clear();
    let o = objects(s);
    assert!(has(&o, "ipset SWY-DROP 192.0.2.10,tcp:80"), "{o:#?}");
    assert!(has(&o, "ipset SWY-DROP 10.201.0.1,tcp:30081"));
    assert!(has(&o, "ipvs TCP 10.96.0.15:80 rr"));
}

#[test]
fn client_ip_affinity_makes_the_virtual_service_persistent_for_its_timeout() {
    let mut s = service(
        "default/sticky",
        &["10.96.0.16"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.session_affinity_timeout = Some(600);
    assert!(has(&objects(s), "ipvs TCP 10.96.0.16:80 rr persistent 600"));
}

#[test]
fn the_scheduler_annotation_overrides_the_agents_default() {
    let mut s = service(
        "default/hashed",
        &["10.96.0.17"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.ipvs_scheduler = Some(IpvsScheduler::Mh);
    assert!(has(&objects(s), "ipvs TCP 10.96.0.17:80 mh"));
}

#[test]
fn load_balancer_source_ranges_fill_the_firewall_sets_and_a_node_inside_admits_the_lb_ip() {
    let mut s = service(
        "default/lb",
        &["10.96.0.18"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.load_balancer_ips = vec!["198.51.100.10".parse().unwrap()];
    s.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let o = objects(s.clone());
    assert!(has(&o, "ipset SWY-LB-FW 198.51.100.10,tcp:80"));
    assert!(has(
        &o,
        "ipset SWY-LB-SOURCE 198.51.100.10,tcp:80,203.0.113.0/24"
    ));
    assert!(
        has(&o, "ipset SWY-LB-SOURCE 198.51.100.10,tcp:80,198.51.100.10"),
        "203.0.113.7 is a node address inside the range: {o:#?}"
    );

    s.load_balancer_source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
    let o = objects(s);
    assert!(!o.iter().any(|l| l.ends_with(",198.51.100.10")), "{o:#?}");
}

#[test]
fn dual_stack_services_get_each_family_in_its_own_sets() {
    let s = service(
        "default/dual",
        &["10.96.0.19", "fd00:96::19"],
        vec![port(
            "http",
            Protocol::Tcp,
            80,
            vec![ep("10.244.0.5", 8080, true), ep("fd00:244::5", 8080, true)],
        )],
    );
    let o = objects(s);
    assert!(
        has(&o, "ipvs TCP [fd00:96::19]:80 -> [fd00:244::5]:8080 masq 1"),
        "{o:#?}"
    );
    assert!(has(&o, "ipset SWY-CLUSTER-IP6 fd00:96::19,tcp:80"));
    assert!(has(
        &o,
        "ipset SWY-LOOP-BACK6 fd00:244::5,tcp:8080,fd00:244::5"
    ));
    assert!(has(&o, "ipvs TCP 10.96.0.19:80 -> 10.244.0.5:8080 masq 1"));
    assert!(!has(
        &o,
        "ipvs TCP 10.96.0.19:80 -> [fd00:244::5]:8080 masq 1"
    ));
}

#[test]
fn the_kitchen_sink_renders_as_its_golden_file() {
    let text = objects(kitchen_sink()).join("\n") + "\n";
    let path = format!(
        "{}/tests/golden/kitchen_sink.objects",
        env!("CARGO_MANIFEST_DIR")
    );
    if std::env::var_os("SWY_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (run with SWY_BLESS=1 to create it)"));
    assert_eq!(text, want, "rendered (left) differs from {path} (right)");
    // Every VIP is routed through the dummy device; no node address is.
    let addresses: Vec<IpAddr> = plan(kitchen_sink()).addresses.into_iter().collect();
    assert_eq!(addresses.len(), 5, "{addresses:?}");
    assert!(!addresses.contains(&"10.201.0.1".parse().unwrap()));
}
