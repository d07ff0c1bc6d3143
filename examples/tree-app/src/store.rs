//! The on-disk formats, framed by `haven_frame`: `DIR/journal` is
//! [`JOURNAL_MAGIC`] and then one frame per [`postcard`] [`Record`];
//! `DIR/tree.snapshot` is a one-value file (magic `HVNTRES2`) of a [`Snapshot`].
//! The encoded types are append-only: new enum variants go last, so old
//! journals keep decoding.
//!
//! The first version had no magic and framed with a `u64` length ([`legacy`]).
//! Its files are still read, and a data directory holding them is rewritten in
//! the current layout as soon as it is loaded.

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use haven_frame::Next;
use haven_snapshot_frame::{read_exact_at, sync_dir};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::state::State;
use crate::tree::{Op, TreeError};
use crate::{TreeAppError, io_err};

/// Name of the journal inside the data directory.
pub const JOURNAL_FILE: &str = "journal";

/// Name of the snapshot inside the data directory.
pub const SNAPSHOT_FILE: &str = "tree.snapshot";

/// Where a snapshot is written before it is renamed over [`SNAPSHOT_FILE`].
const SNAPSHOT_TMP_FILE: &str = "tree.snapshot.tmp";

/// Where an empty journal is created before it is renamed over [`JOURNAL_FILE`].
const JOURNAL_TMP_FILE: &str = "journal.tmp";

/// The first bytes of a journal: format and version.
pub const JOURNAL_MAGIC: &[u8; 8] = b"HVNTREJ2";

/// The first bytes of a snapshot: format and version.
const SNAPSHOT_MAGIC: &[u8; 8] = b"HVNTRES2";

/// Largest payload a journal frame may declare: an op carries at most 1 MiB of
/// data. A larger length is corruption, never a torn write (the header is
/// written whole, in the same `write` as the payload).
const MAX_RECORD_LEN: usize = 4 << 20;

/// One journal record: a request that changed the tree, or one that carried a
/// `Haven-Index` (whose outcome must survive a restart for its replays).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Record<'a> {
    /// Position in the sequence of all records ever journaled; snapshots
    /// record the next one, so records a snapshot already holds are skipped.
    pub(crate) seq: u64,
    /// The request's `Haven-Index`, `0` if none.
    pub(crate) haven_index: u64,
    pub(crate) entry: Entry<'a>,
}

/// What a [`Record`] holds.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Entry<'a> {
    /// An op that succeeded; replayed through the model on open.
    Applied(Cow<'a, Op>),
    /// An op with a `Haven-Index` that failed: only its error is kept.
    Rejected(Cow<'a, TreeError>),
}

/// The whole state at one point of the journal.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Snapshot<'a> {
    /// The `seq` of the first record the snapshot does not hold.
    pub(crate) next_seq: u64,
    pub(crate) state: Cow<'a, State>,
}

/// Encodes a journal record as one frame; `path` is the journal it is meant for.
pub(crate) fn journal_frame(path: &Path, record: &Record<'_>) -> Result<Vec<u8>, TreeAppError> {
    haven_frame::frame(&encode(path, record)?)
        .map_err(|e| io_err(path, "frame a record")(io::Error::other(e)))
}

/// Encodes a snapshot as a whole file; `path` is the file it is meant for.
pub(crate) fn snapshot_file(path: &Path, snapshot: &Snapshot<'_>) -> Result<Vec<u8>, TreeAppError> {
    haven_frame::encode_file(SNAPSHOT_MAGIC, &encode(path, snapshot)?)
        .map_err(|e| io_err(path, "frame the snapshot")(io::Error::other(e)))
}

fn encode(path: &Path, value: &impl Serialize) -> Result<Vec<u8>, TreeAppError> {
    postcard::to_allocvec(value).map_err(|e| io_err(path, "encode a record")(io::Error::other(e)))
}

/// What a journal holds besides its records: which layout they are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JournalVersion {
    /// [`JOURNAL_MAGIC`], then `haven_frame` frames.
    Current,
    /// No magic, frames of [`legacy`] layout: written before the shared framing.
    Legacy,
}

/// Reads the journal `file` (at `path`) from the start, handing each record to
/// `apply` in order. A torn last record is truncated away with a warning;
/// anything else that is wrong, including a record `apply` refuses (with a
/// reason), is [`TreeAppError::Corrupt`] at that record's offset. Returns the
/// length of the intact journal and its layout; an empty file is a journal of
/// the current layout whose magic is still to be written.
pub(crate) fn replay_journal(
    path: &Path,
    file: &File,
    mut apply: impl FnMut(Record<'static>) -> Result<(), String>,
) -> Result<(u64, JournalVersion), TreeAppError> {
    let file_len = file
        .metadata()
        .map_err(io_err(path, "stat the journal"))?
        .len();
    let version = journal_version(file, file_len).map_err(io_err(path, "read the journal"))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut offset = 0;
    if version == JournalVersion::Current && file_len > 0 {
        let mut magic = [0u8; JOURNAL_MAGIC.len()];
        reader
            .read_exact(&mut magic)
            .map_err(io_err(path, "read the journal"))?;
        offset = magic.len() as u64;
    }
    loop {
        let corrupt = |reason| TreeAppError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason,
        };
        let remaining = file_len - offset;
        let next = match version {
            JournalVersion::Current => {
                haven_frame::read_frame(&mut reader, remaining, MAX_RECORD_LEN)
            }
            JournalVersion::Legacy => {
                legacy::read_frame(&mut reader, remaining, MAX_RECORD_LEN as u64)
            }
        };
        match next.map_err(io_err(path, "read the journal"))? {
            Next::End => return Ok((offset, version)),
            Next::Torn(reason) => {
                warn!(
                    file = %path.display(),
                    offset,
                    bytes = remaining,
                    reason,
                    "truncating a torn last journal record left by a crash"
                );
                file.set_len(offset)
                    .map_err(io_err(path, "truncate a torn journal record"))?;
                return Ok((offset, version));
            }
            Next::Damaged(reason) => return Err(corrupt(reason)),
            Next::Body(payload) => {
                let record = postcard::from_bytes(&payload)
                    .map_err(|e| corrupt(format!("undecodable record: {e}")))?;
                apply(record).map_err(corrupt)?;
                offset += frame_header_len(version) + payload.len() as u64;
            }
        }
    }
}

/// Which layout a journal of `file_len` bytes is in, by its first bytes (a legacy
/// journal's are a record length, far above any limit, so never the magic).
fn journal_version(file: &File, file_len: u64) -> io::Result<JournalVersion> {
    if file_len == 0 {
        return Ok(JournalVersion::Current);
    }
    let mut magic = [0u8; JOURNAL_MAGIC.len()];
    if file_len >= magic.len() as u64 {
        read_exact_at(file, &mut magic, 0)?;
        if &magic == JOURNAL_MAGIC {
            return Ok(JournalVersion::Current);
        }
    }
    Ok(JournalVersion::Legacy)
}

fn frame_header_len(version: JournalVersion) -> u64 {
    match version {
        JournalVersion::Current => haven_frame::HEADER_LEN as u64,
        JournalVersion::Legacy => legacy::HEADER_LEN,
    }
}

/// Reads the snapshot at `path` with its length in bytes and whether it is in the
/// legacy layout; `None` if there is none. A snapshot is renamed into place whole, so
/// any damage is corruption.
pub(crate) fn read_snapshot(path: &Path) -> Result<Option<ReadSnapshot>, TreeAppError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "read the snapshot")(e)),
    };
    let corrupt = |offset, reason| TreeAppError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let legacy = !bytes.starts_with(SNAPSHOT_MAGIC);
    let payload = if legacy {
        legacy::read_whole(&bytes).map_err(|reason| corrupt(0, reason))?
    } else {
        haven_frame::decode_file(SNAPSHOT_MAGIC, &bytes)
            .map_err(|damage| corrupt(damage.offset, damage.reason))?
            .to_vec()
    };
    let snapshot = postcard::from_bytes(&payload)
        .map_err(|e| corrupt(0, format!("undecodable snapshot: {e}")))?;
    Ok(Some(ReadSnapshot {
        snapshot,
        len: bytes.len() as u64,
        legacy,
    }))
}

/// A snapshot as read from disk.
pub(crate) struct ReadSnapshot {
    pub(crate) snapshot: Snapshot<'static>,
    pub(crate) len: u64,
    /// Written before the shared framing: to be rewritten.
    pub(crate) legacy: bool,
}

/// Writes a framed snapshot into `dir` atomically: to a temporary file, synced,
/// then renamed over [`SNAPSHOT_FILE`].
pub(crate) fn write_snapshot(dir: &Path, frame: &[u8]) -> Result<(), TreeAppError> {
    let tmp = dir.join(SNAPSHOT_TMP_FILE);
    let path = dir.join(SNAPSHOT_FILE);
    let mut file = File::create(&tmp).map_err(io_err(&tmp, "create the snapshot"))?;
    file.write_all(frame)
        .map_err(io_err(&tmp, "write the snapshot"))?;
    file.sync_all().map_err(io_err(&tmp, "sync the snapshot"))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err(&path, "rename the new snapshot over"))?;
    sync_dir(dir);
    Ok(())
}

/// Replaces the journal with an empty one, atomically: a journal holding only its
/// magic is created beside it and renamed over it. Returns the new journal, open
/// for appending. Old handles keep the old journal's bytes.
pub(crate) fn replace_journal(dir: &Path) -> Result<File, TreeAppError> {
    let tmp = dir.join(JOURNAL_TMP_FILE);
    let path = dir.join(JOURNAL_FILE);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, "remove a stale empty journal")(e)),
    }
    let mut journal = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err(&tmp, "create an empty journal"))?;
    journal
        .write_all(JOURNAL_MAGIC)
        .map_err(io_err(&tmp, "write the journal's magic"))?;
    fs::rename(&tmp, &path).map_err(io_err(&path, "rename an empty journal over"))?;
    sync_dir(dir);
    Ok(journal)
}

/// The layout before the shared framing: `len: u64 LE | crc32: u32 LE | payload`.
/// Read only, to load a data directory an older version wrote.
pub(crate) mod legacy {
    use std::io::{self, Read};

    use haven_frame::Next;

    pub(super) const HEADER_LEN: u64 = 12;

    /// The next frame of `reader`, which holds `remaining` more bytes.
    pub(super) fn read_frame(
        reader: &mut impl Read,
        remaining: u64,
        max_len: u64,
    ) -> io::Result<Next<Vec<u8>>> {
        if remaining == 0 {
            return Ok(Next::End);
        }
        if remaining < HEADER_LEN {
            return Ok(Next::Torn(format!(
                "a partial record header of {remaining} bytes"
            )));
        }
        let mut header = [0u8; HEADER_LEN as usize];
        reader.read_exact(&mut header)?;
        let [l0, l1, l2, l3, l4, l5, l6, l7, c0, c1, c2, c3] = header;
        let len = u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]);
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        if len > max_len {
            return Ok(Next::Damaged(format!(
                "record length {len} is above {max_len}"
            )));
        }
        let available = remaining - HEADER_LEN;
        if len > available {
            return Ok(Next::Torn(format!(
                "a record of {len} bytes of which only {available} were written"
            )));
        }
        let Ok(size) = usize::try_from(len) else {
            return Ok(Next::Damaged(format!("record length {len} is too large")));
        };
        let mut payload = vec![0; size];
        reader.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) == crc {
            Ok(Next::Body(payload))
        } else if len == available {
            Ok(Next::Torn("a last record with a bad checksum".to_owned()))
        } else {
            Ok(Next::Damaged("bad checksum".to_owned()))
        }
    }

    /// A legacy snapshot: exactly one frame.
    pub(super) fn read_whole(bytes: &[u8]) -> Result<Vec<u8>, String> {
        let len = bytes.len() as u64;
        let mut rest = bytes;
        match read_frame(&mut rest, len, len).map_err(|e| e.to_string())? {
            Next::Body(payload) if rest.is_empty() => Ok(payload),
            Next::Body(_) => Err("bytes after the snapshot".to_owned()),
            Next::End => Err("empty snapshot".to_owned()),
            Next::Torn(reason) | Next::Damaged(reason) => Err(reason),
        }
    }

    /// A legacy frame, as the tests' older data directories hold.
    #[cfg(test)]
    pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(payload.len() + HEADER_LEN as usize);
        frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        frame.extend_from_slice(payload);
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], max_len: u64) -> Next<Vec<u8>> {
        let mut reader = bytes;
        legacy::read_frame(&mut reader, bytes.len() as u64, max_len).unwrap()
    }

    #[test]
    fn legacy_frames_are_read_and_their_damage_classified() {
        let frame = legacy::frame(&[7]);
        assert_eq!(frame.len(), 13);
        assert_eq!(read(&frame, 10), Next::Body(vec![7]));
        assert_eq!(read(&[], 10), Next::End);
        assert_eq!(
            read(&frame[..5], 10),
            Next::Torn("a partial record header of 5 bytes".to_owned())
        );
        assert_eq!(
            read(&frame[..12], 10),
            Next::Torn("a record of 1 bytes of which only 0 were written".to_owned())
        );
        assert_eq!(
            read(&frame, 0),
            Next::Damaged("record length 1 is above 0".to_owned())
        );
        let mut bad = frame.clone();
        bad[12] = 8;
        assert_eq!(
            read(&bad, 10),
            Next::Torn("a last record with a bad checksum".to_owned())
        );
        bad.push(0);
        assert_eq!(read(&bad, 10), Next::Damaged("bad checksum".to_owned()));
    }
}
