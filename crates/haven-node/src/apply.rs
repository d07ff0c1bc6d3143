//! The state machine: applies committed entries, in log order, to this node's replica.
//!
//! Owns the applied index, the idempotency table and the responders that hand a replica's
//! response back to the client waiting on this node.
//!
//! Exact restart rests on two facts. Haven delivers entry `i` only after every entry below
//! it was answered by the app, and it records `last_applied` (with the idempotency table)
//! in `apply/state.bin`, rewritten at most every [`PERSIST_INTERVAL`] with a plain write
//! plus rename, which survives `kill -9` of the node. After a crash Haven redelivers the
//! entries after the recorded index, each carrying its `Haven-Index`; the app treats an
//! index it has already applied as a replay (same response, no change). Together:
//! nothing skipped, nothing applied twice.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io;
use std::io::Cursor;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::RaftSnapshotBuilder;
use openraft::alias::SnapshotOf;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::sync::watch;

use crate::app::AppClient;
use crate::app::AppResponse;
use crate::app::Stamp;
use crate::metrics::Metrics;
use crate::types::Applied;
use crate::types::LogId;
use crate::types::OrderedRequest;
use crate::types::RequestTag;
use crate::types::SnapshotMeta;
use crate::types::StoredMembership;
use crate::types::TypeConfig;

/// Upper bound on how stale `state.bin` may be; it only widens the redelivered suffix.
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// First and largest pause between deliveries to an app that does not answer.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(20);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);
const STATE_MAGIC: &[u8; 8] = b"HVNAPPL1";

/// What the local replica answered for one entry.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub index: u64,
    pub response: AppResponse,
    /// Answered from the idempotency table: the app did not see this entry.
    pub replayed: bool,
}

/// Retention of the idempotency table. Eviction must be identical on every replica, so it
/// is counted in entries and measured in entry time, never in local wall time; every node
/// of a cluster must use the same values.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyLimits {
    pub max_keys: usize,
    pub retention_us: i64,
}

/// Shared between the state machine and the ingress: waiters and applied progress.
pub struct ApplyShared {
    waiters: Mutex<HashMap<RequestTag, oneshot::Sender<Delivered>>>,
    applied: watch::Sender<u64>,
    metrics: Metrics,
}

impl ApplyShared {
    /// Registers interest in the entry carrying `tag`; the receiver resolves when this
    /// node applies it.
    pub fn register(&self, tag: RequestTag) -> oneshot::Receiver<Delivered> {
        let (tx, rx) = oneshot::channel();
        self.lock_waiters().insert(tag, tx);
        rx
    }

    pub fn forget(&self, tag: &RequestTag) {
        self.lock_waiters().remove(tag);
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until the local replica has applied `index`; false on timeout.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|applied| *applied >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn resolve(&self, tag: &RequestTag, delivered: Delivered) {
        if let Some(tx) = self.lock_waiters().remove(tag) {
            // The client may have given up; nothing to do then.
            let _ = tx.send(delivered);
        }
    }

    fn lock_waiters(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<RequestTag, oneshot::Sender<Delivered>>> {
        // A poisoned map still holds valid senders; keep serving.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A remembered first answer to an idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredOutcome {
    index: u64,
    time_us: i64,
    response: AppResponse,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct IdempotencyTable {
    by_key: HashMap<String, StoredOutcome>,
    /// Keys in apply order, oldest first: eviction order is the log order.
    order: VecDeque<String>,
}

impl IdempotencyTable {
    fn get(&self, key: &str) -> Option<&StoredOutcome> {
        self.by_key.get(key)
    }

    fn insert(&mut self, key: String, outcome: StoredOutcome, limits: IdempotencyLimits) {
        let now_us = outcome.time_us;
        self.order.push_back(key.clone());
        self.by_key.insert(key, outcome);
        while let Some(oldest) = self.order.front() {
            let expired = self
                .by_key
                .get(oldest)
                .is_none_or(|o| now_us.saturating_sub(o.time_us) > limits.retention_us);
            if self.order.len() <= limits.max_keys && !expired {
                break;
            }
            if let Some(key) = self.order.pop_front() {
                self.by_key.remove(&key);
            }
        }
    }
}

/// The part of the state machine that survives restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ApplyState {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Entry time of the last applied entry; later entries never get an earlier time.
    last_time_us: i64,
    idempotency: IdempotencyTable,
}

struct Inner {
    state: ApplyState,
    state_path: PathBuf,
    app: AppClient,
    limits: IdempotencyLimits,
    last_persist: Instant,
}

/// openraft's handle on the state machine; cheap to clone.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<tokio::sync::Mutex<Inner>>,
    shared: Arc<ApplyShared>,
    shutdown: watch::Receiver<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyStateError {
    #[error("cannot read apply state {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt apply state {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl StateMachine {
    /// Opens `dir/state.bin` (or starts empty) for this node's replica.
    pub fn open(
        dir: &Path,
        app: AppClient,
        limits: IdempotencyLimits,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, ApplyStateError> {
        let io_err = |source| ApplyStateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let state_path = dir.join("state.bin");
        let state = load_state(&state_path)?;
        let applied_index = state.last_applied.as_ref().map_or(0, |l| l.index);
        metrics.applied_index.set(applied_index as i64);
        let (applied, _) = watch::channel(applied_index);
        let shared = Arc::new(ApplyShared {
            waiters: Mutex::new(HashMap::new()),
            applied,
            metrics,
        });
        let inner = Inner {
            state,
            state_path,
            app,
            limits,
            last_persist: Instant::now(),
        };
        Ok(Self {
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
            shared,
            shutdown,
        })
    }

    pub fn shared(&self) -> Arc<ApplyShared> {
        self.shared.clone()
    }

    /// Writes the state now; called on clean shutdown.
    pub async fn persist(&self) -> io::Result<()> {
        let mut inner = self.inner.lock().await;
        inner.persist()
    }

    async fn apply_request(
        &self,
        inner: &mut Inner,
        req: &OrderedRequest,
        index: u64,
    ) -> io::Result<Delivered> {
        let time_us = req.time_unix_us.max(inner.state.last_time_us);
        inner.state.last_time_us = time_us;
        if let Some(stored) = req
            .idempotency_key
            .as_deref()
            .and_then(|k| inner.state.idempotency.get(k))
        {
            self.shared.metrics.idempotent_replays.inc();
            return Ok(Delivered {
                index: stored.index,
                response: stored.response.clone(),
                replayed: true,
            });
        }
        let stamp = Stamp {
            index,
            time_rfc3339: rfc3339(time_us),
            seed: req.seed,
        };
        let response = self.deliver_until_answered(&inner.app, req, &stamp).await?;
        if let Some(key) = &req.idempotency_key {
            let outcome = StoredOutcome {
                index,
                time_us,
                response: response.clone(),
            };
            inner
                .state
                .idempotency
                .insert(key.clone(), outcome, inner.limits);
        }
        Ok(Delivered {
            index,
            response,
            replayed: false,
        })
    }

    /// Retries until the replica answers: skipping an entry would make this replica diverge.
    /// Only shutdown ends the loop early, as an error that stops the Raft node.
    async fn deliver_until_answered(
        &self,
        app: &AppClient,
        req: &OrderedRequest,
        stamp: &Stamp,
    ) -> io::Result<AppResponse> {
        let metrics = &self.shared.metrics;
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut attempt = 1u64;
        loop {
            match app.deliver(req, stamp).await {
                Ok(response) => {
                    metrics.app_up.set(1);
                    return Ok(response);
                }
                Err(e) => {
                    metrics.app_delivery_failures.inc();
                    metrics.app_up.set(0);
                    tracing::warn!(index = stamp.index, attempt, error = %e, "delivery to app failed; retrying, entries are never skipped");
                }
            }
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|stop| *stop) => {
                    return Err(io::Error::other("node shutting down while the app was unreachable"));
                }
            }
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            attempt += 1;
        }
    }
}

impl Inner {
    fn persist(&mut self) -> io::Result<()> {
        let payload = postcard::to_allocvec(&self.state).map_err(io::Error::other)?;
        let mut bytes = Vec::with_capacity(payload.len() + 12);
        bytes.extend_from_slice(STATE_MAGIC);
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let tmp = self.state_path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &self.state_path)?;
        self.last_persist = Instant::now();
        Ok(())
    }

    fn persist_if_due(&mut self) -> io::Result<()> {
        if self.last_persist.elapsed() >= PERSIST_INTERVAL {
            self.persist()?;
        }
        Ok(())
    }
}

fn load_state(path: &Path) -> Result<ApplyState, ApplyStateError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ApplyState::default()),
        Err(source) => {
            return Err(ApplyStateError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let corrupt = |reason: &str| ApplyStateError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 12 || &bytes[..8] != STATE_MAGIC {
        return Err(corrupt("bad header"));
    }
    let crc = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let payload = &bytes[12..];
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    postcard::from_bytes(payload).map_err(|e| corrupt(&e.to_string()))
}

/// Entry time as `Haven-Time`: RFC 3339, UTC, microseconds.
fn rfc3339(time_us: i64) -> String {
    let time = chrono::DateTime::from_timestamp_micros(time_us).unwrap_or_default();
    time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Snapshot bytes as openraft moves them.
pub type SnapshotData = Cursor<Vec<u8>>;

fn checkpoints_unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "app-state checkpoints are not implemented yet; the log is never compacted",
    )
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        Err(checkpoints_unsupported())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.inner.lock().await;
        Ok((inner.state.last_applied, inner.state.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let this = self.clone();
        let mut inner = this.inner.lock().await;
        while let Some((entry, responder)) = entries.try_next().await? {
            let index = entry.log_id.index;
            let expected = inner.state.last_applied.as_ref().map_or(0, |l| l.index + 1);
            assert_eq!(index, expected, "entries must be applied contiguously");
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(membership) => {
                    inner.state.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
                EntryPayload::Normal(req) => {
                    let delivered = this.apply_request(&mut inner, &req, index).await?;
                    this.shared.resolve(&req.tag, delivered);
                }
            }
            inner.state.last_applied = Some(entry.log_id);
            this.shared.applied.send_replace(index);
            this.shared.metrics.applied_index.set(index as i64);
            if let Some(responder) = responder {
                responder.send(Applied);
            }
        }
        inner.persist_if_due()
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta,
        _snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        Err(checkpoints_unsupported())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(index: u64, time_us: i64) -> StoredOutcome {
        StoredOutcome {
            index,
            time_us,
            response: AppResponse {
                status: 201,
                headers: vec![],
                body: bytes::Bytes::from(index.to_string()),
            },
        }
    }

    #[test]
    fn idempotency_table_evicts_by_count_in_log_order() {
        let limits = IdempotencyLimits {
            max_keys: 2,
            retention_us: i64::MAX,
        };
        let mut table = IdempotencyTable::default();
        for i in 0..3u64 {
            table.insert(format!("k{i}"), outcome(i, 0), limits);
        }
        assert!(table.get("k0").is_none());
        assert_eq!(table.get("k1").map(|o| o.index), Some(1));
        assert_eq!(table.get("k2").map(|o| o.index), Some(2));
    }

    #[test]
    fn idempotency_table_evicts_by_entry_age() {
        let limits = IdempotencyLimits {
            max_keys: 100,
            retention_us: 1_000,
        };
        let mut table = IdempotencyTable::default();
        table.insert("old".into(), outcome(1, 0), limits);
        table.insert("mid".into(), outcome(2, 500), limits);
        table.insert("new".into(), outcome(3, 1_200), limits);
        assert!(table.get("old").is_none());
        assert!(table.get("mid").is_some());
    }

    #[test]
    fn state_file_round_trips_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        let mut state = ApplyState {
            last_time_us: 42,
            ..ApplyState::default()
        };
        state.idempotency.insert(
            "k".into(),
            outcome(7, 42),
            IdempotencyLimits {
                max_keys: 10,
                retention_us: 10,
            },
        );
        let app = AppClient::new("http://127.0.0.1:1", Duration::from_millis(10));
        let mut inner = Inner {
            state,
            state_path: path.clone(),
            app,
            limits: IdempotencyLimits {
                max_keys: 10,
                retention_us: 10,
            },
            last_persist: Instant::now(),
        };
        inner.persist().unwrap();
        let loaded = load_state(&path).unwrap();
        assert_eq!(loaded.last_time_us, 42);
        assert_eq!(loaded.idempotency.get("k").map(|o| o.index), Some(7));

        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let err = load_state(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("corrupt apply state {}: checksum mismatch", path.display())
        );
    }

    #[test]
    fn haven_time_is_rfc3339_utc() {
        assert_eq!(
            rfc3339(1_700_000_000_123_456),
            "2023-11-14T22:13:20.123456Z"
        );
    }
}
