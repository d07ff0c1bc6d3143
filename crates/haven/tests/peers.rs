//! A peer that is down costs the others almost nothing: real `haven node` processes, one
//! killed with SIGKILL while writes go on.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use haven_client::metrics_text::sum;
use haven_testkit::cluster::Process;

mod common;

/// How long the follower stays down; the dial budget below scales with it.
const DOWN_FOR: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_is_dialed_with_backoff_and_reported_once() {
    let mut c = common::start(3, false, "").await;
    let leader = c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let follower = c.follower_of(leader);
    let peer = c.slots[follower].raft_addr.to_string();
    let log = c.log_path(leader, Process::Node);
    let lines_before = std::fs::read_to_string(&log).unwrap().lines().count();

    c.kill_node(follower);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (http, stop, acked) = (c.http.clone(), stop.clone(), acked.clone());
            let url = format!("{}/append", c.slots[leader].client_url());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let reply = http.post(&url, format!("w{w} {n}")).await.unwrap();
                    assert_eq!(reply.status, 201, "{}", reply.text());
                    acked.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(DOWN_FOR).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(acked.load(Ordering::Relaxed) > 100, "writes stalled");

    let text = std::fs::read_to_string(&log).unwrap();
    // openraft's own warning when a vote request fails is not the transport's report:
    // under a loaded test run the cluster may hold an election meanwhile.
    let about_peer: Vec<&str> = text
        .lines()
        .skip(lines_before)
        .filter(|l| l.contains(&peer) && !l.contains("openraft::"))
        .collect();
    assert!(
        about_peer.len() <= 3,
        "{} log lines about the dead peer in {DOWN_FOR:?}:\n{}",
        about_peer.len(),
        about_peer[..about_peer.len().min(20)].join("\n")
    );
    assert!(
        about_peer[0].contains("peer unreachable; dialing again with backoff"),
        "{}",
        about_peer[0]
    );
    let metrics = c
        .http
        .get(&format!("{}/metrics", c.slots[leader].admin_url()))
        .await
        .unwrap()
        .text();
    let this_peer = [("peer", peer.as_str())];
    let attempts = sum(&metrics, "haven_peer_connect_attempts_total", &this_peer).unwrap();
    // At most one dial per half of the 800 ms cap, plus the ramp-up from 50 ms.
    let budget = DOWN_FOR.as_secs_f64() / 0.4 + 8.0;
    assert!(attempts <= budget, "{attempts} dials in {DOWN_FOR:?}");
    assert_eq!(sum(&metrics, "haven_peer_up", &this_peer), Some(0.0));

    c.start_node(follower).unwrap();
    c.wait_converged(Duration::from_secs(20)).await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .skip(lines_before)
            .any(|l| l.contains(&peer) && l.contains("peer reachable again")),
        "the leader never logged the peer's return"
    );
    c.assert_replicas_identical().await;
}
