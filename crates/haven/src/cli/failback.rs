//! Failback from the command line: `haven site follow` turns every node of a site that
//! lost the service into a standby of the new primary; `haven site switchover` hands the
//! service from the primary site to a standby site on purpose, losing nothing.
//!
//! A switchover: every node of the primary records `handing-over` and refuses new writes;
//! its leader ships what is left to the archive (the drain: its archived index reaches its
//! last log index and stays there); the standby is promoted, so its epoch starts after
//! all of it; the old primary follows the new one. If the drain or the promotion fails
//! before a fence went up, the old primary takes writes again.

use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use haven_client::admin::AdminClient;
use haven_node::admin::Status;
use haven_node::admin::site::Followed;
use haven_service::site::Role;
use serde::Serialize;

use super::AdminTarget;
use super::promote::PromoteReport;

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Following closes and opens the service again, its app included.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(320);
/// How long the primary may take to ship what it holds once it takes no new writes.
const DRAIN_WAIT: Duration = Duration::from_secs(60);
/// The drain counts once the leader's log stood still, all of it archived, this long: a
/// write admitted just before the refusal reaches the log within it.
const DRAIN_SETTLE: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(50);

fn client(admin: &str, service: Option<&str>, timeout: Duration) -> AdminClient {
    AdminClient::new(admin, timeout).service(service)
}

/// What `haven site follow` did on each node.
#[derive(Debug, Serialize)]
pub struct FollowReport {
    pub nodes: Vec<Followed>,
    /// Requests exported, summed over the nodes (a request several nodes held is in each
    /// of their files).
    pub exported: u64,
}

pub async fn follow(admins: &[String], service: Option<&str>) -> anyhow::Result<FollowReport> {
    let mut nodes = Vec::with_capacity(admins.len());
    for admin in admins {
        let followed = client(admin, service, FOLLOW_TIMEOUT)
            .follow()
            .await
            .with_context(|| format!("node {admin} did not follow (the nodes before it did; run the command again once it is fixed)"))?;
        nodes.push(followed);
    }
    let exported = nodes.iter().map(|n| n.rejoined.exported).sum();
    Ok(FollowReport { nodes, exported })
}

pub fn render_follow(report: &FollowReport) -> String {
    let mut text = String::new();
    for node in &report.nodes {
        let done = match (&node.rejoined.file, node.already_standby) {
            (_, true) => "a standby already".to_string(),
            (None, false) => "nothing only it held".to_string(),
            (Some(file), false) => format!(
                "exported {} requests (indexes {}..={}) to {}",
                node.rejoined.exported,
                node.rejoined.first_index.unwrap_or(0),
                node.rejoined.last_index.unwrap_or(0),
                file.display()
            ),
        };
        let missing =
            (node.rejoined.missing.as_deref()).map_or(String::new(), |m| format!("; {m}"));
        let epoch = match (node.epoch, &node.writer) {
            (Some(epoch), Some(writer)) => format!("follows epoch {epoch} by {writer}"),
            _ => "follows".to_string(),
        };
        text.push_str(&format!(
            "service {} node {}: {epoch}; {done}{missing}\n",
            node.service, node.node
        ));
    }
    if report.exported > 0 {
        text.push_str(&format!(
            "{} requests this site ordered are not in the new primary's history (some may never have been acknowledged): reconcile them from the files above\n",
            report.exported
        ));
    }
    text
}

/// What `haven site switchover` did.
#[derive(Debug, Serialize)]
pub struct SwitchoverReport {
    /// The old primary's last index: the new primary's history holds everything up to it.
    pub handed_over_index: u64,
    /// From the first refused write to the drain's end, and to the new primary's leader.
    pub drain_ms: u64,
    pub writes_paused_ms: u64,
    pub promoted: PromoteReport,
    pub followed: FollowReport,
}

pub async fn switchover(
    from: &[String],
    to: &str,
    service: Option<&str>,
) -> anyhow::Result<SwitchoverReport> {
    check_sites(from, to, service).await?;
    let started = Instant::now();
    for admin in from {
        let handed = client(admin, service, CALL_TIMEOUT).handover().await;
        if let Err(e) = handed.with_context(|| format!("node {admin} did not stop taking writes")) {
            return Err(call_off(from, service, e).await);
        }
    }
    let drained = match drain(from, service).await {
        Ok(index) => index,
        Err(e) => return Err(call_off(from, service, e).await),
    };
    let drain_ms = started.elapsed().as_millis() as u64;
    let target = AdminTarget {
        admin: to.to_string(),
        service: service.map(str::to_string),
    };
    let promoted = match super::promote::promote(&target).await {
        Ok(promoted) => promoted,
        Err(e) => return Err(call_off(from, service, e).await),
    };
    let writes_paused_ms = started.elapsed().as_millis() as u64;
    let archived = promoted.promoted.promotion.last_archived_index;
    if archived < drained {
        bail!(
            "the promotion found the archive ending at {archived}, before the old primary's last index {drained}: the switchover went ahead but lost entries; `haven site follow` on the old primary exports them"
        );
    }
    let followed = follow(from, service).await?;
    Ok(SwitchoverReport {
        handed_over_index: drained,
        drain_ms,
        writes_paused_ms,
        promoted,
        followed,
    })
}

/// The primary site's nodes must all be named (a node left out could lead and take
/// writes the new primary never sees), all primary; `to` must be a standby.
async fn check_sites(from: &[String], to: &str, service: Option<&str>) -> anyhow::Result<()> {
    let statuses = statuses(from, service).await?;
    let named: Vec<u64> = statuses.iter().map(|s| s.id).collect();
    for status in &statuses {
        let role = site_role(status);
        if !matches!(role, Some(Role::Primary | Role::HandingOver)) {
            bail!(
                "node {} is {} for service {}: --from names the primary site's nodes",
                status.id,
                role.map_or("without sites", |r| r.name()),
                status.service
            );
        }
        let left_out: Vec<u64> = (status.voters.iter())
            .filter(|v| !named.contains(v))
            .copied()
            .collect();
        if !left_out.is_empty() {
            bail!(
                "--from must name every node of the primary site: voters {:?} are left out (one of them could lead and take writes the standby never receives)",
                left_out
            );
        }
    }
    let standby = client(to, service, CALL_TIMEOUT)
        .status()
        .await
        .with_context(|| format!("cannot reach the standby node {to}"))?;
    if site_role(&standby) != Some(Role::Standby) {
        bail!(
            "node {to} is {} for service {}: --to names a node of a standby site",
            site_role(&standby).map_or("without sites", |r| r.name()),
            standby.service
        );
    }
    Ok(())
}

fn site_role(status: &Status) -> Option<Role> {
    status.site.as_ref().map(|s| s.role.clone())
}

async fn statuses(admins: &[String], service: Option<&str>) -> anyhow::Result<Vec<Status>> {
    let mut statuses = Vec::with_capacity(admins.len());
    for admin in admins {
        let status = client(admin, service, CALL_TIMEOUT)
            .status()
            .await
            .with_context(|| format!("cannot reach node {admin}"))?;
        statuses.push(status);
    }
    Ok(statuses)
}

/// Waits until the primary's leader has archived its whole log and the log stood still
/// for [`DRAIN_SETTLE`]; its last index.
async fn drain(from: &[String], service: Option<&str>) -> anyhow::Result<u64> {
    let deadline = Instant::now() + DRAIN_WAIT;
    let mut settled: Option<(u64, Instant)> = None;
    loop {
        let statuses = statuses(from, service).await?;
        let drained = statuses
            .iter()
            .find(|s| s.role == "leader")
            .and_then(|leader| {
                let archived = leader.archive.as_ref()?.archived_index?;
                let last = leader.last_log_index?;
                (archived >= last && site_role(leader) == Some(Role::HandingOver)).then_some(last)
            });
        settled = match (drained, settled) {
            (Some(last), Some((at, since))) if at == last => {
                if since.elapsed() >= DRAIN_SETTLE {
                    return Ok(last);
                }
                Some((at, since))
            }
            (Some(last), _) => Some((last, Instant::now())),
            (None, _) => None,
        };
        if Instant::now() >= deadline {
            bail!(
                "the primary did not ship its log to the archive within {DRAIN_WAIT:?} (is the object store reachable? `haven status` shows the archive's progress)"
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The switchover stops before a fence went up: the primary takes writes again.
async fn call_off(from: &[String], service: Option<&str>, error: anyhow::Error) -> anyhow::Error {
    let mut unresumed = Vec::new();
    for admin in from {
        if let Err(e) = client(admin, service, CALL_TIMEOUT).resume().await {
            unresumed.push(format!("{admin}: {e}"));
        }
    }
    match unresumed.is_empty() {
        true => error.context("switchover called off; the primary site takes writes again"),
        false => error.context(format!(
            "switchover called off; these nodes of the primary site could not be told to take writes again: {}",
            unresumed.join("; ")
        )),
    }
}

pub fn render(report: &SwitchoverReport) -> String {
    let p = &report.promoted.promoted;
    let lost = match report.followed.exported {
        0 => {
            "0 writes lost (the old primary held nothing beyond the handed-over index)".to_string()
        }
        n => format!(
            "{n} requests of the old primary are not in the new history: see the export files below"
        ),
    };
    format!(
        "service {} switched over: epoch {}, the new primary writes from index {}\n\
         handed over:     every entry up to index {} (drained in {:.3} s)\n\
         writes paused:   {:.3} s (until the new primary's leader took writes)\n\
         {lost}\n{}",
        p.service,
        p.promotion.epoch,
        p.promotion.start_index,
        report.handed_over_index,
        report.drain_ms as f64 / 1e3,
        report.writes_paused_ms as f64 / 1e3,
        render_follow(&report.followed),
    )
}
