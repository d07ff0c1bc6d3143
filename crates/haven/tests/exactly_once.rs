//! Exactly-once for an app that knows nothing of Haven: a counter in Python that adds one
//! per POST and keeps the count in a file. Nodes (each with its replica, in managed mode,
//! with checkpoints) are killed with SIGKILL at pseudo-random moments under load, and
//! afterwards every replica's count equals the number of writes acknowledged. Without the
//! rebuild from a checkpoint after a crash, entries the app applied just before a kill are
//! delivered to it again and counted twice.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::Process;

mod common;

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/counter.py");
const KILLS: u64 = 20;
const CHECKPOINTS: &str =
    "[checkpoints]\nmode = \"managed\"\nevery_entries = 25\nevery_seconds = 0\nkeep = 3\n";

fn counter() -> AppKind {
    let argv = ["python3", APP, "{host}", "{port}", "{data_dir}/count.txt"];
    AppKind::Command {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        file: "count.txt".to_string(),
    }
}

/// A small deterministic generator: the kill schedule is the same on every run.
fn next(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_knows_nothing_of_haven_counts_every_acknowledged_write_once() {
    let mut c = common::start_with(3, true, CHECKPOINTS, counter()).await;
    c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let acknowledged = common::Acknowledged::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = common::keyed_writers(&c, "/count", "", &stop, &acknowledged);
    let mut random = 7;
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(150 + next(&mut random) % 400)).await;
        let victim = (next(&mut random) % 3) as usize;
        c.kill_node(victim);
        tokio::time::sleep(Duration::from_millis(next(&mut random) % 300)).await;
        c.start_node(victim).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in load {
        w.await.unwrap();
    }
    c.wait_converged(Duration::from_secs(60)).await.unwrap();
    let written = acknowledged.lock().unwrap().len();
    assert!(written > 100, "only {written} writes acknowledged");
    for node in 0..c.slots.len() {
        let reply = c.get(node, "/count").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            reply.text(),
            written.to_string(),
            "node {}'s replica counted {} writes, {written} were acknowledged",
            node + 1,
            reply.text()
        );
    }
    let rebuilt = (0..c.slots.len())
        .map(|i| std::fs::read_to_string(c.log_path(i, Process::Node)).unwrap())
        .filter(|log| log.contains("replica rebuilt from its newest checkpoint"))
        .count();
    assert!(
        rebuilt > 0,
        "no replica was rebuilt after a kill: the test proved nothing"
    );
}
