//! Connections to peers: one multiplexed TCP connection per peer, service and lane,
//! reconnected on demand with the peer's backoff ([`super::reconnect`]), requests matched
//! to replies by id. Below openraft: [`super::client`] (openraft's view of a peer), checkpoint transfers
//! ([`super::snapshot`]) and the ingress's forwards all send through a [`PeerLink`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::io::BufWriter;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::net::Dial;
use super::net::Tcp;
use super::net::Writer;
use super::reconnect::PeerHealth;
use super::reconnect::Refusals;
use super::wire;
use super::wire::Hello;
use super::wire::RpcReply;
use super::wire::RpcRequest;
use super::wire::SharedSettings;
use haven_base::metrics::PeerMetrics;

/// Frames queued for one connection's writer.
const WRITE_QUEUE_FRAMES: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
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
pub(super) struct Connection {
    addr: String,
    frames: mpsc::Sender<Vec<u8>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// The reader and writer tasks, stopped on close so a stalled socket is released.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// This service's refusals by the peer, told of each refusal and of the first answer.
    refusals: Arc<Refusals>,
}

impl Connection {
    async fn open(
        dialer: &dyn Dial,
        addr: &str,
        hello: Vec<u8>,
        refusals: Arc<Refusals>,
    ) -> Result<Arc<Self>, RpcError> {
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
            refusals,
        });
        let writer = tokio::spawn(write_loop(BufWriter::new(writer), hello, rx, conn.clone()));
        let reader_conn = conn.clone();
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                match wire::read_frame::<_, RpcReply>(&mut reader, &mut buf).await {
                    Ok((_, RpcReply::Refused(reason))) => {
                        reader_conn.refusals.refused(&reason);
                        break;
                    }
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
        self.refusals.accepted();
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
    pub(super) fn close_if_silent(&self) {
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
    pub(super) async fn send(
        &self,
        request: &RpcRequest,
    ) -> Result<oneshot::Receiver<RpcReply>, RpcError> {
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
    pub(super) async fn send_oneway(&self, request: &RpcRequest) -> Result<(), RpcError> {
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
    hello: Vec<u8>,
    rx: mpsc::Receiver<Vec<u8>>,
    conn: Arc<Connection>,
) {
    let result = async {
        writer.write_all(&hello).await?;
        wire::write_frames(&mut writer, rx).await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(addr = %conn.addr, error = %e, "raft connection write failed");
    }
    conn.close();
}

/// A peer address and its current connection for one service, replaced when it breaks.
pub struct PeerLink {
    addr: String,
    dialer: Arc<dyn Dial>,
    /// The bytes that open each connection: the version marker and this service's hello.
    hello: Vec<u8>,
    /// Shared by every lane and service to the same address: one failed dial pauses them
    /// all.
    health: Arc<PeerHealth>,
    /// Shared by every lane of this service to the same address.
    refusals: Arc<Refusals>,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    pub(super) next_stream: AtomicU64,
}

impl PeerLink {
    /// The live connection, or a new one once the peer's backoff allows a dial. A caller
    /// with a `deadline` that the backoff outlasts fails at once with `Unreachable`.
    pub(super) async fn connection(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Arc<Connection>, RpcError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(conn.clone());
        }
        let turn = match self.refusals.wait_turn(deadline).await {
            Ok(()) => self.health.wait_turn(deadline).await,
            refused => refused,
        };
        if let Err(next) = turn {
            let next_in = next.saturating_duration_since(tokio::time::Instant::now());
            return Err(RpcError::Unreachable {
                addr: self.addr.clone(),
                reason: format!("peer is down; next dial in {next_in:?}"),
            });
        }
        self.health.attempting();
        let refusals = self.refusals.clone();
        match Connection::open(
            self.dialer.as_ref(),
            &self.addr,
            self.hello.clone(),
            refusals,
        )
        .await
        {
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

/// Links by peer address, service and lane; each address's dial history, and each
/// address's refusals of each service.
#[derive(Default)]
struct LinkMap {
    links: BTreeMap<(String, String, Lane), Arc<PeerLink>>,
    health: BTreeMap<String, Arc<PeerHealth>>,
    refusals: BTreeMap<(String, String), Arc<Refusals>>,
}

/// Every link this node holds, shared by openraft's clients and the ingress. One
/// `Transport` speaks for one service ([`Self::for_service`]); all of a node's share
/// the links and the peers' health.
#[derive(Clone)]
pub struct Transport {
    links: Arc<Mutex<LinkMap>>,
    dialer: Arc<dyn Dial>,
    metrics: PeerMetrics,
    hello: Arc<Hello>,
}

impl Transport {
    /// Plain TCP to peers.
    pub fn tcp(metrics: PeerMetrics, hello: Hello) -> Self {
        Self::with_dialer(Arc::new(Tcp), metrics, hello)
    }

    pub fn with_dialer(dialer: Arc<dyn Dial>, metrics: PeerMetrics, hello: Hello) -> Self {
        Self {
            links: Arc::default(),
            dialer,
            metrics,
            hello: Arc::new(hello),
        }
    }

    /// The same links, speaking for another service of the same cluster, whose shared
    /// settings each connection presents.
    pub fn for_service(&self, service: &str, settings: SharedSettings) -> Self {
        Self {
            hello: Arc::new(Hello {
                service: service.to_string(),
                settings,
                ..Hello::clone(&self.hello)
            }),
            ..self.clone()
        }
    }

    pub fn link(&self, addr: &str, lane: Lane) -> Arc<PeerLink> {
        let service = self.hello.service.clone();
        let mut map = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let key = (addr.to_string(), service.clone(), lane);
        if let Some(link) = map.links.get(&key) {
            return link.clone();
        }
        let health = map
            .health
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(PeerHealth::new(addr.to_string(), self.metrics.clone())))
            .clone();
        let refusals = map
            .refusals
            .entry((addr.to_string(), service.clone()))
            .or_insert_with(|| Arc::new(Refusals::new(addr, &service, self.metrics.clone())))
            .clone();
        let link = Arc::new(PeerLink {
            addr: addr.to_string(),
            dialer: self.dialer.clone(),
            hello: self.hello_bytes(),
            health,
            refusals,
            conn: tokio::sync::Mutex::new(None),
            next_stream: AtomicU64::new(1),
        });
        map.links.insert(key, link.clone());
        link
    }

    /// Drops this service's links and closes their connections: the service was removed
    /// from the node, and its peers would only refuse it from now on.
    pub fn close_service(&self) {
        let service = &self.hello.service;
        let mut map = self.links.lock().unwrap_or_else(|p| p.into_inner());
        map.refusals.retain(|(_, s), _| s != service);
        let (closed, kept) = std::mem::take(&mut map.links)
            .into_iter()
            .partition(|((_, s, _), _)| s == service);
        map.links = kept;
        drop(map);
        for link in closed.into_values() {
            if let Ok(slot) = link.conn.try_lock()
                && let Some(conn) = slot.as_ref()
            {
                conn.close();
            }
        }
    }

    fn hello_bytes(&self) -> Vec<u8> {
        // Two short names always encode; an empty hello would be refused by the peer.
        self.hello.encode().unwrap_or_default()
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
    use crate::net::Reader;
    use haven_base::metrics::Metrics;

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
        let hello = Hello {
            cluster: "test".into(),
            service: "app".into(),
            node: 1,
            settings: Vec::new(),
        };
        Transport::with_dialer(
            Arc::new(hole.clone()),
            Metrics::new().unwrap().node.peers,
            hello,
        )
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
