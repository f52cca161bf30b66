//! The desired cache on disk, and how a restarted agent decides what it still holds.
//!
//! Entry point: [`CacheFile`] (a record after every successful apply, load on start) and
//! [`reconcile`] (kernel read-back + cache → held state and declared versions).
//!
//! # Restart without flush or resend
//! The file holds, per resource, the version and the encoded `v1::ServiceState` the
//! kernel was last programmed from. It is a log: each apply appends the records of the
//! resources it changed and fsyncs before the agent acknowledges, so a change costs what
//! it touches, not the node's Service count; once the log has grown to twice its
//! compacted size it is rewritten whole on a thread of its own, atomically (temporary
//! file, fsync, rename; the records appended meanwhile go to the new file first). On start the agent reads the kernel back and
//! loads the file. A resource is *held* (its state is known, nothing is rewritten) only
//! when the kernel records the same version as the cache — or, for a dataplane that
//! records no version, when its kernel objects are exactly what the cached state renders
//! to. Nothing is applied on start.
//!
//! Every resource found in the kernel is declared in `initial_resource_versions`: held
//! ones with their version, the others with the empty string, which no controller version
//! equals. The controller therefore resends the ones it still wants (they are upserted
//! over what the kernel holds) and sends a removal for the ones it does not. A kernel
//! resource left undeclared would never be removed by the controller, since it removes
//! only what it believes the node holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use prost::Message;
use switchyard_proto::{format_version, parse_version, state::ServiceState, v1};

use crate::dataplane::{Desired, DesiredService, Programmed};

/// Why the cache file could not be read or written. Never fatal: without a cache the
/// agent declares every kernel resource as unknown and the controller resends.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Reading, writing or renaming the file failed.
    #[error("{operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a sequence of length-delimited `v1::Resource` messages.
    #[error("{path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
}

/// The cache file of one dataplane's state directory: a log of length-delimited
/// `v1::Resource` records, each a Service's state (later records win) or, without a
/// service, its removal. Shared by clones (one open file, one writer at a time).
#[derive(Clone, Debug)]
pub struct CacheFile {
    path: PathBuf,
    log: Arc<Mutex<Log>>,
    /// [`MIN_COMPACTION_BYTES`], smaller in tests.
    min_compaction: u64,
}

/// The writing side of the log.
#[derive(Debug, Default)]
struct Log {
    /// Open for appending since the last compaction by this process; `None` until the
    /// first write, which compacts (so a log always starts from a whole state this
    /// process wrote, never from a tail it did not).
    file: Option<fs::File>,
    /// Bytes in the file, and how many of them the last compaction wrote.
    bytes: u64,
    compacted: u64,
    /// While a compaction runs in the background: the records appended since the state
    /// it writes, which go to the compacted file too before it replaces this one.
    since_snapshot: Option<Vec<u8>>,
}

/// A log grows to this many times its compacted size (and at least
/// [`MIN_COMPACTION_BYTES`]) before it is rewritten whole: compaction costs O(Services)
/// once every O(Services) changes, so each change costs O(1) on average.
const COMPACTION_RATIO: u64 = 2;
const MIN_COMPACTION_BYTES: u64 = 256 * 1024;

/// The version string a resource is declared with when its state is unknown.
pub const UNKNOWN_VERSION: &str = "";

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io {
        operation,
        path,
        source,
    }
}

/// The whole of `desired`, a record per resource.
fn encode_all(desired: &Desired) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (name, service) in desired {
        encode_record(&mut bytes, name, Some(service));
    }
    bytes
}

/// The record of `name`: its state in `desired`, or its removal.
fn encode_record(bytes: &mut Vec<u8>, name: &str, service: Option<&DesiredService>) {
    let resource = v1::Resource {
        name: name.to_string(),
        version: service.map_or_else(String::new, |s| format_version(s.version)),
        service: service.map(|s| s.state.as_ref().into()),
    };
    resource
        .encode_length_delimited(bytes)
        .expect("a Vec grows as needed");
}

impl CacheFile {
    /// The cache file inside `state_dir` (created on first store).
    pub fn in_dir(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("desired.pb"),
            log: Arc::default(),
            min_compaction: MIN_COMPACTION_BYTES,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the file with `desired`, atomically (a new file, fsync, rename), and
    /// keeps it open for [`CacheFile::record`].
    pub fn store(&self, desired: &Desired) -> Result<(), CacheError> {
        let mut log = self.log();
        self.compact(&mut log, desired)
    }

    fn compact(&self, log: &mut Log, desired: &Desired) -> Result<(), CacheError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        let bytes = encode_all(desired);
        let tmp = self.path.with_extension("pb.tmp");
        let mut file = fs::File::create(&tmp).map_err(io_error("create", &tmp))?;
        file.write_all(&bytes).map_err(io_error("write", &tmp))?;
        file.sync_all().map_err(io_error("fsync", &tmp))?;
        self.install(log, &tmp, bytes.len() as u64)
    }

    /// Renames the complete, fsynced `tmp` (of `size` bytes) over the file, makes the
    /// rename durable and reopens the file for appending.
    fn install(&self, log: &mut Log, tmp: &Path, size: u64) -> Result<(), CacheError> {
        fs::rename(tmp, &self.path).map_err(io_error("rename to", &self.path))?;
        // From here the new file is the cache; if it cannot be reopened, the next
        // record compacts synchronously.
        log.file = None;
        log.since_snapshot = None;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        // The rename is durable once the directory is.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("fsync", dir))?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(io_error("open for appending", &self.path))?;
        *log = Log {
            file: Some(file),
            bytes: size,
            compacted: size,
            since_snapshot: None,
        };
        Ok(())
    }

    /// Starts rewriting the file from `snapshot` on a thread of its own, so no change
    /// waits for the whole file: records appended meanwhile are kept and appended to the
    /// new file before it replaces the old one, which stays whole until that rename.
    fn compact_in_background(&self, log: &mut Log, snapshot: Desired) {
        log.since_snapshot = Some(Vec::new());
        let cache = self.clone();
        let spawned = std::thread::Builder::new()
            .name("cache-compaction".into())
            .spawn(move || {
                if let Err(error) = cache.finish_compaction(&snapshot) {
                    tracing::warn!(%error, "compacting the desired cache failed; it keeps growing until the next try");
                    cache.log().since_snapshot = None;
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start compacting the desired cache");
            log.since_snapshot = None;
        }
    }

    /// The background half of [`CacheFile::compact_in_background`].
    fn finish_compaction(&self, snapshot: &Desired) -> Result<(), CacheError> {
        // Not the synchronous compaction's temporary file: that one may be written
        // meanwhile (after a failed append), and must not be this thread's.
        let tmp = self.path.with_extension("pb.compacting");
        let bytes = encode_all(snapshot);
        let mut file = fs::File::create(&tmp).map_err(io_error("create", &tmp))?;
        file.write_all(&bytes).map_err(io_error("write", &tmp))?;
        file.sync_data().map_err(io_error("fsync", &tmp))?;
        // Only the tail waits for appends to pause: the records made meanwhile.
        let mut log = self.log();
        let Some(since) = log.since_snapshot.take() else {
            // A synchronous compaction replaced the file meanwhile: this one is stale.
            drop(log);
            let _ = fs::remove_file(&tmp);
            return Ok(());
        };
        file.write_all(&since).map_err(io_error("write", &tmp))?;
        file.sync_all().map_err(io_error("fsync", &tmp))?;
        self.install(&mut log, &tmp, (bytes.len() + since.len()) as u64)
    }

    /// Records that the resources `names` now hold what `desired` says (absent: removed),
    /// durably (appended and fsynced) before returning: O(the change). The first record
    /// of a process writes the whole file; once the log has grown past its limit it is
    /// rewritten from `desired` in the background.
    pub fn record<'a>(
        &self,
        desired: &Desired,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Result<(), CacheError> {
        let mut log = self.log();
        if log.file.is_none() {
            return self.compact(&mut log, desired);
        }
        let mut bytes = Vec::new();
        for name in names {
            encode_record(&mut bytes, name, desired.get(name));
        }
        let file = log.file.as_mut().expect("checked above");
        let written = file
            .write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(io_error("append to", &self.path));
        if let Err(error) = written {
            // A partial append must not be extended: the next record compacts.
            log.file = None;
            return Err(error);
        }
        log.bytes += bytes.len() as u64;
        let limit = (log.compacted * COMPACTION_RATIO).max(self.min_compaction);
        if let Some(since) = log.since_snapshot.as_mut() {
            since.extend_from_slice(&bytes);
        } else if log.bytes > limit {
            // `desired` already holds this record's changes.
            self.compact_in_background(&mut log, desired.clone());
        }
        Ok(())
    }

    /// Whether a background compaction is running (tests wait for it).
    #[cfg(test)]
    fn compacting(&self) -> bool {
        self.log().since_snapshot.is_some()
    }

    /// What the file holds; empty when there is no file yet. Entries that do not convert
    /// are dropped (their resources count as unknown). A record cut short at the end (the
    /// agent stopped while appending) is ignored: it was never acknowledged, and what it
    /// named counts as unknown against the kernel's version.
    pub fn load(&self) -> Result<Desired, CacheError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Desired::new()),
            Err(source) => {
                return Err(CacheError::Io {
                    operation: "read",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let mut buf = bytes.as_slice();
        let mut desired = Desired::new();
        while !buf.is_empty() {
            let before = buf;
            let resource = match v1::Resource::decode_length_delimited(&mut buf) {
                Ok(resource) => resource,
                Err(source) if is_cut_short(before) => {
                    tracing::warn!(%source, bytes = before.len(), "ignoring a cache record cut short at the end");
                    break;
                }
                Err(source) => {
                    return Err(CacheError::Corrupt {
                        path: self.path.clone(),
                        source,
                    });
                }
            };
            if resource.service.is_none() {
                desired.remove(&resource.name);
                continue;
            }
            match convert(&resource) {
                Ok(service) => {
                    desired.insert(resource.name, service);
                }
                Err(error) => {
                    desired.remove(&resource.name);
                    tracing::warn!(name = %switchyard_proto::names::quote_bounded(&resource.name), %error, "dropping a cache entry");
                }
            }
        }
        Ok(desired)
    }
}

/// Whether `tail` is one record whose length prefix promises more bytes than are left.
fn is_cut_short(tail: &[u8]) -> bool {
    let mut buf = tail;
    match prost::encoding::decode_varint(&mut buf) {
        Ok(length) => length > buf.len() as u64,
        // The prefix itself is cut short.
        Err(_) => tail.len() < 10,
    }
}

/// Turns a wire resource into a desired Service, or says why it cannot be applied.
pub fn convert(resource: &v1::Resource) -> Result<DesiredService, String> {
    let version = parse_version(&resource.version).ok_or_else(|| {
        format!(
            "version {} is not 16 hex digits",
            switchyard_proto::names::quote_bounded(&resource.version)
        )
    })?;
    let wire = resource.service.as_ref().ok_or("service is missing")?;
    let state = ServiceState::try_from(wire).map_err(|e| e.to_string())?;
    if state.key.to_string() != resource.name {
        return Err(format!(
            "resource name {} does not match its service {}",
            switchyard_proto::names::quote_bounded(&resource.name),
            state.key
        ));
    }
    Ok(DesiredService::new(version, state))
}

/// What a restarted agent holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Resources whose kernel state is confirmed by the cache: the desired cache to
    /// start from.
    pub held: Desired,
    /// Resources in the kernel whose state is unknown: declared with
    /// [`UNKNOWN_VERSION`] until the controller resends or removes them.
    pub unknown: BTreeSet<String>,
}

impl Reconciled {
    /// `initial_resource_versions` for the first message of a stream.
    pub fn declared(held: &Desired, unknown: &BTreeSet<String>) -> BTreeMap<String, String> {
        held.iter()
            .map(|(n, s)| (n.clone(), format_version(s.version)))
            .chain(unknown.iter().map(|n| (n.clone(), UNKNOWN_VERSION.into())))
            .collect()
    }
}

/// Decides, from the kernel and the cache, what a restarted agent holds (see the module
/// docs). `expected` renders a cached Service for dataplanes that record no version.
pub fn reconcile(
    kernel: &Programmed,
    mut cached: Desired,
    expected: impl Fn(&str, &DesiredService) -> Vec<String>,
) -> Reconciled {
    let mut reconciled = Reconciled::default();
    for (name, programmed) in kernel {
        let confirmed = cached
            .remove(name)
            .filter(|service| match programmed.version {
                Some(version) => version == service.version,
                None => expected(name, service) == programmed.kernel_objects,
            });
        match confirmed {
            Some(service) => {
                reconciled.held.insert(name.clone(), service);
            }
            None => {
                reconciled.unknown.insert(name.clone());
            }
        }
    }
    reconciled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dataplane::ProgrammedService, testing::memory_objects};

    fn service(name: &str, version: u64) -> DesiredService {
        let (namespace, n) = name.split_once('/').unwrap();
        let wire = v1::ServiceState {
            namespace: namespace.into(),
            name: n.into(),
            cluster_ips: vec!["10.96.0.1".into()],
            ..Default::default()
        };
        DesiredService::new(version, ServiceState::try_from(&wire).unwrap())
    }

    #[test]
    fn the_cache_file_survives_a_store_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheFile::in_dir(&dir.path().join("iptables"));
        assert_eq!(cache.load().unwrap(), Desired::new());
        let desired: Desired = [("a/x", 1), ("b/y", 2)]
            .into_iter()
            .map(|(n, v)| (n.to_string(), service(n, v)))
            .collect();
        cache.store(&desired).unwrap();
        assert_eq!(cache.load().unwrap(), desired);
        cache.store(&Desired::new()).unwrap();
        assert_eq!(cache.load().unwrap(), Desired::new());
    }

    fn desired_of(entries: &[(&str, u64)]) -> Desired {
        entries
            .iter()
            .map(|(n, v)| (n.to_string(), service(n, *v)))
            .collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn records_append_the_changed_resources_and_a_load_replays_them() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheFile::in_dir(dir.path());
        let mut desired = desired_of(&[("a/x", 1), ("b/y", 2), ("c/z", 3)]);
        // The first record of a process writes the whole state.
        cache.record(&desired, &names(&["a/x"])).unwrap();
        let compacted = fs::metadata(cache.path()).unwrap().len();
        assert_eq!(cache.load().unwrap(), desired);

        desired.insert("a/x".into(), service("a/x", 7));
        desired.remove("b/y");
        cache.record(&desired, &names(&["a/x", "b/y"])).unwrap();
        let appended = fs::metadata(cache.path()).unwrap().len() - compacted;
        assert!(
            appended < compacted,
            "two records ({appended} bytes) appended, not the whole state ({compacted})"
        );
        assert_eq!(cache.load().unwrap(), desired);
        // Another process (a restarted agent) reads the same.
        assert_eq!(CacheFile::in_dir(dir.path()).load().unwrap(), desired);
    }

    #[test]
    fn the_log_is_compacted_once_it_outgrows_its_compacted_size() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheFile {
            min_compaction: 4096,
            ..CacheFile::in_dir(dir.path())
        };
        let mut desired = desired_of(&[("a/x", 1), ("b/y", 1)]);
        cache.store(&desired).unwrap();
        let mut largest = 0;
        for version in 2..500 {
            let name = if version % 2 == 0 { "a/x" } else { "b/y" };
            desired.insert(name.into(), service(name, version));
            cache.record(&desired, &names(&[name])).unwrap();
            // Whole at every moment, compaction running or not.
            assert_eq!(cache.load().unwrap(), desired, "after version {version}");
            largest = largest.max(fs::metadata(cache.path()).unwrap().len());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cache.compacting() {
            assert!(
                std::time::Instant::now() < deadline,
                "the compaction never ends"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            largest <= 2 * 4096 + 2048,
            "the log stays bounded: {largest} bytes"
        );
        assert_eq!(cache.load().unwrap(), desired);
        assert!(fs::metadata(cache.path()).unwrap().len() < 4096);
    }

    #[test]
    fn a_record_cut_short_at_the_end_is_ignored_and_corruption_elsewhere_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheFile::in_dir(dir.path());
        let mut desired = desired_of(&[("a/x", 1), ("b/y", 2)]);
        cache.store(&desired).unwrap();
        let whole = fs::read(cache.path()).unwrap();
        desired.insert("a/x".into(), service("a/x", 9));
        cache.record(&desired, &names(&["a/x"])).unwrap();
        let with_record = fs::read(cache.path()).unwrap();

        // The agent stopped halfway through appending: the last good state is read.
        fs::write(cache.path(), &with_record[..with_record.len() - 3]).unwrap();
        assert_eq!(cache.load().unwrap(), desired_of(&[("a/x", 1), ("b/y", 2)]));
        // A length prefix alone, cut short too.
        let mut prefix_only = whole.clone();
        prefix_only.push(0x80);
        fs::write(cache.path(), &prefix_only).unwrap();
        assert_eq!(cache.load().unwrap().len(), 2);

        // Garbage that is not a short tail is corruption.
        let mut garbage = whole;
        garbage.extend_from_slice(&[0x05, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x02]);
        fs::write(cache.path(), &garbage).unwrap();
        assert!(matches!(cache.load(), Err(CacheError::Corrupt { .. })));
    }

    #[test]
    fn only_kernel_resources_at_the_cached_version_are_held_and_every_kernel_resource_is_declared()
    {
        let same = service("ns/same", 1);
        let moved = service("ns/moved", 2);
        let unversioned = service("ns/unversioned", 3);
        let kernel: Programmed = [
            (
                "ns/same",
                ProgrammedService {
                    version: Some(1),
                    kernel_objects: vec![],
                },
            ),
            (
                "ns/moved",
                ProgrammedService {
                    version: Some(9),
                    kernel_objects: vec![],
                },
            ),
            ("ns/uncached", ProgrammedService::default()),
            (
                "ns/unversioned",
                ProgrammedService {
                    version: None,
                    kernel_objects: memory_objects("ns/unversioned", &unversioned),
                },
            ),
        ]
        .into_iter()
        .map(|(n, p)| (n.to_string(), p))
        .collect();
        let cached: Desired = [
            ("ns/same", same.clone()),
            ("ns/moved", moved),
            ("ns/unversioned", unversioned.clone()),
            ("ns/gone-from-kernel", service("ns/gone-from-kernel", 4)),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();

        let r = reconcile(&kernel, cached, memory_objects);
        assert_eq!(
            r.held.keys().collect::<Vec<_>>(),
            ["ns/same", "ns/unversioned"]
        );
        assert_eq!(
            r.unknown.iter().collect::<Vec<_>>(),
            ["ns/moved", "ns/uncached"]
        );
        let declared = Reconciled::declared(&r.held, &r.unknown);
        assert_eq!(declared["ns/same"], format_version(1));
        assert_eq!(declared["ns/moved"], UNKNOWN_VERSION);
        assert!(!declared.contains_key("ns/gone-from-kernel"));
        assert_eq!(parse_version(UNKNOWN_VERSION), None);
    }

    #[test]
    fn resources_that_do_not_convert_are_rejected_with_a_reason() {
        let mut resource = v1::Resource {
            name: "ns/a".into(),
            version: format_version(5),
            service: Some(v1::ServiceState {
                namespace: "ns".into(),
                name: "a".into(),
                ..Default::default()
            }),
        };
        assert_eq!(convert(&resource).unwrap().version, 5);
        resource.name = "ns/b".into();
        assert!(convert(&resource).unwrap_err().contains("does not match"));
        resource.version = "xyz".into();
        assert!(convert(&resource).unwrap_err().contains("version"));
    }
}
