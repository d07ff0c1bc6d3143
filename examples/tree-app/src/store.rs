//! The on-disk formats: CRC-framed [`postcard`] records in `DIR/journal`, and
//! one framed [`Snapshot`] in `DIR/tree.snapshot`.
//!
//! A frame is the payload's length (`u64`, little-endian), its CRC-32
//! (`u32`, little-endian), then the payload. The encoded types are append-only:
//! new enum variants go last, so old journals keep decoding.

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use haven_snapshot_frame::sync_dir;
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

const HEADER_LEN: u64 = 12;

/// Largest payload a journal frame may declare: an op carries at most 1 MiB of
/// data. A larger length is corruption, never a torn write (the header is
/// written whole, in the same `write` as the payload).
const MAX_RECORD_LEN: u64 = 4 << 20;

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

/// Encodes `value` as one frame; `path` is the file it is meant for.
pub(crate) fn frame(path: &Path, value: &impl Serialize) -> Result<Vec<u8>, TreeAppError> {
    let payload = postcard::to_allocvec(value)
        .map_err(|e| io_err(path, "encode a record")(io::Error::other(e)))?;
    let mut frame = Vec::with_capacity(payload.len() + HEADER_LEN as usize);
    frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// What [`read_frame`] found.
enum Frame {
    Payload(Vec<u8>),
    /// No byte left.
    End,
    /// An incomplete last frame, as a killed writer leaves; the reason.
    Torn(String),
    /// Damage no crash explains; the reason.
    Corrupt(String),
}

/// Reads the next frame from `reader`, which holds `remaining` more bytes.
fn read_frame(reader: &mut impl Read, remaining: u64, max_len: u64) -> io::Result<Frame> {
    if remaining == 0 {
        return Ok(Frame::End);
    }
    if remaining < HEADER_LEN {
        return Ok(Frame::Torn(format!(
            "a partial record header of {remaining} bytes"
        )));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    reader.read_exact(&mut header)?;
    let [l0, l1, l2, l3, l4, l5, l6, l7, c0, c1, c2, c3] = header;
    let len = u64::from_le_bytes([l0, l1, l2, l3, l4, l5, l6, l7]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    if len > max_len {
        return Ok(Frame::Corrupt(format!(
            "record length {len} is above {max_len}"
        )));
    }
    let available = remaining - HEADER_LEN;
    if len > available {
        return Ok(Frame::Torn(format!(
            "a record of {len} bytes of which only {available} were written"
        )));
    }
    let Ok(size) = usize::try_from(len) else {
        return Ok(Frame::Corrupt(format!("record length {len} is too large")));
    };
    let mut payload = vec![0; size];
    reader.read_exact(&mut payload)?;
    if crc32fast::hash(&payload) == crc {
        Ok(Frame::Payload(payload))
    } else if len == available {
        Ok(Frame::Torn("a last record with a bad checksum".to_owned()))
    } else {
        Ok(Frame::Corrupt("bad checksum".to_owned()))
    }
}

/// Reads the journal `file` (at `path`) from the start, handing each record to
/// `apply` in order. A torn last record is truncated away with a warning;
/// anything else that is wrong, including a record `apply` refuses (with a
/// reason), is [`TreeAppError::Corrupt`] at that record's offset. Returns the
/// length of the intact journal.
pub(crate) fn replay_journal(
    path: &Path,
    file: &File,
    mut apply: impl FnMut(Record<'static>) -> Result<(), String>,
) -> Result<u64, TreeAppError> {
    let file_len = file
        .metadata()
        .map_err(io_err(path, "stat the journal"))?
        .len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut offset = 0;
    loop {
        let corrupt = |reason| TreeAppError::Corrupt {
            path: path.to_path_buf(),
            offset,
            reason,
        };
        let frame = read_frame(&mut reader, file_len - offset, MAX_RECORD_LEN)
            .map_err(io_err(path, "read the journal"))?;
        match frame {
            Frame::End => return Ok(offset),
            Frame::Torn(reason) => {
                warn!(
                    file = %path.display(),
                    offset,
                    bytes = file_len - offset,
                    reason,
                    "truncating a torn last journal record left by a crash"
                );
                file.set_len(offset)
                    .map_err(io_err(path, "truncate a torn journal record"))?;
                return Ok(offset);
            }
            Frame::Corrupt(reason) => return Err(corrupt(reason)),
            Frame::Payload(payload) => {
                let record = postcard::from_bytes(&payload)
                    .map_err(|e| corrupt(format!("undecodable record: {e}")))?;
                apply(record).map_err(corrupt)?;
                offset += HEADER_LEN + payload.len() as u64;
            }
        }
    }
}

/// Reads the snapshot at `path` with its length in bytes; `None` if there is
/// none. A snapshot is renamed into place whole, so any damage is corruption.
pub(crate) fn read_snapshot(path: &Path) -> Result<Option<(Snapshot<'static>, u64)>, TreeAppError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path, "read the snapshot")(e)),
    };
    let corrupt = |reason| TreeAppError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason,
    };
    let len = bytes.len() as u64;
    let mut rest = bytes.as_slice();
    let payload =
        match read_frame(&mut rest, len, len).map_err(io_err(path, "read the snapshot"))? {
            Frame::Payload(payload) if rest.is_empty() => payload,
            Frame::Payload(_) => return Err(corrupt("bytes after the snapshot".to_owned())),
            Frame::End => return Err(corrupt("empty snapshot".to_owned())),
            Frame::Torn(reason) | Frame::Corrupt(reason) => return Err(corrupt(reason)),
        };
    let snapshot = postcard::from_bytes(&payload)
        .map_err(|e| corrupt(format!("undecodable snapshot: {e}")))?;
    Ok(Some((snapshot, len)))
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

/// Replaces the journal with an empty one, atomically: an empty file is
/// created beside it and renamed over it. Returns the new journal, open for
/// appending. Old handles keep the old journal's bytes.
pub(crate) fn replace_journal(dir: &Path) -> Result<File, TreeAppError> {
    let tmp = dir.join(JOURNAL_TMP_FILE);
    let path = dir.join(JOURNAL_FILE);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp, "remove a stale empty journal")(e)),
    }
    let journal = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io_err(&tmp, "create an empty journal"))?;
    fs::rename(&tmp, &path).map_err(io_err(&path, "rename an empty journal over"))?;
    sync_dir(dir);
    Ok(journal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], max_len: u64) -> Frame {
        let mut reader = bytes;
        read_frame(&mut reader, bytes.len() as u64, max_len).unwrap()
    }

    fn reason(frame: Frame) -> (&'static str, String) {
        match frame {
            Frame::Payload(p) => ("payload", format!("{p:?}")),
            Frame::End => ("end", String::new()),
            Frame::Torn(r) => ("torn", r),
            Frame::Corrupt(r) => ("corrupt", r),
        }
    }

    #[test]
    fn frames_round_trip_and_damage_is_classified() {
        let frame = frame(Path::new("j"), &7u8).unwrap();
        assert_eq!(frame.len(), 13);
        assert_eq!(reason(read(&frame, 10)), ("payload", "[7]".to_owned()));
        assert_eq!(reason(read(&[], 10)).0, "end");
        assert_eq!(
            reason(read(&frame[..5], 10)),
            ("torn", "a partial record header of 5 bytes".to_owned())
        );
        assert_eq!(
            reason(read(&frame[..12], 10)),
            (
                "torn",
                "a record of 1 bytes of which only 0 were written".to_owned()
            )
        );
        assert_eq!(
            reason(read(&frame, 0)),
            ("corrupt", "record length 1 is above 0".to_owned())
        );
        let mut bad = frame.clone();
        bad[12] = 8;
        assert_eq!(
            reason(read(&bad, 10)),
            ("torn", "a last record with a bad checksum".to_owned())
        );
        bad.push(0);
        assert_eq!(
            reason(read(&bad, 10)),
            ("corrupt", "bad checksum".to_owned())
        );
    }
}
