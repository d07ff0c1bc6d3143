//! The harness: what launches real Haven processes on loopback and breaks them. It is
//! not on any node's request path; the `haven` binary ships it for `haven demo`,
//! `haven bench` and `haven torture`, and the end-to-end tests use it directly.
//!
//! - [`cluster`]: a local cluster of `haven` processes (and their apps), started, killed
//!   with SIGKILL, restarted and compared byte for byte;
//! - [`torture`]: a randomized fault schedule against a cluster, with a
//!   linearizability check of the recorded history;
//! - [`bench`]: the benchmark scenarios (reference, failover, peer-down, checkpoint,
//!   tenants) over the `haven-bench` load generator.
//!
//! Like the binary, this is an edge: errors are `anyhow`.

pub mod bench;
pub mod cluster;
pub mod torture;
