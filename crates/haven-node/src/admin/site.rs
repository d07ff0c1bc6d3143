//! The site endpoints, each about one service (`?service=NAME`):
//! - `POST /site/promote`: on a standby site, takes the service over. The fence goes up
//!   first (the next epoch's create-only marker in the archive,
//!   [`haven_service::standby::promote`]); the answer comes once this node applied what
//!   the archive held before it and runs as the primary, or after [`TAKE_OVER_WAIT`] with
//!   `took_over: false` (a standby far behind is still replaying; status shows it).
//! - `POST /site/follow`: on a site another one took over from, makes this node a
//!   standby of the new primary, exporting what only it held
//!   ([`haven_service::failback`]). The node's main loop closes the service, exports
//!   and deletes its old history, and opens it again as a standby.
//! - `POST /site/handover` and `POST /site/resume`: a primary stops taking writes for a
//!   planned switchover, or takes them again when the switchover is called off.

use std::time::Duration;
use std::time::Instant;

use axum::Json;
use axum::extract::Query;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde::Serialize;

use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::AdminError;
use super::AdminState;
use super::Selector;
use super::ServiceAdmin;
use haven_contract::NodeId;
use haven_service::failback;
use haven_service::failback::Plan;
use haven_service::failback::Rejoined;
use haven_service::site::Role;
use haven_service::standby;
use haven_service::standby::Promotion;
use haven_service::standby::SiteHandle;

/// How long the answer waits for this node to take over after the fence is up.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(120);

/// The answer to a promotion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Promoted {
    pub service: String,
    #[serde(flatten)]
    pub promotion: Promotion,
    /// Whether this node runs as the primary by the time of the answer.
    pub took_over: bool,
    /// From the request to that moment.
    pub took_over_ms: u64,
}

type Answer<T = Promoted> = Result<Json<T>, (StatusCode, Json<AdminError>)>;

fn refuse(status: StatusCode, error: String) -> (StatusCode, Json<AdminError>) {
    (status, Json(AdminError::new(status, error)))
}

pub async fn promote(
    State(state): State<std::sync::Arc<AdminState>>,
    Query(q): Query<Selector>,
) -> Answer {
    let started = Instant::now();
    let (name, service) = state.select(&q).map_err(|(s, e)| refuse(s, e))?;
    let handle = site_of(&name, &service)?;
    let mut role = handle.site.subscribe();
    let promotion = standby::promote(handle)
        .await
        .map_err(|e| refuse(StatusCode::CONFLICT, e.to_string()))?;
    let primary = tokio::time::timeout(TAKE_OVER_WAIT, role.wait_for(|s| s.role == Role::Primary));
    let took_over = matches!(primary.await, Ok(Ok(_)));
    Ok(Json(Promoted {
        service: name,
        promotion,
        took_over,
        took_over_ms: started.elapsed().as_millis() as u64,
    }))
}

fn site_of<'a>(
    name: &str,
    service: &'a ServiceAdmin,
) -> Result<&'a SiteHandle, (StatusCode, Json<AdminError>)> {
    service.site.as_ref().ok_or_else(|| {
        let reason = format!("service {name} has no off-site archive: it has no sites");
        refuse(StatusCode::CONFLICT, reason)
    })
}

/// A follow asked of the node's main loop, which owns the services: it closes the
/// service, runs [`failback::rejoin`], opens it again and answers on `reply`.
#[derive(Debug)]
pub struct FollowRequest {
    pub service: String,
    pub plan: Plan,
    pub reply: oneshot::Sender<Result<Rejoined, String>>,
}

/// Where follow requests go.
pub type Follows = mpsc::Sender<FollowRequest>;

/// How long a follow may take: closing and opening the service stops and starts its app.
const FOLLOW_WAIT: Duration = Duration::from_secs(300);

/// The answer to `POST /site/follow`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Followed {
    pub service: String,
    pub node: NodeId,
    /// The epoch followed now, and who writes it.
    pub epoch: Option<u64>,
    pub writer: Option<String>,
    /// Whether the node was a standby already (then nothing changed).
    pub already_standby: bool,
    #[serde(flatten)]
    pub rejoined: Rejoined,
}

pub async fn follow(
    State(state): State<std::sync::Arc<AdminState>>,
    Query(q): Query<Selector>,
) -> Answer<Followed> {
    let (name, service) = state.select(&q).map_err(|(s, e)| refuse(s, e))?;
    let handle = site_of(&name, &service)?;
    let followed = |plan: Option<&Plan>, rejoined| Followed {
        service: name.clone(),
        node: state.node,
        epoch: plan.map(|p| p.epoch),
        writer: plan.map(|p| p.writer.clone()),
        already_standby: plan.is_none(),
        rejoined,
    };
    if handle.site.role() == Role::Standby {
        return Ok(Json(followed(None, Rejoined::default())));
    }
    let plan = failback::plan(handle)
        .await
        .map_err(|e| refuse(StatusCode::CONFLICT, e.to_string()))?;
    let unavailable = |reason: String| refuse(StatusCode::SERVICE_UNAVAILABLE, reason);
    let (reply, answer) = oneshot::channel();
    let request = FollowRequest {
        service: name.clone(),
        plan: plan.clone(),
        reply,
    };
    (state.follows.send(request).await)
        .map_err(|_| unavailable("the node is shutting down".to_string()))?;
    match tokio::time::timeout(FOLLOW_WAIT, answer).await {
        Err(_) => Err(unavailable(format!(
            "following did not finish within {FOLLOW_WAIT:?}"
        ))),
        Ok(Err(_)) => Err(unavailable("the node is shutting down".to_string())),
        Ok(Ok(Err(reason))) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, reason)),
        Ok(Ok(Ok(rejoined))) => Ok(Json(followed(Some(&plan), rejoined))),
    }
}

/// The answer to `POST /site/handover` and `POST /site/resume`: the role now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SiteRole {
    pub service: String,
    pub node: NodeId,
    pub role: Role,
}

pub async fn handover(
    State(state): State<std::sync::Arc<AdminState>>,
    Query(q): Query<Selector>,
) -> Answer<SiteRole> {
    let (name, service) = state.select(&q).map_err(|(s, e)| refuse(s, e))?;
    let (handle, progress) = archive_of(&name, &service)?;
    failback::hand_over(&handle.site, progress)
        .map_err(|e| refuse(StatusCode::CONFLICT, e.to_string()))?;
    Ok(Json(role_of(&state, name, handle)))
}

pub async fn resume(
    State(state): State<std::sync::Arc<AdminState>>,
    Query(q): Query<Selector>,
) -> Answer<SiteRole> {
    let (name, service) = state.select(&q).map_err(|(s, e)| refuse(s, e))?;
    let (handle, progress) = archive_of(&name, &service)?;
    failback::resume(handle, progress)
        .await
        .map_err(|e| refuse(StatusCode::CONFLICT, e.to_string()))?;
    Ok(Json(role_of(&state, name, handle)))
}

fn archive_of<'a>(
    name: &str,
    service: &'a ServiceAdmin,
) -> Result<
    (&'a SiteHandle, &'a haven_service::archive::ArchiveProgress),
    (StatusCode, Json<AdminError>),
> {
    let handle = site_of(name, service)?;
    let progress = service.archive.as_ref().ok_or_else(|| {
        refuse(
            StatusCode::CONFLICT,
            format!("service {name} has no off-site archive: it has no sites"),
        )
    })?;
    Ok((handle, progress))
}

fn role_of(state: &AdminState, service: String, handle: &SiteHandle) -> SiteRole {
    SiteRole {
        service,
        node: state.node,
        role: handle.site.role(),
    }
}
