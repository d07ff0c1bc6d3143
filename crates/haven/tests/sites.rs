//! Sites end to end, with real processes and a real S3 server (SeaweedFS): a primary
//! site of 3 nodes archives; two standby sites of one node each follow the archive; the
//! primary site is lost (every node killed with SIGKILL); both standbys are promoted at
//! once and exactly one wins; the winner takes writes with every acknowledged write
//! present once; the loser follows the winner; the old primary, started again, finds
//! itself fenced and refuses writes.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

use haven_archive::testing::SeaweedServer;
use haven_client::http::Http;
use haven_client::http::Reply;
use haven_node::admin::Status;
use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::ClusterSpec;
use haven_testkit::cluster::LocalCluster;

mod common;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
const URL: &str = "s3://haven/sites";

const CHECKPOINTS: &str =
    "[checkpoints]\nmode = \"managed\"\nevery_entries = 150\nevery_seconds = 0\nkeep = 3\n";
/// Counting lines is a read a standby may serve from its own, stale replica.
const LOCAL_COUNT: &str =
    "[[routes]]\nmethods = [\"GET\"]\npath_prefix = \"/count\"\nmode = \"local\"\n";

fn primary_config(endpoint: &str, key: &Path) -> String {
    format!(
        "{CHECKPOINTS}[archive]\nurl = \"{URL}\"\nendpoint = \"{endpoint}\"\nkey_file = \"{}\"\nflush_ms = 100\nkeep = 2\n",
        key.display()
    )
}

/// A standby site of `nodes` nodes at `site`, following the primary's archive.
fn start_standby(site: &str, nodes: usize, dir: &Path, endpoint: &str, key: &Path) -> LocalCluster {
    let dir = dir.join(format!("site-{site}"));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = ClusterSpec {
        site: site.to_string(),
        nodes,
        exe: PathBuf::from(HAVEN),
        dir,
        extra_config: format!(
            "{LOCAL_COUNT}{CHECKPOINTS}[standby]\nfrom = \"{URL}\"\nendpoint = \"{endpoint}\"\nkey_file = \"{}\"\npoll_ms = 100\n",
            key.display()
        ),
        app: AppKind::LogApp {
            prepopulate: common::PREPOPULATE,
        },
        managed: true,
        services: Vec::new(),
    };
    LocalCluster::start(spec).unwrap()
}

/// Waits until node `i` of `cluster` reports `done` of its status.
async fn wait_status(
    cluster: &LocalCluster,
    i: usize,
    what: &str,
    done: impl Fn(&Status) -> bool,
) -> Status {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cluster.status(i).await;
        if let Ok(status) = &status
            && done(status)
        {
            return status.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened; last status {status:?}; logs in {}",
            cluster.spec.dir.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn standby_applied(status: &Status) -> Option<u64> {
    status.site.as_ref().and_then(|s| s.applied_index)
}

async fn append(http: &Http, cluster: &LocalCluster, body: &str) -> Reply {
    let url = format!("{}/append", cluster.slots[0].client_url());
    http.post(&url, body.to_string()).await.unwrap()
}

/// `haven site promote --json` on a standby site's node, in a thread of its own.
fn promote(cluster: &LocalCluster) -> std::thread::JoinHandle<std::process::Output> {
    let admin = cluster.slots[0].admin_addr.to_string();
    std::thread::spawn(move || {
        Command::new(HAVEN)
            .args(["site", "promote", "--admin", &admin, "--json"])
            .output()
            .unwrap()
    })
}

/// Every replica of a site holds the same bytes (a primary site's once converged; a
/// standby's are compared as they are); those bytes.
async fn replicas_identical(site: &LocalCluster) -> Vec<u8> {
    let standby = site.status(0).await.unwrap().role == "standby";
    if site.slots.len() > 1 && !standby {
        site.wait_converged(Duration::from_secs(30)).await.unwrap();
    }
    let first = site.replica_bytes(0).unwrap();
    for i in 1..site.slots.len() {
        assert!(
            site.replica_bytes(i).unwrap() == first,
            "replica {} differs",
            i + 1
        );
    }
    first
}

fn assert_holds_once(replica: &[u8], acknowledged: &[String]) {
    let text = String::from_utf8_lossy(replica);
    for body in acknowledged {
        let copies = text.lines().filter(|l| l == body).count();
        assert_eq!(copies, 1, "{body:?} appears {copies} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_lost_site_and_fences_the_old_primary() {
    let server = SeaweedServer::start().await;
    server.set_env();
    let dir = common::test_dir("haven-sites-");
    let key = common::keygen(dir.path());
    let mut primary = common::start(3, true, &primary_config(&server.endpoint, &key)).await;
    let http = Http::new(Duration::from_secs(15));
    let mut acknowledged = Vec::new();
    for i in 0..300 {
        let body = format!("site-a {i}");
        if primary.append(i % 3, &body).await.status == 201 {
            acknowledged.push(body);
        }
    }
    let b = start_standby("b", 3, dir.path(), &server.endpoint, &key);
    let c = start_standby("c", 1, dir.path(), &server.endpoint, &key);

    // The standbys follow: each replica equals the primary's, byte for byte.
    let replica = primary.assert_replicas_identical().await;
    let archived = primary.wait_archived(Duration::from_secs(30)).await;
    for standby in [&b, &c] {
        for i in 0..standby.slots.len() {
            let status = wait_status(standby, i, "catching up", |s| {
                standby_applied(s) == Some(archived)
            })
            .await;
            let site = status.site.unwrap();
            assert_eq!((site.role.name(), site.lag_entries), ("standby", 0));
            assert!(standby.replica_bytes(i).unwrap() == replica);
        }
    }

    // A standby refuses writes, naming the primary, and serves stale reads saying how stale.
    let refused = append(&http, &b, "never").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("haven-error").as_deref(), Some("standby"));
    assert!(refused.text().contains("haven/app"), "{}", refused.text());
    let count = http
        .get(&format!("{}/count", b.slots[0].client_url()))
        .await
        .unwrap();
    assert_eq!(count.status, 200);
    let lag: u64 = count.header("haven-lag-ms").unwrap().parse().unwrap();
    assert!(lag < 60_000, "lag {lag} ms");

    // The primary site is lost.
    for i in 0..3 {
        primary.kill_node(i);
        primary.kill_app(i);
    }

    // Both standbys are promoted at once: exactly one wins.
    let started = Instant::now();
    let (at_b, at_c) = (promote(&b), promote(&c));
    let (at_b, at_c) = (at_b.join().unwrap(), at_c.join().unwrap());
    assert!(
        at_b.status.success() != at_c.status.success(),
        "b: {}\nc: {}",
        String::from_utf8_lossy(&at_b.stderr),
        String::from_utf8_lossy(&at_c.stderr)
    );
    let (winner, loser, won, lost) = match at_b.status.success() {
        true => (&b, &c, at_b, at_c),
        false => (&c, &b, at_c, at_b),
    };
    let said = String::from_utf8_lossy(&lost.stderr);
    assert!(said.contains("another promotion won"), "{said}");
    let report: serde_json::Value = serde_json::from_slice(&won.stdout).unwrap();
    assert_eq!(report["epoch"].as_u64(), Some(2), "{report}");
    assert_eq!(
        report["last_archived_index"].as_u64(),
        Some(archived),
        "{report}"
    );
    assert_eq!(
        report["start_index"].as_u64(),
        Some(archived + 1),
        "{report}"
    );

    // The winner takes writes; every acknowledged write is there once.
    let first = loop {
        let reply = append(&http, winner, "site-b 0").await;
        if reply.status == 201 {
            break reply;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rto = started.elapsed();
    eprintln!("promotion to first acknowledged write: {rto:?}");
    assert_eq!(
        first.header("haven-index"),
        Some((archived + 2).to_string())
    );
    acknowledged.push("site-b 0".to_string());
    for i in 1..50 {
        let body = format!("site-b {i}");
        assert_eq!(append(&http, winner, &body).await.status, 201);
        acknowledged.push(body);
    }
    assert_holds_once(&winner.replica_bytes(0).unwrap(), &acknowledged);
    let winner_replica = replicas_identical(winner).await;

    // The loser follows the winner now.
    let leader = winner
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let status = wait_status(winner, leader, "the winner archiving", |s| {
        s.archive.as_ref().and_then(|a| a.archived_index) == s.applied_index
    })
    .await;
    let end = status.applied_index;
    for i in 0..loser.slots.len() {
        let followed = wait_status(loser, i, "the loser following", |s| {
            standby_applied(s) == end
        })
        .await;
        assert_eq!(followed.site.unwrap().epoch, Some(2));
    }
    assert!(replicas_identical(loser).await == winner_replica);

    // The old primary comes back and finds itself fenced: no write is accepted.
    for i in 0..3 {
        primary.start_app(i).unwrap();
        primary.start_node(i).unwrap();
    }
    for reason in assert_all_fenced(&primary).await {
        assert!(reason.contains("epoch 2"), "{reason}");
    }
}

/// Waits until every node of an old primary says it is fenced, and has each refuse a
/// write with 503 `fenced`; returns the reasons they give.
async fn assert_all_fenced(primary: &common::TestCluster) -> Vec<String> {
    let mut reasons = Vec::new();
    for i in 0..primary.slots.len() {
        let fenced = wait_status(primary, i, "the fence", |s| {
            s.site.as_ref().is_some_and(|s| s.role.name() == "fenced")
        })
        .await;
        match fenced.site.map(|s| s.role) {
            Some(haven_service::site::Role::Fenced { reason }) => reasons.push(reason),
            role => panic!("{role:?}"),
        }
        let refused = primary.append(i, "after the fence").await;
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(refused.header("haven-error").as_deref(), Some("fenced"));
    }
    reasons
}

/// Appends `{writer}-{n}` through every node of `site` in turn until `stop`; returns
/// the bodies acknowledged (201) and how many were refused.
async fn write_until(
    site: Vec<String>,
    writer: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<String>, u64) {
    let http = Http::new(Duration::from_secs(15));
    let (mut acknowledged, mut refused) = (Vec::new(), 0);
    for n in 0.. {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            break;
        }
        let body = format!("{writer}-{n}");
        let url = format!("{}/append", site[n % site.len()]);
        match http.post(&url, body.clone()).await {
            Ok(reply) if reply.status == 201 => acknowledged.push(body),
            _ => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    (acknowledged, refused)
}

/// A 3-node primary with `ack = "quorum+archive"` and a standby of `standby_nodes`
/// following it (the server and the directory live as long as the test needs them).
async fn quorum_plus_archive_sites(
    standby_nodes: usize,
) -> (
    SeaweedServer,
    tempfile::TempDir,
    common::TestCluster,
    LocalCluster,
) {
    let server = SeaweedServer::start().await;
    server.set_env();
    let dir = common::test_dir("haven-sites-ack-");
    let key = common::keygen(dir.path());
    let config = format!(
        "{}ack = \"quorum+archive\"\n",
        primary_config(&server.endpoint, &key)
    );
    let primary = common::start(3, true, &config).await;
    let b = start_standby("b", standby_nodes, dir.path(), &server.endpoint, &key);
    for i in 0..standby_nodes {
        wait_status(&b, i, "following", |s| standby_applied(s).is_some()).await;
    }
    (server, dir, primary, b)
}

/// Four writers appending `{tag}-{writer}-{n}` through every node of a site until
/// `finish`.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<(Vec<String>, u64)>>,
}

impl Load {
    fn start(site: &LocalCluster, tag: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let urls: Vec<String> = site.slots.iter().map(|s| s.client_url()).collect();
        let writers = (0..4)
            .map(|w| {
                tokio::spawn(write_until(
                    urls.clone(),
                    format!("{tag}-{w}"),
                    stop.clone(),
                ))
            })
            .collect();
        Self { stop, writers }
    }

    /// Every write acknowledged.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let mut acknowledged = Vec::new();
        for writer in self.writers {
            let (acked, refused) = writer.await.unwrap();
            eprintln!("writer: {} acknowledged, {refused} refused", acked.len());
            acknowledged.extend(acked);
        }
        acknowledged
    }
}

/// `ack = "quorum+archive"` under the hardest case for the fence: the standby is promoted
/// while the old primary is alive and taking writes through all its nodes. Every write
/// the old primary acknowledged is at the new one, once; none it took after the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_quorum_plus_archive_every_acknowledged_write_survives_a_promotion_under_load() {
    let (_server, _dir, primary, b) = quorum_plus_archive_sites(1).await;
    let load = Load::start(&primary, "w");
    tokio::time::sleep(Duration::from_secs(2)).await;
    promote_now(&b);
    // The old primary goes on being asked to write: it must refuse once fenced.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acknowledged = load.finish().await;
    assert!(acknowledged.len() > 20, "{}", acknowledged.len());

    let http = Http::new(Duration::from_secs(15));
    assert_eq!(append(&http, &b, "site-b 0").await.status, 201);
    let replica = b.replica_bytes(0).unwrap();
    assert_holds_once(&replica, &acknowledged);
    // Nothing of the old primary lands after the new primary's first write.
    let text = String::from_utf8_lossy(&replica);
    let after: Vec<&str> = text.lines().skip_while(|l| *l != "site-b 0").collect();
    assert_eq!(after, ["site-b 0"]);
    assert_all_fenced(&primary).await;
}

/// Site A's way to the object store: a TCP proxy that can be cut and healed, so the
/// archive becomes unreachable from site A alone (site B reaches the store directly).
struct StoreLink {
    addr: std::net::SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
}

impl StoreLink {
    async fn start(endpoint: &str) -> Self {
        let target: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = tokio::sync::watch::Sender::new(true);
        let opened = open.subscribe();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut opened = opened.clone();
                if !*opened.borrow() {
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = opened.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { addr, open }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set(&self, open: bool) {
        self.open.send_replace(open);
    }
}

/// The partition between the sites: site A alive but cut off from its archive. With
/// `fence_after_s`, A stops acknowledging writes on every node once it could not upload
/// for that long (and says why); site B is promoted meanwhile; when the link heals, A
/// finds the fence and stays fenced; nothing A took after the cut reaches B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_off_from_its_archive_refuses_writes_and_a_promotion_fences_it() {
    let server = SeaweedServer::start().await;
    server.set_env();
    let dir = common::test_dir("haven-sites-cut-");
    let key = common::keygen(dir.path());
    let link = StoreLink::start(&server.endpoint).await;
    let config = format!(
        "{}fence_after_s = 2\n",
        primary_config(&link.endpoint(), &key)
    );
    let primary = common::start(3, true, &config).await;
    let b = start_standby("b", 1, dir.path(), &server.endpoint, &key);
    let mut before_cut = Vec::new();
    for i in 0..30 {
        let body = format!("before-cut {i}");
        assert_eq!(primary.append(i % 3, &body).await.status, 201);
        before_cut.push(body);
    }
    primary.wait_archived(Duration::from_secs(30)).await;

    link.set(false);
    let cut = Instant::now();
    let mut taken_after_cut = 0;
    let refusal = loop {
        let reply = primary.append(taken_after_cut % 3, "after-cut").await;
        if reply.status == 201 {
            taken_after_cut += 1;
        } else if reply.header("haven-error").as_deref() == Some("fenced") {
            break reply.text();
        }
        assert!(cut.elapsed() < Duration::from_secs(30), "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refused_after = cut.elapsed();
    eprintln!("cut off: {taken_after_cut} writes taken, then refused after {refused_after:?}");
    assert!(refusal.contains("archive.fence_after_s"), "{refusal}");
    assert!(refused_after >= Duration::from_secs(2), "{refused_after:?}");
    for i in 0..3 {
        let refused = primary.append(i, "after-cut").await;
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(refused.header("haven-error").as_deref(), Some("fenced"));
    }
    let leader = primary
        .wait_for_leader(Duration::from_secs(5))
        .await
        .unwrap();
    let status = primary.status(leader).await.unwrap();
    let why = status.archive.unwrap().writes_refused.unwrap_or_default();
    assert!(why.contains("fence_after_s"), "{why}");

    promote_now(&b);
    let http = Http::new(Duration::from_secs(15));
    assert_eq!(append(&http, &b, "site-b 0").await.status, 201);

    link.set(true);
    for reason in assert_all_fenced(&primary).await {
        assert!(reason.contains("epoch 2"), "{reason}");
    }
    let replica = b.replica_bytes(0).unwrap();
    assert_holds_once(&replica, &before_cut);
    let text = String::from_utf8_lossy(&replica);
    assert!(!text.lines().any(|l| l == "after-cut"));
    assert_eq!(text.lines().last(), Some("site-b 0"));
}

/// The seed's drill with `ack = "quorum+archive"`: site A burns mid-load (every node and
/// app SIGKILLed, data directories deleted); a 3-node standby is promoted. Every write A
/// acknowledged is there exactly once, and B's replicas are byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_quorum_plus_archive_a_burned_site_loses_no_acknowledged_write() {
    let (_server, _dir, mut primary, b) = quorum_plus_archive_sites(3).await;
    let load = Load::start(&primary, "w");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        primary.kill_node(i);
        primary.kill_app(i);
        std::fs::remove_dir_all(primary.data_dir(i)).unwrap();
    }
    let acknowledged = load.finish().await;
    assert!(acknowledged.len() > 20, "{}", acknowledged.len());

    let started = Instant::now();
    promote_now(&b);
    let http = Http::new(Duration::from_secs(15));
    while append(&http, &b, "site-b 0").await.status != 201 {
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{} acknowledged writes; promotion to first acknowledged write: {:?}",
        acknowledged.len(),
        started.elapsed()
    );
    let replica = replicas_identical(&b).await;
    assert_holds_once(&replica, &acknowledged);
}

fn run_site_command(args: &[String]) -> std::process::Output {
    Command::new(HAVEN)
        .arg("site")
        .args(args)
        .arg("--json")
        .output()
        .unwrap()
}

/// `haven site promote` on a standby site's first node, which must succeed; its report.
fn promote_now(site: &LocalCluster) -> serde_json::Value {
    site_command(&["promote".into(), "--admin".into(), admin(site, 0)])
}

/// `haven site <args> --json` as a process of its own; the JSON it printed.
fn site_command(args: &[String]) -> serde_json::Value {
    let output = run_site_command(args);
    assert!(
        output.status.success(),
        "haven site {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// What `haven site <args>` said when it refused.
fn site_command_refused(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let output = run_site_command(&args);
    assert!(!output.status.success(), "haven site {args:?} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `haven site follow` on the given nodes of a site.
fn follow(site: &LocalCluster, nodes: &[usize]) -> serde_json::Value {
    let mut args = vec!["follow".to_string()];
    for &i in nodes {
        args.extend(["--admin".to_string(), site.slots[i].admin_addr.to_string()]);
    }
    site_command(&args)
}

/// The bodies of the requests a follow exported, from every node's file.
fn exported_bodies(report: &serde_json::Value) -> Vec<String> {
    let mut bodies = Vec::new();
    for node in report["nodes"].as_array().unwrap() {
        let Some(file) = node["file"].as_str() else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for line in text.lines() {
            let request: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(request["method"], "POST", "{line}");
            assert_eq!(request["path"], "/append", "{line}");
            assert!(request["index"].as_u64().is_some() && request["time"].is_string());
            bodies.push(request["body"].as_str().unwrap().to_string());
        }
    }
    bodies
}

/// Waits until the leader of a primary site has archived all it applied; that index.
async fn archived_end(site: &LocalCluster) -> u64 {
    let leader = site.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let status = wait_status(site, leader, "the primary archiving", |s| {
        s.archive.as_ref().and_then(|a| a.archived_index) == s.applied_index
    })
    .await;
    status.applied_index.unwrap()
}

/// Failback, both halves. Site A (3 nodes, `ack = "quorum"`) is fenced by a promotion of
/// B while it takes writes, so it acknowledges some the archive never takes. `haven site
/// follow` makes A a standby of B (two nodes from their old data, one from a wiped disk):
/// every write A acknowledged is at B or in an export file. Then `haven site switchover`
/// hands the service back to A while writers keep asking B: every write B acknowledged is
/// at A once, nothing is exported, and every replica of both sites is byte-identical at
/// the switchover index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_site_follows_the_new_primary_and_a_switchover_hands_the_service_back() {
    let server = SeaweedServer::start().await;
    server.set_env();
    let dir = common::test_dir("haven-failback-");
    let key = common::keygen(dir.path());
    let mut a = common::start(3, true, &primary_config(&server.endpoint, &key)).await;
    let b = start_standby("b", 1, dir.path(), &server.endpoint, &key);
    wait_status(&b, 0, "following", |s| standby_applied(s).is_some()).await;

    // B takes over while A is alive and taking writes.
    let load = Load::start(&a, "a");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let promoted = promote_now(&b);
    let acknowledged_at_a = load.finish().await;
    assert_all_fenced(&a).await;
    let http = Http::new(Duration::from_secs(15));
    let mut acknowledged_at_b = Vec::new();
    for i in 0..20 {
        let body = format!("site-b {i}");
        assert_eq!(append(&http, &b, &body).await.status, 201);
        acknowledged_at_b.push(body);
    }

    // A comes back as B's standby: node 3 from a wiped disk, nodes 1 and 2 as they were.
    a.kill_node(2);
    a.kill_app(2);
    for wiped in [a.data_dir(2), a.slots[2].app_dir.clone()] {
        std::fs::remove_dir_all(wiped).unwrap();
    }
    let followed = follow(&a, &[0, 1]);
    a.start_app(2).unwrap();
    a.start_node(2).unwrap();
    wait_status(&a, 2, "the wiped node up", |_| true).await;
    let wiped = follow(&a, &[2]);
    assert_eq!(wiped["exported"], 0, "{wiped}");

    // Nothing A acknowledged is silently dropped: it is at B, or exported.
    let at_b = String::from_utf8_lossy(&b.replica_bytes(0).unwrap()).into_owned();
    let exported = exported_bodies(&followed);
    let lost: Vec<&String> = (acknowledged_at_a.iter())
        .filter(|body| !at_b.lines().any(|l| l == body.as_str()))
        .collect();
    for body in &lost {
        assert!(
            exported.contains(body),
            "{body} is neither at B nor exported"
        );
    }
    for body in &exported {
        assert!(!at_b.lines().any(|l| l == body), "{body} exported but at B");
    }
    eprintln!(
        "A acknowledged {} writes; {} not at B, all exported ({} requests in the files; recovery point {} ms)",
        acknowledged_at_a.len(),
        lost.len(),
        exported.len(),
        promoted["last_archived_age_ms"]
    );
    let end = archived_end(&b).await;
    for i in 0..3 {
        wait_status(&a, i, "A following B", |s| standby_applied(s) == Some(end)).await;
    }
    assert!(replicas_identical(&a).await == b.replica_bytes(0).unwrap());

    // The primary does not follow; a switchover must name every node of the primary.
    let said = site_command_refused(&["follow", "--admin", &admin(&b, 0)]);
    assert!(
        said.contains("this site writes epoch 2, the archive's newest: it is the primary (to hand the service to a standby, run `haven site switchover`)"),
        "{said}"
    );
    let said =
        site_command_refused(&["switchover", "--from", &admin(&b, 0), "--to", &admin(&b, 0)]);
    assert!(
        said.contains(&format!(
            "node {} is primary for service app: --to names a node of a standby site",
            admin(&b, 0)
        )),
        "{said}"
    );

    // Switchover back to A while writers keep asking B.
    let load = Load::start(&b, "b");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = site_command(&[
        "switchover".into(),
        "--from".into(),
        admin(&b, 0),
        "--to".into(),
        admin(&a, 0),
    ]);
    acknowledged_at_b.extend(load.finish().await);
    eprintln!(
        "switchover: handed over at {}, writes paused {} ms",
        report["handed_over_index"], report["writes_paused_ms"]
    );
    assert_eq!(report["followed"]["exported"], 0, "{report}");
    assert_eq!(report["promoted"]["epoch"], 3, "{report}");
    let handed_over = report["handed_over_index"].as_u64().unwrap();
    assert_eq!(
        report["promoted"]["last_archived_index"].as_u64(),
        Some(handed_over),
        "{report}"
    );

    // Every write B acknowledged is at A once; both sites hold the same bytes.
    let replica = replicas_identical(&a).await;
    assert_holds_once(&replica, &acknowledged_at_b);
    let end = archived_end(&a).await;
    wait_status(&b, 0, "B following A", |s| standby_applied(s) == Some(end)).await;
    assert!(b.replica_bytes(0).unwrap() == replica, "B differs from A");
    let b_site = b.status(0).await.unwrap().site.unwrap();
    assert_eq!((b_site.role.name(), b_site.epoch), ("standby", Some(3)));
    assert_eq!(a.append(1, "site-a again").await.status, 201);
    let said =
        site_command_refused(&["switchover", "--from", &admin(&a, 0), "--to", &admin(&b, 0)]);
    assert!(
        said.contains(
            "--from must name every node of the primary site: voters [2, 3] are left out"
        ),
        "{said}"
    );
    let refused = append(&http, &b, "never").await;
    assert_eq!(refused.header("haven-error").as_deref(), Some("standby"));
}

fn admin(site: &LocalCluster, i: usize) -> String {
    site.slots[i].admin_addr.to_string()
}
