//! The open loop's timetable, as a pure function so it can be tested exactly.
//!
//! An open-loop generator decides *in advance* when each request is due, so
//! that a slow response cannot quietly delay (and so hide) the requests behind
//! it. The total rate is dealt out over the workers like cards: global slot `i`
//! is due at `i / rate` seconds after the start and belongs to worker
//! `i % workers`. Worker `w`'s `k`-th request is therefore slot
//! `k * workers + w`. The union of all workers' timetables is one evenly spaced
//! sequence, rather than `workers` bursts that all fire at the same instants.

use std::time::Duration;

/// The intended send times of an open-loop run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    rate: f64,
    workers: u64,
}

impl Schedule {
    /// `rate` is the total for all workers, in requests per second. It must be
    /// positive (see [`crate::load::LoadSpec::validate`]); a non-positive rate
    /// does not panic but yields a meaningless timetable.
    pub fn new(rate: f64, workers: usize) -> Self {
        Self {
            rate,
            // Zero workers would give every request the same slot.
            workers: workers.max(1) as u64,
        }
    }

    /// When `worker`'s `k`-th request (both 0-based) is due, as an offset from
    /// the start of the run.
    ///
    /// Computed from the slot number each time rather than by adding a period
    /// again and again, so rounding never accumulates: slot `i` is always
    /// within half a nanosecond of `i / rate`.
    pub fn offset(&self, worker: usize, k: u64) -> Duration {
        let slot = k.saturating_mul(self.workers).saturating_add(worker as u64);
        // `as u64` saturates, so absurd inputs give a far-future time, not a panic.
        Duration::from_nanos((slot as f64 * 1e9 / self.rate).round() as u64)
    }

    /// How many of `worker`'s requests are due before `horizon`, without
    /// walking the timetable: a generator that fell far behind counts what it
    /// never sent in constant time.
    pub fn due_before(&self, worker: usize, horizon: Duration) -> u64 {
        let slots = horizon.as_secs_f64() * self.rate - worker as f64;
        let estimate = (slots / self.workers as f64).ceil().max(0.0) as u64;
        // `offset` rounds to whole nanoseconds, which can move a request due
        // right at `horizon` to either side; `offset` has the last word.
        let is_due = |k: u64| self.offset(worker, k) < horizon;
        if estimate > 0 && !is_due(estimate - 1) {
            estimate - 1
        } else if is_due(estimate) {
            estimate + 1
        } else {
            estimate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every intended time of `worker` that falls before `horizon`.
    fn times_before(schedule: &Schedule, worker: usize, horizon: Duration) -> Vec<Duration> {
        (0..)
            .map(|k| schedule.offset(worker, k))
            .take_while(|t| *t < horizon)
            .collect()
    }

    #[test]
    fn union_of_workers_is_one_evenly_spaced_sequence() {
        let schedule = Schedule::new(1000.0, 8);
        let mut all: Vec<Duration> = (0..8)
            .flat_map(|w| times_before(&schedule, w, Duration::from_secs(1)))
            .collect();
        all.sort();
        assert_eq!(all.len(), 1000);
        for (i, t) in all.iter().enumerate() {
            assert_eq!(*t, Duration::from_millis(i as u64), "slot {i}");
        }
    }

    #[test]
    fn each_worker_is_increasing_at_its_share_of_the_rate() {
        let schedule = Schedule::new(1000.0, 8);
        for w in 0..8 {
            let times = times_before(&schedule, w, Duration::from_secs(1));
            assert_eq!(times.len(), 125, "worker {w}");
            assert_eq!(times[0], Duration::from_millis(w as u64));
            for pair in times.windows(2) {
                assert_eq!(pair[1] - pair[0], Duration::from_millis(8));
            }
        }
    }

    #[test]
    fn fractional_periods_do_not_drift() {
        let schedule = Schedule::new(3.0, 2);
        assert_eq!(schedule.offset(1, 0), Duration::from_nanos(333_333_333));
        assert_eq!(schedule.offset(0, 1), Duration::from_nanos(666_666_667));
        // Slot 3_000_000 is exactly 1_000_000 s in, with no accumulated error.
        assert_eq!(
            schedule.offset(0, 1_500_000),
            Duration::from_secs(1_000_000)
        );
    }

    #[test]
    fn more_workers_than_requests_leaves_late_workers_idle() {
        let schedule = Schedule::new(2.0, 4);
        let horizon = Duration::from_secs(1);
        let counts: Vec<usize> = (0..4)
            .map(|w| times_before(&schedule, w, horizon).len())
            .collect();
        assert_eq!(counts, [1, 1, 0, 0]);
    }

    #[test]
    fn due_before_counts_the_timetable() {
        let horizons = [
            0,
            1,
            7_999_999,
            8_000_000,
            8_000_001,
            333_333_333,
            999_999_999,
            1_000_000_000,
        ];
        for (rate, workers) in [(1000.0, 8), (3.0, 2), (7.0, 3), (1e6, 16), (0.5, 1)] {
            let schedule = Schedule::new(rate, workers);
            for nanos in horizons {
                let horizon = Duration::from_nanos(nanos);
                for w in 0..workers {
                    let counted = times_before(&schedule, w, horizon).len() as u64;
                    assert_eq!(
                        schedule.due_before(w, horizon),
                        counted,
                        "rate {rate}, {workers} workers, worker {w}, horizon {horizon:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn absurd_inputs_saturate_instead_of_panicking() {
        let schedule = Schedule::new(0.0, 1);
        assert_eq!(schedule.offset(0, 0), Duration::ZERO);
        assert_eq!(schedule.offset(0, 1), Duration::from_nanos(u64::MAX));
        assert_eq!(
            Schedule::new(1e-9, usize::MAX).offset(usize::MAX, u64::MAX),
            Duration::from_nanos(u64::MAX)
        );
        assert_eq!(Schedule::new(1.0, 0), Schedule::new(1.0, 1));
        assert_eq!(
            Schedule::new(f64::NAN, 1).due_before(0, Duration::from_secs(1)),
            1
        );
    }
}
