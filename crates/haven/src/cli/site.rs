//! `haven site promote|follow|switchover`: failover and failback between sites.
//! - `promote`: on a standby site, takes the service over from a primary site that is
//!   lost (or is to be fenced). Reports the recovery point the archive allowed and how
//!   long the standby took to accept writes.
//! - `follow`: every node of a site another took over from becomes a standby of the new
//!   primary, exporting the requests only it held.
//! - `switchover`: a planned hand-over between a primary and a standby, losing nothing
//!   (the primary stops writing and drains into the archive before the standby is
//!   promoted; then the old primary follows).

use clap::Subcommand;
use serde::Serialize;

use super::AdminTarget;
use super::failback;
use super::promote;

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
        /// Print one JSON object (every node's export).
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
        /// The service, on nodes that run several.
        #[arg(long)]
        service: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: SiteCommand) -> anyhow::Result<String> {
    match command {
        SiteCommand::Promote { target, json } => {
            output(&promote::promote(&target).await?, json, promote::render)
        }
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
