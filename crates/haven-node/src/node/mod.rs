//! Assembles one node in start order (listeners, what the services share, each service,
//! the servers that route to them) and tears it down in reverse. Binding every port first makes a misconfigured
//! node fail before it touches its data.

mod reload;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::watch;

use crate::admin;
use crate::admin::AdminState;
use crate::admin::ServiceAdmin;
use crate::admin::reload::ReloadReport;
use crate::admin::survival::Placement;
use crate::ingress;
use crate::ingress::Ingress;
use crate::ingress::select::Directory;
use crate::routes::RouteTable;
use crate::rules;
use haven_base::config::Config;
use haven_base::config::ServiceConfig;
use haven_base::metrics::NodeMetrics;
use haven_base::tls::PortListener;
use haven_base::tls::Tls;
use haven_base::workers::Workers;
use haven_consensus as consensus;
use haven_consensus::link::Transport;
use haven_consensus::net::Dial;
use haven_consensus::net::Tcp;
use haven_consensus::net::TlsTcp;
use haven_consensus::propose::DurableGate;
use haven_consensus::propose::LeaderPolicy;
use haven_consensus::server::Group;
use haven_consensus::server::Groups;
use haven_consensus::step_aside::HandOver;
use haven_consensus::wire::Hello;
use haven_contract::NodeId;
use haven_drill::DrillSpec;
use haven_drill::schedule::Chosen;
use haven_drill::schedule::Schedule;
use haven_service::app::AppClient;
use haven_service::apply::StateMachine;
use haven_service::failback;
use haven_service::failback::Plan;
use haven_service::failback::Rejoined;
use haven_service::restore::AppSettings;
use haven_service::restore::Target;
use haven_service::service::NodeShared;
use haven_service::service::Service;
use haven_service::service::ServiceError;
use openraft::rt::WatchReceiver;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {what} address {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("{0}")]
    Admin(String),
    #[error(transparent)]
    Tls(#[from] haven_base::tls::TlsError),
}

/// The admin port's tokens and audit trail; without `[admin] token_file` the port stays
/// open, and the node says so.
fn admin_guard(config: &Config) -> Result<admin::auth::Guard, NodeError> {
    let tokens = match &config.admin.token_file {
        Some(path) => Some(admin::auth::Tokens::load(path).map_err(NodeError::Admin)?),
        None => {
            tracing::warn!(
                addr = %config.node.admin_addr,
                "the admin port has no [admin] token_file: anyone who reaches it can change membership, promote or reload services"
            );
            None
        }
    };
    Ok(admin::auth::Guard {
        tokens,
        public_reads: config.admin.public_reads,
        audit: admin::auth::Audit::new(&config.node.data_dir),
    })
}

/// The node's TLS from `[tls]`; without it every port is plaintext, and the node says so.
fn load_tls(config: &Config) -> Result<Option<Tls>, NodeError> {
    let Some(section) = &config.tls else {
        tracing::warn!(
            addr = %config.node.raft_addr,
            "no [tls] table: peers connect in plaintext and any process that reaches the raft port can take part"
        );
        return Ok(None);
    };
    let tls = Tls::load(section)?;
    tracing::info!(
        client_port = tls.client_port,
        admin_port = tls.admin_port,
        "mutual TLS on the raft port"
    );
    Ok(Some(tls))
}

fn peer_dialer(tls: Option<&Tls>) -> Arc<dyn Dial> {
    match tls {
        Some(tls) => Arc::new(TlsTcp {
            connector: tls.peer_client.clone(),
        }),
        None => Arc::new(Tcp),
    }
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

/// How a running node learns that its config file changed.
pub struct Reloads {
    /// The file the config came from, read again on every reload.
    pub path: PathBuf,
    /// One message per SIGHUP: signals belong to the binary, not to this library.
    pub hangups: mpsc::Receiver<()>,
}

/// Runs a node until `shutdown` resolves, or until one service's Raft stops by itself (a
/// storage error, e.g. a full disk, is fatal to openraft): then the node shuts every
/// service down and returns the error rather than keep serving without Raft. Between
/// the two it reloads its services on a hangup or a `POST /services/reload`.
pub async fn run(
    config: Config,
    mut reloads: Reloads,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let tls = load_tls(&config)?;
    let raft_listener = bind("raft", config.node.raft_addr).await?;
    let client_listener = bind("client", config.node.client_addr).await?;
    let admin_listener = bind("admin", config.node.admin_addr).await?;
    let (admin_reloads, mut reload_requests) = mpsc::channel(RELOAD_QUEUE);
    let (admin_follows, mut follow_requests) = mpsc::channel(RELOAD_QUEUE);
    let (reopen, mut reopens) = mpsc::unbounded_channel();
    let mut node = Node::new(config, (admin_reloads, admin_follows), reopen, tls.as_ref())?;
    let incoming = |listener, acceptor, port| {
        PortListener::new(listener, acceptor, port, node.metrics.tls_refused.clone())
    };
    let raft_listener = incoming(
        raft_listener,
        tls.as_ref().map(|t| t.peer_server.clone()),
        "raft",
    );
    let https = |on: fn(&Tls) -> bool| {
        tls.as_ref()
            .filter(|t| on(t))
            .map(|t| t.https_server.clone())
    };
    let client_listener = incoming(client_listener, https(|t| t.client_port), "client");
    let admin_listener = incoming(admin_listener, https(|t| t.admin_port), "admin");
    let opened = node.open_all().await?;
    for service in &opened {
        node.serve_raft(service);
    }
    node.workers.spawn(
        "raft-server",
        consensus::server::serve(
            raft_listener,
            node.groups.clone(),
            node.config.raft.reads,
            node.raft_port_stop.subscribe(),
        ),
    );
    tracing::info!(addr = %node.config.node.raft_addr, "raft port open");
    node.workers.spawn(
        "leader-balance",
        consensus::balance::run(
            node.config.node.id,
            node.groups.clone(),
            node.stop.subscribe(),
        ),
    );
    for service in opened {
        if let Err(e) = node.start(service).await {
            node.shut_down().await;
            return Err(e.into());
        }
    }
    node.workers.spawn(
        "client-server",
        ingress::serve(
            client_listener,
            node.directory.clone(),
            node.stop.subscribe(),
        ),
    );
    tracing::info!(addr = %node.config.node.client_addr, "client port open");
    node.workers.spawn(
        "admin-server",
        admin::serve(
            admin_listener,
            admin::router(node.admin.clone()),
            node.stop.subscribe(),
        ),
    );
    node.start_rules();
    tracing::info!(
        addr = %node.config.node.admin_addr,
        id = node.config.node.id,
        services = node.services.len(),
        "node ready"
    );

    let mut shutdown = std::pin::pin!(shutdown);
    let fatal = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            fatal = any_stopped(&node.services) => break Some(fatal),
            Some(()) = reloads.hangups.recv() => {
                log_reload(node.reload(&reloads.path, false).await);
            }
            Some(name) = reopens.recv() => node.reopen(&name).await,
            Some(request) = follow_requests.recv() => {
                let outcome = node.follow(&request.service, &request.plan).await;
                let _ = request.reply.send(outcome);
            }
            Some(request) = reload_requests.recv() => {
                let report = node.reload(&reloads.path, request.wipe).await;
                log_reload(report.clone());
                let _ = request.reply.send(report);
            }
        }
    };
    match &fatal {
        None => {
            tracing::info!("shutting down");
            node.hand_over_leadership().await;
        }
        Some(reason) => tracing::error!(%reason, "raft stopped; shutting down"),
    }
    node.shut_down().await;
    match fatal {
        None => Ok(()),
        Some(reason) => Err(ServiceError::Raft(reason).into()),
    }
}

/// Reload and follow requests waiting for the node's main loop; more are refused, not
/// queued.
const RELOAD_QUEUE: usize = 4;

fn log_reload(outcome: Result<ReloadReport, String>) {
    match outcome {
        Ok(report) if report.failed.is_empty() => tracing::info!(
            added = ?report.added,
            removed = ?report.removed,
            restarted = ?report.restarted,
            wiped = report.wiped.len(),
            "services reloaded"
        ),
        Ok(report) => {
            tracing::error!(failed = ?report.failed, "services reloaded, some did not start")
        }
        Err(reason) => tracing::error!(%reason, "config reload refused; nothing changed"),
    }
}

/// A service the node runs, with what it was given.
struct Running {
    service: Service,
    shared: NodeShared,
    config: ServiceConfig,
    /// Stops this service's workers; the node's own stop signal stops the rest.
    stop: watch::Sender<bool>,
}

/// What a node holds while it runs: the config, what its services share, and the
/// services, each registered with the raft port, the client port and the admin port.
struct Node {
    config: Config,
    metrics: NodeMetrics,
    transport: Transport,
    workers: Workers,
    groups: Arc<Groups<StateMachine>>,
    directory: Arc<Directory>,
    admin: Arc<AdminState>,
    services: Vec<Running>,
    /// The node's servers stop on it; each service has its own ([`Running::stop`]).
    stop: watch::Sender<bool>,
    /// The raft port closes on it, last: a peer takes a refused dial to mean that no Raft
    /// of this node runs any more (`consensus::leader_gone`).
    raft_port_stop: watch::Sender<bool>,
    /// Given to every service: a standby that took over asks to be opened again.
    reopen: mpsc::UnboundedSender<String>,
}

impl Node {
    fn new(
        config: Config,
        (reloads, follows): (admin::reload::Reloads, admin::site::Follows),
        reopen: mpsc::UnboundedSender<String>,
        tls: Option<&Tls>,
    ) -> Result<Self, NodeError> {
        let metrics = NodeMetrics::new()?;
        let workers = Workers::new();
        let hello = Hello {
            cluster: config.node.cluster.clone(),
            service: String::new(),
            node: config.node.id,
            settings: Vec::new(),
        };
        let admin = AdminState::new(
            config.node.id,
            (config.node.zone.clone(), Placement::of(&config)),
            workers.clone(),
            metrics.clone(),
            (reloads, follows),
            admin_guard(&config)?,
        );
        Ok(Self {
            transport: Transport::with_dialer(peer_dialer(tls), metrics.peers.clone(), hello),
            // Plain TCP also under `[tls]`: whether a peer's port refuses is a TCP
            // question, and the TLS dialer reports a failed handshake as refused too.
            groups: Groups::new(&config.node.cluster, config.node.id, Arc::new(Tcp)),
            directory: Arc::new(Directory::default()),
            admin,
            metrics,
            workers,
            services: Vec::new(),
            stop: watch::channel(false).0,
            raft_port_stop: watch::channel(false).0,
            reopen,
            config,
        })
    }

    /// The rule evaluator and the worker that delivers its alert notices.
    fn start_rules(&self) {
        let (notices, outbox) = mpsc::channel(rules::webhook::QUEUE);
        let delivery = self.config.alert_delivery.clone();
        let deliver = rules::webhook::deliver(
            outbox,
            delivery,
            self.metrics.clone(),
            self.stop.subscribe(),
        );
        self.workers.spawn("alert-delivery", deliver);
        let evaluator = rules::Evaluator {
            node: self.config.node.id,
            metrics: self.metrics.clone(),
            data_dir: self.config.node.data_dir.clone(),
            alerts: self.config.alerts.clone(),
            scales: self.config.scales.clone(),
            directory: self.directory.clone(),
            notices,
        };
        self.workers
            .spawn("rules", evaluator.run(self.stop.subscribe()));
    }

    /// Opens every configured service in order; if one fails, those already open are
    /// shut down before the error is returned, so no app or lock outlives a failed start.
    async fn open_all(&mut self) -> Result<Vec<Running>, NodeError> {
        let mut opened = Vec::with_capacity(self.config.services.len());
        for service_config in self.config.services.clone() {
            match self.open(service_config).await {
                Ok(running) => opened.push(running),
                Err(e) => {
                    for running in opened {
                        self.stop_service(running).await;
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(opened)
    }

    async fn open(&self, config: ServiceConfig) -> Result<Running, ServiceError> {
        let (stop, stopping) = watch::channel(false);
        let shared = NodeShared {
            metrics: self.metrics.service(&config.name),
            transport: (self.transport).for_service(&config.name, config.shared_settings()),
            workers: self.workers.clone(),
            stop: stopping,
            reopen: self.reopen.clone(),
        };
        let service = Service::open(&self.config, &config, &shared).await?;
        Ok(Running {
            service,
            shared,
            config,
            stop,
        })
    }

    /// Lets the raft port hand the service's group its messages (a standby has none).
    fn serve_raft(&self, running: &Running) {
        let Some(raft) = &running.service.raft else {
            return;
        };
        let group = Group {
            raft: raft.clone(),
            inbox: running.service.inbox(&running.shared.metrics),
            stop: running.stop.subscribe(),
            settings: running.config.shared_settings(),
            durable: durable_gate(&running.config, &running.service),
        };
        self.groups.insert(&running.service.name, group);
    }

    /// Starts the service's Raft and workers and opens it to clients and the admin port;
    /// a service that fails to start is shut down.
    async fn start(&mut self, running: Running) -> Result<(), ServiceError> {
        // Fail closed: a service whose token file is bad takes no admin request at all.
        let own = running.config.admin_tokens.as_deref();
        let tokens = match own.map(admin::auth::Tokens::load).transpose() {
            Ok(tokens) => tokens,
            Err(e) => {
                self.stop_service(running).await;
                return Err(ServiceError::AdminTokens(e));
            }
        };
        let started = (running.service)
            .start(&self.config, &running.config, &running.shared)
            .await;
        if let Err(e) = started {
            self.stop_service(running).await;
            return Err(e);
        }
        let Running {
            service,
            shared,
            config,
            ..
        } = &running;
        let ingress = ingress_of(&self.config, config, service, shared);
        service.stand_in.set(ingress.clone());
        self.directory
            .insert(&service.name, config.matcher.clone(), ingress.clone());
        let entry = ServiceAdmin {
            tokens,
            ingress,
            site: service.site.clone(),
            checkpoints: service.checkpoints.clone(),
            archive: service
                .archive
                .as_ref()
                .map(|(_, progress)| progress.clone()),
            exactly_once_after_crash: config.exactly_once_after_crash(),
        };
        self.admin.insert(&service.name, entry);
        if let Some(schedule) = drill_schedule(&self.config, config, service, shared) {
            (self.workers.scoped(&service.name)).spawn("drill", schedule.run(shared.stop.clone()));
        }
        self.services.push(running);
        Ok(())
    }

    /// Closes the service to clients, the admin port and peers, then shuts it down
    /// (Raft, apply state, app), ends its workers and drops its metrics.
    async fn stop_service(&self, running: Running) {
        let name = running.service.name.clone();
        self.unregister(&running);
        running.service.shutdown().await;
        running.shared.transport.close_service();
        let stuck = self
            .workers
            .scoped(&name)
            .remove_all(WORKER_STOP_GRACE)
            .await;
        if !stuck.is_empty() {
            tracing::warn!(service = %name, ?stuck, "workers aborted");
        }
        self.metrics.remove_service(&name);
    }

    /// Takes the service off every port and signals its workers to stop. Its apply
    /// delivery ends only once nothing holds its state machine, the raft port's group
    /// included.
    fn unregister(&self, running: &Running) {
        let name = &running.service.name;
        self.directory.remove(name);
        self.admin.remove(name);
        self.groups.remove(name);
        let _ = running.stop.send(true);
    }

    /// Opens a service again with what its directory now records: a standby that took
    /// over comes back as the primary, with Raft.
    async fn reopen(&mut self, name: &str) {
        let Some(at) = self.services.iter().position(|r| r.service.name == name) else {
            return;
        };
        let running = self.services.remove(at);
        self.stop_service(running).await;
        match self.open_and_start(name).await {
            Ok(()) => tracing::info!(service = %name, "service reopened"),
            Err(e) => tracing::error!(service = %name, error = %e, "service did not reopen"),
        }
    }

    /// Makes the service a standby of the site that took it over: closes it, exports and
    /// deletes its old history ([`failback::rejoin`]), opens it again. It is opened
    /// again also when the rejoin failed, as what its directory then records.
    async fn follow(&mut self, name: &str, plan: &Plan) -> Result<Rejoined, String> {
        let at = (self.services.iter())
            .position(|r| r.service.name == name)
            .ok_or_else(|| format!("service {name} is not running here"))?;
        let running = self.services.remove(at);
        let dir = self.config.service_dir(&running.config);
        self.stop_service(running).await;
        let rejoined = failback::rejoin(&dir, &self.config.node.site, plan).await;
        let reopened = self.open_and_start(name).await;
        let rejoined = rejoined.map_err(|e| format!("service {name} did not follow: {e}"))?;
        reopened.map_err(|e| format!("service {name} follows, but did not open again: {e}"))?;
        Ok(rejoined)
    }

    /// Before a planned stop, while every port still serves: each service this node
    /// leads is handed to its most up-to-date other voter, all at once, each within
    /// [`HAND_OVER_LIMIT`]. Writers then wait for one leader transfer, not for the
    /// followers' lease and election timeout to run out.
    async fn hand_over_leadership(&self) {
        let id = self.config.node.id;
        let handovers = (self.services.iter())
            .filter_map(|running| Some((&running.service.name, running.service.raft.as_ref()?)))
            .map(|(name, raft)| async move {
                match consensus::step_aside::hand_over(raft, id, HAND_OVER_LIMIT).await {
                    HandOver::NotLeader => {}
                    HandOver::Done { to } => {
                        tracing::info!(service = %name, to, "leadership handed over before stopping")
                    }
                    HandOver::TimedOut => tracing::warn!(
                        service = %name,
                        limit_ms = HAND_OVER_LIMIT.as_millis() as u64,
                        "leadership not handed over in time; stopping anyway"
                    ),
                }
            });
        futures::future::join_all(handovers).await;
    }

    /// Shuts every service down, then closes the raft port and ends the node's own
    /// workers.
    async fn shut_down(&mut self) {
        let _ = self.stop.send(true);
        let services = std::mem::take(&mut self.services);
        for running in &services {
            self.unregister(running);
        }
        futures::future::join_all(services.into_iter().map(|r| r.service.shutdown())).await;
        let _ = self.raft_port_stop.send(true);
        self.workers.stop_all(WORKER_STOP_GRACE).await;
    }
}

fn ingress_of(
    config: &Config,
    service_config: &ServiceConfig,
    service: &Service,
    shared: &NodeShared,
) -> Arc<Ingress> {
    Ingress::new(
        config.node.id,
        service.raft.clone(),
        service.site.as_ref().map(|s| s.site.subscribe()),
        service.state_machine.shared(),
        AppClient::new(&service_config.app.url, service_config.app_timeout()),
        shared.transport.clone(),
        RouteTable::new(service_config.routes.clone()),
        service_config.limits.clone(),
        shared.metrics.clone(),
        LeaderPolicy {
            reads: config.raft.reads,
            durable: durable_gate(service_config, service),
        },
    )
}

/// Writes of a service with `archive.ack = "quorum+archive"` wait for the archive, as
/// long as a request may take.
fn durable_gate(config: &ServiceConfig, service: &Service) -> Option<DurableGate> {
    let (target, progress) = service.archive.as_ref()?;
    let wait = Duration::from_millis(config.limits.request_timeout_ms);
    Some(progress.durable_gate(&target.section, wait))
}

/// The drill worker of a service with an archive: it keeps the newest drill's result as
/// metrics and, with `[drill] every`, drills on schedule.
fn drill_schedule(
    config: &Config,
    service_config: &ServiceConfig,
    service: &Service,
    shared: &NodeShared,
) -> Option<Schedule> {
    let (target, _) = service.archive.as_ref()?;
    let drill = service_config.drill.as_ref();
    let spec = DrillSpec {
        service: service.name.clone(),
        store: target.store.clone(),
        protection: target.protection.clone(),
        settings: AppSettings::from_config(service_config),
        target: Target::Latest,
        http_checks: drill.map(|d| d.http_checks()).unwrap_or_default(),
        commands: drill.map(|d| d.check_cmd.clone()).unwrap_or_default(),
        drills_dir: haven_drill::drills_dir(&config.node.data_dir),
        keep: false,
        app_url: None,
    };
    Some(Schedule {
        spec,
        every: drill.and_then(|d| d.interval().ok()),
        chosen: drills_here(service.raft.clone(), config),
        metrics: shared.metrics.clone(),
    })
}

/// One node of a cluster drills: the voter with the lowest id that does not lead (a
/// drill costs a node CPU and disk; the leader has the most to do), or a lone node. A
/// standby site, which runs no Raft, goes by its configured peers.
fn drills_here(raft: Option<haven_service::apply::Raft>, config: &Config) -> Chosen {
    let me = config.node.id;
    let configured = config.voters().keys().min().copied();
    Box::new(move || {
        let Some(raft) = &raft else {
            return configured.is_none_or(|lowest| lowest == me);
        };
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        let voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
        let lone = voters.len() == 1;
        let drills = (voters.iter().copied())
            .filter(|&v| lone || Some(v) != m.current_leader)
            .min();
        drills == Some(me)
    })
}

/// Resolves with the reason once any service's Raft core has stopped by itself.
async fn any_stopped(services: &[Running]) -> String {
    if services.is_empty() {
        return std::future::pending().await;
    }
    let stopped = services.iter().map(|running| {
        let service = &running.service;
        Box::pin(async move { format!("service {}: {}", service.name, service.stopped().await) })
    });
    futures::future::select_all(stopped).await.0
}

/// How long a stopping leader waits for another node to lead and to commit what it
/// proposed. Well inside the grace periods of service managers (systemd's 90 s,
/// Kubernetes' 30 s); a transfer takes tens of milliseconds when the target is reachable.
const HAND_OVER_LIMIT: Duration = Duration::from_secs(3);
/// How long the workers have to end once the node has shut Raft and the app down.
const WORKER_STOP_GRACE: Duration = Duration::from_secs(5);

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
