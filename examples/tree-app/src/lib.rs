//! `haven-treeapp`: a ZooKeeper-style hierarchical namespace over HTTP. Replicated
//! by Haven it becomes a small coordination service; its pure model ([`tree`])
//! is also the register model a linearizability checker replays.
//!
//! Nodes are named by absolute paths (`/a/b/c`) and hold up to 1 MiB of data
//! and a version (`0` at creation, one more on every set). The app uses no clock
//! and no randomness and iterates in sorted order, so every replica that
//! receives the same requests in the same order holds the same tree and gives
//! byte-identical answers; `GET /digest` checks that cheaply.
//!
//! # Library API
//!
//! - [`serve`] opens (and, after a crash, recovers) the data directory named by
//!   [`TreeAppConfig`], then serves HTTP on the given listener until the
//!   `shutdown` future completes.
//! - [`TreeApp::open`] and [`router`] do the same in two steps, for callers that
//!   want to own the server (tests, embedding).
//! - [`tree::Tree`] is the in-memory model alone, with
//!   `create`/`get`/`set`/`delete`/`children` (and [`tree::Tree::apply`] for an
//!   [`tree::Op`]), for test harnesses that need a reference model.
//! - [`TreeAppError`] names the file concerned in every message.
//!
//! # HTTP interface
//!
//! A node's URL is `/tree` followed by its path: `/tree/` is the root, `/tree/a/b`
//! is `/a/b` (percent-escapes are decoded first). Likewise `/children/a/b`.
//!
//! | Request | Success | Errors (status and exact `text/plain` body) |
//! |---|---|---|
//! | `PUT /tree/{path}`, body = data: create | `201`, `application/json` `{"path":"/a/b","version":0}` | `409 node exists: /a/b`; `404 no node: /a` (the parent); `400 cannot create /: the root always exists` |
//! | `GET /tree/{path}`: get data | `200`, `application/octet-stream`, the data, header `Tree-Version: {version}` | `404 no node: /a/b` |
//! | `POST /tree/{path}`, body = data, optional `If-Version: N`: set data (a compare-and-set with `If-Version`) | `200`, `application/json` `{"path":"/a/b","version":N}` (the new version) | `404 no node: /a/b`; `409 bad version: /a/b has version 3, expected 2`; `409 version overflow: /a/b cannot be set again`; `400` for a malformed `If-Version` |
//! | `DELETE /tree/{path}`, optional `If-Version: N` | `204`, no body | `404 no node: /a/b`; `409 bad version: ...` (checked first); `409 not empty: /a/b`; `400 cannot delete /: the root always exists`; `400` for a malformed `If-Version` |
//! | `GET /children/{path}` | `200`, `application/json`, the child names sorted: `["b","c"]` | `404 no node: /a/b` |
//! | `POST /sync` | `200`, `text/plain`, the number of successful creates, sets and deletes so far (decimal) | |
//! | `GET /digest` | `200`, `text/plain`, 16 lowercase hex digits: FNV-1a 64 of the `/dump` body | |
//! | `GET /dump` | `200`, `application/json`, the canonical serialization (below) | |
//! | `GET /_haven/snapshot` | `200`, `application/octet-stream`, `Content-Length` set, streamed: the data directory's files (format below) | `500` if they cannot be opened; a read error mid-way cuts the body short |
//! | `PUT /_haven/restore`, header `Haven-Index: N` required, body = a snapshot | `204`, no body; the data directory is now byte-identical to the snapshotted replica's | `400 invalid Haven-Index header: ...` (the usual body) if the header is missing or malformed; `400 invalid snapshot: {reason}` (below); `400 cannot read the snapshot body: {error}`; `500` with the [`TreeAppError`] message if the files cannot be written or swapped |
//!
//! Errors every route may give:
//!
//! - `400 bad path: {why}` for a path that is not a node path: components must
//!   be non-empty, not `.` or `..`, printable ASCII (space to `~`), at most 255
//!   bytes each and 1024 in all. For example `bad path: empty component in
//!   "/a//b"` (a trailing `/` is an empty component too), `bad path: component
//!   ".." in "/a/.."`, `bad path: character '\t' in "/a\tb" is not printable
//!   ASCII`, `bad path: component of 256 bytes, at most 255`, `bad path: 1025
//!   bytes long, at most 1024`; a percent-escape that does not decode to UTF-8
//!   gives `bad path: ` followed by axum's reason.
//! - `400 invalid Haven-Index header: expected one decimal log index from 1 to
//!   18446744073709551615` (checked before anything else, on reads too), then
//!   `400 invalid If-Version header: expected one decimal version from 0 to
//!   18446744073709551615` (`If-Version` is ignored where the table does not
//!   mention it).
//! - `413 data too large: {n} bytes, at most 1048576`; bodies beyond 1 MiB plus
//!   4 KiB are cut off earlier with axum's own `413`.
//! - `409` for a replayed `Haven-Index` that cannot be answered (see below);
//!   `500` with the [`TreeAppError`] message if the journal cannot be written.
//!
//! The data checks come in a fixed order (path, root rules, data size, then the
//! tree), so a request wrong in two ways gets the same error on every replica.
//! Other paths answer `404`, other methods `405` (axum's defaults).
//!
//! `POST /sync` is ZooKeeper's `sync`: through Haven it is ordered like a write
//! but changes nothing, so a read that follows it on the same node sees
//! everything ordered before it.
//!
//! `GET /dump` is compact JSON, `{"haven_index":H,"mutations":M,"nodes":[...]}`,
//! `H` the `Haven-Index` high-water mark (`0`: none), `M` the `/sync` count, and
//! one `{"path":P,"version":V,"data":D}` per node in byte order of paths (root
//! first), `D` the data in lowercase hex. It is byte-for-byte the same on
//! replicas with the same history, and `/digest` is its hash.
//!
//! # The `Haven-Index` contract (how an app opts into exactly-once)
//!
//! Haven orders state-changing requests through Raft and delivers each one to the
//! local replica with the header `Haven-Index: <u64>`, the request's log index
//! (at least 1). Indexes are strictly increasing from one delivery to the next,
//! **but** after Haven itself crashes it may deliver again a suffix of entries
//! that the app had already applied.
//!
//! An app that wants exactly-once application promises this: *a request whose
//! `Haven-Index` is at most the highest index the app has already applied is a
//! replay; the app changes nothing and returns the same response as the first
//! time.* The header must come from Haven only, and requests without it are
//! applied normally and never deduplicated. (The `haven-logapp` crate explains
//! the contract at length.)
//!
//! ## How this app keeps the promise
//!
//! The app keeps the high-water mark (the highest `Haven-Index` applied) and,
//! for each of the last [`REPLAY_WINDOW`] (4096) indexed state-changing
//! requests, its outcome: the status and body it was answered with, rebuilt
//! from a small record (created `/a/b`; set to version 4; deleted; synced at
//! 17; or the error). Both are journaled with the request, before the answer.
//!
//! - **A new index** (above the high-water mark) is applied and journaled
//!   whatever its outcome: a create that fails with `404` is journaled as
//!   "index `i` failed with `no node: /a`". This is the subtle part: had the
//!   failure left no trace, a replay of `i` after a later create of `/a` would
//!   succeed and change the tree.
//! - **A replay** within the window changes nothing and gets the first
//!   answer again, success or error, even after a restart. A replay older than
//!   the window gets `409 Haven-Index {i} is older than the replay window`. An
//!   index at most the high-water mark that was never applied here (which the
//!   contract rules out) gets `409 Haven-Index {i} is not above the applied
//!   high-water mark {h} but was never applied here; nothing was changed`.
//! - Requests refused before they reach the tree (a malformed header, an
//!   undecodable path, a body over the size limit) are not recorded: the answer
//!   depends on the request alone, so a replay gets the same one.
//! - Reads ignore the header once it is validated: they answer from the
//!   current tree. `POST /sync` with the header is recorded like any write.
//! - The high-water mark is part of `/dump` and so of `/digest`.
//!
//! # Persistence
//!
//! The data directory ([`TreeAppConfig::dir`], created if absent) holds:
//!
//! - `journal`: one record per request that changed the tree, and one per
//!   request that carried a `Haven-Index` (whatever its outcome), in order. A
//!   record is framed (length, CRC-32, [`postcard`] payload) and holds a
//!   sequence number, the `Haven-Index` (`0`: none), and either the op (for a
//!   success) or the error (for a failure). Failures without a `Haven-Index`
//!   change nothing and are not journaled.
//! - `tree.snapshot`: the whole state (tree, high-water mark, replay window) as
//!   of a sequence number, once the journal has grown past 64 MiB and past the
//!   last snapshot's size. It is written to `tree.snapshot.tmp`, synced and
//!   renamed into place; then the journal is replaced by an empty one (created
//!   as `journal.tmp` and renamed over it, so that a checkpoint streaming the
//!   old journal keeps its bytes). A crash between the two leaves journal
//!   records the snapshot holds, which start-up skips by sequence number.
//!
//! A request is checked against the tree, journaled with one plain `write` (no
//! `fsync`: the page cache survives a killed process), then applied in memory
//! and answered; requests are serialized, reads run concurrently. A process
//! killed at any point leaves at most a torn last record: start-up loads the
//! snapshot, replays the journal through the model, and truncates a torn last
//! record (short, or a bad checksum right at the end) with a warning. Damage
//! anywhere else, or a record that no longer applies, makes start-up fail with
//! [`TreeAppError::Corrupt`] naming the file and byte offset. A failed journal
//! write changes nothing and answers `500`; if it cannot even be rolled back,
//! every later write answers `500` until a restart recovers. A power loss (not a
//! process kill) may lose recent records; Haven's checkpoints, not this app,
//! cover that case.
//!
//! # Checkpoint hooks
//!
//! The app serves Haven's two checkpoint hooks, `GET /_haven/snapshot` and
//! `PUT /_haven/restore`; the `haven-logapp` crate docs ("Checkpoint hooks")
//! explain how an app opts in, by hooks or by managed mode, and what each
//! requires.
//!
//! ## Snapshot format (version 1)
//!
//! The data directory's two files in the `haven-snapshot-frame` crate's
//! two-file frame (which also does the streaming, the staging and the
//! crash-safe swap described below, `tree.snapshot` being its optional
//! file). All integers are little-endian.
//!
//! | Bytes | Content |
//! |---|---|
//! | 8 | magic [`SNAPSHOT_MAGIC`], `HAVENTRE` |
//! | 4 | format version, `u32` [`SNAPSHOT_VERSION`] = 1 |
//! | 8 | `S`, the length of `tree.snapshot`, `u64`; `0` when there is none (an empty one is never valid) |
//! | 8 | `J`, the journal's length, `u64` |
//! | 4 | CRC-32 (IEEE) of the 28 bytes above, `u32` |
//! | `S` | `tree.snapshot`'s bytes |
//! | `J` | the journal's bytes |
//! | 4 | CRC-32 (IEEE) of every byte above, `u32` |
//!
//! The handler takes the writer lock just long enough to open its own handles
//! on both files and note their lengths, which then hold exactly the writes
//! answered so far; it streams those bytes in 256 KiB chunks after releasing
//! the lock. Writes go on meanwhile: they only append to the journal, and a
//! compaction or a restore renames new files in, leaving the streamed ones
//! intact.
//!
//! ## Restore
//!
//! The body is streamed into `tree.snapshot.restore.tmp` (only if `S > 0`) and
//! `journal.restore.tmp` in the data directory while its framing and checksum
//! are checked; writes go on meanwhile against the old state, and restores are
//! serialized. The staged files are then synced and loaded exactly as start-up
//! would load the real ones, into a separate in-memory state. It is answered
//! `400 invalid snapshot: {reason}`, the temporary files deleted and nothing
//! changed, with these reasons, the first that applies in stream order:
//!
//! - `bad magic` (also for a body too short to hold the magic that does not
//!   begin like it); `unsupported version {v}`; `header checksum mismatch`;
//!   `lengths overflow`;
//! - `trailing bytes after the checksum`; `truncated` (the body ended early);
//!   `checksum mismatch`;
//! - then what start-up would refuse or repair: `{file} at byte offset {o}:
//!   {reason}` with `{file}` `tree.snapshot` or `journal` and start-up's
//!   reason (for example `journal at byte offset 93: bad checksum`); `the
//!   journal ends with a torn record`; and `it records Haven-Index {h}, above
//!   the restore's Haven-Index {N}` (a snapshot cannot hold a request after its
//!   own index).
//!
//! A valid body is swapped in under the writer lock (writes wait; reads see
//! the old state until the new one replaces it in one step):
//!
//! 1. [`RESTORE_MARKER_FILE`] (`restore.ready`) is written atomically (as
//!    `restore.ready.tmp`, synced, renamed): the commit point. It holds `1` if
//!    the restored state has a `tree.snapshot`, `0` if not;
//! 2. `tree.snapshot.restore.tmp` is renamed over `tree.snapshot` (or, for
//!    `0`, `tree.snapshot` is deleted), `journal.restore.tmp` over `journal`,
//!    the directory synced, the marker removed;
//! 3. the loaded state and the journal handle (opened on the staged file,
//!    which the rename keeps) replace the old ones.
//!
//! At start-up, before anything is loaded, a marker means the staged files
//! are complete, so step 2 is done again (it is idempotent); no marker means
//! the old files were never touched, so staged files are deleted. A restore
//! killed at any point thus leaves the old state or the new one, never a mix.
//! A failure after the commit answers `500` and refuses writes and restores
//! until a restart finishes the restore. Likewise, while writes are refused
//! after a journal error that could not be rolled back, restores answer `500`
//! too: a restart comes first.
//!
//! The restored files carry the high-water mark and the replay window of the
//! replica that produced them, so replays of the indexes it applied are
//! answered as it answered them. `N` itself is not stored (that would make the
//! state differ from the producer's); Haven delivers only entries above `N`
//! after restoring at `N`.
//!
//! ## Managed mode
//!
//! The app satisfies the managed-mode rules (`haven treeapp --listen ADDR
//! --dir {data_dir}`): a request's journal record is written with a plain
//! `write` before it is answered, and nothing runs between requests. The only
//! rewrite of the data directory, compaction into `tree.snapshot`, runs inside
//! the write request that crosses the threshold, before that request is
//! answered; start-up's truncation of a torn record and its finishing of a
//! restore run before anything is served. A copy of an idle app's directory
//! therefore opens with exactly the answered state. (A write whose client gave
//! up still runs to completion; "idle" means no request in flight.)

mod checkpoint;
mod http;
mod state;
mod store;
pub mod tree;

use std::borrow::Cow;
use std::fs::{self, File};
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use haven_snapshot_frame::{IoError, open_append};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tracing::{error, info, warn};

pub use checkpoint::{
    JOURNAL_RESTORE_FILE, RESTORE_MARKER_FILE, SNAPSHOT_HEADER_LEN, SNAPSHOT_MAGIC,
    SNAPSHOT_RESTORE_FILE, SNAPSHOT_VERSION,
};
pub use http::{HAVEN_INDEX_HEADER, IF_VERSION_HEADER, TREE_VERSION_HEADER, router};
pub use state::REPLAY_WINDOW;
pub use store::{JOURNAL_FILE, SNAPSHOT_FILE};

use state::{Executed, State};
use store::{Entry, Record, Snapshot};
use tree::Op;

/// The journal is compacted into a snapshot once it is at least this long and
/// at least as long as the last snapshot (so snapshots of a large tree are not
/// rewritten too often).
pub const COMPACT_AFTER_BYTES: u64 = 64 << 20;

/// What the tree app serves and how it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeAppConfig {
    /// The data directory, holding [`JOURNAL_FILE`] and [`SNAPSHOT_FILE`];
    /// created if absent.
    pub dir: PathBuf,
}

/// Errors of the tree app. Every message names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TreeAppError {
    /// An I/O operation on a file of the data directory failed.
    #[error("{path}: cannot {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// The journal or snapshot holds something no crash leaves behind.
    #[error("{path}: corrupt at byte offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// An earlier journal write error could not be rolled back; writes are
    /// refused until a restart recovers from the journal.
    #[error(
        "{path}: refusing to write after a journal error that could not be rolled back; \
         restart the tree app to recover"
    )]
    Failed { path: PathBuf },
    /// The HTTP server stopped with an error.
    #[error("{path}: tree app HTTP server failed: {source}")]
    Serve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A background file task panicked or was cancelled.
    #[error("{path}: tree app file task failed: {message}")]
    Task { path: PathBuf, message: String },
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> TreeAppError + 'a {
    move |source| TreeAppError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn task_err(path: &Path) -> impl FnOnce(tokio::task::JoinError) -> TreeAppError + '_ {
    move |e| TreeAppError::Task {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The restore machinery's I/O errors name the file the same way.
impl From<IoError> for TreeAppError {
    fn from(e: IoError) -> Self {
        io_err(&e.path, e.action)(e.source)
    }
}

/// The single writer's state, behind the write mutex.
#[derive(Debug)]
struct Writer {
    /// Opened for appending.
    journal: File,
    /// Length of the intact journal.
    len: u64,
    /// `seq` of the next record.
    next_seq: u64,
    /// Journal length that triggers a snapshot.
    compact_after: u64,
    /// Set when a journal write error could not be rolled back.
    failed: bool,
}

/// An open data directory: the state behind the HTTP handlers.
#[derive(Debug)]
pub struct TreeApp {
    dir: PathBuf,
    journal_path: PathBuf,
    state: RwLock<State>,
    writer: Arc<Mutex<Writer>>,
    /// Serializes restores (they share their temporary file names).
    restoring: Arc<Mutex<()>>,
}

/// A state rebuilt from a snapshot file and a journal, with the journal open
/// for appending: what [`TreeApp::open`] starts from and a restore swaps in.
#[derive(Debug)]
struct Loaded {
    state: State,
    journal: File,
    /// Length of the intact journal.
    len: u64,
    next_seq: u64,
    snapshot_len: u64,
    upgrade: Upgrade,
}

impl Loaded {
    fn into_writer(self) -> (State, Writer) {
        let writer = Writer {
            journal: self.journal,
            len: self.len,
            next_seq: self.next_seq,
            compact_after: compact_threshold(self.snapshot_len),
            failed: false,
        };
        (self.state, writer)
    }
}

/// Rebuilds the state from `snapshot_path` (absent: empty) and `journal_path`
/// (created if absent), truncating a torn last record. Files in the layout of
/// an older version are rewritten in the current one before anything is
/// appended ([`store`]).
fn load(snapshot_path: &Path, journal_path: &Path) -> Result<Loaded, TreeAppError> {
    let (mut state, first_seq, snapshot_len, legacy_snapshot) =
        match store::read_snapshot(snapshot_path)? {
            Some(read) => (
                read.snapshot.state.into_owned(),
                read.snapshot.next_seq,
                read.len,
                read.legacy,
            ),
            None => (State::default(), 0, 0, false),
        };
    let journal = open_append(journal_path).map_err(io_err(journal_path, "open the journal"))?;
    let mut next_seq = first_seq;
    let (len, version) = store::replay_journal(journal_path, &journal, |record| {
        if record.seq < first_seq {
            // Already in the snapshot: a crash came before the journal was emptied.
            return Ok(());
        }
        if record.seq != next_seq {
            return Err(format!(
                "sequence number {} where {next_seq} was expected",
                record.seq
            ));
        }
        state.replay_record(record)?;
        next_seq += 1;
        Ok(())
    })?;
    let upgrade = if legacy_snapshot || version == store::JournalVersion::Legacy {
        Upgrade::Rewrite
    } else if len == 0 {
        Upgrade::Magic
    } else {
        Upgrade::Nothing
    };
    Ok(Loaded {
        state,
        journal,
        len,
        next_seq,
        snapshot_len,
        upgrade,
    })
}

/// What a loaded data directory needs before anything is appended to its journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    Nothing,
    /// A new, empty journal: its magic.
    Magic,
    /// Files an older version wrote: the state as a snapshot in the current layout,
    /// then an empty journal.
    Rewrite,
}

impl Loaded {
    /// Brings the files in `dir`, which this state was loaded from, to the current
    /// layout (see [`Upgrade`]); a no-op for a directory this version wrote.
    fn upgrade(&mut self, dir: &Path) -> Result<(), TreeAppError> {
        match self.upgrade {
            Upgrade::Nothing => return Ok(()),
            Upgrade::Magic => (&self.journal)
                .write_all(store::JOURNAL_MAGIC)
                .map_err(io_err(&dir.join(JOURNAL_FILE), "write the journal's magic"))?,
            Upgrade::Rewrite => {
                let path = dir.join(SNAPSHOT_FILE);
                let snapshot = Snapshot {
                    next_seq: self.next_seq,
                    state: Cow::Borrowed(&self.state),
                };
                let file = store::snapshot_file(&path, &snapshot)?;
                store::write_snapshot(dir, &file)?;
                self.journal = store::replace_journal(dir)?;
                self.snapshot_len = file.len() as u64;
                info!(dir = %dir.display(), "data directory rewritten from the older layout");
            }
        }
        self.len = store::JOURNAL_MAGIC.len() as u64;
        self.upgrade = Upgrade::Nothing;
        Ok(())
    }
}

impl TreeApp {
    /// Opens `config.dir` (creating it if absent) and rebuilds the tree from
    /// the snapshot and journal, truncating a torn last record. See the crate
    /// docs, "Persistence". Blocking: call it from a blocking context
    /// (e.g. [`tokio::task::spawn_blocking`]).
    pub fn open(config: &TreeAppConfig) -> Result<TreeApp, TreeAppError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err(&dir, "create the data directory"))?;
        checkpoint::restore_files(&dir).finish_or_discard()?;
        let journal_path = dir.join(JOURNAL_FILE);
        let mut loaded = load(&dir.join(SNAPSHOT_FILE), &journal_path)?;
        loaded.upgrade(&dir)?;
        let len = loaded.len;
        let (state, writer) = loaded.into_writer();
        info!(
            dir = %dir.display(),
            nodes = state.tree.iter().count(),
            mutations = state.tree.mutations(),
            haven_index = state.applied(),
            journal_bytes = len,
            "tree app data open"
        );
        Ok(TreeApp {
            dir,
            journal_path,
            state: RwLock::new(state),
            writer: Arc::new(Mutex::new(writer)),
            restoring: Arc::new(Mutex::new(())),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Highest `Haven-Index` applied (`0`: none).
    pub fn applied_haven_index(&self) -> u64 {
        self.read_state().applied()
    }

    /// The `GET /dump` body: the canonical serialization of the replica.
    pub fn dump(&self) -> String {
        self.read_state().dump()
    }

    /// The `GET /digest` body: FNV-1a 64 of [`TreeApp::dump`], in hex.
    pub fn digest(&self) -> String {
        self.read_state().digest()
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no write is in progress (writes run to completion even when
    /// their request is abandoned).
    async fn wait_idle(&self) {
        drop(self.writer.lock().await);
    }

    /// Applies one state-changing request (see the crate docs).
    async fn execute(
        self: &Arc<Self>,
        index: Option<u64>,
        op: Op,
    ) -> Result<Executed, TreeAppError> {
        let mut writer = Arc::clone(&self.writer).lock_owned().await;
        let app = Arc::clone(self);
        // The write runs to completion even if the request is dropped, so a
        // request is never half applied by cancellation.
        tokio::task::spawn_blocking(move || app.execute_locked(&mut writer, index, op))
            .await
            .map_err(task_err(&self.journal_path))?
    }

    /// [`TreeApp::execute`] under the writer lock (blocking).
    fn execute_locked(
        &self,
        writer: &mut Writer,
        index: Option<u64>,
        op: Op,
    ) -> Result<Executed, TreeAppError> {
        if writer.failed {
            return Err(TreeAppError::Failed {
                path: self.journal_path.clone(),
            });
        }
        let outcome = {
            let state = self.read_state();
            if let Some(replay) = index.and_then(|i| state.replay(i)) {
                return Ok(replay);
            }
            state.tree.check(&op)
        };
        let entry = match &outcome {
            Ok(_) if index.is_some() || op.changes_state() => {
                Some(Entry::Applied(Cow::Borrowed(&op)))
            }
            Err(e) if index.is_some() => Some(Entry::Rejected(Cow::Borrowed(e))),
            _ => None,
        };
        if let Some(entry) = entry {
            self.append(writer, index, entry)?;
        }
        self.write_state().record(index, Some(op), outcome.clone());
        if writer.len >= writer.compact_after {
            self.compact(writer);
        }
        Ok(Executed::Fresh(outcome))
    }

    /// Appends one record to the journal; on error, truncates it back.
    fn append(
        &self,
        writer: &mut Writer,
        index: Option<u64>,
        entry: Entry<'_>,
    ) -> Result<(), TreeAppError> {
        let record = Record {
            seq: writer.next_seq,
            haven_index: index.unwrap_or(0),
            entry,
        };
        let frame = store::journal_frame(&self.journal_path, &record)?;
        if let Err(e) = (&writer.journal).write_all(&frame) {
            if let Err(e) = writer.journal.set_len(writer.len) {
                error!(
                    file = %self.journal_path.display(),
                    error = %e,
                    "cannot roll back a failed journal write"
                );
                writer.failed = true;
            }
            return Err(io_err(&self.journal_path, "append to the journal")(e));
        }
        writer.len += frame.len() as u64;
        writer.next_seq += 1;
        Ok(())
    }

    /// Writes a snapshot and empties the journal. A failure is only logged:
    /// the journal still holds everything, and keeps growing until a later
    /// attempt, once it has doubled, succeeds.
    fn compact(&self, writer: &mut Writer) {
        match self.write_snapshot(writer) {
            Ok(snapshot_len) => {
                info!(
                    dir = %self.dir.display(),
                    journal_bytes = writer.len,
                    snapshot_bytes = snapshot_len,
                    "journal compacted into a snapshot"
                );
                writer.len = store::JOURNAL_MAGIC.len() as u64;
                writer.compact_after = compact_threshold(snapshot_len);
            }
            Err(e) => {
                warn!(error = %e, "cannot compact the journal");
                writer.compact_after = writer.len.saturating_mul(2);
            }
        }
    }

    /// Snapshots the state as of `writer.next_seq`, then replaces the journal
    /// with an empty one; returns the snapshot's length. The journal is
    /// replaced by a rename, not truncated, so that a `GET /_haven/snapshot`
    /// still streaming the old journal through its own handle is unaffected.
    fn write_snapshot(&self, writer: &mut Writer) -> Result<u64, TreeAppError> {
        let frame = {
            let state = self.read_state();
            let snapshot = Snapshot {
                next_seq: writer.next_seq,
                state: Cow::Borrowed(&state),
            };
            store::snapshot_file(&self.dir.join(SNAPSHOT_FILE), &snapshot)?
        };
        store::write_snapshot(&self.dir, &frame)?;
        writer.journal = store::replace_journal(&self.dir)?;
        Ok(frame.len() as u64)
    }
}

fn compact_threshold(snapshot_len: u64) -> u64 {
    snapshot_len.max(COMPACT_AFTER_BYTES)
}

/// Serves the tree app on `listener` until `shutdown` completes.
///
/// Opens the data directory first ([`TreeApp::open`]), so data that cannot be
/// recovered fails before anything is served. On shutdown, in-flight requests
/// are finished (axum's graceful shutdown) and any write still running is
/// waited for before returning.
pub async fn serve(
    listener: TcpListener,
    config: TreeAppConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TreeAppError> {
    let dir = config.dir.clone();
    let app = tokio::task::spawn_blocking(move || TreeApp::open(&config))
        .await
        .map_err(task_err(&dir))??;
    let app = Arc::new(app);
    match listener.local_addr() {
        Ok(addr) => info!(%addr, dir = %dir.display(), "tree app listening"),
        Err(e) => warn!(error = %e, "tree app listening on an unknown address"),
    }
    let result = axum::serve(listener, router(Arc::clone(&app)))
        .with_graceful_shutdown(shutdown)
        .await;
    app.wait_idle().await;
    info!(dir = %dir.display(), "tree app stopped");
    result.map_err(|source| TreeAppError::Serve { path: dir, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Done, TreeError};

    fn open(dir: &Path) -> Arc<TreeApp> {
        let config = TreeAppConfig {
            dir: dir.to_path_buf(),
        };
        Arc::new(TreeApp::open(&config).unwrap())
    }

    fn create(path: &str) -> Op {
        Op::Create {
            path: path.to_owned(),
            data: path.as_bytes().to_vec(),
        }
    }

    fn set(path: &str) -> Op {
        Op::Set {
            path: path.to_owned(),
            data: b"set".to_vec(),
            if_version: None,
        }
    }

    fn journal(dir: &Path) -> Vec<u8> {
        fs::read(dir.join(JOURNAL_FILE)).unwrap()
    }

    #[tokio::test]
    async fn compaction_keeps_the_state_and_the_replay_window() {
        let dir = tempfile::tempdir().unwrap();
        let app = open(dir.path());
        app.execute(Some(1), create("/a")).await.unwrap();
        app.execute(Some(2), set("/b")).await.unwrap();
        app.execute(None, create("/b")).await.unwrap();
        let before = journal(dir.path());
        app.writer.lock().await.compact_after = 1;
        app.execute(Some(3), set("/a")).await.unwrap();
        {
            let writer = app.writer.lock().await;
            assert_eq!(writer.len, store::JOURNAL_MAGIC.len() as u64);
            assert_eq!(writer.next_seq, 4);
            assert_eq!(writer.compact_after, COMPACT_AFTER_BYTES);
        }
        assert_eq!(journal(dir.path()), store::JOURNAL_MAGIC);
        assert!(dir.path().join(SNAPSHOT_FILE).exists());
        app.execute(Some(5), create("/c")).await.unwrap();
        let dump = app.dump();
        drop(app);

        let app = open(dir.path());
        assert_eq!(app.dump(), dump);
        assert_eq!(app.applied_haven_index(), 5);
        // Index 2 failed before the snapshot; its replay still fails the same way.
        assert_eq!(
            app.execute(Some(2), set("/b")).await.unwrap(),
            Executed::Replayed(Err(TreeError::NoNode("/b".to_owned())))
        );
        assert_eq!(
            app.execute(Some(6), Op::Sync).await.unwrap(),
            Executed::Fresh(Ok(Done::Synced { mutations: 4 }))
        );
        let dump = app.dump();
        drop(app);
        assert_eq!(open(dir.path()).dump(), dump);

        // A crash after the snapshot was renamed but before the journal was
        // emptied: the records the snapshot holds are skipped.
        let mut stale = before;
        stale.extend_from_slice(&journal(dir.path())[store::JOURNAL_MAGIC.len()..]);
        fs::write(dir.path().join(JOURNAL_FILE), stale).unwrap();
        assert_eq!(open(dir.path()).dump(), dump);
    }

    /// Every file of a data directory, by name.
    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    }

    async fn snapshot_bytes(body: axum::body::Body) -> bytes::Bytes {
        axum::body::to_bytes(body, usize::MAX).await.unwrap()
    }

    #[tokio::test]
    async fn snapshots_survive_compaction_and_restore_tree_snapshot_files() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = open(one.path());
        a.execute(Some(1), create("/a")).await.unwrap();
        a.execute(Some(2), create("/b")).await.unwrap();
        let (len, body) = a.snapshot_stream().await.unwrap();
        let dump_then = a.dump();
        // A compaction while the snapshot streams: the journal is replaced,
        // not truncated, so the stream keeps its bytes.
        a.writer.lock().await.compact_after = 1;
        a.execute(Some(3), set("/a")).await.unwrap();
        assert_eq!(journal(one.path()), store::JOURNAL_MAGIC);
        let early = snapshot_bytes(body).await;
        assert_eq!(early.len() as u64, len);

        // B has a tree.snapshot of its own; the restored state has none.
        let b = open(two.path());
        b.writer.lock().await.compact_after = 1;
        b.execute(Some(9), create("/z")).await.unwrap();
        assert!(two.path().join(SNAPSHOT_FILE).exists());
        b.restore(2, axum::body::Body::from(early)).await.unwrap();
        assert_eq!(b.dump(), dump_then);
        assert!(!two.path().join(SNAPSHOT_FILE).exists());

        // A's state now lives in tree.snapshot plus a journal record.
        a.execute(Some(4), create("/c")).await.unwrap();
        let (_, body) = a.snapshot_stream().await.unwrap();
        b.restore(4, axum::body::Body::from(snapshot_bytes(body).await))
            .await
            .unwrap();
        assert_eq!(files(two.path()), files(one.path()));
        assert_eq!(b.dump(), a.dump());
        assert_eq!(
            b.execute(Some(3), set("/a")).await.unwrap(),
            Executed::Replayed(Ok(Done::Set {
                path: "/a".to_owned(),
                version: 1
            }))
        );
        b.execute(Some(5), create("/d")).await.unwrap();
        let dump = b.dump();
        drop(b);
        assert_eq!(open(two.path()).dump(), dump);
    }

    #[tokio::test]
    async fn a_journal_error_that_cannot_be_rolled_back_stops_writes() {
        let dir = tempfile::tempdir().unwrap();
        let app = open(dir.path());
        app.execute(Some(1), create("/a")).await.unwrap();
        let dump = app.dump();
        // A read-only handle: the write fails, and so does the rollback.
        app.writer.lock().await.journal = File::open(dir.path().join(JOURNAL_FILE)).unwrap();
        let err = app.execute(Some(2), create("/b")).await.unwrap_err();
        assert!(
            matches!(&err, TreeAppError::Io { path, action: "append to the journal", .. }
                if *path == dir.path().join(JOURNAL_FILE)),
            "{err:?}"
        );
        let err = app.execute(Some(3), create("/c")).await.unwrap_err();
        assert!(matches!(err, TreeAppError::Failed { .. }), "{err:?}");
        assert_eq!(app.dump(), dump, "nothing was applied");
        drop(app);
        // A restart recovers, and index 2 is new to it.
        let app = open(dir.path());
        assert_eq!(app.dump(), dump);
        assert_eq!(
            app.execute(Some(2), create("/b")).await.unwrap(),
            Executed::Fresh(Ok(Done::Created {
                path: "/b".to_owned()
            }))
        );
    }

    #[test]
    fn a_damaged_snapshot_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join(SNAPSHOT_FILE);
        fs::write(&snapshot, b"not a snapshot at all").unwrap();
        let config = TreeAppConfig {
            dir: dir.path().to_path_buf(),
        };
        let err = TreeApp::open(&config).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "{}: corrupt at byte offset 0: record length ",
                snapshot.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn a_gap_in_the_journal_sequence_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let record = |seq| Record {
            seq,
            haven_index: 0,
            entry: Entry::Applied(Cow::Owned(create(&format!("/n{seq}")))),
        };
        let first = store::journal_frame(&path, &record(0)).unwrap();
        let mut bytes = store::JOURNAL_MAGIC.to_vec();
        bytes.extend(&first);
        bytes.extend(store::journal_frame(&path, &record(2)).unwrap());
        fs::write(&path, bytes).unwrap();
        let config = TreeAppConfig {
            dir: dir.path().to_path_buf(),
        };
        let err = TreeApp::open(&config).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: corrupt at byte offset {}: sequence number 2 where 1 was expected",
                path.display(),
                store::JOURNAL_MAGIC.len() + first.len()
            )
        );
    }

    #[tokio::test]
    async fn a_data_directory_an_older_version_wrote_is_loaded_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        fn legacy(value: &impl serde::Serialize) -> Vec<u8> {
            store::legacy::frame(&postcard::to_allocvec(value).unwrap())
        }
        let mut state = State::default();
        let op = create("/old");
        let record = Record {
            seq: 0,
            haven_index: 1,
            entry: Entry::Applied(Cow::Owned(op)),
        };
        state.replay_record(record).unwrap();
        let snapshot = Snapshot {
            next_seq: 1,
            state: Cow::Borrowed(&state),
        };
        fs::write(dir.path().join(SNAPSHOT_FILE), legacy(&snapshot)).unwrap();
        let second = Record {
            seq: 1,
            haven_index: 2,
            entry: Entry::Applied(Cow::Owned(create("/older"))),
        };
        fs::write(dir.path().join(JOURNAL_FILE), legacy(&second)).unwrap();

        let app = open(dir.path());
        assert_eq!(app.applied_haven_index(), 2);
        let dump = app.dump();
        assert!(dump.contains("/old") && dump.contains("/older"), "{dump}");
        assert_eq!(
            journal(dir.path()),
            store::JOURNAL_MAGIC,
            "journal rewritten"
        );
        let snapshot = fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        assert!(snapshot.starts_with(b"HVNTRES2"), "snapshot rewritten");
        app.execute(Some(3), create("/new")).await.unwrap();
        let dump = app.dump();
        drop(app);
        assert_eq!(open(dir.path()).dump(), dump);
    }
}
