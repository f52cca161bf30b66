//! Runs the `swy-backend` server inside a namespace and waits until it serves.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use super::{Netns, NetnsError, NsChild};

/// How long [`Backend::start`] waits for the server's `ready` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the `swy-backend` binary is: `$SWY_BACKEND_BIN`, else next to the running
/// executable or one directory up (a test binary lives in `target/<profile>/deps`, the
/// crate's binaries in `target/<profile>`).
pub fn backend_binary() -> Result<PathBuf, NetnsError> {
    crate_binary("swy-backend", "SWY_BACKEND_BIN")
}

/// Where this crate's binary `name` is: `$env_var`, else next to the running executable
/// or one directory up.
pub(crate) fn crate_binary(name: &str, env_var: &str) -> Result<PathBuf, NetnsError> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe =
        std::env::current_exe().map_err(|e| NetnsError::io("find the running executable", e))?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| NetnsError::MissingTool {
            tool: name.into(),
            package: format!(
                "switchyard-integration (cargo build -p switchyard-integration --bin {name}, or set {env_var})"
            ),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("not next to {}", exe.display()),
            ),
        })
}

/// A running `swy-backend`; killed on drop.
///
/// It answers TCP requests (HTTP/1.0) and UDP datagrams with `<name> from <peer>\n`.
#[derive(Debug)]
pub struct Backend {
    child: NsChild,
    name: String,
    tcp: Vec<u16>,
    udp: Vec<u16>,
}

impl Backend {
    /// Starts `swy-backend --name NAME --tcp … --udp …` in `ns` (binary from
    /// [`backend_binary`]) and returns once every socket is bound and listening.
    pub fn start(ns: &Netns, name: &str, tcp: &[u16], udp: &[u16]) -> Result<Self, NetnsError> {
        Self::start_with_binary(&backend_binary()?, ns, name, tcp, udp)
    }

    /// As [`Backend::start`], with an explicit binary.
    pub fn start_with_binary(
        binary: &Path,
        ns: &Netns,
        name: &str,
        tcp: &[u16],
        udp: &[u16],
    ) -> Result<Self, NetnsError> {
        let mut cmd = ns.command(binary);
        cmd.args(["--name", name]);
        if !tcp.is_empty() {
            cmd.arg("--tcp").args(tcp.iter().map(u16::to_string));
        }
        if !udp.is_empty() {
            cmd.arg("--udp").args(udp.iter().map(u16::to_string));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = NsChild::spawn(cmd)?;
        let stdout = child.child_mut().stdout.take().ok_or_else(|| {
            NetnsError::io("take backend stdout", std::io::Error::other("not piped"))
        })?;

        // The reader thread outlives a timeout harmlessly: killing the child closes the pipe.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = tx.send(read);
        });
        let not_ready = |detail: String| NetnsError::NotReady {
            what: format!("swy-backend {name} in {}", ns.name()),
            waited: READY_TIMEOUT,
            detail,
        };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Ok(line)) if line.trim() == "ready" => {}
            Ok(Ok(line)) => {
                let status = child.kill()?;
                return Err(not_ready(format!("printed {line:?}, then {status}")));
            }
            Ok(Err(e)) => return Err(not_ready(format!("reading its stdout: {e}"))),
            Err(_) => return Err(not_ready("no ready line".into())),
        }
        Ok(Backend {
            child,
            name: name.to_owned(),
            tcp: tcp.to_vec(),
            udp: udp.to_vec(),
        })
    }

    /// The name it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// TCP ports it serves.
    pub fn tcp_ports(&self) -> &[u16] {
        &self.tcp
    }

    /// UDP ports it serves.
    pub fn udp_ports(&self) -> &[u16] {
        &self.udp
    }

    /// The process guard, e.g. to kill the backend mid-test.
    pub fn process(&mut self) -> &mut NsChild {
        &mut self.child
    }
}
