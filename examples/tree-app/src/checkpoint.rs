//! The checkpoint hooks: `GET /_haven/snapshot` streams the data directory's
//! `tree.snapshot` and `journal` in one self-validating blob, `PUT
//! /_haven/restore` validates such a blob completely and swaps it in. The
//! crate docs ("Checkpoint hooks") give the format and the guarantees.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedMutexGuard, mpsc};
use tracing::{info, warn};

use crate::store::sync_dir;
use crate::{JOURNAL_FILE, Loaded, SNAPSHOT_FILE, TreeApp, TreeAppError, Writer, io_err, task_err};

/// First 8 bytes of every tree app snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"HAVENTRE";

/// Version of the snapshot format this app writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Length of the snapshot header: magic, version, two lengths, header CRC.
pub const SNAPSHOT_HEADER_LEN: u64 = 32;

/// Name of the marker, in the data directory, whose existence says a
/// restore's temporary files are complete and must be renamed into place. It
/// holds `1` if the restored state has a `tree.snapshot` file, `0` if not.
pub const RESTORE_MARKER_FILE: &str = "restore.ready";

/// Where the marker is written before it is renamed into place, so that it
/// never exists with a partial content.
const RESTORE_MARKER_TMP_FILE: &str = "restore.ready.tmp";

/// Where a restore writes the restored `tree.snapshot` before renaming it.
pub const SNAPSHOT_RESTORE_FILE: &str = "tree.snapshot.restore.tmp";

/// Where a restore writes the restored journal before renaming it.
pub const JOURNAL_RESTORE_FILE: &str = "journal.restore.tmp";

/// Length of the trailer: the CRC-32 of everything before it.
const TRAILER_LEN: u64 = 4;

/// Bytes read from a file per streamed chunk.
const CHUNK_LEN: u64 = 256 * 1024;

/// Why a restore body is not a valid snapshot; the `400` body is
/// `invalid snapshot: {this}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Invalid {
    #[error("truncated")]
    Truncated,
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported version {0}")]
    Version(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("lengths overflow")]
    Overflow,
    #[error("trailing bytes after the checksum")]
    Trailing,
    #[error("checksum mismatch")]
    Checksum,
    /// A file that does not load; names the file (`tree.snapshot` or
    /// `journal`), the offset and the reason, as start-up would.
    #[error("{file} at byte offset {offset}: {reason}")]
    Corrupt {
        file: &'static str,
        offset: u64,
        reason: String,
    },
    #[error("the journal ends with a torn record")]
    Torn,
    #[error("it records Haven-Index {recorded}, above the restore's Haven-Index {restore}")]
    AheadOfRestore { recorded: u64, restore: u64 },
}

/// Why a restore failed.
#[derive(Debug)]
pub(crate) enum RestoreError {
    /// The body is not a valid snapshot (`400`); nothing changed.
    Invalid(Invalid),
    /// The request body could not be read (`400`); nothing changed.
    Body(axum::Error),
    /// The app could not write or swap the files (`500`).
    App(TreeAppError),
}

impl From<Invalid> for RestoreError {
    fn from(e: Invalid) -> Self {
        RestoreError::Invalid(e)
    }
}

impl From<TreeAppError> for RestoreError {
    fn from(e: TreeAppError) -> Self {
        RestoreError::App(e)
    }
}

/// The snapshot header's variable part. `snapshot_len` is `0` when the data
/// directory has no `tree.snapshot` (an empty one is never valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    snapshot_len: u64,
    journal_len: u64,
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut le = [0u8; 4];
    le.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(le)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

impl Header {
    fn encode(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SNAPSHOT_HEADER_LEN as usize);
        out.extend_from_slice(&SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.snapshot_len.to_le_bytes());
        out.extend_from_slice(&self.journal_len.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a whole header; its own CRC catches garbled lengths before
    /// anything is written.
    fn decode(bytes: &[u8]) -> Result<Header, Invalid> {
        if bytes.get(..8) != Some(&SNAPSHOT_MAGIC[..]) {
            return Err(Invalid::BadMagic);
        }
        let version = le_u32(bytes, 8);
        if version != SNAPSHOT_VERSION {
            return Err(Invalid::Version(version));
        }
        if crc32fast::hash(&bytes[..28]) != le_u32(bytes, 28) {
            return Err(Invalid::HeaderChecksum);
        }
        let header = Header {
            snapshot_len: le_u64(bytes, 12),
            journal_len: le_u64(bytes, 20),
        };
        header.total_len().ok_or(Invalid::Overflow)?;
        Ok(header)
    }

    /// Offset of the end of the `tree.snapshot` bytes.
    fn snapshot_end(self) -> u64 {
        SNAPSHOT_HEADER_LEN.saturating_add(self.snapshot_len)
    }

    /// Offset of the end of the journal bytes (the trailer's start).
    fn body_end(self) -> u64 {
        self.snapshot_end().saturating_add(self.journal_len)
    }

    fn total_len(self) -> Option<u64> {
        SNAPSHOT_HEADER_LEN
            .checked_add(self.snapshot_len)?
            .checked_add(self.journal_len)?
            .checked_add(TRAILER_LEN)
    }
}

/// Removes `path`; `Ok(false)` if it did not exist.
fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Renames `from` over `to`; a missing `from` was renamed by an earlier attempt.
fn rename_if_present(from: &Path, to: &Path) -> Result<(), TreeAppError> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(to, "rename a restored file into place")(e)),
    }
}

/// Start-up half of a restore's crash safety: with the marker, the temporary
/// files are complete and are renamed into place (the restore is finished);
/// without it, the old files were never touched and leftovers are deleted.
pub(crate) fn finish_or_discard_restore(dir: &Path) -> Result<(), TreeAppError> {
    let marker = dir.join(RESTORE_MARKER_FILE);
    match fs::read(&marker) {
        Ok(content) => {
            warn!(dir = %dir.display(), "finishing a restore interrupted by a crash");
            roll_forward(dir, content.as_slice() == b"1")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            for name in [
                RESTORE_MARKER_TMP_FILE,
                SNAPSHOT_RESTORE_FILE,
                JOURNAL_RESTORE_FILE,
            ] {
                let tmp = dir.join(name);
                match remove_if_present(&tmp) {
                    Ok(true) => warn!(file = %tmp.display(), "deleted a restore left unfinished"),
                    Ok(false) => {}
                    Err(e) => return Err(io_err(&tmp, "delete an unfinished restore")(e)),
                }
            }
            Ok(())
        }
        Err(e) => Err(io_err(&marker, "read the restore marker")(e)),
    }
}

/// Puts the restored `tree.snapshot` (or its absence) and journal in place,
/// then removes the marker. Idempotent, so start-up can redo it after a crash.
fn roll_forward(dir: &Path, has_snapshot: bool) -> Result<(), TreeAppError> {
    let snapshot = dir.join(SNAPSHOT_FILE);
    if has_snapshot {
        rename_if_present(&dir.join(SNAPSHOT_RESTORE_FILE), &snapshot)?;
    } else {
        remove_if_present(&snapshot).map_err(io_err(&snapshot, "remove the old snapshot"))?;
    }
    rename_if_present(&dir.join(JOURNAL_RESTORE_FILE), &dir.join(JOURNAL_FILE))?;
    sync_dir(dir);
    let marker = dir.join(RESTORE_MARKER_FILE);
    remove_if_present(&marker).map_err(io_err(&marker, "remove the restore marker"))?;
    sync_dir(dir);
    Ok(())
}

/// Creates the marker durably and atomically: from then on the restore is
/// committed.
fn write_marker(dir: &Path, has_snapshot: bool) -> Result<(), TreeAppError> {
    let tmp = dir.join(RESTORE_MARKER_TMP_FILE);
    let content: &[u8] = if has_snapshot { b"1" } else { b"0" };
    File::create(&tmp)
        .and_then(|mut f| f.write_all(content).and_then(|()| f.sync_all()))
        .map_err(io_err(&tmp, "write the restore marker"))?;
    let marker = dir.join(RESTORE_MARKER_FILE);
    fs::rename(&tmp, &marker).map_err(io_err(&marker, "rename the restore marker"))?;
    sync_dir(dir);
    Ok(())
}

/// A restore's temporary files; deleted on drop unless the restore was
/// committed (then start-up or [`roll_forward`] owns them). Holds the restore
/// lock, so the names are never shared by two restores.
struct Staged {
    dir: PathBuf,
    committed: bool,
    _restoring: OwnedMutexGuard<()>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        for name in [
            RESTORE_MARKER_TMP_FILE,
            SNAPSHOT_RESTORE_FILE,
            JOURNAL_RESTORE_FILE,
        ] {
            let tmp = self.dir.join(name);
            if let Err(e) = remove_if_present(&tmp) {
                warn!(file = %tmp.display(), error = %e, "cannot delete a rejected restore");
            }
        }
    }
}

/// A checked snapshot: its files staged, its state loaded from them.
struct Checked {
    staged: Staged,
    loaded: Loaded,
    has_snapshot: bool,
}

/// Writes a snapshot's two files to their temporary copies while checking its
/// framing and checksum, chunk by chunk, so a body of any size needs little
/// memory.
struct Receiver {
    staged: Staged,
    /// Created once the header says there is a `tree.snapshot`.
    snapshot: Option<BufWriter<File>>,
    journal: BufWriter<File>,
    head: Vec<u8>,
    header: Option<Header>,
    /// Bytes of the snapshot consumed so far.
    offset: u64,
    crc: crc32fast::Hasher,
    trailer: Vec<u8>,
}

fn create_tmp(dir: &Path, name: &str) -> Result<BufWriter<File>, TreeAppError> {
    let tmp = dir.join(name);
    let file = File::create(&tmp).map_err(io_err(&tmp, "create a restore file"))?;
    Ok(BufWriter::with_capacity(CHUNK_LEN as usize, file))
}

fn sync_tmp(out: BufWriter<File>, tmp: &Path) -> Result<(), TreeAppError> {
    out.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .map_err(io_err(tmp, "sync a restore file"))
}

impl Receiver {
    fn create(dir: &Path, restoring: OwnedMutexGuard<()>) -> Result<Receiver, TreeAppError> {
        let staged = Staged {
            dir: dir.to_path_buf(),
            committed: false,
            _restoring: restoring,
        };
        // A stale copy from an earlier attempt must not pass for this one's.
        let stale = dir.join(SNAPSHOT_RESTORE_FILE);
        remove_if_present(&stale).map_err(io_err(&stale, "delete a stale restore file"))?;
        Ok(Receiver {
            journal: create_tmp(dir, JOURNAL_RESTORE_FILE)?,
            staged,
            snapshot: None,
            head: Vec::with_capacity(SNAPSHOT_HEADER_LEN as usize),
            header: None,
            offset: 0,
            crc: crc32fast::Hasher::new(),
            trailer: Vec::with_capacity(TRAILER_LEN as usize),
        })
    }

    fn feed(&mut self, mut chunk: &[u8]) -> Result<(), RestoreError> {
        while !chunk.is_empty() {
            let taken = self.take(chunk)?;
            chunk = &chunk[taken..];
        }
        Ok(())
    }

    /// Consumes a prefix of `chunk` (at most up to the next region boundary);
    /// returns its length.
    fn take(&mut self, chunk: &[u8]) -> Result<usize, RestoreError> {
        let Some(header) = self.header else {
            return self.take_header(chunk);
        };
        if self.offset >= header.body_end() {
            return self.take_trailer(chunk);
        }
        let in_snapshot = self.offset < header.snapshot_end();
        let end = if in_snapshot {
            header.snapshot_end()
        } else {
            header.body_end()
        };
        let n =
            usize::try_from(end - self.offset).map_or(chunk.len(), |left| left.min(chunk.len()));
        let part = &chunk[..n];
        self.crc.update(part);
        let (out, name) = match (&mut self.snapshot, in_snapshot) {
            (Some(out), true) => (out, SNAPSHOT_RESTORE_FILE),
            _ => (&mut self.journal, JOURNAL_RESTORE_FILE),
        };
        out.write_all(part)
            .map_err(io_err(&self.staged.dir.join(name), "write a restore file"))?;
        self.offset += n as u64;
        Ok(n)
    }

    fn take_header(&mut self, chunk: &[u8]) -> Result<usize, RestoreError> {
        let n = (SNAPSHOT_HEADER_LEN as usize - self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..n]);
        let seen = self.head.len().min(SNAPSHOT_MAGIC.len());
        if self.head[..seen] != SNAPSHOT_MAGIC[..seen] {
            return Err(Invalid::BadMagic.into());
        }
        if self.head.len() == SNAPSHOT_HEADER_LEN as usize {
            let header = Header::decode(&self.head)?;
            if header.snapshot_len > 0 {
                self.snapshot = Some(create_tmp(&self.staged.dir, SNAPSHOT_RESTORE_FILE)?);
            }
            self.header = Some(header);
            self.crc.update(&self.head);
            self.offset = SNAPSHOT_HEADER_LEN;
        }
        Ok(n)
    }

    fn take_trailer(&mut self, chunk: &[u8]) -> Result<usize, RestoreError> {
        if self.trailer.len() + chunk.len() > TRAILER_LEN as usize {
            return Err(Invalid::Trailing.into());
        }
        self.trailer.extend_from_slice(chunk);
        Ok(chunk.len())
    }

    /// Checks the framing and checksum, makes the files durable, then loads
    /// them exactly as start-up would.
    fn finish(self, restore: u64) -> Result<Checked, RestoreError> {
        let header = self.header.ok_or(Invalid::Truncated)?;
        if self.offset < header.body_end() || self.trailer.len() < TRAILER_LEN as usize {
            return Err(Invalid::Truncated.into());
        }
        if self.crc.finalize() != le_u32(&self.trailer, 0) {
            return Err(Invalid::Checksum.into());
        }
        let dir = self.staged.dir.clone();
        if let Some(out) = self.snapshot {
            sync_tmp(out, &dir.join(SNAPSHOT_RESTORE_FILE))?;
        }
        sync_tmp(self.journal, &dir.join(JOURNAL_RESTORE_FILE))?;
        let loaded = load_staged(&dir, header, restore)?;
        Ok(Checked {
            staged: self.staged,
            loaded,
            has_snapshot: header.snapshot_len > 0,
        })
    }
}

/// Loads the staged files; whatever start-up would refuse or repair is an
/// invalid snapshot.
fn load_staged(dir: &Path, header: Header, restore: u64) -> Result<Loaded, RestoreError> {
    let snapshot = dir.join(SNAPSHOT_RESTORE_FILE);
    let journal = dir.join(JOURNAL_RESTORE_FILE);
    let loaded = crate::load(&snapshot, &journal).map_err(|e| match e {
        TreeAppError::Corrupt {
            path,
            offset,
            reason,
        } => {
            let file = if path == snapshot {
                SNAPSHOT_FILE
            } else {
                JOURNAL_FILE
            };
            RestoreError::Invalid(Invalid::Corrupt {
                file,
                offset,
                reason,
            })
        }
        other => RestoreError::App(other),
    })?;
    if loaded.len != header.journal_len {
        return Err(Invalid::Torn.into());
    }
    let recorded = loaded.state.applied();
    if recorded > restore {
        return Err(Invalid::AheadOfRestore { recorded, restore }.into());
    }
    Ok(loaded)
}

/// Copies the request body into the receiver's channel; stops early (without
/// error) when the receiver has given up on an invalid body.
async fn pump(body: Body, tx: mpsc::Sender<Bytes>) -> Result<(), axum::Error> {
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        if tx.send(chunk?).await.is_err() {
            break;
        }
    }
    Ok(())
}

impl TreeApp {
    /// Restores the state from a snapshot body (see the crate docs): stages,
    /// checks and loads it without blocking writes, then swaps it in under the
    /// writer lock. Both blocking halves run to completion even if the request
    /// is dropped.
    pub(crate) async fn restore(
        self: &Arc<Self>,
        index: u64,
        body: Body,
    ) -> Result<(), RestoreError> {
        let restoring = Arc::clone(&self.restoring).lock_owned().await;
        if self.writer.lock().await.failed {
            // A failed install may have left a committed marker behind: only
            // a restart may finish it.
            return Err(TreeAppError::Failed {
                path: self.journal_path.clone(),
            }
            .into());
        }
        let checked = self.receive(index, body, restoring).await?;
        let writer = Arc::clone(&self.writer).lock_owned().await;
        let app = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            app.install(&mut writer, checked)
        })
        .await
        .map_err(task_err(&self.journal_path))??;
        Ok(())
    }

    async fn receive(
        &self,
        index: u64,
        body: Body,
        restoring: OwnedMutexGuard<()>,
    ) -> Result<Checked, RestoreError> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let dir = self.dir.clone();
        let receiving = tokio::task::spawn_blocking(move || {
            let mut receiver = Receiver::create(&dir, restoring)?;
            while let Some(chunk) = rx.blocking_recv() {
                receiver.feed(&chunk)?;
            }
            receiver.finish(index)
        });
        let pumped = pump(body, tx).await;
        let checked = receiving.await.map_err(task_err(&self.dir))?;
        // A body that could not be read is reported as such, whatever the
        // receiver made of its first part (which is deleted when dropped).
        pumped.map_err(RestoreError::Body)?;
        checked
    }

    /// Swaps the checked files and state in (blocking, under the writer lock).
    /// The loaded journal handle was opened on the temporary file, whose
    /// inode the rename keeps. Failing after the commit leaves the app
    /// refusing writes until a restart finishes the restore.
    fn install(&self, writer: &mut Writer, checked: Checked) -> Result<(), TreeAppError> {
        let Checked {
            mut staged,
            loaded,
            has_snapshot,
        } = checked;
        let committed = write_marker(&self.dir, has_snapshot);
        staged.committed = committed.is_ok();
        if let Err(e) = committed.and_then(|()| roll_forward(&self.dir, has_snapshot)) {
            writer.failed |= staged.committed;
            return Err(e);
        }
        let (state, restored) = loaded.into_writer();
        info!(
            dir = %self.dir.display(),
            haven_index = state.applied(),
            journal_bytes = restored.len,
            "state restored from a snapshot"
        );
        *self.write_state() = state;
        *writer = restored;
        Ok(())
    }

    /// Fixes what a snapshot streams, under the writer lock so that it holds
    /// exactly the writes answered so far: handles on `tree.snapshot` (if any)
    /// and the journal, and their lengths. Later writes only append to the
    /// journal, and compaction and restores rename new files in, so these
    /// handles keep their bytes without blocking writers while streaming.
    pub(crate) async fn snapshot_stream(self: &Arc<Self>) -> Result<(u64, Body), TreeAppError> {
        let writer = Arc::clone(&self.writer).lock_owned().await;
        let app = Arc::clone(self);
        let streamer = tokio::task::spawn_blocking(move || Streamer::new(&app, &writer))
            .await
            .map_err(task_err(&self.dir))??;
        let len = streamer.total_len();
        let stream = futures::stream::try_unfold(streamer, Streamer::next);
        Ok((len, Body::from_stream(stream)))
    }
}

/// One snapshot being streamed: header, `tree.snapshot`, journal, trailer.
struct Streamer {
    snapshot: Option<Arc<File>>,
    journal: Arc<File>,
    dir: PathBuf,
    header: Header,
    offset: u64,
    crc: crc32fast::Hasher,
}

impl Streamer {
    fn new(app: &TreeApp, writer: &Writer) -> Result<Streamer, TreeAppError> {
        let path = app.dir.join(SNAPSHOT_FILE);
        let snapshot = match File::open(&path) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path, "open the snapshot")(e)),
        };
        let snapshot_len = match &snapshot {
            Some(file) => file
                .metadata()
                .map_err(io_err(&path, "stat the snapshot"))?
                .len(),
            None => 0,
        };
        let journal = writer
            .journal
            .try_clone()
            .map_err(io_err(&app.journal_path, "open the journal for a snapshot"))?;
        Ok(Streamer {
            snapshot: snapshot.map(Arc::new),
            journal: Arc::new(journal),
            dir: app.dir.clone(),
            header: Header {
                snapshot_len,
                journal_len: writer.len,
            },
            offset: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    fn total_len(&self) -> u64 {
        self.header.total_len().unwrap_or(u64::MAX)
    }

    /// The next chunk, with the streamer to continue from.
    async fn next(mut self) -> Result<Option<(Bytes, Streamer)>, TreeAppError> {
        let chunk = if self.offset == 0 {
            Bytes::from(self.header.encode())
        } else if self.offset < self.header.body_end() {
            self.read_chunk().await?
        } else if self.offset < self.total_len() {
            let trailer = Bytes::copy_from_slice(&self.crc.clone().finalize().to_le_bytes());
            self.offset = self.total_len();
            return Ok(Some((trailer, self)));
        } else {
            return Ok(None);
        };
        self.crc.update(&chunk);
        self.offset += chunk.len() as u64;
        Ok(Some((chunk, self)))
    }

    /// Reads the next at most [`CHUNK_LEN`] bytes of `tree.snapshot` or the
    /// journal.
    async fn read_chunk(&self) -> Result<Bytes, TreeAppError> {
        let snapshot_end = self.header.snapshot_end();
        let (file, name, at, end) = match &self.snapshot {
            Some(file) if self.offset < snapshot_end => (
                file,
                SNAPSHOT_FILE,
                self.offset - SNAPSHOT_HEADER_LEN,
                snapshot_end,
            ),
            _ => (
                &self.journal,
                JOURNAL_FILE,
                self.offset - snapshot_end,
                self.header.body_end(),
            ),
        };
        let len = usize::try_from(CHUNK_LEN.min(end - self.offset)).unwrap_or(0);
        let file = Arc::clone(file);
        let path = self.dir.join(name);
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len];
            read_exact_at(&file, &mut buf, at)
                .map_err(io_err(&path, "read the files for a snapshot"))?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(task_err(&self.dir))?
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
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
    fn header_round_trips_and_damage_is_named() {
        let header = Header {
            snapshot_len: 0,
            journal_len: 99,
        };
        let bytes = header.encode();
        assert_eq!(bytes.len() as u64, SNAPSHOT_HEADER_LEN);
        assert_eq!(Header::decode(&bytes), Ok(header));
        let mut bad = bytes.clone();
        bad[7] ^= 1;
        assert_eq!(Header::decode(&bad), Err(Invalid::BadMagic));
        let mut bad = bytes.clone();
        bad[8] = 3;
        assert_eq!(Header::decode(&bad), Err(Invalid::Version(3)));
        let mut bad = bytes.clone();
        bad[21] ^= 1;
        assert_eq!(Header::decode(&bad), Err(Invalid::HeaderChecksum));
        let huge = Header {
            snapshot_len: u64::MAX,
            journal_len: 1,
        };
        assert_eq!(Header::decode(&huge.encode()), Err(Invalid::Overflow));
    }

    #[test]
    fn start_finishes_a_committed_restore_and_discards_an_uncommitted_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        fs::write(path.join(SNAPSHOT_FILE), b"old snapshot").unwrap();
        fs::write(path.join(JOURNAL_FILE), b"old journal").unwrap();
        // Uncommitted: the temporary files go, the old files stay.
        fs::write(path.join(JOURNAL_RESTORE_FILE), b"new journal").unwrap();
        fs::write(path.join(RESTORE_MARKER_TMP_FILE), b"0").unwrap();
        finish_or_discard_restore(path).unwrap();
        assert_eq!(fs::read(path.join(JOURNAL_FILE)).unwrap(), b"old journal");
        assert_eq!(fs::read_dir(path).unwrap().count(), 2);
        // Committed without a tree.snapshot: the old one goes.
        fs::write(path.join(JOURNAL_RESTORE_FILE), b"new journal").unwrap();
        write_marker(path, false).unwrap();
        finish_or_discard_restore(path).unwrap();
        assert_eq!(fs::read(path.join(JOURNAL_FILE)).unwrap(), b"new journal");
        assert!(!path.join(SNAPSHOT_FILE).exists());
        assert_eq!(fs::read_dir(path).unwrap().count(), 1);
        // Committed with one, the journal already renamed: idempotent.
        fs::write(path.join(SNAPSHOT_RESTORE_FILE), b"new snapshot").unwrap();
        write_marker(path, true).unwrap();
        finish_or_discard_restore(path).unwrap();
        assert_eq!(fs::read(path.join(SNAPSHOT_FILE)).unwrap(), b"new snapshot");
        assert_eq!(fs::read(path.join(JOURNAL_FILE)).unwrap(), b"new journal");
        assert_eq!(fs::read_dir(path).unwrap().count(), 2);
    }
}
