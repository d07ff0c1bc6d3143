//! Leader-side entry points shared by local clients and forwarded ones: proposing an
//! ordered request and producing a read index.

use openraft::LinearizerOption;
use openraft::ReadPolicy;
use openraft::errors::ClientWriteError;
use openraft::impls::ProgressResponder;

use super::wire::ForwardOutcome;
use super::wire::ReadIndexOutcome;
use crate::types::HavenStateMachine;
use crate::types::RaftOf;
use haven_base::config::ReadConfirmation;
use haven_contract::OrderedRequest;

/// Stamps the determinism aids and proposes `req`; answers as soon as the entry is
/// committed on a quorum, without waiting for the leader's own replica to apply it.
pub async fn propose<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    mut req: OrderedRequest,
) -> ForwardOutcome {
    req.time_unix_us = chrono::Utc::now().timestamp_micros();
    req.seed = rand::random();
    let (responder, commit_rx, complete_rx) = ProgressResponder::new();
    if let Err(fatal) = raft.write(req).responder(responder).await {
        tracing::warn!(error = %fatal, "raft stopped; write not proposed");
        return ForwardOutcome::NotLeader { leader: None };
    }
    tokio::select! {
        biased;
        Ok(log_id) = commit_rx => ForwardOutcome::Committed { index: log_id.index },
        complete = complete_rx => match complete {
            Ok(Ok(resp)) => ForwardOutcome::Committed { index: resp.log_id.index },
            Ok(Err(ClientWriteError::ForwardToLeader(f))) => ForwardOutcome::NotLeader { leader: f.leader_id },
            Ok(Err(e)) => ForwardOutcome::Unknown { reason: e.to_string() },
            Err(_) => ForwardOutcome::Unknown { reason: "raft dropped the request".to_string() },
        },
    }
}

/// Confirms leadership (by lease or by a quorum round, see [`ReadConfirmation`]) and
/// returns the index a linearizable read must wait for.
pub async fn read_index<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    reads: ReadConfirmation,
) -> ReadIndexOutcome {
    let option = match reads {
        // A lease too old sends a heartbeat round and waits for it (up to one lease)
        // instead of failing the read, as openraft's plain `LeaseRead` would.
        ReadConfirmation::Lease => LinearizerOption::new(None, true),
        ReadConfirmation::Quorum => ReadPolicy::ReadIndex.into(),
    };
    match raft.get_read_linearizer(option).await {
        Ok(linearizer) => ReadIndexOutcome::Ready {
            index: linearizer.read_log_id().index(),
        },
        Err(e) => match e.forward_to_leader() {
            Some(f) => ReadIndexOutcome::NotLeader {
                leader: f.leader_id,
            },
            None => ReadIndexOutcome::Failed {
                reason: e.to_string(),
            },
        },
    }
}
