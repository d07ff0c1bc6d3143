//! Recovery drills: rehearse the loss of a site without touching production. A drill
//! restores a point of a service's off-site archive into a sandbox ([`run`]), starts the
//! app there on a port of its own, runs the checks ([`check`]) and keeps a report
//! ([`report`]) under `<data_dir>/drills/`; a node keeps the newest as metrics and runs
//! scheduled drills ([`schedule`]); a recovery plan ([`plan`]) brings several services
//! up in dependency order.

pub mod check;
pub mod plan;
pub mod report;
pub mod run;
pub mod schedule;

pub use report::DrillReport;
pub use run::DrillSpec;

/// Where a node keeps its drills' reports (and, while a drill runs, its sandbox).
pub fn drills_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("drills")
}
