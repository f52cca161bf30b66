//! The desired cache on disk, and how a restarted agent decides what it still holds.
//!
//! Entry point: [`CacheFile`] (store after every successful apply, load on start) and
//! [`reconcile`] (kernel read-back + cache → held state and declared versions).
//!
//! # Restart without flush or resend
//! The file holds, per resource, the version and the encoded `v1::ServiceState` the
//! kernel was last programmed from; it is replaced atomically (temporary file, fsync,
//! rename) after every successful apply. On start the agent reads the kernel back and
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

/// The cache file of one dataplane's state directory.
#[derive(Clone, Debug)]
pub struct CacheFile {
    path: PathBuf,
}

/// The version string a resource is declared with when its state is unknown.
pub const UNKNOWN_VERSION: &str = "";

impl CacheFile {
    /// The cache file inside `state_dir` (created on first store).
    pub fn in_dir(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("desired.pb"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file with `desired`, atomically.
    pub fn store(&self, desired: &Desired) -> Result<(), CacheError> {
        let io = |operation, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io {
                operation,
                path,
                source,
            }
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io("create directory", dir))?;
        let mut bytes = Vec::new();
        for (name, service) in desired {
            let resource = v1::Resource {
                name: name.clone(),
                version: format_version(service.version),
                service: Some((&service.state).into()),
            };
            resource
                .encode_length_delimited(&mut bytes)
                .expect("a Vec grows as needed");
        }
        let tmp = self.path.with_extension("pb.tmp");
        let mut file = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&bytes).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(io("rename to", &self.path))?;
        Ok(())
    }

    /// What the file holds; empty when there is no file yet. Entries that do not convert
    /// are dropped (their resources count as unknown).
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
            let resource = v1::Resource::decode_length_delimited(&mut buf).map_err(|source| {
                CacheError::Corrupt {
                    path: self.path.clone(),
                    source,
                }
            })?;
            match convert(&resource) {
                Ok(service) => {
                    desired.insert(resource.name, service);
                }
                Err(error) => {
                    tracing::warn!(name = %resource.name, %error, "dropping a cache entry");
                }
            }
        }
        Ok(desired)
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
    Ok(DesiredService { version, state })
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
        DesiredService {
            version,
            state: ServiceState::try_from(&wire).unwrap(),
        }
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
