//! `haven-snapshot-frame`: the self-validating two-file snapshot format and
//! the crash-safe restore that Haven's example apps (`haven-logapp`,
//! `haven-treeapp`) share to serve Haven's checkpoint hooks.
//!
//! # Why it exists
//!
//! An app that opts into Haven's **hooks** mode serves `GET /_haven/snapshot`
//! (its whole state, streamed, in a self-validating format of its choosing)
//! and `PUT /_haven/restore` (validate such a body completely, then replace
//! the whole state, surviving a kill at any point); the `haven-logapp` crate
//! docs ("Checkpoint hooks") give the contract. An app whose state is two
//! files needs nothing app-specific for most of that: the framing, the
//! streaming in both directions, the checksums, the staging of the restored
//! files and their commit. This crate does those once; an app supplies its
//! magic, which files, the checks only it can make, and how it reloads its
//! in-memory state. Other apps that opt into hooks mode can reuse it.
//!
//! # The format (version [`VERSION`])
//!
//! A snapshot is two files, framed. All integers are little-endian.
//!
//! | Bytes | Content |
//! |---|---|
//! | 8 | the app's magic (for example `HAVENLOG`) |
//! | 4 | format version, `u32` [`VERSION`] = 1 |
//! | 8 | `A`, the first file's length, `u64` |
//! | 8 | `B`, the second file's length, `u64` |
//! | 4 | CRC-32 (IEEE) of the 28 bytes above, `u32` |
//! | `A` | the first file's bytes |
//! | `B` | the second file's bytes |
//! | 4 | CRC-32 (IEEE) of every byte above, `u32` |
//!
//! The header's own CRC catches garbled lengths before anything is written;
//! the trailer's catches any other damage. A file may be *optional*
//! ([`Part::optional`]): length `0` then means it does not exist.
//!
//! # What it provides
//!
//! - [`Header`] (encode and decode with the app's magic) and [`frame`], a
//!   whole snapshot built in memory.
//! - [`Streamer`]: streams a snapshot from open handles on the two files, in
//!   [`CHUNK_LEN`] chunks, with `Content-Length` set ([`snapshot_response`]).
//! - [`Receiver`]: consumes a restore body chunk by chunk (so a body of any
//!   size needs little memory), writing the two files to temporary copies
//!   while checking the framing and checksum, and feeding the bytes to the
//!   app's [`Inspect`] checks. [`receive`] runs it on a blocking thread while
//!   the body is read. A body that is not a valid snapshot is an [`Invalid`]
//!   whose message is the reason of the `400 invalid snapshot: {reason}`
//!   answer: `truncated`, `bad magic`, `unsupported version {v}`, `header
//!   checksum mismatch`, `lengths overflow`, `trailing bytes after the
//!   checksum`, `checksum mismatch`.
//! - [`Files`] and [`Staged`]: the crash-safe swap. A restore's temporary
//!   files are deleted unless it commits; the commit is a marker file written
//!   atomically (to a temporary name, synced, renamed, the directory synced).
//!   It holds one digit per optional file, `1` if the restored state has it
//!   and `0` if not. Then each temporary file is renamed over its file (or,
//!   for an absent optional file, the old file is deleted), the directory is
//!   synced and the marker removed. At start-up,
//!   [`Files::finish_or_discard`] does those steps again if the marker exists
//!   (they are idempotent), and otherwise deletes any temporary file: a
//!   restore killed at any point leaves the old state or the new one.
//! - [`text`], [`RestoreError`], [`respond`] and [`snapshot_response`]: the
//!   hooks' HTTP answers; [`MALFORMED_HAVEN_INDEXES`] for tests of the
//!   restore's `Haven-Index` check.
//! - Small file helpers both apps need: [`sync_dir`], [`sync_parent_dir`],
//!   [`parent_dir`], [`open_append`], [`read_exact_at`], [`remove_if_present`].

mod format;
mod fsutil;
mod http;
mod receive;
mod stream;
mod swap;

pub use format::{CHUNK_LEN, HEADER_LEN, Header, Invalid, Magic, TRAILER_LEN, VERSION, frame};
pub use fsutil::{
    IoError, open_append, parent_dir, read_exact_at, remove_if_present, sync_dir, sync_parent_dir,
};
pub use http::{MALFORMED_HAVEN_INDEXES, RestoreError, respond, text};
pub use receive::{Chunks, Inspect, ReceiveError, Received, Receiver, receive};
pub use stream::{Source, Streamer, snapshot_response};
pub use swap::{Files, Part, Staged};
