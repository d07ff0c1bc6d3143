//! Runs simulation seeds and prints each one's fault timeline and verdict; exits non-zero
//! if any seed violates a check. `--seed N` replays one seed exactly.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use haven_sim::Options;

#[derive(Parser)]
#[command(about = "Deterministic simulation of Haven's consensus layer")]
struct Args {
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many consecutive seeds to run.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Cluster size.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 3)]
    clients: u64,
    /// Simulated seconds of faults per seed.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Print only failing seeds in full.
    #[arg(long)]
    quiet: bool,
    /// Write every observation of the (last) seed to this file: diff two runs to see where
    /// they part.
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let options = Options {
        nodes: args.nodes,
        clients: args.clients,
        fault_phase: Duration::from_secs(args.seconds),
        trace: args.trace.is_some(),
    };
    let mut failed = Vec::new();
    for seed in args.seed..args.seed + args.count {
        let report = haven_sim::run(seed, &options);
        if let Some(path) = &args.trace
            && let Err(e) = std::fs::write(path, report.trace.join("\n"))
        {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        if !report.passed() {
            failed.push(seed);
        }
        if args.quiet && report.passed() {
            println!(
                "seed {seed}: PASS ({} acknowledged, fingerprint {})",
                report.acknowledged, report.fingerprint
            );
        } else {
            println!("{report}");
        }
    }
    if failed.is_empty() {
        println!("{} seeds passed", args.count);
        ExitCode::SUCCESS
    } else {
        println!("failed seeds: {failed:?}");
        ExitCode::FAILURE
    }
}
