//! In-memory view of the log: where every entry lives, a cache of recent entries, and the plan
//! of segment files.
//!
//! All layout decisions (which segment, which offset) are made here, on the caller's side and
//! under one lock, in the same order the jobs are queued to the writer. The writer just executes
//! them. That lets `append` index an entry before it is written, so openraft can read it at once.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::RaftTypeConfig;
use openraft::entry::RaftEntry;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::VoteOf;

use crate::LogError;
use crate::format;
use crate::format::SEGMENT_HEADER_LEN;
use crate::format::SegmentFormat;

/// Where one entry's record is inside its segment (16 bytes per entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// One segment file as the planner sees it (including writes still queued to the writer).
#[derive(Debug)]
pub(crate) struct SegmentInfo {
    /// Index of the last record in the file (may be purged already).
    pub(crate) last_index: u64,
    /// File size once all queued writes are done.
    pub(crate) size: u64,
    /// Read handle, opened on first disk read; positional reads need no seek state.
    pub(crate) reader: Option<Arc<File>>,
    /// How its records are framed; only [`SegmentFormat::Framed`] segments are appended to.
    pub(crate) format: SegmentFormat,
}

/// A cached entry and the writer job that carries it.
struct Cached<E> {
    entry: E,
    bytes: usize,
    seq: u64,
}

/// Recent entries, a contiguous suffix of the log, bounded by encoded bytes.
///
/// Entries whose job the writer has not written yet are never evicted: the disk cannot serve
/// them yet, and openraft may read an entry as soon as `append` returns.
pub(crate) struct Cache<E> {
    first: u64,
    entries: VecDeque<Cached<E>>,
    bytes: usize,
}

impl<E: Clone> Cache<E> {
    fn new() -> Self {
        Cache {
            first: 0,
            entries: VecDeque::new(),
            bytes: 0,
        }
    }

    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn push(&mut self, index: u64, entry: E, bytes: usize, seq: u64) {
        if self.entries.is_empty() || index != self.end() {
            self.entries.clear();
            self.bytes = 0;
            self.first = index;
        }
        self.entries.push_back(Cached { entry, bytes, seq });
        self.bytes += bytes;
    }

    /// Drops entries with index >= `index`.
    fn truncate_from(&mut self, index: u64) {
        while self.end() > index.max(self.first) {
            let Some(c) = self.entries.pop_back() else {
                break;
            };
            self.bytes -= c.bytes;
        }
    }

    /// Drops entries with index <= `index`.
    fn purge_upto(&mut self, index: u64) {
        while self.first <= index {
            let Some(c) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= c.bytes;
            self.first += 1;
        }
    }

    /// Evicts the oldest entries while over `budget`, but only those already written.
    fn evict(&mut self, budget: usize, written_seq: u64) {
        while self.bytes > budget {
            match self.entries.front() {
                Some(c) if c.seq <= written_seq => {
                    self.bytes -= c.bytes;
                    self.entries.pop_front();
                    self.first += 1;
                }
                _ => break,
            }
        }
    }

    /// First index served from the cache for a read of `[start, end)`.
    fn serves_from(&self, start: u64, end: u64) -> u64 {
        if self.entries.is_empty() {
            end
        } else {
            start.max(self.first).min(end)
        }
    }

    fn get(&self, index: u64) -> Option<&E> {
        let i = index.checked_sub(self.first)?;
        self.entries.get(usize::try_from(i).ok()?).map(|c| &c.entry)
    }
}

/// A contiguous run of records in one segment, read with a single positional read.
pub(crate) struct DiskRun {
    pub(crate) file: Arc<File>,
    pub(crate) segment: u64,
    pub(crate) path: PathBuf,
    pub(crate) first_index: u64,
    pub(crate) offset: u64,
    /// Total bytes covered by the run.
    pub(crate) len: u64,
    pub(crate) locs: Vec<Loc>,
    pub(crate) format: SegmentFormat,
}

impl DiskRun {
    /// True if the record `index` at `loc` in `segment` directly follows this run.
    fn extends(&self, segment: u64, index: u64, loc: Loc) -> bool {
        segment == self.segment
            && index == self.first_index + self.locs.len() as u64
            && loc.offset == self.offset + self.len
    }
}

/// What a read needs: disk runs (older entries) followed by cached entries (newer ones).
pub(crate) struct ReadPlan<E> {
    pub(crate) disk: Vec<DiskRun>,
    pub(crate) cached: Vec<E>,
}

/// Where an append's bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AppendPlan {
    pub(crate) segment: u64,
    pub(crate) offset: u64,
    pub(crate) seq: u64,
}

/// File operations that implement a `truncate_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TruncatePlan {
    /// `(segment, new_len)` to cut with `set_len`.
    pub(crate) cut: Option<(u64, u64)>,
    /// Segments to delete.
    pub(crate) remove: Vec<u64>,
}

/// The whole in-memory state guarded by the store's mutex.
pub(crate) struct State<C: RaftTypeConfig> {
    /// Index of `locs[0]`.
    pub(crate) first: u64,
    /// Locations of the present (not purged) entries, in index order.
    pub(crate) locs: VecDeque<Loc>,
    pub(crate) cache: Cache<C::Entry>,
    /// Segment files by first index.
    pub(crate) segments: BTreeMap<u64, SegmentInfo>,
    /// Log id of the last present entry (meaningful only while `locs` is non-empty).
    pub(crate) last_log_id: Option<LogIdOf<C>>,
    pub(crate) vote: Option<VoteOf<C>>,
    pub(crate) committed: Option<LogIdOf<C>>,
    pub(crate) purged: Option<LogIdOf<C>>,
    /// Sequence number of the next writer job (jobs are numbered from 1).
    pub(crate) next_seq: u64,
}

impl<C: RaftTypeConfig> State<C>
where
    C::Entry: Clone,
{
    /// An empty state; recovery fills it.
    pub(crate) fn new() -> Self {
        State {
            first: 0,
            locs: VecDeque::new(),
            cache: Cache::new(),
            segments: BTreeMap::new(),
            last_log_id: None,
            vote: None,
            committed: None,
            purged: None,
            next_seq: 1,
        }
    }

    /// One past the last present entry, if there is one.
    fn end(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.first + self.locs.len() as u64)
    }

    /// Index the next append must start at; `None` if any index is acceptable (empty log).
    pub(crate) fn expected_next(&self) -> Option<u64> {
        self.end()
            .or_else(|| self.purged.as_ref().map(|p| p.index() + 1))
    }

    /// Log id of the last entry, or the last purged one if no entry is present.
    pub(crate) fn last_log_id(&self) -> Option<LogIdOf<C>> {
        if self.locs.is_empty() {
            self.purged.clone()
        } else {
            self.last_log_id.clone()
        }
    }

    /// Records a loaded (already written) entry's location during recovery.
    pub(crate) fn push_loaded(&mut self, index: u64, loc: Loc, log_id: LogIdOf<C>) {
        if self.locs.is_empty() {
            self.first = index;
        }
        self.locs.push_back(loc);
        self.last_log_id = Some(log_id);
    }

    /// Checks that `entries` continue the log without a hole.
    fn check_contiguous(&self, entries: &[(C::Entry, u32)]) -> Result<(), LogError> {
        let mut expected = self.expected_next();
        for (entry, _) in entries {
            let index = entry.index();
            if let Some(e) = expected
                && e != index
            {
                return Err(LogError::Invalid(format!(
                    "append of index {index} would leave a hole (expected {e})"
                )));
            }
            expected = Some(index + 1);
        }
        Ok(())
    }

    /// Picks the segment for a job starting at `first_index`, rotating when the active segment
    /// is full, does not end right before `first_index` (after a purge past its end), or is
    /// in an older format.
    fn choose_segment(&mut self, first_index: u64, segment_bytes: u64) -> u64 {
        if let Some((&key, seg)) = self.segments.last_key_value()
            && seg.size < segment_bytes
            && seg.last_index + 1 == first_index
            && seg.format == SegmentFormat::Framed
        {
            return key;
        }
        self.segments.insert(
            first_index,
            SegmentInfo {
                last_index: first_index,
                size: SEGMENT_HEADER_LEN,
                reader: None,
                format: SegmentFormat::Framed,
            },
        );
        first_index
    }

    /// Indexes and caches `entries` (each with its encoded record length) whose records total
    /// `total_len` bytes, and decides where the writer will put them.
    pub(crate) fn plan_append(
        &mut self,
        entries: Vec<(C::Entry, u32)>,
        total_len: u64,
        segment_bytes: u64,
    ) -> Result<Option<AppendPlan>, LogError> {
        self.check_contiguous(&entries)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        let (Some(first_index), Some(last_index)) = (
            entries.first().map(|(e, _)| e.index()),
            entries.last().map(|(e, _)| e.index()),
        ) else {
            return Ok(None);
        };
        let segment = self.choose_segment(first_index, segment_bytes);
        let Some(seg) = self.segments.get_mut(&segment) else {
            return Err(LogError::Invalid(
                "segment vanished while planning".to_string(),
            ));
        };
        let start = seg.size;
        seg.size += total_len;
        seg.last_index = last_index;
        let mut offset = start;
        for (entry, len) in entries {
            self.push_planned(entry.index(), Loc { offset, len }, entry, seq);
            offset += u64::from(len);
        }
        Ok(Some(AppendPlan {
            segment,
            offset: start,
            seq,
        }))
    }

    fn push_planned(&mut self, index: u64, loc: Loc, entry: C::Entry, seq: u64) {
        if self.locs.is_empty() {
            self.first = index;
        }
        self.locs.push_back(loc);
        self.last_log_id = Some(entry.log_id());
        self.cache.push(index, entry, loc.len as usize, seq);
    }

    /// Evicts cached entries beyond `budget` bytes that the writer has written.
    pub(crate) fn evict(&mut self, budget: usize, written_seq: u64) {
        self.cache.evict(budget, written_seq);
    }

    /// Removes entries after `last` from memory; returns the file operations, or `None` if
    /// nothing is to be removed.
    pub(crate) fn plan_truncate(&mut self, last: Option<LogIdOf<C>>) -> Option<TruncatePlan> {
        let end = self.end()?;
        let cut_index = last.as_ref().map_or(0, |l| l.index() + 1).max(self.first);
        if cut_index >= end {
            return None;
        }
        let loc = self.locs[usize::try_from(cut_index - self.first).ok()?];
        let (&seg_key, _) = self.segments.range(..=cut_index).next_back()?;
        let mut remove: Vec<u64> = self
            .segments
            .range(seg_key + 1..)
            .map(|(k, _)| *k)
            .collect();
        let cut = if loc.offset <= SEGMENT_HEADER_LEN {
            remove.insert(0, seg_key);
            None
        } else {
            Some((seg_key, loc.offset))
        };
        for k in &remove {
            self.segments.remove(k);
        }
        if let Some(seg) = self.segments.get_mut(&seg_key) {
            seg.size = loc.offset;
            seg.last_index = cut_index - 1;
        }
        self.locs
            .truncate(usize::try_from(cut_index - self.first).ok()?);
        self.cache.truncate_from(cut_index);
        self.last_log_id = last;
        Some(TruncatePlan { cut, remove })
    }

    /// Forgets entries up to `upto` and returns the segments that hold only purged entries.
    ///
    /// The active (last) segment is never returned: the writer may still append to it.
    pub(crate) fn plan_purge(&mut self, upto: LogIdOf<C>) -> Vec<u64> {
        let index = upto.index();
        while !self.locs.is_empty() && self.first <= index {
            self.locs.pop_front();
            self.first += 1;
        }
        self.cache.purge_upto(index);
        self.purged = Some(upto);
        let active = self.segments.last_key_value().map(|(k, _)| *k);
        let remove: Vec<u64> = self
            .segments
            .iter()
            .filter(|(k, s)| Some(**k) != active && s.last_index <= index)
            .map(|(k, _)| *k)
            .collect();
        for k in &remove {
            self.segments.remove(k);
        }
        remove
    }

    /// Splits a read of `[start, end)` into disk runs and cached entries.
    pub(crate) fn plan_read(
        &mut self,
        start: u64,
        end: u64,
        seg_dir: &Path,
    ) -> Result<ReadPlan<C::Entry>, LogError> {
        let Some(log_end) = self.end() else {
            return Ok(ReadPlan {
                disk: Vec::new(),
                cached: Vec::new(),
            });
        };
        let start = start.max(self.first);
        let end = end.min(log_end);
        if start >= end {
            return Ok(ReadPlan {
                disk: Vec::new(),
                cached: Vec::new(),
            });
        }
        let cache_from = self.cache.serves_from(start, end);
        let disk = self.plan_disk_runs(start, cache_from, seg_dir)?;
        let cached = (cache_from..end)
            .filter_map(|i| self.cache.get(i).cloned())
            .collect();
        Ok(ReadPlan { disk, cached })
    }

    /// Groups `[start, end)` into runs of adjacent records in the same segment.
    fn plan_disk_runs(
        &mut self,
        start: u64,
        end: u64,
        seg_dir: &Path,
    ) -> Result<Vec<DiskRun>, LogError> {
        let mut runs: Vec<DiskRun> = Vec::new();
        for index in start..end {
            let loc = self.locs[(index - self.first) as usize];
            let seg_key = self.segment_of(index, seg_dir)?;
            if let Some(run) = runs.last_mut()
                && run.extends(seg_key, index, loc)
            {
                run.locs.push(loc);
                run.len += u64::from(loc.len);
                continue;
            }
            let file = self.reader(seg_key, seg_dir)?;
            let format = self
                .segments
                .get(&seg_key)
                .map_or(SegmentFormat::Framed, |seg| seg.format);
            runs.push(DiskRun {
                file,
                segment: seg_key,
                path: format::segment_path(seg_dir, seg_key),
                first_index: index,
                offset: loc.offset,
                len: u64::from(loc.len),
                locs: vec![loc],
                format,
            });
        }
        Ok(runs)
    }

    /// First index of the segment holding `index`.
    fn segment_of(&self, index: u64, seg_dir: &Path) -> Result<u64, LogError> {
        self.segments
            .range(..=index)
            .next_back()
            .map(|(k, _)| *k)
            .ok_or_else(|| LogError::corrupt(seg_dir, 0, format!("no segment holds index {index}")))
    }

    /// The segment's read handle, opened on first use.
    fn reader(&mut self, seg_key: u64, seg_dir: &Path) -> Result<Arc<File>, LogError> {
        let path = format::segment_path(seg_dir, seg_key);
        let seg = self
            .segments
            .get_mut(&seg_key)
            .ok_or_else(|| LogError::corrupt(&path, 0, "segment is not known to the index"))?;
        if let Some(f) = &seg.reader {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(&path).map_err(|e| LogError::io(&path, e))?);
        seg.reader = Some(f.clone());
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use openraft::vote::RaftLeaderIdExt;

    use super::*;

    openraft::declare_raft_types!(T: D = String, R = String);

    fn ent(index: u64) -> (<T as RaftTypeConfig>::Entry, u32) {
        let id = LogIdOf::<T>::new(<T as RaftTypeConfig>::LeaderId::new_committed(1, 1), index);
        (RaftEntry::new_blank(id), 100)
    }

    /// Appends `range` as one job and returns its plan.
    fn append(st: &mut State<T>, range: std::ops::Range<u64>, segment_bytes: u64) -> AppendPlan {
        let entries: Vec<_> = range.map(ent).collect();
        let total = entries.len() as u64 * 100;
        st.plan_append(entries, total, segment_bytes)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn cache_never_evicts_unwritten_entries() {
        let mut c = Cache::new();
        for i in 0..3u64 {
            c.push(i, i, 10, i + 1);
        }
        c.evict(0, 1);
        assert_eq!((c.first, c.entries.len()), (1, 2));
        c.evict(0, 3);
        assert!(c.entries.is_empty());
    }

    #[test]
    fn appends_rotate_when_full_and_reject_holes() {
        let mut st = State::<T>::new();
        assert_eq!(append(&mut st, 0..3, 250).segment, 0);
        let p = append(&mut st, 3..4, 250);
        assert_eq!((p.segment, p.offset), (3, SEGMENT_HEADER_LEN));
        let err = st.plan_append(vec![ent(9)], 100, 250).unwrap_err();
        assert!(err.to_string().contains("hole"), "{err}");
    }

    #[test]
    fn truncate_at_a_segment_start_removes_that_segment() {
        let mut st = State::<T>::new();
        append(&mut st, 0..3, 250);
        append(&mut st, 3..6, 250);
        append(&mut st, 6..9, 250);
        let plan = st.plan_truncate(Some(ent(2).0.log_id())).unwrap();
        assert_eq!(
            plan,
            TruncatePlan {
                cut: None,
                remove: vec![3, 6]
            }
        );
        let plan = st.plan_truncate(Some(ent(0).0.log_id())).unwrap();
        assert_eq!(plan.cut, Some((0, SEGMENT_HEADER_LEN + 100)));
        assert_eq!(st.expected_next(), Some(1));
    }

    #[test]
    fn purge_keeps_the_active_segment_and_rotates_after_it() {
        let mut st = State::<T>::new();
        append(&mut st, 0..3, 250);
        append(&mut st, 3..6, 250);
        assert_eq!(st.plan_purge(ent(4).0.log_id()), vec![0]);
        assert_eq!(st.plan_purge(ent(20).0.log_id()), Vec::<u64>::new());
        assert_eq!(append(&mut st, 21..22, 1 << 20).segment, 21);
    }
}
