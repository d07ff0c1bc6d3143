//! What a replica holds: the [`Tree`], and what it remembers of `Haven-Index`
//! deliveries to answer their replays. Pure and deterministic, like the tree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::store::{Entry, Record};
use crate::tree::{Op, Outcome, Tree};

/// How many of the latest `Haven-Index` outcomes are kept to answer replays.
pub const REPLAY_WINDOW: usize = 4096;

/// The tree with its `Haven-Index` bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) tree: Tree,
    /// Highest `Haven-Index` applied (`0`: none).
    applied: u64,
    /// Outcome of each of the latest [`REPLAY_WINDOW`] indexed requests.
    replies: BTreeMap<u64, Outcome>,
    /// Highest index dropped from `replies` (`0`: none).
    evicted: u64,
}

/// How a state-changing request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Executed {
    /// Applied now (or refused by the model now).
    Fresh(Outcome),
    /// A replayed `Haven-Index`: the outcome of its first delivery.
    Replayed(Outcome),
    /// A replayed `Haven-Index` older than the replay window.
    TooOld(u64),
    /// A `Haven-Index` at most the high-water mark that was never applied here.
    Unrecorded { index: u64, applied: u64 },
}

impl State {
    /// Highest `Haven-Index` applied (`0`: none).
    pub(crate) fn applied(&self) -> u64 {
        self.applied
    }

    /// The answer to a delivery of `index` if it is a replay, `None` if it is new.
    pub(crate) fn replay(&self, index: u64) -> Option<Executed> {
        if index > self.applied {
            return None;
        }
        Some(match self.replies.get(&index) {
            Some(outcome) => Executed::Replayed(outcome.clone()),
            None if index <= self.evicted => Executed::TooOld(index),
            None => Executed::Unrecorded {
                index,
                applied: self.applied,
            },
        })
    }

    /// Makes `outcome` (of `op`, if given, from [`Tree::check`]) happen: commits
    /// `op` if it succeeded, and remembers the outcome under `index`.
    pub(crate) fn record(&mut self, index: Option<u64>, op: Option<Op>, outcome: Outcome) {
        if let (Ok(_), Some(op)) = (&outcome, op) {
            self.tree.commit(op);
        }
        let Some(index) = index else { return };
        self.applied = index;
        self.replies.insert(index, outcome);
        if self.replies.len() > REPLAY_WINDOW
            && let Some((oldest, _)) = self.replies.pop_first()
        {
            self.evicted = oldest;
        }
    }

    /// Re-applies one journal record on open; `Err` says why it cannot be.
    pub(crate) fn replay_record(&mut self, record: Record<'_>) -> Result<(), String> {
        let index = (record.haven_index != 0).then_some(record.haven_index);
        if let Some(i) = index
            && i <= self.applied
        {
            return Err(format!(
                "Haven-Index {i} is not above the {} applied before it",
                self.applied
            ));
        }
        match record.entry {
            Entry::Applied(op) => {
                let op = op.into_owned();
                let outcome = self.tree.check(&op);
                if let Err(e) = &outcome {
                    return Err(format!("journaled change no longer applies: {e}"));
                }
                self.record(index, Some(op), outcome);
            }
            Entry::Rejected(e) => self.record(index, None, Err(e.into_owned())),
        }
        Ok(())
    }

    /// The canonical serialization of the replica, served by `GET /dump`:
    /// compact JSON `{"haven_index":H,"mutations":M,"nodes":[N,...]}` with one
    /// `{"path":P,"version":V,"data":D}` per node in byte order of paths, `D`
    /// the data in lowercase hex. Only `"` and `\` need escaping in a path.
    pub(crate) fn dump(&self) -> String {
        let nodes: Vec<String> = self
            .tree
            .iter()
            .map(|(path, data, version)| {
                format!(
                    "{{\"path\":{},\"version\":{version},\"data\":\"{}\"}}",
                    json_string(path),
                    hex(data)
                )
            })
            .collect();
        format!(
            "{{\"haven_index\":{},\"mutations\":{},\"nodes\":[{}]}}",
            self.applied,
            self.tree.mutations(),
            nodes.join(",")
        )
    }

    /// FNV-1a (64-bit) of [`State::dump`], as 16 lowercase hex digits.
    pub(crate) fn digest(&self) -> String {
        format!("{:016x}", fnv1a64(self.dump().as_bytes()))
    }
}

/// `s` as a JSON string; enough for node paths and names, which are printable
/// ASCII.
pub(crate) fn json_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    data.iter()
        .flat_map(|&b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;
    use crate::tree::{Done, TreeError};

    fn create(path: &str) -> Op {
        Op::Create {
            path: path.to_owned(),
            data: vec![],
        }
    }

    #[test]
    fn replays_answer_the_first_outcome_within_the_window() {
        let mut state = State::default();
        assert_eq!(state.replay(1), None);
        for i in 1..=REPLAY_WINDOW as u64 + 2 {
            // Every other index is skipped, as Haven's own entries would be.
            let index = 2 * i;
            let op = create(&format!("/n{index}"));
            let outcome = state.tree.check(&op);
            state.record(Some(index), Some(op), outcome);
        }
        let top = 2 * (REPLAY_WINDOW as u64 + 2);
        assert_eq!(state.applied(), top);
        assert_eq!(state.replay(top + 1), None);
        assert_eq!(
            state.replay(top),
            Some(Executed::Replayed(Ok(Done::Created {
                path: format!("/n{top}")
            })))
        );
        // Indexes 2 and 4 were evicted; 6 is the oldest kept.
        assert_eq!(state.replay(2), Some(Executed::TooOld(2)));
        assert_eq!(state.replay(4), Some(Executed::TooOld(4)));
        assert!(matches!(state.replay(6), Some(Executed::Replayed(Ok(_)))));
        assert_eq!(
            state.replay(7),
            Some(Executed::Unrecorded {
                index: 7,
                applied: top
            })
        );
        assert_eq!(state.replies.len(), REPLAY_WINDOW);
    }

    #[test]
    fn journal_records_replay_like_live_requests() {
        let mut state = State::default();
        let rejected = Record {
            seq: 0,
            haven_index: 3,
            entry: Entry::Rejected(Cow::Owned(TreeError::NoNode("/a".to_owned()))),
        };
        state.replay_record(rejected).unwrap();
        let applied = Record {
            seq: 1,
            haven_index: 0,
            entry: Entry::Applied(Cow::Owned(create("/a"))),
        };
        state.replay_record(applied).unwrap();
        assert_eq!(state.applied(), 3);
        assert_eq!(
            state.replay(3),
            Some(Executed::Replayed(Err(TreeError::NoNode("/a".to_owned()))))
        );
        let again = Record {
            seq: 2,
            haven_index: 4,
            entry: Entry::Applied(Cow::Owned(create("/a"))),
        };
        assert_eq!(
            state.replay_record(again),
            Err("journaled change no longer applies: node exists: /a".to_owned())
        );
        let stale = Record {
            seq: 2,
            haven_index: 3,
            entry: Entry::Applied(Cow::Owned(Op::Sync)),
        };
        assert_eq!(
            state.replay_record(stale),
            Err("Haven-Index 3 is not above the 3 applied before it".to_owned())
        );
    }

    #[test]
    fn dump_is_canonical_json_and_digest_is_fnv1a() {
        let mut state = State::default();
        state.tree.create("/q\"\\", vec![0, 0xab, 0xff]).unwrap();
        state.record(Some(9), Some(Op::Sync), Ok(Done::Synced { mutations: 1 }));
        assert_eq!(
            state.dump(),
            "{\"haven_index\":9,\"mutations\":1,\"nodes\":[\
             {\"path\":\"/\",\"version\":0,\"data\":\"\"},\
             {\"path\":\"/q\\\"\\\\\",\"version\":0,\"data\":\"00abff\"}]}"
        );
        // Reference values of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            state.digest(),
            format!("{:016x}", fnv1a64(state.dump().as_bytes()))
        );
        assert_eq!(state.digest().len(), 16);
    }
}
