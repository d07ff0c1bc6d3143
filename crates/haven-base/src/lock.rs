//! One process at a time per service directory: a running node holds an exclusive lock on
//! `<service dir>/LOCK`, so a second node with the same data directory, or a restore
//! reading the log while the node writes it, is refused instead of corrupting it.

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::FlockOperation;

/// Held for as long as it lives; the kernel drops the lock when the process dies.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock or explains who holds it.
    pub fn acquire(service_dir: &Path) -> io::Result<DirLock> {
        std::fs::create_dir_all(service_dir)?;
        let path = service_dir.join("LOCK");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} is in use by a running node (stop it first, or work on a copy)",
                    service_dir.display()
                ),
            )),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is in use by a running node (stop it first, or work on a copy)",
                dir.path().display()
            )
        );
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
