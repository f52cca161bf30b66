//! The kernel objects behind the maps: the bpffs directory (mounted when missing), the
//! eBPF object (its maps created there or reused from their pins), the programs and their
//! links, pinned so that forwarding outlives the agent (fail-static).
//!
//! # Restarts and upgrades
//! A pinned `swy_meta` map records which build of the programs the pinned links run and
//! the cgroup they are attached to. A restarted agent of the same build, with the same
//! cgroup and devices, reuses every pin and loads no program: nothing is detached or
//! attached. A different build (or cgroup) attaches its programs next to the old ones
//! (cgroup links allow several programs; TCX keeps a list), pins the new links over the
//! old pins, and the old links go away with their last reference. Both translate the
//! same way from the same maps, so there is no gap either way.
//!
//! # Minimum kernel version
//! 6.7: TCX links (6.6) and `bpf_fib_lookup`'s source address for source NAT (6.7);
//! `bpf_set_retval` for `ECONNREFUSED` at connect() (5.18); BTF-defined maps.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, LinkOrder, Program,
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
    },
};
use sha2::{Digest, Sha256};

use crate::{
    abi::Meta,
    host,
    maps::{MapOpError, Maps, MapsError},
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
/// Prefix of the pins of tc links; the rest names the direction and the device.
const TC_PIN_PREFIX: &str = "link-tc-";

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
    /// A link could not be pinned.
    #[error("pinning the link of {program} at {path}: {detail}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        detail: String,
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

fn tc_pin(direction: &str, device: &str) -> String {
    format!("{TC_PIN_PREFIX}{direction}-{}", host::escape_device(device))
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
    /// Whether the pinned links were reused as they were (no program loaded).
    pub reused_links: bool,
}

/// Sets everything up (see the module docs) and returns the maps.
pub fn open(attach: &Attach) -> Result<Kernel, LoadError> {
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

    let sock_pinned = SOCK_PROGRAMS
        .iter()
        .chain([&EGRESS_PROGRAM])
        .all(|p| pin_path(attach, &sock_pin(p)).exists());
    if !(same_build && meta.cgroup_id == cgroup_id && sock_pinned) {
        reused = false;
        attach_sock(&mut ebpf, attach)?;
    }
    for device in &attach.devices {
        for (program, direction, attach_type) in [
            (TC_INGRESS, "ingress", TcAttachType::Ingress),
            (TC_EGRESS, "egress", TcAttachType::Egress),
        ] {
            let path = pin_path(attach, &tc_pin(direction, device));
            if same_build && path.exists() {
                continue;
            }
            reused = false;
            attach_tc(&mut ebpf, program, device, attach_type, &path)?;
        }
    }
    remove_stale_tc_pins(attach)?;
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
    // Dropping the object closes the program descriptors; the pinned links keep the
    // programs attached.
    drop(ebpf);
    Ok(Kernel {
        maps,
        reused_links: reused,
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

fn attach_tc(
    ebpf: &mut Ebpf,
    name: &'static str,
    device: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<(), LoadError> {
    let tc: &mut SchedClassifier = program(ebpf, name)?;
    if tc.fd().is_err() {
        tc.load().map_err(program_error("load", name))?;
    }
    let id = tc
        .attach_with_options(
            device,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| LoadError::Program {
            op: "attach (TCX, kernel 6.6 or later)",
            program: name,
            source: Box::new(source),
        })?;
    let link = tc.take_link(id).map_err(program_error("take link", name))?;
    pin_link(link, name, pin)
}

/// Removes the pins of tc links on devices no longer configured (which detaches them).
fn remove_stale_tc_pins(attach: &Attach) -> Result<(), LoadError> {
    let wanted: Vec<String> = attach
        .devices
        .iter()
        .flat_map(|d| [tc_pin("ingress", d), tc_pin("egress", d)])
        .collect();
    let dir = fs::read_dir(&attach.bpffs).map_err(io_error("read", &attach.bpffs))?;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TC_PIN_PREFIX) && !wanted.contains(&name) {
            tracing::info!(pin = %name, "detaching tc programs from a device no longer configured");
            fs::remove_file(entry.path()).map_err(io_error("unpin", &entry.path()))?;
        }
    }
    Ok(())
}

/// Whether a pin directory entry is one of the agent's: its links and maps.
fn is_ours(name: &str) -> bool {
    name.starts_with("link-") || name.starts_with("swy_")
}

/// Detaches and unpins everything the agent pinned under `bpffs` (links first, then
/// maps), unmounts the bpffs mounted on it, if any, and removes the directory when
/// nothing else is left in it.
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
    // Links before maps, so no program runs on half-removed maps.
    entries.sort_by_key(|(name, _)| !name.starts_with("link-"));
    for (_, path) in entries {
        fs::remove_file(&path).map_err(io_error("unpin", &path))?;
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
