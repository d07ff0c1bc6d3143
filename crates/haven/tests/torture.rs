//! `haven torture` end to end: short runs under kills, pauses and (as root) partitions
//! must end with a clean verdict. Each run is a separate `haven torture` process, as a
//! user would start it.

use std::process::Command;

use serde_json::Value;

/// Runs `haven torture --json` with `args` and returns its report; panics on a violation.
fn torture(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_haven"))
        .arg("torture")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?}: no JSON report ({e}):\n{stdout}\n{stderr}"));
    assert!(
        output.status.success() && report["passed"] == true,
        "{args:?}: violations {}\ntimeline {}\nkept {}\n{stderr}",
        report["violations"],
        report["timeline"],
        report["dir"]
    );
    let partitions = report["partitions"].as_str().unwrap_or_default();
    if partitions.starts_with("skipped") {
        eprintln!("torture {args:?}: partition faults {partitions}");
    }
    report
}

#[test]
fn short_runs_under_faults_are_linearizable_durable_and_identical() {
    for (seed, nodes) in [("1", "3"), ("2", "3"), ("3", "5")] {
        let report = torture(&["--seed", seed, "--nodes", nodes, "--duration", "8"]);
        assert_eq!(report["seed"].as_u64().unwrap().to_string(), seed);
        assert!(
            !report["timeline"].as_array().unwrap().is_empty(),
            "seed {seed}: no fault was injected"
        );
        let ops = &report["ops"];
        assert!(
            ops["writes_ok"].as_u64().unwrap() > 10 && ops["reads_ok"].as_u64().unwrap() > 10,
            "seed {seed}: too little work to judge: {ops}"
        );
        for key in report["per_key"].as_array().unwrap() {
            assert_eq!(key["linearizability"], "Linearizable", "{key}");
        }
    }
}
