//! Assembles one node in start order (listeners, what the services share, the service,
//! servers) and tears it down in reverse. Binding every port first makes a misconfigured
//! node fail before it touches its data.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::admin::AdminState;
use crate::app::AppClient;
use crate::config::Config;
use crate::consensus;
use crate::consensus::link::Transport;
use crate::ingress;
use crate::ingress::Ingress;
use crate::metrics::Metrics;
use crate::routes::RouteTable;
use crate::service::NodeShared;
use crate::service::Service;
use crate::service::ServiceError;
use crate::workers::Workers;

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
    let metrics = Metrics::new()?;
    let shared = NodeShared {
        transport: Transport::tcp(metrics.clone()),
        metrics,
        workers: Workers::new(),
        stop: stop_rx.clone(),
    };
    let service_config = config.service();
    let service = Service::open(&config, service_config, &shared).await?;
    shared.workers.spawn(
        "raft-server",
        consensus::server::serve(
            raft_listener,
            service.raft.clone(),
            service.inbox(&shared.metrics),
            config.raft.reads,
            stop_rx.clone(),
        ),
    );
    tracing::info!(addr = %config.node.raft_addr, "raft port open");
    service.start(&config, service_config, &shared).await?;

    let ingress = Ingress::new(
        config.node.id,
        service.raft.clone(),
        service.state_machine.shared(),
        AppClient::new(&service_config.app.url, service_config.app_timeout()),
        shared.transport.clone(),
        RouteTable::new(service_config.routes.clone()),
        service_config.limits.clone(),
        shared.metrics.clone(),
        config.raft.reads,
    );
    shared.workers.spawn(
        "client-server",
        ingress::serve(client_listener, ingress.clone(), stop_rx.clone()),
    );
    tracing::info!(addr = %config.node.client_addr, "client port open");
    let router = admin::router(AdminState {
        ingress,
        zone: config.node.zone.clone(),
        checkpoints: service.checkpoints.clone(),
        workers: shared.workers.clone(),
        exactly_once_after_crash: service_config.exactly_once_after_crash(),
    });
    shared.workers.spawn(
        "admin-server",
        admin::serve(admin_listener, router, stop_rx.clone()),
    );
    tracing::info!(addr = %config.node.admin_addr, id = config.node.id, "node ready");

    let fatal = tokio::select! {
        () = shutdown => None,
        fatal = service.stopped() => Some(fatal),
    };
    match &fatal {
        None => tracing::info!("shutting down"),
        Some(reason) => tracing::error!(%reason, "raft stopped; shutting down"),
    }
    let _ = stop_tx.send(true);
    service.shutdown().await;
    shared.workers.stop_all(WORKER_STOP_GRACE).await;
    match fatal {
        None => Ok(()),
        Some(reason) => Err(ServiceError::Raft(reason).into()),
    }
}

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
