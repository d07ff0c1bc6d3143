//! Deterministic simulation of Haven's consensus layer.
//!
//! Real openraft, configured as a Haven node configures it, runs behind Haven's real
//! transport (wire format, pipelined append streams, client forwarding, read index) on
//! simulated hosts, sockets and time (`turmoil`), all on one thread. Everything random
//! (fault schedule, client choices, message latencies, openraft's election timeouts) comes
//! from one seed, so a failing seed replays exactly: `cargo run -p haven-sim -- --seed N`.
//!
//! What it does not cover, and where that is tested instead: the apply path to a real app,
//! the on-disk log and checkpoints run in the process-level suites (`crates/haven/tests`,
//! `haven torture`), which kill real processes.

pub mod check;
pub mod faults;
pub mod machine;
pub mod net;
pub mod store;
pub mod workload;

mod cluster;

pub use cluster::Options;
pub use cluster::Report;
pub use cluster::run;

/// The simulation is one thread; a poisoned lock only means a check already panicked.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
