//! The public handle: [`LogStore`] and its openraft trait implementations.

use std::fmt;
use std::fmt::Debug;
use std::fs;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftTypeConfig;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::VoteOf;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::LogError;
use crate::LogStats;
use crate::format;
use crate::fsutil;
use crate::recovery;
use crate::state::DiskRun;
use crate::state::State;
use crate::writer::Common;
use crate::writer::Job;
use crate::writer::Reply;
use crate::writer::ReplyRx;
use crate::writer::Writer;

/// Entries with their encoded record lengths, and the records' bytes back to back.
type Encoded<E> = (Vec<(E, u32)>, Vec<u8>);

/// Tuning knobs of a [`LogStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Start a new segment file once the current one reaches this size. Smaller segments let
    /// `purge` reclaim space sooner; larger ones mean fewer files. Default 64 MiB.
    pub segment_bytes: u64,
    /// Budget (encoded bytes) of the cache of recent entries, which serves replication and apply
    /// without disk reads. Entries not yet written are kept regardless. Default 32 MiB.
    pub cache_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 << 20,
            cache_bytes: 32 << 20,
        }
    }
}

/// Haven's durable Raft log (see the crate docs for the design and file format).
///
/// A cheap handle: clones share one store and one writer thread. The writer stops, after
/// finishing queued work, when the last clone is dropped.
pub struct LogStore<C: RaftTypeConfig> {
    inner: Arc<Inner<C>>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore {
            inner: self.inner.clone(),
        }
    }
}

impl<C: RaftTypeConfig> Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.inner.common.dir)
            .finish_non_exhaustive()
    }
}

/// What the handles share.
struct Inner<C: RaftTypeConfig> {
    state: Mutex<State<C>>,
    common: Arc<Common>,
    options: LogOptions,
    tx: Option<Sender<Job<C>>>,
    writer: Option<JoinHandle<()>>,
}

impl<C: RaftTypeConfig> Drop for Inner<C> {
    /// Closes the queue and waits for the writer, so a store reopened right after the last
    /// handle is dropped never races with leftover writes.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(handle) = self.writer.take()
            && handle.join().is_err()
        {
            tracing::error!(dir = %self.common.dir.display(), "log writer thread panicked");
        }
    }
}

impl<C> LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned + Clone,
    VoteOf<C>: Serialize + DeserializeOwned,
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    /// Opens (or creates) the log in `dir`, validating and, if needed, repairing it.
    ///
    /// Fails with [`LogError::Corrupt`] if any data other than a torn tail is damaged.
    pub fn open(dir: &Path, options: LogOptions) -> Result<Self, LogError> {
        let seg_dir = dir.join("segments");
        fs::create_dir_all(&seg_dir).map_err(|e| LogError::io(&seg_dir, e))?;
        let common = Arc::new(Common::new(dir.to_path_buf(), seg_dir));
        fsutil::sync_dir(dir, &common.counters)?;
        let state = recovery::recover::<C>(dir, &common.seg_dir, &common.counters)?;
        let (tx, rx) = mpsc::channel();
        let writer = Writer::new(rx, common.clone());
        let handle = std::thread::Builder::new()
            .name("haven-log-writer".to_string())
            .spawn(move || writer.run())
            .map_err(|e| LogError::io(dir, e))?;
        let inner = Inner {
            state: Mutex::new(state),
            common,
            options,
            tx: Some(tx),
            writer: Some(handle),
        };
        Ok(LogStore {
            inner: Arc::new(inner),
        })
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.common.dir
    }

    /// I/O counters since open.
    pub fn stats(&self) -> LogStats {
        self.inner.common.counters.snapshot()
    }

    /// Locks the in-memory state. A panic elsewhere cannot leave it half-updated in a way that
    /// matters more than refusing all further work, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a job for the writer. Call with the state lock held so queue order = plan order.
    fn send(&self, job: Job<C>) -> Result<(), LogError> {
        let tx = self.inner.tx.as_ref().ok_or(LogError::WriterGone)?;
        tx.send(job).map_err(|_| LogError::WriterGone)
    }

    /// Encodes entries into one buffer of records, outside the lock.
    fn encode(entries: Vec<C::Entry>) -> Result<Encoded<C::Entry>, LogError> {
        let mut buf = Vec::new();
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let len = format::encode_entry_record(&entry, &mut buf)?;
            out.push((entry, len));
        }
        Ok((out, buf))
    }

    /// Indexes `entries` and queues them; `callback` runs once they are durable.
    fn append_entries(
        &self,
        entries: Vec<C::Entry>,
        callback: IOFlushed<C>,
    ) -> Result<(), LogError> {
        self.inner.common.check_writable()?;
        let (encoded, bytes) = Self::encode(entries)?;
        let count = encoded.len() as u64;
        let written = self.inner.common.written_seq.load(Ordering::Acquire);
        let mut st = self.lock();
        let plan = st.plan_append(
            encoded,
            bytes.len() as u64,
            self.inner.options.segment_bytes,
        )?;
        st.evict(self.inner.options.cache_bytes, written);
        self.send(Job::Append {
            plan,
            bytes,
            entries: count,
            callback,
        })?;
        drop(st);
        crate::stats::Counters::add(&self.inner.common.counters.append_calls, 1);
        Ok(())
    }

    /// Waits for the writer's reply to a barrier job.
    async fn wait(rx: ReplyRx<C>) -> Result<(), LogError> {
        rx.await.map_err(|_| LogError::WriterGone)?
    }

    /// Plans and queues a barrier job under the lock; `None` from `plan` means nothing to do.
    fn queue_barrier(
        &self,
        plan: impl FnOnce(&mut State<C>, Reply<C>) -> Result<Option<Job<C>>, LogError>,
    ) -> Result<Option<ReplyRx<C>>, LogError> {
        self.inner.common.check_writable()?;
        let (tx, rx) = C::oneshot();
        let mut st = self.lock();
        let Some(job) = plan(&mut st, tx)? else {
            return Ok(None);
        };
        self.send(job)?;
        Ok(Some(rx))
    }

    async fn truncate(&self, last: Option<LogIdOf<C>>) -> Result<(), LogError> {
        tracing::debug!(last = ?last, "truncate_after");
        let rx = self.queue_barrier(|st, reply| {
            Ok(st
                .plan_truncate(last)
                .map(|plan| Job::Truncate { plan, reply }))
        })?;
        match rx {
            Some(rx) => Self::wait(rx).await,
            None => Ok(()),
        }
    }

    async fn purge_upto(&self, upto: LogIdOf<C>) -> Result<(), LogError> {
        tracing::debug!(upto = %upto, "purge");
        let meta = format::encode_meta("purged log id", &upto)?;
        let rx = self.queue_barrier(|st, reply| {
            if st.purged.as_ref() >= Some(&upto) {
                return Ok(None);
            }
            let remove = st.plan_purge(upto);
            Ok(Some(Job::Purge {
                meta,
                remove,
                reply,
            }))
        })?;
        match rx {
            Some(rx) => Self::wait(rx).await,
            None => Ok(()),
        }
    }

    async fn save_vote_durably(&self, vote: &VoteOf<C>) -> Result<(), LogError> {
        let meta = format::encode_meta("vote", vote)?;
        let rx = self.queue_barrier(|_, reply| Ok(Some(Job::Vote { meta, reply })))?;
        if let Some(rx) = rx {
            Self::wait(rx).await?;
        }
        self.lock().vote = Some(vote.clone());
        Ok(())
    }

    fn save_committed_lazily(&self, committed: Option<LogIdOf<C>>) -> Result<(), LogError> {
        self.inner.common.check_writable()?;
        let meta = format::encode_meta("committed log id", &committed)?;
        let mut st = self.lock();
        st.committed = committed;
        self.send(Job::Committed { meta })
    }

    /// Reads the entries of `[start, end)` that the log holds.
    fn read_entries(&self, start: u64, end: u64) -> Result<Vec<C::Entry>, LogError> {
        let written = self.inner.common.written_seq.load(Ordering::Acquire);
        let plan = {
            let mut st = self.lock();
            st.evict(self.inner.options.cache_bytes, written);
            st.plan_read(start, end, &self.inner.common.seg_dir)?
        };
        let mut out = Vec::with_capacity(plan.cached.len());
        for run in &plan.disk {
            read_run::<C>(run, &mut out)?;
        }
        out.extend(plan.cached);
        Ok(out)
    }
}

/// Reads one run of adjacent records with a single positional read and re-checks each CRC.
fn read_run<C>(run: &DiskRun, out: &mut Vec<C::Entry>) -> Result<(), LogError>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    let len = usize::try_from(run.len)
        .map_err(|_| LogError::Invalid("read run too large".to_string()))?;
    let mut buf = vec![0u8; len];
    run.file
        .read_exact_at(&mut buf, run.offset)
        .map_err(|e| LogError::io(&run.path, e))?;
    let mut pos = 0usize;
    for (i, loc) in run.locs.iter().enumerate() {
        let rec = &buf[pos..pos + loc.len as usize];
        let entry: C::Entry = format::decode_entry_record(rec, run.format, &run.path, loc.offset)?;
        let want = run.first_index + i as u64;
        if entry.index() != want {
            let reason = format!("holds entry {} where {want} was indexed", entry.index());
            return Err(LogError::corrupt(&run.path, loc.offset, reason));
        }
        out.push(entry);
        pos += loc.len as usize;
    }
    Ok(())
}

/// Converts a range to half-open `[start, end)` bounds.
fn to_half_open(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned + Clone,
    VoteOf<C>: Serialize + DeserializeOwned,
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    /// Reads run synchronously: recent entries come from the cache, older ones are short
    /// positional reads that normally hit the page cache, cheaper than a blocking-pool hop.
    async fn try_get_log_entries<RB>(&mut self, range: RB) -> Result<Vec<C::Entry>, io::Error>
    where
        RB: RangeBounds<u64> + Clone + Debug + OptionalSend,
    {
        let (start, end) = to_half_open(&range);
        Ok(self.read_entries(start, end)?)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        Ok(self.lock().vote.clone())
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned + Clone,
    VoteOf<C>: Serialize + DeserializeOwned,
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let st = self.lock();
        Ok(LogState {
            last_purged_log_id: st.purged.clone(),
            last_log_id: st.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        Ok(self.save_vote_durably(vote).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        Ok(self.save_committed_lazily(committed)?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.lock().committed.clone())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        Ok(self.append_entries(entries.into_iter().collect(), callback)?)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        Ok(self.truncate(last_log_id).await?)
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        Ok(self.purge_upto(log_id).await?)
    }
}
