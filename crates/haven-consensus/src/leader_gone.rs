//! A follower that loses its leader's connection finds out at once whether the leader is
//! gone, instead of waiting out the leader's lease.
//!
//! openraft makes a follower that heard from its leader within `election_timeout_max` (the
//! lease) refuse to vote, and campaign only after the lease and one election timeout:
//! 650–800 ms of silence with the default timing, most of the write unavailability after
//! a leader crash. The kernel closes a dead process's sockets, so its followers see the
//! leader's connections end at once. A connection can also end while the leader lives (a
//! silent one closed by the link, a service removed), so the follower then dials the
//! leader's raft port: only a refused dial, no process listening there, counts as gone.
//! The follower then drops its own lease on that leader (openraft's leader-transfer
//! message, from the dead leader's vote to the dead leader itself: the lease is reset and
//! nobody is told to campaign), and the followers campaign with pre-vote in the order of
//! their node ids, [`STAGGER`] apart, so they do not split the vote.
//!
//! Why it is safe: the lease promises a leader that no other leader is elected while it
//! answers reads on the strength of it; a node whose raft port refuses connections
//! answers none (a node closes its raft port only after its services' Raft has shut down,
//! `haven_node::node`). Each voter drops the lease only on its own evidence; a restarted
//! leader never resumes leadership without an election (`enable_leader_restore` is off,
//! see [`crate::raft_config`]), and the next leader's vote arms the lease again. The
//! assumption: a refused connection means no process listens, which a firewall answering
//! with resets between the nodes (`REJECT --reject-with tcp-reset`) would break.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::raft::TransferLeaderRequest;
use openraft::rt::WatchReceiver;

use crate::net::Dial;
use crate::types::HavenStateMachine;
use crate::types::RaftOf;
use crate::types::Vote;
use haven_contract::NodeId;

/// A refusal comes back within a round trip; a dial still pending after this long is not
/// one (the leader's host may be down, or just slow), and the lease is kept.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Dials of the leader before it counts as alive, [`PROBE_EVERY`] apart: a dying process's
/// connections can end before its listening socket is closed, and a dial in between is
/// still accepted (seen: one follower in five saw its leader's raft port accept after
/// the connection from it had ended).
const PROBES: u32 = 3;
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// Between the first follower's campaign and the next one's: the first wins within a few
/// round trips unless its log is behind, and a second campaign meanwhile would split the
/// vote.
pub const STAGGER: Duration = Duration::from_millis(100);
/// How often a follower with no leader asks for another pre-vote round: the other
/// followers refuse while they have not yet seen the leader go themselves.
const CAMPAIGN_RETRY: Duration = Duration::from_millis(20);
/// After this, openraft's own election timer takes over.
const CAMPAIGN_FOR: Duration = Duration::from_secs(1);

/// Called when a connection from `peer` ended: if `peer` leads this follower and its raft
/// port refuses connections, drops the lease on it and campaigns.
pub async fn check<SM: HavenStateMachine>(
    raft: RaftOf<SM>,
    me: NodeId,
    peer: NodeId,
    dial: Arc<dyn Dial>,
) {
    let Some(leader) = following(&raft, me, peer) else {
        return;
    };
    if !gone(&*dial, &leader.raft_addr).await {
        return;
    }
    tracing::info!(
        leader = peer,
        addr = %leader.raft_addr,
        "the leader's connection ended and its raft port refuses connections; not waiting for its lease"
    );
    let forget = TransferLeaderRequest::new(leader.vote, peer, None);
    if raft.handle_transfer_leader(forget).await.is_err() {
        return;
    }
    tokio::time::sleep(STAGGER * leader.rank).await;
    campaign(&raft, peer).await;
}

/// The leader this node follows, if it is `peer`.
struct Following {
    vote: Vote,
    raft_addr: String,
    /// This node's place among the leader's other voters: when it campaigns.
    rank: u32,
}

fn following<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    me: NodeId,
    peer: NodeId,
) -> Option<Following> {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    if m.state != ServerState::Follower || m.current_leader != Some(peer) {
        return None;
    }
    let membership = &m.membership_config;
    let rank = (membership.voter_ids())
        .filter(|voter| *voter != peer)
        .position(|voter| voter == me)?;
    Some(Following {
        vote: m.vote,
        raft_addr: membership.get_node(&peer)?.raft_addr.clone(),
        rank: u32::try_from(rank).ok()?,
    })
}

/// Whether one of [`PROBES`] dials to `addr` is refused.
async fn gone(dial: &dyn Dial, addr: &str) -> bool {
    for probe in 0..PROBES {
        if probe > 0 {
            tokio::time::sleep(PROBE_EVERY).await;
        }
        if refused(dial, addr).await {
            return true;
        }
    }
    false
}

/// Whether a dial to `addr` is refused: nothing listens there.
async fn refused(dial: &dyn Dial, addr: &str) -> bool {
    match tokio::time::timeout(PROBE_TIMEOUT, dial.dial(addr)).await {
        Ok(Err(e)) => e.kind() == io::ErrorKind::ConnectionRefused,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Pre-vote rounds, while this node follows nobody, until another node than `dead` leads
/// or [`CAMPAIGN_FOR`] has passed. A round in flight as a candidate is left alone.
async fn campaign<SM: HavenStateMachine>(raft: &RaftOf<SM>, dead: NodeId) {
    let new_leader = move |m: &openraft::RaftMetrics<crate::types::TypeConfig>| {
        m.current_leader.is_some_and(|leader| leader != dead)
    };
    let deadline = tokio::time::Instant::now() + CAMPAIGN_FOR;
    while tokio::time::Instant::now() < deadline {
        let follower = {
            let metrics = raft.metrics();
            let m = metrics.borrow_watched();
            if new_leader(&m) {
                return;
            }
            m.state == ServerState::Follower
        };
        if follower && raft.trigger().elect(true).await.is_err() {
            return;
        }
        let _ = (raft.wait(Some(CAMPAIGN_RETRY)))
            .metrics(new_leader, "a new leader")
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Tcp;

    #[tokio::test]
    async fn only_a_port_nobody_listens_on_counts_as_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        assert!(!refused(&Tcp, &addr).await, "a listening port");
        drop(listener);
        assert!(refused(&Tcp, &addr).await, "the same port, closed");
    }
}
