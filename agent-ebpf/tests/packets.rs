//! Real packets through the eBPF dataplane: a node namespace between a client and three
//! backend namespaces (backend 1 local to the node), the dataplane attached in the node
//! namespace, and a cgroup of the test's own whose processes (`swy-probe`, from the
//! client namespace as a pod or from the node) get socket-level load balancing; the
//! client namespace outside the cgroup stands for the outside world, reaching the node
//! through tc. Needs root, iproute2, iptables and nftables (to show they hold nothing), a
//! kernel 6.1 or later, and the `swy-backend` and `swy-probe` binaries
//! (`cargo build -p switchyard-integration --bins`). The last test reruns the
//! representative ones in user-mode Linux 6.1 (classic tc, interpreted BPF).

mod common;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use common::*;
use switchyard_agent_core::dataplane::Desired;
use switchyard_agent_ebpf::{SnatSource, abi, maps};
use switchyard_integration::{
    netns::{
        EchoServer, HeldConnection, Netns, ProbeError, ProbeOptions, tcp_request_from_port,
        tcp_request_with, udp_request_with,
    },
    uml::{self, Guest},
};
use switchyard_proto::state::{LbAlgorithm, Protocol, ServiceState, TrafficPolicy};

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

const CLIENT: &str = "10.201.0.2";

fn quick() -> ProbeOptions {
    ProbeOptions {
        connect_timeout: Duration::from_millis(500),
        io_timeout: Duration::from_secs(2),
    }
}

/// The backends (and client addresses they saw) of answered requests; panics on a
/// failed one.
fn spread(results: Vec<Result<String, ProbeError>>) -> (BTreeSet<String>, BTreeSet<IpAddr>) {
    let mut names = BTreeSet::new();
    let mut peers = BTreeSet::new();
    for result in results {
        let (name, peer) = answer(&result.unwrap_or_else(|e| panic!("{e}")));
        names.insert(name);
        peers.insert(peer);
    }
    (names, peers)
}

fn from_outside(
    ns: &Netns,
    addr: SocketAddr,
    n: usize,
    udp: bool,
) -> Vec<Result<String, ProbeError>> {
    (0..n)
        .map(|_| {
            if udp {
                udp_request_with(ns, addr, &quick())
            } else {
                tcp_request_with(ns, addr, &quick())
            }
        })
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn web() -> ServiceState {
    lab_service("web", "10.96.0.10", Protocol::Tcp, (80, 8080), &[1, 2, 3])
}

#[test]
fn cluster_ips_balance_from_pods_and_the_node_and_getpeername_shows_the_service_address() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    put(&mut want, web());
    lab.apply(&want, &full());
    let vip = sa("10.96.0.10:80");

    let (backends, peers) = spread(lab.pod().tcp(vip, 40, &quick()).unwrap());
    assert_eq!(backends, names(&["backend-1", "backend-2", "backend-3"]));
    assert_eq!(peers, ips(&[CLIENT]), "a pod's address reaches the backend");
    let (backends, _) = spread(lab.host().tcp(vip, 40, &quick()).unwrap());
    assert_eq!(
        backends,
        names(&["backend-1", "backend-2", "backend-3"]),
        "from the node"
    );
    assert_eq!(
        lab.pod().tcp_peer(vip).unwrap(),
        vip,
        "getpeername from a pod"
    );
    assert_eq!(
        lab.host().tcp_peer(vip).unwrap(),
        vip,
        "getpeername on the node"
    );
    assert_no_netfilter_objects(lab.topology.node(), &["10.96.0.10", "8080"]);
}

#[test]
fn udp_balances_connected_and_unconnected_and_replies_come_from_the_service_address() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    put(
        &mut want,
        lab_service("dns", "10.96.0.11", Protocol::Udp, (53, 5353), &[1, 2, 3]),
    );
    lab.apply(&want, &full());
    let vip = sa("10.96.0.11:53");

    let (backends, _) = spread(lab.pod().udp(vip, 40, &quick()).unwrap());
    assert_eq!(
        backends,
        names(&["backend-1", "backend-2", "backend-3"]),
        "connected"
    );
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let (reply, from) = lab.pod().udp_unconnected(vip).unwrap();
        assert_eq!(from, vip, "recvfrom reports the Service address: {reply}");
        seen.insert(answer(&reply).0);
    }
    assert_eq!(seen.len(), 3, "unconnected sockets balance too: {seen:?}");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once_from_pods_and_from_outside() {
    let mut lab = Lab::start(1);
    let mut want = Desired::new();
    let mut empty = service(
        "default/empty",
        &["10.96.0.12"],
        vec![
            port("http", Protocol::Tcp, 80, vec![]),
            port("dns", Protocol::Udp, 53, vec![]),
        ],
    );
    empty.ports[0].node_port = Some(30099);
    put(&mut want, empty);
    lab.apply(&want, &full());

    for (what, result) in [
        (
            "TCP from a pod",
            lab.pod()
                .tcp(sa("10.96.0.12:80"), 1, &quick())
                .unwrap()
                .remove(0),
        ),
        (
            "UDP from a pod",
            lab.pod()
                .udp(sa("10.96.0.12:53"), 1, &quick())
                .unwrap()
                .remove(0),
        ),
        (
            "TCP from outside",
            from_outside(lab.outside(), sa("10.96.0.12:80"), 1, false).remove(0),
        ),
        (
            "UDP from outside",
            from_outside(lab.outside(), sa("10.96.0.12:53"), 1, true).remove(0),
        ),
        (
            "node port from outside",
            from_outside(lab.outside(), sa("10.201.0.1:30099"), 1, false).remove(0),
        ),
    ] {
        let error = result.expect_err(what);
        assert!(error.is_refused(), "{what}: {error}");
        let after = error.after().unwrap();
        assert!(
            after < Duration::from_millis(100),
            "{what}: refused after {after:?}"
        );
    }
}

#[test]
fn a_traffic_policy_with_no_endpoint_here_drops_so_connects_time_out() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    let mut internal = web();
    internal.key.name = "itp".into();
    internal.cluster_ips = vec!["10.96.0.15".parse().unwrap()];
    internal.internal_traffic_policy = TrafficPolicy::Local;
    put(&mut want, internal);
    let mut external = web();
    external.key.name = "etp".into();
    external.cluster_ips = vec!["10.96.0.16".parse().unwrap()];
    external.external_traffic_policy = TrafficPolicy::Local;
    external.ports[0].node_port = Some(30016);
    put(&mut want, external);
    lab.apply(&want, &full());

    let pod = lab
        .pod()
        .tcp(sa("10.96.0.15:80"), 1, &quick())
        .unwrap()
        .remove(0);
    assert!(pod.as_ref().is_err_and(ProbeError::is_timeout), "{pod:?}");
    let outside = from_outside(lab.outside(), sa("10.201.0.1:30016"), 1, false).remove(0);
    assert!(
        outside.as_ref().is_err_and(ProbeError::is_timeout),
        "{outside:?}"
    );
    // From the node the external address still reaches every endpoint.
    let (backends, _) = spread(
        lab.host()
            .tcp(sa("10.201.0.1:30016"), 20, &quick())
            .unwrap(),
    );
    assert_eq!(backends.len(), 3);
}

fn source_natted_to_the_node(snat_source: SnatSource) {
    let mut lab = Lab::start_with(3, |c| c.snat_source = snat_source);
    let mut want = Desired::new();
    let mut s = web();
    s.ports[0].node_port = Some(30080);
    s.external_ips = vec!["10.202.0.10".parse().unwrap()];
    put(&mut want, s);
    lab.apply(&want, &full());
    for target in ["10.201.0.1:30080", "10.202.0.10:80"] {
        let mut backends = BTreeSet::new();
        for result in from_outside(lab.outside(), sa(target), 30, false) {
            let (name, peer) = answer(&result.unwrap_or_else(|e| panic!("{e}")));
            // The node's address on the backend's link, as the kernel picks a source for
            // the route there (backend-<i> sits behind to-b<i>, 10.244.<i>.1).
            let i = name.strip_prefix("backend-").unwrap();
            assert_eq!(
                peer,
                format!("10.244.{i}.1").parse::<IpAddr>().unwrap(),
                "{target}: {name} saw the client as {peer}"
            );
            backends.insert(name);
        }
        assert_eq!(
            backends,
            names(&["backend-1", "backend-2", "backend-3"]),
            "{target}"
        );
    }
}

#[test]
fn node_ports_and_external_ips_from_outside_are_source_natted_to_the_node() {
    source_natted_to_the_node(SnatSource::Auto);
}

/// The path of kernels whose `bpf_fib_lookup` names no source address.
#[test]
fn source_nat_takes_the_out_device_s_address_from_the_agent_s_table_alike() {
    source_natted_to_the_node(SnatSource::Devices);
}

/// `web` under `externalTrafficPolicy: Local` (backend 1 is the local endpoint) on node
/// port 30080.
fn web_local_on_node_port() -> ServiceState {
    let mut s = web();
    s.external_traffic_policy = TrafficPolicy::Local;
    s.ports[0].node_port = Some(30080);
    s.ports[0].local_endpoints = vec![ep("10.244.1.2", 8080, true)];
    s
}

#[test]
fn external_traffic_policy_local_reaches_only_the_local_endpoint_and_keeps_the_client_address() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    let mut s = web_local_on_node_port();
    s.external_ips = vec!["10.202.0.10".parse().unwrap()];
    put(&mut want, s);
    lab.apply(&want, &full());
    for target in ["10.201.0.1:30080", "10.202.0.10:80"] {
        let (backends, peers) = spread(from_outside(lab.outside(), sa(target), 20, false));
        assert_eq!(backends, names(&["backend-1"]), "{target}");
        assert_eq!(peers, ips(&[CLIENT]), "{target} keeps the client address");
    }
    let (backends, _) = spread(lab.pod().tcp(sa("10.201.0.1:30080"), 30, &quick()).unwrap());
    assert_eq!(backends.len(), 3, "pods on the node use every endpoint");
}

/// A client that reached a Service keeping its address (no source NAT, so the reply
/// entry is keyed by the client's own port) and then connects to the backend itself
/// from the same port must be answered by the backend: the old flow's entry must not
/// turn the new connection's replies into the Service's (the client would reset them
/// and time out). The conformance matrix met this as an occasional timeout.
#[test]
fn a_client_reusing_its_port_to_reach_a_backend_directly_is_not_taken_for_an_old_flow() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    put(&mut want, web_local_on_node_port());
    lab.apply(&want, &full());
    let port = 45123;
    let via_service =
        tcp_request_from_port(lab.outside(), port, sa("10.201.0.1:30080"), &quick()).unwrap();
    assert_eq!(
        answer(&via_service),
        ("backend-1".to_string(), CLIENT.parse().unwrap())
    );
    let direct = tcp_request_from_port(lab.outside(), port, sa("10.244.1.2:8080"), &quick())
        .expect("the backend answers a direct connection from a port a Service flow used");
    assert_eq!(answer(&direct).0, "backend-1");
}

#[test]
fn load_balancer_source_ranges_admit_only_their_sources() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    let mut s = web();
    s.load_balancer_ips = vec!["10.203.0.10".parse().unwrap()];
    s.external_ips = vec!["10.202.0.10".parse().unwrap()];
    s.load_balancer_source_ranges = vec!["10.201.0.2/32".parse().unwrap()];
    put(&mut want, s.clone());
    lab.apply(&want, &full());
    assert!(from_outside(lab.outside(), sa("10.203.0.10:80"), 1, false)[0].is_ok());

    s.load_balancer_source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
    put(&mut want, s);
    lab.apply(&want, &upsert(&["default/web"]));
    let refused = from_outside(lab.outside(), sa("10.203.0.10:80"), 1, false).remove(0);
    assert!(
        refused.as_ref().is_err_and(ProbeError::is_timeout),
        "{refused:?}"
    );
    assert!(
        from_outside(lab.outside(), sa("10.202.0.10:80"), 1, false)[0].is_ok(),
        "an external IP has no source ranges"
    );
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    let mut s = web();
    s.session_affinity_timeout = Some(10800);
    s.ports[0].node_port = Some(30080);
    put(&mut want, s);
    lab.apply(&want, &full());
    let (backends, _) = spread(lab.pod().tcp(sa("10.96.0.10:80"), 20, &quick()).unwrap());
    assert_eq!(backends.len(), 1, "from a pod: {backends:?}");
    let (backends, _) = spread(from_outside(
        lab.outside(),
        sa("10.201.0.1:30080"),
        20,
        false,
    ));
    assert_eq!(backends.len(), 1, "from outside: {backends:?}");
}

#[test]
fn make_before_break_no_connect_sees_a_half_written_service() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    put(&mut want, web());
    lab.apply(&want, &full());
    let vip = sa("10.96.0.10:80");
    let traffic = lab
        .pod()
        .connection_loop(vip, Duration::from_millis(1))
        .unwrap();
    assert!(traffic.wait_for_successes(10, Duration::from_secs(10)));
    let sets: [&[u8]; 4] = [&[1, 2], &[2, 3], &[3], &[1, 2, 3]];
    let started = Instant::now();
    let mut updates = 0;
    while started.elapsed() < Duration::from_secs(4) {
        for (i, set) in sets.iter().enumerate() {
            let mut s = web();
            s.ports[0].cluster_endpoints = set
                .iter()
                .map(|b| ep(&format!("10.244.{b}.2"), 8080, *b == 1))
                .collect();
            s.ebpf_lb = Some(if (updates + i) % 3 == 0 {
                LbAlgorithm::Maglev
            } else {
                LbAlgorithm::Random
            });
            put(&mut want, s);
            lab.apply(&want, &upsert(&["default/web"]));
            updates += 1;
        }
    }
    let stats = traffic.stop();
    eprintln!("{updates} updates under {} connections", stats.attempts);
    assert!(updates > 100, "{updates}");
    assert!(stats.succeeded > 200, "{stats:?}");
    assert_eq!(stats.failed, 0, "{:?}", stats.failures);
    assert_eq!(stats.by_backend.len(), 3, "{stats:?}");
}

#[test]
fn removing_a_udp_backend_flushes_its_conntrack_entries() {
    let mut lab = Lab::start(3);
    let mut want = Desired::new();
    let mut dns = lab_service("dns", "10.96.0.11", Protocol::Udp, (53, 5353), &[2]);
    dns.ports[0].node_port = Some(30053);
    put(&mut want, dns.clone());
    lab.apply(&want, &full());
    for result in from_outside(lab.outside(), sa("10.201.0.1:30053"), 5, true) {
        assert!(result.unwrap().starts_with("backend-2 "));
    }
    let to_backend_2 = |lab: &mut Lab| {
        maps::entries(&lab.dp().maps().ct, "swy_ct")
            .unwrap()
            .into_iter()
            .filter(|(k, v)| {
                k.proto == 17
                    && (abi::ip(&v.addr) == "10.244.2.2".parse::<IpAddr>().unwrap()
                        || abi::ip(&k.src) == "10.244.2.2".parse::<IpAddr>().unwrap())
            })
            .count()
    };
    assert!(
        to_backend_2(&mut lab) >= 10,
        "a forward and a reply entry per flow"
    );
    dns.ports[0].cluster_endpoints = vec![ep("10.244.3.2", 5353, false)];
    put(&mut want, dns);
    lab.apply(&want, &upsert(&["default/dns"]));
    assert_eq!(to_backend_2(&mut lab), 0, "flushed with the endpoint");
    for result in from_outside(lab.outside(), sa("10.201.0.1:30053"), 3, true) {
        assert!(result.unwrap().starts_with("backend-3 "));
    }
}

fn ipv6_balances(snat_source: SnatSource) {
    let mut lab = Lab::start_with(2, |c| c.snat_source = snat_source);
    let mut want = Desired::new();
    let endpoints = (1..=2)
        .map(|i| ep(&format!("fd00:244:{i}::2"), 8080, i == 1))
        .collect();
    let mut s = service(
        "default/web6",
        &["fd00:96::10"],
        vec![port("http", Protocol::Tcp, 80, endpoints)],
    );
    s.ports[0].node_port = Some(30086);
    put(&mut want, s);
    lab.apply(&want, &full());
    let (backends, _) = spread(lab.pod().tcp(sa("[fd00:96::10]:80"), 20, &quick()).unwrap());
    assert_eq!(backends, names(&["backend-1", "backend-2"]), "from a pod");
    let (backends, peers) = spread(from_outside(
        lab.outside(),
        sa("[fd00:201::1]:30086"),
        20,
        false,
    ));
    assert_eq!(
        backends,
        names(&["backend-1", "backend-2"]),
        "node port from outside"
    );
    assert_eq!(
        peers,
        ips(&["fd00:244:1::1", "fd00:244:2::1"]),
        "source-NATed to the node's address on each backend's link"
    );
    let (backends, _) = spread(from_outside(
        lab.outside(),
        sa("[fd00:96::10]:80"),
        20,
        false,
    ));
    assert_eq!(backends.len(), 2, "routed cluster IP from outside");
}

#[test]
fn ipv6_cluster_ips_and_node_ports_balance_too() {
    ipv6_balances(SnatSource::Auto);
}

#[test]
fn ipv6_source_nat_takes_the_out_device_s_address_from_the_agent_s_table_alike() {
    ipv6_balances(SnatSource::Devices);
}

/// The representative tests above in user-mode Linux 6.1 (Debian's `linux.uml`: classic
/// tc filters, BPF interpreted), in two guests that run side by side: the socket level
/// here, tc in the next.
#[test]
fn in_user_mode_linux_6_1_pods_reach_cluster_ips_and_services_without_endpoints_refuse() {
    uml::always_in_guest(Guest::new().timeout(Duration::from_secs(600)), || {
        cluster_ips_balance_from_pods_and_the_node_and_getpeername_shows_the_service_address();
        a_service_without_endpoints_is_refused_at_once_from_pods_and_from_outside();
    });
}

#[test]
fn in_user_mode_linux_6_1_node_ports_from_outside_are_source_natted_or_kept_local() {
    uml::always_in_guest(Guest::new().timeout(Duration::from_secs(600)), || {
        node_ports_and_external_ips_from_outside_are_source_natted_to_the_node();
        source_nat_takes_the_out_device_s_address_from_the_agent_s_table_alike();
        ipv6_source_nat_takes_the_out_device_s_address_from_the_agent_s_table_alike();
        external_traffic_policy_local_reaches_only_the_local_endpoint_and_keeps_the_client_address(
        );
    });
}

#[test]
fn a_connection_netfilter_translated_before_the_switch_keeps_its_endpoint() {
    let mut lab = Lab::start(3);
    let vip = sa("10.96.0.20:80");
    // Backend 2 only answers the held connection: a packet balanced afresh to 1 or 3
    // meets no listener and the connection is reset.
    let backend_2 = &lab.topology.backends()[1];
    let _echo = EchoServer::start(
        backend_2.ns(),
        "backend-2",
        SocketAddr::new(backend_2.ip().into(), 9000),
    )
    .unwrap();
    // What the node's previous dataplane did: netfilter sent this Service to backend 2.
    lab.topology
        .node()
        .exec(
            "iptables -t nat -A PREROUTING -d 10.96.0.20/32 -p tcp --dport 80 \
             -j DNAT --to-destination 10.244.2.2:9000"
                .split_whitespace(),
        )
        .unwrap();
    let mut held = HeldConnection::open(lab.outside(), None, vip).unwrap();
    assert_eq!(held.ask().unwrap(), "backend-2");

    // The switch: eBPF now balances the Service, to the endpoints but backend 2.
    let mut want = Desired::new();
    put(
        &mut want,
        lab_service("held", "10.96.0.20", Protocol::Tcp, (80, 9000), &[1, 3]),
    );
    lab.apply(&want, &full());
    for _ in 0..5 {
        assert_eq!(
            held.ask().expect("the held connection survives the switch"),
            "backend-2"
        );
    }
}
