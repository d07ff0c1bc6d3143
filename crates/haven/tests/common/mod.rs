//! The cluster every end-to-end test starts: real processes on loopback, in a directory
//! of its own.
#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use haven_client::http::Http;
use haven_client::http::Reply;
use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::ClusterSpec;
use haven_testkit::cluster::LocalCluster;

pub const PREPOPULATE: u64 = 10;

pub struct TestCluster {
    pub cluster: LocalCluster,
    pub http: Http,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for TestCluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.cluster
    }
}

/// A new archive key (`haven archive keygen`) in `dir/archive.key`.
pub fn keygen(dir: &std::path::Path) -> PathBuf {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["archive", "keygen"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let path = dir.join("archive.key");
    std::fs::write(&path, &output.stdout).unwrap();
    path
}

/// `haven node --config <config>`, which must refuse to start; what it said.
pub fn refused_start(config: &std::path::Path) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .arg("node")
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(!output.status.success(), "the node started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A directory of the test's own under the system's temporary directory, deleted at the
/// end unless HAVEN_KEEP_TEST_DIRS=1 (which keeps configs, data and node logs).
pub fn test_dir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    if std::env::var_os("HAVEN_KEEP_TEST_DIRS").is_some() {
        dir.disable_cleanup(true);
    }
    dir
}

/// Starts `nodes` nodes replicating the log app; `managed`: each node runs its own app.
pub async fn start(nodes: usize, managed: bool, extra_config: &str) -> TestCluster {
    let app = AppKind::LogApp {
        prepopulate: PREPOPULATE,
    };
    start_with(nodes, managed, extra_config, app).await
}

/// [`start`] with another app.
pub async fn start_with(
    nodes: usize,
    managed: bool,
    extra_config: &str,
    app: AppKind,
) -> TestCluster {
    let dir = test_dir("haven-test-");
    let spec = ClusterSpec {
        site: String::new(),
        nodes,
        exe: PathBuf::from(env!("CARGO_BIN_EXE_haven")),
        dir: dir.path().to_path_buf(),
        extra_config: extra_config.to_string(),
        app,
        managed,
        services: Vec::new(),
    };
    let cluster = LocalCluster::start(spec).unwrap();
    // Generous: under CI's load (a bench test saturating both cores beside it) a node of
    // the counter test once saw no leader within 20 s.
    cluster
        .wait_all_ready(Duration::from_secs(60))
        .await
        .unwrap();
    TestCluster {
        cluster,
        http: Http::new(Duration::from_secs(15)),
        dir,
    }
}

impl TestCluster {
    pub async fn append(&self, node: usize, body: &str) -> Reply {
        self.http
            .post(
                &format!("{}/append", self.slots[node].client_url()),
                body.to_string(),
            )
            .await
            .unwrap()
    }

    pub async fn append_keyed(&self, node: usize, body: &str, key: &str) -> Reply {
        let url = format!("{}/append", self.slots[node].client_url());
        let headers = [("idempotency-key", key)];
        self.http
            .send("POST", &url, &headers, Bytes::from(body.to_string()))
            .await
            .unwrap()
    }

    pub async fn get(&self, node: usize, path: &str) -> Reply {
        self.http
            .get(&format!("{}{path}", self.slots[node].client_url()))
            .await
            .unwrap()
    }

    /// Converges, then asserts every replica holds exactly the same bytes.
    pub async fn assert_replicas_identical(&self) -> Vec<u8> {
        self.wait_converged(Duration::from_secs(30)).await.unwrap();
        let first = self.replica_bytes(0).unwrap();
        for i in 1..self.slots.len() {
            assert!(
                self.replica_bytes(i).unwrap() == first,
                "replica {} differs from replica 1",
                i + 1
            );
        }
        first
    }

    /// Waits until the leader reports the archive holding everything it applied; that index.
    pub async fn wait_archived(&self, timeout: Duration) -> u64 {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(leader) = self.wait_for_leader(Duration::from_secs(5)).await
                && let Ok(status) = self.status(leader).await
                && let Some(archive) = &status.archive
                && archive.uploading
                && archive.archived_index.is_some()
                && archive.archived_index == status.applied_index
            {
                return archive.archived_index.unwrap_or(0);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the archive never caught up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn follower_of(&self, leader: usize) -> usize {
        (leader + 1) % self.slots.len()
    }
}

/// Writes acknowledged so far, by their idempotency keys (which are also their bodies).
pub type Acknowledged = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// One writer per node until `stop`: each `POST path` carries its own idempotency key
/// (`<prefix>w<writer>-<n>`, also its body) and is retried, on the next node when one is
/// down, until it is acknowledged, so every key counts once.
pub fn keyed_writers(
    cluster: &TestCluster,
    path: &str,
    prefix: &str,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    acknowledged: &Acknowledged,
) -> Vec<tokio::task::JoinHandle<()>> {
    let urls: Vec<String> = cluster
        .slots
        .iter()
        .map(|s| format!("{}{path}", s.client_url()))
        .collect();
    (0..urls.len())
        .map(|writer| {
            let (http, urls) = (Http::new(Duration::from_secs(5)), urls.clone());
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("{prefix}w{writer}-{n}");
                    n += 1;
                    post_until_acknowledged(&http, &urls, writer, &key).await;
                    acknowledged.lock().unwrap().push(key);
                }
            })
        })
        .collect()
}

async fn post_until_acknowledged(http: &Http, urls: &[String], first: usize, key: &str) {
    for attempt in 0.. {
        let url = &urls[(first + attempt) % urls.len()];
        let headers = [("idempotency-key", key)];
        let body = Bytes::from(key.to_string());
        match http.send("POST", url, &headers, body).await {
            Ok(reply) if reply.status == 201 => return,
            Ok(reply) => assert!(reply.status >= 500, "{key}: {}", reply.status),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
