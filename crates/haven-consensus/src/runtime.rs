//! openraft's async runtime: tokio, with one difference. The random numbers openraft draws
//! (election timeouts, first tick waits) come from a seed when a deterministic simulation
//! installed one on the current thread, so a simulated run replays exactly from its seed.
//! Outside a simulation every draw is freshly seeded from the OS-backed generator.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::time::Duration;

use openraft::OptionalSend;
use openraft::async_runtime::AsyncRuntime;
use openraft::impls::TokioRuntime;
use rand_openraft::SeedableRng;
use rand_openraft::rngs::SmallRng;

thread_local! {
    /// The simulation's seed, advanced on every draw; `None` outside a simulation.
    static SIMULATION_SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Makes every later draw on this thread follow `seed`. A simulation runs all its hosts on
/// one thread, so one call covers the whole simulated cluster.
pub fn seed_this_thread(seed: u64) {
    SIMULATION_SEED.with(|cell| cell.set(Some(seed)));
}

/// Returns the thread to fresh randomness (the end of a simulated run).
pub fn unseed_this_thread() {
    SIMULATION_SEED.with(|cell| cell.set(None));
}

pub(crate) fn next_seed() -> u64 {
    SIMULATION_SEED.with(|cell| match cell.get() {
        Some(seed) => {
            // SplitMix64's increment: consecutive draws get well-mixed, distinct seeds.
            let next = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            cell.set(Some(next));
            next
        }
        None => rand::random(),
    })
}

/// [`TokioRuntime`] with `next_seed` as the source of openraft's random numbers.
#[derive(Debug)]
pub struct HavenRuntime {
    inner: TokioRuntime,
}

type Tokio = TokioRuntime;

impl AsyncRuntime for HavenRuntime {
    type JoinError = <Tokio as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tokio as AsyncRuntime>::Sleep;
    type Instant = <Tokio as AsyncRuntime>::Instant;
    type TimeoutError = <Tokio as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tokio as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = SmallRng;
    type Mpsc = <Tokio as AsyncRuntime>::Mpsc;
    type Watch = <Tokio as AsyncRuntime>::Watch;
    type Oneshot = <Tokio as AsyncRuntime>::Oneshot;
    type Mutex<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::Mutex<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Tokio::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Tokio::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        SmallRng::seed_from_u64(next_seed())
    }

    fn new(threads: usize) -> Self {
        Self {
            inner: Tokio::new(threads),
        }
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.inner.block_on(future)
    }

    fn spawn_blocking<F, T>(f: F) -> impl Future<Output = Result<T, io::Error>> + Send
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        Tokio::spawn_blocking(f)
    }
}

#[cfg(test)]
mod tests {
    use rand_openraft::Rng;

    use super::*;

    fn draws() -> Vec<u64> {
        (0..4)
            .map(|_| HavenRuntime::thread_rng().next_u64())
            .collect()
    }

    #[test]
    fn a_seeded_thread_replays_its_draws_and_an_unseeded_one_does_not() {
        seed_this_thread(7);
        let first = draws();
        seed_this_thread(7);
        assert_eq!(draws(), first);
        seed_this_thread(8);
        assert_ne!(draws(), first);
        unseed_this_thread();
        assert_ne!(draws(), draws());
    }
}
