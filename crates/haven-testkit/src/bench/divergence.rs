//! `haven bench divergence`: what comparing the replicas' answers costs. Closed-loop
//! 128-byte appends to the leader of a fresh 3-node managed log-app cluster, with
//! `app.check_divergence` off and on, in alternating rounds of the same length (off, on,
//! off, on, ...), so that drift of the host over the run falls on both sides alike. The
//! figure is the ratio of the summed throughputs, on / off (target ≥ 0.97).

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use haven_bench::load;
use haven_bench::load::LoadSpec;
use haven_bench::load::Mode;
use haven_bench::load::Target;
use haven_bench::progress::Progress;
use serde::Serialize;

use crate::cluster::AppKind;
use crate::cluster::ClusterSpec;
use crate::cluster::LocalCluster;
use crate::cluster::ServiceSpec;

#[derive(Debug, Clone, clap::Args)]
pub struct DivergenceBenchArgs {
    /// Length of each round's load.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Rounds of each setting (off and on alternate).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// One round of 5 s each: a smoke run, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const CONNECTIONS: usize = 32;
const PREPOPULATE: u64 = 1_000;
const HOST: &str = "app.bench";
const WARMUP: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize)]
pub struct DivergenceBenchReport {
    pub seconds: u64,
    /// Writes per second of each round, in the order run.
    pub off: Vec<f64>,
    pub on: Vec<f64>,
    /// Summed `on` over summed `off` (target ≥ 0.97).
    pub ratio: f64,
    /// Entries the leader found equal to a peer's in the last round with checking on: it
    /// did compare.
    pub compared: f64,
}

pub async fn run(args: &DivergenceBenchArgs, exe: &Path) -> anyhow::Result<DivergenceBenchReport> {
    let (seconds, rounds) = match args.quick {
        true => (5, 1),
        false => (args.seconds, args.rounds),
    };
    if seconds == 0 || rounds == 0 {
        bail!("--seconds and --rounds must be positive");
    }
    let work = tempfile::Builder::new()
        .prefix("haven-bench-divergence-")
        .tempdir()?;
    let duration = Duration::from_secs(seconds);
    let (mut off, mut on, mut compared) = (Vec::new(), Vec::new(), 0.0);
    for round in 0..rounds {
        let dir = work.path().join(format!("off-{round}"));
        off.push(closed_loop(exe, &dir, false, duration).await?.0);
        let dir = work.path().join(format!("on-{round}"));
        let (throughput, seen) = closed_loop(exe, &dir, true, duration).await?;
        on.push(throughput);
        compared = seen;
    }
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    Ok(DivergenceBenchReport {
        seconds,
        ratio: sum(&on) / sum(&off).max(1e-9),
        off,
        on,
        compared,
    })
}

/// Closed-loop write throughput of a fresh cluster, and how many entries its leader
/// found equal to a peer's.
async fn closed_loop(
    exe: &Path,
    dir: &Path,
    check: bool,
    duration: Duration,
) -> anyhow::Result<(f64, f64)> {
    std::fs::create_dir_all(dir)?;
    let app = AppKind::LogApp {
        prepopulate: PREPOPULATE,
    };
    let service = ServiceSpec {
        matcher: Some(format!("{{ host = \"{HOST}\" }}")),
        // Continues the service's [service.app] table.
        tables: format!("check_divergence = {check}\n"),
        ..ServiceSpec::new("app", app.clone())
    };
    let spec = ClusterSpec {
        site: String::new(),
        nodes: 3,
        exe: exe.to_path_buf(),
        dir: dir.to_path_buf(),
        extra_config: String::new(),
        app,
        managed: true,
        services: vec![service],
    };
    let cluster = LocalCluster::start(spec)?;
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    let leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    let load = LoadSpec {
        targets: vec![Target::parse(&cluster.slots[leader].client_url())?.with_host(HOST)?],
        mode: Mode::Closed,
        connections: CONNECTIONS,
        duration,
        warmup: WARMUP,
        read_ratio: 0.0,
        request_timeout: REQUEST_TIMEOUT,
        seed: 1,
    };
    let report = load::run(&load, super::archive::workload(), &Progress::hidden()).await?;
    // One comparison round after the load, so the figure covers its end.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let compared = cluster
        .metric(leader, "haven_answers_compared_total", &[])
        .await?;
    Ok((report.throughput, compared))
}

pub fn render(r: &DivergenceBenchReport) -> String {
    let list = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "divergence detection, closed-loop writes/s of a fresh 3-node cluster, {} s rounds alternated\n\
         off: {}\n\
         on:  {}\n\
         on / off: {:.3} (target >= 0.97); the leader compared {:.0} entries in the last round\n",
        r.seconds,
        list(&r.off),
        list(&r.on),
        r.ratio,
        r.compared
    )
}
