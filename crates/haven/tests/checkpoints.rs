//! Checkpoints end to end: real nodes managing real log-app processes, compaction, catch-up
//! through a checkpoint, and point-in-time restore compared with replay from scratch.

use std::collections::HashMap;
use std::collections::HashSet;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

mod common;
use common::TestCluster;
use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::Process;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");

fn checkpoints(mode: &str, every_entries: u64, keep: usize) -> String {
    format!(
        "[checkpoints]\nmode = \"{mode}\"\nevery_entries = {every_entries}\nevery_seconds = 0\nkeep = {keep}\n"
    )
}

impl TestCluster {
    async fn append_many(&self, node: usize, from: usize, count: usize) {
        for i in from..from + count {
            let reply = self.append(node, &format!("entry {i}")).await;
            assert_eq!(reply.status, 201, "append {i}: {reply:?}");
        }
    }

    fn node_data_dir(&self, i: usize) -> PathBuf {
        self.dir().join(format!("node{}", i + 1)).join("data")
    }
}

fn haven(args: &[&str]) -> std::process::Output {
    Command::new(HAVEN).args(args).output().unwrap()
}

fn listed(data_dir: &Path, verify: bool) -> Vec<serde_json::Value> {
    let data_dir = data_dir.display().to_string();
    let mut args = vec!["checkpoints", "list", "--json", "--data-dir", &data_dir];
    if verify {
        args.push("--verify");
    }
    let out = haven(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn listed_indexes(data_dir: &Path) -> Vec<u64> {
    listed(data_dir, false)
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect()
}

/// A node that is down while the others checkpoint and compact their logs past its
/// position comes back through a checkpoint streamed from the leader, and ends with a
/// replica byte-identical to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_compaction_comes_back_from_a_checkpoint() {
    catch_up_through_a_checkpoint(true, "managed").await;
}

/// The same through the app's snapshot and restore endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_mode_catches_a_node_up_through_the_app_endpoints() {
    catch_up_through_a_checkpoint(false, "hooks").await;
}

async fn catch_up_through_a_checkpoint(managed: bool, mode: &str) {
    let mut cluster = common::start(3, managed, &checkpoints(mode, 40, 2)).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let down = cluster.follower_of(leader);
    cluster.append_many(leader, 0, 20).await;
    cluster
        .wait_converged(Duration::from_secs(20))
        .await
        .unwrap();
    cluster.kill_node(down);
    cluster.append_many(leader, 20, 200).await;
    wait_purged_past(&cluster, leader, 40).await;
    cluster.start_node(down).unwrap();
    cluster.assert_replicas_identical().await;
    assert!(
        cluster
            .metric(down, "haven_checkpoints_installed_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
    let status = cluster.status(down).await.unwrap();
    assert!(status.checkpoint_receive.total > 0, "{status:?}");
    assert_eq!(
        status.checkpoint_receive.bytes,
        status.checkpoint_receive.total
    );
}

/// Restores to several indexes equal the live replica as it was at that index, and a
/// replay of the whole log into an empty app (from a second, identical node that keeps
/// its log whole), so the checkpoint path and the replay path agree with the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_several_indexes_equals_replay_from_scratch() {
    let mut compacted = common::start(1, true, &checkpoints("managed", 30, 64)).await;
    let mut whole = common::start(1, true, "").await;
    let mut live = Vec::new();
    for batch in 0..4 {
        for cluster in [&compacted, &whole] {
            cluster.append_many(0, batch * 35, 35).await;
        }
        let index = compacted
            .wait_converged(Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(
            whole.wait_converged(Duration::from_secs(20)).await.unwrap(),
            index
        );
        live.push((index, compacted.replica_bytes(0).unwrap()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    compacted.kill_node(0);
    whole.kill_node(0);
    let data_dir = compacted.node_data_dir(0);
    let indexes = listed_indexes(&data_dir);
    assert!(indexes.len() >= 4, "checkpoints: {indexes:?}");
    for (target, bytes) in &live {
        let restored = restore(&data_dir, compacted.dir(), *target, false);
        assert!(
            &restored == bytes,
            "restore to {target} differs from the live replica"
        );
        let replayed = restore(&whole.node_data_dir(0), whole.dir(), *target, true);
        assert!(
            replayed == restored,
            "replay to {target} differs from the restore"
        );
    }
    let target = indexes[1] + 7;
    let restored = restore(&data_dir, compacted.dir(), target, false);
    let replayed = restore(&whole.node_data_dir(0), whole.dir(), target, true);
    assert!(
        replayed == restored,
        "restore to {target} differs from replay"
    );
}

/// Restores `target` into a fresh directory and returns the log app's file.
fn restore(data_dir: &Path, scratch: &Path, target: u64, from_scratch: bool) -> Vec<u8> {
    let out = scratch.join(format!("restore-{target}-{from_scratch}"));
    let target_arg = target.to_string();
    let (data, out_arg) = (data_dir.display().to_string(), out.display().to_string());
    let mut args = vec![
        "restore",
        "--data-dir",
        &data,
        "--to-index",
        &target_arg,
        "--out",
        &out_arg,
    ];
    if from_scratch {
        args.push("--from-scratch");
    }
    let output = haven(&args);
    assert!(
        output.status.success(),
        "restore to {target}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(out.join("log.txt")).unwrap()
}

/// A checkpoint with one flipped byte is refused with the reason, and nothing is left in
/// the output directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_is_detected_and_never_restored() {
    let mut cluster = common::start(1, true, &checkpoints("managed", 20, 64)).await;
    cluster.append_many(0, 0, 50).await;
    cluster
        .wait_converged(Duration::from_secs(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill_node(0);
    let data_dir = cluster.node_data_dir(0);
    let first = listed_indexes(&data_dir)[0];
    let dir = data_dir.join("app").join("checkpoints");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains(&format!("{first:020}"))
        })
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[20] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let verified = listed(&data_dir, true);
    let damaged: Vec<_> = verified.iter().filter(|c| c["index"].is_null()).collect();
    assert_eq!(damaged.len(), 1, "{verified:?}");
    assert_eq!(damaged[0]["file"].as_str(), Some(&*file.to_string_lossy()));
    let reason = damaged[0]["unreadable"].as_str().unwrap();
    assert!(reason.contains("checksum mismatch"), "{reason}");
    assert!(
        verified.len() > 1,
        "the readable ones are listed too: {verified:?}"
    );
    let out = cluster.dir().join("restore-corrupt");
    let output = haven(&[
        "restore",
        "--data-dir",
        &data_dir.display().to_string(),
        "--to-index",
        &first.to_string(),
        "--out",
        &out.display().to_string(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(!out.join("log.txt").exists());
}

/// kill -9 at arbitrary moments while checkpoints are taken every few entries and a
/// restarted node is installing one: every node comes back, every acknowledged write is
/// in every replica exactly once, and the replicas are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_checkpoints_and_installs_leaves_every_node_recoverable() {
    let mut cluster = common::start(3, true, &checkpoints("managed", 10, 2)).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let victim = cluster.follower_of(leader);
    let mut acknowledged = Vec::new();
    for round in 0..6u64 {
        let reached = cluster.status(leader).await.unwrap().last_log_index;
        cluster.kill_node(victim);
        acknowledged.extend(append_acknowledged(&cluster, leader, round, 40).await);
        // The leader keeps log entries a replication stream still reads; once they are
        // gone, the victim can only come back through a checkpoint.
        wait_purged_past(&cluster, leader, reached.unwrap_or(0)).await;
        cluster.start_node(victim).unwrap();
        // Somewhere in the install of a checkpoint, or in the victim's own checkpointing.
        tokio::time::sleep(Duration::from_millis(round * 37 % 150)).await;
        cluster.kill_node(victim);
        cluster.start_node(victim).unwrap();
        acknowledged.extend(append_acknowledged(&cluster, leader, round + 100, 20).await);
    }
    let replica = cluster.assert_replicas_identical().await;
    let text = String::from_utf8(replica).unwrap();
    for body in &acknowledged {
        let copies = text.lines().filter(|l| l == body).count();
        assert_eq!(copies, 1, "{body:?} appears {copies} times");
    }
    let log = std::fs::read_to_string(cluster.log_path(victim, Process::Node)).unwrap();
    let installs = log.matches("replica restored from checkpoint").count();
    assert!(installs >= 1, "the victim never installed a checkpoint");
}

/// Waits until `node` has purged its log beyond `index`. openraft defers a purge while a
/// replication stream to a killed follower still holds the log: 10 to 15 s seen here on
/// an idle machine, so the wait allows several times that under CI's load.
async fn wait_purged_past(cluster: &TestCluster, node: usize, index: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = cluster.status(node).await.unwrap();
        if status.purged_index.unwrap_or(0) > index {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node {node} never compacted past {index}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Appends `count` lines while checkpoints run; returns the acknowledged ones.
async fn append_acknowledged(
    cluster: &TestCluster,
    node: usize,
    round: u64,
    count: usize,
) -> Vec<String> {
    let mut acknowledged = Vec::new();
    for i in 0..count {
        let body = format!("round {round} line {i}");
        if cluster.append(node, &body).await.status == 201 {
            acknowledged.push(body);
        }
    }
    acknowledged
}

/// `POST /checkpoints` right after another one answers too: openraft drops a trigger that
/// arrives while it still books the previous checkpoint, and the handler must ask again
/// (it waited out its whole 600 s budget before; found by `haven bench checkpoint`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_checkpoint_requests_are_all_answered() {
    let cluster = common::start(1, true, &checkpoints("managed", 100_000, 64)).await;
    let url = format!("{}/checkpoints", cluster.slots[0].admin_url());
    let mut last = 0;
    for round in 0..5 {
        cluster.append_many(0, round * 3, 3).await;
        let started = std::time::Instant::now();
        let reply = cluster.http.post(&url, "").await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let taken: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let index = taken["index"].as_u64().unwrap();
        assert!(index > last, "checkpoint {index} after {last}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "took {:?}",
            started.elapsed()
        );
        last = index;
    }
}

/// Every background task of a node is a named worker on `GET /workers`, all running, and a
/// node asked to stop (SIGTERM) ends every one of them within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lists_its_workers_and_stops_them_all() {
    use haven_base::workers::WorkerInfo;
    use haven_base::workers::WorkerState;
    let mut cluster = common::start(1, true, &checkpoints("managed", 30, 2)).await;
    cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let url = format!("{}/workers", cluster.slots[0].admin_url());
    let reply = haven_client::http::Http::new(Duration::from_secs(5))
        .get(&url)
        .await
        .unwrap();
    let workers: Vec<WorkerInfo> = serde_json::from_slice(&reply.body).unwrap();
    let mut names: Vec<&str> = workers.iter().map(|w| w.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "admin-server",
            "alert-delivery",
            "app/app-supervisor",
            "app/apply-delivery",
            "app/checkpoint-trigger",
            "app/divergence-check",
            "app/log-compaction",
            "app/step-aside",
            "client-server",
            "leader-balance",
            "raft-server",
            "rules",
        ]
    );
    assert!(
        workers.iter().all(|w| w.state == WorkerState::Running),
        "{workers:?}"
    );
    let pid = cluster.slots[0].node_pid().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exited = loop {
        let exited = cluster.reap_exited();
        if let Some(node) = exited.into_iter().find(|e| e.process == Process::Node) {
            break node;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exited.status.success(), "{:?}", exited.status);
    let log = std::fs::read_to_string(cluster.log_path(0, Process::Node)).unwrap();
    assert!(log.contains("shutting down"), "{log}");
    assert!(!log.contains("did not stop in time"), "{log}");
}

/// Lines each replica starts with in the stand-in test: about 140 MB of state, so a
/// checkpoint's copy pauses a replica long enough for requests to arrive meanwhile.
const LARGE_STATE_LINES: u64 = 1_000_000;
/// Writes are sent on a clock, not one after the other: a client waiting for its previous
/// answer sends nothing during a pause.
const WRITE_EVERY: Duration = Duration::from_millis(2);

/// While a checkpoint copies a node's replica, the node's clients are answered by a peer
/// (`haven_stood_in_total`), and nothing is lost or doubled on the way: every write is
/// acknowledged at its own index, and every replica holds each one exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answers_the_clients_of_a_node_paused_for_a_checkpoint() {
    let app = AppKind::LogApp {
        prepopulate: LARGE_STATE_LINES,
    };
    let config = checkpoints("managed", 1_000_000_000, 2);
    let cluster = Arc::new(common::start_with(3, true, &config, app).await);
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let paused = cluster.follower_of(leader);
    // Every replica has its state before the load: a checkpoint of an app still filling
    // its lines would be quick.
    assert_eq!(cluster.append(paused, "first").await.status, 201);
    cluster
        .wait_converged(Duration::from_secs(60))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = tokio::spawn(write_on_a_clock(cluster.clone(), paused, stop.clone()));
    let url = format!("{}/checkpoints", cluster.slots[paused].admin_url());
    let stood_in = || cluster.metric(paused, "haven_stood_in_total", &[]);
    for _ in 0..10 {
        let reply = cluster.http.post(&url, "").await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        if stood_in().await.unwrap() > 0.0 {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let acknowledged = writes.await.unwrap();
    assert!(
        stood_in().await.unwrap() > 0.0,
        "no request reached the node while its replica was paused: the test proved nothing"
    );
    let indexes: HashSet<u64> = acknowledged.iter().map(|(index, _)| *index).collect();
    assert_eq!(indexes.len(), acknowledged.len(), "two writes at one index");
    let replica = String::from_utf8(cluster.assert_replicas_identical().await).unwrap();
    let mut times: HashMap<&str, usize> = HashMap::new();
    for line in replica.lines().filter(|line| line.starts_with("stand-in ")) {
        *times.entry(line).or_default() += 1;
    }
    assert_eq!(times.len(), acknowledged.len(), "writes in the replicas");
    for (_, body) in &acknowledged {
        assert_eq!(
            times.get(body.as_str()),
            Some(&1),
            "{body:?} in the replicas"
        );
    }
}

/// Writes a unique line to `node` every [`WRITE_EVERY`] until `stop`; returns each line
/// with its index once all are answered.
async fn write_on_a_clock(
    cluster: Arc<TestCluster>,
    node: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(u64, String)> {
    let mut ticks = tokio::time::interval(WRITE_EVERY);
    let mut writes = tokio::task::JoinSet::new();
    for n in 0.. {
        ticks.tick().await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let cluster = cluster.clone();
        writes.spawn(async move {
            let body = format!("stand-in {n}");
            let reply = cluster.append(node, &body).await;
            assert_eq!(reply.status, 201, "{body}: {}", reply.text());
            let index = reply.headers["haven-index"].to_str().unwrap();
            (index.parse::<u64>().unwrap(), body)
        });
    }
    writes.join_all().await
}
