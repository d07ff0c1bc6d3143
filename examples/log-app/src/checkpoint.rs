//! The checkpoint hooks: `GET /_haven/snapshot` streams the log file and its
//! sidecar in one self-validating blob, `PUT /_haven/restore` validates such a
//! blob completely and swaps it in. The crate docs ("Checkpoint hooks") give
//! the format and the guarantees; this module implements them.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedMutexGuard, mpsc};
use tracing::{info, warn};

use crate::{
    BadHavenIndex, ENTRY_LEN, Inner, LogApp, LogAppError, Writer, haven_index, internal_error,
    io_err, open_reconciled, read_exact_at, sync_parent_dir, text, with_suffix,
};

/// First 8 bytes of every log app snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"HAVENLOG";

/// Version of the snapshot format this app writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Length of the snapshot header: magic, version, two lengths, header CRC.
pub const SNAPSHOT_HEADER_LEN: u64 = 32;

/// Length of the trailer: the CRC-32 of everything before it.
const TRAILER_LEN: u64 = 4;

/// Bytes read from a file per streamed chunk.
const CHUNK_LEN: u64 = 256 * 1024;

/// Suffix of the temporary copies a restore writes next to the log file and
/// the sidecar (`{file}.restore.tmp`, `{file}.haven-index.restore.tmp`).
pub const RESTORE_TMP_SUFFIX: &str = ".restore.tmp";

/// Suffix of the marker (`{file}.restore.ready`) whose existence says a
/// restore's temporary files are complete and must be renamed into place.
pub const RESTORE_MARKER_SUFFIX: &str = ".restore.ready";

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
    #[error("sidecar length {0} is not a multiple of 8")]
    SidecarLen(u64),
    #[error("lengths overflow")]
    Overflow,
    #[error("trailing bytes after the checksum")]
    Trailing,
    #[error("checksum mismatch")]
    Checksum,
    #[error("the log does not end with a newline")]
    TornLine,
    #[error("the log has {lines} lines but the sidecar {entries} entries")]
    Mismatch { lines: u64, entries: u64 },
    #[error("sidecar entry {line} records Haven-Index {index}, not above {previous}")]
    NotIncreasing {
        line: u64,
        index: u64,
        previous: u64,
    },
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
    App(LogAppError),
}

impl From<Invalid> for RestoreError {
    fn from(e: Invalid) -> Self {
        RestoreError::Invalid(e)
    }
}

impl From<LogAppError> for RestoreError {
    fn from(e: LogAppError) -> Self {
        RestoreError::App(e)
    }
}

/// The snapshot header's variable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    log_len: u64,
    sidecar_len: u64,
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
        out.extend_from_slice(&self.log_len.to_le_bytes());
        out.extend_from_slice(&self.sidecar_len.to_le_bytes());
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
            log_len: le_u64(bytes, 12),
            sidecar_len: le_u64(bytes, 20),
        };
        if !header.sidecar_len.is_multiple_of(ENTRY_LEN) {
            return Err(Invalid::SidecarLen(header.sidecar_len));
        }
        header.total_len().ok_or(Invalid::Overflow)?;
        Ok(header)
    }

    /// Offset of the end of the log bytes.
    fn log_end(self) -> u64 {
        SNAPSHOT_HEADER_LEN.saturating_add(self.log_len)
    }

    /// Offset of the end of the sidecar bytes (the trailer's start).
    fn body_end(self) -> u64 {
        self.log_end().saturating_add(self.sidecar_len)
    }

    fn total_len(self) -> Option<u64> {
        SNAPSHOT_HEADER_LEN
            .checked_add(self.log_len)?
            .checked_add(self.sidecar_len)?
            .checked_add(TRAILER_LEN)
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    with_suffix(path, RESTORE_TMP_SUFFIX)
}

fn marker_path(path: &Path) -> PathBuf {
    with_suffix(path, RESTORE_MARKER_SUFFIX)
}

/// Removes `path`; `Ok(false)` if it did not exist.
fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Start-up half of a restore's crash safety: with the marker, the temporary
/// files are complete and are renamed into place (the restore is finished);
/// without it, the old files were never touched and leftovers are deleted.
pub(crate) fn finish_or_discard_restore(path: &Path, sidecar: &Path) -> Result<(), LogAppError> {
    let marker = marker_path(path);
    match fs::symlink_metadata(&marker) {
        Ok(_) => {
            warn!(file = %path.display(), "finishing a restore interrupted by a crash");
            roll_forward(path, sidecar)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            for tmp in [tmp_path(path), tmp_path(sidecar)] {
                match remove_if_present(&tmp) {
                    Ok(true) => warn!(file = %tmp.display(), "deleted a restore left unfinished"),
                    Ok(false) => {}
                    Err(e) => return Err(io_err(&tmp, "delete an unfinished restore")(e)),
                }
            }
            Ok(())
        }
        Err(e) => Err(io_err(&marker, "check for an unfinished restore")(e)),
    }
}

/// Renames both temporary files into place, then removes the marker.
/// Idempotent: a missing temporary file was renamed by an earlier attempt.
fn roll_forward(path: &Path, sidecar: &Path) -> Result<(), LogAppError> {
    for target in [sidecar, path] {
        match fs::rename(tmp_path(target), target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(target, "rename a restored file into place")(e)),
        }
    }
    sync_parent_dir(path);
    let marker = marker_path(path);
    remove_if_present(&marker).map_err(io_err(&marker, "remove the restore marker"))?;
    sync_parent_dir(path);
    Ok(())
}

/// Creates the marker durably: from then on the restore is committed.
fn write_marker(path: &Path) -> Result<(), LogAppError> {
    let marker = marker_path(path);
    File::create(&marker)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&marker, "write the restore marker"))?;
    sync_parent_dir(path);
    Ok(())
}

/// A restore's temporary files; deleted on drop unless the restore was
/// committed (then start-up or [`roll_forward`] owns them). Holds the restore
/// lock, so the names are never shared by two restores.
struct Staged {
    path: PathBuf,
    sidecar: PathBuf,
    committed: bool,
    _restoring: OwnedMutexGuard<()>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // The marker first: a marker whose creation failed half-way must not
        // outlive the files it would commit.
        for tmp in [
            marker_path(&self.path),
            tmp_path(&self.path),
            tmp_path(&self.sidecar),
        ] {
            if let Err(e) = remove_if_present(&tmp) {
                warn!(file = %tmp.display(), error = %e, "cannot delete a rejected restore");
            }
        }
    }
}

/// What the content checks found so far; the problems are reported only once
/// the checksum has matched, so damage reads as "checksum mismatch".
#[derive(Debug, Default)]
struct Content {
    lines: u64,
    last_byte: Option<u8>,
    /// A sidecar entry split across chunks.
    partial: Vec<u8>,
    entries: u64,
    previous: u64,
    problem: Option<Invalid>,
}

impl Content {
    fn log(&mut self, bytes: &[u8]) {
        self.lines += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        self.last_byte = bytes.last().copied().or(self.last_byte);
    }

    fn sidecar(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = (ENTRY_LEN as usize - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.partial.len() == ENTRY_LEN as usize {
                let index = le_u64(&self.partial, 0);
                self.partial.clear();
                self.entry(index);
            }
        }
    }

    fn entry(&mut self, index: u64) {
        if index != 0 {
            if index <= self.previous && self.problem.is_none() {
                self.problem = Some(Invalid::NotIncreasing {
                    line: self.entries,
                    index,
                    previous: self.previous,
                });
            }
            self.previous = index;
        }
        self.entries += 1;
    }

    /// The checks that need the whole content: exactly what the app's open
    /// would otherwise have to repair.
    fn finish(&self, header: Header, restore: u64) -> Result<(), Invalid> {
        if let Some(problem) = &self.problem {
            return Err(problem.clone());
        }
        if header.log_len > 0 && self.last_byte != Some(b'\n') {
            return Err(Invalid::TornLine);
        }
        if self.lines != self.entries {
            return Err(Invalid::Mismatch {
                lines: self.lines,
                entries: self.entries,
            });
        }
        if self.previous > restore {
            return Err(Invalid::AheadOfRestore {
                recorded: self.previous,
                restore,
            });
        }
        Ok(())
    }
}

/// Writes a snapshot's log and sidecar bytes to the temporary files while
/// checking it, chunk by chunk, so a body of any size needs little memory.
struct Receiver {
    staged: Staged,
    log: BufWriter<File>,
    sidecar: BufWriter<File>,
    head: Vec<u8>,
    header: Option<Header>,
    /// Bytes of the snapshot consumed so far.
    offset: u64,
    crc: crc32fast::Hasher,
    trailer: Vec<u8>,
    content: Content,
}

fn create_tmp(target: &Path) -> Result<BufWriter<File>, LogAppError> {
    let tmp = tmp_path(target);
    let file = File::create(&tmp).map_err(io_err(&tmp, "create a restore file"))?;
    Ok(BufWriter::with_capacity(CHUNK_LEN as usize, file))
}

impl Receiver {
    fn create(inner: &Inner, restoring: OwnedMutexGuard<()>) -> Result<Receiver, LogAppError> {
        let staged = Staged {
            path: inner.path.clone(),
            sidecar: inner.sidecar_path.clone(),
            committed: false,
            _restoring: restoring,
        };
        Ok(Receiver {
            log: create_tmp(&staged.path)?,
            sidecar: create_tmp(&staged.sidecar)?,
            staged,
            head: Vec::with_capacity(SNAPSHOT_HEADER_LEN as usize),
            header: None,
            offset: 0,
            crc: crc32fast::Hasher::new(),
            trailer: Vec::with_capacity(TRAILER_LEN as usize),
            content: Content::default(),
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
        let in_log = self.offset < header.log_end();
        let end = if in_log {
            header.log_end()
        } else {
            header.body_end()
        };
        let n =
            usize::try_from(end - self.offset).map_or(chunk.len(), |left| left.min(chunk.len()));
        let part = &chunk[..n];
        self.crc.update(part);
        let (out, target) = if in_log {
            self.content.log(part);
            (&mut self.log, &self.staged.path)
        } else {
            self.content.sidecar(part);
            (&mut self.sidecar, &self.staged.sidecar)
        };
        out.write_all(part)
            .map_err(io_err(&tmp_path(target), "write a restore file"))?;
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
            self.header = Some(Header::decode(&self.head)?);
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

    /// Checks the whole snapshot, then makes the temporary files durable.
    fn finish(self, restore: u64) -> Result<Staged, RestoreError> {
        let header = self.header.ok_or(Invalid::Truncated)?;
        if self.offset < header.body_end() || self.trailer.len() < TRAILER_LEN as usize {
            return Err(Invalid::Truncated.into());
        }
        if self.crc.finalize() != le_u32(&self.trailer, 0) {
            return Err(Invalid::Checksum.into());
        }
        self.content.finish(header, restore)?;
        for (out, target) in [
            (self.log, &self.staged.path),
            (self.sidecar, &self.staged.sidecar),
        ] {
            let tmp = tmp_path(target);
            out.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(io_err(&tmp, "sync a restore file"))?;
        }
        Ok(self.staged)
    }
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

fn task_error(inner: &Inner, e: &tokio::task::JoinError) -> LogAppError {
    LogAppError::Task {
        path: inner.path.clone(),
        message: e.to_string(),
    }
}

impl LogApp {
    /// Restores the state from a snapshot body (see the crate docs): stages
    /// and checks it without blocking appends, then swaps it in under the
    /// writer lock. Both blocking halves run to completion even if the request
    /// is dropped.
    async fn restore(&self, index: u64, body: Body) -> Result<(), RestoreError> {
        let restoring = Arc::clone(&self.inner.restoring).lock_owned().await;
        if self.inner.writer.lock().await.failed {
            // A failed install may have left a committed marker behind: only
            // a restart may finish it.
            return Err(LogAppError::Failed {
                path: self.inner.path.clone(),
            }
            .into());
        }
        let staged = self.receive(index, body, restoring).await?;
        let writer = Arc::clone(&self.inner.writer).lock_owned().await;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            inner.install(&mut writer, staged)
        })
        .await
        .map_err(|e| task_error(&self.inner, &e))??;
        Ok(())
    }

    async fn receive(
        &self,
        index: u64,
        body: Body,
        restoring: OwnedMutexGuard<()>,
    ) -> Result<Staged, RestoreError> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(4);
        let inner = Arc::clone(&self.inner);
        let receiving = tokio::task::spawn_blocking(move || {
            let mut receiver = Receiver::create(&inner, restoring)?;
            while let Some(chunk) = rx.blocking_recv() {
                receiver.feed(&chunk)?;
            }
            receiver.finish(index)
        });
        let pumped = pump(body, tx).await;
        let staged = receiving.await.map_err(|e| task_error(&self.inner, &e))?;
        // A body that could not be read is reported as such, whatever the
        // receiver made of its first part (which is deleted when dropped).
        pumped.map_err(RestoreError::Body)?;
        staged
    }
}

impl Inner {
    /// Swaps the staged files in and reopens them (blocking, under the writer
    /// lock). Failing after the commit leaves the app refusing appends until a
    /// restart finishes the restore.
    fn install(&self, writer: &mut Writer, mut staged: Staged) -> Result<(), LogAppError> {
        let committed = write_marker(&self.path);
        staged.committed = committed.is_ok();
        let result = committed
            .and_then(|()| roll_forward(&self.path, &self.sidecar_path))
            .and_then(|()| open_reconciled(&self.path, &self.sidecar_path));
        match result {
            Ok(opened) => {
                info!(
                    file = %self.path.display(),
                    lines = opened.index.count(),
                    "state restored from a snapshot"
                );
                *self.write_view() = opened.into_view();
                writer.failed = false;
                Ok(())
            }
            Err(e) => {
                writer.failed |= staged.committed;
                Err(e)
            }
        }
    }
}

/// What one snapshot streams, fixed when the request arrives: the files'
/// handles (kept across a later restore's renames) and the lengths that hold
/// exactly the appends answered so far. Both files are append-only, so later
/// appends never change those bytes and need not wait.
struct Streamer {
    file: Arc<File>,
    sidecar: Arc<File>,
    path: PathBuf,
    header: Header,
    offset: u64,
    crc: crc32fast::Hasher,
}

impl Streamer {
    fn new(inner: &Inner) -> Streamer {
        let view = inner.read_view();
        let header = Header {
            log_len: view.index.starts.last().copied().unwrap_or(0),
            sidecar_len: view.index.count().saturating_mul(ENTRY_LEN),
        };
        Streamer {
            file: Arc::clone(&view.file),
            sidecar: Arc::clone(&view.sidecar),
            path: inner.path.clone(),
            header,
            offset: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    fn total_len(&self) -> u64 {
        self.header.total_len().unwrap_or(u64::MAX)
    }

    /// The next chunk, with the streamer to continue from.
    async fn next(mut self) -> Result<Option<(Bytes, Streamer)>, LogAppError> {
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

    /// Reads the next at most [`CHUNK_LEN`] bytes of the log or the sidecar.
    async fn read_chunk(&self) -> Result<Bytes, LogAppError> {
        let log_end = self.header.log_end();
        let (file, at, end) = if self.offset < log_end {
            (&self.file, self.offset - SNAPSHOT_HEADER_LEN, log_end)
        } else {
            (&self.sidecar, self.offset - log_end, self.header.body_end())
        };
        let len = usize::try_from(CHUNK_LEN.min(end - self.offset)).unwrap_or(0);
        let file = Arc::clone(file);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len];
            read_exact_at(&file, &mut buf, at)
                .map_err(io_err(&path, "read the files for a snapshot"))?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| LogAppError::Task {
            path: self.path.clone(),
            message: e.to_string(),
        })?
    }
}

/// `GET /_haven/snapshot`.
pub(crate) async fn snapshot(State(app): State<LogApp>, headers: HeaderMap) -> Response {
    if let Err(bad) = haven_index(&headers) {
        return bad.into_response();
    }
    let streamer = Streamer::new(&app.inner);
    let len = streamer.total_len();
    let stream = futures::stream::try_unfold(streamer, Streamer::next);
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `PUT /_haven/restore`.
pub(crate) async fn restore(State(app): State<LogApp>, headers: HeaderMap, body: Body) -> Response {
    let index = match haven_index(&headers) {
        Ok(Some(index)) => index,
        Ok(None) | Err(_) => return BadHavenIndex.into_response(),
    };
    match app.restore(index, body).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(RestoreError::Invalid(why)) => {
            warn!(haven_index = index, reason = %why, "rejected a snapshot");
            text(StatusCode::BAD_REQUEST, format!("invalid snapshot: {why}"))
        }
        Err(RestoreError::Body(e)) => text(
            StatusCode::BAD_REQUEST,
            format!("cannot read the snapshot body: {e}"),
        ),
        Err(RestoreError::App(e)) => internal_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_damage_is_named() {
        let header = Header {
            log_len: 10,
            sidecar_len: 16,
        };
        let bytes = header.encode();
        assert_eq!(bytes.len() as u64, SNAPSHOT_HEADER_LEN);
        assert_eq!(Header::decode(&bytes), Ok(header));
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert_eq!(Header::decode(&bad), Err(Invalid::BadMagic));
        let mut bad = bytes.clone();
        bad[8] = 2;
        assert_eq!(Header::decode(&bad), Err(Invalid::Version(2)));
        let mut bad = bytes.clone();
        bad[13] ^= 1;
        assert_eq!(Header::decode(&bad), Err(Invalid::HeaderChecksum));
        let odd = Header {
            log_len: 0,
            sidecar_len: 9,
        };
        assert_eq!(Header::decode(&odd.encode()), Err(Invalid::SidecarLen(9)));
        let huge = Header {
            log_len: u64::MAX - 8,
            sidecar_len: 8,
        };
        assert_eq!(Header::decode(&huge.encode()), Err(Invalid::Overflow));
    }

    #[test]
    fn content_checks_name_the_first_problem() {
        let header = Header {
            log_len: 4,
            sidecar_len: 16,
        };
        let mut content = Content::default();
        content.log(b"a\nb\n");
        content.sidecar(&5u64.to_le_bytes()[..3]);
        content.sidecar(&[&5u64.to_le_bytes()[3..], &0u64.to_le_bytes()[..]].concat());
        assert_eq!(content.finish(header, 5), Ok(()));
        assert_eq!(
            content.finish(header, 4),
            Err(Invalid::AheadOfRestore {
                recorded: 5,
                restore: 4
            })
        );
        content.sidecar(&3u64.to_le_bytes());
        assert_eq!(
            content.finish(header, 9),
            Err(Invalid::NotIncreasing {
                line: 2,
                index: 3,
                previous: 5
            })
        );
        let mut torn = Content::default();
        torn.log(b"a\nb");
        assert_eq!(torn.finish(header, 9), Err(Invalid::TornLine));
        let mut short = Content::default();
        short.log(b"a\n");
        assert_eq!(
            short.finish(header, 9),
            Err(Invalid::Mismatch {
                lines: 1,
                entries: 0
            })
        );
    }

    #[tokio::test]
    async fn a_restore_committed_before_a_crash_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log.txt");
        let sidecar = crate::sidecar_path(&file);
        fs::write(&file, b"old\n").unwrap();
        fs::write(&sidecar, 1u64.to_le_bytes()).unwrap();
        // A crash after the sidecar's rename, before the log's.
        fs::write(tmp_path(&file), b"new\nlines\n").unwrap();
        fs::write(&sidecar, [7u64.to_le_bytes(), 8u64.to_le_bytes()].concat()).unwrap();
        write_marker(&file).unwrap();
        let config = crate::LogAppConfig {
            file: file.clone(),
            prepopulate: 0,
        };
        let app = LogApp::open(&config).unwrap();
        assert_eq!(app.count(), 2);
        assert_eq!(app.last_haven_index(), Some(8));
        assert_eq!(fs::read(&file).unwrap(), b"new\nlines\n");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "temporary files and marker gone");
    }
}
