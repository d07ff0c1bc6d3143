//! `haven bench tenants`: the noisy-neighbour rule, measured. Two services share three
//! nodes: B takes an open-loop write load at a fixed rate; A is hammered by a closed loop
//! that sends as fast as the nodes answer. A has a request-rate quota
//! (`limits.rate_per_s`), the per-service guard against a noisy neighbour. Phases
//! alternate, B alone and B beside A, so a drift of the machine's speed hits both alike;
//! B's p99 beside A over its p99 alone (target: at most 2) and B's throughput beside A
//! over alone (target: no loss) are the figures.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use haven_bench::load;
use haven_bench::load::LoadReport;
use haven_bench::load::LoadSpec;
use haven_bench::load::Mode;
use haven_bench::load::Target;
use haven_bench::progress::Progress;
use haven_bench::workload::WorkloadChoice;
use serde::Serialize;

use crate::cluster::AppKind;
use crate::cluster::ClusterSpec;
use crate::cluster::LocalCluster;
use crate::cluster::PREPOPULATED_LINES;
use crate::cluster::ServiceSpec;

#[derive(Debug, Clone, clap::Args)]
pub struct TenantsArgs {
    /// Length of each phase.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Writes per second sent to service B (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Connections of A's closed loop, spread over the three nodes.
    #[arg(long, default_value_t = 48)]
    pub a_connections: usize,
    /// A's quota per node (`limits.rate_per_s`); 0: none.
    #[arg(long, default_value_t = 300)]
    pub a_quota: u64,
    /// How long A's requests over its quota may wait for their turn
    /// (`limits.rate_wait_ms`); 0: refused at once (after the hold).
    #[arg(long, default_value_t = 0)]
    pub a_wait_ms: u64,
    /// Pairs of phases (B alone, then B beside A).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

const B_CONNECTIONS: usize = 16;
const BODY_BYTES: usize = 128;
const WARMUP: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const A_HOST: &str = "a.tenants";
const B_HOST: &str = "b.tenants";

#[derive(Debug, Serialize)]
pub struct TenantsReport {
    pub seconds: u64,
    pub rate: f64,
    pub a_connections: usize,
    pub a_quota: u64,
    pub a_wait_ms: u64,
    pub phases: Vec<Phase>,
    /// B's worst p99 beside A over its best p99 alone.
    pub b_p99_ratio: f64,
    /// B's lowest throughput beside A over its highest alone.
    pub b_throughput_ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub b_ok: u64,
    pub b_errors: u64,
    pub b_throughput: f64,
    pub b_p99_ms: Option<f64>,
    /// A's answered writes and refusals (429 over its quota); none when B runs alone.
    pub a_ok: u64,
    pub a_refused: u64,
}

pub async fn run(args: &TenantsArgs, exe: &std::path::Path) -> anyhow::Result<TenantsReport> {
    if args.seconds == 0 || args.rate <= 0.0 || args.rounds == 0 || args.a_connections == 0 {
        bail!("--seconds, --rate, --rounds and --a-connections must be positive");
    }
    let work = tempfile::Builder::new()
        .prefix("haven-tenants-")
        .tempdir()
        .context("creating a temporary directory")?;
    let cluster = LocalCluster::start(cluster_spec(args, exe, work.path()))?;
    for service in ["a", "b"] {
        cluster
            .wait_for_leader_of(Some(service), READY_TIMEOUT)
            .await?;
    }
    let b = load_spec(
        &cluster,
        B_HOST,
        Mode::Open { rate: args.rate },
        B_CONNECTIONS,
        args,
    )?;
    let a = load_spec(&cluster, A_HOST, Mode::Closed, args.a_connections, args)?;
    let mut phases = Vec::new();
    for _ in 0..args.rounds {
        phases.push(phase("B alone", &b, None).await?);
        phases.push(phase("B beside A", &b, Some(&a)).await?);
    }
    let (alone, beside): (Vec<&Phase>, Vec<&Phase>) =
        phases.iter().partition(|p| p.name == "B alone");
    let p99 = |p: &&Phase| p.b_p99_ms.unwrap_or(f64::INFINITY);
    let best_alone = alone.iter().map(p99).fold(f64::INFINITY, f64::min);
    let worst_beside = beside.iter().map(p99).fold(0.0, f64::max);
    let tput = |p: &&Phase| p.b_throughput;
    let top_alone = alone.iter().map(tput).fold(0.0, f64::max);
    let low_beside = beside.iter().map(tput).fold(f64::INFINITY, f64::min);
    Ok(TenantsReport {
        seconds: args.seconds,
        rate: args.rate,
        a_connections: args.a_connections,
        a_quota: args.a_quota,
        a_wait_ms: args.a_wait_ms,
        b_p99_ratio: worst_beside / best_alone,
        b_throughput_ratio: low_beside / top_alone.max(1e-9),
        phases,
    })
}

fn cluster_spec(args: &TenantsArgs, exe: &std::path::Path, dir: &std::path::Path) -> ClusterSpec {
    let app = AppKind::LogApp {
        prepopulate: PREPOPULATED_LINES,
    };
    let service = |name: &str, host: &str, tables: String| ServiceSpec {
        matcher: Some(format!("{{ host = \"{host}\" }}")),
        tables,
        ..ServiceSpec::new(name, app.clone())
    };
    let quota = match args.a_quota {
        0 => String::new(),
        rate => format!(
            "[service.limits]\nrate_per_s = {rate}\nrate_wait_ms = {}\n",
            args.a_wait_ms
        ),
    };
    ClusterSpec {
        site: String::new(),
        nodes: 3,
        exe: exe.to_path_buf(),
        dir: dir.to_path_buf(),
        extra_config: String::new(),
        app: app.clone(),
        managed: true,
        services: vec![
            service("a", A_HOST, quota),
            service("b", B_HOST, String::new()),
        ],
    }
}

/// Load on every node, naming `host`.
fn load_spec(
    cluster: &LocalCluster,
    host: &str,
    mode: Mode,
    connections: usize,
    args: &TenantsArgs,
) -> anyhow::Result<LoadSpec> {
    let targets = (cluster.slots.iter())
        .map(|slot| Target::parse(&slot.client_url())?.with_host(host))
        .collect::<Result<_, _>>()?;
    Ok(LoadSpec {
        targets,
        mode,
        connections,
        duration: Duration::from_secs(args.seconds),
        warmup: WARMUP,
        read_ratio: 0.0,
        request_timeout: REQUEST_TIMEOUT,
        seed: 1,
    })
}

async fn phase(name: &'static str, b: &LoadSpec, a: Option<&LoadSpec>) -> anyhow::Result<Phase> {
    let workload = WorkloadChoice::LogApp {
        body_size: BODY_BYTES,
        prepopulated_lines: PREPOPULATED_LINES,
    }
    .build();
    let progress = Progress::hidden();
    let b_run = load::run(b, Arc::clone(&workload), &progress);
    let (b_report, a_report) = match a {
        Some(a) => {
            let a_run = load::run(a, Arc::clone(&workload), &progress);
            let (b_report, a_report) = tokio::join!(b_run, a_run);
            (b_report?, Some(a_report?))
        }
        None => (b_run.await?, None),
    };
    let refused = |r: &LoadReport| r.errors.get("status_4xx").copied().unwrap_or(0);
    Ok(Phase {
        name,
        b_ok: b_report.requests_ok,
        b_errors: b_report.errors_total(),
        b_throughput: b_report.throughput,
        b_p99_ms: b_report.latency.all.map(|l| l.p99_ms),
        a_ok: a_report.as_ref().map_or(0, |r| r.requests_ok),
        a_refused: a_report.as_ref().map_or(0, refused),
    })
}

pub fn render(r: &TenantsReport) -> String {
    let quota = match (r.a_quota, r.a_wait_ms) {
        (0, _) => "no quota".to_string(),
        (q, 0) => format!("quota {q}/s per node"),
        (q, wait) => format!("quota {q}/s per node, waits up to {wait} ms"),
    };
    let mut out = format!(
        "{} s per phase; B: {:.0} writes/s open loop; A: closed loop, {} connections, {quota}\n\
         phase        B ok  B errors  B writes/s  B p99 ms     A ok  A refused (429)\n",
        r.seconds, r.rate, r.a_connections
    );
    for p in &r.phases {
        let p99 = p.b_p99_ms.map_or("-".to_string(), |v| format!("{v:.2}"));
        out.push_str(&format!(
            "{:<11}{:>7}{:>10}{:>12.0}{:>10}{:>9}{:>17}\n",
            p.name, p.b_ok, p.b_errors, p.b_throughput, p99, p.a_ok, p.a_refused
        ));
    }
    out.push_str(&format!(
        "B's p99 beside A / alone (worst / best): {:.2} (target <= 2)\n\
         B's throughput beside A / alone (lowest / highest): {:.3} (target: no loss)\n",
        r.b_p99_ratio, r.b_throughput_ratio
    ));
    out
}
