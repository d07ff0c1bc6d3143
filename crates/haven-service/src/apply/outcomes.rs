//! The journal of first answers to keyed entries since the last save of the apply state.
//!
//! The apply state (with the idempotency table) is saved every [`super::PERSIST_INTERVAL`];
//! after a crash the entries since the last save are delivered to the app again. An app
//! that does not honour `Haven-Index` answers a redelivery differently (`400 UNIQUE
//! constraint failed` where the first delivery got `201`), and recording that answer
//! made this node's idempotency table disagree with every other node's: a client retrying
//! the key here got the 400 as a replay. So each keyed answer is appended here before any
//! client sees it, and a redelivered entry takes its first answer from the journal.
//!
//! One gap remains: a node killed while the app was answering a window has no record of
//! the answers the app gave before the kill. So before a window with keyed entries goes
//! to the app, the journal records that it is being delivered; after a crash, a keyed
//! entry in such a window without a recorded answer is *uncertain*, and its first answer
//! is asked of the peers, which applied it too (`haven_consensus::first_answers::AskPeers`).
//!
//! Like the slots, the journal is written without fsync: the page cache survives a killed
//! process. After a power cut the answers of the last interval rely on the app honouring
//! `Haven-Index`, as the entries themselves do.
//!
//! Records are `haven_frame` frames of postcard [`Record`]s. A torn tail (a crash
//! mid-append) ends the journal at the last whole record.

use std::collections::HashMap;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;

use super::StoredOutcome;

pub const JOURNAL_FILE: &str = "outcomes.journal";
/// A record larger than this is damage, not a record: an app response is bounded far
/// below it by the response size limit.
const MAX_RECORD: usize = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Record {
    /// Entries `first..=last`, some keyed, are going to the app.
    Delivering { first: u64, last: u64 },
    /// The app's first answer to a keyed entry.
    Answer(Answer),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub key: String,
    pub outcome: StoredOutcome,
}

pub struct OutcomeJournal {
    path: PathBuf,
    file: File,
}

/// What the journal knew at start about entries the saved state does not cover.
#[derive(Debug, Default)]
pub struct Recovered {
    /// First answers, by entry index.
    pub answers: HashMap<u64, Answer>,
    /// The last entry that may have reached the app before the crash: a keyed entry up to
    /// here without an answer above is uncertain.
    pub delivered_upto: u64,
}

impl Recovered {
    /// Whether the app may have answered keyed entry `index` before the crash, with no
    /// record of its answer.
    pub fn uncertain(&self, index: u64) -> bool {
        index <= self.delivered_upto && !self.answers.contains_key(&index)
    }

    /// Forgets what the saved state now covers.
    pub fn covered_upto(&mut self, applied: u64) {
        self.answers.retain(|index, _| *index > applied);
        if self.delivered_upto <= applied {
            self.delivered_upto = 0;
        }
    }
}

impl OutcomeJournal {
    /// Opens the journal in `dir` and returns the records of entries after `applied`:
    /// those the app answered before a crash but the saved state does not hold.
    pub fn open(dir: &Path, applied: u64) -> io::Result<(Self, Recovered)> {
        let path = dir.join(JOURNAL_FILE);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (records, whole) = decode(&bytes);
        let mut recovered = Recovered::default();
        for record in records {
            match record {
                Record::Delivering { last, .. } => {
                    recovered.delivered_upto = recovered.delivered_upto.max(last);
                }
                Record::Answer(answer) => {
                    recovered.answers.insert(answer.outcome.index, answer);
                }
            }
        }
        recovered.covered_upto(applied);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        // Appends after a torn tail would be unreachable. The whole records stay: a second
        // crash before the next save needs them again.
        file.set_len(whole as u64)?;
        Ok((Self { path, file }, recovered))
    }

    /// Appends the records in one write.
    pub fn append(&mut self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for record in records {
            let payload = postcard::to_allocvec(record).map_err(io::Error::other)?;
            if payload.len() > MAX_RECORD {
                return Err(io::Error::other("idempotency outcome over 1 GiB"));
            }
            haven_frame::append(&mut bytes, &payload).map_err(io::Error::other)?;
        }
        self.file
            .write_all(&bytes)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }

    /// Empties the journal: called once the saved apply state holds every record in it.
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)
    }
}

/// The whole records at the start of `bytes`, and how many bytes they take; stops at the
/// first torn or damaged one. Damage is not refused: the journal is a best-effort record
/// written without fsync, and what it loses is asked of the peers.
fn decode(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut frames = haven_frame::Frames::new(bytes, MAX_RECORD);
    let mut records = Vec::new();
    loop {
        let whole = frames.offset();
        let body = match frames.next_frame() {
            haven_frame::Next::Body(body) => body,
            haven_frame::Next::End | haven_frame::Next::Torn(_) => return (records, whole),
            haven_frame::Next::Damaged(reason) => {
                tracing::warn!(offset = whole, %reason, "the outcome journal is damaged; using the records before it");
                return (records, whole);
            }
        };
        let Ok(record) = postcard::from_bytes::<Record>(body) else {
            tracing::warn!(
                offset = whole,
                "an outcome journal record does not decode; using the records before it"
            );
            return (records, whole);
        };
        records.push(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_contract::AppResponse;

    fn record(index: u64, status: u16) -> Record {
        Record::Answer(Answer {
            key: format!("key-{index}"),
            outcome: StoredOutcome {
                index,
                time_us: index as i64,
                response: AppResponse {
                    status,
                    headers: Vec::new(),
                    body: bytes::Bytes::from(format!("answer {index}")),
                },
            },
        })
    }

    #[test]
    fn records_after_the_saved_index_come_back_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, recovered) = OutcomeJournal::open(dir.path(), 0).unwrap();
        assert!(recovered.answers.is_empty() && recovered.delivered_upto == 0);
        journal
            .append(&[record(3, 201), record(4, 201), record(5, 201)])
            .unwrap();
        drop(journal);
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, bytes).unwrap();

        let (_journal, recovered) = OutcomeJournal::open(dir.path(), 3).unwrap();
        let indexes: Vec<u64> = recovered.answers.keys().copied().collect();
        assert_eq!(indexes, [4], "3 is saved, 5 was torn");
        assert_eq!(recovered.answers[&4].key, "key-4");
        assert_eq!(recovered.answers[&4].outcome.response.status, 201);
        drop(_journal);
        let (_journal, again) = OutcomeJournal::open(dir.path(), 3).unwrap();
        assert_eq!(
            again.answers.keys().copied().collect::<Vec<_>>(),
            [4],
            "a second crash before a save finds the record again"
        );
    }

    #[test]
    fn a_damaged_record_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = OutcomeJournal::open(dir.path(), 0).unwrap();
        journal.append(&[record(1, 201), record(2, 201)]).unwrap();
        drop(journal);
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (_journal, recovered) = OutcomeJournal::open(dir.path(), 0).unwrap();
        assert_eq!(recovered.answers.keys().copied().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn keyed_entries_of_a_window_cut_short_are_uncertain() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = OutcomeJournal::open(dir.path(), 0).unwrap();
        let delivering = Record::Delivering { first: 5, last: 9 };
        journal.append(&[delivering, record(5, 201)]).unwrap();
        drop(journal);
        let (_journal, recovered) = OutcomeJournal::open(dir.path(), 4).unwrap();
        assert!(!recovered.uncertain(5), "answered");
        assert!(recovered.uncertain(6) && recovered.uncertain(9));
        assert!(!recovered.uncertain(10), "never went to the app");
        let (_journal, saved) = OutcomeJournal::open(dir.path(), 9).unwrap();
        assert!(!saved.uncertain(6), "the saved state covers it");
    }
}
