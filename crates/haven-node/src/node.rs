//! Assembles one node in start order (listeners, log, state machine, Raft, servers) and
//! tears it down in reverse. Binding every port first makes a misconfigured node fail
//! before it touches its data.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use haven_log::LogOptions;
use haven_log::LogStore;
use openraft::rt::WatchReceiver;
use openraft::storage::RaftLogStorage;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::app::AppClient;
use crate::app::hooks::Hooks;
use crate::app::pipeline::OrderedConnection;
use crate::app::process::AppCommand;
use crate::app::process::AppFiles;
use crate::app::process::ManagedApp;
use crate::apply::IdempotencyLimits;
use crate::apply::Raft;
use crate::apply::StateMachine;
use crate::checkpoint::Checkpoints;
use crate::checkpoint::capture::Capture;
use crate::checkpoint::policy;
use crate::checkpoint::policy::Policy;
use crate::config::CheckpointMode;
use crate::config::Config;
use crate::consensus;
use crate::consensus::first_answers::PeerAddrs;
use crate::consensus::first_answers::PeerAnswers;
use crate::consensus::link::Transport;
use crate::consensus::server::InboxFactory;
use crate::ingress;
use crate::ingress::Ingress;
use crate::lock::DirLock;
use crate::metrics::Metrics;
use crate::restore::AppSettings;
use crate::routes::RouteTable;
use crate::types::TypeConfig;
use crate::workers::Workers;
use haven_checkpoint::catalog::Retention;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] haven_log::LogError),
    #[error(transparent)]
    ApplyState(#[from] crate::apply::ApplyStateError),
    #[error("invalid raft settings: {0}")]
    RaftConfig(#[from] openraft::ConfigError),
    #[error("raft failed: {0}")]
    Raft(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
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
    #[error("cannot open checkpoints in {dir}: {source}")]
    Checkpoints {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
}

async fn bind(what: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, NodeError> {
    warn_if_ephemeral(what, addr);
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { what, addr, source })
}

/// Where the kernel picks source ports for outgoing connections.
const EPHEMERAL_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// A listen port inside the ephemeral range can be taken, while this node is down, by
/// any outgoing connection on the host, including a peer's dial to this very port
/// (`consensus::net::refuse_self_connection`); the node then cannot listen on it again.
fn warn_if_ephemeral(what: &str, addr: std::net::SocketAddr) {
    let Some((low, high)) = std::fs::read_to_string(EPHEMERAL_RANGE_FILE)
        .ok()
        .and_then(|text| parse_port_range(&text))
    else {
        return;
    };
    if (low..=high).contains(&addr.port()) {
        tracing::warn!(
            %addr,
            "the {what} port lies inside the ephemeral port range {low}-{high} ({EPHEMERAL_RANGE_FILE}): an outgoing connection may hold it while this node is down, and the node could not listen there again; choose a port below {low}"
        );
    }
}

/// `"32768\t60999\n"` → `(32768, 60999)`.
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut ports = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    let (low, high) = (ports.next()??, ports.next()??);
    (ports.next().is_none() && low <= high).then_some((low, high))
}

/// Runs a node until `shutdown` resolves, or until Raft stops by itself (a storage error,
/// e.g. a full disk, is fatal to openraft): then the node shuts down and returns the error
/// rather than keep serving without Raft.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let raft_listener = bind("raft", config.node.raft_addr).await?;
    let client_listener = bind("client", config.node.client_addr).await?;
    let admin_listener = bind("admin", config.node.admin_addr).await?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let service_dir = config.service_dir();
    let _lock = DirLock::acquire(&service_dir).map_err(|source| NodeError::Locked {
        dir: service_dir.clone(),
        source,
    })?;
    let log_store: LogStore<TypeConfig> = LogStore::open(&service_dir.join("log"), log_options())?;
    tracing::info!(dir = %service_dir.display(), "log opened");
    AppSettings::from_config(&config)
        .save(&service_dir)
        .map_err(|source| NodeError::Settings {
            dir: service_dir.clone(),
            source,
        })?;
    let metrics = Metrics::new()?;
    let workers = Workers::new();
    let service_workers = workers.scoped(&config.app.name);
    let managed = start_managed_app(&config, &service_dir, &metrics, &service_workers).await?;
    let checkpoints = open_checkpoints(&config, &service_dir, managed.clone())?;
    let app = AppClient::new(&config.app.url, config.app_timeout());
    let limits = IdempotencyLimits {
        max_keys: config.limits.idempotency_keys_max,
        retention_us: (config.limits.idempotency_retention_s as i64).saturating_mul(1_000_000),
    };
    let state_machine = StateMachine::open(
        &service_dir.join("apply"),
        OrderedConnection::new(&config.app.url, config.app_timeout()),
        limits,
        metrics.clone(),
        stop_rx.clone(),
        checkpoints.clone(),
        &service_workers,
    )?;
    let shared = state_machine.shared();
    check_log_covers_applied(
        &log_store,
        shared.applied_index(),
        checkpoints.as_deref(),
        &service_dir,
    )
    .await?;

    let transport = Transport::tcp(metrics.clone());
    // Before Raft starts: it may deliver entries again at once, which may need the peers.
    let raft_cell = Arc::new(OnceLock::new());
    state_machine.set_peers(Arc::new(PeerAnswers {
        transport: transport.clone(),
        peers: other_members(raft_cell.clone(), &config),
    }));
    let raft_config = Arc::new(consensus::raft_config(&config.raft)?);
    let raft: Raft = openraft::Raft::new(
        config.node.id,
        raft_config,
        transport.clone(),
        log_store,
        state_machine.clone(),
    )
    .await
    .map_err(|e| NodeError::Raft(e.to_string()))?;
    let _ = raft_cell.set(raft.clone());
    let inbox = InboxFactory {
        checkpoints: checkpoints.clone(),
        metrics: metrics.clone(),
        answers: Some(state_machine.clone()),
    };
    workers.spawn(
        "raft-server",
        consensus::server::serve(
            raft_listener,
            raft.clone(),
            inbox,
            config.raft.reads,
            stop_rx.clone(),
        ),
    );
    tracing::info!(addr = %config.node.raft_addr, "raft port open");
    service_workers.spawn(
        "step-aside",
        consensus::step_aside::run(
            raft.clone(),
            config.node.id,
            shared.delivery_failing(),
            metrics.clone(),
            stop_rx.clone(),
        ),
    );
    if !config.node.join {
        initialize_once(&raft, &config).await?;
    }
    if let (Some(section), Some(checkpoints)) = (&config.checkpoints, &checkpoints) {
        let summary = checkpoints.summary();
        let policy = Policy {
            every_entries: section.every_entries,
            every: (section.every_seconds > 0).then(|| Duration::from_secs(section.every_seconds)),
        };
        let applied = state_machine.applied();
        let (r, s) = (raft.clone(), stop_rx.clone());
        service_workers.spawn(
            "checkpoint-trigger",
            policy::run_triggers(r, policy, applied, summary.clone(), s),
        );
        service_workers.spawn(
            "log-compaction",
            policy::run_compaction(raft.clone(), summary, stop_rx.clone()),
        );
    }

    let ingress = Ingress::new(
        config.node.id,
        raft.clone(),
        shared,
        app,
        transport,
        RouteTable::new(config.routes.clone()),
        config.limits.clone(),
        metrics,
        config.raft.reads,
    );
    workers.spawn(
        "client-server",
        ingress::serve(client_listener, ingress.clone(), stop_rx.clone()),
    );
    tracing::info!(addr = %config.node.client_addr, "client port open");
    let router = admin::router(
        ingress,
        config.node.zone.clone(),
        checkpoints,
        workers.clone(),
    );
    workers.spawn(
        "admin-server",
        admin::serve(admin_listener, router, stop_rx.clone()),
    );
    tracing::info!(addr = %config.node.admin_addr, id = config.node.id, "node ready");

    let fatal = tokio::select! {
        () = shutdown => None,
        fatal = raft_stopped(&raft) => Some(fatal),
    };
    match &fatal {
        None => tracing::info!("shutting down"),
        Some(reason) => tracing::error!(%reason, "raft stopped; shutting down"),
    }
    let _ = stop_tx.send(true);
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    if let Err(e) = state_machine.persist().await {
        tracing::warn!(error = %e, "cannot persist apply state at shutdown");
    }
    if let Some(app) = managed
        && let Err(e) = app.stop(APP_STOP_GRACE).await
    {
        tracing::warn!(error = %e, "cannot stop the managed app");
    }
    drop(state_machine);
    workers.stop_all(WORKER_STOP_GRACE).await;
    match fatal {
        None => Ok(()),
        Some(reason) => Err(NodeError::Raft(reason)),
    }
}

/// The raft addresses of the other members, as the membership stands when called; the
/// configured peers until Raft is up.
fn other_members(raft: Arc<OnceLock<Raft>>, config: &Config) -> PeerAddrs {
    let me = config.node.id;
    let configured: Vec<String> = config
        .peers
        .iter()
        .filter(|p| p.id != me)
        .map(|p| p.raft_addr.to_string())
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
            .map(|(_, node)| node.raft_addr.clone())
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
/// How long the workers have to end once the node has shut Raft and the app down.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);

/// Starts the app when the config manages it; it must answer before Raft starts, since
/// openraft may install a checkpoint into it while opening.
async fn start_managed_app(
    config: &Config,
    service_dir: &Path,
    metrics: &Metrics,
    workers: &Workers,
) -> Result<Option<Arc<ManagedApp>>, NodeError> {
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
        .map_err(|e| NodeError::App(Box::new(e)))?;
    tracing::info!(pid = app.pid(), "managed app started");
    Ok(Some(Arc::new(app)))
}

fn open_checkpoints(
    config: &Config,
    service_dir: &Path,
    managed: Option<Arc<ManagedApp>>,
) -> Result<Option<Arc<Checkpoints>>, NodeError> {
    let Some(section) = &config.checkpoints else {
        return Ok(None);
    };
    let capture = match (section.mode, managed) {
        (CheckpointMode::Managed, Some(app)) => Capture::Managed(app),
        (CheckpointMode::Managed, None) => {
            let source = std::io::Error::other("managed mode needs app.command");
            return Err(NodeError::Checkpoints {
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
    let checkpoints = Checkpoints::open(&dir, &config.app.name, capture, retention)
        .map_err(|source| NodeError::Checkpoints { dir, source })?;
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
) -> Result<(), NodeError> {
    let state = log_store
        .clone()
        .get_log_state()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    let log_end = state.last_log_id.map(|l| l.index);
    if log_end.is_some_and(|end| end >= applied) || (log_end.is_none() && applied == 0) {
        return Ok(());
    }
    let covered = match checkpoints {
        Some(checkpoints) => checkpoints
            .newest_verified()
            .await
            .map_err(|source| NodeError::Checkpoints {
                dir: checkpoints.dir().to_path_buf(),
                source,
            })?
            .is_some_and(|info| info.index >= applied),
        None => false,
    };
    if covered {
        return Ok(());
    }
    Err(NodeError::LogBehindApply {
        log_dir: log_store.dir().to_path_buf(),
        log_end: log_end.map_or_else(|| "none (empty)".to_string(), |i| i.to_string()),
        apply_dir: service_dir.join("apply"),
        applied,
    })
}

/// Every node proposes the same initial membership from its config; openraft accepts it
/// only on a node with an empty log, and identical proposals yield identical first
/// entries, so starting nodes in any order forms one cluster.
async fn initialize_once(raft: &Raft, config: &Config) -> Result<(), NodeError> {
    if raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ephemeral_range_is_read_as_the_kernel_writes_it() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("a b"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
    }
}
