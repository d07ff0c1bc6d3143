//! When to dial a peer again after a dial failed.
//!
//! openraft retries a failed replication stream at once, and its own backoff applies only
//! once a stream's requests are being polled, which never happens when the dial itself
//! fails. Without a pause here a leader redialed a dead follower 30,000 times a second,
//! logging each failure (a gigabyte of log in two minutes), and the flood of connects
//! sometimes took the dead node's own port as a source port, so the node could not listen
//! on it again when it came back. One [`PeerHealth`] per peer address, shared by every
//! lane, spaces the dials out with capped exponential backoff and jitter, reports a peer
//! going down and coming back once, and counts every attempt.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::runtime::next_seed;
use haven_base::metrics::PeerMetrics;

/// Pause after the first failed dial; each further failure doubles it up to
/// [`BACKOFF_MAX`]. Short enough that a peer that blipped is redialed within a heartbeat
/// or two.
pub const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest pause between dials of a dead peer: also the longest a restarted peer waits
/// to be dialed again, so it stays well under a second of extra recovery time.
pub const BACKOFF_MAX: Duration = Duration::from_millis(800);
/// While a peer stays down, how often its state is logged again.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);

/// Whether a dial may start now, or when.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn {
    Now,
    /// The peer is backing off until this instant.
    At(Instant),
}

/// Failures in a row, what they delay, and when they were last reported: the part a
/// dead peer and a refusing one share.
#[derive(Debug, Default)]
struct Streak {
    /// Failures in a row.
    count: u32,
    /// No dial before this instant.
    retry_at: Option<Instant>,
    /// When the streak was last logged.
    reported_at: Option<Instant>,
}

impl Streak {
    /// Counts one more failure at `now`: the jittered pause before the next dial, and
    /// whether it is time to report (the first failure, then every [`REPORT_EVERY`]).
    fn fail(&mut self, now: Instant) -> (Duration, bool) {
        self.count = self.count.saturating_add(1);
        let pause = jittered(backoff(self.count), next_seed());
        self.retry_at = Some(now + pause);
        let due = (self.reported_at).is_none_or(|at| now.duration_since(at) >= REPORT_EVERY);
        if due {
            self.reported_at = Some(now);
        }
        (pause, due)
    }
}

#[derive(Debug, Default)]
struct Health {
    /// Dials that failed in a row.
    failures: Streak,
    /// When the first failure of this streak happened.
    down_since: Option<Instant>,
}

/// One peer's dial history.
pub struct PeerHealth {
    addr: String,
    health: Mutex<Health>,
    /// Wakes the lanes waiting for their turn once one of them got through.
    reachable: Notify,
    metrics: PeerMetrics,
}

impl PeerHealth {
    pub fn new(addr: String, metrics: PeerMetrics) -> Self {
        metrics.up.with_label_values(&[&addr]).set(1);
        Self {
            addr,
            health: Mutex::new(Health::default()),
            reachable: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a dial may start now. While the peer is down, the lane that gets the turn
    /// claims it: the others wait for its outcome instead of dialing alongside.
    pub fn claim_turn(&self) -> Turn {
        let now = Instant::now();
        let mut health = self.lock();
        match health.failures.retry_at {
            Some(at) if at > now => Turn::At(at),
            _ => {
                if health.failures.count > 0 {
                    let pause = backoff(health.failures.count);
                    health.failures.retry_at = Some(now + jittered(pause, next_seed()));
                }
                Turn::Now
            }
        }
    }

    /// Waits for this peer's turn; `Err` with the instant of the next allowed dial when
    /// that lies after `deadline`, so a caller with a bound fails at once instead.
    pub async fn wait_turn(&self, deadline: Option<Instant>) -> Result<(), Instant> {
        loop {
            let reachable = self.reachable.notified();
            let mut reachable = std::pin::pin!(reachable);
            reachable.as_mut().enable();
            let Turn::At(at) = self.claim_turn() else {
                return Ok(());
            };
            if deadline.is_some_and(|d| d < at) {
                return Err(at);
            }
            // Both arms only send the loop round to check again, so their order does not
            // matter; biased spares a random draw.
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(at) => {}
                () = reachable => {}
            }
        }
    }

    /// Counts a dial about to start.
    pub fn attempting(&self) {
        self.metrics
            .connect_attempts
            .with_label_values(&[&self.addr])
            .inc();
    }

    /// Records a failed dial and schedules the next one.
    pub fn failed(&self, reason: &str) {
        let now = Instant::now();
        let mut health = self.lock();
        let (pause, due) = health.failures.fail(now);
        let down_since = *health.down_since.get_or_insert(now);
        let failures = health.failures.count;
        drop(health);
        self.metrics
            .connect_failures
            .with_label_values(&[&self.addr])
            .inc();
        self.metrics.up.with_label_values(&[&self.addr]).set(0);
        if due {
            tracing::warn!(
                peer = %self.addr,
                reason,
                down_for = ?now.duration_since(down_since),
                failed_dials = failures,
                retry_in = ?pause,
                "peer unreachable; dialing again with backoff (next report in {REPORT_EVERY:?} if still down)"
            );
        }
    }

    /// Records a successful dial: the peer is up, and the next failure starts a fresh
    /// backoff.
    pub fn connected(&self) {
        let previous = std::mem::take(&mut *self.lock());
        self.reachable.notify_waiters();
        self.metrics.up.with_label_values(&[&self.addr]).set(1);
        if let Some(since) = previous.down_since {
            tracing::info!(
                peer = %self.addr,
                down_for = ?since.elapsed(),
                failed_dials = previous.failures.count,
                "peer reachable again"
            );
        }
    }
}

/// A peer that is up but refuses one service's connections: its hello names a service the
/// peer does not run (yet: a service being added reaches the nodes one by one), or the
/// peer belongs to another cluster. Spaced like failed dials, reported like them (once,
/// then every [`REPORT_EVERY`]), and per service, since the peer serves the others.
pub struct Refusals {
    addr: String,
    service: String,
    state: Mutex<Streak>,
    metrics: PeerMetrics,
}

impl Refusals {
    pub fn new(addr: &str, service: &str, metrics: PeerMetrics) -> Self {
        Self {
            addr: addr.to_string(),
            service: service.to_string(),
            state: Mutex::default(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Streak> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a refusal and schedules the next dial for this service.
    pub fn refused(&self, reason: &str) {
        let (pause, due) = self.lock().fail(Instant::now());
        self.metrics
            .refusals
            .with_label_values(&[&self.addr, &self.service])
            .inc();
        if due {
            tracing::warn!(
                peer = %self.addr,
                service = %self.service,
                reason,
                retry_in = ?pause,
                "peer refused this service's connection; dialing again with backoff"
            );
        }
    }

    /// The peer answered on this service's connection: the next refusal starts afresh.
    pub fn accepted(&self) {
        let mut state = self.lock();
        if state.count > 0 {
            *state = Streak::default();
        }
    }

    /// Waits until a dial for this service may start; `Err` with that instant when it lies
    /// after `deadline`.
    pub async fn wait_turn(&self, deadline: Option<Instant>) -> Result<(), Instant> {
        let Some(at) = self.lock().retry_at.filter(|at| *at > Instant::now()) else {
            return Ok(());
        };
        if deadline.is_some_and(|d| d < at) {
            return Err(at);
        }
        tokio::time::sleep_until(at).await;
        Ok(())
    }
}

/// The pause after `failures` failed dials in a row, before jitter.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_START
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

/// Between half and all of `pause` ("equal jitter"), so nodes that lost the same peer do
/// not dial it in lockstep, and a pause never shrinks below half its step.
fn jittered(pause: Duration, random: u64) -> Duration {
    let half = pause / 2;
    let spread = half.as_micros().max(1) as u64;
    half + Duration::from_micros(random % spread)
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_base::metrics::Metrics;

    #[tokio::test(start_paused = true)]
    async fn a_refused_service_is_dialed_again_with_backoff_until_accepted() {
        let refusals = Refusals::new("127.0.0.1:1", "orders", Metrics::new().unwrap().node.peers);
        refusals.wait_turn(None).await.unwrap();
        refusals.refused("this node does not run service `orders`");
        let soon = Instant::now() + Duration::from_millis(1);
        let at = refusals.wait_turn(Some(soon)).await.unwrap_err();
        assert!(at > soon, "no pause after a refusal");
        let before = Instant::now();
        refusals.wait_turn(None).await.unwrap();
        assert!(Instant::now() >= at && Instant::now() > before);
        refusals.refused("again");
        refusals.accepted();
        assert_eq!(refusals.wait_turn(Some(Instant::now())).await, Ok(()));
        let counted = refusals
            .metrics
            .refusals
            .with_label_values(&["127.0.0.1:1", "orders"]);
        assert_eq!(counted.get(), 2);
    }

    fn health() -> PeerHealth {
        PeerHealth::new("127.0.0.1:1".into(), Metrics::new().unwrap().node.peers)
    }

    #[test]
    fn backoff_doubles_from_the_start_up_to_the_cap() {
        assert_eq!(backoff(1), BACKOFF_START);
        assert_eq!(backoff(2), BACKOFF_START * 2);
        assert_eq!(backoff(3), BACKOFF_START * 4);
        assert_eq!(backoff(50), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_pause() {
        let pause = Duration::from_millis(800);
        for random in [0, 1, 399_999, 400_000, u64::MAX] {
            let j = jittered(pause, random);
            assert!(j >= pause / 2 && j < pause, "{j:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_dial_makes_the_next_one_wait_and_a_bounded_caller_fail_fast() {
        let peer = health();
        assert_eq!(peer.claim_turn(), Turn::Now);
        peer.failed("connection refused");
        let Turn::At(at) = peer.claim_turn() else {
            panic!("no pause after a failure")
        };
        let soon = Instant::now() + Duration::from_millis(1);
        assert_eq!(peer.wait_turn(Some(soon)).await, Err(at));
        let before = Instant::now();
        peer.wait_turn(None).await.unwrap();
        assert!(Instant::now() >= at && Instant::now() > before);
        assert!(
            matches!(peer.claim_turn(), Turn::At(_)),
            "a second lane dialed alongside the one whose turn it is"
        );
        peer.connected();
        assert_eq!(peer.claim_turn(), Turn::Now);
    }

    /// Lanes waiting behind the one that got through dial at once, not a backoff later.
    #[tokio::test(start_paused = true)]
    async fn waiting_lanes_go_as_soon_as_one_gets_through() {
        let peer = std::sync::Arc::new(health());
        for _ in 0..10 {
            peer.failed("connection refused");
        }
        let waiting = tokio::spawn({
            let peer = peer.clone();
            async move {
                peer.wait_turn(None).await.unwrap();
                Instant::now()
            }
        });
        tokio::task::yield_now().await;
        let through = Instant::now();
        peer.connected();
        assert_eq!(waiting.await.unwrap(), through);
    }

    /// A dead peer over a minute costs at most a dial per half of [`BACKOFF_MAX`].
    #[tokio::test(start_paused = true)]
    async fn a_peer_down_for_a_minute_is_dialed_rarely() {
        let peer = health();
        let start = Instant::now();
        let mut dials = 0;
        while start.elapsed() < Duration::from_secs(60) {
            peer.wait_turn(None).await.unwrap();
            peer.attempting();
            peer.failed("connection refused");
            dials += 1;
        }
        let bound = 60_000 / (BACKOFF_MAX.as_millis() / 2) as u32 + 16;
        assert!(dials <= bound, "{dials} dials in 60 s (bound {bound})");
        let metrics = &peer.metrics;
        let attempts = metrics.connect_attempts.with_label_values(&["127.0.0.1:1"]);
        assert_eq!(attempts.get(), dials as u64);
        assert_eq!(metrics.up.with_label_values(&["127.0.0.1:1"]).get(), 0);
    }
}
