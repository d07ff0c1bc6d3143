//! Managed mode: Haven starts this node's replica of the app, keeps it running, and stops
//! it around work that replaces its data directory (a checkpoint restore).
//!
//! One supervisor task owns the child process. [`ManagedApp`] talks to it over a channel,
//! so a stop or a restore never races a restart: the supervisor does one thing at a time,
//! and a caller that gives up waiting cannot leave the app half-stopped.
//!
//! # The app must not outlive Haven
//!
//! A replica left running by a dead node keeps its port, and the node's next start would
//! then health-check (and deliver to) the wrong process. Three layers prevent that:
//!
//! 1. `PR_SET_PDEATHSIG(SIGKILL)`, set in the child before `exec`: the kernel kills the app
//!    when Haven dies, even by `kill -9`. The signal fires when the *thread* that forked
//!    the child exits, not the process, and tokio threads come and go (blocking-pool
//!    threads after 10 s idle, a worker after `block_in_place`). So every app is forked
//!    from one dedicated thread that lives as long as the process ([`spawn_child`]).
//! 2. `kill_on_drop` plus a process-group kill when the supervisor goes away (the
//!    [`ManagedApp`] is dropped or the runtime shuts down).
//! 3. A pid file: the next start kills a leftover process whose command line (and the
//!    environment Haven sets) matches this app's exactly. That covers the window between
//!    fork and `prctl`, and an app whose title or parent changed under pdeathsig's feet.
//!
//! The app runs in its own process group, so a stop reaches helpers a shell wrapper
//! started. A grandchild that survives a `kill -9` of Haven is not covered by 1 or 3
//! (pdeathsig is per process); apps should `exec` their server. If anything still holds
//! the port, [`ManagedApp::start`] fails at once and says so.

use std::io;
use std::io::Read;
use std::io::Seek;
use std::io::SeekFrom;
use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rustix::process::Pid;
use rustix::process::Signal;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::time::Instant;

use haven_base::metrics::Metrics;
use haven_base::workers::Workers;

/// Placeholder replaced by the data directory in arguments and environment values.
pub const DATA_DIR_PLACEHOLDER: &str = "{data_dir}";
/// Placeholders replaced by where the app listens (from its url): `host:port`, the host
/// alone, the port alone. A restore or drill runs the app on an address of its own
/// through them.
pub const ADDRESS_PLACEHOLDERS: [&str; 3] = ["{listen}", "{host}", "{port}"];
/// How often a starting app is probed.
const HEALTH_POLL: Duration = Duration::from_millis(20);
/// First restart delay after an unexpected exit; doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// An app that ran this long before dying gets a fresh backoff: it was not crash-looping.
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// How long a leftover process from a previous run gets to vanish after SIGKILL.
const STALE_EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the "is the port already taken" probe waits for a connect.
const PORT_PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Lines of the app's log quoted when it dies during start.
const TAIL_LINES: usize = 20;
const TAIL_BYTES: u64 = 64 * 1024;

/// How to start the app (from the `[app]` config table).
#[derive(Debug, Clone)]
pub struct AppCommand {
    /// Program and arguments; `{data_dir}` anywhere in an argument becomes `data_dir`,
    /// and `{listen}`, `{host}`, `{port}` the address of `url`.
    pub argv: Vec<String>,
    /// Extra environment; placeholders in values are replaced as in `argv`.
    pub env: Vec<(String, String)>,
    /// The app's own state; created if missing, replaced by restores.
    pub data_dir: PathBuf,
    /// Where the app listens (`http://host:port`), for health checks.
    pub url: String,
}

impl AppCommand {
    /// The argv actually run: placeholders replaced (a non-UTF-8 path is replaced lossily).
    pub fn resolved_argv(&self) -> Vec<String> {
        self.argv.iter().map(|arg| self.resolve(arg)).collect()
    }

    /// The environment actually set, placeholders replaced.
    pub fn resolved_env(&self) -> Vec<(String, String)> {
        let resolve = |(k, v): &(String, String)| (k.clone(), self.resolve(v));
        self.env.iter().map(resolve).collect()
    }

    fn resolve(&self, text: &str) -> String {
        let text = text.replace(DATA_DIR_PLACEHOLDER, &self.data_dir.to_string_lossy());
        let Some((host, port)) = host_and_port(&self.url) else {
            return text;
        };
        let [listen, host_placeholder, port_placeholder] = ADDRESS_PLACEHOLDERS;
        text.replace(listen, &format!("{host}:{port}"))
            .replace(host_placeholder, &host)
            .replace(port_placeholder, &port.to_string())
    }

    /// Whether the command says where the app listens in a form that can be changed: an
    /// address placeholder, or the url's own `host:port` written out, in an argument or
    /// an environment value.
    pub fn names_its_address(&self) -> bool {
        let literal = host_port(&self.url);
        let names = |text: &str| {
            ADDRESS_PLACEHOLDERS.iter().any(|p| text.contains(p))
                || literal.as_deref().is_some_and(|l| text.contains(l))
        };
        self.argv.iter().any(|a| names(a)) || self.env.iter().any(|(_, v)| names(v))
    }
}

/// Files Haven keeps next to (not inside) the app's data directory, so a restore that
/// replaces the data directory keeps them.
#[derive(Debug, Clone)]
pub struct AppFiles {
    /// The app's stdout and stderr, appended across restarts.
    pub log: PathBuf,
    /// The running app's pid, to find a process a killed Haven left behind.
    pub pid: PathBuf,
}

impl AppFiles {
    /// `<dir>/app.log` and `<dir>/app.pid`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            log: dir.join("app.log"),
            pid: dir.join("app.pid"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("app command is empty (data dir {})", data_dir.display())]
    EmptyCommand { data_dir: PathBuf },
    #[error("app url {url} has no host and port to check (app `{command}`)")]
    BadUrl { command: String, url: String },
    #[error("cannot create data dir {} for app `{command}`: {source}", path.display())]
    DataDir {
        command: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot open log file {} for app `{command}`: {source}", path.display())]
    LogFile {
        command: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot write pid file {} for app `{command}`: {source}", path.display())]
    PidFile {
        command: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot start app `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error(
        "app `{command}` exited with {} before answering on {url} within {timeout:?}; \
         last lines of {}:\n{tail}",
        describe_exit(*status),
        log.display()
    )]
    ExitedEarly {
        command: String,
        /// `None`: waiting for it failed.
        status: Option<ExitStatus>,
        url: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("app `{command}` did not become healthy at {url} within {timeout:?}")]
    Unhealthy {
        command: String,
        url: String,
        timeout: Duration,
    },
    #[error(
        "app port {addr} is already in use by another process (app `{command}`, data dir {})",
        data_dir.display()
    )]
    PortInUse {
        command: String,
        addr: String,
        data_dir: PathBuf,
    },
    #[error(
        "app process {pid} left by a previous run (pid file {}) still runs {timeout:?} \
         after SIGKILL",
        pid_file.display()
    )]
    StaleSurvived {
        pid: u32,
        pid_file: PathBuf,
        timeout: Duration,
    },
    #[error("cannot stop app `{command}` (pid {pid}): {source}")]
    Stop {
        command: String,
        pid: u32,
        source: io::Error,
    },
    #[error("app `{command}` (data dir {}) was stopped", data_dir.display())]
    Stopped { command: String, data_dir: PathBuf },
}

/// Why [`ManagedApp::with_stopped`] failed; the variant says whether the work ran.
#[derive(Debug, thiserror::Error)]
pub enum StoppedWorkError<E> {
    /// The app could not be stopped (or was stopped for good); the work did not run.
    #[error("{0}")]
    NotStopped(ProcessError),
    /// The work failed; the app was started again on whatever it left in the data dir.
    #[error("{0}")]
    Work(E),
    /// The work succeeded but the app did not come back healthy; the supervisor keeps
    /// restarting it with backoff.
    #[error("{0}")]
    Restart(ProcessError),
}

/// A supervised app process. Dropping it kills the app.
pub struct ManagedApp {
    spec: Arc<Spec>,
    control: mpsc::UnboundedSender<Control>,
    pid: Arc<AtomicU32>,
}

impl std::fmt::Debug for ManagedApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedApp")
            .field("command", &self.spec.command)
            .field("data_dir", &self.spec.cmd.data_dir)
            .field("pid", &self.pid())
            .finish()
    }
}

impl ManagedApp {
    /// Kills a leftover of a previous run, checks the port is free, creates the data dir,
    /// spawns the app (stdin null, output appended to `files.log`) and waits until it
    /// answers HTTP (any status) within `start_timeout`.
    pub async fn start(
        cmd: AppCommand,
        files: AppFiles,
        start_timeout: Duration,
        metrics: Metrics,
        workers: &Workers,
    ) -> Result<ManagedApp, ProcessError> {
        let spec = Arc::new(Spec::new(cmd, files, start_timeout, metrics)?);
        spec.kill_stale().await?;
        spec.check_port_free().await?;
        let running = spec.launch().await?;
        let pid = Arc::new(AtomicU32::new(0));
        let (control, inbox) = mpsc::unbounded_channel();
        let supervisor = Supervisor {
            spec: spec.clone(),
            inbox,
            pid: pid.clone(),
            backoff: BACKOFF_START,
        };
        supervisor.set_pid(Some(running.pid));
        workers.spawn("app-supervisor", supervisor.run(running));
        Ok(ManagedApp { spec, control, pid })
    }

    /// SIGTERM to the app's process group, up to `grace` to exit, then SIGKILL; reaps it
    /// and ends supervision. Idempotent: stopping a stopped app succeeds.
    pub async fn stop(&self, grace: Duration) -> Result<(), ProcessError> {
        let (done, answer) = oneshot::channel();
        if self.control.send(Control::Stop { grace, done }).is_err() {
            return Ok(());
        }
        // A dropped answer means another stop ended the supervisor first.
        answer.await.unwrap_or(Ok(()))
    }

    /// Stops the app (as [`stop`](Self::stop)), runs `work` on a blocking thread with the
    /// data dir path, then starts the app again and waits until it is healthy. The
    /// supervisor does nothing else meanwhile, so nothing restarts the app under `work`.
    /// It runs to the end even if the caller stops waiting. A panic in `work` is resumed
    /// here, after the app was restarted.
    pub async fn with_stopped<T, E, F>(
        &self,
        grace: Duration,
        work: F,
    ) -> Result<T, StoppedWorkError<E>>
    where
        F: FnOnce(&Path) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let (result_tx, result_rx) = oneshot::channel();
        let work: Work = Box::new(move |dir: &Path| {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| work(dir)));
            let _ = result_tx.send(outcome);
        });
        let (done, answer) = oneshot::channel();
        let sent = self.control.send(Control::Exclusive { grace, work, done });
        let stopped = || StoppedWorkError::NotStopped(self.spec.stopped_error());
        sent.map_err(|_| stopped())?;
        let restarted = match answer.await {
            Ok(ExclusiveOutcome::NotStopped(e)) => return Err(StoppedWorkError::NotStopped(e)),
            Ok(ExclusiveOutcome::Restarted(result)) => result,
            Err(_) => return Err(stopped()),
        };
        match result_rx.await {
            Ok(Ok(Ok(value))) => restarted.map(|()| value).map_err(StoppedWorkError::Restart),
            Ok(Ok(Err(e))) => Err(StoppedWorkError::Work(e)),
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => Err(stopped()),
        }
    }

    /// The running app's pid; `None` while it is down (stopped, or between restarts).
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Relaxed) {
            0 => None,
            pid => Some(pid),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.spec.cmd.data_dir
    }

    /// The argv as run, for messages.
    pub fn command_line(&self) -> &str {
        &self.spec.command
    }
}

type Work = Box<dyn FnOnce(&Path) + Send>;

enum Control {
    Stop {
        grace: Duration,
        done: oneshot::Sender<Result<(), ProcessError>>,
    },
    Exclusive {
        grace: Duration,
        work: Work,
        done: oneshot::Sender<ExclusiveOutcome>,
    },
}

enum ExclusiveOutcome {
    NotStopped(ProcessError),
    Restarted(Result<(), ProcessError>),
}

/// Everything fixed about the app, resolved once.
struct Spec {
    cmd: AppCommand,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    /// `argv` joined by spaces, for messages.
    command: String,
    /// `host:port` from the url.
    addr: String,
    files: AppFiles,
    start_timeout: Duration,
    metrics: Metrics,
}

impl Spec {
    fn new(
        cmd: AppCommand,
        files: AppFiles,
        start_timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, ProcessError> {
        let argv = cmd.resolved_argv();
        if argv.is_empty() {
            let data_dir = cmd.data_dir.clone();
            return Err(ProcessError::EmptyCommand { data_dir });
        }
        let command = argv.join(" ");
        let Some(addr) = host_port(&cmd.url) else {
            let url = cmd.url.clone();
            return Err(ProcessError::BadUrl { command, url });
        };
        let env = cmd.resolved_env();
        Ok(Self {
            cmd,
            argv,
            env,
            command,
            addr,
            files,
            start_timeout,
            metrics,
        })
    }

    /// Spawns the app and waits until it answers; kills it if it does not in time.
    async fn launch(&self) -> Result<Running, ProcessError> {
        let mut running = self.spawn().await?;
        let event = tokio::select! {
            status = running.child.wait() => Err(status),
            healthy = wait_healthy(&self.addr, self.start_timeout) => Ok(healthy),
        };
        match event {
            Ok(true) => Ok(running),
            Err(status) => Err(self.exited_early(&running, status)),
            Ok(false) => {
                running.kill_now().await;
                Err(ProcessError::Unhealthy {
                    command: self.command.clone(),
                    url: self.cmd.url.clone(),
                    timeout: self.start_timeout,
                })
            }
        }
    }

    /// Starts the process without waiting for it to answer, and records its pid.
    async fn spawn(&self) -> Result<Running, ProcessError> {
        let data_dir = &self.cmd.data_dir;
        std::fs::create_dir_all(data_dir).map_err(|source| ProcessError::DataDir {
            command: self.command.clone(),
            path: data_dir.clone(),
            source,
        })?;
        let (stdout, stderr, log_start) = self.open_log().map_err(|source| {
            let path = self.files.log.clone();
            ProcessError::LogFile {
                command: self.command.clone(),
                path,
                source,
            }
        })?;
        let command = self.command(stdout, stderr);
        let spawn_error = |source| ProcessError::Spawn {
            command: self.command.clone(),
            source,
        };
        let child = spawn_child(command).await.map_err(spawn_error)?;
        let pid = child
            .id()
            .ok_or_else(|| spawn_error(io::Error::other("exited at once")))?;
        let running = Running {
            child,
            pid,
            started: Instant::now(),
            log_start,
        };
        std::fs::write(&self.files.pid, format!("{pid}\n")).map_err(|source| {
            let path = self.files.pid.clone();
            ProcessError::PidFile {
                command: self.command.clone(),
                path,
                source,
            }
        })?;
        Ok(running)
    }

    /// The app's command: own process group (a stop reaches its helpers), killed when
    /// dropped or when Haven dies.
    fn command(&self, stdout: std::fs::File, stderr: std::fs::File) -> Command {
        let mut command = Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .process_group(0);
        die_with_haven(&mut command);
        command
    }

    /// The log file twice (stdout, stderr) in append mode, and where this run's output starts.
    fn open_log(&self) -> io::Result<(std::fs::File, std::fs::File, u64)> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.files.log)?;
        let start = file.metadata()?.len();
        Ok((file.try_clone()?, file, start))
    }

    fn exited_early(&self, running: &Running, status: io::Result<ExitStatus>) -> ProcessError {
        signal_group(running.pid, Signal::KILL);
        ProcessError::ExitedEarly {
            command: self.command.clone(),
            status: status.ok(),
            url: self.cmd.url.clone(),
            timeout: self.start_timeout,
            log: self.files.log.clone(),
            tail: read_tail(&self.files.log, running.log_start),
        }
    }

    /// Kills the process a previous run recorded in the pid file, if it is still this app.
    async fn kill_stale(&self) -> Result<(), ProcessError> {
        let Some(pid) = read_pid_file(&self.files.pid) else {
            return Ok(());
        };
        if !self.is_this_app(pid) {
            return Ok(());
        }
        tracing::warn!(
            pid,
            app = %self.command,
            pid_file = %self.files.pid.display(),
            "killing the app process a previous run left behind"
        );
        signal_group(pid, Signal::KILL);
        signal_pid(pid, Signal::KILL);
        let deadline = Instant::now() + STALE_EXIT_TIMEOUT;
        while is_alive(pid) {
            if Instant::now() >= deadline {
                return Err(ProcessError::StaleSurvived {
                    pid,
                    pid_file: self.files.pid.clone(),
                    timeout: STALE_EXIT_TIMEOUT,
                });
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
        Ok(())
    }

    /// Whether `pid` runs our command line with our environment: only then is it ours to
    /// kill (a recycled pid belongs to someone else).
    fn is_this_app(&self, pid: u32) -> bool {
        if pid == std::process::id() || !is_alive(pid) {
            return false;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        if !same_command_line(&cmdline, &self.argv) {
            return false;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            return self.env.is_empty();
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        self.env
            .iter()
            .all(|(k, v)| vars.contains(&format!("{k}={v}").as_bytes()))
    }

    /// Fails fast when something else answers on the app's port: the app could not bind,
    /// and health checks would reach the wrong process.
    async fn check_port_free(&self) -> Result<(), ProcessError> {
        let connect = tokio::time::timeout(PORT_PROBE_TIMEOUT, TcpStream::connect(&self.addr));
        match connect.await {
            Ok(Ok(_)) => Err(ProcessError::PortInUse {
                command: self.command.clone(),
                addr: self.addr.clone(),
                data_dir: self.cmd.data_dir.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn remove_pid_file(&self) {
        match std::fs::remove_file(&self.files.pid) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                let pid_file = self.files.pid.display();
                tracing::warn!(error = %e, %pid_file, "cannot remove app pid file");
            }
            _ => {}
        }
    }

    fn stopped_error(&self) -> ProcessError {
        ProcessError::Stopped {
            command: self.command.clone(),
            data_dir: self.cmd.data_dir.clone(),
        }
    }
}

/// A spawned app. Dropping it kills its whole process group unless it was reaped.
struct Running {
    child: Child,
    pid: u32,
    started: Instant,
    /// Length of the log file when this run started: its own output comes after.
    log_start: u64,
}

impl Running {
    /// SIGTERM to the group, `grace` to exit, then SIGKILL; reaps the app and kills what
    /// is left of its group.
    async fn terminate(mut self, grace: Duration) -> io::Result<ExitStatus> {
        signal_group(self.pid, Signal::TERM);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                signal_group(self.pid, Signal::KILL);
                self.child.wait().await
            }
        };
        signal_group(self.pid, Signal::KILL);
        status
    }

    async fn kill_now(self) {
        let _ = self.terminate(Duration::ZERO).await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal_group(self.pid, Signal::KILL);
        }
    }
}

/// The task that owns the app: restarts it after unexpected exits, performs stops and
/// exclusive work in the order asked.
struct Supervisor {
    spec: Arc<Spec>,
    inbox: mpsc::UnboundedReceiver<Control>,
    pid: Arc<AtomicU32>,
    /// Delay before the next restart.
    backoff: Duration,
}

enum Slot {
    Up(Box<Running>),
    /// Down after an unexpected exit (or a failed start); restart due at this instant.
    Down(Instant),
}

enum Event {
    Exited(io::Result<ExitStatus>),
    Retry,
    Control(Option<Control>),
}

impl Supervisor {
    async fn run(mut self, first: Running) {
        let mut slot = Slot::Up(Box::new(first));
        loop {
            let event = match &mut slot {
                Slot::Up(running) => tokio::select! {
                    status = running.child.wait() => Event::Exited(status),
                    control = self.inbox.recv() => Event::Control(control),
                },
                Slot::Down(at) => tokio::select! {
                    () = tokio::time::sleep_until(*at) => Event::Retry,
                    control = self.inbox.recv() => Event::Control(control),
                },
            };
            slot = match event {
                Event::Exited(status) => self.exited(slot, status),
                Event::Retry => self.restart().await,
                // The ManagedApp was dropped: dropping `slot` kills the app.
                Event::Control(None) => return self.set_pid(None),
                Event::Control(Some(Control::Stop { grace, done })) => {
                    let _ = done.send(self.halt(slot, grace).await);
                    return;
                }
                Event::Control(Some(Control::Exclusive { grace, work, done })) => {
                    self.exclusive(slot, grace, work, done).await
                }
            };
        }
    }

    fn exited(&mut self, slot: Slot, status: io::Result<ExitStatus>) -> Slot {
        let Slot::Up(running) = slot else {
            return slot;
        };
        signal_group(running.pid, Signal::KILL);
        self.set_pid(None);
        if running.started.elapsed() >= BACKOFF_RESET {
            self.backoff = BACKOFF_START;
        }
        tracing::warn!(
            app = %self.spec.command,
            pid = running.pid,
            status = %describe_status(&status),
            restart_in = ?self.backoff,
            "managed app exited unexpectedly"
        );
        self.down()
    }

    async fn restart(&mut self) -> Slot {
        self.spec.metrics.app_restarts.inc();
        match self.spec.spawn().await {
            Ok(running) => {
                let pid = running.pid;
                tracing::info!(app = %self.spec.command, pid, "managed app restarted");
                self.set_pid(Some(running.pid));
                Slot::Up(Box::new(running))
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?self.backoff, "cannot restart managed app");
                self.down()
            }
        }
    }

    /// Down until the current backoff has passed; the next one is twice as long.
    fn down(&mut self) -> Slot {
        let delay = self.backoff;
        self.backoff = (delay * 2).min(BACKOFF_MAX);
        Slot::Down(Instant::now() + delay)
    }

    async fn halt(&mut self, slot: Slot, grace: Duration) -> Result<(), ProcessError> {
        self.set_pid(None);
        self.spec.remove_pid_file();
        let Slot::Up(running) = slot else {
            return Ok(());
        };
        let pid = running.pid;
        let status = running.terminate(grace).await;
        let command = self.spec.command.clone();
        let status = status.map_err(|source| ProcessError::Stop {
            command,
            pid,
            source,
        })?;
        let status = describe_exit(Some(status));
        tracing::info!(app = %self.spec.command, pid, %status, "managed app stopped");
        Ok(())
    }

    /// Stop, run `work` on a blocking thread, start again and wait for health.
    async fn exclusive(
        &mut self,
        slot: Slot,
        grace: Duration,
        work: Work,
        done: oneshot::Sender<ExclusiveOutcome>,
    ) -> Slot {
        if let Err(e) = self.halt(slot, grace).await {
            let _ = done.send(ExclusiveOutcome::NotStopped(e));
            return self.down();
        }
        let dir = self.spec.cmd.data_dir.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || work(&dir)).await {
            tracing::warn!(error = %e, "work on the stopped app's data dir did not finish");
        }
        let (slot, result) = match self.spec.launch().await {
            Ok(running) => {
                self.backoff = BACKOFF_START;
                self.set_pid(Some(running.pid));
                (Slot::Up(Box::new(running)), Ok(()))
            }
            Err(e) => {
                let retry_in = self.backoff;
                tracing::warn!(error = %e, ?retry_in, "managed app did not come back");
                (self.down(), Err(e))
            }
        };
        let _ = done.send(ExclusiveOutcome::Restarted(result));
        slot
    }

    fn set_pid(&self, pid: Option<u32>) {
        let pid = pid.unwrap_or(0);
        self.pid.store(pid, Ordering::Relaxed);
        self.spec.metrics.app_managed_pid.set(i64::from(pid));
    }
}

/// Polls until the app answers HTTP or `timeout` passes.
async fn wait_healthy(addr: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if probe(addr, deadline).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// One `GET /`: healthy when any HTTP response starts arriving before `deadline`. A
/// listener that accepted but is still loading counts only once it answers.
async fn probe(addr: &str, deadline: Instant) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.ok()?;
        (&head == b"HTTP/").then_some(())
    };
    matches!(
        tokio::time::timeout_at(deadline, attempt).await,
        Ok(Some(()))
    )
}

/// Whether the app at `url` answers HTTP within `timeout` (any status): what a health
/// check asks of a replica that may be idle, where no failed delivery would tell.
pub async fn answers_http(url: &str, timeout: Duration) -> bool {
    match host_port(url) {
        Some(addr) => probe(&addr, Instant::now() + timeout).await,
        None => false,
    }
}

/// `host:port` of an `http://` url (port 80 when absent).
fn host_port(url: &str) -> Option<String> {
    let (host, port) = host_and_port(url)?;
    Some(format!("{host}:{port}"))
}

fn host_and_port(url: &str) -> Option<(String, u16)> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host().filter(|h| !h.is_empty())?;
    Some((host.to_string(), uri.port_u16().unwrap_or(80)))
}

type LaunchJob = Box<dyn FnOnce() + Send>;

/// The thread every app is forked from; it never exits, so the children's parent-death
/// signal fires only when the Haven process dies.
fn launcher() -> Option<&'static std::sync::mpsc::Sender<LaunchJob>> {
    static LAUNCHER: OnceLock<Option<std::sync::mpsc::Sender<LaunchJob>>> = OnceLock::new();
    let start = || {
        let (tx, rx) = std::sync::mpsc::channel::<LaunchJob>();
        let run = move || {
            for job in rx {
                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
            }
        };
        let thread = std::thread::Builder::new().name("haven-app-launcher".into());
        thread.spawn(run).ok().map(|_| tx)
    };
    LAUNCHER.get_or_init(start).as_ref()
}

/// Spawns `command` on the launcher thread, registered with the caller's runtime.
async fn spawn_child(mut command: Command) -> io::Result<Child> {
    let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
    let gone = || io::Error::other("the app launcher thread is not running");
    let launcher = launcher().ok_or_else(gone)?;
    let (tx, rx) = oneshot::channel();
    let job: LaunchJob = Box::new(move || {
        let _runtime = runtime.enter();
        let _ = tx.send(command.spawn());
    });
    launcher.send(job).map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

/// Asks the kernel to SIGKILL the app when the thread that forked it (the launcher, so in
/// effect Haven) dies, and refuses to run if Haven already died during the fork.
fn die_with_haven(command: &mut Command) {
    let parent = rustix::process::getpid();
    let in_child = move || -> io::Result<()> {
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        if rustix::process::getppid() != Some(parent) {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::SRCH.raw_os_error(),
            ));
        }
        Ok(())
    };
    // SAFETY: runs in the forked child before exec; it only makes the prctl and getppid
    // system calls (async-signal-safe) and allocates nothing.
    unsafe {
        command.pre_exec(in_child);
    }
}

/// Signals the process group led by `pid`. Errors (mostly "no such process") are moot:
/// the group is gone.
fn signal_group(pid: u32, signal: Signal) {
    if let Some(pid) = to_pid(pid) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

fn signal_pid(pid: u32, signal: Signal) {
    if let Some(pid) = to_pid(pid) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Never 0 (which would mean our own process group) and never negative.
fn to_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().and_then(Pid::from_raw)
}

/// Alive means running: a zombie has released its sockets and files.
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    !matches!(state, None | Some('Z' | 'X'))
}

/// `cmdline` (NUL-separated, from `/proc`) runs `argv`: same arguments, and a program
/// with the same file name, since a launcher such as a pyenv shim re-execs the
/// program by its full path.
fn same_command_line(cmdline: &[u8], argv: &[String]) -> bool {
    let mut args = cmdline
        .strip_suffix(b"\0")
        .unwrap_or(cmdline)
        .split(|b| *b == 0);
    let file_name = |program: &[u8]| program.rsplit(|b| *b == b'/').next().map(<[u8]>::to_vec);
    let program_matches = match (args.next(), argv.first()) {
        (Some(theirs), Some(ours)) => file_name(theirs) == file_name(ours.as_bytes()),
        _ => false,
    };
    program_matches && args.eq(argv[1..].iter().map(|a| a.as_bytes()))
}

fn read_pid_file(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse().ok().filter(|pid| *pid > 0)
}

fn describe_status(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => describe_exit(Some(*status)),
        Err(e) => format!("unknown status ({e})"),
    }
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    let Some(status) = status else {
        return "unknown status".into();
    };
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// The last lines the app wrote since `from`, for an error message.
fn read_tail(path: &Path, from: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(from.max(len.saturating_sub(TAIL_BYTES))))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Serves the file named by `STATE_FILE` (empty if missing) on the port in argv[1].
    const APP: &str = r#"
import http.server, os, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            body = open(os.environ["STATE_FILE"], "rb").read()
        except FileNotFoundError:
            body = b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

    const START: Duration = Duration::from_secs(10);
    const GRACE: Duration = Duration::from_secs(2);

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        cmd: AppCommand,
        files: AppFiles,
        metrics: Metrics,
    }

    fn fixture(argv: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cmd = command(argv, dir.path(), free_port());
        let files = AppFiles::in_dir(dir.path());
        let metrics = Metrics::new().unwrap();
        Fixture {
            _dir: dir,
            cmd,
            files,
            metrics,
        }
    }

    fn command(argv: &[&str], dir: &Path, port: u16) -> AppCommand {
        AppCommand {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec![("STATE_FILE".into(), "{data_dir}/state.txt".into())],
            data_dir: dir.join("app"),
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn python_app() -> Fixture {
        fixture(&["python3", "-c", APP, "{port}", "{data_dir}"])
    }

    async fn start(f: &Fixture) -> Result<ManagedApp, ProcessError> {
        ManagedApp::start(
            f.cmd.clone(),
            f.files.clone(),
            START,
            f.metrics.clone(),
            &Workers::new(),
        )
        .await
    }

    /// The app's answer to `GET /`, or `None` if it does not answer.
    async fn get(url: &str) -> Option<String> {
        let addr = host_port(url)?;
        let mut stream = TcpStream::connect(&addr).await.ok()?;
        let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response.split("\r\n\r\n").nth(1)?.to_string())
    }

    async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn start_waits_until_the_app_answers() {
        let f = python_app();
        let app = start(&f).await.unwrap();
        let pid = app.pid().unwrap();
        assert!(is_alive(pid));
        assert_eq!(get(&f.cmd.url).await.as_deref(), Some(""));
        assert_eq!(f.metrics.app_managed_pid.get(), i64::from(pid));
        assert_eq!(read_pid_file(&f.files.pid), Some(pid));
        assert!(f.cmd.data_dir.is_dir(), "data dir is created");
        app.stop(GRACE).await.unwrap();
    }

    #[tokio::test]
    async fn a_killed_app_is_restarted() {
        let f = python_app();
        let app = start(&f).await.unwrap();
        let first = app.pid().unwrap();
        signal_pid(first, Signal::KILL);
        eventually("the app is back", async || {
            app.pid().is_some_and(|p| p != first) && get(&f.cmd.url).await.is_some()
        })
        .await;
        assert_eq!(f.metrics.app_restarts.get(), 1);
        assert!(!is_alive(first));
        assert_eq!(read_pid_file(&f.files.pid), app.pid());
        app.stop(GRACE).await.unwrap();
    }

    #[tokio::test]
    async fn stop_is_final_and_idempotent() {
        let f = python_app();
        let app = start(&f).await.unwrap();
        let pid = app.pid().unwrap();
        app.stop(GRACE).await.unwrap();
        assert!(!is_alive(pid));
        assert_eq!(app.pid(), None);
        assert_eq!(f.metrics.app_managed_pid.get(), 0);
        assert!(!f.files.pid.exists());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(get(&f.cmd.url).await, None, "not restarted after stop");
        assert_eq!(f.metrics.app_restarts.get(), 0);
        app.stop(GRACE).await.unwrap();
        let err = app
            .with_stopped(GRACE, |_| Ok::<_, io::Error>(()))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StoppedWorkError::NotStopped(ProcessError::Stopped { .. })
        ));
    }

    #[tokio::test]
    async fn stop_kills_an_app_that_ignores_sigterm() {
        let script = "import signal, time, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n";
        let serve = APP.replace(
            "print(",
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(",
        );
        let f = fixture(&["python3", "-c", &format!("{script}{serve}"), "{port}"]);
        let app = start(&f).await.unwrap();
        let pid = app.pid().unwrap();
        let started = std::time::Instant::now();
        app.stop(Duration::from_millis(300)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(!is_alive(pid));
    }

    #[tokio::test]
    async fn with_stopped_replaces_data_while_the_app_is_down() {
        let f = python_app();
        let state = f.cmd.data_dir.join("state.txt");
        std::fs::create_dir_all(&f.cmd.data_dir).unwrap();
        std::fs::write(&state, "old").unwrap();
        let app = start(&f).await.unwrap();
        assert_eq!(get(&f.cmd.url).await.as_deref(), Some("old"));
        let before = app.pid().unwrap();
        let addr = host_port(&f.cmd.url).unwrap();
        let seen = app
            .with_stopped(GRACE, move |dir| {
                let down = std::net::TcpStream::connect(&addr).is_err();
                std::fs::write(dir.join("state.txt"), "new")?;
                Ok::<_, io::Error>(down)
            })
            .await
            .unwrap();
        assert!(seen, "the app was down while the work ran");
        assert_eq!(get(&f.cmd.url).await.as_deref(), Some("new"));
        assert!(!is_alive(before));
        assert_ne!(app.pid(), Some(before));
        assert_eq!(f.metrics.app_restarts.get(), 0);
        let err = app
            .with_stopped(GRACE, |_| Err::<(), _>("bad checkpoint"))
            .await;
        assert!(matches!(err, Err(StoppedWorkError::Work("bad checkpoint"))));
        assert_eq!(
            get(&f.cmd.url).await.as_deref(),
            Some("new"),
            "running again"
        );
        app.stop(GRACE).await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let f = fixture(&["/nonexistent/haven-app", "--port", "{port}"]);
        let err = start(&f).await.err().unwrap();
        let port = host_port(&f.cmd.url).unwrap().replace("127.0.0.1:", "");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot start app `/nonexistent/haven-app --port {port}`: \
                 No such file or directory (os error 2)"
            )
        );
    }

    #[tokio::test]
    async fn an_app_that_exits_at_once_reports_status_and_output() {
        let f = fixture(&["sh", "-c", "echo starting; echo boom >&2; exit 3"]);
        std::fs::write(&f.files.log, "output of an earlier run\n").unwrap();
        let err = start(&f).await.err().unwrap().to_string();
        let expected = format!(
            "app `sh -c echo starting; echo boom >&2; exit 3` exited with status 3 before \
             answering on {} within 10s; last lines of {}:\nstarting\nboom",
            f.cmd.url,
            f.files.log.display()
        );
        assert_eq!(err, expected);
    }

    #[tokio::test]
    async fn an_app_that_never_answers_times_out_and_is_killed() {
        let f = fixture(&["sleep", "30"]);
        let workers = Workers::new();
        let started = ManagedApp::start(
            f.cmd.clone(),
            f.files.clone(),
            Duration::from_millis(300),
            f.metrics.clone(),
            &workers,
        );
        let err = started.await.err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "app `sleep 30` did not become healthy at {} within 300ms",
                f.cmd.url
            )
        );
        let pid = read_pid_file(&f.files.pid).unwrap();
        assert!(!is_alive(pid));
    }

    #[test]
    fn data_dir_is_substituted_in_arguments_and_environment() {
        let cmd = AppCommand {
            argv: vec![
                "app".into(),
                "--db={data_dir}/db".into(),
                "{data_dir}".into(),
            ],
            env: vec![("DIR".into(), "x:{data_dir}:{data_dir}".into())],
            data_dir: PathBuf::from("/var/haven/1"),
            url: "http://127.0.0.1:1".into(),
        };
        assert_eq!(
            cmd.resolved_argv(),
            ["app", "--db=/var/haven/1/db", "/var/haven/1"]
        );
        assert_eq!(
            cmd.resolved_env(),
            [("DIR".to_string(), "x:/var/haven/1:/var/haven/1".to_string())]
        );
    }

    #[test]
    fn the_address_is_substituted_whole_or_in_parts() {
        let cmd = AppCommand {
            argv: vec![
                "app".into(),
                "--listen={listen}".into(),
                "-h".into(),
                "{host}".into(),
                "-p".into(),
                "{port}".into(),
            ],
            env: vec![("PORT".into(), "{port}".into())],
            data_dir: PathBuf::from("/d"),
            url: "http://127.0.0.2:6001".into(),
        };
        assert_eq!(
            cmd.resolved_argv(),
            [
                "app",
                "--listen=127.0.0.2:6001",
                "-h",
                "127.0.0.2",
                "-p",
                "6001"
            ]
        );
        assert_eq!(
            cmd.resolved_env(),
            [("PORT".to_string(), "6001".to_string())]
        );
        assert!(cmd.names_its_address());
    }

    #[test]
    fn an_address_in_separate_literal_arguments_cannot_be_moved() {
        let with = |argv: &[&str], env: &[(&str, &str)]| AppCommand {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            data_dir: PathBuf::from("/d"),
            url: "http://127.0.0.1:6001".into(),
        };
        assert!(!with(&["app", "-h", "127.0.0.1", "-p", "6001"], &[]).names_its_address());
        assert!(with(&["app", "--bind=127.0.0.1:6001"], &[]).names_its_address());
        assert!(with(&["app"], &[("ADDR", "127.0.0.1:6001")]).names_its_address());
        assert!(with(&["app", "-p", "{port}"], &[]).names_its_address());
    }

    #[tokio::test]
    async fn the_app_sees_its_data_dir() {
        let f = python_app();
        std::fs::create_dir_all(&f.cmd.data_dir).unwrap();
        std::fs::write(f.cmd.data_dir.join("state.txt"), "from the data dir").unwrap();
        let app = start(&f).await.unwrap();
        let pid = app.pid().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let dir = f.cmd.data_dir.to_string_lossy().into_owned();
        assert!(cmdline.ends_with(format!("\0{dir}\0").as_bytes()));
        assert_eq!(get(&f.cmd.url).await.as_deref(), Some("from the data dir"));
        app.stop(GRACE).await.unwrap();
    }

    struct KillOnDrop(u32);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            signal_group(self.0, Signal::KILL);
        }
    }

    #[test]
    fn a_command_line_matches_through_launchers_only_by_program_name() {
        let argv = ["python3".to_string(), "-c".into(), "x".into()];
        assert!(same_command_line(b"/usr/bin/python3\0-c\0x\0", &argv));
        assert!(same_command_line(b"python3\0-c\0x\0", &argv));
        assert!(!same_command_line(b"/usr/bin/python3\0-c\0y\0", &argv));
        assert!(!same_command_line(b"/usr/bin/python3\0-c\0x\0z\0", &argv));
        assert!(!same_command_line(b"/usr/bin/python2\0-c\0x\0", &argv));
        assert!(!same_command_line(b"", &argv));
    }

    #[tokio::test]
    async fn a_process_left_by_a_previous_run_is_killed() {
        let f = python_app();
        let mut stale = std::process::Command::new(&f.cmd.argv[0])
            .args(&f.cmd.resolved_argv()[1..])
            .envs(f.cmd.resolved_env())
            .process_group(0)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let _cleanup = KillOnDrop(stale.id());
        std::fs::write(&f.files.pid, format!("{}\n", stale.id())).unwrap();
        eventually("the stale app answers", async || {
            get(&f.cmd.url).await.is_some()
        })
        .await;
        let app = start(&f).await.unwrap();
        let status = stale.wait().unwrap();
        assert_eq!(status.signal(), Some(9));
        assert_ne!(app.pid(), Some(stale.id()));
        assert_eq!(get(&f.cmd.url).await.as_deref(), Some(""));
        app.stop(GRACE).await.unwrap();
    }

    #[tokio::test]
    async fn a_foreign_process_on_the_port_fails_fast() {
        let f = python_app();
        let addr = host_port(&f.cmd.url).unwrap();
        let _other = std::net::TcpListener::bind(&addr).unwrap();
        std::fs::write(&f.files.pid, format!("{}\n", std::process::id())).unwrap();
        let err = start(&f).await.err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "app port {addr} is already in use by another process (app `{}`, data dir {})",
                f.cmd.resolved_argv().join(" "),
                f.cmd.data_dir.display()
            )
        );
    }

    #[tokio::test]
    async fn dropping_the_handle_kills_the_app() {
        let f = python_app();
        let app = start(&f).await.unwrap();
        let pid = app.pid().unwrap();
        drop(app);
        eventually("the app is gone", async || !is_alive(pid)).await;
    }

    const HELPER_DIR: &str = "HAVEN_TEST_HELPER_DIR";
    const HELPER_PORT: &str = "HAVEN_TEST_HELPER_PORT";

    /// Not a test by itself: the "Haven" process `an_app_dies_with_haven` kills.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "helper process of an_app_dies_with_haven"]
    async fn helper_runs_an_app_until_killed() {
        let (Ok(dir), Ok(port)) = (std::env::var(HELPER_DIR), std::env::var(HELPER_PORT)) else {
            return;
        };
        let cmd = command(
            &["python3", "-c", APP, "{port}"],
            Path::new(&dir),
            port.parse().unwrap(),
        );
        let files = AppFiles::in_dir(Path::new(&dir));
        let app = ManagedApp::start(cmd, files, START, Metrics::new().unwrap(), &Workers::new())
            .await
            .unwrap();
        println!("app pid={}", app.pid().unwrap());
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    /// `kill -9` of Haven takes the app with it (the parent-death signal), so the port is
    /// free for the node's next start.
    #[tokio::test]
    async fn an_app_dies_with_haven() {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut haven = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "--nocapture"])
            .arg("app::process::tests::helper_runs_an_app_until_killed")
            .env(HELPER_DIR, dir.path())
            .env(HELPER_PORT, port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(haven.stdout.take().unwrap()).lines();
        let pid = tokio::task::spawn_blocking(move || {
            lines.find_map(|line| line.unwrap().strip_prefix("app pid=")?.parse::<u32>().ok())
        });
        let pid = pid.await.unwrap().expect("the helper starts an app");
        let _cleanup = KillOnDrop(pid);
        assert!(is_alive(pid));
        haven.kill().unwrap();
        haven.wait().unwrap();
        eventually("the app died with haven", async || !is_alive(pid)).await;
        let url = format!("http://127.0.0.1:{port}");
        assert_eq!(get(&url).await, None);
    }
}
