//! Divergence detection end to end, with real processes: a replica that starts answering
//! differently (the counter app appending its clock on one node) is named, with the
//! first entry it answered differently, on every node; a
//! deterministic cluster under load, a node killed and restarted in the middle of it,
//! raises nothing while its answers are compared.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::Process;

mod common;

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/counter.py");
const DETECTED: &str = "haven_divergence_detected_total";
const COMPARED: &str = "haven_answers_compared_total";
const SERVICE: [(&str, &str); 1] = [("service", "app")];

/// The counter app, which appends its clock to its answers while `clock` exists beside
/// its file.
fn counter() -> AppKind {
    let argv = ["python3", APP, "{host}", "{port}", "{data_dir}/count.txt"];
    AppKind::Command {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        file: "count.txt".to_string(),
    }
}

async fn count(c: &common::TestCluster, node: usize) -> String {
    let url = format!("{}/count", c.slots[node].client_url());
    let reply = c.http.post(&url, String::new()).await.unwrap();
    assert_eq!(reply.status, 201, "{}", reply.text());
    reply.text()
}

/// Polls until `check` holds on node `i`'s status, for at most `timeout`.
async fn wait_status(
    c: &common::TestCluster,
    i: usize,
    timeout: Duration,
    check: impl Fn(&haven_node::admin::Status) -> bool,
) -> haven_node::admin::Status {
    let deadline = Instant::now() + timeout;
    loop {
        let status = c.status(i).await.unwrap();
        if check(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "node {}: {status:?}", i + 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_answers_differently_is_named_with_the_first_divergent_entry() {
    let c = common::start_with(3, true, "", counter()).await;
    c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    for i in 0..20 {
        count(&c, i % 2).await;
    }
    // The agreeing entries are compared, and nothing is found.
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.metric(2, COMPARED, &SERVICE).await.unwrap() < 20.0 {
        assert!(Instant::now() < deadline, "node 3 compared nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.metric(0, DETECTED, &SERVICE).await.unwrap(), 0.0);

    std::fs::write(c.slots[2].app_dir.join("clock"), "").unwrap();
    assert_eq!(count(&c, 0).await, "21", "node 1 answers as before");
    // Node 1 answered once its replica applied the entry, and nothing else is written.
    let index = c.status(0).await.unwrap().applied_index.unwrap();
    count(&c, 1).await;
    let started = Instant::now();

    // Nodes 1 and 2 name node 3; node 3 names both (each found in its own exchange).
    for (i, disagreeing) in [(0, vec![3]), (1, vec![3]), (2, vec![1, 2])] {
        let all = |s: &haven_node::admin::Status| {
            (s.divergence.as_ref()).is_some_and(|d| d.disagreements.len() == disagreeing.len())
        };
        let divergence = wait_status(&c, i, Duration::from_secs(10), all)
            .await
            .divergence
            .unwrap();
        assert_eq!(
            (divergence.first_index, divergence.node),
            (index, i as u64 + 1)
        );
        let found: Vec<(u64, u64)> = (divergence.disagreements.iter())
            .map(|d| (d.peer, d.index))
            .collect();
        let expected: Vec<(u64, u64)> = disagreeing.iter().map(|&p| (p, index)).collect();
        assert_eq!(found, expected, "node {}", i + 1);
        let detected = c.metric(i, DETECTED, &SERVICE).await.unwrap();
        assert_eq!(detected, disagreeing.len() as f64, "node {}", i + 1);
        let first = c.metric(i, "haven_divergence_first_index", &SERVICE);
        assert_eq!(first.await.unwrap(), index as f64, "node {}", i + 1);
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "detected after {took:?}");

    let log = std::fs::read_to_string(c.log_path(0, Process::Node)).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("replicas diverged"))
        .expect("node 1 logged nothing");
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&format!(
            "node 3's replica answered entry {index} differently from this node's (node 1)"
        )),
        "{line}"
    );
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["status", "--admin", &c.slots[2].admin_addr.to_string()])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    let expected = format!(
        "divergence      DIVERGED at entry {index}: this node's (3) answers differ from node 1 from entry {index}, node 2 from entry {index}"
    );
    assert!(shown.contains(&expected), "{shown}");
}

const CHECKPOINTS: &str =
    "[checkpoints]\nmode = \"managed\"\nevery_entries = 200\nevery_seconds = 0\nkeep = 3\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deterministic_cluster_under_load_and_a_crash_raises_nothing() {
    let mut c = common::start(3, true, CHECKPOINTS).await;
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let acknowledged = common::Acknowledged::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = common::keyed_writers(&c, "/append", "", &stop, &acknowledged);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A follower killed mid-load delivers its last entries again after its restart.
    let victim = c.follower_of(leader);
    c.kill_node(victim);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.start_node(victim).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in load {
        w.await.unwrap();
    }
    c.wait_converged(Duration::from_secs(60)).await.unwrap();
    let written = acknowledged.lock().unwrap().len() as f64;
    assert!(written > 100.0, "only {written} writes acknowledged");
    // Two peers each: every node compares most of the entries twice over.
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(15);
        while c.metric(i, COMPARED, &SERVICE).await.unwrap() < written {
            assert!(
                Instant::now() < deadline,
                "node {} compared too little",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for i in 0..3 {
        assert_eq!(c.metric(i, DETECTED, &SERVICE).await.unwrap(), 0.0);
        assert_eq!(c.status(i).await.unwrap().divergence, None);
        let log = std::fs::read_to_string(c.log_path(i, Process::Node)).unwrap();
        assert!(!log.contains("replicas diverged"), "node {}", i + 1);
    }
}
