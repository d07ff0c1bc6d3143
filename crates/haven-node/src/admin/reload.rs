//! `POST /services/reload[?wipe=true]`: the node reads its config file again and brings
//! its services in line with it: new `[[service]]` tables start, removed ones stop (their
//! data deleted with `wipe`), changed ones restart. SIGHUP does the same without `wipe`.
//! The admin port only carries the request to the node's main loop, which owns the
//! services, and its report back.

use std::path::PathBuf;
use std::time::Duration;

use axum::Json;
use axum::extract::Query;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::AdminState;
use haven_contract::NodeId;

/// What a reload did on one node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadReport {
    pub node: NodeId,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Services whose settings changed: stopped and started again with the new ones.
    pub restarted: Vec<String>,
    pub unchanged: Vec<String>,
    /// What `wipe` deleted of the removed services.
    pub wiped: Vec<Wiped>,
    /// Services of the new config that did not start, and why.
    pub failed: Vec<Failed>,
}

/// One directory a wipe deleted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Wiped {
    pub service: String,
    pub path: PathBuf,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failed {
    pub service: String,
    pub error: String,
}

/// A reload asked of the node's main loop; it answers on `reply`, with the reason when
/// the new config is refused as a whole (then nothing changed).
#[derive(Debug)]
pub struct ReloadRequest {
    pub wipe: bool,
    pub reply: oneshot::Sender<Result<ReloadReport, String>>,
}

/// Where reload requests go.
pub type Reloads = mpsc::Sender<ReloadRequest>;

#[derive(Debug, Default, Deserialize)]
pub struct ReloadQuery {
    #[serde(default)]
    pub wipe: bool,
}

/// How long a reload may take: starting a managed app waits up to its `start_timeout_ms`,
/// and stopping one up to its grace period, for every service that comes or goes.
const RELOAD_WAIT: Duration = Duration::from_secs(600);

pub async fn reload(
    State(state): State<std::sync::Arc<AdminState>>,
    Query(query): Query<ReloadQuery>,
) -> Result<Json<ReloadReport>, (StatusCode, String)> {
    let unavailable = |reason: &str| (StatusCode::SERVICE_UNAVAILABLE, reason.to_string());
    let (reply, answer) = oneshot::channel();
    let request = ReloadRequest {
        wipe: query.wipe,
        reply,
    };
    (state.reloads.send(request).await).map_err(|_| unavailable("the node is shutting down"))?;
    match tokio::time::timeout(RELOAD_WAIT, answer).await {
        Err(_) => Err(unavailable("the reload did not finish within 600 s")),
        Ok(Err(_)) => Err(unavailable("the node is shutting down")),
        Ok(Ok(Err(reason))) => Err((StatusCode::BAD_REQUEST, reason)),
        Ok(Ok(Ok(report))) => Ok(Json(report)),
    }
}
