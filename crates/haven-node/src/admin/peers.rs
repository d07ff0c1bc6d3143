//! Every member of a service's group as this node sees it, for `/status` and the console:
//! a dead node must show as down from whichever node the operator asks, so the view joins
//! the two things a node knows of its peers: its own links' last dial (every node) and the
//! leader's replication progress and last acknowledgement (the leader only).

use openraft::Instant as _;
use serde::Deserialize;
use serde::Serialize;

use haven_base::metrics::PeerMetrics;
use haven_consensus::types::TypeConfig;
use haven_contract::NodeId;

/// A member silent for longer than this, as the leader counts, is shown as down: several
/// heartbeat intervals, so one slow round trip does not flap it.
pub const LEADER_SILENCE_DOWN_MS: u64 = 1_000;

/// One member of the group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerView {
    pub id: NodeId,
    pub raft_addr: String,
    pub client_addr: String,
    /// `leader`, `voter` or `learner`.
    pub role: String,
    /// `up`, `down` or `unknown` (no link to it has been dialed yet and this node does not
    /// lead); this node itself is `up`.
    pub state: String,
    /// Last log index the leader knows it holds (this node leads).
    #[serde(default)]
    pub matched_index: Option<u64>,
    /// Milliseconds since it last acknowledged the leader (this node leads).
    #[serde(default)]
    pub last_ack_ms: Option<u64>,
}

/// The members of the group in `m`'s membership, in id order.
pub fn view(
    me: NodeId,
    m: &openraft::RaftMetrics<TypeConfig>,
    links: &PeerMetrics,
) -> Vec<PeerView> {
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, node)| {
            let id = *id;
            let matched_index = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).copied().flatten())
                .map(|l| l.index);
            let last_ack_ms = m
                .heartbeat
                .as_ref()
                .and_then(|h| h.get(&id).cloned().flatten())
                .map(|at| at.elapsed().as_millis() as u64);
            let role = if m.current_leader == Some(id) {
                "leader"
            } else if voters.contains(&id) {
                "voter"
            } else {
                "learner"
            };
            PeerView {
                id,
                raft_addr: node.raft_addr.clone(),
                client_addr: node.client_addr.clone(),
                role: role.to_string(),
                state: state(id == me, last_ack_ms, link_up(links, &node.raft_addr)).to_string(),
                matched_index,
                last_ack_ms,
            }
        })
        .collect()
}

/// This node's last dial of `addr`: `None` while it has never dialed it.
fn link_up(links: &PeerMetrics, addr: &str) -> Option<bool> {
    // Reading the gauge through `with_label_values` would create the series for a peer
    // this node never dials (a follower does not dial followers); look it up instead.
    links.up_of(addr).map(|up| up == 1)
}

fn state(is_me: bool, last_ack_ms: Option<u64>, link_up: Option<bool>) -> &'static str {
    if is_me {
        return "up";
    }
    // The leader's acknowledgement is the stronger evidence: it is refreshed every
    // heartbeat, while a link's dial state changes only when a dial happens.
    match (last_ack_ms, link_up) {
        (Some(ms), _) => {
            if ms <= LEADER_SILENCE_DOWN_MS {
                "up"
            } else {
                "down"
            }
        }
        (None, Some(true)) => "up",
        (None, Some(false)) => "down",
        (None, None) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leaders_acknowledgement_outweighs_the_link() {
        assert_eq!(state(true, None, Some(false)), "up");
        assert_eq!(state(false, Some(10), Some(false)), "up");
        assert_eq!(
            state(false, Some(LEADER_SILENCE_DOWN_MS + 1), Some(true)),
            "down"
        );
        assert_eq!(state(false, None, Some(true)), "up");
        assert_eq!(state(false, None, Some(false)), "down");
        assert_eq!(state(false, None, None), "unknown");
    }
}
