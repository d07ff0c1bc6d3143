//! Loading the log at startup: validate every record, repair a torn tail, refuse corruption.
//!
//! A crash while the writer is mid-batch can leave the *end* of the last segment incomplete:
//! a record cut short, a zero-filled region (the file grew but its data never reached the disk),
//! or a final record whose checksum fails. None of those records was acknowledged (the callback
//! runs only after fsync), so cutting them off is safe. Damage anywhere else means the disk lost
//! acknowledged data; starting anyway could break Raft's guarantees, so it is an error.

use std::fs;
use std::fs::OpenOptions;
use std::path::Path;

use openraft::RaftTypeConfig;
use openraft::entry::RaftEntry;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::VoteOf;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::LogError;
use crate::format;
use crate::format::RECORD_HEADER_LEN;
use crate::format::RecordHeader;
use crate::format::SEGMENT_HEADER_LEN;
use crate::format::SEGMENT_MAGIC;
use crate::format::SegmentFormat;
use crate::fsutil;
use crate::state::Loc;
use crate::state::SegmentInfo;
use crate::state::State;
use crate::stats::Counters;
use crate::writer::COMMITTED_FILE;
use crate::writer::PURGED_FILE;
use crate::writer::VOTE_FILE;

/// Outcome of looking at the bytes at one offset of a segment.
enum Step {
    /// A record with a valid checksum: header and payload.
    Record(RecordHeader),
    /// Looks like an interrupted final write (acceptable only at the end of the last segment).
    Torn(String),
}

/// Reads the metadata files and every segment under `dir` into a fresh [`State`].
pub(crate) fn recover<C>(
    dir: &Path,
    seg_dir: &Path,
    counters: &Counters,
) -> Result<State<C>, LogError>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned + Clone,
    VoteOf<C>: Serialize + DeserializeOwned,
    LogIdOf<C>: Serialize + DeserializeOwned,
{
    fsutil::remove_tmp_files(dir)?;
    let mut st = State::<C>::new();
    st.vote = fsutil::read_meta(dir, VOTE_FILE)?;
    st.purged = fsutil::read_meta(dir, PURGED_FILE)?;
    st.committed = fsutil::read_meta_lenient::<Option<LogIdOf<C>>>(dir, COMMITTED_FILE)?.flatten();
    let keys = list_segments(seg_dir)?;
    let mut loader = Loader {
        st,
        seg_dir,
        counters,
        expected: None,
    };
    if let Some(purged) = &loader.st.purged {
        refuse_last_index(&dir.join(PURGED_FILE), 0, purged.index())?;
    }
    loader.expected = loader.st.purged.as_ref().map(|p| p.index() + 1);
    for (i, &key) in keys.iter().enumerate() {
        loader.load_segment(key, i + 1 == keys.len())?;
    }
    let mut st = loader.st;
    clamp_committed(&mut st);
    tracing::info!(
        dir = %dir.display(),
        segments = st.segments.len(),
        entries = st.locs.len(),
        last = ?st.last_log_id(),
        "log recovered"
    );
    Ok(st)
}

/// A saved `committed` beyond the recovered log cannot be honoured; lower is always safe.
fn clamp_committed<C: RaftTypeConfig>(st: &mut State<C>)
where
    C::Entry: Clone,
{
    let last = st.last_log_id();
    if st.committed.is_some() && st.committed > last {
        tracing::warn!(committed = ?st.committed, last = ?last, "saved committed log id is past the log end; lowering it");
        st.committed = last;
    }
}

/// Segment first indexes in ascending order; foreign files are ignored with a warning.
fn list_segments(seg_dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut keys = Vec::new();
    for entry in fs::read_dir(seg_dir).map_err(|e| LogError::io(seg_dir, e))? {
        let entry = entry.map_err(|e| LogError::io(seg_dir, e))?;
        let name = entry.file_name();
        match name.to_str().and_then(format::parse_segment_file_name) {
            Some(k) => keys.push(k),
            None => {
                tracing::warn!(file = %entry.path().display(), "ignoring unexpected file in the segment directory")
            }
        }
    }
    keys.sort_unstable();
    Ok(keys)
}

/// Walks the segments in order, building the index and checking continuity across them.
struct Loader<'a, C: RaftTypeConfig> {
    st: State<C>,
    seg_dir: &'a Path,
    counters: &'a Counters,
    /// Index the next non-purged entry must have (`None`: any, i.e. nothing seen yet).
    expected: Option<u64>,
}

impl<C> Loader<'_, C>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned + Clone,
{
    fn load_segment(&mut self, key: u64, is_last: bool) -> Result<(), LogError> {
        let path = format::segment_path(self.seg_dir, key);
        let bytes = fs::read(&path).map_err(|e| LogError::io(&path, e))?;
        let Some(format) = self.header(&path, &bytes, is_last)? else {
            return self.remove_torn_segment(&path, "segment header never reached the disk");
        };
        let mut offset = SEGMENT_HEADER_LEN;
        let mut last_index = None;
        while offset < bytes.len() as u64 {
            match step(&bytes, offset, format, &path)? {
                Step::Record(h) => {
                    let index = self.take_record(&path, &bytes, offset, h, key, last_index)?;
                    last_index = Some(index);
                    offset += h.record_len();
                }
                Step::Torn(reason) if is_last => {
                    self.repair_tail(&path, offset, &reason)?;
                    break;
                }
                Step::Torn(reason) => return Err(LogError::corrupt(&path, offset, reason)),
            }
        }
        let end = SegmentEnd {
            last_index,
            size: offset,
            format,
        };
        self.finish_segment(&path, key, end, is_last)
    }

    /// The segment's format by its header; `Ok(None)` if the last segment's header is
    /// missing because its creation was torn.
    fn header(
        &self,
        path: &Path,
        bytes: &[u8],
        is_last: bool,
    ) -> Result<Option<SegmentFormat>, LogError> {
        if let Some(format) = SegmentFormat::of_header(bytes) {
            return Ok(Some(format));
        }
        let torn = bytes.len() < SEGMENT_MAGIC.len() || bytes.iter().all(|b| *b == 0);
        if is_last && torn {
            return Ok(None);
        }
        Err(LogError::corrupt(
            path,
            0,
            "bad segment header (expected HVNLOG02, or HVNLOG01 of an older version)",
        ))
    }

    /// Validates a record's entry and its index, and indexes it unless purged.
    fn take_record(
        &mut self,
        path: &Path,
        bytes: &[u8],
        offset: u64,
        h: RecordHeader,
        key: u64,
        prev: Option<u64>,
    ) -> Result<u64, LogError> {
        let start = offset as usize + RECORD_HEADER_LEN;
        let payload = &bytes[start..offset as usize + h.record_len() as usize];
        let entry: C::Entry = format::decode_payload(&h, payload, path, offset)?;
        let index = entry.index();
        refuse_last_index(path, offset, index)?;
        let want = prev.map_or(key, |p| p + 1);
        if index != want {
            let reason =
                format!("entry index {index} breaks the segment's sequence (expected {want})");
            return Err(LogError::corrupt(path, offset, reason));
        }
        if self.st.purged.as_ref().is_some_and(|p| index <= p.index()) {
            return Ok(index);
        }
        if let Some(e) = self.expected
            && e != index
        {
            let reason = format!("entry index {index} leaves a hole in the log (expected {e})");
            return Err(LogError::corrupt(path, offset, reason));
        }
        let len = u32::try_from(h.record_len())
            .map_err(|_| LogError::corrupt(path, offset, "record longer than 4 GiB"))?;
        self.expected = Some(index + 1);
        let loc = Loc { offset, len };
        self.st.push_loaded(index, loc, entry.log_id());
        Ok(index)
    }

    /// Registers a fully read segment; an empty last segment (torn creation) is removed.
    fn finish_segment(
        &mut self,
        path: &Path,
        key: u64,
        end: SegmentEnd,
        is_last: bool,
    ) -> Result<(), LogError> {
        let SegmentEnd {
            last_index,
            size,
            format,
        } = end;
        let Some(last_index) = last_index else {
            if is_last {
                return self.remove_torn_segment(path, "segment holds no complete record");
            }
            return Err(LogError::corrupt(
                path,
                SEGMENT_HEADER_LEN,
                "segment holds no records",
            ));
        };
        if let Some((_, prev)) = self.st.segments.last_key_value()
            && prev.last_index >= key
        {
            return Err(LogError::corrupt(
                path,
                SEGMENT_HEADER_LEN,
                "segment overlaps the previous one",
            ));
        }
        self.st.segments.insert(
            key,
            SegmentInfo {
                last_index,
                size,
                reader: None,
                format,
            },
        );
        Ok(())
    }

    /// Cuts the torn tail off the last segment, durably.
    fn repair_tail(&self, path: &Path, offset: u64, reason: &str) -> Result<(), LogError> {
        tracing::warn!(file = %path.display(), offset, reason, "repairing torn tail of the log");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| LogError::io(path, e))?;
        f.set_len(offset).map_err(|e| LogError::io(path, e))?;
        f.sync_all().map_err(|e| LogError::io(path, e))?;
        Counters::add(&self.counters.fsyncs, 1);
        Ok(())
    }

    /// Deletes a last segment that never received a complete record.
    fn remove_torn_segment(&self, path: &Path, reason: &str) -> Result<(), LogError> {
        tracing::warn!(file = %path.display(), offset = 0, reason, "removing torn log segment");
        fs::remove_file(path).map_err(|e| LogError::io(path, e))?;
        fsutil::sync_dir(self.seg_dir, self.counters)
    }
}

/// What reading a segment to its end found.
struct SegmentEnd {
    last_index: Option<u64>,
    /// Bytes of the segment that hold whole records (and the header).
    size: u64,
    format: SegmentFormat,
}

/// Classifies the bytes at `offset` of a segment in `format`: a valid record, a torn tail,
/// or corruption.
fn step(bytes: &[u8], offset: u64, format: SegmentFormat, path: &Path) -> Result<Step, LogError> {
    let rest = &bytes[offset as usize..];
    if rest.len() < RECORD_HEADER_LEN {
        return Ok(Step::Torn(format!(
            "record header cut short ({} bytes left)",
            rest.len()
        )));
    }
    let Some(h) = RecordHeader::parse(rest, format) else {
        return Err(LogError::corrupt(
            path,
            offset,
            "a record length that cannot hold its kind byte",
        ));
    };
    if h.is_zero() {
        if all_zero(rest) {
            return Ok(Step::Torn("zero-filled tail".to_string()));
        }
        return Err(LogError::corrupt(
            path,
            offset,
            "zeroed record header inside the log",
        ));
    }
    let end = offset + h.record_len();
    if end > bytes.len() as u64 {
        let reason = format!(
            "record of {} bytes runs past the end of the file",
            h.record_len()
        );
        return Ok(Step::Torn(reason));
    }
    let payload = &bytes[offset as usize + RECORD_HEADER_LEN..end as usize];
    if h.crc_ok(payload) {
        return Ok(Step::Record(h));
    }
    if all_zero(&bytes[end as usize..]) {
        return Ok(Step::Torn(
            "checksum mismatch in the final record".to_string(),
        ));
    }
    Err(LogError::corrupt(path, offset, "checksum mismatch"))
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

/// No real log reaches index `u64::MAX`, and every "next index" computed from it would
/// overflow (a panic with overflow checks on, found by the `entry_codec` fuzz target): a
/// file that claims it is corrupt.
fn refuse_last_index(path: &Path, offset: u64, index: u64) -> Result<(), LogError> {
    if index == u64::MAX {
        return Err(LogError::corrupt(
            path,
            offset,
            "log index u64::MAX is out of range",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::type_config::alias::LogIdOf;
    use openraft::vote::RaftLeaderIdExt;

    use super::*;
    use crate::LogOptions;
    use crate::LogStore;

    openraft::declare_raft_types!(T: D = String, R = String);

    /// Regression for the `entry_codec` fuzz finding: a `purged` file naming index
    /// `u64::MAX` made recovery overflow instead of reporting the file.
    #[test]
    fn purged_index_u64_max_is_corrupt_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let leader = <T as RaftTypeConfig>::LeaderId::new_committed(1, 1);
        let purged = LogIdOf::<T>::new(leader, u64::MAX);
        let meta = format::encode_meta("purged log id", &purged).unwrap();
        std::fs::write(dir.path().join(PURGED_FILE), meta).unwrap();
        let err = LogStore::<T>::open(dir.path(), LogOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            format!(
                "corrupt log record in {} at offset 0: log index u64::MAX is out of range",
                dir.path().join(PURGED_FILE).display()
            )
        );
    }
}
