//! Finds the manifest files under a folder. Blocking: run it off the async executor.
//!
//! Symlinks are followed (a ConfigMap volume is made of them), so a folder can be
//! reached twice, or lead back to one of its parents: every folder is read once, by its
//! device and inode, and a second way into it is reported. A subfolder that cannot be
//! read is reported too, and the walk goes on.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::parse::is_manifest;

/// What a walk found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Paths with a manifest's name that are not folders, sorted: regular files, and
    /// also anything else (a FIFO, a symlink loop), which the reader then reports.
    pub files: Vec<PathBuf>,
    /// Folders that could not be used, with why: unreadable, or reached a second time.
    pub folder_problems: BTreeMap<PathBuf, String>,
    /// Folders whose content is unknown because they could not be read.
    pub unreadable: Vec<PathBuf>,
}

impl Scan {
    /// Whether `path` lies under a folder whose content is unknown.
    pub fn hides(&self, path: &Path) -> bool {
        self.unreadable
            .iter()
            .any(|folder| path.starts_with(folder))
    }
}

/// The device and inode of a folder: what identifies it through any number of paths.
pub fn identity(path: &Path) -> io::Result<(u64, u64)> {
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.dev(), metadata.ino()))
}

/// Every manifest under `root`; hidden folders (`.git`, a ConfigMap's `..data`) are not
/// entered. Fails only when `root` itself cannot be read (`NotFound`: it is gone).
pub fn scan(root: &Path) -> io::Result<Scan> {
    let mut out = Scan::default();
    let mut seen: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    seen.insert(identity(root)?, root.to_owned());
    let mut folders = vec![root.to_owned()];
    let mut files = BTreeSet::new();
    while let Some(folder) = folders.pop() {
        let entries = match std::fs::read_dir(&folder) {
            Ok(entries) => entries,
            Err(e) if folder == root => return Err(e),
            // Removed while walking: its files are gone.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.folder_problems.insert(
                    folder.clone(),
                    format!(
                        "{}: cannot read folder: {e}; the files last read under it stay in force",
                        folder.display()
                    ),
                );
                out.unreadable.push(folder);
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    out.folder_problems.insert(
                        folder.clone(),
                        format!(
                            "{}: cannot list folder: {e}; the files last read under it stay in force",
                            folder.display()
                        ),
                    );
                    out.unreadable.push(folder.clone());
                    break;
                }
            };
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            // Follows symlinks.
            match std::fs::metadata(&path) {
                Ok(metadata) if metadata.is_dir() => {
                    let id = (metadata.dev(), metadata.ino());
                    if let Some(first) = seen.get(&id) {
                        out.folder_problems.insert(
                            path.clone(),
                            format!(
                                "{}: leads to {}, which is read already (a symlink loop or a \
                                 second way in); skipped",
                                path.display(),
                                first.display()
                            ),
                        );
                    } else {
                        seen.insert(id, path.clone());
                        folders.push(path);
                    }
                }
                // A dangling symlink holds nothing (a ConfigMap swap can leave one for a
                // moment).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                _ if is_manifest(&path) => {
                    files.insert(path);
                }
                _ => {}
            }
        }
    }
    out.files = files.into_iter().collect();
    out.unreadable.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn names(scan: &Scan, root: &Path) -> Vec<String> {
        scan.files
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn manifests_are_found_in_subfolders_but_not_in_hidden_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        for file in [
            "x.yaml",
            "a/y.yml",
            "a/b/z.json",
            ".git/h.yaml",
            "README.md",
            ".x.yaml",
        ] {
            std::fs::write(root.join(file), "").unwrap();
        }
        let scan = scan(root).unwrap();
        assert_eq!(names(&scan, root), ["a/b/z.json", "a/y.yml", "x.yaml"]);
        assert!(scan.folder_problems.is_empty());
    }

    #[test]
    fn a_symlink_loop_is_read_once_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("a")).unwrap();
        std::fs::write(root.join("a/x.yaml"), "").unwrap();
        symlink("..", root.join("a/up")).unwrap();
        symlink(".", root.join("self")).unwrap();
        let scan = scan(root).unwrap();
        assert_eq!(names(&scan, root), ["a/x.yaml"]);
        let problems: Vec<_> = scan.folder_problems.keys().cloned().collect();
        assert_eq!(problems, [root.join("a/up"), root.join("self")]);
        assert!(scan.folder_problems[&root.join("self")].contains("symlink loop"));
    }

    #[test]
    fn special_files_and_file_symlink_loops_are_listed_for_the_reader_to_report() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        symlink(root.join("loop.yaml"), root.join("loop.yaml")).unwrap();
        symlink("/dev/zero", root.join("zero.yaml")).unwrap();
        symlink(root.join("missing"), root.join("dangling.yaml")).unwrap();
        let scan = scan(root).unwrap();
        assert_eq!(names(&scan, root), ["loop.yaml", "zero.yaml"]);
    }

    #[test]
    fn an_unreadable_subfolder_is_reported_and_the_walk_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("locked")).unwrap();
        std::fs::write(root.join("locked/x.yaml"), "").unwrap();
        std::fs::write(root.join("y.yaml"), "").unwrap();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o000))
            .unwrap();
        let found = without_privileges(|| scan(root));
        std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let found = found.unwrap();
        assert_eq!(names(&found, root), ["y.yaml"]);
        assert_eq!(found.unreadable, [root.join("locked")]);
        assert!(found.hides(&root.join("locked/x.yaml")));
        assert!(found.folder_problems[&root.join("locked")].contains("cannot read folder"));
    }

    /// Runs `f` on a thread that is not root (root reads any folder): as `nobody` when
    /// the test runs as root. Only that thread changes credentials.
    fn without_privileges<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    if rustix::process::geteuid().is_root() {
                        let nobody = rustix::process::Uid::from_raw(65534);
                        rustix::thread::set_thread_res_uid(nobody, nobody, nobody)
                            .expect("dropping to nobody on this thread");
                    }
                    f()
                })
                .join()
                .unwrap()
        })
    }

    #[test]
    fn a_missing_root_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = scan(&dir.path().join("gone")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
