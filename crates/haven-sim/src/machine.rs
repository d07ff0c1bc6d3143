//! The simulated replica: an append-only list of the writes it applied, in log order. It is
//! the register history the checks read, and its bytes are what "replicas are identical"
//! compares. It is volatile: a restarted node rebuilds it by re-applying its log.

use std::io;
use std::sync::Arc;
use std::sync::Mutex;

use futures::Stream;
use futures::TryStreamExt;
use haven_checkpoint::CheckpointFile;
use haven_consensus::types::Applied;
use haven_consensus::types::Entry;
use haven_consensus::types::LogId;
use haven_consensus::types::SnapshotMeta;
use haven_consensus::types::StoredMembership;
use haven_consensus::types::TypeConfig;
use haven_contract::NodeId;
use haven_contract::RequestTag;
use openraft::EntryPayload;
use openraft::RaftSnapshotBuilder;
use openraft::alias::SnapshotOf;
use openraft::entry::RaftEntry;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use serde::Serialize;

use crate::check::Checker;

/// One applied client write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Write {
    pub index: u64,
    pub tag: RequestTag,
    pub body: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct ReplicaState {
    pub applied: Option<LogId>,
    pub membership: StoredMembership,
    pub writes: Vec<Write>,
}

impl ReplicaState {
    /// The replica's bytes: what must be identical on every node after convergence.
    pub fn bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(&self.writes).unwrap_or_default()
    }
}

#[derive(Clone)]
pub struct Replica {
    node: NodeId,
    pub state: Arc<Mutex<ReplicaState>>,
    checker: Arc<Mutex<Checker>>,
}

impl Replica {
    pub fn new(node: NodeId, checker: Arc<Mutex<Checker>>) -> Self {
        Self {
            node,
            state: Arc::default(),
            checker,
        }
    }

    fn apply_one(&self, entry: &Entry) {
        let log_id = entry.log_id();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let what = match &entry.payload {
            EntryPayload::Blank => "blank".to_string(),
            EntryPayload::Normal(req) => {
                state.writes.push(Write {
                    index: log_id.index,
                    tag: req.tag,
                    body: req.body.to_vec(),
                });
                format!("write {}:{}", req.tag.origin, req.tag.seq)
            }
            EntryPayload::Membership(m) => {
                state.membership = StoredMembership::new(Some(log_id), m.clone());
                format!("membership {:?}", m.voter_ids().collect::<Vec<_>>())
            }
        };
        state.applied = Some(log_id);
        drop(state);
        self.checker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe_apply(self.node, log_id, what);
    }
}

/// Checkpoints are not simulated: the simulated log is never purged, so openraft never
/// asks for one. The process-level suites test them.
fn not_simulated() -> io::Error {
    io::Error::other("checkpoints are not part of the simulation")
}

impl RaftSnapshotBuilder<TypeConfig> for Replica {
    type SnapshotData = CheckpointFile;

    async fn build_snapshot(
        &mut self,
    ) -> Result<SnapshotOf<TypeConfig, CheckpointFile>, io::Error> {
        Err(not_simulated())
    }
}

impl RaftStateMachine<TypeConfig> for Replica {
    type SnapshotData = CheckpointFile;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok((state.applied, state.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            self.apply_one(&entry);
            if let Some(responder) = responder {
                responder.send(Applied);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta,
        _snapshot: CheckpointFile,
    ) -> Result<(), io::Error> {
        Err(not_simulated())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, CheckpointFile>>, io::Error> {
        Ok(None)
    }
}
