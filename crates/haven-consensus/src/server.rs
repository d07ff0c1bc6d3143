//! The receiving side of node-to-node RPC: accepts peers on the raft port, reads the
//! hello, and serves each connection with the Raft group of the service it names
//! ([`Groups`]; a cluster or service this node does not have is refused, never served by
//! another group). Appends of one stream go, in arrival order, into one
//! openraft `stream_append`, which overlaps their log writes (group commit on followers);
//! every other request runs as its own task.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;

use futures::StreamExt;
use openraft::raft::AppendEntriesRequest;
use tokio::io::BufWriter;
use tokio::sync::mpsc;
use tokio::sync::watch;

use super::leader_gone;
use super::net::Accept;
use super::net::Dial;
use super::net::Reader;
use super::net::Writer;
use super::propose;
use super::propose::DurableGate;
use super::propose::LeaderPolicy;
use super::reconnect::REPORT_EVERY;
use super::snapshot::Inbox;
use super::wire;
use super::wire::Hello;
use super::wire::RpcReply;
use super::wire::RpcRequest;
use super::wire::SharedSettings;
use crate::first_answers::RecordedAnswers;
use crate::snapshot::CheckpointInbox;
use crate::stand_in::StandInSlot;
use crate::types::HavenStateMachine;
use crate::types::RaftOf;
use crate::types::TypeConfig;
use haven_base::config::ReadConfirmation;
use haven_base::metrics::Metrics;
use haven_contract::NodeId;

/// Appends of one stream queued before the connection reader stalls.
const STREAM_QUEUE: usize = 256;
const REPLY_QUEUE_FRAMES: usize = 1024;

/// What the raft port serves for one service.
pub struct Group<SM: HavenStateMachine> {
    pub raft: RaftOf<SM>,
    pub inbox: InboxFactory,
    /// Turns true when the service stops: its open connections then close, so none keeps
    /// its Raft or state machine alive past its removal.
    pub stop: watch::Receiver<bool>,
    /// This node's copy of the settings every replica must share; a dialer whose copy
    /// differs is refused.
    pub settings: SharedSettings,
    /// Writes wait for the archive too (`archive.ack = "quorum+archive"`).
    pub durable: Option<DurableGate>,
}

/// The Raft groups a node's raft port serves, by service. Services come and go while the
/// port stays open; a connection keeps the group it was admitted to.
pub struct Groups<SM: HavenStateMachine> {
    cluster: String,
    /// This node, named in refusals.
    node: NodeId,
    /// How this node dials a peer whose connection ended, to see whether it is gone
    /// ([`leader_gone`]).
    dial: Arc<dyn Dial>,
    by_service: RwLock<BTreeMap<String, Arc<Group<SM>>>>,
    /// When a refusal was last logged: a misconfigured peer redials every backoff step.
    refusal_logged_at: Mutex<Option<tokio::time::Instant>>,
}

impl<SM: HavenStateMachine> Groups<SM> {
    pub fn new(cluster: &str, node: NodeId, dial: Arc<dyn Dial>) -> Arc<Self> {
        Arc::new(Self {
            cluster: cluster.to_string(),
            node,
            dial,
            by_service: RwLock::default(),
            refusal_logged_at: Mutex::default(),
        })
    }

    pub fn insert(&self, service: &str, group: Group<SM>) {
        self.write().insert(service.to_string(), Arc::new(group));
    }

    /// Stops admitting connections for `service`; those open close when its
    /// [`Group::stop`] fires.
    pub fn remove(&self, service: &str) {
        self.write().remove(service);
    }

    /// Every group's Raft, by service name.
    pub fn rafts(&self) -> Vec<(String, RaftOf<SM>)> {
        let groups = self.by_service.read().unwrap_or_else(|p| p.into_inner());
        (groups.iter())
            .map(|(name, group)| (name.clone(), group.raft.clone()))
            .collect()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Group<SM>>>> {
        self.by_service.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The group `hello` asks for, or why the connection is refused.
    fn admit(&self, hello: &Hello) -> Result<Arc<Group<SM>>, String> {
        if hello.cluster != self.cluster {
            return Err(format!(
                "the dialer belongs to cluster `{}`, this node to cluster `{}`",
                hello.cluster, self.cluster
            ));
        }
        let groups = self.by_service.read().unwrap_or_else(|p| p.into_inner());
        let group = groups.get(&hello.service).cloned().ok_or_else(|| {
            let names: Vec<&str> = groups.keys().map(String::as_str).collect();
            format!(
                "this node does not run service `{}` (it runs: {})",
                hello.service,
                names.join(", ")
            )
        })?;
        match settings_differences(&hello.settings, &group.settings) {
            differences if differences.is_empty() => Ok(group),
            differences => Err(format!(
                "service `{}`: settings that must be equal on every node differ: {}; make them equal on every node and reload",
                hello.service,
                differences
                    .iter()
                    .map(|(key, theirs, ours)| format!(
                        "`{key}` is {theirs} on node {} (the dialer) and {ours} on node {} (this node)",
                        hello.node, self.node
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }

    /// Logs a refusal, at most once per [`REPORT_EVERY`].
    fn report_refusal(&self, peer: std::net::SocketAddr, hello: &Hello, reason: &str) {
        let now = tokio::time::Instant::now();
        let mut logged_at = self
            .refusal_logged_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if logged_at.is_none_or(|at| now.duration_since(at) >= REPORT_EVERY) {
            *logged_at = Some(now);
            tracing::warn!(%peer, service = %hello.service, cluster = %hello.cluster, reason, "raft connection refused");
        }
    }
}

/// The keys both sides name whose values differ, as `(key, theirs, ours)`. A key only
/// one side names (a setting a newer version added) is not compared.
fn settings_differences<'a>(
    theirs: &'a SharedSettings,
    ours: &'a SharedSettings,
) -> Vec<(&'a str, &'a str, &'a str)> {
    theirs
        .iter()
        .filter_map(|(key, their)| {
            let (_, our) = ours.iter().find(|(k, _)| k == key)?;
            (their != our).then_some((key.as_str(), their.as_str(), our.as_str()))
        })
        .collect()
}

/// Accepts peer connections until `shutdown` turns true.
pub async fn serve<SM: HavenStateMachine>(
    mut listener: impl Accept,
    groups: Arc<Groups<SM>>,
    reads: ReadConfirmation,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((reader, writer, peer)) => {
                let groups = groups.clone();
                tokio::spawn(async move {
                    match serve_peer(reader, writer, peer, &groups, reads).await {
                        // Closed before its hello: a peer checking that this node listens.
                        Ok(()) | Err(wire::WireError::Closed) => {}
                        Err(e) => tracing::warn!(%peer, error = %e, "raft connection dropped"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "raft accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A stream's queue, or a marker that the stream ended with an error and takes no more.
enum StreamLane {
    Open(mpsc::Sender<(u64, AppendEntriesRequest<TypeConfig>)>),
    Closed,
}

/// What each connection needs besides Raft: where checkpoints go, and the replica whose
/// recorded answers peers back from a crash ask for (none in the simulation).
#[derive(Clone)]
pub struct InboxFactory {
    pub checkpoints: Option<Arc<dyn CheckpointInbox>>,
    pub metrics: Metrics,
    pub answers: Option<Arc<dyn RecordedAnswers>>,
    /// The service's ingress, serving requests of peers whose replica is paused.
    pub stand_in: StandInSlot,
}

impl InboxFactory {
    fn open(&self) -> Inbox {
        Inbox::new(self.checkpoints.clone(), self.metrics.clone())
    }
}

/// Admits a connection by its hello, then serves it with its service's group.
async fn serve_peer<SM: HavenStateMachine>(
    mut reader: Reader,
    mut writer: Writer,
    peer: std::net::SocketAddr,
    groups: &Groups<SM>,
    reads: ReadConfirmation,
) -> Result<(), wire::WireError> {
    let hello = wire::read_hello(&mut reader).await?;
    let group = match groups.admit(&hello) {
        Ok(group) => group,
        Err(reason) => {
            groups.report_refusal(peer, &hello, &reason);
            let frame = wire::encode(0, &RpcReply::Refused(reason))?;
            tokio::io::AsyncWriteExt::write_all(&mut writer, &frame).await?;
            tokio::io::AsyncWriteExt::shutdown(&mut writer).await?;
            return Ok(());
        }
    };
    let inbox = group.inbox.open();
    let answers = group.inbox.answers.clone();
    let stand_in = group.inbox.stand_in.clone();
    let raft = group.raft.clone();
    let mut stop = group.stop.clone();
    let policy = LeaderPolicy {
        reads,
        durable: group.durable.clone(),
    };
    drop(group);
    let serving = serve_connection(
        reader,
        writer,
        raft.clone(),
        inbox,
        (answers, stand_in),
        policy,
    );
    let served = tokio::select! {
        served = serving => served,
        // A dropped sender means the service is gone too.
        _ = stop.wait_for(|stop| *stop) => return Ok(()),
    };
    // The peer closed it, or it broke: if the peer led, it may be gone.
    let dial = groups.dial.clone();
    tokio::spawn(leader_gone::check(raft, groups.node, hello.node, dial));
    served
}

async fn serve_connection<SM: HavenStateMachine>(
    mut reader: Reader,
    writer: Writer,
    raft: RaftOf<SM>,
    mut inbox: Inbox,
    (answers, stand_in): (Option<Arc<dyn RecordedAnswers>>, StandInSlot),
    policy: LeaderPolicy,
) -> Result<(), wire::WireError> {
    let (replies, replies_rx) = mpsc::channel::<Vec<u8>>(REPLY_QUEUE_FRAMES);
    tokio::spawn(write_replies(BufWriter::new(writer), replies_rx));
    let mut streams: BTreeMap<u64, StreamLane> = BTreeMap::new();
    let mut buf = Vec::new();
    loop {
        let (id, request) = match wire::read_frame::<_, RpcRequest>(&mut reader, &mut buf).await {
            Ok(frame) => frame,
            Err(wire::WireError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        match request {
            RpcRequest::Append { stream, req } => {
                let lane = streams.entry(stream).or_insert_with(|| {
                    StreamLane::Open(start_stream(raft.clone(), replies.clone()))
                });
                route_append(lane, id, req, &replies).await;
            }
            RpcRequest::EndStream { stream } => {
                streams.remove(&stream);
            }
            // Chunks are written in arrival order, on this connection's task.
            RpcRequest::SnapshotChunk {
                transfer,
                offset,
                total,
                data,
            } => {
                let reply = inbox.chunk(transfer, offset, total, &data).await;
                send_reply(&replies, id, &reply).await;
            }
            RpcRequest::SnapshotDone {
                transfer,
                vote,
                meta,
            } => {
                let reply = inbox.done(&raft, transfer, vote, meta).await;
                send_reply(&replies, id, &reply).await;
            }
            RpcRequest::FirstAnswers(asked) => {
                let (answers, replies) = (answers.clone(), replies.clone());
                tokio::spawn(async move {
                    let found = match &answers {
                        Some(machine) => machine.first_answers(&asked).await,
                        None => vec![None; asked.len()],
                    };
                    send_reply(&replies, id, &RpcReply::FirstAnswers(found)).await;
                });
            }
            RpcRequest::AnswerDigests(ranges) => {
                let digests = match &answers {
                    Some(machine) => machine.answer_digests(&ranges),
                    None => crate::answer_digests::Digests {
                        start: 0,
                        next: 0,
                        digests: vec![None; ranges.len()],
                    },
                };
                send_reply(&replies, id, &RpcReply::AnswerDigests(digests)).await;
            }
            RpcRequest::StandIn(request) => {
                let (stand_in, replies) = (stand_in.clone(), replies.clone());
                tokio::spawn(async move {
                    let answer = stand_in.serve(request).await;
                    send_reply(&replies, id, &RpcReply::StandIn(answer)).await;
                });
            }
            other => {
                let (raft, policy) = (raft.clone(), policy.clone());
                let replies = replies.clone();
                tokio::spawn(async move {
                    let reply = answer(&raft, other, &policy).await;
                    send_reply(&replies, id, &reply).await;
                });
            }
        }
    }
}

async fn route_append(
    lane: &mut StreamLane,
    id: u64,
    req: AppendEntriesRequest<TypeConfig>,
    replies: &mpsc::Sender<Vec<u8>>,
) {
    if let StreamLane::Open(tx) = lane
        && tx.send((id, req)).await.is_ok()
    {
        return;
    }
    *lane = StreamLane::Closed;
    let reply = RpcReply::Append(Err("append stream already ended".to_string()));
    send_reply(replies, id, &reply).await;
}

/// Starts one openraft `stream_append` fed by a queue; replies carry the ids of the
/// requests in the order openraft answers them, which is the order they were sent.
fn start_stream<SM: HavenStateMachine>(
    raft: RaftOf<SM>,
    replies: mpsc::Sender<Vec<u8>>,
) -> mpsc::Sender<(u64, AppendEntriesRequest<TypeConfig>)> {
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let ids = Arc::new(Mutex::new(VecDeque::new()));
    let ids_in = ids.clone();
    let input = futures::stream::unfold(rx, move |mut rx| {
        let ids = ids_in.clone();
        async move {
            let (id, req) = rx.recv().await?;
            ids.lock().unwrap_or_else(|p| p.into_inner()).push_back(id);
            Some((req, rx))
        }
    });
    tokio::spawn(async move {
        let output = raft.stream_append(input);
        futures::pin_mut!(output);
        while let Some(item) = output.next().await {
            let Some(id) = ids.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
                break;
            };
            let reply = RpcReply::Append(item.map_err(|fatal| fatal.to_string()));
            send_reply(&replies, id, &reply).await;
        }
        // Appends still queued behind a failed one get an explicit refusal so the sender
        // does not wait for them.
        let leftover: Vec<u64> = ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for id in leftover {
            let reply = RpcReply::Append(Err("append stream ended".to_string()));
            send_reply(&replies, id, &reply).await;
        }
    });
    tx
}

async fn answer<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    request: RpcRequest,
    policy: &LeaderPolicy,
) -> RpcReply {
    match request {
        RpcRequest::Vote(req) => RpcReply::Vote(raft.vote(req).await.map_err(|e| e.to_string())),
        RpcRequest::PreVote(req) => {
            RpcReply::Vote(raft.pre_vote(req).await.map_err(|e| e.to_string()))
        }
        RpcRequest::Forward(req) => {
            RpcReply::Forward(propose::propose(raft, req, policy.durable.as_ref()).await)
        }
        RpcRequest::ReadIndex => RpcReply::ReadIndex(propose::read_index(raft, policy.reads).await),
        RpcRequest::TransferLeader(req) => RpcReply::TransferLeader(
            raft.handle_transfer_leader(req)
                .await
                .map_err(|e| e.to_string()),
        ),
        RpcRequest::Append { .. }
        | RpcRequest::EndStream { .. }
        | RpcRequest::SnapshotChunk { .. }
        | RpcRequest::SnapshotDone { .. }
        | RpcRequest::FirstAnswers(_)
        | RpcRequest::AnswerDigests(_)
        | RpcRequest::StandIn(_) => {
            RpcReply::Append(Err("handled on the connection's own task".to_string()))
        }
    }
}

async fn send_reply(replies: &mpsc::Sender<Vec<u8>>, id: u64, reply: &RpcReply) {
    match wire::encode(id, reply) {
        Ok(frame) => {
            // A closed queue means the connection is gone; the peer will retry.
            let _ = replies.send(frame).await;
        }
        Err(e) => tracing::error!(error = %e, "cannot encode raft reply"),
    }
}

async fn write_replies(mut writer: BufWriter<Writer>, rx: mpsc::Receiver<Vec<u8>>) {
    if let Err(e) = wire::write_frames(&mut writer, rx).await {
        tracing::debug!(error = %e, "raft reply write failed");
    }
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> SharedSettings {
        (pairs.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_keys_both_sides_name_are_compared() {
        let ours = settings(&[
            ("routes", "default"),
            ("limits.idempotency_keys_max", "100"),
        ]);
        let same = settings(&[("routes", "default")]);
        assert!(settings_differences(&same, &ours).is_empty());
        let other = settings(&[("limits.idempotency_keys_max", "5"), ("new.key", "x")]);
        assert_eq!(
            settings_differences(&other, &ours),
            [("limits.idempotency_keys_max", "5", "100")]
        );
    }
}
