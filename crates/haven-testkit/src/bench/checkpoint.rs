//! `haven bench checkpoint`: what app-state checkpoints cost, on a 3-node managed log-app
//! cluster, for each app state size asked for:
//!
//! 1. one checkpoint on the leader (`POST /checkpoints`): wall time, the delivery pause
//!    (the node's pause metric), file size against app bytes, MB/s;
//! 2. a fresh 4th node added as a learner: time until it applied what the leader applied,
//!    bytes of the checkpoint it received, MB/s;
//! 3. the write latency of an open-loop load without checkpoints and with checkpoints
//!    forced on every node every few seconds, in the same run, as ratios;
//! 4. `haven restore` of a node's data directory to its last entry, some thousand entries
//!    past a checkpoint: entries/s replayed, and the rest of the restore's time.
//!
//! Each size gets a cluster of its own, in a temporary directory removed afterwards.
//! The log app's pre-populated lines are one line repeated with a counter, so they
//! compress far better than most real state: the compression ratio is an upper bound.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use bytes::Bytes;
use haven_bench::load;
use haven_bench::load::LoadReport;
use haven_bench::load::LoadSpec;
use haven_bench::load::Mode;
use haven_bench::load::Target;
use haven_bench::progress::Progress;
use haven_bench::workload::WorkloadChoice;
use haven_client::admin::AdminClient;
use haven_client::metrics_text;
use haven_node::admin::members::AddLearner;
use haven_node::admin::members::ChangeNode;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::systems::BODY_BYTES;
use super::systems::log_app_cluster;
use crate::cluster::ClusterSpec;
use crate::cluster::LocalCluster;
use haven_client::http::Http;

#[derive(Debug, Clone, clap::Args)]
pub struct CheckpointArgs {
    /// App state sizes to measure, in MB, comma-separated [default: 100,1000; quick: 5].
    #[arg(long, value_delimiter = ',')]
    pub sizes_mb: Option<Vec<u64>>,
    /// Open-loop write rate of the two latency runs, req/s [default: 2000; quick: 500].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured seconds of each latency run [default: 20; quick: 5].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Entries written on top of a checkpoint before the restore [default: 20000; quick: 2000].
    #[arg(long)]
    pub restore_entries: Option<u64>,
    /// Seconds between forced checkpoints (on every node) in the second latency run.
    #[arg(long, default_value_t = 2.0)]
    pub checkpoint_every: f64,
    /// Force the checkpoints of every node at the same moment. Without it the nodes take
    /// turns, a fraction of the period apart, as their own checkpoint policy does.
    #[arg(long)]
    pub at_once: bool,
    /// Run the nodes from another `haven` binary (a build of the baseline), measured by
    /// this build's harness: an A/B of builds, one run each, alternated.
    #[arg(long)]
    pub nodes_from: Option<PathBuf>,
    /// Small and short: a smoke test of the whole procedure in well under a minute.
    #[arg(long)]
    pub quick: bool,
    /// Where results.md and results.json go.
    #[arg(long, default_value = "out/bench-checkpoint")]
    pub out: PathBuf,
    /// Print the JSON report instead of the Markdown tables.
    #[arg(long)]
    pub json: bool,
}

/// The flags resolved: an explicit flag, else the quick or the full default.
#[derive(Debug, Clone)]
struct Plan {
    sizes_mb: Vec<u64>,
    rate: f64,
    duration: Duration,
    warmup: Duration,
    restore_entries: u64,
    checkpoint_every: Duration,
    at_once: bool,
}

impl Plan {
    fn from_args(args: &CheckpointArgs) -> anyhow::Result<Self> {
        let quick = args.quick;
        let pick = |quick_value: f64, full: f64| if quick { quick_value } else { full };
        let sizes_mb = args
            .sizes_mb
            .clone()
            .unwrap_or_else(|| if quick { vec![5] } else { vec![100, 1000] });
        let duration = args.duration.unwrap_or(pick(5.0, 20.0));
        let plan = Self {
            rate: args.rate.unwrap_or(pick(500.0, 2000.0)),
            warmup: Duration::from_secs_f64(pick(0.5, 2.0)),
            restore_entries: args
                .restore_entries
                .unwrap_or(if quick { 2_000 } else { 20_000 }),
            sizes_mb,
            duration: seconds("--duration", duration)?,
            checkpoint_every: seconds("--checkpoint-every", args.checkpoint_every)?,
            at_once: args.at_once,
        };
        if plan.sizes_mb.is_empty() || plan.sizes_mb.contains(&0) {
            bail!("--sizes-mb needs sizes of at least 1 MB");
        }
        if !plan.rate.is_finite() || plan.rate <= 0.0 || plan.restore_entries == 0 {
            bail!("--rate and --restore-entries must be above 0");
        }
        Ok(plan)
    }
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} must be a positive number of seconds, got {value}"))
}

/// Bytes one pre-populated line takes in the app's state: the line, its newline and its
/// 8-byte `Haven-Index` sidecar entry. A size in MB becomes a line count through it.
const STATE_BYTES_PER_LINE: u64 = haven_logapp::PREPOPULATE_LINE_LEN as u64 + 1 + 8;
/// Checkpoints only when asked: the entry trigger far out of reach, no timer. Two are
/// kept, so the log is compacted behind the older and a fresh node needs a checkpoint.
const CHECKPOINT_CONFIG: &str = "[checkpoints]\nmode = \"managed\"\n\
    every_entries = 1000000000000\nevery_seconds = 0\nkeep = 1\n";
/// Entries written before the first checkpoint, so it covers some log.
const FIRST_ENTRIES: u64 = 100;
/// Closed-loop writers that write the entries a restore replays.
const WRITERS: u64 = 32;
/// Connections of the open-loop latency runs, as in the reference run.
const LOAD_CONNECTIONS: usize = 64;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Start, catch-up and convergence of a 1 GB state take seconds to a minute; these
/// limits only stop a run that hangs.
const STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// The node itself waits up to 600 s for a checkpoint before answering.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(660);
const POLL: Duration = Duration::from_millis(20);
/// A forced checkpoint still unanswered after this long counts as failed, and the next
/// one is asked for.
const FORCED_TIMEOUT: Duration = Duration::from_secs(60);

const MB: f64 = 1e6;

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct CheckpointBenchReport {
    /// The command line, as typed.
    pub command: String,
    pub quick: bool,
    pub cores: usize,
    pub elapsed_s: f64,
    pub rate: f64,
    pub duration_s: f64,
    pub restore_entries: u64,
    pub checkpoint_every_s: f64,
    /// Every node's checkpoint forced at once, instead of in turn.
    pub at_once: bool,
    pub sizes: Vec<SizeResult>,
}

/// The four measurements for one app state size.
#[derive(Debug, Serialize)]
pub struct SizeResult {
    pub size_mb: u64,
    pub lines: u64,
    /// From launch until every node answered with a leader; each replica pre-populates
    /// its lines meanwhile, all three at once.
    pub cluster_start_s: f64,
    pub checkpoint: CheckpointTiming,
    pub catch_up: CatchUp,
    pub latency: LatencyComparison,
    pub restore: RestoreTiming,
}

#[derive(Debug, Serialize)]
pub struct CheckpointTiming {
    pub index: u64,
    /// From `POST /checkpoints` until the answer (the file is on disk then).
    pub wall_s: f64,
    /// Deliveries held back meanwhile (the raw copy of the app's directory).
    pub pause_ms: f64,
    pub file_bytes: u64,
    /// Uncompressed payload (a tar of the app's directory).
    pub app_bytes: u64,
    /// App bytes per file byte.
    pub compression_ratio: f64,
    /// App MB per second of wall time.
    pub mb_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct CatchUp {
    /// From `add_node` until the fresh node answered on its admin port, which it opens
    /// once its own replica answers (the replica pre-populates its lines first).
    pub fresh_node_start_s: f64,
    /// From `POST /members/learner` until the learner applied what the leader applied.
    pub seconds: f64,
    /// Checkpoint bytes the learner received (0: it caught up through the log alone).
    pub bytes: u64,
    pub mb_per_s: f64,
    /// App state MB per second of catch-up.
    pub app_mb_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct LatencyComparison {
    pub baseline: LatencyRun,
    pub with_checkpoints: LatencyRun,
    /// Checkpoints the nodes wrote during the second run (all nodes).
    pub checkpoints_written: u64,
    /// `POST /checkpoints` calls that failed during the second run.
    pub checkpoint_failures: u64,
    /// Delivery pauses of all nodes during the second run.
    pub pause_ms_total: f64,
    /// Requests a peer answered because the node's replica was paused (all nodes).
    pub stood_in: u64,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    pub max_ratio: f64,
}

/// One open-loop run, writes only.
#[derive(Debug, Serialize)]
pub struct LatencyRun {
    pub throughput: f64,
    pub requests_ok: u64,
    pub errors: u64,
    /// Failed requests by kind (`unsent`: due but never sent because every connection
    /// was still waiting for an answer; `timeout`: no answer within 5 s).
    pub errors_by_kind: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct RestoreTiming {
    pub target_index: u64,
    pub checkpoint_index: Option<u64>,
    pub entries_replayed: u64,
    /// Wall time of the whole `haven restore` process.
    pub total_s: f64,
    pub replay_s: f64,
    pub entries_per_s: f64,
    /// `total_s - replay_s`: verifying and unpacking the checkpoint, starting the fresh
    /// app (which pre-populates its lines first: same command as the node's), reading
    /// the log's state.
    pub unpack_s: f64,
}

/// The fields of `haven restore --json` used here.
#[derive(Debug, Deserialize)]
struct RestoreJson {
    target_index: u64,
    checkpoint_index: Option<u64>,
    entries_replayed: u64,
    replay_seconds: f64,
}

pub async fn run(args: &CheckpointArgs, exe: &Path) -> anyhow::Result<CheckpointBenchReport> {
    let plan = Plan::from_args(args)?;
    let started = Instant::now();
    let progress = super::progress_unless(args.json);
    let mut sizes = Vec::with_capacity(plan.sizes_mb.len());
    let exe = args.nodes_from.as_deref().unwrap_or(exe);
    for size_mb in &plan.sizes_mb {
        let bench = SizeBench::start(*size_mb, exe, &progress).await?;
        sizes.push(bench.measure(&plan, exe).await?);
    }
    progress.finish();
    let report = CheckpointBenchReport {
        command: command_line(),
        quick: args.quick,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        elapsed_s: started.elapsed().as_secs_f64(),
        rate: plan.rate,
        duration_s: plan.duration.as_secs_f64(),
        restore_entries: plan.restore_entries,
        checkpoint_every_s: plan.checkpoint_every.as_secs_f64(),
        at_once: plan.at_once,
        sizes,
    };
    write_results(&args.out, &report)?;
    Ok(report)
}

/// `haven bench checkpoint ...` as typed, with the executable shortened to its name.
fn command_line() -> String {
    let mut args = std::env::args();
    let exe = args.next().map(PathBuf::from);
    let name = exe
        .as_ref()
        .and_then(|p| p.file_name())
        .map_or("haven".into(), |n| n.to_string_lossy().into_owned());
    std::iter::once(name)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One size's cluster and the tools to measure it.
struct SizeBench<'a> {
    size_mb: u64,
    lines: u64,
    cluster_start_s: f64,
    cluster: LocalCluster,
    admin: Admin,
    progress: &'a Progress,
    /// Removed (with every node's files) when the measurement ends.
    work: tempfile::TempDir,
}

impl<'a> SizeBench<'a> {
    async fn start(size_mb: u64, exe: &Path, progress: &'a Progress) -> anyhow::Result<Self> {
        let lines = size_mb * 1_000_000 / STATE_BYTES_PER_LINE;
        progress.set_stage(format!(
            "{size_mb} MB · starting 3 nodes ({lines} lines each): "
        ));
        let work = tempfile::Builder::new()
            .prefix("haven-bench-checkpoint-")
            .tempdir()
            .context("creating a temporary directory")?;
        let spec = ClusterSpec {
            site: String::new(),
            extra_config: CHECKPOINT_CONFIG.to_string(),
            managed: true,
            services: Vec::new(),
            ..log_app_cluster(3, exe, work.path(), lines)
        };
        let started = Instant::now();
        let cluster = LocalCluster::start(spec)?;
        cluster.wait_for_leader(STEP_TIMEOUT).await?;
        cluster.wait_all_ready(STEP_TIMEOUT).await?;
        Ok(Self {
            size_mb,
            lines,
            cluster_start_s: started.elapsed().as_secs_f64(),
            cluster,
            admin: Admin::new(),
            progress,
            work,
        })
    }

    fn stage(&self, what: &str) {
        self.progress
            .set_stage(format!("{} MB · {what}: ", self.size_mb));
    }

    /// The four measurements in the order they need: the restore stops the cluster.
    async fn measure(mut self, plan: &Plan, exe: &Path) -> anyhow::Result<SizeResult> {
        let leader = self.cluster.wait_for_leader(STEP_TIMEOUT).await?;
        self.write_entries(leader, FIRST_ENTRIES).await?;
        self.cluster.wait_converged(STEP_TIMEOUT).await?;
        let checkpoint = self.time_checkpoint(leader).await?;
        let catch_up = self.catch_up(leader, checkpoint.index).await?;
        let latency = self.compare_latency(plan).await?;
        let restore = self.time_restore(plan, exe).await?;
        Ok(SizeResult {
            size_mb: self.size_mb,
            lines: self.lines,
            cluster_start_s: self.cluster_start_s,
            checkpoint,
            catch_up,
            latency,
            restore,
        })
    }

    /// Indexes of the nodes that run now (the learner is gone after the catch-up).
    fn running(&self) -> Vec<usize> {
        (0..self.cluster.slots.len())
            .filter(|i| self.cluster.slots[*i].node_running())
            .collect()
    }

    fn admin_urls(&self) -> Vec<String> {
        let slots = &self.cluster.slots;
        self.running()
            .into_iter()
            .map(|i| slots[i].admin_url())
            .collect()
    }

    /// One `POST /checkpoints` on node `i`, with its pause and its file.
    async fn time_checkpoint(&self, i: usize) -> anyhow::Result<CheckpointTiming> {
        self.stage("checkpoint on the leader");
        let url = [self.cluster.slots[i].admin_url()];
        let before = self.admin.counters(&url).await?;
        let started = Instant::now();
        let index = self.admin.checkpoint(&url[0]).await?;
        let wall_s = started.elapsed().as_secs_f64();
        let after = self.admin.counters(&url).await?;
        let (file_bytes, app_bytes) = checkpoint_file(&self.cluster.data_dir(i), index)?;
        Ok(CheckpointTiming {
            index,
            wall_s,
            pause_ms: after.pause_us.saturating_sub(before.pause_us) as f64 / 1e3,
            file_bytes,
            app_bytes,
            compression_ratio: app_bytes as f64 / file_bytes.max(1) as f64,
            mb_per_s: app_bytes as f64 / MB / wall_s.max(1e-9),
        })
    }

    /// A fresh node joins as a learner once the leader's log is compacted behind
    /// `checkpoint`, so it has to come up through the checkpoint; it is removed after.
    async fn catch_up(&mut self, leader: usize, checkpoint: u64) -> anyhow::Result<CatchUp> {
        self.stage("waiting for compaction");
        self.wait_compacted(leader, checkpoint).await?;
        self.stage("starting a fresh node");
        let started = Instant::now();
        let new = self.cluster.add_node()?;
        let c = &self.cluster;
        // A node serves its admin port only once its managed replica answers.
        poll("the fresh node's start", move || async move {
            c.status(new).await.ok().map(|_| ())
        })
        .await?;
        let fresh_node_start_s = started.elapsed().as_secs_f64();
        let slot = &self.cluster.slots[new];
        let learner = AddLearner {
            id: slot.id,
            raft_addr: slot.raft_addr.to_string(),
            client_addr: slot.client_addr.to_string(),
        };
        let leader_url = self.cluster.slots[leader].admin_url();
        let began = Instant::now();
        self.admin
            .membership(&leader_url, "learner", &learner)
            .await?;
        self.wait_caught_up(leader, new).await?;
        let seconds = began.elapsed().as_secs_f64();
        let bytes = self.cluster.status(new).await?.checkpoint_receive.total;
        let remove = ChangeNode {
            id: learner.id,
            force: false,
        };
        self.admin
            .membership(&leader_url, "remove", &remove)
            .await?;
        self.cluster.kill_node(new);
        let app_bytes = (self.lines * STATE_BYTES_PER_LINE) as f64;
        Ok(CatchUp {
            fresh_node_start_s,
            seconds,
            bytes,
            mb_per_s: bytes as f64 / MB / seconds.max(1e-9),
            app_mb_per_s: app_bytes / MB / seconds.max(1e-9),
        })
    }

    async fn wait_compacted(&self, leader: usize, index: u64) -> anyhow::Result<()> {
        let c = &self.cluster;
        poll("compaction behind the checkpoint", move || async move {
            let purged = c.status(leader).await.ok()?.purged_index;
            purged.filter(|p| *p >= index).map(|_| ())
        })
        .await
    }

    /// Until `new` applied everything `leader` applied; shows the transfer meanwhile.
    async fn wait_caught_up(&self, leader: usize, new: usize) -> anyhow::Result<()> {
        let (c, size_mb, progress) = (&self.cluster, self.size_mb, self.progress);
        poll("the learner's catch-up", move || async move {
            let target = c.status(leader).await.ok()?.applied_index?;
            let status = c.status(new).await.ok()?;
            let received = status.checkpoint_receive;
            progress.set_stage(format!(
                "{size_mb} MB · catch-up: {:.1}/{:.1} MB received, applied {:?} of {target}: ",
                received.bytes as f64 / MB,
                received.total as f64 / MB,
                status.applied_index
            ));
            status.applied_index.filter(|a| *a >= target).map(|_| ())
        })
        .await
    }

    /// The same open-loop load twice: without checkpoints, then with checkpoints forced
    /// on every node, so both share this run's machine and state.
    async fn compare_latency(&self, plan: &Plan) -> anyhow::Result<LatencyComparison> {
        let spec = self.load_spec(plan)?;
        let workload = WorkloadChoice::LogApp {
            body_size: BODY_BYTES,
            prepopulated_lines: self.lines,
        }
        .build();
        self.cluster.wait_converged(STEP_TIMEOUT).await?;
        self.stage(&format!("{:.0} writes/s, no checkpoints", plan.rate));
        let baseline = load::run(&spec, Arc::clone(&workload), self.progress).await?;
        self.cluster.wait_converged(STEP_TIMEOUT).await?;
        let urls = self.admin_urls();
        let before = self.admin.counters(&urls).await?;
        self.stage(&format!(
            "{:.0} writes/s, checkpoints every {:?}",
            plan.rate, plan.checkpoint_every
        ));
        let forcer = Forcer::start(&self.admin, &urls, plan.checkpoint_every, plan.at_once);
        let loaded = load::run(&spec, workload, self.progress).await;
        let checkpoint_failures = forcer.stop().await;
        let loaded = loaded?;
        let after = self.admin.counters(&urls).await?;
        Ok(comparison(
            &baseline,
            &loaded,
            after.minus(&before),
            checkpoint_failures,
        ))
    }

    fn load_spec(&self, plan: &Plan) -> anyhow::Result<LoadSpec> {
        let targets = self
            .running()
            .into_iter()
            .map(|i| Target::parse(&self.cluster.slots[i].client_url()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LoadSpec {
            targets,
            mode: Mode::Open { rate: plan.rate },
            connections: LOAD_CONNECTIONS,
            duration: plan.duration,
            warmup: plan.warmup,
            read_ratio: 0.0,
            request_timeout: REQUEST_TIMEOUT,
            seed: 1,
        })
    }

    /// A checkpoint on the leader, entries on top of it, the cluster stopped, then
    /// `haven restore` of the leader's data directory to the last entry.
    async fn time_restore(&mut self, plan: &Plan, exe: &Path) -> anyhow::Result<RestoreTiming> {
        let leader = self.cluster.wait_for_leader(STEP_TIMEOUT).await?;
        self.stage("checkpoint before the restore");
        self.admin
            .checkpoint(&self.cluster.slots[leader].admin_url())
            .await?;
        self.stage(&format!("writing {} entries", plan.restore_entries));
        self.write_entries(leader, plan.restore_entries).await?;
        let last = self.cluster.wait_converged(STEP_TIMEOUT).await?;
        // The log's committed mark and the apply state are saved in the background.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in self.running() {
            self.cluster.kill_node(i);
        }
        self.stage(&format!("haven restore --to-index {last}"));
        let out = self.work.path().join("restored");
        let started = Instant::now();
        let restored = run_restore(exe, &self.cluster.data_dir(leader), last, &out).await?;
        let total_s = started.elapsed().as_secs_f64();
        Ok(RestoreTiming {
            target_index: restored.target_index,
            checkpoint_index: restored.checkpoint_index,
            entries_replayed: restored.entries_replayed,
            total_s,
            replay_s: restored.replay_seconds,
            entries_per_s: restored.entries_replayed as f64 / restored.replay_seconds.max(1e-9),
            unpack_s: total_s - restored.replay_seconds,
        })
    }

    /// `count` writes through node `i`, from [`WRITERS`] closed-loop writers: the fastest
    /// way to put entries in the log. Any failure ends the run.
    async fn write_entries(&self, i: usize, count: u64) -> anyhow::Result<()> {
        let url = format!("{}/append", self.cluster.slots[i].client_url());
        let http = Http::new(REQUEST_TIMEOUT);
        let body = Bytes::from(vec![b'c'; BODY_BYTES]);
        let mut writers = JoinSet::new();
        for w in 0..WRITERS {
            let share = count / WRITERS + u64::from(w < count % WRITERS);
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            writers.spawn(async move {
                for _ in 0..share {
                    let reply = http.post(&url, body.clone()).await?;
                    if reply.status != 201 {
                        bail!("POST {url}: {} {}", reply.status, reply.text());
                    }
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = writers.join_next().await {
            done??;
        }
        Ok(())
    }
}

/// Polls `probe` every [`POLL`] until it yields, for at most [`STEP_TIMEOUT`].
async fn poll<T, F, Fut>(what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what}: not done within {STEP_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The file size and app bytes of the checkpoint at `index` in a node's data directory.
fn checkpoint_file(data_dir: &Path, index: u64) -> anyhow::Result<(u64, u64)> {
    let listed = haven_service::restore::list(data_dir)?;
    listed
        .iter()
        .filter_map(|l| l.info.as_ref().ok())
        .find(|info| info.index == index)
        .map(|info| (info.size, info.app_bytes))
        .with_context(|| format!("no checkpoint {index} in {}", data_dir.display()))
}

async fn run_restore(
    exe: &Path,
    data_dir: &Path,
    index: u64,
    out: &Path,
) -> anyhow::Result<RestoreJson> {
    let output = tokio::process::Command::new(exe)
        .arg("restore")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--to-index", &index.to_string(), "--out"])
        .arg(out)
        .arg("--json")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .with_context(|| format!("starting {} restore", exe.display()))?;
    if !output.status.success() {
        bail!(
            "haven restore failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing the output of haven restore --json")
}

fn comparison(
    baseline: &LoadReport,
    loaded: &LoadReport,
    forced: Counters,
    checkpoint_failures: u64,
) -> LatencyComparison {
    let (baseline, with_checkpoints) = (latency_run(baseline), latency_run(loaded));
    let ratio = |with: f64, without: f64| with / without.max(1e-9);
    LatencyComparison {
        p50_ratio: ratio(with_checkpoints.p50_ms, baseline.p50_ms),
        p99_ratio: ratio(with_checkpoints.p99_ms, baseline.p99_ms),
        max_ratio: ratio(with_checkpoints.max_ms, baseline.max_ms),
        baseline,
        with_checkpoints,
        checkpoints_written: forced.written,
        checkpoint_failures,
        pause_ms_total: forced.pause_us as f64 / 1e3,
        stood_in: forced.stood_in,
    }
}

fn latency_run(report: &LoadReport) -> LatencyRun {
    let latency = report.latency.all;
    LatencyRun {
        throughput: report.throughput,
        requests_ok: report.requests_ok,
        errors: report.errors_total(),
        errors_by_kind: report.errors.clone(),
        p50_ms: latency.map_or(0.0, |l| l.p50_ms),
        p99_ms: latency.map_or(0.0, |l| l.p99_ms),
        max_ms: latency.map_or(0.0, |l| l.max_ms),
    }
}

/// Checkpoint counters of some nodes, summed.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    written: u64,
    pause_us: u64,
    stood_in: u64,
}

impl Counters {
    fn minus(self, before: &Counters) -> Counters {
        Counters {
            written: self.written.saturating_sub(before.written),
            pause_us: self.pause_us.saturating_sub(before.pause_us),
            stood_in: self.stood_in.saturating_sub(before.stood_in),
        }
    }
}

/// The admin API calls the bench makes, with a timeout long enough for a checkpoint of
/// a large state.
#[derive(Clone)]
struct Admin;

impl Admin {
    fn new() -> Self {
        Self
    }

    fn client(admin_url: &str) -> AdminClient {
        AdminClient::new(admin_url, ADMIN_TIMEOUT)
    }

    /// `POST /checkpoints`: returns the index once the checkpoint is on disk.
    async fn checkpoint(&self, admin_url: &str) -> anyhow::Result<u64> {
        Ok(Self::client(admin_url).checkpoint().await?)
    }

    /// Until openraft on the node recorded checkpoint `index` as built (its status shows
    /// it). The node answers `POST /checkpoints` once the file is on disk, a moment before
    /// that; openraft drops a trigger arriving in between, and the POST carrying it waits
    /// the node's full 600 s (seen with back-to-back checkpoints of 1 GB under load).
    async fn wait_recorded(&self, admin_url: &str, index: u64) -> anyhow::Result<()> {
        let client = Self::client(admin_url);
        poll("openraft recording the checkpoint", || async {
            let status = client.status().await.ok()?;
            status.snapshot_index.filter(|s| *s >= index).map(|_| ())
        })
        .await
    }

    /// A membership change on the node at `admin_url` (the leader).
    async fn membership<T: Serialize>(
        &self,
        admin_url: &str,
        change: &str,
        body: &T,
    ) -> anyhow::Result<()> {
        Self::client(admin_url).membership(change, body).await?;
        Ok(())
    }

    async fn counters(&self, admin_urls: &[String]) -> anyhow::Result<Counters> {
        let mut sum = Counters::default();
        for url in admin_urls {
            let text = Self::client(url).metrics().await?;
            sum.written += metric(&text, "haven_checkpoints_written_total");
            sum.stood_in += metric(&text, "haven_stood_in_total");
            let pause_s = metrics_text::sum(&text, "haven_checkpoint_pause_seconds_total", &[]);
            sum.pause_us += (pause_s.unwrap_or(0.0) * 1e6).round() as u64;
        }
        Ok(sum)
    }
}

/// A counter's value in Prometheus text, over every service (0 when absent).
fn metric(text: &str, name: &str) -> u64 {
    metrics_text::sum(text, name, &[]).map_or(0, |v| v as u64)
}

/// One task per node asking for a checkpoint every `every` (back to back when one takes
/// longer), the way an aggressive policy would: node `i` of `n` starts `i / n` of the
/// period late, as the nodes' own policy staggers them, unless `at_once`.
struct Forcer {
    stop: watch::Sender<bool>,
    tasks: JoinSet<u64>,
}

impl Forcer {
    fn start(admin: &Admin, admin_urls: &[String], every: Duration, at_once: bool) -> Self {
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for (i, url) in admin_urls.iter().enumerate() {
            let (admin, url, mut stopped) = (admin.clone(), url.clone(), stopped.clone());
            let late = match at_once {
                true => Duration::ZERO,
                false => every.mul_f64(i as f64 / admin_urls.len() as f64),
            };
            tasks.spawn(async move {
                let first = tokio::time::Instant::now() + late;
                let mut ticks = tokio::time::interval_at(first, every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut failures = 0;
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = stopped.wait_for(|stop| *stop) => return failures,
                    }
                    if !force_one(&admin, &url).await {
                        failures += 1;
                    }
                }
            });
        }
        Self { stop, tasks }
    }

    /// Stops asking (a checkpoint under way is waited for); returns the failures.
    async fn stop(mut self) -> u64 {
        self.stop.send_replace(true);
        let mut failures = 0;
        while let Some(done) = self.tasks.join_next().await {
            failures += done.unwrap_or(1);
        }
        failures
    }
}

/// One forced checkpoint, until openraft recorded it; false when it failed or took
/// longer than [`FORCED_TIMEOUT`].
async fn force_one(admin: &Admin, url: &str) -> bool {
    let outcome = match tokio::time::timeout(FORCED_TIMEOUT, admin.checkpoint(url)).await {
        Ok(Ok(index)) => admin.wait_recorded(url, index).await,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!("no answer within {FORCED_TIMEOUT:?}")),
    };
    if let Err(e) = &outcome {
        tracing::warn!(url, error = %e, "forced checkpoint failed");
    }
    outcome.is_ok()
}

fn write_results(out: &Path, report: &CheckpointBenchReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::to_vec_pretty(report)?;
    for (name, bytes) in [
        ("results.json", json),
        ("results.md", render(report).into_bytes()),
    ] {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The Markdown report: the command, then one table per measurement, a row per size.
pub fn render(report: &CheckpointBenchReport) -> String {
    let mut text = format!(
        "# Checkpoint benchmark ({}, {} cores, {:.0} s)\n\nCommand: `{}`\n\n\
         3-node cluster, managed log app, checkpoints in managed mode; \
         sizes are the app's state (log file + index sidecar).\n",
        if report.quick { "quick" } else { "full" },
        report.cores,
        report.elapsed_s,
        report.command
    );
    let restore = format!(
        "Restore (`haven restore --to-index <last>`, {} entries past a checkpoint)",
        report.restore_entries
    );
    for (title, columns) in [
        (
            "Checkpoint (`POST /checkpoints` on the leader)",
            CHECKPOINT_COLUMNS,
        ),
        ("Catch-up of a fresh 4th node (learner)", CATCH_UP_COLUMNS),
        (restore.as_str(), RESTORE_COLUMNS),
    ] {
        push_table(&mut text, title, columns, &report.sizes);
    }
    render_latency(&mut text, report);
    text
}

/// One column of a table with a row per size: its header and how a size's cell reads.
type Column = (&'static str, fn(&SizeResult) -> String);

const CHECKPOINT_COLUMNS: &[Column] = &[
    ("app bytes (MB)", |s| mb(s.checkpoint.app_bytes)),
    ("file (MB)", |s| mb(s.checkpoint.file_bytes)),
    ("ratio", |s| {
        format!("{:.0} ×", s.checkpoint.compression_ratio)
    }),
    ("wall (s)", |s| format!("{:.3}", s.checkpoint.wall_s)),
    ("pause (ms)", |s| format!("{:.1}", s.checkpoint.pause_ms)),
    ("wall − pause (s)", |s| {
        format!("{:.3}", s.checkpoint.wall_s - s.checkpoint.pause_ms / 1e3)
    }),
    ("MB/s", |s| format!("{:.0}", s.checkpoint.mb_per_s)),
];

const CATCH_UP_COLUMNS: &[Column] = &[
    ("fresh node start (s)", |s| {
        format!("{:.2}", s.catch_up.fresh_node_start_s)
    }),
    ("catch-up (s)", |s| format!("{:.2}", s.catch_up.seconds)),
    ("received (MB)", |s| mb(s.catch_up.bytes)),
    ("received MB/s", |s| format!("{:.1}", s.catch_up.mb_per_s)),
    ("state MB/s", |s| format!("{:.0}", s.catch_up.app_mb_per_s)),
];

const RESTORE_COLUMNS: &[Column] = &[
    ("entries replayed", |s| {
        s.restore.entries_replayed.to_string()
    }),
    ("total (s)", |s| format!("{:.2}", s.restore.total_s)),
    ("replay (s)", |s| format!("{:.2}", s.restore.replay_s)),
    ("entries/s", |s| format!("{:.0}", s.restore.entries_per_s)),
    ("total − replay (s)", |s| {
        format!("{:.2}", s.restore.unpack_s)
    }),
];

/// Bytes as MB with two decimals: checkpoint files of small states are well under 1 MB.
fn mb(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / MB)
}

fn push_table(text: &mut String, title: &str, columns: &[Column], sizes: &[SizeResult]) {
    let headers: Vec<&str> = columns.iter().map(|(header, _)| *header).collect();
    let _ = write!(
        text,
        "\n## {title}\n\n| state | {} |\n",
        headers.join(" | ")
    );
    let _ = writeln!(text, "|---:|{}", "---:|".repeat(columns.len()));
    for size in sizes {
        let cells: Vec<String> = columns.iter().map(|(_, cell)| cell(size)).collect();
        let _ = writeln!(text, "| {} MB | {} |", size.size_mb, cells.join(" | "));
    }
}

fn render_latency(text: &mut String, report: &CheckpointBenchReport) {
    let _ = write!(
        text,
        "\n## Write latency, open loop at {:.0}/s for {:.0} s over the 3 nodes\n\n\
         | state | run | throughput (req/s) | p50 (ms) | p99 (ms) | max (ms) | errors \
         | checkpoints written | pauses, all nodes (ms) | answered by a peer |\n\
         |---:|---|---:|---:|---:|---:|---|---:|---:|---:|\n",
        report.rate, report.duration_s
    );
    let turns = if report.at_once {
        "all at once"
    } else {
        "in turn"
    };
    let forced = format!(
        "checkpoints every {:.0} s, {turns}",
        report.checkpoint_every_s
    );
    for s in &report.sizes {
        let l = &s.latency;
        let _ = writeln!(
            text,
            "| {} MB | no checkpoints | {} | 0 | 0 | 0 |",
            s.size_mb,
            latency_cells(&l.baseline)
        );
        let _ = writeln!(
            text,
            "| {} MB | {forced} | {} | {}{} | {:.0} | {} |",
            s.size_mb,
            latency_cells(&l.with_checkpoints),
            l.checkpoints_written,
            match l.checkpoint_failures {
                0 => String::new(),
                n => format!(" ({n} requests failed)"),
            },
            l.pause_ms_total,
            l.stood_in
        );
        let _ = writeln!(
            text,
            "| {} MB | ratio | | {:.2} × | {:.2} × | {:.2} × | | | | |",
            s.size_mb, l.p50_ratio, l.p99_ratio, l.max_ratio
        );
    }
}

/// Throughput, p50, p99, max and errors (with their kinds) of one latency run.
fn latency_cells(run: &LatencyRun) -> String {
    let kinds: Vec<String> = run
        .errors_by_kind
        .iter()
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect();
    let errors = if kinds.is_empty() {
        "0".to_string()
    } else {
        format!("{} ({})", run.errors, kinds.join(", "))
    };
    format!(
        "{:.0} | {:.2} | {:.2} | {:.1} | {errors}",
        run.throughput, run.p50_ms, run.p99_ms, run.max_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_defaults_give_way_to_explicit_flags() {
        let args = CheckpointArgs {
            sizes_mb: None,
            rate: Some(100.0),
            duration: None,
            restore_entries: None,
            checkpoint_every: 2.0,
            at_once: false,
            nodes_from: None,
            quick: true,
            out: PathBuf::from("x"),
            json: false,
        };
        let plan = Plan::from_args(&args).unwrap();
        assert_eq!(plan.sizes_mb, vec![5]);
        assert_eq!(plan.rate, 100.0);
        assert_eq!(plan.duration, Duration::from_secs(5));
        assert_eq!(plan.restore_entries, 2_000);
        let zero = CheckpointArgs {
            sizes_mb: Some(vec![0]),
            ..args
        };
        assert!(Plan::from_args(&zero).is_err());
    }
}
