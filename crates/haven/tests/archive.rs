//! The off-site archive end to end: real nodes shipping to a real S3 server (SeaweedFS),
//! the whole site lost (every node killed with SIGKILL, every data directory deleted),
//! and the service's state rebuilt from the archive and the key alone.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use haven_archive::testing::SeaweedServer;
use haven_client::admin::AdminClient;

mod common;
use common::TestCluster;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
const MARKER: &str = "site-loss-marker";

fn haven(args: &[&str]) -> std::process::Output {
    Command::new(HAVEN).args(args).output().unwrap()
}

fn archive_config(url: &str, endpoint: Option<&str>, key: &Path) -> String {
    let endpoint = endpoint.map_or(String::new(), |e| format!("endpoint = \"{e}\"\n"));
    format!(
        "[checkpoints]\nmode = \"managed\"\nevery_entries = 150\nevery_seconds = 0\nkeep = 3\n\
         [archive]\nurl = \"{url}\"\n{endpoint}key_file = \"{}\"\nflush_ms = 100\nkeep = 2\n",
        key.display()
    )
}

/// A SeaweedFS server, a key (in the returned directory) and 3 managed nodes archiving to
/// `url` in it, with a leader.
async fn cluster_archiving_to(
    url: &str,
) -> (SeaweedServer, tempfile::TempDir, PathBuf, TestCluster) {
    let server = SeaweedServer::start().await;
    server.set_env();
    let keys = tempfile::tempdir().unwrap();
    let key = common::keygen(keys.path());
    let config = archive_config(url, Some(&server.endpoint), &key);
    let cluster = common::start(3, true, &config).await;
    cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    (server, keys, key, cluster)
}

/// Where an archive is, as the `haven archive` commands take it.
struct Site<'a> {
    url: &'a str,
    endpoint: Option<&'a str>,
    key: &'a Path,
}

fn site<'a>(url: &'a str, server: &'a SeaweedServer, key: &'a Path) -> Site<'a> {
    Site {
        url,
        endpoint: Some(&server.endpoint),
        key,
    }
}

/// `haven archive <verb>` on `site`, with `more` arguments.
fn archive_cli(verb: &str, site: &Site, more: &[&str]) -> std::process::Output {
    let key = site.key.display().to_string();
    let mut args = vec!["archive", verb, "--from", site.url, "--key-file", &key];
    if let Some(endpoint) = site.endpoint {
        args.extend(["--endpoint", endpoint]);
    }
    args.extend(more);
    haven(&args)
}

/// `haven archive restore` into `out` with the app run as `config` says; its JSON report
/// (when `more` asks for `--json`).
fn restore(site: &Site, config: &Path, out: &Path, more: &[&str]) -> serde_json::Value {
    let (config, out) = (config.display().to_string(), out.display().to_string());
    let mut args = vec!["--config", config.as_str(), "--out", out.as_str()];
    args.extend(more);
    let restored = archive_cli("restore", site, &args);
    let said = String::from_utf8_lossy(&restored.stderr);
    assert!(restored.status.success(), "{more:?}: {said}");
    serde_json::from_slice(&restored.stdout).unwrap_or(serde_json::Value::Null)
}

/// The restored state is the replicas' and holds every acknowledged write once.
fn assert_restored(out: &Path, replica: &[u8], acknowledged: &[String]) {
    let bytes = std::fs::read(out.join("log.txt")).unwrap();
    assert!(
        bytes == replica,
        "the restored state differs from the replicas'"
    );
    let text = String::from_utf8(bytes).unwrap();
    for body in acknowledged {
        let copies = text.lines().filter(|l| l == body).count();
        assert_eq!(copies, 1, "{body:?} appears {copies} times");
    }
}

fn assert_sound(site: &Site) {
    let verify = archive_cli("verify", site, &[]);
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{said}");
    assert!(said.ends_with("sound\n"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_alone_rebuilds_every_acknowledged_write_after_the_site_is_lost() {
    let url = "s3://haven/site-loss";
    let (server, keys, key, mut cluster) = cluster_archiving_to(url).await;
    let mut acknowledged = Vec::new();
    for i in 0..450 {
        let body = format!("{MARKER} {i}");
        if cluster.append(i % 3, &body).await.status == 201 {
            acknowledged.push(body);
        }
    }
    let replica = cluster.assert_replicas_identical().await;
    let archived = cluster.wait_archived(Duration::from_secs(30)).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(5))
        .await
        .unwrap();
    let admin = AdminClient::new(&cluster.slots[leader].admin_url(), Duration::from_secs(5));
    let lag = admin
        .metric("haven_archive_lag_entries", &[("service", "app")])
        .await;
    assert_eq!(lag.unwrap(), 0.0);
    let shipped = admin
        .metric("haven_archive_uploaded_objects_total", &[])
        .await;
    assert!(shipped.unwrap() >= 2.0);

    // The site burns: every node killed, every data directory gone.
    let node_config = cluster.dir().join("node1").join("haven.toml");
    let saved_config = keys.path().join("node1.toml");
    std::fs::copy(&node_config, &saved_config).unwrap();
    for i in 0..3 {
        cluster.kill_node(i);
    }
    for i in 0..3 {
        std::fs::remove_dir_all(cluster.dir().join(format!("node{}", i + 1))).unwrap();
    }

    let out = keys.path().join("restored");
    let check = "test -s \"$HAVEN_RESTORE_DIR/log.txt\"";
    let args = ["--latest", "--json", "--check", check];
    let report = restore(&site(url, &server, &key), &saved_config, &out, &args);
    assert_eq!(report["target_index"].as_u64(), Some(archived), "{report}");
    assert_eq!(report["check_passed"].as_bool(), Some(true), "{report}");
    assert!(report["checkpoint_index"].as_u64().is_some(), "{report}");
    assert_restored(&out, &replica, &acknowledged);
    assert_sound(&site(url, &server, &key));
    for file in server.data_files() {
        let stored = std::fs::read(&file).unwrap();
        assert!(
            !stored.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "plaintext in the store's file {}",
            file.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_its_key_refuses_to_start_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such.key");
    let store = format!("file://{}", dir.path().join("archive").display());
    let mut cluster = common::start(1, true, "").await;
    cluster.kill_node(0);
    let config = cluster.dir().join("node1").join("haven.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[archive]\nurl = \"{store}\"\nkey_file = \"{}\"\n",
        missing.display()
    ));
    std::fs::write(&config, text).unwrap();
    let said = common::refused_start(&config);
    assert!(
        said.contains(&format!(
            "off-site archive of service app: archive key file {}: cannot read it",
            missing.display()
        )),
        "{said}"
    );
}

async fn leader_metric(cluster: &TestCluster, name: &str) -> f64 {
    let Ok(leader) = cluster.wait_for_leader(Duration::from_secs(5)).await else {
        return 0.0;
    };
    let admin = AdminClient::new(&cluster.slots[leader].admin_url(), Duration::from_secs(5));
    admin.metric(name, &[]).await.unwrap_or(0.0)
}

/// The store down for 30 s under load, then the leader killed while the archive catches
/// up: writes go on throughout, the lag shows in the metrics, and afterwards the archive
/// holds every acknowledged write exactly once (restored and compared with the replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_down_and_a_leader_change_lose_nothing_and_double_nothing() {
    let url = "s3://haven/outage";
    let (mut server, keys, key, mut cluster) = cluster_archiving_to(url).await;
    let (stop, acknowledged) = (
        Arc::new(AtomicBool::new(false)),
        common::Acknowledged::default(),
    );
    let load = common::keyed_writers(&cluster, "/append", MARKER, &stop, &acknowledged);
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_archived_while_writing(&cluster).await;
    // Caught up under load: the recovery point is about an upload (flush_ms = 100).
    let caught_up = lag_seconds_over(&cluster, Duration::from_secs(2)).await;
    assert!(
        caught_up.iter().all(|lag| *lag < 1.0),
        "recovery point while caught up: {caught_up:?}"
    );

    server.kill();
    let before = acknowledged.lock().unwrap().len();
    let early = lag_seconds_over(&cluster, STORE_DOWN / 3).await;
    tokio::time::sleep(STORE_DOWN - STORE_DOWN / 3).await;
    let during = acknowledged.lock().unwrap().len() - before;
    assert!(
        during > 100,
        "only {during} writes while the store was down"
    );
    let lag = leader_metric(&cluster, "haven_archive_lag_entries").await;
    assert!(lag > 100.0, "lag {lag} while the store was down");
    // The recovery point is the outage's age, growing between upload attempts too.
    let late = leader_metric(&cluster, "haven_archive_lag_seconds").await;
    let outage = STORE_DOWN.as_secs_f64();
    assert!(
        late > outage - 3.0 && late < outage + 3.0,
        "recovery point {late} s after {outage} s without the store"
    );
    let rising = early.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        rising * 2 > early.len(),
        "the recovery point did not grow while the store was down: {early:?}"
    );
    assert!(leader_metric(&cluster, "haven_archive_upload_errors_total").await > 0.0);
    server.restart().await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    cluster.kill_node(leader);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.start_node(leader).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in load {
        writer.await.unwrap();
    }
    let replica = cluster.assert_replicas_identical().await;
    let archived = cluster.wait_archived(Duration::from_secs(60)).await;
    // Everything archived: nothing is at risk.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = leader_metric(&cluster, "haven_archive_lag_seconds").await;
    assert_eq!(after, 0.0, "recovery point once everything is archived");

    let out = keys.path().join("restored");
    let node_config = cluster.dir().join("node1").join("haven.toml");
    let index = archived.to_string();
    let args = ["--to-index", index.as_str(), "--json"];
    restore(&site(url, &server, &key), &node_config, &out, &args);
    let acknowledged = acknowledged.lock().unwrap();
    assert!(acknowledged.len() > 500, "{} writes", acknowledged.len());
    assert_restored(&out, &replica, &acknowledged);
    assert_sound(&site(url, &server, &key));
}

/// The leader's `haven_archive_lag_seconds` every 250 ms for `span`.
async fn lag_seconds_over(cluster: &TestCluster, span: Duration) -> Vec<f64> {
    let until = Instant::now() + span;
    let mut samples = Vec::new();
    while Instant::now() < until {
        samples.push(leader_metric(cluster, "haven_archive_lag_seconds").await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    samples
}

/// How long the store is down in the outage test (the figure).
const STORE_DOWN: Duration = Duration::from_secs(30);

/// Waits until the leader's archive lag is small while writers keep writing.
async fn wait_archived_while_writing(cluster: &TestCluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while leader_metric(cluster, "haven_archive_last_index").await < 10.0 {
        assert!(Instant::now() < deadline, "nothing archived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restores at several indexes and times, from the archive and from the node's own data
/// directory, each equal to the live replica as it was at that point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_to_an_index_or_a_time_equal_the_replica_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let key = common::keygen(dir.path());
    let url = format!("file://{}", dir.path().join("archive").display());
    // Archived checkpoints all kept, so the archive reaches back to the first point.
    let config = archive_config(&url, None, &key)
        .replace("every_entries = 150", "every_entries = 40")
        .replace("flush_ms = 100\nkeep = 2", "flush_ms = 100\nkeep = 10");
    let mut cluster = common::start(1, true, &config).await;
    let mut points = Vec::new();
    for batch in 0..4 {
        for i in 0..35 {
            let reply = cluster.append(0, &format!("batch {batch} line {i}")).await;
            assert_eq!(reply.status, 201);
        }
        let index = cluster
            .wait_converged(Duration::from_secs(20))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        points.push((index, time, cluster.replica_bytes(0).unwrap()));
    }
    cluster.wait_archived(Duration::from_secs(30)).await;
    cluster.kill_node(0);
    let data_dir = cluster
        .dir()
        .join("node1")
        .join("data")
        .display()
        .to_string();
    let node_config = cluster.dir().join("node1").join("haven.toml");
    let here = Site {
        url: &url,
        endpoint: None,
        key: &key,
    };
    for (n, (index, time, bytes)) in points.iter().enumerate() {
        let index = index.to_string();
        let targets = [["--to-index", index.as_str()], ["--to-time", time.as_str()]];
        for (t, target) in targets.iter().enumerate() {
            let out = dir.path().join(format!("archive-{n}-{t}"));
            restore(&here, &node_config, &out, target);
            let state = std::fs::read(out.join("log.txt")).unwrap();
            assert!(&state == bytes, "archive restore {target:?} differs");
        }
        if n == 0 {
            continue; // the node's own log was compacted past the first point
        }
        let out = dir.path().join(format!("local-{n}"));
        let out_arg = out.display().to_string();
        let restored = haven(&[
            "restore",
            "--data-dir",
            &data_dir,
            "--to-time",
            time,
            "--out",
            &out_arg,
        ]);
        let said = String::from_utf8_lossy(&restored.stderr);
        assert!(restored.status.success(), "local --to-time {time}: {said}");
        let state = std::fs::read(out.join("log.txt")).unwrap();
        assert!(&state == bytes, "local restore --to-time {time} differs");
    }
}

/// Two writers: a second cluster (another identity; not a standby) pointed at an archive
/// that already has one is refused with the reason in its status, ships nothing there,
/// and the first goes on archiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_cluster_pointed_at_the_same_archive_is_refused() {
    let url = "s3://haven/two-writers";
    let (server, keys, key, first) = cluster_archiving_to(url).await;
    for i in 0..20 {
        assert_eq!(first.append(i % 3, &format!("first {i}")).await.status, 201);
    }
    first.wait_archived(Duration::from_secs(30)).await;

    let dir = keys.path().join("second");
    std::fs::create_dir_all(&dir).unwrap();
    let second = haven_testkit::cluster::LocalCluster::start(haven_testkit::cluster::ClusterSpec {
        site: "elsewhere".to_string(),
        nodes: 1,
        exe: PathBuf::from(HAVEN),
        dir,
        extra_config: archive_config(url, Some(&server.endpoint), &key),
        app: haven_testkit::cluster::AppKind::LogApp {
            prepopulate: common::PREPOPULATE,
        },
        managed: true,
        services: Vec::new(),
    })
    .unwrap();
    second
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        let status = second.status(0).await.unwrap();
        let error = status
            .archive
            .and_then(|a| a.last_error)
            .unwrap_or_default();
        if !error.is_empty() {
            break error;
        }
        assert!(
            Instant::now() < deadline,
            "the second cluster was never refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refusal.contains("two clusters must not write one archive")
            && refusal.contains("belongs to cluster \"haven/app\""),
        "{refusal}"
    );
    let shipped = second
        .metric(0, "haven_archive_uploaded_objects_total", &[])
        .await
        .unwrap();
    assert_eq!(shipped, 0.0);
    assert!(
        second
            .metric(0, "haven_archive_upload_errors_total", &[])
            .await
            .unwrap()
            > 0.0
    );
    // The first cluster's archive is untouched by it and goes on growing.
    let before = first.wait_archived(Duration::from_secs(30)).await;
    assert_eq!(first.append(0, "first, after").await.status, 201);
    assert!(first.wait_archived(Duration::from_secs(30)).await > before);
}
