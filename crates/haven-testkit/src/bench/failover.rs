//! `haven bench failover`: how long writes are unavailable when the leader dies.
//!
//! A steady stream of writes goes to the followers (a client of the dead node would see
//! refused connections, which measures the client, not the cluster). The leader is
//! SIGKILLed; the window is from the last write acknowledged before the kill to the first
//! write sent after the kill that is acknowledged. The killed node is restarted and
//! caught up before the next trial, so every trial starts from a healthy cluster.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use serde::Serialize;

use crate::cluster::LocalCluster;
use crate::cluster::PREPOPULATED_LINES;
use haven_client::http::Http;

#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// Leader kills to measure.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Concurrent writers; each sends its next write as soon as the last one is answered.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
}

/// Writers give up on a request after this long; a stalled write counts as unavailable.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Steady load before each kill, so the window starts from a busy cluster.
const STEADY: Duration = Duration::from_secs(1);
/// A trial that has not seen a write succeed after this long fails the run.
const GIVE_UP: Duration = Duration::from_secs(20);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub trials: Vec<Trial>,
    pub median_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Trial {
    pub killed_node: u64,
    pub unavailable_ms: f64,
    pub new_leader: u64,
}

/// One write as the client saw it.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    sent: Instant,
    done: Instant,
    ok: bool,
}

pub async fn run(args: &FailoverArgs, exe: &std::path::Path) -> anyhow::Result<FailoverReport> {
    if args.trials == 0 || args.writers == 0 {
        bail!("--trials and --writers must be at least 1");
    }
    let work = tempfile::Builder::new()
        .prefix("haven-failover-")
        .tempdir()
        .context("creating a temporary directory")?;
    let spec = super::systems::log_app_cluster(3, exe, work.path(), PREPOPULATED_LINES);
    let mut cluster = LocalCluster::start(spec)?;
    let mut trials = Vec::with_capacity(args.trials);
    for n in 0..args.trials {
        let trial = one_trial(&mut cluster, args.writers).await?;
        tracing::info!(trial = n + 1, ms = trial.unavailable_ms, "failover trial");
        trials.push(trial);
    }
    let mut windows: Vec<f64> = trials.iter().map(|t| t.unavailable_ms).collect();
    windows.sort_by(f64::total_cmp);
    Ok(FailoverReport {
        median_ms: median(&windows),
        max_ms: windows.last().copied().unwrap_or(0.0),
        trials,
    })
}

async fn one_trial(cluster: &mut LocalCluster, writers: usize) -> anyhow::Result<Trial> {
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    let leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    let targets: Vec<String> = (0..cluster.slots.len())
        .filter(|i| *i != leader)
        .map(|i| format!("{}/append", cluster.slots[i].client_url()))
        .collect();
    let load = Load::start(targets, writers);
    tokio::time::sleep(STEADY).await;
    // Leadership can move during the steady phase on a busy machine; kill whoever leads
    // now (writers aimed at it just fail, the window counts any acknowledged write).
    let leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    let killed_at = Instant::now();
    cluster.kill_node(leader);
    let recovered = load.wait_for_success_after(killed_at, GIVE_UP).await;
    let attempts = load.stop().await;
    if !recovered {
        bail!(
            "no write succeeded within {GIVE_UP:?} of killing the leader; logs in {}",
            cluster.dir().display()
        );
    }
    let unavailable = unavailable_window(&attempts, killed_at)
        .context("no write was acknowledged before the kill")?;
    let new_leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    cluster.start_node(leader)?;
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    cluster.wait_converged(READY_TIMEOUT).await?;
    Ok(Trial {
        killed_node: cluster.slots[leader].id,
        unavailable_ms: unavailable.as_secs_f64() * 1e3,
        new_leader: cluster.slots[new_leader].id,
    })
}

/// From the last acknowledgement before `kill` to the first acknowledgement of a write
/// sent after it.
fn unavailable_window(attempts: &[Attempt], kill: Instant) -> Option<Duration> {
    let last_before = attempts
        .iter()
        .filter(|a| a.ok && a.done <= kill)
        .map(|a| a.done)
        .max()?;
    let first_after = attempts
        .iter()
        .filter(|a| a.ok && a.sent >= kill)
        .map(|a| a.done)
        .min()?;
    Some(first_after.saturating_duration_since(last_before))
}

fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Closed-loop writers recording every attempt.
struct Load {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(targets: Vec<String>, writers: usize) -> Self {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let body = bytes::Bytes::from(vec![b'f'; super::systems::BODY_BYTES]);
        let tasks = (0..writers)
            .map(|w| {
                let url = targets[w % targets.len()].clone();
                let (attempts, stop, body) = (attempts.clone(), stop.clone(), body.clone());
                tokio::spawn(async move {
                    let http = Http::new(WRITE_TIMEOUT);
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let ok = http
                            .post(&url, body.clone())
                            .await
                            .is_ok_and(|r| r.status == 201);
                        let attempt = Attempt {
                            sent,
                            done: Instant::now(),
                            ok,
                        };
                        lock(&attempts).push(attempt);
                        if !ok {
                            // A refused write comes back at once; don't spin on it.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            })
            .collect();
        Self {
            attempts,
            stop,
            tasks,
        }
    }

    async fn wait_for_success_after(&self, kill: Instant, limit: Duration) -> bool {
        let deadline = kill + limit;
        while Instant::now() < deadline {
            if lock(&self.attempts).iter().any(|a| a.ok && a.sent >= kill) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    async fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        std::mem::take(&mut *lock(&self.attempts))
    }
}

fn lock(attempts: &Mutex<Vec<Attempt>>) -> std::sync::MutexGuard<'_, Vec<Attempt>> {
    attempts
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A few lines for people.
pub fn render(report: &FailoverReport) -> String {
    let mut text = String::from("trial  killed  new leader  writes unavailable\n");
    for (n, trial) in report.trials.iter().enumerate() {
        text.push_str(&format!(
            "{:>5}  {:>6}  {:>10}  {:>10.0} ms\n",
            n + 1,
            trial.killed_node,
            trial.new_leader,
            trial.unavailable_ms
        ));
    }
    text.push_str(&format!(
        "median {:.0} ms, max {:.0} ms over {} trials\n",
        report.median_ms,
        report.max_ms,
        report.trials.len()
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_runs_from_last_ack_before_to_first_ack_of_a_write_sent_after() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let attempts = [
            Attempt {
                sent: at(0),
                done: at(10),
                ok: true,
            },
            Attempt {
                sent: at(10),
                done: at(95),
                ok: true,
            },
            // In flight at the kill (100), answered after: does not end the window.
            Attempt {
                sent: at(95),
                done: at(150),
                ok: true,
            },
            Attempt {
                sent: at(150),
                done: at(400),
                ok: false,
            },
            Attempt {
                sent: at(400),
                done: at(700),
                ok: true,
            },
            Attempt {
                sent: at(700),
                done: at(710),
                ok: true,
            },
        ];
        assert_eq!(
            unavailable_window(&attempts, at(100)),
            Some(Duration::from_millis(605))
        );
        assert_eq!(unavailable_window(&attempts[3..], at(100)), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert_eq!(median(&[]), 0.0);
    }
}
