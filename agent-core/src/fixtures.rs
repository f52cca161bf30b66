//! Service states for the dataplanes' tests and benchmarks: endpoints, ports and
//! Services built in one line each, a Service that exercises every rule kind
//! ([`kitchen_sink`]), and the generated Services the benchmarks program
//! ([`bench_services`]), so every dataplane is tested and measured on the same states.

use std::{net::IpAddr, sync::Arc};

use switchyard_proto::state::{
    EndpointState, PortState, Protocol, ServiceKey, ServiceState, TrafficPolicy,
};

use crate::dataplane::{Change, Desired, DesiredService};

/// A ready endpoint; `local` ones are on `node-a`, the others on `node-b`.
pub fn ep(ip: &str, port: u16, local: bool) -> EndpointState {
    EndpointState {
        ip: ip.parse().unwrap(),
        port,
        node_name: Some(if local { "node-a" } else { "node-b" }.into()),
        local,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// A port whose cluster endpoints are `endpoints` (usable per the families they hold).
pub fn port(name: &str, protocol: Protocol, port: u16, endpoints: Vec<EndpointState>) -> PortState {
    let usable_ipv4 = endpoints.iter().any(|e| e.ip.is_ipv4());
    let usable_ipv6 = endpoints.iter().any(|e| e.ip.is_ipv6());
    PortState {
        name: name.into(),
        protocol,
        port,
        node_port: None,
        cluster_endpoints: endpoints,
        local_endpoints: vec![],
        usable_ipv4,
        usable_ipv6,
    }
}

/// A ClusterIP Service `ns/name` with every other field at its default.
pub fn service(ns_name: &str, cluster_ips: &[&str], ports: Vec<PortState>) -> ServiceState {
    let (ns, name) = ns_name.split_once('/').unwrap();
    ServiceState {
        key: ServiceKey::new(ns, name),
        cluster_ips: cluster_ips
            .iter()
            .map(|ip| ip.parse::<IpAddr>().unwrap())
            .collect(),
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        ports,
        session_affinity_timeout: None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        health_check_node_port: None,
        ipvs_scheduler: None,
        ebpf_lb: None,
    }
}

/// `state` with the version the controller would give it.
pub fn desired(state: ServiceState) -> DesiredService {
    DesiredService::new(version_of(&state), state)
}

/// The version the controller gives `state`.
pub fn version_of(state: &ServiceState) -> u64 {
    switchyard_proto::state::version_hash(&state.into())
}

/// A Service exercising every rule kind: dual-stack, three endpoints with affinity,
/// UDP and SCTP ports, node port, external and load-balancer IPs with source ranges,
/// `externalTrafficPolicy: Local` with a health-check node port.
pub fn kitchen_sink() -> ServiceState {
    let mut s = service(
        "shop/front",
        &["10.96.0.20", "fd00:96::20"],
        vec![
            port(
                "http",
                Protocol::Tcp,
                80,
                vec![
                    ep("10.244.0.5", 8080, true),
                    ep("10.244.1.5", 8080, false),
                    ep("10.244.2.5", 8080, false),
                    ep("fd00:244::5", 8080, true),
                ],
            ),
            port("dns", Protocol::Udp, 53, vec![ep("10.244.0.5", 5353, true)]),
            port(
                "sig",
                Protocol::Sctp,
                3868,
                vec![ep("10.244.1.5", 3868, false)],
            ),
        ],
    );
    s.ports[0].node_port = Some(30080);
    s.ports[0].local_endpoints = vec![ep("10.244.0.5", 8080, true), ep("fd00:244::5", 8080, true)];
    s.ports[1].node_port = Some(30053);
    s.ports[1].local_endpoints = vec![ep("10.244.0.5", 5353, true)];
    // No local endpoint for SCTP: external traffic dropped, pod traffic short-circuits.
    s.ports[2].node_port = Some(30868);
    s.external_ips = vec!["192.0.2.10".parse().unwrap()];
    s.load_balancer_ips = vec![
        "198.51.100.10".parse().unwrap(),
        "2001:db8::10".parse().unwrap(),
    ];
    s.load_balancer_source_ranges = vec![
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8:1::/48".parse().unwrap(),
    ];
    s.session_affinity_timeout = Some(10800);
    s.external_traffic_policy = TrafficPolicy::Local;
    s.health_check_node_port = Some(32000);
    s
}

/// A full sync.
pub fn full() -> Change {
    Change {
        full: true,
        ..Change::default()
    }
}

/// Upserts of `names`.
pub fn upsert(names: &[&str]) -> Change {
    Change {
        upserted: names.iter().map(|n| n.to_string()).collect(),
        ..Change::default()
    }
}

/// Removals of `names`.
pub fn remove(names: &[&str]) -> Change {
    Change {
        removed: names.iter().map(|n| n.to_string()).collect(),
        ..Change::default()
    }
}

/// `n` ClusterIP Services `bench/s<i>` with two endpoints each (one local), as the
/// benches program them.
pub fn bench_services(n: usize) -> Desired {
    let mut want = Desired::new();
    for i in 0..n {
        let ip = format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256);
        let a = format!("10.244.{}.{}", (i / 128) % 256, (i % 128) * 2);
        let b = format!("10.245.{}.{}", (i / 128) % 256, (i % 128) * 2);
        let s = service(
            &format!("bench/s{i}"),
            &[&ip],
            vec![port(
                "http",
                Protocol::Tcp,
                80,
                vec![ep(&a, 8080, true), ep(&b, 8080, false)],
            )],
        );
        want.insert(format!("bench/s{i}"), desired(s));
    }
    want
}

/// Three endpoints on port 8080, the first one local: the renderers' usual case.
pub fn three_endpoints() -> Vec<EndpointState> {
    vec![
        ep("10.244.0.5", 8080, true),
        ep("10.244.1.5", 8080, false),
        ep("10.244.2.5", 8080, false),
    ]
}

/// One step of the apply benches' churn: `bench/s7` of [`bench_services`] loses its last
/// endpoint on even rounds and gets one back on odd rounds; returns its name.
pub fn churn(want: &mut Desired, round: usize) -> &'static str {
    let entry = want
        .get_mut("bench/s7")
        .expect("bench/s7 of bench_services");
    let endpoints = &mut Arc::make_mut(&mut entry.state).ports[0].cluster_endpoints;
    if round.is_multiple_of(2) {
        endpoints.pop();
    } else {
        endpoints.push(ep("10.246.0.7", 8080, false));
    }
    entry.version = version_of(&entry.state);
    "bench/s7"
}

/// The ClusterIP the first-packet benches connect through (of `zzz/target`, which sorts
/// after every `bench/` Service: last in a linear dispatch).
pub const FIRST_PACKET_VIP: &str = "10.96.255.254";
/// Its one endpoint: backend 1 of the test topology.
pub const FIRST_PACKET_BACKEND: &str = "10.244.1.2";
pub const FIRST_PACKET_BACKEND_PORT: u16 = 8080;

/// [`bench_services`]`(n)` and `zzz/target` (port 80 of [`FIRST_PACKET_VIP`] to the
/// backend): the state of the first-packet benches.
pub fn first_packet_services(n: usize) -> Desired {
    let mut want = bench_services(n);
    let endpoints = vec![ep(FIRST_PACKET_BACKEND, FIRST_PACKET_BACKEND_PORT, false)];
    let target = service(
        "zzz/target",
        &[FIRST_PACKET_VIP],
        vec![port("http", Protocol::Tcp, 80, endpoints)],
    );
    want.insert("zzz/target".into(), desired(target));
    want
}

#[cfg(test)]
mod tests {
    use switchyard_proto::{
        policy::{Family, PortPolicy},
        state::TrafficPolicy,
    };

    use super::*;

    #[test]
    fn traffic_policies_pick_the_sets_and_empty_sets_are_told_apart_from_no_endpoints() {
        // One local endpoint in the cluster set, none in the local set.
        let mut s = (*bench_services(1).remove("bench/s0").unwrap().state).clone();
        let p = PortPolicy::new(&s, &s.ports[0], Family::V4);
        assert!(p.has_internal() && !p.externally_accessible && p.uses_cluster_endpoints);
        assert_eq!(p.internal_endpoints().len(), 2);

        s.internal_traffic_policy = TrafficPolicy::Local;
        let p = PortPolicy::new(&s, &s.ports[0], Family::V4);
        assert!(
            p.has_endpoints && !p.has_internal(),
            "no local endpoint: drop"
        );
        assert!(
            !p.uses_cluster_endpoints,
            "nothing external uses the cluster set"
        );

        s.ports[0].node_port = Some(30080);
        let p = PortPolicy::new(&s, &s.ports[0], Family::V4);
        assert!(p.externally_accessible && p.uses_cluster_endpoints && p.has_external());

        let p = PortPolicy::new(&s, &s.ports[0], Family::V6);
        assert!(!p.has_endpoints, "no IPv6 endpoint: reject");
    }
}
