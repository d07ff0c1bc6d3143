//! When to checkpoint and how far to compact the log.
//!
//! openraft's own snapshot policy counts entries only and purges the log right behind
//! the newest snapshot. Haven wants "every N entries and/or T seconds" and must keep the
//! log back to the *oldest* retained checkpoint, so any index in between stays
//! restorable. So openraft is told never to snapshot or purge on its own
//! ([`haven_consensus::raft_config`]), and two small tasks here drive both.

use std::time::Duration;

use openraft::rt::WatchReceiver;
use tokio::sync::watch;

use super::Summary;
use haven_consensus::types::HavenStateMachine;
use haven_consensus::types::RaftOf;

/// Checkpoint triggers from `[checkpoints]`; a zero turns one off.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub every_entries: u64,
    pub every: Option<Duration>,
}

/// How often the triggers are evaluated.
const TICK: Duration = Duration::from_millis(200);
/// A trigger that produced no checkpoint (openraft was busy, the app was down) is
/// repeated after this long.
const RETRIGGER_AFTER: Duration = Duration::from_secs(10);

/// Whether a checkpoint is due, given the applied index and the newest checkpoint. With
/// no checkpoint yet, time counts from `started_us` (this node's start).
pub fn due(policy: Policy, applied: u64, summary: &Summary, now_us: i64, started_us: i64) -> bool {
    let base = summary.newest_index.unwrap_or(0);
    let new_entries = applied.saturating_sub(base);
    if new_entries == 0 {
        return false;
    }
    let by_count = policy.every_entries > 0 && new_entries >= policy.every_entries;
    let by_time = policy.every.is_some_and(|every| {
        let since_us = now_us.saturating_sub(summary.newest_created_us.unwrap_or(started_us));
        since_us >= every.as_micros() as i64
    });
    by_count || by_time
}

/// Asks openraft for a checkpoint whenever [`due`] says so, until `shutdown`.
pub async fn run_triggers<SM: HavenStateMachine>(
    raft: RaftOf<SM>,
    policy: Policy,
    mut applied: watch::Receiver<u64>,
    summary: watch::Receiver<Summary>,
    mut shutdown: watch::Receiver<bool>,
) {
    let started_us = chrono::Utc::now().timestamp_micros();
    let mut last_trigger: Option<tokio::time::Instant> = None;
    let mut triggered_at_newest = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = applied.changed() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let current = *summary.borrow();
        let waiting = last_trigger.is_some_and(|at| at.elapsed() < RETRIGGER_AFTER)
            && triggered_at_newest == Some(current.newest_index);
        let now_us = chrono::Utc::now().timestamp_micros();
        if waiting || !due(policy, *applied.borrow(), &current, now_us, started_us) {
            continue;
        }
        if let Err(e) = raft.trigger().snapshot().await {
            tracing::warn!(error = %e, "cannot trigger a checkpoint");
            return;
        }
        last_trigger = Some(tokio::time::Instant::now());
        triggered_at_newest = Some(current.newest_index);
    }
}

/// Purges the log up to the oldest retained checkpoint whenever retention moves it, and
/// never past `floor` while it holds a value (the off-site archive's last index while
/// this node leads: entries the archive lacks stay in the log).
pub async fn run_compaction<SM: HavenStateMachine>(
    raft: RaftOf<SM>,
    mut summary: watch::Receiver<Summary>,
    mut floor: watch::Receiver<Option<u64>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut purged = None;
    // A service without an archive drops the floor's sender at once.
    let mut floor_open = true;
    loop {
        let oldest = summary.borrow_and_update().oldest_index;
        let held = *floor.borrow_and_update();
        let upto = match (oldest, held) {
            (Some(oldest), Some(held)) => Some(oldest.min(held)),
            (oldest, _) => oldest,
        };
        if let Some(upto) = upto.filter(|u| *u > 0 && Some(*u) > purged) {
            if !registered(&raft, upto, &mut shutdown).await {
                return;
            }
            if let Err(e) = raft.trigger().purge_log(upto).await {
                tracing::warn!(error = %e, "cannot compact the log");
                return;
            }
            tracing::info!(upto, "log compacted behind the oldest checkpoint");
            purged = Some(upto);
        }
        tokio::select! {
            changed = summary.changed() => if changed.is_err() { return },
            changed = floor.changed(), if floor_open => floor_open = changed.is_ok(),
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Waits until openraft knows a checkpoint at `upto` or later; false at shutdown. The
/// catalog moves before `build_snapshot` returns to openraft, and openraft ignores a purge
/// past the snapshot it knows ("no snapshot, cannot purge"): sent at once, the purge was
/// lost until the oldest checkpoint moved again, and the log stayed a checkpoint longer.
async fn registered<SM: HavenStateMachine>(
    raft: &RaftOf<SM>,
    upto: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut metrics = raft.metrics();
    loop {
        let snapshot = metrics.borrow_watched().snapshot.map(|s| s.index);
        if snapshot.is_some_and(|index| index >= upto) {
            return true;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return false },
            _ = shutdown.wait_for(|stop| *stop) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(newest: Option<u64>, created_us: Option<i64>) -> Summary {
        Summary {
            count: usize::from(newest.is_some()),
            oldest_index: newest,
            newest_index: newest,
            newest_created_us: created_us,
        }
    }

    #[test]
    fn entry_trigger_counts_from_the_newest_checkpoint() {
        let policy = Policy {
            every_entries: 100,
            every: None,
        };
        assert!(!due(policy, 99, &summary(None, None), 0, 0));
        assert!(due(policy, 100, &summary(None, None), 0, 0));
        assert!(!due(policy, 199, &summary(Some(100), Some(0)), 0, 0));
        assert!(due(policy, 200, &summary(Some(100), Some(0)), 0, 0));
    }

    #[test]
    fn time_trigger_needs_new_entries() {
        let policy = Policy {
            every_entries: 0,
            every: Some(Duration::from_secs(10)),
        };
        let s = summary(Some(5), Some(1_000_000));
        assert!(
            !due(policy, 5, &s, 100_000_000, 0),
            "nothing new since the checkpoint"
        );
        assert!(!due(policy, 6, &s, 10_999_999, 0));
        assert!(due(policy, 6, &s, 11_000_000, 0));
        let none = summary(None, None);
        assert!(
            !due(policy, 1, &none, 9_000_000, 0),
            "counts from the node's start"
        );
        assert!(due(policy, 1, &none, 10_000_000, 0));
    }
}
