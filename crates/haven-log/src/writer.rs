//! The single writer thread: it owns all file writes and makes them durable in groups.
//!
//! fsync costs milliseconds; Raft appends arrive far more often than that under load. The writer
//! therefore drains every job queued while it was busy, writes them all, and issues one
//! `fdatasync` for the whole batch before completing their callbacks in order (group commit).

use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use openraft::RaftTypeConfig;
use openraft::storage::IOFlushed;
use openraft::type_config::OneshotSender;
use openraft::type_config::alias::OneshotReceiverOf;
use openraft::type_config::alias::OneshotSenderOf;

use crate::LogError;
use crate::format;
use crate::format::SEGMENT_HEADER_LEN;
use crate::format::SEGMENT_MAGIC;
use crate::fsutil;
use crate::state::AppendPlan;
use crate::state::TruncatePlan;
use crate::stats::Counters;

/// Name of the vote metadata file.
pub(crate) const VOTE_FILE: &str = "vote";
/// Name of the committed-log-id metadata file.
pub(crate) const COMMITTED_FILE: &str = "committed";
/// Name of the last-purged-log-id metadata file.
pub(crate) const PURGED_FILE: &str = "purged";

/// Where a barrier job reports back to the waiting caller.
pub(crate) type Reply<C> = OneshotSenderOf<C, Result<(), LogError>>;

/// The caller's end of a [`Reply`].
pub(crate) type ReplyRx<C> = OneshotReceiverOf<C, Result<(), LogError>>;

/// One unit of work for the writer, queued in the order the caller planned it.
pub(crate) enum Job<C: RaftTypeConfig> {
    /// Write encoded records (none for an empty append) and complete `callback` once durable.
    Append {
        plan: Option<AppendPlan>,
        bytes: Vec<u8>,
        entries: u64,
        callback: IOFlushed<C>,
    },
    /// Cut the log; replies once the cut is durable.
    Truncate { plan: TruncatePlan, reply: Reply<C> },
    /// Persist the purge point, then delete fully purged segments.
    Purge {
        meta: Vec<u8>,
        remove: Vec<u64>,
        reply: Reply<C>,
    },
    /// Persist the vote durably.
    Vote { meta: Vec<u8>, reply: Reply<C> },
    /// Record the committed log id (not fsynced; written after the batch is durable).
    Committed { meta: Vec<u8> },
}

/// State shared by the store handles and the writer thread.
#[derive(Debug)]
pub(crate) struct Common {
    pub(crate) dir: PathBuf,
    pub(crate) seg_dir: PathBuf,
    pub(crate) counters: Counters,
    /// Sequence number of the last append job written to its segment (readable via `pread`).
    pub(crate) written_seq: AtomicU64,
    /// Set once, on the first write or fsync failure; afterwards every write fails.
    pub(crate) failed: OnceLock<String>,
}

impl Common {
    pub(crate) fn new(dir: PathBuf, seg_dir: PathBuf) -> Self {
        Common {
            dir,
            seg_dir,
            counters: Counters::default(),
            written_seq: AtomicU64::new(0),
            failed: OnceLock::new(),
        }
    }

    /// `Err` if the store has stopped accepting writes.
    pub(crate) fn check_writable(&self) -> Result<(), LogError> {
        match self.failed.get() {
            Some(msg) => Err(LogError::Failed(msg.clone())),
            None => Ok(()),
        }
    }
}

/// The segment currently written to.
struct Active {
    segment: u64,
    path: PathBuf,
    file: File,
    dirty: bool,
}

/// The writer thread's state.
pub(crate) struct Writer<C: RaftTypeConfig> {
    rx: Receiver<Job<C>>,
    common: std::sync::Arc<Common>,
    active: Option<Active>,
    /// Earlier segments written in this batch, still to be synced.
    unsynced: Vec<(PathBuf, File)>,
    /// A segment file was created: the directory entry must be synced too.
    dir_dirty: bool,
    /// Callbacks of written appends, completed at the next flush.
    pending: Vec<IOFlushed<C>>,
    /// Latest committed value received in this batch.
    committed: Option<Vec<u8>>,
    /// The `committed` file, kept open and overwritten in place.
    committed_file: Option<CommittedFile>,
}

/// Replacing a file by rename makes ext4 flush the new file's data first (`auto_da_alloc`),
/// which cost 3 to 5 ms per batch here and stalled every append behind it. `committed` is
/// small, written by one thread, and may lag after a crash, so overwriting it in place is
/// enough: a small `write` is not torn by a killed process, and a file left empty or stale
/// by a power cut only means a smaller committed index is read back.
struct CommittedFile {
    file: File,
    len: usize,
}

impl<C: RaftTypeConfig> Writer<C> {
    pub(crate) fn new(rx: Receiver<Job<C>>, common: std::sync::Arc<Common>) -> Self {
        Writer {
            rx,
            common,
            active: None,
            unsynced: Vec::new(),
            dir_dirty: false,
            pending: Vec::new(),
            committed: None,
            committed_file: None,
        }
    }

    /// Runs until every store handle is dropped (the channel closes).
    pub(crate) fn run(mut self) {
        while let Ok(job) = self.rx.recv() {
            let mut batch = vec![job];
            batch.extend(self.rx.try_iter());
            for job in batch {
                self.handle(job);
            }
            self.flush();
            self.write_committed();
        }
        tracing::debug!(dir = %self.common.dir.display(), "log writer stopped");
    }

    fn handle(&mut self, job: Job<C>) {
        match job {
            Job::Append {
                plan,
                bytes,
                entries,
                callback,
            } => self.append(plan, &bytes, entries, callback),
            Job::Committed { meta } => self.committed = Some(meta),
            Job::Truncate { plan, reply } => self.barrier(reply, |w| w.truncate(&plan)),
            Job::Purge {
                meta,
                remove,
                reply,
            } => self.barrier(reply, |w| w.purge(&meta, &remove)),
            Job::Vote { meta, reply } => self.barrier(reply, |w| w.save_vote(&meta)),
        }
    }

    /// Writes one append job; its callback waits for the batch's fsync.
    fn append(
        &mut self,
        plan: Option<AppendPlan>,
        bytes: &[u8],
        entries: u64,
        callback: IOFlushed<C>,
    ) {
        if let Err(e) = self.common.check_writable() {
            callback.io_completed(Err(e.into()));
            return;
        }
        if let Some(plan) = plan {
            if let Err(e) = self.write_at(plan.segment, plan.offset, bytes) {
                self.fail(&e);
                callback.io_completed(Err(e.into()));
                return;
            }
            self.common.written_seq.store(plan.seq, Ordering::Release);
            Counters::add(&self.common.counters.entries_appended, entries);
            Counters::add(&self.common.counters.bytes_written, bytes.len() as u64);
        }
        self.pending.push(callback);
    }

    /// Runs an operation that must be ordered after everything queued before it and be durable
    /// before the caller continues: flush first, run it, reply.
    fn barrier(&mut self, reply: Reply<C>, op: impl FnOnce(&mut Self) -> Result<(), LogError>) {
        self.flush();
        let result = self.common.check_writable().and_then(|()| op(self));
        if let Err(e) = &result {
            self.fail(e);
        }
        if reply.send(result).is_err() {
            tracing::debug!("log store caller went away before its reply");
        }
    }

    /// Writes `bytes` at `offset` of `segment`, switching (and creating) the file if needed.
    fn write_at(&mut self, segment: u64, offset: u64, bytes: &[u8]) -> Result<(), LogError> {
        let fresh = offset == SEGMENT_HEADER_LEN;
        let active = self.activate(segment, fresh)?;
        active
            .file
            .write_all_at(bytes, offset)
            .map_err(|e| LogError::io(&active.path, e))?;
        active.dirty = true;
        Ok(())
    }

    /// Makes `segment` the active file. A `fresh` segment is created (or reset) with a header.
    fn activate(&mut self, segment: u64, fresh: bool) -> Result<&mut Active, LogError> {
        if self.active.as_ref().is_some_and(|a| a.segment == segment) && !fresh {
            return self.active.as_mut().ok_or(LogError::WriterGone);
        }
        if let Some(old) = self.active.take()
            && old.dirty
        {
            self.unsynced.push((old.path, old.file));
        }
        let path = format::segment_path(&self.common.seg_dir, segment);
        let file = open_segment(&path, fresh)?;
        if fresh {
            Counters::add(&self.common.counters.bytes_written, SEGMENT_HEADER_LEN);
            self.dir_dirty = true;
        }
        Ok(self.active.insert(Active {
            segment,
            path,
            file,
            dirty: fresh,
        }))
    }

    /// Makes everything written so far durable with as few fsyncs as possible, then completes
    /// the waiting append callbacks in order.
    fn flush(&mut self) {
        if self.pending.is_empty() && self.unsynced.is_empty() && !self.dir_dirty {
            return;
        }
        let result = self
            .common
            .check_writable()
            .and_then(|()| self.sync_written());
        if let Err(e) = &result {
            self.fail(e);
        }
        Counters::add(&self.common.counters.group_commits, 1);
        for cb in self.pending.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::other(e.to_string())),
            };
            cb.io_completed(r);
        }
    }

    /// fdatasyncs every dirty segment and, if a segment was created, the segment directory.
    fn sync_written(&mut self) -> Result<(), LogError> {
        let counters = &self.common.counters;
        for (path, file) in self.unsynced.drain(..) {
            file.sync_data().map_err(|e| LogError::io(&path, e))?;
            Counters::add(&counters.fsyncs, 1);
        }
        if let Some(a) = self.active.as_mut().filter(|a| a.dirty) {
            a.file.sync_data().map_err(|e| LogError::io(&a.path, e))?;
            Counters::add(&counters.fsyncs, 1);
            a.dirty = false;
        }
        if self.dir_dirty {
            fsutil::sync_dir(&self.common.seg_dir, counters)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    /// Writes the latest committed log id, after the batch it may refer to is durable.
    fn write_committed(&mut self) {
        let Some(meta) = self.committed.take() else {
            return;
        };
        if self.common.check_writable().is_err() {
            return;
        }
        if let Err(e) = self.overwrite_committed(&meta) {
            self.committed_file = None;
            tracing::warn!(error = %e, "cannot save committed log id; it is an optimisation only");
        }
    }

    fn overwrite_committed(&mut self, meta: &[u8]) -> Result<(), LogError> {
        let path = self.common.dir.join(COMMITTED_FILE);
        let target = match self.committed_file.take() {
            Some(open) => open,
            None => {
                let file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| LogError::io(&path, e))?;
                let len = file.metadata().map_err(|e| LogError::io(&path, e))?.len();
                CommittedFile {
                    file,
                    len: usize::try_from(len).unwrap_or(usize::MAX),
                }
            }
        };
        target
            .file
            .write_all_at(meta, 0)
            .map_err(|e| LogError::io(&path, e))?;
        if meta.len() < target.len {
            target
                .file
                .set_len(meta.len() as u64)
                .map_err(|e| LogError::io(&path, e))?;
        }
        Counters::add(&self.common.counters.bytes_written, meta.len() as u64);
        self.committed_file = Some(CommittedFile {
            file: target.file,
            len: meta.len(),
        });
        Ok(())
    }

    /// Cuts a segment and deletes the later ones, durably.
    fn truncate(&mut self, plan: &TruncatePlan) -> Result<(), LogError> {
        if let Some((segment, len)) = plan.cut {
            let path = format::segment_path(&self.common.seg_dir, segment);
            let file = match self.active.as_ref().filter(|a| a.segment == segment) {
                Some(a) => a.file.try_clone().map_err(|e| LogError::io(&path, e))?,
                None => open_segment(&path, false)?,
            };
            file.set_len(len).map_err(|e| LogError::io(&path, e))?;
            file.sync_data().map_err(|e| LogError::io(&path, e))?;
            Counters::add(&self.common.counters.fsyncs, 1);
        }
        self.remove_segments(&plan.remove)
    }

    /// Persists the purge point first, so a crash after deleting files never loses track of
    /// where the log starts; then deletes the fully purged segments.
    fn purge(&mut self, meta: &[u8], remove: &[u64]) -> Result<(), LogError> {
        let c = &self.common;
        fsutil::write_atomic(&c.dir, PURGED_FILE, meta, true, &c.counters)?;
        self.remove_segments(remove)
    }

    fn save_vote(&mut self, meta: &[u8]) -> Result<(), LogError> {
        let c = &self.common;
        fsutil::write_atomic(&c.dir, VOTE_FILE, meta, true, &c.counters)
    }

    /// Deletes segment files and syncs the directory.
    fn remove_segments(&mut self, segments: &[u64]) -> Result<(), LogError> {
        if segments.is_empty() {
            return Ok(());
        }
        for &segment in segments {
            if self.active.as_ref().is_some_and(|a| a.segment == segment) {
                self.active = None;
            }
            let path = format::segment_path(&self.common.seg_dir, segment);
            match fs::remove_file(&path) {
                Ok(()) => tracing::debug!(file = %path.display(), "removed log segment"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::io(&path, e)),
            }
        }
        fsutil::sync_dir(&self.common.seg_dir, &self.common.counters)
    }

    /// Stops all further writes after a failure.
    fn fail(&self, e: &LogError) {
        if self.common.failed.set(e.to_string()).is_ok() {
            tracing::error!(error = %e, "log write failed; the log store now rejects all writes");
        }
    }
}

/// Opens a segment for writing; a `fresh` one is created empty with its header.
fn open_segment(path: &Path, fresh: bool) -> Result<File, LogError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(fresh)
        .truncate(fresh)
        .open(path)
        .map_err(|e| LogError::io(path, e))?;
    if fresh {
        file.write_all_at(SEGMENT_MAGIC, 0)
            .map_err(|e| LogError::io(path, e))?;
    }
    Ok(file)
}
