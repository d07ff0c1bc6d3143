//! Membership changes on the admin port: add a learner, promote it, remove a node, replace
//! a dead node. Every change goes through openraft's joint consensus; this module decides
//! only whether a change is safe to ask for.
//!
//! Safe means the cluster keeps a working quorum through the change: in the new voter set,
//! more than half must be *healthy*, i.e. the leader itself or a follower that acknowledged
//! a heartbeat recently and whose log is close to the leader's. A change that fails the
//! check is refused with the reason unless the request says `force`.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use openraft::ChangeMembers;
use openraft::Instant as _;
use openraft::rt::WatchReceiver;
use serde::Deserialize;
use serde::Serialize;

use super::AdminError;
use haven_contract::NodeId;
use haven_contract::PeerNode;
use haven_service::apply::Raft;

/// A follower further behind the leader's log than this is not counted as healthy.
pub const HEALTHY_LAG_ENTRIES: u64 = 1_000;
/// A follower silent for longer than this is not counted as healthy.
pub const HEALTHY_SILENCE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddLearner {
    pub id: NodeId,
    pub raft_addr: String,
    pub client_addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeNode {
    pub id: NodeId,
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replace {
    /// The dead voter.
    pub old: NodeId,
    /// Its replacement: a fresh node, possibly with the same id.
    pub new: AddLearner,
    #[serde(default)]
    pub force: bool,
}

/// What every membership call answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MembershipReply {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Log index of the entry that made the change, when one was written.
    pub log_index: Option<u64>,
}

pub type Answer = Result<Json<MembershipReply>, (StatusCode, Json<AdminError>)>;

pub(super) fn refuse(status: StatusCode, error: String, leader_id: Option<NodeId>) -> Answer {
    let mut refusal = AdminError::new(status, error);
    refusal.leader_id = leader_id;
    Err((status, Json(refusal)))
}

/// The current configuration, as the leader sees it.
struct View {
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
    healthy: BTreeSet<NodeId>,
    leader: Option<NodeId>,
}

fn view(raft: &Raft, me: NodeId) -> View {
    let m = raft.metrics().borrow_watched().clone();
    let last = m.last_log_index.unwrap_or(0);
    let mut healthy = BTreeSet::from([me]);
    if let (Some(replication), Some(heartbeat)) = (&m.replication, &m.heartbeat) {
        for (id, matched) in replication {
            let close = matched.is_some_and(|l| l.index + HEALTHY_LAG_ENTRIES >= last);
            let heard = heartbeat
                .get(id)
                .and_then(|t| t.as_ref())
                .is_some_and(|t| t.elapsed() <= HEALTHY_SILENCE);
            if close && heard {
                healthy.insert(*id);
            }
        }
    }
    let membership = m.membership_config.membership();
    View {
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        healthy,
        leader: m.current_leader,
    }
}

/// Why `voters` would not have a healthy majority, if it would not.
fn quorum_problem(voters: &BTreeSet<NodeId>, healthy: &BTreeSet<NodeId>) -> Option<String> {
    let up = voters.intersection(healthy).count();
    if voters.is_empty() {
        return Some("the change would leave no voters".to_string());
    }
    (up * 2 <= voters.len()).then(|| {
        format!(
            "the new voters {voters:?} would have {up} healthy of {} (need {}); healthy now: {healthy:?}",
            voters.len(),
            voters.len() / 2 + 1
        )
    })
}

fn leader_only(raft: &Raft, me: NodeId) -> Result<View, Answer> {
    let view = view(raft, me);
    if view.leader != Some(me) {
        let error = format!(
            "node {me} is not the leader; send membership changes to the leader (node {})",
            view.leader.map_or("unknown".to_string(), |l| l.to_string())
        );
        return Err(refuse(StatusCode::CONFLICT, error, view.leader));
    }
    Ok(view)
}

fn check_quorum(view: &View, voters: &BTreeSet<NodeId>, force: bool) -> Result<(), Answer> {
    match quorum_problem(voters, &view.healthy) {
        Some(problem) if !force => Err(refuse(
            StatusCode::CONFLICT,
            format!("refused, it would lose quorum: {problem}; add \"force\": true to insist"),
            view.leader,
        )),
        _ => Ok(()),
    }
}

fn answer<E: std::fmt::Display>(raft: &Raft, me: NodeId, result: Result<Option<u64>, E>) -> Answer {
    match result {
        Ok(log_index) => {
            let view = view(raft, me);
            Ok(Json(MembershipReply {
                voters: view.voters.into_iter().collect(),
                learners: view.learners.into_iter().collect(),
                log_index,
            }))
        }
        Err(e) => refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None),
    }
}

/// Both addresses of a joining node must be `host:port`, as in the config's `[[peers]]`:
/// anything else would be replicated into the membership and dialled for ever.
fn check_addresses(request: &AddLearner) -> Result<(), Answer> {
    for (key, value) in [
        ("raft_addr", &request.raft_addr),
        ("client_addr", &request.client_addr),
    ] {
        if let Err(reason) = haven_contract::check_peer_addr(value) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("{key}: {reason}"),
                None,
            ));
        }
    }
    Ok(())
}

fn peer(request: &AddLearner) -> PeerNode {
    PeerNode {
        raft_addr: request.raft_addr.clone(),
        client_addr: request.client_addr.clone(),
    }
}

/// Starts replicating to a new non-voting member; returns without waiting for it to catch
/// up (the status of the learner shows its progress).
pub async fn add_learner(raft: Raft, me: NodeId, request: AddLearner) -> Answer {
    let raft = &raft;
    if let Err(refused) = check_addresses(&request) {
        return refused;
    }
    if let Err(refused) = leader_only(raft, me) {
        return refused;
    }
    let result = raft.add_learner(request.id, peer(&request), false).await;
    answer(raft, me, result.map(|r| Some(r.log_id.index)))
}

/// Makes a learner a voter; refused while it is not caught up, unless forced.
pub async fn promote(raft: Raft, me: NodeId, request: ChangeNode) -> Answer {
    let raft = &raft;
    let view = match leader_only(raft, me) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    if !view.learners.contains(&request.id) {
        let error = format!("node {} is not a learner; add it first", request.id);
        return refuse(StatusCode::CONFLICT, error, view.leader);
    }
    let mut voters = view.voters.clone();
    voters.insert(request.id);
    if let Err(refused) = check_quorum(&view, &voters, request.force) {
        return refused;
    }
    let change = ChangeMembers::AddVoterIds(BTreeSet::from([request.id]));
    let result = raft.change_membership(change, false).await;
    answer(raft, me, result.map(|r| Some(r.log_id.index)))
}

/// Removes a voter or a learner from the cluster.
pub async fn remove(raft: Raft, me: NodeId, request: ChangeNode) -> Answer {
    let raft = &raft;
    let view = match leader_only(raft, me) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let ids = BTreeSet::from([request.id]);
    let change = if view.voters.contains(&request.id) {
        let mut voters = view.voters.clone();
        voters.remove(&request.id);
        if let Err(refused) = check_quorum(&view, &voters, request.force) {
            return refused;
        }
        ChangeMembers::RemoveVoters(ids)
    } else if view.learners.contains(&request.id) {
        ChangeMembers::RemoveNodes(ids)
    } else {
        let error = format!("node {} is not a member", request.id);
        return refuse(StatusCode::NOT_FOUND, error, view.leader);
    };
    let result = raft.change_membership(change, false).await;
    answer(raft, me, result.map(|r| Some(r.log_id.index)))
}

/// Replaces a dead voter with a fresh node. A new id joins as a learner, catches up, and
/// takes the old voter's place in one joint change; the same id keeps its seat, its
/// address is updated, and the leader brings the fresh node up from a checkpoint and the
/// log.
pub async fn replace(raft: Raft, me: NodeId, request: Replace) -> Answer {
    let raft = &raft;
    if let Err(refused) = check_addresses(&request.new) {
        return refused;
    }
    let view = match leader_only(raft, me) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    if !view.voters.contains(&request.old) {
        let error = format!("node {} is not a voter", request.old);
        return refuse(StatusCode::NOT_FOUND, error, view.leader);
    }
    if request.old == me {
        let error = "the leader cannot replace itself; transfer leadership first".to_string();
        return refuse(StatusCode::CONFLICT, error, view.leader);
    }
    if request.new.id == request.old {
        let nodes = BTreeMap::from([(request.old, peer(&request.new))]);
        let result = raft
            .change_membership(ChangeMembers::SetNodes(nodes), false)
            .await;
        return answer(raft, me, result.map(|r| Some(r.log_id.index)));
    }
    let mut voters = view.voters.clone();
    voters.remove(&request.old);
    // The replacement counts once it has caught up, which `add_learner` waits for.
    if let Err(refused) = check_quorum(&view, &voters, request.force) {
        return refused;
    }
    if let Err(e) = raft
        .add_learner(request.new.id, peer(&request.new), true)
        .await
    {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), view.leader);
    }
    voters.insert(request.new.id);
    let result = raft
        .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
        .await;
    answer(raft, me, result.map(|r| Some(r.log_id.index)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_addresses_must_be_host_and_port() {
        let request = |raft_addr: &str, client_addr: &str| AddLearner {
            id: 4,
            raft_addr: raft_addr.to_string(),
            client_addr: client_addr.to_string(),
        };
        assert!(check_addresses(&request("127.0.0.1:9004", "[::1]:8004")).is_ok());
        assert!(check_addresses(&request("haven-3.haven:9001", "haven-3.haven:8001")).is_ok());
        for (raft, client, bad) in [
            (
                "not-an-address",
                "127.0.0.1:8004",
                "raft_addr: `not-an-address` is not host:port (no port)",
            ),
            (
                "127.0.0.1:9004",
                "127.0.0.1",
                "client_addr: `127.0.0.1` is not host:port (no port)",
            ),
            (
                "127.0.0.1:99999",
                "127.0.0.1:8004",
                "raft_addr: `127.0.0.1:99999` is not host:port (the port must be 1 to 65535)",
            ),
        ] {
            let Err(Err((status, Json(error)))) = check_addresses(&request(raft, client)) else {
                panic!("{raft} {client} accepted");
            };
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(error.message, bad);
        }
    }

    #[test]
    fn quorum_needs_a_healthy_majority_of_the_new_voters() {
        let healthy = BTreeSet::from([1, 2]);
        assert_eq!(quorum_problem(&BTreeSet::from([1, 2, 3]), &healthy), None);
        assert_eq!(quorum_problem(&BTreeSet::from([1, 2]), &healthy), None);
        assert_eq!(
            quorum_problem(&BTreeSet::from([1, 3, 4]), &healthy).unwrap(),
            "the new voters {1, 3, 4} would have 1 healthy of 3 (need 2); healthy now: {1, 2}"
        );
        assert_eq!(
            quorum_problem(&BTreeSet::from([1, 2, 3, 4]), &healthy).unwrap(),
            "the new voters {1, 2, 3, 4} would have 2 healthy of 4 (need 3); healthy now: {1, 2}"
        );
        assert!(quorum_problem(&BTreeSet::new(), &healthy).is_some());
    }
}
