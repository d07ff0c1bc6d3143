//! `haven bench failover`: how long writes are unavailable when the leader goes away.
//!
//! A steady stream of writes goes to the followers (a client of the dead node would see
//! refused connections, which measures the client, not the cluster). The leader is
//! SIGKILLed (a crash), or sent SIGTERM (a planned restart: it hands leadership over
//! first); the window is from the last write acknowledged before the signal to the first
//! write sent after it that is acknowledged. The node is restarted and caught up before
//! the next trial, so every trial starts from a healthy cluster.
//!
//! With `--steady`, a fault-free phase comes first: writes at half (`--steady-load`) of
//! the measured saturation throughput, with every node's term and leader sampled, so
//! timeouts short enough for a fast failover are seen not to cost elections under load.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use haven_bench::load;
use haven_bench::load::Mode;
use haven_bench::progress::Progress;
use serde::Serialize;

use super::archive::spec;
use super::archive::workload;
use crate::cluster::LocalCluster;
use crate::cluster::PREPOPULATED_LINES;
use haven_client::http::Http;

#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// Leader failures to measure (0 with --steady: only the steady phase).
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// Concurrent writers; each sends its next write as soon as the last one is answered.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// How the leader goes away: `kill` (SIGKILL, a crash) or `term` (SIGTERM, a planned
    /// restart).
    #[arg(long, value_enum, default_value_t = Signal::Kill)]
    pub signal: Signal,
    /// Seconds of fault-free load before the trials, counting elections (0: none).
    #[arg(long, default_value_t = 0)]
    pub steady: u64,
    /// The steady phase's open-loop rate as a share of the saturation throughput, which a
    /// closed loop measures first.
    #[arg(long, default_value_t = 0.5)]
    pub steady_load: f64,
    /// Run the nodes from another `haven` binary (a build of the baseline), measured by
    /// this build's harness: an A/B of builds, one run each, alternated.
    #[arg(long)]
    pub nodes_from: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    Kill,
    Term,
}

/// Writers give up on a request after this long; a stalled write counts as unavailable.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Steady load before each failure, so the window starts from a busy cluster.
const STEADY: Duration = Duration::from_secs(1);
/// A trial that has not seen a write succeed after this long fails the run.
const GIVE_UP: Duration = Duration::from_secs(20);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A node sent SIGTERM must have exited by then (it hands over within 3 s, then stops).
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// The closed loop that finds the saturation throughput for the steady phase.
const SATURATION_RUN: Duration = Duration::from_secs(5);
/// How often the steady phase reads every node's term and leader.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub signal: Signal,
    pub steady: Option<SteadyReport>,
    pub trials: Vec<Trial>,
    pub median_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Trial {
    pub stopped_node: u64,
    pub unavailable_ms: f64,
    pub new_leader: u64,
}

/// The fault-free phase: any election in it is spurious.
#[derive(Debug, Serialize)]
pub struct SteadyReport {
    pub seconds: u64,
    pub saturation_throughput: f64,
    pub rate: f64,
    pub achieved: f64,
    /// Highest term any node reported, at the start and at the end.
    pub term_start: u64,
    pub term_end: u64,
    /// Times the leader some node reported differed from the previous sample's.
    pub leader_changes: u64,
    /// Failed writes by kind (a timeout, a refusal, ...); empty when none failed.
    pub write_errors: std::collections::BTreeMap<String, u64>,
}

impl SteadyReport {
    pub fn elections(&self) -> u64 {
        self.term_end - self.term_start
    }
}

/// One write as the client saw it.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    sent: Instant,
    done: Instant,
    ok: bool,
}

pub async fn run(args: &FailoverArgs, exe: &std::path::Path) -> anyhow::Result<FailoverReport> {
    if (args.trials == 0 && args.steady == 0) || args.writers == 0 {
        bail!("--writers must be at least 1, and --trials or --steady too");
    }
    if !(args.steady_load > 0.0 && args.steady_load <= 1.0) {
        bail!("--steady-load must be in (0, 1]");
    }
    let work = tempfile::Builder::new()
        .prefix("haven-failover-")
        .tempdir()
        .context("creating a temporary directory")?;
    let exe = args.nodes_from.as_deref().unwrap_or(exe);
    let spec = super::systems::log_app_cluster(3, exe, work.path(), PREPOPULATED_LINES);
    let mut cluster = LocalCluster::start(spec)?;
    let steady = match args.steady {
        0 => None,
        seconds => Some(steady(&cluster, seconds, args.steady_load).await?),
    };
    let mut trials = Vec::with_capacity(args.trials);
    for n in 0..args.trials {
        let trial = one_trial(&mut cluster, args.writers, args.signal).await?;
        tracing::info!(trial = n + 1, ms = trial.unavailable_ms, "failover trial");
        trials.push(trial);
    }
    let mut windows: Vec<f64> = trials.iter().map(|t| t.unavailable_ms).collect();
    windows.sort_by(f64::total_cmp);
    Ok(FailoverReport {
        signal: args.signal,
        steady,
        median_ms: median(&windows),
        max_ms: windows.last().copied().unwrap_or(0.0),
        trials,
    })
}

async fn one_trial(
    cluster: &mut LocalCluster,
    writers: usize,
    signal: Signal,
) -> anyhow::Result<Trial> {
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    let leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    let targets: Vec<String> = (0..cluster.slots.len())
        .filter(|i| *i != leader)
        .map(|i| format!("{}/append", cluster.slots[i].client_url()))
        .collect();
    let load = Load::start(targets, writers);
    tokio::time::sleep(STEADY).await;
    // Leadership can move during the steady phase on a busy machine; stop whoever leads
    // now (writers aimed at it just fail, the window counts any acknowledged write).
    let leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    let signalled_at = Instant::now();
    let stopped =
        match signal {
            Signal::Kill => {
                cluster.kill_node(leader);
                Ok(())
            }
            Signal::Term => (cluster.stop_node(leader, STOP_LIMIT).await).and_then(|status| {
                match status.success() {
                    true => Ok(()),
                    false => Err(anyhow::anyhow!(
                        "the leader exited with {status} on SIGTERM"
                    )),
                }
            }),
        };
    let recovered = load.wait_for_success_after(signalled_at, GIVE_UP).await;
    let attempts = load.stop().await;
    stopped?;
    if !recovered {
        bail!(
            "no write succeeded within {GIVE_UP:?} of stopping the leader; logs in {}",
            cluster.dir().display()
        );
    }
    let unavailable = unavailable_window(&attempts, signalled_at)
        .context("no write was acknowledged before the leader was stopped")?;
    let new_leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    cluster.start_node(leader)?;
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    cluster.wait_converged(READY_TIMEOUT).await?;
    Ok(Trial {
        stopped_node: cluster.slots[leader].id,
        unavailable_ms: unavailable.as_secs_f64() * 1e3,
        new_leader: cluster.slots[new_leader].id,
    })
}

/// Saturation first (closed loop on the leader), then open-loop writes at `share` of it
/// for `seconds` while every node's term and leader are sampled.
async fn steady(cluster: &LocalCluster, seconds: u64, share: f64) -> anyhow::Result<SteadyReport> {
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    let leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    let closed = spec(cluster, leader, Mode::Closed, SATURATION_RUN)?;
    let saturated = load::run(&closed, workload(), &Progress::hidden()).await?;
    let rate = saturated.throughput * share;
    let duration = Duration::from_secs(seconds);
    let open = spec(cluster, leader, Mode::Open { rate }, duration)?;
    let (term_start, _) = terms_and_leader(cluster).await;
    let progress = Progress::hidden();
    let run = load::run(&open, workload(), &progress);
    let mut run = std::pin::pin!(run);
    let mut leader_changes = 0;
    let mut last_leader = None;
    let report = loop {
        tokio::select! {
            report = &mut run => break report?,
            () = tokio::time::sleep(SAMPLE_EVERY) => {
                let (_, leader) = terms_and_leader(cluster).await;
                if leader.is_some() && last_leader.is_some() && leader != last_leader {
                    leader_changes += 1;
                }
                last_leader = leader.or(last_leader);
            }
        }
    };
    let (term_end, _) = terms_and_leader(cluster).await;
    Ok(SteadyReport {
        seconds,
        saturation_throughput: saturated.throughput,
        rate,
        achieved: report.throughput,
        term_start,
        term_end,
        leader_changes,
        write_errors: report.errors,
    })
}

/// The highest term any node reports, and the leader the first answering node names.
async fn terms_and_leader(cluster: &LocalCluster) -> (u64, Option<u64>) {
    let mut term = 0;
    let mut leader = None;
    for i in 0..cluster.slots.len() {
        if let Ok(status) = cluster.status(i).await {
            term = term.max(status.term);
            leader = leader.or(status.leader_id);
        }
    }
    (term, leader)
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
    let mut text = String::new();
    if let Some(steady) = &report.steady {
        text.push_str(&format!(
            "steady phase: {} s at {:.0} writes/s ({:.0} achieved, saturation {:.0}): {} elections (term {} to {}), {} leader changes, failed writes {:?}\n",
            steady.seconds,
            steady.rate,
            steady.achieved,
            steady.saturation_throughput,
            steady.elections(),
            steady.term_start,
            steady.term_end,
            steady.leader_changes,
            steady.write_errors
        ));
    }
    if report.trials.is_empty() {
        return text;
    }
    let signal = match report.signal {
        Signal::Kill => "SIGKILL",
        Signal::Term => "SIGTERM",
    };
    text.push_str(&format!(
        "trial  {signal} to  new leader  writes unavailable\n"
    ));
    for (n, trial) in report.trials.iter().enumerate() {
        text.push_str(&format!(
            "{:>5}  {:>10}  {:>10}  {:>10.0} ms\n",
            n + 1,
            trial.stopped_node,
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
