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
