//! Leader-side entry points shared by local clients and forwarded ones: proposing an
//! ordered request and producing a read index.

use std::time::Duration;

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
use tokio::sync::watch;

/// What a leader answers forwarded requests by, beside its Raft.
#[derive(Clone)]
pub struct LeaderPolicy {
    pub reads: ReadConfirmation,
    pub durable: Option<DurableGate>,
}

/// For a service with an off-site archive: whether this site may take writes, and,
/// when writes are acknowledged only once archived (`archive.ack = "quorum+archive"`),
/// how far the archive holds the log, confirmed unfenced after the upload (the uploader
/// keeps both), and how long a committed write waits for it.
#[derive(Clone)]
pub struct DurableGate {
    pub durable: watch::Receiver<Durable>,
    /// Whether a write waits for the archive before it is acknowledged.
    pub archive_acks: bool,
    pub wait: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    pub archived: u64,
    /// Why writes are refused here, if they are: another site took the service over, or
    /// no upload succeeded for `archive.fence_after_s`.
    pub refusal: Option<String>,
}

impl DurableGate {
    /// `Committed` once the archive holds `index`; otherwise the outcome is unknown to the
    /// client: committed here, maybe lost with the site.
    async fn covered(&self, index: u64) -> ForwardOutcome {
        let mut durable = self.durable.clone();
        let covered = durable.wait_for(|d| d.archived >= index || d.refusal.is_some());
        match tokio::time::timeout(self.wait, covered).await {
            Ok(Ok(d)) if d.archived >= index => ForwardOutcome::Committed { index },
            Ok(Ok(d)) => ForwardOutcome::Unknown {
                reason: format!(
                    "committed at index {index} here, but writes were refused before the archive held it: {}",
                    d.refusal.as_deref().unwrap_or_default()
                ),
            },
            Ok(Err(_)) => ForwardOutcome::Unknown {
                reason: format!(
                    "committed at index {index}, but the service stopped before the archive held it"
                ),
            },
            Err(_) => ForwardOutcome::Unknown {
                reason: format!(
                    "committed at index {index}, but not archived within {} ms (archive.ack = \"quorum+archive\"): is the object store reachable, or is this site fenced?",
                    self.wait.as_millis()
                ),
            },
        }
    }
}

/// Stamps the determinism aids and proposes `req`; answers as soon as the entry is
/// committed on a quorum (and archived, behind a `durable` gate), without waiting for the
/// leader's own replica to apply it.
pub async fn propose<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    req: OrderedRequest,
    durable: Option<&DurableGate>,
) -> ForwardOutcome {
    if let Some(reason) = durable.and_then(|gate| gate.durable.borrow().refusal.clone()) {
        return ForwardOutcome::Refused { reason };
    }
    match (commit(raft, req).await, durable) {
        (ForwardOutcome::Committed { index }, Some(gate)) if gate.archive_acks => {
            gate.covered(index).await
        }
        (outcome, _) => outcome,
    }
}

async fn commit<SM: HavenStateMachine>(
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
