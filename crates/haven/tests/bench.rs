//! Smoke tests of `haven bench`: seconds-long runs of the real binary against a real local
//! cluster, checking that the reports add up (the arithmetic itself is unit-tested in
//! `haven-bench`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::ClusterSpec;
use haven_testkit::cluster::LocalCluster;
use serde_json::Value;

fn haven() -> Command {
    Command::new(env!("CARGO_BIN_EXE_haven"))
}

fn json_of(command: &mut Command) -> Value {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn cluster(dir: &tempfile::TempDir) -> LocalCluster {
    let spec = ClusterSpec {
        site: String::new(),
        nodes: 3,
        exe: PathBuf::from(env!("CARGO_BIN_EXE_haven")),
        dir: dir.path().to_path_buf(),
        extra_config: String::new(),
        app: AppKind::LogApp { prepopulate: 100 },
        managed: false,
        services: Vec::new(),
    };
    let cluster = LocalCluster::start(spec).unwrap();
    cluster
        .wait_all_ready(Duration::from_secs(20))
        .await
        .unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_mixed_load_through_every_node_reads_only_acknowledged_lines() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir).await;
    let mut command = haven();
    command.args([
        "bench",
        "load",
        "--rate",
        "300",
        "--duration",
        "2",
        "--warmup",
        "0.5",
    ]);
    command.args(["--read-ratio", "0.5", "--prepopulated", "100", "--json"]);
    for slot in &c.slots {
        command.args(["--target", &slot.client_url()]);
    }
    let report = json_of(&mut command);
    let ok = report["requests_ok"].as_u64().unwrap();
    assert!(ok > 400, "{report}");
    // No 4xx: a 404 would mean a read missed an acknowledged append. A 503 (an election
    // on a starved machine) or a request left unsent at the very end is not a bench bug.
    let errors = report["errors"].as_object().unwrap();
    assert!(
        errors
            .keys()
            .all(|kind| ["unsent", "status_5xx"].contains(&kind.as_str())),
        "{report}"
    );
    assert_eq!(report["latency"]["all"]["count"].as_u64(), Some(ok));
    let reads = report["latency"]["reads"]["count"].as_u64().unwrap();
    let writes = report["latency"]["writes"]["count"].as_u64().unwrap();
    assert_eq!(reads + writes, ok);
    let throughput = report["throughput"].as_f64().unwrap();
    assert!((270.0..=330.0).contains(&throughput), "{report}");
    c.wait_converged(Duration::from_secs(10)).await.unwrap();
    let first = c.replica_bytes(0).unwrap();
    for i in 1..c.slots.len() {
        assert_eq!(c.replica_bytes(i).unwrap(), first);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_writes_json_and_a_chart() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir).await;
    let out = dir.path().join("sweep");
    let mut command = haven();
    command.args(["bench", "sweep", "--target", &c.slots[0].client_url()]);
    command.args([
        "--start-rate",
        "100",
        "--step-factor",
        "2",
        "--max-steps",
        "2",
    ]);
    command.args(["--step-duration", "1", "--warmup", "0.2", "--json", "--out"]);
    command.arg(&out);
    let curve = json_of(&mut command);
    assert_eq!(curve["points"].as_array().map(Vec::len), Some(2), "{curve}");
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("p90"), "{svg}");
    let saved: Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(saved[0]["points"], curve["points"]);
}

#[test]
fn failover_kills_the_leader_and_reports_the_window() {
    let report = json_of(haven().args(["bench", "failover", "--trials", "1", "--json"]));
    let trials = report["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 1);
    assert_eq!(report["signal"], "kill");
    assert_ne!(trials[0]["stopped_node"], trials[0]["new_leader"]);
    let window = report["median_ms"].as_f64().unwrap();
    // Followers that see the leader's port refuse elect within tens of milliseconds;
    // past 10 s something waited for a timeout it should not have.
    assert!(window > 0.0 && window < 10_000.0, "{report}");
}

/// A planned restart of the leader after a short fault-free phase: the report names the
/// signal, counts the steady phase's writes and terms, and the leader changed.
#[test]
fn failover_with_sigterm_and_a_steady_phase_reports_both() {
    let report = json_of(haven().args([
        "bench", "failover", "--trials", "1", "--signal", "term", "--steady", "2", "--json",
    ]));
    assert_eq!(report["signal"], "term");
    let trials = report["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 1);
    assert_ne!(trials[0]["stopped_node"], trials[0]["new_leader"]);
    assert!(report["max_ms"].as_f64().unwrap() < 10_000.0, "{report}");
    let steady = &report["steady"];
    assert_eq!(steady["seconds"], 2);
    assert!(steady["achieved"].as_f64().unwrap() > 0.0, "{report}");
    assert!(steady["term_start"].as_u64().unwrap() >= 1, "{report}");
}

/// A short run of both phases: the peer-down phase must still commit writes, dial the dead
/// peer at a backed-off pace, and log about it a handful of times, not per dial.
#[test]
fn peer_down_compares_both_phases_and_counts_dials() {
    let report = json_of(haven().args([
        "bench",
        "peer-down",
        "--seconds",
        "4",
        "--rate",
        "200",
        "--json",
    ]));
    for phase in ["all_up", "peer_down"] {
        assert!(
            report[phase]["writes_ok"].as_u64().unwrap() > 100,
            "{report}"
        );
        assert!(
            report[phase]["survivors_cpu_s"].as_f64().unwrap() > 0.0,
            "{report}"
        );
    }
    let dials = report["dials_of_peer"].as_u64().unwrap();
    // At most one dial per half of the 800 ms cap over the phase and its 2 s warm-up, plus
    // the doubling steps to reach the cap.
    assert!((1..=(4_000 + 2_000) / 400 + 8).contains(&dials), "{report}");
    assert!(
        report["log_lines_about_peer"].as_u64().unwrap() <= 6,
        "{report}"
    );
    assert!(report["cpu_ratio"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn checkpoint_bench_measures_checkpoint_catch_up_restore_and_latency() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = json_of(
        haven()
            .args(["bench", "checkpoint", "--quick", "--json", "--out"])
            .arg(&out),
    );
    let size = &report["sizes"][0];
    assert_eq!(size["size_mb"].as_u64(), Some(5), "{report}");
    let checkpoint = &size["checkpoint"];
    let file_bytes = checkpoint["file_bytes"].as_u64().unwrap();
    assert!(file_bytes > 0, "{report}");
    assert!(
        checkpoint["app_bytes"].as_u64().unwrap() > 4_500_000,
        "{report}"
    );
    // The leader compacted its log first, so the learner needed a checkpoint.
    assert!(size["catch_up"]["bytes"].as_u64().unwrap() > 0, "{report}");
    let restore = &size["restore"];
    assert!(
        restore["entries_replayed"].as_u64().unwrap() >= 2000,
        "{report}"
    );
    assert!(restore["checkpoint_index"].as_u64().is_some(), "{report}");
    let latency = &size["latency"];
    for run in ["baseline", "with_checkpoints"] {
        assert!(
            latency[run]["requests_ok"].as_u64().unwrap() > 1000,
            "{report}"
        );
    }
    // Every node was asked at least once during the second run.
    assert!(
        latency["checkpoints_written"].as_u64().unwrap() >= 3,
        "{report}"
    );
    let markdown = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        markdown.contains("Command: `haven bench checkpoint --quick --json --out"),
        "{markdown}"
    );
    let saved: Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(saved["sizes"], report["sizes"]);
}

#[test]
fn bad_flags_are_refused_with_the_reason() {
    let output = haven()
        .args([
            "bench",
            "load",
            "--target",
            "http://127.0.0.1:1",
            "--read-ratio",
            "1.5",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim(),
        "haven: --read-ratio must be between 0 and 1, got 1.5"
    );
}

/// A smoke run against a real S3 server: both throughputs measured, the recovery point
/// sampled, and the restore from the archive alone replaying what was written.
#[test]
fn archive_bench_measures_throughput_recovery_point_and_restore() {
    let report = json_of(haven().args(["bench", "archive", "--quick", "--json"]));
    assert!(report["throughput_off"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["throughput_on"].as_f64().unwrap() > 0.0, "{report}");
    let rpo = &report["rpo"];
    assert!(rpo["samples"].as_u64().unwrap() > 20, "{report}");
    assert!(rpo["objects"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(rpo["upload_errors"].as_u64(), Some(0), "{report}");
    assert!(rpo["p99_s"].as_f64().unwrap() < 10.0, "{report}");
    let restore = &report["restore"];
    assert!(
        restore["entries"].as_u64().unwrap() >= rpo["writes_ok"].as_u64().unwrap(),
        "{report}"
    );
}

/// A smoke run of the site bench against a real S3 server: the recovery point sampled,
/// both acknowledgement modes measured (the archive one slower per write, since each
/// write waits for an upload), and every promotion taking writes.
#[test]
fn site_bench_measures_recovery_point_ack_cost_and_promotions() {
    let report = json_of(haven().args(["bench", "site", "--quick", "--json"]));
    assert!(report["rpo"]["samples"].as_u64().unwrap() > 20, "{report}");
    assert_eq!(report["rpo"]["connections"], 1024, "{report}");
    assert_eq!(report["rpo"]["all_nodes"], true, "{report}");
    let (quorum, archived) = (&report["quorum"], &report["quorum_archive"]);
    for mode in [quorum, archived] {
        assert!(
            mode["closed_loop_throughput"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        // Where the closed loop's CPU went: every process group did some work.
        let cpu = &mode["closed_loop_cpu"];
        for part in ["nodes_s", "store_s", "load_s"] {
            assert!(cpu[part].as_f64().unwrap() > 0.0, "{part}: {report}");
        }
        assert!(
            mode["closed_loop_objects"].as_u64().unwrap() > 0,
            "{report}"
        );
    }
    assert!(
        archived["p50_ms"].as_f64().unwrap() > quorum["p50_ms"].as_f64().unwrap(),
        "{report}"
    );
    let trials = report["rto"]["trials_ms"].as_array().unwrap();
    assert_eq!(trials.len(), 2, "{report}");
    assert!(
        report["rto"]["max_ms"].as_u64().unwrap() < 120_000,
        "{report}"
    );
}

#[test]
fn drill_bench_compares_write_latency_without_and_with_drills() {
    let report = json_of(haven().args(["bench", "drill", "--quick", "--json"]));
    let phases = report["phases"].as_array().unwrap();
    let drilling: Vec<bool> = phases
        .iter()
        .map(|p| p["drilling"].as_bool().unwrap())
        .collect();
    assert_eq!(drilling, [false, true], "{report}");
    assert!(phases[1]["drills"].as_u64().unwrap() >= 1, "{report}");
    assert_eq!(phases[1]["drills"], phases[1]["drills_passed"], "{report}");
    assert!(report["p99_ratio"].as_f64().unwrap() > 0.0, "{report}");
}
