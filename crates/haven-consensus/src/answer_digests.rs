//! Replicas compare their answers: each node keeps a digest of its replica's answer to
//! every recent entry (`haven_service::apply::digests`), and a node asks a peer for the
//! digests of index ranges ([`ask`]) to compare them with its own. The answering side is
//! [`super::first_answers::RecordedAnswers::answer_digests`].

use std::time::Duration;

use super::link::Lane;
use super::link::Transport;
pub use super::wire::Digests;
use super::wire::RpcReply;
use super::wire::RpcRequest;

/// Most ranges in one request: bounds the request and the work a peer does for it.
pub const MAX_RANGES: usize = 1024;

/// A peer that does not answer within this is asked again on the next round.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the peer at `addr` for its digests of `ranges` (at most [`MAX_RANGES`]).
pub async fn ask(
    transport: &Transport,
    addr: &str,
    ranges: Vec<(u64, u64)>,
) -> Result<Digests, String> {
    assert!(ranges.len() <= MAX_RANGES, "{} ranges asked", ranges.len());
    let asked = ranges.len();
    let link = transport.link(addr, Lane::Client);
    match link
        .call(&RpcRequest::AnswerDigests(ranges), ASK_TIMEOUT)
        .await
    {
        Ok(RpcReply::AnswerDigests(digests)) if digests.digests.len() == asked => Ok(digests),
        Ok(_) => Err("malformed answer-digests reply".to_string()),
        Err(e) => Err(e.to_string()),
    }
}
