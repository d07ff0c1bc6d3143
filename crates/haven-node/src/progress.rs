//! A service's Raft gauges (term, leader, commit and log index, apply and replication
//! lag), set from openraft's own metrics whenever someone reads them: the admin port's
//! scrape and the rule evaluator's round. openraft's values change on every entry, so
//! copying them on each change would cost the write path; copying them on each read
//! costs nothing there.

use openraft::rt::WatchReceiver;

use crate::ingress::Ingress;
use haven_base::metrics::RaftProgress;
use haven_service::apply::Raft;

/// Sets `ingress`'s service gauges from its group as it stands now (zeros on a standby,
/// which runs no group).
pub fn refresh_raft_gauges(ingress: &Ingress) {
    let progress = ingress.raft.as_ref().map(raft_progress).unwrap_or_default();
    ingress
        .metrics
        .set_raft(&progress, ingress.shared.applied_index());
}

fn raft_progress(raft: &Raft) -> RaftProgress {
    let m = raft.metrics().borrow_watched().clone();
    let followers = (m.replication.iter().flatten())
        .filter(|(id, _)| **id != m.id)
        .map(|(id, matched)| (*id, matched.map(|l| l.index)))
        .collect();
    RaftProgress {
        term: m.current_term,
        leader: m.current_leader,
        commit_index: m.local_committed.map(|l| l.index),
        last_log_index: m.last_log_index,
        followers,
    }
}
