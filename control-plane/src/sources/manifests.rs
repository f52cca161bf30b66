//! Reads a folder of YAML/JSON manifests and watches it for changes: the embedded
//! default when no cluster is configured.
//!
//! Entry points: [`ManifestSource::run`] (initial read, then watch until the store goes
//! away) and [`parse_file`] (pure: one file's text → objects or problems).
//!
//! Every file is one [`Origin`]: a good file replaces everything it held before; a file
//! with any problem reports its problems and keeps its last good objects in the store,
//! so a half-saved edit never removes Services from the cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::{sync::mpsc, time::Instant};

use super::{Origin, StoreSender, StoreUpdate};
use crate::{
    convert,
    model::{Object, ObjectKind, ObjectRef},
};

/// Namespace given to Services and EndpointSlices that do not name one, as `kubectl
/// apply` would.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How long the folder must stay quiet before changed files are read: long enough for
/// an editor's write-then-rename, short enough to feel instant.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);

/// Longest a steady stream of events can postpone reading, so a busy writer cannot
/// starve the store.
const MAX_DEBOUNCE_DELAY: Duration = Duration::from_millis(500);

/// Why the manifest source stopped. All are fatal and not retryable as such: they need
/// someone to fix the folder (or the host's inotify limits) and restart.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifests folder does not exist.
    #[error("manifests folder {dir} does not exist")]
    Missing { dir: PathBuf },
    /// The manifests path exists but is not a folder.
    #[error("manifests path {dir} is not a folder")]
    NotADirectory { dir: PathBuf },
    /// The manifests folder cannot be read (permissions, I/O error).
    #[error("cannot read manifests folder {dir}")]
    Read {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// inotify could not watch the folder (e.g. `fs.inotify.max_user_watches` reached).
    #[error("cannot watch manifests folder {dir}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// One thing wrong in a manifest file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProblem {
    /// The object at fault; `None` when the problem is not one object's (a syntax error,
    /// a document without `kind`, an unreadable file).
    pub object: Option<ObjectRef>,
    /// Names the file, the document (1-based) and the field.
    pub message: String,
}

/// Whether a file name is one the source reads: `*.yaml`, `*.yml`, `*.json`, not hidden
/// (editors' swap and backup files start with a dot).
pub fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

/// Parses and converts one manifest file: every document of a multi-document YAML
/// file (or a JSON stream), with `List` / `*List` objects expanded.
///
/// Only `v1` Service, `discovery.k8s.io/v1` EndpointSlice and `v1` Node are used; any
/// other kind is ignored (debug log). Services and EndpointSlices without a namespace
/// get [`DEFAULT_NAMESPACE`]. FQDN EndpointSlices are skipped.
///
/// Returns every problem found, or the objects in file order when there is none.
pub fn parse_file(path: &Path, contents: &str) -> Result<Vec<Object>, Vec<FileProblem>> {
    let mut parser = FileParser {
        path,
        objects: Vec::new(),
        seen: BTreeMap::new(),
        problems: Vec::new(),
    };
    let is_json = path.extension().is_some_and(|ext| ext == "json");
    if is_json {
        let stream = serde_json::Deserializer::from_str(contents).into_iter::<Value>();
        for (index, document) in stream.enumerate() {
            match document {
                Ok(value) => parser.document(index + 1, value),
                Err(e) => {
                    parser.syntax_error(index + 1, &e);
                    break;
                }
            }
        }
    } else {
        for (index, document) in serde_yaml::Deserializer::from_str(contents).enumerate() {
            match Value::deserialize(document) {
                Ok(value) => parser.document(index + 1, value),
                Err(e) => {
                    parser.syntax_error(index + 1, &e);
                    // After a syntax error the stream's document boundaries are unknown.
                    break;
                }
            }
        }
    }
    if parser.problems.is_empty() {
        Ok(parser.objects)
    } else {
        Err(parser.problems)
    }
}

struct FileParser<'a> {
    path: &'a Path,
    objects: Vec<Object>,
    /// Where each object was first defined, to report duplicates.
    seen: BTreeMap<ObjectRef, String>,
    problems: Vec<FileProblem>,
}

impl FileParser<'_> {
    fn syntax_error(&mut self, document: usize, error: &dyn std::fmt::Display) {
        self.problems.push(FileProblem {
            object: None,
            message: format!(
                "{}: document {document}: not valid {}: {error}",
                self.path.display(),
                if self.path.extension().is_some_and(|e| e == "json") {
                    "JSON"
                } else {
                    "YAML"
                }
            ),
        });
    }

    fn problem(
        &mut self,
        object: Option<ObjectRef>,
        location: &str,
        message: impl std::fmt::Display,
    ) {
        let what = object
            .as_ref()
            .map(|o| format!("{o}: "))
            .unwrap_or_default();
        self.problems.push(FileProblem {
            message: format!("{}: {location}: {what}{message}", self.path.display()),
            object,
        });
    }

    fn document(&mut self, index: usize, value: Value) {
        self.value(format!("document {index}"), value);
    }

    /// One object (or list of objects) at `location` ("document 2", "document 2: items[3]").
    fn value(&mut self, location: String, mut value: Value) {
        let Value::Object(fields) = &mut value else {
            if !value.is_null() {
                self.problem(None, &location, "not an object with apiVersion and kind");
            }
            // An empty document (`---` at the end, a file of comments) holds nothing.
            return;
        };
        let api_version = fields.get("apiVersion").and_then(Value::as_str);
        let kind = fields.get("kind").and_then(Value::as_str);
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            self.problem(None, &location, "apiVersion and kind must be set");
            return;
        };
        let (api_version, kind) = (api_version.to_owned(), kind.to_owned());

        if let Some(item_kind) = kind.strip_suffix("List")
            && let Some(items) = fields.get_mut("items")
        {
            let items = match items.take() {
                Value::Array(items) => items,
                Value::Null => Vec::new(),
                _ => {
                    self.problem(None, &location, "items: must be a list");
                    return;
                }
            };
            for (i, mut item) in items.into_iter().enumerate() {
                // Items of a typed list (`ServiceList`) may leave out their type.
                if let (Value::Object(item_fields), false) = (&mut item, item_kind.is_empty()) {
                    item_fields
                        .entry("apiVersion")
                        .or_insert_with(|| api_version.clone().into());
                    item_fields
                        .entry("kind")
                        .or_insert_with(|| item_kind.into());
                }
                self.value(format!("{location}: items[{i}]"), item);
            }
            return;
        }

        let object_kind = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => ObjectKind::Service,
            ("discovery.k8s.io/v1", "EndpointSlice") => ObjectKind::EndpointSlice,
            ("v1", "Node") => ObjectKind::Node,
            _ => {
                tracing::debug!(
                    file = %self.path.display(),
                    %location,
                    %api_version,
                    %kind,
                    "ignoring a kind switchyard does not use"
                );
                return;
            }
        };
        if object_kind != ObjectKind::Node {
            default_namespace(&mut value);
        }
        let object_ref = raw_object_ref(object_kind, &value);
        let converted = match object_kind {
            ObjectKind::Service => serde_json::from_value::<core::Service>(value)
                .map_err(|e| e.to_string())
                .and_then(|s| convert::service(&s).map_err(|e| e.to_string()))
                .map(|s| Some(Object::Service(s))),
            ObjectKind::EndpointSlice => serde_json::from_value::<discovery::EndpointSlice>(value)
                .map_err(|e| e.to_string())
                .and_then(|s| convert::endpoint_slice(&s).map_err(|e| e.to_string()))
                .map(|s| s.map(Object::EndpointSlice)),
            ObjectKind::Node => serde_json::from_value::<core::Node>(value)
                .map_err(|e| e.to_string())
                .and_then(|n| convert::node(&n).map_err(|e| e.to_string()))
                .map(|n| Some(Object::Node(n))),
        };
        match converted {
            Ok(Some(object)) => {
                let object_ref = object.object_ref();
                if let Some(first) = self.seen.get(&object_ref) {
                    let message = format!("defined again (first in {first})");
                    self.problem(Some(object_ref), &location, message);
                } else {
                    self.seen.insert(object_ref, location);
                    self.objects.push(object);
                }
            }
            Ok(None) => {
                tracing::debug!(file = %self.path.display(), %location, "ignoring an FQDN EndpointSlice");
            }
            Err(message) => self.problem(object_ref, &location, message),
        }
    }
}

/// Sets `metadata.namespace` to [`DEFAULT_NAMESPACE`] when it is absent or empty.
fn default_namespace(value: &mut Value) {
    let Value::Object(fields) = value else { return };
    let metadata = fields
        .entry("metadata")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(metadata) = metadata {
        let namespace = metadata.entry("namespace").or_insert(Value::Null);
        if namespace.as_str().is_none_or(str::is_empty) {
            *namespace = DEFAULT_NAMESPACE.into();
        }
    }
}

/// The object a raw document describes, for problems found before conversion succeeds.
fn raw_object_ref(kind: ObjectKind, value: &Value) -> Option<ObjectRef> {
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = match kind {
        ObjectKind::Node => "",
        _ => metadata.get("namespace")?.as_str()?,
    };
    Some(ObjectRef {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// What the source knows about one file.
#[derive(Debug)]
struct FileState {
    /// SHA-256 of the bytes last read, to skip events that changed nothing; `None`
    /// when the file could not be read.
    hash: Option<[u8; 32]>,
    /// Whether problems are outstanding for this file in the store.
    has_problems: bool,
}

/// Per-file bookkeeping: turns "this file now reads as X" into store updates. Pure.
#[derive(Debug, Default)]
struct Files {
    known: BTreeMap<PathBuf, FileState>,
}

impl Files {
    /// The updates the store needs after reading `path`: `contents` is `None` when the
    /// file is gone. Empty when nothing changed since the last read.
    fn update(&mut self, path: &Path, contents: Option<&[u8]>, at: SystemTime) -> Vec<StoreUpdate> {
        let origin: Origin = path.display().to_string();
        let Some(contents) = contents else {
            return match self.known.remove(path) {
                Some(_) => {
                    tracing::info!(file = %origin, "manifest removed");
                    vec![
                        StoreUpdate::Replace {
                            origin: origin.clone(),
                            objects: Vec::new(),
                            at,
                        },
                        StoreUpdate::ClearProblem {
                            origin,
                            object: None,
                        },
                    ]
                }
                None => Vec::new(),
            };
        };
        let hash: [u8; 32] = Sha256::digest(contents).into();
        let had_problems = match self.known.get(path) {
            Some(state) if state.hash == Some(hash) => return Vec::new(),
            Some(state) => state.has_problems,
            None => false,
        };
        let parsed = match std::str::from_utf8(contents) {
            Ok(text) => parse_file(path, text),
            Err(e) => Err(vec![FileProblem {
                object: None,
                message: format!("{origin}: not UTF-8 text: {e}"),
            }]),
        };
        let (updates, has_problems) = match parsed {
            Ok(objects) => {
                tracing::info!(file = %origin, objects = objects.len(), "manifest loaded");
                let updates = vec![
                    StoreUpdate::Replace {
                        origin: origin.clone(),
                        objects,
                        at,
                    },
                    StoreUpdate::ClearProblem {
                        origin,
                        object: None,
                    },
                ];
                (updates, false)
            }
            Err(problems) => {
                let mut updates = Vec::with_capacity(problems.len() + 1);
                if had_problems {
                    // The new problems replace the old ones, which may be fixed by now.
                    updates.push(StoreUpdate::ClearProblem {
                        origin: origin.clone(),
                        object: None,
                    });
                }
                for problem in problems {
                    tracing::warn!(file = %origin, "{}", problem.message);
                    updates.push(StoreUpdate::Problem {
                        origin: origin.clone(),
                        object: problem.object,
                        message: problem.message,
                    });
                }
                (updates, true)
            }
        };
        self.known.insert(
            path.to_owned(),
            FileState {
                hash: Some(hash),
                has_problems,
            },
        );
        updates
    }

    /// The updates the store needs when `path` exists but cannot be read: a problem;
    /// the file's last good objects stay, and it is read again on its next event.
    fn unreadable(&mut self, path: &Path, error: &io::Error) -> Vec<StoreUpdate> {
        let origin: Origin = path.display().to_string();
        let message = format!("{origin}: cannot read: {error}");
        tracing::warn!(file = %origin, "{message}");
        let state = self.known.entry(path.to_owned()).or_insert(FileState {
            hash: None,
            has_problems: false,
        });
        let mut updates = Vec::with_capacity(2);
        if state.has_problems {
            updates.push(StoreUpdate::ClearProblem {
                origin: origin.clone(),
                object: None,
            });
        }
        updates.push(StoreUpdate::Problem {
            origin,
            object: None,
            message,
        });
        *state = FileState {
            hash: None,
            has_problems: true,
        };
        updates
    }

    /// Known files under `root` (or `root` itself).
    fn under(&self, root: &Path) -> Vec<PathBuf> {
        self.known
            .keys()
            .filter(|p| p.starts_with(root))
            .cloned()
            .collect()
    }
}

/// Every manifest file under `root`, sorted; hidden folders (`.git`) are skipped.
/// A missing `root` holds no files.
fn scan(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut folders = vec![root.to_owned()];
    while let Some(folder) = folders.pop() {
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound && folder != root => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            // Follows symlinks, as a ConfigMap mounted into a pod is made of them.
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if metadata.is_dir() && !hidden {
                folders.push(path);
            } else if metadata.is_file() && is_manifest(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// What one debounced burst of file-system events touched.
#[derive(Debug, Default)]
struct Batch {
    paths: BTreeSet<PathBuf>,
    rescan: bool,
}

impl Batch {
    fn add(&mut self, event: notify::Result<notify::Event>) {
        match event {
            Ok(event) => {
                if event.need_rescan() {
                    self.rescan = true;
                }
                let relevant = match event.kind {
                    // Opening and reading (ours included) changes nothing.
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                    EventKind::Access(_) => false,
                    _ => true,
                };
                if relevant {
                    self.paths.extend(event.paths);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "manifest watch error; reading the whole folder again");
                self.rescan = true;
            }
        }
    }
}

/// The manifests-folder source. See the module documentation.
#[derive(Clone, Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    debounce: Duration,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            debounce: DEFAULT_DEBOUNCE,
        }
    }

    /// Sets how long the folder must stay quiet before changes are read
    /// (default [`DEFAULT_DEBOUNCE`]).
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// The folder this source reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every manifest under the folder (and its subfolders), reports each file to
    /// the store, then watches the folder and reports each change, until every receiver
    /// of `tx` is gone (then returns `Ok`).
    ///
    /// Origins are the files' paths under the folder as given, made absolute.
    ///
    /// # Errors
    /// Fails at start when the folder is missing, not a folder or unreadable, or cannot
    /// be watched. Problems in files are reported to the store, never returned. If the
    /// folder itself is removed later, its files are reported removed and the source
    /// keeps running without seeing anything new until restarted.
    pub async fn run(self, tx: StoreSender) -> Result<(), ManifestError> {
        let dir = self.checked_dir().await?;

        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            // Fails only once `run` has returned.
            let _ = events_tx.send(event);
        })
        .map_err(|source| ManifestError::Watch {
            dir: dir.clone(),
            source,
        })?;
        // Watch before the first read so no change between the two is lost.
        watcher
            .watch(&dir, RecursiveMode::Recursive)
            .map_err(|source| ManifestError::Watch {
                dir: dir.clone(),
                source,
            })?;
        tracing::info!(dir = %dir.display(), "watching manifests folder");

        let mut files = Files::default();
        let first = scan_blocking(dir.clone())
            .await
            .map_err(|source| ManifestError::Read {
                dir: dir.clone(),
                source,
            })?;
        for path in first {
            if !refresh(&mut files, &path, &tx).await {
                return Ok(());
            }
        }

        loop {
            let event = tokio::select! {
                _ = tx.closed() => return Ok(()),
                event = events.recv() => event,
            };
            // The sender lives in `watcher`, which lives as long as this loop.
            let Some(event) = event else { return Ok(()) };
            let mut batch = Batch::default();
            batch.add(event);
            let deadline = Instant::now() + MAX_DEBOUNCE_DELAY;
            while let Ok(Some(event)) = tokio::time::timeout(self.debounce, events.recv()).await {
                batch.add(event);
                if Instant::now() >= deadline {
                    break;
                }
            }
            if !apply(&mut files, &dir, batch, &tx).await {
                return Ok(());
            }
        }
    }

    /// The folder, absolute, after checking it is one.
    async fn checked_dir(&self) -> Result<PathBuf, ManifestError> {
        let dir = std::path::absolute(&self.dir).map_err(|source| ManifestError::Read {
            dir: self.dir.clone(),
            source,
        })?;
        match tokio::fs::metadata(&dir).await {
            Ok(metadata) if metadata.is_dir() => Ok(dir),
            Ok(_) => Err(ManifestError::NotADirectory { dir }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ManifestError::Missing { dir }),
            Err(source) => Err(ManifestError::Read { dir, source }),
        }
    }
}

async fn scan_blocking(root: PathBuf) -> io::Result<Vec<PathBuf>> {
    tokio::task::spawn_blocking(move || scan(&root))
        .await
        .map_err(io::Error::other)?
}

/// Re-reads what a batch of events touched. `false` once the store is gone.
///
/// A change inside a hidden folder rescans everything, because visible files may be
/// symlinks into it: a ConfigMap volume updates by swapping its `..data` symlink.
/// Hidden files (editor swap files) are ignored.
async fn apply(files: &mut Files, dir: &Path, batch: Batch, tx: &StoreSender) -> bool {
    let mut rescan = batch.rescan;
    let mut manifests = Vec::new();
    let mut roots = Vec::new();
    for path in batch.paths {
        let is_dir = tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir());
        let relative = path.strip_prefix(dir).unwrap_or(&path);
        let hidden: Vec<bool> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().starts_with('.'))
            .collect();
        if let Some((last, parents)) = hidden.split_last()
            && (parents.iter().any(|h| *h) || *last)
        {
            rescan |= is_dir || parents.iter().any(|h| *h);
        } else if is_dir || files.under(&path).iter().any(|known| known != &path) {
            // A folder appeared, vanished or moved: look at everything under it.
            roots.push(path);
        } else if is_manifest(&path) {
            manifests.push(path);
        }
    }
    if rescan {
        manifests.clear();
        roots = vec![dir.to_owned()];
    }
    for path in manifests {
        if !refresh(files, &path, tx).await {
            return false;
        }
    }
    for root in roots {
        let found = match scan_blocking(root.clone()).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(dir = %root.display(), error = %e, "cannot read manifests folder");
                continue;
            }
        };
        let gone = files
            .under(&root)
            .into_iter()
            .filter(|p| !found.contains(p));
        for path in gone.chain(found.iter().cloned()).collect::<Vec<_>>() {
            if !refresh(files, &path, tx).await {
                return false;
            }
        }
    }
    true
}

/// Reads one file (gone counts as removed) and sends what changed. `false` once the
/// store is gone.
async fn refresh(files: &mut Files, path: &Path, tx: &StoreSender) -> bool {
    let updates = match tokio::fs::read(path).await {
        Ok(contents) => files.update(path, Some(&contents), SystemTime::now()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            files.update(path, None, SystemTime::now())
        }
        Err(e) => files.unreadable(path, &e),
    };
    for update in updates {
        if tx.send(update).await.is_err() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::{ServiceKey, ServiceType};

    fn parse(name: &str, contents: &str) -> Result<Vec<Object>, Vec<FileProblem>> {
        parse_file(Path::new(name), contents)
    }

    fn refs(objects: &[Object]) -> Vec<String> {
        objects.iter().map(|o| o.object_ref().to_string()).collect()
    }

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
";

    const SLICE: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.244.0.5]}]
ports: [{port: 8080}]
";

    const NODE: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
";

    #[test]
    fn a_multi_document_file_yields_every_object_in_order() {
        let text = format!("{SERVICE}---{SLICE}---\n{NODE}---\n");
        let objects = parse("m.yaml", &text).unwrap();
        assert_eq!(
            refs(&objects),
            [
                "Service shop/web",
                "EndpointSlice default/web-1",
                "Node node-a"
            ]
        );
    }

    #[test]
    fn services_and_slices_without_namespace_get_default_but_nodes_do_not() {
        let text = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-a, namespace: ignored}
";
        let objects = parse("m.yaml", text).unwrap();
        assert_eq!(refs(&objects), ["Service default/web", "Node node-a"]);
        let slices = parse("m.yaml", SLICE).unwrap();
        let Object::EndpointSlice(slice) = &slices[0] else {
            panic!("not a slice")
        };
        assert_eq!(slice.service, ServiceKey::new("default", "web"));
    }

    #[test]
    fn a_list_and_a_typed_list_are_expanded() {
        let text = "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: node-a}}
- apiVersion: v1
  kind: List
  items:
  - {apiVersion: v1, kind: Node, metadata: {name: node-b}}
---
apiVersion: v1
kind: ServiceList
items:
- metadata: {name: web}
  spec: {ports: [{port: 80}]}
";
        let objects = parse("m.yaml", text).unwrap();
        assert_eq!(
            refs(&objects),
            ["Node node-a", "Node node-b", "Service default/web"]
        );
    }

    #[test]
    fn a_json_file_is_read_as_json() {
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "api", "namespace": "shop"},
             "spec": {"type": "NodePort", "clusterIP": "10.96.0.30",
                      "ports": [{"port": 443, "nodePort": 30443}]}}]}"#;
        let objects = parse("m.json", text).unwrap();
        let [Object::Service(s)] = &objects[..] else {
            panic!("{objects:?}")
        };
        assert_eq!(s.service_type, ServiceType::NodePort);
        assert_eq!(s.cluster_ips, ["10.96.0.30".parse::<IpAddr>().unwrap()]);
        assert_eq!(s.ports[0].node_port, Some(30443));
    }

    #[test]
    fn unknown_kinds_and_versions_are_ignored() {
        let text = format!(
            "
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
---
apiVersion: v1
kind: Endpoints
metadata: {{name: web}}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata: {{name: old}}
---{NODE}"
        );
        assert_eq!(refs(&parse("m.yaml", &text).unwrap()), ["Node node-a"]);
    }

    #[test]
    fn empty_files_and_comment_only_documents_hold_nothing() {
        assert_eq!(parse("m.yaml", ""), Ok(vec![]));
        assert_eq!(parse("m.yaml", "# nothing yet\n---\n---\n"), Ok(vec![]));
        assert_eq!(parse("m.json", ""), Ok(vec![]));
    }

    #[test]
    fn an_fqdn_slice_is_skipped_without_a_problem() {
        let text = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext, labels: {kubernetes.io/service-name: ext}}
addressType: FQDN
endpoints: [{addresses: [db.example.com]}]
";
        assert_eq!(parse("m.yaml", text), Ok(vec![]));
    }

    #[test]
    fn a_yaml_syntax_error_is_a_problem_of_the_whole_file() {
        let text = format!("{NODE}---\napiVersion: v1\nkind: [Service\n");
        let problems = parse("dir/bad.yaml", &text).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object, None);
        assert!(
            problems[0]
                .message
                .starts_with("dir/bad.yaml: document 2: not valid YAML: "),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn a_json_syntax_error_is_a_problem_of_the_whole_file() {
        let problems = parse("bad.json", r#"{"apiVersion": "v1", "#).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].object, None);
        assert!(
            problems[0]
                .message
                .starts_with("bad.json: document 1: not valid JSON: "),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn an_invalid_object_is_named_with_its_document_and_field() {
        let text = format!(
            "{NODE}---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  ports: [{{name: a, port: 80}}, {{port: 0, name: b}}]
"
        );
        let problems = parse("web.yaml", &text).unwrap_err();
        assert_eq!(
            problems,
            [FileProblem {
                object: Some(ObjectRef {
                    kind: ObjectKind::Service,
                    namespace: "default".into(),
                    name: "web".into(),
                }),
                message: "web.yaml: document 2: Service default/web: spec.ports[1].port: 0 is not a port in 1..=65535".into(),
            }]
        );
    }

    #[test]
    fn every_invalid_object_of_a_file_is_reported() {
        let text = "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {type: Odd}}
- {apiVersion: v1, kind: Node, metadata: {name: n}}
- {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: s}, addressType: IPv4, endpoints: []}
";
        let problems = parse("l.yaml", text).unwrap_err();
        let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                r#"l.yaml: document 1: items[0]: Service default/a: spec.type: "Odd" is not one of "ClusterIP", "NodePort", "LoadBalancer", "ExternalName""#,
                r#"l.yaml: document 1: items[2]: EndpointSlice default/s: metadata.labels["kubernetes.io/service-name"]: must name the slice's Service"#,
            ]
        );
    }

    #[test]
    fn a_badly_typed_field_is_a_problem_of_its_object() {
        let text = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: eighty}]}
";
        let problems = parse("web.yaml", text).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0]
                .object
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("Service shop/web")
        );
        assert!(
            problems[0]
                .message
                .starts_with("web.yaml: document 1: Service shop/web: "),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn documents_without_kind_or_not_objects_are_problems() {
        let problems = parse(
            "x.yaml",
            "apiVersion: v1\nmetadata: {name: a}\n---\n- 1\n- 2\n",
        )
        .unwrap_err();
        let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "x.yaml: document 1: apiVersion and kind must be set",
                "x.yaml: document 2: not an object with apiVersion and kind",
            ]
        );
    }

    #[test]
    fn an_object_defined_twice_in_one_file_is_a_problem() {
        let text = format!("{NODE}---{NODE}");
        let problems = parse("n.yaml", &text).unwrap_err();
        assert_eq!(
            problems[0].message,
            "n.yaml: document 2: Node node-a: defined again (first in document 1)"
        );
    }

    #[test]
    fn manifest_names_are_yaml_yml_or_json_and_not_hidden() {
        for (name, expected) in [
            ("a.yaml", true),
            ("dir/a.yml", true),
            ("a.json", true),
            (".a.yaml", false),
            (".a.yaml.swp", false),
            ("a.yaml~", false),
            ("a.yaml.tmp", false),
            ("4913", false),
            (".yaml", false),
            ("README.md", false),
        ] {
            assert_eq!(is_manifest(Path::new(name)), expected, "{name}");
        }
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH
    }

    #[test]
    fn tracking_a_file_sends_replace_then_skips_unchanged_content() {
        let mut files = Files::default();
        let path = Path::new("/m/n.yaml");
        let updates = files.update(path, Some(NODE.as_bytes()), at());
        assert!(matches!(
            &updates[..],
            [StoreUpdate::Replace { origin, objects, .. }, StoreUpdate::ClearProblem { object: None, .. }]
                if origin == "/m/n.yaml" && objects.len() == 1
        ));
        assert_eq!(files.update(path, Some(NODE.as_bytes()), at()), vec![]);
    }

    #[test]
    fn tracking_a_broken_file_sends_problems_and_clears_old_ones_when_broken_again() {
        let mut files = Files::default();
        let path = Path::new("/m/n.yaml");
        let first = files.update(path, Some(b"kind: [\n"), at());
        assert!(matches!(
            &first[..],
            [StoreUpdate::Problem { object: None, .. }]
        ));
        let second = files.update(path, Some(b"kind: {\n"), at());
        assert!(matches!(
            &second[..],
            [
                StoreUpdate::ClearProblem { object: None, .. },
                StoreUpdate::Problem { .. }
            ]
        ));
        let fixed = files.update(path, Some(NODE.as_bytes()), at());
        assert!(matches!(
            &fixed[..],
            [
                StoreUpdate::Replace { .. },
                StoreUpdate::ClearProblem { object: None, .. }
            ]
        ));
    }

    #[test]
    fn tracking_a_removed_file_sends_an_empty_replace_once() {
        let mut files = Files::default();
        let path = Path::new("/m/n.yaml");
        files.update(path, Some(NODE.as_bytes()), at());
        assert_eq!(
            files.update(path, None, at()),
            vec![
                StoreUpdate::Replace {
                    origin: "/m/n.yaml".into(),
                    objects: vec![],
                    at: at()
                },
                StoreUpdate::ClearProblem {
                    origin: "/m/n.yaml".into(),
                    object: None
                },
            ]
        );
        assert_eq!(files.update(path, None, at()), vec![]);
    }

    #[test]
    fn an_unreadable_file_is_a_problem_and_is_still_emptied_when_removed() {
        let mut files = Files::default();
        let path = Path::new("/m/n.yaml");
        files.update(path, Some(NODE.as_bytes()), at());
        let error = io::Error::from(io::ErrorKind::PermissionDenied);
        let updates = files.unreadable(path, &error);
        assert!(matches!(
            &updates[..],
            [StoreUpdate::Problem { object: None, message, .. }]
                if message.starts_with("/m/n.yaml: cannot read: ")
        ));
        // Readable again with the same content: it must be sent again.
        assert!(matches!(
            &files.update(path, Some(NODE.as_bytes()), at())[..],
            [
                StoreUpdate::Replace { .. },
                StoreUpdate::ClearProblem { .. }
            ]
        ));
        files.unreadable(path, &error);
        assert!(matches!(
            &files.update(path, None, at())[..],
            [StoreUpdate::Replace { objects, .. }, StoreUpdate::ClearProblem { object: None, .. }]
                if objects.is_empty()
        ));
    }

    #[test]
    fn non_utf8_content_is_a_problem() {
        let mut files = Files::default();
        let updates = files.update(Path::new("/m/b.yaml"), Some(&[0xff, 0xfe]), at());
        assert!(matches!(
            &updates[..],
            [StoreUpdate::Problem { object: None, message, .. }] if message.contains("not UTF-8")
        ));
    }
}
