//! The first answers a crash left unrecorded: a node back from a crash asks its peers
//! ([`AskPeers`], one request per peer over the client lane, until every entry asked has an
//! answer), and each peer answers from its replica's records ([`RecordedAnswers`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::answer_digests::Digests;
use super::link::Lane;
use super::link::Transport;
use super::wire::RpcReply;
use super::wire::RpcRequest;
use haven_contract::AppResponse;

/// How a node recovering from a crash learns the first answer to a keyed entry its app
/// answered before the crash without a record of it: from the peers, which applied the
/// entry too. [`PeerAnswers`] asks over the transport; tests bring their own.
pub trait AskPeers: Send + Sync + 'static {
    /// The peers' recorded answers to the entries `(index, key)`, by index; entries no
    /// peer could answer are missing.
    fn first_answers(
        &self,
        asked: Vec<(u64, String)>,
    ) -> BoxFuture<'static, HashMap<u64, AppResponse>>;
}

/// The asked side: a replica's recorded answers (the service's state machine).
pub trait RecordedAnswers: Send + Sync + 'static {
    /// The recorded answer to each `(index, key)`, in order; `None` where the replica has
    /// not applied it within [`FIRST_ANSWERS_WAIT`] or no longer holds the key.
    fn first_answers<'a>(
        &'a self,
        asked: &'a [(u64, String)],
    ) -> BoxFuture<'a, Vec<Option<AppResponse>>>;

    /// The digests of the replica's answers to each range of indexes, as far as it holds
    /// them (never waits: the asker comes back for what is not applied yet).
    fn answer_digests(&self, ranges: &[(u64, u64)]) -> Digests;
}

/// How long a peer asked for first answers waits for its own replica to apply them, and
/// for the state machine to be free.
pub const FIRST_ANSWERS_WAIT: Duration = Duration::from_secs(1);

/// A peer waits up to [`FIRST_ANSWERS_WAIT`] twice (to apply, then for its state
/// machine); past this it is skipped.
const PEER_TIMEOUT: Duration = FIRST_ANSWERS_WAIT.saturating_mul(3);

/// The raft addresses of the other members, read when asked (membership changes).
pub type PeerAddrs = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

pub struct PeerAnswers {
    pub transport: Transport,
    pub peers: PeerAddrs,
}

impl AskPeers for PeerAnswers {
    fn first_answers(
        &self,
        asked: Vec<(u64, String)>,
    ) -> BoxFuture<'static, HashMap<u64, AppResponse>> {
        let transport = self.transport.clone();
        let peers = (self.peers)();
        async move {
            let mut found = HashMap::new();
            let mut remaining = asked;
            for addr in peers {
                if remaining.is_empty() {
                    break;
                }
                let link = transport.link(&addr, Lane::Client);
                let request = RpcRequest::FirstAnswers(remaining.clone());
                let answers = match link.call(&request, PEER_TIMEOUT).await {
                    Ok(RpcReply::FirstAnswers(answers)) if answers.len() == remaining.len() => {
                        answers
                    }
                    Ok(_) => {
                        tracing::warn!(peer = %addr, "peer sent a malformed first-answers reply");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(peer = %addr, error = %e, "cannot ask peer for first answers");
                        continue;
                    }
                };
                let mut still = Vec::new();
                for ((index, key), answer) in remaining.into_iter().zip(answers) {
                    match answer {
                        Some(answer) => {
                            found.insert(index, answer);
                        }
                        None => still.push((index, key)),
                    }
                }
                remaining = still;
            }
            found
        }
        .boxed()
    }
}
