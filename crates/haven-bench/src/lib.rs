//! `haven-bench`: the measurement engine behind `haven bench`.
//!
//! A benchmark of a replicated system is easy to get wrong in ways that
//! flatter the system: a generator that waits for slow answers sends less
//! exactly when the system struggles, averages hide the tail, and a fast
//! system that burns four times the CPU looks like a fast system. This crate
//! measures so that none of that happens: open-loop load on a fixed timetable,
//! latencies counted from when a request was *due*, every latency kept in an
//! HDR histogram, errors counted by kind, and CPU time per request.
//!
//! # The modules, in the order a run uses them
//!
//! - [`args`]: the `haven bench` flags, turned into validated specs.
//! - [`workload`]: *what* a request looks like: the log app behind Haven, or
//!   etcd as the baseline.
//! - [`rate`]: *when* each open-loop request is due, as a pure function.
//! - [`load`]: the generator itself: one keep-alive connection per worker,
//!   open or closed loop, timeouts and reconnects, producing a
//!   [`load::LoadReport`].
//! - [`histogram`]: HDR latency histograms and their percentile summary.
//! - [`progress`]: the live line on stderr, or nothing.
//! - [`sweep`]: runs of rising rate until the system saturates, giving a
//!   throughput–latency [`sweep::Curve`].
//! - [`chart`]: that curve as an SVG chart.
//! - [`cpu`]: CPU time of the system's processes, for cost per request.
//! - [`report`]: text summaries and the Markdown comparison table.
//!
//! Failed requests are measurements, not errors: they are counted in reports.
//! [`BenchError`] is for runs that could not be carried out at all.

pub mod args;
pub mod chart;
pub mod cpu;
mod error;
pub mod histogram;
pub mod load;
pub mod progress;
pub mod rate;
pub mod report;
pub mod sweep;
pub mod workload;

pub use error::BenchError;
