//! `haven bench site`: what a standby site promises, against a real S3-compatible server
//! (SeaweedFS, started here on loopback), on a 3-node primary.
//!
//! 1. The recovery point under `ack = "quorum"`: open-loop writes at `--rate`; every
//!    100 ms the age of the archive's newest entry (what a site lost at that moment takes
//!    with it): p50, p99, max (target p99 ≤ 1 s at 5,000 writes/s).
//! 2. What `ack = "quorum+archive"` costs: the same open-loop write rate on a fresh
//!    cluster in each mode, latency p50/p99; then a closed loop in each mode, throughput
//!    (the uploads batch, so the cost should be latency, not throughput).
//! 3. The recovery time, over `--trials` promotions: a warm one-node standby follows a
//!    fresh primary under writes; every primary node is killed with SIGKILL; from the
//!    promote call to the first write the standby acknowledges (target median ≤ 10 s).

use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use haven_archive::testing::SeaweedServer;
use haven_bench::cpu;
use haven_bench::load;
use haven_bench::load::LoadReport;
use haven_bench::load::Mode;
use haven_bench::progress::Progress;
use haven_client::admin::AdminClient;
use haven_client::http::Http;
use serde::Serialize;

use super::archive::Rpo;
use super::archive::RpoLoad;
use super::archive::cluster_with;
use super::archive::recovery_point;
use super::archive::spec;
use super::archive::workload;
use crate::cluster::LocalCluster;

#[derive(Debug, Clone, clap::Args)]
pub struct SiteBenchArgs {
    /// Length of each load phase.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Writes per second of the recovery-point phase (open loop).
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Send the recovery-point phase's writes to the leader only, rather than spread over
    /// every node.
    #[arg(long)]
    pub rpo_to_leader: bool,
    /// Writes per second of the latency phases (open loop, below saturation in both modes).
    #[arg(long, default_value_t = 1000.0)]
    pub latency_rate: f64,
    /// Promotions timed.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// 5 s phases, 2 promotions: a smoke run, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const CHECKPOINTS: &str =
    "[checkpoints]\nmode = \"managed\"\nevery_entries = 20000\nevery_seconds = 0\nkeep = 2\n";
/// Writes the primary takes before its site is lost, in each promotion trial.
const WRITES_BEFORE_LOSS: usize = 200;
/// Enough connections that neither loop is bounded by them: under `quorum+archive` each
/// write waits for an upload (tens of ms), so 32 connections would cap an open loop near
/// 1,000 writes/s and a closed one at a write's latency.
const CONNECTIONS: usize = 1024;
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(120);
const CATCH_UP: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
pub struct SiteBenchReport {
    pub seconds: u64,
    pub store: String,
    /// The recovery point under `ack = "quorum"` at `rate`.
    pub rate: f64,
    pub rpo: Rpo,
    pub latency_rate: f64,
    pub quorum: AckCost,
    pub quorum_archive: AckCost,
    pub rto: Rto,
}

/// One acknowledgement mode under the same loads.
#[derive(Debug, Serialize)]
pub struct AckCost {
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Failed writes by kind, both phases.
    pub errors: std::collections::BTreeMap<String, u64>,
    pub closed_loop_throughput: f64,
    /// Log objects the leader uploaded during the closed loop.
    pub closed_loop_objects: u64,
    /// CPU seconds spent during the closed loop by the nodes and their apps, by the
    /// store, and by this process (the load generator).
    pub closed_loop_cpu: CpuSpent,
}

#[derive(Debug, Default, Serialize)]
pub struct CpuSpent {
    pub nodes_s: f64,
    pub store_s: f64,
    pub load_s: f64,
}

impl CpuSpent {
    /// CPU time used so far by `nodes`, `store` and this process.
    fn now(nodes: &[u32], store: u32) -> anyhow::Result<Self> {
        Ok(Self {
            nodes_s: cpu::total_cpu(nodes)?.as_secs_f64(),
            store_s: cpu::process_cpu(store)?.as_secs_f64(),
            load_s: cpu::process_cpu(std::process::id())?.as_secs_f64(),
        })
    }

    fn since(self, before: &Self) -> Self {
        Self {
            nodes_s: self.nodes_s - before.nodes_s,
            store_s: self.store_s - before.store_s,
            load_s: self.load_s - before.load_s,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Rto {
    /// From the promote call to the first acknowledged write, per trial (ms).
    pub trials_ms: Vec<u64>,
    pub median_ms: u64,
    pub max_ms: u64,
}

pub async fn run(args: &SiteBenchArgs, exe: &Path) -> anyhow::Result<SiteBenchReport> {
    let (seconds, trials) = match args.quick {
        true => (5, 2),
        false => (args.seconds, args.trials),
    };
    if seconds == 0 || trials == 0 || args.rate <= 0.0 || args.latency_rate <= 0.0 {
        bail!("--seconds, --trials, --rate and --latency-rate must be positive");
    }
    let server = SeaweedServer::start().await;
    server.set_env();
    let work = tempfile::Builder::new()
        .prefix("haven-bench-site-")
        .tempdir()
        .context("creating a temporary directory")?;
    let sites = Sites::new(&server, work.path())?;
    let duration = Duration::from_secs(seconds);
    let load = RpoLoad {
        rate: args.rate,
        connections: CONNECTIONS,
        all_nodes: !args.rpo_to_leader,
    };
    let (rpo, _) = recovery_point(
        exe,
        &work.path().join("rpo"),
        &sites.primary("rpo", "quorum"),
        &load,
        duration,
    )
    .await?;
    let mut costs = Vec::new();
    for ack in ["quorum", "quorum+archive"] {
        let config = sites.primary(&format!("cost-{}", ack.replace('+', "-")), ack);
        costs.push(
            ack_cost(
                exe,
                &work.path().join(ack),
                &config,
                server.pid(),
                args.latency_rate,
                duration,
            )
            .await?,
        );
    }
    let quorum_archive = costs.pop().context("two modes")?;
    let quorum = costs.pop().context("two modes")?;
    let mut trials_ms = Vec::new();
    for trial in 0..trials {
        trials_ms.push(sites.promotion(exe, trial).await?);
    }
    Ok(SiteBenchReport {
        seconds,
        store: format!("SeaweedFS at {}", server.endpoint),
        rate: args.rate,
        rpo,
        latency_rate: args.latency_rate,
        quorum,
        quorum_archive,
        rto: Rto::of(trials_ms),
    })
}

impl Rto {
    fn of(trials_ms: Vec<u64>) -> Self {
        let mut sorted = trials_ms.clone();
        sorted.sort_unstable();
        let median_ms = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
        let max_ms = sorted.last().copied().unwrap_or(0);
        Self {
            trials_ms,
            median_ms,
            max_ms,
        }
    }
}

/// The latency of `rate` writes/s, then the closed-loop throughput and where the CPU
/// went meanwhile, on one fresh cluster.
async fn ack_cost(
    exe: &Path,
    dir: &Path,
    config: &str,
    store: u32,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<AckCost> {
    let (cluster, leader) = cluster_with(exe, dir, config, 3).await?;
    let mut open = spec(&cluster, leader, Mode::Open { rate }, duration)?;
    open.connections = CONNECTIONS;
    let timed = load::run(&open, workload(), &Progress::hidden()).await?;
    let mut closed = spec(&cluster, leader, Mode::Closed, duration)?;
    closed.connections = CONNECTIONS;
    let objects = async || {
        let name = "haven_archive_uploaded_objects_total";
        cluster.metric(leader, name, &[]).await.unwrap_or(0.0) as u64
    };
    let (objects_before, cpu_before) = (objects().await, CpuSpent::now(&cluster.pids(), store)?);
    let saturated = load::run(&closed, workload(), &Progress::hidden()).await?;
    let cpu = CpuSpent::now(&cluster.pids(), store)?.since(&cpu_before);
    let closed_loop_objects = objects().await.saturating_sub(objects_before);
    let latency = timed
        .latency
        .all
        .as_ref()
        .context("no write succeeded in the latency phase")?;
    Ok(AckCost {
        p50_ms: latency.p50_ms,
        p99_ms: latency.p99_ms,
        errors: errors(&[&timed, &saturated]),
        closed_loop_throughput: saturated.throughput,
        closed_loop_objects,
        closed_loop_cpu: cpu,
    })
}

fn errors(reports: &[&LoadReport]) -> std::collections::BTreeMap<String, u64> {
    let mut errors = std::collections::BTreeMap::new();
    for (kind, n) in reports.iter().flat_map(|r| &r.errors) {
        *errors.entry(kind.clone()).or_default() += n;
    }
    errors
}

/// The store, the key, and the configs of both sites.
struct Sites {
    endpoint: String,
    key: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Sites {
    fn new(server: &SeaweedServer, dir: &Path) -> anyhow::Result<Self> {
        let key = dir.join("archive.key");
        std::fs::write(
            &key,
            haven_archive::key::ArchiveKey::generate().to_file_text(),
        )?;
        Ok(Self {
            endpoint: server.endpoint.clone(),
            key,
            dir: dir.to_path_buf(),
        })
    }

    /// A primary archiving under `s3://haven/<prefix>` (one archive per cluster).
    fn primary(&self, prefix: &str, ack: &str) -> String {
        format!(
            "{CHECKPOINTS}[archive]\nurl = \"s3://haven/{prefix}\"\nendpoint = \"{}\"\nkey_file = \"{}\"\nflush_ms = 100\nack = \"{ack}\"\n",
            self.endpoint,
            self.key.display()
        )
    }

    fn standby(&self, prefix: &str) -> String {
        format!(
            "{CHECKPOINTS}[standby]\nfrom = \"s3://haven/{prefix}\"\nendpoint = \"{}\"\nkey_file = \"{}\"\npoll_ms = 100\n",
            self.endpoint,
            self.key.display()
        )
    }

    /// One promotion trial: a fresh primary and a one-node standby following it; the
    /// primary takes writes, is lost, and the standby is promoted. Milliseconds from the
    /// promote call to its first acknowledged write.
    async fn promotion(&self, exe: &Path, trial: usize) -> anyhow::Result<u64> {
        let prefix = format!("rto-{trial}");
        let dir = self.dir.join(&prefix);
        let (mut primary, leader) =
            cluster_with(exe, &dir.join("a"), &self.primary(&prefix, "quorum"), 3).await?;
        let mut spec = super::systems::log_app_cluster(1, exe, &dir.join("b"), 1_000);
        std::fs::create_dir_all(&spec.dir)?;
        spec.managed = true;
        spec.site = "b".to_string();
        spec.extra_config = self.standby(&prefix);
        let standby = LocalCluster::start(spec)?;
        let http = Http::new(Duration::from_secs(10));
        let url = format!("{}/append", primary.slots[leader].client_url());
        for i in 0..WRITES_BEFORE_LOSS {
            http.post(&url, format!("trial {trial} write {i}")).await?;
        }
        caught_up(&standby).await?;
        for i in 0..primary.slots.len() {
            primary.kill_node(i);
        }
        let started = Instant::now();
        let admin = AdminClient::new(&standby.slots[0].admin_url(), TAKE_OVER_TIMEOUT);
        admin.promote().await.context("promoting the standby")?;
        let url = format!("{}/append", standby.slots[0].client_url());
        loop {
            if http
                .post(&url, "first at site b".to_string())
                .await
                .is_ok_and(|r| r.status == 201)
            {
                return Ok(started.elapsed().as_millis() as u64);
            }
            if started.elapsed() > TAKE_OVER_TIMEOUT {
                bail!("the promoted standby took no write within {TAKE_OVER_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Until the standby has applied what the archive holds, once it holds something.
async fn caught_up(standby: &LocalCluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let site = standby.status(0).await.ok().and_then(|s| s.site);
        if let Some(s) = site
            && s.archive_index.is_some_and(|a| a > 0)
            && s.applied_index >= s.archive_index
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the standby did not catch up within {CATCH_UP:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn render(r: &SiteBenchReport) -> String {
    let cost = |name: &str, c: &AckCost| {
        let cpu = &c.closed_loop_cpu;
        format!(
            "  ack = {name:<16} p50 {:.2} ms, p99 {:.2} ms; closed loop {:.0} writes/s, {} objects, CPU s nodes {:.1} store {:.1} load {:.1}; errors {:?}\n",
            c.p50_ms,
            c.p99_ms,
            c.closed_loop_throughput,
            c.closed_loop_objects,
            cpu.nodes_s,
            cpu.store_s,
            cpu.load_s,
            c.errors
        )
    };
    format!(
        "store: {}; {} s phases; 3-node primary\n\
         recovery point, ack = quorum, {:.0} writes/s asked ({:.0}/s achieved over {} connections to {}; errors {:?}): archive lag p50 {:.3} s, p99 {:.3} s, max {:.3} s over {} samples (target p99 <= 1 s)\n\
         write latency at {:.0} writes/s, and closed-loop throughput, per ack mode ({CONNECTIONS} connections):\n{}{}\
         recovery time, promote to first acknowledged write, {} trials (1-node warm standby): median {} ms, max {} ms (target median <= 10 s); each: {:?}\n",
        r.store,
        r.seconds,
        r.rate,
        r.rpo.achieved_rate,
        r.rpo.connections,
        if r.rpo.all_nodes {
            "every node"
        } else {
            "the leader"
        },
        r.rpo.errors,
        r.rpo.p50_s,
        r.rpo.p99_s,
        r.rpo.max_s,
        r.rpo.samples,
        r.latency_rate,
        cost("\"quorum\"", &r.quorum),
        cost("\"quorum+archive\"", &r.quorum_archive),
        r.rto.trials_ms.len(),
        r.rto.median_ms,
        r.rto.max_ms,
        r.rto.trials_ms
    )
}
