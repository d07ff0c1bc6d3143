//! The load generator: keep-alive HTTP/1.1 connections, open or closed loop,
//! and a [`LoadReport`] of what the system under test did.
//!
//! # Measuring honestly
//!
//! Each worker task owns one connection (HTTP/1.1 without pipelining carries
//! one request at a time) and its own histograms and counters, so recording a
//! result takes no lock; everything is merged once, when the run ends.
//!
//! - **Closed loop** ([`Mode::Closed`]): every worker sends its next request as
//!   soon as the previous one is answered. This shows the best throughput for
//!   a given concurrency, but when the system stalls the generator stalls too
//!   and sends less, so its latencies flatter the system.
//! - **Open loop** ([`Mode::Open`]): requests are due on a fixed timetable
//!   ([`crate::rate::Schedule`]), as users arriving independently would send
//!   them. A worker still busy with a slow response sends its overdue requests
//!   as soon as it can, and their latency is counted from when they were
//!   *due*, so time spent queued behind a stall is charged to the system. Not
//!   doing this is *coordinated omission*, and it can hide stalls entirely.
//!   When a worker was idle and slept until a request was due, latency counts
//!   from its wake-up instead: the timer's overshoot (tokio's timer has 1 ms
//!   resolution) is the generator's noise, not the system's latency. How late
//!   requests went out either way is reported as `max_schedule_lag_ms`.
//!
//! # What is counted
//!
//! Requests due (open loop) or sent (closed loop) during the warmup are sent
//! but not counted. No request is started after the measured window; those in
//! flight at its end are waited for (up to the request timeout) and counted,
//! and `duration_s` runs until the last of them completes. In an open loop,
//! requests that were due in the window but still waiting for their
//! connection when it ended are counted as [`ErrorKind::Unsent`], so every
//! due request is accounted for. Only 2xx answers have their latency
//! recorded; everything else is counted by [`ErrorKind`].

use std::collections::BTreeMap;
use std::io;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::debug;

use crate::BenchError;
use crate::error::{ensure_at_least_one, ensure_fraction, ensure_positive};
use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::progress::{LiveCounters, Progress};
use crate::rate::Schedule;
use crate::workload::{OpKind, RequestSpec, Workload};

/// First pause after a failed connect; doubled on each further failure up to
/// [`MAX_BACKOFF`], so a dead target costs a few attempts per second instead of
/// a spinning CPU on the machine that also runs the system under test.
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// An HTTP server to send load to, from a base URL such as
/// `http://127.0.0.1:7001`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    url: String,
    host: String,
    port: u16,
    host_header: HeaderValue,
}

impl Target {
    /// Accepts `http://HOST[:PORT][/]` only: the workload chooses the paths,
    /// and there is no TLS client here.
    pub fn parse(url: &str) -> Result<Self, BenchError> {
        let fail = |reason| BenchError::Target {
            url: url.to_owned(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|_| fail("expected http://HOST:PORT"))?;
        if uri.scheme_str() != Some("http") {
            return Err(fail("only http:// URLs are supported"));
        }
        let authority = uri.authority().ok_or(fail("expected http://HOST:PORT"))?;
        if authority.as_str().contains('@') {
            return Err(fail("credentials in the URL are not supported"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(fail(
                "a path is not allowed: the workload chooses the paths",
            ));
        }
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| fail("invalid host"))?;
        Ok(Self {
            url: url.to_owned(),
            // IPv6 literals come bracketed (`[::1]`); name resolution wants them bare.
            host: authority.host().trim_matches(['[', ']']).to_owned(),
            port: authority.port_u16().unwrap_or(80),
            host_header,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The same address, with requests naming `host` in their `Host` header: a virtual
    /// host, as a server that picks its tenant by `Host` sees one.
    pub fn with_host(self, host: &str) -> Result<Self, BenchError> {
        let host_header = HeaderValue::from_str(host).map_err(|_| BenchError::Target {
            url: self.url.clone(),
            reason: "invalid host header",
        })?;
        Ok(Self {
            host_header,
            ..self
        })
    }
}

impl FromStr for Target {
    type Err = BenchError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        Self::parse(url)
    }
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `rate` requests per second in total, on a fixed timetable.
    Open { rate: f64 },
    /// Back-to-back on every connection: the concurrency is
    /// [`LoadSpec::connections`], since each connection carries one request
    /// at a time.
    Closed,
}

/// Everything that defines one run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Connections are spread over these round-robin.
    pub targets: Vec<Target>,
    pub mode: Mode,
    /// One worker task per connection.
    pub connections: usize,
    /// The measured window, after the warmup.
    pub duration: Duration,
    pub warmup: Duration,
    /// Probability that a request is a read rather than a write.
    pub read_ratio: f64,
    /// Applies to each connect and to each request (answer and body included).
    pub request_timeout: Duration,
    /// Worker `w` draws from a generator seeded with `seed + w`, so runs repeat.
    pub seed: u64,
}

/// The outcome of a run, for people ([`crate::report::render_text`]) and
/// scripts (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Human description, such as `open loop, 500 req/s over 16 connections`.
    pub mode: String,
    /// Requests per second asked for; `None` for a closed loop.
    pub intended_rate: Option<f64>,
    pub connections: usize,
    pub read_ratio: f64,
    /// Seconds from the end of the warmup until the last counted request
    /// completed.
    pub duration_s: f64,
    /// Requests answered 2xx; always equal to `latency.all.count`.
    pub requests_ok: u64,
    /// `requests_ok / duration_s`.
    pub throughput: f64,
    /// Failed requests by [`ErrorKind::name`]; kinds that did not occur are
    /// absent, so an empty map means no errors.
    pub errors: BTreeMap<String, u64>,
    pub latency: Latencies,
    /// Open loop only: the latest any counted request went out after it was
    /// due. Large values mean the connections were busy with slow answers,
    /// backing off after failed connects, or the generator was short of CPU
    /// (latencies include that wait, and requests never sent are counted as
    /// `unsent`).
    pub max_schedule_lag_ms: Option<f64>,
}

/// Latency of 2xx answers, in total and by kind; `None` where there were none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    pub all: Option<LatencySummary>,
    pub reads: Option<LatencySummary>,
    pub writes: Option<LatencySummary>,
}

impl LoadReport {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection could be made (refused, unreachable, or connect timeout).
    Connect,
    /// No complete answer within the request timeout.
    Timeout,
    /// The connection broke while sending or receiving.
    Io,
    Status3xx,
    Status4xx,
    /// 5xx, and any non-standard status of 600 or above.
    Status5xx,
    /// Open loop only: due during the measured window, but never sent because
    /// the worker was still behind schedule when the window ended (its
    /// connection busy with slow answers, or reconnecting). Counted so that
    /// requests a struggling system never saw still show in the results.
    Unsent,
}

impl ErrorKind {
    const ALL: [Self; 7] = [
        Self::Connect,
        Self::Timeout,
        Self::Io,
        Self::Status3xx,
        Self::Status4xx,
        Self::Status5xx,
        Self::Unsent,
    ];

    /// The key used in [`LoadReport::errors`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Io => "io",
            Self::Status3xx => "status_3xx",
            Self::Status4xx => "status_4xx",
            Self::Status5xx => "status_5xx",
            Self::Unsent => "unsent",
        }
    }

    /// `None` for a success (2xx).
    pub fn of_status(status: StatusCode) -> Option<Self> {
        match status.as_u16() / 100 {
            2 => None,
            3 => Some(Self::Status3xx),
            4 => Some(Self::Status4xx),
            _ => Some(Self::Status5xx),
        }
    }
}

impl LoadSpec {
    /// Rejects settings that would make the run meaningless or panic. Messages
    /// name the `haven bench` flags.
    pub fn validate(&self) -> Result<(), BenchError> {
        if self.targets.is_empty() {
            return Err(BenchError::Invalid(
                "at least one --target is required".into(),
            ));
        }
        let workers_flag = match self.mode {
            Mode::Open { rate } => {
                ensure_positive("--rate", rate)?;
                "--connections"
            }
            Mode::Closed => "--concurrency",
        };
        ensure_at_least_one(workers_flag, self.connections as u64)?;
        ensure_fraction("--read-ratio", self.read_ratio)?;
        Ok(())
    }

    /// One line saying how load was applied, for reports.
    pub fn describe(&self) -> String {
        match self.mode {
            Mode::Open { rate } => {
                format!(
                    "open loop, {} req/s over {} connections",
                    format_rate(rate),
                    self.connections
                )
            }
            Mode::Closed => format!("closed loop, {} connections back-to-back", self.connections),
        }
    }
}

/// Runs one benchmark and reports on its measured window.
///
/// Failed requests are part of the result, not an error: `Err` means the run
/// itself could not be carried out (invalid spec, a bad workload, a worker
/// that panicked).
pub async fn run(
    spec: &LoadSpec,
    workload: Arc<dyn Workload>,
    progress: &Progress,
) -> Result<LoadReport, BenchError> {
    spec.validate()?;
    let live = Arc::new(LiveCounters::default());
    let start = Instant::now();
    let window = Window {
        start,
        measured_from: start + spec.warmup,
        end: start + spec.warmup + spec.duration,
    };
    let _ticker = progress
        .watch(Arc::clone(&live), start, spec.warmup)
        .map(AbortOnDrop);
    // Guarded, so that if one worker fails the others stop with the run.
    let workers: Vec<AbortOnDrop<Result<WorkerStats, BenchError>>> = (0..spec.connections)
        .map(|id| {
            let worker = Worker::new(spec, id, window, Arc::clone(&workload), Arc::clone(&live));
            AbortOnDrop(tokio::spawn(worker.run(spec.mode, spec.connections)))
        })
        .collect();
    let mut total = WorkerStats::default();
    for mut worker in workers {
        total.merge((&mut worker.0).await??)?;
    }
    Ok(total.into_report(spec, window))
}

/// When a run started, and its measured part.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    measured_from: Instant,
    end: Instant,
}

/// A task that must not outlive its owner (a worker, a connection's driver,
/// the progress ticker).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One keep-alive HTTP/1.1 connection; dropping it closes the socket.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    _driver: AbortOnDrop<()>,
}

impl Connection {
    async fn open(target: &Target) -> io::Result<Self> {
        let stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
        // Requests are small and latency is the point: don't let Nagle hold them.
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let driver = tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "connection closed");
            }
        });
        Ok(Self {
            sender,
            _driver: AbortOnDrop(driver),
        })
    }
}

/// What one worker measured; merged into the run's totals.
#[derive(Default)]
struct WorkerStats {
    all: LatencyHistogram,
    reads: LatencyHistogram,
    writes: LatencyHistogram,
    errors: [u64; ErrorKind::ALL.len()],
    max_lag: Duration,
    last_completion: Option<Instant>,
}

impl WorkerStats {
    fn record_ok(&mut self, kind: OpKind, latency: Duration) {
        self.all.record(latency);
        match kind {
            OpKind::Read => self.reads.record(latency),
            OpKind::Write => self.writes.record(latency),
        }
    }

    fn merge(&mut self, other: Self) -> Result<(), BenchError> {
        self.all.merge(&other.all)?;
        self.reads.merge(&other.reads)?;
        self.writes.merge(&other.writes)?;
        for (total, count) in self.errors.iter_mut().zip(other.errors) {
            *total += count;
        }
        self.max_lag = self.max_lag.max(other.max_lag);
        self.last_completion = self.last_completion.max(other.last_completion);
        Ok(())
    }

    fn into_report(self, spec: &LoadSpec, window: Window) -> LoadReport {
        let end = self
            .last_completion
            .map_or(window.end, |t| t.max(window.end));
        let duration_s = (end - window.measured_from).as_secs_f64();
        let requests_ok = self.all.len();
        let intended_rate = match spec.mode {
            Mode::Open { rate } => Some(rate),
            Mode::Closed => None,
        };
        LoadReport {
            mode: spec.describe(),
            intended_rate,
            connections: spec.connections,
            read_ratio: spec.read_ratio,
            duration_s,
            requests_ok,
            throughput: if duration_s > 0.0 {
                requests_ok as f64 / duration_s
            } else {
                0.0
            },
            errors: ErrorKind::ALL
                .iter()
                .zip(self.errors)
                .filter(|(_, count)| *count > 0)
                .map(|(kind, count)| (kind.name().to_owned(), count))
                .collect(),
            latency: Latencies {
                all: self.all.summary(),
                reads: self.reads.summary(),
                writes: self.writes.summary(),
            },
            max_schedule_lag_ms: intended_rate.map(|_| self.max_lag.as_secs_f64() * 1000.0),
        }
    }
}

/// One connection's share of the load.
struct Worker {
    id: usize,
    target: Target,
    workload: Arc<dyn Workload>,
    rng: StdRng,
    read_ratio: f64,
    request_timeout: Duration,
    window: Window,
    live: Arc<LiveCounters>,
    connection: Option<Connection>,
    backoff: Duration,
    stats: WorkerStats,
}

/// How a request ended, before it is counted.
type Exchange = Result<Result<(StatusCode, Bytes), hyper::Error>, tokio::time::error::Elapsed>;

impl Worker {
    fn new(
        spec: &LoadSpec,
        id: usize,
        window: Window,
        workload: Arc<dyn Workload>,
        live: Arc<LiveCounters>,
    ) -> Self {
        Self {
            id,
            target: spec.targets[id % spec.targets.len()].clone(),
            workload,
            rng: StdRng::seed_from_u64(spec.seed.wrapping_add(id as u64)),
            read_ratio: spec.read_ratio,
            request_timeout: spec.request_timeout,
            window,
            live,
            connection: None,
            backoff: MIN_BACKOFF,
            stats: WorkerStats::default(),
        }
    }

    async fn run(self, mode: Mode, workers: usize) -> Result<WorkerStats, BenchError> {
        match mode {
            Mode::Open { rate } => self.run_open(Schedule::new(rate, workers)).await,
            Mode::Closed => self.run_closed().await,
        }
    }

    async fn run_open(mut self, schedule: Schedule) -> Result<WorkerStats, BenchError> {
        for k in 0.. {
            let due = self.window.start + schedule.offset(self.id, k);
            if due >= self.window.end {
                break;
            }
            if Instant::now() >= self.window.end {
                self.count_unsent(&schedule, k);
                break;
            }
            let measured = due >= self.window.measured_from;
            let reference = self.wait_until_due(due, measured).await;
            self.send(measured, reference).await?;
        }
        Ok(self.stats)
    }

    async fn run_closed(mut self) -> Result<WorkerStats, BenchError> {
        loop {
            let now = Instant::now();
            if now >= self.window.end {
                return Ok(self.stats);
            }
            self.send(now >= self.window.measured_from, now).await?;
        }
    }

    /// Counts as [`ErrorKind::Unsent`] the measured requests from the `k`-th
    /// on, which the window ended before this worker could send.
    fn count_unsent(&mut self, schedule: &Schedule, k: u64) {
        let due_before = |t: Instant| schedule.due_before(self.id, t - self.window.start);
        let first_measured = due_before(self.window.measured_from);
        let unsent = due_before(self.window.end).saturating_sub(k.max(first_measured));
        self.count_errors(ErrorKind::Unsent, unsent, true);
    }

    /// Sleeps if `due` is ahead, notes how late the request goes out, and
    /// returns the instant its latency counts from (see the module docs).
    async fn wait_until_due(&mut self, due: Instant, measured: bool) -> Instant {
        let now = Instant::now();
        let reference = if now < due {
            sleep_until(due).await;
            Instant::now()
        } else {
            due
        };
        if measured {
            self.stats.max_lag = self.stats.max_lag.max(Instant::now() - due);
        }
        reference
    }

    /// Sends one request and counts its outcome; latency runs from `reference`.
    async fn send(&mut self, measured: bool, reference: Instant) -> Result<(), BenchError> {
        let spec = if self.rng.random_bool(self.read_ratio) {
            self.workload.read(&mut self.rng)?
        } else {
            self.workload.write(&mut self.rng)?
        };
        let kind = spec.kind;
        let request = build_request(spec, &self.target.host_header);
        let request_timeout = self.request_timeout;
        let Some(sender) = self.connection(measured).await else {
            return Ok(());
        };
        let outcome = timeout(request_timeout, exchange(sender, request)).await;
        let done = Instant::now();
        if measured {
            self.stats.last_completion = Some(done);
        }
        match self.classify(kind, outcome) {
            Ok(()) => {
                self.live.ok.fetch_add(1, Ordering::Relaxed);
                if measured {
                    self.stats.record_ok(kind, done - reference);
                }
            }
            Err(error) => self.count_errors(error, 1, measured),
        }
        Ok(())
    }

    /// Turns an exchange into success or an [`ErrorKind`], dropping the
    /// connection when it can no longer be trusted.
    fn classify(&mut self, kind: OpKind, outcome: Exchange) -> Result<(), ErrorKind> {
        let failure = match outcome {
            Ok(Ok((status, body))) => {
                return match ErrorKind::of_status(status) {
                    Some(failure) => Err(failure),
                    None => {
                        if kind == OpKind::Write {
                            self.workload.on_write_ok(status, &body);
                        }
                        Ok(())
                    }
                };
            }
            Ok(Err(error)) => {
                debug!(worker = self.id, %error, "request failed");
                ErrorKind::Io
            }
            Err(_) => ErrorKind::Timeout,
        };
        // The answer may still arrive later and would be taken for the next one's.
        self.connection = None;
        Err(failure)
    }

    fn count_errors(&mut self, kind: ErrorKind, count: u64, measured: bool) {
        self.live.errors.fetch_add(count, Ordering::Relaxed);
        if measured {
            self.stats.errors[kind as usize] += count;
        }
    }

    /// The worker's connection, opened if needed. On a failed connect this
    /// counts a `connect` error, backs off, and returns `None`.
    async fn connection(&mut self, measured: bool) -> Option<&mut SendRequest<Full<Bytes>>> {
        // A connection the server closed while idle (keep-alive timeout,
        // `Connection: close`) is replaced silently: no request failed.
        if self
            .connection
            .as_ref()
            .is_some_and(|c| c.sender.is_closed())
        {
            self.connection = None;
        }
        if self.connection.is_none() {
            let opened = timeout(self.request_timeout, Connection::open(&self.target))
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")));
            match opened {
                Ok(connection) => {
                    self.connection = Some(connection);
                    self.backoff = MIN_BACKOFF;
                }
                Err(error) => {
                    debug!(worker = self.id, target = %self.target.url, %error, "connect failed");
                    self.count_errors(ErrorKind::Connect, 1, measured);
                    self.back_off().await;
                    return None;
                }
            }
        }
        self.connection.as_mut().map(|c| &mut c.sender)
    }

    async fn back_off(&mut self) {
        let remaining = self.window.end.saturating_duration_since(Instant::now());
        sleep(self.backoff.min(remaining)).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// A rate for people: at most one decimal, none when it is whole (a sweep's
/// `100 * 1.5^k` would otherwise print as `506.25` or worse).
pub(crate) fn format_rate(rate: f64) -> String {
    let text = format!("{rate:.1}");
    match text.strip_suffix(".0") {
        Some(whole) => whole.to_owned(),
        None => text,
    }
}

fn build_request(spec: RequestSpec, host: &HeaderValue) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(spec.body));
    *request.method_mut() = spec.method;
    *request.uri_mut() = Uri::from(spec.path_and_query);
    let headers = request.headers_mut();
    headers.insert(HOST, host.clone());
    if let Some(content_type) = spec.content_type {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    request
}

/// Sends one request and reads the whole answer, so the connection is ready
/// for the next one.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), hyper::Error> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_to_host_and_port() {
        let target = Target::parse("http://127.0.0.1:7001").expect("valid");
        assert_eq!((target.host.as_str(), target.port), ("127.0.0.1", 7001));
        assert_eq!(target.host_header, "127.0.0.1:7001");
        let target: Target = "http://localhost/".parse().expect("valid");
        assert_eq!((target.host.as_str(), target.port), ("localhost", 80));
        let target = Target::parse("http://[::1]:9").expect("valid");
        assert_eq!(
            (target.host.as_str(), target.host_header.to_str().ok()),
            ("::1", Some("[::1]:9"))
        );
    }

    #[test]
    fn unusable_targets_are_rejected_with_a_reason() {
        let cases = [
            ("127.0.0.1:7001", "only http:// URLs are supported"),
            ("https://example.org", "only http:// URLs are supported"),
            ("http://", "expected http://HOST:PORT"),
            (
                "http://h:1/v3",
                "a path is not allowed: the workload chooses the paths",
            ),
            ("http://u:p@h:1", "credentials in the URL are not supported"),
        ];
        for (url, reason) in cases {
            let message = Target::parse(url).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(
                message,
                Err(format!("invalid target URL '{url}': {reason}"))
            );
        }
    }

    #[test]
    fn statuses_map_to_error_kinds() {
        let kind = |code| ErrorKind::of_status(StatusCode::from_u16(code).expect("status"));
        assert_eq!(kind(200), None);
        assert_eq!(kind(201), None);
        assert_eq!(kind(307), Some(ErrorKind::Status3xx));
        assert_eq!(kind(404), Some(ErrorKind::Status4xx));
        assert_eq!(kind(503), Some(ErrorKind::Status5xx));
        assert_eq!(kind(799), Some(ErrorKind::Status5xx));
        let names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "connect",
                "timeout",
                "io",
                "status_3xx",
                "status_4xx",
                "status_5xx",
                "unsent"
            ]
        );
    }

    fn spec(mode: Mode, connections: usize, read_ratio: f64) -> LoadSpec {
        LoadSpec {
            targets: vec![Target::parse("http://127.0.0.1:1").expect("valid")],
            mode,
            connections,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            read_ratio,
            request_timeout: Duration::from_secs(1),
            seed: 0,
        }
    }

    #[test]
    fn validation_names_the_flag_for_the_mode() {
        let message = |s: LoadSpec| s.validate().map_err(|e| e.to_string());
        assert_eq!(message(spec(Mode::Closed, 4, 0.5)), Ok(()));
        assert_eq!(
            message(spec(Mode::Closed, 0, 0.5)),
            Err("--concurrency must be at least 1, got 0".into())
        );
        assert_eq!(
            message(spec(Mode::Open { rate: 10.0 }, 0, 0.5)),
            Err("--connections must be at least 1, got 0".into())
        );
        assert_eq!(
            message(spec(Mode::Open { rate: -1.0 }, 1, 0.5)),
            Err("--rate must be positive, got -1".into())
        );
        assert_eq!(
            message(spec(Mode::Closed, 1, 2.0)),
            Err("--read-ratio must be between 0 and 1, got 2".into())
        );
        let mut no_targets = spec(Mode::Closed, 1, 0.0);
        no_targets.targets.clear();
        assert_eq!(
            message(no_targets),
            Err("at least one --target is required".into())
        );
    }

    #[test]
    fn modes_describe_themselves() {
        assert_eq!(
            spec(Mode::Open { rate: 500.0 }, 16, 0.0).describe(),
            "open loop, 500 req/s over 16 connections"
        );
        assert_eq!(
            spec(Mode::Closed, 4, 0.0).describe(),
            "closed loop, 4 connections back-to-back"
        );
        assert_eq!(format_rate(30611.0016), "30611");
        assert_eq!(format_rate(337.5), "337.5");
        assert_eq!(format_rate(2.26), "2.3");
    }
}
