//! Point-in-time restore from a node's data directory alone, with the cluster down: the
//! newest checkpoint at or before the target goes into a fresh app instance, then the log
//! is replayed up to the target through the same apply code a running node uses
//! ([`crate::apply`]), so a restored replica equals the one the cluster had at that index.

use std::ops::RangeInclusive;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use haven_log::LogOptions;
use haven_log::LogStore;
use openraft::EntryPayload;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftStateMachine;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use crate::app::hooks::Hooks;
use crate::app::pipeline::OrderedConnection;
use crate::app::process::AppCommand;
use crate::app::process::AppFiles;
use crate::app::process::ManagedApp;
use crate::apply::IdempotencyLimits;
use crate::apply::StateMachine;
use crate::checkpoint::Checkpoints;
use crate::checkpoint::capture::Capture;
use haven_base::config::CheckpointMode;
use haven_base::config::ServiceConfig;
use haven_base::lock::DirLock;
use haven_base::metrics::Metrics;
use haven_base::workers::Workers;
use haven_checkpoint::CheckpointFile;
use haven_checkpoint::catalog;
use haven_checkpoint::catalog::Retention;
use haven_checkpoint::format;
use haven_checkpoint::format::CheckpointInfo;
use haven_consensus::types::Entry;
use haven_consensus::types::TypeConfig;
use haven_contract::paths;

/// Entries read from the log and applied per step: a window of the replay
/// ([`StateMachine::replay`]) at most.
const REPLAY_BATCH: u64 = 4096;
const APP_STOP_GRACE: Duration = Duration::from_secs(10);
/// The file beside the log where a node records how to run its app, for restores.
const SETTINGS_FILE: &str = "app-settings.json";

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn refused(reason: impl Into<String>) -> RestoreError {
    RestoreError::Refused(reason.into())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RestoreError {
    let what = what.into();
    move |source| RestoreError::Io { what, source }
}

/// How a node's app runs, recorded by the node at start so a restore needs nothing but
/// the data directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppSettings {
    pub cluster: String,
    pub url: String,
    pub command: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub mode: Option<String>,
    pub snapshot_path: String,
    pub restore_path: String,
    pub timeout_ms: u64,
    pub start_timeout_ms: u64,
    pub idempotency_keys_max: usize,
    pub idempotency_retention_s: u64,
    /// The managed app's production data directory: a restore or drill refuses a command
    /// that names it instead of `{data_dir}` (it would run on production's data).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

impl AppSettings {
    pub fn from_config(config: &ServiceConfig) -> Self {
        let c = config.checkpoints.as_ref();
        let mode = c.map(|c| match c.mode {
            CheckpointMode::Hooks => "hooks".to_string(),
            CheckpointMode::Managed => "managed".to_string(),
        });
        Self {
            cluster: config.name.clone(),
            url: config.app.url.clone(),
            command: config.app.command.clone(),
            env: config.app.env.clone().into_iter().collect(),
            mode,
            snapshot_path: c.map_or(paths::SNAPSHOT.into(), |c| c.snapshot_path.clone()),
            restore_path: c.map_or(paths::RESTORE.into(), |c| c.restore_path.clone()),
            timeout_ms: config.app.timeout_ms,
            start_timeout_ms: config.app.start_timeout_ms,
            idempotency_keys_max: config.limits.idempotency_keys_max,
            idempotency_retention_s: config.limits.idempotency_retention_s,
            data_dir: config.app.data_dir.clone(),
        }
    }

    /// Written at every node start, atomically.
    pub fn save(&self, service_dir: &Path) -> std::io::Result<()> {
        let path = service_dir.join(SETTINGS_FILE);
        let tmp = service_dir.join(format!(".{SETTINGS_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &path)
    }

    fn load(service_dir: &Path) -> Result<Self, RestoreError> {
        let path = service_dir.join(SETTINGS_FILE);
        let text = std::fs::read(&path).map_err(io(format!("cannot read {}", path.display())))?;
        serde_json::from_slice(&text)
            .map_err(|e| refused(format!("{}: undecodable: {e}", path.display())))
    }

    fn limits(&self) -> IdempotencyLimits {
        IdempotencyLimits {
            max_keys: self.idempotency_keys_max,
            retention_us: (self.idempotency_retention_s as i64).saturating_mul(1_000_000),
        }
    }
}

/// Finds the service directory (the one holding `log/`) in a node's data directory, or
/// accepts the service directory itself.
pub fn service_dir(data_dir: &Path) -> Result<PathBuf, RestoreError> {
    if data_dir.join("log").is_dir() {
        return Ok(data_dir.to_path_buf());
    }
    let entries = std::fs::read_dir(data_dir).map_err(io(format!(
        "cannot read data directory {}",
        data_dir.display()
    )))?;
    let services: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("log").is_dir())
        .collect();
    match services.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(refused(format!(
            "{} holds no Haven service (no log/ directory)",
            data_dir.display()
        ))),
        _ => {
            let mut names: Vec<String> = services
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            names.sort();
            Err(refused(format!(
                "{} holds several services ({}): name one with --service NAME",
                data_dir.display(),
                names.join(", ")
            )))
        }
    }
}

/// The checkpoints of a node, oldest first, each with its trailer or why it is unreadable.
pub fn list(data_dir: &Path) -> Result<Vec<catalog::Listed>, RestoreError> {
    let dir = service_dir(data_dir)?.join("checkpoints");
    catalog::list(&dir).map_err(|e| refused(e.to_string()))
}

/// Where to stop replaying.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    Index(u64),
    /// Entry time, microseconds since the Unix epoch: the last entry at or before it.
    Time(i64),
    /// The last entry the source holds (committed, or archived without a gap).
    Latest,
}

pub struct RestoreOptions {
    pub data_dir: PathBuf,
    pub target: Target,
    pub out: PathBuf,
    /// Ignore checkpoints and replay from the first entry (needs the whole log).
    pub from_scratch: bool,
    /// Hooks mode without a command: a fresh, empty app instance to restore into.
    pub app_url: Option<String>,
    /// A command run against the restored app before it stops (exit 0 = good); it gets
    /// the app's base URL in `HAVEN_RESTORE_URL` and the output directory in
    /// `HAVEN_RESTORE_DIR`.
    pub check: Option<String>,
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub target_index: u64,
    pub target_entry_time_us: i64,
    pub checkpoint_index: Option<u64>,
    pub checkpoint_file: Option<PathBuf>,
    /// The checkpoint's size, fetched and installed.
    pub checkpoint_bytes: u64,
    pub entries_replayed: u64,
    /// Request bytes (bodies) replayed into the app.
    pub bytes_replayed: u64,
    pub replay_seconds: f64,
    pub out: PathBuf,
    /// The `--check` command's outcome: `None` when there was none.
    pub check_passed: Option<bool>,
}

/// Progress hooks for the CLI's progress bar: total entries, then entries done.
pub trait Progress: Sync {
    fn start(&self, total: u64);
    fn advance(&self, done: u64);
}

pub async fn run(
    options: RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport, RestoreError> {
    let service = service_dir(&options.data_dir)?;
    let _lock = DirLock::acquire(&service).map_err(|e| refused(e.to_string()))?;
    let settings = AppSettings::load(&service)?;
    let log = LogStore::<TypeConfig>::open(&service.join("log"), LogOptions::default())
        .map_err(|e| refused(format!("cannot open the log: {e}")))?;
    let history = History::Local {
        log,
        checkpoints: service.join("checkpoints"),
    };
    restore_from(history, &settings, options, progress).await
}

/// What a restore from the off-site archive needs besides the target: the archive (read
/// through the key) and how to run the app, since no node's directory records it.
pub struct ArchiveRestore {
    pub reader: haven_archive::reader::Reader,
    pub settings: AppSettings,
}

/// [`run`] with the archive as the source: the same choice of checkpoint, the same replay
/// through the same apply code; the checkpoint is fetched (decrypted, authenticated) into
/// a scratch directory and verified before it is installed.
pub async fn run_from_archive(
    archive: ArchiveRestore,
    options: RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport, RestoreError> {
    let mut restored = restore_running(archive, options, progress).await?;
    if let Some(command) = &restored.options.check {
        let passed = run_check(command, restored.url(), &restored.options.out).await?;
        restored.report.check_passed = Some(passed);
    }
    restored.finish().await
}

async fn restore_from(
    history: History,
    settings: &AppSettings,
    options: RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport, RestoreError> {
    let mut restored = restore_app(history, settings, options, progress).await?;
    if let Some(command) = &restored.options.check {
        let passed = run_check(command, restored.url(), &restored.options.out).await?;
        restored.report.check_passed = Some(passed);
    }
    restored.finish().await
}

/// A restored app, still running: what a restore's check or a drill's checks talk to
/// before it is stopped ([`Restored::finish`]).
pub struct Restored {
    pub report: RestoreReport,
    instance: AppInstance,
    options: RestoreOptions,
    /// Where the checkpoint was fetched to and the replay's apply state: kept until the
    /// app stops.
    _scratch: Vec<tempfile::TempDir>,
}

impl Restored {
    /// The restored app's base URL (`http://host:port`).
    pub fn url(&self) -> &str {
        &self.instance.url
    }

    /// Stops the app, leaving its state in the output directory.
    pub async fn finish(self) -> Result<RestoreReport, RestoreError> {
        self.instance.finish(&self.options.out).await?;
        Ok(self.report)
    }
}

/// [`run_from_archive`] up to the replayed app, left running.
pub async fn restore_running(
    archive: ArchiveRestore,
    options: RestoreOptions,
    progress: &dyn Progress,
) -> Result<Restored, RestoreError> {
    let scratch = tempfile::tempdir().map_err(io("cannot create a scratch directory"))?;
    let history = History::Archive {
        reader: Box::new(archive.reader),
        scratch: scratch.path().to_path_buf(),
    };
    let mut restored = restore_app(history, &archive.settings, options, progress).await?;
    restored._scratch.push(scratch);
    Ok(restored)
}

async fn restore_app(
    mut history: History,
    settings: &AppSettings,
    options: RestoreOptions,
    progress: &dyn Progress,
) -> Result<Restored, RestoreError> {
    prepare_out(&options.out)?;
    let range = history.range().await?;
    let (base, target) = choose_base(&mut history, &options, &range).await?;
    let first = first_to_replay(&history, &range, base.as_ref().map(|b| b.index), target)?;
    let scratch = tempfile::tempdir().map_err(io("cannot create a scratch directory"))?;
    let instance = AppInstance::start(settings, &options, scratch.path()).await?;
    let machine = instance.state_machine(settings, scratch.path())?;
    if let Some(base) = &base {
        install(&machine, base).await?;
    }
    let replayed = (target + 1).saturating_sub(first);
    progress.start(replayed);
    let started = Instant::now();
    let bytes_replayed = replay(&machine, &mut history, first..=target, progress).await?;
    let replay_seconds = started.elapsed().as_secs_f64();
    let report = RestoreReport {
        target_index: target,
        target_entry_time_us: history.entry_time_at(target).await?,
        checkpoint_index: base.as_ref().map(|b| b.index),
        checkpoint_bytes: base.as_ref().map_or(0, |b| file_size(&b.path)),
        checkpoint_file: base.map(|b| b.path),
        entries_replayed: replayed,
        bytes_replayed,
        replay_seconds,
        out: options.out.clone(),
        check_passed: None,
    };
    Ok(Restored {
        report,
        instance,
        options,
        _scratch: vec![scratch],
    })
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Runs the operator's check against the restored app; its output goes to ours.
async fn run_check(command: &str, url: &str, out: &Path) -> Result<bool, RestoreError> {
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("HAVEN_RESTORE_URL", url)
        .env("HAVEN_RESTORE_DIR", out)
        .status()
        .await
        .map_err(io(format!("cannot run the check {command:?}")))?;
    Ok(status.success())
}

fn prepare_out(out: &Path) -> Result<(), RestoreError> {
    let empty = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(io(format!("cannot read {}", out.display()))(e)),
    };
    if !empty {
        return Err(refused(format!(
            "output directory {} is not empty",
            out.display()
        )));
    }
    Ok(())
}

/// Where a restore reads the history it replays: a node's own log and checkpoints, or
/// the off-site archive. Everything else about a restore is the same for both, and a
/// standby following the archive replays through the same code ([`crate::standby`]).
pub(crate) enum History {
    Local {
        log: LogStore<TypeConfig>,
        checkpoints: PathBuf,
    },
    Archive {
        reader: Box<haven_archive::reader::Reader>,
        /// Where a chosen checkpoint is fetched to.
        scratch: PathBuf,
    },
}

/// A checkpoint a restore may start from, by its index and entry time.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    index: u64,
    entry_time_us: i64,
}

impl History {
    fn describe(&self) -> &'static str {
        match self {
            History::Local { .. } => "this node's log",
            History::Archive { .. } => "the archive",
        }
    }

    /// The log indexes a restore may use: after the purged prefix, up to the committed
    /// index (an entry beyond it may never have been committed by the cluster); in the
    /// archive, from its first entry to the end of its gapless history.
    async fn range(&mut self) -> Result<RangeInclusive<u64>, RestoreError> {
        match self {
            History::Local { log, .. } => committed_range(log).await,
            History::Archive { reader, .. } => {
                let catalog = reader.catalog();
                let first = catalog.log.first().map_or(0, |o| o.first);
                let Some((last, _)) = catalog.last_entry() else {
                    return Err(refused(format!("the archive at {} is empty", catalog.url)));
                };
                Ok(first..=last)
            }
        }
    }

    /// Readable checkpoints, oldest first.
    fn candidates(&self) -> Result<Vec<Candidate>, RestoreError> {
        match self {
            History::Local { checkpoints, .. } => {
                let listed = catalog::list(checkpoints).map_err(|e| refused(e.to_string()))?;
                Ok(listed
                    .into_iter()
                    .filter_map(|l| l.info.ok())
                    .map(|c| Candidate {
                        index: c.index,
                        entry_time_us: c.entry_time_us,
                    })
                    .collect())
            }
            History::Archive { reader, .. } => Ok(reader
                .catalog()
                .checkpoints
                .iter()
                .map(|c| Candidate {
                    index: c.index,
                    entry_time_us: c.time_us,
                })
                .collect()),
        }
    }

    /// The archive's catalog, refreshed: what was written since, and nothing at or
    /// before `applied` (a standby following the archive).
    pub(crate) async fn follow(
        &mut self,
        applied: u64,
    ) -> Result<&haven_archive::catalog::Catalog, RestoreError> {
        match self {
            History::Local { .. } => Err(refused("a node's own log is not followed")),
            History::Archive { reader, .. } => {
                reader
                    .refresh(applied)
                    .await
                    .map_err(|e| refused(e.to_string()))?;
                Ok(reader.catalog())
            }
        }
    }

    /// The checkpoint at `index` as a local file, verified in full.
    pub(crate) async fn materialize(&self, index: u64) -> Result<CheckpointInfo, RestoreError> {
        let path = match self {
            History::Local { checkpoints, .. } => {
                let listed = catalog::list(checkpoints).map_err(|e| refused(e.to_string()))?;
                let found = listed.into_iter().filter_map(|l| l.info.ok());
                let info = found.into_iter().find(|c| c.index == index);
                info.ok_or_else(|| refused(format!("checkpoint {index} disappeared")))?
                    .path
            }
            History::Archive { reader, scratch } => {
                let object = reader
                    .catalog()
                    .checkpoints
                    .iter()
                    .rev()
                    .find(|c| c.index == index);
                let object = object
                    .ok_or_else(|| refused(format!("checkpoint {index} is not in the archive")))?;
                let path = scratch.join(haven_checkpoint::format::file_name(
                    object.index,
                    object.term,
                ));
                reader
                    .fetch_checkpoint(object, &path)
                    .await
                    .map_err(|e| refused(e.to_string()))?;
                path
            }
        };
        let info = format::read_info(&path).map_err(|e| refused(e.to_string()))?;
        verified(info)
    }

    /// Entries `range`, all of them, in order.
    async fn read(&mut self, range: RangeInclusive<u64>) -> Result<Vec<Entry>, RestoreError> {
        let entries = match self {
            History::Local { log, .. } => log
                .try_get_log_entries(range.clone())
                .await
                .map_err(io("cannot read the log"))?,
            History::Archive { reader, .. } => read_archived(reader, &range).await?,
        };
        let contiguous = entries
            .iter()
            .zip(range.clone())
            .all(|(e, i)| e.log_id.index == i);
        if !contiguous || entries.len() as u64 != range.end() - range.start() + 1 {
            return Err(refused(format!(
                "log entries {range:?} are not contiguous in {}",
                self.describe()
            )));
        }
        Ok(entries)
    }

    async fn entry_time_at(&mut self, index: u64) -> Result<i64, RestoreError> {
        let entries = self.read(index..=index).await.unwrap_or_default();
        Ok(entries.first().and_then(entry_time).unwrap_or(0))
    }
}

async fn read_archived(
    reader: &haven_archive::reader::Reader,
    range: &RangeInclusive<u64>,
) -> Result<Vec<Entry>, RestoreError> {
    let archived = reader
        .entries(*range.start(), *range.end())
        .await
        .map_err(|e| refused(e.to_string()))?;
    archived
        .iter()
        .map(|a| {
            postcard::from_bytes(&a.payload).map_err(|e| {
                let name = format!("entry {}", a.index);
                refused(
                    haven_archive::ArchiveError::damaged(&name, format!("undecodable entry: {e}"))
                        .to_string(),
                )
            })
        })
        .collect()
}

async fn committed_range(
    log: &mut LogStore<TypeConfig>,
) -> Result<RangeInclusive<u64>, RestoreError> {
    let state = log
        .get_log_state()
        .await
        .map_err(io("cannot read the log state"))?;
    let committed = log
        .read_committed()
        .await
        .map_err(io("cannot read the log's committed index"))?;
    let first = state.last_purged_log_id.map_or(0, |p| p.index + 1);
    let last = committed
        .map_or(0, |c| c.index)
        .min(state.last_log_id.map_or(0, |l| l.index));
    Ok(first..=last)
}

async fn choose_base(
    history: &mut History,
    options: &RestoreOptions,
    range: &RangeInclusive<u64>,
) -> Result<(Option<CheckpointInfo>, u64), RestoreError> {
    let valid = history.candidates()?;
    let target = match options.target {
        Target::Index(index) => index,
        Target::Time(time_us) => index_at_time(history, &valid, range, time_us).await?,
        Target::Latest => *range.end(),
    };
    if options.from_scratch {
        return Ok((None, target));
    }
    let oldest = valid.first().map(|c| c.index);
    let base = valid.into_iter().rev().find(|c| c.index <= target);
    if base.is_none() && *range.start() > 0 {
        return Err(refused(format!(
            "index {target} is not restorable from {}: {}",
            history.describe(),
            restorable(oldest, range)
        )));
    }
    let base = match base {
        Some(base) => Some(history.materialize(base.index).await?),
        None => None,
    };
    Ok((base, target))
}

/// What a node can restore, for error messages.
fn restorable(oldest: Option<u64>, range: &RangeInclusive<u64>) -> String {
    let from = oldest.map_or(range.start().saturating_sub(1), |o| o.min(*range.start()));
    match oldest {
        Some(o) => format!(
            "its oldest checkpoint is at {o} and its log ends at {}; it can restore {from} to {}",
            range.end(),
            range.end()
        ),
        None => format!(
            "it has no checkpoint and its log starts at {}",
            range.start()
        ),
    }
}

fn verified(info: CheckpointInfo) -> Result<CheckpointInfo, RestoreError> {
    format::verify(&info.path).map_err(|e| refused(format!("checkpoint failed verification: {e}")))
}

/// The last committed entry at or before `time_us`.
async fn index_at_time(
    history: &mut History,
    checkpoints: &[Candidate],
    range: &RangeInclusive<u64>,
    time_us: i64,
) -> Result<u64, RestoreError> {
    if let History::Archive { reader, .. } = history {
        let found = reader
            .index_at_time(time_us)
            .await
            .map_err(|e| refused(e.to_string()))?;
        return nonzero(found.map_or(0, |(index, _)| index), time_us);
    }
    let base = checkpoints
        .iter()
        .rev()
        .find(|c| c.entry_time_us <= time_us);
    let mut found = base.map_or(0, |c| c.index);
    let mut next = (found + 1).max(*range.start());
    while next <= *range.end() {
        let end = (next + REPLAY_BATCH - 1).min(*range.end());
        for entry in history.read(next..=end).await? {
            match entry_time(&entry) {
                Some(t) if t > time_us => return nonzero(found, time_us),
                _ => found = entry.log_id.index,
            }
        }
        next = end + 1;
    }
    nonzero(found, time_us)
}

fn nonzero(index: u64, time_us: i64) -> Result<u64, RestoreError> {
    if index == 0 {
        return Err(refused(format!(
            "no retained entry or checkpoint is at or before {}",
            crate::apply::rfc3339(time_us)
        )));
    }
    Ok(index)
}

fn entry_time(entry: &Entry) -> Option<i64> {
    match &entry.payload {
        EntryPayload::Normal(req) => Some(req.time_unix_us),
        _ => None,
    }
}

/// The first entry to replay on top of `base` (a checkpoint's index, or none: an empty
/// app, from the very first entry), checked against what the history still holds.
fn first_to_replay(
    history: &History,
    range: &RangeInclusive<u64>,
    base: Option<u64>,
    target: u64,
) -> Result<u64, RestoreError> {
    let source = history.describe();
    if target > *range.end() {
        return Err(refused(format!(
            "index {target} is beyond the last committed entry {} in {source}",
            range.end()
        )));
    }
    let first = base.map_or(0, |b| b + 1);
    if first <= target && first < *range.start() {
        let from = match base {
            Some(b) => format!("checkpoint {b}, the newest at or before the target"),
            None => "an empty app".to_string(),
        };
        return Err(refused(format!(
            "index {target} needs log entries from {first} (after {from}) but {source} starts at {}",
            range.start()
        )));
    }
    Ok(first)
}

pub(crate) async fn install(
    machine: &StateMachine,
    base: &CheckpointInfo,
) -> Result<(), RestoreError> {
    let mut machine = machine.clone();
    let snapshot = crate::apply::snapshot_of(base).map_err(|e| refused(e.to_string()))?;
    let file = CheckpointFile {
        path: base.path.clone(),
    };
    machine
        .install_snapshot(&snapshot.meta, file)
        .await
        .map_err(io(format!(
            "cannot restore checkpoint {}",
            base.path.display()
        )))
}

/// Replays `range` from `history`; the next batch is read while the app takes this one,
/// so the app does not wait for the log or the archive between batches.
pub(crate) async fn replay(
    machine: &StateMachine,
    history: &mut History,
    range: RangeInclusive<u64>,
    progress: &dyn Progress,
) -> Result<u64, RestoreError> {
    let (first, last) = (*range.start(), *range.end());
    let mut bytes = 0;
    let mut batch = read_batch(history, first, last).await?;
    while let Some((end, entries)) = batch {
        bytes += entries.iter().map(request_bytes).sum::<u64>();
        let (replayed, read) =
            tokio::join!(machine.replay(entries), read_batch(history, end + 1, last));
        replayed.map_err(io("replay into the app failed"))?;
        batch = read?;
        progress.advance(end + 1 - first);
    }
    Ok(bytes)
}

/// Up to [`REPLAY_BATCH`] entries from `next` on, and the last one's index; none past
/// `last`.
async fn read_batch(
    history: &mut History,
    next: u64,
    last: u64,
) -> Result<Option<(u64, Vec<Entry>)>, RestoreError> {
    if next > last {
        return Ok(None);
    }
    let end = (next + REPLAY_BATCH - 1).min(last);
    Ok(Some((end, history.read(next..=end).await?)))
}

fn request_bytes(entry: &Entry) -> u64 {
    match &entry.payload {
        EntryPayload::Normal(request) => request.body.len() as u64,
        _ => 0,
    }
}

/// The fresh app a restore fills: started by Haven (managed, or hooks with a command) on
/// a free port with the output directory as its data directory, or an app the operator
/// started (hooks without a command).
struct AppInstance {
    url: String,
    managed: Option<Arc<ManagedApp>>,
    hooks: Hooks,
    _stop: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
}

impl AppInstance {
    async fn start(
        settings: &AppSettings,
        options: &RestoreOptions,
        scratch: &Path,
    ) -> Result<Self, RestoreError> {
        let (url, managed) = match (&settings.command, &options.app_url) {
            (_, Some(url)) => (url.clone(), None),
            (Some(argv), None) => {
                let (url, app) = start_fresh(settings, argv, &options.out, scratch).await?;
                (url, Some(Arc::new(app)))
            }
            (None, None) => {
                return Err(refused(
                    "this node's app is not managed by Haven; pass --app-url of a fresh, empty app instance",
                ));
            }
        };
        let timeout = Duration::from_millis(settings.timeout_ms);
        let hooks = Hooks {
            snapshot_path: settings.snapshot_path.clone(),
            restore_path: settings.restore_path.clone(),
            ..Hooks::new(&url, timeout)
        };
        let (stop_tx, stop) = watch::channel(false);
        Ok(Self {
            url,
            managed,
            hooks,
            _stop: stop_tx,
            stop,
        })
    }

    fn state_machine(
        &self,
        settings: &AppSettings,
        scratch: &Path,
    ) -> Result<StateMachine, RestoreError> {
        let capture = match (&self.managed, settings.mode.as_deref()) {
            (Some(app), Some("managed")) => Capture::Managed(app.clone()),
            _ => Capture::Hooks(self.hooks.clone()),
        };
        let retention = Retention {
            keep: 1,
            max_age: None,
        };
        let checkpoints = Checkpoints::open(
            &scratch.join("checkpoints"),
            &settings.cluster,
            capture,
            retention,
        )
        .map_err(io("cannot prepare the scratch directory"))?;
        let timeout = Duration::from_millis(settings.timeout_ms);
        let metrics = Metrics::new().map_err(|e| refused(e.to_string()))?;
        StateMachine::open(
            &scratch.join("apply"),
            OrderedConnection::new(&self.url, timeout),
            settings.limits(),
            metrics,
            self.stop.clone(),
            Some(Arc::new(checkpoints)),
            &Workers::new(),
        )
        .map_err(|e| refused(e.to_string()))
    }

    /// Leaves the app's state in `out`: its data directory when Haven ran it, else the
    /// bytes of its snapshot endpoint in `out/snapshot.bin`.
    async fn finish(self, out: &Path) -> Result<(), RestoreError> {
        match &self.managed {
            Some(app) => app
                .stop(APP_STOP_GRACE)
                .await
                .map_err(|e| refused(format!("cannot stop the restored app: {e}"))),
            None => {
                std::fs::create_dir_all(out)
                    .map_err(io(format!("cannot create {}", out.display())))?;
                let path = out.join("snapshot.bin");
                let mut file = tokio::fs::File::create(&path)
                    .await
                    .map_err(io(format!("cannot create {}", path.display())))?;
                self.hooks.snapshot_to(&mut file).await.map_err(|e| {
                    refused(format!("cannot take the restored app's snapshot: {e}"))
                })?;
                Ok(())
            }
        }
    }
}

/// Whether an argument or environment value of `command` spells out `dir`.
fn names_literally(command: &AppCommand, dir: &Path) -> bool {
    let dir = dir.display().to_string();
    let values = command
        .argv
        .iter()
        .chain(command.env.iter().map(|(_, v)| v));
    !dir.is_empty() && values.into_iter().any(|v| v.contains(&dir))
}

/// Runs the recorded command with `out` as its data directory on a free loopback port, so
/// a restore can run beside a live cluster: the address placeholders (`{listen}`,
/// `{host}`, `{port}`) follow the new url, and the recorded `host:port` written out in an
/// argument or environment value is replaced. A command that names its address in
/// neither form is refused at once: it would start on the recorded port and never
/// answer on the new one.
async fn start_fresh(
    settings: &AppSettings,
    argv: &[String],
    out: &Path,
    scratch: &Path,
) -> Result<(String, ManagedApp), RestoreError> {
    let recorded = AppCommand {
        argv: argv.to_vec(),
        env: settings.env.clone(),
        data_dir: out.to_path_buf(),
        url: settings.url.clone(),
    };
    if !recorded.names_its_address() {
        return Err(refused(format!(
            "the app command {argv:?} does not say where the app listens in a form Haven can change, so it cannot run on a port of its own beside the cluster: write the address in the command as {{listen}} (host:port), or {{host}} and {{port}} (e.g. \"-h\", \"{{host}}\", \"-p\", \"{{port}}\"), in [app] command or env"
        )));
    }
    if let Some(production) = &settings.data_dir
        && names_literally(&recorded, production)
    {
        return Err(refused(format!(
            "the app command {argv:?} names the production data directory {} itself, so a copy started for a restore or drill would work on production's data: write it as {{data_dir}}",
            production.display()
        )));
    }
    let written_out = settings
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io("cannot find a free port"))?;
    let fresh = port.to_string();
    let moved = |text: &String| text.replace(&written_out, &fresh);
    let url = format!("http://{fresh}");
    let command = AppCommand {
        argv: recorded.argv.iter().map(moved).collect(),
        env: recorded
            .env
            .iter()
            .map(|(k, v)| (k.clone(), moved(v)))
            .collect(),
        data_dir: out.to_path_buf(),
        url: url.clone(),
    };
    let start_timeout = Duration::from_millis(settings.start_timeout_ms);
    let metrics = Metrics::new().map_err(|e| refused(e.to_string()))?;
    let app = ManagedApp::start(
        command,
        AppFiles::in_dir(scratch),
        start_timeout,
        metrics,
        &Workers::new(),
    )
    .await
    .map_err(|e| refused(format!("cannot start a fresh app: {e}")))?;
    Ok((url, app))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(argv: &[&str]) -> (AppSettings, Vec<String>) {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        let settings = AppSettings {
            cluster: "app".into(),
            url: "http://127.0.0.1:6001".into(),
            command: Some(argv.clone()),
            env: Vec::new(),
            mode: Some("managed".into()),
            snapshot_path: paths::SNAPSHOT.into(),
            restore_path: paths::RESTORE.into(),
            timeout_ms: 1000,
            start_timeout_ms: 10_000,
            idempotency_keys_max: 10,
            idempotency_retention_s: 10,
            data_dir: Some("/var/lib/app".into()),
        };
        (settings, argv)
    }

    /// A `file://` archive of entries 0..=59 in three log objects of 20, sealed with a
    /// new key; with `checkpoint`, also a (garbage) checkpoint object at 20. Its objects'
    /// names: the log's in order, then the checkpoint's.
    async fn small_archive(
        dir: &Path,
        checkpoint: bool,
    ) -> (
        haven_archive::store::Store,
        haven_archive::seal::Protection,
        Vec<String>,
    ) {
        use haven_archive::batch::ArchivedEntry;
        use openraft::vote::RaftLeaderIdExt;
        let store = haven_archive::store::Store::open(&haven_archive::store::StoreSettings {
            url: format!("file://{}", dir.join("archive").display()),
            endpoint: None,
        })
        .unwrap();
        let protection =
            haven_archive::seal::Protection::Encrypted(haven_archive::key::ArchiveKey::generate());
        let writer = haven_archive::epoch::Writer {
            cluster: "a".into(),
            site: String::new(),
            service: "app".into(),
            node: 1,
        };
        let mut archive = haven_archive::writer::ArchiveWriter::open(
            store.clone(),
            protection.clone(),
            &writer,
            1,
        )
        .await
        .unwrap();
        let leader = <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(1, 1);
        let archived = |index: u64| {
            let entry = Entry {
                log_id: haven_consensus::types::LogId::new(leader, index),
                payload: EntryPayload::Normal(crate::app::pipeline::tests::request(index)),
            };
            ArchivedEntry {
                index,
                term: 1,
                time_us: index as i64,
                payload: postcard::to_stdvec(&entry).unwrap().into(),
            }
        };
        for first in [0, 20, 40] {
            let entries: Vec<_> = (first..first + 20).map(archived).collect();
            archive.ship_entries(&entries).await.unwrap();
        }
        if checkpoint {
            let file = dir.join("checkpoint");
            std::fs::write(&file, vec![7u8; 3 << 20]).unwrap();
            archive.ship_checkpoint(&file, 20, 1, 20).await.unwrap();
        }
        let reader = haven_archive::reader::Reader::open(store.clone(), protection.clone())
            .await
            .unwrap();
        let catalog = reader.catalog();
        let names = catalog.log.iter().map(|o| o.name.clone());
        let names = names.chain(catalog.checkpoints.iter().map(|o| o.name.clone()));
        (store, protection, names.collect())
    }

    /// `haven archive restore --latest --app-url` of the archive in `dir` into an app
    /// that answers every request: what it refused with.
    async fn refused_restore(
        dir: &Path,
        store: haven_archive::store::Store,
        protection: haven_archive::seal::Protection,
    ) -> String {
        let (url, _app) = crate::app::pipeline::tests::path_echo_app(None, None).await;
        let reader = haven_archive::reader::Reader::open(store, protection)
            .await
            .unwrap();
        let (settings, _) = settings(&[]);
        let settings = AppSettings {
            command: None,
            mode: Some("hooks".into()),
            ..settings
        };
        let options = RestoreOptions {
            data_dir: PathBuf::new(),
            target: Target::Latest,
            out: dir.join("out"),
            from_scratch: false,
            app_url: Some(url),
            check: None,
        };
        let archive = ArchiveRestore { reader, settings };
        match run_from_archive(archive, options, &crate::standby::Silent).await {
            Ok(report) => panic!("a damaged archive was restored: {report:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Rewrites the stored object `name` of the archive in `dir`.
    fn damage(dir: &Path, name: &str, change: impl FnOnce(&mut Vec<u8>)) {
        let file = dir.join("archive").join(name);
        let mut bytes = std::fs::read(&file).unwrap();
        change(&mut bytes);
        std::fs::write(&file, bytes).unwrap();
    }

    fn damaged(name: &str) -> String {
        format!("object {name} is damaged: chunk 0 failed authentication (tampered or truncated)")
    }

    #[tokio::test]
    async fn a_restore_refuses_a_flipped_byte_naming_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let (store, protection, names) = small_archive(dir.path(), false).await;
        let name = &names[1];
        damage(dir.path(), name, |bytes| bytes[60] ^= 0x10);
        let refused = refused_restore(dir.path(), store, protection).await;
        assert_eq!(refused, damaged(name));
    }

    #[tokio::test]
    async fn a_restore_refuses_a_truncated_object_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (store, protection, names) = small_archive(dir.path(), false).await;
        let name = &names[2];
        damage(dir.path(), name, |bytes| bytes.truncate(bytes.len() / 2));
        let refused = refused_restore(dir.path(), store, protection).await;
        assert_eq!(refused, damaged(name));

        let dir = tempfile::tempdir().unwrap();
        let (store, protection, names) = small_archive(dir.path(), true).await;
        let name = &names[3];
        damage(dir.path(), name, |bytes| bytes.truncate(bytes.len() - 100));
        let refused = refused_restore(dir.path(), store, protection).await;
        assert_eq!(
            refused,
            format!(
                "object {name} is damaged: chunk 2 failed authentication (tampered or truncated)"
            )
        );
    }

    /// Python's own HTTP server takes its host and port as two separate arguments.
    #[tokio::test]
    async fn an_app_given_host_and_port_apart_runs_on_a_port_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, argv) = settings(&[
            "python3",
            "-m",
            "http.server",
            "--bind",
            "{host}",
            "--directory",
            "{data_dir}",
            "{port}",
        ]);
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let (url, app) = start_fresh(&settings, &argv, &out, dir.path())
            .await
            .unwrap();
        assert_ne!(url, settings.url);
        let pid = app.pid().unwrap();
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        let port = url.rsplit(':').next().unwrap();
        assert!(
            cmdline.ends_with(&format!("\0{port}\0")),
            "{cmdline:?} does not end with port {port}"
        );
        app.stop(Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn an_app_whose_address_cannot_be_moved_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, argv) =
            settings(&["python3", "-m", "http.server", "-b", "127.0.0.1", "6001"]);
        let started = std::time::Instant::now();
        let Err(e) = start_fresh(&settings, &argv, dir.path(), dir.path()).await else {
            panic!("a command with a fixed address was started");
        };
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            e.to_string(),
            r#"the app command ["python3", "-m", "http.server", "-b", "127.0.0.1", "6001"] does not say where the app listens in a form Haven can change, so it cannot run on a port of its own beside the cluster: write the address in the command as {listen} (host:port), or {host} and {port} (e.g. "-h", "{host}", "-p", "{port}"), in [app] command or env"#
        );
    }

    #[tokio::test]
    async fn an_app_naming_the_production_data_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, argv) = settings(&[
            "logapp",
            "--listen",
            "{listen}",
            "--file",
            "/var/lib/app/log.txt",
        ]);
        let Err(e) = start_fresh(&settings, &argv, dir.path(), dir.path()).await else {
            panic!("a command naming production's data was started");
        };
        assert_eq!(
            e.to_string(),
            r#"the app command ["logapp", "--listen", "{listen}", "--file", "/var/lib/app/log.txt"] names the production data directory /var/lib/app itself, so a copy started for a restore or drill would work on production's data: write it as {data_dir}"#
        );
    }
}
