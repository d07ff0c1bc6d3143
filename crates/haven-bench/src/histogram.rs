//! Latency histograms: HDR histograms with fixed bounds, and their summary.
//!
//! An HDR histogram keeps every recorded value to a fixed *relative* precision
//! (3 significant digits here, so within 0.1%) in constant memory, so tail
//! percentiles such as p99.9 are real percentiles of every request, not of a
//! sample. Each load worker owns its histograms (recording is a few adds, with
//! no lock) and they are merged once at the end.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::BenchError;

/// Smallest latency told apart from zero, in microseconds.
pub const LOWEST_US: u64 = 1;
/// Largest latency kept, in microseconds (60 s). Longer latencies are recorded
/// as 60 s: see [`LatencyHistogram::record`].
pub const HIGHEST_US: u64 = 60_000_000;
/// Significant decimal digits kept for every value.
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// Latencies in microseconds, between [`LOWEST_US`] and [`HIGHEST_US`].
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Histogram<u64>);

/// The percentiles a reader of a benchmark looks at, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    pub count: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        // The bounds are constants that satisfy hdrhistogram's rules
        // (1 <= low, 2 * low <= high, digits <= 5), so this cannot fail.
        let histogram = Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Self(histogram)
    }

    /// Records one latency. Latencies above 60 s are *clamped* to 60 s rather
    /// than dropped or panicking: such a request still counts, and its latency
    /// shows as the 60 s ceiling. Sub-microsecond parts are truncated.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros);
    }

    /// Adds `other`'s counts to this histogram.
    pub fn merge(&mut self, other: &Self) -> Result<(), BenchError> {
        self.0.add(&other.0)?;
        Ok(())
    }

    /// Number of latencies recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `None` when nothing was recorded, since percentiles of nothing would
    /// read as a latency of zero.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        let quantile = |q: f64| ms(self.0.value_at_quantile(q));
        Some(LatencySummary {
            p50_ms: quantile(0.5),
            p90_ms: quantile(0.9),
            p99_ms: quantile(0.99),
            p999_ms: quantile(0.999),
            max_ms: ms(self.0.max()),
            mean_ms: self.0.mean() / 1000.0,
            count: self.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_micros(values: impl IntoIterator<Item = u64>) -> LatencyHistogram {
        let mut histogram = LatencyHistogram::new();
        for v in values {
            histogram.record(Duration::from_micros(v));
        }
        histogram
    }

    fn assert_close(actual: f64, expected: f64) {
        // 3 significant digits: every value is within 0.1% of what was recorded.
        assert!(
            (actual - expected).abs() <= expected * 0.001,
            "{actual} is not within 0.1% of {expected}"
        );
    }

    #[test]
    fn percentiles_of_a_uniform_range() {
        let summary = from_micros(1..=1000).summary();
        let Some(s) = summary else {
            panic!("a non-empty histogram has a summary")
        };
        assert_eq!(s.count, 1000);
        assert_close(s.p50_ms, 0.500);
        assert_close(s.p90_ms, 0.900);
        assert_close(s.p99_ms, 0.990);
        assert_close(s.p999_ms, 0.999);
        assert_close(s.max_ms, 1.000);
        assert_close(s.mean_ms, 0.5005);
    }

    #[test]
    fn larger_values_keep_three_significant_digits() {
        let s = from_micros([5_000, 1_234_567]).summary();
        let Some(s) = s else { panic!("non-empty") };
        assert_close(s.p50_ms, 5.0);
        assert_close(s.max_ms, 1234.567);
    }

    #[test]
    fn merging_adds_counts() {
        let mut a = from_micros(1..=1000);
        let b = from_micros([2_000_000; 10]);
        a.merge(&b).expect("same bounds merge");
        assert_eq!(a.len(), 1010);
        let s = a.summary().expect("non-empty");
        assert_close(s.max_ms, 2000.0);
        assert_close(s.p999_ms, 2000.0);
        assert_close(s.p50_ms, 0.505);
    }

    #[test]
    fn values_above_the_ceiling_are_clamped_not_lost() {
        let mut histogram = LatencyHistogram::new();
        histogram.record(Duration::from_secs(3600));
        histogram.record(Duration::MAX);
        let s = histogram.summary().expect("non-empty");
        assert_eq!(s.count, 2);
        assert_close(s.max_ms, 60_000.0);
    }

    #[test]
    fn sub_microsecond_latencies_record_as_zero() {
        let mut histogram = LatencyHistogram::new();
        histogram.record(Duration::from_nanos(999));
        assert_eq!(
            histogram.summary().map(|s| (s.count, s.max_ms)),
            Some((1, 0.0))
        );
    }

    #[test]
    fn empty_histogram_has_no_summary() {
        assert!(LatencyHistogram::new().summary().is_none());
        assert!(LatencyHistogram::default().is_empty());
    }
}
