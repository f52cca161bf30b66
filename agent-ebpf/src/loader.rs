//! The kernel objects behind the maps: the bpffs directory (mounted when missing), the
//! eBPF object (its maps created there or reused from their pins), the programs and their
//! links (or classic tc filters), pinned so that forwarding outlives the agent
//! (fail-static), and what the running kernel offers ([`Features`], found once).
//!
//! # Restarts and upgrades
//! A pinned `swy_meta` map records which build of the programs the pinned links run and
//! the cgroup they are attached to. A restarted agent of the same build, with the same
//! cgroup and devices, reuses every pin and loads no program (but a one-call feature
//! probe): nothing is detached or attached. A different build (or cgroup) attaches its
//! programs next to the old ones (cgroup links allow several programs; TCX keeps a
//! list), pins the new links over the old pins, and the old links go away with their
//! last reference. Both translate the same way from the same maps, so there is no gap
//! either way.
//!
//! Without TCX, each device's tc hooks hold a `cls_bpf` filter of the agent's
//! ([`crate::tc`]); the program it runs is pinned (`prog-tc-DIRECTION-DEVICE`). A
//! restart of the same build finds the filter running the pinned program and leaves
//! it; otherwise the filter's program is replaced in place, in one step.
//!
//! # Minimum kernel version
//! 6.1 (5.18 for `bpf_set_retval`, which fails `connect()` with `ECONNREFUSED`; 5.10 for
//! `bpf_redirect_neigh`), with the `sch_ingress` and `cls_bpf` modules where the kernel
//! has no TCX (6.6). No kernel BTF is needed (the programs use no CO-RE); the object's
//! own BTF is loaded (the socket-storage map requires it). Where `bpf_fib_lookup` cannot
//! name a source address (`BPF_FIB_LOOKUP_SRC`, 6.7; Debian's 6.1.176 has it by
//! backport, so it is probed, not inferred from the version), source NAT takes the
//! address the agent writes into `swy_src_addrs` per device
//! ([`crate::host::src_addrs`]).

use std::{
    fs, io,
    os::{
        fd::AsFd,
        unix::fs::{DirBuilderExt, PermissionsExt},
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, LinkOrder, Program,
        ProgramError, ProgramInfo, SchedClassifier, TcAttachType, TestRun, TestRunOptions,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
    },
};
use sha2::{Digest, Sha256};

use crate::{
    abi::Meta,
    host,
    maps::{MapOpError, Maps, MapsError},
    tc::{Hook, Tc, TcError},
};

/// The programs, compiled from `bpf/` by the build script.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switchyard.bpf.o"));

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The socket programs and where they attach, by program name.
const SOCK_PROGRAMS: &[&str] = &[
    "swy_connect4",
    "swy_connect6",
    "swy_sendmsg4",
    "swy_sendmsg6",
    "swy_recvmsg4",
    "swy_recvmsg6",
    "swy_getpeername4",
    "swy_getpeername6",
];
const EGRESS_PROGRAM: &str = "swy_sock_egress";
const TC_INGRESS: &str = "swy_tc_ingress";
const TC_EGRESS: &str = "swy_tc_egress";
/// Never attached: run once to learn whether `bpf_fib_lookup` names source addresses.
const PROBE_FIB_SRC: &str = "swy_probe_fib_src";
/// Prefix of the pins of tc links (TCX); the rest names the direction and the device.
const TC_LINK_PREFIX: &str = "link-tc-";
/// Prefix of the pins of the programs classic tc filters run; the rest as above.
const TC_PROG_PREFIX: &str = "prog-tc-";
/// `EINVAL`: what the kernel answers for an attach type or a flag it does not know.
const EINVAL: i32 = 22;

/// How the tc programs attach (`--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttachMode {
    /// TCX where the kernel has it (6.6), classic tc otherwise.
    #[default]
    Auto,
    /// TCX links; fails on a kernel without TCX.
    Tcx,
    /// A `clsact` qdisc and `cls_bpf` filters, even where TCX exists.
    Classic,
}

/// Where source NAT takes the node's address from (`--snat-source`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SnatSource {
    /// `bpf_fib_lookup`'s source address where the kernel names one
    /// (`BPF_FIB_LOOKUP_SRC`), the devices' addresses otherwise.
    #[default]
    Auto,
    /// The out device's address from `swy_src_addrs`, even where `bpf_fib_lookup`
    /// could name one.
    Devices,
}

/// How the tc programs are attached on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// TCX links (Linux 6.6), pinned.
    Tcx,
    /// `cls_bpf` filters on a `clsact` qdisc, their programs pinned.
    Classic,
}

/// What the running kernel offers the dataplane, found once when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// How the tc programs are attached.
    pub tc: TcMode,
    /// Whether source NAT takes the source address `bpf_fib_lookup` names for the route
    /// (`BPF_FIB_LOOKUP_SRC`: Linux 6.7, and some older kernels by backport); otherwise
    /// it takes the out device's address in `swy_src_addrs`.
    pub fib_src: bool,
}

/// Where the programs attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attach {
    /// The bpffs directory holding every pin.
    pub bpffs: PathBuf,
    /// The cgroup v2 directory the socket programs attach to.
    pub cgroup: PathBuf,
    /// The devices the tc programs attach to (ingress and egress).
    pub devices: Vec<String>,
}

/// Why the kernel objects could not be set up. Not retryable without a change on the
/// host (a missing mount, an old kernel, a pin from another version).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file operation on the pin directory or the cgroup failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Mounting a bpffs failed.
    #[error("mount -t bpf bpf {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The object could not be loaded (maps created or reopened).
    #[error("loading the eBPF object (maps under {bpffs}): {source}")]
    Object {
        bpffs: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// A program could not be loaded (verifier) or attached.
    #[error("{op} program {program}: {source}")]
    Program {
        op: &'static str,
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// A link (or, for a classic tc filter, the program) could not be pinned.
    #[error("pinning {program} at {path}: {detail}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// A classic tc operation (qdisc, filter) failed; it names the device and program.
    #[error("classic tc attachment: {0}")]
    Tc(#[from] TcError),
    /// The kernel lacks what was asked for.
    #[error("the kernel has no {feature}: {detail}")]
    Missing {
        feature: &'static str,
        detail: String,
    },
    /// The feature probe could not run.
    #[error("probing the kernel for {feature}: {source}")]
    Probe {
        feature: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    /// The maps are unusable.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// A map operation failed.
    #[error(transparent)]
    Map(#[from] MapOpError),
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LoadError {
    let path = path.to_path_buf();
    move |source| LoadError::Io { op, path, source }
}

/// The first 8 bytes of the SHA-256 of the embedded object: which build runs.
pub fn object_hash() -> u64 {
    let digest = Sha256::digest(OBJECT);
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn is_bpffs(path: &Path) -> bool {
    // `f_type` is an i64 on x86_64 and narrower on some other targets.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes `dir` a directory on a bpffs: as it is when it already is one, else a bpffs is
/// mounted on it (created, mode 0700).
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    if dir.is_dir() && is_bpffs(dir) {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent.is_dir()
        && is_bpffs(parent)
    {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io_error("mkdir", dir))?;
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("mkdir -p", dir))?;
    rustix::mount::mount(
        "bpf",
        dir,
        "bpf",
        rustix::mount::MountFlags::empty(),
        c"mode=0700",
    )
    .map_err(|e| LoadError::Mount {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    Ok(())
}

fn pin_path(attach: &Attach, name: &str) -> PathBuf {
    attach.bpffs.join(name)
}

fn sock_pin(program: &str) -> String {
    format!("link-{program}")
}

fn tc_pin(mode: TcMode, hook: Hook, device: &str) -> String {
    let prefix = match mode {
        TcMode::Tcx => TC_LINK_PREFIX,
        TcMode::Classic => TC_PROG_PREFIX,
    };
    format!("{prefix}{}-{}", hook.name(), host::escape_device(device))
}

/// The hook and device a classic program pin names (`prog-tc-ingress-eth0`).
fn parse_prog_pin(name: &str) -> Option<(Hook, String)> {
    let rest = name.strip_prefix(TC_PROG_PREFIX)?;
    let (hook, device) = rest.split_once('-')?;
    let hook = match hook {
        "ingress" => Hook::Ingress,
        "egress" => Hook::Egress,
        _ => return None,
    };
    Some((hook, host::unescape_device(device)?))
}

/// Pins `link` at `path`, atomically replacing an older pin there.
fn pin_over(link: FdLink, program: &'static str, path: &Path) -> Result<(), LoadError> {
    let pin_error = |detail: String| LoadError::Pin {
        program,
        path: path.to_path_buf(),
        detail,
    };
    // bpffs refuses names with a dot (they are kept for its own files).
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let pinned: PinnedLink = link.pin(&tmp).map_err(|e| pin_error(format!("{e:?}")))?;
    fs::rename(&tmp, path).map_err(|e| pin_error(format!("rename from {}: {e}", tmp.display())))?;
    drop(pinned);
    Ok(())
}

fn program_error(
    op: &'static str,
    program: &'static str,
) -> impl FnOnce(ProgramError) -> LoadError {
    move |source| LoadError::Program {
        op,
        program,
        source: Box::new(source),
    }
}

/// The kernel side of a running dataplane.
pub struct Kernel {
    pub maps: Maps,
    /// Whether the pinned links (and classic filters) were reused as they were (no
    /// program loaded).
    pub reused_links: bool,
    /// What the kernel offers, and so which paths the dataplane takes.
    pub features: Features,
}

/// Whether the kernel has TCX: `BPF_PROG_QUERY` knows its attach types (6.6) and
/// refuses them with `EINVAL` before.
fn kernel_has_tcx() -> Result<bool, LoadError> {
    match SchedClassifier::query_tcx("lo", TcAttachType::Ingress) {
        Ok(_) => Ok(true),
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(EINVAL) => {
            Ok(false)
        }
        Err(source) => Err(LoadError::Probe {
            feature: "TCX",
            source: Box::new(source),
        }),
    }
}

/// Whether `bpf_fib_lookup` names source addresses: the probe program, run once.
fn kernel_has_fib_src(ebpf: &mut Ebpf) -> Result<bool, LoadError> {
    let probe_error = |source| LoadError::Probe {
        feature: "BPF_FIB_LOOKUP_SRC",
        source: Box::new(source),
    };
    let probe: &mut SchedClassifier = program(ebpf, PROBE_FIB_SRC)?;
    probe.load().map_err(probe_error)?;
    let packet = [0u8; 64];
    let result = probe
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            ..TestRunOptions::default()
        })
        .map_err(probe_error)?;
    probe.unload().map_err(probe_error)?;
    Ok(result.return_value == 1)
}

/// Finds what the kernel offers and decides the paths (the dataplane logs them, once
/// logging is set up).
fn detect(
    ebpf: &mut Ebpf,
    wanted: TcAttachMode,
    snat_source: SnatSource,
) -> Result<Features, LoadError> {
    let tcx = kernel_has_tcx()?;
    let tc = match (wanted, tcx) {
        (TcAttachMode::Auto | TcAttachMode::Tcx, true) => TcMode::Tcx,
        (TcAttachMode::Auto | TcAttachMode::Classic, _) => TcMode::Classic,
        (TcAttachMode::Tcx, false) => {
            return Err(LoadError::Missing {
                feature: "TCX (Linux 6.6)",
                detail: "--tc-attach tcx was asked for; use auto or classic".into(),
            });
        }
    };
    let fib_src = match snat_source {
        SnatSource::Auto => kernel_has_fib_src(ebpf)?,
        SnatSource::Devices => false,
    };
    Ok(Features { tc, fib_src })
}

/// Sets everything up (see the module docs) and returns the maps.
pub fn open(
    attach: &Attach,
    tc_attach: TcAttachMode,
    snat_source: SnatSource,
) -> Result<Kernel, LoadError> {
    ensure_bpffs(&attach.bpffs)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&attach.bpffs)
        .load(OBJECT)
        .map_err(|source| LoadError::Object {
            bpffs: attach.bpffs.clone(),
            source: Box::new(source),
        })?;
    let mut maps = Maps::from_ebpf(&mut ebpf)?;
    let meta = maps.meta.get(&0, 0).unwrap_or_default();
    let cgroup_id = host::cgroup_id(&attach.cgroup).map_err(io_error("stat", &attach.cgroup))?;
    let hash = object_hash();
    let same_build = meta.object_hash == hash;
    let mut reused = true;
    let features = detect(&mut ebpf, tc_attach, snat_source)?;

    let sock_pinned = SOCK_PROGRAMS
        .iter()
        .chain([&EGRESS_PROGRAM])
        .all(|p| pin_path(attach, &sock_pin(p)).exists());
    if !(same_build && meta.cgroup_id == cgroup_id && sock_pinned) {
        reused = false;
        attach_sock(&mut ebpf, attach)?;
    }
    let mut tc = match features.tc {
        TcMode::Tcx => None,
        TcMode::Classic => Some(open_tc()?),
    };
    for device in &attach.devices {
        for (program, hook) in [(TC_INGRESS, Hook::Ingress), (TC_EGRESS, Hook::Egress)] {
            let path = pin_path(attach, &tc_pin(features.tc, hook, device));
            match &mut tc {
                None => {
                    if same_build && path.exists() {
                        continue;
                    }
                    reused = false;
                    attach_tcx(&mut ebpf, program, device, hook, &path)?;
                }
                Some(tc) => {
                    reused &=
                        attach_classic(&mut ebpf, tc, program, device, hook, &path, same_build)?;
                }
            }
        }
    }
    remove_stale_tc_pins(attach, features.tc, tc.as_mut())?;
    maps.meta
        .set(
            0,
            Meta {
                object_hash: hash,
                cgroup_id,
            },
            0,
        )
        .map_err(|source| MapOpError {
            map: "swy_meta",
            op: "BPF_MAP_UPDATE_ELEM",
            source,
        })?;
    // Dropping the object closes the program descriptors; the pinned links (or the
    // classic filters) keep the programs attached.
    drop(ebpf);
    Ok(Kernel {
        maps,
        reused_links: reused,
        features,
    })
}

/// Program `name` of the object, as the type its section says.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| program_error("find", name)(ProgramError::NotLoaded))?
        .try_into()
        .map_err(program_error("type", name))
}

/// Pins a link taken from program `name` over `pin`.
fn pin_link<L>(link: L, name: &'static str, pin: &Path) -> Result<(), LoadError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let link = FdLink::try_from(link).map_err(|e| LoadError::Pin {
        program: name,
        path: pin.to_path_buf(),
        detail: e.to_string(),
    })?;
    pin_over(link, name, pin)
}

/// Attaches the socket programs with cgroup links (which always allow other programs
/// beside them: `BPF_LINK_CREATE` takes no `BPF_F_ALLOW_MULTI`).
fn attach_sock(ebpf: &mut Ebpf, attach: &Attach) -> Result<(), LoadError> {
    let cgroup = fs::File::open(&attach.cgroup).map_err(io_error("open cgroup", &attach.cgroup))?;
    for &name in SOCK_PROGRAMS {
        let sock: &mut CgroupSockAddr = program(ebpf, name)?;
        sock.load().map_err(program_error("load", name))?;
        let id = sock
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(program_error("attach", name))?;
        let link = sock
            .take_link(id)
            .map_err(program_error("take link", name))?;
        pin_link(link, name, &pin_path(attach, &sock_pin(name)))?;
    }
    let egress: &mut CgroupSkb = program(ebpf, EGRESS_PROGRAM)?;
    egress
        .load()
        .map_err(program_error("load", EGRESS_PROGRAM))?;
    let id = egress
        .attach(
            &cgroup,
            CgroupSkbAttachType::Egress,
            CgroupAttachMode::Single,
        )
        .map_err(program_error("attach", EGRESS_PROGRAM))?;
    let link = egress
        .take_link(id)
        .map_err(program_error("take link", EGRESS_PROGRAM))?;
    pin_link(
        link,
        EGRESS_PROGRAM,
        &pin_path(attach, &sock_pin(EGRESS_PROGRAM)),
    )
}

fn attach_tcx(
    ebpf: &mut Ebpf,
    name: &'static str,
    device: &str,
    hook: Hook,
    pin: &Path,
) -> Result<(), LoadError> {
    let tc = loaded_tc(ebpf, name)?;
    let attach_type = match hook {
        Hook::Ingress => TcAttachType::Ingress,
        Hook::Egress => TcAttachType::Egress,
    };
    let id = tc
        .attach_with_options(
            device,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| LoadError::Program {
            op: "attach (TCX)",
            program: name,
            source: Box::new(source),
        })?;
    let link = tc.take_link(id).map_err(program_error("take link", name))?;
    pin_link(link, name, pin)
}

/// Tc program `name`, loaded (once for every device).
fn loaded_tc<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    let tc: &mut SchedClassifier = program(ebpf, name)?;
    if tc.fd().is_err() {
        tc.load().map_err(program_error("load", name))?;
    }
    Ok(tc)
}

fn open_tc() -> Result<Tc, LoadError> {
    Ok(Tc::open()?)
}

fn ifindex(device: &str) -> Result<u32, LoadError> {
    nix::net::if_::if_nametoindex(device).map_err(|e| LoadError::Io {
        op: "if_nametoindex",
        path: device.into(),
        source: e.into(),
    })
}

/// The id of the program pinned at `pin`, if there is one.
fn pinned_prog_id(pin: &Path) -> Option<u32> {
    ProgramInfo::from_pin(pin).ok().map(|info| info.id())
}

/// Makes the agent's `cls_bpf` filter on `hook` of `device` run program `name` of this
/// build, pinned at `pin`. Returns true when it already did (nothing loaded or
/// attached); otherwise the filter is added, or its program replaced in one step.
fn attach_classic(
    ebpf: &mut Ebpf,
    tc: &mut Tc,
    name: &'static str,
    device: &str,
    hook: Hook,
    pin: &Path,
    same_build: bool,
) -> Result<bool, LoadError> {
    let index = ifindex(device)?;
    let filter = tc.filter(index, device, hook)?;
    if same_build
        && let Some(filter) = &filter
        && pinned_prog_id(pin) == Some(filter.prog_id)
    {
        return Ok(true);
    }
    let program = loaded_tc(ebpf, name)?;
    tc.add_clsact(index, device)?;
    let fd = program.fd().map_err(program_error("attach", name))?;
    tc.attach(index, device, hook, fd.as_fd(), name, filter.is_some())?;
    // bpffs refuses names with a dot (they are kept for its own files).
    let mut tmp = pin.as_os_str().to_owned();
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let pin_error = |detail: String| LoadError::Pin {
        program: name,
        path: pin.to_path_buf(),
        detail,
    };
    program.pin(&tmp).map_err(|e| pin_error(format!("{e:?}")))?;
    fs::rename(&tmp, pin).map_err(|e| pin_error(format!("rename from {}: {e}", tmp.display())))?;
    Ok(false)
}

/// Deletes the agent's filter named by classic program pin `name` (when it still runs
/// the pinned program: a filter another build took over is its own), then the pin.
fn detach_classic(tc: &mut Tc, name: &str, pin: &Path) -> Result<(), LoadError> {
    if let Some((hook, device)) = parse_prog_pin(name)
        && let Ok(index) = nix::net::if_::if_nametoindex(device.as_str())
    {
        let filter = tc.filter(index, &device, hook)?;
        if filter.is_some_and(|f| Some(f.prog_id) == pinned_prog_id(pin)) {
            tc.detach(index, &device, hook)?;
        }
    }
    fs::remove_file(pin).map_err(io_error("unpin", pin))
}

/// Removes the tc attachments of devices no longer configured, and those of the other
/// mode (after this mode's are in place, so there is no gap): a link goes with its pin;
/// a classic filter is deleted, then its program's pin.
fn remove_stale_tc_pins(
    attach: &Attach,
    mode: TcMode,
    tc: Option<&mut Tc>,
) -> Result<(), LoadError> {
    let wanted: Vec<String> = attach
        .devices
        .iter()
        .flat_map(|d| {
            [
                tc_pin(mode, Hook::Ingress, d),
                tc_pin(mode, Hook::Egress, d),
            ]
        })
        .collect();
    let mut tc = tc;
    let mut opened = None;
    let dir = fs::read_dir(&attach.bpffs).map_err(io_error("read", &attach.bpffs))?;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if wanted.contains(&name) {
            continue;
        }
        if name.starts_with(TC_LINK_PREFIX) {
            tracing::info!(pin = %name, "detaching a tc link no longer wanted");
            fs::remove_file(entry.path()).map_err(io_error("unpin", &entry.path()))?;
        } else if name.starts_with(TC_PROG_PREFIX) {
            tracing::info!(pin = %name, "deleting a tc filter no longer wanted");
            let tc = match (tc.as_deref_mut(), &mut opened) {
                (Some(tc), _) => tc,
                (None, Some(tc)) => tc,
                (None, opened) => opened.insert(open_tc()?),
            };
            detach_classic(tc, &name, &entry.path())?;
        }
    }
    Ok(())
}

/// Whether a pin directory entry is one of the agent's: its links, programs and maps.
fn is_ours(name: &str) -> bool {
    name.starts_with("link-") || name.starts_with("prog-") || name.starts_with("swy_")
}

/// When [`cleanup`] removes a pin: the tc programs (links or classic filters), then the
/// socket programs' cgroup links, then the maps.
///
/// - Programs before maps, so no program runs on half-removed maps.
/// - tc before the socket programs. While those are attached, a connection of the
///   balanced cgroup is translated at `connect()` and no packet of it meets tc. Were they
///   detached first, the cgroup's new connections would reach tc's programs with the
///   Service address for the moment before tc goes. tc would translate them, then be
///   removed mid-connection, leaving the rest of each such flow to the stack: a reset or
///   a stall (seen under a connection loop switching eBPF to IPVS in user-mode Linux).
fn removal_order(name: &str) -> u8 {
    if name.starts_with(TC_LINK_PREFIX) || name.starts_with(TC_PROG_PREFIX) {
        0
    } else if name.starts_with("link-") || name.starts_with("prog-") {
        1
    } else {
        2
    }
}

/// Detaches and unpins everything the agent pinned under `bpffs` (in
/// [`removal_order`]: tc links and classic filters with their programs, then the cgroup
/// links, then maps), unmounts the bpffs mounted on it,
/// if any, and removes the directory when nothing else is left in it. Run it in the
/// network namespace of the devices (classic filters are found by device name).
pub fn cleanup(bpffs: &Path) -> Result<(), LoadError> {
    if !bpffs.exists() {
        return Ok(());
    }
    let mut entries: Vec<(String, PathBuf)> = fs::read_dir(bpffs)
        .map_err(io_error("read", bpffs))?
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(name, _)| is_ours(name))
        .collect();
    entries.sort_by_key(|(name, _)| removal_order(name));
    let mut tc = None;
    for (name, path) in entries {
        if name.starts_with(TC_PROG_PREFIX) {
            let tc = match &mut tc {
                Some(tc) => tc,
                None => tc.insert(open_tc()?),
            };
            detach_classic(tc, &name, &path)?;
        } else {
            fs::remove_file(&path).map_err(io_error("unpin", &path))?;
        }
    }
    let mounted_here = is_bpffs(bpffs) && bpffs.parent().is_none_or(|p| !is_bpffs(p));
    if mounted_here {
        rustix::mount::unmount(bpffs, rustix::mount::UnmountFlags::empty()).map_err(|e| {
            LoadError::Io {
                op: "umount",
                path: bpffs.to_path_buf(),
                source: e.into(),
            }
        })?;
    }
    match fs::remove_dir(bpffs) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(()),
        Err(e) => Err(io_error("rmdir", bpffs)(e)),
    }
}

/// Keeps `dir` private to root when the agent created it on an existing bpffs.
pub fn restrict(dir: &Path) -> Result<(), LoadError> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error("chmod", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_removes_tc_before_the_socket_programs_and_the_maps_last() {
        let classic = tc_pin(TcMode::Classic, Hook::Ingress, "eth0");
        let tcx = tc_pin(TcMode::Tcx, Hook::Egress, "eth0");
        let connect = sock_pin("swy_connect4");
        let egress = sock_pin(EGRESS_PROGRAM);
        let mut names = vec![
            "swy_services".to_string(),
            connect.clone(),
            classic.clone(),
            egress.clone(),
            tcx.clone(),
        ];
        names.sort_by_key(|name| removal_order(name));
        assert_eq!(
            names,
            [classic, tcx, connect, egress, "swy_services".to_string()]
        );
    }
}
