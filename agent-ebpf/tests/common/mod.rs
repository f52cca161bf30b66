//! What the eBPF kernel tests and benches share: Service builders, a private pin
//! directory, and a lab (node, client and backend namespaces, a cgroup of the test's
//! own) with the dataplane attached inside the node namespace.
#![allow(dead_code)]

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use switchyard_agent_core::dataplane::{Change, Dataplane, Desired};
pub use switchyard_agent_core::fixtures::*;
use switchyard_agent_ebpf::{Attach, EbpfConfig, EbpfDataplane, RenderConfig};
use switchyard_integration::{
    cgroup::{Cgroup, CgroupProbe},
    netns::{Backend, Netns, Topology},
};
use switchyard_proto::state::{Protocol, ServiceState};

/// `default/<name>` with one port (named after its protocol) on `vip`:`port_number`,
/// served on `target` by the lab's backends `backends` (`10.244.<i>.2`; backend 1 is
/// local).
pub fn lab_service(
    name: &str,
    vip: &str,
    protocol: Protocol,
    (port_number, target): (u16, u16),
    backends: &[u8],
) -> ServiceState {
    let endpoints = backends
        .iter()
        .map(|i| ep(&format!("10.244.{i}.2"), target, *i == 1))
        .collect();
    let port_name = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    };
    service(
        &format!("default/{name}"),
        &[vip],
        vec![port(port_name, protocol, port_number, endpoints)],
    )
}

/// Puts `state` into `want` under its name with its version.
pub fn put(want: &mut Desired, state: ServiceState) {
    want.insert(state.key.to_string(), desired(state));
}

/// A private pin directory: a tempdir the dataplane mounts a bpffs on; on drop
/// everything pinned there is unpinned (detaching the programs) and the bpffs unmounted.
pub struct PinDir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("bpffs");
        Self { _tmp: tmp, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = switchyard_agent_ebpf::loader::cleanup(&self.path) {
            eprintln!("pin dir {}: {e}", self.path.display());
        }
    }
}

/// Every address of the lab's node netns the agent would attach to.
pub fn node_devices(topology: &Topology) -> Vec<String> {
    let mut devices = vec!["to-client".to_string()];
    devices.extend(
        topology
            .backends()
            .iter()
            .map(|b| format!("to-b{}", b.index())),
    );
    devices
}

/// A node namespace between a client and backends (integration's [`Topology`]), a
/// cgroup of the test's own whose processes get socket-level load balancing, and the
/// dataplane attached in the node namespace with its pins in a private directory.
pub struct Lab {
    pub dataplane: Option<EbpfDataplane>,
    pub config: EbpfConfig,
    pub backends: Vec<Backend>,
    pub cgroup: Cgroup,
    pub topology: Topology,
    pub pins: PinDir,
}

impl Lab {
    /// `n` backends (backend 1 local) serving TCP 8080 and UDP 5353.
    pub fn start(n: u8) -> Self {
        Self::start_with(n, |_| {})
    }

    pub fn start_with(n: u8, configure: impl FnOnce(&mut EbpfConfig)) -> Self {
        let topology = Topology::builder()
            .backends(n)
            .local_backend(1)
            .ipv6(true)
            .build()
            .expect("topology (run as root with iproute2)");
        let backends = topology.start_backends(&[8080], &[5353]).expect("backends");
        let cgroup = Cgroup::create("ebpf").expect("cgroup");
        let pins = PinDir::new();
        let mut config = EbpfConfig::new(Attach {
            bpffs: pins.path().to_path_buf(),
            cgroup: cgroup.path().to_path_buf(),
            devices: node_devices(&topology),
        });
        config.render = RenderConfig {
            node_ips: vec![topology.node_ip().into()],
            ..RenderConfig::default()
        };
        configure(&mut config);
        let mut lab = Self {
            dataplane: None,
            config,
            backends,
            cgroup,
            topology,
            pins,
        };
        lab.attach();
        lab
    }

    /// Creates the dataplane (again) in the node namespace: an agent (re)start.
    pub fn attach(&mut self) {
        let config = self.config.clone();
        let dp = self
            .topology
            .node()
            .run(move || EbpfDataplane::new(config))
            .unwrap()
            .expect("eBPF dataplane");
        self.dataplane = Some(dp);
    }

    pub fn dp(&mut self) -> &mut EbpfDataplane {
        self.dataplane.as_mut().expect("attached")
    }

    /// Applies a change from inside the node namespace (a full sync reads its addresses).
    pub fn apply(&mut self, want: &Desired, change: &Change) {
        let mut dp = self.dataplane.take().expect("attached");
        let (dp, outcome) = self
            .topology
            .node()
            .run(|| {
                let outcome = dp.apply(want, change);
                (dp, outcome)
            })
            .unwrap();
        self.dataplane = Some(dp);
        let outcome = outcome.expect("apply");
        assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    }

    /// Probes from a pod on the node: the client namespace, inside the cgroup.
    pub fn pod(&self) -> CgroupProbe<'_> {
        self.cgroup.probe(self.topology.client())
    }

    /// Probes from the node itself, inside the cgroup.
    pub fn host(&self) -> CgroupProbe<'_> {
        self.cgroup.probe(self.topology.node())
    }

    /// The client namespace as the outside world (not in the cgroup).
    pub fn outside(&self) -> &Netns {
        self.topology.client()
    }
}

/// "backend-2 from 10.201.0.2:4711" → ("backend-2", 10.201.0.2).
pub fn answer(text: &str) -> (String, IpAddr) {
    let mut words = text.split_whitespace();
    let name = words.next().unwrap_or_default().to_string();
    let peer: SocketAddr = words
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not a swy-backend answer: {text:?}"));
    (name, peer.ip())
}

/// No iptables, nftables or IPVS object in the node namespace names a Service address.
pub fn assert_no_netfilter_objects(node: &Netns, needles: &[&str]) {
    let mut dumps = Vec::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        dumps.push(
            node.exec([tool])
                .unwrap_or_else(|e| panic!("{e} (install the Debian package iptables)")),
        );
    }
    dumps.push(
        node.exec(["nft", "list", "ruleset"])
            .unwrap_or_else(|e| panic!("{e} (install the Debian package nftables)")),
    );
    dumps.push(node.exec(["cat", "/proc/net/ip_vs"]).unwrap_or_default());
    for dump in dumps {
        for needle in needles {
            assert!(!dump.contains(needle), "{needle} appears in:\n{dump}");
        }
    }
}
