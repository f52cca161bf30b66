//! Real packets through the rules: a node namespace programmed by the dataplane and a
//! backend namespace behind a veth pair, both created and deleted by the test.
//! Needs root, `ip`, iptables and `socat` (Debian package socat).

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use switchyard_agent_core::dataplane::{Change, Dataplane, Desired};
use switchyard_agent_iptables::{Backend, IptablesConfig, IptablesDataplane, RenderConfig};
use switchyard_proto::state::Protocol;

/// A process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects from `ns` to `addr` and returns what the server sent, or the error text.
fn fetch(ns: &NetNs, addr: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "socat", "-T", "3", "-"])
        .arg(format!("TCP:{addr},connect-timeout=3"))
        .stdin(Stdio::null())
        .output()
        .expect("socat (Debian package socat) is needed for packet tests");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn packets_reach_the_backend_and_empty_services_refuse(backend: Backend) {
    let node = NetNs::new("node");
    let back = NetNs::new("backend");
    node.sh(&format!(
        "ip link add vn0 type veth peer name vb0 netns {b} && \
         ip addr add 10.200.0.1/24 dev vn0 && ip link set vn0 up && \
         ip route add 10.96.0.0/12 dev vn0",
        b = back.name
    ));
    back.sh("ip addr add 10.200.0.2/24 dev vb0 && ip link set vb0 up && ip route add default via 10.200.0.1");
    let _server = Process(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &back.name,
                "socat",
                "TCP-LISTEN:8080,fork,reuseaddr",
            ])
            .arg("SYSTEM:echo hello-from-backend")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (Debian package socat) is needed for packet tests"),
    );
    let start = Instant::now();
    while fetch(&node, "10.200.0.2:8080").is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "backend never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut dp = IptablesDataplane::new(IptablesConfig {
        render: RenderConfig::default(),
        command_prefix: node.prefix(),
        backend: Some(backend),
        ..IptablesConfig::default()
    });
    let mut web = service(
        "ns/web",
        &["10.96.0.10"],
        vec![port(
            "http",
            Protocol::Tcp,
            80,
            vec![ep("10.200.0.2", 8080, false)],
        )],
    );
    web.ports[0].node_port = Some(30080);
    let empty = service(
        "ns/empty",
        &["10.96.0.11"],
        vec![port("http", Protocol::Tcp, 80, vec![])],
    );
    let mut want = Desired::new();
    want.insert("ns/web".into(), desired(web));
    want.insert("ns/empty".into(), desired(empty));
    dp.apply(
        &want,
        &Change {
            full: true,
            ..Change::default()
        },
    )
    .unwrap();

    assert_eq!(
        fetch(&node, "10.96.0.10:80").as_deref(),
        Ok("hello-from-backend")
    );
    assert_eq!(
        fetch(&node, "10.200.0.1:30080").as_deref(),
        Ok("hello-from-backend"),
        "node port on the node's own address"
    );
    let start = Instant::now();
    let refused = fetch(&node, "10.96.0.11:80");
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("Connection refused")),
        "{refused:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "rejected at once, not timed out"
    );

    // Endpoints appear: the same VIP now answers.
    std::sync::Arc::make_mut(&mut want.get_mut("ns/empty").unwrap().state).ports[0] = port(
        "http",
        Protocol::Tcp,
        80,
        vec![ep("10.200.0.2", 8080, false)],
    );
    let version = version_of(&want["ns/empty"].state);
    want.get_mut("ns/empty").unwrap().version = version;
    dp.apply(
        &want,
        &Change {
            upserted: vec!["ns/empty".into()],
            ..Change::default()
        },
    )
    .unwrap();
    assert_eq!(
        fetch(&node, "10.96.0.11:80").as_deref(),
        Ok("hello-from-backend")
    );

    dp.cleanup().unwrap();
    assert!(
        fetch(&node, "10.96.0.10:80").is_err(),
        "no rules after cleanup"
    );
}

#[test]
fn packets_reach_the_backend_and_empty_services_refuse_with_nft() {
    packets_reach_the_backend_and_empty_services_refuse(Backend::Nft);
}

#[test]
fn packets_reach_the_backend_and_empty_services_refuse_with_legacy() {
    packets_reach_the_backend_and_empty_services_refuse(Backend::Legacy);
}

fn udp_flows(ns: &NetNs) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "conntrack", "-L", "-p", "udp"])
        .output()
        .expect("conntrack (Debian package conntrack) is needed for packet tests");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn removing_a_udp_endpoint_deletes_its_conntrack_flows() {
    let node = NetNs::new("ctnode");
    let back = NetNs::new("ctback");
    node.sh(&format!(
        "ip link add vn0 type veth peer name vb0 netns {b} && \
         ip addr add 10.200.0.1/24 dev vn0 && ip link set vn0 up && \
         ip route add 10.96.0.0/12 dev vn0",
        b = back.name
    ));
    back.sh("ip addr add 10.200.0.2/24 dev vb0 && ip addr add 10.200.0.3/24 dev vb0 && ip link set vb0 up");
    let mut dp = IptablesDataplane::new(IptablesConfig {
        command_prefix: node.prefix(),
        backend: Some(Backend::Nft),
        ..IptablesConfig::default()
    });
    let dns = |ip: &str| {
        service(
            "kube-system/dns",
            &["10.96.0.12"],
            vec![port("dns", Protocol::Udp, 53, vec![ep(ip, 5353, false)])],
        )
    };
    let mut want = Desired::new();
    want.insert("kube-system/dns".into(), desired(dns("10.200.0.2")));
    dp.apply(
        &want,
        &Change {
            full: true,
            ..Change::default()
        },
    )
    .unwrap();
    node.sh("echo ping | socat -u - UDP:10.96.0.12:53,sourceport=40000");
    let flows = udp_flows(&node);
    assert!(
        flows.contains("dst=10.96.0.12") && flows.contains("src=10.200.0.2"),
        "no NATed flow to the endpoint: {flows}"
    );

    // Without the flush the flow above would stay NATed to 10.200.0.2 (checked by
    // running this test with `disable_conntrack: true`).
    want.insert("kube-system/dns".into(), desired(dns("10.200.0.3")));
    dp.apply(
        &want,
        &Change {
            upserted: vec!["kube-system/dns".into()],
            ..Change::default()
        },
    )
    .unwrap();
    let flows = udp_flows(&node);
    assert!(
        !flows.contains("src=10.200.0.2"),
        "stale flow kept: {flows}"
    );
}
