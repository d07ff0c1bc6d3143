//! A service's drills as its node sees them: the newest report kept on disk becomes the
//! service's drill metrics (also for drills run with `haven drill`, so an alert can fire
//! when none passed for days), and with `[drill] every` one node of the cluster runs a
//! drill on schedule.

use std::time::Duration;

use haven_base::metrics::Metrics;
use haven_service::restore::Progress;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::DrillSpec;
use crate::report;

/// How often the metrics are brought up to date with the drills kept on disk.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Whether this node is the one that drills now.
pub type Chosen = Box<dyn Fn() -> bool + Send + Sync>;

pub struct Schedule {
    pub spec: DrillSpec,
    /// `[drill] every`; none: the worker only keeps the metrics.
    pub every: Option<Duration>,
    /// Asked when a drill is due: one node of a cluster drills (a follower, sparing the
    /// leader), not all of them.
    pub chosen: Chosen,
    pub metrics: Metrics,
}

impl Schedule {
    /// Until `stop`; a drill under way when it comes is abandoned (its app is killed).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut due = self.every.map(|every| Instant::now() + every);
        loop {
            self.publish();
            let refresh = Instant::now() + REFRESH_EVERY;
            let wake = due.map_or(refresh, |due| due.min(refresh));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let (Some(at), Some(every)) = (due, self.every) else {
                continue;
            };
            if Instant::now() < at {
                continue;
            }
            due = Some(Instant::now() + every);
            if !(self.chosen)() {
                continue;
            }
            tokio::select! {
                report = crate::run::run(&self.spec, &Silent) => {
                    if !report.ok {
                        tracing::error!(drill = %report.id, failed = ?report.failures(), "scheduled drill failed");
                    }
                }
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// The service's newest drill, and its last successful one, as metrics.
    fn publish(&self) {
        let reports = report::list(&self.spec.drills_dir).unwrap_or_default();
        let ours: Vec<_> = (reports.iter())
            .filter(|r| r.service == self.spec.service)
            .collect();
        let newest_ok = ours.last().is_some_and(|r| r.ok);
        let success = ours.iter().rev().find(|r| r.ok);
        let m = &self.metrics;
        m.drill_last_ok.set(f64::from(u8::from(newest_ok)));
        m.drill_last_success
            .set(success.map_or(0.0, |r| r.started_unix_s));
        m.drill_last_rto
            .set(success.and_then(|r| r.rto_seconds).unwrap_or(0.0));
    }
}

/// A scheduled drill draws no progress bar.
struct Silent;

impl Progress for Silent {
    fn start(&self, _total: u64) {}
    fn advance(&self, _done: u64) {}
}
