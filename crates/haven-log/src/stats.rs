//! Counters that make the store's I/O behaviour observable (tests, benchmarks, metrics).

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

/// A snapshot of the store's I/O counters since [`LogStore::open`](crate::LogStore::open).
///
/// `fsyncs` compared with `append_calls` shows group commit at work: many appends share one
/// fsync when they arrive while the previous fsync is running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// `fsync`/`fdatasync` calls on segment, metadata and directory files.
    pub fsyncs: u64,
    /// Log entries written to segment files by the writer thread.
    pub entries_appended: u64,
    /// Bytes written to segment and metadata files (headers included).
    pub bytes_written: u64,
    /// `RaftLogStorage::append` calls accepted.
    pub append_calls: u64,
    /// Batches of queued jobs the writer made durable together (one group commit each).
    pub group_commits: u64,
}

/// Live counters shared by the handles and the writer thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) fsyncs: AtomicU64,
    pub(crate) entries_appended: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) append_calls: AtomicU64,
    pub(crate) group_commits: AtomicU64,
}

impl Counters {
    /// Adds `n` to `counter`; relaxed ordering is enough for statistics.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads all counters.
    pub(crate) fn snapshot(&self) -> LogStats {
        LogStats {
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            entries_appended: self.entries_appended.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            append_calls: self.append_calls.load(Ordering::Relaxed),
            group_commits: self.group_commits.load(Ordering::Relaxed),
        }
    }
}
