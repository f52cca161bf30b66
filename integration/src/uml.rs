//! User-mode Linux guests for tests that need a kernel the host lacks (IPVS): boot
//! Debian's `linux.uml` on the host's root filesystem, run one command, halt, hand back
//! what the command printed and its exit status.
//!
//! Two entry points:
//! - [`Guest`] runs one command in a fresh guest: `Guest::new().run("ipvsadm", ["-Ln"])`.
//! - [`in_ipvs_kernel`] wraps a `#[test]` body: the body runs natively when the running
//!   kernel has IPVS, otherwise the harness boots a guest that reruns this very test
//!   (`current_exe() --exact NAME`) and the host test passes only if the guest's run
//!   passed. [`always_in_guest`] always uses a guest; [`rerun_in_guest`] is the piece
//!   underneath.
//!
//! # The guest
//!
//! `linux.uml root=/dev/root rootfstype=hostfs rootflags=/ rw init=SCRIPT …`: the guest
//! sees the host's files (through hostfs, reads and writes go to the host) but has its
//! own kernel: its own `proc`, `sysfs`, cgroup2 and bpf mounts, a tmpfs on `/run` (so
//! `ip netns` names never meet the host's, and `TMPDIR` points there: inotify in the
//! guest sees no change made to hostfs files), its own network stack with `lo` up and, by
//! default, a default route over a dummy device (as a real node has one). `/tmp` is
//! shared with the host on purpose: the harness keeps each guest's files in a fresh
//! temporary directory there — the generated init script, the command's stdout, stderr
//! and exit status — so the kernel's console output never mixes with the command's.
//!
//! Modules come from `/usr/lib/uml/modules/<version>`: init loads ipv6, ip_vs with every
//! scheduler, conntrack, NAT, dummy, veth, the iptables-legacy tables and the matches
//! kube-proxy-style rules use, and ipset types, all in one `modprobe -a`; a missing
//! required module fails before boot, a missing optional one is left out. The kernel's
//! own module requests go through a wrapper that adds `modprobe -d`, so on-demand loading
//! works too. The guest kernel has no nf_tables for IPv4/IPv6: use `iptables-legacy`.
//!
//! Each guest takes 2–3 s from start to halt on this machine; every process started
//! inside costs far more than on the host, so tests should poll with cheap commands.
//! Guests are independent: tests run them in parallel. A guest that outlives its
//! timeout is killed with its whole process group (`linux.uml` forks many host
//! processes), and so is one whose [`Guest::run`] call unwinds.
//!
//! # XSAVE shim
//!
//! Debian's UML 6.1 restores a guest thread's FPU state with a fixed 832-byte XSAVE
//! buffer, which hosts with AVX-512 or AMX reject (`ptrace set fp regs failed, errno =
//! 14`, then a panic before init runs). `linux.uml` is therefore started with a small
//! `LD_PRELOAD` shim (`src/uml/xstate_preload.c`, built by `build.rs`) that passes the
//! host's full XSAVE size; see that file.
//!
//! A missing prerequisite is an error that names the Debian package to install, never a
//! skip: `user-mode-linux`, `kmod` (for `modprobe`), `iproute2`.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Set to `1` in every guest's environment: code can tell it runs inside a guest.
pub const GUEST_ENV: &str = "SWITCHYARD_UML_GUEST";

/// Set to `1` on the host to make [`in_ipvs_kernel`] use a guest even when the running
/// kernel has IPVS (to exercise the guest path, or to keep tests off the host's IPVS).
pub const FORCE_ENV: &str = "SWITCHYARD_UML_FORCE";

/// The preloaded XSAVE shim, built by `build.rs`.
const XSTATE_SHIM: &str = env!("SWITCHYARD_UML_XSTATE_SHIM");

/// Where Debian's `user-mode-linux` installs the guest kernel's modules.
const MODULES_ROOT: &str = "/usr/lib/uml/modules";

/// Modules every guest loads; a guest kernel without one of them fails before booting.
pub const REQUIRED_MODULES: &[&str] = &[
    "ipv6",
    "ip_vs",
    "ip_vs_rr",
    "nf_conntrack",
    "nf_nat",
    "dummy",
    "veth",
];

/// Modules loaded when the guest kernel ships them. Every `ip_vs_*` scheduler and every
/// `ip_set_hash_*` type found is added to these.
pub const OPTIONAL_MODULES: &[&str] = &[
    // iptables-legacy tables (no nf_tables for IPv4/IPv6 in this kernel).
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "iptable_mangle",
    "iptable_raw",
    "ip6_tables",
    "ip6table_filter",
    "ip6table_nat",
    "ip6table_mangle",
    "ip6table_raw",
    // Matches and targets of kube-proxy-style rules.
    "xt_addrtype",
    "xt_comment",
    "xt_conntrack",
    "xt_mark",
    "xt_multiport",
    "xt_nat",
    "xt_set",
    "xt_statistic",
    "xt_tcpudp",
    "xt_sctp",
    "xt_ipvs",
    "xt_MASQUERADE",
    "xt_REDIRECT",
    "ipt_REJECT",
    "ip6t_REJECT",
    // ipset (hash types are discovered) and the conntrack tool's interface.
    "ip_set",
    "ip_set_bitmap_port",
    "nf_conntrack_netlink",
    // tc eBPF attachment (clsact and cls_bpf).
    "sch_ingress",
    "cls_bpf",
];

/// Why a guest could not run a command to completion.
///
/// Nothing here is worth retrying: a missing prerequisite, a guest kernel that does not
/// boot, or a command that ran past its time.
#[derive(Debug, thiserror::Error)]
pub enum UmlError {
    /// A host program or file the harness needs is missing.
    #[error("{what} is missing or unusable ({detail}); install the Debian package `{package}`")]
    MissingPrerequisite {
        /// The program or file, e.g. `linux.uml`.
        what: String,
        /// The Debian package that provides it.
        package: &'static str,
        /// What the harness saw.
        detail: String,
    },
    /// A module the guest must load is not among the guest kernel's modules.
    #[error(
        "kernel module `{module}` is not in {dir}; the Debian package `user-mode-linux` there lacks it"
    )]
    MissingModule {
        /// The module name.
        module: String,
        /// The module directory searched.
        dir: PathBuf,
    },
    /// A file or process operation on the host failed.
    #[error("{op}: {source}")]
    Io {
        /// The operation, with its target.
        op: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The guest's init failed before it started the command.
    #[error(
        "guest init failed at `{step}`\n--- init log ---\n{log}\n--- console (tail) ---\n{console}"
    )]
    Init {
        /// The step of the init script that failed.
        step: String,
        /// What init's own commands printed.
        log: String,
        /// The end of the kernel console.
        console: String,
    },
    /// The guest stopped without recording the command's exit status: a kernel panic, or
    /// `linux.uml` itself crashed.
    #[error(
        "guest stopped ({uml_status}) without an exit status for `{command}`\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- init log ---\n{log}\n--- console (tail) ---\n{console}"
    )]
    NoStatus {
        /// The command line.
        command: String,
        /// How `linux.uml` exited.
        uml_status: ExitStatus,
        /// What the command wrote to stdout before the end.
        stdout: String,
        /// What the command wrote to stderr before the end.
        stderr: String,
        /// What init's own commands printed.
        log: String,
        /// The end of the kernel console.
        console: String,
    },
    /// The guest ran past its timeout and was killed.
    #[error(
        "guest running `{command}` was killed after {after:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- console (tail) ---\n{console}"
    )]
    Timeout {
        /// The command line.
        command: String,
        /// The timeout.
        after: Duration,
        /// What the command wrote to stdout until then.
        stdout: String,
        /// What the command wrote to stderr until then.
        stderr: String,
        /// The end of the kernel console.
        console: String,
    },
    /// A rerun test failed inside the guest.
    #[error(
        "test `{test}` failed inside the guest (exit status {status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    )]
    TestFailed {
        /// The test name.
        test: String,
        /// The test binary's exit status.
        status: i32,
        /// What the test binary wrote to stdout.
        stdout: String,
        /// What the test binary wrote to stderr.
        stderr: String,
    },
    /// The rerun test binary exited 0 without running exactly one test: the name matched
    /// no test (or several).
    #[error(
        "test `{test}` did not run inside the guest (libtest did not report `1 passed`; the name must match one test exactly)\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    )]
    TestNotRun {
        /// The test name.
        test: String,
        /// What the test binary wrote to stdout.
        stdout: String,
        /// What the test binary wrote to stderr.
        stderr: String,
    },
}

impl UmlError {
    fn io(op: impl Into<String>, source: io::Error) -> Self {
        UmlError::Io {
            op: op.into(),
            source,
        }
    }
}

/// What a command did inside a guest.
///
/// Its `Debug` shows the end of the console only, so failed assertions stay readable.
#[derive(Clone)]
pub struct GuestOutput {
    /// The command's exit status as the guest's shell saw it (128 + N when signal N
    /// killed it).
    pub status: i32,
    /// What the command wrote to stdout.
    pub stdout: String,
    /// What the command wrote to stderr.
    pub stderr: String,
    /// The guest kernel's console (boot messages, module loads, panics).
    pub console: String,
    /// Guest uptime when the command started: the cost of booting and of init.
    pub ready_after: Option<Duration>,
    /// From starting `linux.uml` on the host until it exited.
    pub elapsed: Duration,
}

impl std::fmt::Debug for GuestOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestOutput")
            .field("status", &self.status)
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .field("ready_after", &self.ready_after)
            .field("elapsed", &self.elapsed)
            .field("console (tail)", &tail(&self.console, 15))
            .finish()
    }
}

impl GuestOutput {
    /// True when the command exited 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// One user-mode Linux guest that runs one command: configure, then [`Guest::run`].
///
/// Defaults: 2048 MiB of guest memory (enough for an agent, the controller and a few
/// backend namespaces), a 300 s timeout, the modules of [`REQUIRED_MODULES`] and
/// [`OPTIONAL_MODULES`], a default route, the host's current directory, and an
/// environment of `PATH` plus [`GUEST_ENV`] and whatever [`Guest::env`] adds.
#[derive(Clone, Debug)]
pub struct Guest {
    mem_mib: u32,
    timeout: Duration,
    env: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
    modules: Vec<String>,
    default_route: bool,
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}

impl Guest {
    /// A guest with the defaults above.
    pub fn new() -> Self {
        Guest {
            mem_mib: 2048,
            timeout: Duration::from_secs(300),
            env: Vec::new(),
            current_dir: None,
            modules: Vec::new(),
            default_route: true,
        }
    }

    /// Guest memory in MiB (`mem=`). Memory is only used as the guest touches it.
    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    /// How long the guest may run, boot included, before it is killed.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets one environment variable for the command.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Passes this process's whole environment to the command (variables whose names
    /// the shell cannot export are left out).
    pub fn envs_from_host(mut self) -> Self {
        self.env.extend(std::env::vars_os());
        self
    }

    /// The command's working directory (default: this process's).
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// One more module the guest must load (a missing one fails the run).
    pub fn module(mut self, name: impl Into<String>) -> Self {
        self.modules.push(name.into());
        self
    }

    /// Leaves out the default route over the `swy-uplink` dummy device.
    pub fn without_default_route(mut self) -> Self {
        self.default_route = false;
        self
    }

    /// Boots a guest, runs `program args…` in it with stdin from `/dev/null`, halts.
    ///
    /// A non-zero exit status is not an error: it comes back in
    /// [`GuestOutput::status`]. Errors mean the command could not run to its end.
    pub fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<GuestOutput, UmlError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let host = host()?;
        let modules = host.modules_to_load(&self.modules)?;
        let argv: Vec<OsString> = std::iter::once(program.as_ref().to_owned())
            .chain(args.into_iter().map(|a| a.as_ref().to_owned()))
            .collect();
        let command = argv
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let current_dir = match &self.current_dir {
            Some(dir) => dir.clone(),
            None => std::env::current_dir().map_err(|e| UmlError::io("current dir", e))?,
        };

        let dir = tempfile::Builder::new()
            .prefix("swy-uml-")
            .tempdir()
            .map_err(|e| UmlError::io("create the guest's temporary directory", e))?;
        let files = GuestFiles::new(dir.path());
        self.write_files(host, &files, &modules, &current_dir, &argv)?;

        let console = File::create(&files.console)
            .map_err(|e| UmlError::io(files.op("create", "console"), e))?;
        let console_err = console
            .try_clone()
            .map_err(|e| UmlError::io("duplicate the console file", e))?;
        let mut cmd = Command::new(&host.linux_uml);
        cmd.args([
            "root=/dev/root",
            "rootfstype=hostfs",
            "rootflags=/",
            "rw",
            "con=null",
            "con0=fd:0,fd:1",
        ])
        .arg(format!("mem={}M", self.mem_mib))
        .arg(concat_os("init=", files.init.as_os_str()))
        .arg(concat_os("uml_dir=", dir.path().as_os_str()))
        .arg(format!("umid={}", unique_umid()))
        .env("LD_PRELOAD", XSTATE_SHIM)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console_err)
        .process_group(0);

        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| UmlError::io(format!("start {}", host.linux_uml.display()), e))?;
        let mut guest = GuestProcess { child };
        let exited = guest.wait_until(started + self.timeout)?;
        let elapsed = started.elapsed();

        let read = |path: &Path| fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned());
        let stdout = read(&files.stdout).unwrap_or_default();
        let stderr = read(&files.stderr).unwrap_or_default();
        let console_text = read(&files.console).unwrap_or_default();
        let Some(uml_status) = exited else {
            return Err(UmlError::Timeout {
                command,
                after: self.timeout,
                stdout,
                stderr,
                console: tail(&console_text, 60),
            });
        };
        let log = read(&files.init_log).unwrap_or_default();
        if let Ok(step) = read(&files.init_failed) {
            return Err(UmlError::Init {
                step: step.trim().to_owned(),
                log,
                console: tail(&console_text, 60),
            });
        }
        let status = read(&files.status)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let Some(status) = status else {
            return Err(UmlError::NoStatus {
                command,
                uml_status,
                stdout,
                stderr,
                log,
                console: tail(&console_text, 60),
            });
        };
        let ready_after = read(&files.ready)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .map(Duration::from_secs_f64);
        Ok(GuestOutput {
            status,
            stdout,
            stderr,
            console: console_text,
            ready_after,
            elapsed,
        })
    }

    fn write_files(
        &self,
        host: &Host,
        files: &GuestFiles,
        modules: &[String],
        current_dir: &Path,
        argv: &[OsString],
    ) -> Result<(), UmlError> {
        // `modprobe -d ROOT` looks in ROOT/lib/modules/<version>.
        let lib_modules = files.modroot.join("lib/modules");
        fs::create_dir_all(&lib_modules)
            .map_err(|e| UmlError::io(files.op("create", "modroot"), e))?;
        symlink(&host.modules_dir, lib_modules.join(&host.version))
            .map_err(|e| UmlError::io(files.op("symlink into", "modroot"), e))?;

        // The kernel's own module requests (schedulers, matches, protocol families).
        let mut wrapper = b"#!/bin/sh\nexec ".to_vec();
        push_quoted(&mut wrapper, host.modprobe.as_os_str());
        wrapper.extend_from_slice(b" -d ");
        push_quoted(&mut wrapper, files.modroot.as_os_str());
        wrapper.extend_from_slice(b" \"$@\"\n");
        write_executable(&files.modprobe_wrapper, &wrapper)?;

        // Mounted by one `mount -a` once /proc is the guest's own (mount reads
        // /proc/self/mountinfo, which before that is the host's, through hostfs).
        let fstab = "sysfs /sys sysfs defaults 0 0\n\
                     tmpfs /run tmpfs mode=0755 0 0\n\
                     cgroup2 /sys/fs/cgroup cgroup2 defaults 0 0\n\
                     bpf /sys/fs/bpf bpf defaults 0 0\n";
        fs::write(&files.fstab, fstab).map_err(|e| UmlError::io(files.op("write", "fstab"), e))?;

        let mut network = String::from("link set lo up\n");
        if self.default_route {
            network.push_str(
                "link add swy-uplink type dummy\n\
                 link set swy-uplink up\n\
                 route add default dev swy-uplink\n\
                 route add ::/0 dev swy-uplink\n",
            );
        }
        fs::write(&files.network, network)
            .map_err(|e| UmlError::io(files.op("write", "network"), e))?;

        let script = self.init_script(files, modules, current_dir, argv);
        write_executable(&files.init, &script)
    }

    /// The guest's init: every line is a shell builtin except `mount` (twice),
    /// `modprobe`, `ip` and the command itself, because each process start is slow.
    fn init_script(
        &self,
        files: &GuestFiles,
        modules: &[String],
        current_dir: &Path,
        argv: &[OsString],
    ) -> Vec<u8> {
        let mut s = Vec::new();
        let q = |s: &mut Vec<u8>, v: &OsStr| push_quoted(s, v);
        s.extend_from_slice(b"#!/bin/sh\n# switchyard user-mode Linux guest init, generated by integration/src/uml.rs\nD=");
        q(&mut s, files.dir.as_os_str());
        s.extend_from_slice(
            b"
exec >\"$D/init.log\" 2>&1
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
halt_guest() {
  echo o >/proc/sysrq-trigger
  sleep 10
  poweroff -f
}
fail() {
  echo \"$1\" >\"$D/init-failed\"
  halt_guest
}
mounted() {
  while read -r _ m t _; do
    [ \"$m $t\" = \"$1\" ] && return 0
  done </proc/mounts
  return 1
}
mount -t proc proc /proc || fail 'mount proc on /proc'
mount -a -T \"$D/fstab\"
mounted '/sys sysfs' || fail 'mount sysfs on /sys'
mounted '/run tmpfs' || fail 'mount tmpfs on /run'
echo \"$D/modprobe\" >/proc/sys/kernel/modprobe || fail 'set kernel.modprobe'
",
        );
        s.extend_from_slice(b"modprobe -d \"$D/modroot\" -a");
        for module in modules {
            s.push(b' ');
            q(&mut s, OsStr::new(module));
        }
        s.extend_from_slice(b" || fail 'modprobe ");
        s.extend_from_slice(modules.join(" ").as_bytes());
        s.extend_from_slice(b"'\nip -batch \"$D/network\" || fail 'ip -batch network'\ncd ");
        q(&mut s, current_dir.as_os_str());
        s.extend_from_slice(b" || fail 'cd to the working directory'\n");
        // Temporary files of the command on the guest's own tmpfs: inotify inside the
        // guest sees no change to hostfs files (a manifests folder under the host's /tmp
        // would never report an edit). `Guest::env("TMPDIR", …)` overrides it.
        s.extend_from_slice(b"export TMPDIR=/run\n");
        for (key, value) in &self.env {
            if !is_shell_name(key) {
                continue;
            }
            s.extend_from_slice(b"export ");
            s.extend_from_slice(key.as_bytes());
            s.push(b'=');
            q(&mut s, value);
            s.push(b'\n');
        }
        s.extend_from_slice(format!("export {GUEST_ENV}=1\n").as_bytes());
        s.extend_from_slice(b"read -r up _ </proc/uptime\necho \"$up\" >\"$D/ready\"\n");
        for arg in argv {
            q(&mut s, arg);
            s.push(b' ');
        }
        s.extend_from_slice(
            b"</dev/null >\"$D/stdout\" 2>\"$D/stderr\"\necho $? >\"$D/status\"\nhalt_guest\n",
        );
        s
    }
}

/// The files of one guest, all in its temporary directory (shared with the host).
struct GuestFiles {
    dir: PathBuf,
    init: PathBuf,
    init_log: PathBuf,
    init_failed: PathBuf,
    fstab: PathBuf,
    network: PathBuf,
    modroot: PathBuf,
    modprobe_wrapper: PathBuf,
    console: PathBuf,
    ready: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    status: PathBuf,
}

impl GuestFiles {
    fn new(dir: &Path) -> Self {
        GuestFiles {
            dir: dir.to_owned(),
            init: dir.join("init"),
            init_log: dir.join("init.log"),
            init_failed: dir.join("init-failed"),
            fstab: dir.join("fstab"),
            network: dir.join("network"),
            modroot: dir.join("modroot"),
            modprobe_wrapper: dir.join("modprobe"),
            console: dir.join("console"),
            ready: dir.join("ready"),
            stdout: dir.join("stdout"),
            stderr: dir.join("stderr"),
            status: dir.join("status"),
        }
    }

    fn op(&self, verb: &str, file: &str) -> String {
        format!("{verb} {}", self.dir.join(file).display())
    }
}

/// The running `linux.uml`, leader of its own process group; killed with the whole
/// group on drop.
struct GuestProcess {
    child: Child,
}

impl GuestProcess {
    fn pid(&self) -> Option<rustix::process::Pid> {
        rustix::process::Pid::from_raw(self.child.id() as i32)
    }

    /// Waits for the guest to exit until `deadline`; `None` when it had to be killed.
    /// Either way no process of the guest is left.
    fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>, UmlError> {
        let Some(pid) = self.pid() else {
            return Err(UmlError::io("linux.uml pid", io::Error::other("pid 0")));
        };
        loop {
            // WNOWAIT: the leader stays a zombie, so its pid (the group id) cannot be
            // reused before the group is killed below.
            let exited = rustix::process::waitid(
                rustix::process::WaitId::Pid(pid),
                rustix::process::WaitIdOptions::EXITED
                    | rustix::process::WaitIdOptions::NOHANG
                    | rustix::process::WaitIdOptions::NOWAIT,
            )
            .map_err(|e| UmlError::io("wait for linux.uml", e.into()))?;
            if exited.is_some() {
                self.kill_group();
                let status = self
                    .child
                    .wait()
                    .map_err(|e| UmlError::io("reap linux.uml", e))?;
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                self.kill_group();
                let _ = self.child.wait();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_group(&self) {
        if let Some(pid) = self.pid() {
            // ESRCH: the group is already empty.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill_group();
            let _ = self.child.wait();
        }
    }
}

/// What the host offers: the guest kernel, its modules, `modprobe`, `ip`.
#[derive(Debug)]
struct Host {
    linux_uml: PathBuf,
    modprobe: PathBuf,
    version: String,
    modules_dir: PathBuf,
    /// Loadable modules (from `modules.dep`), names with `_` for `-`.
    loadable: BTreeSet<String>,
    /// Modules built into the kernel (`modules.builtin`).
    builtin: BTreeSet<String>,
}

/// Checks the host's prerequisites once per process.
fn host() -> Result<&'static Host, UmlError> {
    static HOST: OnceLock<Result<Host, Missing>> = OnceLock::new();
    match HOST.get_or_init(|| probe_host(&Search::system())) {
        Ok(host) => Ok(host),
        Err((what, package, detail)) => Err(UmlError::MissingPrerequisite {
            what: what.clone(),
            package,
            detail: detail.clone(),
        }),
    }
}

/// Fails with [`UmlError::MissingPrerequisite`] unless guests can boot here:
/// `linux.uml` runs, its modules are installed, `modprobe` and `ip` exist.
pub fn require_prerequisites() -> Result<(), UmlError> {
    host().map(|_| ())
}

/// Where [`probe_host`] looks: a `PATH`, directories tried after it, and the root of
/// the guest kernel's module trees.
struct Search {
    path: OsString,
    fallback_dirs: Vec<PathBuf>,
    modules_root: PathBuf,
}

impl Search {
    /// This process's `PATH`, then the usual Debian locations.
    fn system() -> Self {
        Search {
            path: std::env::var_os("PATH").unwrap_or_default(),
            fallback_dirs: ["/usr/bin", "/usr/sbin", "/sbin", "/bin"]
                .map(PathBuf::from)
                .to_vec(),
            modules_root: PathBuf::from(MODULES_ROOT),
        }
    }

    /// The first executable file `name` on the path or in a fallback directory.
    fn program(&self, name: &str) -> Option<PathBuf> {
        std::env::split_paths(&self.path)
            .chain(self.fallback_dirs.iter().cloned())
            .map(|dir| dir.join(name))
            .find(|p| {
                p.metadata()
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false)
            })
    }
}

type Missing = (String, &'static str, String);

fn probe_host(search: &Search) -> Result<Host, Missing> {
    let missing = |what: &str, package, detail: String| (what.to_owned(), package, detail);
    let linux_uml = search.program("linux.uml").ok_or_else(|| {
        missing(
            "linux.uml",
            "user-mode-linux",
            "not found in PATH, /usr/bin, /usr/sbin, /sbin or /bin".into(),
        )
    })?;
    let output = Command::new(&linux_uml)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            missing(
                "linux.uml",
                "user-mode-linux",
                format!("run --version: {e}"),
            )
        })?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if !output.status.success() || version.is_empty() || version.contains(char::is_whitespace) {
        return Err(missing(
            "linux.uml",
            "user-mode-linux",
            format!(
                "`linux.uml --version` printed {version:?} ({})",
                output.status
            ),
        ));
    }
    let modules_dir = search.modules_root.join(&version);
    let dep = fs::read_to_string(modules_dir.join("modules.dep")).map_err(|e| {
        missing(
            &format!("{}/modules.dep", modules_dir.display()),
            "user-mode-linux",
            e.to_string(),
        )
    })?;
    let loadable = dep
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(module_name)
        .collect();
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();
    let modprobe = search.program("modprobe").ok_or_else(|| {
        missing(
            "modprobe",
            "kmod",
            "not found in PATH, /usr/bin, /usr/sbin, /sbin or /bin".into(),
        )
    })?;
    search.program("ip").ok_or_else(|| {
        missing(
            "ip",
            "iproute2",
            "not found in PATH, /usr/bin, /usr/sbin, /sbin or /bin".into(),
        )
    })?;
    Ok(Host {
        linux_uml,
        modprobe,
        version,
        modules_dir,
        loadable,
        builtin,
    })
}

impl Host {
    /// The modules for `modprobe -a`: required ones (missing → error), optional and
    /// discovered ones when present, built-in ones left out.
    fn modules_to_load(&self, extra_required: &[String]) -> Result<Vec<String>, UmlError> {
        let present = |m: &str| self.loadable.contains(m) || self.builtin.contains(m);
        let mut wanted: Vec<String> = Vec::new();
        for module in REQUIRED_MODULES
            .iter()
            .map(|m| m.to_string())
            .chain(extra_required.iter().map(|m| module_name(m)))
        {
            if !present(&module) {
                return Err(UmlError::MissingModule {
                    module,
                    dir: self.modules_dir.clone(),
                });
            }
            wanted.push(module);
        }
        let discovered = self.loadable.iter().filter(|m| {
            (m.starts_with("ip_vs_") && !matches!(m.as_str(), "ip_vs_ftp" | "ip_vs_pe_sip"))
                || m.starts_with("ip_set_hash_")
        });
        wanted.extend(
            OPTIONAL_MODULES
                .iter()
                .map(|m| m.to_string())
                .filter(|m| present(m))
                .chain(discovered.cloned()),
        );
        let mut seen = BTreeSet::new();
        wanted.retain(|m| !self.builtin.contains(m) && seen.insert(m.clone()));
        Ok(wanted)
    }
}

/// `kernel/net/netfilter/ipvs/ip_vs-rr.ko.xz` → `ip_vs_rr`.
fn module_name(path: &str) -> String {
    let file = path.trim().rsplit('/').next().unwrap_or_default();
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn write_executable(path: &Path, contents: &[u8]) -> Result<(), UmlError> {
    fs::write(path, contents).map_err(|e| UmlError::io(format!("write {}", path.display()), e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| UmlError::io(format!("chmod {}", path.display()), e))
}

/// Appends `value` single-quoted for `sh`.
fn push_quoted(out: &mut Vec<u8>, value: &OsStr) {
    out.push(b'\'');
    for &b in value.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
}

/// A name `sh` can `export`.
fn is_shell_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

fn concat_os(prefix: &str, value: &OsStr) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(value);
    s
}

fn unique_umid() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "swy-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// True inside a guest started by this harness.
pub fn in_guest() -> bool {
    std::env::var_os(GUEST_ENV).is_some_and(|v| v == "1")
}

/// True when the running kernel offers IPVS: `/proc/net/ip_vs` exists, or
/// `modprobe ip_vs` succeeds. Checked once per process.
pub fn running_kernel_has_ipvs() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let proc = Path::new("/proc/net/ip_vs");
        proc.exists()
            || (Command::new("modprobe")
                .arg("ip_vs")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                && proc.exists())
    })
}

/// Runs this test's body in a kernel with IPVS; call it as the whole body of a
/// `#[test]`, on the test's own thread:
///
/// ```no_run
/// #[test]
/// fn a_service_shows_in_ipvsadm() {
///     switchyard_integration::uml::in_ipvs_kernel(|| {
///         // ipvsadm, netlink, namespaces: a real IPVS kernel is here.
///     });
/// }
/// ```
///
/// - Inside a guest ([`in_guest`]), the body runs.
/// - On a host whose kernel has IPVS ([`running_kernel_has_ipvs`], and [`FORCE_ENV`]
///   unset), the body runs in a fresh network namespace, so it meets an empty IPVS table
///   and leaves the host's alone.
/// - Otherwise a [`Guest`] with this process's environment reruns this test binary
///   filtered to exactly this test; the host test passes only when the guest reports
///   `1 passed`, and it prints what the guest's run printed.
///
/// The test's name is libtest's name of the current thread, so it cannot be misspelt.
/// Not for `#[should_panic]` tests: the guest's run would pass, and so the host's fail.
///
/// # Panics
/// When the body panics, when the guest's run fails, and when called off a test thread.
pub fn in_ipvs_kernel<F>(body: F)
where
    F: FnOnce() + Send,
{
    in_ipvs_kernel_with(Guest::new(), body)
}

/// [`in_ipvs_kernel`] with a guest configured by the caller (memory, timeout, modules);
/// the host's environment is added to it.
pub fn in_ipvs_kernel_with<F>(guest: Guest, body: F)
where
    F: FnOnce() + Send,
{
    run_test_body(guest, body, true)
}

/// Runs this test's body in a guest even when the running kernel has IPVS: for tests
/// that change kernel-wide state (unload modules, sysctls of the initial namespace) or
/// that compare dataplanes on one kernel. Same rules as [`in_ipvs_kernel`] otherwise.
pub fn always_in_guest<F>(guest: Guest, body: F)
where
    F: FnOnce() + Send,
{
    run_test_body(guest, body, false)
}

fn run_test_body<F>(guest: Guest, body: F, native_ok: bool)
where
    F: FnOnce() + Send,
{
    if in_guest() {
        return body();
    }
    let test = current_test_name();
    let forced = std::env::var_os(FORCE_ENV).is_some_and(|v| v == "1");
    if native_ok && !forced && running_kernel_has_ipvs() {
        let ns = crate::netns::Netns::create("ipvs")
            .unwrap_or_else(|e| panic!("{test}: a network namespace for the IPVS test: {e}"));
        ns.run(body)
            .unwrap_or_else(|e| panic!("{test}: enter {}: {e}", ns.name()));
        return;
    }
    match rerun_in_guest(&test, guest.envs_from_host()) {
        Ok(output) => {
            print!("{}", output.stdout);
            eprint!("{}", output.stderr);
        }
        Err(e) => panic!("{e}"),
    }
}

/// libtest runs each test on a thread named after the test.
fn current_test_name() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        other => panic!(
            "in_ipvs_kernel must run on the test's own thread (libtest names it after the test), not on {other:?}"
        ),
    }
}

/// For a program's `main` (a benchmark, the demo) that needs an IPVS kernel: runs `body`
/// when this kernel has IPVS or this is a guest; otherwise reruns this program with the
/// same arguments in `guest` (with this process's environment), prints what it printed,
/// and exits with its status. Output arrives when the guest halts.
pub fn main_in_ipvs_kernel(guest: Guest, body: impl FnOnce()) {
    if in_guest() || running_kernel_has_ipvs() {
        return body();
    }
    let run = || -> Result<GuestOutput, UmlError> {
        let exe = std::env::current_exe().map_err(|e| UmlError::io("find this program", e))?;
        eprintln!(
            "this kernel has no IPVS: running {} in user-mode Linux (output comes when it ends)",
            exe.display()
        );
        guest
            .envs_from_host()
            .run(&exe, std::env::args_os().skip(1))
    };
    match run() {
        Ok(output) => {
            print!("{}", output.stdout);
            eprint!("{}", output.stderr);
            std::process::exit(output.status);
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

/// Reruns the test `test` of this test binary inside `guest`
/// (`current_exe() --exact TEST --include-ignored --nocapture --test-threads=1`: an
/// `#[ignore]`d test the host was asked to run runs in the guest too).
///
/// `Ok` only when the run exits 0 and libtest reports exactly one test passed; a name
/// that matches no test is [`UmlError::TestNotRun`], a failing one
/// [`UmlError::TestFailed`] with the run's output.
pub fn rerun_in_guest(test: &str, guest: Guest) -> Result<GuestOutput, UmlError> {
    let exe = std::env::current_exe().map_err(|e| UmlError::io("find this test binary", e))?;
    let output = guest.run(
        &exe,
        [
            "--exact",
            test,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ],
    )?;
    if output.status != 0 {
        return Err(UmlError::TestFailed {
            test: test.to_owned(),
            status: output.status,
            stdout: output.stdout,
            stderr: output.stderr,
        });
    }
    if !output
        .stdout
        .lines()
        .any(|l| l.starts_with("test result: ok. 1 passed;"))
    {
        return Err(UmlError::TestNotRun {
            test: test.to_owned(),
            stdout: output.stdout,
            stderr: output.stderr,
        });
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_drop_directories_suffixes_and_dashes() {
        assert_eq!(
            module_name("kernel/net/netfilter/ipvs/ip_vs_rr.ko"),
            "ip_vs_rr"
        );
        assert_eq!(module_name("kernel/drivers/net/nf-nat.ko.xz"), "nf_nat");
        assert_eq!(module_name("  veth.ko"), "veth");
    }

    #[test]
    fn quoting_survives_single_quotes() {
        let mut out = Vec::new();
        push_quoted(&mut out, OsStr::new("it's"));
        assert_eq!(out, b"'it'\\''s'");
    }

    #[test]
    fn only_exportable_names_are_shell_names() {
        assert!(is_shell_name(OsStr::new("RUST_LOG")));
        assert!(!is_shell_name(OsStr::new("1X")));
        assert!(!is_shell_name(OsStr::new("BASH_FUNC_f%%")));
        assert!(!is_shell_name(OsStr::new("")));
    }

    #[test]
    fn a_host_without_user_mode_linux_is_told_which_package_to_install() {
        let search = Search {
            path: OsString::new(),
            fallback_dirs: Vec::new(),
            modules_root: PathBuf::from("/nonexistent"),
        };
        let (what, package, _) = probe_host(&search).expect_err("nothing to find");
        assert_eq!((what.as_str(), package), ("linux.uml", "user-mode-linux"));
    }

    #[test]
    fn a_host_without_modprobe_is_told_to_install_kmod() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in `linux.uml` that prints a version, written by a child process:
        // exec'ing a file this process just wrote races with other tests' forks, which
        // may still hold the write descriptor (ETXTBSY).
        let fake = dir.path().join("linux.uml");
        let status = Command::new("sh")
            .args([
                "-c",
                "printf '#!/bin/sh\\necho 6.1.0\\n' >\"$1\" && chmod +x \"$1\"",
            ])
            .arg("sh")
            .arg(&fake)
            .status()
            .unwrap();
        assert!(status.success());
        fs::create_dir(dir.path().join("6.1.0")).unwrap();
        fs::write(dir.path().join("6.1.0/modules.dep"), "kernel/ip_vs.ko:\n").unwrap();
        let search = Search {
            path: dir.path().as_os_str().to_owned(),
            fallback_dirs: Vec::new(),
            modules_root: dir.path().to_owned(),
        };
        let (what, package, _) = probe_host(&search).expect_err("no modprobe");
        assert_eq!((what.as_str(), package), ("modprobe", "kmod"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
