//! The openraft type configuration over the contract's values (`haven_contract`): entries
//! carry whole HTTP requests. No I/O lives here.

use haven_contract::NodeId;
use haven_contract::OrderedRequest;
use haven_contract::PeerNode;
use serde::Deserialize;
use serde::Serialize;

/// What openraft hands back to a local `client_write` caller. Haven answers clients from
/// its own waiters (the replica's response on the node the client reached), so this
/// carries nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied;

openraft::declare_raft_types!(
    /// Haven's Raft types: entries carry whole HTTP requests.
    pub TypeConfig:
        D = OrderedRequest,
        R = Applied,
        NodeId = NodeId,
        Node = PeerNode,
        AsyncRuntime = crate::runtime::HavenRuntime,
);

/// A state machine Haven's transport can serve: checkpoints travel as files. Haven's own
/// is `apply::StateMachine`; the simulation brings an in-memory one.
pub trait HavenStateMachine:
    openraft::storage::RaftStateMachine<TypeConfig, SnapshotData = haven_checkpoint::CheckpointFile>
{
}

impl<T> HavenStateMachine for T where
    T: openraft::storage::RaftStateMachine<
            TypeConfig,
            SnapshotData = haven_checkpoint::CheckpointFile,
        >
{
}

pub type RaftOf<SM> = openraft::Raft<TypeConfig, SM>;
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
