//! Idempotency answers stay identical on every node after a crash, with an app that does
//! not honour `Haven-Index` and rejects what it has seen (a SQLite table with a UNIQUE
//! column, in Python): real nodes, each running its own replica, killed with SIGKILL
//! mid-load.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use haven_client::http::Http;
use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::Process;

mod common;
use common::TestCluster;

const APP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/apps/unique_items.py");
const KILLS: usize = 3;
/// Concurrent retries per node once the load is over (each retry is an ordered entry).
const RETRIERS_PER_NODE: usize = 4;

fn unique_items() -> AppKind {
    let argv = ["python3", APP, "{host}", "{port}", "{data_dir}/items.db"];
    AppKind::Command {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        file: "items.db".to_string(),
    }
}

/// The first answer each acknowledged key got: (status, body).
type Answers = Arc<Mutex<BTreeMap<String, (u16, Bytes)>>>;

async fn post(http: &Http, client_url: &str, name: &str) -> anyhow::Result<(u16, Bytes)> {
    let url = format!("{client_url}/items");
    let headers = [("idempotency-key", name)];
    let reply = http
        .send("POST", &url, &headers, Bytes::from(name.to_string()))
        .await?;
    Ok((reply.status, reply.body))
}

/// Writes through every node until `stop`, recording each acknowledged first answer.
fn writers(
    c: &TestCluster,
    round: usize,
    stop: &Arc<AtomicBool>,
    answers: &Answers,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..c.slots.len())
        .map(|node| {
            let (http, url) = (c.http.clone(), c.slots[node].client_url());
            let (stop, answers) = (stop.clone(), answers.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("item-{round}-{node}-{n}");
                    n += 1;
                    match post(&http, &url, &name).await {
                        Ok((201, body)) => {
                            answers.lock().unwrap().insert(name, (201, body));
                        }
                        Ok((status, body)) => {
                            let text = String::from_utf8_lossy(&body);
                            assert!(status >= 500, "{name}: {status} {text}");
                        }
                        // The node is down: nothing was acknowledged.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_every_node_replays_the_first_answer_of_every_key() {
    let mut c = common::start_with(3, true, "", unique_items()).await;
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let victim = c.follower_of(leader);
    let answers = Answers::default();
    for round in 0..KILLS {
        let stop = Arc::new(AtomicBool::new(false));
        let load = writers(&c, round, &stop, &answers);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        c.kill_node(victim);
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.start_node(victim).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        for w in load {
            w.await.unwrap();
        }
    }
    c.wait_converged(Duration::from_secs(30)).await.unwrap();
    let answers = answers.lock().unwrap().clone();
    assert!(
        answers.len() > 100,
        "only {} writes acknowledged",
        answers.len()
    );
    let answers = Arc::new(answers.into_iter().collect::<Vec<_>>());
    let mut retries = tokio::task::JoinSet::new();
    for node in 0..3 {
        for part in 0..RETRIERS_PER_NODE {
            let (http, url) = (c.http.clone(), c.slots[node].client_url());
            let answers = answers.clone();
            retries.spawn(async move {
                for (name, first) in answers.iter().skip(part).step_by(RETRIERS_PER_NODE) {
                    let replayed = post(&http, &url, name).await.unwrap();
                    assert_eq!(
                        &replayed,
                        first,
                        "a retry of {name} on node {} got another answer than the first",
                        node + 1
                    );
                }
            });
        }
    }
    while let Some(done) = retries.join_next().await {
        done.unwrap();
    }
    let items: Vec<Bytes> = replica_rows(&c).await;
    assert!(items.iter().all(|i| i == &items[0]), "replicas differ");
    let log = std::fs::read_to_string(c.log_path(victim, Process::Node)).unwrap();
    assert!(
        log.contains("delivered again after a crash differently"),
        "no entry was delivered again after the kills: the test proved nothing"
    );
}

/// Every replica's rows, read from each node's own replica.
async fn replica_rows(c: &TestCluster) -> Vec<Bytes> {
    let mut all = Vec::new();
    for node in 0..c.slots.len() {
        let reply = c.get(node, "/items").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        all.push(reply.body);
    }
    all
}
