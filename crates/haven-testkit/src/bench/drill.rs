//! `haven bench drill`: is a drill non-disruptive? A 3-node cluster archives to a real
//! S3-compatible server (SeaweedFS, on loopback); a closed loop finds its saturation
//! throughput; then open-loop writes at half of it, in alternating phases without and
//! with drills running back to back (`haven drill --config <node 1>`, a process of its
//! own, as an operator would run it). The write p99 with drills, against without, in the
//! same run (target ≤ 1.10).

use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use haven_bench::load;
use haven_bench::load::Mode;
use haven_bench::progress::Progress;
use serde::Serialize;

use super::archive::cluster_with;
use super::archive::spec;
use super::archive::store_and_key;
use super::archive::workload;

#[derive(Debug, Clone, clap::Args)]
pub struct DrillBenchArgs {
    /// Length of each phase.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Phases of each kind, alternated (without, with, without, with, ...).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// The open-loop rate as a share of the measured saturation throughput.
    #[arg(long, default_value_t = 0.5)]
    pub load: f64,
    /// 5 s phases, one round: a smoke run, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const CHECKPOINTS: &str =
    "[checkpoints]\nmode = \"managed\"\nevery_entries = 5000\nevery_seconds = 0\nkeep = 2\n";

#[derive(Debug, Serialize)]
pub struct DrillBenchReport {
    pub store: String,
    pub seconds: u64,
    pub saturation_throughput: f64,
    pub rate: f64,
    pub phases: Vec<Phase>,
    /// Mean p99 of the phases with drills over that of the phases without.
    pub p99_ratio: f64,
    pub p50_ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub drilling: bool,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub throughput: f64,
    /// Failed writes by kind.
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Drills that finished during the phase, and how many passed.
    pub drills: u64,
    pub drills_passed: u64,
}

pub async fn run(args: &DrillBenchArgs, exe: &Path) -> anyhow::Result<DrillBenchReport> {
    let (seconds, rounds) = match args.quick {
        true => (5, 1),
        false => (args.seconds, args.rounds),
    };
    if seconds == 0 || rounds == 0 || !(0.0..=1.0).contains(&args.load) || args.load == 0.0 {
        bail!("--seconds and --rounds must be positive, --load in (0, 1]");
    }
    let (server, work, key) = store_and_key("haven-bench-drill-").await?;
    let config = format!(
        "{CHECKPOINTS}[archive]\nurl = \"s3://haven/bench-drill\"\nendpoint = \"{}\"\nkey_file = \"{}\"\n",
        server.endpoint,
        key.display()
    );
    let (cluster, leader) = cluster_with(exe, &work.path().join("cluster"), &config, 3).await?;
    let duration = Duration::from_secs(seconds);
    let closed = spec(&cluster, leader, Mode::Closed, duration)?;
    let saturated = load::run(&closed, workload(), &Progress::hidden()).await?;
    let rate = saturated.throughput * args.load;
    let drilling_node = (leader + 1) % cluster.slots.len();
    let drill_config = cluster.slots[drilling_node].config_path.clone();
    let mut phases = Vec::with_capacity(rounds * 2);
    for _ in 0..rounds {
        for drilling in [false, true] {
            let open = spec(&cluster, leader, Mode::Open { rate }, duration)?;
            let drills = drilling.then(|| Drills::start(exe, &drill_config));
            let report = load::run(&open, workload(), &Progress::hidden()).await?;
            let (done, passed) = match drills {
                Some(drills) => drills.stop().await,
                None => (0, 0),
            };
            let latency = (report.latency.all.as_ref()).context("no write succeeded")?;
            phases.push(Phase {
                drilling,
                p50_ms: latency.p50_ms,
                p99_ms: latency.p99_ms,
                throughput: report.throughput,
                errors: report.errors.clone(),
                drills: done,
                drills_passed: passed,
            });
        }
    }
    let mean = |drilling: bool, of: fn(&Phase) -> f64| {
        let chosen: Vec<f64> = (phases.iter())
            .filter(|p| p.drilling == drilling)
            .map(of)
            .collect();
        chosen.iter().sum::<f64>() / chosen.len().max(1) as f64
    };
    let p99_ratio = mean(true, |p| p.p99_ms) / mean(false, |p| p.p99_ms).max(1e-9);
    let p50_ratio = mean(true, |p| p.p50_ms) / mean(false, |p| p.p50_ms).max(1e-9);
    Ok(DrillBenchReport {
        store: format!("SeaweedFS at {}", server.endpoint),
        seconds,
        saturation_throughput: saturated.throughput,
        rate,
        phases,
        p99_ratio,
        p50_ratio,
    })
}

/// `haven drill` run back to back until stopped; counts the drills and those that passed.
struct Drills {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
    done: Arc<AtomicU64>,
    passed: Arc<AtomicU64>,
}

impl Drills {
    fn start(exe: &Path, config: &Path) -> Self {
        let (stop, done, passed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (exe, config): (PathBuf, PathBuf) = (exe.to_path_buf(), config.to_path_buf());
        let task = {
            let (stop, done, passed) = (stop.clone(), done.clone(), passed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Acquire) {
                    let status = tokio::process::Command::new(&exe)
                        .args([
                            "drill",
                            "--json",
                            "--check-http",
                            "GET /count 200",
                            "--config",
                        ])
                        .arg(&config)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .kill_on_drop(true)
                        .status()
                        .await;
                    done.fetch_add(1, Ordering::AcqRel);
                    if status.is_ok_and(|s| s.success()) {
                        passed.fetch_add(1, Ordering::AcqRel);
                    }
                }
            })
        };
        Self {
            stop,
            task,
            done,
            passed,
        }
    }

    /// Lets the drill under way finish; drills done and passed.
    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Release);
        let _ = self.task.await;
        (
            self.done.load(Ordering::Acquire),
            self.passed.load(Ordering::Acquire),
        )
    }
}

pub fn render(r: &DrillBenchReport) -> String {
    let mut text = format!(
        "drill bench ({}), 3 nodes, {} s phases\n\
         saturation throughput {:.0} writes/s; open loop at {:.0} writes/s\n\n\
         phase      p50 ms   p99 ms  writes/s  errors  drills (passed)\n",
        r.store, r.seconds, r.saturation_throughput, r.rate
    );
    for p in &r.phases {
        text.push_str(&format!(
            "{:<9} {:>7.2} {:>8.2} {:>9.0} {:>7} {:>7} ({})\n",
            if p.drilling { "drilling" } else { "without" },
            p.p50_ms,
            p.p99_ms,
            p.throughput,
            p.errors.values().sum::<u64>(),
            p.drills,
            p.drills_passed
        ));
    }
    text.push_str(&format!(
        "\np99 with drills / without: {:.2} (target ≤ 1.10); p50: {:.2}\n",
        r.p99_ratio, r.p50_ratio
    ));
    text
}
