//! The admin HTTP API, on its own port: `GET /status` (JSON), `GET /metrics` (Prometheus
//! text), `GET /health`, `POST /checkpoints` (take one now), and the membership changes of [`members`] (`POST
//! /members/{learner,promote,remove,replace}`, JSON). Separate from the client port so
//! operators can reach a node whose client side is saturated.

pub mod members;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::MethodRouter;
use axum::routing::get;
use axum::routing::post;
use openraft::ServerState;
use openraft::rt::WatchReceiver;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::apply::Raft;
use crate::checkpoint::Checkpoints;
use crate::ingress::Ingress;
use crate::workers::Workers;
use haven_contract::NodeId;

/// A node's view of itself and the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
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
    /// How entries the app may have applied before a crash are kept from being applied
    /// twice (`Config::exactly_once_after_crash`).
    #[serde(default)]
    pub exactly_once_after_crash: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransferProgress {
    pub bytes: u64,
    pub total: u64,
}

/// What the admin port serves from.
pub struct AdminState {
    pub ingress: Arc<Ingress>,
    pub zone: String,
    pub checkpoints: Option<Arc<Checkpoints>>,
    pub workers: Workers,
    pub exactly_once_after_crash: &'static str,
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
async fn checkpoint_now(state: &AdminState) -> Result<Json<CheckpointTaken>, (StatusCode, String)> {
    let Some(checkpoints) = &state.checkpoints else {
        let reason = "checkpoints are off ([checkpoints] is not configured)";
        return Err((StatusCode::CONFLICT, reason.to_string()));
    };
    let metrics = &state.ingress.metrics;
    let target = state.ingress.shared.applied_index();
    let failures = metrics.checkpoint_failures.get();
    let mut summary = checkpoints.summary();
    let unavailable = |reason: String| (StatusCode::SERVICE_UNAVAILABLE, reason);
    let trigger = || async {
        let triggered = state.ingress.raft.trigger().snapshot().await;
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

fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn status(state: &AdminState) -> Status {
    let ingress = &state.ingress;
    let m = ingress.raft.metrics().borrow_watched().clone();
    Status {
        id: ingress.id,
        zone: state.zone.clone(),
        role: role_name(m.state).to_string(),
        term: m.current_term,
        leader_id: m.current_leader,
        commit_index: m.local_committed.map(|l| l.index),
        // The replica's own progress: openraft's runs ahead by what awaits delivery.
        applied_index: Some(ingress.shared.applied_index()),
        last_log_index: m.last_log_index,
        voters: m.membership_config.voter_ids().collect(),
        learners: m.membership_config.membership().learner_ids().collect(),
        app_url: ingress.app.url().to_string(),
        app_up: ingress.metrics.app_up.get() == 1,
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        checkpoint_receive: TransferProgress {
            bytes: ingress.metrics.checkpoint_receive_bytes.get() as u64,
            total: ingress.metrics.checkpoint_receive_total_bytes.get() as u64,
        },
        exactly_once_after_crash: state.exactly_once_after_crash.to_string(),
    }
}

pub fn router(state: AdminState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route(
            "/status",
            get(|State(s): State<Arc<AdminState>>| async move { Json(status(&s)) }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<AdminState>>| async move { s.ingress.metrics.render() }),
        )
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/workers",
            get(|State(s): State<Arc<AdminState>>| async move { Json(s.workers.list()) }),
        )
        .route(
            "/checkpoints",
            post(|State(s): State<Arc<AdminState>>| async move { checkpoint_now(&s).await }),
        )
        .route("/members/learner", membership(members::add_learner))
        .route("/members/promote", membership(members::promote))
        .route("/members/remove", membership(members::remove))
        .route("/members/replace", membership(members::replace))
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
        move |State(s): State<Arc<AdminState>>, Json(request): Json<R>| {
            let change = change.clone();
            async move { change(s.ingress.raft.clone(), s.ingress.id, request).await }
        },
    )
}

pub async fn serve(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "admin server failed");
    }
}
