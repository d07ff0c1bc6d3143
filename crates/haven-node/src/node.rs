//! Assembles one node in start order (listeners, what the services share, each service,
//! the servers that route to them) and tears it down in reverse. Binding every port first makes a misconfigured
//! node fail before it touches its data.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::admin::AdminState;
use crate::admin::ServiceAdmin;
use crate::app::AppClient;
use crate::config::Config;
use crate::config::ServiceConfig;
use crate::consensus;
use crate::consensus::link::Transport;
use crate::consensus::server::Group;
use crate::consensus::server::Groups;
use crate::consensus::wire::Hello;
use crate::ingress;
use crate::ingress::Ingress;
use crate::ingress::select::Directory;
use crate::metrics::NodeMetrics;
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

/// Runs a node until `shutdown` resolves, or until one service's Raft stops by itself (a
/// storage error, e.g. a full disk, is fatal to openraft): then the node shuts every
/// service down and returns the error rather than keep serving without Raft.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let raft_listener = bind("raft", config.node.raft_addr).await?;
    let client_listener = bind("client", config.node.client_addr).await?;
    let admin_listener = bind("admin", config.node.admin_addr).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = NodeMetrics::new()?;
    let workers = Workers::new();
    let hello = Hello {
        cluster: config.node.cluster.clone(),
        service: String::new(),
    };
    let transport = Transport::tcp(metrics.peers.clone(), hello);
    let services = open_services(&config, &metrics, &transport, &workers, &stop_rx).await?;
    let groups = Groups::new(&config.node.cluster);
    for (service, shared) in &services {
        let group = Group {
            raft: service.raft.clone(),
            inbox: service.inbox(&shared.metrics),
        };
        groups.insert(&service.name, group);
    }
    workers.spawn(
        "raft-server",
        consensus::server::serve(raft_listener, groups, config.raft.reads, stop_rx.clone()),
    );
    tracing::info!(addr = %config.node.raft_addr, "raft port open");
    let directory = Arc::new(Directory::default());
    let admin = AdminState::new(config.node.zone.clone(), workers.clone(), metrics);
    for ((service, shared), service_config) in services.iter().zip(&config.services) {
        if let Err(e) = service.start(&config, service_config, shared).await {
            let _ = stop_tx.send(true);
            shut_down(services, &workers).await;
            return Err(e.into());
        }
        let ingress = ingress_of(&config, service_config, service, shared);
        directory.insert(
            &service.name,
            service_config.matcher.clone(),
            ingress.clone(),
        );
        let entry = ServiceAdmin {
            ingress,
            checkpoints: service.checkpoints.clone(),
            exactly_once_after_crash: service_config.exactly_once_after_crash(),
        };
        admin.insert(&service.name, entry);
    }
    workers.spawn(
        "client-server",
        ingress::serve(client_listener, directory, stop_rx.clone()),
    );
    tracing::info!(addr = %config.node.client_addr, "client port open");
    workers.spawn(
        "admin-server",
        admin::serve(admin_listener, admin::router(admin), stop_rx.clone()),
    );
    tracing::info!(
        addr = %config.node.admin_addr,
        id = config.node.id,
        services = config.services.len(),
        "node ready"
    );

    let fatal = tokio::select! {
        () = shutdown => None,
        fatal = any_stopped(&services) => Some(fatal),
    };
    match &fatal {
        None => tracing::info!("shutting down"),
        Some(reason) => tracing::error!(%reason, "raft stopped; shutting down"),
    }
    let _ = stop_tx.send(true);
    shut_down(services, &workers).await;
    match fatal {
        None => Ok(()),
        Some(reason) => Err(ServiceError::Raft(reason).into()),
    }
}

/// Opens every configured service in order; if one fails, those already open are shut
/// down before the error is returned, so no app or lock outlives a failed start.
async fn open_services(
    config: &Config,
    metrics: &NodeMetrics,
    transport: &Transport,
    workers: &Workers,
    stop: &watch::Receiver<bool>,
) -> Result<Vec<(Service, NodeShared)>, NodeError> {
    let mut opened = Vec::with_capacity(config.services.len());
    for service_config in &config.services {
        let shared = NodeShared {
            metrics: metrics.service(&service_config.name),
            transport: transport.for_service(&service_config.name),
            workers: workers.clone(),
            stop: stop.clone(),
        };
        match Service::open(config, service_config, &shared).await {
            Ok(service) => opened.push((service, shared)),
            Err(e) => {
                shut_down(opened, workers).await;
                return Err(e.into());
            }
        }
    }
    Ok(opened)
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
        service.state_machine.shared(),
        AppClient::new(&service_config.app.url, service_config.app_timeout()),
        shared.transport.clone(),
        RouteTable::new(service_config.routes.clone()),
        service_config.limits.clone(),
        shared.metrics.clone(),
        config.raft.reads,
    )
}

/// Resolves with the reason once any service's Raft core has stopped by itself.
async fn any_stopped(services: &[(Service, NodeShared)]) -> String {
    let stopped = services.iter().map(|(service, _)| {
        Box::pin(async move { format!("service {}: {}", service.name, service.stopped().await) })
    });
    futures::future::select_all(stopped).await.0
}

/// Shuts the services down (each stops its Raft, saves its apply state, stops its app),
/// then the node's workers. Call after the shutdown signal.
async fn shut_down(services: Vec<(Service, NodeShared)>, workers: &Workers) {
    futures::future::join_all(services.into_iter().map(|(service, _)| service.shutdown())).await;
    workers.stop_all(WORKER_STOP_GRACE).await;
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
