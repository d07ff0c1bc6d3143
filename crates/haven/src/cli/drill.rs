//! `haven drill`: a recovery drill of one service from its off-site archive, in a sandbox
//! beside production ([`haven_drill`]); `haven drill list`: the drills kept.

use std::path::PathBuf;

use anyhow::Context;
use anyhow::bail;
use clap::Args;
use clap::Subcommand;
use haven_base::checks::HttpCheck;
use haven_base::config::Limits;
use haven_contract::paths;
use haven_drill::DrillReport;
use haven_drill::DrillSpec;
use haven_service::archive::ArchiveTarget;
use haven_service::restore::AppSettings;
use haven_service::restore::Target;
use serde::Serialize;

use super::archive::Access;
use super::archive::service_in;
use super::checkpoints::Bar;
use super::checkpoints::parse_time;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DrillArgs {
    #[command(subcommand)]
    command: Option<DrillCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum DrillCommand {
    /// The drills kept in the data directory, oldest first.
    List {
        #[command(flatten)]
        place: Place,
        /// Only this service's drills.
        #[arg(long)]
        service: Option<String>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Where drills are kept: the node's data directory (from its config), or a directory.
#[derive(Args)]
struct Place {
    /// The node's config: archive, key, app command, data directory.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Without a config: where the drill keeps its report (`<dir>/<drill id>/`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    place: Place,
    /// The service in the config, when it has several.
    #[arg(long)]
    service: Option<String>,
    /// Restore the state as of this log index (default: the newest the archive holds).
    #[arg(long, conflicts_with = "to_time")]
    to_index: Option<u64>,
    /// Restore the state as of this time (RFC 3339).
    #[arg(long)]
    to_time: Option<String>,
    /// An HTTP check: "METHOD /path STATUS", optionally followed by text the body must
    /// contain or by json:FIELD=VALUE. The first one is also the health check. Repeat.
    #[arg(long = "check-http")]
    http: Vec<String>,
    /// A command that passes with exit 0; it gets the app's URL in HAVEN_DRILL_URL and
    /// its data directory in HAVEN_DRILL_DIR. Repeat.
    #[arg(long = "check-cmd")]
    commands: Vec<String>,
    /// Keep the sandbox (the restored app's data) after the drill.
    #[arg(long)]
    keep: bool,
    /// One JSON object (the report) instead of the text.
    #[arg(long)]
    json: bool,
    /// The drill's CPU priority (nice, 0 to 19; its app inherits it): production's
    /// processes go first on a shared machine.
    #[arg(long, default_value_t = DRILL_NICE, value_parser = clap::value_parser!(i32).range(0..=19))]
    nice: i32,
    /// Without a config: the archive's url.
    #[arg(long)]
    archive: Option<String>,
    #[command(flatten)]
    access: Access,
    /// Without a config: the app's command, run with `sh -c`; it must listen on
    /// `{listen}` and keep its data in `{data_dir}`.
    #[arg(long, conflicts_with = "app_url")]
    app_command: Option<String>,
    /// An app Haven does not run (hooks mode): a fresh, empty instance started for the
    /// drill; the state is restored into it through its restore hook.
    #[arg(long)]
    app_url: Option<String>,
}

/// The output, and whether the drill passed (the exit status).
pub async fn run(args: DrillArgs) -> anyhow::Result<(String, bool)> {
    match args.command {
        Some(DrillCommand::List {
            place,
            service,
            json,
        }) => list(&place, service.as_deref(), json).map(|text| (text, true)),
        None => drill(args.run).await,
    }
}

async fn drill(args: RunArgs) -> anyhow::Result<(String, bool)> {
    let spec = spec(&args)?;
    lower_priority(args.nice);
    let progress = Bar::default();
    let report = haven_drill::run::run(&spec, &progress).await;
    progress.finish();
    let text = match args.json {
        true => format!("{}\n", serde_json::to_string(&report)?),
        false => render(&report, &spec.drills_dir),
    };
    Ok((text, report.ok))
}

fn spec(args: &RunArgs) -> anyhow::Result<DrillSpec> {
    let target = match (args.to_index, &args.to_time) {
        (Some(index), _) => Target::Index(index),
        (None, Some(time)) => Target::Time(parse_time(time)?),
        (None, None) => Target::Latest,
    };
    let http_checks = (args.http.iter())
        .map(|text| HttpCheck::parse(text))
        .collect::<Result<Vec<_>, _>>()?;
    let (service, store, protection, settings, drills_dir) = match &args.place.config {
        Some(path) => from_config(path, args.service.as_deref())?,
        None => without_config(args)?,
    };
    Ok(DrillSpec {
        service,
        store,
        protection,
        settings,
        target,
        http_checks,
        commands: args.commands.clone(),
        drills_dir,
        keep: args.keep,
        app_url: args.app_url.clone(),
    })
}

/// How nice a drill is unless told otherwise.
pub const DRILL_NICE: i32 = 19;

/// Lowers every thread of this process to `nice` (Linux keeps a nice value per thread;
/// threads and processes started later inherit their creator's). A drill that cannot
/// lower its priority still runs, and says so.
pub fn lower_priority(nice: i32) {
    let tasks = match std::fs::read_dir("/proc/self/task") {
        Ok(tasks) => tasks,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this process's threads; the drill runs at normal priority");
            return;
        }
    };
    for task in tasks.filter_map(Result::ok) {
        let tid = task.file_name().to_string_lossy().parse::<i32>().ok();
        let Some(pid) = tid.and_then(rustix::process::Pid::from_raw) else {
            continue;
        };
        if let Err(e) = rustix::process::setpriority_process(Some(pid), nice) {
            tracing::warn!(error = %e, nice, "cannot lower a drill thread's priority");
        }
        idle(pid.as_raw_nonzero().get());
    }
}

/// SCHED_IDLE and the idle I/O class for thread `tid`: it runs and reads the disk only
/// when nothing else wants to.
fn idle(tid: i32) {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on a thread of this process, with a valid parameter.
    let (scheduled, io) = unsafe {
        (
            libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param),
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                libc::c_long::from(tid),
                IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
            ),
        )
    };
    if scheduled != 0 || io != 0 {
        tracing::warn!(
            tid,
            "cannot make a drill thread idle-priority; it runs at its nice value"
        );
    }
}

/// A drill of `service` in the node config at `path` to the newest point, with no checks
/// of its own (a recovery plan gates it).
pub fn spec_of_service(
    path: &std::path::Path,
    service: &str,
    keep: bool,
) -> anyhow::Result<DrillSpec> {
    let (service, store, protection, settings, drills_dir) = from_config(path, Some(service))?;
    Ok(DrillSpec {
        service,
        store,
        protection,
        settings,
        target: Target::Latest,
        http_checks: Vec::new(),
        commands: Vec::new(),
        drills_dir,
        keep,
        app_url: None,
    })
}

type Source = (
    String,
    haven_archive::store::Store,
    haven_archive::seal::Protection,
    AppSettings,
    PathBuf,
);

fn from_config(path: &std::path::Path, service: Option<&str>) -> anyhow::Result<Source> {
    let (config, service) = service_in(path, service)?;
    let Some(section) = &service.archive else {
        bail!(
            "service {} in {} has no off-site archive ([archive] or [standby]): there is nothing to drill from",
            service.name,
            path.display()
        );
    };
    let target = ArchiveTarget::open(section)
        .with_context(|| format!("opening the archive of service {}", service.name))?;
    Ok((
        service.name.clone(),
        target.store,
        target.protection,
        AppSettings::from_config(&service),
        haven_drill::drills_dir(&config.node.data_dir),
    ))
}

fn without_config(args: &RunArgs) -> anyhow::Result<Source> {
    let (Some(url), Some(dir)) = (&args.archive, &args.place.dir) else {
        bail!(
            "give --config NODE.toml, or --archive URL, --dir DIR and --app-command CMD (or --app-url URL)"
        );
    };
    let (command, mode) = match (&args.app_command, &args.app_url) {
        (Some(command), None) => (
            Some(vec!["sh".into(), "-c".into(), command.clone()]),
            "managed",
        ),
        (None, Some(_)) => (None, "hooks"),
        _ => bail!(
            "give --app-command CMD (Haven runs the app) or --app-url URL (a fresh instance you started)"
        ),
    };
    let (store, protection) = args.access.open(url)?;
    let limits = Limits::default();
    let settings = AppSettings {
        cluster: String::new(),
        // Where `{listen}` points; the drill moves it to a free port of its own.
        url: args
            .app_url
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:9".to_string()),
        command,
        env: Vec::new(),
        mode: Some(mode.to_string()),
        snapshot_path: paths::SNAPSHOT.into(),
        restore_path: paths::RESTORE.into(),
        timeout_ms: 10_000,
        start_timeout_ms: 30_000,
        idempotency_keys_max: limits.idempotency_keys_max,
        idempotency_retention_s: limits.idempotency_retention_s,
        data_dir: None,
    };
    let service = args.service.clone().unwrap_or_else(|| "app".to_string());
    Ok((service, store, protection, settings, dir.clone()))
}

fn render(report: &DrillReport, drills_dir: &std::path::Path) -> String {
    let verdict = match report.ok {
        true => "PASSED",
        false => "FAILED",
    };
    let seconds = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.3} s"));
    let mut text = format!(
        "drill {} of service {}: {verdict}\n\
         restore point:  index {} (entry time {}), data age {}\n\
         restored in     {} ({} entries, {} bytes replayed after checkpoint {})\n\
         RTO:            {} (to the first healthy answer)\n\
         checks:\n",
        report.id,
        report.service,
        report
            .restored_index
            .map_or("-".to_string(), |i| i.to_string()),
        report.restored_time.as_deref().unwrap_or("-"),
        seconds(report.data_age_seconds),
        seconds(report.restore_seconds),
        report.entries_replayed,
        report.bytes_replayed,
        report
            .checkpoint_index
            .map_or("-".to_string(), |i| i.to_string()),
        seconds(report.rto_seconds),
    );
    for check in &report.checks {
        let mark = if check.ok { "pass" } else { "FAIL" };
        text.push_str(&format!("  {mark}  {}: {}\n", check.name, check.detail));
    }
    if let Some(error) = &report.error {
        text.push_str(&format!("error: {error}\n"));
    }
    text.push_str(&format!(
        "report: {}\n",
        drills_dir
            .join(&report.id)
            .join(haven_drill::report::REPORT_MD)
            .display()
    ));
    text
}

#[derive(Serialize)]
struct Listed<'a> {
    id: &'a str,
    ok: bool,
    started_at: &'a str,
    restored_index: Option<u64>,
    rto_seconds: Option<f64>,
    checks_passed: usize,
    checks: usize,
}

fn list(place: &Place, service: Option<&str>, json: bool) -> anyhow::Result<String> {
    let dir = match (&place.config, &place.dir) {
        (Some(path), _) => {
            let config = haven_base::config::Config::load(path)?;
            haven_drill::drills_dir(&config.node.data_dir)
        }
        (None, Some(dir)) => dir.clone(),
        (None, None) => bail!("give --config NODE.toml or --dir DIR"),
    };
    let reports = haven_drill::report::list(&dir)
        .with_context(|| format!("reading the drills in {}", dir.display()))?;
    let listed: Vec<Listed> = (reports.iter())
        .filter(|r| service.is_none_or(|s| r.service == s))
        .map(|r| Listed {
            id: &r.id,
            ok: r.ok,
            started_at: &r.started_at,
            restored_index: r.restored_index,
            rto_seconds: r.rto_seconds,
            checks_passed: r.checks.iter().filter(|c| c.ok).count(),
            checks: r.checks.len(),
        })
        .collect();
    if json {
        return Ok(format!("{}\n", serde_json::to_string(&listed)?));
    }
    let mut text = format!(
        "{:<40} {:<6} {:>10} {:>9} {:>7}\n",
        "drill", "result", "index", "rto", "checks"
    );
    for l in &listed {
        text.push_str(&format!(
            "{:<40} {:<6} {:>10} {:>9} {:>7}\n",
            l.id,
            if l.ok { "pass" } else { "FAIL" },
            l.restored_index.map_or("-".to_string(), |i| i.to_string()),
            l.rto_seconds
                .map_or("-".to_string(), |s| format!("{s:.3}s")),
            format!("{}/{}", l.checks_passed, l.checks),
        ));
    }
    Ok(text)
}
