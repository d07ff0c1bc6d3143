//! `haven plan run PLAN.toml --drill | --failover`: brings a recovery plan's services up
//! in dependency order ([`haven_drill::plan`]), independent ones at once, each only after
//! its dependencies passed their gates. `--drill` brings each up in a drill sandbox (all
//! of them stay up until the plan ends, then stop); `--failover` promotes each service's
//! standby site (`haven site promote`) and checks the gate there. A failed step stops the
//! plan: the report says what is up, what failed and why, and what never started.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use clap::Subcommand;
use haven_drill::check;
use haven_drill::check::CheckKind;
use haven_drill::check::CheckOutcome;
use haven_drill::plan::Plan;
use haven_drill::plan::Step;
use haven_drill::run::Drill;
use haven_service::restore::Progress;
use indicatif::MultiProgress;
use indicatif::ProgressBar;
use indicatif::ProgressStyle;
use serde::Serialize;

use super::AdminTarget;

const GATE_POLL: Duration = Duration::from_millis(100);

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Bring the plan's services up in dependency order, each gated by its health check.
    Run {
        /// The plan file ([[service]] tables: name, config, depends_on, gate, ...).
        plan: PathBuf,
        /// In drill sandboxes beside production (restored from each service's archive).
        #[arg(
            long,
            required_unless_present = "failover",
            conflicts_with = "failover"
        )]
        drill: bool,
        /// For real: promote each service's standby site.
        #[arg(long)]
        failover: bool,
        /// Drill mode: keep the sandboxes.
        #[arg(long)]
        keep: bool,
        /// One JSON object (every step) instead of the text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Drill,
    Failover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Up,
    Failed,
    NotStarted,
}

/// One service of the plan, as the run left it.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub service: String,
    pub state: State,
    /// Why it failed or did not start; what came up where, when it is up.
    pub detail: String,
    /// Seconds from the plan's start to the step's start, and to its gate passing.
    pub started_after_s: Option<f64>,
    pub up_after_s: Option<f64>,
    pub restored_index: Option<u64>,
    pub gate: Option<CheckOutcome>,
}

#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub plan: PathBuf,
    pub mode: Mode,
    pub ok: bool,
    pub seconds: f64,
    pub steps: Vec<StepReport>,
}

pub async fn run(command: PlanCommand) -> anyhow::Result<(String, bool)> {
    let PlanCommand::Run {
        plan: path,
        drill,
        failover: _,
        keep,
        json,
    } = command;
    let plan = Plan::load(&path)?;
    let mode = if drill { Mode::Drill } else { Mode::Failover };
    if mode == Mode::Drill {
        super::drill::lower_priority(super::drill::DRILL_NICE);
    }
    let report = execute(&path, &plan, mode, keep).await;
    let text = match json {
        true => format!("{}\n", serde_json::to_string(&report)?),
        false => render(&report),
    };
    Ok((text, report.ok))
}

/// What bringing one service up left: its report, and a drill still running.
struct BroughtUp {
    report: StepReport,
    url: Option<String>,
    drill: Option<Drill>,
}

async fn execute(path: &std::path::Path, plan: &Plan, mode: Mode, keep: bool) -> PlanReport {
    let started = Instant::now();
    let log = StepLog::new();
    let mut reports: BTreeMap<String, StepReport> = BTreeMap::new();
    let mut urls: BTreeMap<String, String> = BTreeMap::new();
    let mut drills = Vec::new();
    let mut up = BTreeSet::new();
    let mut pending: Vec<&Step> = plan.steps.iter().collect();
    let mut failed: Option<String> = None;
    while failed.is_none() {
        let (ready, rest): (Vec<&Step>, Vec<&Step>) = pending
            .into_iter()
            .partition(|s| s.depends_on.iter().all(|d| up.contains(d)));
        pending = rest;
        if ready.is_empty() {
            break;
        }
        let context = Context {
            mode,
            keep,
            started,
            urls: &urls,
            log: &log,
        };
        let brought = futures::future::join_all(ready.iter().map(|s| bring_up(s, &context))).await;
        for (step, outcome) in ready.iter().zip(brought) {
            match outcome.report.state {
                State::Up => {
                    up.insert(step.name.clone());
                }
                _ => {
                    failed.get_or_insert(step.name.clone());
                }
            }
            if let Some(url) = outcome.url {
                urls.insert(step.name.clone(), url);
            }
            drills.extend(outcome.drill);
            reports.insert(step.name.clone(), outcome.report);
        }
    }
    for step in pending {
        let why = failed.as_deref().unwrap_or("another service");
        let report = not_started(
            step,
            format!("not started: the plan stopped when `{why}` failed"),
        );
        reports.insert(step.name.clone(), report);
    }
    for drill in drills {
        let report = drill.finish().await;
        log.line(&report.service, "sandbox stopped");
    }
    log.clear();
    let steps: Vec<StepReport> = (plan.steps.iter())
        .filter_map(|s| reports.remove(&s.name))
        .collect();
    PlanReport {
        plan: path.to_path_buf(),
        mode,
        ok: steps.iter().all(|s| s.state == State::Up),
        seconds: started.elapsed().as_secs_f64(),
        steps,
    }
}

/// What every step of one wave shares.
struct Context<'a> {
    mode: Mode,
    keep: bool,
    started: Instant,
    /// The base URL of every service up so far, for the pre and post commands.
    urls: &'a BTreeMap<String, String>,
    log: &'a StepLog,
}

fn not_started(step: &Step, detail: String) -> StepReport {
    StepReport {
        service: step.name.clone(),
        state: State::NotStarted,
        detail,
        started_after_s: None,
        up_after_s: None,
        restored_index: None,
        gate: None,
    }
}

async fn bring_up(step: &Step, context: &Context<'_>) -> BroughtUp {
    let mut report = not_started(step, String::new());
    report.started_after_s = Some(context.started.elapsed().as_secs_f64());
    let failed = |mut report: StepReport, detail: String, drill| {
        context.log.line(&step.name, &format!("FAILED: {detail}"));
        report.state = State::Failed;
        report.detail = detail;
        BroughtUp {
            report,
            url: None,
            drill,
        }
    };
    if let Some(command) = &step.pre {
        context.log.line(&step.name, "pre command");
        if let Err(e) = hook(command, context.urls, None).await {
            return failed(report, format!("the pre command failed: {e}"), None);
        }
    }
    context.log.line(
        &step.name,
        match context.mode {
            Mode::Drill => "restoring into a sandbox",
            Mode::Failover => "promoting its standby site",
        },
    );
    let (url, gate, drill) = match context.mode {
        Mode::Drill => match drill_up(step, context.keep).await {
            Ok((drill, gate)) => {
                report.restored_index = drill.report.restored_index;
                (drill.url().map(str::to_string), gate, Some(drill))
            }
            Err((e, drill)) => return failed(report, e, drill),
        },
        Mode::Failover => match failover_up(step).await {
            Ok((url, gate)) => (Some(url), gate, None),
            Err(e) => return failed(report, e, None),
        },
    };
    report.gate = Some(gate.clone());
    if !gate.ok {
        let detail = format!("its gate did not pass: {}: {}", gate.name, gate.detail);
        return failed(report, detail, drill);
    }
    report.up_after_s = Some(context.started.elapsed().as_secs_f64());
    if let Some(command) = &step.post
        && let Err(e) = hook(command, context.urls, url.as_deref()).await
    {
        return failed(report, format!("the post command failed: {e}"), drill);
    }
    report.state = State::Up;
    report.detail = format!("up at {}", url.as_deref().unwrap_or("-"));
    context
        .log
        .line(&step.name, &format!("up ({})", gate.detail));
    BroughtUp { report, url, drill }
}

/// The service restored into a sandbox, left running; its gate's outcome.
async fn drill_up(
    step: &Step,
    keep: bool,
) -> Result<(Drill, CheckOutcome), (String, Option<Drill>)> {
    let Some(config) = &step.config else {
        return Err((
            format!(
                "service `{}` has no config in the plan: a drill reads its archive and app from it",
                step.name
            ),
            None,
        ));
    };
    let spec = super::drill::spec_of_service(config, &step.name, keep)
        .map_err(|e| (format!("{e:#}"), None))?;
    let mut drill = Drill::start(&spec, &Silent).await;
    if let Some(error) = drill.report.error.clone() {
        let why = drill.report.failures().join("; ");
        return Err((format!("{error}: {why}"), Some(drill)));
    }
    drill
        .wait_healthy(Some(&step.gate), step.gate_timeout)
        .await;
    let gate = drill.report.checks.last().cloned().map(|mut c| {
        c.name = step.gate.describe();
        c
    });
    let gate = gate.unwrap_or_else(|| {
        CheckOutcome::new(CheckKind::Http, step.gate.describe(), Err("not run".into()))
    });
    Ok((drill, gate))
}

/// The service's standby site promoted; its URL there and its gate's outcome.
async fn failover_up(step: &Step) -> Result<(String, CheckOutcome), String> {
    let (Some(admin), Some(url)) = (&step.admin, &step.url) else {
        return Err(format!(
            "service `{}` needs admin (a standby node) and url (the service there) in the plan for a failover",
            step.name
        ));
    };
    let target = AdminTarget {
        admin: admin.clone(),
        service: Some(step.name.clone()),
    };
    super::promote::promote(&target)
        .await
        .map_err(|e| format!("the promotion failed: {e:#}"))?;
    let gate = gate(step, url).await;
    Ok((url.clone(), gate))
}

/// Polls the gate until it passes or its timeout.
async fn gate(step: &Step, url: &str) -> CheckOutcome {
    let deadline = Instant::now() + step.gate_timeout;
    loop {
        let outcome = check::run_http(&step.gate, url).await;
        if outcome.ok || Instant::now() >= deadline {
            return outcome;
        }
        tokio::time::sleep(GATE_POLL).await;
    }
}

/// A pre or post command (`sh -c`): it gets every service's URL up so far as
/// `HAVEN_PLAN_URL_<NAME>` (upper case, `-` as `_`), and its own as `HAVEN_PLAN_URL`
/// once up.
async fn hook(
    command: &str,
    urls: &BTreeMap<String, String>,
    own: Option<&str>,
) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh");
    child
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, url) in urls {
        child.env(
            format!("HAVEN_PLAN_URL_{}", name.to_uppercase().replace('-', "_")),
            url,
        );
    }
    if let Some(url) = own {
        child.env("HAVEN_PLAN_URL", url);
    }
    let output = tokio::time::timeout(check::COMMAND_TIMEOUT, child.output())
        .await
        .map_err(|_| format!("still running after {:?}", check::COMMAND_TIMEOUT))?
        .map_err(|e| format!("cannot run it: {e}"))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
    }
}

/// A restore inside a plan draws no bar of its own: the plan's lines say where it is.
struct Silent;

impl Progress for Silent {
    fn start(&self, _total: u64) {}
    fn advance(&self, _done: u64) {}
}

/// A spinner per service on a terminal; one line per step otherwise.
struct StepLog {
    bars: Option<(
        MultiProgress,
        std::sync::Mutex<BTreeMap<String, ProgressBar>>,
    )>,
}

impl StepLog {
    fn new() -> Self {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| (MultiProgress::new(), std::sync::Mutex::new(BTreeMap::new())));
        Self { bars }
    }

    fn line(&self, service: &str, what: &str) {
        let Some((multi, bars)) = &self.bars else {
            eprintln!("plan: {service}: {what}");
            return;
        };
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
        let bar = bars.entry(service.to_string()).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new_spinner());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix:>12} {msg}") {
                bar.set_style(style);
            }
            bar.set_prefix(service.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        bar.set_message(what.to_string());
    }

    fn clear(&self) {
        if let Some((multi, _)) = &self.bars {
            let _ = multi.clear();
        }
    }
}

pub fn render(report: &PlanReport) -> String {
    let verdict = if report.ok { "PASSED" } else { "FAILED" };
    let mut text = format!(
        "plan {} ({:?}): {verdict} in {:.3} s\n",
        report.plan.display(),
        report.mode,
        report.seconds
    );
    for step in &report.steps {
        let state = match step.state {
            State::Up => "up",
            State::Failed => "FAILED",
            State::NotStarted => "not started",
        };
        let when = step
            .up_after_s
            .map_or(String::new(), |s| format!(" after {s:.3} s"));
        text.push_str(&format!(
            "  {:<12} {state}{when}: {}\n",
            step.service, step.detail
        ));
    }
    text
}
