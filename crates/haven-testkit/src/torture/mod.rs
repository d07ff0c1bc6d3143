//! `haven torture`: a Jepsen-style run against a real cluster of `haven node` processes
//! replicating the tree app. Concurrent clients read, set and compare-and-set a few keys
//! through random nodes while a seeded schedule kills, pauses and partitions nodes and
//! kills app replicas; then everything is healed and four things are checked:
//!
//! 1. each key's history is linearizable ([`check::check_key`], `stateright`'s tester);
//! 2. every acknowledged write is in the final state ([`check::check_acknowledged`]);
//! 3. every app replica's `/digest` and `/dump`, fetched directly, are byte-identical;
//! 4. no process exited except when killed on purpose (and no log shows a panic).
//!
//! The run prints its seed first; `--seed` replays the same fault schedule and the same
//! client choices (timing, and so the interleaving, differs from run to run).
//!
//! # Partitions: network namespaces, not a proxy
//!
//! A node finds a peer at the `raft_addr` stored for it in the Raft membership
//! (`PeerNode`, see `haven_consensus::client`), one address per node, the same for
//! every sender, and the raft hello does not name the sender. A proxy placed at that
//! address could cut everything going *to* a node but could not tell which peer a
//! connection comes *from*, so it cannot cut one link (n1–n2) while keeping another
//! (n1–n3), nor isolate a node's outgoing traffic. Network namespaces can: each node and
//! its app replica run in their own host (`ip netns exec`), iptables drops exactly the
//! packets of a cut link both ways, and the processes under test are unmodified.
//! The price is root and the `netns-hosts` tool; without them the run says so and
//! schedules kills and pauses only ([`netns`]).
//!
//! # Outcomes
//!
//! See [`history`]: only the app's own answer through Haven counts as done, only Haven's
//! explicit "never proposed" (`no-leader`, `overloaded`, a refusal at the door) as
//! failed, and everything else as unknown, which the checker treats as "may have taken
//! effect at any time after its invocation, or never".

pub mod check;
pub mod history;
pub mod nemesis;
pub mod netns;
pub mod schedule;
pub mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::AppKind;
use crate::cluster::ClusterSpec;
use crate::cluster::LocalCluster;
use crate::cluster::Process;
use check::KeySpec;
use check::KeyState;
use check::Linearizability;
use haven_client::http::Http;
use history::OpRecord;
use history::Outcome;
use history::Ret;
use nemesis::Nemesis;
use nemesis::TimelineEntry;
use netns::NetHosts;
use schedule::Episode;
use workload::INITIAL_DATA;
use workload::Workload;
use workload::key_path;

/// Where the shared tool sits beside a checkout of this repository (`../shared/tools`).
const DEFAULT_NETNS_TOOL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/tools/netns-hosts"
);

/// Tighter than the defaults, so a request caught by a fault is answered (or given up)
/// well within the client's own timeout and the run keeps moving.
const NODE_CONFIG: &str = "[limits]\nrequest_timeout_ms = 3000\nno_leader_timeout_ms = 2000\n";
/// Budgets for the phases around the workload.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Past this, the linearizability search is abandoned and the run fails as inconclusive.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// Pointers into a rejected history printed per key.
const EXPLAIN_LIMIT: usize = 3;
/// Stack for the checker's recursive search (one frame per operation of a key).
const CHECK_STACK_BYTES: usize = 256 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct TortureArgs {
    /// Seed of the fault schedule and the clients' choices (random if absent; always printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds of workload under faults.
    #[arg(long, default_value_t = 30)]
    pub duration: u64,
    /// Nodes in the cluster (3 or 5 are the interesting sizes).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=9))]
    pub nodes: u8,
    /// Concurrent clients.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub clients: u8,
    /// Keys the clients share (each key's history is checked on its own).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub keys: u8,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Keep the cluster directory (configs, data, logs, history); kept anyway on failure.
    #[arg(long)]
    pub keep: bool,
    /// Schedule no partitions (kills and pauses only).
    #[arg(long)]
    pub no_partitions: bool,
    /// Consistency of the clients' reads (a `[[routes]]` rule for `GET /tree`). Only
    /// `linearizable` and `ordered` promise linearizability; `local` is there to show the
    /// checker catching stale reads.
    #[arg(long, value_enum, default_value_t = ReadMode::Linearizable)]
    pub read_mode: ReadMode,
    /// Every node checkpoints the tree app (hooks mode) after this many entries and keeps
    /// two, so faults also land in checkpoints, compaction and installs (0: off).
    #[arg(long, default_value_t = 20)]
    pub checkpoint_every: u64,
    /// The tool that creates network namespaces for partitions (needs root).
    #[arg(long, env = "HAVEN_NETNS_TOOL", default_value = DEFAULT_NETNS_TOOL)]
    pub netns_tool: PathBuf,
    /// Internal: this run is already inside the client host of these hosts.
    #[arg(long, hide = true)]
    pub inside_hosts: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadMode {
    Linearizable,
    Ordered,
    Local,
}

impl ReadMode {
    fn name(self) -> &'static str {
        match self {
            ReadMode::Linearizable => "linearizable",
            ReadMode::Ordered => "ordered",
            ReadMode::Local => "local",
        }
    }
}

impl TortureArgs {
    /// Every node's extra config: [`NODE_CONFIG`] and the route for the clients' reads.
    fn node_config(&self) -> String {
        let mut config = format!(
            "{NODE_CONFIG}\n[[routes]]\nmethods = [\"GET\"]\npath_prefix = \"/tree/\"\nmode = \"{}\"\n",
            self.read_mode.name()
        );
        if self.checkpoint_every > 0 {
            config.push_str(&format!(
                "\n[checkpoints]\nmode = \"hooks\"\nevery_entries = {}\nevery_seconds = 0\nkeep = 2\n",
                self.checkpoint_every
            ));
        }
        config
    }

    /// The flags that reproduce this run (what the inner run gets, what a replay needs).
    fn replay_args(&self, seed: u64) -> Vec<String> {
        let mut args = vec![
            "torture".to_string(),
            format!("--seed={seed}"),
            format!("--duration={}", self.duration),
            format!("--nodes={}", self.nodes),
            format!("--clients={}", self.clients),
            format!("--keys={}", self.keys),
            format!("--read-mode={}", self.read_mode.name()),
            format!("--checkpoint-every={}", self.checkpoint_every),
        ];
        for (on, flag) in [
            (self.json, "--json"),
            (self.keep, "--keep"),
            (self.no_partitions, "--no-partitions"),
        ] {
            if on {
                args.push(flag.to_string());
            }
        }
        args
    }
}

/// The result of one run, as printed.
#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_s: u64,
    pub nodes: usize,
    pub clients: usize,
    pub keys: usize,
    /// "network namespaces" or why partitions were skipped.
    pub partitions: String,
    pub schedule: Vec<Episode>,
    pub timeline: Vec<TimelineEntry>,
    pub ops: OpCounts,
    pub per_key: Vec<KeyReport>,
    /// Time the per-key checks took.
    pub check_ms: u64,
    pub violations: Vec<String>,
    /// The kept cluster directory.
    pub dir: Option<PathBuf>,
    pub replay: String,
    pub passed: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct OpCounts {
    pub total: usize,
    pub reads_ok: usize,
    pub writes_ok: usize,
    pub cas_refused: usize,
    pub failed: usize,
    pub unknown: usize,
}

#[derive(Debug, Serialize)]
pub struct KeyReport {
    pub key: String,
    pub ops: usize,
    pub linearizability: Linearizability,
    pub final_state: Option<KeyState>,
}

/// `haven torture`: runs (inside network namespaces when it can), prints, and says
/// whether the verdict was clean.
pub async fn execute(
    exe: PathBuf,
    mut args: TortureArgs,
    print: fn(&str) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let seed = *args.seed.get_or_insert_with(rand::random);
    if let Some(prefix) = args.inside_hosts.clone() {
        let hosts = NetHosts::attach(&args.netns_tool, &prefix, args.nodes.into());
        let note = format!("network namespaces ({prefix}1..)");
        return report_run(exe, &args, seed, Some(&hosts), note, print).await;
    }
    let skipped = if args.no_partitions {
        Some("disabled by --no-partitions".to_string())
    } else {
        netns::unavailable_reason(&args.netns_tool)
    };
    if let Some(reason) = skipped {
        let note = format!("skipped: {reason}");
        return report_run(exe, &args, seed, None, note, print).await;
    }
    let prefix = format!("hvt{}-", std::process::id());
    let hosts = match NetHosts::up(&args.netns_tool, &prefix, args.nodes.into()) {
        Ok(hosts) => hosts,
        Err(e) => {
            let note = format!("skipped: cannot create network namespaces: {e:#}");
            return report_run(exe, &args, seed, None, note, print).await;
        }
    };
    let mut inner = args.replay_args(seed);
    inner.extend([
        format!("--netns-tool={}", args.netns_tool.display()),
        format!("--inside-hosts={prefix}"),
    ]);
    let status = tokio::task::spawn_blocking(move || hosts.reexec(&exe, &inner)).await??;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}

async fn report_run(
    exe: PathBuf,
    args: &TortureArgs,
    seed: u64,
    net: Option<&NetHosts>,
    partitions: String,
    print: fn(&str) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    if !args.json {
        print(&format!(
            "haven torture: seed {seed}, {} s, {} nodes, {} clients, {} keys\npartitions: {partitions}\n",
            args.duration, args.nodes, args.clients, args.keys
        ))?;
    }
    let report = run(exe, args, seed, net, partitions).await?;
    if args.json {
        print(&format!("{}\n", serde_json::to_string(&report)?))?;
    } else {
        print(&render(&report))?;
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One run: cluster up, keys created, workload under the schedule, heal, converge, check.
pub async fn run(
    exe: PathBuf,
    args: &TortureArgs,
    seed: u64,
    net: Option<&NetHosts>,
    partitions: String,
) -> anyhow::Result<Report> {
    let (nodes, keys) = (usize::from(args.nodes), usize::from(args.keys));
    let dir = tempfile::Builder::new()
        .prefix("haven-torture-")
        .tempdir()
        .context("creating the cluster directory")?;
    let config = args.node_config();
    let cluster = start_cluster(exe, dir.path(), &config, (nodes, keys), net).await?;
    let duration = Duration::from_secs(args.duration);
    let schedule = schedule::generate(schedule::Shape {
        seed,
        duration,
        nodes,
        partitions: net.is_some(),
    });
    let started = Instant::now();
    let workload = Workload {
        urls: cluster.slots.iter().map(|s| s.client_url()).collect(),
        keys,
        clients: args.clients.into(),
        seed,
        started,
        duration,
    };
    let mut nemesis = Nemesis::new(cluster, net, started);
    let (records, ()) = tokio::join!(workload.run(), nemesis.play(&schedule));
    let (mut violations, dumps) = settle(&mut nemesis).await;
    let checked = Instant::now();
    let per_key = check_keys(&records, &final_states(&dumps, keys), keys, &mut violations).await;
    let check_ms = checked.elapsed().as_millis() as u64;
    let keep = args.keep || !violations.is_empty();
    Ok(Report {
        seed,
        duration_s: args.duration,
        nodes,
        clients: args.clients.into(),
        keys,
        partitions,
        schedule,
        ops: count(&records),
        dir: keep_dir(dir, keep, &records, &nemesis.timeline),
        timeline: std::mem::take(&mut nemesis.timeline),
        per_key,
        check_ms,
        passed: violations.is_empty(),
        violations,
        replay: format!("haven {}", args.replay_args(seed).join(" ")),
    })
}

/// Starts the nodes and replicas (each on its own host when partitions are on), waits
/// until they serve, and creates the keys.
async fn start_cluster(
    exe: PathBuf,
    dir: &Path,
    config: &str,
    (nodes, keys): (usize, usize),
    net: Option<&NetHosts>,
) -> anyhow::Result<LocalCluster> {
    let spec = ClusterSpec {
        site: String::new(),
        nodes,
        exe,
        dir: dir.to_path_buf(),
        extra_config: config.to_string(),
        app: AppKind::TreeApp,
        managed: false,
        services: Vec::new(),
    };
    let hosts = net.map(NetHosts::node_hosts).unwrap_or_default();
    let cluster = LocalCluster::start_on_hosts(spec, &hosts)?;
    cluster.wait_all_ready(READY_TIMEOUT).await?;
    let urls: Vec<String> = cluster.slots.iter().map(|s| s.client_url()).collect();
    create_keys(&urls, keys).await?;
    Ok(cluster)
}

/// Ends every fault, waits for the replicas to converge, and checks what needs no
/// history: convergence, identical replicas, crashes. Returns the violations found and
/// each replica's digest and dump.
async fn settle(nemesis: &mut Nemesis<'_>) -> (Vec<String>, Vec<(usize, Result<String, String>)>) {
    nemesis.heal_all().await;
    let mut violations = Vec::new();
    if let Err(e) = nemesis.cluster.wait_converged(CONVERGE_TIMEOUT).await {
        violations.push(format!("no convergence after healing: {e:#}"));
    }
    nemesis.reap();
    let dumps = fetch_dumps(&nemesis.cluster).await;
    violations.extend(check::check_replicas(&dumps));
    violations.extend(nemesis.crashes.iter().cloned());
    violations.extend(panics_in_logs(&nemesis.cluster));
    (violations, dumps)
}

/// Creates every key with [`INITIAL_DATA`] (version 0), retrying through other nodes until
/// it exists; an earlier attempt that did create it shows as `409 node exists`.
async fn create_keys(urls: &[String], keys: usize) -> anyhow::Result<()> {
    let http = Http::new(Duration::from_secs(5));
    for k in 0..keys {
        let mut created = false;
        for attempt in 0..20 {
            let url = format!("{}/tree{}", urls[attempt % urls.len()], key_path(k));
            if let Ok(reply) = http.send("PUT", &url, &[], INITIAL_DATA.into()).await
                && (reply.status == 201 || reply.status == 409)
            {
                created = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if !created {
            bail!("cannot create key {}", key_path(k));
        }
    }
    Ok(())
}

/// Each replica's `/digest` and `/dump`, straight from the app (bypassing Haven).
async fn fetch_dumps(cluster: &LocalCluster) -> Vec<(usize, Result<String, String>)> {
    let http = Http::new(Duration::from_secs(5));
    let mut dumps = Vec::new();
    for (i, slot) in cluster.slots.iter().enumerate() {
        let fetch = async {
            let digest = http.get(&format!("{}/digest", slot.app_url())).await?;
            let dump = http.get(&format!("{}/dump", slot.app_url())).await?;
            anyhow::Ok(format!("{}\n{}", digest.text().trim(), dump.text()))
        };
        dumps.push((i, fetch.await.map_err(|e| format!("{e:#}"))));
    }
    dumps
}

/// Every key's final version and data, from the first replica's dump.
fn final_states(
    dumps: &[(usize, Result<String, String>)],
    keys: usize,
) -> BTreeMap<String, KeyState> {
    let Some((_, Ok(text))) = dumps.first() else {
        return BTreeMap::new();
    };
    let dump = text.split_once('\n').map_or("", |(_, dump)| dump);
    let Ok(value) = serde_json::from_str::<serde_json::Value>(dump) else {
        return BTreeMap::new();
    };
    let wanted: Vec<String> = (0..keys).map(key_path).collect();
    let nodes = value["nodes"].as_array().cloned().unwrap_or_default();
    nodes
        .iter()
        .filter_map(|node| {
            let path = node["path"].as_str()?;
            let version = node["version"].as_u64()?;
            let data = from_hex(node["data"].as_str()?)?;
            wanted.iter().any(|w| w == path).then(|| {
                let data = String::from_utf8_lossy(&data).into_owned();
                (path.to_string(), KeyState { version, data })
            })
        })
        .collect()
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Lines of node and app logs that show a panic (a node aborts on one, an app may not).
fn panics_in_logs(cluster: &LocalCluster) -> Vec<String> {
    let mut found = Vec::new();
    for i in 0..cluster.slots.len() {
        for process in [Process::Node, Process::App] {
            let path = cluster.log_path(i, process);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            found.extend(
                text.lines()
                    .filter(|l| l.contains("panicked at"))
                    .take(3)
                    .map(|l| format!("panic in {}: {l}", path.display())),
            );
        }
    }
    found
}

/// Runs the per-key checks on a thread of their own, within [`CHECK_TIMEOUT`].
async fn check_keys(
    records: &[OpRecord],
    finals: &BTreeMap<String, KeyState>,
    keys: usize,
    violations: &mut Vec<String>,
) -> Vec<KeyReport> {
    let initial = KeyState {
        version: 0,
        data: INITIAL_DATA.to_string(),
    };
    let (records, finals) = (records.to_vec(), finals.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("torture-check".to_string())
        .stack_size(CHECK_STACK_BYTES)
        .spawn(move || {
            let verdicts: Vec<_> = (0..keys)
                .map(|k| check_one_key(k, &records, &finals, &initial))
                .collect();
            let _ = tx.send(verdicts);
        });
    if let Err(e) = spawned {
        violations.push(format!("cannot start the checker: {e}"));
        return Vec::new();
    }
    match tokio::time::timeout(CHECK_TIMEOUT, rx).await {
        Ok(Ok(verdicts)) => verdicts
            .into_iter()
            .map(|(report, problems)| {
                violations.extend(problems);
                report
            })
            .collect(),
        _ => {
            violations.push(format!(
                "linearizability check inconclusive: no answer within {CHECK_TIMEOUT:?}"
            ));
            Vec::new()
        }
    }
}

fn check_one_key(
    k: usize,
    records: &[OpRecord],
    finals: &BTreeMap<String, KeyState>,
    initial: &KeyState,
) -> (KeyReport, Vec<String>) {
    let path = key_path(k);
    let ops: Vec<&OpRecord> = records.iter().filter(|r| r.key == k).collect();
    let final_state = finals.get(&path);
    let mut problems = Vec::new();
    let linearizability = match KeySpec::new(&path, &initial.data) {
        Ok(spec) => check::check_key(spec, &ops, final_state),
        Err(e) => Linearizability::BadHistory(e.to_string()),
    };
    if linearizability != Linearizability::Linearizable {
        problems.push(format!(
            "{path}: history of {} operations is {linearizability:?}",
            ops.len()
        ));
        problems.extend(
            check::explain(&ops, EXPLAIN_LIMIT)
                .into_iter()
                .map(|e| format!("{path}: {e}")),
        );
    }
    match final_state {
        Some(state) => problems.extend(
            check::check_acknowledged(initial, &ops, state)
                .into_iter()
                .map(|p| format!("{path}: {p}")),
        ),
        None => problems.push(format!("{path}: missing from the final state")),
    }
    let report = KeyReport {
        key: path,
        ops: ops.len(),
        linearizability,
        final_state: final_state.cloned(),
    };
    (report, problems)
}

fn count(records: &[OpRecord]) -> OpCounts {
    let mut counts = OpCounts {
        total: records.len(),
        ..OpCounts::default()
    };
    for record in records {
        match &record.outcome {
            Outcome::Done(Ret::Value { .. }) => counts.reads_ok += 1,
            Outcome::Done(Ret::Written { .. }) => counts.writes_ok += 1,
            Outcome::Done(Ret::BadVersion { .. }) => counts.cas_refused += 1,
            Outcome::Failed(_) => counts.failed += 1,
            Outcome::Unknown(_) => counts.unknown += 1,
        }
    }
    counts
}

/// Writes the history and timeline into the directory and keeps it, or lets it go.
fn keep_dir(
    dir: tempfile::TempDir,
    keep: bool,
    records: &[OpRecord],
    timeline: &[TimelineEntry],
) -> Option<PathBuf> {
    if !keep {
        return None;
    }
    let path = dir.keep();
    for (name, json) in [
        ("history.json", serde_json::to_vec_pretty(records)),
        ("timeline.json", serde_json::to_vec_pretty(timeline)),
    ] {
        let written = json
            .map_err(anyhow::Error::from)
            .and_then(|bytes| Ok(std::fs::write(path.join(name), bytes)?));
        if let Err(e) = written {
            tracing::warn!(error = %e, file = name, "cannot save the run's record");
        }
    }
    Some(path)
}

/// The human summary: timeline, operations, per-key verdicts, violations, verdict.
pub fn render(report: &Report) -> String {
    let mut out = String::from("fault timeline:\n");
    for entry in &report.timeline {
        let _ = writeln!(
            out,
            "  +{:>7.3}s  {:<28} {}",
            entry.at_ms as f64 / 1000.0,
            entry.action,
            entry.target
        );
    }
    let o = &report.ops;
    let _ = writeln!(
        out,
        "operations: {} (reads ok {}, writes ok {}, cas refused {}, failed {}, unknown {})",
        o.total, o.reads_ok, o.writes_ok, o.cas_refused, o.failed, o.unknown
    );
    for key in &report.per_key {
        let version = key
            .final_state
            .as_ref()
            .map_or("none".to_string(), |s| s.version.to_string());
        let _ = writeln!(
            out,
            "  {}: {} ops, {:?}, final version {version}",
            key.key, key.ops, key.linearizability
        );
    }
    let _ = writeln!(out, "checks took {} ms", report.check_ms);
    if let Some(dir) = &report.dir {
        let _ = writeln!(out, "kept: {}", dir.display());
    }
    if report.passed {
        let _ = writeln!(out, "verdict: PASS (seed {})", report.seed);
    } else {
        let _ = writeln!(
            out,
            "verdict: FAIL, {} violation(s) (seed {}):",
            report.violations.len(),
            report.seed
        );
        for v in &report.violations {
            let _ = writeln!(out, "  - {v}");
        }
        let _ = writeln!(out, "replay: {}", report.replay);
    }
    out
}
