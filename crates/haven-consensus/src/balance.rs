//! Leaders spread over the nodes. Several services on the same nodes each elect their own
//! leader, and nothing in Raft spreads them: every service's leader could land on one
//! node, which then does all the ordering work while the others idle. Every few seconds
//! a node that leads more than its fair share (services ÷ nodes, rounded up) hands one
//! service to a caught-up voter that leads fewer than its share. Each hand-over moves
//! the most loaded node's count down by one and no other node above the share, so the
//! spread settles and then stays put.
//!
//! A node can refuse a leadership it was handed: `step_aside` hands it straight back
//! when the node's app replica is failing. A service that comes back this way within
//! [`BOUNCE_WINDOW`] is not handed to that node again for a backoff that doubles, so the
//! two never play catch.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use openraft::rt::WatchReceiver;
use tokio::sync::watch;
use tokio::time::Instant;

use super::server::Groups;
use crate::types::HavenStateMachine;
use crate::types::RaftOf;
use haven_contract::NodeId;

/// How often a node looks at the spread.
pub const BALANCE_EVERY: Duration = Duration::from_secs(2);
/// A voter further behind the leader's log than this is not handed leadership: it would
/// have to catch up first, and writes would wait meanwhile.
pub const MAX_LAG: u64 = 64;
/// Leadership that comes back this soon after a hand-over was refused by the target.
pub const BOUNCE_WINDOW: Duration = Duration::from_secs(30);
/// A refusing target is left alone this long, doubled for every further refusal.
pub const BOUNCE_BACKOFF: Duration = Duration::from_secs(60);
/// The longest a refusing target is left alone.
pub const BOUNCE_BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// What this node sees of one service's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub service: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub voters: Vec<NodeId>,
    /// Where each voter's log matches the leader's (known only on the leader).
    pub matched: BTreeMap<NodeId, u64>,
    pub last_index: u64,
}

/// The service this node should hand over, and to whom, if it leads more than its share.
/// Nothing moves while any service has no leader (an election is under way).
pub fn choose(
    me: NodeId,
    views: &[GroupView],
    barred: impl Fn(&str, NodeId) -> bool,
) -> Option<(String, NodeId)> {
    let mut led: BTreeMap<NodeId, usize> = BTreeMap::new();
    for view in views {
        *led.entry(view.leader?).or_default() += 1;
    }
    let nodes: BTreeSet<NodeId> = views.iter().flat_map(|v| v.voters.clone()).collect();
    let share = views.len().div_ceil(nodes.len().max(1));
    let count = |id: &NodeId| led.get(id).copied().unwrap_or(0);
    if count(&me) <= share {
        return None;
    }
    views
        .iter()
        .filter(|view| view.leader == Some(me))
        .flat_map(|view| {
            let caught_up = |id: &&NodeId| {
                (view.matched.get(*id)).is_some_and(|m| m + MAX_LAG >= view.last_index)
            };
            (view.voters.iter())
                .filter(|id| **id != me && count(id) < share)
                .filter(caught_up)
                .filter(|id| !barred(&view.service, **id))
                .map(|id| (count(id), *id, view.service.clone()))
        })
        .min()
        .map(|(_, to, service)| (service, to))
}

fn view_of<SM: HavenStateMachine>(service: &str, raft: &RaftOf<SM>) -> GroupView {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    let matched = match (&m.replication, m.state) {
        (Some(replication), ServerState::Leader) => (replication.iter())
            .map(|(id, log_id)| (*id, log_id.as_ref().map_or(0, |l| l.index)))
            .collect(),
        _ => BTreeMap::new(),
    };
    GroupView {
        service: service.to_string(),
        leader: m.current_leader,
        term: m.current_term,
        voters: m.membership_config.voter_ids().collect(),
        matched,
        last_index: m.last_log_index.unwrap_or(0),
    }
}

/// A hand-over this node made.
#[derive(Debug, Clone, Copy)]
struct Handed {
    to: NodeId,
    at: Instant,
    /// The term it was made in: leading again in a later term means it came back.
    term: u64,
}

/// Hand-overs this node made, and the targets that refused them.
#[derive(Default)]
struct Memory {
    /// Per service: its last hand-over, forgotten after [`BOUNCE_WINDOW`].
    handed: BTreeMap<String, Handed>,
    /// Per service and target: until when it is left alone, and the next backoff.
    barred: BTreeMap<(String, NodeId), (Instant, Duration)>,
}

impl Memory {
    /// Notes services that came back soon after a hand-over, and bars their targets.
    fn note_bounces(&mut self, me: NodeId, views: &[GroupView], now: Instant) {
        self.handed
            .retain(|_, handed| now.duration_since(handed.at) <= BOUNCE_WINDOW);
        for view in views.iter().filter(|v| v.leader == Some(me)) {
            let Some(handed) = self.handed.get(&view.service).copied() else {
                continue;
            };
            if view.term <= handed.term {
                continue; // the hand-over is still under way
            }
            self.handed.remove(&view.service);
            let to = handed.to;
            let key = (view.service.clone(), to);
            let backoff = self.barred.get(&key).map_or(BOUNCE_BACKOFF, |(_, b)| *b);
            tracing::warn!(service = %view.service, to, ?backoff, "leadership came back from the node it was handed to; not handing it there again for a while");
            self.barred
                .insert(key, (now + backoff, (backoff * 2).min(BOUNCE_BACKOFF_MAX)));
        }
    }

    fn is_barred(&self, service: &str, to: NodeId, now: Instant) -> bool {
        let key = (service.to_string(), to);
        self.barred.get(&key).is_some_and(|(until, _)| now < *until)
    }
}

/// Runs until `shutdown`: every [`BALANCE_EVERY`], hands over at most one service.
pub async fn run<SM: HavenStateMachine>(
    me: NodeId,
    groups: Arc<Groups<SM>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut memory = Memory::default();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(BALANCE_EVERY) => {}
        }
        let rafts = groups.rafts();
        let views: Vec<GroupView> = rafts
            .iter()
            .map(|(name, raft)| view_of(name, raft))
            .collect();
        let now = Instant::now();
        memory.note_bounces(me, &views, now);
        let Some((service, to)) = choose(me, &views, |s, to| memory.is_barred(s, to, now)) else {
            continue;
        };
        let Some((_, raft)) = rafts.iter().find(|(name, _)| *name == service) else {
            continue;
        };
        let term = views
            .iter()
            .find(|v| v.service == service)
            .map_or(0, |v| v.term);
        tracing::info!(%service, to, "this node leads more than its share of services; handing one over");
        if let Err(fatal) = raft.trigger().transfer_leader(to).await {
            tracing::warn!(%service, error = %fatal, "raft stopped; no hand-over");
            continue;
        }
        memory.handed.insert(service, Handed { to, at: now, term });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(service: &str, leader: NodeId) -> GroupView {
        GroupView {
            service: service.to_string(),
            leader: Some(leader),
            term: 5,
            voters: vec![1, 2, 3],
            matched: [(1, 100), (2, 100), (3, 100)].into(),
            last_index: 100,
        }
    }

    #[test]
    fn a_node_above_its_share_hands_a_service_to_the_least_loaded_voter() {
        let views = [view("a", 1), view("b", 1), view("c", 2)];
        assert_eq!(choose(1, &views, |_, _| false), Some(("a".into(), 3)));
        // Node 2 leads its share; it moves nothing.
        assert_eq!(choose(2, &views, |_, _| false), None);
        // Spread already: nobody moves.
        let spread = [view("a", 1), view("b", 2), view("c", 3)];
        assert!((1..=3).all(|me| choose(me, &spread, |_, _| false).is_none()));
        // Four services on three nodes: a share is two, so 2-1-1 and 2-2-0 stay.
        let four = [view("a", 1), view("b", 1), view("c", 2), view("d", 2)];
        assert!((1..=3).all(|me| choose(me, &four, |_, _| false).is_none()));
    }

    #[test]
    fn nothing_moves_during_an_election_or_to_a_lagging_or_barred_voter() {
        let mut electing = [view("a", 1), view("b", 1), view("c", 1)];
        electing[2].leader = None;
        assert_eq!(choose(1, &electing, |_, _| false), None);

        let mut lagging = [view("a", 1), view("b", 1), view("c", 1)];
        for v in &mut lagging {
            v.matched.insert(2, 100 - MAX_LAG - 1);
        }
        assert_eq!(choose(1, &lagging, |_, _| false), Some(("a".into(), 3)));
        assert_eq!(
            choose(1, &lagging, |s, to| s == "a" && to == 3),
            Some(("b".into(), 3))
        );
        assert_eq!(choose(1, &lagging, |_, to| to == 3), None);
    }

    #[test]
    fn a_service_that_comes_back_soon_bars_its_target_with_a_doubling_backoff() {
        let mut memory = Memory::default();
        let start = Instant::now();
        let soon = start + Duration::from_secs(1);
        let handed = |to| Handed {
            to,
            at: start,
            term: 4,
        };
        memory.handed.insert("a".into(), handed(3));
        // Still leading in the term of the hand-over: it is under way, not refused.
        let mut pending = view("a", 1);
        pending.term = 4;
        memory.note_bounces(1, &[pending], soon);
        assert!(!memory.is_barred("a", 3, soon));
        // Leading again in a later term: refused.
        memory.note_bounces(1, &[view("a", 1)], soon);
        assert!(memory.is_barred("a", 3, start + BOUNCE_BACKOFF));
        assert!(!memory.is_barred("a", 3, start + BOUNCE_BACKOFF * 2));
        assert!(!memory.is_barred("a", 2, soon));
        memory.handed.insert("a".into(), handed(3));
        memory.note_bounces(1, &[view("a", 1)], soon);
        assert!(memory.is_barred("a", 3, start + BOUNCE_BACKOFF * 2));
        // One that comes back late was not refused.
        memory.handed.insert("b".into(), handed(2));
        memory.note_bounces(1, &[view("b", 1)], start + BOUNCE_WINDOW * 2);
        assert!(!memory.is_barred("b", 2, start + BOUNCE_WINDOW * 2));
    }
}
