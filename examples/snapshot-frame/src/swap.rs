//! The crash-safe swap: staged temporary files, the commit marker, and
//! start-up's finishing or discarding of an interrupted restore.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tokio::sync::OwnedMutexGuard;
use tracing::warn;

use crate::format::Header;
use crate::fsutil::{IoError, io_err, remove_if_present, sync_dir};

/// One of the two files a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The file itself.
    pub path: PathBuf,
    /// Where a restore stages its new content before renaming it over `path`.
    pub tmp: PathBuf,
    /// Whether the state may lack the file: length `0` in a snapshot then
    /// means "absent", and a restore of such a snapshot deletes the file.
    pub optional: bool,
}

impl Part {
    /// A file the state always has.
    pub fn required(path: PathBuf, tmp: PathBuf) -> Part {
        Part {
            path,
            tmp,
            optional: false,
        }
    }

    /// A file the state may lack (see [`Part::optional`]).
    pub fn optional(path: PathBuf, tmp: PathBuf) -> Part {
        Part {
            path,
            tmp,
            optional: true,
        }
    }
}

/// An app's restore layout: its two files in frame order, the directory
/// holding them, and the commit marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// The directory of the files, synced after renames.
    pub dir: PathBuf,
    /// The two files, in frame order (also the order of the renames).
    pub parts: [Part; 2],
    /// The marker whose existence says the staged files are complete and
    /// must be renamed into place.
    pub marker: PathBuf,
    /// Where the marker is written before it is renamed into place, so that
    /// it never exists with a partial content.
    pub marker_tmp: PathBuf,
}

impl Files {
    /// Which files a state with these frame lengths has.
    pub(crate) fn present(&self, header: Header) -> [bool; 2] {
        let lens = header.lens();
        [0, 1].map(|i| !self.parts[i].optional || lens[i] > 0)
    }

    /// Start-up half of a restore's crash safety: with the marker, the
    /// temporary files are complete and are renamed into place (the restore
    /// is finished); without it, the old files were never touched and
    /// leftovers are deleted. Call it before opening the files.
    pub fn finish_or_discard(&self) -> Result<(), IoError> {
        match fs::read(&self.marker) {
            Ok(content) => {
                warn!(marker = %self.marker.display(), "finishing a restore interrupted by a crash");
                let mut digits = content.iter();
                let present = self
                    .parts
                    .each_ref()
                    .map(|part| !part.optional || digits.next() == Some(&b'1'));
                self.roll_forward(present)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                for tmp in self.leftovers() {
                    match remove_if_present(tmp) {
                        Ok(true) => {
                            warn!(file = %tmp.display(), "deleted a restore left unfinished");
                        }
                        Ok(false) => {}
                        Err(e) => return Err(io_err(tmp, "delete an unfinished restore")(e)),
                    }
                }
                Ok(())
            }
            Err(e) => Err(io_err(&self.marker, "read the restore marker")(e)),
        }
    }

    /// Creates the marker durably and atomically: from then on the restore
    /// is committed. It holds one digit per optional file: `1` if `present`,
    /// `0` if not.
    pub fn write_marker(&self, present: [bool; 2]) -> Result<(), IoError> {
        let content: Vec<u8> = self
            .parts
            .iter()
            .zip(present)
            .filter(|(part, _)| part.optional)
            .map(|(_, present)| if present { b'1' } else { b'0' })
            .collect();
        let tmp = &self.marker_tmp;
        File::create(tmp)
            .and_then(|mut f| f.write_all(&content).and_then(|()| f.sync_all()))
            .map_err(io_err(tmp, "write the restore marker"))?;
        fs::rename(tmp, &self.marker).map_err(io_err(&self.marker, "rename the restore marker"))?;
        sync_dir(&self.dir);
        Ok(())
    }

    /// Puts the staged files in place (deleting an absent optional file),
    /// then removes the marker. Idempotent: a missing temporary file was
    /// renamed by an earlier attempt.
    fn roll_forward(&self, present: [bool; 2]) -> Result<(), IoError> {
        for (part, present) in self.parts.iter().zip(present) {
            if present {
                match fs::rename(&part.tmp, &part.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(io_err(&part.path, "rename a restored file into place")(e));
                    }
                }
            } else {
                remove_if_present(&part.path).map_err(io_err(&part.path, "remove the old file"))?;
            }
        }
        sync_dir(&self.dir);
        remove_if_present(&self.marker)
            .map_err(io_err(&self.marker, "remove the restore marker"))?;
        sync_dir(&self.dir);
        Ok(())
    }

    /// What an uncommitted restore may leave behind.
    fn leftovers(&self) -> [&Path; 3] {
        [&self.marker_tmp, &self.parts[0].tmp, &self.parts[1].tmp]
    }
}

/// A restore's temporary files; deleted on drop unless the restore was
/// committed (then [`Staged::swap_in`] or start-up owns them). Holds the
/// app's restore lock, so the names are never shared by two restores.
#[derive(Debug)]
pub struct Staged {
    pub(crate) files: Files,
    pub(crate) header: Header,
    committed: bool,
    _restoring: OwnedMutexGuard<()>,
}

impl Staged {
    pub(crate) fn new(files: Files, restoring: OwnedMutexGuard<()>) -> Staged {
        Staged {
            files,
            header: Header {
                first_len: 0,
                second_len: 0,
            },
            committed: false,
            _restoring: restoring,
        }
    }

    /// The received snapshot's header.
    pub fn header(&self) -> Header {
        self.header
    }

    /// The layout the files are staged in.
    pub fn files(&self) -> &Files {
        &self.files
    }

    /// Whether the restored state has each file (see [`Part::optional`]).
    pub fn present(&self) -> [bool; 2] {
        self.files.present(self.header)
    }

    /// Whether the marker was written: a failure after it must leave the app
    /// refusing changes until a restart finishes the restore.
    pub fn committed(&self) -> bool {
        self.committed
    }

    /// Commits the restore (the marker), then renames the staged files into
    /// place and removes the marker. Call it under the app's writer lock.
    pub fn swap_in(&mut self) -> Result<(), IoError> {
        let present = self.present();
        let committed = self.files.write_marker(present);
        self.committed = committed.is_ok();
        committed?;
        self.files.roll_forward(present)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for tmp in self.files.leftovers() {
            if let Err(e) = remove_if_present(tmp) {
                warn!(file = %tmp.display(), error = %e, "cannot delete a rejected restore");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Files {
        Files {
            dir: dir.to_path_buf(),
            parts: [
                Part::optional(dir.join("first"), dir.join("first.restore.tmp")),
                Part::required(dir.join("second"), dir.join("second.restore.tmp")),
            ],
            marker: dir.join("restore.ready"),
            marker_tmp: dir.join("restore.ready.tmp"),
        }
    }

    #[test]
    fn start_finishes_a_committed_restore_and_discards_an_uncommitted_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let files = files(path);
        fs::write(path.join("first"), b"old first").unwrap();
        fs::write(path.join("second"), b"old second").unwrap();
        // Uncommitted: the temporary files go, the old files stay.
        fs::write(path.join("second.restore.tmp"), b"new second").unwrap();
        fs::write(path.join("restore.ready.tmp"), b"0").unwrap();
        files.finish_or_discard().unwrap();
        assert_eq!(fs::read(path.join("second")).unwrap(), b"old second");
        assert_eq!(fs::read_dir(path).unwrap().count(), 2);
        // Committed without the optional file: the old one goes.
        fs::write(path.join("second.restore.tmp"), b"new second").unwrap();
        files.write_marker([false, true]).unwrap();
        assert_eq!(fs::read(path.join("restore.ready")).unwrap(), b"0");
        files.finish_or_discard().unwrap();
        assert_eq!(fs::read(path.join("second")).unwrap(), b"new second");
        assert!(!path.join("first").exists());
        assert_eq!(fs::read_dir(path).unwrap().count(), 1);
        // Committed with it, the second already renamed: idempotent.
        fs::write(path.join("first.restore.tmp"), b"new first").unwrap();
        files.write_marker([true, true]).unwrap();
        assert_eq!(fs::read(path.join("restore.ready")).unwrap(), b"1");
        files.finish_or_discard().unwrap();
        assert_eq!(fs::read(path.join("first")).unwrap(), b"new first");
        assert_eq!(fs::read(path.join("second")).unwrap(), b"new second");
        assert_eq!(fs::read_dir(path).unwrap().count(), 2);
    }

    #[test]
    fn required_files_ignore_the_marker_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut files = files(path);
        files.parts[0].optional = false;
        fs::write(path.join("first.restore.tmp"), b"new first").unwrap();
        fs::write(path.join("second.restore.tmp"), b"new second").unwrap();
        files.write_marker([true, true]).unwrap();
        assert_eq!(fs::read(path.join("restore.ready")).unwrap(), b"");
        files.finish_or_discard().unwrap();
        assert_eq!(fs::read(path.join("first")).unwrap(), b"new first");
        assert_eq!(fs::read(path.join("second")).unwrap(), b"new second");
        assert_eq!(fs::read_dir(path).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn an_uncommitted_stage_is_deleted_and_a_committed_one_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let lock = std::sync::Arc::new(tokio::sync::Mutex::new(()));
        fs::write(path.join("first"), b"old").unwrap();
        fs::write(path.join("first.restore.tmp"), b"x").unwrap();
        fs::write(path.join("second.restore.tmp"), b"y").unwrap();
        drop(Staged::new(files(path), lock.clone().lock_owned().await));
        assert_eq!(fs::read_dir(path).unwrap().count(), 1);

        fs::write(path.join("second.restore.tmp"), b"new").unwrap();
        let mut staged = Staged::new(files(path), lock.clone().lock_owned().await);
        staged.header.second_len = 3;
        assert_eq!(staged.present(), [false, true]);
        staged.swap_in().unwrap();
        assert!(staged.committed());
        drop(staged);
        assert!(!path.join("first").exists());
        assert_eq!(fs::read(path.join("second")).unwrap(), b"new");
        assert_eq!(fs::read_dir(path).unwrap().count(), 1);
    }
}
