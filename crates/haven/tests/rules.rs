//! Alert and scale rules end to end, with real processes: a webhook receiver in the test
//! records an alert firing when a replica's app goes down and its resolution when the app
//! is back; a delivery that cannot reach its webhook is counted; rule tables with
//! mistakes are refused, naming the key and its line.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::TcpStream;

mod common;

/// Every JSON body POSTed to it, in arrival order.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<serde_json::Value>>>);

impl Receiver {
    /// Listens on a port of loopback; its URL.
    async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(received.clone().serve(stream));
            }
        });
        url
    }

    /// Answers each request on the connection with 200 and records its body.
    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = (head.lines())
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buf.len() < end + 4 + length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body: Vec<u8> = buf.drain(..end + 4 + length).skip(end + 4).collect();
            self.0
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
    }

    /// Waits for a notice of `name` in `state` from node `node`; it.
    async fn wait_for(&self, name: &str, state: &str, node: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = (self.0.lock().unwrap().iter())
                .find(|n| n["name"] == name && n["state"] == state && n["node"] == node)
                .cloned();
            if let Some(notice) = found {
                return notice;
            }
            assert!(
                Instant::now() < deadline,
                "no {state} notice of {name} from node {node}; received: {:?}",
                self.0.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_down_fires_when_a_replica_app_is_killed_and_resolves_when_it_is_back() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    // The built-in app-down rule, held 1 s instead of 10; a rule of the test's own whose
    // webhook nobody listens on.
    let rules = format!(
        "[alerts]\nwebhook = \"{url}\"\nretries = 1\ntimeout_ms = 500\n\n\
         [[alert]]\nname = \"app-down\"\nfor = \"1s\"\n\n\
         [[alert]]\nname = \"unheard\"\nmetric = \"haven_applied_index\"\nop = \">\"\nthreshold = 0\nwebhook = \"http://127.0.0.1:1/\"\n"
    );
    let mut c = common::start(3, false, &rules).await;
    c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Writes keep the replicas busy: a replica that is down shows as deliveries fail.
    let writer = {
        let (http, url) = (
            c.http.clone(),
            format!("{}/append", c.slots[0].client_url()),
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = http.post(&url, "tick".to_string()).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.kill_app(2);
    let killed = Instant::now();
    let firing = receiver.wait_for("app-down", "firing", 3).await;
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(firing["value"], 0.0);
    assert_eq!(firing["metric"], "haven_app_up");
    assert_eq!(firing["op"], "<");
    assert_eq!(firing["threshold"], 1.0);
    assert_eq!(firing["labels"]["service"], "app");
    assert!(firing["at"].as_str().unwrap().ends_with('Z'), "{firing}");
    c.start_app(2).unwrap();
    let resolved = receiver.wait_for("app-down", "resolved", 3).await;
    assert_eq!(resolved["value"], 1.0);
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let app_down_from_others = (receiver.0.lock().unwrap().iter())
        .filter(|n| n["name"] == "app-down" && n["node"] != 3)
        .count();
    assert_eq!(app_down_from_others, 0, "only node 3's app was down");
    for i in 0..3 {
        let failures = [("alert", "unheard")];
        let deadline = Instant::now() + Duration::from_secs(10);
        while c
            .metric(i, "haven_alert_delivery_failures_total", &failures)
            .await
            .unwrap()
            < 1.0
        {
            assert!(
                Instant::now() < deadline,
                "node {}: no delivery failure counted",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let firing = c
            .metric(i, "haven_alerts_firing", &[("alert", "unheard")])
            .await;
        assert_eq!(firing.unwrap(), 1.0, "node {}", i + 1);
    }
}

/// A config with `rules` after a valid single-node head; what `haven node` says when it
/// refuses it, and the file's path.
fn refusal(dir: &std::path::Path, rules: &str) -> (String, std::path::PathBuf) {
    let head = "[node]\nid = 1\nclient_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:2\"\nadmin_addr = \"127.0.0.1:3\"\ndata_dir = \"/nonexistent\"\n\n\
                [app]\nurl = \"http://127.0.0.1:4\"\n\n\
                [[peers]]\nid = 1\nraft_addr = \"127.0.0.1:2\"\nclient_addr = \"127.0.0.1:1\"\n\n";
    let path = dir.join(format!("bad-{}.toml", rules.len()));
    std::fs::write(&path, format!("{head}{rules}")).unwrap();
    let stderr = common::refused_start(&path);
    (stderr, path)
}

#[test]
fn rule_tables_with_mistakes_are_refused_with_the_key_and_its_line() {
    let dir = common::test_dir("haven-rules-");
    // The head is 15 lines; the rules start on line 16.
    let cases = [
        (
            "[[alert]]\nname = \"a\"\nmetric = \"haven_app_up\"\nop = \"=>\"\nthreshold = 1\n",
            "key `alert.op` (line 19): \"=>\" is not one of <, <=, >, >=, ==, !=",
        ),
        (
            "[[alert]]\nname = \"a\"\nmetric = \"haven_app_up\"\nop = \"<\"\nthreshold = 1\n\n[[alert]]\nname = \"b\"\nmetric = \"haven_app_up\"\nop = \"<\"\nthreshold = 1\nfor = \"2w\"\n",
            "key `alert.for` (line 27): \"2w\": unknown unit; write a number and a unit: s, m, h or d (e.g. \"30m\", \"24h\", \"7d\")",
        ),
        (
            "[[alert]]\nname = \"a\"\nmetric = \"haven_app_up\"\nop = \"<\"\n",
            "key `alert.threshold` (line 16): is required",
        ),
        (
            "[[alert]]\nname = \"replica-lag\"\nwebhook = \"https://hooks.example/x\"\n",
            "key `alert.webhook` (line 18): \"https://hooks.example/x\" must start with http://",
        ),
        (
            "[[scale]]\nname = \"reads\"\nmetric = \"haven_requests_total\"\nmeasure = \"rate\"\nop = \">\"\nthreshold = 100\nmax = 2\n\n[[scale.pool]]\nid = 4\nraft_addr = \"127.0.0.1:9004\"\nclient_addr = \"127.0.0.1:8004\"\n",
            "key `scale.max` (line 22): 1 nodes in [[scale.pool]] cannot make max = 2 learners",
        ),
    ];
    for (rules, expected) in cases {
        let (stderr, path) = refusal(dir.path(), rules);
        let expected = format!("invalid config {}: {expected}", path.display());
        assert!(stderr.contains(&expected), "{stderr}\nexpected: {expected}");
    }
}

/// Reads per second sent to `url` until `stop`.
fn reader(
    c: &common::TestCluster,
    url: String,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let (http, stop) = (c.http.clone(), stop.clone());
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let _ = http.get(&url).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// Waits until node `i` reports `learners` as the service's learners.
async fn wait_learners(c: &common::TestCluster, i: usize, learners: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = c.status(i).await;
        if status.as_ref().is_ok_and(|s| s.learners == learners) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "learners never became {learners:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_rule_adds_a_learner_under_read_load_and_removes_it_after() {
    // Reads of single lines are `local`; everything else stays linearizable.
    let local_lines =
        "[[routes]]\nmethods = [\"GET\"]\npath_prefix = \"/line/\"\nmode = \"local\"\n";
    let mut c = common::start(3, false, local_lines).await;
    c.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    for i in 0..5 {
        assert_eq!(c.append(0, &format!("before {i}")).await.status, 201);
    }
    // The pool: a fourth node, running and configured to join, not a member.
    let spare = c.add_node().unwrap();
    let pool = &c.slots[spare];
    let rule = format!(
        "\n[[scale]]\nname = \"reads\"\nmetric = \"haven_requests_total\"\nlabels = {{ mode = \"linearizable\" }}\n\
         measure = \"rate\"\nop = \">\"\nthreshold = 20\nfor = \"1s\"\nmin = 0\nmax = 1\ncooldown = \"2s\"\n\n\
         [[scale.pool]]\nid = {}\nraft_addr = \"{}\"\nclient_addr = \"{}\"\n",
        pool.id, pool.raft_addr, pool.client_addr
    );
    for i in 0..3 {
        let mut config = std::fs::read_to_string(&c.slots[i].config_path).unwrap();
        config.push_str(&rule);
        std::fs::write(&c.slots[i].config_path, config).unwrap();
        c.kill_node(i);
        c.start_node(i).unwrap();
        c.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    }
    let leader = c.wait_for_leader(Duration::from_secs(20)).await.unwrap();
    wait_learners(&c, leader, &[]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/count", c.slots[leader].client_url());
    let reads = reader(&c, url, &stop);
    wait_learners(&c, leader, &[4]).await;
    // The learner caught up and serves a linearizable read of a write made before it
    // joined, and of one made now, and local reads.
    assert_eq!(c.append(leader, "after").await.status, 201);
    let lines = c
        .http
        .get(&format!("{}/count", c.slots[spare].client_url()))
        .await
        .unwrap();
    assert_eq!(lines.status, 200, "{}", lines.text());
    let on_leader = c.get(leader, "/count").await;
    assert_eq!(lines.text(), on_leader.text());
    let first_write = format!("/line/{}", common::PREPOPULATE);
    let local = c.get(spare, &first_write).await;
    assert_eq!(local.status, 200, "{}", local.text());
    assert_eq!(local.text(), c.get(leader, &first_write).await.text());
    assert!(local.text().starts_with("before 0"), "{}", local.text());
    stop.store(true, Ordering::Relaxed);
    reads.await.unwrap();
    wait_learners(&c, leader, &[]).await;
    let changes = |change: &'static str| [("rule", "reads"), ("change", change)];
    assert_eq!(
        c.metric(leader, "haven_scale_changes_total", &changes("add"))
            .await
            .unwrap(),
        1.0
    );
    assert_eq!(
        c.metric(leader, "haven_scale_changes_total", &changes("remove"))
            .await
            .unwrap(),
        1.0
    );
}
