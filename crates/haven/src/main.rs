//! `haven`: command-line entry point. Parses flags, sets up logging, dispatches.

use std::io::IsTerminal;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;
use haven::cli;
use haven_base::config::Config;

/// glibc's malloc took 14% of a leader's CPU under write load and let its resident memory
/// grow past 130 MB through per-thread arenas; mimalloc is faster and returns memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "haven",
    version,
    about = "Fault-tolerant, disaster-proof replication for stateful HTTP services"
)]
struct Cli {
    /// Worker threads of this process's async runtime (default: one per core). Processes
    /// that share a machine's cores run faster with fewer each: see `cluster::threads_per_copy`.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// How log lines are written to stderr: `text` (coloured only when stderr is a
    /// terminal) or `json` (one object per line, for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one node of a cluster.
    Node {
        /// The node's TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Check the file (syntax, keys, values, how they fit together), print `ok` and
        /// exit without starting; files it names (keys, tokens) are read only at start.
        #[arg(long)]
        check: bool,
    },
    /// Run the reference log application (POST /append, GET /line/N, GET /count).
    Logapp {
        /// The address to serve HTTP on, e.g. 127.0.0.1:6001.
        #[arg(long)]
        listen: SocketAddr,
        /// The log file; a sidecar `<file>.haven-index` is kept beside it.
        #[arg(long)]
        file: PathBuf,
        /// Lines of 128 bytes to write when the file is empty.
        #[arg(long, default_value_t = 0)]
        prepopulate: u64,
    },
    /// Run the example ZooKeeper-model tree app (create, delete, get, set with CAS, children, sync).
    Treeapp {
        /// The address to serve HTTP on, e.g. 127.0.0.1:6101.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory for its journal and snapshot.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Start a local 3-node cluster protecting the log app and the tree app, kill the log
    /// service's leader mid-load, then lose the whole site to a fire and promote the
    /// standby site; verify and print the numbers.
    Demo {
        /// Print one JSON object instead of the summary.
        #[arg(long)]
        json: bool,
        /// Keep the temporary directory (configs, data, logs).
        #[arg(long)]
        keep: bool,
        /// Run every node with mutual TLS between peers (a CA made for the run).
        #[arg(long)]
        tls: bool,
    },
    /// Measure throughput, latency, CPU and failover (see `haven bench reference --help`).
    #[command(subcommand)]
    Bench(haven_testkit::bench::BenchCommand),
    /// Torture a local cluster (kills, pauses, partitions) and check linearizability,
    /// durability of acknowledged writes and identical replicas.
    Torture(haven_testkit::torture::TortureArgs),
    /// Change the cluster's membership through the leader's admin API (joint consensus).
    #[command(subcommand)]
    Members(cli::members::MembersCommand),
    /// Inspect a node's checkpoints (reads its data directory; works with the node down).
    #[command(subcommand)]
    Checkpoints(cli::checkpoints::CheckpointsCommand),
    /// Point-in-time restore from a node's data directory: newest checkpoint at or before
    /// the target, then the log replayed up to it, into a fresh app.
    Restore(cli::checkpoints::RestoreArgs),
    /// The off-site archive: make a key, list, verify, restore from it (needs only the
    /// archive, the key and the store's credentials).
    #[command(subcommand)]
    Archive(cli::archive::ArchiveCommand),
    /// Rehearse a site loss: restore a service from its off-site archive into a sandbox
    /// beside production, start the app there, run checks, report (`drill list`: the
    /// drills kept). Exits non-zero when a check fails.
    Drill(cli::drill::DrillArgs),
    /// The node's trail of admin changes: who (token holder), what, when, the answer.
    Audit(cli::audit::AuditArgs),
    /// A quick-start CA and node certificates for `[tls]` (mutual TLS between nodes).
    #[command(subcommand)]
    Cert(cli::cert::CertCommand),
    /// Recovery plans: bring several services back in dependency order, each gated by a
    /// health check, in drill sandboxes (`--drill`) or for real (`--failover`).
    #[command(subcommand)]
    Plan(cli::plan::PlanCommand),
    /// List a node's services, or reload them from the config file on every node
    /// (add, remove with --wipe, restart changed ones).
    #[command(subcommand)]
    Services(cli::services::ServicesCommand),
    /// Sites: promote a standby site when the primary site is lost; make a fenced site
    /// follow the new primary; hand the service back with a switchover.
    #[command(subcommand)]
    Site(cli::site::SiteCommand),
    /// Show a node's status: one service in full, or a line per service.
    Status {
        #[command(flatten)]
        target: cli::AdminTarget,
        /// Print the node's status as JSON (`GET /status`, or `/services` without
        /// --service on a node with several) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// openraft warnings that would flood the log:
/// - a write's completion nobody waits for is dropped: Haven answers writes at commit and
///   from its own waiters, so that warning would fire on every request;
/// - every failed replication or heartbeat RPC to a peer that is down (20 heartbeats a
///   second each): the transport reports a peer going down and coming back itself, once
///   (`consensus::reconnect`).
const QUIET_OPENRAFT: [&str; 4] = [
    "openraft::raft::responder::impls::progress_responder=error",
    "openraft::replication=error",
    "openraft::core::heartbeat=error",
    "openraft::engine::handler::replication_handler=error",
];

/// Colour codes only reach a terminal: a redirected log file stays plain text.
fn init_tracing(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let filter = QUIET_OPENRAFT
        .iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, |filter, directive| filter.add_directive(directive));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

/// tokio survives task panics; a node must not keep running half-broken.
fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// One message per SIGHUP, the usual "read your config again".
fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    // A reload already waiting covers this one too.
                    let _ = tx.try_send(());
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; reload with POST /services/reload")
        }
    }
    rx
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Prints a command's output; the exit status says whether what it checked passed.
fn verdict((text, good): (String, bool)) -> anyhow::Result<ExitCode> {
    print(&text)?;
    Ok(match good {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Node { config, check } => {
            if check {
                Config::load(&config)?;
                print(&format!("{}: ok\n", config.display()))?;
                return Ok(ExitCode::SUCCESS);
            }
            init_tracing(cli.log_format, "info");
            abort_on_panic();
            let loaded = Config::load(&config)?;
            let reloads = haven_node::node::Reloads {
                path: config,
                hangups: hangups(),
            };
            haven_node::node::run(loaded, reloads, shutdown_signal()).await?;
        }
        Command::Logapp {
            listen,
            file,
            prepopulate,
        } => {
            init_tracing(cli.log_format, "info");
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let config = haven_logapp::LogAppConfig { file, prepopulate };
            haven_logapp::serve(listener, config, shutdown_signal()).await?;
        }
        Command::Treeapp { listen, dir } => {
            init_tracing(cli.log_format, "info");
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let config = haven_treeapp::TreeAppConfig { dir };
            haven_treeapp::serve(listener, config, shutdown_signal()).await?;
        }
        Command::Members(command) => {
            init_tracing(cli.log_format, "warn");
            print(&cli::members::run(command).await?)?;
        }
        Command::Checkpoints(command) => {
            init_tracing(cli.log_format, "warn");
            print(&cli::checkpoints::list(command)?)?;
        }
        Command::Restore(args) => {
            init_tracing(cli.log_format, "warn");
            print(&cli::checkpoints::restore(args).await?)?;
        }
        Command::Archive(command) => {
            init_tracing(cli.log_format, "warn");
            return verdict(cli::archive::run(command).await?);
        }
        Command::Drill(args) => {
            init_tracing(cli.log_format, "warn");
            return verdict(cli::drill::run(args).await?);
        }
        Command::Audit(args) => {
            init_tracing(cli.log_format, "warn");
            print(&cli::audit::run(&args)?)?;
        }
        Command::Cert(command) => {
            init_tracing(cli.log_format, "warn");
            print(&cli::cert::run(command)?)?;
        }
        Command::Plan(command) => {
            init_tracing(cli.log_format, "warn");
            return verdict(cli::plan::run(command).await?);
        }
        Command::Demo { json, keep, tls } => {
            init_tracing(cli.log_format, "warn");
            let exe = std::env::current_exe().context("locating the haven executable")?;
            let report = cli::demo::run(exe, cli::demo::DemoOptions { json, keep, tls }).await?;
            if json {
                print(&format!("{}\n", serde_json::to_string(&report)?))?;
            } else {
                print(&cli::demo::render(&report))?;
            }
            if !report.passed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Bench(command) => {
            init_tracing(cli.log_format, "warn");
            let exe = std::env::current_exe().context("locating the haven executable")?;
            print(&haven_testkit::bench::run(command, &exe).await?)?;
        }
        Command::Torture(args) => {
            init_tracing(cli.log_format, "warn");
            let exe = std::env::current_exe().context("locating the haven executable")?;
            return haven_testkit::torture::execute(exe, args, print).await;
        }
        Command::Services(command) => {
            init_tracing(cli.log_format, "warn");
            print(&cli::services::run(command).await?)?;
        }
        Command::Site(command) => {
            init_tracing(cli.log_format, "warn");
            print(&cli::site::run(command).await?)?;
        }
        Command::Status { target, json } => {
            init_tracing(cli.log_format, "warn");
            print(&cli::status::show(&target, json).await?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.threads {
        builder.worker_threads(usize::from(threads));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("haven: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("haven: {e:#}");
            ExitCode::FAILURE
        }
    }
}
