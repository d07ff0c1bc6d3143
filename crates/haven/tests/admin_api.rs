//! A property test of the admin API: schemathesis (from PyPI) generates requests from the
//! node's own `/openapi.json` (valid, invalid and unexpected ones) against a running node,
//! which must answer none with a 5xx and stay healthy. `.ci/run` installs the tool; without
//! it the test passes with a notice on a developer's machine, and fails where `CI` is set,
//! so CI cannot skip it silently.

mod common;

use std::process::Command;

/// The version `.ci/run` installs.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

fn installed() -> bool {
    Command::new("schemathesis")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_in_the_admin_api() {
    if !installed() {
        let notice = format!("schemathesis is not installed (pip install {SCHEMATHESIS})");
        assert!(
            std::env::var_os("CI").is_none(),
            "{notice}; CI must run this test"
        );
        eprintln!("{notice}: skipped");
        return;
    }
    let c = common::start(1, false, "").await;
    let admin = c.slots[0].admin_url();
    let schema = format!("{admin}/openapi.json");
    let dir = c.dir.path().to_path_buf();
    let run = tokio::task::spawn_blocking(move || {
        Command::new("schemathesis")
            .args(["run", &schema, "--checks", "not_a_server_error"])
            .args(["--max-examples", "15", "--no-color"])
            // Its cache goes to the working directory: the test's own.
            .current_dir(&dir)
            .output()
    });
    let output = run.await.unwrap().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    assert!(report.contains(" passed"), "{report}");
    let health = c.http.get(&format!("{admin}/health")).await.unwrap();
    assert_eq!(health.status, 200, "{}", health.text());
}
