//! Where the apply state survives restarts: two alternating files, overwritten in place.
//!
//! The obvious write-temp-then-rename makes ext4 flush the new file before the rename
//! (`auto_da_alloc`), 3 to 5 ms here, which stalled the apply loop every time the state was
//! saved. Instead each save overwrites the older of `state.0` and `state.1`; every copy
//! carries a sequence number and a checksum, and loading takes the newest valid copy. A
//! save torn by a crash damages only the copy being written, and the other one is at
//! most one save older, which only widens the suffix Haven redelivers.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;

/// A copy: this magic, then one `haven_frame` frame of the sequence number (u64 LE) and
/// the payload.
const MAGIC: &[u8; 8] = b"HVNAPPL3";
/// The layout before the shared framing: magic, sequence number (u64), payload length
/// (u32), payload CRC32 (u32), payload. Read, never written: the first save after an
/// upgrade goes to the other copy, the second replaces this one.
const MAGIC_V2: &[u8; 8] = b"HVNAPPL2";
const V2_HEADER_LEN: usize = 24;
const SLOT_NAMES: [&str; 2] = ["state.0", "state.1"];

#[derive(Debug, thiserror::Error)]
pub enum ApplyStateError {
    #[error("cannot read apply state {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt apply state: {reasons}")]
    Corrupt { reasons: String },
}

/// The two copies and which one the next save overwrites.
pub struct StateSlots {
    paths: [PathBuf; 2],
    /// Open lazily; a failed write drops the handle so the next save reopens it.
    files: [Option<File>; 2],
    /// Sequence number of the newest copy on disk (0 when there is none).
    seq: u64,
}

impl StateSlots {
    /// Opens the copies in `dir` and returns the newest valid payload, if any copy exists.
    pub fn open(dir: &Path) -> Result<(Self, Option<Vec<u8>>), ApplyStateError> {
        let paths = SLOT_NAMES.map(|name| dir.join(name));
        let mut newest: Option<(u64, Vec<u8>)> = None;
        let mut damaged = Vec::new();
        let mut present = [false; 2];
        for (slot, path) in paths.iter().enumerate() {
            let copy = read_copy(path)?;
            present[slot] = copy.is_some();
            match copy {
                None => {}
                Some(Ok((seq, payload))) if newest.as_ref().is_none_or(|(best, _)| seq > *best) => {
                    newest = Some((seq, payload));
                }
                Some(Ok(_)) => {}
                Some(Err(reason)) => damaged.push(format!("{}: {reason}", path.display())),
            }
        }
        // The first save ever (sequence 1) goes to `state.1`; `state.0` is first written by
        // the second. A damaged `state.1` alone is therefore a torn first save (a crash or a
        // full disk), and the state before it was "nothing applied yet".
        let torn_first_save = present == [false, true];
        if newest.is_none() && !damaged.is_empty() && !torn_first_save {
            return Err(ApplyStateError::Corrupt {
                reasons: damaged.join("; "),
            });
        }
        for reason in &damaged {
            tracing::warn!(%reason, "an apply state copy is damaged (a save torn by a crash or a full disk); using the newest intact one, if any");
        }
        let seq = newest.as_ref().map_or(0, |(seq, _)| *seq);
        let slots = Self {
            paths,
            files: [None, None],
            seq,
        };
        Ok((slots, newest.map(|(_, payload)| payload)))
    }

    /// Saves `payload` over the older copy. No fsync: the page cache survives a killed
    /// process, and after a power cut the log and the apps' `Haven-Index` replay cover
    /// the difference.
    pub fn save(&mut self, payload: &[u8]) -> io::Result<()> {
        let seq = self.seq + 1;
        let slot = (seq % 2) as usize;
        let bytes = encode(seq, payload)?;
        let result = self.overwrite(slot, &bytes);
        if result.is_err() {
            self.files[slot] = None;
        } else {
            self.seq = seq;
        }
        result
    }

    fn overwrite(&mut self, slot: usize, bytes: &[u8]) -> io::Result<()> {
        let file = match self.files[slot].take() {
            Some(file) => file,
            None => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.paths[slot])?,
        };
        file.write_all_at(bytes, 0)?;
        // Trailing bytes of a longer earlier copy are harmless (the header bounds the
        // payload); cutting them keeps the file from only ever growing.
        if file.metadata()?.len() > bytes.len() as u64 {
            file.set_len(bytes.len() as u64)?;
        }
        self.files[slot] = Some(file);
        Ok(())
    }
}

/// A copy's sequence number and payload, or why it cannot be used.
type Copy = Result<(u64, Vec<u8>), String>;

/// `None` if the copy does not exist.
fn read_copy(path: &Path) -> Result<Option<Copy>, ApplyStateError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(decode(bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ApplyStateError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn encode(seq: u64, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(8 + payload.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(payload);
    haven_frame::encode_file(MAGIC, &body).map_err(io::Error::other)
}

fn decode(bytes: Vec<u8>) -> Result<(u64, Vec<u8>), String> {
    match bytes.split_first_chunk::<8>() {
        Some((magic, framed)) if magic == MAGIC => decode_framed(framed),
        Some((magic, _)) if magic == MAGIC_V2 => decode_v2(bytes),
        _ => Err("bad header".to_string()),
    }
}

/// The copy's frame; bytes after it are the tail of a longer earlier copy, cut at the
/// end of the save that a crash interrupted.
fn decode_framed(framed: &[u8]) -> Result<(u64, Vec<u8>), String> {
    if framed.len() < haven_frame::HEADER_LEN + 8 {
        return Err("bad header".to_string());
    }
    let body = haven_frame::decode_prefix(framed).map_err(|damage| damage.reason)?;
    let Some((seq, payload)) = body.split_first_chunk::<8>() else {
        return Err("a frame too short for a sequence number".to_string());
    };
    Ok((u64::from_le_bytes(*seq), payload.to_vec()))
}

fn decode_v2(mut bytes: Vec<u8>) -> Result<(u64, Vec<u8>), String> {
    if bytes.len() < V2_HEADER_LEN {
        return Err("bad header".to_string());
    }
    let field = |range: std::ops::Range<usize>| {
        bytes[range]
            .iter()
            .rev()
            .fold(0u64, |acc, b| acc << 8 | u64::from(*b))
    };
    let seq = field(8..16);
    let len = field(16..20) as usize;
    let crc = field(20..24) as u32;
    if bytes.len() - V2_HEADER_LEN < len {
        return Err(format!(
            "truncated: {} payload bytes, header says {len}",
            bytes.len() - V2_HEADER_LEN
        ));
    }
    bytes.truncate(V2_HEADER_LEN + len);
    let payload = bytes.split_off(V2_HEADER_LEN);
    if crc32fast::hash(&payload) != crc {
        return Err("checksum mismatch".to_string());
    }
    Ok((seq, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(dir: &Path) -> Option<Vec<u8>> {
        StateSlots::open(dir).unwrap().1
    }

    #[test]
    fn newest_copy_wins_and_shrinking_payloads_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(reopen(dir.path()), None);
        let (mut slots, _) = StateSlots::open(dir.path()).unwrap();
        slots.save(b"first, a long payload").unwrap();
        slots.save(b"second").unwrap();
        slots.save(b"third").unwrap();
        assert_eq!(reopen(dir.path()).as_deref(), Some(&b"third"[..]));
        let (mut slots, _) = StateSlots::open(dir.path()).unwrap();
        slots.save(b"fourth").unwrap();
        assert_eq!(reopen(dir.path()).as_deref(), Some(&b"fourth"[..]));
    }

    #[test]
    fn a_torn_copy_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let (mut slots, _) = StateSlots::open(dir.path()).unwrap();
        slots.save(b"older").unwrap();
        slots.save(b"newer").unwrap();
        let newer = dir.path().join("state.0");
        let mut bytes = std::fs::read(&newer).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&newer, &bytes).unwrap();
        assert_eq!(reopen(dir.path()).as_deref(), Some(&b"older"[..]));
    }

    #[test]
    fn a_torn_first_save_means_nothing_was_saved() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.1"), b"").unwrap();
        assert_eq!(reopen(dir.path()), None);
        let (mut slots, _) = StateSlots::open(dir.path()).unwrap();
        slots.save(b"first").unwrap();
        assert_eq!(reopen(dir.path()).as_deref(), Some(&b"first"[..]));
    }

    #[test]
    fn a_lone_damaged_second_copy_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.0"), b"").unwrap();
        let err = StateSlots::open(dir.path()).err().unwrap().to_string();
        let path = dir.path().join("state.0");
        assert_eq!(
            err,
            format!("corrupt apply state: {}: bad header", path.display())
        );
    }

    #[test]
    fn both_copies_damaged_is_an_error_naming_each() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.0"), b"garbage").unwrap();
        let mut bad_crc = encode(1, b"x").unwrap();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 1;
        std::fs::write(dir.path().join("state.1"), &bad_crc).unwrap();
        let err = StateSlots::open(dir.path()).err().unwrap().to_string();
        assert_eq!(
            err,
            format!(
                "corrupt apply state: {}: bad header; {}: checksum mismatch",
                dir.path().join("state.0").display(),
                dir.path().join("state.1").display()
            )
        );
    }

    /// A copy in the layout before the shared framing, as an older Haven wrote it.
    fn v2_copy(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::from(&MAGIC_V2[..]);
        bytes.extend_from_slice(&seq.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn copies_an_older_haven_saved_are_read_and_replaced_by_the_next_saves() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.1"), v2_copy(7, b"seven")).unwrap();
        std::fs::write(dir.path().join("state.0"), v2_copy(8, b"eight")).unwrap();
        let (mut slots, newest) = StateSlots::open(dir.path()).unwrap();
        assert_eq!(newest.as_deref(), Some(&b"eight"[..]));
        slots.save(b"nine").unwrap();
        assert_eq!(reopen(dir.path()).as_deref(), Some(&b"nine"[..]));
        let older = std::fs::read(dir.path().join("state.0")).unwrap();
        assert_eq!(
            &older[..8],
            MAGIC_V2,
            "the other copy is still the old layout"
        );
        slots.save(b"ten").unwrap();
        for name in SLOT_NAMES {
            let copy = std::fs::read(dir.path().join(name)).unwrap();
            assert_eq!(&copy[..8], MAGIC, "{name} is in the new layout");
        }
        assert_eq!(reopen(dir.path()).as_deref(), Some(&b"ten"[..]));
    }

    #[test]
    fn a_copy_with_the_tail_of_a_longer_one_reads_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(1, b"short").unwrap();
        bytes.extend_from_slice(b"tail of a longer earlier copy");
        std::fs::write(dir.path().join("state.1"), &bytes).unwrap();
        assert_eq!(reopen(dir.path()).as_deref(), Some(&b"short"[..]));
    }
}
