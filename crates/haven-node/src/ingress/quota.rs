//! A service's request-rate quota on one node (`limits.rate_per_s`): a token bucket, so a
//! tenant can burst briefly but not hold more than its rate, and a noisy neighbour on the
//! same node gets 429 before it takes the node's capacity from the others.
//!
//! A refusal is held for [`REFUSAL_HOLD`] before it is answered. Answered at once, the
//! refusals were the flood: a closed loop on 48 connections drew 39,000 429s a second
//! from three nodes on two cores, and the neighbour's p99 went from 2.5 to 20 ms
//! (`haven bench tenants`). Held, a connection that retries at once sends one request a
//! second; waiting costs a timer, and the refused client could not retry sooner anyway
//! (`Retry-After` is at least a second). The in-flight limit bounds how many are held.
//!
//! With `limits.rate_wait_ms`, a request over the quota first waits for its turn: the
//! bucket goes into debt by one token and the request sleeps until the debt is paid, so
//! waiting requests are let in one token apart. A closed loop on 48 connections then
//! reaches its node as an even stream rather than in clumps, which is what hurt the
//! neighbour: at the same 150 accepted writes/s, 48 connections tripled the neighbour's
//! p99 where 4 connections did not double it (`haven bench tenants`, PERFORMANCE.md).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a request over the quota waits before its 429.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(1);

/// Tokens refill continuously at `rate_per_s` up to `burst`; a request takes one, or
/// borrows one it may wait up to `max_wait` for.
#[derive(Debug)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    max_wait: Duration,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u64, burst: u64, max_wait: Duration, now: Instant) -> Self {
        assert!(
            rate_per_s > 0 && burst > 0,
            "a quota needs a rate and a burst"
        );
        Self {
            rate_per_s: rate_per_s as f64,
            burst: burst as f64,
            max_wait,
            state: Mutex::new(Bucket {
                tokens: burst as f64,
                refilled_at: now,
            }),
        }
    }

    /// Takes a token: `Ok` with how long to wait for it (zero when one is there), or
    /// `Err` with how long until a request would be let in again, when the wait would be
    /// longer than the bucket allows.
    pub fn take(&self, now: Instant) -> Result<Duration, Duration> {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_s).min(self.burst);
        bucket.refilled_at = now;
        let after = bucket.tokens - 1.0;
        if after >= 0.0 {
            bucket.tokens = after;
            return Ok(Duration::ZERO);
        }
        let wait = Duration::from_secs_f64(-after / self.rate_per_s);
        if wait <= self.max_wait {
            bucket.tokens = after;
            return Ok(wait);
        }
        Err(wait - self.max_wait)
    }
}

/// `Retry-After` for a wait: whole seconds, at least one.
pub fn retry_after_s(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let start = Instant::now();
        let bucket = TokenBucket::new(10, 3, Duration::ZERO, start);
        assert!((0..3).all(|_| bucket.take(start) == Ok(Duration::ZERO)));
        let wait = bucket.take(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // 250 ms later: two tokens back, the third half-way.
        let later = start + Duration::from_millis(250);
        assert_eq!(bucket.take(later), Ok(Duration::ZERO));
        assert_eq!(bucket.take(later), Ok(Duration::ZERO));
        let wait = bucket.take(later).unwrap_err();
        assert!(
            wait.abs_diff(Duration::from_millis(50)) < Duration::from_micros(10),
            "{wait:?}"
        );
        // Never more than the burst, however long it was quiet.
        let quiet = start + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.take(quiet).is_ok()).count(), 3);
    }

    #[test]
    fn with_a_wait_requests_over_the_rate_are_spaced_one_token_apart() {
        let start = Instant::now();
        let bucket = TokenBucket::new(10, 1, Duration::from_millis(350), start);
        assert_eq!(bucket.take(start), Ok(Duration::ZERO));
        let waits: Vec<_> = (0..3).map(|_| bucket.take(start).unwrap()).collect();
        let ms = |w: &Duration| (w.as_secs_f64() * 1000.0).round() as u64;
        assert_eq!(waits.iter().map(ms).collect::<Vec<_>>(), [100, 200, 300]);
        // The fifth would wait 400 ms, past the 350 allowed: refused, and it takes
        // nothing from those waiting.
        let refused = bucket.take(start).unwrap_err();
        assert_eq!(ms(&refused), 50);
        let later = start + Duration::from_millis(300);
        assert_eq!(ms(&bucket.take(later).unwrap()), 100);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_s(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_s(Duration::from_millis(1500)), 2);
    }
}
