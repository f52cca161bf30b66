//! Reads files that someone else writes (manifests, certificates) without trusting what
//! sits at their path: only regular files, never more than a bound.
//!
//! A path may lead, through symlinks, to a FIFO (opening it would block until a writer
//! comes), a device such as `/dev/zero` (endless) or a folder. The file is opened
//! without blocking and checked with `fstat` on the open descriptor, so a swap between
//! a check and the open cannot slip anything else in.

use std::{
    fs::File,
    io::{self, Read},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    time::SystemTime,
};

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening or reading failed (missing, permissions, a symlink loop: `ELOOP`).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The path leads to something other than a regular file.
    #[error("not a regular file (a {0})")]
    NotRegular(&'static str),
    /// The file holds more than the bound.
    #[error("larger than {limit} bytes")]
    TooLarge { limit: u64 },
}

impl ReadError {
    /// Whether the path does not exist (any more).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// What kind of file `metadata` describes, in words.
pub fn kind_of(file_type: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "folder"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_symlink() {
        "symlink"
    } else if file_type.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// Reads the regular file at `path` (symlinks followed), at most `limit` bytes. Blocking:
/// call it off the async executor.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    read_regular_dated(path, limit).map(|(contents, _)| contents)
}

/// [`read_regular`], with the file's modification time from the same `fstat` (`None`
/// where the filesystem keeps none).
pub fn read_regular_dated(
    path: &Path,
    limit: u64,
) -> Result<(Vec<u8>, Option<SystemTime>), ReadError> {
    let file = File::options()
        .read(true)
        // A FIFO opens at once instead of waiting for a writer; reads are not affected
        // for regular files.
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(ReadError::NotRegular(kind_of(metadata.file_type())));
    }
    if metadata.len() > limit {
        return Err(ReadError::TooLarge { limit });
    }
    let mut contents = Vec::with_capacity(metadata.len() as usize);
    // The file may grow after fstat: never read past the bound.
    file.take(limit + 1).read_to_end(&mut contents)?;
    if contents.len() as u64 > limit {
        return Err(ReadError::TooLarge { limit });
    }
    Ok((contents, metadata.modified().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, "kind: Node\n").unwrap();
        assert_eq!(read_regular(&path, 100).unwrap(), b"kind: Node\n");
        let (_, modified) = read_regular_dated(&path, 100).unwrap();
        assert_eq!(modified, std::fs::metadata(&path).unwrap().modified().ok());
    }

    #[test]
    fn a_file_over_the_bound_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, vec![b'#'; 101]).unwrap();
        assert!(matches!(
            read_regular(&path, 100),
            Err(ReadError::TooLarge { limit: 100 })
        ));
    }

    #[test]
    fn fifos_devices_folders_and_symlink_loops_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.yaml");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo (coreutils) runs");
        assert!(status.success());
        let zero = dir.path().join("zero.yaml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let folder = dir.path().join("folder.yaml");
        std::fs::create_dir(&folder).unwrap();
        let looped = dir.path().join("loop.yaml");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();

        assert!(matches!(
            read_regular(&fifo, 100),
            Err(ReadError::NotRegular("FIFO"))
        ));
        assert!(matches!(
            read_regular(&zero, 100),
            Err(ReadError::NotRegular("character device"))
        ));
        assert!(matches!(
            read_regular(&folder, 100),
            Err(ReadError::NotRegular("folder"))
        ));
        let error = read_regular(&looped, 100).unwrap_err();
        assert!(
            matches!(&error, ReadError::Io(e) if e.raw_os_error() == Some(40)),
            "ELOOP: {error}"
        );
        assert!(
            read_regular(&dir.path().join("missing"), 100)
                .unwrap_err()
                .is_not_found()
        );
    }
}
