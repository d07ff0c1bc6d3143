//! `haven bench reference`: the reference evaluation in one run on this machine.
//!
//! For each system (the log app alone, Haven with 1 and 3 nodes, optionally etcd) and each
//! mix (POST 100%, 50/50, GET 100%) it measures saturation with a closed loop, the CPU
//! the system's processes spent per request in that window, and a throughput–latency
//! curve of open-loop steps at fixed fractions of that saturation. Everything runs in the
//! same session, so the baseline and the peer share the machine's noise with Haven, and
//! the targets are judged as ratios against them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use haven_bench::cpu;
use haven_bench::load;
use haven_bench::load::LoadSpec;
use haven_bench::load::Mode;
use haven_bench::load::Target;
use haven_bench::progress::Progress;
use haven_bench::report::ScenarioRow;
use haven_bench::report::markdown_table;
use haven_bench::sweep::Curve;
use haven_bench::sweep::CurvePoint;
use haven_bench::sweep::MIN_THROUGHPUT_RATIO;
use haven_bench::workload::Workload;
use serde::Serialize;

use super::systems::RunningSystem;
use super::systems::SystemKind;
use super::systems::launch;

#[derive(Debug, Clone, clap::Args)]
pub struct ReferenceArgs {
    /// Short steps: the whole run in under 3 minutes instead of about 15.
    #[arg(long)]
    pub quick: bool,
    /// Also measure a peer system in the same run.
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    /// Also measure 3 nodes speaking mutual TLS to each other, for the cost of TLS in
    /// the same run.
    #[arg(long)]
    pub tls: bool,
    /// Where the JSON, the Markdown table and the charts go.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Connections of the load generator; in the saturation runs, also the concurrency.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Peer {
    /// A 3-member etcd on loopback, driven through its HTTP/JSON gateway.
    Etcd,
}

/// How long each kind of run lasts.
struct Timing {
    warmup: Duration,
    saturation: Duration,
    step: Duration,
    step_warmup: Duration,
    /// Open-loop steps, as fractions of the measured saturation throughput.
    fractions: &'static [f64],
}

const QUICK: Timing = Timing {
    warmup: Duration::from_millis(500),
    saturation: Duration::from_secs(3),
    step: Duration::from_millis(1500),
    step_warmup: Duration::from_millis(300),
    fractions: &[0.25, 0.5, 0.75, 1.0],
};

const FULL: Timing = Timing {
    warmup: Duration::from_secs(2),
    saturation: Duration::from_secs(10),
    step: Duration::from_secs(5),
    step_warmup: Duration::from_secs(1),
    fractions: &[0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1],
};

/// The step whose p90 is reported as the latency at half load.
const HALF_LOAD: f64 = 0.5;

/// One request mix of the reference workload.
struct Mix {
    name: &'static str,
    file: &'static str,
    read_ratio: f64,
}

const MIXES: [Mix; 3] = [
    Mix {
        name: "POST 100%",
        file: "post",
        read_ratio: 0.0,
    },
    Mix {
        name: "50/50",
        file: "mixed",
        read_ratio: 0.5,
    },
    Mix {
        name: "GET 100%",
        file: "get",
        read_ratio: 1.0,
    },
];

/// Everything one reference run measured.
#[derive(Debug, Serialize)]
pub struct ReferenceReport {
    pub quick: bool,
    pub cores: usize,
    pub connections: usize,
    pub elapsed_s: f64,
    pub rows: Vec<ScenarioRow>,
    /// Curves by mix file name (`post`, `mixed`, `get`), one per system.
    pub curves: BTreeMap<String, Vec<Curve>>,
    /// Peak resident memory of each Haven node in the 3-node runs, in MB.
    pub node_peak_rss_mb: Vec<f64>,
    pub targets: Vec<TargetCheck>,
}

/// One performance target of the issue, judged from this run.
#[derive(Debug, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    pub met: Option<bool>,
}

pub async fn run(args: &ReferenceArgs, exe: &Path) -> anyhow::Result<ReferenceReport> {
    let started = Instant::now();
    let timing = if args.quick { &QUICK } else { &FULL };
    let work = tempfile::Builder::new()
        .prefix("haven-bench-")
        .tempdir()
        .context("creating a temporary directory")?;
    let mut systems = vec![
        SystemKind::AppAlone,
        SystemKind::Haven { nodes: 1 },
        SystemKind::Haven { nodes: 3 },
    ];
    if args.tls {
        systems.push(SystemKind::HavenTls { nodes: 3 });
    }
    if args.peer.is_some() {
        systems.push(SystemKind::Etcd);
    }
    let progress = Progress::stderr();
    let mut rows = Vec::new();
    let mut curves: BTreeMap<String, Vec<Curve>> = BTreeMap::new();
    let mut node_peak_rss_mb = Vec::new();
    for kind in systems {
        progress.set_stage(format!("starting {}: ", kind.label()));
        let system = launch(kind, exe, work.path()).await?;
        for mix in &MIXES {
            let (row, curve) =
                measure(&system, kind, mix, timing, args.connections, &progress).await?;
            rows.push(row);
            curves.entry(mix.file.to_string()).or_default().push(curve);
        }
        if kind == (SystemKind::Haven { nodes: 3 }) {
            node_peak_rss_mb = peak_rss_mb(&system.node_pids())?;
        }
    }
    progress.finish();
    let targets = judge(&rows, &curves, &node_peak_rss_mb);
    let report = ReferenceReport {
        quick: args.quick,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        connections: args.connections,
        elapsed_s: started.elapsed().as_secs_f64(),
        rows,
        curves,
        node_peak_rss_mb,
        targets,
    };
    write_results(&args.out, &report)?;
    Ok(report)
}

/// Saturation (closed loop, with CPU), then the open-loop curve for one system and mix.
async fn measure(
    system: &RunningSystem,
    kind: SystemKind,
    mix: &Mix,
    timing: &Timing,
    connections: usize,
    progress: &Progress,
) -> anyhow::Result<(ScenarioRow, Curve)> {
    let label = kind.label();
    let workload = kind.workload().build();
    let targets = system
        .targets
        .iter()
        .map(|url| Target::parse(url))
        .collect::<Result<Vec<_>, _>>()?;
    let base = LoadSpec {
        targets,
        mode: Mode::Closed,
        connections,
        duration: timing.saturation,
        warmup: Duration::ZERO,
        read_ratio: mix.read_ratio,
        request_timeout: Duration::from_secs(5),
        seed: 1,
    };
    progress.set_stage(format!("{label} · {} · warmup: ", mix.name));
    let warmup = LoadSpec {
        duration: timing.warmup,
        ..base.clone()
    };
    load::run(&warmup, Arc::clone(&workload), progress).await?;
    progress.set_stage(format!("{label} · {} · saturation: ", mix.name));
    let pids = system.pids();
    let cpu_before = cpu::total_cpu(&pids)?;
    let saturation = load::run(&base, Arc::clone(&workload), progress).await?;
    let cpu_spent = cpu::total_cpu(&pids)?.saturating_sub(cpu_before);
    let curve = curve(
        &base,
        &workload,
        saturation.throughput,
        timing,
        &label,
        mix,
        progress,
    )
    .await?;
    let latency = saturation.latency.all;
    let row = ScenarioRow {
        scenario: label,
        workload: mix.name.to_string(),
        throughput: saturation.throughput,
        p50_ms: latency.map_or(0.0, |l| l.p50_ms),
        p90_ms: latency.map_or(0.0, |l| l.p90_ms),
        p99_ms: latency.map_or(0.0, |l| l.p99_ms),
        cpu_us_per_request: cpu::cpu_us_per_request(cpu_spent, saturation.requests_ok),
        errors: saturation.errors_total(),
        p90_half_load_ms: point_at(&curve, saturation.throughput * HALF_LOAD)
            .and_then(|p| p.p90_ms),
    };
    Ok((row, curve))
}

async fn curve(
    base: &LoadSpec,
    workload: &Arc<dyn Workload>,
    saturation: f64,
    timing: &Timing,
    label: &str,
    mix: &Mix,
    progress: &Progress,
) -> anyhow::Result<Curve> {
    let mut points = Vec::new();
    for rate in step_rates(saturation, timing) {
        progress.set_stage(format!("{label} · {} · {rate:.0} req/s: ", mix.name));
        let step = LoadSpec {
            mode: Mode::Open { rate },
            duration: timing.step,
            warmup: timing.step_warmup,
            ..base.clone()
        };
        let report = load::run(&step, Arc::clone(workload), progress).await?;
        let mut point = CurvePoint::from_report(rate, &report);
        point.saturated =
            point.throughput < rate * MIN_THROUGHPUT_RATIO || point.error_ratio() > 0.01;
        points.push(point);
    }
    Ok(Curve {
        label: label.to_string(),
        saturated_at: points.iter().find(|p| p.saturated).map(|p| p.intended_rate),
        points,
    })
}

/// The write rate the throughput target names. Every curve also gets a step at exactly this
/// rate (when it is below the highest fraction's), so the target is judged where it is set
/// rather than at whichever fractions of saturation fall around it.
const TARGET_RATE: f64 = 10_000.0;

/// Every open-loop step of one curve, in increasing rate.
fn step_rates(saturation: f64, timing: &Timing) -> Vec<f64> {
    let mut rates: Vec<f64> = timing
        .fractions
        .iter()
        .map(|f| step_rate(saturation, *f))
        .collect();
    if rates.last().is_some_and(|highest| *highest > TARGET_RATE) && !rates.contains(&TARGET_RATE) {
        rates.push(TARGET_RATE);
    }
    rates.sort_by(f64::total_cmp);
    rates
}

/// An open-loop step's rate: a fraction of saturation, but never below 10 req/s.
fn step_rate(saturation: f64, fraction: f64) -> f64 {
    (saturation * fraction).max(10.0)
}

fn point_at(curve: &Curve, rate: f64) -> Option<&CurvePoint> {
    curve.points.iter().find(|p| p.intended_rate == rate)
}

fn peak_rss_mb(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter()
        .map(|pid| Ok(cpu::peak_rss_bytes(*pid)? as f64 / 1e6))
        .collect()
}

fn row<'a>(rows: &'a [ScenarioRow], kind: SystemKind, mix: &str) -> Option<&'a ScenarioRow> {
    rows.iter()
        .find(|r| r.scenario == kind.label() && r.workload == mix)
}

/// The targets for 3 nodes, each as measured here and whether it was met
/// (`None` when this run lacks what the target compares against).
fn judge(
    rows: &[ScenarioRow],
    curves: &BTreeMap<String, Vec<Curve>>,
    node_peak_rss_mb: &[f64],
) -> Vec<TargetCheck> {
    let haven = SystemKind::Haven { nodes: 3 };
    let post = row(rows, haven, "POST 100%");
    let get = row(rows, haven, "GET 100%");
    let alone = row(rows, SystemKind::AppAlone, "POST 100%");
    let etcd = row(rows, SystemKind::Etcd, "POST 100%");
    let sustained = curves
        .get("post")
        .and_then(|c| c.iter().find(|c| c.label == haven.label()))
        .map(|c| {
            c.points
                .iter()
                .filter(|p| !p.saturated && p.p99_ms.is_some_and(|ms| ms <= 20.0))
                .map(|p| p.throughput)
                .fold(0.0, f64::max)
        });
    let mut checks = Vec::new();
    let mut check = |target: &str, measured: Option<(String, bool)>| {
        checks.push(TargetCheck {
            target: target.to_string(),
            measured: measured
                .as_ref()
                .map_or("not measured".to_string(), |(m, _)| m.clone()),
            met: measured.map(|(_, met)| met),
        });
    };
    check(
        "POST 100%: ≥ 10,000 ordered writes/s with p99 ≤ 20 ms",
        sustained.map(|t| {
            (
                format!("{t:.0} writes/s sustained with p99 ≤ 20 ms"),
                t >= 10_000.0,
            )
        }),
    );
    check(
        "POST 100%: p90 at half load ≤ app alone's + 2 ms",
        post.zip(alone).and_then(|(h, a)| {
            let added = h.p90_half_load_ms? - a.p90_half_load_ms?;
            Some((format!("{added:.2} ms added"), added <= 2.0))
        }),
    );
    check(
        "POST 100%: ≥ 4 × etcd's writes/s",
        post.zip(etcd).map(|(h, e)| {
            let ratio = h.throughput / e.throughput.max(1.0);
            (format!("{ratio:.2} × etcd"), ratio >= 4.0)
        }),
    );
    check(
        "CPU per ordered write ≤ 6 × app alone's per request",
        post.zip(alone).and_then(|(h, a)| {
            let ratio = h.cpu_us_per_request? / a.cpu_us_per_request?;
            Some((format!("{ratio:.2} ×"), ratio <= 6.0))
        }),
    );
    check(
        "GET 100% (linearizable) ≥ 3 × POST 100%",
        get.zip(post).map(|(g, p)| {
            let ratio = g.throughput / p.throughput.max(1.0);
            (format!("{ratio:.2} ×"), ratio >= 3.0)
        }),
    );
    let peak = node_peak_rss_mb.iter().copied().fold(0.0, f64::max);
    check(
        "node memory ≤ 100 MB RSS under write load",
        (!node_peak_rss_mb.is_empty()).then(|| (format!("{peak:.0} MB peak"), peak <= 100.0)),
    );
    let tls = row(rows, SystemKind::HavenTls { nodes: 3 }, "POST 100%");
    if let Some((t, h)) = tls.zip(post) {
        checks.push(TargetCheck {
            target: "POST 100% with mutual TLS between nodes (no target: the cost)".to_string(),
            measured: format!(
                "{:.3} × the throughput, p99 {:.2} vs {:.2} ms, CPU {:.2} ×",
                t.throughput / h.throughput.max(1.0),
                t.p99_ms,
                h.p99_ms,
                t.cpu_us_per_request
                    .zip(h.cpu_us_per_request)
                    .map_or(0.0, |(t, h)| t / h),
            ),
            met: None,
        });
    }
    checks
}

fn write_results(out: &Path, report: &ReferenceReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("reference.json");
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    for mix in &MIXES {
        if let Some(curves) = report.curves.get(mix.file) {
            let title = format!("{} · 128-byte bodies · throughput vs p90", mix.name);
            haven_bench::chart::write_svg(&out.join(format!("{}.svg", mix.file)), &title, curves)?;
        }
    }
    let markdown = out.join("results.md");
    std::fs::write(&markdown, render(report))
        .with_context(|| format!("writing {}", markdown.display()))?;
    Ok(())
}

/// The Markdown summary: the table, the targets, and the charts beside it.
pub fn render(report: &ReferenceReport) -> String {
    let mut text = format!(
        "# Reference run ({}, {} cores, {} connections, {:.0} s)\n\n",
        if report.quick { "quick" } else { "full" },
        report.cores,
        report.connections,
        report.elapsed_s
    );
    text.push_str(&markdown_table(&report.rows));
    text.push_str("\n| Target (3 nodes) | Measured | Met |\n|---|---|---|\n");
    for check in &report.targets {
        let met = match check.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "n/a",
        };
        let _ = writeln!(text, "| {} | {} | {met} |", check.target, check.measured);
    }
    text.push_str(
        "\nCharts: `post.svg`, `mixed.svg`, `get.svg` (throughput against p90 latency).\n",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_get_a_step_at_the_target_rate_only_when_they_reach_past_it() {
        let rates = step_rates(12_000.0, &QUICK);
        assert_eq!(rates, vec![3_000.0, 6_000.0, 9_000.0, 10_000.0, 12_000.0]);
        assert_eq!(
            step_rates(8_000.0, &QUICK),
            vec![2_000.0, 4_000.0, 6_000.0, 8_000.0]
        );
        assert_eq!(step_rates(20_000.0, &QUICK).len(), 4);
    }

    fn curve_at(saturation: f64) -> Curve {
        let points = FULL
            .fractions
            .iter()
            .map(|f| CurvePoint {
                intended_rate: step_rate(saturation, *f),
                throughput: 0.0,
                requests_ok: 0,
                errors: 0,
                p50_ms: None,
                p90_ms: Some(*f),
                p99_ms: None,
                saturated: false,
            })
            .collect();
        Curve {
            label: String::new(),
            points,
            saturated_at: None,
        }
    }

    #[test]
    fn the_half_load_step_is_found_also_when_clamped_to_the_minimum_rate() {
        let curve = curve_at(13_914.0);
        let half = point_at(&curve, step_rate(13_914.0, HALF_LOAD));
        assert_eq!(half.and_then(|p| p.p90_ms), Some(0.5));
        // At 12 req/s every step is clamped to 10 req/s: the first one matches.
        let slow = curve_at(12.0);
        assert_eq!(step_rate(12.0, HALF_LOAD), 10.0);
        assert_eq!(point_at(&slow, 10.0).and_then(|p| p.p90_ms), Some(0.1));
    }
}
