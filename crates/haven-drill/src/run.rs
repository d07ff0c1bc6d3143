//! One drill: restore a point of the archive into a sandbox (a directory of the drill's own
//! and a free loopback port), wait for the app's first healthy answer, run the checks,
//! stop the app, remove the sandbox (unless kept), write the report.
//!
//! The sandbox never touches production: the archive is only read (no writer is opened,
//! so no epoch, fence or object is created), no Raft runs, and the app listens on a port
//! of its own (`{listen}` in its command), with the sandbox as its data directory.

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use haven_archive::reader::Reader;
use haven_archive::seal::Protection;
use haven_archive::store::Store;
use haven_base::checks::HttpCheck;
use haven_service::app::AppClient;
use haven_service::apply::rfc3339;
use haven_service::restore;
use haven_service::restore::AppSettings;
use haven_service::restore::ArchiveRestore;
use haven_service::restore::Progress;
use haven_service::restore::RestoreOptions;
use haven_service::restore::Restored;
use haven_service::restore::Target;

use crate::check;
use crate::check::CheckKind;
use crate::check::CheckOutcome;
use crate::report::DrillReport;

/// How long the restored app has to give its first healthy answer.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(60);
const HEALTH_POLL: Duration = Duration::from_millis(50);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The built-in checks' names.
pub const RESTORE_VERIFIED: &str = "restore verified";
pub const FIRST_HEALTHY_ANSWER: &str = "first healthy answer";

/// What to drill.
#[derive(Clone)]
pub struct DrillSpec {
    pub service: String,
    /// The archive, read only.
    pub store: Store,
    pub protection: Protection,
    /// How to run the app (its command, with `{listen}` and `{data_dir}`).
    pub settings: AppSettings,
    pub target: Target,
    pub http_checks: Vec<HttpCheck>,
    pub commands: Vec<String>,
    /// Where drills are kept (`<data_dir>/drills`); each gets a directory of its own.
    pub drills_dir: PathBuf,
    /// Keep the sandbox (the restored app's data) after the drill.
    pub keep: bool,
    /// An app Haven does not run (hooks mode): a fresh, empty instance the operator
    /// started for the drill, into which the state is restored.
    pub app_url: Option<String>,
}

pub async fn run(spec: &DrillSpec, progress: &dyn Progress) -> DrillReport {
    let mut drill = Drill::start(spec, progress).await;
    // The checks run also when the first never passed: the report then says what each found.
    drill
        .wait_healthy(spec.http_checks.first(), HEALTHY_WITHIN)
        .await;
    drill.check(spec).await;
    drill.finish().await
}

/// A drill under way: its report so far, and the restored app while it runs. A recovery
/// plan keeps several up at once, each started after its dependencies passed their gates.
pub struct Drill {
    pub report: DrillReport,
    dir: PathBuf,
    started: Instant,
    keep: bool,
    restored: Option<Restored>,
}

impl Drill {
    /// Restores into the sandbox and starts the app there. A failed restore is the failed
    /// built-in check [`RESTORE_VERIFIED`], and the drill goes no further.
    pub async fn start(spec: &DrillSpec, progress: &dyn Progress) -> Self {
        let started = Instant::now();
        let now = chrono::Utc::now();
        let id = format!("{}-{}", spec.service, now.format("%Y%m%dT%H%M%S%.3fZ"));
        let dir = spec.drills_dir.join(&id);
        let report = DrillReport {
            id,
            service: spec.service.clone(),
            started_at: rfc3339(now.timestamp_micros()),
            started_unix_s: now.timestamp_micros() as f64 / 1e6,
            archive: spec.store.url().to_string(),
            sandbox: dir.join("sandbox"),
            kept: spec.keep,
            ..DrillReport::default()
        };
        tracing::info!(drill = %report.id, archive = %report.archive, "drill started");
        let mut drill = Self {
            report,
            dir,
            started,
            keep: spec.keep,
            restored: None,
        };
        match restore(spec, &drill.report.sandbox, progress).await {
            Ok(restored) => {
                record_restore(&mut drill.report, &restored, started);
                drill.restored = Some(restored);
            }
            Err(e) => {
                let name = RESTORE_VERIFIED.to_string();
                let failed = CheckOutcome::new(CheckKind::Builtin, name, Err(e));
                drill.report.checks.push(failed);
                drill.report.error =
                    Some("the restore failed, so nothing else was checked".to_string());
            }
        }
        drill
    }

    /// The restored app's base URL, while it runs.
    pub fn url(&self) -> Option<&str> {
        self.restored.as_ref().map(Restored::url)
    }

    /// Until `health` passes (or, without one, the app answers anything), at most
    /// `within`: the built-in check [`FIRST_HEALTHY_ANSWER`], and the RTO when it passed.
    pub async fn wait_healthy(&mut self, health: Option<&HttpCheck>, within: Duration) -> bool {
        let Some(url) = self.url().map(str::to_string) else {
            return false;
        };
        let healthy = first_healthy_answer(health, &url, within).await;
        let ok = healthy.is_ok();
        if ok {
            self.report.rto_seconds = Some(self.started.elapsed().as_secs_f64());
        }
        let name = FIRST_HEALTHY_ANSWER.to_string();
        (self.report.checks).push(CheckOutcome::new(CheckKind::Builtin, name, healthy));
        ok
    }

    /// Runs the spec's HTTP checks and commands against the restored app.
    pub async fn check(&mut self, spec: &DrillSpec) {
        let Some(url) = self.url().map(str::to_string) else {
            return;
        };
        for http in &spec.http_checks {
            self.report.checks.push(check::run_http(http, &url).await);
        }
        let data_dir = self.report.sandbox.join("app");
        for command in &spec.commands {
            (self.report.checks).push(check::run_command(command, &url, &data_dir).await);
        }
    }

    /// Stops the app, removes the sandbox (unless kept), writes the report.
    pub async fn finish(mut self) -> DrillReport {
        if let Some(restored) = self.restored.take()
            && let Err(e) = restored.finish().await
        {
            (self.report.error).get_or_insert(format!("cannot stop the restored app: {e}"));
        }
        let report = &mut self.report;
        if !self.keep
            && let Err(e) = std::fs::remove_dir_all(&report.sandbox)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            report.error.get_or_insert(format!(
                "cannot remove the sandbox {}: {e}",
                report.sandbox.display()
            ));
        }
        report.ok = report.error.is_none() && report.checks.iter().all(|c| c.ok);
        if let Err(e) = report.write(&self.dir) {
            report.ok = false;
            report.error.get_or_insert(format!(
                "cannot write the report in {}: {e}",
                self.dir.display()
            ));
        }
        tracing::info!(drill = %report.id, ok = report.ok, rto = ?report.rto_seconds, "drill finished");
        self.report
    }
}

async fn restore(
    spec: &DrillSpec,
    sandbox: &Path,
    progress: &dyn Progress,
) -> Result<Restored, String> {
    let reader = Reader::open(spec.store.clone(), spec.protection.clone())
        .await
        .map_err(|e| e.to_string())?;
    let options = RestoreOptions {
        data_dir: PathBuf::new(),
        target: spec.target,
        out: sandbox.join("app"),
        from_scratch: false,
        app_url: spec.app_url.clone(),
        check: None,
    };
    let archive = ArchiveRestore {
        reader,
        settings: spec.settings.clone(),
    };
    restore::restore_running(archive, options, progress)
        .await
        .map_err(|e| e.to_string())
}

fn record_restore(report: &mut DrillReport, restored: &Restored, started: Instant) {
    let r = &restored.report;
    report.restore_seconds = Some(started.elapsed().as_secs_f64());
    report.restored_index = Some(r.target_index);
    if r.target_entry_time_us > 0 {
        report.restored_time = Some(rfc3339(r.target_entry_time_us));
        let age = report.started_unix_s - r.target_entry_time_us as f64 / 1e6;
        report.data_age_seconds = Some(age.max(0.0));
    }
    report.checkpoint_index = r.checkpoint_index;
    report.checkpoint_bytes = r.checkpoint_bytes;
    report.entries_replayed = r.entries_replayed;
    report.bytes_replayed = r.bytes_replayed;
    let base = r.checkpoint_index.map_or(
        "no checkpoint (replayed from the first entry)".to_string(),
        |c| format!("checkpoint {c} authenticated and its checksums verified"),
    );
    let verified = format!(
        "{base}; {} entries up to index {} authenticated, continuous and replayed",
        r.entries_replayed, r.target_index
    );
    let name = RESTORE_VERIFIED.to_string();
    report
        .checks
        .push(CheckOutcome::new(CheckKind::Builtin, name, Ok(verified)));
}

/// Until `first` passes (or, without it, until the app answers anything), at most
/// `within`; what the last try found when it never did.
async fn first_healthy_answer(
    first: Option<&HttpCheck>,
    url: &str,
    within: Duration,
) -> Result<String, String> {
    let started = Instant::now();
    let app = AppClient::new(url, HEALTH_TIMEOUT);
    loop {
        let outcome = match first {
            Some(http) => check::run_http(http, url).await,
            None => {
                let answer = app.read("GET", "/", &[], bytes::Bytes::new()).await;
                let verdict = answer
                    .map(|r| format!("GET / answered {}", r.status))
                    .map_err(|e| e.to_string());
                CheckOutcome::new(CheckKind::Builtin, String::new(), verdict)
            }
        };
        if outcome.ok {
            return Ok(format!(
                "after {:.3} s: {}",
                started.elapsed().as_secs_f64(),
                outcome.detail
            ));
        }
        if started.elapsed() >= within {
            return Err(format!("none within {within:?}; last: {}", outcome.detail));
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}
