//! What replicas compare to detect divergence: a digest of this replica's answer to each
//! recent entry, and what the comparison found.
//!
//! Every entry's recorded answer (the one its client gets: status, headers but the
//! volatile and framing ones, body) is hashed as it is applied, into a window of the last
//! [`DIGEST_WINDOW`] entries; an entry that is not a request (blank, membership) counts as
//! an empty answer, so positions line up on every node. The window holds only answers
//! this process recorded itself: it starts empty at start and again when a checkpoint
//! replaces the replica, so entries delivered again after a crash or replayed after a
//! restore are compared by the answers they get now, never mixed with lost ones.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Deserialize;
use serde::Serialize;

use haven_consensus::answer_digests::Digests;
use haven_consensus::answer_digests::MAX_RANGES;
use haven_contract::AppResponse;
use haven_contract::NodeId;

/// Entries whose answers' digests a replica keeps: 512 KiB, several seconds of writes at
/// the highest rates, far more than a comparison round (every second) needs.
pub const DIGEST_WINDOW: usize = 1 << 16;

/// Headers that frame a message rather than answer it; a replica's server may choose
/// them differently for the same body.
const FRAMING_HEADERS: [&str; 2] = ["content-length", "transfer-encoding"];

/// The digest of one answer, without the `volatile` headers (names in lower case); `None`
/// for an entry that is not a request.
pub fn answer_hash(volatile: &[String], answer: Option<&AppResponse>) -> u64 {
    let Some(answer) = answer else {
        return 0;
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update(&answer.status.to_le_bytes());
    for (name, value) in &answer.headers {
        let name = name.as_str();
        if FRAMING_HEADERS.contains(&name) || volatile.iter().any(|v| v == name) {
            continue;
        }
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&(value.len() as u64).to_le_bytes());
        hasher.update(value);
    }
    hasher.update(&answer.body);
    first_u64(hasher.finalize().as_bytes())
}

/// The digests of a replica's recent answers, by log index.
#[derive(Debug, Default)]
pub struct AnswerDigests {
    /// Index of `hashes[0]`.
    start: u64,
    hashes: VecDeque<u64>,
}

impl AnswerDigests {
    /// Adds the digests of the entries from `first` on. Entries that do not follow the
    /// ones held (the replica was replaced by a checkpoint) start the window afresh.
    pub fn record(&mut self, first: u64, hashes: &[u64]) {
        if first != self.next() || self.hashes.is_empty() {
            self.hashes.clear();
            self.start = first;
        }
        self.hashes.extend(hashes);
        let excess = self.hashes.len().saturating_sub(DIGEST_WINDOW);
        self.hashes.drain(..excess);
        self.start += excess as u64;
    }

    /// Forgets every digest: the replica's state was replaced.
    pub fn clear(&mut self) {
        self.hashes.clear();
    }

    /// The index after the last one held.
    pub fn next(&self) -> u64 {
        self.start + self.hashes.len() as u64
    }

    /// The indexes held, `start..next`.
    pub fn held(&self) -> (u64, u64) {
        (self.start, self.next())
    }

    /// The digest of the answers from `first` to `last` (inclusive), if all are held.
    pub fn range(&self, first: u64, last: u64) -> Option<u64> {
        if first < self.start || last >= self.next() || last < first {
            return None;
        }
        let from = (first - self.start) as usize;
        let to = (last - self.start) as usize;
        let mut hasher = blake3::Hasher::new();
        for hash in self.hashes.range(from..=to) {
            hasher.update(&hash.to_le_bytes());
        }
        Some(first_u64(hasher.finalize().as_bytes()))
    }

    /// What a peer asking for `ranges` gets; ranges past [`MAX_RANGES`] are not computed.
    pub fn digests(&self, ranges: &[(u64, u64)]) -> Digests {
        let digests = (ranges.iter().enumerate())
            .map(|(i, &(first, last))| match i < MAX_RANGES {
                true => self.range(first, last),
                false => None,
            })
            .collect();
        Digests {
            start: self.start,
            next: self.next(),
            digests,
        }
    }
}

fn first_u64(bytes: &[u8; 32]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(first)
}

/// A peer whose replica answered an entry differently from this node's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disagreement {
    pub peer: NodeId,
    /// The first entry it answered differently.
    pub index: u64,
    /// Unix time of the detection, in seconds.
    pub detected_at: u64,
}

/// What the comparisons found, as status reports it: the first divergent entry and every
/// peer that disagrees with this node. It stays until the node restarts: a replica that
/// diverged stays diverged until it is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    pub first_index: u64,
    /// This node.
    pub node: NodeId,
    pub disagreements: Vec<Disagreement>,
}

/// The digests and the findings, shared by the delivery task, the raft port and status.
#[derive(Debug)]
pub struct AnswerLedger {
    /// `app.volatile_headers`, in lower case.
    volatile: Vec<String>,
    digests: Mutex<AnswerDigests>,
    found: Mutex<BTreeMap<NodeId, Disagreement>>,
}

impl AnswerLedger {
    pub fn new(volatile: Vec<String>) -> Self {
        Self {
            volatile,
            digests: Mutex::default(),
            found: Mutex::default(),
        }
    }

    pub fn hash(&self, answer: Option<&AppResponse>) -> u64 {
        answer_hash(&self.volatile, answer)
    }

    pub fn lock_digests(&self) -> std::sync::MutexGuard<'_, AnswerDigests> {
        self.digests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_found(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Disagreement>> {
        self.found.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True once `peer` was found to disagree: it is not compared again.
    pub fn disagrees_with(&self, peer: NodeId) -> bool {
        self.lock_found().contains_key(&peer)
    }

    /// Records a disagreement; false if this peer's was already known.
    pub fn record(&self, found: Disagreement) -> bool {
        let mut all = self.lock_found();
        if all.contains_key(&found.peer) {
            return false;
        }
        all.insert(found.peer, found);
        true
    }

    /// What status shows; `None` while every comparison agreed.
    pub fn divergence(&self, node: NodeId) -> Option<Divergence> {
        let all = self.lock_found();
        let first_index = all.values().map(|d| d.index).min()?;
        Some(Divergence {
            first_index,
            node,
            disagreements: all.values().cloned().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> AppResponse {
        AppResponse {
            status,
            headers: (headers.iter())
                .map(|(k, v)| (k.to_string(), bytes::Bytes::from(v.to_string())))
                .collect(),
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn volatile_and_framing_headers_do_not_count_and_the_rest_does() {
        let ledger = AnswerLedger::new(vec!["date".to_string()]);
        let a = answer(201, &[("date", "Mon"), ("content-length", "2")], "42");
        let b = answer(
            201,
            &[("date", "Tue"), ("transfer-encoding", "chunked")],
            "42",
        );
        assert_eq!(ledger.hash(Some(&a)), ledger.hash(Some(&b)));
        let other_body = answer(201, &[], "43");
        let other_status = answer(200, &[], "42");
        let other_header = answer(201, &[("etag", "x")], "42");
        let plain = ledger.hash(Some(&answer(201, &[], "42")));
        assert_eq!(plain, ledger.hash(Some(&a)));
        for different in [other_body, other_status, other_header] {
            assert_ne!(plain, ledger.hash(Some(&different)), "{different:?}");
        }
    }

    #[test]
    fn ranges_are_answered_only_where_every_digest_is_held() {
        let mut digests = AnswerDigests::default();
        digests.record(10, &[1, 2, 3]);
        digests.record(13, &[4]);
        assert_eq!(digests.held(), (10, 14));
        assert!(digests.range(10, 13).is_some());
        assert_eq!(digests.range(9, 13), None);
        assert_eq!(digests.range(12, 14), None);
        assert_ne!(digests.range(10, 12), digests.range(11, 13));
        // A checkpoint put the replica at 99: what came before is not comparable.
        digests.record(100, &[5]);
        assert_eq!(digests.held(), (100, 101));
        assert_eq!(digests.range(10, 10), None);
        let reply = digests.digests(&[(100, 100), (100, 101)]);
        assert_eq!(reply.digests[0], digests.range(100, 100));
        assert_eq!(reply.digests[1], None);
    }

    #[test]
    fn the_window_keeps_the_newest_digests() {
        let mut digests = AnswerDigests::default();
        let hashes: Vec<u64> = (0..DIGEST_WINDOW as u64 + 10).collect();
        digests.record(1, &hashes);
        assert_eq!(digests.held(), (11, DIGEST_WINDOW as u64 + 11));
    }

    #[test]
    fn the_first_divergent_index_is_the_lowest_of_every_peer() {
        let ledger = AnswerLedger::new(Vec::new());
        assert_eq!(ledger.divergence(1), None);
        let found = |peer, index| Disagreement {
            peer,
            index,
            detected_at: 7,
        };
        assert!(ledger.record(found(3, 57)));
        assert!(ledger.record(found(2, 40)));
        assert!(!ledger.record(found(3, 80)), "peer 3 was already known");
        assert!(ledger.disagrees_with(3));
        let divergence = ledger.divergence(1).unwrap();
        assert_eq!(divergence.first_index, 40);
        assert_eq!(
            divergence.disagreements,
            [found(2, 40), found(3, 57)],
            "by peer"
        );
    }
}
