//! `haven status --admin ADDR [--service S]`: a node's status as a table (or raw JSON).
//! Without `--service`, a node with one service shows it in full, and a node with several
//! shows one line per service.

use std::time::Duration;

use haven_node::admin::Status;
use haven_node::admin::peers::PeerView;
use haven_node::admin::survival::Survivability;
use haven_service::apply::digests::Divergence;
use haven_service::archive::ArchiveStatus;
use haven_service::site::Role;
use haven_service::site::SiteStatus;

use super::AdminTarget;

/// How long a node has to answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// What `haven status` prints: one service in full, or a line per service.
pub async fn show(target: &AdminTarget, json: bool) -> anyhow::Result<String> {
    let admin = target.client(STATUS_TIMEOUT);
    let statuses = match &target.service {
        Some(_) => vec![admin.status().await?],
        None => admin.services().await?,
    };
    Ok(match (statuses.as_slice(), json) {
        ([one], true) => format!("{}\n", serde_json::to_string_pretty(one)?),
        ([one], false) => render(one),
        (all, true) => format!("{}\n", serde_json::to_string_pretty(all)?),
        (all, false) => render_services(all),
    })
}

/// One line per service.
pub fn render_services(all: &[Status]) -> String {
    let width = all
        .iter()
        .map(|s| s.service.len())
        .max()
        .unwrap_or(0)
        .max(7)
        + 2;
    let mut out = format!(
        "{:<width$}{:<10}{:>6}{:>7}{:>10}{:>10}{:>6}  {}\n",
        "service", "role", "term", "leader", "commit", "applied", "lag", "app"
    );
    for s in all {
        let app = if s.app_up { "up" } else { "down" };
        let lag = match (s.commit_index, s.applied_index) {
            (Some(commit), Some(applied)) => commit.saturating_sub(applied).to_string(),
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "{:<width$}{:<10}{:>6}{:>7}{:>10}{:>10}{:>6}  {} ({app})\n",
            s.service,
            s.role,
            s.term,
            opt(s.leader_id),
            opt(s.commit_index),
            opt(s.applied_index),
            lag,
            s.app_url
        ));
    }
    out
}

/// Each member's state as this node sees it: `2 voter up (matched 120), 3 voter down`.
fn members_line(peers: &[PeerView]) -> String {
    let member = |p: &PeerView| match p.matched_index {
        Some(matched) => format!("{} {} {} (matched {matched})", p.id, p.role, p.state),
        None => format!("{} {} {}", p.id, p.role, p.state),
    };
    if peers.is_empty() {
        return "-".to_string();
    }
    peers.iter().map(member).collect::<Vec<_>>().join(", ")
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

pub fn render(status: &Status) -> String {
    let ids = |ids: &[u64]| {
        ids.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let receive = &status.checkpoint_receive;
    let rows = [
        ("service", status.service.clone()),
        ("id", status.id.to_string()),
        ("zone", status.zone.clone()),
        ("role", status.role.clone()),
        ("term", status.term.to_string()),
        ("leader_id", opt(status.leader_id)),
        ("commit_index", opt(status.commit_index)),
        ("applied_index", opt(status.applied_index)),
        ("last_log_index", opt(status.last_log_index)),
        ("voters", ids(&status.voters)),
        ("learners", ids(&status.learners)),
        ("members", members_line(&status.peers)),
        ("checkpoint", opt(status.snapshot_index)),
        ("log_purged_to", opt(status.purged_index)),
        (
            "receiving",
            format!("{} of {} bytes", receive.bytes, receive.total),
        ),
        (
            "app",
            format!(
                "{} ({})",
                status.app_url,
                if status.app_up { "up" } else { "down" }
            ),
        ),
        ("archive", archive_line(status.archive.as_ref())),
        ("site", site_line(status.site.as_ref())),
        ("after_a_crash", status.exactly_once_after_crash.clone()),
        ("divergence", divergence_line(status.divergence.as_ref())),
    ];
    let survival = status.survivability.as_ref().map(survival_rows);
    (rows.into_iter().chain(survival.into_iter().flatten()))
        .map(|(k, v)| format!("{k:<16}{v}\n"))
        .collect()
}

/// What the placement survives, a row each, then the warnings and the estimate.
fn survival_rows(report: &Survivability) -> Vec<(&'static str, String)> {
    let mut rows = Vec::new();
    let key = |first: &'static str, i: usize| if i == 0 { first } else { "" };
    for (i, f) in report.failures.iter().enumerate() {
        let row = format!("{}: {} ({})", f.failure, f.outcome.label(), f.why);
        rows.push((key("survival", i), row));
    }
    for (i, warning) in report.warnings.iter().enumerate() {
        rows.push((key("WARNING", i), warning.clone()));
    }
    let a = &report.availability;
    rows.push((
        "availability",
        format!("{} (an estimate: {}; {})", a.estimate, a.downtime, a.basis),
    ));
    for (i, assumption) in a.assumptions.iter().enumerate() {
        rows.push((key("  assuming", i), assumption.clone()));
    }
    rows
}

/// The archive in one line: where, how protected, and (on the leader) how far behind.
fn archive_line(archive: Option<&ArchiveStatus>) -> String {
    let Some(a) = archive else {
        return "none (the data stays on this cluster's disks)".to_string();
    };
    let progress = match (a.uploading, a.archived_index) {
        (false, _) => "shipped by the leader".to_string(),
        (true, None) => "nothing archived yet".to_string(),
        (true, Some(index)) => format!(
            "at {index}, {} entries and {:.3} s behind",
            a.lag_entries,
            a.lag_ms as f64 / 1e3
        ),
    };
    let error = a
        .last_error
        .as_ref()
        .map_or(String::new(), |e| format!("; last error: {e}"));
    format!("{} {}, {progress}{error}", a.url, a.protection)
}

/// The replicas' answers compared: none differ, or the first entry that differs and
/// with whom.
fn divergence_line(divergence: Option<&Divergence>) -> String {
    let Some(d) = divergence else {
        return "none found".to_string();
    };
    let peers: Vec<String> = (d.disagreements.iter())
        .map(|p| format!("node {} from entry {}", p.peer, p.index))
        .collect();
    format!(
        "DIVERGED at entry {}: this node's ({}) answers differ from {}",
        d.first_index,
        d.node,
        peers.join(", ")
    )
}

/// The site in one line: this node's role, who writes the archive, a standby's lag.
fn site_line(site: Option<&SiteStatus>) -> String {
    let Some(s) = site else {
        return "none".to_string();
    };
    let mut line = format!("{} at site {:?}", s.role.name(), s.site);
    if let (Some(epoch), Some(writer)) = (s.epoch, &s.writer) {
        line.push_str(&format!(", archive epoch {epoch} by {writer}"));
    }
    if let Role::Standby = s.role {
        line.push_str(&format!(
            ", applied {} of {}, {} entries and {:.3} s behind",
            opt(s.applied_index),
            opt(s.archive_index),
            s.lag_entries,
            s.lag_ms as f64 / 1e3
        ));
    }
    if let Role::Fenced { reason } = &s.role {
        line.push_str(&format!(": {reason}"));
    }
    if let Some(e) = &s.last_error {
        line.push_str(&format!("; last error: {e}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(service: &str, commit: u64, applied: u64) -> Status {
        Status {
            service: service.to_string(),
            id: 1,
            zone: "a".into(),
            role: "leader".into(),
            term: 3,
            leader_id: Some(1),
            commit_index: Some(commit),
            applied_index: Some(applied),
            last_log_index: Some(commit),
            voters: vec![1, 2, 3],
            learners: Vec::new(),
            app_url: "http://127.0.0.1:6001".into(),
            app_up: true,
            snapshot_index: None,
            purged_index: None,
            checkpoint_receive: Default::default(),
            archive: None,
            exactly_once_after_crash: String::new(),
            site: None,
            peers: Vec::new(),
            divergence: None,
            survivability: None,
        }
    }

    #[test]
    fn a_line_per_service_with_term_and_lag() {
        let table = render_services(&[status("orders", 120, 117), status("a", 5, 5)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "service  role        term leader    commit   applied   lag  app",
                "orders   leader         3      1       120       117     3  http://127.0.0.1:6001 (up)",
                "a        leader         3      1         5         5     0  http://127.0.0.1:6001 (up)",
            ]
        );
    }

    #[test]
    fn members_say_their_state_and_what_the_leader_knows() {
        let peer = |id, role: &str, state: &str, matched| PeerView {
            id,
            raft_addr: format!("127.0.0.1:900{id}"),
            client_addr: format!("127.0.0.1:800{id}"),
            role: role.into(),
            state: state.into(),
            matched_index: matched,
            last_ack_ms: matched.map(|_| 5),
        };
        let line = members_line(&[
            peer(1, "leader", "up", Some(120)),
            peer(2, "voter", "up", Some(118)),
            peer(3, "voter", "down", None),
        ]);
        assert_eq!(
            line,
            "1 leader up (matched 120), 2 voter up (matched 118), 3 voter down"
        );
        assert_eq!(members_line(&[]), "-");
    }
}
