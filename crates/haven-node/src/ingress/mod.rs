//! Client-facing HTTP on every node. Classifies each request by route, then either orders
//! it through the log (writes and `ordered` reads) or serves it from the local replica
//! (`linearizable` after a read index, `local` at once). Only this module speaks client HTTP.
//!
//! Every wait is bounded: a request waits at most `no_leader_timeout` for a leader and
//! `request_timeout` in all; Haven's own errors are plain-text reasons with a
//! `Haven-Error` code, and 503s carry `Retry-After`.

// Early exits carry the finished HTTP response to the client; boxing it would only add an
// allocation to every error path.
#![allow(clippy::result_large_err)]

pub mod quota;
pub mod select;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use haven_base::tls::Connection;
use haven_base::tls::PortListener;
use http::HeaderValue;
use http::Request;
use http::Response;
use http::StatusCode;
use http::request::Parts;
use http_body_util::BodyExt;
use http_body_util::Full;
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use openraft::rt::WatchReceiver;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::routes::RouteTable;
use haven_base::config::Limits;
use haven_base::config::RouteMode;
use haven_base::metrics::Metrics;
use haven_consensus::link::Lane;
use haven_consensus::link::RpcError;
use haven_consensus::link::Transport;
use haven_consensus::propose;
use haven_consensus::propose::LeaderPolicy;
use haven_consensus::read_batch::Fetched;
use haven_consensus::read_batch::ReadBatcher;
use haven_consensus::read_batch::ReadIndexFailure;
use haven_consensus::stand_in::StandIn;
use haven_consensus::wire::ForwardOutcome;
use haven_consensus::wire::ReadIndexOutcome;
use haven_consensus::wire::RpcReply;
use haven_consensus::wire::RpcRequest;
use haven_contract::AppResponse;
use haven_contract::NodeId;
use haven_contract::OrderedRequest;
use haven_contract::PeerNode;
use haven_contract::RequestTag;
use haven_service::app::AppClient;
use haven_service::app::end_to_end_headers;
use haven_service::app::header_map;
use haven_service::apply::ApplyShared;
use haven_service::apply::Delivered;
use haven_service::apply::Raft;
use haven_service::site::Role;
use haven_service::site::SiteStatus;
use select::Directory;

/// Largest request head (request line + headers) accepted; larger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A client must send its whole request head within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before asking again for a leader that was just reported gone.
const LEADER_RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Seconds suggested in `Retry-After`.
const RETRY_AFTER_S: &str = "1";
/// How long after a checkpoint's pause a replica that is still catching up has peers
/// answer for it.
const CATCH_UP_WINDOW: Duration = Duration::from_secs(5);
/// Entries a replica may be behind the commit index and still count as caught up.
const CAUGHT_UP_WITHIN: u64 = 64;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Everything a request handler of one service needs.
pub struct Ingress {
    pub id: NodeId,
    /// None while the service is a standby: it runs no Raft until promoted.
    pub raft: Option<Raft>,
    /// The service's site role and a standby's lag, when it has an off-site archive.
    pub site: Option<watch::Receiver<SiteStatus>>,
    pub shared: Arc<ApplyShared>,
    pub app: AppClient,
    pub transport: Transport,
    pub routes: RouteTable,
    pub limits: Limits,
    pub metrics: Metrics,
    /// How this node, when it leads, confirms leadership for reads and when it answers a
    /// write (committed, or also archived).
    leading: LeaderPolicy,
    inflight: Arc<Semaphore>,
    /// `limits.rate_per_s`, when set.
    quota: Option<quota::TokenBucket>,
    next_seq: AtomicU64,
    reads: ReadBatcher,
}

pub type HttpResponse = Response<Full<Bytes>>;

impl Ingress {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: NodeId,
        raft: Option<Raft>,
        site: Option<watch::Receiver<SiteStatus>>,
        shared: Arc<ApplyShared>,
        app: AppClient,
        transport: Transport,
        routes: RouteTable,
        limits: Limits,
        metrics: Metrics,
        leading: LeaderPolicy,
    ) -> Arc<Self> {
        let boot_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
        Arc::new_cyclic(|ingress: &std::sync::Weak<Self>| {
            let ingress = ingress.clone();
            let reads = ReadBatcher::spawn(move || {
                let ingress = ingress.upgrade();
                async move { Some(ingress?.fetch_read_index().await) }
            });
            Self {
                id,
                raft,
                site,
                shared,
                app,
                transport,
                routes,
                inflight: Arc::new(Semaphore::new(limits.max_inflight_requests)),
                quota: limits.rate_per_s.map(|rate| {
                    let burst = limits.rate_burst.unwrap_or(rate);
                    let wait = Duration::from_millis(limits.rate_wait_ms);
                    quota::TokenBucket::new(rate, burst, wait, Instant::now())
                }),
                limits,
                metrics,
                leading,
                next_seq: AtomicU64::new(boot_ns),
                reads,
            }
        })
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.request_timeout_ms)
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> HttpResponse {
        let arrived = Instant::now();
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            return self.error(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in progress on this node",
            );
        };
        match self.quota.as_ref().map(|q| q.take(Instant::now())) {
            None | Some(Ok(Duration::ZERO)) => {}
            Some(Ok(turn)) => tokio::time::sleep(turn).await,
            Some(Err(wait)) => {
                tokio::time::sleep(quota::REFUSAL_HOLD).await;
                return self.over_quota(wait.saturating_sub(quota::REFUSAL_HOLD));
            }
        }
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.limits.max_body_bytes as u64) {
            return self.too_large();
        }
        // The budget covers receiving the body too: a client trickling it must not hold
        // an in-flight slot for ever.
        let deadline = Instant::now() + self.request_timeout();
        let collect = Limited::new(body, self.limits.max_body_bytes).collect();
        let Ok(collected) = tokio::time::timeout_at(deadline, collect).await else {
            let reason = format!(
                "request body not received within {} ms",
                self.limits.request_timeout_ms
            );
            return self.error(StatusCode::REQUEST_TIMEOUT, "body-timeout", &reason);
        };
        let body = match collected {
            // A fresh copy: hyper's chunk can be a slice of the connection's read buffer,
            // and an entry kept in the log cache would pin that whole buffer.
            Ok(collected) => Bytes::copy_from_slice(&collected.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return self.too_large();
            }
            Err(e) => {
                return self.error(
                    StatusCode::BAD_REQUEST,
                    "bad-body",
                    &format!("cannot read request body: {e}"),
                );
            }
        };
        let path = parts.uri.path().to_string();
        let mode = self.routes.classify(&parts.method, &path);
        self.metrics
            .requests
            .with_label_value(mode_label(mode))
            .inc();
        if let Some(refusal) = self.refused_by_site(mode) {
            return refusal;
        }
        let response = self
            .respond(mode, parts, body, deadline, Asker::Client)
            .await;
        self.metrics
            .request_duration
            .with_label_value(mode_label(mode))
            .observe(arrived.elapsed().as_secs_f64());
        response
    }

    /// Serves a request of `mode`. While this node's replica is paused for a checkpoint,
    /// a client's write or current read goes to a peer ([`haven_consensus::stand_in`]).
    async fn respond(
        &self,
        mode: RouteMode,
        parts: Parts,
        body: Bytes,
        deadline: Instant,
        asker: Asker,
    ) -> HttpResponse {
        if mode != RouteMode::Local
            && asker == Asker::Client
            && self.replica_paused()
            && let Some(answer) = self.stand_in(mode, &parts, &body, deadline).await
        {
            return answer;
        }
        match mode {
            RouteMode::Write | RouteMode::Ordered => self.order(parts, body, deadline).await,
            RouteMode::Linearizable => self.linearizable_read(parts, body, deadline).await,
            RouteMode::Local => self.local_read(&parts, body).await,
        }
    }

    /// A peer's answer to this node's client; `None` when no peer took the request, so
    /// this node serves it itself (its replica catches up once the copy ends).
    async fn stand_in(
        &self,
        mode: RouteMode,
        parts: &Parts,
        body: &Bytes,
        deadline: Instant,
    ) -> Option<HttpResponse> {
        // A bad request is refused by this node's own path, with its own reason.
        let request = self.ordered_request(parts, body.clone()).ok()?;
        let peer = self.stand_in_peer()?;
        let link = self.transport.link(&peer.raft_addr, Lane::Client);
        let timeout = deadline.saturating_duration_since(Instant::now());
        let failure = match link.call(&RpcRequest::StandIn(request), timeout).await {
            Ok(RpcReply::StandIn(Some(answer))) => {
                self.metrics.stood_in.inc();
                return Some(app_response(answer));
            }
            Ok(RpcReply::StandIn(None)) | Err(RpcError::Unreachable { .. }) => return None,
            Ok(_) => "the peer sent an unexpected reply".to_string(),
            Err(e) => e.to_string(),
        };
        // A read changes nothing, so it can still be served here; a write may have been
        // ordered by the peer.
        if mode == RouteMode::Linearizable {
            return None;
        }
        let reason = format!(
            "outcome unknown (the peer answering while this node's replica was paused: {failure}); retry with the same Idempotency-Key"
        );
        Some(self.unavailable("outcome-unknown", &reason))
    }

    /// Whether this node's replica is held back by a checkpoint: paused for the copy, or
    /// just resumed and still applying what arrived meanwhile (hundreds of entries after
    /// the copy of a large state).
    fn replica_paused(&self) -> bool {
        if self.shared.paused_for_checkpoint() {
            return true;
        }
        if !self.shared.resumed_within(CATCH_UP_WINDOW) {
            return false;
        }
        let Some(raft) = &self.raft else {
            return false;
        };
        let committed = (raft.metrics().borrow_watched().local_committed).map_or(0, |c| c.index);
        committed.saturating_sub(self.shared.applied_index()) > CAUGHT_UP_WITHIN
    }

    /// The leader when another node leads, else the first other voter.
    fn stand_in_peer(&self) -> Option<PeerNode> {
        let metrics = self.raft.as_ref()?.metrics();
        let m = metrics.borrow_watched();
        let others = |id: &NodeId| *id != self.id;
        let peer = (m.current_leader.filter(others))
            .or_else(|| m.membership_config.membership().voter_ids().find(others))?;
        m.membership_config.get_node(&peer).cloned()
    }

    /// Serves a request a peer received while its replica was paused, as this node
    /// serves its own clients, and returns the response whole.
    async fn serve_for_peer(&self, request: OrderedRequest) -> AppResponse {
        let response = match self.inflight.clone().try_acquire_owned() {
            Ok(_permit) => self.serve_peer_request(request).await,
            Err(_) => self.error(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in progress on this node",
            ),
        };
        whole_response(response).await
    }

    async fn serve_peer_request(&self, request: OrderedRequest) -> HttpResponse {
        let deadline = Instant::now() + self.request_timeout();
        let (parts, body) = match rebuilt_request(request) {
            Ok(rebuilt) => rebuilt,
            Err(e) => {
                let reason = format!("cannot rebuild a peer's request: {e}");
                return self.error(StatusCode::BAD_REQUEST, "bad-request", &reason);
            }
        };
        let mode = self.routes.classify(&parts.method, parts.uri.path());
        if let Some(refusal) = self.refused_by_site(mode) {
            return refusal;
        }
        self.respond(mode, parts, body, deadline, Asker::Peer).await
    }

    /// A standby serves only local reads (the primary's archive is its source); a fenced
    /// node serves no write and no read that claims to be current, since another site
    /// took over; a primary handing over serves reads but takes no write.
    fn refused_by_site(&self, mode: RouteMode) -> Option<HttpResponse> {
        // Every request of a service with an archive passes here: borrow, never clone.
        let status = self.site.as_ref()?.borrow();
        let (code, reason) = match (&status.role, mode) {
            // A standby that has not restored the archive yet has nothing to serve: its
            // replica may hold another history (a site that just began to follow).
            (Role::Standby, RouteMode::Local) if status.applied_index.is_none() => (
                "standby",
                "this node is a standby that has not restored the archive yet: try again shortly"
                    .to_string(),
            ),
            (Role::Primary, _) | (_, RouteMode::Local) => return None,
            // Still the primary: what is current is served until the switchover.
            (Role::HandingOver, RouteMode::Linearizable) => return None,
            (Role::HandingOver, _) => (
                "handing-over",
                haven_service::site::HANDING_OVER.to_string(),
            ),
            (Role::Standby, _) => (
                "standby",
                format!(
                    "this node is a standby at site {:?}: writes and current reads go to the primary ({}); local reads are served here",
                    status.site,
                    status.writer.as_deref().unwrap_or("not known yet")
                ),
            ),
            (Role::Fenced { reason }, _) => (
                "fenced",
                format!("this site no longer writes the service: {reason}"),
            ),
        };
        drop(status);
        self.metrics.site_refused_writes.inc();
        Some(self.unavailable(code, &reason))
    }

    /// The Raft group; a standby has none, and is refused before it gets here.
    fn raft(&self) -> Result<&Raft, HttpResponse> {
        self.raft
            .as_ref()
            .ok_or_else(|| self.unavailable("standby", "this node is a standby: it runs no Raft"))
    }

    fn over_quota(&self, wait: Duration) -> HttpResponse {
        let rate = self.limits.rate_per_s.unwrap_or_default();
        let reason = format!("over this service's quota of {rate} requests/s on this node");
        let mut response = self.error(StatusCode::TOO_MANY_REQUESTS, "rate-limited", &reason);
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(quota::retry_after_s(wait)),
        );
        response
    }

    fn too_large(&self) -> HttpResponse {
        let reason = format!(
            "request body exceeds the {}-byte limit",
            self.limits.max_body_bytes
        );
        self.error(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", &reason)
    }

    /// Orders the request through the log and answers with the local replica's response.
    async fn order(&self, parts: Parts, body: Bytes, deadline: Instant) -> HttpResponse {
        let ordered = match self.ordered_request(&parts, body) {
            Ok(ordered) => ordered,
            Err(response) => return response,
        };
        let tag = ordered.tag;
        let waiter = self.shared.register(tag);
        let result = self.order_and_wait(ordered, waiter, deadline).await;
        self.shared.forget(&tag);
        result
    }

    async fn order_and_wait(
        &self,
        ordered: OrderedRequest,
        waiter: tokio::sync::oneshot::Receiver<Delivered>,
        deadline: Instant,
    ) -> HttpResponse {
        let index = match self.submit(ordered, deadline).await {
            Ok(index) => index,
            Err(response) => return response,
        };
        match tokio::time::timeout_at(deadline, waiter).await {
            Ok(Ok(delivered)) => delivered_response(delivered),
            _ => {
                let reason = format!(
                    "entry {index} is committed but this node's replica has not applied it within {} ms",
                    self.limits.request_timeout_ms
                );
                self.error(StatusCode::GATEWAY_TIMEOUT, "apply-timeout", &reason)
            }
        }
    }

    fn ordered_request(&self, parts: &Parts, body: Bytes) -> Result<OrderedRequest, HttpResponse> {
        let idempotency_key = match parts.headers.get(haven_contract::headers::IDEMPOTENCY_KEY) {
            None => None,
            Some(v) if v.len() > MAX_IDEMPOTENCY_KEY_BYTES || v.is_empty() => {
                let reason =
                    format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes");
                return Err(self.error(StatusCode::BAD_REQUEST, "bad-idempotency-key", &reason));
            }
            Some(v) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        };
        let uri = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        Ok(OrderedRequest {
            tag: RequestTag {
                origin: self.id,
                seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            },
            method: parts.method.as_str().to_string(),
            uri,
            headers: end_to_end_headers(&parts.headers),
            body,
            idempotency_key,
            time_unix_us: 0,
            seed: 0,
        })
    }

    /// Gets the entry committed, through whichever node leads. Retries only when the entry
    /// was certainly not proposed; an uncertain outcome goes back to the client.
    async fn submit(
        &self,
        ordered: OrderedRequest,
        deadline: Instant,
    ) -> Result<u64, HttpResponse> {
        let leader_deadline = self.leader_deadline(deadline);
        loop {
            let (leader_id, leader) = self.wait_for_leader(leader_deadline).await?;
            let outcome = if leader_id == self.id {
                let durable = self.leading.durable.as_ref();
                let proposal = propose::propose(self.raft()?, ordered.clone(), durable);
                tokio::time::timeout_at(deadline, proposal)
                    .await
                    .unwrap_or_else(|_| ForwardOutcome::Unknown {
                        reason: "not committed in time (is a quorum of nodes up?)".to_string(),
                    })
            } else {
                self.metrics.forwarded.inc();
                self.forward(&leader, &ordered, deadline).await?
            };
            match outcome {
                ForwardOutcome::Committed { index } => return Ok(index),
                ForwardOutcome::NotLeader { .. } => tokio::time::sleep(LEADER_RETRY_PAUSE).await,
                ForwardOutcome::Refused { reason } => {
                    self.metrics.site_refused_writes.inc();
                    return Err(self.unavailable("fenced", &reason));
                }
                ForwardOutcome::Unknown { reason } => {
                    let reason =
                        format!("outcome unknown ({reason}); retry with the same Idempotency-Key");
                    return Err(self.unavailable("outcome-unknown", &reason));
                }
            }
        }
    }

    async fn forward(
        &self,
        leader: &PeerNode,
        ordered: &OrderedRequest,
        deadline: Instant,
    ) -> Result<ForwardOutcome, HttpResponse> {
        let link = self.transport.link(&leader.raft_addr, Lane::Client);
        let timeout = deadline.saturating_duration_since(Instant::now());
        match link
            .call(&RpcRequest::Forward(ordered.clone()), timeout)
            .await
        {
            Ok(RpcReply::Forward(outcome)) => Ok(outcome),
            // Never sent: the leader is certainly unaware of this request.
            Err(RpcError::Unreachable { .. }) => Ok(ForwardOutcome::NotLeader { leader: None }),
            Err(e) => Ok(ForwardOutcome::Unknown {
                reason: e.to_string(),
            }),
            Ok(_) => Ok(ForwardOutcome::Unknown {
                reason: "leader sent an unexpected reply".to_string(),
            }),
        }
    }

    /// How long one request may go on looking for a reachable leader. A follower can keep
    /// naming a dead leader until a new one is elected, so the budget spans every retry.
    fn leader_deadline(&self, deadline: Instant) -> Instant {
        deadline.min(Instant::now() + Duration::from_millis(self.limits.no_leader_timeout_ms))
    }

    /// The current leader, waiting until `leader_deadline` for one.
    async fn wait_for_leader(
        &self,
        leader_deadline: Instant,
    ) -> Result<(NodeId, PeerNode), HttpResponse> {
        let mut metrics = self.raft()?.metrics();
        loop {
            if Instant::now() >= leader_deadline {
                return Err(self.no_leader());
            }
            let found = {
                let m = metrics.borrow_watched();
                m.current_leader.and_then(|id| {
                    m.membership_config
                        .get_node(&id)
                        .map(|node| (id, node.clone()))
                })
            };
            if let Some(found) = found {
                return Ok(found);
            }
            if tokio::time::timeout_at(leader_deadline, metrics.changed())
                .await
                .is_err()
            {
                return Err(self.no_leader());
            }
        }
    }

    fn no_leader(&self) -> HttpResponse {
        let reason = format!(
            "no reachable leader within {} ms",
            self.limits.no_leader_timeout_ms
        );
        self.unavailable("no-leader", &reason)
    }

    async fn linearizable_read(
        &self,
        parts: Parts,
        body: Bytes,
        deadline: Instant,
    ) -> HttpResponse {
        let index = match self.read_index(deadline).await {
            Ok(index) => index,
            Err(response) => return response,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if !self.shared.wait_applied(index, remaining).await {
            let reason = format!("this node's replica has not reached read index {index} in time");
            return self.error(StatusCode::GATEWAY_TIMEOUT, "apply-timeout", &reason);
        }
        self.local_read(&parts, body).await
    }

    /// A read index shared with the other reads waiting for one ([`ReadBatcher`]).
    async fn read_index(&self, deadline: Instant) -> Result<u64, HttpResponse> {
        let failed = |reason: &str| {
            let reason = format!("cannot confirm leadership: {reason}");
            self.unavailable("read-index-failed", &reason)
        };
        match tokio::time::timeout_at(deadline, self.reads.read_index()).await {
            Ok(Ok(index)) => Ok(index),
            Ok(Err(ReadIndexFailure::NoLeader)) => Err(self.no_leader()),
            Ok(Err(ReadIndexFailure::Failed(reason))) => Err(failed(&reason)),
            Ok(Err(ReadIndexFailure::Stopped)) => Err(failed("the node is shutting down")),
            Err(_) => Err(failed("no read index within the request timeout")),
        }
    }

    /// Whether a leader backed by a quorum answers for the service within `within`: a
    /// read index, shared with the reads waiting for one. What a health check asks, since
    /// a follower cut off from every peer keeps naming its last leader (pre-vote keeps
    /// its term).
    pub async fn confirm_leader(&self, within: Duration) -> Result<(), String> {
        match tokio::time::timeout(within, self.reads.read_index()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(ReadIndexFailure::NoLeader)) => Err("no leader is reachable".to_string()),
            Ok(Err(ReadIndexFailure::Failed(reason))) => Err(reason),
            Ok(Err(ReadIndexFailure::Stopped)) => Err("the node is shutting down".to_string()),
            Err(_) => Err(format!("no answer within {} ms", within.as_millis())),
        }
    }

    /// Fetches one read index, through whichever node leads, on behalf of a batch.
    async fn fetch_read_index(&self) -> Fetched {
        let deadline = Instant::now() + self.request_timeout();
        let leader_deadline = self.leader_deadline(deadline);
        loop {
            let Ok((leader_id, leader)) = self.wait_for_leader(leader_deadline).await else {
                return Err(ReadIndexFailure::NoLeader);
            };
            let outcome = if let (true, Some(raft)) = (leader_id == self.id, &self.raft) {
                propose::read_index(raft, self.leading.reads).await
            } else {
                let link = self.transport.link(&leader.raft_addr, Lane::Client);
                let timeout = deadline.saturating_duration_since(Instant::now());
                match link.call(&RpcRequest::ReadIndex, timeout).await {
                    Ok(RpcReply::ReadIndex(outcome)) => outcome,
                    Ok(_) => ReadIndexOutcome::Failed {
                        reason: "leader sent an unexpected reply".to_string(),
                    },
                    Err(RpcError::Unreachable { .. }) => {
                        ReadIndexOutcome::NotLeader { leader: None }
                    }
                    Err(e) => ReadIndexOutcome::Failed {
                        reason: e.to_string(),
                    },
                }
            };
            match outcome {
                ReadIndexOutcome::Ready { index } => return Ok(index),
                ReadIndexOutcome::NotLeader { .. } => tokio::time::sleep(LEADER_RETRY_PAUSE).await,
                ReadIndexOutcome::Failed { reason } => {
                    return Err(ReadIndexFailure::Failed(reason));
                }
            }
        }
    }

    async fn local_read(&self, parts: &Parts, body: Bytes) -> HttpResponse {
        let uri = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let headers = end_to_end_headers(&parts.headers);
        match self
            .app
            .read(parts.method.as_str(), uri, &headers, body)
            .await
        {
            Ok(response) => self.with_staleness(app_response(response)),
            Err(e) => self.error(StatusCode::BAD_GATEWAY, "app-unavailable", &e.to_string()),
        }
    }

    /// A standby's reads say how stale they may be.
    fn with_staleness(&self, mut response: HttpResponse) -> HttpResponse {
        let Some(site) = &self.site else {
            return response;
        };
        let status = site.borrow();
        if status.role == Role::Standby {
            let now_us = chrono::Utc::now().timestamp_micros();
            response.headers_mut().insert(
                haven_contract::headers::LAG_MS,
                HeaderValue::from(status.staleness_ms(now_us)),
            );
        }
        response
    }

    fn unavailable(&self, code: &str, reason: &str) -> HttpResponse {
        let mut response = self.error(StatusCode::SERVICE_UNAVAILABLE, code, reason);
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_S),
        );
        response
    }

    fn error(&self, status: StatusCode, code: &str, reason: &str) -> HttpResponse {
        self.metrics.request_errors.with_label_value(code).inc();
        error_response(status, code, reason)
    }
}

/// One of Haven's own errors: a plain-text reason and its `Haven-Error` code; a 503 says
/// when to retry.
pub(crate) fn error_response(status: StatusCode, code: &str, reason: &str) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(format!("haven: {reason}\n"))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(code) = HeaderValue::from_str(code) {
        headers.insert(haven_contract::headers::ERROR, code);
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_S),
        );
    }
    response
}

fn mode_label(mode: RouteMode) -> &'static str {
    match mode {
        RouteMode::Write => "write",
        RouteMode::Linearizable => "linearizable",
        RouteMode::Ordered => "ordered",
        RouteMode::Local => "local",
    }
}

fn app_response(app: AppResponse) -> HttpResponse {
    let mut response = Response::new(Full::new(app.body));
    *response.status_mut() = StatusCode::from_u16(app.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *response.headers_mut() = header_map(&app.headers);
    response
}

/// The replica's response plus where it sits in the log.
fn delivered_response(delivered: Delivered) -> HttpResponse {
    let index = delivered.index;
    let replayed = delivered.replayed;
    let mut response = app_response(delivered.response);
    let headers = response.headers_mut();
    headers.insert(haven_contract::headers::INDEX, HeaderValue::from(index));
    if replayed {
        headers.insert(
            haven_contract::headers::REPLAYED,
            HeaderValue::from_static("true"),
        );
    }
    response
}

/// Who handed this node a request: a client, or a peer whose replica was paused (its
/// requests are never passed on again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asker {
    Client,
    Peer,
}

impl StandIn for Ingress {
    fn serve_for_peer(self: Arc<Self>, request: OrderedRequest) -> BoxFuture<'static, AppResponse> {
        Box::pin(async move { Ingress::serve_for_peer(&self, request).await })
    }
}

/// A request as its client sent it, from what the asking node forwarded.
fn rebuilt_request(request: OrderedRequest) -> Result<(Parts, Bytes), http::Error> {
    let mut builder = Request::builder()
        .method(request.method.as_str())
        .uri(request.uri.as_str());
    if let Some(headers) = builder.headers_mut() {
        *headers = header_map(&request.headers);
    }
    let (parts, ()) = builder.body(())?.into_parts();
    Ok((parts, request.body))
}

/// A response with its body in one piece, for the wire.
async fn whole_response(response: HttpResponse) -> AppResponse {
    let (parts, body) = response.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    AppResponse {
        status: parts.status.as_u16(),
        headers: end_to_end_headers(&parts.headers),
        body,
    }
}

/// Serves client HTTP on `listener` until `shutdown` turns true.
pub async fn serve(
    mut listener: PortListener,
    directory: Arc<Directory>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "client accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(stream, peer, directory.clone()));
    }
}

async fn serve_connection(
    stream: Box<dyn Connection>,
    peer: SocketAddr,
    directory: Arc<Directory>,
) {
    let service = service_fn(move |req| {
        let directory = directory.clone();
        async move { Ok::<_, std::convert::Infallible>(directory.handle(req).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // The exact limit on the parsed head. `max_buf_size` alone is not one: hyper checks
        // it only while the head is incomplete, so a read that overshoots it with the rest
        // of the head let a 70 KiB head through.
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}
