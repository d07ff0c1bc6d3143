//! `haven site promote`: on a standby site, takes the service over from a primary site
//! that is lost (or is to be fenced); used by `haven site switchover`, recovery plans
//! and the demo too. Reports the recovery point the archive allowed and how long the
//! standby took to accept writes.

use std::time::Duration;
use std::time::Instant;

use anyhow::bail;
use haven_node::admin::site::Promoted;
use haven_service::apply::rfc3339;
use serde::Serialize;

use super::AdminTarget;

/// The node answers once it took over; a standby far behind may replay for a while.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(180);
/// After taking over, the site's Raft group elects its first leader.
const LEADER_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// What `haven site promote` reports.
#[derive(Debug, Serialize)]
pub struct PromoteReport {
    #[serde(flatten)]
    pub promoted: Promoted,
    /// The leader the promoted site elected.
    pub leader_id: Option<u64>,
    /// From the command to a leader that takes writes: the recovery time, less the first
    /// write's own round trip.
    pub writable_after_ms: u64,
}

pub async fn promote(target: &AdminTarget) -> anyhow::Result<PromoteReport> {
    let started = Instant::now();
    let promoted = target.client(PROMOTE_TIMEOUT).promote().await?;
    if !promoted.took_over {
        bail!(
            "the fence is up (epoch {}) but this node has not taken over after {} ms: it is still applying the archive; `haven status` shows its progress",
            promoted.promotion.epoch,
            promoted.took_over_ms
        );
    }
    let status = target.client(Duration::from_secs(5));
    let deadline = Instant::now() + LEADER_WAIT;
    loop {
        if let Ok(s) = status.status().await
            && s.leader_id.is_some()
        {
            return Ok(PromoteReport {
                promoted,
                leader_id: s.leader_id,
                writable_after_ms: started.elapsed().as_millis() as u64,
            });
        }
        if Instant::now() >= deadline {
            bail!(
                "service {} took over but elected no leader within {LEADER_WAIT:?}: are a majority of the standby site's nodes up?",
                promoted.service
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

pub fn render(report: &PromoteReport) -> String {
    let p = &report.promoted.promotion;
    let fenced = p
        .previous_writer
        .as_deref()
        .map_or("nobody (the archive was empty)".to_string(), |w| {
            w.to_string()
        });
    let point = match p.last_archived_time_us {
        0 => "the archive held no entry".to_string(),
        t => format!(
            "index {} (entry time {}, {:.3} s before the fence)",
            p.last_archived_index,
            rfc3339(t),
            p.last_archived_age_ms as f64 / 1e3
        ),
    };
    format!(
        "service {} promoted: epoch {}, writing from index {}\n\
         fenced:          {fenced}\n\
         recovery point:  {point}\n\
         took over after  {:.3} s\n\
         writable after   {:.3} s (leader: node {})\n",
        report.promoted.service,
        p.epoch,
        p.start_index,
        report.promoted.took_over_ms as f64 / 1e3,
        report.writable_after_ms as f64 / 1e3,
        report.leader_id.map_or("-".to_string(), |l| l.to_string()),
    )
}
