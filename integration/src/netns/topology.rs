//! The test network: one node namespace between a client and N backends.
//!
//! ```text
//!   client 10.201.0.2/24 ─eth0───to-client─ node ─to-b1─── eth0─ backend 1 10.244.1.2/24
//!          fd00:201::2/64                10.201.0.1   ─to-b2─── eth0─ backend 2 10.244.2.2/24
//!                                        (node IP)    …               backend i 10.244.<i>.2/24
//! ```
//!
//! - **node** (the agent runs here): `ip_forward=1`, `conf.all.route_localnet=1`, IPv6
//!   forwarding on, redirects off. Its client-facing address [`NODE_IP`] is the node IP that
//!   NodePort / external traffic targets; its default route points at the client, which
//!   stands for the outside world, so locally generated traffic to a ClusterIP has a route
//!   before NAT rewrites it. Backend subnets are directly connected (`10.244.<i>.1/24`).
//! - **client**: default route via the node; traffic it sends keeps its source
//!   [`CLIENT_IP`], so backends can check source-IP preservation.
//! - **backend i** (1-based): `10.244.<i>.2/24` (`fd00:244:<i>::2/64`), default route via
//!   the node. Which backends are "local to the node" is data only: [`BackendNs::node_name`]
//!   returns the topology's node name for them and [`REMOTE_NODE_NAME`] otherwise, for
//!   manifests that set `nodeName` on endpoints.
//!
//! Everything is deleted when the [`Topology`] drops.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Backend, Netns, NetnsError, VethEnd, VethPair, require_prerequisites};

/// The node's client-facing address: the node IP for NodePort and external traffic.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// The node's client-facing IPv6 address.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
/// The client's IPv6 address.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 2);
/// `nodeName` given to backends not marked local.
pub const REMOTE_NODE_NAME: &str = "swy-remote-node";
/// Default `nodeName` of the node namespace.
pub const DEFAULT_NODE_NAME: &str = "swy-node";

/// Backend `i`'s address, `10.244.<i>.2`.
pub fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i, 2)
}

/// Backend `i`'s IPv6 address, `fd00:244:<i>::2` (the group spells `i` in decimal digits).
pub fn backend_ip6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, decimal_digits_as_hex(i), 0, 0, 0, 0, 2)
}

fn node_side_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i, 1)
}

fn node_side_ip6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, decimal_digits_as_hex(i), 0, 0, 0, 0, 1)
}

/// 12 → 0x12, so `fd00:244:12::2` reads as backend 12.
fn decimal_digits_as_hex(i: u8) -> u16 {
    u16::from_str_radix(&i.to_string(), 16).unwrap_or(u16::from(i))
}

/// Configures a [`Topology`]; see the module docs for the layout.
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    backends: u8,
    local: BTreeSet<u8>,
    ipv6: bool,
    node_name: String,
}

impl TopologyBuilder {
    /// How many backend namespaces (1..=250); default 1.
    pub fn backends(mut self, n: u8) -> Self {
        self.backends = n;
        self
    }

    /// Marks backend `i` (1-based) as running on this node.
    pub fn local_backend(mut self, i: u8) -> Self {
        self.local.insert(i);
        self
    }

    /// Adds IPv6 addresses and routes on every link (default on).
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }

    /// The node's name, for `nodeName` in manifests; default [`DEFAULT_NODE_NAME`].
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = name.into();
        self
    }

    /// Creates the namespaces and links. On error, everything created so far is removed.
    pub fn build(self) -> Result<Topology, NetnsError> {
        require_prerequisites()?;
        if !(1..=250).contains(&self.backends) {
            return Err(NetnsError::io(
                "topology",
                std::io::Error::other(format!("backends must be 1..=250, got {}", self.backends)),
            ));
        }
        if let Some(bad) = self.local.iter().find(|&&i| i == 0 || i > self.backends) {
            return Err(NetnsError::io(
                "topology",
                std::io::Error::other(format!("local backend {bad} does not exist")),
            ));
        }

        let node = Netns::create("node")?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv4.conf.all.route_localnet", "1")?;
        // A device sends redirects if `all` or the device itself says so; devices take
        // `default` when created. A redirect (the node's default route points back at
        // the client) would also spend the per-peer ICMP token, suppressing the port
        // unreachable that a REJECT rule sends right after it.
        node.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        node.sysctl("net.ipv4.conf.default.send_redirects", "0")?;
        if self.ipv6 {
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }

        let client = Netns::create("client")?;
        let client_link = VethPair::create(
            &node,
            VethEnd {
                dev: "to-client".into(),
                v4: (NODE_IP, 24),
                v6: self.ipv6.then_some((NODE_IP6, 64)),
            },
            &client,
            VethEnd {
                dev: "eth0".into(),
                v4: (CLIENT_IP, 24),
                v6: self.ipv6.then_some((CLIENT_IP6, 64)),
            },
        )?;
        default_route(&client, NODE_IP.into())?;
        default_route(&node, CLIENT_IP.into())?;
        if self.ipv6 {
            default_route(&client, NODE_IP6.into())?;
            default_route(&node, CLIENT_IP6.into())?;
        }

        let mut backends = Vec::with_capacity(usize::from(self.backends));
        for i in 1..=self.backends {
            let ns = Netns::create(&format!("b{i}"))?;
            let link = VethPair::create(
                &node,
                VethEnd {
                    dev: format!("to-b{i}"),
                    v4: (node_side_ip(i), 24),
                    v6: self.ipv6.then_some((node_side_ip6(i), 64)),
                },
                &ns,
                VethEnd {
                    dev: "eth0".into(),
                    v4: (backend_ip(i), 24),
                    v6: self.ipv6.then_some((backend_ip6(i), 64)),
                },
            )?;
            default_route(&ns, node_side_ip(i).into())?;
            if self.ipv6 {
                default_route(&ns, node_side_ip6(i).into())?;
            }
            let local = self.local.contains(&i);
            backends.push(BackendNs {
                index: i,
                name: format!("backend-{i}"),
                node_name: if local {
                    self.node_name.clone()
                } else {
                    REMOTE_NODE_NAME.to_owned()
                },
                local,
                ipv6: self.ipv6,
                _link: link,
                ns,
            });
        }

        Ok(Topology {
            backends,
            _client_link: client_link,
            client,
            node,
            node_name: self.node_name,
            ipv6: self.ipv6,
        })
    }
}

fn default_route(ns: &Netns, via: IpAddr) -> Result<(), NetnsError> {
    let family = if via.is_ipv6() { "-6" } else { "-4" };
    ns.ip([family, "route", "add", "default", "via", &via.to_string()])
        .map(drop)
}

/// A node, a client and backends wired as the module docs describe; removed on drop.
#[derive(Debug)]
pub struct Topology {
    // Field order is drop order: backends and links before the node they hang off.
    backends: Vec<BackendNs>,
    _client_link: VethPair,
    client: Netns,
    node: Netns,
    node_name: String,
    ipv6: bool,
}

impl Topology {
    /// Starts configuring a topology (1 backend, IPv6 on, node name [`DEFAULT_NODE_NAME`]).
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            backends: 1,
            local: BTreeSet::new(),
            ipv6: true,
            node_name: DEFAULT_NODE_NAME.to_owned(),
        }
    }

    /// The node namespace, where the agent runs.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The node's name for manifests.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The node IP clients reach NodePorts and external IPs on ([`NODE_IP`]).
    pub fn node_ip(&self) -> Ipv4Addr {
        NODE_IP
    }

    /// The node's IPv6 address, when IPv6 is on.
    pub fn node_ip6(&self) -> Option<Ipv6Addr> {
        self.ipv6.then_some(NODE_IP6)
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The client's address ([`CLIENT_IP`]).
    pub fn client_ip(&self) -> Ipv4Addr {
        CLIENT_IP
    }

    /// The client's IPv6 address, when IPv6 is on.
    pub fn client_ip6(&self) -> Option<Ipv6Addr> {
        self.ipv6.then_some(CLIENT_IP6)
    }

    /// All backends, in index order.
    pub fn backends(&self) -> &[BackendNs] {
        &self.backends
    }

    /// Backend `i` (1-based). Panics if there is none: a test bug.
    pub fn backend(&self, i: u8) -> &BackendNs {
        self.backends
            .get(usize::from(i).wrapping_sub(1))
            .unwrap_or_else(|| panic!("topology has no backend {i}"))
    }

    /// Starts `swy-backend` in every backend namespace on the same ports.
    pub fn start_backends(&self, tcp: &[u16], udp: &[u16]) -> Result<Vec<Backend>, NetnsError> {
        self.backends.iter().map(|b| b.start(tcp, udp)).collect()
    }
}

/// One backend namespace: a pod's network, connected straight to the node.
#[derive(Debug)]
pub struct BackendNs {
    index: u8,
    name: String,
    node_name: String,
    local: bool,
    ipv6: bool,
    _link: VethPair,
    ns: Netns,
}

impl BackendNs {
    /// 1-based index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// `backend-<i>`: the name the backend server answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// `10.244.<i>.2`.
    pub fn ip(&self) -> Ipv4Addr {
        backend_ip(self.index)
    }

    /// `fd00:244:<i>::2`, when IPv6 is on.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ipv6.then(|| backend_ip6(self.index))
    }

    /// Whether it counts as running on the topology's node.
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// `nodeName` for its endpoint: the topology's node if local, else [`REMOTE_NODE_NAME`].
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Starts `swy-backend --name backend-<i>` here and waits until it serves.
    pub fn start(&self, tcp: &[u16], udp: &[u16]) -> Result<Backend, NetnsError> {
        Backend::start(&self.ns, &self.name, tcp, udp)
    }
}
