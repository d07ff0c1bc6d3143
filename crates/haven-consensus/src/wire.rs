//! The node-to-node wire format: after an 8-byte version marker (`HVNRAFT2`), each
//! direction carries frames `len: u32 LE | id: u64 LE | postcard message`, where `len`
//! counts id and message. The dialer's first frame is its [`Hello`]: one raft port
//! serves every service of a node, and a connection belongs to one service's group for
//! its whole life. Requests and replies share the id, so one connection multiplexes many
//! RPCs and pipelines appends.

use std::time::Duration;

use openraft::raft::AppendEntriesRequest;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::types::SnapshotMeta;
use crate::types::TypeConfig;
use crate::types::Vote;
use haven_contract::AppResponse;
use haven_contract::NodeId;
use haven_contract::OrderedRequest;

pub const HELLO: &[u8; 8] = b"HVNRAFT2";
/// Largest hello frame: two names, a node id and the shared settings (routes included).
const MAX_HELLO_BYTES: usize = 64 * 1024;

/// Settings every replica of a service must share, as `(key, value)` in config terms.
pub type SharedSettings = Vec<(String, String)>;

/// Whom a connection is for: the dialer's cluster and the service whose Raft group it
/// carries. The receiver refuses a cluster other than its own and a service it does not
/// run, so a frame can never reach another group; and it refuses a dialer whose copy of
/// the service's shared settings differs from its own, so they cannot differ silently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub cluster: String,
    pub service: String,
    /// The dialer, named in refusals.
    pub node: NodeId,
    pub settings: SharedSettings,
}

impl Hello {
    /// The bytes a dialer sends first: the version marker and the hello frame.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut bytes = HELLO.to_vec();
        bytes.extend(encode(0, self)?);
        Ok(bytes)
    }
}
/// A connection must deliver its hello within this time: a peer sends it right after
/// connecting, so only a stray or hostile client is ever this slow, and each one it leaves
/// open costs a file descriptor.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest frame accepted (128 MiB): a batch of maximum-size entries fits, garbage with a
/// huge length prefix does not make a node allocate it.
pub const MAX_FRAME_BYTES: usize = 128 * 1024 * 1024;
const FRAME_HEADER_BYTES: usize = 4;
/// A connection's read buffer keeps at most this capacity between frames.
const KEEP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum RpcRequest {
    /// One append of a pipelined stream; the receiver feeds all appends of a stream, in
    /// arrival order, into one openraft `stream_append`.
    Append {
        stream: u64,
        req: AppendEntriesRequest<TypeConfig>,
    },
    /// The sender will send no more appends on this stream.
    EndStream {
        stream: u64,
    },
    Vote(VoteRequest<TypeConfig>),
    PreVote(VoteRequest<TypeConfig>),
    /// A client write received by a follower, for the leader to propose.
    Forward(OrderedRequest),
    /// A follower asks the leader for a read index (linearizable reads).
    ReadIndex,
    /// A leader hands leadership to the receiver, which campaigns at once.
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// Part of a checkpoint file sent to a follower, in order ([`super::snapshot`]).
    SnapshotChunk {
        transfer: u64,
        offset: u64,
        total: u64,
        data: bytes::Bytes,
    },
    /// Every chunk of `transfer` was sent: install it.
    SnapshotDone {
        transfer: u64,
        vote: Vote,
        meta: SnapshotMeta,
    },
    /// A node back from a crash asks for the recorded answers to keyed entries
    /// `(index, key)` its app may have answered unrecorded (`apply::AskPeers`).
    FirstAnswers(Vec<(u64, String)>),
    /// A node compares its replica's answers with the receiver's: the digests of these
    /// index ranges, inclusive ([`crate::answer_digests`]).
    AnswerDigests(Vec<(u64, u64)>),
    /// A node whose replica is paused for a checkpoint asks the receiver to serve its
    /// client's request ([`crate::stand_in`]).
    StandIn(OrderedRequest),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RpcReply {
    Append(Result<StreamAppendResult<TypeConfig>, String>),
    Vote(Result<VoteResponse<TypeConfig>, String>),
    Forward(ForwardOutcome),
    ReadIndex(ReadIndexOutcome),
    SnapshotChunk(Result<(), String>),
    Snapshot(Result<SnapshotResponse<TypeConfig>, String>),
    TransferLeader(Result<TransferLeaderResponse<TypeConfig>, String>),
    /// One per entry asked, in order; `None` where this node holds no answer.
    FirstAnswers(Vec<Option<AppResponse>>),
    AnswerDigests(Digests),
    /// The response the receiver's client would have got; `None` when it cannot serve
    /// the request (its ingress is not up yet).
    StandIn(Option<AppResponse>),
    /// The receiver will not serve this connection (its hello names another cluster or
    /// a service it does not run); sent once, with id 0, before it closes.
    Refused(String),
}

/// What the leader says about a forwarded write.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ForwardOutcome {
    /// Committed on a quorum at this index; the origin answers once it applies it.
    Committed { index: u64 },
    /// Not proposed at all (the receiver is not the leader): safe to retry elsewhere.
    NotLeader { leader: Option<NodeId> },
    /// Proposed, then leadership changed: the entry may or may not commit.
    Unknown { reason: String },
    /// Not proposed: this site may not take writes now (fenced by another site, or cut
    /// off from its archive for longer than `archive.fence_after_s`).
    Refused { reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ReadIndexOutcome {
    Ready { index: u64 },
    NotLeader { leader: Option<NodeId> },
    Failed { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad hello {0:02x?}: not a Haven raft peer, or another wire version")]
    BadHello([u8; 8]),
    #[error("no hello within {HELLO_TIMEOUT:?}: not a Haven raft peer")]
    HelloTimeout,
    #[error("frame of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("undecodable frame: {0}")]
    Decode(String),
}

/// Encodes one frame, ready to write.
pub fn encode<T: Serialize>(id: u64, message: &T) -> Result<Vec<u8>, WireError> {
    let mut frame = vec![0u8; FRAME_HEADER_BYTES];
    frame.extend_from_slice(&id.to_le_bytes());
    let mut frame =
        postcard::to_extend(message, frame).map_err(|e| WireError::Decode(e.to_string()))?;
    let len = frame.len() - FRAME_HEADER_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(len, MAX_FRAME_BYTES));
    }
    frame[..FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(frame)
}

/// Reads one frame; `Closed` on a clean end of stream between frames.
pub async fn read_frame<R, T>(reader: &mut R, buf: &mut Vec<u8>) -> Result<(u64, T), WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_within(reader, buf, MAX_FRAME_BYTES).await
}

async fn read_frame_within<R, T>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max_bytes: usize,
) -> Result<(u64, T), WireError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; FRAME_HEADER_BYTES];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > max_bytes {
        return Err(WireError::TooLarge(len, max_bytes));
    }
    if len < 8 {
        return Err(WireError::Decode(format!("frame of {len} bytes has no id")));
    }
    // Grow the buffer only as bytes arrive: a peer claiming 128 MiB and sending nothing
    // must not make this node allocate 128 MiB (fuzz finding).
    buf.clear();
    let got = (&mut *reader).take(len as u64).read_to_end(buf).await?;
    if got < len {
        return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let mut id_bytes = [0u8; 8];
    id_bytes.copy_from_slice(&buf[..8]);
    let message = postcard::from_bytes(&buf[8..]).map_err(|e| WireError::Decode(e.to_string()));
    if buf.capacity() > KEEP_BUFFER_BYTES {
        // One outsized frame must not pin its memory for the connection's lifetime.
        *buf = Vec::new();
    }
    Ok((u64::from_le_bytes(id_bytes), message?))
}

/// Writes queued frames until the queue closes, flushing only when it is momentarily
/// empty so a burst leaves in few syscalls.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    while let Some(frame) = rx.recv().await {
        writer.write_all(&frame).await?;
        while let Ok(frame) = rx.try_recv() {
            writer.write_all(&frame).await?;
        }
        writer.flush().await?;
    }
    Ok(())
}

/// Reads the version marker and the hello, waiting at most [`HELLO_TIMEOUT`] for both.
pub async fn read_hello<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Hello, WireError> {
    let read = async {
        let mut marker = [0u8; 8];
        match reader.read_exact(&mut marker).await {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(WireError::Closed);
            }
            read => read?,
        };
        if &marker != HELLO {
            return Err(WireError::BadHello(marker));
        }
        let mut buf = Vec::new();
        let (_, hello) = read_frame_within(reader, &mut buf, MAX_HELLO_BYTES).await?;
        Ok(hello)
    };
    tokio::time::timeout(HELLO_TIMEOUT, read)
        .await
        .map_err(|_| WireError::HelloTimeout)?
}

/// A replica's digests of its answers to the ranges asked (`(first, last)` indexes,
/// inclusive), and which indexes it holds digests for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digests {
    /// The replica holds the digest of every answer from `start` to `next - 1`.
    pub start: u64,
    pub next: u64,
    /// One per range asked, in order; `None` where the range is not wholly held.
    pub digests: Vec<Option<u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let frame = encode(
            7,
            &RpcReply::Forward(ForwardOutcome::Committed { index: 42 }),
        )
        .unwrap();
        let mut reader = &frame[..];
        let mut buf = Vec::new();
        let (id, reply): (u64, RpcReply) = read_frame(&mut reader, &mut buf).await.unwrap();
        assert_eq!(id, 7);
        assert!(matches!(
            reply,
            RpcReply::Forward(ForwardOutcome::Committed { index: 42 })
        ));
        let end: Result<(u64, RpcReply), _> = read_frame(&mut reader, &mut buf).await;
        assert!(matches!(end, Err(WireError::Closed)));
    }

    /// A length prefix promising the maximum frame, followed by nothing: the buffer must
    /// not be sized by the claim (it grew to 128 MiB before the fix).
    #[tokio::test]
    async fn a_claimed_length_allocates_only_what_arrives() {
        let mut claim = (MAX_FRAME_BYTES as u32).to_le_bytes().to_vec();
        claim.extend_from_slice(&[0; 16]);
        let mut buf = Vec::new();
        let err = read_frame::<_, RpcReply>(&mut &claim[..], &mut buf)
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::Io(_)), "{err}");
        assert!(
            buf.capacity() < 1 << 20,
            "buffer grew to {}",
            buf.capacity()
        );
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_refused() {
        let huge = (u32::MAX).to_le_bytes();
        let mut buf = Vec::new();
        let err = read_frame::<_, RpcReply>(&mut &huge[..], &mut buf)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "frame of {} bytes exceeds the {MAX_FRAME_BYTES}-byte limit",
                u32::MAX
            )
        );
        let mut garbage = 12u32.to_le_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 12]);
        let err = read_frame::<_, RpcReply>(&mut &garbage[..], &mut buf)
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("undecodable frame"), "{err}");
        let mut short = 100u32.to_le_bytes().to_vec();
        short.extend_from_slice(&[0; 10]);
        let err = read_frame::<_, RpcReply>(&mut &short[..], &mut buf)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WireError::Io(ref e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{err}"
        );
        let err = read_hello(&mut &b"GET / HT"[..]).await.unwrap_err();
        assert!(err.to_string().starts_with("bad hello"), "{err}");
    }
}
