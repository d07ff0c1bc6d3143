//! A drill's report: one JSON object (`report.json`, what `--json` prints and `haven
//! drill list` reads) and the same as a page to read (`report.md`), kept in the drill's
//! directory under `<data_dir>/drills/`.

use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;

use crate::check::CheckOutcome;

pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    /// `<service>-<start time>`: the drill's directory under the drills directory.
    pub id: String,
    pub service: String,
    /// Every check passed and the restore succeeded.
    pub ok: bool,
    /// When the drill began (RFC 3339) and in seconds since the Unix epoch.
    pub started_at: String,
    pub started_unix_s: f64,
    /// The archive it restored from.
    pub archive: String,
    /// The restore point: the last entry replayed, and its time.
    pub restored_index: Option<u64>,
    pub restored_time: Option<String>,
    /// How old the restored state was when the drill began: the recovery point a failover
    /// at this moment would have suffered from this archive.
    pub data_age_seconds: Option<f64>,
    /// From the start to the replayed app, and to its first healthy answer (the RTO).
    pub restore_seconds: Option<f64>,
    pub rto_seconds: Option<f64>,
    pub checkpoint_index: Option<u64>,
    pub checkpoint_bytes: u64,
    pub entries_replayed: u64,
    pub bytes_replayed: u64,
    pub checks: Vec<CheckOutcome>,
    /// Why the drill could not finish (the restore failed, the app never answered).
    pub error: Option<String>,
    /// The sandbox, and whether it was kept (`--keep`).
    pub sandbox: PathBuf,
    pub kept: bool,
}

impl DrillReport {
    /// The checks that failed, one line each (empty when the drill passed).
    pub fn failures(&self) -> Vec<String> {
        let mut failed: Vec<String> = (self.error.iter()).map(|e| format!("drill: {e}")).collect();
        failed.extend(
            (self.checks.iter())
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.detail)),
        );
        failed
    }

    /// Writes `report.json` and `report.md` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(REPORT_JSON), json)?;
        std::fs::write(dir.join(REPORT_MD), self.markdown())
    }

    pub fn markdown(&self) -> String {
        let verdict = match self.ok {
            true => "PASSED",
            false => "FAILED",
        };
        let seconds = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.3} s"));
        let mut page = format!(
            "# Drill {id}: {verdict}\n\n\
             | | |\n|---|---|\n\
             | service | {service} |\n\
             | started | {started} |\n\
             | archive | {archive} |\n\
             | restore point | index {index}, entry time {time} |\n\
             | data age (RPO at this point) | {age} |\n\
             | time to restore | {restore} |\n\
             | time to first healthy answer (RTO) | {rto} |\n\
             | checkpoint | {checkpoint} ({checkpoint_bytes} bytes) |\n\
             | replayed | {entries} entries, {bytes} bytes of requests |\n\
             | sandbox | {sandbox} ({kept}) |\n\n\
             ## Checks\n\n| check | kind | outcome | detail |\n|---|---|---|---|\n",
            id = self.id,
            service = self.service,
            started = self.started_at,
            archive = self.archive,
            index = opt(self.restored_index),
            time = self.restored_time.as_deref().unwrap_or("-"),
            age = seconds(self.data_age_seconds),
            restore = seconds(self.restore_seconds),
            rto = seconds(self.rto_seconds),
            checkpoint = opt(self.checkpoint_index),
            checkpoint_bytes = self.checkpoint_bytes,
            entries = self.entries_replayed,
            bytes = self.bytes_replayed,
            sandbox = self.sandbox.display(),
            kept = match self.kept {
                true => "kept",
                false => "removed",
            },
        );
        for check in &self.checks {
            page.push_str(&format!(
                "| {} | {:?} | {} | {} |\n",
                cell(&check.name),
                check.kind,
                if check.ok { "pass" } else { "FAIL" },
                cell(&check.detail)
            ));
        }
        if let Some(error) = &self.error {
            page.push_str(&format!("\n**The drill did not finish:** {error}\n"));
        }
        page
    }
}

fn opt(value: Option<u64>) -> String {
    value.map_or("-".to_string(), |v| v.to_string())
}

/// A table cell: pipes and line breaks would break the table.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// Every report under `drills_dir`, oldest first; unreadable ones are skipped.
pub fn list(drills_dir: &Path) -> std::io::Result<Vec<DrillReport>> {
    let entries = match std::fs::read_dir(drills_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut reports: Vec<DrillReport> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read(entry.path().join(REPORT_JSON)).ok())
        .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
        .collect();
    reports.sort_by(|a, b| a.started_unix_s.total_cmp(&b.started_unix_s));
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::CheckKind;

    #[test]
    fn reports_are_listed_oldest_first_and_say_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let failed = DrillReport {
            id: "orders-2".into(),
            started_unix_s: 2.0,
            checks: vec![CheckOutcome::new(
                CheckKind::Http,
                "GET /count → 200".into(),
                Err("status 500 (expected 200); body: boom".into()),
            )],
            ..DrillReport::default()
        };
        let passed = DrillReport {
            id: "orders-1".into(),
            ok: true,
            started_unix_s: 1.0,
            ..DrillReport::default()
        };
        failed.write(&dir.path().join("orders-2")).unwrap();
        passed.write(&dir.path().join("orders-1")).unwrap();
        let listed = list(dir.path()).unwrap();
        assert_eq!(listed, [passed, failed.clone()]);
        assert_eq!(
            failed.failures(),
            ["GET /count → 200: status 500 (expected 200); body: boom"]
        );
        let page = std::fs::read_to_string(dir.path().join("orders-2").join(REPORT_MD)).unwrap();
        assert!(page.starts_with("# Drill orders-2: FAILED"), "{page}");
        assert!(
            page.contains("| GET /count → 200 | Http | FAIL | status 500"),
            "{page}"
        );
        assert!(list(&dir.path().join("none")).unwrap().is_empty());
    }
}
