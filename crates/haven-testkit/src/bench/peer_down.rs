//! `haven bench peer-down`: what a dead peer costs the nodes that are still up.
//!
//! The same open-loop write load goes to the leader twice, for the same time: first with
//! every peer up, then with one follower SIGKILLed for the whole phase. The two surviving
//! nodes' CPU is compared between the phases (target: within 10%), and the lines they
//! logged about the dead peer are counted (target: under 100 in 60 s). Before the
//! transport backed off, a leader redialed a dead follower 30,000 times a second and
//! logged each failure.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use haven_bench::cpu::total_cpu;
use haven_bench::load;
use haven_bench::load::LoadSpec;
use haven_bench::load::Mode;
use haven_bench::load::Target;
use haven_bench::progress::Progress;
use haven_bench::workload::WorkloadChoice;
use serde::Serialize;

use crate::cluster::LocalCluster;
use crate::cluster::PREPOPULATED_LINES;
use crate::cluster::Process;

#[derive(Debug, Clone, clap::Args)]
pub struct PeerDownArgs {
    /// Length of each phase (all up, one peer down).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Writes per second sent to the leader in both phases (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const CONNECTIONS: usize = 16;
const BODY_BYTES: usize = 128;
const WARMUP: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize)]
pub struct PeerDownReport {
    pub seconds: u64,
    pub rate: f64,
    pub all_up: Phase,
    pub peer_down: Phase,
    /// Surviving nodes' CPU with the peer down over their CPU with it up.
    pub cpu_ratio: f64,
    /// Lines the surviving nodes logged that name the dead peer's raft address.
    pub log_lines_about_peer: usize,
    /// The leader's dials of the dead peer (`haven_peer_connect_attempts_total`).
    pub dials_of_peer: u64,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    /// CPU seconds of the two nodes that stay up, over the phase.
    pub survivors_cpu_s: f64,
    pub writes_ok: u64,
    pub errors: u64,
    pub p99_ms: Option<f64>,
}

pub async fn run(args: &PeerDownArgs, exe: &std::path::Path) -> anyhow::Result<PeerDownReport> {
    if args.seconds == 0 || args.rate <= 0.0 {
        bail!("--seconds and --rate must be positive");
    }
    let work = tempfile::Builder::new()
        .prefix("haven-peer-down-")
        .tempdir()
        .context("creating a temporary directory")?;
    let spec = super::systems::log_app_cluster(3, exe, work.path(), PREPOPULATED_LINES);
    let mut cluster = LocalCluster::start(spec)?;
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    let leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    let victim = (leader + 1) % cluster.slots.len();
    let survivors: Vec<usize> = (0..cluster.slots.len()).filter(|i| *i != victim).collect();
    let pids: Vec<u32> = survivors
        .iter()
        .filter_map(|i| cluster.slots[*i].node_pid())
        .collect();
    let load = load_spec(&cluster, leader, args)?;
    let progress = Progress::hidden();

    let all_up = phase(&load, &pids, &progress).await?;
    let lines_before: Vec<usize> = survivors
        .iter()
        .map(|i| log_lines(&cluster, *i).len())
        .collect();
    cluster.kill_node(victim);
    let peer_down = phase(&load, &pids, &progress).await?;
    let peer = cluster.slots[victim].raft_addr.to_string();
    let log_lines_about_peer = survivors
        .iter()
        .zip(lines_before)
        .map(|(i, before)| {
            let lines = log_lines(&cluster, *i);
            lines[before.min(lines.len())..]
                .iter()
                .filter(|l| l.contains(&peer))
                .count()
        })
        .sum();
    let dials_of_peer = dials(&cluster, leader, &peer).await?;
    Ok(PeerDownReport {
        seconds: args.seconds,
        rate: args.rate,
        cpu_ratio: peer_down.survivors_cpu_s / all_up.survivors_cpu_s.max(1e-9),
        all_up,
        peer_down,
        log_lines_about_peer,
        dials_of_peer,
    })
}

fn load_spec(
    cluster: &LocalCluster,
    leader: usize,
    args: &PeerDownArgs,
) -> anyhow::Result<LoadSpec> {
    Ok(LoadSpec {
        targets: vec![Target::parse(&cluster.slots[leader].client_url())?],
        mode: Mode::Open { rate: args.rate },
        connections: CONNECTIONS,
        duration: Duration::from_secs(args.seconds),
        warmup: WARMUP,
        read_ratio: 0.0,
        request_timeout: REQUEST_TIMEOUT,
        seed: 1,
    })
}

/// One load run, with the survivors' CPU over it.
async fn phase(spec: &LoadSpec, pids: &[u32], progress: &Progress) -> anyhow::Result<Phase> {
    let workload = WorkloadChoice::LogApp {
        body_size: BODY_BYTES,
        prepopulated_lines: PREPOPULATED_LINES,
    }
    .build();
    let before = total_cpu(pids)?;
    let report = load::run(spec, Arc::clone(&workload), progress).await?;
    let cpu = total_cpu(pids)? - before;
    Ok(Phase {
        survivors_cpu_s: cpu.as_secs_f64(),
        writes_ok: report.requests_ok,
        errors: report.errors_total(),
        p99_ms: report.latency.all.map(|l| l.p99_ms),
    })
}

fn log_lines(cluster: &LocalCluster, i: usize) -> Vec<String> {
    std::fs::read_to_string(cluster.log_path(i, Process::Node))
        .map(|text| text.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The leader's count of dials to `peer`, from its metrics.
async fn dials(cluster: &LocalCluster, leader: usize, peer: &str) -> anyhow::Result<u64> {
    let attempts = "haven_peer_connect_attempts_total";
    Ok(cluster.metric(leader, attempts, &[("peer", peer)]).await? as u64)
}

pub fn render(r: &PeerDownReport) -> String {
    let row = |name: &str, p: &Phase| {
        let p99 = p.p99_ms.map_or("-".to_string(), |v| format!("{v:.1}"));
        format!(
            "{name:<14} {:>10.2} {:>10} {:>7} {:>8}\n",
            p.survivors_cpu_s, p.writes_ok, p.errors, p99
        )
    };
    format!(
        "{} s per phase, {:.0} writes/s to the leader\n\
         phase          survivors CPU s  writes ok  errors  p99 ms\n{}{}\
         CPU with the peer down / all up: {:.3}\n\
         log lines about the dead peer: {}; the leader dialed it {} times\n",
        r.seconds,
        r.rate,
        row("all up", &r.all_up),
        row("one peer down", &r.peer_down),
        r.cpu_ratio,
        r.log_lines_about_peer,
        r.dials_of_peer
    )
}
