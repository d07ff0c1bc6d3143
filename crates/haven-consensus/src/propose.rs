//! Leader-side entry points shared by local clients and forwarded ones: proposing an
//! ordered request and producing a read index.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::Weak;
use std::time::Duration;

use openraft::LinearizerOption;
use openraft::ReadPolicy;
use openraft::errors::ClientWriteError;
use openraft::impls::ProgressResponder;

use super::wire::ForwardOutcome;
use super::wire::ReadIndexOutcome;
use crate::types::HavenStateMachine;
use crate::types::RaftOf;
use haven_base::config::ReadConfirmation;
use haven_contract::OrderedRequest;
use tokio::sync::oneshot;
use tokio::sync::watch;

/// What a leader answers forwarded requests by, beside its Raft.
#[derive(Clone)]
pub struct LeaderPolicy {
    pub reads: ReadConfirmation,
    pub durable: Option<DurableGate>,
}

/// For a service with an off-site archive: whether this site may take writes, and,
/// when writes are acknowledged only once archived (`archive.ack = "quorum+archive"`),
/// how far the archive holds the log, confirmed unfenced after the upload (the uploader
/// keeps both), and how long a committed write waits for it.
#[derive(Clone)]
pub struct DurableGate {
    /// Read, never waited on: a change wakes every receiver that waits, see
    /// [`ArchiveWaiters`].
    pub durable: watch::Receiver<Durable>,
    /// Gone once the uploader's side is (the service stopped).
    pub waiters: Weak<ArchiveWaiters>,
    /// Whether a write waits for the archive before it is acknowledged.
    pub archive_acks: bool,
    pub wait: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    pub archived: u64,
    /// Why writes are refused here, if they are: another site took the service over, or
    /// no upload succeeded for `archive.fence_after_s`.
    pub refusal: Option<String>,
}

/// Writes waiting for the archive to hold their index, by index, so that a release
/// wakes only the writes it covers. Waiting on the [`Durable`] watch instead woke every
/// waiting write at every release (under load about a thousand writes, fifty times a
/// second on a leader) to find most of them still waiting: about 2 ms of the leader's
/// CPU per release (`docs/PERFORMANCE.md`, sites).
#[derive(Debug, Default)]
pub struct ArchiveWaiters {
    waiting: Mutex<BTreeMap<u64, Vec<oneshot::Sender<()>>>>,
}

impl ArchiveWaiters {
    /// Wakes the writes at `index` and before: call it after [`Durable`] shows why.
    pub fn wake_up_to(&self, index: u64) {
        let woken = {
            let mut waiting = self.lock();
            let later = waiting.split_off(&index.saturating_add(1));
            std::mem::replace(&mut *waiting, later)
        };
        for sender in woken.into_values().flatten() {
            let _ = sender.send(());
        }
    }

    /// Wakes every waiting write (writes are refused now).
    pub fn wake_all(&self) {
        self.wake_up_to(u64::MAX);
    }

    fn wait(&self, index: u64) -> oneshot::Receiver<()> {
        let (woken, wait) = oneshot::channel();
        self.lock().entry(index).or_default().push(woken);
        wait
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Vec<oneshot::Sender<()>>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DurableGate {
    /// `Committed` once the archive holds `index`; otherwise the outcome is unknown to the
    /// client: committed here, maybe lost with the site.
    async fn covered(&self, index: u64) -> ForwardOutcome {
        let settled = |d: &Durable| d.archived >= index || d.refusal.is_some();
        // Registered before the look at `durable`: a release after the look wakes it, one
        // before it shows in the look.
        let woken = self.waiters.upgrade().map(|w| w.wait(index));
        let timed_out = match woken {
            Some(woken) if !settled(&self.durable.borrow()) => {
                tokio::time::timeout(self.wait, woken).await.is_err()
            }
            _ => false,
        };
        let d = self.durable.borrow().clone();
        let stopped = self.durable.has_changed().is_err();
        let reason = if d.archived >= index {
            return ForwardOutcome::Committed { index };
        } else if let Some(refusal) = d.refusal {
            format!(
                "committed at index {index} here, but writes were refused before the archive held it: {refusal}"
            )
        } else if timed_out && !stopped {
            format!(
                "committed at index {index}, but not archived within {} ms (archive.ack = \"quorum+archive\"): is the object store reachable, or is this site fenced?",
                self.wait.as_millis()
            )
        } else {
            format!(
                "committed at index {index}, but the service stopped before the archive held it"
            )
        };
        ForwardOutcome::Unknown { reason }
    }
}

/// Stamps the determinism aids and proposes `req`; answers as soon as the entry is
/// committed on a quorum (and archived, behind a `durable` gate), without waiting for the
/// leader's own replica to apply it.
pub async fn propose<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    req: OrderedRequest,
    durable: Option<&DurableGate>,
) -> ForwardOutcome {
    if let Some(reason) = durable.and_then(|gate| gate.durable.borrow().refusal.clone()) {
        return ForwardOutcome::Refused { reason };
    }
    match (commit(raft, req).await, durable) {
        (ForwardOutcome::Committed { index }, Some(gate)) if gate.archive_acks => {
            gate.covered(index).await
        }
        (outcome, _) => outcome,
    }
}

async fn commit<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    mut req: OrderedRequest,
) -> ForwardOutcome {
    req.time_unix_us = chrono::Utc::now().timestamp_micros();
    req.seed = rand::random();
    let (responder, commit_rx, complete_rx) = ProgressResponder::new();
    if let Err(fatal) = raft.write(req).responder(responder).await {
        tracing::warn!(error = %fatal, "raft stopped; write not proposed");
        return ForwardOutcome::NotLeader { leader: None };
    }
    tokio::select! {
        biased;
        Ok(log_id) = commit_rx => ForwardOutcome::Committed { index: log_id.index },
        complete = complete_rx => match complete {
            Ok(Ok(resp)) => ForwardOutcome::Committed { index: resp.log_id.index },
            Ok(Err(ClientWriteError::ForwardToLeader(f))) => ForwardOutcome::NotLeader { leader: f.leader_id },
            Ok(Err(e)) => ForwardOutcome::Unknown { reason: e.to_string() },
            Err(_) => ForwardOutcome::Unknown { reason: "raft dropped the request".to_string() },
        },
    }
}

/// Confirms leadership (by lease or by a quorum round, see [`ReadConfirmation`]) and
/// returns the index a linearizable read must wait for.
pub async fn read_index<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    reads: ReadConfirmation,
) -> ReadIndexOutcome {
    let option = match reads {
        // A lease too old sends a heartbeat round and waits for it (up to one lease)
        // instead of failing the read, as openraft's plain `LeaseRead` would.
        ReadConfirmation::Lease => LinearizerOption::new(None, true),
        ReadConfirmation::Quorum => ReadPolicy::ReadIndex.into(),
    };
    match raft.get_read_linearizer(option).await {
        Ok(linearizer) => ReadIndexOutcome::Ready {
            index: linearizer.read_log_id().index(),
        },
        Err(e) => match e.forward_to_leader() {
            Some(f) => ReadIndexOutcome::NotLeader {
                leader: f.leader_id,
            },
            None => ReadIndexOutcome::Failed {
                reason: e.to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn gate(durable: &watch::Sender<Durable>, waiters: &Arc<ArchiveWaiters>) -> DurableGate {
        DurableGate {
            durable: durable.subscribe(),
            waiters: Arc::downgrade(waiters),
            archive_acks: true,
            wait: Duration::from_secs(5),
        }
    }

    fn unknown(outcome: ForwardOutcome) -> String {
        match outcome {
            ForwardOutcome::Unknown { reason } => reason,
            other => panic!("expected an unknown outcome, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_answers_the_writes_it_covers_and_only_those() {
        let durable = watch::channel(Durable::default()).0;
        let waiters = Arc::new(ArchiveWaiters::default());
        let gate = gate(&durable, &waiters);
        let (early, late) = (gate.clone(), gate.clone());
        let early = tokio::spawn(async move { early.covered(5).await });
        let late = tokio::spawn(async move { late.covered(10).await });
        tokio::task::yield_now().await;
        durable.send_modify(|d| d.archived = 7);
        waiters.wake_up_to(7);
        assert_eq!(early.await.unwrap(), ForwardOutcome::Committed { index: 5 });
        // Index 10 was never released: it waits out the whole request time.
        assert_eq!(
            unknown(late.await.unwrap()),
            "committed at index 10, but not archived within 5000 ms (archive.ack = \"quorum+archive\"): is the object store reachable, or is this site fenced?"
        );
        // Already covered: answered without waiting.
        assert_eq!(
            gate.covered(7).await,
            ForwardOutcome::Committed { index: 7 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_or_a_stopped_service_answers_every_waiting_write() {
        let durable = watch::channel(Durable::default()).0;
        let waiters = Arc::new(ArchiveWaiters::default());
        let waiting = gate(&durable, &waiters);
        let refused = tokio::spawn(async move { waiting.covered(3).await });
        tokio::task::yield_now().await;
        durable.send_modify(|d| d.refusal = Some("fenced by site b".to_string()));
        waiters.wake_all();
        assert_eq!(
            unknown(refused.await.unwrap()),
            "committed at index 3 here, but writes were refused before the archive held it: fenced by site b"
        );

        let durable = watch::channel(Durable::default()).0;
        let waiters = Arc::new(ArchiveWaiters::default());
        let waiting = gate(&durable, &waiters);
        let stopped = tokio::spawn(async move { waiting.covered(3).await });
        tokio::task::yield_now().await;
        drop((durable, waiters));
        assert_eq!(
            unknown(stopped.await.unwrap()),
            "committed at index 3, but the service stopped before the archive held it"
        );
    }
}
