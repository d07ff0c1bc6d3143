//! A leader whose own replica stops taking entries hands leadership to a follower.
//!
//! Committed entries reach the replica through a bounded queue (`apply::Handover`). While
//! the app is down the queue fills, openraft's `apply` waits for room, and once openraft's
//! channel to its state machine is full its core waits too: the node stops heartbeating,
//! the others elect a new leader, and the frozen node goes on calling itself leader of the
//! old term while its clients time out, until its app is back. Handing leadership over
//! while the core still runs keeps the cluster under a leader whose replica works; this
//! node then follows, its clients get timeouts with a reason (504 `apply-timeout`), and it
//! catches up when its app returns.
//!
//! A leader that is asked to stop ([`hand_over`]) hands leadership over the same way
//! first, so a planned restart costs the writers one leader transfer instead of an
//! election after the lease and election timeout.

use std::time::Duration;

use openraft::ServerState;
use openraft::rt::WatchReceiver;
use tokio::sync::watch;

use crate::types::HavenStateMachine;
use crate::types::RaftOf;
use haven_base::metrics::Metrics;
use haven_contract::NodeId;

/// How long deliveries must keep failing before the leader hands over. Long enough that a
/// replica restarting (seen in tests: tens of milliseconds) costs no election; short
/// enough that the queue, at 10,000 writes/s about 0.4 s deep, has not filled yet.
pub const FAILING_FOR: Duration = Duration::from_millis(200);
/// Pause after a hand-over before trying again, so the transfer can complete.
const AFTER_HANDOVER: Duration = Duration::from_millis(500);
/// How long a stopping leader waits for its transfer to take before asking again. The
/// target ignores a transfer while its log lacks the leader's last entry (openraft), which
/// under write load it often does when first asked; the leader proposes nothing after the
/// first ask, so the next one finds the target caught up.
const TRANSFER_RETRY: Duration = Duration::from_millis(20);

/// Runs until `shutdown`: whenever deliveries to the local replica have failed for
/// [`FAILING_FOR`] while this node leads, transfers leadership to the most up-to-date
/// other voter.
pub async fn run<SM: HavenStateMachine>(
    raft: RaftOf<SM>,
    id: NodeId,
    mut failing: watch::Receiver<bool>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return,
            changed = failing.wait_for(|failing| *failing) => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if !sleep_unless_shutdown(FAILING_FOR, &mut shutdown).await {
            return;
        }
        if !*failing.borrow() {
            continue;
        }
        if let Some(to) = successor(&raft, id) {
            tracing::warn!(
                to,
                "this node's replica is not taking entries; handing leadership over"
            );
            metrics.leadership_handoffs.inc();
            if let Err(fatal) = raft.trigger().transfer_leader(to).await {
                tracing::warn!(error = %fatal, "raft stopped; no leadership hand-over");
                return;
            }
            if !sleep_unless_shutdown(AFTER_HANDOVER, &mut shutdown).await {
                return;
            }
        }
    }
}

/// False when the node began shutting down instead.
async fn sleep_unless_shutdown(pause: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.wait_for(|stop| *stop) => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// How a stopping node's leadership ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// Not the leader (or no other voter to hand to): nothing to do.
    NotLeader,
    /// Another node leads and this node learnt the commit of every entry it proposed,
    /// so the writes it was committing were answered.
    Done { to: NodeId },
    /// Still leading, or its last entries not known committed, when `within` ran out.
    TimedOut,
}

/// Hands leadership to the most up-to-date other voter and waits, at most `within`, until
/// another node leads and this node's commit index covers its whole log: the entries it
/// proposed are committed by the new leader, and their clients get their answers before
/// this node stops.
pub async fn hand_over<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    id: NodeId,
    within: Duration,
) -> HandOver {
    let deadline = tokio::time::Instant::now() + within;
    if successor(raft, id).is_none() {
        return HandOver::NotLeader;
    }
    let to = loop {
        if let Some(to) = successor(raft, id)
            && raft.trigger().transfer_leader(to).await.is_err()
        {
            return HandOver::TimedOut;
        }
        let wait =
            TRANSFER_RETRY.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let led = raft
            .wait(Some(wait))
            .metrics(
                |m| m.current_leader.is_some_and(|l| l != id),
                "another leader",
            )
            .await;
        if let Ok(m) = led {
            break m.current_leader.unwrap_or(id);
        }
        if tokio::time::Instant::now() >= deadline {
            return HandOver::TimedOut;
        }
    };
    let last = raft.metrics().borrow_watched().last_log_index;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let covered = raft
        .wait(Some(left))
        .metrics(
            |m| m.local_committed.map(|c| c.index) >= last,
            "own entries committed",
        )
        .await;
    match covered {
        Ok(_) => HandOver::Done { to },
        Err(_) => HandOver::TimedOut,
    }
}

/// The other voter whose log matches this leader's furthest, if this node leads.
fn successor<SM: HavenStateMachine>(raft: &RaftOf<SM>, id: NodeId) -> Option<NodeId> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    if m.state != ServerState::Leader {
        return None;
    }
    let replication = m.replication.as_ref()?;
    m.membership_config
        .voter_ids()
        .filter(|voter| *voter != id)
        .max_by_key(|voter| replication.get(voter).cloned().flatten().map(|l| l.index))
}
