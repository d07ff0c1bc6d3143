//! The values that cross module boundaries: the ordered entry payload, node identities
//! and the openraft type configuration. No I/O lives here.

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

/// A node's stable id, unique within a cluster.
pub type NodeId = u64;

/// Where a peer listens. Stored in Raft membership so a node learns its peers' addresses
/// from the replicated configuration, not only from its own file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub raft_addr: String,
    pub client_addr: String,
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} client={}", self.raft_addr, self.client_addr)
    }
}

/// Identifies one client request across the cluster so the node that received it can
/// recognise its own entry when it applies it. `seq` starts from the boot time in
/// nanoseconds, so tags stay unique across restarts of the same node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestTag {
    pub origin: NodeId,
    pub seq: u64,
}

/// One client request as it is ordered: exactly what every replica receives, plus the
/// determinism aids the leader stamps when it proposes the entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderedRequest {
    pub tag: RequestTag,
    pub method: String,
    /// Path and query, as the client sent them.
    pub uri: String,
    /// End-to-end headers in the client's order; hop-by-hop headers are already removed.
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    /// The client's `Idempotency-Key`, if any: the deduplication key in the replicated state.
    pub idempotency_key: Option<String>,
    /// Leader's wall clock at proposal, microseconds since the Unix epoch. Apply clamps it so
    /// time never goes backwards along the log.
    pub time_unix_us: i64,
    /// Leader-chosen random seed handed to the app as `Haven-Seed`.
    pub seed: u64,
}

impl fmt::Display for OrderedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({} bytes, from node {})",
            self.method,
            self.uri,
            self.body.len(),
            self.tag.origin
        )
    }
}

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
        AsyncRuntime = crate::consensus::runtime::HavenRuntime,
);

/// A state machine Haven's transport can serve: checkpoints travel as files. Haven's own
/// is `apply::StateMachine`; the simulation brings an in-memory one.
pub trait HavenStateMachine:
    openraft::storage::RaftStateMachine<TypeConfig, SnapshotData = crate::checkpoint::CheckpointFile>
{
}

impl<T> HavenStateMachine for T where
    T: openraft::storage::RaftStateMachine<
            TypeConfig,
            SnapshotData = crate::checkpoint::CheckpointFile,
        >
{
}

pub type RaftOf<SM> = openraft::Raft<TypeConfig, SM>;
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
