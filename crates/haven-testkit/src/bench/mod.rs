//! `haven bench`: measure Haven honestly, against a baseline and a peer in the same run.
//!
//! - `load` and `sweep` drive systems that are already running (any URLs);
//! - `reference` launches the log app alone, Haven with 1 and 3 nodes and optionally etcd,
//!   and measures each on the reference workload ([`reference`]);
//! - `failover` kills leaders under write load and times the unavailability ([`failover`]);
//! - `peer-down` compares the surviving nodes' CPU and log with a peer up and down
//!   ([`peer_down`]);
//! - `checkpoint` measures what app-state checkpoints cost: taking one, a fresh node's
//!   catch-up, restore, and write latency while they are taken ([`checkpoint`]);
//! - `tenants` measures one service's latency while another on the same nodes is
//!   hammered ([`tenants`]);
//! - `archive`, `site` and `drill` measure the off-site tier: archive cost and restore
//!   speed, standby RPO and RTO, and whether a drill disturbs production ([`drill`]);
//! - `divergence` measures what comparing the replicas' answers costs ([`divergence`]);
//! - `restore` measures replay speed from a node's log and from the archive, A/B against
//!   another build, with the app's own pipelined ceiling ([`restore`]).
//!
//! The measuring itself (open and closed loops, HDR histograms, charts) is the
//! `haven-bench` crate; this module launches systems and assembles reports.

pub mod archive;
pub mod checkpoint;
pub mod divergence;
pub mod drill;
pub mod failover;
pub mod peer_down;
pub mod reference;
pub mod restore;
pub mod site;
mod systems;
pub mod tenants;

use std::path::Path;

use haven_bench::args::LoadArgs;
use haven_bench::args::SweepArgs;
use haven_bench::progress::Progress;
use haven_bench::report::render_text;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// One load run against running targets (open loop with --rate, else closed loop).
    Load(LoadArgs),
    /// Open-loop steps of rising rate until saturation; writes JSON and an SVG chart.
    Sweep(SweepArgs),
    /// The reference evaluation: app alone, Haven 1 and 3 nodes (and --peer etcd), every mix.
    Reference(reference::ReferenceArgs),
    /// Kill the leader under write load, repeatedly; report the write unavailability.
    Failover {
        #[command(flatten)]
        args: failover::FailoverArgs,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint time and size, a fresh node's catch-up, restore, and write latency with
    /// and without checkpoints, on a 3-node managed log-app cluster.
    Checkpoint(checkpoint::CheckpointArgs),
    /// The same write load with every peer up, then with a follower killed: the surviving
    /// nodes' CPU and the lines they log about the dead peer.
    PeerDown(peer_down::PeerDownArgs),
    /// Two services on 3 nodes: B's latency and throughput at a fixed rate, alone and
    /// while A is hammered by a closed loop (the noisy-neighbour rule).
    Tenants(tenants::TenantsArgs),
    /// The off-site archive against a real S3 server: write throughput with it off and
    /// on, the recovery point (archive lag) under open-loop load, restore speed.
    Archive(archive::ArchiveBenchArgs),
    /// Restore replay speed from a node's log and from the archive (alternating with
    /// --compare's build), and the app alone's ceiling for pipelined requests.
    Restore(restore::RestoreBenchArgs),
    /// A standby site against a real S3 server: the recovery point under load, what
    /// `ack = "quorum+archive"` costs in latency and throughput, the recovery time of a
    /// promotion over several trials.
    Site(site::SiteBenchArgs),
    /// Is a drill non-disruptive? Write latency at half of saturation, in alternating
    /// phases without and with `haven drill` running back to back.
    Drill(drill::DrillBenchArgs),
    /// What divergence detection costs: closed-loop write throughput with
    /// `app.check_divergence` off and on, in alternating rounds.
    Divergence(divergence::DivergenceBenchArgs),
}

/// Runs one bench command and returns what to print on stdout.
pub async fn run(command: BenchCommand, exe: &Path) -> anyhow::Result<String> {
    match command {
        BenchCommand::Load(args) => {
            let (spec, workload) = args.to_spec()?;
            let progress = progress_unless(args.common.json);
            let report = haven_bench::load::run(&spec, workload.build(), &progress).await?;
            progress.finish();
            output(args.common.json, &report, render_text)
        }
        BenchCommand::Sweep(args) => {
            let (spec, sweep, workload) = args.to_spec()?;
            let progress = progress_unless(args.common.json);
            let curve =
                haven_bench::sweep::sweep(&spec, workload.build(), &sweep, &progress).await?;
            progress.finish();
            let mut text = String::new();
            if let Some(out) = &args.out {
                let (json, svg) =
                    haven_bench::chart::save(out, &sweep.label, std::slice::from_ref(&curve))?;
                text = format!("wrote {} and {}\n", json.display(), svg.display());
            }
            let summary = format!(
                "{text}saturation throughput {:.0} req/s\n",
                haven_bench::sweep::saturation_throughput(&curve)
            );
            output(args.common.json, &curve, |_| summary.clone())
        }
        BenchCommand::Reference(args) => {
            let report = reference::run(&args, exe).await?;
            Ok(format!(
                "{}\nwrote {}/ (reference.json, results.md, post.svg, mixed.svg, get.svg)\n",
                reference::render(&report),
                args.out.display()
            ))
        }
        BenchCommand::Failover { args, json } => {
            let report = failover::run(&args, exe).await?;
            output(json, &report, failover::render)
        }
        BenchCommand::PeerDown(args) => {
            let report = peer_down::run(&args, exe).await?;
            output(args.json, &report, peer_down::render)
        }
        BenchCommand::Tenants(args) => {
            let report = tenants::run(&args, exe).await?;
            output(args.json, &report, tenants::render)
        }
        BenchCommand::Archive(args) => {
            let report = archive::run(&args, exe).await?;
            output(args.json, &report, archive::render)
        }
        BenchCommand::Restore(args) => {
            let report = restore::run(&args, exe).await?;
            output(args.json, &report, restore::render)
        }
        BenchCommand::Site(args) => {
            let report = site::run(&args, exe).await?;
            output(args.json, &report, site::render)
        }
        BenchCommand::Drill(args) => {
            let report = drill::run(&args, exe).await?;
            output(args.json, &report, drill::render)
        }
        BenchCommand::Divergence(args) => {
            let report = divergence::run(&args, exe).await?;
            output(args.json, &report, divergence::render)
        }
        BenchCommand::Checkpoint(args) => {
            let report = checkpoint::run(&args, exe).await?;
            let wrote = format!("wrote {}/ (results.md, results.json)\n", args.out.display());
            output(args.json, &report, |r| {
                format!("{}\n{wrote}", checkpoint::render(r))
            })
        }
    }
}

fn progress_unless(json: bool) -> Progress {
    if json {
        Progress::hidden()
    } else {
        Progress::stderr()
    }
}

fn output<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl Fn(&T) -> String,
) -> anyhow::Result<String> {
    if json {
        Ok(format!("{}\n", serde_json::to_string_pretty(value)?))
    } else {
        Ok(text(value))
    }
}
