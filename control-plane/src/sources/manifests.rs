//! Reads a folder of YAML/JSON manifests and watches it for changes: the embedded
//! default when no cluster is configured.
//!
//! Entry points: [`ManifestSource::run`] (initial read, then watch until the store goes
//! away) and [`parse_file`] (pure: one file's bytes → objects and problems).
//!
//! Every file is one [`Origin`]. A careless edit must never take Services down, so:
//! - a file's problems are reported one by one, and an object that has a problem (or
//!   that a broken part of the file may hide) keeps its last good version in force,
//!   while the file's good objects are used;
//! - a change that would remove objects (a file truncated and then written, a file
//!   deleted) waits until the file has read the same for a settle period
//!   ([`DEFAULT_SETTLE`]), so a writer caught halfway withdraws nothing;
//! - only regular files are read, at most [`MAX_FILE_BYTES`] each, and parsing, which
//!   is bounded ([`parse`]), runs off the async executor;
//! - the folder itself may be deleted, recreated or swapped by a rename: while it is gone
//!   the last state stays in force and a problem says so; when it is back (or another
//!   folder took its name) it is watched and read again. Unreadable subfolders and
//!   symlink loops are reported and do not stop the rest.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, CreateKind, ModifyKind},
};
use sha2::{Digest, Sha256};
use tokio::{sync::mpsc, time::Instant};

use super::{Origin, StoreSender, StoreUpdate};
use crate::{
    files::{self, ReadError},
    model::{Object, ObjectRef},
};

pub mod parse;
pub mod scan;

pub use parse::{DEFAULT_NAMESPACE, FileProblem, MAX_FILE_BYTES, Parsed, is_manifest, parse_file};

/// How long the folder must stay quiet before changed files are read while a file may
/// still be being written (modified, not yet closed by its writer): long enough for a
/// writer that pauses between writes, short enough to feel instant.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(50);

/// How long the folder must stay quiet once every file a burst touched is complete
/// (closed by its writer, or renamed into place): only long enough to gather the rest
/// of the burst, so a finished edit is read within milliseconds of its last event.
const COMPLETE_QUIET: Duration = Duration::from_millis(1);

/// A file's modification time is the change's trigger time (what network programming
/// latency is measured from) when it is at most this much older than the first event
/// of the burst; older (a file moved in, keeping its time), the event's time is used.
const MTIME_TRUST: Duration = Duration::from_secs(1);

/// How long a file must read the same before a change that removes objects is acted on.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(1);

/// Longest a steady stream of events can postpone reading, so a busy writer cannot
/// starve the store.
const MAX_DEBOUNCE_DELAY: Duration = Duration::from_millis(500);

/// How often the folder's own identity is checked (deleted, recreated, swapped).
const FOLDER_CHECK: Duration = Duration::from_secs(1);

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

/// What reading one file gave.
#[derive(Debug)]
enum Read {
    /// The path holds nothing (deleted, or a symlink to nothing).
    Gone,
    /// The same bytes as last read.
    Unchanged,
    /// The path holds something that cannot be read (permissions, not a regular file,
    /// too large, a symlink loop): its message.
    Unreadable(String),
    /// What the bytes hold, and when the file was last modified.
    Parsed {
        hash: [u8; 32],
        parsed: Parsed,
        modified: Option<SystemTime>,
    },
}

/// Reads and parses `path` unless its bytes hash to `known`. Blocking.
fn read_file(path: &Path, known: Option<[u8; 32]>) -> Read {
    match files::read_regular_dated(path, MAX_FILE_BYTES) {
        Ok((contents, modified)) => {
            let hash: [u8; 32] = Sha256::digest(&contents).into();
            if known == Some(hash) {
                return Read::Unchanged;
            }
            Read::Parsed {
                hash,
                parsed: parse_file(path, &contents),
                modified,
            }
        }
        Err(e) if e.is_not_found() => Read::Gone,
        Err(e @ ReadError::NotRegular(_)) => {
            Read::Unreadable(format!("{}: {e}; skipped", path.display()))
        }
        Err(e) => Read::Unreadable(format!("{}: cannot read: {e}", path.display())),
    }
}

type Problems = Vec<(Option<ObjectRef>, String)>;

/// What the store holds for one file, and a change waiting to settle.
#[derive(Debug, Default)]
struct FileState {
    /// SHA-256 of the bytes last read; `None` when the file could not be read.
    hash: Option<[u8; 32]>,
    /// The objects the store holds for this file, in the order last sent.
    held: Vec<Object>,
    /// The problems the store holds for this file.
    problems: Problems,
    /// A change that removes objects, waiting for the file to stay as it is.
    shrink: Option<Shrink>,
}

/// A pending change that removes objects.
#[derive(Debug)]
struct Shrink {
    /// The bytes it comes from; `None`: the file is gone.
    hash: Option<[u8; 32]>,
    objects: Vec<Object>,
    problems: Problems,
    /// When it may be applied if the file still reads the same.
    due: Instant,
}

/// Per-file bookkeeping: turns "this file now reads as X" into store updates. Pure.
#[derive(Debug)]
struct Files {
    known: BTreeMap<PathBuf, FileState>,
    settle: Duration,
}

impl Files {
    fn new(settle: Duration) -> Self {
        Self {
            known: BTreeMap::new(),
            settle,
        }
    }

    fn known_hash(&self, path: &Path) -> Option<[u8; 32]> {
        self.known.get(path).and_then(|s| s.hash)
    }

    /// Known files under `root` (or `root` itself). Paths order by component, so they
    /// are one range starting at `root`: O(log files + found), not a walk of every file.
    fn under(&self, root: &Path) -> Vec<PathBuf> {
        self.known
            .range::<Path, _>((std::ops::Bound::Included(root), std::ops::Bound::Unbounded))
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(root))
            .cloned()
            .collect()
    }

    /// When the next pending change may be applied.
    fn next_due(&self) -> Option<Instant> {
        self.known
            .values()
            .filter_map(|s| s.shrink.as_ref().map(|s| s.due))
            .min()
    }

    /// Files whose pending change is due at `now`.
    fn due(&self, now: Instant) -> Vec<PathBuf> {
        self.known
            .iter()
            .filter(|(_, s)| s.shrink.as_ref().is_some_and(|s| s.due <= now))
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Drops every pending change (the folder is gone: what it seemed to say is not
    /// to be acted on).
    fn cancel_pending(&mut self) {
        for state in self.known.values_mut() {
            state.shrink = None;
        }
    }

    /// The updates the store needs after reading `path`. Empty when nothing changes (or
    /// when a removal waits to settle: [`Files::next_due`] says until when).
    fn update(
        &mut self,
        path: &Path,
        read: Read,
        now: Instant,
        at: SystemTime,
    ) -> Vec<StoreUpdate> {
        let gone = matches!(read, Read::Gone);
        let updates = self.update_known(path, read, now, at);
        if gone
            && self
                .known
                .get(path)
                .is_some_and(|s| s.held.is_empty() && s.problems.is_empty() && s.shrink.is_none())
        {
            self.known.remove(path);
        }
        updates
    }

    fn update_known(
        &mut self,
        path: &Path,
        read: Read,
        now: Instant,
        at: SystemTime,
    ) -> Vec<StoreUpdate> {
        let origin: Origin = path.display().to_string();
        let settle = self.settle;
        let state = self.known.entry(path.to_owned()).or_default();
        let (hash, objects, problems) = match read {
            Read::Unchanged => {
                let hash = state.hash;
                return match state.shrink.take_if(|s| s.hash == hash && s.due <= now) {
                    Some(shrink) => apply(state, &origin, shrink.objects, shrink.problems, at),
                    None => Vec::new(),
                };
            }
            Read::Gone => (None, Vec::new(), Vec::new()),
            Read::Unreadable(message) => {
                tracing::warn!(file = %origin, "{message}");
                // Nothing known about the content: everything stays, nothing waits.
                state.hash = None;
                state.shrink = None;
                let objects = state.held.clone();
                return apply(state, &origin, objects, vec![(None, message)], at);
            }
            Read::Parsed { hash, parsed, .. } => {
                let keep_missing = parsed.has_file_problem();
                let named: BTreeSet<&ObjectRef> = parsed
                    .problems
                    .iter()
                    .filter_map(|p| p.object.as_ref())
                    .collect();
                let fresh: BTreeSet<ObjectRef> =
                    parsed.objects.iter().map(Object::object_ref).collect();
                let mut objects = parsed.objects.clone();
                for old in &state.held {
                    let r = old.object_ref();
                    if !fresh.contains(&r) && (keep_missing || named.contains(&r)) {
                        objects.push(old.clone());
                    }
                }
                for problem in &parsed.problems {
                    tracing::warn!(file = %origin, "{}", problem.message);
                }
                let problems = parsed
                    .problems
                    .into_iter()
                    .map(|p| (p.object, p.message))
                    .collect();
                (Some(hash), objects, problems)
            }
        };
        state.hash = hash;
        let kept: BTreeSet<ObjectRef> = objects.iter().map(Object::object_ref).collect();
        let removes = state.held.iter().any(|o| !kept.contains(&o.object_ref()));
        if !removes {
            state.shrink = None;
            return apply(state, &origin, objects, problems, at);
        }
        match state.shrink.take_if(|s| s.hash == hash) {
            Some(shrink) if shrink.due <= now => apply(state, &origin, objects, problems, at),
            Some(shrink) => {
                state.shrink = Some(shrink);
                Vec::new()
            }
            None => {
                tracing::info!(
                    file = %origin,
                    ?settle,
                    "a change removes objects; acting on it once the file stays as it is"
                );
                state.shrink = Some(Shrink {
                    hash,
                    objects,
                    problems,
                    due: now + settle,
                });
                Vec::new()
            }
        }
    }
}

/// Puts `objects` and `problems` in force for the file, sending only what changed.
fn apply(
    state: &mut FileState,
    origin: &Origin,
    objects: Vec<Object>,
    problems: Problems,
    at: SystemTime,
) -> Vec<StoreUpdate> {
    let mut updates = Vec::with_capacity(2);
    if objects != state.held {
        tracing::info!(file = %origin, objects = objects.len(), "manifest loaded");
        updates.push(StoreUpdate::Replace {
            origin: origin.clone(),
            objects: objects.clone(),
            at,
        });
        state.held = objects;
    }
    if problems != state.problems {
        updates.push(StoreUpdate::ReplaceProblems {
            origin: origin.clone(),
            problems: problems.clone(),
        });
        state.problems = problems;
    }
    updates
}

/// What one debounced burst of file-system events touched.
#[derive(Debug, Default)]
struct Batch {
    paths: BTreeSet<PathBuf>,
    rescan: bool,
    /// Files created or modified and not yet closed by their writer: the burst is read
    /// once they are closed, or once the folder stays quiet for the debounce.
    writing: BTreeSet<PathBuf>,
    /// When the burst's first event arrived.
    first_event_at: Option<SystemTime>,
}

impl Batch {
    /// Whether every file the burst touched is complete: none is still open for writing.
    fn complete(&self) -> bool {
        self.writing.is_empty()
    }

    fn add(&mut self, event: notify::Result<notify::Event>) {
        self.first_event_at.get_or_insert_with(SystemTime::now);
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
                match event.kind {
                    EventKind::Create(CreateKind::File | CreateKind::Any)
                    | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                        self.writing.extend(event.paths.iter().cloned());
                    }
                    // Closed by its writer, renamed into place (write-then-rename) or
                    // gone: nothing more will be written to these paths.
                    EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Modify(ModifyKind::Name(_))
                    | EventKind::Remove(_) => {
                        for path in &event.paths {
                            self.writing.remove(path);
                        }
                    }
                    _ => {}
                }
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
    settle: Duration,
}

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            debounce: DEFAULT_DEBOUNCE,
            settle: DEFAULT_SETTLE,
        }
    }

    /// Sets how long the folder must stay quiet before changes are read
    /// (default [`DEFAULT_DEBOUNCE`]).
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Sets how long a file must read the same before a change that removes objects is
    /// acted on (default [`DEFAULT_SETTLE`]).
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The folder this source reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every manifest under the folder (and its subfolders), reports each file to
    /// the store, says [`StoreUpdate::Synced`], then watches the folder and reports each
    /// change, until every receiver of `tx` is gone (then returns `Ok`).
    ///
    /// Origins are the files' paths under the folder as given, made absolute; problems
    /// of the folder itself or of a subfolder have the folder's path as origin.
    ///
    /// # Errors
    /// Fails at start when the folder is missing, not a folder or unreadable, or cannot
    /// be watched. Later, nothing is fatal: problems are reported to the store.
    pub async fn run(self, tx: StoreSender) -> Result<(), ManifestError> {
        let dir = self.checked_dir().await?;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        // Watch before the first read so no change between the two is lost.
        let watcher = watch(&dir, events_tx.clone()).map_err(|source| ManifestError::Watch {
            dir: dir.clone(),
            source,
        })?;
        tracing::info!(dir = %dir.display(), "watching manifests folder");
        let identity = scan::identity(&dir).map_err(|source| ManifestError::Read {
            dir: dir.clone(),
            source,
        })?;
        let mut source = Folder {
            files: Files::new(self.settle),
            folder_problems: BTreeMap::new(),
            dir: dir.clone(),
            tx,
            watcher: Some(watcher),
            identity: Some(identity),
            events_tx,
        };
        let first = scan_blocking(dir.clone())
            .await
            .map_err(|source| ManifestError::Read {
                dir: dir.clone(),
                source,
            })?;
        if !source.apply_scan(&dir, first).await || !source.send(StoreUpdate::Synced).await {
            return Ok(());
        }

        let mut folder_check = tokio::time::interval(FOLDER_CHECK);
        folder_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = source.files.next_due();
            let event = tokio::select! {
                _ = source.tx.closed() => return Ok(()),
                event = events.recv() => event,
                _ = sleep_until(due) => {
                    // A folder that vanished says nothing about its files.
                    if tokio::fs::metadata(&source.dir).await.is_err() {
                        if !source.check_folder().await {
                            return Ok(());
                        }
                        continue;
                    }
                    for path in source.files.due(Instant::now()) {
                        if !source.refresh(&path, None).await {
                            return Ok(());
                        }
                    }
                    continue;
                }
                _ = folder_check.tick() => {
                    if !source.check_folder().await {
                        return Ok(());
                    }
                    continue;
                }
            };
            // `events_tx` lives in `source`, so the channel never closes.
            let Some(event) = event else { return Ok(()) };
            let mut batch = Batch::default();
            batch.add(event);
            let deadline = Instant::now() + MAX_DEBOUNCE_DELAY;
            loop {
                // A burst whose files are all complete is read at once; one with a file
                // still being written waits for the writer to close it or pause.
                let quiet = if batch.complete() {
                    COMPLETE_QUIET.min(self.debounce)
                } else {
                    self.debounce
                };
                let Ok(Some(event)) = tokio::time::timeout(quiet, events.recv()).await else {
                    break;
                };
                batch.add(event);
                if Instant::now() >= deadline {
                    break;
                }
            }
            if !source.apply_batch(batch).await {
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

/// When a change read from a file happened: its modification time, unless that is in
/// the future or much older than the event that announced it.
fn trigger_time(modified: Option<SystemTime>, event_at: SystemTime, now: SystemTime) -> SystemTime {
    match modified {
        Some(m)
            if m <= now
                && event_at
                    .duration_since(m)
                    .map_or(true, |age| age <= MTIME_TRUST) =>
        {
            m
        }
        _ => event_at,
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

fn watch(
    dir: &Path,
    events: mpsc::UnboundedSender<notify::Result<notify::Event>>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event| {
        // Fails only once the source has returned.
        let _ = events.send(event);
    })?;
    watcher.watch(dir, RecursiveMode::Recursive)?;
    Ok(watcher)
}

async fn scan_blocking(root: PathBuf) -> io::Result<scan::Scan> {
    tokio::task::spawn_blocking(move || scan::scan(&root))
        .await
        .map_err(io::Error::other)?
}

/// The watch loop's state.
struct Folder {
    files: Files,
    /// Problems of folders (the root, unreadable subfolders, loops) in the store.
    folder_problems: BTreeMap<PathBuf, String>,
    dir: PathBuf,
    tx: StoreSender,
    /// `None` while the folder is gone.
    watcher: Option<notify::RecommendedWatcher>,
    /// The folder's device and inode when last watched; `None` while it is gone.
    identity: Option<(u64, u64)>,
    events_tx: mpsc::UnboundedSender<notify::Result<notify::Event>>,
}

impl Folder {
    /// Sends one update; `false` once the store is gone.
    async fn send(&self, update: StoreUpdate) -> bool {
        self.tx.send(update).await.is_ok()
    }

    /// Reads one file (off the executor) and sends what changed. `event_at`: when the
    /// file-system event that asked for the read arrived (`None` for a scan or a timer),
    /// which with the file's modification time dates the change.
    async fn refresh(&mut self, path: &Path, event_at: Option<SystemTime>) -> bool {
        let known = self.files.known_hash(path);
        let owned = path.to_owned();
        let read = tokio::task::spawn_blocking(move || read_file(&owned, known))
            .await
            .unwrap_or_else(|e| {
                Read::Unreadable(format!("{}: reading failed: {e}", path.display()))
            });
        let now = SystemTime::now();
        let at = match (&read, event_at) {
            (Read::Parsed { modified, .. }, Some(event_at)) => {
                trigger_time(*modified, event_at, now)
            }
            _ => now,
        };
        let updates = self.files.update(path, read, Instant::now(), at);
        for update in updates {
            if !self.send(update).await {
                return false;
            }
        }
        true
    }

    /// Sets (or clears, with `None`) the problem of a folder.
    async fn folder_problem(&mut self, folder: &Path, message: Option<String>) -> bool {
        if self.folder_problems.get(folder) == message.as_ref() {
            return true;
        }
        let problems = match &message {
            Some(message) => {
                tracing::warn!(folder = %folder.display(), "{message}");
                self.folder_problems
                    .insert(folder.to_owned(), message.clone());
                vec![(None, message.clone())]
            }
            None => {
                self.folder_problems.remove(folder);
                Vec::new()
            }
        };
        self.send(StoreUpdate::ReplaceProblems {
            origin: folder.display().to_string(),
            problems,
        })
        .await
    }

    /// Applies what a walk of `root` found: known files that are gone, every file found,
    /// and the problems of folders under `root`.
    async fn apply_scan(&mut self, root: &Path, found: scan::Scan) -> bool {
        let listed: BTreeSet<&PathBuf> = found.files.iter().collect();
        let gone: Vec<PathBuf> = self
            .files
            .under(root)
            .into_iter()
            .filter(|p| !listed.contains(p) && !found.hides(p))
            .collect();
        for path in gone.iter().chain(&found.files) {
            if !self.refresh(path, None).await {
                return false;
            }
        }
        let stale: Vec<PathBuf> = self
            .folder_problems
            .keys()
            .filter(|f| {
                f.starts_with(root) && *f != &self.dir && !found.folder_problems.contains_key(*f)
            })
            .cloned()
            .collect();
        for folder in stale {
            if !self.folder_problem(&folder, None).await {
                return false;
            }
        }
        for (folder, message) in found.folder_problems {
            if !self.folder_problem(&folder, Some(message)).await {
                return false;
            }
        }
        true
    }

    /// Re-reads what a batch of events touched.
    ///
    /// A folder appearing or vanishing, or a change inside a hidden folder, rescans
    /// everything: visible files may be symlinks into a hidden folder (a ConfigMap volume
    /// updates by swapping its `..data` symlink), and a new folder may be a second way
    /// into one already read. Hidden files (editor swap files) are ignored.
    async fn apply_batch(&mut self, batch: Batch) -> bool {
        if self.identity.is_none() {
            // The folder is gone; its return is noticed by `check_folder`.
            return true;
        }
        let dir = self.dir.clone();
        let batch_at = batch.first_event_at.unwrap_or_else(SystemTime::now);
        let mut rescan = batch.rescan;
        let mut manifests = Vec::new();
        for path in batch.paths {
            if path == dir {
                rescan = true;
                continue;
            }
            let is_dir = tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir());
            let relative = path.strip_prefix(&dir).unwrap_or(&path);
            let hidden: Vec<bool> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().starts_with('.'))
                .collect();
            if let Some((last, parents)) = hidden.split_last()
                && (parents.iter().any(|h| *h) || *last)
            {
                rescan |= is_dir || parents.iter().any(|h| *h);
            } else if is_dir || self.files.under(&path).iter().any(|known| known != &path) {
                // A folder appeared, vanished or moved: walk everything again, so that a
                // symlink into a folder already read is seen for what it is.
                rescan = true;
            } else if is_manifest(&path) {
                manifests.push(path);
            }
        }
        if rescan {
            return match scan_blocking(dir.clone()).await {
                Ok(found) => self.apply_scan(&dir, found).await,
                Err(e) => {
                    tracing::debug!(error = %e, "the manifests folder cannot be read; checking it");
                    self.check_folder().await
                }
            };
        }
        for path in manifests {
            if !self.refresh(&path, Some(batch_at)).await {
                return false;
            }
        }
        true
    }

    /// Notices the folder being deleted (the last state stays in force, a problem says
    /// so), coming back, or replaced by another folder of the same name (watched and
    /// read again).
    async fn check_folder(&mut self) -> bool {
        let dir = self.dir.clone();
        let now = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => scan::identity(&dir).map_err(|e| e.to_string()),
                Ok(_) => Err("not a folder any more".to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match now {
            Ok(identity) if Some(identity) == self.identity => true,
            Ok(identity) => {
                let watcher = match watch(&dir, self.events_tx.clone()) {
                    Ok(watcher) => watcher,
                    Err(e) => {
                        let message = format!(
                            "{}: cannot watch the manifests folder: {e}; retrying",
                            dir.display()
                        );
                        return self.folder_problem(&dir, Some(message)).await;
                    }
                };
                tracing::info!(dir = %dir.display(), "the manifests folder is back (or was replaced); reading it again");
                self.watcher = Some(watcher);
                self.identity = Some(identity);
                let found = match scan_blocking(dir.clone()).await {
                    Ok(found) => found,
                    Err(e) => {
                        self.identity = None;
                        let message =
                            format!("{}: cannot read the manifests folder: {e}", dir.display());
                        return self.folder_problem(&dir, Some(message)).await;
                    }
                };
                self.folder_problem(&dir, None).await && self.apply_scan(&dir, found).await
            }
            Err(why) => {
                self.watcher = None;
                self.identity = None;
                self.files.cancel_pending();
                let message = format!(
                    "{}: the manifests folder is gone ({why}); the objects last read from it stay in force until it is back",
                    dir.display()
                );
                self.folder_problem(&dir, Some(message)).await
            }
        }
    }
}

#[cfg(test)]
mod tests;
