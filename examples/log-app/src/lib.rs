//! `haven-logapp`: the reference log application that Haven replicates in its
//! benchmark, and the worked example of how an HTTP app opts into
//! **exactly-once** application of Haven's ordered requests.
//!
//! The app keeps one text file. `POST /append` appends the request body as one
//! line, `GET /line/{n}` reads a line back, `GET /count` counts them. It uses no
//! clock and no randomness, so every replica that receives the same requests in
//! the same order holds byte-identical files and gives byte-identical answers.
//!
//! # Library API
//!
//! - [`serve`] opens (and, if needed, reconciles or pre-populates) the file named
//!   by [`LogAppConfig`], then serves HTTP on the given listener until the
//!   `shutdown` future completes. This is what `haven logapp --listen ADDR
//!   --file PATH [--prepopulate N]` runs.
//! - [`LogApp::open`] and [`router`] do the same in two steps, for callers that
//!   want to own the server (tests, embedding).
//! - [`LogAppError`] names the file in every message.
//!
//! # HTTP interface
//!
//! | Request | Success | Errors |
//! |---|---|---|
//! | `POST /append`, body = one line | `201 Created`, `Content-Type: text/plain`, `Location: /line/{n}`, body `n` (0-based line number, decimal, no newline) | `400` if the body contains `\n` or `\r`; `400` for a malformed `Haven-Index`; `409` for a replayed `Haven-Index` that appended nothing (see below); `413` above 2 MiB (axum's default body limit); `500` if the file cannot be written |
//! | `GET /line/{n}` | `200`, `Content-Type: application/octet-stream`, the line's bytes without the newline | `404 no line {n}`; `400` if `n` is not a decimal number |
//! | `GET /count` | `200`, `Content-Type: text/plain`, the number of lines (decimal) | `400` for a malformed `Haven-Index` |
//! | `GET /_haven/snapshot` | `200`, `Content-Type: application/octet-stream`, `Content-Length` set, streamed: the whole state (format below) | `400` for a malformed `Haven-Index` (the header is otherwise ignored) |
//! | `PUT /_haven/restore`, header `Haven-Index: N` required, body = a snapshot | `204 No Content`, no body; the files are now byte-identical to the snapshotted replica's | `400 invalid Haven-Index header: ...` (the usual body) if the header is missing or malformed; `400 invalid snapshot: {reason}` (below); `400 cannot read the snapshot body: {error}`; `500` if the files cannot be written or swapped |
//!
//! Any other path answers `404`, any other method on these paths `405` (axum's
//! defaults). An empty body appends an empty line. Every error body is a short
//! `text/plain` reason.
//!
//! # The `Haven-Index` contract (how an app opts into exactly-once)
//!
//! Haven orders state-changing requests through Raft and delivers each one to the
//! local replica with the header `Haven-Index: <u64>`, the request's log index
//! (at least 1). Indexes are strictly increasing from one delivery to the next,
//! **but** after Haven itself crashes it may deliver again a suffix of entries
//! that the app had already applied (Haven's record of "applied" lags the app's
//! by at most the requests in flight at the crash).
//!
//! An app that wants exactly-once application promises this: *a request whose
//! `Haven-Index` is at most the highest index the app has already applied is a
//! replay; the app changes nothing and returns the same response as the first
//! time.* To keep that promise an app must record, together with every change of
//! its state, the index of the request that made it, in a way that survives the
//! app's own crash at any point. Apps that ignore the header still work, but a
//! crash of Haven may then apply a few requests twice.
//!
//! The header must come from Haven only (a client-sent `Haven-Index` must be
//! dropped or replaced before it reaches the app, or a client could make the
//! app skip requests). Requests without the header (an operator appending by
//! hand, say) are applied normally and never deduplicated.
//!
//! ## How this app keeps the promise
//!
//! Next to the log file `{file}` the app keeps a *sidecar* `{file}.haven-index`
//! (see [`sidecar_path`]) holding one little-endian `u64` per line: the
//! `Haven-Index` of the request that appended that line, or `0` for a line
//! appended without the header (pre-populated lines included). The non-zero
//! entries are strictly increasing, so the highest one is the last applied index
//! that changed anything, and the line an index appended is found by binary
//! search.
//!
//! - **Append with `Haven-Index: i`**, `i` above every recorded index: a new
//!   request. The app writes the sidecar entry first, then the line (body +
//!   `\n`), each with one plain `write` (no `fsync`: the page cache survives a
//!   killed process), and answers `201` with the new line number.
//! - **Append with `Haven-Index: i`**, `i` at most the highest recorded index: a
//!   replay. Nothing is written. If a line recorded `i`, the answer is the
//!   original one: `201`, `Location: /line/{n}`, body `n`. If no line recorded
//!   `i`, the first delivery of `i` appended nothing; the only way a *valid*
//!   append can do that is a failed write (`500`, rolled back), or a sidecar
//!   that does not describe this file's history. Appending now would put the
//!   line after lines of later entries, diverging from the other replicas, so
//!   the app still changes nothing and answers `409 Conflict` with the body
//!   `Haven-Index {i} was already applied and appended no line; nothing was
//!   changed`. Every replica with the same history answers the same way, and a
//!   replica that really lost that line stands out in Haven's response digests
//!   instead of silently hiding it.
//! - **Requests that change nothing** (reads, and appends rejected with `400`)
//!   are not recorded: replaying them changes nothing anyway. Validation only
//!   looks at the request, so a replayed bad append gets the same `400`; and a
//!   read that carries `Haven-Index: i` (a read ordered through the log) is
//!   answered *as of index `i`*, over the lines appended up to and including
//!   entry `i` (plus lines appended without the header before the first later
//!   indexed line), so its replay gets the same answer too. Hence the highest
//!   index recorded in the sidecar is all the dedupe state this app needs; it
//!   does not persist a separate "highest index seen".
//! - `Haven-Index` must be one decimal number from 1 to 2^64-1; anything else
//!   (empty, signs, spaces, `0`, overflow, the header twice) is answered `400
//!   invalid Haven-Index header: expected one decimal log index from 1 to
//!   18446744073709551615` before anything else is looked at.
//!
//! ## Crash safety and reconciliation
//!
//! Appends are serialized (one writer); reads run concurrently and only see a
//! line once both its bytes and its sidecar entry are written. Because the
//! sidecar entry is written before the line, a process killed at any point leaves
//! at most one extra sidecar entry and/or a partial last line. At start-up the
//! app reconciles:
//!
//! 1. a trailing partial line (bytes after the last `\n`) is truncated away;
//! 2. a partial sidecar entry (length not a multiple of 8) is truncated away;
//! 3. sidecar entries beyond the number of lines are truncated away (the request
//!    was not applied; Haven will deliver it again and it is applied then);
//! 4. if the sidecar has fewer entries than lines (the file was written by
//!    something else, or the sidecar was deleted), it is padded with `0`s. Those
//!    lines can no longer be matched to an index, so delete the sidecar only
//!    knowingly;
//! 5. non-zero sidecar entries that are not strictly increasing make start-up
//!    fail ([`LogAppError::CorruptSidecar`]): no crash produces that.
//!
//! A failed write is rolled back (both files truncated to their previous
//! length); if even the rollback fails, the app refuses further appends with
//! `500` until it is restarted and reconciles. Without `fsync`, a power loss
//! (not a process kill) may lose recent lines or their sidecar entries; Haven's
//! checkpoints, not this app, cover that case.
//!
//! # Checkpoint hooks (how an app opts in)
//!
//! Haven checkpoints an app's state so that a replica can be rebuilt without
//! replaying the whole Raft log. An app takes part in one of two ways:
//!
//! - **Hooks.** The app serves two endpoints, and Haven calls nothing else:
//!   - `GET /_haven/snapshot` answers `200`, `application/octet-stream`, with
//!     the app's complete state in an app-defined, *self-validating* format (a
//!     magic and version, plus lengths and a checksum, so that a truncated or
//!     garbled copy is detected on restore). It reflects every request
//!     answered before the snapshot request, and is streamed: it may be
//!     gigabytes, so it is never built in memory whole.
//!   - `PUT /_haven/restore` with `Haven-Index: N` (the log index the state
//!     corresponds to; required) and a body some replica's snapshot endpoint
//!     returned. The app validates the body completely, then replaces its whole
//!     state (files and memory) so that it is byte-identical to the replica that
//!     produced it, and answers `204`. Invalid input gets `400` with an exact
//!     reason and changes nothing. While a restore runs, other requests wait or
//!     see the old state, never a half-restored one. If the app is killed at any
//!     point of a restore it must still start afterwards (with the old state,
//!     the new one, or any state it can open): Haven's own record then says the
//!     restore did not finish, and it restores again.
//! - **Managed.** Haven starts the app itself with a data directory (this app:
//!   `haven logapp --listen ADDR --file {data_dir}/log.txt`), pauses deliveries,
//!   copies the directory while the app is idle, and resumes. That copy is
//!   consistent only if the app has *written* (a `write` syscall; `fsync` is not
//!   needed) every change before answering the request that made it, and does
//!   not modify its files while idle, or only in ways that are safe to capture
//!   at any instant.
//!
//! ## This app's snapshot format (version 1)
//!
//! The `haven-snapshot-frame` crate's two-file frame (which also does the
//! streaming, the staging and the crash-safe swap described below), around
//! the log file and its sidecar. All integers are little-endian.
//!
//! | Bytes | Content |
//! |---|---|
//! | 8 | magic [`SNAPSHOT_MAGIC`], `HAVENLOG` |
//! | 4 | format version, `u32` [`SNAPSHOT_VERSION`] = 1 |
//! | 8 | `L`, the log file's length, `u64` |
//! | 8 | `S`, the sidecar's length, `u64` (a multiple of 8) |
//! | 4 | CRC-32 (IEEE) of the 28 bytes above, `u32` |
//! | `L` | the log file's bytes |
//! | `S` | the sidecar's bytes |
//! | 4 | CRC-32 (IEEE) of every byte above, `u32` |
//!
//! The snapshot handler notes `L` and `S` under the index lock, which holds
//! exactly the appends answered so far, then streams those byte ranges in
//! 256 KiB chunks from its own handles on the files, with `Content-Length`
//! set. Both files are append-only, so appends go on meanwhile without
//! touching those bytes (and a concurrent restore renames new files in rather
//! than overwriting these). A read error mid-way aborts the response, which
//! the client sees as a short body.
//!
//! ## Restore
//!
//! The body is streamed to `{file}.restore.tmp` and
//! `{file}.haven-index.restore.tmp` while it is checked; appends go on
//! meanwhile against the old state. Restores are serialized. It is answered
//! `400 invalid snapshot: {reason}`, the temporary files deleted and nothing
//! changed, with these reasons, the first that applies in stream order:
//!
//! - `bad magic` (also for a body too short to hold the magic that does not
//!   begin like it); `unsupported version {v}`; `header checksum mismatch`;
//!   `sidecar length {S} is not a multiple of 8`; `lengths overflow`;
//! - `trailing bytes after the checksum`; `truncated` (the body ended early);
//!   `checksum mismatch`;
//! - then, once the checksum matched, what start-up would otherwise have to
//!   repair: `the log does not end with a newline`; `the log has {n} lines but
//!   the sidecar {m} entries`; `sidecar entry {k} records Haven-Index {i}, not
//!   above {p}`; and `it records Haven-Index {i}, above the restore's
//!   Haven-Index {N}` (a snapshot cannot hold a request after its own index).
//!
//! A valid body is synced, then swapped in under the writer lock (appends
//! wait; reads see the old files until the new index replaces the old one in
//! one step):
//!
//! 1. the marker `{file}.restore.ready` is written atomically (as
//!    `{file}.restore.ready.tmp`, synced, renamed): the commit point;
//! 2. the log's and then the sidecar's temporary file are renamed into place,
//!    the directory synced, the marker removed;
//! 3. the files are reopened and the in-memory index rebuilt.
//!
//! Crash safety rests on the marker, not on the rename order or on the
//! reconciliation: at start-up, before anything else, a marker means the
//! temporary files are complete, so any that remain are renamed into place
//! (step 2 again; idempotent); no marker means the old files were never
//! touched, so temporary files are deleted. A killed restore thus leaves the
//! old state or the new one, never a mix. A failure after the commit (say, a
//! rename error) answers `500` and refuses appends and restores until a
//! restart finishes the restore. Likewise, while appends are refused after a
//! write error that could not be rolled back, restores answer `500` too: a
//! restart comes first.
//!
//! The restored files carry their own `Haven-Index` history, so the replay
//! rules above apply unchanged: an index the snapshot recorded is answered as
//! on the replica that produced it, `409` if it appended nothing. `N` itself
//! is not stored (storing it would make the files differ from the producer's):
//! indexes above the snapshot's last recorded one but at most `N` would be
//! taken as new, which is safe because Haven delivers only entries above `N`
//! after restoring at `N`.
//!
//! ## Managed mode
//!
//! This app also satisfies the managed-mode rules: an append writes its
//! sidecar entry and its line with plain `write`s before it answers, and the
//! app has no background work at all. It changes its files only inside
//! requests (appends, their rollback, restores) and at start-up
//! (reconciliation, pre-population, finishing a restore). A copy of an idle
//! app's directory therefore opens with exactly the answered state. (An
//! append whose client gave up still runs to completion; "idle" means no
//! request in flight.)
//!
//! ## Pre-population
//!
//! With [`LogAppConfig::prepopulate`] = `N` and a file that holds no line at
//! start, the app first writes `N` lines of exactly [`PREPOPULATE_LINE_LEN`]
//! bytes (plus `\n`): `line-{i:06}` right-padded with `.`, for `i` in `0..N`,
//! with sidecar entries `0`. The content is fixed, so every replica starts
//! identical. The lines are written to `{file}.prepopulate.tmp`, synced and
//! renamed over `{file}`, so a crash never leaves a half pre-populated file.
//! A file that already holds lines is never pre-populated again.

mod checkpoint;

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use haven_snapshot_frame::{IoError, open_append, read_exact_at, sync_parent_dir, text};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};

pub use checkpoint::{
    RESTORE_MARKER_SUFFIX, RESTORE_TMP_SUFFIX, SNAPSHOT_HEADER_LEN, SNAPSHOT_MAGIC,
    SNAPSHOT_VERSION,
};

/// Name of the header carrying the log index of a request delivered by Haven.
pub const HAVEN_INDEX_HEADER: &str = haven_contract::headers::INDEX;

/// Suffix appended to the log file's name to form the sidecar's name.
pub const SIDECAR_SUFFIX: &str = ".haven-index";

/// Length in bytes of every pre-populated line, newline excluded.
pub const PREPOPULATE_LINE_LEN: usize = 128;

/// Size of one sidecar entry (a little-endian `u64`).
const ENTRY_LEN: u64 = 8;

/// Body of the `400` answer to a malformed `Haven-Index` header.
const BAD_HAVEN_INDEX: &str =
    "invalid Haven-Index header: expected one decimal log index from 1 to 18446744073709551615";

/// What the log app serves and how it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogAppConfig {
    /// The log file; created if absent. Its sidecar is [`sidecar_path`]`(file)`.
    pub file: PathBuf,
    /// Number of fixed lines to write when the file holds no line at start
    /// (`0`: none). See the crate docs, "Pre-population".
    pub prepopulate: u64,
}

/// Errors of the log app. Every message names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum LogAppError {
    /// An I/O operation on the log file or its sidecar failed.
    #[error("{path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// The sidecar's non-zero indexes are not strictly increasing.
    #[error(
        "{path}: corrupt Haven-Index sidecar: line {line} records index {index}, \
         not above index {previous} recorded for an earlier line"
    )]
    CorruptSidecar {
        path: PathBuf,
        line: u64,
        index: u64,
        previous: u64,
    },
    /// An earlier write error could not be rolled back; appends are refused
    /// until a restart reconciles the files.
    #[error(
        "{path}: refusing to append after a write error that could not be rolled back; \
         restart the log app to reconcile the file"
    )]
    Failed { path: PathBuf },
    /// The HTTP server stopped with an error.
    #[error("{path}: log app HTTP server failed: {source}")]
    Serve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A background file task panicked or was cancelled.
    #[error("{path}: log app file task failed: {message}")]
    Task { path: PathBuf, message: String },
}

/// Path of the sidecar of `file`: the file's name with [`SIDECAR_SUFFIX`] appended.
pub fn sidecar_path(file: &Path) -> PathBuf {
    with_suffix(file, SIDECAR_SUFFIX)
}

fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(file.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> LogAppError + 'a {
    move |source| LogAppError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// The restore machinery's I/O errors name the file the same way.
impl From<IoError> for LogAppError {
    fn from(e: IoError) -> Self {
        io_err(&e.path, e.action)(e.source)
    }
}

/// Where lines are and which `Haven-Index` appended them (in memory).
#[derive(Debug)]
struct LineIndex {
    /// Byte offset of the start of each line, followed by the file length:
    /// line `n` spans `starts[n] .. starts[n + 1] - 1` (the newline excluded).
    starts: Vec<u64>,
    /// `(haven_index, line)` for every line appended with a `Haven-Index`,
    /// strictly increasing in both.
    indexed: Vec<(u64, u64)>,
}

impl LineIndex {
    fn count(&self) -> u64 {
        // `starts` always holds at least the file length.
        self.starts.len().saturating_sub(1) as u64
    }

    fn last_indexed(&self) -> Option<u64> {
        self.indexed.last().map(|&(index, _)| index)
    }

    /// Number of lines as of `Haven-Index` `at` (`None`: now): every line before
    /// the first line appended by a later index.
    fn count_at(&self, at: Option<u64>) -> u64 {
        match at {
            None => self.count(),
            Some(i) => {
                let p = self.indexed.partition_point(|&(index, _)| index <= i);
                self.indexed
                    .get(p)
                    .map_or_else(|| self.count(), |&(_, line)| line)
            }
        }
    }

    /// Line appended by `Haven-Index` `i`, if any.
    fn line_of(&self, i: u64) -> Option<u64> {
        self.indexed
            .binary_search_by_key(&i, |&(index, _)| index)
            .ok()
            .and_then(|p| self.indexed.get(p))
            .map(|&(_, line)| line)
    }

    /// Byte range of line `n` without its newline, if it is visible as of `at`.
    fn range(&self, n: u64, at: Option<u64>) -> Option<(u64, u64)> {
        if n >= self.count_at(at) {
            return None;
        }
        let n = usize::try_from(n).ok()?;
        let start = *self.starts.get(n)?;
        let next = *self.starts.get(n.checked_add(1)?)?;
        Some((start, next.checked_sub(1)?))
    }
}

/// The single writer's state, behind the append mutex.
#[derive(Debug)]
struct Writer {
    /// Set when a write error could not be rolled back.
    failed: bool,
}

/// The open files with their index: what a restore swaps as a whole, under
/// one lock, so that no reader ever pairs an old index with a new file.
#[derive(Debug)]
struct View {
    /// The log file, opened for reading and appending; shared by positional
    /// reads, snapshots and the (serialized) appends.
    file: Arc<File>,
    /// The sidecar, opened for reading and appending.
    sidecar: Arc<File>,
    index: LineIndex,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    sidecar_path: PathBuf,
    view: RwLock<View>,
    writer: Arc<Mutex<Writer>>,
    /// Serializes restores (they share their temporary file names).
    restoring: Arc<Mutex<()>>,
}

/// An open log file with its sidecar: the state behind the HTTP handlers.
///
/// Cheap to clone (all clones share the files).
#[derive(Debug, Clone)]
pub struct LogApp {
    inner: Arc<Inner>,
}

/// What `POST /append` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Append {
    /// A new line was appended.
    Appended(u64),
    /// A replayed `Haven-Index`: the line it appended the first time.
    Replayed(u64),
    /// A replayed `Haven-Index` that appended nothing the first time.
    ReplayedNothing(u64),
}

impl LogApp {
    /// Opens `config.file` (creating it if absent), reconciles it with its
    /// sidecar after a crash, and pre-populates it if asked and empty. See the
    /// crate docs. Blocking: call it from a blocking context
    /// (e.g. [`tokio::task::spawn_blocking`]).
    pub fn open(config: &LogAppConfig) -> Result<LogApp, LogAppError> {
        let path = config.file.clone();
        let sidecar_path = sidecar_path(&path);
        checkpoint::restore_files(&path, &sidecar_path).finish_or_discard()?;
        let mut opened = open_reconciled(&path, &sidecar_path)?;
        if opened.index.count() == 0 && config.prepopulate > 0 {
            drop(opened);
            prepopulate(&path, &sidecar_path, config.prepopulate)?;
            opened = open_reconciled(&path, &sidecar_path)?;
        } else if config.prepopulate > 0 {
            debug!(file = %path.display(), "file already holds lines; not pre-populating");
        }
        info!(
            file = %path.display(),
            lines = opened.index.count(),
            last_haven_index = opened.index.last_indexed().unwrap_or(0),
            "log app file open"
        );
        Ok(LogApp {
            inner: Arc::new(Inner {
                path,
                sidecar_path,
                view: RwLock::new(opened.into_view()),
                writer: Arc::new(Mutex::new(Writer { failed: false })),
                restoring: Arc::new(Mutex::new(())),
            }),
        })
    }

    /// The log file's path.
    pub fn file(&self) -> &Path {
        &self.inner.path
    }

    /// Number of lines in the file now.
    pub fn count(&self) -> u64 {
        self.inner.read_view().index.count()
    }

    /// Highest `Haven-Index` recorded in the sidecar (`None`: none recorded).
    pub fn last_haven_index(&self) -> Option<u64> {
        self.inner.read_view().index.last_indexed()
    }

    /// Waits until no append is in progress (appends run to completion even
    /// when their request is abandoned).
    async fn wait_idle(&self) {
        drop(self.inner.writer.lock().await);
    }

    async fn append(&self, haven_index: Option<u64>, body: Bytes) -> Result<Append, LogAppError> {
        let guard = Arc::clone(&self.inner.writer).lock_owned().await;
        let inner = Arc::clone(&self.inner);
        // The write runs to completion even if the request is dropped, so an
        // append is never half done by cancellation.
        tokio::task::spawn_blocking(move || {
            let mut guard = guard;
            inner.append(&mut guard, haven_index, &body)
        })
        .await
        .map_err(|e| LogAppError::Task {
            path: self.inner.path.clone(),
            message: e.to_string(),
        })?
    }

    async fn line(&self, n: u64, at: Option<u64>) -> Result<Option<Vec<u8>>, LogAppError> {
        let (file, range) = {
            let view = self.inner.read_view();
            (Arc::clone(&view.file), view.index.range(n, at))
        };
        let Some((start, end)) = range else {
            return Ok(None);
        };
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let len = usize::try_from(end - start).map_err(|_| LogAppError::Io {
                path: inner.path.clone(),
                action: "read a line",
                source: io::Error::new(io::ErrorKind::InvalidData, "line too long"),
            })?;
            let mut buf = vec![0; len];
            read_exact_at(&file, &mut buf, start).map_err(io_err(&inner.path, "read a line"))?;
            Ok(Some(buf))
        })
        .await
        .map_err(|e| LogAppError::Task {
            path: self.inner.path.clone(),
            message: e.to_string(),
        })?
    }
}

impl Inner {
    fn read_view(&self) -> RwLockReadGuard<'_, View> {
        self.view.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_view(&self) -> RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// One append, under the writer lock (blocking).
    fn append(
        &self,
        writer: &mut Writer,
        haven_index: Option<u64>,
        body: &[u8],
    ) -> Result<Append, LogAppError> {
        if writer.failed {
            return Err(LogAppError::Failed {
                path: self.path.clone(),
            });
        }
        // Only a restore swaps the files, and it holds the writer lock too.
        let (file, sidecar, line, start) = {
            let view = self.read_view();
            let index = &view.index;
            if let (Some(i), Some(last)) = (haven_index, index.last_indexed())
                && i <= last
            {
                return Ok(match index.line_of(i) {
                    Some(line) => Append::Replayed(line),
                    None => Append::ReplayedNothing(i),
                });
            }
            (
                Arc::clone(&view.file),
                Arc::clone(&view.sidecar),
                index.count(),
                index.starts.last().copied().unwrap_or(0),
            )
        };
        let sidecar_len = line * ENTRY_LEN;

        // Sidecar entry first: a crash before the line is written leaves an
        // extra entry, which start-up truncates.
        let entry = haven_index.unwrap_or(0).to_le_bytes();
        if let Err(e) = (&*sidecar).write_all(&entry) {
            self.roll_back(writer, (&file, None), (&sidecar, sidecar_len));
            return Err(LogAppError::Io {
                path: self.sidecar_path.clone(),
                action: "append to the Haven-Index sidecar",
                source: e,
            });
        }
        let mut record = Vec::with_capacity(body.len() + 1);
        record.extend_from_slice(body);
        record.push(b'\n');
        if let Err(e) = (&*file).write_all(&record) {
            self.roll_back(writer, (&file, Some(start)), (&sidecar, sidecar_len));
            return Err(LogAppError::Io {
                path: self.path.clone(),
                action: "append a line",
                source: e,
            });
        }

        let mut view = self.write_view();
        let index = &mut view.index;
        index.starts.push(start + record.len() as u64);
        if let Some(i) = haven_index {
            index.indexed.push((i, line));
        }
        Ok(Append::Appended(line))
    }

    /// Restores both files to their length before a failed append; marks the
    /// writer failed if that is impossible.
    fn roll_back(
        &self,
        writer: &mut Writer,
        (file, file_len): (&File, Option<u64>),
        (sidecar, sidecar_len): (&File, u64),
    ) {
        if let Some(len) = file_len
            && let Err(e) = file.set_len(len)
        {
            error!(file = %self.path.display(), error = %e, "cannot roll back a failed append");
            writer.failed = true;
        }
        if let Err(e) = sidecar.set_len(sidecar_len) {
            error!(
                file = %self.sidecar_path.display(),
                error = %e,
                "cannot roll back a failed append"
            );
            writer.failed = true;
        }
    }
}

/// Files opened and reconciled, with their in-memory index.
struct Opened {
    file: File,
    sidecar: File,
    index: LineIndex,
}

impl Opened {
    fn into_view(self) -> View {
        View {
            file: Arc::new(self.file),
            sidecar: Arc::new(self.sidecar),
            index: self.index,
        }
    }
}

/// Opens the log file and its sidecar and reconciles them (see the crate docs).
fn open_reconciled(path: &Path, sidecar_path: &Path) -> Result<Opened, LogAppError> {
    let file = open_append(path).map_err(io_err(path, "open the log file"))?;

    // Line starts, from one sequential scan.
    let mut starts = vec![0u64];
    let mut len = 0u64;
    {
        let mut reader = &file;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(path, "read the log file")(e)),
            };
            let chunk = &buf[..n];
            starts.extend(
                chunk
                    .iter()
                    .enumerate()
                    .filter(|&(_, &b)| b == b'\n')
                    .map(|(i, _)| len + i as u64 + 1),
            );
            len += n as u64;
        }
    }
    let complete = starts.last().copied().unwrap_or(0);
    if len > complete {
        warn!(
            file = %path.display(),
            bytes = len - complete,
            "truncating a partial last line left by a crash"
        );
        file.set_len(complete)
            .map_err(io_err(path, "truncate a partial last line"))?;
    }
    let lines = starts.len() as u64 - 1;

    let sidecar =
        open_append(sidecar_path).map_err(io_err(sidecar_path, "open the Haven-Index sidecar"))?;
    let sidecar_len = sidecar
        .metadata()
        .map_err(io_err(sidecar_path, "stat the Haven-Index sidecar"))?
        .len();
    let mut entries = sidecar_len / ENTRY_LEN;
    if sidecar_len % ENTRY_LEN != 0 {
        warn!(
            file = %sidecar_path.display(),
            bytes = sidecar_len % ENTRY_LEN,
            "truncating a partial sidecar entry left by a crash"
        );
        sidecar
            .set_len(entries * ENTRY_LEN)
            .map_err(io_err(sidecar_path, "truncate a partial sidecar entry"))?;
    }
    if entries > lines {
        warn!(
            file = %sidecar_path.display(),
            entries = entries - lines,
            "truncating sidecar entries of lines never written (crash between the two writes)"
        );
        sidecar
            .set_len(lines * ENTRY_LEN)
            .map_err(io_err(sidecar_path, "truncate extra sidecar entries"))?;
        entries = lines;
    }

    let mut indexed = Vec::new();
    {
        let mut reader = BufReader::with_capacity(256 * 1024, &sidecar);
        let mut previous = 0u64;
        let mut entry = [0u8; ENTRY_LEN as usize];
        for line in 0..entries {
            reader
                .read_exact(&mut entry)
                .map_err(io_err(sidecar_path, "read the Haven-Index sidecar"))?;
            let index = u64::from_le_bytes(entry);
            if index == 0 {
                continue;
            }
            if index <= previous {
                return Err(LogAppError::CorruptSidecar {
                    path: sidecar_path.to_path_buf(),
                    line,
                    index,
                    previous,
                });
            }
            previous = index;
            indexed.push((index, line));
        }
    }

    if entries < lines {
        warn!(
            file = %sidecar_path.display(),
            entries = lines - entries,
            "sidecar has fewer entries than the file has lines; padding with 0 (no Haven-Index)"
        );
        // Extending with `set_len` fills with zeros.
        sidecar
            .set_len(lines * ENTRY_LEN)
            .map_err(io_err(sidecar_path, "pad the Haven-Index sidecar"))?;
    }

    Ok(Opened {
        file,
        sidecar,
        index: LineIndex { starts, indexed },
    })
}

/// The content of pre-populated line `i` (without the newline).
fn prepopulated_line(i: u64) -> Vec<u8> {
    let mut line = format!("line-{i:06}").into_bytes();
    line.resize(PREPOPULATE_LINE_LEN, b'.');
    line
}

/// Writes `n` fixed lines over a file holding none (see the crate docs).
fn prepopulate(path: &Path, sidecar_path: &Path, n: u64) -> Result<(), LogAppError> {
    info!(file = %path.display(), lines = n, "pre-populating the log file");
    // Sidecar first (all zeros): if we crash before the rename, start-up sees
    // more entries than lines and truncates them.
    let sidecar = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(sidecar_path)
        .map_err(io_err(sidecar_path, "open the Haven-Index sidecar"))?;
    let sidecar_len = n.checked_mul(ENTRY_LEN).ok_or_else(|| LogAppError::Io {
        path: sidecar_path.to_path_buf(),
        action: "size the Haven-Index sidecar",
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many lines to pre-populate",
        ),
    })?;
    sidecar
        .set_len(sidecar_len)
        .map_err(io_err(sidecar_path, "size the Haven-Index sidecar"))?;
    drop(sidecar);

    let tmp = with_suffix(path, ".prepopulate.tmp");
    let tmp_file = File::create(&tmp).map_err(io_err(&tmp, "create the pre-population file"))?;
    let mut out = BufWriter::with_capacity(256 * 1024, tmp_file);
    for i in 0..n {
        let mut line = prepopulated_line(i);
        line.push(b'\n');
        out.write_all(&line)
            .map_err(io_err(&tmp, "write the pre-population file"))?;
    }
    let tmp_file = out
        .into_inner()
        .map_err(|e| io_err(&tmp, "write the pre-population file")(e.into_error()))?;
    tmp_file
        .sync_all()
        .map_err(io_err(&tmp, "sync the pre-population file"))?;
    drop(tmp_file);
    fs::rename(&tmp, path).map_err(io_err(path, "rename the pre-population file over"))?;
    sync_parent_dir(path);
    Ok(())
}

/// Serves the log app on `listener` until `shutdown` completes.
///
/// Opens the file first ([`LogApp::open`]), so a file that cannot be opened or
/// reconciled fails before anything is served. On shutdown, in-flight requests
/// are finished (axum's graceful shutdown) and any append still running is
/// waited for before returning.
pub async fn serve(
    listener: TcpListener,
    config: LogAppConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), LogAppError> {
    let path = config.file.clone();
    let app = tokio::task::spawn_blocking(move || LogApp::open(&config))
        .await
        .map_err(|e| LogAppError::Task {
            path: path.clone(),
            message: e.to_string(),
        })??;
    match listener.local_addr() {
        Ok(addr) => info!(%addr, file = %path.display(), "log app listening"),
        Err(e) => warn!(error = %e, "log app listening on an unknown address"),
    }
    let result = axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    app.wait_idle().await;
    info!(file = %path.display(), "log app stopped");
    result.map_err(|source| LogAppError::Serve { path, source })
}

/// The log app's routes (`POST /append`, `GET /line/{n}`, `GET /count`, and
/// the checkpoint hooks `GET /_haven/snapshot`, `PUT /_haven/restore`) over `app`.
pub fn router(app: LogApp) -> Router {
    Router::new()
        .route("/append", post(append))
        .route("/line/{n}", get(line))
        .route("/count", get(count))
        .route(haven_contract::paths::SNAPSHOT, get(checkpoint::snapshot))
        .route(haven_contract::paths::RESTORE, put(checkpoint::restore))
        .with_state(app)
}

fn internal_error(e: &LogAppError) -> Response {
    error!(error = %e, "log app request failed");
    text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// A malformed `Haven-Index` header; answered `400` with [`BAD_HAVEN_INDEX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BadHavenIndex;

impl IntoResponse for BadHavenIndex {
    fn into_response(self) -> Response {
        text(StatusCode::BAD_REQUEST, BAD_HAVEN_INDEX.to_owned())
    }
}

/// Parses the `Haven-Index` header: `Ok(None)` if absent.
fn haven_index(headers: &HeaderMap) -> Result<Option<u64>, BadHavenIndex> {
    let mut values = headers.get_all(HAVEN_INDEX_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BadHavenIndex);
    }
    let digits = value.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(BadHavenIndex);
    }
    match std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(i) if i > 0 => Ok(Some(i)),
        _ => Err(BadHavenIndex),
    }
}

async fn append(State(app): State<LogApp>, headers: HeaderMap, body: Bytes) -> Response {
    let haven_index = match haven_index(&headers) {
        Ok(i) => i,
        Err(bad) => return bad.into_response(),
    };
    if body.iter().any(|&b| b == b'\n' || b == b'\r') {
        return text(
            StatusCode::BAD_REQUEST,
            "a line must not contain \\n or \\r".to_owned(),
        );
    }
    match app.append(haven_index, body).await {
        Ok(Append::Appended(n)) => {
            debug!(line = n, haven_index, "appended");
            created(n)
        }
        Ok(Append::Replayed(n)) => {
            info!(line = n, haven_index, "replayed append; nothing changed");
            created(n)
        }
        Ok(Append::ReplayedNothing(i)) => {
            warn!(
                haven_index = i,
                "replayed Haven-Index appended no line; nothing changed"
            );
            text(
                StatusCode::CONFLICT,
                format!(
                    "Haven-Index {i} was already applied and appended no line; nothing was changed"
                ),
            )
        }
        Err(e) => internal_error(&e),
    }
}

fn created(n: u64) -> Response {
    let mut response = text(StatusCode::CREATED, n.to_string());
    match HeaderValue::try_from(format!("/line/{n}")) {
        Ok(location) => {
            response.headers_mut().insert(header::LOCATION, location);
        }
        Err(e) => error!(error = %e, "cannot build a Location header"),
    }
    response
}

async fn line(
    State(app): State<LogApp>,
    UrlPath(raw): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let at = match haven_index(&headers) {
        Ok(i) => i,
        Err(bad) => return bad.into_response(),
    };
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return text(
            StatusCode::BAD_REQUEST,
            format!("line number must be a decimal integer, got {raw:?}"),
        );
    }
    // All digits but above u64::MAX: a number, just not a line.
    let Ok(n) = raw.parse::<u64>() else {
        return text(StatusCode::NOT_FOUND, format!("no line {raw}"));
    };
    match app.line(n, at).await {
        Ok(Some(bytes)) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )],
            bytes,
        )
            .into_response(),
        Ok(None) => text(StatusCode::NOT_FOUND, format!("no line {n}")),
        Err(e) => internal_error(&e),
    }
}

async fn count(State(app): State<LogApp>, headers: HeaderMap) -> Response {
    match haven_index(&headers) {
        Ok(at) => text(
            StatusCode::OK,
            app.inner.read_view().index.count_at(at).to_string(),
        ),
        Err(bad) => bad.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(lines: &[u64]) -> LineIndex {
        // Every line 2 bytes long; `lines` gives each line's Haven-Index.
        LineIndex {
            starts: (0..=lines.len() as u64).map(|i| i * 2).collect(),
            indexed: lines
                .iter()
                .enumerate()
                .filter(|&(_, &i)| i != 0)
                .map(|(line, &i)| (i, line as u64))
                .collect(),
        }
    }

    #[test]
    fn count_at_and_line_of_handle_unindexed_lines() {
        let idx = index(&[0, 0, 5, 0, 7, 9, 0]);
        assert_eq!(idx.count(), 7);
        assert_eq!(idx.count_at(None), 7);
        assert_eq!(idx.count_at(Some(1)), 2);
        assert_eq!(idx.count_at(Some(5)), 4);
        assert_eq!(idx.count_at(Some(6)), 4);
        assert_eq!(idx.count_at(Some(7)), 5);
        assert_eq!(idx.count_at(Some(9)), 7);
        assert_eq!(idx.count_at(Some(100)), 7);
        assert_eq!(idx.line_of(5), Some(2));
        assert_eq!(idx.line_of(7), Some(4));
        assert_eq!(idx.line_of(9), Some(5));
        assert_eq!(idx.line_of(6), None);
        assert_eq!(idx.line_of(0), None);
        assert_eq!(idx.last_indexed(), Some(9));
        assert_eq!(idx.range(3, None), Some((6, 7)));
        assert_eq!(idx.range(4, Some(6)), None);
        assert_eq!(idx.range(7, None), None);
        assert_eq!(idx.range(u64::MAX, None), None);
    }

    #[test]
    fn haven_index_parsing_is_strict() {
        let parse = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(HAVEN_INDEX_HEADER, HeaderValue::from_str(v).unwrap());
            }
            haven_index(&headers).map_err(|_| StatusCode::BAD_REQUEST)
        };
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["1"]), Ok(Some(1)));
        assert_eq!(parse(&["18446744073709551615"]), Ok(Some(u64::MAX)));
        for bad in ["", "0", "+1", "-1", "1 2", "x", "18446744073709551616"] {
            assert_eq!(parse(&[bad]), Err(StatusCode::BAD_REQUEST), "{bad:?}");
        }
        assert_eq!(parse(&["1", "2"]), Err(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn prepopulated_lines_are_fixed() {
        let line = prepopulated_line(42);
        assert_eq!(line.len(), PREPOPULATE_LINE_LEN);
        assert!(line.starts_with(b"line-000042...."));
        assert!(line[11..].iter().all(|&b| b == b'.'));
    }

    #[tokio::test]
    async fn a_write_error_that_cannot_be_rolled_back_stops_appends() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log.txt");
        let config = LogAppConfig {
            file: file.clone(),
            prepopulate: 0,
        };
        let app = LogApp::open(&config).unwrap();
        assert_eq!(
            app.append(Some(1), Bytes::from_static(b"one"))
                .await
                .unwrap(),
            Append::Appended(0)
        );
        // A read-only sidecar handle: the entry write fails, and so does the
        // rollback (`set_len` needs write access).
        app.inner.write_view().sidecar = Arc::new(File::open(sidecar_path(&file)).unwrap());
        let err = app
            .append(Some(2), Bytes::from_static(b"two"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LogAppError::Io { path, .. } if *path == sidecar_path(&file)),
            "{err:?}"
        );
        let err = app
            .append(Some(3), Bytes::from_static(b"three"))
            .await
            .unwrap_err();
        assert!(matches!(err, LogAppError::Failed { .. }), "{err:?}");
        assert_eq!(app.count(), 1);
        assert_eq!(app.last_haven_index(), Some(1));
        assert_eq!(std::fs::read(&file).unwrap(), b"one\n");
        // A restart reconciles and appends again.
        drop(app);
        let app = LogApp::open(&config).unwrap();
        assert_eq!(
            app.append(Some(2), Bytes::from_static(b"two"))
                .await
                .unwrap(),
            Append::Appended(1)
        );
    }

    #[test]
    fn sidecar_path_appends_suffix() {
        assert_eq!(
            sidecar_path(Path::new("/data/log.txt")),
            PathBuf::from("/data/log.txt.haven-index")
        );
    }
}
