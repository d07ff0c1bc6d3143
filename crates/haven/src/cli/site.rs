//! `haven site promote|follow|switchover`: failover and failback between sites.
//! - `promote`: on a standby site, takes the service over from a primary site that is
//!   lost (or is to be fenced). Reports the recovery point the archive allowed and how
//!   long the standby took to accept writes.
//! - `follow`: every node of a site another took over from becomes a standby of the new
//!   primary, exporting the requests only it held.
//! - `switchover`: a planned hand-over between a primary and a standby, losing nothing
//!   (the primary stops writing and drains into the archive before the standby is
//!   promoted; then the old primary follows).

use std::time::Duration;
use std::time::Instant;

use anyhow::bail;
use clap::Subcommand;
use haven_node::admin::site::Promoted;
use haven_service::apply::rfc3339;
use serde::Serialize;

use super::AdminTarget;
use super::failback;

/// The node answers once it took over; a standby far behind may replay for a while.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(180);
/// After taking over, the site's Raft group elects its first leader.
const LEADER_WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

#[derive(Subcommand)]
pub enum SiteCommand {
    /// Take the service over at this standby site: fence the old primary in the archive
    /// (a create-only epoch marker), apply everything it archived, start writing.
    Promote {
        /// A node of the standby site, and the service.
        #[command(flatten)]
        target: AdminTarget,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Make this site, which another site took the service from, a standby of the new
    /// primary: each node exports the requests it holds that the new primary never
    /// received, deletes its old history and follows the archive.
    Follow {
        /// Every node of the site (repeat --admin for each).
        #[arg(long = "admin", required = true)]
        admins: Vec<String>,
        /// The service, on nodes that run several.
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Hand the service from the primary site to a standby site without losing a write:
    /// the primary stops taking writes and ships what is left to the archive, the standby
    /// is promoted, and the old primary follows it.
    Switchover {
        /// Every node of the primary site (repeat --from for each).
        #[arg(long = "from", required = true)]
        from: Vec<String>,
        /// A node of the standby site that takes over.
        #[arg(long)]
        to: String,
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

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

pub async fn run(command: SiteCommand) -> anyhow::Result<String> {
    match command {
        SiteCommand::Promote { target, json } => output(&promote(&target).await?, json, render),
        SiteCommand::Follow {
            admins,
            service,
            json,
        } => output(
            &failback::follow(&admins, service.as_deref()).await?,
            json,
            failback::render_follow,
        ),
        SiteCommand::Switchover {
            from,
            to,
            service,
            json,
        } => {
            let report = failback::switchover(&from, &to, service.as_deref()).await?;
            output(&report, json, failback::render)
        }
    }
}

fn output<T: Serialize>(report: &T, json: bool, text: fn(&T) -> String) -> anyhow::Result<String> {
    Ok(match json {
        true => format!("{}\n", serde_json::to_string(report)?),
        false => text(report),
    })
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
