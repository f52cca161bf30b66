//! Builders for cluster objects, terse enough for tables and large enough for benchmarks.

use std::net::{IpAddr, Ipv4Addr};

use switchyard_controller::model::{
    AddressFamily, Endpoint, EndpointPort, EndpointSlice, Node, Object, Protocol, Service,
    ServiceKey, ServicePort,
};

/// A ClusterIP Service `default/<name>` with one TCP port 80 named "http".
pub fn service(name: &str, cluster_ip: IpAddr) -> Service {
    Service::cluster_ip(
        ServiceKey::new("default", name),
        cluster_ip,
        vec![ServicePort::tcp("http", 80)],
    )
}

/// A ready endpoint on `node`.
pub fn endpoint(ip: IpAddr, node: &str) -> Endpoint {
    Endpoint {
        address: ip,
        ready: true,
        serving: true,
        terminating: false,
        node_name: Some(node.into()),
        zone: None,
        zone_hints: vec![],
        node_hints: vec![],
    }
}

/// The slice `default/<service>-1` with port "http" → 8080.
pub fn slice(service: &str, endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        key: ServiceKey::new("default", format!("{service}-1")),
        service: ServiceKey::new("default", service),
        address_family: AddressFamily::V4,
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        endpoints,
        trigger_time: None,
    }
}

pub fn node(name: &str) -> Node {
    Node {
        name: name.into(),
        zone: Some("zone-1".into()),
        deleting: false,
        dataplane: None,
        label_problems: Vec::new(),
        addresses: vec![],
    }
}

/// The i-th address of 10.0.0.0/8, for generated clusters.
pub fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i & 0x00ff_ffff)))
}

/// A generated cluster: `nodes` nodes, `services` Services with `endpoints` endpoints
/// each, spread round-robin over the nodes.
pub fn cluster(nodes: usize, services: usize, endpoints: usize) -> Vec<Object> {
    let node_names: Vec<String> = (0..nodes).map(|n| format!("node-{n:04}")).collect();
    let mut objects: Vec<Object> = node_names.iter().map(|n| Object::Node(node(n))).collect();
    for s in 0..services {
        let name = format!("svc-{s:05}");
        objects.push(Object::Service(service(&name, ip(s as u32))));
        let eps = (0..endpoints)
            .map(|e| {
                let i = s * endpoints + e;
                endpoint(ip((1 << 20) + i as u32), &node_names[i % nodes.max(1)])
            })
            .collect();
        objects.push(Object::EndpointSlice(slice(&name, eps)));
    }
    objects
}
