//! What the agent's tests share: the unified agent started for each dataplane, and a
//! private bpffs pin directory for the eBPF one.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use switchyard_integration::e2e::AgentSpec;

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
