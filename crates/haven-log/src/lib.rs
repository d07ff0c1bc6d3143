//! # haven-log: Haven's durable Raft log
//!
//! [`LogStore`] implements openraft's [`RaftLogStorage`] and [`RaftLogReader`] on plain files.
//! It exists because the log is on the critical path of every ordered request: an entry is
//! acknowledged only after a quorum has it on disk, so the log must be crash-safe, must detect
//! corruption instead of serving it, and must not pay one fsync (~5 ms) per entry.
//!
//! ## Design
//!
//! * **Group commit.** One writer thread owns all file writes. `append` encodes the entries on
//!   the caller's task, indexes and caches them (openraft may read them immediately), queues one
//!   job and returns. The writer drains every queued job, writes them, issues **one**
//!   `fdatasync` for the lot and only then reports each append as flushed, in order. Under
//!   load, many appends share one fsync; see [`LogStore::stats`].
//! * **Ordering.** Vote, truncate and purge go through the same queue, so no write can overtake
//!   an earlier one (openraft requires serialized I/O). They wait for their own completion.
//! * **Fail-stop.** After any write or fsync error every later write fails: a retried fsync may
//!   "succeed" after the kernel dropped the dirty pages, which would fake durability.
//! * **Reads.** An in-memory index holds 16 bytes per entry (offset, length); a byte-bounded
//!   cache holds the newest entries. Older ones are read with positional reads and their CRC is
//!   checked again on every read.
//!
//! ## On-disk format, version 1
//!
//! ```text
//! dir/
//!   segments/{first_index:020}.seg   log entries, named after their first entry's index
//!   vote                             last vote (durable before save_vote returns)
//!   committed                        last committed log id (a hint: not fsynced, damage ignored)
//!   purged                           last purged log id (durable before segments are deleted)
//! ```
//!
//! **Segment file**: the 8-byte header `HVNLOG02` (format name + version 02), followed by
//! records, each a `haven_frame` frame whose body is a kind byte and a payload. All
//! integers are little-endian.
//!
//! ```text
//! record := len: u32 | crc: u32 | kind: u8 | payload: [u8; len - 1]
//!   len      body length in bytes: the kind byte and the payload
//!   crc      CRC-32 (IEEE, crc32fast) of the body, kind followed by payload
//!   kind     1 = Raft log entry; every other value is reserved and rejected
//!   payload  postcard encoding of the openraft entry (`C::Entry`)
//! ```
//!
//! A segment with the header `HVNLOG01` was written by an older version: the same bytes,
//! except that `len` counts the payload only. It is read and never appended to: the
//! next append after opening such a log starts a new segment, and the old segments go
//! with the log's purges.
//!
//! Entry indexes are contiguous inside a segment and the first record's index equals the file
//! name. A new segment starts when the current one has reached `segment_bytes` (checked between
//! appends, so a segment may exceed it by one append), or when the next entry does not follow
//! the segment's last one (after a purge past the end of the log).
//!
//! **Metadata file** (`vote`, `committed`, `purged`): a `haven_frame` one-value file,
//! `HVNMETA1 | len: u32 | crc: u32 | payload`, where payload is the postcard encoding of the vote, of `Option<LogId>` and of
//! `LogId` respectively and `crc` is the CRC-32 of the payload. Files are replaced atomically by
//! writing `name.tmp`, fsyncing it, renaming it over `name` and fsyncing the directory
//! (`committed` is instead overwritten in place without fsync; it is an optimisation only, so a
//! zero-length one left by a crash counts as absent, and a damaged one is ignored with a warning
//! naming the file and offset).
//!
//! ## Recovery
//!
//! On [`LogStore::open`] every segment is read and every record's CRC, kind, entry decoding and
//! index continuity are checked. A torn tail of the **last** segment is cut off with a warning:
//! a record header or payload that runs past the end of the file, an all-zero tail, or a
//! checksum failure followed only by zeros (or by nothing). Any other damage, including in
//! earlier segments, the `vote` and `purged` files or a segment header, is
//! [`LogError::Corrupt`] naming the file and byte offset, and the store refuses to open. (A corrupted `len` field in the last
//! segment that points past the end of the file is indistinguishable from a torn write and is
//! treated as one.)
//!
//! Platform: Unix only (positional reads and writes via `std::os::unix::fs::FileExt`).

mod error;
mod format;
mod fsutil;
mod recovery;
mod state;
mod stats;
mod store;
mod writer;

pub use error::LogError;
pub use stats::LogStats;
pub use store::LogOptions;
pub use store::LogStore;

#[cfg(doc)]
use openraft::storage::RaftLogReader;
#[cfg(doc)]
use openraft::storage::RaftLogStorage;
