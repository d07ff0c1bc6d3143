//! One protected app, a *service*: its Raft group, log, apply state, replica (started by
//! Haven in managed mode), checkpoints and their policy, and the workers that keep them
//! going. A node hosts its services and gives them what they share: the peer transport,
//! the metrics registry, the worker list and the shutdown signal ([`NodeShared`]).
//!
//! A service opens in a fixed order (lock, log, app, checkpoints, apply state, Raft),
//! so a misconfigured or damaged one fails before Raft touches its data, and shuts down
//! in reverse: Raft first, then its apply state is saved, then its app is stopped.

use std::path::Path;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use haven_checkpoint::catalog::Retention;
use haven_log::LogOptions;
use haven_log::LogStore;
use openraft::rt::WatchReceiver;
use openraft::storage::RaftLogStorage;
use tokio::sync::mpsc;
use tokio::sync::watch;

use crate::app::hooks::Hooks;
use crate::app::pipeline::OrderedConnection;
use crate::app::process::AppCommand;
use crate::app::process::AppFiles;
use crate::app::process::ManagedApp;
use crate::apply::IdempotencyLimits;
use crate::apply::Raft;
use crate::apply::StateMachine;
use crate::archive::ArchiveProgress;
use crate::archive::ArchiveTarget;
use crate::archive::RecoveryPoint;
use crate::archive::Uploader;
use crate::checkpoint::Checkpoints;
use crate::checkpoint::capture::Capture;
use crate::checkpoint::policy;
use crate::checkpoint::policy::Policy;
use crate::divergence::Comparison;
use crate::divergence::Members;
use crate::restore::AppSettings;
use crate::site::Role;
use crate::site::SiteState;
use crate::standby::Follower;
use crate::standby::SiteHandle;
use haven_archive::epoch;
use haven_base::config::CheckpointMode;
use haven_base::config::Config;
use haven_base::config::ServiceConfig;
use haven_base::lock::DirLock;
use haven_base::metrics::Metrics;
use haven_base::workers::Workers;
use haven_consensus as consensus;
use haven_consensus::first_answers::PeerAddrs;
use haven_consensus::first_answers::PeerAnswers;
use haven_consensus::link::Transport;
use haven_consensus::server::InboxFactory;
use haven_consensus::snapshot::CheckpointInbox;
use haven_consensus::stand_in::StandInSlot;
use haven_consensus::types::TypeConfig;
use haven_contract::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Log(#[from] haven_log::LogError),
    #[error(transparent)]
    ApplyState(#[from] crate::apply::ApplyStateError),
    #[error("invalid raft settings: {0}")]
    RaftConfig(#[from] openraft::ConfigError),
    #[error("raft failed: {0}")]
    Raft(String),
    #[error(transparent)]
    App(Box<crate::app::process::ProcessError>),
    #[error("cannot lock {dir}: {source}")]
    Locked {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot record the app settings in {dir}: {source}")]
    Settings {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the log in {log_dir} ends at index {log_end}, but {apply_dir} records index {applied} as applied and no checkpoint covers it: entries this replica applied are missing from the log (a log write that failed after they were applied, e.g. on a full disk, or a damaged or truncated segment); rebuild this node from its peers"
    )]
    LogBehindApply {
        log_dir: std::path::PathBuf,
        log_end: String,
        apply_dir: std::path::PathBuf,
        applied: u64,
    },
    #[error("cannot rebuild the replica of {dir} from a checkpoint after a crash: {source}")]
    Rebuild {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open checkpoints in {dir}: {source}")]
    Checkpoints {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    AdminTokens(String),
    #[error("off-site archive of service {service}: {source}")]
    Archive {
        service: String,
        source: Box<haven_archive::ArchiveError>,
    },
}

/// What a node's services share.
pub struct NodeShared {
    pub metrics: Metrics,
    pub transport: Transport,
    /// The node's worker list; each service names its own workers `<service>/...`.
    pub workers: Workers,
    pub stop: watch::Receiver<bool>,
    /// Asks the node to open a service again by name (a standby that took over).
    pub reopen: mpsc::UnboundedSender<String>,
}

/// One running service.
pub struct Service {
    pub name: String,
    /// None while the service is a standby of another site: it follows the archive instead.
    pub raft: Option<Raft>,
    /// Which site writes the service, when it has an off-site archive.
    pub site: Option<SiteHandle>,
    pub state_machine: StateMachine,
    pub checkpoints: Option<Arc<Checkpoints>>,
    /// The off-site archive, when configured: where it is and how far it got.
    pub archive: Option<(ArchiveTarget, ArchiveProgress)>,
    /// Where the node puts the service's ingress, so peers whose replica is paused can
    /// have it answer their clients.
    pub stand_in: StandInSlot,
    /// A handle on the log for the archive uploader (Raft owns the other).
    log: LogStore<TypeConfig>,
    managed: Option<Arc<ManagedApp>>,
    workers: Workers,
    /// Held while the service runs: no second node or restore touches its directory.
    _lock: DirLock,
}

impl Service {
    /// Opens the service's data, starts its app and its Raft node. Raft is not
    /// initialized and no worker runs until [`Self::start`]: the node first opens the
    /// raft port that serves it.
    pub async fn open(
        config: &Config,
        service: &ServiceConfig,
        shared: &NodeShared,
    ) -> Result<Self, ServiceError> {
        let name = service.name.clone();
        let dir = config.service_dir(service);
        let lock = DirLock::acquire(&dir).map_err(|source| ServiceError::Locked {
            dir: dir.clone(),
            source,
        })?;
        // Fail closed before anything else opens: no key, no service.
        let archive = open_archive(service)?;
        let site = match &archive {
            Some((target, _)) => Some(open_site(config, service, target, &dir)?),
            None => None,
        };
        let standby = site
            .as_ref()
            .is_some_and(|s| s.site.role() == Role::Standby);
        let log_store: LogStore<TypeConfig> = LogStore::open(&dir.join("log"), log_options())?;
        tracing::info!(dir = %dir.display(), "log opened");
        AppSettings::from_config(service)
            .save(&dir)
            .map_err(|source| ServiceError::Settings {
                dir: dir.clone(),
                source,
            })?;
        let workers = shared.workers.scoped(&name);
        let managed = start_managed_app(service, &dir, &shared.metrics, &workers).await?;
        let checkpoints = open_checkpoints(service, &dir, managed.clone())?;
        let state_machine = open_state_machine(service, &dir, shared, &workers, &checkpoints)?;
        if !standby {
            check_log_covers_applied(
                &log_store,
                state_machine.shared().applied_index(),
                checkpoints.as_deref(),
                &dir,
            )
            .await?;
        }
        state_machine
            .recover_from_crash(service.app.honours_haven_index)
            .await
            .map_err(|source| ServiceError::Rebuild {
                dir: dir.clone(),
                source,
            })?;
        let raft = match standby {
            true => None,
            false => Some(open_raft(config, shared, &log_store, &state_machine).await?),
        };
        Ok(Self {
            name,
            raft,
            site,
            state_machine,
            checkpoints,
            archive,
            stand_in: StandInSlot::default(),
            log: log_store,
            managed,
            workers,
            _lock: lock,
        })
    }

    /// What the raft port needs to serve this service's group.
    pub fn inbox(&self, metrics: &Metrics) -> InboxFactory {
        InboxFactory {
            checkpoints: (self.checkpoints.clone()).map(|c| c as Arc<dyn CheckpointInbox>),
            metrics: metrics.clone(),
            answers: Some(Arc::new(self.state_machine.clone())),
            stand_in: self.stand_in.clone(),
        }
    }

    /// Forms the cluster on first start (unless joining) and starts the service's workers;
    /// a standby starts following the archive instead.
    pub async fn start(
        &self,
        config: &Config,
        service: &ServiceConfig,
        shared: &NodeShared,
    ) -> Result<(), ServiceError> {
        let Some(raft) = &self.raft else {
            self.start_following(config, service, shared);
            return Ok(());
        };
        self.workers.spawn(
            "step-aside",
            consensus::step_aside::run(
                raft.clone(),
                config.node.id,
                self.state_machine.shared().delivery_failing(),
                shared.metrics.clone(),
                shared.stop.clone(),
            ),
        );
        if !config.node.join {
            initialize_once(raft, config).await?;
        }
        if let Some(ledger) = self.state_machine.shared().answers() {
            let comparison = Comparison {
                service: self.name.clone(),
                node: config.node.id,
                ledger: ledger.clone(),
                transport: shared.transport.clone(),
                members: members_by_id(Arc::new(OnceLock::from(raft.clone())), config),
                metrics: shared.metrics.clone(),
            };
            self.workers
                .spawn("divergence-check", comparison.run(shared.stop.clone()));
        }
        if let (Some(section), Some(checkpoints)) = (&service.checkpoints, &self.checkpoints) {
            let summary = checkpoints.summary();
            let policy = Policy {
                every_entries: section.every_entries,
                every: (section.every_seconds > 0)
                    .then(|| Duration::from_secs(section.every_seconds)),
            };
            let applied = self.state_machine.applied();
            self.workers.spawn(
                "checkpoint-trigger",
                policy::run_triggers(
                    raft.clone(),
                    policy,
                    applied,
                    summary.clone(),
                    shared.stop.clone(),
                ),
            );
            let floor = match &self.archive {
                Some((_, progress)) => progress.floor(),
                None => watch::channel(None).1,
            };
            self.workers.spawn(
                "log-compaction",
                policy::run_compaction(raft.clone(), summary, floor, shared.stop.clone()),
            );
        }
        if let (Some((target, progress)), Some(site)) = (&self.archive, &self.site) {
            let uploader = Uploader {
                target: target.clone(),
                progress: progress.clone(),
                raft: raft.clone(),
                log: self.log.clone(),
                checkpoints: self.checkpoints.clone(),
                applied: self.state_machine.applied(),
                metrics: shared.metrics.clone(),
                writer: site.writer.clone(),
                site: site.site.clone(),
            };
            self.workers
                .spawn("archive-upload", uploader.run(shared.stop.clone()));
            let recovery_point = RecoveryPoint {
                progress: progress.clone(),
                raft: raft.clone(),
                log: self.log.clone(),
                applied: self.state_machine.applied(),
                metrics: shared.metrics.clone(),
            };
            self.workers
                .spawn("archive-lag", recovery_point.run(shared.stop.clone()));
        }
        Ok(())
    }

    /// A standby applies what the primary archives until it is promoted.
    fn start_following(&self, config: &Config, service: &ServiceConfig, shared: &NodeShared) {
        let Some(site) = &self.site else {
            return;
        };
        // A primary that became a standby by `haven site follow` has no [standby] table.
        let poll = (service.standby.as_ref()).map_or(
            Duration::from_millis(haven_base::config::DEFAULT_STANDBY_POLL_MS),
            |s| s.poll(),
        );
        let follower = Follower {
            service: self.name.clone(),
            handle: site.clone(),
            machine: self.state_machine.clone(),
            log: self.log.clone(),
            node: config.node.id,
            voters: config.voters(),
            poll,
            checkpoint_every: (service.checkpoints.as_ref())
                .map(|c| c.every_entries)
                .filter(|&n| n > 0),
            scratch: config.service_dir(service).join("standby"),
            metrics: shared.metrics.clone(),
            reopen: shared.reopen.clone(),
        };
        self.workers
            .spawn("standby-follow", follower.run(shared.stop.clone()));
    }

    /// Resolves with the reason once the service's Raft core has stopped by itself; never
    /// for a standby, which runs none.
    pub async fn stopped(&self) -> String {
        match &self.raft {
            Some(raft) => raft_stopped(raft).await,
            None => std::future::pending().await,
        }
    }

    /// Stops Raft, saves the apply state, stops the app. Call after the node's shutdown
    /// signal, so the service's workers end too.
    pub async fn shutdown(self) {
        if let Some(raft) = &self.raft
            && let Err(e) = raft.shutdown().await
        {
            tracing::warn!(service = %self.name, error = %e, "raft shutdown");
        }
        if let Err(e) = self.state_machine.persist().await {
            tracing::warn!(service = %self.name, error = %e, "cannot persist apply state at shutdown");
        }
        if let Some(app) = self.managed
            && let Err(e) = app.stop(APP_STOP_GRACE).await
        {
            tracing::warn!(service = %self.name, error = %e, "cannot stop the managed app");
        }
    }
}

/// Raft over the opened log and apply state; not initialized until [`Service::start`].
async fn open_raft(
    config: &Config,
    shared: &NodeShared,
    log_store: &LogStore<TypeConfig>,
    state_machine: &StateMachine,
) -> Result<Raft, ServiceError> {
    // Before Raft starts: it may deliver entries again at once, which may need the peers.
    let raft_cell = Arc::new(OnceLock::new());
    state_machine.set_peers(Arc::new(PeerAnswers {
        transport: shared.transport.clone(),
        peers: other_members(raft_cell.clone(), config),
    }));
    let raft_config = Arc::new(consensus::raft_config(&config.raft)?);
    let raft: Raft = openraft::Raft::new(
        config.node.id,
        raft_config,
        shared.transport.clone(),
        log_store.clone(),
        state_machine.clone(),
    )
    .await
    .map_err(|e| ServiceError::Raft(e.to_string()))?;
    let _ = raft_cell.set(raft.clone());
    Ok(raft)
}

/// The service's site: its role as recorded (or configured), and who it is in the
/// archive's epochs.
fn open_site(
    config: &Config,
    service: &ServiceConfig,
    target: &ArchiveTarget,
    dir: &Path,
) -> Result<SiteHandle, ServiceError> {
    let site =
        SiteState::open(dir, &config.node.site, service.standby.is_some()).map_err(|source| {
            ServiceError::Settings {
                dir: dir.to_path_buf(),
                source,
            }
        })?;
    Ok(SiteHandle {
        target: target.clone(),
        writer: epoch::Writer {
            cluster: config.node.cluster.clone(),
            site: config.node.site.clone(),
            service: service.name.clone(),
            node: config.node.id,
        },
        site,
    })
}

fn open_archive(
    service: &ServiceConfig,
) -> Result<Option<(ArchiveTarget, ArchiveProgress)>, ServiceError> {
    let Some(section) = &service.archive else {
        return Ok(None);
    };
    let target = ArchiveTarget::open(section).map_err(|source| ServiceError::Archive {
        service: service.name.clone(),
        source: Box::new(source),
    })?;
    let progress = ArchiveProgress::new(&target);
    tracing::info!(url = %section.url, protection = %target.protection.describe(), "off-site archive configured");
    Ok(Some((target, progress)))
}

fn open_state_machine(
    config: &ServiceConfig,
    dir: &Path,
    shared: &NodeShared,
    workers: &Workers,
    checkpoints: &Option<Arc<Checkpoints>>,
) -> Result<StateMachine, ServiceError> {
    let limits = IdempotencyLimits {
        max_keys: config.limits.idempotency_keys_max,
        retention_us: (config.limits.idempotency_retention_s as i64).saturating_mul(1_000_000),
    };
    let machine = StateMachine::open(
        &dir.join("apply"),
        OrderedConnection::new(&config.app.url, config.app_timeout()),
        limits,
        shared.metrics.clone(),
        shared.stop.clone(),
        checkpoints.clone(),
        workers,
    )?;
    if config.app.check_divergence {
        machine.keep_answer_digests(config.volatile_headers());
    }
    Ok(machine)
}

/// The raft addresses of the other members, as the membership stands when called; the
/// configured peers until Raft is up.
fn other_members(raft: Arc<OnceLock<Raft>>, config: &Config) -> PeerAddrs {
    let members = members_by_id(raft, config);
    Arc::new(move || members().into_iter().map(|(_, addr)| addr).collect())
}

/// The other members by id, with their raft addresses: as [`other_members`].
fn members_by_id(raft: Arc<OnceLock<Raft>>, config: &Config) -> Members {
    let me = config.node.id;
    let configured: Vec<(NodeId, String)> = config
        .peers
        .iter()
        .filter(|p| p.id != me)
        .map(|p| (p.id, p.raft_addr.to_string()))
        .collect();
    Arc::new(move || {
        let Some(raft) = raft.get() else {
            return configured.clone();
        };
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .nodes()
            .filter(|(id, _)| **id != me)
            .map(|(id, node)| (*id, node.raft_addr.clone()))
            .collect()
    })
}

/// Resolves with the reason once the Raft core has stopped.
async fn raft_stopped(raft: &Raft) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_watched().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the raft core ended".to_string();
        }
    }
}

/// How long the managed app has to exit on SIGTERM at shutdown.
const APP_STOP_GRACE: Duration = Duration::from_secs(10);

/// Starts the app when the config manages it; it must answer before Raft starts, since
/// openraft may install a checkpoint into it while opening.
async fn start_managed_app(
    config: &ServiceConfig,
    service_dir: &Path,
    metrics: &Metrics,
    workers: &Workers,
) -> Result<Option<Arc<ManagedApp>>, ServiceError> {
    let (Some(argv), Some(data_dir)) = (&config.app.command, &config.app.data_dir) else {
        return Ok(None);
    };
    let command = AppCommand {
        argv: argv.clone(),
        env: config.app.env.clone().into_iter().collect(),
        data_dir: data_dir.clone(),
        url: config.app.url.clone(),
    };
    let start_timeout = Duration::from_millis(config.app.start_timeout_ms);
    let files = AppFiles::in_dir(service_dir);
    let app = ManagedApp::start(command, files, start_timeout, metrics.clone(), workers)
        .await
        .map_err(|e| ServiceError::App(Box::new(e)))?;
    tracing::info!(pid = app.pid(), "managed app started");
    Ok(Some(Arc::new(app)))
}

fn open_checkpoints(
    config: &ServiceConfig,
    service_dir: &Path,
    managed: Option<Arc<ManagedApp>>,
) -> Result<Option<Arc<Checkpoints>>, ServiceError> {
    let Some(section) = &config.checkpoints else {
        return Ok(None);
    };
    let capture = match (section.mode, managed) {
        (CheckpointMode::Managed, Some(app)) => Capture::Managed(app),
        (CheckpointMode::Managed, None) => {
            let source = std::io::Error::other("managed mode needs app.command");
            return Err(ServiceError::Checkpoints {
                dir: service_dir.to_path_buf(),
                source,
            });
        }
        (CheckpointMode::Hooks, _) => Capture::Hooks(Hooks {
            snapshot_path: section.snapshot_path.clone(),
            restore_path: section.restore_path.clone(),
            ..Hooks::new(&config.app.url, config.app_timeout())
        }),
    };
    let retention = Retention {
        keep: section.keep,
        max_age: section.keep_seconds.map(Duration::from_secs),
    };
    let dir = service_dir.join("checkpoints");
    let checkpoints = Checkpoints::open(&dir, &config.name, capture, retention)
        .map_err(|source| ServiceError::Checkpoints { dir, source })?;
    Ok(Some(Arc::new(checkpoints)))
}

/// A log that ends before the applied index is normal after a crash between installing a
/// checkpoint and purging the log: openraft purges up to the applied index, which needs a
/// checkpoint at least that new. Without one, entries the replica applied are missing from
/// the log, and openraft would stop on a broken invariant (a panic); refuse instead, naming
/// both. It happens when a segment is damaged, and also when a log write fails (ENOSPC)
/// just after openraft applied the entry: a follower applies what the leader committed
/// without waiting for its own flush.
async fn check_log_covers_applied(
    log_store: &LogStore<TypeConfig>,
    applied: u64,
    checkpoints: Option<&Checkpoints>,
    service_dir: &Path,
) -> Result<(), ServiceError> {
    let state = log_store
        .clone()
        .get_log_state()
        .await
        .map_err(|e| ServiceError::Raft(e.to_string()))?;
    let log_end = state.last_log_id.map(|l| l.index);
    if log_end.is_some_and(|end| end >= applied) || (log_end.is_none() && applied == 0) {
        return Ok(());
    }
    let covered = match checkpoints {
        Some(checkpoints) => checkpoints
            .newest_verified()
            .await
            .map_err(|source| ServiceError::Checkpoints {
                dir: checkpoints.dir().to_path_buf(),
                source,
            })?
            .is_some_and(|info| info.index >= applied),
        None => false,
    };
    if covered {
        return Ok(());
    }
    Err(ServiceError::LogBehindApply {
        log_dir: log_store.dir().to_path_buf(),
        log_end: log_end.map_or_else(|| "none (empty)".to_string(), |i| i.to_string()),
        apply_dir: service_dir.join("apply"),
        applied,
    })
}

/// Every node proposes the same initial membership from its config; openraft accepts it
/// only on a node with an empty log, and identical proposals yield identical first
/// entries, so starting nodes in any order forms one cluster.
async fn initialize_once(raft: &Raft, config: &Config) -> Result<(), ServiceError> {
    if raft
        .is_initialized()
        .await
        .map_err(|e| ServiceError::Raft(e.to_string()))?
    {
        return Ok(());
    }
    match raft.initialize(config.voters()).await {
        Ok(()) => tracing::info!(
            voters = config.peers.len(),
            "cluster membership initialized"
        ),
        Err(e) => tracing::info!(reason = %e, "membership already set; joining"),
    }
    Ok(())
}

/// Recent entries stay in memory for followers that are a little behind; older ones are
/// read back from disk. 8 MiB holds a few seconds at 10,000 writes/s, and keeps a node's
/// memory within its budget (100 MB under that load).
fn log_options() -> LogOptions {
    LogOptions {
        cache_bytes: 8 << 20,
        ..LogOptions::default()
    }
}
