//! Failback: a site that lost the service to another becomes a standby of the new
//! primary, and a primary hands the service over on purpose.
//!
//! *Follow* ([`plan`], then [`rejoin`] while the service is closed): the site's log may
//! hold writes it acknowledged that the archive never took (under `ack = "quorum"`, the
//! recovery point of the failover; or a partition). Every entry at or after the new
//! epoch's start is written to an export file first (fsynced: the request, its index,
//! term and time, for the operator to reconcile), and only then are the log, the apply
//! state and the local checkpoints deleted and the standby role recorded. The service
//! opens again as a fresh standby: it installs the archive's newest checkpoint and
//! follows. A crash anywhere in between is repaired by running follow again: the export
//! is rewritten identically, a wipe is repeated.
//!
//! *Hand over* ([`hand_over`], [`resume`]): a primary records the `handing-over` role
//! (it survives a restart) and refuses new writes on every node, while its leader ships
//! what is left; the standby promoted next starts after all of it.

use std::io::Write;
use std::path::Path;
use std::path::PathBuf;

use haven_archive::catalog::Catalog;
use haven_consensus::types::Entry;
use haven_consensus::types::TypeConfig;
use haven_contract::OrderedRequest;
use haven_log::LogOptions;
use haven_log::LogStore;
use openraft::EntryPayload;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;
use serde::Deserialize;
use serde::Serialize;

use crate::archive::ArchiveProgress;
use crate::site::Role;
use crate::site::SiteState;
use crate::standby::SiteHandle;
use crate::standby::StandbyError;

/// What a service directory holds of one history; deleted when the site follows another.
/// `site.json`, the app's own files and earlier exports stay.
const HISTORY_DIRS: [&str; 4] = ["log", "apply", "checkpoints", "standby"];
/// Where exports go, inside the service's directory.
pub const EXPORT_DIR: &str = "failback";
/// Entries read from the log at a time while exporting.
const EXPORT_BATCH: u64 = 4_096;

/// What following the new primary means for this node's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The archive's newest epoch, and who writes it.
    pub epoch: u64,
    pub writer: String,
    /// The first index where this site's history and the new primary's differ: the start
    /// of the first epoch after the last one this site wrote (none if it never wrote).
    pub diverged_at: Option<u64>,
}

/// Checks that another site writes the archive now and works out where this site's
/// history left it.
pub async fn plan(handle: &SiteHandle) -> Result<Plan, StandbyError> {
    let target = &handle.target;
    let catalog = Catalog::load(&target.store, &target.protection).await?;
    let refuse = |reason: String| Err(StandbyError::Refused(reason));
    let Some(newest) = catalog.newest_epoch() else {
        return refuse(format!(
            "the archive at {} has no epoch yet: there is no primary to follow",
            catalog.url
        ));
    };
    if handle.writer.owns(newest) {
        return refuse(format!(
            "this site writes epoch {}, the archive's newest: it is the primary (to hand the service to a standby, run `haven site switchover`)",
            newest.epoch
        ));
    }
    if catalog.checkpoints.is_empty() {
        return refuse(format!(
            "the archive at {} holds no checkpoint to start from yet (a promoted site archives one soon after it takes over): try again shortly",
            catalog.url
        ));
    }
    let ours = catalog.epochs.iter().rev().find(|m| handle.writer.owns(m));
    let next = ours.and_then(|o| catalog.epochs.iter().find(|m| m.epoch > o.epoch));
    Ok(Plan {
        epoch: newest.epoch,
        writer: newest.owner(),
        diverged_at: next.map(|m| m.start_index),
    })
}

/// What following did to this node's data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejoined {
    /// Client requests this node held at or after the divergence, written to `file`.
    pub exported: u64,
    pub file: Option<PathBuf>,
    pub first_index: Option<u64>,
    pub last_index: Option<u64>,
    /// Entries after the divergence this node's log no longer held (compacted after it
    /// archived them under its own, now superseded, epoch).
    pub missing: Option<String>,
}

/// Exports what only this site holds, deletes its history and records the standby role.
/// Call with the service closed.
pub async fn rejoin(service_dir: &Path, site: &str, plan: &Plan) -> Result<Rejoined, StandbyError> {
    let _lock = haven_base::lock::DirLock::acquire(service_dir).map_err(io("cannot lock"))?;
    let rejoined = match plan.diverged_at {
        Some(at) => export(service_dir, at, plan.epoch).await?,
        None => Rejoined::default(),
    };
    for name in HISTORY_DIRS {
        match std::fs::remove_dir_all(service_dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("cannot delete the old history")(e));
            }
            _ => {}
        }
    }
    haven_frame::sync_path(service_dir).map_err(io("cannot sync the service directory"))?;
    SiteState::open(service_dir, site, true)
        .and_then(|state| state.set_role(Role::Standby))
        .map_err(io("cannot record the standby role"))?;
    tracing::warn!(
        epoch = plan.epoch,
        exported = rejoined.exported,
        file = ?rejoined.file,
        "this site follows the new primary; its old history is deleted"
    );
    Ok(rejoined)
}

/// Writes every client request in the log from `from` on to the export file.
async fn export(service_dir: &Path, from: u64, epoch: u64) -> Result<Rejoined, StandbyError> {
    let mut log: LogStore<TypeConfig> =
        LogStore::open(&service_dir.join("log"), LogOptions::default())
            .map_err(|e| io("cannot open the log to export it")(std::io::Error::other(e)))?;
    let state = log
        .get_log_state()
        .await
        .map_err(io("cannot read the log state"))?;
    let first_kept = state.last_purged_log_id.map_or(0, |p| p.index + 1);
    let last = state.last_log_id.map(|l| l.index);
    let mut rejoined = Rejoined::default();
    let Some(last) = last.filter(|&l| l >= from) else {
        return Ok(rejoined);
    };
    if first_kept > from {
        rejoined.missing = Some(format!(
            "entries {from}..={} were compacted from this node's log before the export",
            first_kept - 1
        ));
    }
    let mut lines = Vec::new();
    let mut next = from.max(first_kept);
    while next <= last {
        let end = last.min(next + EXPORT_BATCH - 1);
        let entries = log
            .try_get_log_entries(next..=end)
            .await
            .map_err(io("cannot read the log"))?;
        for entry in &entries {
            if let Some(line) = exported_line(entry)? {
                rejoined.first_index.get_or_insert(entry.log_id.index);
                rejoined.last_index = Some(entry.log_id.index);
                rejoined.exported += 1;
                lines.extend_from_slice(&line);
            }
        }
        next = end + 1;
    }
    if rejoined.exported > 0 {
        let dir = service_dir.join(EXPORT_DIR);
        let file = dir.join(format!("unarchived-before-epoch-{epoch}.jsonl"));
        write_durably(&dir, &file, &lines).map_err(io("cannot write the export"))?;
        rejoined.file = Some(file);
    }
    Ok(rejoined)
}

/// One exported request: what the client sent, and where it stood in this site's log.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExportedRequest {
    pub index: u64,
    pub term: u64,
    /// The leader's clock when the request was ordered (RFC 3339, and microseconds).
    pub time: String,
    pub time_us: i64,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub idempotency_key: Option<String>,
    /// The body as text when it is UTF-8, else in `body_hex`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_hex: Option<String>,
}

impl ExportedRequest {
    fn of(index: u64, term: u64, request: &OrderedRequest) -> Self {
        let text = std::str::from_utf8(&request.body).ok();
        Self {
            index,
            term,
            time: crate::apply::rfc3339(request.time_unix_us),
            time_us: request.time_unix_us,
            method: request.method.clone(),
            path: request.uri.clone(),
            headers: (request.headers.iter())
                .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
                .collect(),
            idempotency_key: request.idempotency_key.clone(),
            body: text.map(str::to_string),
            body_hex: match text {
                Some(_) => None,
                None => Some(request.body.iter().map(|b| format!("{b:02x}")).collect()),
            },
        }
    }
}

/// A JSON line for a client request; none for Raft's own entries (blank, membership).
fn exported_line(entry: &Entry) -> Result<Option<Vec<u8>>, StandbyError> {
    let EntryPayload::Normal(request) = &entry.payload else {
        return Ok(None);
    };
    let exported = ExportedRequest::of(entry.log_id.index, entry.log_id.leader_id.term, request);
    let mut line = serde_json::to_vec(&exported)
        .map_err(|e| io("cannot encode an exported request")(std::io::Error::other(e)))?;
    line.push(b'\n');
    Ok(Some(line))
}

fn write_durably(dir: &Path, file: &Path, content: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = file.with_extension("tmp");
    let mut out = std::fs::File::create(&tmp)?;
    out.write_all(content)?;
    out.sync_all()?;
    std::fs::rename(&tmp, file)?;
    haven_frame::sync_path(dir)
}

/// Starts a planned switchover at this node: records `handing-over` and refuses new
/// writes from now on. Only a primary hands over.
pub fn hand_over(site: &SiteState, progress: &ArchiveProgress) -> Result<(), StandbyError> {
    match site.role() {
        Role::Primary | Role::HandingOver => {}
        role => {
            return Err(StandbyError::Refused(format!(
                "this service is {} here: only the primary hands it over",
                role.name()
            )));
        }
    }
    site.set_role(Role::HandingOver)
        .map_err(io("cannot record the handing-over role"))?;
    progress.refuse_for(&Role::HandingOver);
    Ok(())
}

/// Ends a switchover that did not happen: the site takes writes again, unless another
/// site's epoch is in the archive already (then it was fenced, and stays so).
pub async fn resume(handle: &SiteHandle, progress: &ArchiveProgress) -> Result<(), StandbyError> {
    if handle.site.role() != Role::HandingOver {
        return Err(StandbyError::Refused(format!(
            "this service is {} here, not handing over: there is nothing to resume",
            handle.site.role().name()
        )));
    }
    let target = &handle.target;
    let catalog = Catalog::load(&target.store, &target.protection).await?;
    if let Some(newest) = catalog.newest_epoch().filter(|m| !handle.writer.owns(m)) {
        return Err(StandbyError::Refused(format!(
            "epoch {} of the archive belongs to {}: the switchover went ahead, this site cannot take writes again (run `haven site follow`)",
            newest.epoch,
            newest.owner()
        )));
    }
    handle
        .site
        .set_role(Role::Primary)
        .map_err(io("cannot record the primary role"))?;
    progress.refuse_for(&Role::Primary);
    Ok(())
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> StandbyError {
    move |source| StandbyError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::RaftTypeConfig;
    use openraft::entry::RaftEntry;
    use openraft::storage::IOFlushed;
    use openraft::type_config::TypeConfigExt;
    use openraft::vote::RaftLeaderIdExt;

    fn request(body: &str) -> OrderedRequest {
        OrderedRequest {
            tag: haven_contract::RequestTag { origin: 1, seq: 1 },
            method: "POST".into(),
            uri: "/append".into(),
            headers: Vec::new(),
            body: bytes::Bytes::from(body.to_string()),
            idempotency_key: None,
            time_unix_us: 1_700_000_000_000_000,
            seed: 7,
        }
    }

    /// A service directory whose log holds a blank entry at 0 and requests 1..=9.
    async fn service_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut log: LogStore<TypeConfig> =
            LogStore::open(&dir.path().join("log"), LogOptions::default()).unwrap();
        let log_id = |index| {
            haven_consensus::types::LogId::new(
                <TypeConfig as RaftTypeConfig>::LeaderId::new_committed(2, 1),
                index,
            )
        };
        let mut entries = vec![Entry::new_blank(log_id(0))];
        entries.extend((1..10).map(|i| Entry::new_normal(log_id(i), request(&format!("r{i}")))));
        let (tx, rx) = TypeConfig::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        for name in ["apply", "checkpoints"] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("state"), b"old history").unwrap();
        }
        dir
    }

    fn plan(diverged_at: Option<u64>) -> Plan {
        Plan {
            epoch: 3,
            writer: "haven/app at site b".into(),
            diverged_at,
        }
    }

    #[tokio::test]
    async fn following_exports_what_only_this_site_held_then_deletes_its_history() {
        let dir = service_dir().await;
        let rejoined = rejoin(dir.path(), "a", &plan(Some(7))).await.unwrap();
        assert_eq!(
            (rejoined.exported, rejoined.first_index, rejoined.last_index),
            (3, Some(7), Some(9))
        );
        let file = rejoined.file.unwrap();
        assert_eq!(
            file,
            dir.path().join("failback/unarchived-before-epoch-3.jsonl")
        );
        let lines: Vec<ExportedRequest> = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let exported: Vec<(u64, u64, &str)> = (lines.iter())
            .map(|r| (r.index, r.term, r.body.as_deref().unwrap()))
            .collect();
        assert_eq!(exported, [(7, 2, "r7"), (8, 2, "r8"), (9, 2, "r9")]);
        for name in HISTORY_DIRS {
            assert!(!dir.path().join(name).exists(), "{name} is still there");
        }
        let site = SiteState::open(dir.path(), "a", false).unwrap();
        assert_eq!(site.role(), Role::Standby);
    }

    #[tokio::test]
    async fn a_site_whose_log_ends_before_the_divergence_exports_nothing() {
        for diverged_at in [Some(10), None] {
            let dir = service_dir().await;
            let rejoined = rejoin(dir.path(), "a", &plan(diverged_at)).await.unwrap();
            assert_eq!(rejoined, Rejoined::default());
            assert!(!dir.path().join(EXPORT_DIR).exists());
            assert!(!dir.path().join("log").exists());
        }
    }

    #[test]
    fn a_binary_body_is_exported_in_hex_and_a_text_body_as_text() {
        let mut request = OrderedRequest {
            tag: haven_contract::RequestTag { origin: 1, seq: 1 },
            method: "POST".into(),
            uri: "/append?x=1".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            body: bytes::Bytes::from_static(b"hello"),
            idempotency_key: Some("k1".into()),
            time_unix_us: 1_700_000_000_000_000,
            seed: 7,
        };
        let text = ExportedRequest::of(5, 2, &request);
        assert_eq!(
            (text.body.as_deref(), text.body_hex.as_deref()),
            (Some("hello"), None)
        );
        assert_eq!(text.time, "2023-11-14T22:13:20.000000Z");
        request.body = bytes::Bytes::from_static(&[0xff, 0x00, 0x10]);
        let binary = ExportedRequest::of(5, 2, &request);
        assert_eq!(
            (binary.body.as_deref(), binary.body_hex.as_deref()),
            (None, Some("ff0010"))
        );
    }
}
