//! Storage faults end to end: a follower is killed (`kill -9`), one of its files is damaged,
//! and it is started again. Either it refuses to start, promptly and with an error naming the
//! file (and the offset where there is one), or it recovers by itself; either way the others
//! keep serving and no acknowledged write is lost. A node that refuses is then rebuilt from
//! its peers (same id, fresh disk, through a checkpoint) into a byte-identical replica. Also:
//! a damaged checkpoint on the leader, and a disk that fills up under a node.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

mod common;
use common::TestCluster;
use haven_testkit::cluster::Process;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
/// Checkpoints every 30 entries, `keep` kept: a fresh node cannot catch up from the log
/// alone once a few dozen entries were written.
fn checkpoints(keep: usize) -> String {
    format!(
        "[checkpoints]\nmode = \"managed\"\nevery_entries = 30\nevery_seconds = 0\nkeep = {keep}\n"
    )
}
/// How long a node that refuses its data may take to exit.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(10);

fn haven(args: &[&str]) -> std::process::Output {
    Command::new(HAVEN).args(args).output().unwrap()
}

fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x20], offset).unwrap();
}

fn truncate(path: &Path, len: u64) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(len).unwrap();
}

/// A file's bytes, to put back after a fault was observed.
struct Backup {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Backup {
    fn of(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self {
            path: path.to_path_buf(),
            bytes,
        }
    }

    fn restore(self) {
        std::fs::write(&self.path, &self.bytes).unwrap();
    }
}

/// `(offset, payload length)` of every record of a log segment (format in haven-log:
/// `HVNLOG02`, then frames whose length counts the kind byte and the payload).
fn records(segment: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(segment).unwrap();
    assert_eq!(&bytes[..8], b"HVNLOG02", "{}", segment.display());
    let mut out = Vec::new();
    let mut offset = 8usize;
    while offset + 9 <= bytes.len() {
        let body = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        assert!(offset + 8 + body <= bytes.len(), "unexpected torn record");
        out.push((offset as u64, body as u64 - 1));
        offset += 8 + body;
    }
    assert_eq!(
        offset,
        bytes.len(),
        "trailing bytes in {}",
        segment.display()
    );
    out
}

/// The last segment file (the one written to) in `dir`.
fn newest_segment(dir: &Path) -> PathBuf {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names.pop().unwrap()
}

impl TestCluster {
    /// `<data_dir>/<service>/` of node `i`.
    fn service_dir(&self, i: usize) -> PathBuf {
        self.data_dir(i).join("app")
    }

    fn admin(&self, i: usize) -> String {
        self.slots[i].admin_addr.to_string()
    }

    /// Appends `count` lines through `node`; every one must be acknowledged.
    async fn write_acked(&self, node: usize, tag: &str, count: usize, acked: &mut Vec<String>) {
        for i in 0..count {
            let body = format!("{tag} {i}");
            let reply = self.append(node, &body).await;
            assert_eq!(reply.status, 201, "{body}: {reply:?}");
            acked.push(body);
        }
    }

    fn log_len(&self, i: usize) -> usize {
        std::fs::read(self.log_path(i, Process::Node)).map_or(0, |b| b.len())
    }

    /// What node `i` logged from byte `from` on.
    fn log_since(&self, i: usize, from: usize) -> String {
        let bytes = std::fs::read(self.log_path(i, Process::Node)).unwrap();
        String::from_utf8_lossy(&bytes[from.min(bytes.len())..]).to_string()
    }

    /// Starts node `i` on damaged data and asserts it exits by itself, non-zero, within
    /// [`REFUSAL_DEADLINE`], having logged every one of `expected`. Returns its log.
    fn expect_refusal(&mut self, i: usize, expected: &[String]) -> String {
        let from = self.log_len(i);
        let started = Instant::now();
        self.start_node(i).unwrap();
        let status = loop {
            let exited = self.reap_exited();
            if let Some(e) = exited
                .iter()
                .find(|e| e.slot == i && e.process == Process::Node)
            {
                break e.status;
            }
            assert!(
                exited.is_empty(),
                "another process died: {exited:?}; logs in {}",
                self.dir().display()
            );
            assert!(
                started.elapsed() < REFUSAL_DEADLINE,
                "node {} did not refuse its damaged data within {REFUSAL_DEADLINE:?}:\n{}",
                i + 1,
                self.log_since(i, from)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log_since(i, from);
        assert!(
            !status.success(),
            "node {} exited with {status}:\n{log}",
            i + 1
        );
        for want in expected {
            assert!(
                log.contains(want.as_str()),
                "{want:?} not in the log:\n{log}"
            );
        }
        log
    }

    /// Starts node `i` and asserts it catches up by itself, having logged every one of
    /// `expected`; the replicas are then identical and hold every acknowledged line once.
    async fn expect_recovery(&mut self, i: usize, expected: &[String], acked: &[String]) {
        let from = self.log_len(i);
        self.start_node(i).unwrap();
        self.assert_all_acked_once(acked).await;
        assert!(self.reap_exited().is_empty(), "a process died");
        let log = self.log_since(i, from);
        for want in expected {
            assert!(
                log.contains(want.as_str()),
                "{want:?} not in the log:\n{log}"
            );
        }
    }

    /// Converges, asserts the replicas are identical, and that each acknowledged line is in
    /// them exactly once.
    async fn assert_all_acked_once(&self, acked: &[String]) {
        let replica = String::from_utf8(self.assert_replicas_identical().await).unwrap();
        for body in acked {
            let copies = replica.lines().filter(|l| l == body).count();
            assert_eq!(copies, 1, "{body:?} appears {copies} times");
        }
    }

    /// Rebuilds node `i` from its peers: a fresh, empty disk, the same id, `haven members
    /// replace` on the leader; it comes back through a checkpoint, byte-identical.
    /// `through_checkpoint`: the cluster checkpoints, so the node must come back through one.
    async fn rebuild(
        &mut self,
        i: usize,
        leader: usize,
        acked: &mut Vec<String>,
        through_checkpoint: bool,
    ) {
        // The leader has compacted: the log alone cannot bring a fresh node up.
        let deadline = Instant::now() + Duration::from_secs(10);
        while through_checkpoint
            && self.status(leader).await.unwrap().purged_index.unwrap_or(0) == 0
        {
            assert!(Instant::now() < deadline, "the leader never compacted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.replace_with_fresh(i).unwrap();
        let slot = &self.slots[i];
        let id = slot.id.to_string();
        let (raft, client) = (slot.raft_addr.to_string(), slot.client_addr.to_string());
        let admin = self.admin(leader);
        let out = haven(&[
            "members",
            "replace",
            "--admin",
            &admin,
            "--old",
            &id,
            "--id",
            &id,
            "--raft-addr",
            &raft,
            "--client-addr",
            &client,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.write_acked(leader, "after rebuild", 5, acked).await;
        self.assert_all_acked_once(acked).await;
        let status = self.status(i).await.unwrap();
        assert!(
            !through_checkpoint || status.checkpoint_receive.total > 0,
            "{status:?}"
        );
        assert_eq!(status.voters, vec![1, 2, 3]);
    }
}

/// The log directory: a damaged vote (truncated, bit-flipped) and a segment with a flipped
/// byte in the middle are refused naming file and offset; a damaged `committed` (a hint) is
/// ignored with a warning naming it; a torn segment tail is cut off; a segment cut short
/// past entries already applied is refused (it used to stop openraft with a panic). Then
/// the node is rebuilt from its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_log_files_are_refused_or_repaired() {
    let (mut cluster, leader, f, mut acked) = started(true, &checkpoints(2), 20).await;
    let log_dir = cluster.service_dir(f).join("log");

    // The vote: Raft's safety rests on it, so damage is never guessed around.
    cluster.kill_node(f);
    let vote = log_dir.join("vote");
    let backup = Backup::of(&vote);
    truncate(&vote, 10);
    cluster.expect_refusal(
        f,
        &[format!(
            "corrupt log record in {} at offset 0: metadata file is only 10 bytes",
            vote.display()
        )],
    );
    backup.restore();
    let backup = Backup::of(&vote);
    flip_byte(&vote, backup.bytes.len() as u64 - 1);
    cluster.expect_refusal(
        f,
        &[format!(
            "corrupt log record in {} at offset 16: metadata checksum mismatch",
            vote.display()
        )],
    );
    backup.restore();
    cluster
        .write_acked(leader, "vote down", 10, &mut acked)
        .await;

    // `committed` is a hint: ignored when damaged, named in a warning.
    let committed = log_dir.join("committed");
    for damage in ["truncated", "flipped"] {
        cluster.kill_node(f);
        let len = std::fs::metadata(&committed).unwrap().len();
        match damage {
            "truncated" => truncate(&committed, 7),
            _ => flip_byte(&committed, len - 1),
        }
        cluster.write_acked(leader, damage, 5, &mut acked).await;
        let reason = match damage {
            "truncated" => "at offset 0: metadata file is only 7 bytes",
            _ => "at offset 16: metadata checksum mismatch",
        };
        let warning = format!("{}", committed.display());
        cluster
            .expect_recovery(
                f,
                &[
                    "ignoring damaged metadata file".to_string(),
                    format!("{warning} {reason}"),
                ],
                &acked,
            )
            .await;
    }

    // A segment: a flipped byte inside is corruption, a cut-off end a torn write.
    cluster.kill_node(f);
    let segments = log_dir.join("segments");
    let segment = newest_segment(&segments);
    let spans = records(&segment);
    assert!(spans.len() >= 5, "{} records", spans.len());
    let (offset, len) = spans[spans.len() / 2];
    let backup = Backup::of(&segment);
    flip_byte(&segment, offset + 9 + len / 2);
    cluster.expect_refusal(
        f,
        &[format!(
            "corrupt log record in {} at offset {offset}: checksum mismatch",
            segment.display()
        )],
    );
    backup.restore();
    // A write torn by the crash: a record header promising more bytes than follow.
    let mut torn = OpenOptions::new().append(true).open(&segment).unwrap();
    torn.write_all(&[100, 0, 0, 0, 1, 2, 3, 4, 1, 0xaa, 0xbb])
        .unwrap();
    drop(torn);
    cluster
        .write_acked(leader, "torn down", 10, &mut acked)
        .await;
    cluster
        .expect_recovery(
            f,
            &[
                "repairing torn tail of the log".to_string(),
                format!("{}", segment.display()),
                "record of 108 bytes runs past the end of the file".to_string(),
            ],
            &acked,
        )
        .await;

    // An entry the replica applied cut off the end: the log no longer covers the applied
    // index and no checkpoint does, so the node must say so (openraft stopped on a broken
    // invariant, a panic, before). The apply state is saved at most every 100 ms: one more
    // write after a pause makes it record the last index, which must not be exactly where
    // a checkpoint was taken.
    let mut round = 0;
    let applied = loop {
        round += 1;
        assert!(round < 20, "every write landed on a checkpoint");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let tag = format!("last {round}");
        cluster.write_acked(leader, &tag, 1, &mut acked).await;
        cluster.assert_all_acked_once(&acked).await;
        let applied = cluster.status(f).await.unwrap().applied_index.unwrap();
        let ckpts = cluster.service_dir(f).join("checkpoints");
        let newest = std::fs::read_dir(&ckpts)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().to_string();
                name.strip_prefix("ckpt-")?.get(..20)?.parse::<u64>().ok()
            })
            .max();
        if newest != Some(applied) {
            break applied;
        }
    };
    cluster.kill_node(f);
    let segment = newest_segment(&segments);
    let spans = records(&segment);
    let (last, last_len) = spans[spans.len() - 1];
    truncate(&segment, last + 9 + last_len / 2);
    let apply_dir = cluster.service_dir(f).join("apply");
    cluster.expect_refusal(
        f,
        &[
            "repairing torn tail of the log".to_string(),
            format!(
                "the log in {} ends at index {}, but {} records index {applied} as applied and no checkpoint covers it",
                log_dir.display(),
                applied - 1,
                apply_dir.display()
            ),
            "rebuild this node from its peers".to_string(),
        ],
    );
    cluster.write_acked(leader, "log cut", 10, &mut acked).await;
    cluster.rebuild(f, leader, &mut acked, true).await;
}

/// A 3-node cluster with `count` acknowledged writes, all applied everywhere:
/// (cluster, leader, a follower, the acknowledged lines).
async fn started(
    managed: bool,
    config: &str,
    count: usize,
) -> (TestCluster, usize, usize, Vec<String>) {
    let cluster = common::start(3, managed, config).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let follower = cluster.follower_of(leader);
    let mut acked = Vec::new();
    cluster
        .write_acked(leader, "first", count, &mut acked)
        .await;
    cluster.assert_all_acked_once(&acked).await;
    (cluster, leader, follower, acked)
}

/// `apply/state.0|1`: one damaged copy falls back to the other (a warning names it); both
/// damaged is refused naming both files. Then the node is rebuilt from its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_apply_state_falls_back_or_is_refused() {
    let (mut cluster, leader, f, mut acked) = started(true, &checkpoints(2), 30).await;
    // The state is saved at most every 100 ms, after applying: both copies must exist.
    let apply = cluster.service_dir(f).join("apply");
    let copies = ["state.0", "state.1"].map(|n| apply.join(n));
    for round in 0.. {
        if copies.iter().all(|p| p.exists()) {
            break;
        }
        assert!(round < 50, "{copies:?} never both written");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let tag = format!("second {round}");
        cluster.write_acked(leader, &tag, 1, &mut acked).await;
        cluster.assert_all_acked_once(&acked).await;
    }
    cluster.kill_node(f);

    // Past the 24-byte header: the payload's checksum fails.
    flip_byte(&copies[0], 24);
    cluster
        .write_acked(leader, "one copy", 10, &mut acked)
        .await;
    cluster
        .expect_recovery(
            f,
            &[
                "an apply state copy is damaged".to_string(),
                format!("{}: checksum mismatch", copies[0].display()),
            ],
            &acked,
        )
        .await;

    // Cut inside the header (XOR again could undo the first flip if that copy was not
    // saved over since).
    cluster.kill_node(f);
    for copy in &copies {
        truncate(copy, 20);
    }
    cluster.expect_refusal(
        f,
        &[format!(
            "corrupt apply state: {}: bad header; {}: bad header",
            copies[0].display(),
            copies[1].display()
        )],
    );
    cluster
        .write_acked(leader, "both copies", 40, &mut acked)
        .await;
    cluster.rebuild(f, leader, &mut acked, true).await;
}

/// The checkpoint directory: waits until `dir` holds no file being written and the same
/// names twice in a row; returns the newest checkpoint file.
async fn settled_newest_checkpoint(dir: &Path) -> PathBuf {
    let names = || {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        names
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut previous = Vec::new();
    loop {
        let now = names();
        if now == previous && !now.iter().any(|n| n.starts_with(".tmp-")) {
            let newest = now.iter().rev().find(|n| n.ends_with(".hvc")).unwrap();
            return dir.join(newest);
        }
        assert!(Instant::now() < deadline, "checkpoints never settled");
        previous = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A checkpoint damaged on the leader: the leader does not crash and does not ship it (it
/// sends the newest intact one, which the log still follows), `haven checkpoints list
/// --verify` shows it as unreadable, and a restore from it is refused. The leader is then
/// rebuilt from the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_checkpoint_on_the_leader_is_never_shipped_or_restored() {
    let (mut cluster, leader, f, mut acked) = started(true, &checkpoints(3), 10).await;
    cluster.kill_node(f);
    cluster
        .write_acked(leader, "while down", 120, &mut acked)
        .await;
    // Generous: the whole suite beside it once slowed compaction past 20 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster
        .status(leader)
        .await
        .unwrap()
        .purged_index
        .unwrap_or(0)
        <= 20
    {
        assert!(Instant::now() < deadline, "the leader never compacted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ckpt_dir = cluster.service_dir(leader).join("checkpoints");
    let damaged = settled_newest_checkpoint(&ckpt_dir).await;
    // Inside the compressed payload: the trailer still reads fine, only the checksum fails.
    flip_byte(&damaged, 12);
    let leader_log = cluster.log_len(leader);
    let follower_log = cluster.log_len(f);

    cluster.start_node(f).unwrap();
    cluster.assert_all_acked_once(&acked).await;
    assert!(cluster.reap_exited().is_empty(), "a process died");
    let log = cluster.log_since(leader, leader_log);
    let named = format!(
        "corrupt checkpoint {}: checksum mismatch",
        damaged.display()
    );
    assert!(log.contains("checkpoint failed verification"), "{log}");
    assert!(log.contains(&named), "{log}");
    let log = cluster.log_since(f, follower_log);
    assert!(log.contains("replica restored from checkpoint"), "{log}");
    assert!(!log.contains("received checkpoint refused"), "{log}");
    assert!(cluster.status(f).await.unwrap().checkpoint_receive.total > 0);

    let data_dir = cluster.data_dir(leader).display().to_string();
    let out = haven(&["checkpoints", "list", "--verify", "--data-dir", &data_dir]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains(&format!("unreadable: {named}")), "{table}");
    assert_eq!(table.matches("unreadable").count(), 1, "{table}");

    cluster.kill_node(leader);
    let index = damaged.file_name().unwrap().to_string_lossy()[5..25]
        .parse::<u64>()
        .unwrap();
    let target = cluster.dir().join("restore-damaged");
    let target_arg = target.display().to_string();
    let out = haven(&[
        "restore",
        "--data-dir",
        &data_dir,
        "--to-index",
        &index.to_string(),
        "--out",
        &target_arg,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&named), "{stderr}");
    assert!(!target.join("log.txt").exists());

    let new_leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    cluster
        .write_acked(new_leader, "old leader down", 40, &mut acked)
        .await;
    cluster.rebuild(leader, new_leader, &mut acked, true).await;
}

/// A tmpfs mounted over a node's data directory, unmounted when dropped (also when the test
/// fails; lazily if a process still holds a file there).
struct Mount {
    dir: PathBuf,
}

impl Mount {
    /// `None` when mounting is not permitted here.
    fn tmpfs(dir: &Path, size: &str) -> Option<Self> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs on {} ({}); the disk-full test needs root or CAP_SYS_ADMIN",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Self {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Fills the file system of `dir` with `dir/filler` until 64 KiB are left.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    file.set_len(written.saturating_sub(64 << 10)).unwrap();
    path
}

/// A follower whose disk fills up stops cleanly, naming ENOSPC, instead of serving without
/// Raft or damaging its log; the others keep acknowledging writes. With space freed it
/// starts again (a torn tail at most, repaired) and converges with every write once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_node_cleanly_and_it_recovers_with_space() {
    let (mut cluster, leader, f, mut acked) = started(false, "", 10).await;
    cluster.kill_node(f);
    let data = cluster.data_dir(f);
    let moved = data.with_file_name("data.moved");
    std::fs::rename(&data, &moved).unwrap();
    std::fs::create_dir(&data).unwrap();
    let Some(mount) = Mount::tmpfs(&data, "8m") else {
        return;
    };
    let mut mount = Some(mount);
    copy_tree(&moved, &data);
    let filler = fill(&data);

    let from = cluster.log_len(f);
    cluster.start_node(f).unwrap();
    cluster
        .wait_converged(Duration::from_secs(20))
        .await
        .unwrap();
    let padding = "x".repeat(2000);
    let mut exited = None;
    for i in 0..200 {
        let body = format!("full {i} {padding}");
        let reply = cluster.append(leader, &body).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        acked.push(body);
        exited = cluster.reap_exited().into_iter().next();
        if exited.is_some() {
            break;
        }
    }
    let deadline = Instant::now() + REFUSAL_DEADLINE;
    while exited.is_none() {
        assert!(
            Instant::now() < deadline,
            "the node with a full disk neither stopped nor failed:\n{}",
            cluster.log_since(f, from)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        exited = cluster.reap_exited().into_iter().next();
    }
    let exited = exited.unwrap();
    let log = cluster.log_since(f, from);
    assert_eq!(
        (exited.slot, exited.process),
        (f, Process::Node),
        "{exited:?}"
    );
    assert!(!exited.status.success(), "{log}");
    assert!(log.contains("No space left on device"), "{log}");
    cluster
        .write_acked(leader, "node down", 10, &mut acked)
        .await;

    // With space again the log opens (a torn tail at most, cut off). A follower applies
    // what the leader committed without waiting for its own flush, so the write that hit
    // ENOSPC may carry an entry already applied: the node then refuses, saying so, and is
    // rebuilt from its peers.
    std::fs::remove_file(&filler).unwrap();
    let from = cluster.log_len(f);
    cluster.start_node(f).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(exited) = cluster.reap_exited().into_iter().next() {
            let log = cluster.log_since(f, from);
            assert_eq!((exited.slot, exited.process), (f, Process::Node), "{log}");
            assert!(!exited.status.success(), "{log}");
            let want = "as applied and no checkpoint covers it: entries this replica applied are missing from the log (a log write that failed after they were applied, e.g. on a full disk";
            assert!(log.contains(want), "{log}");
            assert!(!log.contains("corrupt log record"), "{log}");
            // A fresh disk: off the tmpfs.
            drop(mount.take());
            cluster.rebuild(f, leader, &mut acked, false).await;
            break;
        }
        if cluster
            .wait_converged(Duration::from_millis(300))
            .await
            .is_ok()
        {
            assert!(
                !cluster.log_since(f, from).contains("corrupt log record"),
                "the full disk damaged the log"
            );
            cluster.assert_all_acked_once(&acked).await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {} neither recovered nor refused",
            f + 1
        );
    }
    cluster.kill_node(f);
    drop(mount);
}
