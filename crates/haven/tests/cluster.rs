//! End-to-end tests: real `haven node` and `haven logapp` processes on loopback, really
//! killed. Each test owns its cluster directory and ports.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use haven_testkit::cluster::Process;

mod common;
use common::PREPOPULATE;
use common::TestCluster;

async fn start(extra_config: &str) -> TestCluster {
    common::start(3, false, extra_config).await
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_node_reach_every_replica_in_order() {
    let c = start("").await;
    let mut expected = Vec::new();
    for round in 0..3 {
        for node in 0..3 {
            let body = format!("round {round} via node {}", node + 1);
            let reply = c.append(node, &body).await;
            assert_eq!(reply.status, 201, "{}", reply.text());
            let line: u64 = reply.text().parse().unwrap();
            assert_eq!(line, PREPOPULATE + expected.len() as u64);
            assert_eq!(reply.header("location"), Some(format!("/line/{line}")));
            assert!(reply.header("haven-index").is_some());
            expected.push(body);
        }
    }
    let bytes = c.assert_replicas_identical().await;
    let lines = lines(&bytes);
    assert_eq!(lines[PREPOPULATE as usize..], expected[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_read_mode_serves_the_replica() {
    let routes = "[[routes]]\nmethods = [\"GET\"]\npath_prefix = \"/count\"\nmode = \"local\"\n\n\
                  [[routes]]\nmethods = [\"GET\"]\npath_prefix = \"/line/2\"\nmode = \"ordered\"\n";
    let c = start(routes).await;
    let reply = c.append(0, "fresh").await;
    let line = reply.text();
    // Linearizable (default for GET): every node sees the write at once.
    for node in 0..3 {
        let read = c.get(node, &format!("/line/{line}")).await;
        assert_eq!(
            (read.status, read.text()),
            (200, "fresh".to_string()),
            "node {}",
            node + 1
        );
        assert!(
            read.header("haven-index").is_none(),
            "linearizable reads are not logged"
        );
    }
    // Ordered: through the log, so the response carries its log index.
    let ordered = c.get(1, "/line/2").await;
    assert_eq!(ordered.status, 200);
    assert!(
        ordered.text().starts_with("line-000002"),
        "{}",
        ordered.text()
    );
    assert!(ordered.header("haven-index").is_some());
    // Local: straight from the replica.
    c.wait_converged(Duration::from_secs(10)).await.unwrap();
    let count = c.get(2, "/count").await;
    assert_eq!(
        (count.status, count.text()),
        (200, (PREPOPULATE + 1).to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_status_codes_headers_and_bodies_reach_the_client() {
    let c = start("").await;
    let missing = c.get(1, "/line/999999").await;
    assert_eq!(
        (missing.status, missing.text()),
        (404, "no line 999999".to_string())
    );
    let bad = c.append(2, "two\nlines").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.text(), "a line must not contain \\n or \\r");
    let created = c.append(0, "ok").await;
    assert_eq!(created.status, 201);
    assert_eq!(
        created.header("content-type").as_deref(),
        Some("text/plain")
    );
    assert_eq!(
        created.header("location"),
        Some(format!("/line/{PREPOPULATE}"))
    );
    let bytes = c.assert_replicas_identical().await;
    assert_eq!(
        lines(&bytes).len() as u64,
        PREPOPULATE + 1,
        "the rejected append changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_with_idempotency_key_is_applied_once() {
    let c = start("").await;
    let first = c.append_keyed(0, "pay 10", "order-42").await;
    assert_eq!(first.status, 201);
    assert!(first.header("haven-replayed").is_none());
    let retry = c.append_keyed(2, "pay 10", "order-42").await;
    assert_eq!(retry.status, 201);
    assert_eq!(
        retry.text(),
        first.text(),
        "the retry returns the first answer"
    );
    assert_eq!(retry.header("haven-replayed").as_deref(), Some("true"));
    let other = c.append_keyed(1, "pay 10", "order-43").await;
    assert_eq!(other.status, 201);
    let bytes = c.assert_replicas_identical().await;
    let paid = lines(&bytes).iter().filter(|l| *l == "pay 10").count();
    assert_eq!(paid, 2, "order-42 once, order-43 once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_gets_413_and_changes_nothing() {
    let c = start("[limits]\nmax_body_bytes = 1024\n").await;
    let reply = c.append(1, &"x".repeat(2048)).await;
    assert_eq!(reply.status, 413);
    assert_eq!(
        reply.text(),
        "haven: request body exceeds the 1024-byte limit\n"
    );
    assert_eq!(c.append(1, &"y".repeat(1024)).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_get_503_with_retry_after() {
    let mut c = start("[limits]\nno_leader_timeout_ms = 1000\nrequest_timeout_ms = 3000\n").await;
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    let survivor = c.follower_of(leader);
    for i in 0..3 {
        if i != survivor {
            c.kill_node(i);
        }
    }
    let started = Instant::now();
    let reply = c.append(survivor, "lost cause").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered within its timeouts"
    );
    // The survivor is alive and still reports status.
    c.status(survivor).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_loses_no_acknowledged_write_and_restarted_node_catches_up() {
    let mut c = start("").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let reply = c.append(i % 3, &format!("before {i}")).await;
        assert_eq!(reply.status, 201);
        acked.push(format!("before {i}"));
    }
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    c.kill_node(leader);
    let alive: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for i in 0..20 {
        let body = format!("after {i}");
        let reply = c
            .append_keyed(alive[i % 2], &body, &format!("after-{i}"))
            .await;
        if reply.status == 201 {
            acked.push(body);
        }
    }
    assert!(
        acked.len() > 30,
        "the surviving majority kept accepting writes"
    );
    c.start_node(leader).unwrap();
    let bytes = c.assert_replicas_identical().await;
    let lines: Vec<String> = lines(&bytes);
    for body in &acked {
        assert_eq!(
            lines.iter().filter(|l| *l == body).count(),
            1,
            "{body} present exactly once"
        );
    }
}

/// A planned restart: the leader gets SIGTERM under keyed writes through every node. It
/// hands leadership to a follower before it stops (its log says so), exits cleanly, and
/// every acknowledged write is on every replica exactly once after it rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_stopped_with_sigterm_hands_over_first_and_loses_no_acknowledged_write() {
    let mut c = start("").await;
    let (stop, acknowledged) = (
        Arc::new(AtomicBool::new(false)),
        common::Acknowledged::default(),
    );
    let load = common::keyed_writers(&c, "/append", "", &stop, &acknowledged);
    let acked = || acknowledged.lock().unwrap().len();
    wait_until(|| acked() >= 100, "100 writes before the stop").await;
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    let exit = c.stop_node(leader, Duration::from_secs(15)).await.unwrap();
    assert!(exit.success(), "the stopped leader exited with {exit}");
    let log = std::fs::read_to_string(c.log_path(leader, Process::Node)).unwrap();
    assert!(
        log.contains("leadership handed over before stopping"),
        "the leader stopped without handing over: {log}"
    );
    let new_leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    assert_ne!(new_leader, leader);
    let before = acked();
    wait_until(|| acked() >= before + 100, "100 writes after the stop").await;
    stop.store(true, Ordering::Relaxed);
    for writer in load {
        writer.await.unwrap();
    }
    c.start_node(leader).unwrap();
    let bytes = c.assert_replicas_identical().await;
    let lines: Vec<String> = lines(&bytes);
    for key in acknowledged.lock().unwrap().iter() {
        assert_eq!(
            lines.iter().filter(|l| *l == key).count(),
            1,
            "{key} present exactly once"
        );
    }
}

/// Polls `done` every 20 ms for up to 30 s.
async fn wait_until(done: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "no {what} within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_app_stalls_only_its_node_and_it_catches_up_without_diverging() {
    let mut c = start("[limits]\nrequest_timeout_ms = 2000\n").await;
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    let victim = c.follower_of(leader);
    c.kill_app(victim);
    for i in 0..10 {
        assert_eq!(
            c.append(leader, &format!("while down {i}")).await.status,
            201
        );
    }
    let stalled = c.append(victim, "via the stalled node").await;
    assert_eq!(stalled.status, 504, "{}", stalled.text());
    let status = c.status(victim).await.unwrap();
    assert!(!status.app_up);
    let failures = c
        .metric(victim, "haven_app_delivery_failures_total", &[])
        .await
        .unwrap();
    assert!(failures > 0.0);
    c.start_app(victim).unwrap();
    let bytes = c.assert_replicas_identical().await;
    let lines = lines(&bytes);
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("while down")).count(),
        10
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| *l == "via the stalled node")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_stops_the_node_with_file_and_offset() {
    let mut c = start("").await;
    for i in 0..5 {
        assert_eq!(c.append(0, &format!("entry {i}")).await.status, 201);
    }
    c.wait_converged(Duration::from_secs(10)).await.unwrap();
    c.kill_node(2);
    let segments = c.dir().join("node3/data/app/log/segments");
    let segment = std::fs::read_dir(&segments)
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    // Inside the first record's payload: past the file header and the record header.
    bytes[8 + 9 + 2] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    c.start_node(2).unwrap();
    let log = c.dir().join("node3.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("corrupt log record") {
            assert!(text.contains(&segment.display().to_string()), "{text}");
            assert!(text.contains("at offset 8"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node did not report the corruption: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.status(2).await.is_err(),
        "a node with a corrupt log must not serve"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_passes() {
    let report = demo(&[]);
    assert_eq!(report["tls"], false);
}

/// The demo with every node speaking mutual TLS: the same story, the same checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_passes_with_tls() {
    let report = demo(&["--tls"]);
    assert_eq!(report["tls"], true);
}

/// Runs `haven demo --json ARGS` and asserts every check it reports passed.
fn demo(args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["demo", "--json"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["replicas_identical"], true);
    assert!(report["appends_acknowledged"].as_u64().unwrap() > 0);
    assert_eq!(report["tree_replicas_identical"], true);
    assert_eq!(report["tree_acknowledged_present"], true);
    assert!(report["tree_creates_acknowledged"].as_u64().unwrap() > 0);
    assert_eq!(report["leaders"].as_object().unwrap().len(), 2);
    let site = &report["site_loss"];
    for check in [
        "history_identical",
        "acknowledged_once",
        "within_rpo_target",
    ] {
        assert_eq!(site[check], true, "{check}: {report}");
    }
    assert!(
        site["appends_acknowledged"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(site["epoch"], 2, "{report}");
    assert!(site["rto_ms"].as_u64().unwrap() >= site["writable_after_ms"].as_u64().unwrap());
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_prints_the_node_table() {
    let c = start("").await;
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["status", "--admin", &c.slots[leader].admin_addr.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    let row = |key: &str| {
        table
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {key} row in:\n{table}"))
    };
    assert_eq!(row("id "), c.slots[leader].id.to_string());
    assert_eq!(row("role "), "leader");
    assert_eq!(row("leader_id "), c.slots[leader].id.to_string());
    assert_eq!(row("voters "), "1,2,3");
    assert!(row("commit_index ").parse::<u64>().is_ok());
    let unreachable = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["status", "--admin", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!unreachable.status.success());
    assert!(
        String::from_utf8_lossy(&unreachable.stderr)
            .starts_with("haven: GET http://127.0.0.1:1/services")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_bad_config_names_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[node]\nid = 1\nbogus = true\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["node", "--config", &path.display().to_string()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
    assert!(stderr.contains("unknown field `bogus`"), "{stderr}");
}
