//! Kernel guards and the iptables dataplane as the kernel tests and benches build it;
//! the Service states come from agent-core's fixtures, shared by every dataplane.
#![allow(dead_code)]

use std::{
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

pub use switchyard_agent_core::fixtures::*;
use switchyard_agent_iptables::{Backend, IptablesConfig, IptablesDataplane, RenderConfig};

/// A network namespace that exists for the guard's lifetime (deleted on drop, even on
/// panic).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "swy-ipt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("`ip` (Debian package iproute2) is needed for kernel tests");
        assert!(status.success(), "ip netns add {name} failed (run as root)");
        let ns = Self { name };
        ns.sh("ip link set lo up");
        ns
    }

    pub fn prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .map(String::from)
            .to_vec()
    }

    /// Runs a shell command inside the namespace; panics on failure; returns stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The iptables dataplane programming `ns`, as the kernel tests and the bench use it.
pub fn dataplane(ns: &NetNs, backend: Backend) -> IptablesDataplane {
    dataplane_with_chunks(ns, backend, 0)
}

pub fn dataplane_with_chunks(
    ns: &NetNs,
    backend: Backend,
    chunk_chains: usize,
) -> IptablesDataplane {
    IptablesDataplane::new(IptablesConfig {
        command_prefix: ns.prefix(),
        ..config(backend, chunk_chains)
    })
}

/// The tests' configuration (cluster CIDR, a node IP), running commands unprefixed.
pub fn config(backend: Backend, chunk_chains: usize) -> IptablesConfig {
    IptablesConfig {
        chunk_chains,
        render: RenderConfig {
            cluster_cidrs: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:244::/48".parse().unwrap(),
            ],
            node_ips: vec!["203.0.113.7".parse().unwrap()],
            ..RenderConfig::default()
        },
        backend: Some(backend),
        ..IptablesConfig::default()
    }
}
