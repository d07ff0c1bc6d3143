//! The state machine: applies committed entries, in log order, to this node's replica.
//!
//! Owns the applied index, the idempotency table and the responders that hand a replica's
//! response back to the client waiting on this node.
//!
//! Entries travel to the app in windows, pipelined on one connection ([`crate::app::pipeline`]):
//! the app still processes them one after another, in log order, but a window costs one
//! round trip instead of one per entry.
//!
//! Exact restart rests on two facts. The app sees entry `i` only after every entry below
//! it (one connection, answered in order), and Haven records `last_applied` (with the
//! idempotency table) only for answered entries, saving it at most every
//! [`PERSIST_INTERVAL`] in the alternating copies of `slots`, which survive `kill -9` of
//! the node. After a crash Haven redelivers the entries after the recorded index, each
//! carrying its `Haven-Index`; the app treats an index it has already applied as a replay
//! (same response, no change). Together: nothing skipped, nothing applied twice.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use futures::FutureExt;
use futures::Stream;
use futures::TryStreamExt;
use futures::future::BoxFuture;
use openraft::EntryPayload;
use openraft::RaftSnapshotBuilder;
use openraft::alias::SnapshotOf;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::watch;

use crate::app::Stamp;
use crate::app::pipeline::Delivery;
use crate::app::pipeline::OrderedConnection;
use crate::checkpoint::Checkpoints;
use crate::checkpoint::Position;
use crate::checkpoint::capture::Staged;
use haven_base::metrics::Metrics;
use haven_base::workers::Workers;
use haven_checkpoint::CheckpointFile;
use haven_checkpoint::format::CheckpointInfo;
use haven_contract::AppResponse;
use haven_contract::NodeId;
use haven_contract::PeerNode;
use openraft::Membership;

pub mod digests;
mod outcomes;
mod slots;
use digests::AnswerDigests;
use digests::AnswerLedger;
use haven_consensus::answer_digests::Digests;
use haven_consensus::first_answers::AskPeers;
use haven_consensus::first_answers::FIRST_ANSWERS_WAIT;
use haven_consensus::first_answers::RecordedAnswers;
use haven_consensus::types::Applied;
use haven_consensus::types::Entry;
use haven_consensus::types::LogId;
use haven_consensus::types::SnapshotMeta;
use haven_consensus::types::StoredMembership;
use haven_consensus::types::TypeConfig;
use haven_contract::OrderedRequest;
use haven_contract::RequestTag;
use outcomes::OutcomeJournal;
use outcomes::Recovered;
pub use slots::ApplyStateError;
use slots::StateSlots;

/// Upper bound on how stale the saved state may be; it only widens the redelivered suffix.
pub const PERSIST_INTERVAL: Duration = Duration::from_millis(100);
/// First and largest pause between deliveries to an app that does not answer.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(20);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Most entries delivered to the app in one pipelined window. Bounds the memory a window
/// holds and how long the first waiter of a window waits for the last answer.
const APPLY_WINDOW: usize = 64;
/// Most entries, and most request bytes, handed over and not yet delivered; `apply` waits
/// beyond either, which bounds the memory an app that is slow or down makes a node hold
/// (4096 one-MiB bodies would otherwise be 4 GiB).
const APPLY_QUEUE: usize = 4096;
const APPLY_QUEUE_BYTES: usize = 64 << 20;
/// Most entries, and most request bytes, of one window of a replay ([`StateMachine::replay`]):
/// no client waits on a replayed entry, so a window is as deep as the app's socket buffers
/// keep busy, and the app idles only between windows.
const REPLAY_WINDOW: usize = 4096;
const REPLAY_WINDOW_BYTES: usize = 16 << 20;

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
    /// True from a failed delivery to the next one that succeeds: entries are waiting and
    /// the replica is not taking them (`consensus::step_aside` watches it).
    delivery_failing: watch::Sender<bool>,
    metrics: Metrics,
    /// The digests of the replica's answers, when replicas compare them.
    answers: OnceLock<Arc<AnswerLedger>>,
    /// True while deliveries are held back for a checkpoint's copy of the replica's
    /// state: the ingress then has a peer answer this node's clients.
    paused_for_checkpoint: AtomicBool,
    /// When the last such pause ended, in milliseconds since `opened` (0: never): the
    /// replica then still has to apply what arrived during the pause.
    resumed_at_ms: AtomicU64,
    opened: Instant,
}

/// How long a checkpoint waits for the writes already ordered on this node to be answered
/// before it pauses deliveries; about a commit round and a delivery window in practice.
const DRAIN_LIMIT: Duration = Duration::from_millis(200);
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// Clears [`ApplyShared::paused_for_checkpoint`] when the copy ends, however it ends.
struct PausedForCheckpoint<'a>(&'a ApplyShared);

impl Drop for PausedForCheckpoint<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        let now_ms = shared.opened.elapsed().as_millis() as u64;
        shared.resumed_at_ms.store(now_ms.max(1), Ordering::Release);
        shared.paused_for_checkpoint.store(false, Ordering::Release);
    }
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

    /// Whether deliveries are held back now for a checkpoint's copy (hundreds of
    /// milliseconds for a large managed state).
    pub fn paused_for_checkpoint(&self) -> bool {
        self.paused_for_checkpoint.load(Ordering::Acquire)
    }

    /// Whether such a pause ended less than `within` ago.
    pub fn resumed_within(&self, within: Duration) -> bool {
        let at_ms = self.resumed_at_ms.load(Ordering::Acquire);
        let now_ms = self.opened.elapsed().as_millis() as u64;
        at_ms > 0 && now_ms.saturating_sub(at_ms) < within.as_millis() as u64
    }

    fn pause_for_checkpoint(&self) -> PausedForCheckpoint<'_> {
        self.paused_for_checkpoint.store(true, Ordering::Release);
        PausedForCheckpoint(self)
    }

    /// Waits, at most [`DRAIN_LIMIT`], until no client of this node waits for its
    /// replica. Called once new requests go to peers: the ones already ordered here are
    /// answered before the pause instead of after it (on an HTTP/1.1 connection, one
    /// answer held back for a pause holds back every request queued behind it).
    async fn drain_waiters(&self) {
        let deadline = Instant::now() + DRAIN_LIMIT;
        while !self.lock_waiters().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// The digests of the replica's answers and what comparing them found; `None` when
    /// `app.check_divergence` is off.
    pub fn answers(&self) -> Option<&Arc<AnswerLedger>> {
        self.answers.get()
    }

    pub fn delivery_failing(&self) -> watch::Receiver<bool> {
        self.delivery_failing.subscribe()
    }

    fn set_delivery_failing(&self, failing: bool) {
        self.delivery_failing.send_if_modified(|was| {
            let changed = *was != failing;
            *was = failing;
            changed
        });
        self.metrics.app_up.set(i64::from(!failing));
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
pub struct StoredOutcome {
    pub index: u64,
    pub time_us: i64,
    pub response: AppResponse,
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
    slots: StateSlots,
    /// First answers to keyed entries since the last save, written before clients see
    /// them ([`outcomes`]).
    journal: OutcomeJournal,
    /// First answers the journal held at start, for entries delivered again after a crash.
    recovered: Recovered,
    app: OrderedConnection,
    limits: IdempotencyLimits,
    last_persist: Instant,
}

/// What [`StateMachine::recover_from_crash`] found and did. `uncertain` is the range of
/// entries that went to the app after the last save of the apply state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterCrash {
    /// Nothing went to the app after the last save.
    Clean,
    /// The replica was rebuilt from the checkpoint at this index.
    Rebuilt {
        checkpoint: u64,
        uncertain: (u64, u64),
    },
    /// The entries go to the app again.
    Redelivered { uncertain: (u64, u64) },
}

/// The replica's side of the state machine: what the delivery task needs to apply a
/// window, and all it holds, so that the hand-over queue closes when openraft lets go.
#[derive(Clone)]
struct Replica {
    inner: Arc<tokio::sync::Mutex<Inner>>,
    shared: Arc<ApplyShared>,
    shutdown: watch::Receiver<bool>,
    /// Set once Raft is up; until then no peer is asked.
    peers: Arc<OnceLock<Arc<dyn AskPeers>>>,
    /// Where to take a checkpoint before the app sees its next entry, when no checkpoint
    /// exists yet and the app does not honour `Haven-Index`: without one, a crash before
    /// the first scheduled checkpoint leaves nothing to rebuild the replica from.
    baseline: Arc<Mutex<Option<Arc<Checkpoints>>>>,
}

/// Committed entries on their way from openraft to the delivery task.
///
/// openraft calls `apply` once per commit advance, a few entries each, one call after
/// the other; answering each call only after the app answered its entries costs a round
/// trip per handful of entries, and under load a leader's replica fell seconds behind.
/// Handing the entries over instead lets the delivery task take everything that queued
/// up while the app was busy as one window.
#[derive(Clone)]
struct Handover {
    queue: mpsc::Sender<HandedOver>,
    /// Permits for [`APPLY_QUEUE_BYTES`]; each queued entry holds its size in them.
    bytes: Arc<Semaphore>,
    /// Highest index handed over: what a drain waits for.
    queued_upto: Arc<AtomicU64>,
    /// Why the delivery task stopped, once it has.
    failure: Arc<OnceLock<String>>,
}

/// A committed entry on its way to the replica, holding its share of the byte budget
/// until it is delivered.
type HandedOver = (EntryResponder<TypeConfig>, OwnedSemaphorePermit);

/// openraft's handle on the state machine; cheap to clone.
///
/// openraft counts an entry as applied once it is handed over; the replica's own applied
/// index ([`ApplyShared::applied_index`]), which reads and checkpoints use, moves only
/// when the app has answered.
#[derive(Clone)]
pub struct StateMachine {
    replica: Replica,
    handover: Handover,
    /// Absent when checkpoints are off: snapshots are then refused and the log kept whole.
    checkpoints: Option<Arc<Checkpoints>>,
}

impl StateMachine {
    /// Opens the saved state in `dir` (or starts empty) for this node's replica and starts
    /// its delivery task (on the current tokio runtime).
    pub fn open(
        dir: &Path,
        app: OrderedConnection,
        limits: IdempotencyLimits,
        metrics: Metrics,
        shutdown: watch::Receiver<bool>,
        checkpoints: Option<Arc<Checkpoints>>,
        workers: &Workers,
    ) -> Result<Self, ApplyStateError> {
        let io_err = |source| ApplyStateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let (slots, saved) = StateSlots::open(dir)?;
        let state = match saved {
            Some(payload) => decode_state(&payload)?,
            None => ApplyState::default(),
        };
        let applied_index = state.last_applied.as_ref().map_or(0, |l| l.index);
        let (journal, recovered) = OutcomeJournal::open(dir, applied_index).map_err(io_err)?;
        metrics.applied_index.set(applied_index as i64);
        let (applied, _) = watch::channel(applied_index);
        let shared = Arc::new(ApplyShared {
            waiters: Mutex::new(HashMap::new()),
            applied,
            delivery_failing: watch::channel(false).0,
            metrics,
            paused_for_checkpoint: AtomicBool::new(false),
            resumed_at_ms: AtomicU64::new(0),
            opened: Instant::now(),
            answers: OnceLock::new(),
        });
        // Up until a delivery fails: a replica with nothing to take yet is not down.
        shared.set_delivery_failing(false);
        let inner = Inner {
            state,
            slots,
            journal,
            recovered,
            app,
            limits,
            last_persist: Instant::now(),
        };
        let replica = Replica {
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
            shared,
            shutdown,
            peers: Arc::default(),
            baseline: Arc::default(),
        };
        let (queue, handed_over) = mpsc::channel(APPLY_QUEUE);
        let handover = Handover {
            queue,
            bytes: Arc::new(Semaphore::new(APPLY_QUEUE_BYTES)),
            queued_upto: Arc::new(AtomicU64::new(applied_index)),
            failure: Arc::new(OnceLock::new()),
        };
        workers.spawn(
            "apply-delivery",
            replica
                .clone()
                .deliver_handed_over(handed_over, handover.failure.clone()),
        );
        Ok(Self {
            replica,
            handover,
            checkpoints,
        })
    }

    pub fn shared(&self) -> Arc<ApplyShared> {
        self.replica.shared.clone()
    }

    /// Keeps the digests of the replica's answers from now on, for peers to compare
    /// theirs with; set once, before Raft starts.
    pub fn keep_answer_digests(&self, volatile_headers: Vec<String>) -> Arc<AnswerLedger> {
        let ledger = Arc::new(AnswerLedger::new(volatile_headers));
        (self.replica.shared.answers.get_or_init(|| ledger)).clone()
    }

    /// Where to ask for first answers after a crash; set once, when the node's transport
    /// and membership exist.
    pub fn set_peers(&self, peers: Arc<dyn AskPeers>) {
        let _ = self.replica.peers.set(peers);
    }

    /// Writes the state now; called on clean shutdown.
    /// Decides, before Raft starts, how the entries a crash may have left applied but
    /// unrecorded are made good.
    ///
    /// The apply state is saved every [`PERSIST_INTERVAL`]; entries delivered after the
    /// last save went to the app (the journal says which) and may have been applied by
    /// it without their answers being recorded. Delivered again, an app that does not
    /// recognise `Haven-Index` applies them twice (a counter counts twice). So unless
    /// the app honours `Haven-Index`, the replica is rebuilt from its newest checkpoint,
    /// with Haven's own state at that index, and the log replays from there: each entry
    /// reaches the rebuilt state once. Without a checkpoint the entries are delivered
    /// again, with a warning: exactly-once then needs the app's help.
    pub async fn recover_from_crash(&self, app_honours_index: bool) -> io::Result<AfterCrash> {
        let mut inner = self.replica.inner.lock().await;
        if !app_honours_index {
            self.arm_baseline().await?;
        }
        let applied = inner.state.last_applied.as_ref().map_or(0, |l| l.index);
        let delivered = inner.recovered.delivered_upto;
        if delivered <= applied {
            return Ok(AfterCrash::Clean);
        }
        let uncertain = (applied + 1, delivered);
        if app_honours_index {
            tracing::info!(
                ?uncertain,
                "entries the app may have applied before the crash go to it again; it recognises them by Haven-Index"
            );
            return Ok(AfterCrash::Redelivered { uncertain });
        }
        let newest = match &self.checkpoints {
            Some(checkpoints) => checkpoints.newest_verified().await?,
            None => None,
        };
        let (Some(checkpoints), Some(info)) = (&self.checkpoints, newest) else {
            tracing::warn!(
                ?uncertain,
                "entries the app may have applied before the crash go to it again, and no checkpoint exists to rebuild the replica from: an app that does not honour Haven-Index may apply them twice"
            );
            return Ok(AfterCrash::Redelivered { uncertain });
        };
        self.replica
            .reset_to(&mut inner, checkpoints, &info.path, &info)
            .await?;
        self.replica.shared.metrics.replica_rebuilds.inc();
        tracing::warn!(
            checkpoint = info.index,
            ?uncertain,
            "replica rebuilt from its newest checkpoint after a crash: the app may have applied entries whose answers were not recorded; the log replays from the checkpoint"
        );
        Ok(AfterCrash::Rebuilt {
            checkpoint: info.index,
            uncertain,
        })
    }

    /// Asks for a checkpoint before the next delivery when checkpoints are on and none
    /// exists (a fresh node, or checkpoints just switched on).
    async fn arm_baseline(&self) -> io::Result<()> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        if checkpoints.newest().await?.is_none() {
            *lock(&self.replica.baseline) = Some(checkpoints.clone());
        }
        Ok(())
    }

    pub async fn persist(&self) -> io::Result<()> {
        let mut inner = self.replica.inner.lock().await;
        inner.persist()
    }

    /// The last applied entry's log id and entry time (what a standby reports its lag by).
    pub async fn position(&self) -> (Option<LogId>, i64) {
        let inner = self.replica.inner.lock().await;
        (inner.state.last_applied, inner.state.last_time_us)
    }

    /// A promoted standby takes the service over at its applied index: from here on its
    /// own voters are the membership (the old primary's nodes are not its peers), saved
    /// at once, and a checkpoint at this index carries them to any member that needs it.
    /// Every node of the standby site does the same at the same index, so they agree.
    pub async fn take_over(
        &self,
        voters: std::collections::BTreeMap<NodeId, PeerNode>,
    ) -> io::Result<LogId> {
        self.drain().await?;
        let last = {
            let mut inner = self.replica.inner.lock().await;
            let last = inner
                .state
                .last_applied
                .ok_or_else(|| io::Error::other("nothing applied: no state to take over"))?;
            inner.state.membership = StoredMembership::new(Some(last), Membership::from(voters));
            inner.persist()?;
            last
        };
        self.take_checkpoint().await?;
        Ok(last)
    }

    /// A checkpoint outside Raft (a standby follows the archive without it); its index.
    pub async fn checkpoint_now(&self) -> io::Result<u64> {
        let snapshot = self.take_checkpoint().await?;
        Ok(snapshot.meta.last_log_id.map_or(0, |l| l.index))
    }

    /// Applies entries no Raft commits here (a restore, a standby following the archive)
    /// with the same decisions, delivery and records as committed entries, in windows of
    /// up to [`REPLAY_WINDOW`] straight to the replica instead of through the hand-over
    /// queue, which caps windows at [`APPLY_WINDOW`] for the sake of waiting clients.
    pub async fn replay(&self, entries: Vec<Entry>) -> io::Result<()> {
        // On a runtime worker, which polls the app's socket itself: a caller on a
        // runtime's `block_on` thread (the CLI) would be woken across threads for every
        // answer, and those wakeups cost more than the app's own work.
        let machine = self.clone();
        let replaying = tokio::spawn(async move { machine.replay_windows(entries).await });
        replaying.await.map_err(io::Error::other)?
    }

    async fn replay_windows(&self, entries: Vec<Entry>) -> io::Result<()> {
        self.drain().await?;
        let replica = &self.replica;
        let mut inner = replica.inner.lock().await;
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let (mut window, mut bytes) = (Vec::with_capacity(REPLAY_WINDOW), 0);
            // One entry larger than a window's bytes goes alone.
            let fits = |entry: &Entry, window: &Vec<_>, bytes: usize| {
                window.is_empty() || bytes + queued_bytes(entry) <= REPLAY_WINDOW_BYTES
            };
            while window.len() < REPLAY_WINDOW {
                let Some(entry) = entries.next_if(|e| fits(e, &window, bytes)) else {
                    break;
                };
                bytes += queued_bytes(&entry);
                window.push((entry, None));
            }
            replica.apply_after_baseline(&mut inner, window).await?;
            inner.persist_if_due()?;
        }
        Ok(())
    }

    /// Waits until the replica has answered every entry handed over so far.
    pub async fn drain(&self) -> io::Result<()> {
        let upto = self.handover.queued_upto.load(Ordering::Acquire);
        let mut applied = self.replica.shared.applied.subscribe();
        tokio::select! {
            reached = applied.wait_for(|applied| *applied >= upto) => {
                reached.map(|_| ()).map_err(|_| self.handover.stopped())
            }
            () = self.handover.queue.closed() => Err(self.handover.stopped()),
        }
    }
}

impl Handover {
    fn stopped(&self) -> io::Error {
        let reason = self
            .failure
            .get()
            .map_or("the delivery task has stopped", String::as_str);
        io::Error::other(format!("cannot apply: {reason}"))
    }

    async fn hand_over(&self, item: EntryResponder<TypeConfig>) -> io::Result<()> {
        let index = item.0.log_id.index;
        let cost = queued_bytes(&item.0).clamp(1, APPLY_QUEUE_BYTES) as u32;
        let permit = self.bytes.clone().acquire_many_owned(cost).await;
        let permit = permit.map_err(|_| self.stopped())?;
        self.queue
            .send((item, permit))
            .await
            .map_err(|_| self.stopped())?;
        self.queued_upto.store(index, Ordering::Release);
        Ok(())
    }
}

/// What a queued entry costs in memory, near enough: its request's variable parts.
fn queued_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        EntryPayload::Normal(request) => {
            let headers: usize = request
                .headers
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum();
            request.body.len() + request.uri.len() + headers
        }
        _ => 0,
    }
}

impl Replica {
    /// Delivers handed-over entries until openraft lets go of the queue. An error (only
    /// shutdown or a failed save can cause one) is recorded for `apply` to return, which
    /// stops the Raft node as an error in `apply` always did.
    async fn deliver_handed_over(
        self,
        mut handed_over: mpsc::Receiver<HandedOver>,
        failure: Arc<OnceLock<String>>,
    ) {
        let mut received = Vec::with_capacity(APPLY_WINDOW);
        while handed_over.recv_many(&mut received, APPLY_WINDOW).await > 0 {
            // The permits go back once the window is delivered.
            let (window, _permits): (Vec<_>, Vec<_>) = received.drain(..).unzip();
            let mut inner = self.inner.lock().await;
            let applied = self.apply_after_baseline(&mut inner, window);
            if let Err(e) = applied.await.and_then(|()| inner.persist_if_due()) {
                tracing::error!(error = %e, "applying committed entries stopped");
                let _ = failure.set(e.to_string());
                return;
            }
        }
    }

    /// [`Self::apply_window`], with the baseline checkpoint (if one is armed) taken after
    /// the window's leading membership and blank entries and before its first request.
    async fn apply_after_baseline(
        &self,
        inner: &mut Inner,
        mut window: Vec<EntryResponder<TypeConfig>>,
    ) -> io::Result<()> {
        let armed = lock(&self.baseline).clone();
        let first_request = window
            .iter()
            .position(|(entry, _)| matches!(entry.payload, EntryPayload::Normal(_)));
        let (Some(checkpoints), Some(split)) = (armed, first_request) else {
            return self.apply_window(inner, window).await;
        };
        let requests = window.split_off(split);
        if !window.is_empty() {
            self.apply_window(inner, window).await?;
        }
        self.take_baseline(inner, &checkpoints).await;
        self.apply_window(inner, requests).await
    }

    /// A failed baseline is retried before the next window: the app being down must cost
    /// a warning, never the node.
    async fn take_baseline(&self, inner: &Inner, checkpoints: &Checkpoints) {
        if inner.state.last_applied.is_none() {
            tracing::warn!("no entry applied before the first request: no baseline checkpoint");
            *lock(&self.baseline) = None;
            return;
        }
        // Deliveries wait for the whole of it anyway: no copy first.
        let since = Instant::now();
        let taken = async {
            let position = checkpoint_position(inner)?;
            let staged = checkpoints.stage(position.index, true).await?;
            checkpoints.seal(staged, position).await
        };
        let taken = taken.await;
        (self.shared.metrics.checkpoint_pause_seconds).inc_by(since.elapsed().as_secs_f64());
        match taken {
            Ok(info) => {
                *lock(&self.baseline) = None;
                self.shared.metrics.checkpoints_written.inc();
                tracing::info!(
                    index = info.index,
                    "baseline checkpoint taken before the app's first entry: a crash before the next one rebuilds the replica from it"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "baseline checkpoint failed; retried before the next window")
            }
        }
    }

    /// Applies a window of committed entries: decides which need the app, delivers those
    /// in one pipelined exchange, then records the outcomes in log order.
    async fn apply_window(
        &self,
        inner: &mut Inner,
        window: Vec<EntryResponder<TypeConfig>>,
    ) -> io::Result<()> {
        let plan = plan_window(&inner.state, &window);
        let keyed = keyed_deliveries(&plan, &window);
        let deliveries: Vec<Delivery<'_>> = plan
            .iter()
            .zip(&window)
            .filter_map(|(step, (entry, _))| match (step, &entry.payload) {
                (Step::Deliver { stamp, .. }, EntryPayload::Normal(request)) => Some(Delivery {
                    request,
                    stamp: stamp.clone(),
                }),
                _ => None,
            })
            .collect();
        if let (Some(first), Some(last)) = (deliveries.first(), deliveries.last()) {
            // Before the app sees any of it: after a crash these entries may have been
            // applied with no answer recorded (`StateMachine::recover_from_crash`).
            let delivering = outcomes::Record::Delivering {
                first: first.stamp.index,
                last: last.stamp.index,
            };
            inner.journal.append(&[delivering])?;
        }
        let responses = self
            .deliver_until_answered(&mut inner.app, &deliveries)
            .await?;
        drop(deliveries);
        let uncertain: Vec<(u64, String)> = keyed
            .into_iter()
            .filter(|(index, _)| inner.recovered.uncertain(*index))
            .collect();
        let from_peers = self.ask_peers(uncertain).await;
        let mut responses = responses.into_iter();
        let mut answers: Vec<Option<Delivered>> = Vec::with_capacity(window.len());
        // Waiters hear their answers only once the window's keyed answers are journaled.
        let mut resolved = Vec::with_capacity(window.len());
        let mut journaled = Vec::new();
        let ledger = self.shared.answers.get();
        let first_index = window.first().map_or(0, |(entry, _)| entry.log_id.index);
        let mut hashes = Vec::with_capacity(ledger.map_or(0, |_| window.len()));
        for (step, (entry, responder)) in plan.into_iter().zip(window) {
            let index = entry.log_id.index;
            let expected = inner.state.last_applied.as_ref().map_or(0, |l| l.index + 1);
            assert_eq!(index, expected, "entries must be applied contiguously");
            let answer = match (step, entry.payload) {
                (Step::Deliver { stamp, time_us }, EntryPayload::Normal(req)) => {
                    let response = responses.next().ok_or_else(|| {
                        io::Error::other("the app answered fewer entries than were sent")
                    })?;
                    inner.state.last_time_us = time_us;
                    let response = inner.first_answer(stamp.index, &req, response, &from_peers);
                    let (answer, first) = inner.record(&req, stamp.index, time_us, response);
                    journaled.extend(first);
                    resolved.push((req.tag, answer.clone()));
                    Some(answer)
                }
                (Step::Replay { answer, time_us }, EntryPayload::Normal(req)) => {
                    inner.state.last_time_us = time_us;
                    let answer = answer.or_else(|position| {
                        answers[position].clone().ok_or_else(|| {
                            io::Error::other("idempotent replay of an entry with no answer")
                        })
                    })?;
                    let answer = Delivered {
                        replayed: true,
                        ..answer
                    };
                    self.shared.metrics.idempotent_replays.inc();
                    resolved.push((req.tag, answer.clone()));
                    Some(answer)
                }
                (_, EntryPayload::Membership(membership)) => {
                    inner.state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    None
                }
                _ => None,
            };
            if let Some(ledger) = ledger {
                hashes.push(ledger.hash(answer.as_ref().map(|a| &a.response)));
            }
            answers.push(answer);
            inner.state.last_applied = Some(entry.log_id);
            self.shared.applied.send_replace(index);
            self.shared.metrics.applied_index.set(index as i64);
            if let Some(responder) = responder {
                responder.send(Applied);
            }
        }
        if let Some(ledger) = ledger {
            ledger.lock_digests().record(first_index, &hashes);
        }
        inner.journal.append(&journaled)?;
        for (tag, answer) in resolved {
            self.shared.resolve(&tag, answer);
        }
        Ok(())
    }

    /// The peers' first answers to entries this replica may have answered before a crash
    /// without a record of it. Nothing to ask, or nobody to ask, is an empty map.
    async fn ask_peers(&self, uncertain: Vec<(u64, String)>) -> HashMap<u64, AppResponse> {
        if uncertain.is_empty() {
            return HashMap::new();
        }
        let Some(peers) = self.peers.get() else {
            return HashMap::new();
        };
        let asked = uncertain.len();
        let found = peers.first_answers(uncertain).await;
        tracing::info!(
            asked,
            found = found.len(),
            "asked the peers for first answers the crash left unrecorded"
        );
        found
    }

    /// Retries until the replica has answered every delivery: skipping an entry would make
    /// this replica diverge. Only shutdown ends the loop early, as an error that stops the
    /// Raft node.
    async fn deliver_until_answered(
        &self,
        app: &mut OrderedConnection,
        deliveries: &[Delivery<'_>],
    ) -> io::Result<Vec<AppResponse>> {
        let metrics = &self.shared.metrics;
        let mut retry = Retry::new(self.shutdown.clone());
        let mut attempt = 1u64;
        let mut answered = Vec::with_capacity(deliveries.len());
        while answered.len() < deliveries.len() {
            let outcome = app.deliver(&deliveries[answered.len()..]).await;
            answered.extend(outcome.responses);
            let Some(e) = outcome.error else {
                self.shared.set_delivery_failing(false);
                continue;
            };
            metrics.app_delivery_failures.inc();
            self.shared.set_delivery_failing(true);
            let index = deliveries.get(answered.len()).map(|d| d.stamp.index);
            tracing::warn!(index, attempt, error = %e, "delivery to app failed; retrying, entries are never skipped");
            retry.wait("while the app was unreachable").await?;
            attempt += 1;
        }
        Ok(answered)
    }

    /// Retries until the replica took the checkpoint, as deliveries do: a replica that is
    /// down must cost a metric and retries, not the node. Only shutdown ends it early.
    /// Puts the replica, and Haven's own state, back to the checkpoint at `path`: the app
    /// first, so a crash in between leaves the old applied index on disk.
    async fn reset_to(
        &self,
        inner: &mut Inner,
        checkpoints: &Checkpoints,
        path: &Path,
        info: &CheckpointInfo,
    ) -> io::Result<()> {
        self.restore_until_done(checkpoints, path, info.index)
            .await?;
        inner.state = decode_state(&info.haven_state).map_err(io::Error::other)?;
        inner.persist()?;
        if let Some(ledger) = self.shared.answers.get() {
            ledger.lock_digests().clear();
        }
        self.shared.applied.send_replace(info.index);
        self.shared.metrics.applied_index.set(info.index as i64);
        Ok(())
    }

    async fn restore_until_done(
        &self,
        checkpoints: &Checkpoints,
        path: &Path,
        index: u64,
    ) -> io::Result<()> {
        let mut retry = Retry::new(self.shutdown.clone());
        loop {
            let Err(e) = checkpoints.restore(path, index).await else {
                return Ok(());
            };
            self.shared.metrics.app_delivery_failures.inc();
            tracing::warn!(index, error = %e, "restoring the replica from a checkpoint failed; retrying");
            retry.wait("during a checkpoint restore").await?;
        }
    }
}

/// Growing pauses between attempts that only shutdown interrupts.
struct Retry {
    backoff: Duration,
    shutdown: watch::Receiver<bool>,
}

impl Retry {
    fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self {
            backoff: RETRY_BACKOFF_MIN,
            shutdown,
        }
    }

    /// Waits before the next attempt; an error once the node is shutting down.
    async fn wait(&mut self, during: &str) -> io::Result<()> {
        tokio::select! {
            _ = tokio::time::sleep(self.backoff) => {}
            _ = self.shutdown.wait_for(|stop| *stop) => {
                return Err(io::Error::other(format!("node shutting down {during}")));
            }
        }
        self.backoff = (self.backoff * 2).min(RETRY_BACKOFF_MAX);
        Ok(())
    }
}

/// What applying one entry of a window takes.
enum Step {
    /// Not a client request (blank or membership entry).
    Internal,
    /// Send to the app.
    Deliver { stamp: Stamp, time_us: i64 },
    /// A retried `Idempotency-Key`: answer with the first outcome, found in the table
    /// (`Ok`) or at this position of the same window (`Err`).
    Replay {
        answer: Result<Delivered, usize>,
        time_us: i64,
    },
}

/// Decides, before anything is sent, what each entry of a window needs. Entry time only
/// moves forward along the log; it is committed to the state as each entry is recorded,
/// so a window cut short by shutdown leaves the state as it was.
fn plan_window(state: &ApplyState, window: &[EntryResponder<TypeConfig>]) -> Vec<Step> {
    let mut last_time_us = state.last_time_us;
    let mut keys_in_window: HashMap<&str, usize> = HashMap::new();
    let mut plan = Vec::with_capacity(window.len());
    for (position, (entry, _)) in window.iter().enumerate() {
        let EntryPayload::Normal(req) = &entry.payload else {
            plan.push(Step::Internal);
            continue;
        };
        let time_us = req.time_unix_us.max(last_time_us);
        last_time_us = time_us;
        let key = req.idempotency_key.as_deref();
        let earlier = key.and_then(|k| keys_in_window.get(k).copied());
        let stored = key.and_then(|k| state.idempotency.get(k));
        let step = match (stored, earlier) {
            (Some(stored), _) => Step::Replay {
                answer: Ok(Delivered {
                    index: stored.index,
                    response: stored.response.clone(),
                    replayed: true,
                }),
                time_us,
            },
            (None, Some(first)) => Step::Replay {
                answer: Err(first),
                time_us,
            },
            (None, None) => {
                if let Some(key) = key {
                    keys_in_window.insert(key, position);
                }
                let stamp = Stamp {
                    index: entry.log_id.index,
                    time_rfc3339: rfc3339(time_us),
                    seed: req.seed,
                };
                Step::Deliver { stamp, time_us }
            }
        };
        plan.push(step);
    }
    plan
}

/// The `(index, key)` of each keyed entry of a window that goes to the app.
fn keyed_deliveries(plan: &[Step], window: &[EntryResponder<TypeConfig>]) -> Vec<(u64, String)> {
    let keyed = |(step, (entry, _)): (&Step, &EntryResponder<TypeConfig>)| {
        let (Step::Deliver { .. }, EntryPayload::Normal(req)) = (step, &entry.payload) else {
            return None;
        };
        Some((entry.log_id.index, req.idempotency_key.clone()?))
    };
    plan.iter().zip(window).filter_map(keyed).collect()
}

impl Inner {
    /// Records an answer in the idempotency table when the request carries a key, and
    /// returns it with the journal record to write before anyone sees it.
    fn record(
        &mut self,
        req: &OrderedRequest,
        index: u64,
        time_us: i64,
        response: AppResponse,
    ) -> (Delivered, Option<outcomes::Record>) {
        let Some(key) = &req.idempotency_key else {
            let answer = Delivered {
                index,
                response,
                replayed: false,
            };
            return (answer, None);
        };
        let outcome = StoredOutcome {
            index,
            time_us,
            response: response.clone(),
        };
        self.state
            .idempotency
            .insert(key.clone(), outcome.clone(), self.limits);
        let record = outcomes::Record::Answer(outcomes::Answer {
            key: key.clone(),
            outcome,
        });
        let answer = Delivered {
            index,
            response,
            replayed: false,
        };
        (answer, Some(record))
    }

    /// The first answer to keyed entry `index` when the app may have answered it before a
    /// crash: from the journal, else from a peer, else (with a warning) the app's answer
    /// now. Unkeyed entries and fresh deliveries keep the app's answer.
    fn first_answer(
        &mut self,
        index: u64,
        req: &OrderedRequest,
        response: AppResponse,
        from_peers: &HashMap<u64, AppResponse>,
    ) -> AppResponse {
        let Some(key) = req.idempotency_key.as_deref() else {
            return response;
        };
        let journaled = self.recovered.answers.remove(&index);
        let first = match (journaled, from_peers.get(&index)) {
            (Some(journaled), _) if journaled.key == key => journaled.outcome.response,
            (Some(journaled), _) => {
                tracing::error!(index, journaled = %journaled.key, entry = %key, "the outcome journal names another key for this entry; keeping the app's answer");
                return response;
            }
            (None, Some(peer)) => peer.clone(),
            (None, None) if self.recovered.uncertain(index) => {
                tracing::warn!(
                    index,
                    "no peer holds the first answer to an entry the app may have answered before the crash; recording the app's answer now, which may differ from the other nodes' if the app does not honour Haven-Index"
                );
                return response;
            }
            (None, None) => return response,
        };
        if (first.status, &first.body) != (response.status, &response.body) {
            tracing::warn!(
                index,
                first = first.status,
                again = response.status,
                "the app answered an entry delivered again after a crash differently from its first delivery (does it honour Haven-Index?); the idempotency table keeps the first answer"
            );
        }
        first
    }

    /// Saves the state; the journal's records are then in it.
    fn persist(&mut self) -> io::Result<()> {
        let payload = postcard::to_allocvec(&self.state).map_err(io::Error::other)?;
        self.slots.save(&payload)?;
        self.journal.reset()?;
        let applied = self.state.last_applied.as_ref().map_or(0, |l| l.index);
        self.recovered.covered_upto(applied);
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

fn decode_state(payload: &[u8]) -> Result<ApplyState, ApplyStateError> {
    postcard::from_bytes(payload).map_err(|e| ApplyStateError::Corrupt {
        reasons: format!("undecodable state: {e}"),
    })
}

/// Entry time as `Haven-Time`: RFC 3339, UTC, microseconds.
pub fn rfc3339(time_us: i64) -> String {
    let time = chrono::DateTime::from_timestamp_micros(time_us).unwrap_or_default();
    time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A checkpoint is what openraft calls a snapshot; it moves as a file, never whole in
/// memory.
pub type SnapshotData = CheckpointFile;
/// The Raft node of a service: Haven's state machine over the replica.
/// Peers back from a crash ask this replica for the answers it recorded.
impl RecordedAnswers for StateMachine {
    /// This replica's recorded answers to the entries `(index, key)`, for a peer that
    /// lost its own; `None` where this node has not applied the entry (within
    /// [`FIRST_ANSWERS_WAIT`]) or no longer holds the key.
    fn first_answers<'a>(
        &'a self,
        asked: &'a [(u64, String)],
    ) -> BoxFuture<'a, Vec<Option<AppResponse>>> {
        async move {
            let highest = asked.iter().map(|(index, _)| *index).max().unwrap_or(0);
            self.replica
                .shared
                .wait_applied(highest, FIRST_ANSWERS_WAIT)
                .await;
            let inner = self.replica.inner.lock();
            let Ok(inner) = tokio::time::timeout(FIRST_ANSWERS_WAIT, inner).await else {
                return vec![None; asked.len()];
            };
            let table = &inner.state.idempotency;
            let answer = |(index, key): &(u64, String)| {
                let stored = table.get(key).filter(|o| o.index == *index)?;
                Some(stored.response.clone())
            };
            asked.iter().map(answer).collect()
        }
        .boxed()
    }

    fn answer_digests(&self, ranges: &[(u64, u64)]) -> Digests {
        match self.replica.shared.answers.get() {
            Some(ledger) => ledger.lock_digests().digests(ranges),
            None => AnswerDigests::default().digests(ranges),
        }
    }
}

pub type Raft = haven_consensus::types::RaftOf<StateMachine>;
type Snapshot = SnapshotOf<TypeConfig, SnapshotData>;

fn checkpoints_off() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "checkpoints are off ([checkpoints] is not configured); the log is never compacted",
    )
}

impl StateMachine {
    fn checkpoints(&self) -> io::Result<&Arc<Checkpoints>> {
        self.checkpoints.as_ref().ok_or_else(checkpoints_off)
    }

    /// Applied progress, for the checkpoint policy.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.replica.shared.applied.subscribe()
    }
}

/// Haven's replicated state as a checkpoint carries it.
fn encode_state(state: &ApplyState) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(state).map_err(io::Error::other)
}

/// The openraft view of a checkpoint file.
pub(crate) fn snapshot_of(info: &CheckpointInfo) -> io::Result<Snapshot> {
    let state = decode_state(&info.haven_state).map_err(io::Error::other)?;
    let last = state
        .last_applied
        .filter(|l| l.index == info.index && l.leader_id.term == info.term);
    if last.is_none() {
        return Err(io::Error::other(format!(
            "checkpoint {} records index {} term {} but Haven state at {:?}",
            info.path.display(),
            info.index,
            info.term,
            state.last_applied
        )));
    }
    Ok(Snapshot {
        meta: SnapshotMeta {
            last_log_id: last,
            last_membership: state.membership,
        },
        snapshot: CheckpointFile {
            path: info.path.clone(),
        },
    })
}

/// A poisoned baseline slot still holds a valid value; keep serving.
fn lock<T>(slot: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    slot.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a checkpoint taken now stands: the last applied entry, with Haven's own state.
fn checkpoint_position(inner: &Inner) -> io::Result<Position> {
    let last = inner
        .state
        .last_applied
        .ok_or_else(|| io::Error::other("nothing applied yet; no checkpoint to take"))?;
    Ok(Position {
        index: last.index,
        term: last.leader_id.term,
        entry_time_us: inner.state.last_time_us,
        haven_state: encode_state(&inner.state)?,
    })
}

/// A checkpoint sealed while deliveries were paused, or a copy to seal once they resume.
enum Sealing {
    Done(io::Result<CheckpointInfo>),
    AfterThePause(Staged, Position),
}

/// Whether another member's replica can answer this node's clients while its own is
/// paused (`ingress`'s stand-in): then a managed state is sealed in place, a longer pause
/// than copying it first, but without writing a copy of the whole state to disk.
fn others_can_stand_in(inner: &Inner) -> bool {
    inner.state.membership.membership().nodes().count() > 1
}

impl StateMachine {
    /// Deliveries pause while the replica's state is staged, or, when peers can answer
    /// this node's clients meanwhile, until a managed state is sealed in place.
    async fn take_checkpoint(&self) -> io::Result<Snapshot> {
        let checkpoints = self.checkpoints()?.clone();
        let metrics = &self.replica.shared.metrics;
        // Set before the lock is taken: requests arriving while the entries in flight
        // drain would otherwise wait out the whole pause.
        let paused = self.replica.shared.pause_for_checkpoint();
        self.replica.shared.drain_waiters().await;
        let inner = self.replica.inner.lock().await;
        let since = Instant::now();
        let position = checkpoint_position(&inner)?;
        let staged = checkpoints
            .stage(position.index, others_can_stand_in(&inner))
            .await?;
        let sealing = match staged.is_copy() {
            true => Sealing::AfterThePause(staged, position),
            false => Sealing::Done(checkpoints.seal(staged, position).await),
        };
        drop((inner, paused));
        metrics
            .checkpoint_pause_seconds
            .inc_by(since.elapsed().as_secs_f64());
        let info = match sealing {
            Sealing::Done(sealed) => sealed?,
            Sealing::AfterThePause(staged, position) => checkpoints.seal(staged, position).await?,
        };
        metrics.checkpoints_written.inc();
        snapshot_of(&info)
    }

    /// What openraft gets when a checkpoint fails: the newest one that exists, or one that
    /// covers nothing. An error would stop the Raft node, and an app that is down or slow
    /// must cost a metric and a retry, never the node.
    async fn previous_checkpoint(&self) -> io::Result<Snapshot> {
        let newest = match &self.checkpoints {
            Some(checkpoints) => checkpoints.newest().await?,
            None => None,
        };
        match newest {
            Some(info) => snapshot_of(&info),
            None => Ok(Snapshot {
                meta: SnapshotMeta::default(),
                snapshot: CheckpointFile {
                    path: std::path::PathBuf::new(),
                },
            }),
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        match self.take_checkpoint().await {
            Ok(snapshot) => Ok(snapshot),
            Err(e) => {
                self.replica.shared.metrics.checkpoint_failures.inc();
                tracing::warn!(error = %e, "checkpoint failed; keeping the previous one, will retry");
                self.previous_checkpoint().await
            }
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let inner = self.replica.inner.lock().await;
        Ok((inner.state.last_applied, inner.state.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        while let Some(item) = entries.try_next().await? {
            self.handover.hand_over(item).await?;
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    /// The replica is restored before the applied index moves: a crash in between leaves
    /// the old index on disk, and openraft installs the newest checkpoint again at start.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let checkpoints = self.checkpoints()?.clone();
        let info = checkpoints.verify(&snapshot.path).await?;
        let installed = snapshot_of(&info)?;
        if installed.meta.last_log_id != meta.last_log_id {
            return Err(io::Error::other(format!(
                "checkpoint {} is at {:?}, openraft expected {:?}",
                snapshot.path.display(),
                installed.meta.last_log_id,
                meta.last_log_id
            )));
        }
        self.drain().await?;
        let replica = &self.replica;
        let mut inner = replica.inner.lock().await;
        replica
            .reset_to(&mut inner, &checkpoints, &snapshot.path, &info)
            .await?;
        replica.shared.metrics.checkpoints_installed.inc();
        tracing::info!(index = info.index, "replica restored from checkpoint");
        Ok(())
    }

    /// Verified in full (also what openraft ships to a follower): a damaged newest
    /// checkpoint gives way to an older intact one.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(None);
        };
        checkpoints
            .newest_verified()
            .await?
            .as_ref()
            .map(snapshot_of)
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::pipeline::tests::answering_app;
    use crate::app::pipeline::tests::path_echo_app;

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
    fn state_round_trips_through_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        let limits = IdempotencyLimits {
            max_keys: 10,
            retention_us: 10,
        };
        let mut state = ApplyState {
            last_time_us: 42,
            ..ApplyState::default()
        };
        state.idempotency.insert("k".into(), outcome(7, 42), limits);
        let (slots, saved) = StateSlots::open(dir.path()).unwrap();
        assert!(saved.is_none());
        let (journal, recovered) = OutcomeJournal::open(dir.path(), 0).unwrap();
        let mut inner = Inner {
            state,
            slots,
            journal,
            recovered,
            app: OrderedConnection::new("http://127.0.0.1:1", Duration::from_millis(10)),
            limits,
            last_persist: Instant::now(),
        };
        inner.persist().unwrap();
        let saved = StateSlots::open(dir.path()).unwrap().1.unwrap();
        let loaded = decode_state(&saved).unwrap();
        assert_eq!(loaded.last_time_us, 42);
        assert_eq!(loaded.idempotency.get("k").map(|o| o.index), Some(7));
    }

    fn committed(index: u64, body: bytes::Bytes) -> EntryResponder<TypeConfig> {
        let request = OrderedRequest {
            body,
            ..crate::app::pipeline::tests::request(index)
        };
        use openraft::vote::RaftLeaderIdExt;
        let leader = <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(1, 1);
        let entry = haven_consensus::types::Entry {
            log_id: LogId::new(leader, index),
            payload: EntryPayload::Normal(request),
        };
        (entry, None)
    }

    /// A state machine over `dir` delivering to the app at `url`; keep the sender, or
    /// the machine shuts down.
    fn machine_for(dir: &Path, url: &str) -> (watch::Sender<bool>, StateMachine) {
        let (stop, shutdown) = watch::channel(false);
        let limits = IdempotencyLimits {
            max_keys: 10,
            retention_us: 10,
        };
        let connection = OrderedConnection::new(url, Duration::from_secs(60));
        let metrics = Metrics::new().unwrap();
        let machine = StateMachine::open(
            dir,
            connection,
            limits,
            metrics,
            shutdown,
            None,
            &Workers::new(),
        )
        .unwrap();
        (stop, machine)
    }

    /// openraft's `apply` returns once entries are handed over, even while the app has
    /// not answered; the replica's applied index moves only with the answers, in order.
    #[tokio::test]
    async fn apply_hands_over_and_the_replica_catches_up_in_log_order() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(tokio::sync::Notify::new());
        let (url, app) = path_echo_app(None, Some(gate.clone())).await;
        let (_stop, mut machine) = machine_for(dir.path(), &url);
        let shared = machine.shared();
        let mut first = shared.register(RequestTag { origin: 1, seq: 0 });
        for call in 0..3u64 {
            let entries = (2 * call..2 * call + 2).map(|i| Ok(committed(i, bytes::Bytes::new())));
            let handed_over = machine.apply(futures::stream::iter(entries));
            tokio::time::timeout(Duration::from_secs(2), handed_over)
                .await
                .expect("apply waited for the app")
                .unwrap();
        }
        assert!(first.try_recv().is_err(), "nothing is answered yet");
        gate.notify_one();
        tokio::time::timeout(Duration::from_secs(5), machine.drain())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(shared.applied_index(), 5);
        let answered = first.try_recv().unwrap();
        assert_eq!(
            (answered.index, &answered.response.body[..]),
            (0, &b"/r/0"[..])
        );
        drop(machine);
        let expected: Vec<String> = (0..6).map(|i| format!("/r/{i}")).collect();
        assert_eq!(app.await.unwrap(), expected);
    }

    fn keyed(index: u64, key: &str) -> EntryResponder<TypeConfig> {
        let (mut entry, responder) = committed(index, bytes::Bytes::new());
        if let EntryPayload::Normal(request) = &mut entry.payload {
            request.idempotency_key = Some(key.to_string());
        }
        (entry, responder)
    }

    /// Applies a retry of `key` at `index` and returns the answer its client gets.
    async fn retry(machine: &mut StateMachine, index: u64, key: &str) -> Delivered {
        let retry = keyed(index, key);
        let EntryPayload::Normal(request) = &retry.0.payload else {
            unreachable!()
        };
        let mut answer = machine.shared().register(request.tag);
        apply_all(machine, vec![retry]).await;
        answer.try_recv().unwrap()
    }

    async fn apply_all(machine: &mut StateMachine, entries: Vec<EntryResponder<TypeConfig>>) {
        let entries = futures::stream::iter(entries.into_iter().map(Ok));
        machine.apply(entries).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), machine.drain())
            .await
            .unwrap()
            .unwrap();
    }

    /// A node killed before saving its state delivers the last entries again; an app that
    /// does not honour `Haven-Index` answers them differently (a duplicate rejected). The
    /// idempotency table must keep the first answer, which every other node holds and
    /// which the client was given.
    #[tokio::test]
    async fn a_redelivery_after_a_crash_keeps_the_first_answer_of_each_key() {
        let dir = tempfile::tempdir().unwrap();
        let (first_url, _first_app) = path_echo_app(None, None).await;
        let (stop, mut machine) = machine_for(dir.path(), &first_url);
        apply_all(
            &mut machine,
            (0..4).map(|i| keyed(i, &format!("k{i}"))).collect(),
        )
        .await;
        drop((machine, stop));
        // The crash came before the 100 ms save: no saved state, only the journal.
        for slot in ["state.0", "state.1"] {
            let _ = std::fs::remove_file(dir.path().join(slot));
        }

        let rejecting = |_: &str| ("400 Bad Request", "UNIQUE constraint failed".to_string());
        let (again_url, again_app) = answering_app(None, None, rejecting).await;
        let (_stop, mut machine) = machine_for(dir.path(), &again_url);
        assert_eq!(machine.shared().applied_index(), 0, "nothing was saved");
        apply_all(
            &mut machine,
            (0..4).map(|i| keyed(i, &format!("k{i}"))).collect(),
        )
        .await;
        let answer = retry(&mut machine, 4, "k2").await;
        assert!(answer.replayed);
        assert_eq!(
            (
                answer.index,
                answer.response.status,
                &answer.response.body[..]
            ),
            (2, 200, &b"/r/2"[..]),
            "the retry got the redelivery's answer, not the first one"
        );
        drop(machine);
        assert_eq!(
            again_app.await.unwrap().len(),
            4,
            "the app saw each entry again"
        );
    }

    /// Answers every entry it is asked about as the path-echo app did the first time.
    struct EchoingPeers {
        asked: Mutex<Vec<u64>>,
    }

    impl AskPeers for EchoingPeers {
        fn first_answers(
            &self,
            asked: Vec<(u64, String)>,
        ) -> futures::future::BoxFuture<'static, HashMap<u64, AppResponse>> {
            let mut seen = self.asked.lock().unwrap();
            seen.extend(asked.iter().map(|(index, _)| *index));
            let answer = |(index, _)| {
                let body = bytes::Bytes::from(format!("/r/{index}"));
                let response = AppResponse {
                    status: 200,
                    headers: Vec::new(),
                    body,
                };
                (index, response)
            };
            let found = asked.into_iter().map(answer).collect();
            Box::pin(async move { found })
        }
    }

    /// A node killed while its app was answering a window has no record of those answers:
    /// they come from the peers, and only for the keyed entries of that window.
    #[tokio::test]
    async fn answers_a_crash_left_unrecorded_come_from_the_peers() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = OutcomeJournal::open(dir.path(), 0).unwrap();
        let cut_short = outcomes::Record::Delivering { first: 0, last: 2 };
        journal.append(&[cut_short]).unwrap();
        drop(journal);

        let rejecting = |_: &str| ("400 Bad Request", "UNIQUE constraint failed".to_string());
        let (url, _app) = answering_app(None, None, rejecting).await;
        let (_stop, mut machine) = machine_for(dir.path(), &url);
        let peers = Arc::new(EchoingPeers {
            asked: Mutex::new(Vec::new()),
        });
        machine.set_peers(peers.clone());
        apply_all(
            &mut machine,
            (0..4).map(|i| keyed(i, &format!("k{i}"))).collect(),
        )
        .await;
        assert_eq!(
            *peers.asked.lock().unwrap(),
            [0, 1, 2],
            "3 never reached the app"
        );
        let answer = retry(&mut machine, 4, "k1").await;
        assert_eq!(
            (answer.response.status, &answer.response.body[..]),
            (200, &b"/r/1"[..])
        );
        let fresh = machine.first_answers(&[(3, "k3".to_string())]).await;
        assert_eq!(
            fresh[0].as_ref().map(|r| r.status),
            Some(400),
            "a fresh delivery keeps the app's answer"
        );
    }

    /// Entries the app has not taken hold at most [`APPLY_QUEUE_BYTES`] of requests:
    /// beyond that `apply` waits instead of queueing more.
    #[tokio::test]
    async fn handed_over_bytes_are_bounded_while_the_app_does_not_answer() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(tokio::sync::Notify::new());
        let (url, _app) = path_echo_app(None, Some(gate)).await;
        let (_stop, mut machine) = machine_for(dir.path(), &url);
        // One shared buffer: the entries count 20 MiB each but the test holds 20 MiB.
        let body = bytes::Bytes::from(vec![b'x'; 20 << 20]);
        let fits = (0..3).map(|i| Ok(committed(i, body.clone())));
        let handed_over = machine.apply(futures::stream::iter(fits));
        tokio::time::timeout(Duration::from_secs(2), handed_over)
            .await
            .expect("60 MiB fit in the queue")
            .unwrap();
        let beyond = machine.apply(futures::stream::iter([Ok(committed(3, body))]));
        let waited = tokio::time::timeout(Duration::from_millis(500), beyond).await;
        assert!(
            waited.is_err(),
            "a fourth 20 MiB entry must wait for delivery"
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
