//! cgroup v2 directories for tests, each removed on drop with every process in it, and
//! probes run from inside one: socket-level eBPF load balancing applies to the processes
//! of the cgroup its programs are attached to, so a test attaches them to a cgroup of
//! its own (never the root, which every other test on the host shares) and sends its
//! traffic from processes it moves there.
//!
//! Threads cannot join a cgroup on their own (a process moves whole), so probes run in a
//! child process: `swy-probe` (this crate's binary) moves itself into the cgroup and the
//! network namespace, sends the requests and prints one line per result
//! ([`crate::netns::encode_result`]). [`Cgroup::command`] runs any other program inside.

use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::netns::{
    ConnectionLoop, Netns, NetnsError, NsChild, ProbeError, ProbeOptions, decode_result,
};

/// The first cgroup2 mount point in `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Result<PathBuf, NetnsError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| NetnsError::io("read /proc/self/mountinfo", e))?;
    text.lines()
        .filter_map(|line| line.split_once(" - "))
        .find(|(_, fs)| fs.starts_with("cgroup2 "))
        .and_then(|(mount, _)| mount.split(' ').nth(4))
        .map(PathBuf::from)
        .ok_or_else(|| {
            NetnsError::io(
                "find the cgroup v2 hierarchy",
                std::io::Error::other(
                    "no cgroup2 mount in /proc/self/mountinfo (mount -t cgroup2 none /sys/fs/cgroup)",
                ),
            )
        })
}

/// A cgroup v2 directory `swy-<pid>-<n>-<role>` under the hierarchy's root; on drop its
/// processes are killed and it is removed.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(role: &str) -> Result<Self, NetnsError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = cgroup2_root()?.join(format!("swy-{}-{n}-{role}", std::process::id()));
        std::fs::create_dir(&path)
            .map_err(|e| NetnsError::io(format!("mkdir {}", path.display()), e))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Process ids in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// A command running `program` inside this cgroup, in network namespace `ns` when
    /// given (`nsenter --net=…`, which keeps the cgroup2 mount visible, then a shell
    /// that moves itself into the cgroup and execs the program). Needs `nsenter`
    /// (Debian `util-linux`) with a namespace.
    pub fn command(&self, ns: Option<&Netns>, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = match ns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ns.path().display()))
                    .arg("--")
                    .arg("sh");
                cmd
            }
            None => Command::new("sh"),
        };
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.path)
            .arg(program);
        cmd
    }

    /// Probes sent by processes in this cgroup from namespace `ns`.
    pub fn probe<'a>(&'a self, ns: &'a Netns) -> CgroupProbe<'a> {
        CgroupProbe { cgroup: self, ns }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // cgroup.kill (5.14+) kills every process at once; else one by one.
        if std::fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            for pid in self.pids() {
                if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    eprintln!(
                        "switchyard cgroup: could not remove {}: {e}",
                        self.path.display()
                    );
                    return;
                }
            }
        }
    }
}

/// Where the `swy-probe` binary is: `$SWY_PROBE_BIN`, else next to the running
/// executable or one directory up (as for `swy-backend`).
pub fn probe_binary() -> Result<PathBuf, NetnsError> {
    crate::netns::crate_binary("swy-probe", "SWY_PROBE_BIN")
}

/// Requests from a process inside a cgroup and a network namespace.
#[derive(Clone, Copy, Debug)]
pub struct CgroupProbe<'a> {
    cgroup: &'a Cgroup,
    ns: &'a Netns,
}

impl CgroupProbe<'_> {
    fn command(&self, args: &[String]) -> Result<Command, NetnsError> {
        let mut cmd = Command::new(probe_binary()?);
        cmd.arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--netns")
            .arg(self.ns.path())
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        Ok(cmd)
    }

    fn run(&self, args: &[String]) -> Result<Vec<Result<String, ProbeError>>, NetnsError> {
        let mut cmd = self.command(args)?;
        let output = cmd
            .output()
            .map_err(|e| NetnsError::io("run swy-probe", e))?;
        if !output.status.success() {
            return Err(NetnsError::Command {
                command: format!("swy-probe {}", args.join(" ")),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(decode_result)
            .collect())
    }

    fn limits(options: &ProbeOptions) -> Vec<String> {
        vec![
            "--connect-timeout-ms".into(),
            options.connect_timeout.as_millis().to_string(),
            "--io-timeout-ms".into(),
            options.io_timeout.as_millis().to_string(),
        ]
    }

    fn requests(
        &self,
        kind: &str,
        addr: SocketAddr,
        count: usize,
        options: &ProbeOptions,
    ) -> Result<Vec<Result<String, ProbeError>>, NetnsError> {
        let mut args = Self::limits(options);
        args.extend([
            kind.into(),
            addr.to_string(),
            "--count".into(),
            count.to_string(),
        ]);
        self.run(&args)
    }

    /// `count` HTTP/1.0 requests, one connection each (as [`crate::netns::tcp_request`]).
    pub fn tcp(
        &self,
        addr: SocketAddr,
        count: usize,
        options: &ProbeOptions,
    ) -> Result<Vec<Result<String, ProbeError>>, NetnsError> {
        self.requests("tcp", addr, count, options)
    }

    /// `count` datagrams, each from a fresh connected socket (as
    /// [`crate::netns::udp_request`]).
    pub fn udp(
        &self,
        addr: SocketAddr,
        count: usize,
        options: &ProbeOptions,
    ) -> Result<Vec<Result<String, ProbeError>>, NetnsError> {
        self.requests("udp", addr, count, options)
    }

    /// One datagram from an unconnected socket: the reply and the address `recvfrom`
    /// reported it from.
    pub fn udp_unconnected(&self, addr: SocketAddr) -> Result<(String, SocketAddr), ProbeError> {
        let results = self.run(&["udp-unconnected".into(), addr.to_string()])?;
        let text = single(results, addr)?;
        let (from, reply) = text.split_once(' ').unwrap_or((&text, ""));
        let from = from.parse().map_err(|_| ProbeError::BadResponse {
            addr,
            response: text.clone(),
        })?;
        Ok((reply.to_string(), from))
    }

    /// Connects over TCP and returns what `getpeername` reports.
    pub fn tcp_peer(&self, addr: SocketAddr) -> Result<SocketAddr, ProbeError> {
        let results = self.run(&["peer".into(), addr.to_string()])?;
        let text = single(results, addr)?;
        text.parse().map_err(|_| ProbeError::BadResponse {
            addr,
            response: text,
        })
    }

    /// New TCP connections per second over `window`.
    pub fn connect_rate(&self, addr: SocketAddr, window: Duration) -> Result<f64, ProbeError> {
        let results = self.run(&[
            "rate".into(),
            addr.to_string(),
            "--millis".into(),
            window.as_millis().to_string(),
        ])?;
        let text = single(results, addr)?;
        text.parse().map_err(|_| ProbeError::BadResponse {
            addr,
            response: text,
        })
    }

    /// A request every `interval` from a probe process until the loop stops.
    pub fn connection_loop(
        &self,
        addr: SocketAddr,
        interval: Duration,
    ) -> Result<ConnectionLoop, NetnsError> {
        self.connection_loop_with(addr, interval, &ProbeOptions::default())
    }

    /// [`CgroupProbe::connection_loop`] with explicit limits.
    pub fn connection_loop_with(
        &self,
        addr: SocketAddr,
        interval: Duration,
        options: &ProbeOptions,
    ) -> Result<ConnectionLoop, NetnsError> {
        let mut args = Self::limits(options);
        args.extend([
            "loop".into(),
            addr.to_string(),
            "--interval-ms".into(),
            interval.as_millis().to_string(),
        ]);
        let mut cmd = self.command(&args)?;
        cmd.stdout(Stdio::piped());
        ConnectionLoop::from_process(NsChild::spawn(cmd)?)
    }
}

fn single(
    results: Vec<Result<String, ProbeError>>,
    addr: SocketAddr,
) -> Result<String, ProbeError> {
    results.into_iter().next().unwrap_or_else(|| {
        Err(ProbeError::BadResponse {
            addr,
            response: "swy-probe printed nothing".into(),
        })
    })
}
