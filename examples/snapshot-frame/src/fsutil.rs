//! File helpers shared by the apps and the restore machinery.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use tracing::warn;

/// An I/O operation on a file failed; apps turn it into their own error,
/// which names the file the same way.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot {action}: {source}")]
pub struct IoError {
    pub path: PathBuf,
    pub action: &'static str,
    #[source]
    pub source: io::Error,
}

/// A `map_err` adapter naming `path` and `action`.
pub(crate) fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> IoError + 'a {
    move |source| IoError {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Makes a rename in `dir` durable (`haven_frame::sync_path`); the apps go on without
/// it, with a warning.
pub fn sync_dir(dir: &Path) {
    if let Err(e) = haven_frame::sync_path(dir) {
        warn!(dir = %dir.display(), error = %e, "cannot sync a directory");
    }
}

pub use haven_frame::parent_dir;

/// Makes a rename of `path` durable: [`sync_dir`] of its directory.
pub fn sync_parent_dir(path: &Path) {
    sync_dir(parent_dir(path));
}

/// Removes `path`; `Ok(false)` if it did not exist.
pub fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens `path` for reading and appending, creating it if absent.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
}

/// Reads exactly `buf.len()` bytes of `file` at `offset`, without moving (or
/// needing) a shared cursor.
#[cfg(unix)]
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Reads exactly `buf.len()` bytes of `file` at `offset`.
#[cfg(windows)]
pub fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut std::mem::take(&mut buf)[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_do_what_they_say() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert_eq!(parent_dir(&path), dir.path());
        assert_eq!(parent_dir(Path::new("f")), Path::new("."));
        assert!(!remove_if_present(&path).unwrap());
        let mut file = open_append(&path).unwrap();
        io::Write::write_all(&mut file, b"hello").unwrap();
        let mut buf = [0u8; 3];
        read_exact_at(&file, &mut buf, 1).unwrap();
        assert_eq!(&buf, b"ell");
        assert!(read_exact_at(&file, &mut buf, 4).is_err());
        sync_parent_dir(&path);
        assert!(remove_if_present(&path).unwrap());
        assert!(!path.exists());
    }
}
