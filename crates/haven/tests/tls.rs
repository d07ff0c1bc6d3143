//! `[tls]` end to end with real processes: a cluster speaking mutual TLS replicates,
//! survives a leader kill and catches a restarted node up; a peer with a certificate of
//! another CA, or none at all, is refused with a clear log line while the others keep
//! serving; the client and admin ports take TLS when asked; no key reaches a log.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use haven_client::http::Http;
use haven_testkit::cluster::ClusterSpec;
use haven_testkit::cluster::LocalCluster;
use haven_testkit::cluster::Process;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

mod common;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");

fn haven_cert(args: &[&str]) -> String {
    let output = Command::new(HAVEN).arg("cert").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "haven cert {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A CA in `dir` and `node1`..`node<n>` certificates for 127.0.0.1.
fn cluster_certs(dir: &Path, nodes: usize) {
    let dir = dir.to_str().unwrap();
    haven_cert(&["init", "--dir", dir]);
    for id in 1..=nodes {
        haven_cert(&[
            "issue",
            "--dir",
            dir,
            "--name",
            &format!("node{id}"),
            "--host",
            "127.0.0.1",
        ]);
    }
}

fn tls_table(certs: &Path, extra: &str) -> String {
    format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/node{{node_id}}.pem\"\nkey = \"{0}/node{{node_id}}.key\"\n{extra}",
        certs.display()
    )
}

/// Managed log-app nodes in `dir`, not waited for: some of them never become ready here.
fn start_unready(nodes: usize, dir: &Path, extra_config: String) -> LocalCluster {
    let spec = ClusterSpec {
        site: String::new(),
        nodes,
        exe: PathBuf::from(HAVEN),
        dir: dir.to_path_buf(),
        extra_config,
        app: haven_testkit::cluster::AppKind::LogApp {
            prepopulate: common::PREPOPULATE,
        },
        managed: true,
        services: Vec::new(),
    };
    LocalCluster::start(spec).unwrap()
}

fn node_log(cluster: &LocalCluster, i: usize) -> String {
    std::fs::read_to_string(cluster.log_path(i, Process::Node)).unwrap()
}

/// The base64 lines of every private key in `dir`: none may appear in a log.
fn key_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "key") {
            let text = std::fs::read_to_string(&path).unwrap();
            lines.extend(
                text.lines()
                    .filter(|l| !l.starts_with("-----"))
                    .map(str::to_string),
            );
        }
    }
    assert!(!lines.is_empty());
    lines
}

fn assert_no_secret_in_logs(cluster: &LocalCluster, secrets: &[String]) {
    for i in 0..cluster.slots.len() {
        let log = node_log(cluster, i);
        for secret in secrets {
            assert!(
                !log.contains(secret.as_str()),
                "node {i}'s log holds a secret"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_replicates_survives_a_leader_kill_and_catches_up() {
    let certs = common::test_dir("haven-certs-");
    cluster_certs(certs.path(), 3);
    let mut cluster = common::start(3, true, &tls_table(certs.path(), "")).await;
    for i in 0..20 {
        assert_eq!(
            cluster.append(i % 3, &format!("before-{i}")).await.status,
            201
        );
    }
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    cluster.kill_node(leader);
    let survivor = cluster.follower_of(leader);
    cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .unwrap();
    for i in 0..20 {
        assert_eq!(
            cluster.append(survivor, &format!("after-{i}")).await.status,
            201
        );
    }
    cluster.start_node(leader).unwrap();
    let replica = cluster.assert_replicas_identical().await;
    let lines = String::from_utf8(replica).unwrap().lines().count() as u64;
    assert_eq!(lines, common::PREPOPULATE + 40);

    // The raft port speaks TLS only: a plaintext hello gets no answer but a closed
    // connection, and the refusal is logged and counted.
    let mut plain = tokio::net::TcpStream::connect(cluster.slots[0].raft_addr)
        .await
        .unwrap();
    plain
        .write_all(b"HVNRAFT2 hello in plaintext")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the plaintext connection was not closed");
    assert!(
        answer.is_empty() || !answer.starts_with(b"HVNRAFT"),
        "a plaintext peer got an answer"
    );
    let refused = cluster
        .metric(0, "haven_tls_handshake_failures_total", &[("port", "raft")])
        .await
        .unwrap();
    assert!(refused >= 1.0, "refusals counted: {refused}");
    assert!(
        node_log(&cluster, 0).contains("not TLS (a plaintext client or peer?)"),
        "no refusal line in node 1's log"
    );
    assert_no_secret_in_logs(&cluster, &key_lines(certs.path()));
}

/// Rewrites node `i`'s `[tls]` table (or drops it) and restarts the node.
fn restart_with_tls(cluster: &mut LocalCluster, i: usize, tls: Option<&str>) {
    cluster.kill_node(i);
    let path = cluster.slots[i].config_path.clone();
    let config = std::fs::read_to_string(&path).unwrap();
    let base = config.split("[tls]").next().unwrap().to_string();
    std::fs::write(&path, base + tls.unwrap_or("")).unwrap();
    cluster.start_node(i).unwrap();
}

async fn wait_for_log(cluster: &LocalCluster, i: usize, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node_log(cluster, i).contains(text) {
        assert!(
            std::time::Instant::now() < deadline,
            "node {i} never logged `{text}`"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_certificate_of_the_clusters_ca_are_refused_and_the_others_serve() {
    let certs = common::test_dir("haven-certs-");
    cluster_certs(certs.path(), 3);
    // Node 3's certificate comes from another CA.
    let other = common::test_dir("haven-other-ca-");
    cluster_certs(other.path(), 0);
    std::fs::remove_file(certs.path().join("node3.pem")).unwrap();
    std::fs::remove_file(certs.path().join("node3.key")).unwrap();
    let other_dir = other.path().to_str().unwrap();
    haven_cert(&[
        "issue",
        "--dir",
        other_dir,
        "--name",
        "node3",
        "--host",
        "127.0.0.1",
    ]);
    for file in ["node3.pem", "node3.key"] {
        std::fs::copy(other.path().join(file), certs.path().join(file)).unwrap();
    }
    let dir = common::test_dir("haven-test-");
    let mut cluster = start_unready(3, dir.path(), tls_table(certs.path(), ""));
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(leader, 2, "the refused node leads");
    let http = Http::new(Duration::from_secs(10));
    let urls: Vec<String> = (cluster.slots.iter())
        .map(|s| format!("{}/append", s.client_url()))
        .collect();
    let append = |node: usize, body: String| {
        let (url, http) = (urls[node].clone(), http.clone());
        async move { http.post(&url, body).await.unwrap().status }
    };
    for i in 0..10 {
        assert_eq!(append(i % 2, format!("a-{i}")).await, 201);
    }
    wait_for_log(
        &cluster,
        leader,
        "its certificate was not signed by this cluster's CA",
    )
    .await;
    assert_eq!(
        lines(&cluster, 2),
        common::PREPOPULATE,
        "the refused node got entries"
    );

    // Plaintext: refused the same way, for another reason.
    restart_with_tls(&mut cluster, 2, None);
    wait_for_log(&cluster, leader, "not TLS (a plaintext client or peer?)").await;
    assert_eq!(append(leader, "plain".into()).await, 201);
    assert_eq!(
        lines(&cluster, 2),
        common::PREPOPULATE,
        "the plaintext node got entries"
    );

    // With a certificate of the cluster's CA it is a member again and catches up.
    std::fs::remove_file(certs.path().join("node3.pem")).unwrap();
    std::fs::remove_file(certs.path().join("node3.key")).unwrap();
    let certs_dir = certs.path().to_str().unwrap();
    haven_cert(&[
        "issue",
        "--dir",
        certs_dir,
        "--name",
        "node3",
        "--host",
        "127.0.0.1",
    ]);
    let table = tls_table(certs.path(), "").replace("{node_id}", "3");
    restart_with_tls(&mut cluster, 2, Some(&table));
    cluster
        .wait_converged(Duration::from_secs(30))
        .await
        .unwrap();
    let first = cluster.replica_bytes(0).unwrap();
    for i in 1..3 {
        assert_eq!(
            cluster.replica_bytes(i).unwrap(),
            first,
            "replica {i} differs"
        );
    }
    assert_eq!(lines(&cluster, 2), common::PREPOPULATE + 11);
    let mut secrets = key_lines(certs.path());
    secrets.extend(key_lines(other.path()));
    assert_no_secret_in_logs(&cluster, &secrets);
}

fn lines(cluster: &LocalCluster, i: usize) -> u64 {
    let bytes = cluster.replica_bytes(i).unwrap_or_default();
    String::from_utf8(bytes).unwrap().lines().count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_and_admin_ports_take_tls_when_asked() {
    let certs = common::test_dir("haven-certs-");
    cluster_certs(certs.path(), 1);
    let dir = common::test_dir("haven-test-");
    let tls = tls_table(certs.path(), "client = true\nadmin = true\n");
    let cluster = start_unready(1, dir.path(), tls);
    let ca = certs.path().join("ca.pem");
    let https = Http::new(Duration::from_secs(10)).trusting(&ca);
    let admin = format!("https://{}", cluster.slots[0].admin_addr);
    let client = format!("https://{}", cluster.slots[0].client_addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = https.get(&format!("{admin}/ready")).await;
        if ready.is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the node never got ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written = https
        .post(&format!("{client}/append"), "over tls")
        .await
        .unwrap();
    assert_eq!(written.status, 201, "{}", written.text());

    // The CLI: with the CA it reads the status; without, it says what is missing.
    let status = |ca: Option<&Path>| {
        let mut command = Command::new(HAVEN);
        command
            .args(["status", "--admin", &admin])
            .env_remove("HAVEN_CA_FILE");
        if let Some(ca) = ca {
            command.env("HAVEN_CA_FILE", ca);
        }
        command.output().unwrap()
    };
    let with_ca = status(Some(&ca));
    assert!(
        with_ca.status.success(),
        "{}",
        String::from_utf8_lossy(&with_ca.stderr)
    );
    let without = status(None);
    assert!(!without.status.success());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(
        stderr.contains("https needs the cluster's CA certificate: set HAVEN_CA_FILE"),
        "{stderr}"
    );

    // Plain HTTP to a TLS port is refused, never served.
    let plain = Http::new(Duration::from_secs(5));
    let refused = plain
        .post(
            &format!("http://{}/append", cluster.slots[0].client_addr),
            "plain",
        )
        .await;
    assert!(
        refused.is_err(),
        "plain HTTP was served on the TLS client port"
    );
    assert_eq!(lines(&cluster, 0), common::PREPOPULATE + 1);
    let refusals = https.get(&format!("{admin}/metrics")).await.unwrap().text();
    assert!(
        refusals.contains("haven_tls_handshake_failures_total{port=\"client\"} 1"),
        "{refusals}"
    );
    assert_no_secret_in_logs(&cluster, &key_lines(certs.path()));
}
