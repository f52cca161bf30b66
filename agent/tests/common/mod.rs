//! What the agent's tests share: the unified agent started for each dataplane, a
//! private bpffs pin directory for the eBPF one, and a look at the connection-tracking
//! hold a switch to eBPF leaves.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use switchyard_agent_core::netfilter::CONNTRACK_HOLD_CHAIN;
use switchyard_integration::e2e::{AgentSpec, Cluster};

/// Whether the chain that keeps connection tracking on is in the node namespace, as
/// `save` (`iptables-save`, or `iptables-legacy-save` in user-mode Linux) prints it.
pub fn conntrack_held(cluster: &Cluster, save: &str) -> bool {
    let filter = cluster.node().exec([save, "-t", "filter"]).unwrap();
    filter
        .lines()
        .any(|l| l.starts_with(&format!(":{CONNTRACK_HOLD_CHAIN} ")))
}

/// A private bpffs pin directory, unpinned (programs detached) on drop.
pub struct PinDir {
    _tmp: tempfile::TempDir,
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("bpffs");
        Self { _tmp: tmp, path }
    }

    /// What is pinned there (empty once the eBPF dataplane cleaned up).
    pub fn pins(&self) -> Vec<String> {
        list(&self.path)
    }
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = switchyard_agent_ebpf::loader::cleanup(&self.path);
    }
}

/// `switchyard-agent --dataplane <dataplane>` (in a cgroup of the cluster's own, pinning
/// under `pins`, so the eBPF dataplane can run; the others ignore both).
pub fn agent(dataplane: &str, pins: &PinDir) -> AgentSpec {
    AgentSpec::new(env!("CARGO_BIN_EXE_switchyard-agent"))
        .cgroup("--cgroup-path")
        .args([
            "--dataplane".to_string(),
            dataplane.into(),
            "--bpffs".into(),
            pins.path.display().to_string(),
        ])
}
