//! The network-namespace harness itself, proven with real packets and no switchyard code:
//! backends answer directly, one hand-written DNAT rule behaves like a ClusterIP, refused
//! and timed-out connections are told apart, and nothing is left behind.
//!
//! Needs root, `ip` (iproute2) and `iptables`; a missing prerequisite fails the test with
//! what to install.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use switchyard_integration::netns::{
    self, Backend, ConnectionLoop, Netns, NetnsError, ProbeOptions, Topology, tcp_request,
    tcp_request_with, udp_request,
};

const HTTP: u16 = 8080;
const DNS: u16 = 5353;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn three_backends() -> (Topology, Vec<Backend>) {
    let topology = Topology::builder()
        .backends(3)
        .local_backend(1)
        .build()
        .expect("build topology (needs root and iproute2)");
    let backends = topology
        .start_backends(&[HTTP], &[DNS])
        .expect("start swy-backend in every backend namespace");
    (topology, backends)
}

/// `backend-1 from 10.201.0.2:53422\n` → (`backend-1`, 10.201.0.2).
fn who_and_from(reply: &str) -> (String, IpAddr) {
    let mut words = reply.split_whitespace();
    let name = words.next().expect("name").to_owned();
    assert_eq!(words.next(), Some("from"), "reply {reply:?}");
    let peer: SocketAddr = words.next().expect("peer").parse().expect("peer address");
    assert!(reply.ends_with('\n'), "reply {reply:?}");
    (name, peer.ip())
}

#[test]
fn prerequisites_are_installed() {
    netns::require_prerequisites().expect("network-namespace prerequisites");
    netns::require_tool("iptables", &["--version"], "iptables").expect("iptables");
}

#[test]
fn a_missing_tool_fails_saying_what_to_install() {
    let err = netns::require_tool("swy-no-such-tool", &["--version"], "swy-tools")
        .expect_err("a missing tool is an error, not a skip");
    assert!(matches!(err, NetnsError::MissingTool { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("install the Debian package `swy-tools`"),
        "{err}"
    );
}

#[test]
fn node_forwards_and_routes_localnet() {
    let topology = Topology::builder().build().expect("topology");
    for key in [
        "ipv4/ip_forward",
        "ipv4/conf/all/route_localnet",
        "ipv6/conf/all/forwarding",
    ] {
        let value = topology
            .node()
            .exec(["cat", &format!("/proc/sys/net/{key}")])
            .expect("read sysctl");
        assert_eq!(value.trim(), "1", "{key} in the node");
    }
    let value = topology
        .client()
        .exec(["cat", "/proc/sys/net/ipv4/ip_forward"])
        .expect("read sysctl");
    assert_eq!(value.trim(), "0", "the client does not forward");
}

#[test]
fn every_backend_answers_the_client_and_the_node_directly_over_tcp_and_udp() {
    let (topology, _backends) = three_backends();
    for backend in topology.backends() {
        let expected_name = backend.name().to_owned();

        let (name, from) =
            who_and_from(&tcp_request(topology.client(), backend.ip(), HTTP).unwrap());
        assert_eq!(
            (name.as_str(), from),
            (expected_name.as_str(), topology.client_ip().into())
        );
        let (name, from) =
            who_and_from(&udp_request(topology.client(), backend.ip(), DNS).unwrap());
        assert_eq!(
            (name.as_str(), from),
            (expected_name.as_str(), topology.client_ip().into())
        );

        // The node reaches pods from its own address on the pod's link.
        let node_side = IpAddr::V4(Ipv4Addr::new(10, 244, backend.index(), 1));
        let (name, from) = who_and_from(&tcp_request(topology.node(), backend.ip(), HTTP).unwrap());
        assert_eq!((name.as_str(), from), (expected_name.as_str(), node_side));
        let (name, from) = who_and_from(&udp_request(topology.node(), backend.ip(), DNS).unwrap());
        assert_eq!((name.as_str(), from), (expected_name.as_str(), node_side));

        let ip6 = backend.ip6().expect("IPv6 is on by default");
        let client_ip6 = IpAddr::V6(topology.client_ip6().unwrap());
        let (name, from) = who_and_from(&tcp_request(topology.client(), ip6, HTTP).unwrap());
        assert_eq!((name.as_str(), from), (expected_name.as_str(), client_ip6));
        let (name, from) = who_and_from(&udp_request(topology.client(), ip6, DNS).unwrap());
        assert_eq!((name.as_str(), from), (expected_name.as_str(), client_ip6));
    }
    assert!(topology.backend(1).is_local());
    assert_eq!(topology.backend(1).node_name(), topology.node_name());
    assert!(!topology.backend(2).is_local());
    assert_ne!(topology.backend(2).node_name(), topology.node_name());
}

#[test]
fn one_hand_written_dnat_rule_reaches_backend_1_with_the_client_source_preserved() {
    netns::require_tool("iptables", &["--version"], "iptables").expect("iptables");
    let (topology, _backends) = three_backends();
    let node = topology.node();
    for chain in ["PREROUTING", "OUTPUT"] {
        node.exec([
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            chain,
            "-d",
            "10.96.0.10",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
            "--to-destination",
            "10.244.1.2:8080",
        ])
        .expect("install DNAT rule");
    }

    let (name, from) = who_and_from(&tcp_request(topology.client(), CLUSTER_IP, 80).unwrap());
    assert_eq!(name, "backend-1");
    assert_eq!(
        from,
        IpAddr::V4(topology.client_ip()),
        "source IP preserved"
    );

    // From the node itself the OUTPUT rule applies; the default route gives the VIP a route.
    let (name, _) = who_and_from(&tcp_request(node, CLUSTER_IP, 80).unwrap());
    assert_eq!(name, "backend-1");

    // A NodePort-style rule on the node IP: PREROUTING sees the client's packets to a
    // local address and the backend still sees the client.
    node.exec([
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        "10.201.0.1",
        "-p",
        "tcp",
        "--dport",
        "30080",
        "-j",
        "DNAT",
        "--to-destination",
        "10.244.2.2:8080",
    ])
    .expect("install NodePort-style DNAT rule");
    let (name, from) =
        who_and_from(&tcp_request(topology.client(), topology.node_ip(), 30080).unwrap());
    assert_eq!(name, "backend-2");
    assert_eq!(
        from,
        IpAddr::V4(topology.client_ip()),
        "source IP preserved"
    );

    // Nothing else was rewritten.
    let err = tcp_request(topology.client(), CLUSTER_IP, 81).unwrap_err();
    assert!(err.is_timeout(), "{err}");
}

#[test]
fn a_closed_port_is_refused_at_once_and_an_unrouted_address_times_out() {
    let (topology, _backends) = three_backends();
    let client = topology.client();

    let err = tcp_request(client, topology.backend(2).ip(), 9999).unwrap_err();
    assert!(err.is_refused(), "{err}");
    assert!(err.after().unwrap() < Duration::from_millis(300), "{err}");

    let err = udp_request(client, topology.backend(2).ip(), 9999).unwrap_err();
    assert!(err.is_refused(), "{err}");
    assert!(err.after().unwrap() < Duration::from_millis(300), "{err}");

    let options = ProbeOptions {
        connect_timeout: Duration::from_millis(500),
        ..ProbeOptions::default()
    };
    let unrouted = SocketAddr::from(([203, 0, 113, 1], 80));
    let err = tcp_request_with(client, unrouted, &options).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(err.after().unwrap() >= Duration::from_millis(500), "{err}");
}

#[test]
fn the_connection_loop_counts_answers_then_failures_once_the_backend_dies() {
    let (topology, mut backends) = three_backends();
    let target = SocketAddr::from((topology.backend(3).ip(), HTTP));
    let client_loop =
        ConnectionLoop::start(topology.client(), target, Duration::from_millis(10)).unwrap();
    assert!(client_loop.wait_for_successes(20, Duration::from_secs(10)));
    let before = client_loop.stats();
    assert_eq!(before.failed, 0, "{:?}", before.failures);
    assert_eq!(before.by_backend.get("backend-3"), Some(&before.succeeded));

    backends[2].process().kill().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let after = client_loop.stop();
    assert!(after.failed > 0, "{after:?}");
    // A request in flight when the backend died may be reset; later ones are refused.
    assert!(
        after.failures.last().unwrap().contains("refused"),
        "{:?}",
        after.failures
    );
    assert_eq!(after.attempts, after.succeeded + after.failed);
}

#[test]
fn guards_remove_every_namespace_and_process_even_on_panic() {
    let names = Mutex::new(Vec::new());
    let pids = Mutex::new(Vec::new());
    let outcome = std::panic::catch_unwind(|| {
        let (topology, mut backends) = three_backends();
        let mut all = vec![
            topology.node().name().to_owned(),
            topology.client().name().to_owned(),
        ];
        all.extend(topology.backends().iter().map(|b| b.ns().name().to_owned()));
        let listed = netns::list_namespaces().unwrap();
        for name in &all {
            assert!(
                listed.contains(name),
                "{name} exists while the topology lives"
            );
        }
        *names.lock().unwrap() = all;
        *pids.lock().unwrap() = backends.iter_mut().map(|b| b.process().id()).collect();
        let _loop = ConnectionLoop::start(
            topology.client(),
            SocketAddr::from((topology.backend(1).ip(), HTTP)),
            Duration::from_millis(20),
        )
        .unwrap();
        let _extra = Netns::create("extra").unwrap();
        panic!("test failure in the middle of a test");
    });
    assert!(outcome.is_err());

    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 5);
    let listed = netns::list_namespaces().unwrap();
    for name in &names {
        assert!(!listed.contains(name), "{name} left behind: {listed:?}");
    }
    let prefix = format!("swy-{}-", std::process::id());
    let extra: Vec<_> = listed
        .iter()
        .filter(|n| n.starts_with(&prefix) && n.ends_with("-extra"))
        .collect();
    assert!(extra.is_empty(), "{extra:?}");
    for pid in pids.into_inner().unwrap() {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "backend pid {pid} still running"
        );
    }
}

#[test]
fn a_listener_bound_in_the_node_serves_the_node_loopback_from_this_process() {
    let topology = Topology::builder().build().expect("topology");
    let listener = topology
        .node()
        .tcp_listener(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    // Served by a thread that never entered the namespace.
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut stream, peer) = listener.accept().unwrap();
        let mut request = [0u8; 256];
        let _ = stream.read(&mut request).unwrap();
        let body = format!("controller from {peer}\n");
        write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    });
    let (name, from) = who_and_from(&tcp_request(topology.node(), addr.ip(), addr.port()).unwrap());
    assert_eq!((name.as_str(), from), ("controller", addr.ip()));
    server.join().unwrap();

    // Another namespace's loopback is a different one: nothing listens there.
    let err = tcp_request(topology.client(), addr.ip(), addr.port()).unwrap_err();
    assert!(err.is_refused(), "{err}");
}

#[test]
fn a_process_in_a_namespace_is_terminated_then_killed_if_it_ignores_sigterm() {
    use std::os::unix::process::ExitStatusExt;
    let topology = Topology::builder().ipv6(false).build().expect("topology");

    let mut polite = topology.node().spawn(["sleep", "30"]).unwrap();
    let status = polite.terminate(Duration::from_secs(5)).unwrap();
    assert_eq!(status.signal(), Some(15), "{status}");

    let mut stubborn = topology
        .node()
        .spawn(["sh", "-c", "trap '' TERM; echo armed; exec sleep 30"])
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(stubborn.child_mut().stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "armed\n");
    let status = stubborn.terminate(Duration::from_millis(200)).unwrap();
    assert_eq!(status.signal(), Some(9), "{status}");
}

#[test]
fn probes_from_a_cgroup_run_inside_it_and_the_cgroup_goes_with_its_processes() {
    use switchyard_integration::cgroup::Cgroup;

    let (topology, _backends) = three_backends();
    let cgroup = Cgroup::create("harness").expect("a cgroup (cgroup v2 mounted)");
    let path = cgroup.path().to_path_buf();
    let backend: SocketAddr = SocketAddr::new(netns::topology::backend_ip(2).into(), HTTP);
    let probe = cgroup.probe(topology.client());

    let answers = probe.tcp(backend, 3, &ProbeOptions::default()).unwrap();
    assert_eq!(answers.len(), 3);
    for answer in answers {
        let (name, from) = who_and_from(&answer.unwrap());
        assert_eq!(
            (name.as_str(), from),
            ("backend-2", IpAddr::from(topology.client_ip()))
        );
    }
    let udp = SocketAddr::new(netns::topology::backend_ip(1).into(), DNS);
    let (reply, from) = probe.udp_unconnected(udp).unwrap();
    assert_eq!(from, udp, "{reply}");
    assert_eq!(probe.tcp_peer(backend).unwrap(), backend);
    let refused = probe
        .tcp(
            SocketAddr::new(backend.ip(), 1),
            1,
            &ProbeOptions::default(),
        )
        .unwrap()
        .remove(0)
        .unwrap_err();
    assert!(refused.is_refused(), "{refused}");

    // A process left running inside is killed with the cgroup.
    let mut sleeper = cgroup.command(Some(topology.client()), "sleep");
    sleeper.arg("600");
    let _child = netns::NsChild::spawn(sleeper).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cgroup.pids().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "sleep never joined the cgroup"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(cgroup);
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn probe_results_survive_the_line_a_probe_process_prints() {
    use netns::{ProbeError, decode_result, encode_result};

    let addr: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let after = Duration::from_micros(1234);
    let cases: Vec<Result<String, ProbeError>> = vec![
        Ok("backend-1 from 10.201.0.2:4711\n".into()),
        Ok("a \\ backslash\nand lines".into()),
        Err(ProbeError::Refused { addr, after }),
        Err(ProbeError::Timeout { addr, after }),
        Err(ProbeError::Reset { addr, after }),
        Err(ProbeError::BadResponse {
            addr,
            response: "HTTP/1.0 500\r\n\r\n".into(),
        }),
    ];
    for case in cases {
        let line = encode_result(&case);
        assert!(!line.contains('\n'), "{line:?}");
        let back = decode_result(&line).unwrap();
        assert_eq!(format!("{back:?}"), format!("{case:?}"));
    }
    assert!(decode_result("something else").is_none());
}
