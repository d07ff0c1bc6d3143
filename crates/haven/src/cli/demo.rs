//! `haven demo`: three nodes and three log-app replicas on loopback, a mixed workload
//! through all three nodes, SIGKILL of the leader mid-load, restart, catch-up, and a
//! verdict: replicas byte-identical and every acknowledged append present exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::cluster::AppKind;
use crate::cluster::ClusterSpec;
use crate::cluster::LocalCluster;
use crate::cluster::PREPOPULATED_LINES;
use crate::http_client::Http;

/// Bytes per appended line, as in the reference workload.
const LINE_BYTES: usize = 128;
const CLIENTS: usize = 8;
/// Attempts per append (each on the next node, same Idempotency-Key) before giving up.
const APPEND_ATTEMPTS: usize = 40;
const PHASE: Duration = Duration::from_millis(2500);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub json: bool,
    /// Keep the temporary directory (configs, data, logs) for inspection.
    pub keep: bool,
}

/// Everything the demo measured and checked.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// The cluster directory, when kept (`--keep`, or a failed run).
    pub dir: Option<String>,
    pub appends_acknowledged: u64,
    pub appends_abandoned: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub killed_node: u64,
    /// Longest gap between two consecutive acknowledged appends after the SIGKILL: how
    /// long writes were unavailable.
    pub failover_ms: u64,
    pub final_commit_index: u64,
    pub replica_lines: usize,
    pub replicas_identical: bool,
    pub acknowledged_present_once: bool,
    pub acknowledged_line_numbers_match: bool,
    pub passed: bool,
}

#[derive(Default)]
struct Tally {
    acked: Mutex<HashMap<String, u64>>,
    abandoned: AtomicU64,
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
    ack_times: Mutex<Vec<Instant>>,
}

pub async fn run(exe: std::path::PathBuf, options: DemoOptions) -> anyhow::Result<DemoReport> {
    let tmp = tempfile::Builder::new()
        .prefix("haven-demo-")
        .tempdir()
        .context("creating temp dir")?;
    let spec = ClusterSpec {
        nodes: 3,
        exe,
        dir: tmp.path().to_path_buf(),
        extra_config: String::new(),
        app: AppKind::LogApp {
            prepopulate: PREPOPULATED_LINES,
        },
        managed: false,
        services: Vec::new(),
    };
    let mut cluster = LocalCluster::start(spec)?;
    let mut report = drive(&mut cluster).await;
    drop(cluster);
    if options.keep || report.as_ref().map_or(true, |r| !r.passed) {
        let kept = tmp.keep();
        if let Ok(report) = report.as_mut() {
            report.dir = Some(kept.display().to_string());
        }
        tracing::info!(dir = %kept.display(), "demo directory kept");
    }
    report
}

async fn drive(cluster: &mut LocalCluster) -> anyhow::Result<DemoReport> {
    cluster.wait_all_ready(Duration::from_secs(20)).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await?;
    tracing::info!(leader = cluster.slots[leader].id, "cluster up");
    let urls: Vec<String> = cluster.slots.iter().map(|s| s.client_url()).collect();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client_loop(c, urls.clone(), tally.clone(), stop.clone())))
        .collect();

    tokio::time::sleep(PHASE).await;
    let victim = cluster.wait_for_leader(Duration::from_secs(10)).await?;
    let killed_at = Instant::now();
    cluster.kill_node(victim);
    tracing::info!(
        node = cluster.slots[victim].id,
        "leader killed with SIGKILL"
    );
    tokio::time::sleep(PHASE).await;
    cluster.start_node(victim)?;
    tracing::info!(node = cluster.slots[victim].id, "restarted");
    tokio::time::sleep(PHASE).await;
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await.context("workload task")?;
    }
    let final_commit_index = cluster.wait_converged(Duration::from_secs(30)).await?;
    let failover_ms = longest_gap_after(&tally, killed_at);
    verify(
        cluster,
        &tally,
        cluster.slots[victim].id,
        failover_ms,
        final_commit_index,
    )
}

fn longest_gap_after(tally: &Tally, killed_at: Instant) -> u64 {
    let mut times = tally
        .ack_times
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    times.sort();
    let start = times
        .iter()
        .rposition(|t| *t <= killed_at)
        .map_or(killed_at, |i| times[i]);
    let after: Vec<Instant> = std::iter::once(start)
        .chain(times.into_iter().filter(|t| *t > killed_at))
        .collect();
    let gap = after
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    gap.as_millis() as u64
}

fn line_for(client: usize, seq: u64) -> String {
    let mut line = format!("demo c{client:02} s{seq:08} ");
    while line.len() < LINE_BYTES {
        line.push('x');
    }
    line
}

async fn client_loop(client: usize, urls: Vec<String>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let http = Http::new(Duration::from_secs(5));
    let mut seq = 0u64;
    let mut turn = client;
    while !stop.load(Ordering::Acquire) {
        seq += 1;
        turn += 1;
        if seq.is_multiple_of(2) {
            let url = format!(
                "{}/line/{}",
                urls[turn % urls.len()],
                seq % PREPOPULATED_LINES
            );
            let ok = http.get(&url).await.is_ok_and(|r| r.status == 200);
            let counter = if ok {
                &tally.reads_ok
            } else {
                &tally.reads_failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        append_with_retries(&http, &urls, &mut turn, client, seq, &tally).await;
    }
}

/// One append, retried on the next node with the same Idempotency-Key until acknowledged.
async fn append_with_retries(
    http: &Http,
    urls: &[String],
    turn: &mut usize,
    client: usize,
    seq: u64,
    tally: &Tally,
) {
    let line = line_for(client, seq);
    let key = format!("demo-c{client}-s{seq}");
    for _ in 0..APPEND_ATTEMPTS {
        let url = format!("{}/append", urls[*turn % urls.len()]);
        let headers = [(haven_contract::headers::IDEMPOTENCY_KEY, key.as_str())];
        match http.send("POST", &url, &headers, line.clone().into()).await {
            Ok(reply) if reply.status == 201 => {
                let line_no = reply.text().trim().parse().unwrap_or(u64::MAX);
                tally
                    .acked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(line.clone(), line_no);
                tally
                    .ack_times
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Instant::now());
                return;
            }
            _ => {
                *turn += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tally.abandoned.fetch_add(1, Ordering::Relaxed);
}

fn verify(
    cluster: &LocalCluster,
    tally: &Tally,
    killed_node: u64,
    failover_ms: u64,
    final_commit_index: u64,
) -> anyhow::Result<DemoReport> {
    let replicas: Vec<Vec<u8>> = (0..cluster.slots.len())
        .map(|i| cluster.replica_bytes(i))
        .collect::<Result<_, _>>()?;
    let replicas_identical = replicas.windows(2).all(|w| w[0] == w[1]);
    let text = String::from_utf8_lossy(&replicas[0]);
    let lines: Vec<&str> = text.lines().collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in &lines {
        *counts.entry(line).or_default() += 1;
    }
    let acked = tally.acked.lock().unwrap_or_else(|p| p.into_inner());
    let acknowledged_present_once = acked.keys().all(|l| counts.get(l.as_str()) == Some(&1))
        && counts
            .iter()
            .filter(|(l, _)| l.starts_with("demo "))
            .all(|(_, n)| *n == 1);
    let acknowledged_line_numbers_match = acked
        .iter()
        .all(|(line, n)| lines.get(*n as usize).is_some_and(|l| l == line));
    let passed = replicas_identical
        && acknowledged_present_once
        && acknowledged_line_numbers_match
        && !acked.is_empty();
    Ok(DemoReport {
        dir: None,
        appends_acknowledged: acked.len() as u64,
        appends_abandoned: tally.abandoned.load(Ordering::Relaxed),
        reads_ok: tally.reads_ok.load(Ordering::Relaxed),
        reads_failed: tally.reads_failed.load(Ordering::Relaxed),
        killed_node,
        failover_ms,
        final_commit_index,
        replica_lines: lines.len(),
        replicas_identical,
        acknowledged_present_once,
        acknowledged_line_numbers_match,
        passed,
    })
}

/// The human-readable summary.
pub fn render(report: &DemoReport) -> String {
    let check = |ok: bool| if ok { "ok" } else { "FAILED" };
    format!(
        "Haven demo: 3 nodes, 3 log-app replicas, leader killed with SIGKILL mid-load\n\
         \n  appends acknowledged     {}\n  appends abandoned        {}\n  reads ok / failed        {} / {}\n  \
         killed node              {}\n  write gap after kill     {} ms\n  final commit index       {}\n  \
         lines per replica        {}\n\n  replicas byte-identical              {}\n  \
         every acknowledged append once       {}\n  acknowledged line numbers match     {}\n\n  \
         verdict: {}\n{}",
        report.appends_acknowledged,
        report.appends_abandoned,
        report.reads_ok,
        report.reads_failed,
        report.killed_node,
        report.failover_ms,
        report.final_commit_index,
        report.replica_lines,
        check(report.replicas_identical),
        check(report.acknowledged_present_once),
        check(report.acknowledged_line_numbers_match),
        if report.passed { "PASS" } else { "FAIL" },
        report
            .dir
            .as_ref()
            .map_or(String::new(), |d| format!("  files kept in {d}\n")),
    )
}
