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

const MAGIC: &[u8; 8] = b"HVNAPPL2";
/// magic, sequence number (u64), payload length (u32), payload CRC32 (u32).
const HEADER_LEN: usize = 24;
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
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&seq.to_le_bytes());
        let len =
            u32::try_from(payload.len()).map_err(|_| io::Error::other("apply state over 4 GiB"))?;
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        bytes.extend_from_slice(payload);
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

fn decode(mut bytes: Vec<u8>) -> Result<(u64, Vec<u8>), String> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
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
    if bytes.len() - HEADER_LEN < len {
        return Err(format!(
            "truncated: {} payload bytes, header says {len}",
            bytes.len() - HEADER_LEN
        ));
    }
    bytes.truncate(HEADER_LEN + len);
    let payload = bytes.split_off(HEADER_LEN);
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
        let mut bad_crc = Vec::from(&MAGIC[..]);
        bad_crc.extend_from_slice(&1u64.to_le_bytes());
        bad_crc.extend_from_slice(&1u32.to_le_bytes());
        bad_crc.extend_from_slice(&0u32.to_le_bytes());
        bad_crc.push(b'x');
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
}
