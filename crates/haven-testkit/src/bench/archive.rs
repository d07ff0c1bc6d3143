//! `haven bench archive`: what the off-site archive costs and what it guarantees, against
//! a real S3-compatible server (SeaweedFS, started here on loopback).
//!
//! 1. Write throughput with the archive off, then on: the same closed-loop write load on
//!    a fresh 3-node cluster each time, for the same time (target: on ≥ 0.9 × off).
//! 2. The recovery point: open-loop writes at `--rate` for `--seconds` with the archive
//!    on; every 100 ms, the age of the archive's newest entry (wall clock minus its entry
//!    time, from the leader's status): p50, p99, max (target p99 ≤ 1 s at 5,000 writes/s).
//! 3. Restore speed: `haven archive restore --latest` from the archive alone, entries
//!    per second and MB of state per second (target ≥ 100k entries/s).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use haven_archive::testing::SeaweedServer;
use haven_bench::load;
use haven_bench::load::LoadSpec;
use haven_bench::load::Mode;
use haven_bench::load::Target;
use haven_bench::progress::Progress;
use haven_bench::workload::WorkloadChoice;
use serde::Serialize;

use crate::cluster::LocalCluster;

#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveBenchArgs {
    /// Length of each load phase.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Writes per second of the recovery-point phase (open loop).
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// 8 s phases at 1,000 writes/s: a smoke run, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const CONNECTIONS: usize = 32;
const BODY_BYTES: usize = 128;
/// Small, so the restore phase measures replay rather than the prepopulated state.
const PREPOPULATE: u64 = 1_000;
const WARMUP: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Samples dropped at the start (the warmup second).
const WARMUP_SAMPLES: usize = 10;
/// Checkpoints rare enough that the restore replays a long stretch of log.
const CHECKPOINTS: &str =
    "[checkpoints]\nmode = \"managed\"\nevery_entries = 200000\nevery_seconds = 0\nkeep = 2\n";

#[derive(Debug, Serialize)]
pub struct ArchiveBenchReport {
    pub seconds: u64,
    pub rate: f64,
    pub store: String,
    pub throughput_off: f64,
    pub throughput_on: f64,
    /// `throughput_on / throughput_off` (target ≥ 0.9).
    pub throughput_ratio: f64,
    pub rpo: Rpo,
    pub restore: RestoreSpeed,
}

#[derive(Debug, Serialize)]
pub struct Rpo {
    pub connections: usize,
    /// Whether the writes went to every node (followers forward them) or to the leader.
    pub all_nodes: bool,
    pub writes_ok: u64,
    pub achieved_rate: f64,
    /// Failed or unsent writes by kind: an open loop that could not keep its rate says so.
    pub errors: std::collections::BTreeMap<String, u64>,
    pub samples: usize,
    pub p50_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
    pub upload_errors: u64,
    pub objects: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct RestoreSpeed {
    pub entries: u64,
    pub seconds: f64,
    pub entries_per_s: f64,
    pub state_mb_per_s: f64,
}

pub async fn run(args: &ArchiveBenchArgs, exe: &Path) -> anyhow::Result<ArchiveBenchReport> {
    let (seconds, rate) = match args.quick {
        true => (8, 1000.0),
        false => (args.seconds, args.rate),
    };
    if seconds == 0 || rate <= 0.0 {
        bail!("--seconds and --rate must be positive");
    }
    let (server, work, key) = store_and_key("haven-bench-archive-").await?;
    // One prefix per cluster: both are named alike, and an archive has one writer.
    let archive = |url: &str| {
        format!(
            "{CHECKPOINTS}[archive]\nurl = \"{url}\"\nendpoint = \"{}\"\nkey_file = \"{}\"\n",
            server.endpoint,
            key.display()
        )
    };
    let duration = Duration::from_secs(seconds);
    let throughput_off = closed_loop(exe, &work.path().join("off"), CHECKPOINTS, duration).await?;
    let on = archive("s3://haven/bench-throughput");
    let throughput_on = closed_loop(exe, &work.path().join("on"), &on, duration).await?;
    let url = "s3://haven/bench-rpo";
    let rpo_dir = work.path().join("rpo");
    let load = RpoLoad {
        rate,
        connections: CONNECTIONS,
        all_nodes: false,
    };
    let (rpo, config) = recovery_point(exe, &rpo_dir, &archive(url), &load, duration).await?;
    let restore = restore_speed(exe, url, &server.endpoint, &key, &config, work.path()).await?;
    Ok(ArchiveBenchReport {
        seconds,
        rate,
        store: format!("SeaweedFS at {}", server.endpoint),
        throughput_off,
        throughput_on,
        throughput_ratio: throughput_on / throughput_off.max(1e-9),
        rpo,
        restore,
    })
}

/// A SeaweedFS server on loopback (its credentials in this process's environment), a
/// work directory named `prefix…`, and an archive key in it.
pub(super) async fn store_and_key(
    prefix: &str,
) -> anyhow::Result<(SeaweedServer, tempfile::TempDir, std::path::PathBuf)> {
    let server = SeaweedServer::start().await;
    server.set_env();
    let work = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temporary directory")?;
    let key = work.path().join("archive.key");
    std::fs::write(
        &key,
        haven_archive::key::ArchiveKey::generate().to_file_text(),
    )?;
    Ok((server, work, key))
}

pub(super) async fn cluster_with(
    exe: &Path,
    dir: &Path,
    config: &str,
    nodes: usize,
) -> anyhow::Result<(LocalCluster, usize)> {
    std::fs::create_dir_all(dir)?;
    let mut spec = super::systems::log_app_cluster(nodes, exe, dir, PREPOPULATE);
    spec.managed = true;
    spec.extra_config = config.to_string();
    let cluster = LocalCluster::start(spec)?;
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    let leader = cluster.wait_for_leader(READY_TIMEOUT).await?;
    Ok((cluster, leader))
}

pub(super) fn spec(
    cluster: &LocalCluster,
    leader: usize,
    mode: Mode,
    duration: Duration,
) -> anyhow::Result<LoadSpec> {
    Ok(LoadSpec {
        targets: vec![Target::parse(&cluster.slots[leader].client_url())?],
        mode,
        connections: CONNECTIONS,
        duration,
        warmup: WARMUP,
        read_ratio: 0.0,
        request_timeout: REQUEST_TIMEOUT,
        seed: 1,
    })
}

pub(super) fn workload() -> Arc<dyn haven_bench::workload::Workload> {
    WorkloadChoice::LogApp {
        body_size: BODY_BYTES,
        prepopulated_lines: PREPOPULATE,
    }
    .build()
}

/// Closed-loop write throughput of a fresh cluster with `config`.
async fn closed_loop(
    exe: &Path,
    dir: &Path,
    config: &str,
    duration: Duration,
) -> anyhow::Result<f64> {
    let (cluster, leader) = cluster_with(exe, dir, config, 3).await?;
    let load = spec(&cluster, leader, Mode::Closed, duration)?;
    let report = load::run(&load, workload(), &Progress::hidden()).await?;
    drop(cluster);
    Ok(report.throughput)
}

/// The open-loop writes of a recovery-point phase.
pub(super) struct RpoLoad {
    pub rate: f64,
    pub connections: usize,
    /// Spread over every node rather than sent to the leader alone: the leader then
    /// parses a third of the requests, and a host the leader alone cannot keep up with
    /// at `rate` still reaches it.
    pub all_nodes: bool,
}

/// Open-loop writes with the leader's archive lag sampled throughout; returns the node
/// config a restore can run the app from.
pub(super) async fn recovery_point(
    exe: &Path,
    dir: &Path,
    config: &str,
    shape: &RpoLoad,
    duration: Duration,
) -> anyhow::Result<(Rpo, std::path::PathBuf)> {
    let (cluster, leader) = cluster_with(exe, dir, config, 3).await?;
    let rate = shape.rate;
    let mut load = spec(&cluster, leader, Mode::Open { rate }, duration)?;
    load.connections = shape.connections;
    if shape.all_nodes {
        load.targets = cluster
            .slots
            .iter()
            .map(|s| Target::parse(&s.client_url()))
            .collect::<Result<_, _>>()?;
    }
    let running =
        tokio::spawn(async move { load::run(&load, workload(), &Progress::hidden()).await });
    // The recovery point at each moment: how old the archive's newest entry is. Under a
    // steady load the newest acknowledged write is about now, so this is the window of
    // acknowledged writes a site lost at that moment would take with it.
    let mut lags = Vec::new();
    while !running.is_finished() {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let status = cluster.status(leader).await;
        let archived = status.ok().and_then(|s| s.archive?.archived_entry_time_us);
        if let Some(archived_us) = archived {
            let now_us = chrono::Utc::now().timestamp_micros();
            lags.push((now_us - archived_us).max(0) as f64 / 1e6);
        }
    }
    // The first samples precede the first shipment of this load.
    lags.drain(..lags.len().min(WARMUP_SAMPLES));
    let report = running.await??;
    wait_caught_up(&cluster, leader).await?;
    lags.sort_by(f64::total_cmp);
    let at = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let metric = async |name: &str| cluster.metric(leader, name, &[]).await.unwrap_or(0.0) as u64;
    let rpo = Rpo {
        connections: shape.connections,
        all_nodes: shape.all_nodes,
        writes_ok: report.requests_ok,
        achieved_rate: report.throughput,
        errors: report.errors.clone(),
        samples: lags.len(),
        p50_s: at(0.5),
        p99_s: at(0.99),
        max_s: lags.last().copied().unwrap_or(0.0),
        upload_errors: metric("haven_archive_upload_errors_total").await,
        objects: metric("haven_archive_uploaded_objects_total").await,
        bytes: metric("haven_archive_uploaded_bytes_total").await,
    };
    let node_config = dir.join("node1.toml");
    std::fs::copy(cluster.dir().join("node1").join("haven.toml"), &node_config)?;
    Ok((rpo, node_config))
}

pub(super) async fn wait_caught_up(cluster: &LocalCluster, leader: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let status = cluster.status(leader).await?;
        let archived = status.archive.as_ref().and_then(|a| a.archived_index);
        if archived.is_some() && archived == status.applied_index {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the archive did not catch up within {READY_TIMEOUT:?}: applied {:?}, archive {:?}",
                status.applied_index,
                status.archive
            );
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

async fn restore_speed(
    exe: &Path,
    url: &str,
    endpoint: &str,
    key: &Path,
    config: &Path,
    work: &Path,
) -> anyhow::Result<RestoreSpeed> {
    let out = work.join("restored");
    let output = tokio::process::Command::new(exe)
        .args([
            "archive",
            "restore",
            "--from",
            url,
            "--endpoint",
            endpoint,
            "--latest",
            "--json",
        ])
        .arg("--key-file")
        .arg(key)
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(&out)
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "restore failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let entries = report["entries_replayed"].as_u64().unwrap_or(0);
    let seconds = report["replay_seconds"].as_f64().unwrap_or(0.0).max(1e-9);
    let state_bytes = dir_bytes(&out);
    Ok(RestoreSpeed {
        entries,
        seconds,
        entries_per_s: entries as f64 / seconds,
        state_mb_per_s: state_bytes as f64 / 1e6 / seconds,
    })
}

pub(super) fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

pub fn render(r: &ArchiveBenchReport) -> String {
    format!(
        "store: {}; {} s phases\n\
         write throughput, closed loop: archive off {:.0}/s, on {:.0}/s: on/off {:.3} (target >= 0.9)\n\
         recovery point at {:.0} writes/s asked ({:.0}/s achieved, {} ok): archive lag p50 {:.3} s, p99 {:.3} s, max {:.3} s over {} samples (target p99 <= 1 s)\n\
         uploaded {} objects, {} bytes, {} upload errors\n\
         restore from the archive: {} entries in {:.2} s = {:.0} entries/s, {:.1} MB of state/s (target >= 100k entries/s)\n",
        r.store,
        r.seconds,
        r.throughput_off,
        r.throughput_on,
        r.throughput_ratio,
        r.rate,
        r.rpo.achieved_rate,
        r.rpo.writes_ok,
        r.rpo.p50_s,
        r.rpo.p99_s,
        r.rpo.max_s,
        r.rpo.samples,
        r.rpo.objects,
        r.rpo.bytes,
        r.rpo.upload_errors,
        r.restore.entries,
        r.restore.seconds,
        r.restore.entries_per_s,
        r.restore.state_mb_per_s
    )
}
