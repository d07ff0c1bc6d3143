//! `POST /site/promote[?service=NAME]`: on a standby site, takes the service over. The
//! fence goes up first (the next epoch's create-only marker in the archive,
//! [`haven_service::standby::promote`]); the answer comes once this node applied what
//! the archive held before it and runs as the primary, or after [`TAKE_OVER_WAIT`] with
//! `took_over: false` (a standby far behind is still replaying; status shows it).

use std::time::Duration;
use std::time::Instant;

use axum::Json;
use axum::extract::Query;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde::Serialize;

use super::AdminState;
use super::Selector;
use haven_service::site::Role;
use haven_service::standby;
use haven_service::standby::Promotion;

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PromoteError {
    pub error: String,
}

type Answer = Result<Json<Promoted>, (StatusCode, Json<PromoteError>)>;

fn refuse(status: StatusCode, error: String) -> (StatusCode, Json<PromoteError>) {
    (status, Json(PromoteError { error }))
}

pub async fn promote(
    State(state): State<std::sync::Arc<AdminState>>,
    Query(q): Query<Selector>,
) -> Answer {
    let started = Instant::now();
    let (name, service) = state.select(&q).map_err(|(s, e)| refuse(s, e))?;
    let Some(handle) = &service.site else {
        let reason =
            format!("service {name} has no off-site archive: there is no standby to promote");
        return Err(refuse(StatusCode::CONFLICT, reason));
    };
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
