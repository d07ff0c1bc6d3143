//! The sending side of node-to-node RPC: one multiplexed TCP connection per peer and lane,
//! reconnected on demand. Appends are pipelined: a stream's requests go out as openraft
//! produces them, and the replies, which the peer returns in order, are matched by id.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use futures::Stream;
use futures::StreamExt;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use tokio::io::AsyncWriteExt;
use tokio::io::BufWriter;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::net::Dial;
use super::net::Tcp;
use super::net::Writer;
use super::reconnect::PeerHealth;
use super::wire;
use super::wire::RpcReply;
use super::wire::RpcRequest;
use crate::apply::SnapshotData;
use crate::metrics::Metrics;
use crate::types::NodeId;
use crate::types::PeerNode;
use crate::types::TypeConfig;

/// Appends in flight on one stream before the sender waits for replies.
const PIPELINE_DEPTH: usize = 64;
/// Frames queued for one connection's writer.
const WRITE_QUEUE_FRAMES: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Floor for waiting on an append reply: openraft asks for one heartbeat interval, but a
/// follower's fsync on a busy two-core machine can take longer, and a spurious timeout
/// restarts the replication stream.
const APPEND_REPLY_TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// How often the pending map is swept of replies nobody waits for any more.
const PENDING_SWEEP_EVERY: u64 = 1024;
/// A connection that owes replies and delivered none for this long is dead: a peer host
/// or middlebox that vanished without a reset, which TCP itself notices only after many
/// minutes. Long enough that a peer slowed by fsync or CPU starvation is not cut off.
const SILENCE_LIMIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("connection to {addr} lost")]
    ConnectionLost { addr: String },
    #[error("peer {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("peer {addr} sent an unexpected reply")]
    UnexpectedReply { addr: String },
}

/// Separate connections keep heartbeats and client forwards from queueing behind large
/// append batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    Replication,
    Heartbeat,
    Client,
    /// Checkpoint transfers: megabytes at a time, kept off the append stream.
    Snapshot,
}

/// The replies a connection owes, and since when it has owed them without delivering any.
#[derive(Default)]
struct Pending {
    waiters: BTreeMap<u64, oneshot::Sender<RpcReply>>,
    silent_since: Option<tokio::time::Instant>,
}

/// One live connection and the replies it still owes.
struct Connection {
    addr: String,
    frames: mpsc::Sender<Vec<u8>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// The reader and writer tasks, stopped on close so a stalled socket is released.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Connection {
    async fn open(dialer: &dyn Dial, addr: &str) -> Result<Arc<Self>, RpcError> {
        let unreachable = |reason: String| RpcError::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let (mut reader, writer) = tokio::time::timeout(CONNECT_TIMEOUT, dialer.dial(addr))
            .await
            .map_err(|_| unreachable(format!("connect timed out after {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let (frames, rx) = mpsc::channel(WRITE_QUEUE_FRAMES);
        let conn = Arc::new(Self {
            addr: addr.to_string(),
            frames,
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        let writer = tokio::spawn(write_loop(BufWriter::new(writer), rx, conn.clone()));
        let reader_conn = conn.clone();
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                match wire::read_frame::<_, RpcReply>(&mut reader, &mut buf).await {
                    Ok((id, reply)) => reader_conn.deliver(id, reply),
                    Err(e) => {
                        tracing::debug!(addr = %reader_conn.addr, error = %e, "raft connection closed");
                        break;
                    }
                }
            }
            reader_conn.close();
        });
        let mut tasks = conn.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.extend([writer.abort_handle(), reader.abort_handle()]);
        drop(tasks);
        Ok(conn)
    }

    fn deliver(&self, id: u64, reply: RpcReply) {
        let mut pending = self.lock_pending();
        let waiter = pending.waiters.remove(&id);
        pending.silent_since = (!pending.waiters.is_empty()).then(tokio::time::Instant::now);
        drop(pending);
        if let Some(tx) = waiter {
            let _ = tx.send(reply);
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Dropping the senders wakes every waiter with an error.
        self.lock_pending().waiters.clear();
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Called when a reply timed out: closes the connection if it has owed replies and
    /// delivered none for [`SILENCE_LIMIT`], so the next request reconnects. A peer that
    /// answers other requests meanwhile is alive, and its connection is kept.
    fn close_if_silent(&self) {
        let silent_for = self
            .lock_pending()
            .silent_since
            .map(|since| since.elapsed());
        if silent_for.is_some_and(|d| d >= SILENCE_LIMIT) && !self.is_closed() {
            tracing::warn!(addr = %self.addr, ?silent_for, "peer answers nothing; reconnecting");
            self.close();
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a request; the receiver yields its reply.
    async fn send(&self, request: &RpcRequest) -> Result<oneshot::Receiver<RpcReply>, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.lock_pending();
            if id.is_multiple_of(PENDING_SWEEP_EVERY) {
                pending.waiters.retain(|_, waiter| !waiter.is_closed());
            }
            pending.waiters.insert(id, tx);
            pending
                .silent_since
                .get_or_insert_with(tokio::time::Instant::now);
        }
        self.send_frame(id, request).await?;
        Ok(rx)
    }

    /// Sends a request that has no reply.
    async fn send_oneway(&self, request: &RpcRequest) -> Result<(), RpcError> {
        self.send_frame(0, request).await
    }

    async fn send_frame(&self, id: u64, request: &RpcRequest) -> Result<(), RpcError> {
        let lost = || RpcError::ConnectionLost {
            addr: self.addr.clone(),
        };
        if self.is_closed() {
            return Err(lost());
        }
        let frame = wire::encode(id, request).map_err(|e| RpcError::Unreachable {
            addr: self.addr.clone(),
            reason: e.to_string(),
        })?;
        self.frames.send(frame).await.map_err(|_| lost())
    }
}

/// Sends the hello, then every queued frame, until the queue or the socket closes.
async fn write_loop(
    mut writer: BufWriter<Writer>,
    rx: mpsc::Receiver<Vec<u8>>,
    conn: Arc<Connection>,
) {
    let result = async {
        writer.write_all(wire::HELLO).await?;
        wire::write_frames(&mut writer, rx).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(addr = %conn.addr, error = %e, "raft connection write failed");
    }
    conn.close();
}

/// A peer address and its current connection, replaced when it breaks.
pub struct PeerLink {
    addr: String,
    dialer: Arc<dyn Dial>,
    /// Shared by every lane to the same address: one failed dial pauses them all.
    health: Arc<PeerHealth>,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    next_stream: AtomicU64,
}

impl PeerLink {
    fn new(addr: String, dialer: Arc<dyn Dial>, health: Arc<PeerHealth>) -> Self {
        Self {
            addr,
            dialer,
            health,
            conn: tokio::sync::Mutex::new(None),
            next_stream: AtomicU64::new(1),
        }
    }

    /// The live connection, or a new one once the peer's backoff allows a dial. A caller
    /// with a `deadline` that the backoff outlasts fails at once with `Unreachable`.
    async fn connection(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Arc<Connection>, RpcError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(conn.clone());
        }
        if let Err(next) = self.health.wait_turn(deadline).await {
            let next_in = next.saturating_duration_since(tokio::time::Instant::now());
            return Err(RpcError::Unreachable {
                addr: self.addr.clone(),
                reason: format!("peer is down; next dial in {next_in:?}"),
            });
        }
        self.health.attempting();
        match Connection::open(self.dialer.as_ref(), &self.addr).await {
            Ok(conn) => {
                self.health.connected();
                *slot = Some(conn.clone());
                Ok(conn)
            }
            Err(e) => {
                self.health.failed(&e.to_string());
                Err(e)
            }
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends a request; the caller bounds the wait for its reply.
    pub async fn send(
        &self,
        request: &RpcRequest,
    ) -> Result<oneshot::Receiver<RpcReply>, RpcError> {
        self.connection(None).await?.send(request).await
    }

    /// Like [`Self::send`], but fails at once with `Unreachable` while the peer is backing
    /// off instead of waiting for its turn. For checkpoint transfers: openraft then
    /// retries later with the newest checkpoint, rather than this one holding on to the
    /// checkpoint it had when the peer went down.
    pub async fn send_or_fail_fast(
        &self,
        request: &RpcRequest,
    ) -> Result<oneshot::Receiver<RpcReply>, RpcError> {
        let now = tokio::time::Instant::now();
        self.connection(Some(now)).await?.send(request).await
    }

    /// One request, one reply, bounded by `timeout`.
    pub async fn call(
        &self,
        request: &RpcRequest,
        timeout: Duration,
    ) -> Result<RpcReply, RpcError> {
        let timed_out = || RpcError::Timeout {
            addr: self.addr.clone(),
            timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let sent = async {
            let conn = self.connection(Some(deadline)).await?;
            Ok::<_, RpcError>((conn.send(request).await?, conn))
        };
        let (rx, conn) = tokio::time::timeout_at(deadline, sent)
            .await
            .map_err(|_| timed_out())??;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(RpcError::ConnectionLost {
                addr: self.addr.clone(),
            }),
            Err(_) => {
                conn.close_if_silent();
                Err(timed_out())
            }
        }
    }
}

/// Links by peer address and lane, and each address's dial history.
#[derive(Default)]
struct LinkMap {
    links: BTreeMap<(String, Lane), Arc<PeerLink>>,
    health: BTreeMap<String, Arc<PeerHealth>>,
}

/// Every link this node holds, shared by openraft's clients and the ingress.
#[derive(Clone)]
pub struct Transport {
    links: Arc<Mutex<LinkMap>>,
    dialer: Arc<dyn Dial>,
    metrics: Metrics,
}

impl Transport {
    /// Plain TCP to peers.
    pub fn tcp(metrics: Metrics) -> Self {
        Self::with_dialer(Arc::new(Tcp), metrics)
    }

    pub fn with_dialer(dialer: Arc<dyn Dial>, metrics: Metrics) -> Self {
        Self {
            links: Arc::default(),
            dialer,
            metrics,
        }
    }

    pub fn link(&self, addr: &str, lane: Lane) -> Arc<PeerLink> {
        let mut map = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = map.links.get(&(addr.to_string(), lane)) {
            return link.clone();
        }
        let health = map
            .health
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(PeerHealth::new(addr.to_string(), self.metrics.clone())))
            .clone();
        let link = Arc::new(PeerLink::new(addr.to_string(), self.dialer.clone(), health));
        map.links.insert((addr.to_string(), lane), link.clone());
        link
    }
}

impl RaftNetworkFactory<TypeConfig> for Transport {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> PeerClient {
        PeerClient {
            target,
            link: self.link(&node.raft_addr, Lane::Replication),
            links: self.clone(),
        }
    }

    async fn new_heartbeat_client(&mut self, target: NodeId, node: &PeerNode) -> PeerClient {
        PeerClient {
            target,
            link: self.link(&node.raft_addr, Lane::Heartbeat),
            links: self.clone(),
        }
    }
}

/// openraft's view of one peer.
pub struct PeerClient {
    target: NodeId,
    link: Arc<PeerLink>,
    links: Transport,
}

fn to_rpc_error(e: RpcError) -> RPCError<TypeConfig> {
    match e {
        RpcError::Unreachable { .. } => RPCError::Unreachable(Unreachable::from_string(e)),
        _ => RPCError::Network(NetworkError::from_string(e)),
    }
}

/// An error the peer's Raft returned. openraft's own warning for it is filtered out with
/// the flood of unreachable-peer warnings, so the transport logs it.
fn remote_error(addr: &str, remote: String) -> RPCError<TypeConfig> {
    tracing::warn!(peer = addr, error = %remote, "peer's raft refused a request");
    RPCError::Network(NetworkError::from_string(remote))
}

impl PeerClient {
    /// One request and its reply; `expect` takes the kind of reply the request calls for.
    async fn call<T>(
        &self,
        request: RpcRequest,
        option: &RPCOption,
        expect: fn(RpcReply) -> Option<Result<T, String>>,
    ) -> Result<T, RPCError<TypeConfig>> {
        let reply = self
            .link
            .call(&request, option.hard_ttl())
            .await
            .map_err(to_rpc_error)?;
        match expect(reply) {
            Some(Ok(resp)) => Ok(resp),
            Some(Err(remote)) => Err(remote_error(&self.link.addr, remote)),
            None => Err(to_rpc_error(RpcError::UnexpectedReply {
                addr: self.link.addr.clone(),
            })),
        }
    }
}

fn vote_reply(reply: RpcReply) -> Option<Result<VoteResponse<TypeConfig>, String>> {
    match reply {
        RpcReply::Vote(vote) => Some(vote),
        _ => None,
    }
}

/// Turns one append reply into openraft's stream item.
fn append_result(
    reply: Result<Result<RpcReply, oneshot::error::RecvError>, tokio::time::error::Elapsed>,
    addr: &str,
    timeout: Duration,
) -> Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>> {
    let addr = addr.to_string();
    match reply {
        Err(_) => Err(to_rpc_error(RpcError::Timeout { addr, timeout })),
        Ok(Err(_)) => Err(to_rpc_error(RpcError::ConnectionLost { addr })),
        Ok(Ok(RpcReply::Append(Ok(result)))) => Ok(result),
        Ok(Ok(RpcReply::Append(Err(remote)))) => Err(remote_error(&addr, remote)),
        Ok(Ok(_)) => Err(to_rpc_error(RpcError::UnexpectedReply { addr })),
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let addr = self.link.addr.clone();
        let input = futures::stream::iter([rpc]);
        let mut output = self.stream_append(input, option).await?;
        let first = output.next().await;
        match first {
            Some(Ok(Ok(acked))) if acked != last => {
                Ok(AppendEntriesResponse::PartialSuccess(acked))
            }
            Some(Ok(result)) => Ok(result.into()),
            Some(Err(e)) => Err(e),
            None => Err(to_rpc_error(RpcError::ConnectionLost { addr })),
        }
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        async move {
            let conn = self.link.connection(None).await.map_err(to_rpc_error)?;
            let stream = self.link.next_stream.fetch_add(1, Ordering::Relaxed);
            let (replies_tx, replies_rx) = mpsc::channel(PIPELINE_DEPTH);
            tokio::spawn(pump_appends(conn.clone(), stream, input, replies_tx));
            let timeout = option.hard_ttl().max(APPEND_REPLY_TIMEOUT_MIN);
            let addr = self.link.addr.clone();
            let output = futures::stream::unfold(Some(replies_rx), move |state| {
                let addr = addr.clone();
                let conn = conn.clone();
                async move {
                    let mut replies = state?;
                    let reply = replies.recv().await?;
                    let reply = tokio::time::timeout(timeout, reply).await;
                    if reply.is_err() {
                        conn.close_if_silent();
                    }
                    let item = append_result(reply, &addr, timeout);
                    let keep_going = matches!(item, Ok(Ok(_)));
                    Some((item, keep_going.then_some(replies)))
                }
            });
            let output: BoxStream<'s, _> = Box::pin(output);
            Ok(output)
        }
        .boxed()
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RpcRequest::Vote(rpc), &option, vote_reply).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RpcRequest::PreVote(rpc), &option, vote_reply)
            .await
    }

    /// Asked by a leader handing over (`super::step_aside`): the target campaigns at once.
    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let expect = |reply| match reply {
            RpcReply::TransferLeader(answer) => Some(answer),
            _ => None,
        };
        self.call(RpcRequest::TransferLeader(req), &option, expect)
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tracing::info!(target = self.target, meta = %snapshot.meta, "sending checkpoint");
        let link = self.links.link(&self.link.addr, Lane::Snapshot);
        super::snapshot::send(&link, vote, snapshot, cancel).await
    }
}

/// Describes a gap between an append's `prev_log_id` and its first entry. openraft
/// (0.10.0-alpha.37) can resume a replication stream planned before a log purge and read
/// only the entries that survived it; sent, they would leave a hole in the follower's
/// log. Failing the stream instead makes openraft plan again, with a checkpoint.
fn gap_in(req: &AppendEntriesRequest<TypeConfig>) -> Option<String> {
    let first = req.entries.first()?.log_id.index;
    let expected = req.prev_log_id.map_or(0, |p| p.index + 1);
    (first != expected).then(|| format!("entries start at {first}, expected {expected}"))
}

/// Sends a stream's appends as they come and queues their reply receivers, in order, for
/// the output stream. Stops when the input ends, the connection breaks, or the output side
/// is dropped.
async fn pump_appends<S>(
    conn: Arc<Connection>,
    stream: u64,
    mut input: S,
    replies: mpsc::Sender<oneshot::Receiver<RpcReply>>,
) where
    S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
{
    loop {
        let next = tokio::select! {
            biased;
            next = input.next() => next,
            _ = replies.closed() => None,
        };
        let Some(req) = next else { break };
        if let Some(gap) = gap_in(&req) {
            tracing::warn!(
                stream,
                gap,
                "refusing to send appends after a gap; replication will re-plan"
            );
            // A receiver whose sender is gone: the output yields an error for it.
            let _ = replies.send(oneshot::channel().1).await;
            break;
        }
        let Ok(rx) = conn.send(&RpcRequest::Append { stream, req }).await else {
            break;
        };
        if replies.send(rx).await.is_err() {
            break;
        }
    }
    let _ = conn.send_oneway(&RpcRequest::EndStream { stream }).await;
}

#[cfg(test)]
mod tests {
    use openraft::RaftTypeConfig;
    use openraft::entry::RaftEntry;
    use openraft::vote::RaftLeaderIdExt;

    use super::*;
    use crate::types::Entry;
    use crate::types::LogId;
    use crate::types::Vote;

    fn log_id(index: u64) -> LogId {
        LogId::new(
            <TypeConfig as RaftTypeConfig>::LeaderId::new_committed(1, 1),
            index,
        )
    }

    fn append(prev: Option<u64>, first: u64, count: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new(1, 1),
            prev_log_id: prev.map(log_id),
            leader_commit: None,
            entries: (first..first + count)
                .map(|i| Entry::new_blank(log_id(i)))
                .collect(),
        }
    }

    /// The shape openraft produced after a purge raced a resumed stream (kill -9 test):
    /// `prev` 2, entries from 271. It must never reach the follower.
    #[test]
    fn appends_after_a_gap_are_caught() {
        assert_eq!(
            gap_in(&append(Some(2), 271, 3)).as_deref(),
            Some("entries start at 271, expected 3")
        );
        assert_eq!(gap_in(&append(Some(2), 3, 3)), None);
        assert_eq!(gap_in(&append(None, 0, 1)), None);
        assert_eq!(
            gap_in(&append(Some(9), 0, 0)),
            None,
            "a heartbeat has no entries"
        );
    }
}

/// Dead-connection detection, on tokio's paused clock: a peer that takes the connection
/// and never answers.
#[cfg(test)]
mod silence_tests {
    use std::io;
    use std::sync::atomic::AtomicUsize;

    use futures::future::BoxFuture;

    use super::*;
    use crate::consensus::net::Reader;

    /// Accepts every dial with an in-memory pipe whose far end swallows bytes and never
    /// replies, as a connection does whose peer vanished without a reset.
    #[derive(Default)]
    struct BlackHole {
        dials: AtomicUsize,
        far_ends: Mutex<Vec<tokio::io::DuplexStream>>,
    }

    impl Dial for Arc<BlackHole> {
        fn dial(&self, _addr: &str) -> BoxFuture<'static, io::Result<(Reader, Writer)>> {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let (near, far) = tokio::io::duplex(1 << 20);
            self.far_ends.lock().unwrap().push(far);
            let (reader, writer) = tokio::io::split(near);
            Box::pin(async move { Ok((Box::new(reader) as Reader, Box::new(writer) as Writer)) })
        }
    }

    fn link(hole: &Arc<BlackHole>) -> Arc<PeerLink> {
        Transport::with_dialer(Arc::new(hole.clone()), Metrics::new().unwrap())
            .link("10.0.0.1:7000", Lane::Heartbeat)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_silent_past_the_limit_is_replaced() {
        let hole = Arc::new(BlackHole::default());
        let link = link(&hole);
        let short = SILENCE_LIMIT / 4;
        for _ in 0..4 {
            let err = link.call(&RpcRequest::ReadIndex, short).await.unwrap_err();
            assert!(matches!(err, RpcError::Timeout { .. }), "{err}");
        }
        assert_eq!(
            hole.dials.load(Ordering::SeqCst),
            1,
            "closed before the limit"
        );
        let err = link.call(&RpcRequest::ReadIndex, short).await.unwrap_err();
        assert!(matches!(err, RpcError::Timeout { .. }), "{err}");
        link.call(&RpcRequest::ReadIndex, short).await.unwrap_err();
        assert_eq!(
            hole.dials.load(Ordering::SeqCst),
            2,
            "a silent connection was kept"
        );
    }
}
