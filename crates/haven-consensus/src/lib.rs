//! Consensus: openraft wiring, the node-to-node transport and the leader-side proposal
//! path. Only this crate knows the raft wire format; the layers above call
//! [`client`] (forward a write, confirm a read) and hand their state machine to
//! [`server`], never a frame.
//!
//! - [`types`]: the openraft type configuration; [`runtime`]: its async runtime (tokio,
//!   seedable for the simulation).
//! - [`wire`], [`link`], [`reconnect`], [`net`]: frames, the shared peer connections,
//!   their backoff, and openraft's network over them; [`server`]: the raft port, which
//!   admits each connection to its service's group by the hello.
//! - [`propose`], [`read_batch`], [`client`]: the leader-side write and read paths.
//! - [`snapshot`]: checkpoints sent and received as files; [`first_answers`]: answers a
//!   crash left unrecorded, asked of peers; [`answer_digests`]: replicas' answers
//!   compared, to detect divergence.
//! - [`balance`], [`step_aside`]: leadership spread over nodes, and handed away by a node
//!   whose replica cannot take entries or that is stopping; [`leader_gone`]: a follower
//!   that sees its leader's process gone campaigns without waiting out the lease.

pub mod answer_digests;
pub mod balance;
pub mod client;
pub mod first_answers;
pub mod leader_gone;
pub mod link;
pub mod net;
pub mod propose;
pub mod read_batch;
pub mod reconnect;
pub mod runtime;
pub mod server;
pub mod snapshot;
pub mod stand_in;
pub mod step_aside;
pub mod types;
pub mod wire;

use haven_base::config::RaftTiming;

/// openraft settings from Haven's config. openraft never snapshots or purges on its own:
/// `haven_service::checkpoint::policy` decides both, so the log reaches back to the oldest
/// retained checkpoint rather than just behind the newest.
pub fn raft_config(timing: &RaftTiming) -> Result<openraft::Config, openraft::ConfigError> {
    let config = openraft::Config {
        cluster_name: "haven".to_string(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_timeout_min_ms,
        election_timeout_max: timing.election_timeout_max_ms,
        max_payload_entries: timing.max_payload_entries,
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: u64::MAX,
        // A follower whose log went backwards (its disk was wiped or replaced: the "replace a
        // dead node with the same id" case) is brought back from a checkpoint and the log.
        // Without this openraft stops the *leader* with a panic when it meets such a node.
        allow_log_reversion: Some(true),
        enable_pre_vote: Some(true),
        // A restarted leader must win an election: followers that saw it gone dropped
        // their lease on its vote (`leader_gone`), so it must not lead on that vote again.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    config.validate()
}
