//! Invariants checked while the simulation runs and once it has converged. A violation is
//! recorded with simulated time, never panicked on, so the report can show every one.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use haven_consensus::types::LogId;
use haven_contract::NodeId;
use haven_contract::RequestTag;

use crate::store::SimLog;

/// One acknowledged write: the leader said it committed at `index`.
#[derive(Debug, Clone)]
pub struct Ack {
    pub tag: RequestTag,
    pub index: u64,
    pub at: Duration,
}

/// One read index the leader granted: a read invoked at `invoked` may be served from any
/// replica once it applied `index`.
#[derive(Debug, Clone)]
pub struct ReadGrant {
    pub invoked: Duration,
    pub index: u64,
}

#[derive(Debug, Default)]
pub struct Checker {
    /// What was applied at each index, and by whom first (state machine safety).
    applied: BTreeMap<u64, (String, NodeId)>,
    /// Every (term, leader) seen.
    leaders: BTreeSet<(u64, NodeId)>,
    pub acks: Vec<Ack>,
    pub reads: Vec<ReadGrant>,
    pub unknown_writes: u64,
    pub violations: Vec<String>,
    /// Every observation in order, hashed into the run's fingerprint.
    trace: blake3::Hasher,
    /// The observations themselves, kept when asked for (`--trace`): diffing two runs'
    /// lists shows where they part.
    pub trace_lines: Option<Vec<String>>,
    pub now: Duration,
}

impl Checker {
    fn trace(&mut self, line: &str) {
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
        if let Some(lines) = &mut self.trace_lines {
            lines.push(format!("{:?} {line}", self.now));
        }
    }

    fn violation(&mut self, what: String) {
        self.violations.push(format!("at {:?}: {what}", self.now));
    }

    /// Two nodes must never apply different entries at the same index.
    pub fn observe_apply(&mut self, node: NodeId, log_id: LogId, what: String) {
        self.trace(&format!("apply {node} {log_id} {what}"));
        let what = format!("{what} (term {})", log_id.leader_id.term);
        match self.applied.get(&log_id.index) {
            Some((first, by)) if *first != what => {
                let message = format!(
                    "state machine safety: node {node} applied `{what}` at index {}, node {by} applied `{first}`",
                    log_id.index
                );
                self.violation(message);
            }
            Some(_) => {}
            None => {
                self.applied.insert(log_id.index, (what, node));
            }
        }
    }

    /// Counts elections and checks leader completeness: a new leader's log holds every
    /// write acknowledged so far (each was committed, and Raft elects only a node whose
    /// log holds every committed entry). openraft's leader ids are (term, node) pairs, so
    /// two nodes may both lead one term; each must still be complete.
    pub fn observe_leader(&mut self, term: u64, node: NodeId, log: &SimLog) {
        if !self.leaders.insert((term, node)) {
            return;
        }
        self.trace(&format!("leader {node} term {term}"));
        let missing: Vec<u64> = self
            .acks
            .iter()
            .filter(|ack| log.tag_at(ack.index) != Some(ack.tag))
            .map(|ack| ack.index)
            .collect();
        if let Some(first) = missing.first() {
            let message = format!(
                "leader completeness: leader {node} of term {term} lacks {} acknowledged writes, the first at index {first}",
                missing.len()
            );
            self.violation(message);
        }
    }

    pub fn observe_ack(&mut self, ack: Ack) {
        self.trace(&format!(
            "ack {}:{} at {}",
            ack.tag.origin, ack.tag.seq, ack.index
        ));
        self.acks.push(ack);
    }

    pub fn observe_read(&mut self, grant: ReadGrant) {
        self.trace(&format!("read at {}", grant.index));
        self.reads.push(grant);
    }

    pub fn observe_fault(&mut self, fault: &str) {
        self.trace(&format!("fault {fault}"));
    }

    /// A read index must cover every write acknowledged before the read began
    /// (linearizable reads).
    pub fn check_reads(&mut self) {
        let mut stale = Vec::new();
        for read in &self.reads {
            let missed = self
                .acks
                .iter()
                .filter(|ack| ack.at < read.invoked && ack.index > read.index)
                .map(|ack| ack.index)
                .max();
            if let Some(index) = missed {
                stale.push(format!(
                    "linearizable read: a read begun at {:?} was granted index {}, below write {index} acknowledged before it",
                    read.invoked, read.index
                ));
            }
        }
        for message in stale {
            self.violation(message);
        }
    }

    pub fn elections(&self) -> usize {
        self.leaders.len()
    }

    pub fn fingerprint(&self) -> String {
        self.trace.finalize().to_hex()[..16].to_string()
    }
}
