//! Every metric a node exports, in one place, registered in the node's own registry (no
//! process-wide default registry). A node hosts several services, so every per-service
//! metric carries a `service` label: each service holds a [`Metrics`] whose counters and
//! gauges are already bound to its name, and the code that counts never names it.

use prometheus::Counter;
use prometheus::CounterVec;
use prometheus::Encoder;
use prometheus::Gauge;
use prometheus::GaugeVec;
use prometheus::HistogramOpts;
use prometheus::HistogramVec;
use prometheus::IntCounter;
use prometheus::IntCounterVec;
use prometheus::IntGauge;
use prometheus::IntGaugeVec;
use prometheus::Opts;
use prometheus::Registry;

/// The label every per-service metric carries.
pub const SERVICE_LABEL: &str = "service";

/// What registering a metric can fail with (a name registered twice).
pub use prometheus::Error as MetricsError;

/// Declares the per-service counters and gauges once: the families registered in a node's
/// registry, and the fields of [`Metrics`] bound to one service.
macro_rules! service_metrics {
    (
        counters { $( $(#[$cdoc:meta])* $counter:ident: $cname:literal, $chelp:literal; )* }
        float_counters { $( $(#[$fcdoc:meta])* $fcounter:ident: $fcname:literal, $fchelp:literal; )* }
        gauges { $( $(#[$gdoc:meta])* $gauge:ident: $gname:literal, $ghelp:literal; )* }
        float_gauges { $( $(#[$fdoc:meta])* $fgauge:ident: $fname:literal, $fhelp:literal; )* }
    ) => {
        /// The per-service families, each labelled by service.
        struct Families {
            $( $counter: IntCounterVec, )*
            $( $fcounter: CounterVec, )*
            $( $gauge: IntGaugeVec, )*
            $( $fgauge: GaugeVec, )*
            requests: IntCounterVec,
            request_errors: IntCounterVec,
            request_duration: HistogramVec,
            replication_lag: IntGaugeVec,
        }

        impl Families {
            fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
                Ok(Self {
                    $( $counter: register(registry, IntCounterVec::new(
                        Opts::new($cname, $chelp), &[SERVICE_LABEL])?)?, )*
                    $( $fcounter: register(registry, CounterVec::new(
                        Opts::new($fcname, $fchelp), &[SERVICE_LABEL])?)?, )*
                    $( $gauge: register(registry, IntGaugeVec::new(
                        Opts::new($gname, $ghelp), &[SERVICE_LABEL])?)?, )*
                    $( $fgauge: register(registry, GaugeVec::new(
                        Opts::new($fname, $fhelp), &[SERVICE_LABEL])?)?, )*
                    requests: register(registry, IntCounterVec::new(
                        Opts::new("haven_requests_total", "Client requests by route mode"),
                        &[SERVICE_LABEL, "mode"],
                    )?)?,
                    request_errors: register(registry, IntCounterVec::new(
                        Opts::new(
                            "haven_request_errors_total",
                            "Client requests Haven answered with an error, by reason",
                        ),
                        &[SERVICE_LABEL, "reason"],
                    )?)?,
                    request_duration: register(registry, HistogramVec::new(
                        HistogramOpts::new(
                            "haven_request_duration_seconds",
                            "Time from a client request's arrival to its answer, by route mode",
                        )
                        .buckets(REQUEST_BUCKETS.to_vec()),
                        &[SERVICE_LABEL, "mode"],
                    )?)?,
                    replication_lag: register(registry, IntGaugeVec::new(
                        Opts::new(
                            "haven_replication_lag_entries",
                            "On the leader: log entries a follower or learner has not acknowledged yet",
                        ),
                        &[SERVICE_LABEL, "peer"],
                    )?)?,
                })
            }

            fn bind(&self, service: &str) -> ServiceFields {
                ServiceFields {
                    $( $counter: self.$counter.with_label_values(&[service]), )*
                    $( $fcounter: self.$fcounter.with_label_values(&[service]), )*
                    $( $gauge: self.$gauge.with_label_values(&[service]), )*
                    $( $fgauge: self.$fgauge.with_label_values(&[service]), )*
                }
            }

            /// Drops a removed service's series, so a scrape no longer reports them.
            fn unbind(&self, service: &str) {
                $( let _ = self.$counter.remove_label_values(&[service]); )*
                $( let _ = self.$fcounter.remove_label_values(&[service]); )*
                $( let _ = self.$gauge.remove_label_values(&[service]); )*
                $( let _ = self.$fgauge.remove_label_values(&[service]); )*
            }
        }

        /// One service's counters and gauges.
        #[derive(Clone)]
        pub struct ServiceFields {
            $( $(#[$cdoc])* pub $counter: IntCounter, )*
            $( $(#[$fcdoc])* pub $fcounter: Counter, )*
            $( $(#[$gdoc])* pub $gauge: IntGauge, )*
            $( $(#[$fdoc])* pub $fgauge: Gauge, )*
        }
    };
}

service_metrics! {
    counters {
        /// Writes this node sent to the leader for ordering.
        forwarded: "haven_forwarded_total", "Writes forwarded to the leader";
        /// Client requests a peer answered because this node's replica was paused for a
        /// checkpoint's copy.
        stood_in: "haven_stood_in_total",
            "Client requests a peer answered while this node's replica was paused for a checkpoint";
        /// Failed deliveries of an entry to the local replica (each is retried; none is
        /// skipped).
        app_delivery_failures: "haven_app_delivery_failures_total",
            "Failed deliveries of an entry to the local app replica (retried, never skipped)";
        /// Retries answered from the idempotency table instead of the app.
        idempotent_replays: "haven_idempotent_replays_total",
            "Requests answered from the idempotency table instead of the app";
        /// Restarts of the managed app after it exited on its own.
        app_restarts: "haven_app_restarts_total",
            "Restarts of the managed app after it exited on its own";
        /// Checkpoints this node wrote.
        checkpoints_written: "haven_checkpoints_written_total", "Checkpoints this node wrote";
        /// Checkpoints installed into the local replica (from the leader or at restart).
        checkpoints_installed: "haven_checkpoints_installed_total",
            "Checkpoints installed into the local replica";
        /// Replicas rebuilt from a checkpoint after a crash instead of redelivering entries.
        replica_rebuilds: "haven_replica_rebuilds_total",
            "Replicas rebuilt from a checkpoint after a crash, so entries the app may have applied are not delivered twice";
        /// Checkpoints that failed (app down, disk full); each is retried later.
        checkpoint_failures: "haven_checkpoint_failures_total",
            "Checkpoints that failed and will be retried";
        /// Times this node, leading while its replica failed to take entries, handed
        /// leadership to a follower.
        leadership_handoffs: "haven_leadership_handoffs_total",
            "Times this node handed leadership over because its replica failed to take entries";
        /// What the archive uploader put in the object store, and the uploads that failed
        /// (each is retried).
        archive_uploaded_bytes: "haven_archive_uploaded_bytes_total",
            "Bytes this node uploaded to the off-site archive";
        archive_uploaded_objects: "haven_archive_uploaded_objects_total",
            "Objects this node uploaded to the off-site archive";
        archive_upload_errors: "haven_archive_upload_errors_total",
            "Archive uploads that failed (store down, timeout); each is retried";
        /// A standby's reads of the archive that failed (store down, damaged object).
        standby_errors: "haven_standby_errors_total",
            "Times a standby could not read or apply the archive it follows; each is retried";
        /// Writes refused because this site does not write the service.
        site_refused_writes: "haven_site_refused_writes_total",
            "Writes refused because this node is a standby or was fenced";
        /// Peers found to have answered an entry differently from this node's replica.
        divergence_detected: "haven_divergence_detected_total",
            "Peers whose replica answered an entry differently from this node's (once per peer)";
        /// Entries whose answers this node found equal to a peer's (each peer counts).
        answers_compared: "haven_answers_compared_total",
            "Entries whose answer this node's replica and a peer's were found to agree on (per peer)";
    }
    float_counters {
        /// How long the pause of deliveries to stage checkpoints lasted in all.
        checkpoint_pause_seconds: "haven_checkpoint_pause_seconds_total",
            "Time deliveries to the app were paused to stage checkpoints";
    }
    gauges {
        /// 1 while the last delivery to the local replica succeeded.
        app_up: "haven_app_up", "1 if the last delivery to the local app replica succeeded";
        /// Last entry applied to the local replica.
        applied_index: "haven_applied_index", "Last log index applied to the local replica";
        /// Pid of the managed app process; 0 while it is not running.
        app_managed_pid: "haven_app_managed_pid",
            "Pid of the managed app process (0 while it is not running)";
        /// A checkpoint arriving from the leader: bytes so far, and of how many.
        checkpoint_receive_bytes: "haven_checkpoint_receive_bytes",
            "Bytes received of the checkpoint arriving from the leader";
        checkpoint_receive_total_bytes: "haven_checkpoint_receive_size_bytes",
            "Size of the checkpoint arriving from the leader";
        /// The archive's last index as this node (its leader) knows it, and how far it is
        /// behind the replica's applied index.
        archive_index: "haven_archive_last_index",
            "Last log index the off-site archive holds without a gap (leader's view)";
        archive_lag_entries: "haven_archive_lag_entries",
            "Entries applied on the leader that the off-site archive does not hold yet";
        /// 1 while the archive's backlog is over its limit (the store is down or slow).
        archive_backlog_full: "haven_archive_backlog_full",
            "1 while the entries waiting for the archive exceed archive.max_backlog_entries";
        /// This node's site role: 0 primary, 1 standby, 2 fenced, 3 handing over.
        site_role: "haven_site_role",
            "This node's role for the service: 0 primary, 1 standby, 2 fenced, 3 handing over";
        /// The archive's newest epoch as this node last saw it.
        site_epoch: "haven_site_epoch", "The archive's newest epoch as this node last saw it";
        /// A standby's distance from the archive it follows.
        standby_lag_entries: "haven_standby_lag_entries",
            "Archived entries this standby has not applied yet";
        /// The service's Raft group as this node sees it, set on every scrape
        /// ([`Metrics::set_raft`]); 0 where a standby runs no group.
        raft_term: "haven_raft_term", "Current Raft term of the service's group on this node";
        raft_leader: "haven_raft_leader_id", "Node id of the leader this node knows (0: none)";
        commit_index: "haven_commit_index", "Last log index known committed on a quorum";
        last_log_index: "haven_last_log_index", "Last log index in this node's log";
        apply_lag_entries: "haven_apply_lag_entries",
            "Committed entries this node's replica has not applied yet";
        /// The first entry a peer's replica answered differently from this node's.
        divergence_first_index: "haven_divergence_first_index",
            "First log index a peer's replica answered differently from this node's (0: none)";
    }
    float_gauges {
        /// Wall-clock age of the oldest committed entry the archive lacks (0: it lacks
        /// none), measured by the leader every 100 ms whatever its uploads do.
        archive_lag_seconds: "haven_archive_lag_seconds",
            "Age of the oldest committed entry the off-site archive lacks (the recovery point now; 0 when everything is archived)";
        archive_last_upload: "haven_archive_last_upload_timestamp_seconds",
            "Unix time of the last successful upload to the off-site archive";
        standby_lag_seconds: "haven_standby_lag_seconds",
            "How far this standby is behind the primary's last archived entry, in entry time";
        /// The newest drill kept on this node (scheduled or `haven drill`): when the last
        /// one that passed began, its RTO, and whether the newest passed.
        drill_last_success: "haven_drill_last_success_timestamp_seconds",
            "Unix time at which the last successful drill of the service began (0: none)";
        drill_last_rto: "haven_drill_last_rto_seconds",
            "Time to the first healthy answer of the last successful drill";
        drill_last_ok: "haven_drill_last_ok",
            "1 if the newest drill of the service passed, 0 if it failed or none ran";
    }
}

/// Request latency buckets, in seconds: a write through a local quorum takes about a
/// millisecond, a request waiting for a leader seconds.
const REQUEST_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// A family with one more label than `service`, bound to one service.
#[derive(Clone)]
pub struct ServiceVec<V = IntCounterVec> {
    family: V,
    service: String,
}

impl ServiceVec {
    /// The counter for this value of the family's one label of its own (a route mode, an
    /// error reason). Counted on every request, so the label values stay on the stack.
    pub fn with_label_value(&self, value: &str) -> IntCounter {
        self.family
            .with_label_values(&[self.service.as_str(), value])
    }
}

impl ServiceVec<HistogramVec> {
    /// The histogram for this value of the family's own label (a route mode).
    pub fn with_label_value(&self, value: &str) -> prometheus::Histogram {
        self.family
            .with_label_values(&[self.service.as_str(), value])
    }
}

/// A service's Raft group as its consensus layer reports it, for [`Metrics::set_raft`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftProgress {
    pub term: u64,
    pub leader: Option<u64>,
    pub commit_index: Option<u64>,
    pub last_log_index: Option<u64>,
    /// On the leader: every other member and the last index it acknowledged.
    pub followers: Vec<(u64, Option<u64>)>,
}

/// What the node's peer links report, shared by every service: peers are the node's.
#[derive(Clone)]
pub struct PeerMetrics {
    /// Dials of a peer's raft address, and those that failed, by peer address.
    pub connect_attempts: IntCounterVec,
    pub connect_failures: IntCounterVec,
    /// 0 while the last dial of a peer failed, by peer address.
    pub up: IntGaugeVec,
    /// Connections a peer refused, by peer address and service.
    pub refusals: IntCounterVec,
}

impl PeerMetrics {
    /// The last dial of `addr`: 1 up, 0 failed, `None` before the first. Read without
    /// creating the series, so asking about a peer this node never dials adds nothing.
    pub fn up_of(&self, addr: &str) -> Option<i64> {
        use prometheus::core::Collector;
        self.up
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .find(|m| m.get_label().iter().any(|l| l.value() == addr))
            .map(|m| m.get_gauge().get_value() as i64)
    }

    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let peer_family =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["peer"]);
        Ok(Self {
            connect_attempts: register(
                registry,
                peer_family(
                    "haven_peer_connect_attempts_total",
                    "Dials of a peer's raft address",
                )?,
            )?,
            connect_failures: register(
                registry,
                peer_family(
                    "haven_peer_connect_failures_total",
                    "Dials of a peer's raft address that failed (each followed by a backoff)",
                )?,
            )?,
            up: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "haven_peer_up",
                        "0 while the last dial of a peer failed, 1 otherwise",
                    ),
                    &["peer"],
                )?,
            )?,
            refusals: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "haven_peer_refusals_total",
                        "Connections a peer refused: its cluster differs, or it does not run the service",
                    ),
                    &["peer", SERVICE_LABEL],
                )?,
            )?,
        })
    }
}

/// What the rule evaluator reports: alerts firing and undelivered, learners added and
/// removed by scale rules, and the data directory's free space that a built-in alert
/// watches.
#[derive(Clone)]
pub struct RuleMetrics {
    /// Instances (series) of each alert firing now, by alert name.
    pub firing: IntGaugeVec,
    /// Notices (firing or resolved) given up after every retry, by alert name.
    pub delivery_failures: IntCounterVec,
    /// Learners a scale rule added or removed, by rule and `change` (`add`, `remove`).
    pub scale_changes: IntCounterVec,
    pub disk_free_bytes: IntGauge,
    pub disk_free_ratio: Gauge,
}

impl RuleMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let by = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        Ok(Self {
            firing: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "haven_alerts_firing",
                        "Series of each alert rule firing now",
                    ),
                    &["alert"],
                )?,
            )?,
            delivery_failures: register(
                registry,
                by(
                    "haven_alert_delivery_failures_total",
                    "Alert notices that no attempt delivered to their webhook",
                    &["alert"],
                )?,
            )?,
            scale_changes: register(
                registry,
                by(
                    "haven_scale_changes_total",
                    "Learners a scale rule added or removed",
                    &["rule", "change"],
                )?,
            )?,
            disk_free_bytes: register(
                registry,
                IntGauge::new(
                    "haven_disk_free_bytes",
                    "Bytes available to the node on the file system of its data directory",
                )?,
            )?,
            disk_free_ratio: register(
                registry,
                Gauge::new(
                    "haven_disk_free_ratio",
                    "Share of the data directory's file system available to the node (0 to 1)",
                )?,
            )?,
        })
    }

    /// Samples the free space of the file system holding `dir`.
    pub fn sample_disk(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let stats = rustix::fs::statvfs(dir)?;
        let block = stats.f_frsize.max(1);
        let available = stats.f_bavail.saturating_mul(block);
        let size = stats.f_blocks.saturating_mul(block);
        self.disk_free_bytes
            .set(available.min(i64::MAX as u64) as i64);
        self.disk_free_ratio
            .set(available as f64 / (size.max(1)) as f64);
        Ok(())
    }
}

/// A node's registry: every service's metrics and the peers'.
#[derive(Clone)]
pub struct NodeMetrics {
    registry: Registry,
    families: std::sync::Arc<Families>,
    pub peers: PeerMetrics,
    pub rules: RuleMetrics,
    /// Admin requests refused for a missing or wrong token.
    pub admin_unauthorized: IntCounter,
    /// Connections refused in the TLS handshake, by port (`raft`, `client`, `admin`).
    pub tls_refused: IntCounterVec,
}

impl NodeMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let unauthorized = IntCounter::new(
            "haven_admin_unauthorized_total",
            "Admin requests refused for a missing or wrong token",
        )?;
        let tls_refused = IntCounterVec::new(
            Opts::new(
                "haven_tls_handshake_failures_total",
                "Connections refused in the TLS handshake (plaintext, unknown CA, no certificate, timeout), by port",
            ),
            &["port"],
        )?;
        Ok(Self {
            families: std::sync::Arc::new(Families::register(&registry)?),
            peers: PeerMetrics::register(&registry)?,
            rules: RuleMetrics::register(&registry)?,
            admin_unauthorized: register(&registry, unauthorized)?,
            tls_refused: register(&registry, tls_refused)?,
            registry,
        })
    }

    /// The metrics of one service, labelled with its name.
    pub fn service(&self, name: &str) -> Metrics {
        Metrics {
            fields: self.families.bind(name),
            requests: ServiceVec {
                family: self.families.requests.clone(),
                service: name.to_string(),
            },
            request_errors: ServiceVec {
                family: self.families.request_errors.clone(),
                service: name.to_string(),
            },
            request_duration: ServiceVec {
                family: self.families.request_duration.clone(),
                service: name.to_string(),
            },
            replication_lag: ServiceVec {
                family: self.families.replication_lag.clone(),
                service: name.to_string(),
            },
            node: self.clone(),
        }
    }

    /// Forgets a removed service's series.
    pub fn remove_service(&self, name: &str) {
        self.families.unbind(name);
        let families = [
            &self.families.requests,
            &self.families.request_errors,
            &self.peers.refusals,
        ];
        for family in families {
            remove_series(family, name);
        }
        remove_series(&self.families.request_duration, name);
        remove_series(&self.families.replication_lag, name);
    }

    /// Every series of the node, as the rule evaluator reads them.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// Prometheus text exposition of every metric of every service.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Drops every series of `family` that belongs to `service`.
fn remove_series<B: prometheus::core::MetricVecBuilder>(
    family: &prometheus::core::MetricVec<B>,
    service: &str,
) {
    use prometheus::core::Collector;
    let series: Vec<std::collections::HashMap<String, String>> = family
        .collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| {
            m.get_label()
                .iter()
                .map(|l| (l.name().to_string(), l.value().to_string()))
                .collect::<std::collections::HashMap<_, _>>()
        })
        .filter(|labels| labels.get(SERVICE_LABEL).is_some_and(|s| s == service))
        .collect();
    for labels in series {
        let labels: std::collections::HashMap<&str, &str> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _ = family.remove(&labels);
    }
}

/// A gauge holds an i64; an index or a term beyond it cannot happen in practice, and is
/// shown as the largest value rather than wrapping negative.
fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// One service's metrics (and, through [`Metrics::node`], its node's).
#[derive(Clone)]
pub struct Metrics {
    fields: ServiceFields,
    /// Client requests by how they were served (write, linearizable, ordered, local).
    pub requests: ServiceVec,
    /// Client requests answered with an error Haven produced itself, by reason.
    pub request_errors: ServiceVec,
    /// Client request latency by route mode.
    pub request_duration: ServiceVec<HistogramVec>,
    /// On the leader, how far each other member is behind, by peer id.
    replication_lag: ServiceVec<IntGaugeVec>,
    pub node: NodeMetrics,
}

impl std::ops::Deref for Metrics {
    type Target = ServiceFields;

    fn deref(&self) -> &ServiceFields {
        &self.fields
    }
}

impl Metrics {
    /// A fresh registry holding one service, for tools and tests that run a single one.
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(NodeMetrics::new()?.service(crate::config::DEFAULT_SERVICE_NAME))
    }

    /// Prometheus text exposition of every metric of the node.
    pub fn render(&self) -> String {
        self.node.render()
    }

    /// The Raft gauges, from the group's view now (`applied` is the replica's own index).
    /// Members that are no longer behind this node's leadership lose their lag series.
    pub fn set_raft(&self, progress: &RaftProgress, applied: u64) {
        self.raft_term.set(gauge_value(progress.term));
        self.raft_leader
            .set(gauge_value(progress.leader.unwrap_or(0)));
        let commit = progress.commit_index.unwrap_or(0);
        let last = progress.last_log_index.unwrap_or(0);
        self.commit_index.set(gauge_value(commit));
        self.last_log_index.set(gauge_value(last));
        self.apply_lag_entries
            .set(gauge_value(commit.saturating_sub(applied)));
        remove_series(&self.replication_lag.family, &self.replication_lag.service);
        for (peer, matched) in &progress.followers {
            let behind = last.saturating_sub(matched.unwrap_or(0));
            let series = (self.replication_lag.family)
                .with_label_values(&[self.replication_lag.service.as_str(), &peer.to_string()]);
            series.set(gauge_value(behind));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_counts_under_its_own_label_and_a_removed_one_disappears() {
        let node = NodeMetrics::new().unwrap();
        let (orders, stock) = (node.service("orders"), node.service("stock"));
        orders.forwarded.inc();
        orders.requests.with_label_value("write").inc();
        stock.app_up.set(1);
        let text = node.render();
        assert!(
            text.contains("haven_forwarded_total{service=\"orders\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("haven_forwarded_total{service=\"stock\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("haven_requests_total{mode=\"write\",service=\"orders\"} 1"),
            "{text}"
        );
        assert!(text.contains("haven_app_up{service=\"stock\"} 1"), "{text}");
        node.remove_service("orders");
        let text = node.render();
        assert!(!text.contains("service=\"orders\""), "{text}");
        assert!(text.contains("haven_app_up{service=\"stock\"} 1"), "{text}");
    }

    /// A node whose every family has a series (a family without one is not exposed).
    fn every_family() -> NodeMetrics {
        let node = NodeMetrics::new().unwrap();
        let service = node.service("s");
        service.requests.with_label_value("write").inc();
        service.request_errors.with_label_value("overloaded").inc();
        service
            .request_duration
            .with_label_value("write")
            .observe(0.001);
        let progress = RaftProgress {
            followers: vec![(2, Some(1))],
            ..RaftProgress::default()
        };
        service.set_raft(&progress, 0);
        let peers = &node.peers;
        for family in [&peers.connect_attempts, &peers.connect_failures] {
            family.with_label_values(&["p"]).inc();
        }
        peers.up.with_label_values(&["p"]).set(1);
        peers.refusals.with_label_values(&["p", "s"]).inc();
        let rules = &node.rules;
        rules.firing.with_label_values(&["a"]).set(1);
        rules.delivery_failures.with_label_values(&["a"]).inc();
        rules.scale_changes.with_label_values(&["r", "add"]).inc();
        node.tls_refused.with_label_values(&["raft"]).inc();
        node
    }

    /// Units a name may not be written in: Prometheus wants seconds and bytes.
    const NOT_BASE_UNITS: [&str; 10] = [
        "microseconds",
        "milliseconds",
        "ms",
        "us",
        "minutes",
        "hours",
        "days",
        "kb",
        "mb",
        "kilobytes",
    ];

    #[test]
    fn every_metric_follows_the_prometheus_conventions() {
        use prometheus::proto::MetricType;
        let families = every_family().registry.gather();
        let source = include_str!("metrics.rs");
        let written: std::collections::BTreeSet<&str> = (source.split('"'))
            .filter(|t| t.starts_with("haven_") && t.len() > "haven_".len())
            .filter(|t| {
                t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .collect();
        let exposed: std::collections::BTreeSet<&str> = families.iter().map(|f| f.name()).collect();
        assert_eq!(written, exposed, "every metric named here is exposed");
        for family in &families {
            let name = family.name();
            assert!(!family.help().trim().is_empty(), "{name} has no help");
            let segments: Vec<&str> = name.split('_').collect();
            let bad_unit = segments.iter().find(|s| NOT_BASE_UNITS.contains(s));
            assert_eq!(bad_unit, None, "{name}: use seconds or bytes");
            match family.get_field_type() {
                MetricType::COUNTER => {
                    assert!(name.ends_with("_total"), "{name}: a counter ends in _total")
                }
                MetricType::HISTOGRAM => assert!(
                    name.ends_with("_seconds") || name.ends_with("_bytes"),
                    "{name}: a histogram is in seconds or bytes"
                ),
                _ => assert!(
                    !name.ends_with("_total"),
                    "{name}: only counters end in _total"
                ),
            }
            let unit = segments
                .iter()
                .rposition(|s| *s == "seconds" || *s == "bytes");
            let unit_last =
                unit.is_none_or(|i| i + 1 == segments.len() || segments[i + 1..] == ["total"]);
            assert!(unit_last, "{name}: the unit comes last (before _total)");
        }
    }

    #[test]
    fn the_raft_gauges_show_the_group_and_each_follower_s_lag() {
        let node = NodeMetrics::new().unwrap();
        let service = node.service("orders");
        let progress = RaftProgress {
            term: 3,
            leader: Some(1),
            commit_index: Some(90),
            last_log_index: Some(100),
            followers: vec![(2, Some(100)), (3, Some(40)), (4, None)],
        };
        service.set_raft(&progress, 85);
        let text = node.render();
        for line in [
            "haven_raft_term{service=\"orders\"} 3",
            "haven_raft_leader_id{service=\"orders\"} 1",
            "haven_commit_index{service=\"orders\"} 90",
            "haven_last_log_index{service=\"orders\"} 100",
            "haven_apply_lag_entries{service=\"orders\"} 5",
            "haven_replication_lag_entries{peer=\"2\",service=\"orders\"} 0",
            "haven_replication_lag_entries{peer=\"3\",service=\"orders\"} 60",
            "haven_replication_lag_entries{peer=\"4\",service=\"orders\"} 100",
        ] {
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing from {text}"
            );
        }
        // A node that stops leading reports no follower's lag.
        service.set_raft(
            &RaftProgress {
                term: 4,
                ..RaftProgress::default()
            },
            85,
        );
        let text = node.render();
        assert!(!text.contains("haven_replication_lag_entries{"), "{text}");
        assert!(
            text.contains("haven_raft_leader_id{service=\"orders\"} 0\n"),
            "{text}"
        );
    }
}
