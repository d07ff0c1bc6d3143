//! What an operator relies on, with real processes: `/health` and `/ready` naming what is
//! wrong, the Raft and latency metrics, JSON logs and plain redirected ones, config keys
//! from the environment, complete `--help` texts, and the survivability report.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use haven_node::admin::health::Health;
use haven_node::admin::health::Problem;
use haven_node::admin::survival::Failure;
use haven_node::admin::survival::Outcome;
use haven_testkit::cluster::Process;
use haven_testkit::cluster::free_addr;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");

/// `GET path` on node `i`'s admin port: the status and the JSON answer.
async fn probe(c: &common::TestCluster, i: usize, path: &str) -> (u16, Health) {
    let reply = c
        .http
        .get(&format!("{}{path}", c.slots[i].admin_url()))
        .await
        .unwrap();
    let health = serde_json::from_str(&reply.text())
        .unwrap_or_else(|e| panic!("{path} answered {}: {e}: {}", reply.status, reply.text()));
    (reply.status, health)
}

/// Polls `path` on node `i` until it answers `status` (10 s at most).
async fn wait_probe(c: &common::TestCluster, i: usize, path: &str, status: u16) -> Health {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (got, health) = probe(c, i, path).await;
        if got == status {
            return health;
        }
        assert!(Instant::now() < deadline, "{path} still {got}: {health:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ok() -> Health {
    Health {
        status: "ok".to_string(),
        problems: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_name_a_dead_app_and_a_lost_leader() {
    let mut c = common::start(3, false, "").await;
    assert_eq!(probe(&c, 0, "/health").await, (200, ok()));
    assert_eq!(probe(&c, 0, "/ready").await, (200, ok()));

    c.kill_app(0);
    let app_down = Problem {
        service: "app".to_string(),
        code: "app-down".to_string(),
        message: format!(
            "the replica at {} does not answer HTTP within 1000 ms",
            c.slots[0].app_url()
        ),
    };
    let unhealthy = |status: &str, problems: Vec<Problem>| Health {
        status: status.to_string(),
        problems,
    };
    assert_eq!(
        probe(&c, 0, "/health").await,
        (503, unhealthy("unhealthy", vec![app_down.clone()]))
    );
    assert_eq!(
        probe(&c, 0, "/ready").await,
        (503, unhealthy("not-ready", vec![app_down]))
    );
    assert_eq!(probe(&c, 1, "/health").await, (200, ok()));
    c.start_app(0).unwrap();
    wait_probe(&c, 0, "/health", 200).await;

    // The leader and one follower gone: the last node knows no leader.
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let survivor = (leader + 1) % 3;
    for i in (0..3).filter(|i| *i != survivor) {
        c.kill_node(i);
    }
    let health = wait_probe(&c, survivor, "/health", 503).await;
    assert_eq!(health.status, "unhealthy");
    let codes: Vec<&str> = health.problems.iter().map(|p| p.code.as_str()).collect();
    assert_eq!(codes, ["no-leader"], "{health:?}");
    let leader_id = c.slots[leader].id;
    assert!(
        health.problems[0].message.starts_with(&format!(
            "leader {leader_id} cannot confirm it leads a quorum: "
        )),
        "{health:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_latency_and_raft_progress_and_redirected_logs_are_plain() {
    let c = common::start(3, false, "").await;
    for i in 0..10 {
        assert_eq!(c.append(0, &format!("line {i}")).await.status, 201);
    }
    assert_eq!(c.get(0, "/count").await.status, 200);
    c.wait_converged(Duration::from_secs(10)).await.unwrap();
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    let leader_id = c.slots[leader].id;

    let writes = [("mode", "write")];
    let count = c.metric(0, "haven_request_duration_seconds_count", &writes);
    assert_eq!(count.await.unwrap(), 10.0);
    let reads = [("mode", "linearizable")];
    let count = c.metric(0, "haven_request_duration_seconds_count", &reads);
    assert_eq!(count.await.unwrap(), 1.0);
    for i in 0..3 {
        let status = c.status(i).await.unwrap();
        let gauge = |name: &'static str| c.metric(i, name, &[]);
        assert_eq!(gauge("haven_raft_term").await.unwrap(), status.term as f64);
        assert_eq!(
            gauge("haven_raft_leader_id").await.unwrap(),
            leader_id as f64
        );
        let commit = status.commit_index.unwrap_or(0) as f64;
        assert_eq!(gauge("haven_commit_index").await.unwrap(), commit);
        assert_eq!(gauge("haven_apply_lag_entries").await.unwrap(), 0.0);
        let text = c.admin(i).metrics().await.unwrap();
        let lags: Vec<&str> = (text.lines())
            .filter(|l| l.starts_with("haven_replication_lag_entries{"))
            .collect();
        let expected: Vec<String> = match i == leader {
            true => (0..3)
                .filter(|j| *j != leader)
                .map(|j| {
                    let peer = c.slots[j].id;
                    format!("haven_replication_lag_entries{{peer=\"{peer}\",service=\"app\"}} 0")
                })
                .collect(),
            false => Vec::new(),
        };
        assert_eq!(lags, expected, "node {i}");
    }
    for i in 0..3 {
        let log = std::fs::read_to_string(c.log_path(i, Process::Node)).unwrap();
        assert!(log.contains("node ready"), "{log}");
        assert!(
            !log.contains('\u{1b}'),
            "colour codes in a redirected log: {log}"
        );
    }
}

/// A one-node config whose app is not running (the node starts anyway).
fn lone_node_config(dir: &Path, admin: std::net::SocketAddr) -> std::path::PathBuf {
    let (client, raft, app) = (
        free_addr().unwrap(),
        free_addr().unwrap(),
        free_addr().unwrap(),
    );
    let config = format!(
        "[node]\nid = 1\nclient_addr = \"{client}\"\nraft_addr = \"{raft}\"\nadmin_addr = \"{admin}\"\ndata_dir = \"{}\"\n\n[app]\nurl = \"http://{app}\"\n\n[[peers]]\nid = 1\nraft_addr = \"{raft}\"\nclient_addr = \"{client}\"\n",
        dir.join("data").display()
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_writes_json_logs_and_takes_keys_from_the_environment() {
    let dir = common::test_dir("haven-ops-");
    let (written, overridden) = (free_addr().unwrap(), free_addr().unwrap());
    let config = lone_node_config(dir.path(), written);
    let mut node = Command::new(HAVEN)
        .args(["--log-format", "json", "node", "--config"])
        .arg(&config)
        .env("HAVEN_NODE__ADMIN_ADDR", overridden.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = node.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut ready = None;
    while ready.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("no `node ready` line");
        let object: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        assert!(object["level"].is_string(), "{line}");
        if object["fields"]["message"] == "node ready" {
            ready = Some(object);
        }
    }
    let ready = ready.unwrap();
    assert_eq!(ready["fields"]["addr"], overridden.to_string(), "{ready}");
    let http = haven_client::http::Http::new(Duration::from_secs(5));
    let answered = http
        .get(&format!("http://{overridden}/status"))
        .await
        .unwrap();
    assert_eq!(answered.status, 200);
    assert!(http.get(&format!("http://{written}/status")).await.is_err());
    node.kill().unwrap();
    node.wait().unwrap();

    let refused = Command::new(HAVEN)
        .args(["node", "--config"])
        .arg(&config)
        .env("HAVEN_NODE__ID", "one")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        format!(
            "haven: invalid config {}: environment variable HAVEN_NODE__ID: invalid type: string \"one\", expected u64 in `node.id`\n",
            config.display()
        )
    );
}

/// `haven <path> -h`.
fn help(path: &[String]) -> String {
    let output = Command::new(HAVEN).args(path).arg("-h").output().unwrap();
    assert!(output.status.success(), "{path:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The entries of one section (`Commands:`, `Options:`, `Arguments:`) of a help text,
/// each with its help lines: after two spaces on its own line, or below it, indented
/// deeper (clap's layout when some help is long).
fn entries(text: &str, title: &str) -> Vec<(String, Vec<String>)> {
    let mut entries: Vec<(String, Vec<String>)> = Vec::new();
    let lines = (text.lines())
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| !l.is_empty());
    for line in lines {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() > 6 {
            if let Some((_, help)) = entries.last_mut() {
                help.push(trimmed.to_string());
            }
            continue;
        }
        let (name, help) = trimmed.split_once("  ").unwrap_or((trimmed, ""));
        let help = (!help.trim().is_empty()).then(|| help.trim().to_string());
        entries.push((name.to_string(), help.into_iter().collect()));
    }
    entries
}

#[test]
fn every_command_and_flag_has_a_one_line_help() {
    let mut pending = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let text = help(&path);
        seen += 1;
        assert!(!text.contains("{n}"), "{path:?}: {text}");
        for title in ["Commands:", "Options:", "Arguments:"] {
            for (entry, help) in entries(&text, title) {
                assert_eq!(
                    help.len(),
                    1,
                    "{path:?}: `{entry}` has no help, or one broken over lines:\n{text}"
                );
            }
        }
        for (name, _) in entries(&text, "Commands:") {
            if name != "help" {
                let mut deeper = path.clone();
                deeper.push(name);
                pending.push(deeper);
            }
        }
    }
    assert!(seen > 40, "only {seen} commands");
    let logapp = help(&["logapp".to_string()]);
    assert!(
        logapp.starts_with(
            "Run the reference log application (POST /append, GET /line/N, GET /count)\n"
        ),
        "{logapp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_what_the_placement_survives() {
    let mut c = common::start(3, false, "").await;
    let report = c.status(0).await.unwrap().survivability.unwrap();
    assert_eq!(
        report.failures[1],
        Failure {
            failure: "any one zone".to_string(),
            outcome: Outcome::Survives,
            why: "3 voters in 3 zones, at most 1 in one; 2 needed".to_string(),
        }
    );
    assert_eq!(report.warnings, Vec::<String>::new());
    assert_eq!(report.availability.estimate, "99.99%");
    let shown = status_text(&c, 0);
    assert!(
        shown.contains(
            "survival        any one node: survives (3 voters, 2 needed: any 1 can fail)\n"
        ) && shown.contains("                any one zone: survives (")
            && shown.contains("availability    99.99% (an estimate: about 4.3 minutes a month;"),
        "{shown}"
    );

    // The same three nodes, all in one zone.
    for i in 0..3 {
        c.kill_node(i);
        let path = &c.slots[i].config_path;
        let mut config = std::fs::read_to_string(path).unwrap();
        for id in 1..=3 {
            config = config.replace(&format!("zone = \"zone-{id}\""), "zone = \"a\"");
        }
        std::fs::write(path, config).unwrap();
    }
    for i in 0..3 {
        c.start_node(i).unwrap();
    }
    c.wait_all_ready(Duration::from_secs(30)).await.unwrap();
    let report = c.status(1).await.unwrap().survivability.unwrap();
    assert_eq!(report.failures[1].outcome, Outcome::DoesNotSurvive);
    let warning = "zone `a` holds 3 of 3 voters, a quorum: losing that zone stops writes (spread the voters over 3 zones)";
    assert_eq!(report.warnings, [warning]);
    assert_eq!(report.availability.estimate, "99.95%");
    let shown = status_text(&c, 1);
    assert!(
        shown.contains(&format!("WARNING         {warning}\n")),
        "{shown}"
    );
}

fn status_text(c: &common::TestCluster, i: usize) -> String {
    let output = Command::new(HAVEN)
        .args(["status", "--admin", &c.slots[i].admin_addr.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}
