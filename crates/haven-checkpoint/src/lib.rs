//! Checkpoint files, Raft-independent: a replica's state at one log index as one
//! compressed, checksummed, self-describing file ([`format`]), a directory of them as the
//! catalog with its retention ([`catalog`]), and the deterministic directory copies and
//! tar streams a managed app's state travels in ([`dirtar`]).
//!
//! The node takes and installs checkpoints through these (its `checkpoint` module ties
//! them to the replica and to Raft); `haven restore` and `haven checkpoints list` read
//! them with the node stopped.
//!
//! Invariant: a checkpoint file exists under its final name only once it is complete,
//! fsynced and checksummed; everything else in the directory starts with `.tmp-` and is
//! debris after a crash.

pub mod catalog;
pub mod dirtar;
pub mod format;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::path::PathBuf;

/// openraft's handle on one checkpoint: a path, so a checkpoint of any size moves as a
/// stream.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    pub path: PathBuf,
}
