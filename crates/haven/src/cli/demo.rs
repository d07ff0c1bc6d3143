//! `haven demo`: three nodes on loopback protecting two services, the log app (`/log`)
//! and the tree app (`/coord`, a small coordination service), each node running a
//! replica of both. A mixed workload goes through all three nodes to both services; the
//! log service's leader is killed with SIGKILL mid-load, restarted and caught up. The
//! verdict: each service's replicas byte-identical, every acknowledged append present
//! exactly once, every acknowledged tree node present. Then the whole site is lost and
//! the log service is rebuilt from its off-site archive alone ([`super::demo_site`]).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use haven_client::http::Http;
use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::ClusterSpec;
use haven_testkit::cluster::LocalCluster;
use haven_testkit::cluster::PREPOPULATED_LINES;
use haven_testkit::cluster::ServiceSpec;

use super::demo_load::Tally;
use super::demo_load::Write;
use super::demo_load::client_loop;
use super::demo_load::lock;
use super::demo_site::DemoArchive;
use super::demo_site::Site;
use super::demo_site::SiteLoss;
use super::demo_site::lose_the_site;

/// The log app's service, reached under `/log`.
const LOG: &str = "log";
/// The tree app's service, reached under `/coord`.
const COORD: &str = "coord";
/// Clients creating tree nodes, beside the log app's.
const TREE_CLIENTS: usize = 2;

const CLIENTS: usize = 8;
const PHASE: Duration = Duration::from_millis(2500);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub json: bool,
    /// Keep the temporary directory (configs, data, logs) for inspection.
    pub keep: bool,
    /// Both sites' nodes speak mutual TLS to each other, with a CA made for the run.
    pub tls: bool,
}

/// Everything the demo measured and checked.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    /// The cluster directory, when kept (`--keep`, or a failed run).
    pub dir: Option<String>,
    /// Which node leads each service at the end (leaders spread over the nodes).
    pub leaders: BTreeMap<String, u64>,
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
    pub tree_creates_acknowledged: u64,
    pub tree_creates_abandoned: u64,
    pub tree_replicas_identical: bool,
    pub tree_acknowledged_present: bool,
    /// The site lost, the log service rebuilt from the archive alone.
    pub site_loss: Option<SiteLoss>,
    /// Whether the nodes spoke mutual TLS to each other.
    pub tls: bool,
    pub passed: bool,
}

pub async fn run(exe: std::path::PathBuf, options: DemoOptions) -> anyhow::Result<DemoReport> {
    let tmp = tempfile::Builder::new()
        .prefix("haven-demo-")
        .tempdir()
        .context("creating temp dir")?;
    let archive = DemoArchive::create(tmp.path())?;
    let tls_table = match options.tls {
        // Site B's node 1 uses the same certificate as A's: both are on 127.0.0.1.
        true => haven_testkit::cluster::loopback_tls(&tmp.path().join("certs"), 3)?,
        false => String::new(),
    };
    let mut log_service = ServiceSpec::new(
        LOG,
        AppKind::LogApp {
            prepopulate: PREPOPULATED_LINES,
        },
    );
    log_service.tables = archive.tables();
    let spec = ClusterSpec {
        site: "a".to_string(),
        nodes: 3,
        exe: exe.clone(),
        dir: tmp.path().to_path_buf(),
        extra_config: tls_table.clone(),
        app: AppKind::LogApp {
            prepopulate: PREPOPULATED_LINES,
        },
        managed: true,
        services: vec![log_service, ServiceSpec::new(COORD, AppKind::TreeApp)],
    };
    let mut cluster = LocalCluster::start(spec)?;
    let site_b = tmp.path().join("site-b");
    let mut report = match archive.start_standby(exe, &site_b, LOG, &tls_table) {
        Ok(site_b) => drive(&mut cluster, &site_b).await,
        Err(e) => Err(e),
    };
    if let Ok(report) = report.as_mut() {
        report.tls = options.tls;
    }
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

async fn drive(cluster: &mut LocalCluster, site_b: &Site) -> anyhow::Result<DemoReport> {
    for service in [LOG, COORD] {
        let leader = (cluster.wait_for_leader_of(Some(service), Duration::from_secs(30))).await?;
        tracing::info!(service, leader = cluster.slots[leader].id, "service up");
    }
    let urls = |service: &str| -> Vec<String> {
        let slots = cluster.slots.iter();
        slots
            .map(|s| format!("{}/{service}", s.client_url()))
            .collect()
    };
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client_loop(c, urls(LOG), tally.clone(), stop.clone())))
        .collect();
    workers.extend(
        (0..TREE_CLIENTS)
            .map(|c| tokio::spawn(tree_loop(c, urls(COORD), tally.clone(), stop.clone()))),
    );

    tokio::time::sleep(PHASE).await;
    let victim = (cluster.wait_for_leader_of(Some(LOG), Duration::from_secs(10))).await?;
    let killed_at = Instant::now();
    cluster.kill_node(victim);
    tracing::info!(
        node = cluster.slots[victim].id,
        "leader of the log service killed with SIGKILL"
    );
    tokio::time::sleep(PHASE).await;
    cluster.start_node(victim)?;
    tracing::info!(node = cluster.slots[victim].id, "restarted");
    tokio::time::sleep(PHASE).await;
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await.context("workload task")?;
    }
    let final_commit_index =
        (cluster.wait_converged_of(Some(LOG), Duration::from_secs(30))).await?;
    (cluster.wait_converged_of(Some(COORD), Duration::from_secs(30))).await?;
    let failover_ms = longest_gap_after(&tally, killed_at);
    let mut report = verify(
        cluster,
        &tally,
        cluster.slots[victim].id,
        failover_ms,
        final_commit_index,
    )?;
    verify_tree(cluster, &tally, &mut report).await?;
    for service in [LOG, COORD] {
        let leader = (cluster.wait_for_leader_of(Some(service), Duration::from_secs(10))).await?;
        report
            .leaders
            .insert(service.to_string(), cluster.slots[leader].id);
    }
    let site_loss = lose_the_site(cluster, site_b, LOG).await?;
    report.passed &= site_loss.passed();
    report.site_loss = Some(site_loss);
    Ok(report)
}

fn longest_gap_after(tally: &Tally, killed_at: Instant) -> u64 {
    let mut times: Vec<Instant> = lock(&tally.acked).values().map(|(_, at)| *at).collect();
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

/// Creates tree nodes `/demo-c{client}-s{seq}` through every node until `stop`.
async fn tree_loop(client: usize, urls: Vec<String>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let http = Http::new(Duration::from_secs(5));
    let mut turn = client;
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        seq += 1;
        turn += 1;
        let name = format!("demo-c{client}-s{seq:06}");
        let write = Write {
            method: "PUT",
            path: format!("/tree/{name}"),
            body: format!("created by client {client}"),
            key: format!("tree-{name}"),
        };
        match write.send_with_retries(&http, &urls, &mut turn).await {
            Some(_) => lock(&tally.tree_acked).push(name),
            None => {
                tally.tree_abandoned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Every node's tree replica dumps the same bytes, and holds every acknowledged node.
async fn verify_tree(
    cluster: &LocalCluster,
    tally: &Tally,
    report: &mut DemoReport,
) -> anyhow::Result<()> {
    let http = Http::new(Duration::from_secs(10));
    let mut dumps = Vec::new();
    for slot in &cluster.slots {
        let app = slot
            .service_app_addrs
            .get(COORD)
            .context("no tree replica")?;
        dumps.push(http.get(&format!("http://{app}/dump")).await?.body);
    }
    let app = cluster.slots[0]
        .service_app_addrs
        .get(COORD)
        .context("no tree replica")?;
    let children = http.get(&format!("http://{app}/children/")).await?;
    let children: Vec<String> = serde_json::from_slice(&children.body).context("tree children")?;
    let acked = lock(&tally.tree_acked);
    report.tree_creates_acknowledged = acked.len() as u64;
    report.tree_creates_abandoned = tally.tree_abandoned.load(Ordering::Relaxed);
    report.tree_replicas_identical = dumps.windows(2).all(|w| w[0] == w[1]);
    report.tree_acknowledged_present = acked.iter().all(|name| children.contains(name));
    report.passed &=
        report.tree_replicas_identical && report.tree_acknowledged_present && !acked.is_empty();
    Ok(())
}

fn verify(
    cluster: &LocalCluster,
    tally: &Tally,
    killed_node: u64,
    failover_ms: u64,
    final_commit_index: u64,
) -> anyhow::Result<DemoReport> {
    let replicas: Vec<Vec<u8>> = (0..cluster.slots.len())
        .map(|i| cluster.service_replica_bytes(i, LOG))
        .collect::<Result<_, _>>()?;
    let replicas_identical = replicas.windows(2).all(|w| w[0] == w[1]);
    let text = String::from_utf8_lossy(&replicas[0]);
    let lines: Vec<&str> = text.lines().collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in &lines {
        *counts.entry(line).or_default() += 1;
    }
    let acked = lock(&tally.acked);
    let acknowledged_present_once = acked.keys().all(|l| counts.get(l.as_str()) == Some(&1))
        && counts
            .iter()
            .filter(|(l, _)| l.starts_with("demo "))
            .all(|(_, n)| *n == 1);
    let acknowledged_line_numbers_match = acked
        .iter()
        .all(|(line, (n, _))| lines.get(*n as usize).is_some_and(|l| l == line));
    let passed = replicas_identical
        && acknowledged_present_once
        && acknowledged_line_numbers_match
        && !acked.is_empty();
    Ok(DemoReport {
        dir: None,
        leaders: BTreeMap::new(),
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
        tree_creates_acknowledged: 0,
        tree_creates_abandoned: 0,
        tree_replicas_identical: false,
        tree_acknowledged_present: false,
        site_loss: None,
        tls: false,
        passed,
    })
}

fn site_lines(site: Option<&SiteLoss>) -> [(&'static str, String); 5] {
    let Some(s) = site else {
        return std::array::from_fn(|_| ("", String::new()));
    };
    [
        (
            "standby lag before fire",
            format!("{} entries, {} ms", s.standby_lag_entries, s.standby_lag_ms),
        ),
        (
            "appends during the fire",
            format!(
                "{} acknowledged at A, {} of them lost (acknowledged {} ms before the fire at most)",
                s.appends_acknowledged, s.appends_lost, s.lost_window_ms
            ),
        ),
        (
            "recovery point reported",
            format!(
                "{} ms (epoch {} fenced the old primary)",
                s.reported_rpo_ms, s.epoch
            ),
        ),
        ("B writable after", format!("{} ms", s.writable_after_ms)),
        ("B first append after", format!("{} ms (RTO)", s.rto_ms)),
    ]
}

/// The human-readable summary.
pub fn render(report: &DemoReport) -> String {
    let check = |ok: bool| if ok { "ok" } else { "FAILED" }.to_string();
    let site_check =
        |pass: fn(&SiteLoss) -> bool| check(report.site_loss.as_ref().is_some_and(pass));
    let leaders: Vec<String> = (report.leaders.iter())
        .map(|(service, node)| format!("{service}: node {node}"))
        .collect();
    let figures = [
        (
            "log appends acknowledged",
            report.appends_acknowledged.to_string(),
        ),
        (
            "log appends abandoned",
            report.appends_abandoned.to_string(),
        ),
        (
            "log reads ok / failed",
            format!("{} / {}", report.reads_ok, report.reads_failed),
        ),
        (
            "tree creates acknowledged",
            report.tree_creates_acknowledged.to_string(),
        ),
        (
            "tree creates abandoned",
            report.tree_creates_abandoned.to_string(),
        ),
        ("killed node", report.killed_node.to_string()),
        ("write gap after kill", format!("{} ms", report.failover_ms)),
        ("log commit index", report.final_commit_index.to_string()),
        ("lines per log replica", report.replica_lines.to_string()),
        ("leaders at the end", leaders.join(", ")),
        (
            "between nodes",
            match report.tls {
                true => "mutual TLS (a CA made for the run)",
                false => "plaintext (`haven demo --tls` for mutual TLS)",
            }
            .to_string(),
        ),
    ];
    let site: Vec<(&str, String)> = site_lines(report.site_loss.as_ref())
        .into_iter()
        .filter(|(label, _)| !label.is_empty())
        .collect();
    let checks = [
        (
            "log replicas byte-identical",
            check(report.replicas_identical),
        ),
        (
            "every acknowledged append once",
            check(report.acknowledged_present_once),
        ),
        (
            "acknowledged line numbers match",
            check(report.acknowledged_line_numbers_match),
        ),
        (
            "tree replicas byte-identical",
            check(report.tree_replicas_identical),
        ),
        (
            "every acknowledged tree node there",
            check(report.tree_acknowledged_present),
        ),
        (
            "site B's log = A's, byte for byte",
            site_check(|s| s.history_identical),
        ),
        (
            "no append twice at site B",
            site_check(|s| s.acknowledged_once),
        ),
        (
            "every append acked >1 s before fire",
            site_check(|s| s.within_rpo_target),
        ),
    ];
    let rows = |rows: &[(&str, String)], width: usize| -> String {
        rows.iter()
            .map(|(label, value)| format!("  {label:<width$}{value}\n"))
            .collect()
    };
    format!(
        "Haven demo: site A runs 3 nodes and two services (log app at /log, tree app at\n\
         /coord); the log service's leader is killed with SIGKILL mid-load. Site B runs a\n\
         standby of the log service that follows A's encrypted off-site archive. Then a fire\n\
         at site A under load: every node SIGKILLed, its data deleted; site B is promoted.\n\n\
         {}\n  the fire at site A\n{}\n{}\n  verdict: {}\n{}",
        rows(&figures, 27),
        rows(&site, 27),
        rows(&checks, 37),
        if report.passed { "PASS" } else { "FAIL" },
        report
            .dir
            .as_ref()
            .map_or(String::new(), |d| format!("  files kept in {d}\n")),
    )
}
