//! The admin HTTP API, on its own port: `GET /status` (JSON), `GET /services` (every
//! service's status), `GET /metrics` (Prometheus text, every service), `GET /health` and
//! `GET /ready` ([`health`]), `GET /workers`, `POST /checkpoints` (take one now), `POST /services/reload` (read the
//! config again: [`reload`]), `POST /site/{promote,follow,handover,resume}` (failover
//! and failback: [`site`]), and
//! the membership changes of
//! [`members`] (`POST /members/{learner,promote,remove,replace}`, JSON). Separate from the
//! client port so operators can reach a node whose client side is saturated.
//!
//! A request about one service names it with `?service=NAME`; on a node with a single
//! service the name may be left out.

pub mod auth;
pub mod console;
pub mod health;
pub mod members;
pub mod peers;
pub mod reload;
pub mod site;
pub mod survival;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::Query;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::MethodRouter;
use axum::routing::get;
use axum::routing::post;
use haven_base::tls::Connection;
use haven_base::tls::PortListener;
use openraft::ServerState;
use openraft::rt::WatchReceiver;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::ingress::Ingress;
use haven_base::metrics::NodeMetrics;
use haven_base::workers::Workers;
use haven_contract::NodeId;
use haven_service::apply::Raft;
use haven_service::apply::digests::Divergence;
use haven_service::archive::ArchiveProgress;
use haven_service::archive::ArchiveStatus;
use haven_service::checkpoint::Checkpoints;
use haven_service::site::SiteStatus;
use haven_service::standby::SiteHandle;

/// A node's view of itself and the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The service this status is about.
    #[serde(default)]
    pub service: String,
    pub id: NodeId,
    pub zone: String,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    pub term: u64,
    pub leader_id: Option<NodeId>,
    /// Last log index known committed on a quorum.
    pub commit_index: Option<u64>,
    /// Last log index applied to this node's replica.
    pub applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    pub voters: Vec<NodeId>,
    /// Non-voting members (catching up, or kept as read replicas).
    #[serde(default)]
    pub learners: Vec<NodeId>,
    pub app_url: String,
    pub app_up: bool,
    /// Newest checkpoint openraft knows (built here or installed from the leader).
    #[serde(default)]
    pub snapshot_index: Option<u64>,
    /// Last log index removed by compaction; the log starts right after it.
    #[serde(default)]
    pub purged_index: Option<u64>,
    /// A checkpoint arriving from the leader: bytes received of the total (0 of 0: none yet).
    #[serde(default)]
    pub checkpoint_receive: TransferProgress,
    /// The off-site archive, when configured (its leader's view; followers do not ship).
    #[serde(default)]
    pub archive: Option<ArchiveStatus>,
    /// How entries the app may have applied before a crash are kept from being applied
    /// twice (`Config::exactly_once_after_crash`).
    #[serde(default)]
    pub exactly_once_after_crash: String,
    /// Which site writes the service (primary, standby or fenced here) and a standby's
    /// lag, when the service has an off-site archive.
    #[serde(default)]
    pub site: Option<SiteStatus>,
    /// Every member of the group as this node sees it (empty on a standby).
    #[serde(default)]
    pub peers: Vec<peers::PeerView>,
    /// Peers whose replica answered an entry differently from this node's, and the first
    /// such entry; none while every comparison agreed (or `app.check_divergence` is off).
    #[serde(default)]
    pub divergence: Option<Divergence>,
    /// Which failures the voters' placement survives, and an availability estimate.
    #[serde(default)]
    pub survivability: Option<survival::Survivability>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransferProgress {
    pub bytes: u64,
    pub total: u64,
}

/// One service, as the admin port sees it.
pub struct ServiceAdmin {
    pub ingress: Arc<Ingress>,
    /// The service's own admin tokens (`[service.admin]`); none: the node's.
    pub tokens: Option<auth::Tokens>,
    pub site: Option<SiteHandle>,
    pub checkpoints: Option<Arc<Checkpoints>>,
    pub archive: Option<ArchiveProgress>,
    pub exactly_once_after_crash: &'static str,
}

/// What the admin port serves from.
pub struct AdminState {
    pub zone: String,
    /// Where the voters are, for [`survival`].
    placement: survival::Placement,
    pub workers: Workers,
    pub metrics: NodeMetrics,
    /// This node's id, for answers that name it.
    pub node: NodeId,
    services: RwLock<BTreeMap<String, Arc<ServiceAdmin>>>,
    reloads: reload::Reloads,
    follows: site::Follows,
    /// Tokens, open reads, the audit trail.
    pub guard: auth::Guard,
}

/// Every admin error's body: a stable code for scripts (the status's reason,
/// `not-found`, `conflict`, ...) and a sentence for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminError {
    pub code: String,
    pub message: String,
    /// A membership change sent to a follower: the leader to send it to, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_id: Option<NodeId>,
}

impl AdminError {
    pub fn new(status: StatusCode, message: String) -> Self {
        let reason = status.canonical_reason().unwrap_or("error");
        Self {
            code: reason.to_ascii_lowercase().replace(' ', "-"),
            message,
            leader_id: None,
        }
    }
}

/// The largest plain-text error body [`json_errors`] rewrites; longer ones are cut.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Rewrites an error answered as plain text (a handler's reason, or axum's own refusal of
/// a malformed body or query, an unknown route, a wrong method) into an [`AdminError`],
/// keeping its status and other headers.
async fn json_errors(response: axum::response::Response) -> axum::response::Response {
    use axum::http::header::CONTENT_LENGTH;
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse;
    let status = response.status();
    let json = (response.headers().get(CONTENT_TYPE))
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim_end().to_string())
        .unwrap_or_default();
    let message = match text.is_empty() {
        true => status.canonical_reason().unwrap_or("error").to_string(),
        false => text,
    };
    let mut rewritten = (status, Json(AdminError::new(status, message))).into_response();
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            rewritten.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rewritten
}

/// The admin API's OpenAPI 3 description, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// `?service=NAME`.
#[derive(Debug, Default, Deserialize)]
pub struct Selector {
    pub service: Option<String>,
}

type Refusal = (StatusCode, String);

impl AdminState {
    pub fn new(
        node: NodeId,
        (zone, placement): (String, survival::Placement),
        workers: Workers,
        metrics: NodeMetrics,
        (reloads, follows): (reload::Reloads, site::Follows),
        guard: auth::Guard,
    ) -> Arc<Self> {
        Arc::new(Self {
            zone,
            placement,
            node,
            workers,
            metrics,
            services: RwLock::default(),
            reloads,
            follows,
            guard,
        })
    }

    /// The tokens that may act on `service` (the node's only one when none is named):
    /// its own when it has some, else the node's; none when the port is open.
    fn tokens_for(&self, service: Option<&str>) -> Option<auth::Tokens> {
        let selector = Selector {
            service: service.map(str::to_string),
        };
        let own = self
            .select(&selector)
            .ok()
            .and_then(|(_, s)| s.tokens.clone());
        own.or_else(|| self.guard.tokens.clone())
    }

    /// Prometheus text, with every service's Raft gauges read at the scrape: openraft
    /// keeps them in its own metrics, which change on every entry.
    fn render_metrics(&self) -> String {
        for (_, service) in self.all() {
            crate::progress::refresh_raft_gauges(&service.ingress);
        }
        self.metrics.render()
    }

    pub fn insert(&self, name: &str, service: ServiceAdmin) {
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        services.insert(name.to_string(), Arc::new(service));
    }

    pub fn remove(&self, name: &str) {
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        services.remove(name);
    }

    fn all(&self) -> Vec<(String, Arc<ServiceAdmin>)> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        services
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }

    /// The service a request names, or the only one when it names none.
    fn select(&self, selector: &Selector) -> Result<(String, Arc<ServiceAdmin>), Refusal> {
        let services = self.services.read().unwrap_or_else(|p| p.into_inner());
        let names = || services.keys().cloned().collect::<Vec<_>>().join(", ");
        match &selector.service {
            Some(name) => match services.get(name) {
                Some(service) => Ok((name.clone(), service.clone())),
                None => Err((
                    StatusCode::NOT_FOUND,
                    format!("this node runs no service `{name}` (it runs: {})", names()),
                )),
            },
            None if services.len() == 1 => {
                let (name, service) = services.iter().next().ok_or_else(|| {
                    (
                        StatusCode::NOT_FOUND,
                        "this node runs no service".to_string(),
                    )
                })?;
                Ok((name.clone(), service.clone()))
            }
            None => Err((
                StatusCode::BAD_REQUEST,
                format!(
                    "this node runs several services ({}): name one with ?service=NAME",
                    names()
                ),
            )),
        }
    }
}

/// The answer to `POST /checkpoints`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointTaken {
    pub index: u64,
}

/// How long `POST /checkpoints` waits for the checkpoint (a 1 GB state takes seconds).
const CHECKPOINT_WAIT: Duration = Duration::from_secs(600);
/// A trigger that produced no checkpoint by then is repeated.
const RETRIGGER_AFTER: Duration = Duration::from_secs(5);

/// Takes a checkpoint of everything applied so far and answers once it is on disk.
async fn checkpoint_now(
    state: &ServiceAdmin,
) -> Result<Json<CheckpointTaken>, (StatusCode, String)> {
    let Some(checkpoints) = &state.checkpoints else {
        let reason = "checkpoints are off ([checkpoints] is not configured)";
        return Err((StatusCode::CONFLICT, reason.to_string()));
    };
    let metrics = &state.ingress.metrics;
    let target = state.ingress.shared.applied_index();
    let failures = metrics.checkpoint_failures.get();
    let mut summary = checkpoints.summary();
    let unavailable = |reason: String| (StatusCode::SERVICE_UNAVAILABLE, reason);
    let Some(raft) = &state.ingress.raft else {
        return Err((StatusCode::CONFLICT, STANDBY_RUNS_NO_RAFT.to_string()));
    };
    let trigger = || async {
        let triggered = raft.trigger().snapshot().await;
        triggered.map_err(|e| unavailable(e.to_string()))
    };
    trigger().await?;
    let mut triggered_at = tokio::time::Instant::now();
    let done = async {
        loop {
            // openraft drops a trigger that arrives while it still books the previous
            // checkpoint (the file is on disk a moment before); ask again.
            if triggered_at.elapsed() >= RETRIGGER_AFTER {
                trigger().await?;
                triggered_at = tokio::time::Instant::now();
            }
            if let Some(index) = summary
                .borrow_and_update()
                .newest_index
                .filter(|i| *i >= target)
            {
                return Ok(index);
            }
            if metrics.checkpoint_failures.get() > failures {
                return Err(unavailable(
                    "the checkpoint failed; the node's log says why".into(),
                ));
            }
            tokio::select! {
                _ = summary.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    };
    let index = tokio::time::timeout(CHECKPOINT_WAIT, done)
        .await
        .map_err(|_| unavailable(format!("no checkpoint within {CHECKPOINT_WAIT:?}")))??;
    Ok(Json(CheckpointTaken { index }))
}

/// The service's Raft group as the `/metrics` gauges show it.
fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// Why a standby refuses what needs Raft.
const STANDBY_RUNS_NO_RAFT: &str =
    "this node is a standby: it runs no Raft group until it is promoted (POST /site/promote)";

fn status(admin: &AdminState, name: &str, state: &ServiceAdmin) -> Status {
    let ingress = &state.ingress;
    let mut status = Status {
        service: name.to_string(),
        id: ingress.id,
        zone: admin.zone.clone(),
        role: "standby".to_string(),
        term: 0,
        leader_id: None,
        commit_index: None,
        // The replica's own progress: openraft's runs ahead by what awaits delivery.
        applied_index: Some(ingress.shared.applied_index()),
        last_log_index: None,
        voters: Vec::new(),
        learners: Vec::new(),
        app_url: ingress.app.url().to_string(),
        app_up: ingress.metrics.app_up.get() == 1,
        snapshot_index: None,
        purged_index: None,
        checkpoint_receive: TransferProgress {
            bytes: ingress.metrics.checkpoint_receive_bytes.get() as u64,
            total: ingress.metrics.checkpoint_receive_total_bytes.get() as u64,
        },
        archive: state.archive.as_ref().map(ArchiveProgress::status),
        exactly_once_after_crash: state.exactly_once_after_crash.to_string(),
        site: state.site.as_ref().map(|s| s.site.status()),
        peers: Vec::new(),
        divergence: (ingress.shared.answers()).and_then(|l| l.divergence(ingress.id)),
        survivability: None,
    };
    if let Some(raft) = &ingress.raft {
        let m = raft.metrics().borrow_watched().clone();
        status.role = role_name(m.state).to_string();
        status.term = m.current_term;
        status.leader_id = m.current_leader;
        status.commit_index = m.local_committed.map(|l| l.index);
        status.last_log_index = m.last_log_index;
        status.voters = m.membership_config.voter_ids().collect();
        status.learners = m.membership_config.membership().learner_ids().collect();
        status.snapshot_index = m.snapshot.map(|l| l.index);
        status.purged_index = m.purged.map(|l| l.index);
        status.peers = peers::view(ingress.id, &m, &admin.metrics.peers);
    }
    let off_site = state.archive.is_some() || state.site.is_some();
    let voters = admin.placement.voters(&status.voters);
    status.survivability = survival::assess(&voters, off_site);
    status
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route(
            "/status",
            get(
                |State(s): State<Arc<AdminState>>, Query(q): Query<Selector>| async move {
                    let (name, service) = s.select(&q)?;
                    Ok::<_, Refusal>(Json(status(&s, &name, &service)))
                },
            ),
        )
        .route(
            "/services",
            get(|State(s): State<Arc<AdminState>>| async move {
                let all = s.all().iter().map(|(n, svc)| status(&s, n, svc)).collect();
                Json::<Vec<Status>>(all)
            }),
        )
        .route("/services/reload", post(reload::reload))
        .route(
            "/metrics",
            get(|State(s): State<Arc<AdminState>>| async move { s.render_metrics() }),
        )
        .merge(console::routes())
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route(
            "/workers",
            get(|State(s): State<Arc<AdminState>>| async move { Json(s.workers.list()) }),
        )
        .route(
            "/checkpoints",
            post(
                |State(s): State<Arc<AdminState>>, Query(q): Query<Selector>| async move {
                    checkpoint_now(&s.select(&q)?.1).await
                },
            ),
        )
        .route("/site/promote", post(site::promote))
        .route("/site/follow", post(site::follow))
        .route("/site/handover", post(site::handover))
        .route("/site/resume", post(site::resume))
        .route("/members/learner", membership(members::add_learner))
        .route("/members/promote", membership(members::promote))
        .route("/members/remove", membership(members::remove))
        .route("/members/replace", membership(members::replace))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    OPENAPI,
                )
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// A `POST` route for one membership change: the JSON body is its request, answered on
/// this node's Raft.
fn membership<R, F, Fut>(change: F) -> MethodRouter<Arc<AdminState>>
where
    R: DeserializeOwned + Send + 'static,
    F: Fn(Raft, NodeId, R) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = members::Answer> + Send + 'static,
{
    post(
        move |State(s): State<Arc<AdminState>>,
              Query(q): Query<Selector>,
              Json(request): Json<R>| {
            let change = change.clone();
            async move {
                let service = match s.select(&q) {
                    Ok((_, service)) => service,
                    Err((status, reason)) => return members::refuse(status, reason, None),
                };
                let Some(raft) = service.ingress.raft.clone() else {
                    return members::refuse(
                        StatusCode::CONFLICT,
                        STANDBY_RUNS_NO_RAFT.into(),
                        None,
                    );
                };
                change(raft, service.ingress.id, request).await
            }
        },
    )
}

pub async fn serve(listener: PortListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(AdminListener(listener), router)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
}

/// The admin port's listener, plain or TLS, as axum takes one.
struct AdminListener(PortListener);

impl axum::serve::Listener for AdminListener {
    type Io = Box<dyn Connection>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_file_names_every_route_of_the_router_and_no_other() {
        let source = [include_str!("mod.rs"), include_str!("console.rs")].concat();
        let routed: std::collections::BTreeSet<&str> = (source.split(".route(").skip(1))
            .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
            .filter(|path| path.starts_with('/'))
            .collect();
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let documented: std::collections::BTreeSet<&str> = spec["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(routed, documented);
        assert_eq!(routed.len(), 19);
    }

    #[test]
    fn an_error_s_code_is_its_status_s_reason() {
        let error = AdminError::new(StatusCode::METHOD_NOT_ALLOWED, "no".to_string());
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"code":"method-not-allowed","message":"no"}"#
        );
    }
}
