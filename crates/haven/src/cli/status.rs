//! `haven status --admin ADDR`: a node's status as a table (or raw JSON).

use std::time::Duration;

use anyhow::Context;
use haven_node::admin::Status;

use crate::http_client::Http;

pub async fn fetch(admin: &str) -> anyhow::Result<Status> {
    let base = super::admin_base(admin);
    let reply = Http::new(Duration::from_secs(5))
        .get(&format!("{base}/status"))
        .await?;
    if reply.status != 200 {
        anyhow::bail!("{base}/status answered {}: {}", reply.status, reply.text());
    }
    serde_json::from_slice(&reply.body).with_context(|| format!("{base}/status sent invalid JSON"))
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
        ("after_a_crash", status.exactly_once_after_crash.clone()),
    ];
    rows.iter().map(|(k, v)| format!("{k:<16}{v}\n")).collect()
}
