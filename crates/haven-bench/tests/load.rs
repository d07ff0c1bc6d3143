//! The generator against small in-process servers: an imitation of the log
//! app, one that always fails, one that never answers, and a port with nothing
//! listening.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use haven_bench::load::{self, LoadReport, LoadSpec, Mode, Target};
use haven_bench::progress::Progress;
use haven_bench::sweep::{self, SweepSpec};
use haven_bench::workload::LogAppWorkload;
use tokio::net::TcpListener;

/// The log app's HTTP interface, in memory, counting reads of missing lines.
#[derive(Default)]
struct FakeLogApp {
    lines: AtomicU64,
    missing_reads: AtomicU64,
}

fn log_app_router(app: Arc<FakeLogApp>) -> Router {
    Router::new()
        .route(
            "/append",
            post(|State(app): State<Arc<FakeLogApp>>| async move {
                let n = app.lines.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, n.to_string())
            }),
        )
        .route(
            "/line/{n}",
            get(
                |State(app): State<Arc<FakeLogApp>>, Path(n): Path<u64>| async move {
                    if n < app.lines.load(Ordering::SeqCst) {
                        (StatusCode::OK, "line")
                    } else {
                        app.missing_reads.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::NOT_FOUND, "no line")
                    }
                },
            ),
        )
        .route(
            "/count",
            get(|State(app): State<Arc<FakeLogApp>>| async move {
                app.lines.load(Ordering::SeqCst).to_string()
            }),
        )
        .with_state(app)
}

async fn listen() -> (TcpListener, Target) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let target = Target::parse(&format!("http://127.0.0.1:{port}")).expect("target");
    (listener, target)
}

async fn serve(router: Router) -> Target {
    let (listener, target) = listen().await;
    tokio::spawn(async move { axum::serve(listener, router).await });
    target
}

fn spec(target: Target, mode: Mode, connections: usize, read_ratio: f64) -> LoadSpec {
    LoadSpec {
        targets: vec![target],
        mode,
        connections,
        duration: Duration::from_secs(1),
        warmup: Duration::from_millis(200),
        read_ratio,
        request_timeout: Duration::from_secs(2),
        seed: 42,
    }
}

async fn run(spec: &LoadSpec, prepopulated: u64) -> LoadReport {
    let workload = Arc::new(LogAppWorkload::new(64, prepopulated));
    load::run(spec, workload, &Progress::hidden())
        .await
        .expect("run completes")
}

/// What holds for every clean run: no errors, and the histograms account for
/// exactly the successful requests.
fn assert_clean(report: &LoadReport) {
    assert!(report.requests_ok > 0, "{report:#?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let count = |s: Option<haven_bench::histogram::LatencySummary>| s.map_or(0, |s| s.count);
    assert_eq!(count(report.latency.all), report.requests_ok);
    assert_eq!(
        count(report.latency.reads) + count(report.latency.writes),
        report.requests_ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_against_the_log_app() {
    let app = Arc::new(FakeLogApp::default());
    let target = serve(log_app_router(Arc::clone(&app))).await;
    let report = run(&spec(target, Mode::Closed, 4, 0.5), 0).await;

    assert_clean(&report);
    assert_eq!(app.missing_reads.load(Ordering::SeqCst), 0);
    assert!(report.latency.reads.is_some() && report.latency.writes.is_some());
    assert_eq!(report.intended_rate, None);
    assert_eq!(report.max_schedule_lag_ms, None);
    assert!(
        (1.0..1.5).contains(&report.duration_s),
        "{}",
        report.duration_s
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_holds_its_rate_and_reads_only_existing_lines() {
    let app = Arc::new(FakeLogApp::default());
    let target = serve(log_app_router(Arc::clone(&app))).await;
    let report = run(&spec(target, Mode::Open { rate: 500.0 }, 8, 0.5), 0).await;

    assert_clean(&report);
    assert_eq!(app.missing_reads.load(Ordering::SeqCst), 0);
    assert!(
        (450.0..=550.0).contains(&report.throughput),
        "throughput {} is not within 10% of 500/s",
        report.throughput
    );
    // 1 s at 500/s is 500 due requests; all of them are counted.
    assert!(
        (495..=500).contains(&report.requests_ok),
        "{}",
        report.requests_ok
    );
    assert_eq!(report.intended_rate, Some(500.0));
    assert!(report.max_schedule_lag_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepopulated_lines_are_read_from_the_start() {
    let app = Arc::new(FakeLogApp::default());
    app.lines.store(100, Ordering::SeqCst);
    let target = serve(log_app_router(Arc::clone(&app))).await;
    let mut spec = spec(target, Mode::Closed, 2, 1.0);
    spec.duration = Duration::from_millis(300);
    let report = run(&spec, 100).await;

    assert_clean(&report);
    assert_eq!(report.latency.writes, None);
    assert_eq!(app.lines.load(Ordering::SeqCst), 100, "no writes");
    assert_eq!(app.missing_reads.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_answers_are_counted_by_class() {
    let router = Router::new().route(
        "/append",
        post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "not leader") }),
    );
    let target = serve(router).await;
    let mut spec = spec(target, Mode::Closed, 2, 0.0);
    spec.duration = Duration::from_millis(300);
    let report = run(&spec, 0).await;

    assert_eq!(report.requests_ok, 0);
    assert_eq!(report.latency.all, None);
    assert!(report.errors.get("status_5xx").is_some_and(|&n| n > 0));
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
}

/// Runs `spec` and checks it returned within `margin` of its planned length.
async fn run_bounded(spec: &LoadSpec, margin: Duration) -> LoadReport {
    let started = Instant::now();
    let report = run(spec, 0).await;
    let limit = spec.warmup + spec.duration + margin;
    assert!(
        started.elapsed() < limit,
        "took {:?}, limit {limit:?}",
        started.elapsed()
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_gives_connect_errors_and_returns() {
    let (listener, target) = listen().await;
    drop(listener);
    for mode in [Mode::Closed, Mode::Open { rate: 200.0 }] {
        let mut spec = spec(target.clone(), mode, 4, 0.5);
        spec.warmup = Duration::ZERO;
        spec.duration = Duration::from_millis(500);
        let report = run_bounded(&spec, Duration::from_millis(500)).await;

        assert_eq!(report.requests_ok, 0, "{mode:?}");
        assert!(
            report.errors.get("connect").is_some_and(|&n| n > 0),
            "{mode:?}: {:?}",
            report.errors
        );
        // Backing off from the dead target, the open loop falls behind.
        let expected = ["connect", "unsent"];
        assert!(
            report.errors.keys().all(|k| expected.contains(&k.as_str())),
            "{mode:?}: {:?}",
            report.errors
        );
        if mode == Mode::Closed {
            assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_gives_timeouts_and_returns() {
    let (listener, target) = listen().await;
    // Accepts connections and holds them open without ever answering.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let mut spec = spec(target, Mode::Closed, 2, 0.0);
    spec.warmup = Duration::ZERO;
    spec.duration = Duration::from_millis(500);
    spec.request_timeout = Duration::from_millis(150);
    let report = run_bounded(&spec, spec.request_timeout + Duration::from_millis(500)).await;

    assert_eq!(report.requests_ok, 0);
    let timeouts = report.errors.get("timeout").copied().unwrap_or(0);
    // Each connection times out every 150 ms over 500 ms: at least 3 each.
    assert!(timeouts >= 6, "{:?}", report.errors);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
}

/// A server that takes 50 ms per request, driven at 100 req/s over one
/// connection: it can only do 20/s. The open loop must charge the queueing to
/// the server (latency from when each request was due, not 50 ms) and account
/// for every due request, answered or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_charges_queueing_to_a_slow_server() {
    let router = Router::new().route(
        "/append",
        post(|| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            (StatusCode::CREATED, "0")
        }),
    );
    let target = serve(router).await;
    let mut spec = spec(target, Mode::Open { rate: 100.0 }, 1, 0.0);
    spec.warmup = Duration::ZERO;
    spec.duration = Duration::from_millis(500);
    let report = run(&spec, 0).await;

    // 50 requests were due; each was either answered or never sent.
    assert_eq!(
        report.requests_ok + report.errors_total(),
        50,
        "{report:#?}"
    );
    assert!(
        report.errors.get("unsent").is_some_and(|&n| n >= 30),
        "{:?}",
        report.errors
    );
    assert!(
        (5..=12).contains(&report.requests_ok),
        "{}",
        report.requests_ok
    );
    let all = report.latency.all.expect("some answers");
    // Service time is 50 ms; the k-th answer comes ~40 ms * k after it was due.
    assert!(all.max_ms > 250.0, "{all:?}");
    assert!(report.max_schedule_lag_ms.is_some_and(|lag| lag > 200.0));
    assert!(haven_bench::report::render_text(&report).contains("warning: only"));
}

fn sweep_spec(p90_bound_ms: f64) -> SweepSpec {
    SweepSpec {
        label: "fake log app".into(),
        start_rate: 100.0,
        step_factor: 2.0,
        max_steps: 2,
        step_duration: Duration::from_millis(400),
        warmup: Duration::from_millis(100),
        p90_bound_ms,
        error_ratio_bound: 0.01,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_climbs_until_saturated() {
    let target = serve(log_app_router(Arc::default())).await;
    let base = spec(target, Mode::Closed, 4, 0.5);
    let workload = Arc::new(LogAppWorkload::new(16, 0));
    let progress = Progress::hidden();

    let relaxed = sweep::sweep(&base, workload.clone(), &sweep_spec(1000.0), &progress)
        .await
        .expect("sweep runs");
    assert_eq!(relaxed.label, "fake log app");
    let rates: Vec<f64> = relaxed.points.iter().map(|p| p.intended_rate).collect();
    assert_eq!(rates, [100.0, 200.0]);
    assert!(relaxed.points.iter().all(|p| !p.saturated), "{relaxed:#?}");
    assert_eq!(relaxed.saturated_at, None);
    let best = sweep::saturation_throughput(&relaxed);
    assert!((180.0..=220.0).contains(&best), "{best}");

    // No latency is below a nanosecond: the first step already saturates.
    let strict = sweep::sweep(&base, workload, &sweep_spec(1e-6), &progress)
        .await
        .expect("sweep runs");
    assert_eq!(strict.points.len(), 1);
    assert_eq!(strict.saturated_at, Some(100.0));
    assert_eq!(sweep::saturation_throughput(&strict), 0.0);
}
