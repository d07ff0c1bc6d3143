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

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a request over the quota waits before its 429.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(1);

/// Tokens refill continuously at `rate_per_s` up to `burst`; a request takes one.
#[derive(Debug)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u64, burst: u64, now: Instant) -> Self {
        assert!(
            rate_per_s > 0 && burst > 0,
            "a quota needs a rate and a burst"
        );
        Self {
            rate_per_s: rate_per_s as f64,
            burst: burst as f64,
            state: Mutex::new(Bucket {
                tokens: burst as f64,
                refilled_at: now,
            }),
        }
    }

    /// Takes a token, or says how long until the next one.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut bucket = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_s).min(self.burst);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64(
            (1.0 - bucket.tokens) / self.rate_per_s,
        ))
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
        let bucket = TokenBucket::new(10, 3, start);
        assert!((0..3).all(|_| bucket.take(start).is_ok()));
        let wait = bucket.take(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // 250 ms later: two tokens back, the third half-way.
        let later = start + Duration::from_millis(250);
        assert!(bucket.take(later).is_ok());
        assert!(bucket.take(later).is_ok());
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
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_s(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_s(Duration::from_millis(1500)), 2);
    }
}
