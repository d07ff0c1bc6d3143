//! Divergence detection: every second, this node compares the digests of its replica's
//! answers ([`crate::apply::digests`]) with each other member's, over the indexes it has
//! not compared with that member yet, in blocks of [`BLOCK`] entries; a block whose
//! digests differ is compared entry by entry for the first divergent index. That index
//! and the two nodes go to the log (error), to `haven_divergence_detected_total`, to
//! `haven_divergence_first_index` and to status.
//!
//! Only answers both replicas recorded themselves are compared (each holds a window that
//! starts at its own start or checkpoint install): a block either side no longer or not
//! yet holds in full is left unchecked or asked again, never guessed. Replicas that
//! agree cost two small messages per member per second.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::apply::digests::AnswerLedger;
use crate::apply::digests::Disagreement;
use haven_base::metrics::Metrics;
use haven_consensus::answer_digests;
use haven_consensus::answer_digests::MAX_RANGES;
use haven_consensus::link::Transport;
use haven_contract::NodeId;

/// How often the members' answers are compared.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Entries per compared block: a disagreement costs one more exchange of this many digests.
pub const BLOCK: u64 = 64;

/// The other members, by id, with their raft addresses, as the membership stands.
pub type Members = Arc<dyn Fn() -> Vec<(NodeId, String)> + Send + Sync>;

/// What the comparing worker of one service needs.
pub struct Comparison {
    pub service: String,
    pub node: NodeId,
    pub ledger: Arc<AnswerLedger>,
    pub transport: Transport,
    pub members: Members,
    pub metrics: Metrics,
}

impl Comparison {
    /// Compares with every other member each [`CHECK_EVERY`] until the node stops.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut compared: HashMap<NodeId, u64> = HashMap::new();
        let mut ticks = tokio::time::interval(CHECK_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            for (peer, addr) in (self.members)() {
                if self.ledger.disagrees_with(peer) {
                    continue;
                }
                let upto = compared.get(&peer).copied().unwrap_or(0);
                match self.compare(peer, &addr, upto).await {
                    Ok(upto) => {
                        compared.insert(peer, upto);
                    }
                    Err(e) => {
                        tracing::debug!(peer, %addr, error = %e, "cannot compare answers with peer; trying again")
                    }
                }
            }
        }
    }

    /// Compares the answers after `upto` with `peer`'s; how far they are now compared.
    async fn compare(&self, peer: NodeId, addr: &str, upto: u64) -> Result<u64, String> {
        let (start, next) = self.ledger.lock_digests().held();
        let ranges = blocks(upto.saturating_add(1).max(start), next);
        if ranges.is_empty() {
            return Ok(upto);
        }
        let mine = self.ledger.lock_digests().digests(&ranges);
        let theirs = answer_digests::ask(&self.transport, addr, ranges.clone()).await?;
        let mut compared = upto;
        let pairs = mine.digests.iter().zip(&theirs.digests);
        for (&(first, last), pair) in ranges.iter().zip(pairs) {
            match pair {
                (Some(a), Some(b)) if a != b => {
                    let index = self.first_difference(addr, first, last).await?;
                    self.report(peer, index);
                    return Ok(last);
                }
                // The peer has not answered these yet: next round.
                (_, None) if last >= theirs.next => break,
                (Some(_), Some(_)) => {
                    self.metrics.answers_compared.inc_by(last - first + 1);
                    compared = last;
                }
                // One side does not hold them (a restart, a checkpoint installed, past
                // the window): nothing more to learn about them.
                _ => compared = last,
            }
        }
        Ok(compared)
    }

    /// The first index from `first` to `last` whose answers differ (`first` if the entry
    /// digests are gone by now).
    async fn first_difference(&self, addr: &str, first: u64, last: u64) -> Result<u64, String> {
        let singles: Vec<(u64, u64)> = (first..=last).map(|i| (i, i)).collect();
        let mine = self.ledger.lock_digests().digests(&singles);
        let theirs = answer_digests::ask(&self.transport, addr, singles).await?;
        let differ = (first..=last)
            .zip(mine.digests.iter().zip(&theirs.digests))
            .find(|(_, (m, t))| matches!((m, t), (Some(m), Some(t)) if m != t));
        Ok(differ.map_or(first, |(index, _)| index))
    }

    fn report(&self, peer: NodeId, index: u64) {
        let detected_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let found = Disagreement {
            peer,
            index,
            detected_at,
        };
        if !self.ledger.record(found) {
            return;
        }
        self.metrics.divergence_detected.inc();
        if let Some(divergence) = self.ledger.divergence(self.node) {
            self.metrics
                .divergence_first_index
                .set(divergence.first_index as i64);
        }
        tracing::error!(
            service = %self.service,
            index,
            node = self.node,
            peer,
            "replicas diverged: node {peer}'s replica answered entry {index} differently from this node's (node {}); the app is not deterministic, or a replica's state differs. Find the odd replica (status on every node names the nodes each disagrees with) and rebuild it from a checkpoint of a good one",
            self.node
        );
    }
}

/// The blocks of `from..next` compared in one round: aligned to [`BLOCK`] so that every
/// node cuts the same ones, at most [`MAX_RANGES`]; the last may be partial.
fn blocks(from: u64, next: u64) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut first = from;
    while first < next && ranges.len() < MAX_RANGES {
        let last = ((first / BLOCK + 1) * BLOCK - 1).min(next - 1);
        ranges.push((first, last));
        first = last + 1;
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_bounded() {
        assert_eq!(blocks(5, 5), []);
        assert_eq!(blocks(5, 6), [(5, 5)]);
        assert_eq!(blocks(60, 130), [(60, 63), (64, 127), (128, 129)]);
        let many = blocks(0, u64::MAX);
        assert_eq!(many.len(), MAX_RANGES);
        assert_eq!(many[MAX_RANGES - 1], (64 * 1023, 64 * 1024 - 1));
    }
}
