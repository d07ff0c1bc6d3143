//! Membership changes end to end: a fresh node joins as a learner, catches up through a
//! checkpoint and is promoted; dead nodes are replaced with a new id and with the same id;
//! changes that would lose quorum are refused.

use std::process::Command;
use std::time::Duration;

mod common;
use common::TestCluster;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
/// Checkpoints every 30 entries, two kept: a new node cannot catch up from the log alone.
const CHECKPOINTS: &str =
    "[checkpoints]\nmode = \"managed\"\nevery_entries = 30\nevery_seconds = 0\nkeep = 2\n";

/// Runs `haven members ...`; Ok(stdout) or Err(stderr).
fn members(args: &[String]) -> Result<String, String> {
    let output = Command::new(HAVEN)
        .arg("members")
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    if output.status.success() {
        Ok(text(&output.stdout))
    } else {
        Err(text(&output.stderr))
    }
}

impl TestCluster {
    fn admin(&self, i: usize) -> String {
        self.slots[i].admin_addr.to_string()
    }

    /// `--id N --raft-addr .. --client-addr ..` for node `i`.
    fn node_args(&self, i: usize) -> Vec<String> {
        let slot = &self.slots[i];
        [
            "--id",
            &slot.id.to_string(),
            "--raft-addr",
            &slot.raft_addr.to_string(),
            "--client-addr",
            &slot.client_addr.to_string(),
        ]
        .map(str::to_string)
        .to_vec()
    }

    async fn write(&self, node: usize, count: usize) {
        for i in 0..count {
            let reply = self.append(node, &format!("line {i}")).await;
            assert_eq!(reply.status, 201, "{reply:?}");
        }
    }

    /// Every running node has applied everything, and their replicas are identical.
    async fn assert_running_identical(&self) {
        self.wait_converged(Duration::from_secs(30)).await.unwrap();
        let running: Vec<usize> = (0..self.slots.len())
            .filter(|i| self.slots[*i].node_running())
            .collect();
        let first = self.replica_bytes(running[0]).unwrap();
        for i in &running[1..] {
            assert!(
                self.replica_bytes(*i).unwrap() == first,
                "replica of node {} differs",
                i + 1
            );
        }
    }

    async fn voters_and_learners(&self, i: usize) -> (Vec<u64>, Vec<u64>) {
        let status = self.status(i).await.unwrap();
        (status.voters, status.learners)
    }
}

fn args(parts: &[&str], rest: Vec<String>) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).chain(rest).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_fourth_node_catches_up_and_is_promoted() {
    let mut cluster = common::start(3, true, CHECKPOINTS).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    cluster.write(leader, 100).await;
    let new = cluster.add_node().unwrap();
    let admin = cluster.admin(leader);
    let early = members(&args(&["promote", "--admin", &admin, "--id", "4"], vec![]));
    assert_eq!(
        early.unwrap_err().trim(),
        format!("haven: http://{admin}/members/promote: node 4 is not a learner; add it first")
    );
    members(&args(
        &["add-learner", "--admin", &admin],
        cluster.node_args(new),
    ))
    .unwrap();
    cluster.assert_running_identical().await;
    assert_eq!(
        cluster.voters_and_learners(leader).await,
        (vec![1, 2, 3], vec![4])
    );
    assert!(cluster.status(new).await.unwrap().checkpoint_receive.total > 0);
    let out = members(&args(&["promote", "--admin", &admin, "--id", "4"], vec![])).unwrap();
    assert_eq!(out, "voters [1, 2, 3, 4], learners []\n");
    cluster.write(leader, 20).await;
    cluster.assert_running_identical().await;
    assert_eq!(cluster.voters_and_learners(new).await.0, vec![1, 2, 3, 4]);
}

/// A cluster whose follower died after some writes and missed more: (cluster, leader, dead).
async fn with_a_dead_follower() -> (TestCluster, usize, usize) {
    let mut cluster = common::start(3, true, CHECKPOINTS).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let dead = cluster.follower_of(leader);
    cluster.write(leader, 50).await;
    cluster.kill_node(dead);
    cluster.write(leader, 50).await;
    (cluster, leader, dead)
}

impl TestCluster {
    /// `haven members replace --old <dead's id>` with node `new`'s identity.
    fn replace(&self, leader: usize, dead: usize, new: usize) {
        let old = self.slots[dead].id.to_string();
        let replace = args(
            &["replace", "--admin", &self.admin(leader), "--old", &old],
            self.node_args(new),
        );
        members(&replace).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_replaced_by_a_new_one() {
    let (mut cluster, leader, dead) = with_a_dead_follower().await;
    let new = cluster.add_node().unwrap();
    cluster.replace(leader, dead, new);
    let mut expected: Vec<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != cluster.slots[dead].id)
        .collect();
    expected.sort();
    assert_eq!(
        cluster.voters_and_learners(leader).await,
        (expected, vec![])
    );
    cluster.write(leader, 20).await;
    cluster.assert_running_identical().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_replaced_by_a_fresh_one_with_the_same_id() {
    let (mut cluster, leader, dead) = with_a_dead_follower().await;
    cluster.replace_with_fresh(dead).unwrap();
    cluster.replace(leader, dead, dead);
    cluster.write(leader, 20).await;
    cluster.assert_running_identical().await;
    assert_eq!(
        cluster.voters_and_learners(leader).await,
        (vec![1, 2, 3], vec![])
    );
    assert!(cluster.status(dead).await.unwrap().checkpoint_receive.total > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_would_lose_quorum_are_refused() {
    let mut cluster = common::start(3, false, "").await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let dead = cluster.follower_of(leader);
    let alive = cluster.follower_of(dead);
    assert_ne!(alive, leader);
    cluster.write(leader, 5).await;
    cluster.kill_node(dead);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let admin = cluster.admin(leader);
    let alive_id = cluster.slots[alive].id.to_string();
    let err = members(&args(
        &["remove", "--admin", &admin, "--id", &alive_id],
        vec![],
    ))
    .unwrap_err();
    let (l, d, a) = (
        cluster.slots[leader].id,
        cluster.slots[dead].id,
        cluster.slots[alive].id,
    );
    let set = |mut ids: Vec<u64>| {
        ids.sort();
        format!("{ids:?}").replace('[', "{").replace(']', "}")
    };
    assert_eq!(
        err.trim(),
        format!(
            "haven: http://{admin}/members/remove: refused, it would lose quorum: the new voters {} would have 1 healthy of 2 (need 2); healthy now: {}; add \"force\": true to insist",
            set(vec![l, d]),
            set(vec![l, a])
        )
    );
    assert_eq!(cluster.voters_and_learners(leader).await.0, vec![1, 2, 3]);
    let follower_admin = cluster.admin(alive);
    let err = members(&args(
        &["remove", "--admin", &follower_admin, "--id", "1"],
        vec![],
    ))
    .unwrap_err();
    assert!(
        err.contains(&format!(
            "is not the leader; send membership changes to the leader (node {l})"
        )),
        "{err}"
    );
}
