//! Golden rules: each case renders one Service and compares its kernel objects with
//! `tests/golden/<case>.rules`. `SWY_BLESS=1 cargo test --test golden` rewrites the
//! files; review the diff. Each case also asserts the lines that carry its semantics.

mod common;

use common::*;
use switchyard_agent_iptables::{RenderConfig, render::render_service};
use switchyard_proto::state::{Protocol, ServiceState, TrafficPolicy};

fn cfg() -> RenderConfig {
    RenderConfig {
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/48".parse().unwrap(),
        ],
        ..RenderConfig::default()
    }
}

fn golden_with(case: &str, state: ServiceState, cfg: &RenderConfig) -> Vec<String> {
    let name = state.key.to_string();
    let mut service = desired(state);
    service.version = 0x0123_4567_89ab_cdef;
    let lines = render_service(&name, &service, cfg).objects();
    let text = lines.join("\n") + "\n";
    let path = format!("{}/tests/golden/{case}.rules", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("SWY_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e} (run with SWY_BLESS=1 to create it)"));
    assert_eq!(
        text, want,
        "{case}: rendered (left) differs from {path} (right)"
    );
    lines
}

fn golden(case: &str, state: ServiceState) -> Vec<String> {
    golden_with(case, state, &cfg())
}

fn has(lines: &[String], needle: &str) -> bool {
    lines.iter().any(|l| l.contains(needle))
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

#[test]
fn cluster_ip_tcp_with_three_endpoints_splits_a_third_then_a_half() {
    let lines = golden(
        "clusterip_tcp_3",
        service(
            "ns/web",
            &["10.96.0.10"],
            vec![port("http", Protocol::Tcp, 80, three_endpoints())],
        ),
    );
    assert!(has(
        &lines,
        "ipv4 nat -A SWY-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"ns/web:http cluster IP\" -m tcp --dport 80 -j SWY-SVC-"
    ));
    assert!(has(
        &lines,
        "-m statistic --mode random --probability 0.33333333349 -j SWY-SEP-"
    ));
    assert!(has(
        &lines,
        "-m statistic --mode random --probability 0.50000000000 -j SWY-SEP-"
    ));
    assert_eq!(count(&lines, "-j DNAT --to-destination"), 3);
    assert!(
        has(&lines, "! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp"),
        "off-cluster traffic is masqueraded"
    );
    assert!(
        has(&lines, "ipv4 nat -A SWY-VER-") && has(&lines, "\"ns/web version=0123456789abcdef\"")
    );
    assert!(!has(&lines, "ipv6"));
}

#[test]
fn udp_and_sctp_ports_use_their_protocol_matches() {
    let lines = golden(
        "udp",
        service(
            "kube-system/dns",
            &["10.96.0.10"],
            vec![port(
                "dns",
                Protocol::Udp,
                53,
                vec![ep("10.244.0.7", 53, true)],
            )],
        ),
    );
    assert!(has(
        &lines,
        "-p udp -m comment --comment \"kube-system/dns:dns cluster IP\" -m udp --dport 53"
    ));
    assert!(has(
        &lines,
        "-p udp -m comment --comment \"kube-system/dns:dns\" -m udp -j DNAT --to-destination 10.244.0.7:53"
    ));
    let lines = golden(
        "sctp",
        service(
            "tel/diameter",
            &["10.96.0.30"],
            vec![port(
                "",
                Protocol::Sctp,
                3868,
                vec![ep("10.244.0.8", 3868, true)],
            )],
        ),
    );
    // An unnamed port: the comment is the bare Service name, as kube-proxy prints it.
    assert!(has(
        &lines,
        "-p sctp -m comment --comment \"tel/diameter cluster IP\" -m sctp --dport 3868"
    ));
}

#[test]
fn a_port_without_endpoints_is_rejected_in_the_filter_table() {
    let mut s = service(
        "ns/empty",
        &["10.96.0.11"],
        vec![port("http", Protocol::Tcp, 80, vec![])],
    );
    s.ports[0].node_port = Some(30081);
    s.external_ips = vec!["192.0.2.1".parse().unwrap()];
    let lines = golden("no_endpoints", s);
    assert!(has(
        &lines,
        "ipv4 filter -A SWY-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment \"ns/empty:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable"
    ));
    assert!(has(
        &lines,
        "ipv4 filter -A SWY-EXTERNAL-SERVICES -d 192.0.2.1/32"
    ));
    assert!(has(
        &lines,
        "-m addrtype --dst-type LOCAL -m tcp --dport 30081 -j REJECT"
    ));
    assert!(
        !has(&lines, " nat -A SWY-SERVICES"),
        "no nat rule without endpoints"
    );
    assert!(!has(&lines, "SWY-SVC-"));
}

#[test]
fn internal_local_policy_without_local_endpoints_drops_when_usable_elsewhere() {
    let mut s = service(
        "ns/itp",
        &["10.96.0.12"],
        vec![port("http", Protocol::Tcp, 80, vec![])],
    );
    s.internal_traffic_policy = TrafficPolicy::Local;
    s.ports[0].usable_ipv4 = true; // endpoints exist, on other nodes
    let lines = golden("itp_local_drop", s.clone());
    assert!(has(
        &lines,
        "ipv4 filter -A SWY-SERVICES -d 10.96.0.12/32 -p tcp -m comment --comment \"ns/itp:http has no local endpoints\" -m tcp --dport 80 -j DROP"
    ));
    assert!(!has(&lines, " nat -A SWY-SERVICES"));

    // With a local endpoint: cluster IP goes to the local chain, masquerade there.
    s.ports[0].local_endpoints = vec![ep("10.244.0.9", 80, true)];
    let lines = golden("itp_local", s);
    assert!(has(
        &lines,
        "--comment \"ns/itp:http cluster IP\" -m tcp --dport 80 -j SWY-SVL-"
    ));
    assert!(has(&lines, "ipv4 nat -A SWY-SVL-") && !has(&lines, "SWY-SVC-"));
}

#[test]
fn node_port_jumps_to_the_external_chain_which_masquerades() {
    let mut s = service(
        "ns/np",
        &["10.96.0.13"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.ports[0].node_port = Some(30080);
    let lines = golden("nodeport", s);
    assert!(has(
        &lines,
        "ipv4 nat -A SWY-NODEPORTS -p tcp -m comment --comment \"ns/np:http\" -m tcp --dport 30080 -j SWY-EXT-"
    ));
    assert!(has(
        &lines,
        "--comment \"masquerade traffic for ns/np:http external destinations\" -j SWY-MARK-MASQ"
    ));
    assert!(
        has(&lines, "ipv4 nat -A SWY-EXT-") && has(&lines, "--comment \"ns/np:http\" -j SWY-SVC-")
    );
}

#[test]
fn external_ip_jumps_to_the_external_chain() {
    let mut s = service(
        "ns/ext",
        &["10.96.0.14"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.external_ips = vec!["192.0.2.10".parse().unwrap()];
    let lines = golden("external_ip", s);
    assert!(has(
        &lines,
        "-A SWY-SERVICES -d 192.0.2.10/32 -p tcp -m comment --comment \"ns/ext:http external IP\" -m tcp --dport 80 -j SWY-EXT-"
    ));
}

#[test]
fn load_balancer_source_ranges_go_through_the_firewall_chain() {
    let mut s = service(
        "ns/lb",
        &["10.96.0.15"],
        vec![port("https", Protocol::Tcp, 443, three_endpoints())],
    );
    s.load_balancer_ips = vec!["198.51.100.10".parse().unwrap()];
    s.load_balancer_source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    let lines = golden("lb_source_ranges", s);
    assert!(has(
        &lines,
        "--comment \"ns/lb:https loadbalancer IP\" -m tcp --dport 443 -j SWY-FW-"
    ));
    assert!(has(
        &lines,
        "-s 203.0.113.0/24 -m comment --comment \"ns/lb:https loadbalancer IP\" -j SWY-EXT-"
    ));
    assert!(has(
        &lines,
        "ipv4 filter -A SWY-FIREWALL -d 198.51.100.10/32 -p tcp -m comment --comment \"ns/lb:https traffic not accepted by SWY-FW-"
    ));
    assert!(has(&lines, "-m tcp --dport 443 -j DROP"));
}

#[test]
fn external_local_policy_keeps_the_source_and_short_circuits_pods() {
    let mut s = service(
        "ns/etp",
        &["10.96.0.16"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.ports[0].node_port = Some(30082);
    s.ports[0].local_endpoints = vec![ep("10.244.0.5", 8080, true)];
    s.external_traffic_policy = TrafficPolicy::Local;
    s.health_check_node_port = Some(32001);
    let lines = golden("etp_local", s.clone());
    assert!(has(
        &lines,
        "-s 10.244.0.0/16 -m comment --comment \"pod traffic for ns/etp:http external destinations\" -j SWY-SVC-"
    ));
    assert!(has(
        &lines,
        "--comment \"masquerade LOCAL traffic for ns/etp:http external destinations\" -m addrtype --src-type LOCAL -j SWY-MARK-MASQ"
    ));
    assert!(has(
        &lines,
        "-m comment --comment \"ns/etp:http\" -j SWY-SVL-"
    ));
    assert!(
        !has(&lines, "masquerade traffic for"),
        "no masquerade of external traffic"
    );
    assert!(has(
        &lines,
        "ipv4 filter -A SWY-NODEPORTS -p tcp -m comment --comment \"ns/etp health check node port\" -m tcp --dport 32001 -j ACCEPT"
    ));

    // No local endpoint: external traffic is dropped, local traffic still served.
    s.ports[0].local_endpoints.clear();
    let lines = golden("etp_local_none_local", s);
    assert!(has(
        &lines,
        "ipv4 filter -A SWY-EXTERNAL-SERVICES -p tcp -m comment --comment \"ns/etp:http has no local endpoints\" -m addrtype --dst-type LOCAL -m tcp --dport 30082 -j DROP"
    ));
    assert!(has(&lines, "ipv4 nat -A SWY-NODEPORTS"));
    assert!(!has(&lines, "SWY-SVL-"));
}

#[test]
fn client_ip_affinity_checks_and_sets_recent_lists() {
    let mut s = service(
        "ns/sticky",
        &["10.96.0.17"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    s.session_affinity_timeout = Some(10800);
    let lines = golden("affinity", s);
    assert_eq!(
        count(
            &lines,
            "-m recent --rcheck --seconds 10800 --reap --name SWY-SEP-"
        ),
        3
    );
    assert_eq!(count(&lines, "-m recent --set --name SWY-SEP-"), 3);
    assert!(has(&lines, "--mask 255.255.255.255 --rsource"));
}

#[test]
fn dual_stack_splits_into_ipv4_and_ipv6_rules() {
    let s = service(
        "ns/dual",
        &["10.96.0.18", "fd00:96::18"],
        vec![port(
            "http",
            Protocol::Tcp,
            80,
            vec![ep("10.244.0.5", 8080, true), ep("fd00:244::5", 8080, true)],
        )],
    );
    let lines = golden("dual_stack", s);
    assert!(has(&lines, "ipv4 nat -A SWY-SERVICES -d 10.96.0.18/32"));
    assert!(has(&lines, "ipv6 nat -A SWY-SERVICES -d fd00:96::18/128"));
    assert!(
        has(&lines, "ipv6 nat -A SWY-SEP-") && has(&lines, "--to-destination [fd00:244::5]:8080")
    );
    assert!(has(&lines, "! -s fd00:244::/48 -d fd00:96::18/128"));
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("ipv4") && l.contains("fd00"))
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("ipv6") && l.contains("10.244"))
    );
}

#[test]
fn endpoints_masquerade_their_own_hairpin_traffic() {
    let lines = golden_with(
        "hairpin_masquerade_all",
        service(
            "ns/hp",
            &["10.96.0.19"],
            vec![port(
                "http",
                Protocol::Tcp,
                80,
                vec![ep("10.244.0.5", 8080, true)],
            )],
        ),
        &RenderConfig {
            masquerade_all: true,
            ..RenderConfig::default()
        },
    );
    assert!(
        has(&lines, "-A SWY-SEP-")
            && has(
                &lines,
                "-s 10.244.0.5/32 -m comment --comment \"ns/hp:http\" -j SWY-MARK-MASQ"
            )
    );
    assert!(
        has(&lines, "-A SWY-SVC-")
            && has(
                &lines,
                " -d 10.96.0.19/32 -p tcp -m comment --comment \"ns/hp:http cluster IP\" -m tcp --dport 80 -j SWY-MARK-MASQ"
            )
    );
    assert!(!has(&lines, "! -s"), "masquerade-all needs no cluster CIDR");
}

#[test]
fn names_that_could_end_a_comment_never_reach_rule_text_unescaped() {
    // The agent refuses such names when it converts what the controller sent; this is
    // the second line of defence, for a state that got past that.
    let mut state = service(
        "shop/x",
        &["10.96.0.30"],
        vec![port("http", Protocol::Tcp, 80, three_endpoints())],
    );
    state.key.namespace = "shop\" -j ACCEPT\n-A INPUT".into();
    state.key.name = "x\\\"\n*filter".into();
    state.ports[0].name = "h\"\nCOMMIT".into();
    let name = state.key.to_string();
    let lines = render_service(&name, &desired(state), &cfg()).objects();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(!line.contains('\n'), "{line}");
        assert!(!line.contains('\\'), "{line}");
        // Quotes only around comment texts: an even number, each pair one comment.
        assert_eq!(
            line.matches('"').count(),
            2 * line.matches("--comment").count(),
            "{line}"
        );
    }
    assert!(has(&lines, "shop_ -j ACCEPT_-A INPUT/x___"), "{lines:#?}");
}
