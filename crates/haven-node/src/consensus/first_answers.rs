//! Asking the peers for the first answers a crash left unrecorded ([`crate::apply::AskPeers`]):
//! one request per peer over the client lane, until every entry asked has an answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::link::Lane;
use super::link::Transport;
use super::wire::RpcReply;
use super::wire::RpcRequest;
use crate::apply::AskPeers;
use crate::apply::FIRST_ANSWERS_WAIT;
use haven_contract::AppResponse;

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
