//! Network namespaces, veth links and processes for end-to-end tests on the machine's own
//! kernel — every piece owned by a guard that removes it on drop, panics included.
//!
//! Start at [`Topology::builder`]: it lays out a node namespace (where an agent runs), a
//! client namespace routed through it and N backend namespaces, see [`topology`] for the
//! addresses. [`Backend`] runs the `swy-backend` server in a namespace; [`tcp_request`],
//! [`udp_request`] and [`ConnectionLoop`] send real packets from a namespace and tell a
//! refused connection from a timed-out one.
//!
//! Names are `swy-<pid>-<n>-<role>`, unique per process, so tests run in parallel. The
//! harness needs root and `ip` (Debian `iproute2`); a missing prerequisite is an error that
//! says what to install, never a skip.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

mod backend;
mod echo;
mod probe;
pub mod topology;

pub(crate) use backend::crate_binary;
pub use backend::{Backend, READY_TIMEOUT, backend_binary};
pub use echo::{EchoServer, HeldConnection};
pub use probe::{
    ConnectionLoop, LoopStats, ProbeError, ProbeOptions, connect_rate_here, decode_result,
    encode_result, request_loop, tcp_peer_here, tcp_request, tcp_request_from_port,
    tcp_request_here, tcp_request_with, udp_request, udp_request_here, udp_request_with,
    udp_unconnected_here,
};
pub use topology::{BackendNs, Topology, TopologyBuilder};

/// What went wrong while building or driving the test network.
///
/// None of these is worth retrying inside a test: they mean a missing prerequisite, a bug
/// in the harness or a kernel that refuses the setup.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A program the harness runs is missing.
    #[error(
        "`{tool}` is not installed or not runnable ({source}); install the Debian package `{package}`"
    )]
    MissingTool {
        /// The program, e.g. `ip`.
        tool: String,
        /// The Debian package that provides it.
        package: String,
        /// Why running it failed.
        #[source]
        source: io::Error,
    },
    /// Creating namespaces and links needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
    #[error("network-namespace tests must run as root (need CAP_SYS_ADMIN, CAP_NET_ADMIN)")]
    NotRoot,
    /// A command ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it wrote to stderr.
        stderr: String,
    },
    /// A system call or file operation failed.
    #[error("{op}: {source}")]
    Io {
        /// The operation, with its target.
        op: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A process did not become ready in time.
    #[error("{what} not ready after {waited:?}: {detail}")]
    NotReady {
        /// The process.
        what: String,
        /// How long the harness waited.
        waited: Duration,
        /// What the harness saw instead.
        detail: String,
    },
}

impl NetnsError {
    /// An I/O error of operation `op`.
    pub fn io(op: impl Into<String>, source: io::Error) -> Self {
        NetnsError::Io {
            op: op.into(),
            source,
        }
    }
}

/// Fails with [`NetnsError::MissingTool`] unless `tool --version`-style probing works.
///
/// `probe_args` are arguments that make the tool print its version and exit 0 (`-V` for
/// `ip`, `--version` for `iptables`).
pub fn require_tool(tool: &str, probe_args: &[&str], package: &str) -> Result<(), NetnsError> {
    let missing = |source| NetnsError::MissingTool {
        tool: tool.to_owned(),
        package: package.to_owned(),
        source,
    };
    let output = Command::new(tool)
        .args(probe_args)
        .stdin(Stdio::null())
        .output()
        .map_err(missing)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(missing(io::Error::other(format!(
            "`{tool} {}` exited with {}: {}",
            probe_args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))))
    }
}

/// Fails unless this process is root and `ip` (iproute2) runs.
pub fn require_prerequisites() -> Result<(), NetnsError> {
    if !rustix::process::geteuid().is_root() {
        return Err(NetnsError::NotRoot);
    }
    require_tool("ip", &["-V"], "iproute2")
}

/// Runs `cmd` to completion; non-zero exit is an error carrying its stderr.
fn run(cmd: &mut Command) -> Result<String, NetnsError> {
    let command = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetnsError::io(format!("run `{command}`"), e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NetnsError::Command {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A unique name for this process: `swy-<pid>-<n>-<role>`.
fn unique_name(role: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("swy-{}-{n}-{role}", std::process::id())
}

/// Names of all network namespaces `ip netns list` shows.
pub fn list_namespaces() -> Result<Vec<String>, NetnsError> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// A named network namespace (`ip netns add`), deleted on drop.
///
/// Deleting removes the name and every interface inside it (veth peers go too); processes
/// still inside keep the kernel namespace alive until they exit, so guards of processes
/// ([`NsChild`], [`Backend`]) kill them on drop as well.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `swy-<pid>-<n>-<role>` with its loopback up.
    pub fn create(role: &str) -> Result<Self, NetnsError> {
        let name = unique_name(role);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(["link", "set", "lo", "up"])?;
        // No duplicate-address detection on links made here: nothing else shares them, and
        // DAD keeps link-local addresses tentative for a second or two, long enough to lose
        // the first IPv6 packets a test sends.
        if Path::new("/proc/sys/net/ipv6").exists() {
            for key in [
                "net.ipv6.conf.all.accept_dad",
                "net.ipv6.conf.default.accept_dad",
            ] {
                ns.sysctl(key, "0")?;
            }
        }
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the file that pins the namespace.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n <name> ARGS…` — iproute2 commands inside the namespace; returns stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String, NetnsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// A [`Command`] that runs `program` inside the namespace (`ip netns exec`), for
    /// callers that want their own stdio; pair with [`NsChild::spawn`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args[0] args[1..]` inside the namespace to completion; returns stdout, or an
    /// error with stderr when it exits non-zero.
    pub fn exec<I, S>(&self, args: I) -> Result<String, NetnsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = args.into_iter();
        let program = args
            .next()
            .ok_or_else(|| NetnsError::io("exec", io::Error::other("empty command")))?;
        run(self.command(program).args(args))
    }

    /// Starts `args` inside the namespace with stdout piped and stderr inherited; the
    /// process is killed when the returned guard drops.
    pub fn spawn<I, S>(&self, args: I) -> Result<NsChild, NetnsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut args = args.into_iter();
        let program = args
            .next()
            .ok_or_else(|| NetnsError::io("spawn", io::Error::other("empty command")))?;
        let mut cmd = self.command(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        NsChild::spawn(cmd)
    }

    /// Sets a sysctl inside the namespace, e.g. `("net/ipv4/ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .map_err(|e| NetnsError::io(format!("write {value} to {path} in {}", self.name), e))
    }

    /// Runs `f` on a fresh thread that has entered the namespace; sockets `f` opens live
    /// there. The calling thread's namespace is untouched.
    pub fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = self.open()?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter(&file).map_err(|e| NetnsError::io(format!("setns {}", self.name), e))?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A TCP listener bound inside this namespace, usable from any thread of this process
    /// (a socket stays in the namespace it was created in). Hand it to an in-process server
    /// — e.g. the controller on `127.0.0.1:0` of the node — so a process running in the
    /// namespace reaches the server on the namespace's own loopback.
    pub fn tcp_listener(&self, addr: SocketAddr) -> Result<TcpListener, NetnsError> {
        self.run(|| TcpListener::bind(addr))?
            .map_err(|e| NetnsError::io(format!("bind tcp {addr} in {}", self.name), e))
    }

    /// A UDP socket bound inside this namespace, usable from any thread of this process.
    pub fn udp_socket(&self, addr: SocketAddr) -> Result<UdpSocket, NetnsError> {
        self.run(|| UdpSocket::bind(addr))?
            .map_err(|e| NetnsError::io(format!("bind udp {addr} in {}", self.name), e))
    }

    /// Opens the namespace file, for a long-lived thread to [`enter`] later.
    fn open(&self) -> Result<File, NetnsError> {
        let path = self.path();
        File::open(&path).map_err(|e| NetnsError::io(format!("open {}", path.display()), e))
    }
}

/// Moves the calling thread (only it) into the network namespace `file` pins.
fn enter(file: &File) -> io::Result<()> {
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(file),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(io::Error::from)
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!(
                "switchyard netns: could not delete namespace {}: {e}",
                self.name
            );
        }
    }
}

/// One end of a veth link: device name and addresses inside its namespace.
#[derive(Clone, Debug)]
pub struct VethEnd {
    /// Device name (≤ 15 bytes); only needs to be unique inside its namespace.
    pub dev: String,
    /// IPv4 address and prefix length.
    pub v4: (Ipv4Addr, u8),
    /// IPv6 address and prefix length, added without duplicate-address detection.
    pub v6: Option<(Ipv6Addr, u8)>,
}

/// A veth pair between two namespaces, both ends addressed and up.
///
/// Deleted on drop; deleting either namespace removes it too, so the drop tolerates an
/// already-gone link.
#[derive(Debug)]
pub struct VethPair {
    ns_a: String,
    a: VethEnd,
    b: VethEnd,
}

impl VethPair {
    /// Creates the pair directly inside `ns_a` and `ns_b` (no name ever shows on the host),
    /// addresses both ends and brings them up.
    pub fn create(ns_a: &Netns, a: VethEnd, ns_b: &Netns, b: VethEnd) -> Result<Self, NetnsError> {
        for end in [&a, &b] {
            if end.dev.is_empty() || end.dev.len() > 15 {
                return Err(NetnsError::io(
                    "veth",
                    io::Error::other(format!("interface name {:?} must be 1..=15 bytes", end.dev)),
                ));
            }
        }
        ns_a.ip([
            "link",
            "add",
            &a.dev,
            "type",
            "veth",
            "peer",
            "name",
            &b.dev,
            "netns",
            ns_b.name(),
        ])?;
        let pair = VethPair {
            ns_a: ns_a.name().to_owned(),
            a,
            b,
        };
        for (ns, end) in [(ns_a, &pair.a), (ns_b, &pair.b)] {
            ns.ip([
                "addr",
                "add",
                &format!("{}/{}", end.v4.0, end.v4.1),
                "dev",
                &end.dev,
            ])?;
            if let Some((addr, len)) = end.v6 {
                ns.ip([
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr}/{len}"),
                    "dev",
                    &end.dev,
                    "nodad",
                ])?;
            }
            ns.ip(["link", "set", &end.dev, "up"])?;
        }
        Ok(pair)
    }

    /// The end in the first namespace.
    pub fn a(&self) -> &VethEnd {
        &self.a
    }

    /// The end in the second namespace.
    pub fn b(&self) -> &VethEnd {
        &self.b
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Fails harmlessly when the namespace (and with it the link) is already gone.
        let _ = Command::new("ip")
            .args(["-n", &self.ns_a, "link", "del", &self.a.dev])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A process started inside a namespace; killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct NsChild {
    child: Child,
    command: String,
}

impl NsChild {
    /// Spawns `cmd` (typically from [`Netns::command`]).
    pub fn spawn(mut cmd: Command) -> Result<Self, NetnsError> {
        let command = describe(&cmd);
        let child = cmd
            .spawn()
            .map_err(|e| NetnsError::io(format!("spawn `{command}`"), e))?;
        Ok(NsChild { child, command })
    }

    /// Process id (`ip netns exec` execs the program, so this is the program's pid).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// The underlying child, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, NetnsError> {
        self.child
            .try_wait()
            .map_err(|e| NetnsError::io(format!("wait for `{}`", self.command), e))
    }

    /// Sends SIGTERM, waits up to `grace` for an exit, then SIGKILLs. Returns the status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, NetnsError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            // ESRCH just means it exited meanwhile; the wait below sees that.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, NetnsError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = self.child.kill();
        self.child
            .wait()
            .map_err(|e| NetnsError::io(format!("wait for `{}`", self.command), e))
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
