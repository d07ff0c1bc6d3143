//! The web console in a real headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs): the page served by a node's admin port, rendered with its script run
//! against a live 3-node cluster, shows the leader and every member up; after a SIGKILL
//! the killed node turns down and the alert rule watching peers shows as firing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

/// How long Chromium lets the page's clock run before it prints the DOM: several polls.
const VIRTUAL_TIME_BUDGET_MS: u32 = 4_000;

/// The browser: `HAVEN_CHROMIUM`, else `chromium` on the PATH. A missing browser fails the
/// test with the install step, never skips it.
fn chromium() -> String {
    let browser = std::env::var("HAVEN_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let found = Command::new(&browser).arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "no headless browser: `{browser} --version` failed ({found:?}); install Debian's \
         chromium (`apt-get install chromium`; .ci/run does) or set HAVEN_CHROMIUM"
    );
    browser
}

/// Chromium's flags for a headless run on a machine with no network but loopback: a
/// fresh profile, and nothing that phones home.
fn headless(profile: &Path) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    .into_iter()
    .map(String::from)
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect()
}

/// The console at `url` after its script has polled the node a few times, as HTML.
fn render(browser: &str, profile: &Path, url: &str) -> String {
    let output = Command::new(browser)
        .args(headless(profile))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}"))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A picture of the console at `url` in `out` (the one in docs/ is made this way).
fn screenshot(browser: &str, profile: &Path, url: &str, out: &str) {
    let status = Command::new(browser)
        .args(headless(profile))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}"))
        .arg("--window-size=1100,760")
        .arg(format!("--screenshot={out}"))
        .arg(url)
        .output()
        .unwrap()
        .status;
    assert!(status.success(), "chromium could not take the screenshot");
}

/// The `<tr>` of node `id` in a rendered console (`None` if there is none).
fn member_row(html: &str, id: u64) -> Option<&str> {
    let start = html.find(&format!("<tr data-node=\"{id}\""))?;
    let end = html[start..].find("</tr>")?;
    Some(&html[start..start + end])
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_the_leader_and_a_killed_node_turning_down() {
    let browser = chromium();
    // Its webhook goes nowhere: the console shows what fires, delivered or not.
    let rule = "[[alert]]\nname = \"peer-down\"\nmetric = \"haven_peer_up\"\nop = \"<\"\n\
                threshold = 1\nfor = \"0s\"\nwebhook = \"http://127.0.0.1:9/alerts\"\n";
    let mut cluster = common::start(3, false, rule).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let leader_id = cluster.status(leader).await.unwrap().id;
    let victim = cluster.follower_of(leader);
    let victim_id = cluster.status(victim).await.unwrap().id;
    let url = format!("{}/", cluster.slots[leader].admin_url());
    // A replica counts as up once it has answered a delivery.
    assert_eq!(cluster.append(leader, "console").await.status, 201);
    cluster
        .wait_converged(Duration::from_secs(30))
        .await
        .unwrap();
    let profile = cluster.dir.path().join("chromium-profile");

    // The page itself: HTML, locked down, open without a token.
    let page = cluster.http.get(&url).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("connect-src 'self'")
    );

    let html = render(&browser, &profile, &url);
    assert!(
        html.contains("data-service=\"app\""),
        "no service drawn: {html}"
    );
    assert!(
        html.contains(&format!("data-leader=\"{leader_id}\"")),
        "leader not shown: {html}"
    );
    for i in 0..3 {
        let id = cluster.status(i).await.unwrap().id;
        let row = member_row(&html, id).unwrap_or_else(|| panic!("node {id} missing: {html}"));
        assert!(row.contains("data-state=\"up\""), "node {id} not up: {row}");
        let role = if id == leader_id { "leader" } else { "voter" };
        assert!(
            row.contains(&format!("data-role=\"{role}\"")),
            "node {id} not {role}: {row}"
        );
    }
    assert!(
        html.contains("data-problems=\"0\""),
        "problems shown: {html}"
    );

    cluster.kill_node(victim);
    let deadline = Instant::now() + Duration::from_secs(30);
    let html = loop {
        let html = render(&browser, &profile, &url);
        let down =
            member_row(&html, victim_id).is_some_and(|row| row.contains("data-state=\"down\""));
        if down && html.contains("data-alert=\"peer-down\"") {
            break html;
        }
        assert!(
            Instant::now() < deadline,
            "node {victim_id} never shown down: {html}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        html.contains(&format!("node {victim_id} (")) && html.contains(") is down"),
        "the problem is not listed: {html}"
    );
    assert!(html.contains("data-problems=\"1\""), "{html}");
    let leader_row = member_row(&html, leader_id).unwrap();
    assert!(leader_row.contains("data-state=\"up\""), "{leader_row}");
    // `HAVEN_CONSOLE_SCREENSHOT=$PWD/docs/console.png cargo nextest run -p haven --test
    // console` renews the picture in the docs.
    if let Ok(out) = std::env::var("HAVEN_CONSOLE_SCREENSHOT") {
        screenshot(&browser, &profile, &url, &out);
    }
}
