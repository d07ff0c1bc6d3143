//! openraft's view of a peer ([`PeerClient`], its `RaftNetworkV2`): votes, heartbeats,
//! leader transfers and checkpoints as one request and reply each, appends pipelined: a
//! stream's requests go out as openraft produces them, and the replies, which the peer
//! returns in order, are matched by id.

use std::sync::Arc;
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
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use super::wire::RpcReply;
use super::wire::RpcRequest;
use crate::types::TypeConfig;
use haven_checkpoint::CheckpointFile;
use haven_contract::NodeId;
use haven_contract::PeerNode;

use super::link::Connection;
use super::link::Lane;
use super::link::PeerLink;
use super::link::RpcError;
use super::link::Transport;

/// Appends in flight on one stream before the sender waits for replies.
const PIPELINE_DEPTH: usize = 64;
/// Floor for waiting on an append reply: openraft asks for one heartbeat interval, but a
/// follower's fsync on a busy two-core machine can take longer, and a spurious timeout
/// restarts the replication stream.
const APPEND_REPLY_TIMEOUT_MIN: Duration = Duration::from_secs(1);

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
            Some(Err(remote)) => Err(remote_error(self.link.addr(), remote)),
            None => Err(to_rpc_error(RpcError::UnexpectedReply {
                addr: self.link.addr().to_string(),
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
    type SnapshotData = CheckpointFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let addr = self.link.addr().to_string();
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
            let addr = self.link.addr().to_string();
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
        snapshot: SnapshotOf<TypeConfig, CheckpointFile>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tracing::info!(target = self.target, meta = %snapshot.meta, "sending checkpoint");
        let link = self.links.link(self.link.addr(), Lane::Snapshot);
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
