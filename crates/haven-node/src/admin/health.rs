//! `GET /health` and `GET /ready`, for monitors and load balancers. Both answer 200 with
//! `{"status":"ok","problems":[]}` when nothing is wrong, else 503 with every problem of
//! every service (a code and a sentence each):
//! - `/health`: is anything on this node broken that an operator must fix or wait out?
//!   The replica does not answer HTTP (`app-down`) or its last delivery failed
//!   (`app-failing`), the service's group knows no leader or its leader cannot confirm
//!   it leads a quorum within [`LEADER_CONFIRM_TIMEOUT`] (`no-leader`), the group stopped
//!   (`raft-stopped`), the site is fenced (`fenced`).
//! - `/ready`: should clients be sent here now? Everything `/health` checks, and the
//!   replica is caught up (`catching-up`: more than [`READY_MAX_APPLY_LAG`] committed
//!   entries unapplied, as while a checkpoint from the leader arrives) and this site takes
//!   writes (`standby`, `handing-over`).
//!
//! Neither is a liveness probe: a node that answers at all is alive, and restarting it for
//! a dead app or a lost quorum would not help.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use openraft::ServerState;
use openraft::rt::WatchReceiver;
use serde::Deserialize;
use serde::Serialize;

use super::AdminState;
use super::ServiceAdmin;
use haven_service::app::process::answers_http;
use haven_service::site::Role;

/// How long the replica has to answer the probe.
pub const APP_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the leader (or the quorum behind it) has to confirm it leads.
pub const LEADER_CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Committed entries a replica may have left to apply and still take clients.
pub const READY_MAX_APPLY_LAG: u64 = 1_000;

/// The answer of `/health` and `/ready`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    /// `ok`, or `unhealthy` (`/health`) / `not-ready` (`/ready`).
    pub status: String,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    pub service: String,
    /// Stable, for scripts: `app-down`, `no-leader`, ...
    pub code: String,
    pub message: String,
}

/// Which question is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Health,
    Ready,
}

pub async fn health(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<Health>) {
    answer(&state, Probe::Health).await
}

pub async fn ready(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<Health>) {
    answer(&state, Probe::Ready).await
}

async fn answer(state: &AdminState, probe: Probe) -> (StatusCode, Json<Health>) {
    let checks = state
        .all()
        .into_iter()
        .map(|(name, service)| async move { problems(&name, &service, probe).await });
    let problems: Vec<Problem> = futures::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect();
    let (code, status) = match (problems.is_empty(), probe) {
        (true, _) => (StatusCode::OK, "ok"),
        (false, Probe::Health) => (StatusCode::SERVICE_UNAVAILABLE, "unhealthy"),
        (false, Probe::Ready) => (StatusCode::SERVICE_UNAVAILABLE, "not-ready"),
    };
    let health = Health {
        status: status.to_string(),
        problems,
    };
    (code, Json(health))
}

async fn problems(name: &str, service: &ServiceAdmin, probe: Probe) -> Vec<Problem> {
    let mut found = Vec::new();
    let mut problem = |code: &str, message: String| {
        found.push(Problem {
            service: name.to_string(),
            code: code.to_string(),
            message,
        })
    };
    let ingress = &service.ingress;
    let url = ingress.app.url();
    if !answers_http(url, APP_PROBE_TIMEOUT).await {
        let within = APP_PROBE_TIMEOUT.as_millis();
        problem(
            "app-down",
            format!("the replica at {url} does not answer HTTP within {within} ms"),
        );
    } else if *ingress.shared.delivery_failing().borrow() {
        let message = format!("the last delivery to the replica at {url} failed");
        problem("app-failing", message);
    }
    let role = service.site.as_ref().map(|s| s.site.status().role);
    match (&role, probe) {
        (Some(Role::Fenced { reason }), _) => problem("fenced", format!("fenced: {reason}")),
        (Some(Role::Standby), Probe::Ready) => problem(
            "standby",
            "this site is a standby: it takes no writes until promoted".to_string(),
        ),
        (Some(Role::HandingOver), Probe::Ready) => problem(
            "handing-over",
            "this site is handing the service over: it takes no writes".to_string(),
        ),
        _ => {}
    }
    let Some(raft) = &ingress.raft else {
        return found;
    };
    let m = raft.metrics().borrow_watched().clone();
    if m.state == ServerState::Shutdown || m.running_state.is_err() {
        problem(
            "raft-stopped",
            "the service's Raft group stopped; the node's log says why".into(),
        );
    } else if m.current_leader.is_none() {
        let term = m.current_term;
        problem(
            "no-leader",
            format!("no leader known for the service's group (term {term})"),
        );
    } else if let Err(reason) = ingress.confirm_leader(LEADER_CONFIRM_TIMEOUT).await {
        let leader = m.current_leader.unwrap_or_default();
        let message = format!("leader {leader} cannot confirm it leads a quorum: {reason}");
        problem("no-leader", message);
    }
    if probe == Probe::Ready {
        let committed = m.local_committed.map_or(0, |l| l.index);
        let behind = committed.saturating_sub(ingress.shared.applied_index());
        if behind > READY_MAX_APPLY_LAG {
            let message = format!(
                "the replica has {behind} committed entries to apply (ready at {READY_MAX_APPLY_LAG} or fewer)"
            );
            problem("catching-up", message);
        }
    }
    found
}
