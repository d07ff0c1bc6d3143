//! Every metric a node exports, in one place, registered in the node's own registry (no
//! process-wide default registry: one process will host several services).

use prometheus::Encoder;
use prometheus::IntCounter;
use prometheus::IntCounterVec;
use prometheus::IntGauge;
use prometheus::IntGaugeVec;
use prometheus::Opts;
use prometheus::Registry;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Client requests by how they were served (write, linearizable, ordered, local).
    pub requests: IntCounterVec,
    /// Client requests answered with an error Haven produced itself, by reason.
    pub request_errors: IntCounterVec,
    /// Writes this node sent to the leader for ordering.
    pub forwarded: IntCounter,
    /// Failed deliveries of an entry to the local replica (each is retried; none is skipped).
    pub app_delivery_failures: IntCounter,
    /// 1 while the last delivery to the local replica succeeded.
    pub app_up: IntGauge,
    /// Last entry applied to the local replica.
    pub applied_index: IntGauge,
    /// Retries answered from the idempotency table instead of the app.
    pub idempotent_replays: IntCounter,
    /// Restarts of the managed app after it exited on its own.
    pub app_restarts: IntCounter,
    /// Pid of the managed app process; 0 while it is not running.
    pub app_managed_pid: IntGauge,
    /// Checkpoints this node wrote, and how long the pause of deliveries lasted in all.
    pub checkpoints_written: IntCounter,
    pub checkpoint_pause_us: IntCounter,
    /// A checkpoint arriving from the leader: bytes so far, and of how many.
    pub checkpoint_receive_bytes: IntGauge,
    pub checkpoint_receive_total_bytes: IntGauge,
    /// Checkpoints installed into the local replica (from the leader or at restart).
    pub checkpoints_installed: IntCounter,
    /// Replicas rebuilt from a checkpoint after a crash instead of redelivering entries.
    pub replica_rebuilds: IntCounter,
    /// Checkpoints that failed (app down, disk full); each is retried later.
    pub checkpoint_failures: IntCounter,
    /// Times this node, leading while its replica failed to take entries, handed
    /// leadership to a follower.
    pub leadership_handoffs: IntCounter,
    /// Dials of a peer's raft address, and those that failed, by peer address.
    pub peer_connect_attempts: IntCounterVec,
    pub peer_connect_failures: IntCounterVec,
    /// 0 while the last dial of a peer failed, by peer address.
    pub peer_up: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("haven_requests_total", "Client requests by route mode"),
            &["mode"],
        )?;
        let request_errors = IntCounterVec::new(
            Opts::new(
                "haven_request_errors_total",
                "Client requests Haven answered with an error, by reason",
            ),
            &["reason"],
        )?;
        let forwarded = IntCounter::new("haven_forwarded_total", "Writes forwarded to the leader")?;
        let app_delivery_failures = IntCounter::new(
            "haven_app_delivery_failures_total",
            "Failed deliveries of an entry to the local app replica (retried, never skipped)",
        )?;
        let app_up = IntGauge::new(
            "haven_app_up",
            "1 if the last delivery to the local app replica succeeded",
        )?;
        let applied_index = IntGauge::new(
            "haven_applied_index",
            "Last log index applied to the local replica",
        )?;
        let idempotent_replays = IntCounter::new(
            "haven_idempotent_replays_total",
            "Requests answered from the idempotency table instead of the app",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(request_errors.clone()))?;
        registry.register(Box::new(forwarded.clone()))?;
        registry.register(Box::new(app_delivery_failures.clone()))?;
        registry.register(Box::new(app_up.clone()))?;
        registry.register(Box::new(applied_index.clone()))?;
        registry.register(Box::new(idempotent_replays.clone()))?;
        let app_restarts = IntCounter::new(
            "haven_app_restarts_total",
            "Restarts of the managed app after it exited on its own",
        )?;
        let app_managed_pid = IntGauge::new(
            "haven_app_managed_pid",
            "Pid of the managed app process (0 while it is not running)",
        )?;
        registry.register(Box::new(app_restarts.clone()))?;
        registry.register(Box::new(app_managed_pid.clone()))?;
        let checkpoints_written = IntCounter::new(
            "haven_checkpoints_written_total",
            "Checkpoints this node wrote",
        )?;
        let checkpoint_pause_us = IntCounter::new(
            "haven_checkpoint_pause_microseconds_total",
            "Time deliveries to the app were paused to stage checkpoints",
        )?;
        let checkpoint_receive_bytes = IntGauge::new(
            "haven_checkpoint_receive_bytes",
            "Bytes received of the checkpoint arriving from the leader",
        )?;
        let checkpoint_receive_total_bytes = IntGauge::new(
            "haven_checkpoint_receive_total_bytes",
            "Size of the checkpoint arriving from the leader",
        )?;
        let checkpoints_installed = IntCounter::new(
            "haven_checkpoints_installed_total",
            "Checkpoints installed into the local replica",
        )?;
        let replica_rebuilds = IntCounter::new(
            "haven_replica_rebuilds_total",
            "Replicas rebuilt from a checkpoint after a crash, so entries the app may have applied are not delivered twice",
        )?;
        let checkpoint_failures = IntCounter::new(
            "haven_checkpoint_failures_total",
            "Checkpoints that failed and will be retried",
        )?;
        let leadership_handoffs = IntCounter::new(
            "haven_leadership_handoffs_total",
            "Times this node handed leadership over because its replica failed to take entries",
        )?;
        let peer_connect_attempts = IntCounterVec::new(
            Opts::new(
                "haven_peer_connect_attempts_total",
                "Dials of a peer's raft address",
            ),
            &["peer"],
        )?;
        let peer_connect_failures = IntCounterVec::new(
            Opts::new(
                "haven_peer_connect_failures_total",
                "Dials of a peer's raft address that failed (each followed by a backoff)",
            ),
            &["peer"],
        )?;
        let peer_up = IntGaugeVec::new(
            Opts::new(
                "haven_peer_up",
                "0 while the last dial of a peer failed, 1 otherwise",
            ),
            &["peer"],
        )?;
        registry.register(Box::new(peer_connect_attempts.clone()))?;
        registry.register(Box::new(peer_connect_failures.clone()))?;
        registry.register(Box::new(peer_up.clone()))?;
        for metric in [
            &leadership_handoffs,
            &checkpoints_written,
            &checkpoint_pause_us,
            &checkpoints_installed,
            &replica_rebuilds,
            &checkpoint_failures,
        ] {
            registry.register(Box::new(metric.clone()))?;
        }
        for metric in [&checkpoint_receive_bytes, &checkpoint_receive_total_bytes] {
            registry.register(Box::new(metric.clone()))?;
        }
        Ok(Self {
            registry,
            requests,
            request_errors,
            forwarded,
            app_delivery_failures,
            app_up,
            applied_index,
            idempotent_replays,
            app_restarts,
            app_managed_pid,
            checkpoints_written,
            checkpoint_pause_us,
            checkpoint_receive_bytes,
            checkpoint_receive_total_bytes,
            checkpoints_installed,
            replica_rebuilds,
            checkpoint_failures,
            leadership_handoffs,
            peer_connect_attempts,
            peer_connect_failures,
            peer_up,
        })
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
