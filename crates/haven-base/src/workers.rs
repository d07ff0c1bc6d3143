//! A node's background work as named workers: every long-lived task (the raft server, a
//! service's apply delivery, its checkpoint trigger, the app supervisor, ...) is started
//! through [`Workers::spawn`] under a name, is listed with its state by `GET /workers` on
//! the admin port, and is waited for at shutdown. A worker that ends early is logged,
//! and one that panics is kept in the list as failed with the panic's message, so a dead
//! background task shows instead of silently taking a feature with it. At shutdown a
//! worker that does not stop within the grace period is aborted and named.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use futures::FutureExt;
use serde::Deserialize;
use serde::Serialize;
use tokio::task::JoinHandle;

/// Most workers a node keeps in its list: a few per service. A leak of workers (one
/// spawned per request, say) fails loudly instead of growing the list without bound.
pub const MAX_WORKERS: usize = 1024;

/// How a worker stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Running,
    /// Returned: at shutdown, or early (logged).
    Ended,
    /// Panicked, with the panic's message.
    Failed(String),
}

/// One row of `GET /workers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub state: WorkerState,
    /// Since the worker started.
    pub age_ms: u64,
}

struct Worker {
    name: String,
    started: Instant,
    state: Mutex<WorkerState>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    fn state(&self) -> std::sync::MutexGuard<'_, WorkerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, outcome: Result<(), Box<dyn Any + Send>>) {
        let state = match outcome {
            Ok(()) => {
                tracing::debug!(worker = %self.name, "worker ended");
                WorkerState::Ended
            }
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                tracing::error!(worker = %self.name, panic = %message, "worker panicked");
                WorkerState::Failed(message)
            }
        };
        *self.state() = state;
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// The named workers of one node. Cheap to clone; clones share the list.
#[derive(Clone, Default)]
pub struct Workers {
    list: Arc<Mutex<Vec<Arc<Worker>>>>,
    /// Put before every name spawned through this handle, e.g. a service's name.
    scope: Option<Arc<str>>,
}

impl Workers {
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle on the same list whose workers are named `scope/name`: a service's
    /// workers, whatever part of the code starts them.
    pub fn scoped(&self, scope: &str) -> Self {
        let scope = match &self.scope {
            Some(outer) => format!("{outer}/{scope}"),
            None => scope.to_string(),
        };
        Self {
            list: self.list.clone(),
            scope: Some(scope.into()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Worker>>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `work` as the worker `name`. It should return once the node's shutdown signal
    /// fires; [`Self::stop_all`] aborts it otherwise.
    pub fn spawn<F>(&self, name: impl Into<String>, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let worker = Arc::new(Worker {
            name: match &self.scope {
                Some(scope) => format!("{scope}/{name}"),
                None => name,
            },
            started: Instant::now(),
            state: Mutex::new(WorkerState::Running),
            task: Mutex::new(None),
        });
        let mut list = self.lock();
        assert!(
            list.len() < MAX_WORKERS,
            "more than {MAX_WORKERS} workers: a worker is spawned per request somewhere"
        );
        list.push(worker.clone());
        drop(list);
        let running = worker.clone();
        let task = tokio::spawn(async move {
            let outcome = AssertUnwindSafe(work).catch_unwind().await;
            running.finish(outcome);
        });
        *worker.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Every worker, in start order, with its state.
    pub fn list(&self) -> Vec<WorkerInfo> {
        self.lock()
            .iter()
            .map(|w| WorkerInfo {
                name: w.name.clone(),
                state: w.state().clone(),
                age_ms: w.started.elapsed().as_millis() as u64,
            })
            .collect()
    }

    /// Whether `worker` was spawned through this handle's scope (every worker, unscoped).
    fn owns(&self, worker: &Worker) -> bool {
        self.scope.as_deref().is_none_or(|scope| {
            (worker.name.strip_prefix(scope)).is_some_and(|rest| rest.starts_with('/'))
        })
    }

    /// Waits up to `grace` for every worker of this handle's scope (every worker,
    /// unscoped) to end (the caller has signalled shutdown), then aborts the rest; returns
    /// their names.
    pub async fn stop_all(&self, grace: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + grace;
        let workers: Vec<Arc<Worker>> = self
            .lock()
            .iter()
            .filter(|w| self.owns(w))
            .cloned()
            .collect();
        let mut stuck = Vec::new();
        for worker in workers {
            let task = worker.task.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some(mut task) = task else { continue };
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                *worker.state() =
                    WorkerState::Failed(format!("did not stop within {grace:?}; aborted"));
                tracing::warn!(worker = %worker.name, ?grace, "worker did not stop in time; aborted");
                stuck.push(worker.name.clone());
            }
        }
        stuck
    }

    /// [`Self::stop_all`], then drops the scope's workers from the list: what a service
    /// removed from a running node leaves behind, so a service added later under the same
    /// name starts with a clean list.
    pub async fn remove_all(&self, grace: Duration) -> Vec<String> {
        let stuck = self.stop_all(grace).await;
        self.lock().retain(|w| !self.owns(w));
        stuck
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::watch;

    use super::*;

    fn state_of(workers: &Workers, name: &str) -> WorkerState {
        let list = workers.list();
        let found = list.iter().find(|w| w.name == name);
        found.map(|w| w.state.clone()).unwrap()
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn workers_are_listed_with_their_state_and_a_panic_is_kept() {
        let workers = Workers::new();
        let (stop, stopping) = watch::channel(false);
        let mut waits = stopping.clone();
        workers.spawn("waits", async move {
            let _ = waits.wait_for(|s| *s).await;
        });
        workers.spawn("returns", async {});
        workers
            .scoped("orders")
            .spawn("panics", async { panic!("disk on fire") });
        settle().await;
        assert_eq!(state_of(&workers, "waits"), WorkerState::Running);
        assert_eq!(state_of(&workers, "returns"), WorkerState::Ended);
        assert_eq!(
            state_of(&workers, "orders/panics"),
            WorkerState::Failed("disk on fire".into())
        );
        let names: Vec<String> = workers.list().into_iter().map(|w| w.name).collect();
        assert_eq!(names, ["waits", "returns", "orders/panics"]);
        stop.send(true).unwrap();
        assert!(workers.stop_all(Duration::from_secs(5)).await.is_empty());
        assert_eq!(state_of(&workers, "waits"), WorkerState::Ended);
    }

    #[tokio::test]
    async fn a_scope_stops_and_removes_only_its_own_workers() {
        let workers = Workers::new();
        let (stop, stopping) = watch::channel(false);
        let orders = workers.scoped("orders");
        let mut waits = stopping.clone();
        orders.spawn("waits", async move {
            let _ = waits.wait_for(|s| *s).await;
        });
        workers
            .scoped("orders-eu")
            .spawn("runs", std::future::pending());
        workers.spawn("server", std::future::pending());
        stop.send(true).unwrap();
        assert!(orders.remove_all(Duration::from_secs(5)).await.is_empty());
        let names: Vec<String> = workers.list().into_iter().map(|w| w.name).collect();
        assert_eq!(names, ["orders-eu/runs", "server"]);
        assert_eq!(state_of(&workers, "server"), WorkerState::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_ignores_shutdown_is_aborted_and_named() {
        let workers = Workers::new();
        workers.spawn("stubborn", std::future::pending());
        workers.spawn("quick", async {});
        settle().await;
        let stuck = workers.stop_all(Duration::from_millis(100)).await;
        assert_eq!(stuck, ["stubborn"]);
        assert_eq!(
            state_of(&workers, "stubborn"),
            WorkerState::Failed("did not stop within 100ms; aborted".into())
        );
    }
}
