//! `haven bench restore`: how fast a restore replays, and what bounds it.
//!
//! 1. A 1-node managed log-app cluster archiving to a real S3 server (SeaweedFS, started
//!    here) takes `--entries` writes of 128 bytes on top of its baseline checkpoint; then
//!    the node is killed.
//! 2. Each round, for each binary (this one, and `--compare`'s, alternating): `haven
//!    restore --latest` of the node's data directory and `haven archive restore --latest`
//!    of the archive, each replaying every entry into a fresh app: entries/s and MB of
//!    state/s over the replay.
//! 3. The ceiling the app sets: the same requests, encoded as a replay sends them,
//!    written back to back on one connection to a fresh log app while the answers are
//!    counted, with nothing of Haven in between.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use bytes::BytesMut;
use haven_bench::load;
use haven_bench::load::Mode;
use haven_bench::progress::Progress;
use haven_consensus::types::TypeConfig;
use haven_log::LogOptions;
use haven_log::LogStore;
use haven_service::app::Stamp;
use haven_service::app::http1;
use openraft::EntryPayload;
use openraft::storage::RaftLogReader;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

use super::archive::cluster_with;
use super::archive::dir_bytes;
use super::archive::spec;
use super::archive::store_and_key;
use super::archive::wait_caught_up;
use super::archive::workload;
use super::systems;
use super::systems::SystemKind;

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreBenchArgs {
    /// Entries written, then replayed by every restore.
    #[arg(long, default_value_t = 200_000)]
    pub entries: u64,
    /// Rounds; each restores once per binary from the log and once from the archive.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Another `haven` binary (a build of the baseline) whose restores alternate with
    /// this one's, from the same log and archive.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// 5,000 entries, one round: a smoke run, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Keep the cluster's files, log and archive (to rerun a restore by hand, under a
    /// profiler say); their directory is in the report.
    #[arg(long)]
    pub keep: bool,
}

/// A checkpoint only at the start (the baseline before the first request), so every
/// restore replays every entry written.
const CHECKPOINTS: &str =
    "[checkpoints]\nmode = \"managed\"\nevery_entries = 1000000000\nevery_seconds = 0\nkeep = 2\n";
const URL: &str = "s3://haven/bench-restore";
const WRITE_PHASE: Duration = Duration::from_secs(5);
/// How long the app alone may take to answer anything before the run fails.
const APP_ALONE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize)]
pub struct RestoreBenchReport {
    pub entries: u64,
    /// Where the files are, with `--keep`.
    pub kept: Option<PathBuf>,
    pub app_alone_entries_per_s: f64,
    pub runs: Vec<RestoreRun>,
}

#[derive(Debug, Serialize)]
pub struct RestoreRun {
    pub binary: String,
    pub source: &'static str,
    pub round: u32,
    pub entries: u64,
    pub seconds: f64,
    pub entries_per_s: f64,
    pub state_mb_per_s: f64,
}

pub async fn run(args: &RestoreBenchArgs, exe: &Path) -> anyhow::Result<RestoreBenchReport> {
    let (entries, rounds) = match args.quick {
        true => (5_000, 1),
        false => (args.entries, args.rounds),
    };
    if entries == 0 || rounds == 0 {
        bail!("--entries and --rounds must be positive");
    }
    let (server, work, key) = store_and_key("haven-bench-restore-").await?;
    let archive = format!(
        "{CHECKPOINTS}[archive]\nurl = \"{URL}\"\nendpoint = \"{}\"\nkey_file = \"{}\"\n",
        server.endpoint,
        key.display()
    );
    let written = written(exe, &work.path().join("cluster"), &archive, entries).await?;
    let to_index = ["--to-index".to_string(), written.last.to_string()];
    let mut binaries = vec![("this".to_string(), exe.to_path_buf())];
    if let Some(other) = &args.compare {
        binaries.insert(0, ("compare".to_string(), other.clone()));
    }
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for (label, binary) in &binaries {
            let out = work.path().join(format!("out-{round}-{label}"));
            let mut local = ["restore", "--data-dir"].map(String::from).to_vec();
            local.push(written.data_dir.display().to_string());
            local.extend(to_index.clone());
            runs.push(timed(binary, label, "log", round, &local, &out.join("log")).await?);
            let mut from_archive = ["archive", "restore", "--from", URL, "--endpoint"]
                .map(String::from)
                .to_vec();
            from_archive.extend([
                server.endpoint.clone(),
                "--key-file".into(),
                key.display().to_string(),
                "--config".into(),
                written.config.display().to_string(),
            ]);
            from_archive.extend(to_index.clone());
            runs.push(
                timed(
                    binary,
                    label,
                    "archive",
                    round,
                    &from_archive,
                    &out.join("archive"),
                )
                .await?,
            );
            let _ = std::fs::remove_dir_all(&out);
        }
    }
    let app_alone_entries_per_s = app_alone(exe, &written.data_dir, work.path()).await?;
    let kept = args.keep.then(|| work.keep());
    Ok(RestoreBenchReport {
        entries,
        kept,
        app_alone_entries_per_s,
        runs,
    })
}

/// What the restores replay: a killed node's data directory, its config, its last entry.
struct Written {
    data_dir: PathBuf,
    config: PathBuf,
    last: u64,
}

/// A 1-node cluster in `dir` that took `entries` writes, all archived, then was killed.
async fn written(exe: &Path, dir: &Path, config: &str, entries: u64) -> anyhow::Result<Written> {
    let (mut cluster, leader) = cluster_with(exe, dir, config, 1).await?;
    let start = cluster.status(leader).await?.applied_index.unwrap_or(0);
    while cluster.status(leader).await?.applied_index.unwrap_or(0) < start + entries {
        let load = spec(&cluster, leader, Mode::Closed, WRITE_PHASE)?;
        load::run(&load, workload(), &Progress::hidden()).await?;
    }
    wait_caught_up(&cluster, leader).await?;
    let last = cluster.status(leader).await?.applied_index.unwrap_or(0);
    let config = dir.join("restore-node.toml");
    std::fs::copy(cluster.dir().join("node1").join("haven.toml"), &config)?;
    cluster.kill_node(leader);
    Ok(Written {
        data_dir: cluster.data_dir(leader),
        config,
        last,
    })
}

/// One restore of every entry with `binary`; `args` name the source.
async fn timed(
    binary: &Path,
    label: &str,
    source: &'static str,
    round: u32,
    args: &[String],
    out: &Path,
) -> anyhow::Result<RestoreRun> {
    let output = tokio::process::Command::new(binary)
        .args(args)
        .args(["--json", "--out"])
        .arg(out)
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "{label} restore from the {source} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let entries = report["entries_replayed"].as_u64().unwrap_or(0);
    let seconds = report["replay_seconds"].as_f64().unwrap_or(0.0).max(1e-9);
    Ok(RestoreRun {
        binary: label.to_string(),
        source,
        round,
        entries,
        seconds,
        entries_per_s: entries as f64 / seconds,
        state_mb_per_s: dir_bytes(out) as f64 / 1e6 / seconds,
    })
}

/// Entries per second a fresh log app answers when the node's logged requests arrive as
/// a replay sends them (same bytes, same `Haven-*` headers), all written back to back on
/// one connection: the most any replay into this app can reach.
async fn app_alone(exe: &Path, data_dir: &Path, work: &Path) -> anyhow::Result<f64> {
    let encoded = encoded_requests(data_dir).await?;
    let app = systems::launch(SystemKind::AppAlone, exe, &work.join("app-alone")).await?;
    let authority = app.targets[0].trim_start_matches("http://").to_string();
    let stream = tokio::net::TcpStream::connect(&authority).await?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    let (bytes, count) = encoded;
    let started = Instant::now();
    let writing = tokio::spawn(async move { writer.write_all(&bytes).await.map(|()| writer) });
    let mut buf = BytesMut::with_capacity(1 << 20);
    let mut answered = 0;
    while answered < count {
        // As a replay does: the app's answers wait for no delayed acknowledgement.
        socket2::SockRef::from(reader.as_ref()).set_tcp_quickack(true)?;
        let read = tokio::time::timeout(APP_ALONE_TIMEOUT, reader.read_buf(&mut buf)).await;
        if read.context("the app stopped answering")?? == 0 {
            bail!("the app closed the connection after {answered} answers");
        }
        while let Some(parsed) =
            http1::take_response(&mut buf, false, false).map_err(anyhow::Error::msg)?
        {
            if parsed.response.status != 201 {
                bail!(
                    "the app answered {} to a replayed append",
                    parsed.response.status
                );
            }
            answered += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(writing.await??);
    Ok(count as f64 / seconds)
}

/// Every request in the node's log, encoded as a replay delivers it, and their number.
async fn encoded_requests(data_dir: &Path) -> anyhow::Result<(Vec<u8>, u64)> {
    let service = haven_service::restore::service_dir(data_dir)?;
    let mut log = LogStore::<TypeConfig>::open(&service.join("log"), LogOptions::default())
        .context("opening the node's log")?;
    let entries = log.try_get_log_entries(0..u64::MAX).await?;
    let mut encoded = Vec::new();
    let mut count = 0;
    for entry in entries {
        let EntryPayload::Normal(request) = &entry.payload else {
            continue;
        };
        let stamp = Stamp {
            index: entry.log_id.index,
            time_rfc3339: haven_service::apply::rfc3339(request.time_unix_us),
            seed: request.seed,
        };
        http1::encode_request(&mut encoded, "127.0.0.1", request, &stamp)
            .map_err(anyhow::Error::msg)?;
        count += 1;
    }
    Ok((encoded, count))
}

pub fn render(r: &RestoreBenchReport) -> String {
    let mut text = format!(
        "{} entries replayed per restore; the app alone, pipelined on one connection: {:.0} entries/s\n\n\
         | binary | source | round | entries | replay (s) | entries/s | MB of state/s |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
        r.entries, r.app_alone_entries_per_s
    );
    if let Some(kept) = &r.kept {
        text.insert_str(0, &format!("files kept in {}\n", kept.display()));
    }
    for run in &r.runs {
        text.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} | {:.0} | {:.1} |\n",
            run.binary,
            run.source,
            run.round,
            run.entries,
            run.seconds,
            run.entries_per_s,
            run.state_mb_per_s
        ));
    }
    text
}
