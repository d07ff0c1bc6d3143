//! `haven services reload --admin A [--admin B ...] [--wipe]`: each node reads its config
//! file again and starts, stops or restarts services to match it (`SIGHUP` to a node does
//! the same, without `--wipe`). To add a service to a running cluster, add its
//! `[[service]]` table to every node's file and reload every node; to remove one, delete
//! the table and reload, with `--wipe` to delete its log, checkpoints and managed app
//! data on each node.

use std::fmt::Write as _;
use std::time::Duration;

use haven_node::admin::reload::ReloadReport;

use haven_client::admin::AdminClient;

#[derive(clap::Subcommand, Debug)]
pub enum ServicesCommand {
    /// Every service a node runs, one line each (as `haven status` without --service).
    List {
        /// The node's admin address, e.g. 127.0.0.1:7001.
        #[arg(long)]
        admin: String,
        /// One JSON array (every service's status) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make each node read its config file again and run the services it names.
    Reload {
        /// A node's admin address; repeat for every node of the cluster.
        #[arg(long, required = true)]
        admin: Vec<String>,
        /// Delete the log, checkpoints and managed app data of every service removed.
        #[arg(long)]
        wipe: bool,
    },
}

/// How long one node's reload may take (it starts and stops managed apps).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(620);

pub async fn run(command: ServicesCommand) -> anyhow::Result<String> {
    match command {
        ServicesCommand::List { admin, json } => {
            let target = super::AdminTarget {
                admin,
                service: None,
            };
            super::status::show(&target, json).await
        }
        ServicesCommand::Reload { admin, wipe } => reload_all(&admin, wipe).await,
    }
}

/// Reloads every node in turn; fails, after trying them all, if any node refused the
/// file or a service did not start, with every node's outcome in the message.
async fn reload_all(admins: &[String], wipe: bool) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut failed = false;
    for admin in admins {
        match AdminClient::new(admin, RELOAD_TIMEOUT).reload(wipe).await {
            Ok(report) => {
                failed |= !report.failed.is_empty();
                out.push_str(&render(&report));
            }
            Err(e) => {
                failed = true;
                let _ = writeln!(out, "{admin}: {e:#}");
            }
        }
    }
    if failed {
        anyhow::bail!("{}", out.trim_end());
    }
    Ok(out)
}

/// `node 2: added inventory; removed audit; ...` and a line per wiped directory and
/// failed service.
pub fn render(report: &ReloadReport) -> String {
    let names = |list: &[String]| match list {
        [] => "-".to_string(),
        _ => list.join(", "),
    };
    let mut out = format!(
        "node {}: added {}; removed {}; restarted {}; unchanged {}\n",
        report.node,
        names(&report.added),
        names(&report.removed),
        names(&report.restarted),
        names(&report.unchanged)
    );
    for wiped in &report.wiped {
        let _ = writeln!(
            out,
            "  wiped {} of {} ({} bytes)",
            wiped.path.display(),
            wiped.service,
            wiped.bytes
        );
    }
    for failed in &report.failed {
        let _ = writeln!(out, "  FAILED {}: {}", failed.service, failed.error);
    }
    out
}
