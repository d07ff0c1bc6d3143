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
use haven_consensus::types::TypeConfig;

/// Checkpoint triggers from `[checkpoints]`; a zero turns one off.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub every_entries: u64,
    pub every: Option<Duration>,
}

/// This node's turn among the members: node `rank` (by id, from 0) of `of`. Each trigger
/// fires on a grid of its period shifted by `rank / of` of it, so members checkpoint in
/// turn, never all at once: while one replica is paused for its copy, the others answer
/// its clients (`ingress`'s stand-in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    pub rank: u64,
    pub of: u64,
}

impl Turn {
    pub const ALONE: Turn = Turn { rank: 0, of: 1 };

    /// Where in the cycle of `period` this node's points lie.
    fn phase(self, period: i64) -> i64 {
        let of = self.of.max(1) as i64;
        period / of * (self.rank as i64 % of)
    }

    /// The first of this node's points on the grid of `period` at or after `after`.
    fn next_point(self, after: i64, period: i64) -> i64 {
        let phase = self.phase(period);
        let cycles = (after - phase).div_euclid(period);
        let point = phase + cycles * period;
        if point < after { point + period } else { point }
    }
}

/// This node's turn among `members` (voters and learners); a node not among them goes
/// first, alone.
pub fn turn_among(id: u64, members: impl IntoIterator<Item = u64>) -> Turn {
    let mut ids: Vec<u64> = members.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    match ids.iter().position(|m| *m == id) {
        Some(rank) => Turn {
            rank: rank as u64,
            of: ids.len() as u64,
        },
        None => Turn::ALONE,
    }
}

/// How often the triggers are evaluated.
const TICK: Duration = Duration::from_millis(200);
/// A trigger that produced no checkpoint (openraft was busy, the app was down) is
/// repeated after this long.
const RETRIGGER_AFTER: Duration = Duration::from_secs(10);

/// Whether a checkpoint is due, given the applied index and the newest checkpoint. With
/// no checkpoint yet, time counts from `started_us` (this node's start). A trigger fires
/// at this node's first point of its grid (see [`Turn`]) at least half a period after
/// the newest checkpoint, so a checkpoint taken off the grid (asked for by an operator)
/// is not followed by another at once.
pub fn due(
    policy: Policy,
    turn: Turn,
    applied: u64,
    summary: &Summary,
    now_us: i64,
    started_us: i64,
) -> bool {
    let base = summary.newest_index.unwrap_or(0);
    if applied <= base {
        return false;
    }
    let by_count = policy.every_entries > 0 && {
        let period = policy.every_entries.min(i64::MAX as u64) as i64;
        let point = turn.next_point(base as i64 + period / 2, period);
        applied as i64 >= point
    };
    let by_time = policy.every.is_some_and(|every| {
        let period = (every.as_micros().min(i64::MAX as u128) as i64).max(1);
        let since_us = summary.newest_created_us.unwrap_or(started_us);
        now_us >= turn.next_point(since_us + period / 2, period)
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
    let metrics = raft.metrics();
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
        let turn = turn_of(&metrics.borrow_watched());
        if waiting
            || !due(
                policy,
                turn,
                *applied.borrow(),
                &current,
                now_us,
                started_us,
            )
        {
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

/// This node's turn among the members Raft knows now (they change with membership).
fn turn_of(m: &openraft::RaftMetrics<TypeConfig>) -> Turn {
    turn_among(m.id, m.membership_config.nodes().map(|(id, _)| *id))
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

    const ALONE: Turn = Turn::ALONE;

    #[test]
    fn entry_trigger_counts_from_the_newest_checkpoint() {
        let policy = Policy {
            every_entries: 100,
            every: None,
        };
        assert!(!due(policy, ALONE, 99, &summary(None, None), 0, 0));
        assert!(due(policy, ALONE, 100, &summary(None, None), 0, 0));
        assert!(!due(policy, ALONE, 199, &summary(Some(100), Some(0)), 0, 0));
        assert!(due(policy, ALONE, 200, &summary(Some(100), Some(0)), 0, 0));
        // An operator's checkpoint at 160 is not followed by one at 200 (too soon), but at 300.
        assert!(!due(policy, ALONE, 299, &summary(Some(160), Some(0)), 0, 0));
        assert!(due(policy, ALONE, 300, &summary(Some(160), Some(0)), 0, 0));
    }

    #[test]
    fn time_trigger_needs_new_entries() {
        let policy = Policy {
            every_entries: 0,
            every: Some(Duration::from_secs(10)),
        };
        let s = summary(Some(5), Some(1_000_000));
        assert!(
            !due(policy, ALONE, 5, &s, 100_000_000, 0),
            "nothing new since the checkpoint"
        );
        assert!(!due(policy, ALONE, 6, &s, 9_999_999, 0));
        assert!(due(policy, ALONE, 6, &s, 10_000_000, 0));
        let none = summary(None, None);
        assert!(
            !due(policy, ALONE, 1, &none, 9_000_000, 0),
            "counts from the node's start"
        );
        assert!(due(policy, ALONE, 1, &none, 10_000_000, 0));
    }

    /// Three members checkpoint a third of a period apart, each once per period, in
    /// entries and in time alike.
    #[test]
    fn members_take_turns() {
        let turns: Vec<Turn> = (1..=3).map(|id| turn_among(id, [3, 1, 2])).collect();
        assert_eq!(turns[2], Turn { rank: 2, of: 3 });
        let by_entries = Policy {
            every_entries: 300,
            every: None,
        };
        let first_due = |turn: Turn, base: Option<u64>| {
            (1..=2_000)
                .find(|applied| due(by_entries, turn, *applied, &summary(base, Some(0)), 0, 0))
        };
        let all = |base| {
            turns
                .iter()
                .map(|t| first_due(*t, base))
                .collect::<Vec<_>>()
        };
        // The first turn is at least half a period after the start.
        assert_eq!(all(None), [Some(300), Some(400), Some(200)]);
        assert_eq!(all(Some(300)), [Some(600), Some(700), Some(500)]);
        let by_time = Policy {
            every_entries: 0,
            every: Some(Duration::from_secs(3)),
        };
        let first_due_us = |turn: Turn| {
            (0..20_000_000i64)
                .step_by(1_000)
                .find(|now| due(by_time, turn, 1, &summary(None, None), *now, 7_000_000))
        };
        let all: Vec<_> = turns.iter().map(|t| first_due_us(*t)).collect();
        assert_eq!(all, [Some(9_000_000), Some(10_000_000), Some(11_000_000)]);
    }

    #[test]
    fn a_node_outside_the_membership_goes_alone() {
        assert_eq!(turn_among(9, [1, 2, 3]), Turn::ALONE);
        assert_eq!(turn_among(2, [2, 2]), Turn::ALONE);
    }
}
