//! Moving a checkpoint to a follower that needs it (openraft's `full_snapshot`), as a
//! stream of chunks on its own connection, so a checkpoint of any size costs a bounded
//! amount of memory on both sides and never delays another peer's appends.
//!
//! The follower writes chunks to a `.tmp-recv-*` file in its checkpoint directory, in
//! order; at the end it verifies the whole file against its checksum, files it under its
//! name, and only then hands it to openraft to install.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use haven_checkpoint::format::CheckpointInfo;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
use openraft::errors::NetworkError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::raft::SnapshotResponse;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::link::PeerLink;
use super::link::RpcError;
use super::wire::RpcReply;
use super::wire::RpcRequest;
use crate::types::HavenStateMachine;
use crate::types::RaftOf;
use crate::types::SnapshotMeta;
use crate::types::TypeConfig;
use haven_base::metrics::Metrics;
use haven_checkpoint::CheckpointFile;

/// Bytes per chunk frame.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks sent before the sender waits for the oldest acknowledgement.
const CHUNKS_IN_FLIGHT: usize = 4;
/// How long one chunk may go unacknowledged; the follower fsyncs nothing per chunk, so
/// this only trips on a dead or wedged peer.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// Installing can restart a managed app and replay nothing else; a 1 GB checkpoint
/// unpacks in seconds.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

type StreamResult = Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>>;

fn network_error(e: impl std::fmt::Display) -> StreamingError<TypeConfig> {
    StreamingError::Network(NetworkError::from_string(e.to_string()))
}

/// Sends a checkpoint file and waits for the follower to install it.
pub async fn send(
    link: &PeerLink,
    vote: VoteOf<TypeConfig>,
    snapshot: SnapshotOf<TypeConfig, CheckpointFile>,
    cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
) -> StreamResult {
    let transfer = rand::random::<u64>();
    tokio::select! {
        result = send_file(link, transfer, &snapshot.snapshot.path) => result?,
        closed = cancel => return Err(StreamingError::Closed(closed)),
    }
    let done = RpcRequest::SnapshotDone {
        transfer,
        vote,
        meta: snapshot.meta,
    };
    match link
        .call(&done, INSTALL_TIMEOUT)
        .await
        .map_err(network_error)?
    {
        RpcReply::Snapshot(Ok(response)) => Ok(response),
        RpcReply::Snapshot(Err(remote)) => Err(network_error(remote)),
        _ => Err(network_error("unexpected reply to a checkpoint transfer")),
    }
}

async fn send_file(
    link: &PeerLink,
    transfer: u64,
    path: &std::path::Path,
) -> Result<(), StreamingError<TypeConfig>> {
    let mut file = tokio::fs::File::open(path).await.map_err(network_error)?;
    let total = file.metadata().await.map_err(network_error)?.len();
    let mut acks: VecDeque<oneshot::Receiver<RpcReply>> = VecDeque::new();
    let mut offset = 0u64;
    loop {
        let mut data = vec![0u8; CHUNK_BYTES];
        let n = read_full(&mut file, &mut data)
            .await
            .map_err(network_error)?;
        data.truncate(n);
        let chunk = RpcRequest::SnapshotChunk {
            transfer,
            offset,
            total,
            data: Bytes::from(data),
        };
        let sent = link.send_or_fail_fast(&chunk).await.map_err(|e| match e {
            RpcError::Unreachable { .. } => {
                StreamingError::Unreachable(openraft::errors::Unreachable::from_string(e))
            }
            _ => network_error(e),
        })?;
        acks.push_back(sent);
        offset += n as u64;
        let last = n < CHUNK_BYTES;
        while acks.len() >= CHUNKS_IN_FLIGHT || (last && !acks.is_empty()) {
            if let Some(ack) = acks.pop_front() {
                await_ack(link, ack).await?;
            }
        }
        if last {
            return Ok(());
        }
    }
}

async fn await_ack(
    link: &PeerLink,
    ack: oneshot::Receiver<RpcReply>,
) -> Result<(), StreamingError<TypeConfig>> {
    let reply = tokio::time::timeout(CHUNK_TIMEOUT, ack)
        .await
        .map_err(|_| {
            network_error(RpcError::Timeout {
                addr: link.addr().to_string(),
                timeout: CHUNK_TIMEOUT,
            })
        })?
        .map_err(|_| network_error("connection lost during a checkpoint transfer"))?;
    match reply {
        RpcReply::SnapshotChunk(Ok(())) => Ok(()),
        RpcReply::SnapshotChunk(Err(remote)) => Err(network_error(remote)),
        _ => Err(network_error("unexpected reply to a checkpoint chunk")),
    }
}

/// Fills `buf` unless the file ends first; returns the bytes read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Where a received checkpoint lands: the service's checkpoint directory, which lives a
/// layer up (`haven_service::checkpoint`) because capturing one needs the app.
pub trait CheckpointInbox: Send + Sync + 'static {
    /// Where the chunks of `transfer` are written while it arrives.
    fn receiving_path(&self, transfer: u64) -> PathBuf;
    /// Verifies a complete file and files it under its name, or deletes it.
    fn adopt<'a>(&'a self, received: &'a Path) -> BoxFuture<'a, io::Result<CheckpointInfo>>;
}

/// One transfer being received.
struct Receiving {
    file: tokio::fs::File,
    path: PathBuf,
    next_offset: u64,
}

/// The receiving side, one per connection: chunks of a connection arrive in order.
pub struct Inbox {
    checkpoints: Option<Arc<dyn CheckpointInbox>>,
    metrics: Metrics,
    transfers: BTreeMap<u64, Receiving>,
}

impl Inbox {
    pub fn new(checkpoints: Option<Arc<dyn CheckpointInbox>>, metrics: Metrics) -> Self {
        Self {
            checkpoints,
            metrics,
            transfers: BTreeMap::new(),
        }
    }

    /// Appends one chunk to its transfer's file.
    pub async fn chunk(&mut self, transfer: u64, offset: u64, total: u64, data: &[u8]) -> RpcReply {
        RpcReply::SnapshotChunk(self.write_chunk(transfer, offset, total, data).await)
    }

    async fn write_chunk(
        &mut self,
        transfer: u64,
        offset: u64,
        total: u64,
        data: &[u8],
    ) -> Result<(), String> {
        let checkpoints = self.checkpoints.as_ref().ok_or_else(off)?;
        if offset == 0 {
            let path = checkpoints.receiving_path(transfer);
            let file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let receiving = Receiving {
                file,
                path,
                next_offset: 0,
            };
            self.transfers.insert(transfer, receiving);
            self.metrics
                .checkpoint_receive_total_bytes
                .set(total as i64);
        }
        let receiving = self
            .transfers
            .get_mut(&transfer)
            .ok_or_else(|| format!("checkpoint transfer {transfer} has no start"))?;
        if offset != receiving.next_offset {
            return Err(format!(
                "checkpoint chunk at offset {offset}, expected {}",
                receiving.next_offset
            ));
        }
        receiving
            .file
            .write_all(data)
            .await
            .map_err(|e| format!("cannot write {}: {e}", receiving.path.display()))?;
        receiving.next_offset += data.len() as u64;
        self.metrics
            .checkpoint_receive_bytes
            .set(receiving.next_offset as i64);
        Ok(())
    }

    /// Seals a complete transfer and installs it through openraft.
    pub async fn done<SM: HavenStateMachine>(
        &mut self,
        raft: &RaftOf<SM>,
        transfer: u64,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMeta,
    ) -> RpcReply {
        RpcReply::Snapshot(self.install(raft, transfer, vote, meta).await)
    }

    async fn install<SM: HavenStateMachine>(
        &mut self,
        raft: &RaftOf<SM>,
        transfer: u64,
        vote: VoteOf<TypeConfig>,
        meta: SnapshotMeta,
    ) -> Result<SnapshotResponse<TypeConfig>, String> {
        let checkpoints = self.checkpoints.clone().ok_or_else(off)?;
        let mut receiving = self
            .transfers
            .remove(&transfer)
            .ok_or_else(|| format!("checkpoint transfer {transfer} has no chunks"))?;
        let synced = async {
            receiving.file.flush().await?;
            receiving.file.sync_all().await
        };
        synced.await.map_err(|e| e.to_string())?;
        let info = checkpoints
            .adopt(&receiving.path)
            .await
            .map_err(|e| format!("received checkpoint refused: {e}"))?;
        if meta.last_log_id.map(|l| l.index) != Some(info.index) {
            return Err(format!(
                "checkpoint file is at index {}, the leader announced {:?}",
                info.index, meta.last_log_id
            ));
        }
        tracing::info!(index = info.index, bytes = info.size, "checkpoint received");
        let snapshot = SnapshotOf::<TypeConfig, CheckpointFile> {
            meta,
            snapshot: CheckpointFile { path: info.path },
        };
        raft.install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| e.to_string())
    }
}

impl Drop for Inbox {
    /// A connection that broke mid-transfer leaves no partial file behind.
    fn drop(&mut self) {
        for receiving in self.transfers.values() {
            let _ = std::fs::remove_file(&receiving.path);
        }
    }
}

fn off() -> String {
    "checkpoints are off on this node ([checkpoints] is not configured)".to_string()
}
