//! The node's TOML configuration: one serde struct per table, every field documented with
//! its default, unknown keys rejected. Errors name the key and the line, because an
//! operator staring at a file needs both.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::overrides::Override;
use haven_contract::NodeId;
use haven_contract::PeerNode;

use crate::rules;
use crate::rules::AlertRule;
use crate::rules::AlertSection;
use crate::rules::AlertsSection;
use crate::rules::BadRule;
use crate::rules::ScaleRule;
use crate::rules::ScaleSection;
use crate::rules::ServiceFacts;
use crate::rules::builtin_alerts;

/// Largest accepted request body unless configured otherwise (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Hard ceiling for `limits.max_body_bytes`: an entry must fit comfortably in one Raft frame.
pub const MAX_BODY_BYTES_CEILING: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// toml's own message already carries the line, column and offending key.
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}: key `{key}` (line {line}): {reason}")]
    Invalid {
        path: PathBuf,
        key: String,
        line: usize,
        reason: String,
    },
    /// A `HAVEN_...` variable ([`crate::overrides`]) whose key or value is wrong.
    #[error("invalid config {path}: environment variable {var}: {reason}")]
    Env {
        path: PathBuf,
        var: String,
        reason: String,
    },
}

/// A node's configuration: what the node shares (identity, addresses, peers, Raft timing)
/// and the services it protects.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node: NodeSection,
    pub peers: Vec<PeerSection>,
    pub raft: RaftTiming,
    /// Who may change things through the admin port.
    pub admin: AdminSection,
    /// Absent: every port speaks plain TCP (the node warns at start).
    pub tls: Option<TlsSection>,
    /// One per protected app; never empty.
    pub services: Vec<ServiceConfig>,
    /// The alert rules that run (built-in ones included) and where they are delivered.
    pub alerts: Vec<AlertRule>,
    pub alert_delivery: AlertsSection,
    /// Learners added and removed by rule.
    pub scales: Vec<ScaleRule>,
}

/// One protected app: its replica, routes, limits and checkpoints.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Names the service; its data lives under `data_dir/<name>/`.
    pub name: String,
    pub app: AppSection,
    pub routes: Vec<RouteRule>,
    pub limits: Limits,
    /// Absent: no checkpoints, and the log is never compacted.
    pub checkpoints: Option<CheckpointSection>,
    /// The off-site archive; absent: the service's data stays on the cluster's disks. A
    /// standby's is its `[standby]` source unless written out.
    pub archive: Option<ArchiveSection>,
    /// Present: the service starts as a standby of another site's archive.
    pub standby: Option<StandbySection>,
    /// Scheduled drills of the service from its archive.
    pub drill: Option<DrillSection>,
    /// Tokens of the service's own (`[service.admin]`); none: the node's.
    pub admin_tokens: Option<PathBuf>,
    /// Which client requests are for this service.
    pub matcher: Matcher,
    /// Where its keys are in the file, for errors.
    written: Written,
}

/// Equal settings, wherever in the file they are written: a reload that only moves a
/// service's table leaves it running.
impl PartialEq for ServiceConfig {
    fn eq(&self, other: &Self) -> bool {
        let Self {
            name,
            app,
            routes,
            limits,
            checkpoints,
            archive,
            standby,
            drill,
            admin_tokens,
            matcher,
            written: _,
        } = self;
        (
            name,
            app,
            routes,
            limits,
            checkpoints,
            archive,
            standby,
            drill,
            admin_tokens,
            matcher,
        ) == (
            &other.name,
            &other.app,
            &other.routes,
            &other.limits,
            &other.checkpoints,
            &other.archive,
            &other.standby,
            &other.drill,
            &other.admin_tokens,
            &other.matcher,
        )
    }
}

/// Which client requests belong to a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// Every request: the single-service layout, where the node serves one app.
    Everything,
    /// Requests whose `Host` is `host`, or whose path starts with `path_prefix` (which is
    /// stripped before the app sees the request).
    By {
        host: Option<String>,
        path_prefix: Option<String>,
    },
}

/// `match = { host = "orders.example" }` or `match = { path_prefix = "/orders" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchSection {
    host: Option<String>,
    path_prefix: Option<String>,
}

/// Where a service's settings are in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// The single-service layout: `[app]`, `[[routes]]`, `[limits]`, `[checkpoints]` at the
    /// top of the file.
    AtTop,
    /// The `i`-th `[[service]]` table (0-based).
    InService(usize),
}

/// The file as written: the single-service layout or `[[service]]` tables, not both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    node: NodeSection,
    peers: Vec<PeerSection>,
    #[serde(default)]
    raft: RaftTiming,
    #[serde(default)]
    admin: AdminSection,
    tls: Option<TlsSection>,
    app: Option<AppSection>,
    #[serde(default)]
    routes: Vec<RouteRule>,
    limits: Option<Limits>,
    checkpoints: Option<CheckpointSection>,
    archive: Option<ArchiveSection>,
    standby: Option<StandbySection>,
    drill: Option<DrillSection>,
    #[serde(default)]
    service: Vec<ServiceSection>,
    alerts: Option<AlertsSection>,
    #[serde(default)]
    alert: Vec<AlertSection>,
    #[serde(default)]
    scale: Vec<ScaleSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    name: String,
    /// Default: `path_prefix = "/<name>"`.
    #[serde(rename = "match")]
    matcher: Option<MatchSection>,
    app: AppSection,
    #[serde(default)]
    routes: Vec<RouteRule>,
    #[serde(default)]
    limits: Limits,
    checkpoints: Option<CheckpointSection>,
    archive: Option<ArchiveSection>,
    standby: Option<StandbySection>,
    drill: Option<DrillSection>,
    admin: Option<ServiceAdminSection>,
}

/// The service name of a file in the single-service layout without `app.name`.
pub const DEFAULT_SERVICE_NAME: &str = "app";
/// Longest service name: it names a directory, a metric label and a URL path prefix.
pub const MAX_SERVICE_NAME: usize = 32;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub id: NodeId,
    /// Names the cluster: a node refuses raft connections from another cluster's nodes
    /// (default `haven`). Every node of a cluster must use the same name.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Failure-domain label; reported in status, used for placement checks later.
    #[serde(default = "default_zone")]
    pub zone: String,
    /// The site (building, region) the node is in (default empty). Two sites of one
    /// service must differ in `site` or `cluster`: the archive's epochs name both.
    #[serde(default)]
    pub site: String,
    pub client_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub data_dir: PathBuf,
    /// True for a node that joins a running cluster (a new member, or a fresh replacement
    /// for a dead one): it never proposes the initial membership and waits for the leader
    /// to add it (default false).
    #[serde(default)]
    pub join: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSection {
    /// Base URL of this node's replica, e.g. `http://127.0.0.1:6001`.
    pub url: String,
    /// Single-service layout only: names the service (default `app`); its data lives
    /// under `data_dir/<name>/`. In a `[[service]]` table the name is `service.name`.
    pub name: Option<String>,
    /// How long one delivery to the replica may take before it is retried (default 5000).
    #[serde(default = "default_app_timeout_ms")]
    pub timeout_ms: u64,
    /// Managed mode: argv that starts the replica; `{data_dir}` in any argument or
    /// environment value becomes `data_dir`. Haven starts, supervises and stops it.
    pub command: Option<Vec<String>>,
    /// The managed replica's data directory (required with `command`).
    pub data_dir: Option<PathBuf>,
    /// Extra environment for the managed replica.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// How long a (re)started managed replica has to answer HTTP (default 10000).
    #[serde(default = "default_app_start_timeout_ms")]
    pub start_timeout_ms: u64,
    /// The app recognises an entry delivered again by its `Haven-Index` and does not
    /// apply it twice (as the log app does). Otherwise (default false), after a crash a
    /// replica that may have applied entries without their answers being recorded is
    /// rebuilt from its newest checkpoint instead of being sent them again.
    #[serde(default)]
    pub honours_haven_index: bool,
    /// Response headers left out of the digest replicas compare their answers by, because
    /// they differ between replicas of a deterministic app (default `["date"]`; matched
    /// without regard to case; framing headers are always left out).
    #[serde(default = "default_volatile_headers")]
    pub volatile_headers: Vec<String>,
    /// Compare the replicas' answers and report the first entry they answered
    /// differently (default true).
    #[serde(default = "default_true")]
    pub check_divergence: bool,
}

/// How the replica's state is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMode {
    /// The app's own snapshot and restore endpoints.
    Hooks,
    /// A copy of the managed app's data directory, taken while deliveries are paused.
    Managed,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub mode: CheckpointMode,
    /// Checkpoint after this many applied entries (default 10000; 0: no entry trigger).
    #[serde(default = "default_every_entries")]
    pub every_entries: u64,
    /// Checkpoint after this many seconds with new entries (default 300; 0: no timer).
    #[serde(default = "default_every_seconds")]
    pub every_seconds: u64,
    /// Checkpoints kept, newest first (default 64); the log is kept back to the oldest.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Also delete checkpoints older than this many seconds (default: no age limit).
    pub keep_seconds: Option<u64>,
    /// Hooks mode: the app's endpoints.
    #[serde(default = "default_snapshot_path")]
    pub snapshot_path: String,
    #[serde(default = "default_restore_path")]
    pub restore_path: String,
}

/// The largest retention a node accepts; each checkpoint is one file and one log range.
pub const MAX_KEEP: usize = 100_000;

/// `[archive]` (or `[service.archive]`): where the service's log and checkpoints go off
/// site, and how.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSection {
    /// `s3://bucket/prefix` or `file:///path`.
    pub url: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:8333`); AWS's own when absent.
    /// Credentials and region come from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`.
    pub endpoint: Option<String>,
    /// The encryption key (`haven archive keygen > FILE`); required unless `encrypt = false`.
    pub key_file: Option<PathBuf>,
    /// Encrypt every object (default true). `false` must be written out and is shown in
    /// status: there is no silent plaintext.
    #[serde(default = "default_true")]
    pub encrypt: bool,
    /// How often the leader ships what was committed since the last shipment (default
    /// 200): the recovery point under steady load.
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
    /// Archived checkpoints kept, newest first (default 8); the archived log is kept back
    /// to the oldest.
    #[serde(default = "default_archive_keep")]
    pub keep: usize,
    /// Also delete archived checkpoints older than this many days (the newest is kept).
    pub keep_days: Option<u64>,
    /// Entries the archive may fall behind before the node raises an alarm (default
    /// 1,000,000); writes go on, and the leader keeps its log until they are shipped.
    #[serde(default = "default_max_backlog_entries")]
    pub max_backlog_entries: u64,
    /// When a write is acknowledged: once a quorum holds it (default), or also the
    /// archive (`"quorum+archive"`: nothing acknowledged is lost with the site).
    #[serde(default)]
    pub ack: AckMode,
    /// Refuse writes (503 `fenced`) while this leader has not managed an upload for this
    /// many seconds (off by default): a site cut off from the archive stops acknowledging
    /// what a standby promoted meanwhile would never have. Writes resume with the next
    /// upload, unless that upload finds the site fenced.
    pub fence_after_s: Option<u64>,
}

/// What a write waits for before it is acknowledged (docs/SITES.md says what each
/// promises when a whole site is lost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum AckMode {
    /// A quorum of the site's nodes: the recovery point of a site loss is the archive's lag.
    #[default]
    #[serde(rename = "quorum")]
    Quorum,
    /// A quorum and the archive, confirmed unfenced after the upload: a site loss loses no
    /// acknowledged write, at the cost of an upload round trip per batch of writes.
    #[serde(rename = "quorum+archive")]
    QuorumArchive,
}

impl ArchiveSection {
    pub fn flush(&self) -> Duration {
        Duration::from_millis(self.flush_ms)
    }

    /// A standby's archive when only `[standby]` is written: where it reads, with the
    /// defaults for writing there after a promotion.
    fn of_standby(standby: &StandbySection) -> Self {
        Self {
            url: standby.from.clone(),
            endpoint: standby.endpoint.clone(),
            key_file: standby.key_file.clone(),
            encrypt: standby.encrypt,
            flush_ms: default_flush_ms(),
            keep: default_archive_keep(),
            keep_days: None,
            max_backlog_entries: default_max_backlog_entries(),
            ack: AckMode::Quorum,
            fence_after_s: None,
        }
    }
}

/// `[standby]` (or `[service.standby]`): the service starts as a standby of another
/// site's archive, applying what the primary archives, until it is promoted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbySection {
    /// The primary's archive (`s3://bucket/prefix` or `file:///path`); after a promotion
    /// the service writes the next epoch there.
    pub from: String,
    /// As `archive.endpoint`.
    pub endpoint: Option<String>,
    /// As `archive.key_file`: the primary's key.
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_true")]
    pub encrypt: bool,
    /// How often the standby looks for newly archived entries (default 200).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

impl StandbySection {
    pub fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }
}

/// `[admin]`: who may change things through the admin port. Without `token_file` the
/// port is open (as before tokens existed; the node warns at start).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// One token per line, `NAME TOKEN` (NAME names the holder in the audit trail; TOKEN
    /// at least 16 characters); `#` starts a comment. Changes need
    /// `Authorization: Bearer TOKEN`.
    pub token_file: Option<PathBuf>,
    /// `/status`, `/services`, `/metrics` and `/workers` without a token (default true);
    /// `/health` and `/ready` are always open.
    #[serde(default = "default_true")]
    pub public_reads: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            token_file: None,
            public_reads: true,
        }
    }
}

/// `[tls]`: once written, the raft port speaks mutual TLS only: a peer must present a
/// certificate the CA signed, and a plaintext peer is refused. The client and admin ports
/// take TLS too when asked (server certificate only: clients are not asked for one).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate(s) of the cluster's CA: the only issuer peers are trusted from.
    pub ca: PathBuf,
    /// PEM certificate chain of this node, valid for both server and client use, naming
    /// the host of its `raft_addr` (and of `client_addr`/`admin_addr` when they use TLS).
    pub cert: PathBuf,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// TLS on the client port too (default false).
    #[serde(default)]
    pub client: bool,
    /// TLS on the admin port too (default false); the CLI then needs `https://` and
    /// `HAVEN_CA_FILE`.
    #[serde(default)]
    pub admin: bool,
}

/// `[service.admin]`: tokens of one service's own; the node's `[admin]` tokens do not
/// change it then.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceAdminSection {
    token_file: PathBuf,
}

/// `[drill]` (or `[service.drill]`): drill the service from its archive on a schedule
/// (one node of the cluster runs it), with the checks `haven drill` takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSection {
    /// How often: `"30m"`, `"24h"`, `"7d"`; the first drill runs one interval after start.
    pub every: String,
    /// HTTP checks, as `--check-http`: `"GET /health 200"`.
    #[serde(default)]
    pub check_http: Vec<String>,
    /// Commands that pass with exit 0, as `--check-cmd`.
    #[serde(default)]
    pub check_cmd: Vec<String>,
}

impl DrillSection {
    pub fn interval(&self) -> Result<Duration, crate::checks::BadInterval> {
        crate::checks::parse_interval(&self.every)
    }

    /// The HTTP checks, as validated with the config.
    pub fn http_checks(&self) -> Vec<crate::checks::HttpCheck> {
        (self.check_http.iter())
            .filter_map(|c| crate::checks::HttpCheck::parse(c).ok())
            .collect()
    }
}

/// Drills start a copy of the app and restore the archive: not more often than this.
pub const MIN_DRILL_INTERVAL: Duration = Duration::from_secs(10);

/// Shortest and longest interval between a standby's looks at the archive.
pub const STANDBY_POLL_MS: std::ops::RangeInclusive<u64> = 10..=60_000;

/// Long enough to ride out a store's hiccup (uploads are retried every second), short
/// enough to matter before an operator promotes a standby.
const ARCHIVE_FENCE_AFTER_S: std::ops::RangeInclusive<u64> = 2..=3600;
/// Shortest and longest shipping interval a node accepts.
pub const ARCHIVE_FLUSH_MS: std::ops::RangeInclusive<u64> = 10..=60_000;
/// Smallest backlog alarm: below it, ordinary bursts would raise it.
pub const MIN_ARCHIVE_BACKLOG: u64 = 1_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub id: NodeId,
    /// `host:port`, the host an IP address or a DNS name resolved at every dial.
    pub raft_addr: String,
    pub client_addr: String,
    /// The peer's `[node] zone` and `site`, for the survivability report in status
    /// (optional; a voter without them makes that part of the report unknown).
    pub zone: Option<String>,
    pub site: Option<String>,
}

/// How a matching request is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteMode {
    /// Ordered through the log and applied on every replica.
    Write,
    /// Leader confirms it is still leader (read index), the local replica catches up to that
    /// index, then serves the read.
    Linearizable,
    /// Ordered through the log like a write; the local replica answers at its turn.
    Ordered,
    /// Served by the local replica at once; may be stale.
    Local,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Upper-case HTTP methods; empty means any method.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    pub mode: RouteMode,
}

/// The longest a request over its service's quota may be kept waiting for its turn.
pub const MAX_RATE_WAIT_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body; larger gets 413 (default 1 MiB).
    pub max_body_bytes: usize,
    /// End-to-end budget for one client request, including waiting for apply (default 10000).
    pub request_timeout_ms: u64,
    /// How long a request waits for a leader before 503 + Retry-After (default 3000).
    pub no_leader_timeout_ms: u64,
    /// Client requests in progress on this node; beyond it, 503 + Retry-After (default 4096).
    pub max_inflight_requests: usize,
    /// Idempotency keys remembered in the replicated state (default 100000).
    pub idempotency_keys_max: usize,
    /// Idempotency keys older than this (by entry time) are forgotten (default 86400).
    pub idempotency_retention_s: u64,
    /// Requests per second this node takes for the service (a token bucket); beyond it,
    /// 429 + Retry-After. Absent: no quota.
    pub rate_per_s: Option<u64>,
    /// Requests the bucket holds, taken at once after a quiet spell (default: one
    /// second's worth, `rate_per_s`).
    pub rate_burst: Option<u64>,
    /// How long a request over the quota may wait for its turn instead of a 429 (0, the
    /// default: none waits). Waiting requests are let in one token at a time, so a
    /// tenant's burst reaches the node evenly spaced; beyond this wait, 429 as before.
    pub rate_wait_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout_ms: 10_000,
            no_leader_timeout_ms: 3_000,
            max_inflight_requests: 4096,
            idempotency_keys_max: 100_000,
            idempotency_retention_s: 86_400,
            rate_per_s: None,
            rate_burst: None,
            rate_wait_ms: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTiming {
    /// Leader heartbeat period (default 50).
    pub heartbeat_ms: u64,
    /// Election timeout range; a follower that hears no leader for this long campaigns
    /// (defaults 250..400). openraft also uses the maximum as the leader lease: a follower
    /// that heard from the leader within it refuses to vote, so write unavailability after
    /// a leader crash is about lease + timeout (0.5 to 0.8 s). Both are kept short for that;
    /// heartbeats travel on their own connection, so load on the
    /// replication stream does not delay them.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Most entries sent in one append request (default 512).
    pub max_payload_entries: u64,
    /// How the leader confirms it still leads before answering a read index (default
    /// `lease`).
    pub reads: ReadConfirmation,
}

/// How a leader proves, for a linearizable read, that no other leader can have committed
/// anything it has not seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadConfirmation {
    /// A quorum acknowledged one of this leader's messages within the last
    /// `election_timeout_max_ms`, timed from when the leader sent it. A follower refuses
    /// to vote for that long after hearing from its leader, so no new leader can exist yet.
    /// Sound while the nodes' clocks advance at nearly the same rate (no assumption about
    /// their wall-clock time); when no acknowledgement is that fresh, the leader sends a
    /// heartbeat round and waits for it. Saves a round trip to the followers per read batch.
    Lease,
    /// A heartbeat round to a quorum for every read batch: no clock assumption at all.
    Quorum,
}

impl Default for RaftTiming {
    fn default() -> Self {
        Self {
            heartbeat_ms: 50,
            election_timeout_min_ms: 250,
            election_timeout_max_ms: 400,
            max_payload_entries: 512,
            reads: ReadConfirmation::Lease,
        }
    }
}

fn default_cluster() -> String {
    "haven".to_string()
}
fn default_zone() -> String {
    "default".to_string()
}
fn default_app_timeout_ms() -> u64 {
    5_000
}
fn default_app_start_timeout_ms() -> u64 {
    10_000
}
fn default_volatile_headers() -> Vec<String> {
    vec!["date".to_string()]
}
fn default_every_entries() -> u64 {
    10_000
}
fn default_every_seconds() -> u64 {
    300
}
fn default_keep() -> usize {
    64
}
fn default_true() -> bool {
    true
}
fn default_flush_ms() -> u64 {
    200
}
/// How often a standby looks at the archive unless `standby.poll_ms` says otherwise.
pub const DEFAULT_STANDBY_POLL_MS: u64 = 200;

fn default_poll_ms() -> u64 {
    DEFAULT_STANDBY_POLL_MS
}
fn default_archive_keep() -> usize {
    8
}
fn default_max_backlog_entries() -> u64 {
    1_000_000
}
fn default_snapshot_path() -> String {
    haven_contract::paths::SNAPSHOT.to_string()
}
fn default_restore_path() -> String {
    haven_contract::paths::RESTORE.to_string()
}
fn default_path_prefix() -> String {
    "/".to_string()
}

impl Config {
    /// The file, with the keys the process's `HAVEN_...` variables override.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_with(&text, path, &Override::from_env())
    }

    /// [`Config::parse`] with `overrides` applied. An error the file has by itself is
    /// reported with its line; one an override brings names the variable.
    pub fn parse_with(
        text: &str,
        path: &Path,
        overrides: &[Override],
    ) -> Result<Config, ConfigError> {
        if overrides.is_empty() {
            return Self::parse(text, path);
        }
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let env_error = |var: &str, reason: String| ConfigError::Env {
            path: path.to_path_buf(),
            var: var.to_string(),
            reason,
        };
        let mut merged = table.clone();
        for o in overrides {
            o.apply(&mut merged)
                .map_err(|reason| env_error(&o.var, reason))?;
        }
        let error = match Self::from_table(merged) {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        if Self::from_table(table.clone()).err().as_ref() == Some(&error) {
            return Self::parse(text, path);
        }
        // The variable without which the error is not the same.
        let blamed = (0..overrides.len()).find(|skip| {
            let mut without = table.clone();
            let rest = (overrides.iter().enumerate()).filter(|(i, _)| i != skip);
            rest.for_each(|(_, o)| drop(o.apply(&mut without)));
            Self::from_table(without).err().as_ref() != Some(&error)
        });
        let vars = match blamed {
            Some(i) => overrides[i].var.clone(),
            None => (overrides.iter().map(|o| o.var.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
        };
        Err(env_error(&vars, error))
    }

    /// A merged table, checked like a file; the error as one line without a file line,
    /// since the key may come from the environment.
    fn from_table(table: toml::Table) -> Result<Config, String> {
        let file: ConfigFile = table.try_into().map_err(|e: toml::de::Error| {
            e.to_string()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })?;
        let config = Config::from_file(file).map_err(|bad| bad.describe())?;
        config.validate().map_err(|bad| bad.describe())?;
        Ok(config)
    }

    /// Parses and validates; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |bad: BadKey| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: locate(text, &bad),
            key: bad.qualified_key(),
            reason: bad.reason,
        };
        let config = Config::from_file(file).map_err(invalid)?;
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    fn from_file(file: ConfigFile) -> Result<Config, BadKey> {
        let at_top = file.app.is_some()
            || !file.routes.is_empty()
            || file.limits.is_some()
            || file.checkpoints.is_some()
            || file.archive.is_some()
            || file.standby.is_some()
            || file.drill.is_some();
        let services = match (at_top, file.service.is_empty()) {
            (true, false) => {
                let reason = "the single-service layout ([app], [[routes]], [limits], [checkpoints] at the top) and [[service]] tables cannot be mixed: move them into a [[service]]";
                return Err(BadKey {
                    service: Some(0),
                    ..BadKey::top("service", 0, "name", reason)
                });
            }
            (_, true) => {
                let Some(app) = file.app else {
                    let reason = "no service: write an [app] table, or [[service]] tables";
                    return Err(BadKey::top("node", 0, "id", reason));
                };
                vec![ServiceConfig {
                    name: app
                        .name
                        .clone()
                        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string()),
                    app,
                    routes: file.routes,
                    limits: file.limits.unwrap_or_default(),
                    checkpoints: file.checkpoints,
                    archive: archive_of(file.archive, &file.standby),
                    standby: file.standby,
                    drill: file.drill,
                    admin_tokens: None,
                    matcher: Matcher::Everything,
                    written: Written::AtTop,
                }]
            }
            (false, false) => file
                .service
                .into_iter()
                .enumerate()
                .map(|(i, s)| ServiceConfig {
                    matcher: match s.matcher {
                        Some(m) => Matcher::By {
                            host: m.host,
                            path_prefix: m.path_prefix,
                        },
                        None => Matcher::By {
                            host: None,
                            path_prefix: Some(format!("/{}", s.name)),
                        },
                    },
                    name: s.name,
                    app: s.app,
                    routes: s.routes,
                    limits: s.limits,
                    checkpoints: s.checkpoints,
                    archive: archive_of(s.archive, &s.standby),
                    standby: s.standby,
                    drill: s.drill,
                    admin_tokens: s.admin.map(|a| a.token_file),
                    written: Written::InService(i),
                })
                .collect(),
        };
        let facts: Vec<ServiceFacts> = (services.iter()).map(ServiceConfig::facts).collect();
        let delivery = file.alerts.unwrap_or_default();
        let alerts = rules::resolve_alerts(&file.alert, &delivery, builtin_alerts(&facts));
        let names: Vec<String> = services.iter().map(|s| s.name.clone()).collect();
        let scales = rules::resolve_scales(&file.scale, &names);
        let rule_key = |bad: BadRule| BadKey::top(bad.table, bad.occurrence, bad.key, &bad.reason);
        Ok(Config {
            node: file.node,
            peers: file.peers,
            raft: file.raft,
            admin: file.admin,
            tls: file.tls,
            services,
            alerts: alerts.map_err(rule_key)?,
            alert_delivery: delivery,
            scales: scales.map_err(rule_key)?,
        })
    }

    fn validate(&self) -> Result<(), BadKey> {
        self.validate_peers()?;
        self.validate_raft()?;
        if !self.node.cluster.chars().all(name_char) || self.node.cluster.is_empty() {
            let reason = "must be non-empty [a-z0-9-]";
            return Err(BadKey::top("node", 0, "cluster", reason));
        }
        let mut names = BTreeSet::new();
        let mut hosts = BTreeSet::new();
        let mut prefixes = BTreeSet::new();
        for service in &self.services {
            service.validate()?;
            if !names.insert(service.name.as_str()) {
                return Err(service.bad("", 0, "name", "another service has this name"));
            }
            let Matcher::By { host, path_prefix } = &service.matcher else {
                continue;
            };
            if host.as_ref().is_some_and(|h| !hosts.insert(h.as_str())) {
                return Err(service.bad("", 0, "match", "another service matches this host"));
            }
            if path_prefix
                .as_ref()
                .is_some_and(|p| !prefixes.insert(p.as_str()))
            {
                let reason = "another service matches this path_prefix";
                return Err(service.bad("", 0, "match", reason));
            }
        }
        Ok(())
    }

    fn validate_peers(&self) -> Result<(), BadKey> {
        let mut seen = BTreeSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            if !seen.insert(peer.id) {
                return Err(BadKey::top("peers", i, "id", "duplicate peer id"));
            }
            for (key, addr) in [
                ("raft_addr", &peer.raft_addr),
                ("client_addr", &peer.client_addr),
            ] {
                haven_contract::check_peer_addr(addr)
                    .map_err(|reason| BadKey::top("peers", i, key, &reason))?;
            }
        }
        let Some(me) = self.peers.iter().find(|p| p.id == self.node.id) else {
            return Err(BadKey::top(
                "node",
                0,
                "id",
                "this node's id must be listed in [[peers]]",
            ));
        };
        if !names_listen_addr(&me.raft_addr, self.node.raft_addr) {
            return Err(BadKey::top(
                "node",
                0,
                "raft_addr",
                "differs from this node's [[peers]] entry",
            ));
        }
        let labels = [
            ("zone", &me.zone, &self.node.zone),
            ("site", &me.site, &self.node.site),
        ];
        if let Some((key, _, _)) =
            (labels.iter()).find(|(_, peer, node)| peer.as_ref().is_some_and(|p| p != *node))
        {
            let occurrence = self
                .peers
                .iter()
                .position(|p| p.id == self.node.id)
                .unwrap_or(0);
            let reason = format!("differs from this node's [node] {key}");
            return Err(BadKey::top("peers", occurrence, key, &reason));
        }
        Ok(())
    }

    fn validate_raft(&self) -> Result<(), BadKey> {
        let r = &self.raft;
        if r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            let reason = "must exceed twice raft.heartbeat_ms so a healthy leader is not deposed";
            return Err(BadKey::top("raft", 0, "election_timeout_min_ms", reason));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            let reason = "must exceed raft.election_timeout_min_ms";
            return Err(BadKey::top("raft", 0, "election_timeout_max_ms", reason));
        }
        Ok(())
    }

    /// Every voter as openraft membership wants it.
    pub fn voters(&self) -> std::collections::BTreeMap<NodeId, PeerNode> {
        self.peers
            .iter()
            .map(|p| {
                let node = PeerNode {
                    raft_addr: p.raft_addr.clone(),
                    client_addr: p.client_addr.clone(),
                };
                (p.id, node)
            })
            .collect()
    }

    /// The node's first service: its only one in the single-service layout.
    pub fn service(&self) -> &ServiceConfig {
        &self.services[0]
    }

    /// Where a service's state lives: `data_dir/<service>/`.
    pub fn service_dir(&self, service: &ServiceConfig) -> PathBuf {
        self.node.data_dir.join(&service.name)
    }
}

impl ServiceConfig {
    /// A problem with key `key` of this service's `section` (`app`, `routes`, ...; empty
    /// for the `[[service]]` table itself), in its `occurrence`-th table of that name.
    fn bad(&self, section: &str, occurrence: usize, key: &str, reason: &str) -> BadKey {
        let (table, service) = match self.written {
            Written::AtTop => (section.to_string(), None),
            Written::InService(i) if section.is_empty() => ("service".to_string(), Some(i)),
            Written::InService(i) => (format!("service.{section}"), Some(i)),
        };
        BadKey {
            table,
            service,
            occurrence,
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    fn validate(&self) -> Result<(), BadKey> {
        self.validate_name()?;
        self.validate_matcher()?;
        self.validate_app()?;
        self.validate_routes()?;
        self.validate_limits()?;
        self.validate_managed_app()?;
        self.validate_checkpoints()?;
        self.validate_archive()?;
        self.validate_standby()?;
        self.validate_drill()
    }

    fn validate_drill(&self) -> Result<(), BadKey> {
        let Some(drill) = &self.drill else {
            return Ok(());
        };
        if self.archive.is_none() {
            let reason = "a drill restores the service from its off-site archive: write [archive] (or [standby]) too";
            return Err(self.bad("drill", 0, "every", reason));
        }
        match drill.interval() {
            Err(e) => return Err(self.bad("drill", 0, "every", &e.to_string())),
            Ok(every) if every < MIN_DRILL_INTERVAL => {
                let reason = format!("must be at least {}s", MIN_DRILL_INTERVAL.as_secs());
                return Err(self.bad("drill", 0, "every", &reason));
            }
            Ok(_) => {}
        }
        if let Some(Err(e)) = (drill.check_http.iter())
            .map(|c| crate::checks::HttpCheck::parse(c))
            .find(Result::is_err)
        {
            return Err(self.bad("drill", 0, "check_http", &e.to_string()));
        }
        Ok(())
    }

    fn validate_standby(&self) -> Result<(), BadKey> {
        let Some(standby) = &self.standby else {
            return Ok(());
        };
        let bad = |key, reason: &str| Err(self.bad("standby", 0, key, reason));
        if self.archive.as_ref().is_some_and(|a| a.url != standby.from) {
            return bad(
                "from",
                "must name the archive of archive.url: a promoted standby writes where it read",
            );
        }
        if self.checkpoints.is_none() {
            return bad(
                "from",
                "a standby needs [checkpoints]: it starts from the archive's newest checkpoint and takes one when promoted",
            );
        }
        if !STANDBY_POLL_MS.contains(&standby.poll_ms) {
            let reason = format!(
                "must be between {} and {}",
                STANDBY_POLL_MS.start(),
                STANDBY_POLL_MS.end()
            );
            return bad("poll_ms", &reason);
        }
        Ok(())
    }

    fn validate_name(&self) -> Result<(), BadKey> {
        match self.written {
            // Kept as it was before services, so existing data directories stay valid.
            Written::AtTop => {
                let name_ok = !self.name.is_empty()
                    && self
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                if !name_ok {
                    return Err(self.bad("app", 0, "name", "must be non-empty [A-Za-z0-9_-]"));
                }
            }
            Written::InService(_) => {
                let name_ok = (1..=MAX_SERVICE_NAME).contains(&self.name.len())
                    && self.name.chars().all(name_char);
                if !name_ok {
                    let reason = format!("must be 1 to {MAX_SERVICE_NAME} of [a-z0-9-]");
                    return Err(self.bad("", 0, "name", &reason));
                }
                if self.app.name.is_some() {
                    let reason = "a service is named by its `name`, not by app.name";
                    return Err(self.bad("app", 0, "name", reason));
                }
            }
        }
        Ok(())
    }

    fn validate_matcher(&self) -> Result<(), BadKey> {
        let Matcher::By { host, path_prefix } = &self.matcher else {
            return Ok(());
        };
        let bad = |reason: &str| Err(self.bad("", 0, "match", reason));
        match (host, path_prefix) {
            (None, None) => bad("needs host or path_prefix"),
            (Some(h), _)
                if h.is_empty() || h.contains(['/', ' ', ':']) || h.to_ascii_lowercase() != *h =>
            {
                bad("host must be a lower-case host name without port")
            }
            (_, Some(p)) if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') => bad(
                "path_prefix must start with / and name at least one segment, without a trailing /",
            ),
            _ => Ok(()),
        }
    }

    fn validate_app(&self) -> Result<(), BadKey> {
        if !self.app.url.starts_with("http://") {
            return Err(self.bad("app", 0, "url", "must start with http://"));
        }
        if self.app.timeout_ms == 0 {
            return Err(self.bad("app", 0, "timeout_ms", "must be greater than 0"));
        }
        if let Some(bad) = (self.app.volatile_headers.iter())
            .find(|h| http::HeaderName::from_bytes(h.as_bytes()).is_err())
        {
            let reason = format!("{bad:?} is not a header name");
            return Err(self.bad("app", 0, "volatile_headers", &reason));
        }
        Ok(())
    }

    fn validate_managed_app(&self) -> Result<(), BadKey> {
        let app = &self.app;
        match (&app.command, &app.data_dir) {
            (Some(argv), _) if argv.is_empty() => {
                Err(self.bad("app", 0, "command", "must name a program"))
            }
            (Some(_), None) => Err(self.bad(
                "app",
                0,
                "command",
                "needs app.data_dir (the managed app's directory)",
            )),
            (None, Some(_)) => Err(self.bad(
                "app",
                0,
                "data_dir",
                "only means something with app.command",
            )),
            _ => Ok(()),
        }
    }

    fn validate_checkpoints(&self) -> Result<(), BadKey> {
        let Some(c) = &self.checkpoints else {
            return Ok(());
        };
        let bad = |key, reason: &str| Err(self.bad("checkpoints", 0, key, reason));
        if c.mode == CheckpointMode::Managed && self.app.command.is_none() {
            return bad("mode", "managed needs app.command and app.data_dir");
        }
        if c.every_entries == 0 && c.every_seconds == 0 {
            return bad("every_entries", "and every_seconds cannot both be 0");
        }
        if c.keep == 0 || c.keep > MAX_KEEP {
            return bad("keep", &format!("must be between 1 and {MAX_KEEP}"));
        }
        for (key, path) in [
            ("snapshot_path", &c.snapshot_path),
            ("restore_path", &c.restore_path),
        ] {
            if !path.starts_with('/') {
                return bad(key, "must start with /");
            }
        }
        Ok(())
    }

    fn validate_archive(&self) -> Result<(), BadKey> {
        let Some(a) = &self.archive else {
            return Ok(());
        };
        // Written only as `[standby]`: errors name the keys the operator wrote.
        let derived = self.standby.as_ref().map(ArchiveSection::of_standby) == Some(a.clone());
        let (table, url_key) = if derived {
            ("standby", "from")
        } else {
            ("archive", "url")
        };
        let bad = |key, reason: &str| Err(self.bad(table, 0, key, reason));
        let file_ok = a
            .url
            .strip_prefix("file://")
            .is_some_and(|p| p.len() > 1 && p.starts_with('/'));
        let s3_ok = a
            .url
            .strip_prefix("s3://")
            .is_some_and(|b| !b.is_empty() && !b.starts_with('/'));
        if !file_ok && !s3_ok {
            return bad(
                url_key,
                "must be s3://bucket/prefix or file:///absolute/path",
            );
        }
        if a.endpoint
            .as_ref()
            .is_some_and(|e| !e.starts_with("http://") && !e.starts_with("https://"))
        {
            return bad("endpoint", "must start with http:// or https://");
        }
        match (a.encrypt, &a.key_file) {
            (true, None) => {
                return bad(
                    "key_file",
                    "is required: the archive is encrypted (create a key with `haven archive keygen > FILE`, or write encrypt = false to store plaintext)",
                );
            }
            (false, Some(_)) => return bad("key_file", "means nothing with encrypt = false"),
            _ => {}
        }
        if !ARCHIVE_FLUSH_MS.contains(&a.flush_ms) {
            let reason = format!(
                "must be between {} and {}",
                ARCHIVE_FLUSH_MS.start(),
                ARCHIVE_FLUSH_MS.end()
            );
            return bad("flush_ms", &reason);
        }
        if a.keep == 0 || a.keep > MAX_KEEP {
            return bad("keep", &format!("must be between 1 and {MAX_KEEP}"));
        }
        if a.keep_days == Some(0) {
            return bad("keep_days", "must be at least 1");
        }
        if let Some(s) = a.fence_after_s
            && !ARCHIVE_FENCE_AFTER_S.contains(&s)
        {
            let (low, high) = (ARCHIVE_FENCE_AFTER_S.start(), ARCHIVE_FENCE_AFTER_S.end());
            return bad(
                "fence_after_s",
                &format!("must be between {low} and {high}"),
            );
        }
        if a.max_backlog_entries < MIN_ARCHIVE_BACKLOG {
            return bad(
                "max_backlog_entries",
                &format!("must be at least {MIN_ARCHIVE_BACKLOG}"),
            );
        }
        Ok(())
    }

    fn validate_routes(&self) -> Result<(), BadKey> {
        for (i, route) in self.routes.iter().enumerate() {
            if !route.path_prefix.starts_with('/') {
                return Err(self.bad("routes", i, "path_prefix", "must start with /"));
            }
            if let Some(m) = route
                .methods
                .iter()
                .find(|m| http::Method::from_bytes(m.as_bytes()).is_err())
            {
                let reason = format!("`{m}` is not an HTTP method");
                return Err(self.bad("routes", i, "methods", &reason));
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), BadKey> {
        let l = &self.limits;
        let bad = |key, reason: &str| Err(self.bad("limits", 0, key, reason));
        if l.max_body_bytes == 0 || l.max_body_bytes > MAX_BODY_BYTES_CEILING {
            return bad(
                "max_body_bytes",
                &format!("must be between 1 and {MAX_BODY_BYTES_CEILING}"),
            );
        }
        if l.request_timeout_ms == 0 {
            return bad("request_timeout_ms", "must be greater than 0");
        }
        if l.max_inflight_requests == 0 {
            return bad("max_inflight_requests", "must be greater than 0");
        }
        if l.rate_per_s == Some(0) {
            return bad(
                "rate_per_s",
                "must be greater than 0 (leave it out for no quota)",
            );
        }
        if l.rate_burst == Some(0) {
            return bad("rate_burst", "must be greater than 0");
        }
        if l.rate_burst.is_some() && l.rate_per_s.is_none() {
            return bad("rate_burst", "needs rate_per_s");
        }
        if l.rate_wait_ms > 0 && l.rate_per_s.is_none() {
            return bad("rate_wait_ms", "needs rate_per_s");
        }
        if l.rate_wait_ms > MAX_RATE_WAIT_MS {
            return bad(
                "rate_wait_ms",
                &format!(
                    "must be at most {MAX_RATE_WAIT_MS} (a waiting request holds an in-flight slot)"
                ),
            );
        }
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.request_timeout_ms)
    }

    pub fn no_leader_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.no_leader_timeout_ms)
    }

    pub fn app_timeout(&self) -> Duration {
        Duration::from_millis(self.app.timeout_ms)
    }

    /// The settings every replica of the service must share, in config terms: routes
    /// decide what is ordered, and the idempotency limits decide what every replica's
    /// table forgets. Peers compare them on every raft connection.
    pub fn shared_settings(&self) -> Vec<(String, String)> {
        let routes: Vec<String> = (self.routes.iter())
            .map(|r| format!("{} {} {:?}", r.methods.join(","), r.path_prefix, r.mode))
            .collect();
        let routes = match routes.is_empty() {
            true => "the defaults".to_string(),
            false => format!("[{}]", routes.join("; ")),
        };
        vec![
            ("routes".to_string(), routes),
            (
                "limits.idempotency_keys_max".to_string(),
                self.limits.idempotency_keys_max.to_string(),
            ),
            (
                "limits.idempotency_retention_s".to_string(),
                self.limits.idempotency_retention_s.to_string(),
            ),
            (
                "app.volatile_headers".to_string(),
                format!("{:?}", self.volatile_headers()),
            ),
        ]
    }

    /// What the built-in alerts need to know of the service.
    fn facts(&self) -> ServiceFacts {
        ServiceFacts {
            archive: self.archive.is_some() && self.standby.is_none(),
            drill_every: (self.drill.as_ref()).and_then(|d| d.interval().ok()),
        }
    }

    /// `app.volatile_headers` as compared: lower case, sorted, once each.
    pub fn volatile_headers(&self) -> Vec<String> {
        let names: BTreeSet<String> = (self.app.volatile_headers.iter())
            .map(|h| h.to_ascii_lowercase())
            .collect();
        names.into_iter().collect()
    }

    /// How entries the app may have applied before a crash are kept from being applied
    /// twice, as status reports it.
    pub fn exactly_once_after_crash(&self) -> &'static str {
        match (self.app.honours_haven_index, &self.checkpoints) {
            (true, _) => "the app recognises redelivered entries by Haven-Index",
            (false, Some(_)) => "the replica is rebuilt from its newest checkpoint",
            (false, None) => {
                "not assured: no checkpoints are configured and the app does not honour Haven-Index, so entries may reach it twice after a crash"
            }
        }
    }
}

/// Service and cluster names: they name directories, metric labels and URL paths.
fn name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// A validation failure before the line is known.
struct BadKey {
    /// The table's name as its header spells it (`app`, `service.app`, `routes`).
    table: String,
    /// Inside the `i`-th `[[service]]` table.
    service: Option<usize>,
    /// Which table of that name (arrays of tables), counted inside the service.
    occurrence: usize,
    key: String,
    reason: String,
}

impl BadKey {
    /// A key outside every `[[service]]` table.
    fn top(table: &str, occurrence: usize, key: &str, reason: &str) -> Self {
        Self {
            table: table.to_string(),
            service: None,
            occurrence,
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// The key and the reason, for a key that may not be in the file.
    fn describe(&self) -> String {
        format!("key `{}`: {}", self.qualified_key(), self.reason)
    }

    /// `app.url`, or `service[1].app.url` inside the second service.
    fn qualified_key(&self) -> String {
        match self.service {
            None => format!("{}.{}", self.table, self.key),
            Some(i) => {
                let within = self.table.strip_prefix("service").unwrap_or(&self.table);
                format!("service[{i}]{within}.{}", self.key)
            }
        }
    }
}

/// Finds the 1-based line of the key `bad` names: inside the `occurrence`-th header of its
/// table (counted inside its `[[service]]` table, if any); falls back to the header line,
/// then to line 1.
/// A standby's archive: as written, or where it reads.
fn archive_of(
    archive: Option<ArchiveSection>,
    standby: &Option<StandbySection>,
) -> Option<ArchiveSection> {
    archive.or_else(|| standby.as_ref().map(ArchiveSection::of_standby))
}

fn locate(text: &str, bad: &BadKey) -> usize {
    let mut service: Option<usize> = None;
    // Headers seen so far: outside every service, and inside the current one.
    let mut seen_at_top: std::collections::BTreeMap<String, usize> = Default::default();
    let mut seen_in_service: std::collections::BTreeMap<String, usize> = Default::default();
    let mut inside = false;
    let mut header_line = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') {
            let name = line.trim_matches(|c| c == '[' || c == ']').trim();
            if name == "service" && line.starts_with("[[") {
                service = Some(service.map_or(0, |s| s + 1));
                seen_in_service.clear();
            }
            let in_service = name == "service" || name.starts_with("service.");
            let (scope, seen) = if in_service {
                (service, &mut seen_in_service)
            } else {
                (None, &mut seen_at_top)
            };
            let count = seen.entry(name.to_string()).or_insert(0);
            inside = name == bad.table && scope == bad.service && *count == bad.occurrence;
            *count += 1;
            if inside {
                header_line = Some(n + 1);
            }
            continue;
        }
        let is_key = line
            .strip_prefix(bad.key.as_str())
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        if inside && is_key {
            return n + 1;
        }
    }
    header_line.unwrap_or(1)
}

/// Whether the address peers dial (`[[peers]]`) reaches the one this node listens on: the
/// same address; or, for a node listening on every interface or peers that dial it by
/// name (a Kubernetes pod), the same port.
fn names_listen_addr(peer_entry: &str, listen: SocketAddr) -> bool {
    match peer_entry.parse::<SocketAddr>() {
        Ok(addr) => {
            addr == listen || (listen.ip().is_unspecified() && addr.port() == listen.port())
        }
        Err(_) => peer_entry
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_some_and(|port| port == listen.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[node]
id = 1
zone = "a"
client_addr = "127.0.0.1:8001"
raft_addr = "127.0.0.1:9001"
admin_addr = "127.0.0.1:7001"
data_dir = "/tmp/haven/1"

[app]
url = "http://127.0.0.1:6001"

[[peers]]
id = 1
raft_addr = "127.0.0.1:9001"
client_addr = "127.0.0.1:8001"

[[peers]]
id = 2
raft_addr = "127.0.0.1:9002"
client_addr = "127.0.0.1:8002"

[[routes]]
methods = ["GET"]
path_prefix = "/"
mode = "linearizable"
"#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("n1.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn accepts_the_documented_shape() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.node.id, 1);
        assert_eq!(config.peers.len(), 2);
        let service = config.service();
        assert_eq!(service.name, DEFAULT_SERVICE_NAME);
        assert_eq!(service.routes[0].mode, RouteMode::Linearizable);
        assert_eq!(service.limits.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(
            config.service_dir(service),
            PathBuf::from("/tmp/haven/1/app")
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("zone = \"a\"", "zone = \"a\"\ncolour = \"red\"");
        let err = parse(&text).unwrap_err();
        assert!(err.contains("line 5"), "{err}");
        assert!(err.contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn an_archive_is_encrypted_unless_plaintext_is_written_out() {
        let with = |archive: &str| parse(&format!("{GOOD}\n[archive]\n{archive}"));
        let config = with("url = \"s3://bucket/orders\"\nkey_file = \"/k\"\n").unwrap();
        let archive = config.service().archive.clone().unwrap();
        assert!(archive.encrypt);
        assert_eq!((archive.flush_ms, archive.keep), (200, 8));
        assert_eq!(
            with("url = \"s3://bucket/orders\"\n").unwrap_err(),
            "invalid config n1.toml: key `archive.key_file` (line 28): is required: the archive is encrypted (create a key with `haven archive keygen > FILE`, or write encrypt = false to store plaintext)"
        );
        assert!(with("url = \"file:///a\"\nencrypt = false\n").is_ok());
        assert_eq!(
            with("url = \"ftp://x\"\nkey_file = \"/k\"\n").unwrap_err(),
            "invalid config n1.toml: key `archive.url` (line 29): must be s3://bucket/prefix or file:///absolute/path"
        );
        assert_eq!(
            (archive.ack, archive.fence_after_s),
            (AckMode::Quorum, None)
        );
        assert_eq!(
            with("url = \"file:///a\"\nencrypt = false\nfence_after_s = 1\n").unwrap_err(),
            "invalid config n1.toml: key `archive.fence_after_s` (line 31): must be between 2 and 3600"
        );
        let archived = with("url = \"file:///a\"\nencrypt = false\nack = \"quorum+archive\"\n");
        assert_eq!(
            archived.unwrap().service().archive.clone().unwrap().ack,
            AckMode::QuorumArchive
        );
        let err = with("url = \"file:///a\"\nencrypt = false\nack = \"archive\"\n").unwrap_err();
        assert!(err.contains("line 31"), "{err}");
        assert!(
            err.contains("unknown variant `archive`, expected `quorum` or `quorum+archive`"),
            "{err}"
        );
        assert_eq!(
            with("url = \"file:///a\"\nkey_file = \"/k\"\nflush_ms = 0\n").unwrap_err(),
            "invalid config n1.toml: key `archive.flush_ms` (line 31): must be between 10 and 60000"
        );
    }

    #[test]
    fn a_standby_reads_and_later_writes_one_archive() {
        let checkpoints = "[checkpoints]\nmode = \"hooks\"\n";
        let with = |tables: &str| parse(&format!("{GOOD}\n{tables}"));
        let standby = "[standby]\nfrom = \"s3://bucket/orders\"\nkey_file = \"/k\"\n";
        let config = with(&format!("{checkpoints}{standby}")).unwrap();
        let archive = config.service().archive.clone().unwrap();
        assert_eq!(
            (archive.url.as_str(), archive.flush_ms),
            ("s3://bucket/orders", 200)
        );
        assert_eq!(config.service().standby.as_ref().unwrap().poll_ms, 200);
        assert_eq!(
            with(standby).unwrap_err(),
            "invalid config n1.toml: key `standby.from` (line 29): a standby needs [checkpoints]: it starts from the archive's newest checkpoint and takes one when promoted"
        );
        assert_eq!(
            with(&format!(
                "{checkpoints}[standby]\nfrom = \"s3://bucket/orders\"\n"
            ))
            .unwrap_err(),
            "invalid config n1.toml: key `standby.key_file` (line 30): is required: the archive is encrypted (create a key with `haven archive keygen > FILE`, or write encrypt = false to store plaintext)"
        );
        let elsewhere = "[archive]\nurl = \"s3://bucket/other\"\nkey_file = \"/k\"\n";
        assert_eq!(
            with(&format!("{checkpoints}{standby}{elsewhere}")).unwrap_err(),
            "invalid config n1.toml: key `standby.from` (line 31): must name the archive of archive.url: a promoted standby writes where it read"
        );
    }

    #[test]
    fn a_drill_schedule_is_checked_with_its_key_and_line() {
        let archive = "[archive]\nurl = \"s3://bucket/orders\"\nkey_file = \"/k\"\n";
        let with = |tables: &str| parse(&format!("{GOOD}\n{tables}"));
        let drill = "[drill]\nevery = \"24h\"\ncheck_http = [\"GET /health 200\"]\n";
        let config = with(&format!("{archive}{drill}")).unwrap();
        let section = config.service().drill.clone().unwrap();
        assert_eq!(section.interval(), Ok(Duration::from_secs(86_400)));
        assert_eq!(section.http_checks()[0].path, "/health");
        assert_eq!(
            with(drill).unwrap_err(),
            "invalid config n1.toml: key `drill.every` (line 29): a drill restores the service from its off-site archive: write [archive] (or [standby]) too"
        );
        assert_eq!(
            with(&format!("{archive}[drill]\nevery = \"5s\"\n")).unwrap_err(),
            "invalid config n1.toml: key `drill.every` (line 32): must be at least 10s"
        );
        let bad_check =
            format!("{archive}[drill]\nevery = \"1h\"\ncheck_http = [\"GET health 200\"]\n");
        let e = with(&bad_check).unwrap_err();
        assert!(
            e.starts_with("invalid config n1.toml: key `drill.check_http` (line 33): check \"GET health 200\": the path must start with /"),
            "{e}"
        );
    }

    #[test]
    fn bad_value_type_is_named_with_its_line() {
        let text = GOOD.replace("id = 2", "id = \"two\"");
        let err = parse(&text).unwrap_err();
        assert!(err.contains("line 19"), "{err}");
    }

    #[test]
    fn bad_address_is_rejected() {
        let text = GOOD.replace("127.0.0.1:7001", "not-an-address");
        let err = parse(&text).unwrap_err();
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn peers_may_be_dns_names_and_a_bad_one_is_named_with_its_line() {
        // A StatefulSet's pod: listening on every interface, dialed by its stable name.
        let by_name = GOOD
            .replace(
                "raft_addr = \"127.0.0.1:9001\"\nadmin",
                "raft_addr = \"0.0.0.0:9001\"\nadmin",
            )
            .replace(
                "raft_addr = \"127.0.0.1:9001\"",
                "raft_addr = \"haven-0.haven:9001\"",
            )
            .replace(
                "raft_addr = \"127.0.0.1:9002\"",
                "raft_addr = \"haven-1.haven:9002\"",
            );
        let config = parse(&by_name).unwrap();
        assert_eq!(config.voters()[&2].raft_addr, "haven-1.haven:9002");
        assert_eq!(
            parse(&GOOD.replace(
                "raft_addr = \"127.0.0.1:9002\"",
                "raft_addr = \"haven-1.haven\""
            ))
            .unwrap_err(),
            "invalid config n1.toml: key `peers.raft_addr` (line 20): `haven-1.haven` is not host:port (no port)"
        );
        let wrong_port = by_name.replace("haven-0.haven:9001", "haven-0.haven:9009");
        assert_eq!(
            parse(&wrong_port).unwrap_err(),
            "invalid config n1.toml: key `node.raft_addr` (line 6): differs from this node's [[peers]] entry"
        );
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let text = GOOD.replace("id = 2", "id = 1");
        assert_eq!(
            parse(&text).unwrap_err(),
            "invalid config n1.toml: key `peers.id` (line 19): duplicate peer id"
        );
        let text = GOOD.replace("path_prefix = \"/\"", "path_prefix = \"x\"");
        assert_eq!(
            parse(&text).unwrap_err(),
            "invalid config n1.toml: key `routes.path_prefix` (line 25): must start with /"
        );
        let text = GOOD.replace("[app]\n", "[app]\nname = \"a b\"\n");
        assert_eq!(
            parse(&text).unwrap_err(),
            "invalid config n1.toml: key `app.name` (line 11): must be non-empty [A-Za-z0-9_-]"
        );
    }

    #[test]
    fn missing_self_in_peers_is_rejected() {
        let text = GOOD.replace("[node]\nid = 1", "[node]\nid = 7");
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err,
            "invalid config n1.toml: key `node.id` (line 3): this node's id must be listed in [[peers]]"
        );
    }

    const MANAGED: &str = r#"
command = ["haven", "logapp", "--listen", "127.0.0.1:6001", "--file", "{data_dir}/log.txt"]
data_dir = "/tmp/haven/1/app"
"#;

    #[test]
    fn checkpoints_take_the_documented_defaults() {
        let text = format!(
            "{}\n[checkpoints]\nmode = \"managed\"\n",
            GOOD.replace("[app]\n", &format!("[app]{MANAGED}"))
        );
        let config = parse(&text).unwrap();
        let service = config.service();
        let c = service.checkpoints.clone().unwrap();
        assert_eq!(c.mode, CheckpointMode::Managed);
        assert_eq!(
            (c.every_entries, c.every_seconds, c.keep),
            (10_000, 300, 64)
        );
        assert_eq!(c.keep_seconds, None);
        assert_eq!(
            service.app.data_dir,
            Some(PathBuf::from("/tmp/haven/1/app"))
        );
        assert!(parse(GOOD).unwrap().service().checkpoints.is_none());
    }

    #[test]
    fn checkpoint_settings_are_checked() {
        let hooks = |extra: &str| format!("{GOOD}\n[checkpoints]\nmode = \"hooks\"\n{extra}");
        assert_eq!(
            parse(&hooks("keep = 0\n")).unwrap_err(),
            format!(
                "invalid config n1.toml: key `checkpoints.keep` (line 30): must be between 1 and {MAX_KEEP}"
            )
        );
        assert_eq!(
            parse(&hooks("every_entries = 0\nevery_seconds = 0\n")).unwrap_err(),
            "invalid config n1.toml: key `checkpoints.every_entries` (line 30): and every_seconds cannot both be 0"
        );
        assert_eq!(
            parse(&format!("{GOOD}\n[checkpoints]\nmode = \"managed\"\n")).unwrap_err(),
            "invalid config n1.toml: key `checkpoints.mode` (line 29): managed needs app.command and app.data_dir"
        );
        let err = parse(&hooks("mode2 = 1\n")).unwrap_err();
        assert!(err.contains("unknown field `mode2`"), "{err}");
        let no_dir = GOOD.replace("[app]\n", "[app]\ncommand = [\"x\"]\n");
        assert_eq!(
            parse(&no_dir).unwrap_err(),
            "invalid config n1.toml: key `app.command` (line 11): needs app.data_dir (the managed app's directory)"
        );
    }

    #[test]
    fn reads_are_confirmed_by_lease_unless_a_quorum_is_asked_for() {
        assert_eq!(parse(GOOD).unwrap().raft.reads, ReadConfirmation::Lease);
        let quorum = format!("{GOOD}\n[raft]\nreads = \"quorum\"\n");
        assert_eq!(parse(&quorum).unwrap().raft.reads, ReadConfirmation::Quorum);
        let err = parse(&format!("{GOOD}\n[raft]\nreads = \"sometimes\"\n")).unwrap_err();
        assert!(err.contains("line 29"), "{err}");
        assert!(
            err.contains("unknown variant `sometimes`, expected `lease` or `quorum`"),
            "{err}"
        );
    }

    #[test]
    fn limits_are_checked() {
        let text = format!("{GOOD}\n[limits]\nmax_body_bytes = 0\n");
        let err = parse(&text).unwrap_err();
        assert!(
            err.contains("key `limits.max_body_bytes` (line 29)"),
            "{err}"
        );
    }

    #[test]
    fn a_rate_quota_is_checked() {
        let quota = |limits: &str| parse(&format!("{GOOD}\n[limits]\n{limits}\n"));
        let config = quota("rate_per_s = 500").unwrap();
        assert_eq!(config.service().limits.rate_per_s, Some(500));
        let err = quota("rate_per_s = 0").unwrap_err();
        assert!(
            err.ends_with("key `limits.rate_per_s` (line 29): must be greater than 0 (leave it out for no quota)"),
            "{err}"
        );
        let err = quota("rate_burst = 10").unwrap_err();
        assert!(
            err.ends_with("key `limits.rate_burst` (line 29): needs rate_per_s"),
            "{err}"
        );
        let config = quota("rate_per_s = 50\nrate_wait_ms = 1000").unwrap();
        assert_eq!(config.service().limits.rate_wait_ms, 1000);
        let err = quota("rate_wait_ms = 100").unwrap_err();
        assert!(
            err.ends_with("key `limits.rate_wait_ms` (line 29): needs rate_per_s"),
            "{err}"
        );
        let err = quota("rate_per_s = 50\nrate_wait_ms = 10001").unwrap_err();
        assert!(
            err.ends_with("key `limits.rate_wait_ms` (line 30): must be at most 10000 (a waiting request holds an in-flight slot)"),
            "{err}"
        );
    }

    /// GOOD's node and peers with its single-service tables moved into `[[service]]`s.
    fn with_services(services: &str) -> String {
        let node_and_peers = GOOD
            .replace("[app]\nurl = \"http://127.0.0.1:6001\"\n", "")
            .replace(
                "[[routes]]\nmethods = [\"GET\"]\npath_prefix = \"/\"\nmode = \"linearizable\"\n",
                "",
            );
        format!("{node_and_peers}{services}")
    }

    const ORDERS: &str = r#"
[[service]]
name = "orders"
[service.app]
url = "http://127.0.0.1:6001"
[[service.routes]]
methods = ["GET"]
mode = "local"
[service.limits]
max_body_bytes = 4096
"#;

    #[test]
    fn a_service_table_describes_the_same_service_as_the_single_service_layout() {
        let config = parse(&with_services(ORDERS)).unwrap();
        let service = config.service();
        assert_eq!(service.name, "orders");
        assert_eq!(service.app.url, "http://127.0.0.1:6001");
        assert_eq!(service.routes[0].mode, RouteMode::Local);
        assert_eq!(service.limits.max_body_bytes, 4096);
        assert_eq!(
            config.service_dir(service),
            PathBuf::from("/tmp/haven/1/orders")
        );
        let named = GOOD.replace("[app]\n", "[app]\nname = \"billing\"\n");
        assert_eq!(parse(&named).unwrap().service().name, "billing");
    }

    #[test]
    fn admin_tokens_are_the_node_s_or_a_service_s_own() {
        let config = parse(&with_services(ORDERS)).unwrap();
        assert_eq!(
            (config.admin.token_file.clone(), config.admin.public_reads),
            (None, true)
        );
        let own = format!("{ORDERS}[service.admin]\ntoken_file = \"/etc/haven/orders.tokens\"\n");
        let node = "[admin]\ntoken_file = \"/etc/haven/admin.tokens\"\npublic_reads = false\n";
        let config = parse(&with_services(&format!("{node}{own}"))).unwrap();
        assert_eq!(
            config.admin.token_file,
            Some(PathBuf::from("/etc/haven/admin.tokens"))
        );
        assert!(!config.admin.public_reads);
        assert_eq!(
            config.service().admin_tokens,
            Some(PathBuf::from("/etc/haven/orders.tokens"))
        );
    }

    #[test]
    fn errors_inside_a_service_name_the_service_and_the_line() {
        let second = ORDERS.replace("orders", "stock").replace("6001", "6002");
        let text = with_services(&format!("{ORDERS}{}", second.replace("http://", "ftp://")));
        assert_eq!(
            parse(&text).unwrap_err(),
            "invalid config n1.toml: key `service[1].app.url` (line 35): must start with http://"
        );
        let text = with_services(&ORDERS.replace("\"orders\"", "\"Orders\""));
        assert_eq!(
            parse(&text).unwrap_err(),
            format!(
                "invalid config n1.toml: key `service[0].name` (line 23): must be 1 to {MAX_SERVICE_NAME} of [a-z0-9-]"
            )
        );
        let text = with_services(&format!("{ORDERS}{ORDERS}"));
        assert_eq!(
            parse(&text).unwrap_err(),
            "invalid config n1.toml: key `service[1].name` (line 33): another service has this name"
        );
        let text =
            with_services(&ORDERS.replace("[service.app]\n", "[service.app]\nname = \"x\"\n"));
        assert_eq!(
            parse(&text).unwrap_err(),
            "invalid config n1.toml: key `service[0].app.name` (line 25): a service is named by its `name`, not by app.name"
        );
    }

    #[test]
    fn the_two_layouts_cannot_be_mixed() {
        let err = parse(&format!("{GOOD}{ORDERS}")).unwrap_err();
        assert!(
            err.starts_with(
                "invalid config n1.toml: key `service[0].name` (line 29): the single-service layout"
            ),
            "{err}"
        );
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, String> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::parse_with(text, Path::new("n1.toml"), &Override::from_vars(vars))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_environment_overrides_keys_of_the_file_and_of_a_service() {
        let config = parse_env(
            GOOD,
            &[
                ("HAVEN_NODE__CLIENT_ADDR", "127.0.0.1:8101"),
                ("HAVEN_LIMITS__MAX_BODY_BYTES", "4096"),
                ("HAVEN_ADMIN_TOKEN", "not a key"),
            ],
        )
        .unwrap();
        assert_eq!(config.node.client_addr.to_string(), "127.0.0.1:8101");
        assert_eq!(config.service().limits.max_body_bytes, 4096);
        let config = parse_env(
            &with_services(ORDERS),
            &[("HAVEN_SERVICE__ORDERS__APP__URL", "http://127.0.0.1:6999")],
        )
        .unwrap();
        assert_eq!(config.service().app.url, "http://127.0.0.1:6999");
    }

    #[test]
    fn a_bad_override_is_named_and_the_file_s_own_errors_keep_their_line() {
        assert_eq!(
            parse_env(
                GOOD,
                &[("HAVEN_NODE__ID", "one"), ("HAVEN_NODE__ZONE", "b")]
            )
            .unwrap_err(),
            "invalid config n1.toml: environment variable HAVEN_NODE__ID: invalid type: string \"one\", expected u64 in `node.id`"
        );
        assert_eq!(
            parse_env(GOOD, &[("HAVEN_NODE__CLUSTER", "Shop")]).unwrap_err(),
            "invalid config n1.toml: environment variable HAVEN_NODE__CLUSTER: key `node.cluster`: must be non-empty [a-z0-9-]"
        );
        let typo = parse_env(GOOD, &[("HAVEN_NODE__CLIENTADDR", "127.0.0.1:1")]).unwrap_err();
        assert!(
            typo.starts_with(
                "invalid config n1.toml: environment variable HAVEN_NODE__CLIENTADDR: unknown field `clientaddr`"
            ),
            "{typo}"
        );
        let bad_file = GOOD.replace("zone = \"a\"", "zone = \"a\"\nbogus = 1");
        assert_eq!(
            parse_env(&bad_file, &[("HAVEN_NODE__ZONE", "b")]).unwrap_err(),
            parse(&bad_file).unwrap_err()
        );
    }
}
