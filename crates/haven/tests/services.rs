//! Several services on one cluster of real `haven node` processes: each service is its own
//! Raft group with its own replicas, picked by path prefix or by `Host`, and stays
//! byte-identical across its replicas through a `kill -9` of its leader under load.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use haven_client::http::Http;
use haven_client::http::Reply;
use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::ClusterSpec;
use haven_testkit::cluster::LocalCluster;
use haven_testkit::cluster::Process;
use haven_testkit::cluster::ServiceSpec;

/// The services every node runs, and how a client reaches each.
const ORDERS: &str = "orders"; // path prefix /orders (the default)
const BILLING: &str = "billing"; // Host: billing.test
const AUDIT: &str = "audit"; // path prefix /logs
const SERVICES: [&str; 3] = [ORDERS, BILLING, AUDIT];

struct Services {
    cluster: LocalCluster,
    http: Http,
    _dir: tempfile::TempDir,
}

async fn start() -> Services {
    let dir = common::test_dir("haven-services-");
    let app = AppKind::LogApp { prepopulate: 0 };
    let services = vec![
        ServiceSpec::new(ORDERS, app.clone()),
        ServiceSpec {
            matcher: Some("{ host = \"billing.test\" }".to_string()),
            ..ServiceSpec::new(BILLING, app.clone())
        },
        ServiceSpec {
            matcher: Some("{ path_prefix = \"/logs\" }".to_string()),
            ..ServiceSpec::new(AUDIT, app.clone())
        },
    ];
    let spec = ClusterSpec {
        site: String::new(),
        nodes: 3,
        exe: PathBuf::from(env!("CARGO_BIN_EXE_haven")),
        dir: dir.path().to_path_buf(),
        extra_config: String::new(),
        app,
        managed: true,
        services,
    };
    let s = Services {
        cluster: LocalCluster::start(spec).unwrap(),
        http: Http::new(Duration::from_secs(10)),
        _dir: dir,
    };
    // Leaders move until they are spread; tests that count failed writes start after.
    wait_spread(&s, &SERVICES, Duration::from_secs(30)).await;
    s
}

/// A client of one node's client port.
#[derive(Clone)]
struct Client {
    http: Http,
    base: String,
}

impl Client {
    /// Appends `line` to `service`'s log, reaching it the way that service is matched.
    async fn append(&self, service: &str, line: &str) -> anyhow::Result<Reply> {
        let body = Bytes::from(line.to_string());
        let reply = match service {
            BILLING => {
                let url = format!("{}/append", self.base);
                let headers = [("host", "billing.test")];
                self.http.send("POST", &url, &headers, body).await
            }
            AUDIT => {
                self.http
                    .post(&format!("{}/logs/append", self.base), body)
                    .await
            }
            other => {
                let url = format!("{}/{other}/append", self.base);
                self.http.post(&url, body).await
            }
        };
        Ok(reply?)
    }
}

impl Services {
    fn client(&self, node: usize) -> Client {
        Client {
            http: self.http.clone(),
            base: self.cluster.slots[node].client_url(),
        }
    }

    /// Converges `service`, asserts its replicas are byte-identical, and returns its lines.
    async fn identical_lines(&self, service: &str) -> Vec<String> {
        self.cluster
            .wait_converged_of(Some(service), Duration::from_secs(30))
            .await
            .unwrap();
        let first = self.cluster.service_replica_bytes(0, service).unwrap();
        for i in 1..self.cluster.slots.len() {
            let bytes = self.cluster.service_replica_bytes(i, service).unwrap();
            assert!(
                bytes == first,
                "{service}: replica {} differs from replica 1",
                i + 1
            );
        }
        String::from_utf8(first)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_keeps_its_own_writes_and_replicas() {
    let s = start().await;
    let counts = [(ORDERS, 30), (BILLING, 20), (AUDIT, 10)];
    for (node, (service, count)) in counts.iter().enumerate() {
        let client = s.client(node);
        for n in 0..*count {
            let reply = client
                .append(service, &format!("{service}-{n}"))
                .await
                .unwrap();
            assert_eq!(reply.status, 201, "{service}: {}", reply.text());
        }
    }
    for (service, count) in counts {
        let expected: Vec<String> = (0..count).map(|n| format!("{service}-{n}")).collect();
        assert_eq!(s.identical_lines(service).await, expected);
    }

    let unknown = format!("{}/nope/append", s.cluster.slots[0].client_url());
    let unknown = s.http.get(&unknown).await.unwrap();
    assert_eq!(unknown.status, 404);
    assert_eq!(
        unknown.header("haven-error").as_deref(),
        Some("unknown-service")
    );
    assert_eq!(
        unknown.text().trim_end(),
        "haven: no service here answers host `127.0.0.1` or path `/nope/append`"
    );

    // Node 1 took the orders writes and none of the audit ones (they went to node 3).
    let written = |service| [("service", service), ("mode", "write")];
    assert_eq!(
        s.cluster
            .metric(0, "haven_requests_total", &written(ORDERS))
            .await
            .unwrap(),
        30.0
    );
    assert_eq!(
        s.cluster
            .metric(0, "haven_requests_total", &written(AUDIT))
            .await
            .unwrap(),
        0.0
    );

    assert_eq!(service_names(&s, 0).await, names(&SERVICES));

    let ambiguous = s
        .http
        .get(&format!("{}/status", s.cluster.slots[0].admin_url()))
        .await
        .unwrap();
    assert_eq!(ambiguous.status, 400);
    assert_eq!(
        ambiguous.text(),
        r#"{"code":"bad-request","message":"this node runs several services (audit, billing, orders): name one with ?service=NAME"}"#
    );
}

/// Appends to `service` through `client` until `stop`, returning the lines acknowledged.
async fn write_until(client: Client, service: &'static str, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut acked = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let line = format!("{service}-{n}");
        n += 1;
        if client
            .append(service, &line)
            .await
            .is_ok_and(|r| r.status == 201)
        {
            acked.push(line);
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_every_service_stay_identical_after_a_leader_is_killed_mid_load() {
    let mut s = start().await;
    let leader = s
        .cluster
        .wait_for_leader_of(Some(ORDERS), Duration::from_secs(10))
        .await
        .unwrap();
    let survivor = (leader + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = SERVICES
        .into_iter()
        .map(|service| tokio::spawn(write_until(s.client(survivor), service, stop.clone())))
        .collect();

    tokio::time::sleep(Duration::from_millis(800)).await;
    s.cluster.kill_node(leader);
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.cluster.start_node(leader).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);

    for (service, writer) in SERVICES.into_iter().zip(writers) {
        let acked = writer.await.unwrap();
        assert!(acked.len() > 10, "{service}: only {} writes", acked.len());
        let lines = s.identical_lines(service).await;
        let distinct: BTreeSet<&String> = lines.iter().collect();
        assert_eq!(
            distinct.len(),
            lines.len(),
            "{service}: a line applied twice"
        );
        let missing: Vec<&String> = acked.iter().filter(|l| !distinct.contains(l)).collect();
        assert!(
            missing.is_empty(),
            "{service}: acknowledged but lost: {missing:?}"
        );
        assert!(
            lines.iter().all(|l| l.starts_with(&format!("{service}-"))),
            "{service}: holds another service's writes"
        );
    }
}

/// `haven services reload --admin ... [--wipe]` on every node.
fn reload_every_node(s: &Services, wipe: bool) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_haven"));
    command.args(["services", "reload"]);
    if wipe {
        command.arg("--wipe");
    }
    for slot in &s.cluster.slots {
        command.args(["--admin", &slot.admin_addr.to_string()]);
    }
    command.output().unwrap()
}

async fn service_names(s: &Services, node: usize) -> BTreeSet<String> {
    let listed = s.cluster.admin(node).services().await.unwrap();
    listed.into_iter().map(|st| st.service).collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|n| n.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_added_and_another_removed_with_wipe_on_the_running_cluster() {
    const INVENTORY: &str = "inventory";
    let mut s = start().await;
    for n in 0..5 {
        let reply = s
            .client(0)
            .append(AUDIT, &format!("{AUDIT}-{n}"))
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    assert_eq!(s.identical_lines(AUDIT).await.len(), 5);
    let audit_dirs: Vec<PathBuf> = (0..3)
        .flat_map(|i| {
            [
                s.cluster.data_dir(i).join(AUDIT),
                s.cluster.service_app_dir(i, AUDIT),
            ]
        })
        .collect();
    assert!(audit_dirs.iter().all(|d| d.is_dir()));

    let mut services = s.cluster.spec.services.clone();
    services.retain(|service| service.name != AUDIT);
    services.push(ServiceSpec::new(
        INVENTORY,
        AppKind::LogApp { prepopulate: 0 },
    ));
    s.cluster.set_services(services).unwrap();
    let output = reload_every_node(&s, true);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for slot in &s.cluster.slots {
        let line = format!(
            "node {}: added inventory; removed audit; restarted -; unchanged orders, billing",
            slot.id
        );
        assert!(stdout.contains(&line), "no `{line}` in:\n{stdout}");
    }
    for dir in &audit_dirs {
        assert!(!dir.exists(), "{} survived the wipe", dir.display());
        let wiped = format!("  wiped {} of audit (", dir.display());
        assert!(stdout.contains(&wiped), "no `{wiped}` in:\n{stdout}");
    }

    wait_spread(&s, &[ORDERS, BILLING, INVENTORY], Duration::from_secs(30)).await;
    for n in 0..10 {
        let reply = s
            .client(n % 3)
            .append(INVENTORY, &format!("{INVENTORY}-{n}"))
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let expected: Vec<String> = (0..10).map(|n| format!("{INVENTORY}-{n}")).collect();
    assert_eq!(s.identical_lines(INVENTORY).await, expected);
    let reply = s.client(1).append(ORDERS, "orders-after").await.unwrap();
    assert_eq!(reply.status, 201);

    let gone = s.client(0).append(AUDIT, "late").await.unwrap();
    assert_eq!(gone.status, 404);
    assert_eq!(
        gone.header("haven-error").as_deref(),
        Some("unknown-service")
    );
    for node in 0..3 {
        assert_eq!(
            service_names(&s, node).await,
            names(&[ORDERS, BILLING, INVENTORY])
        );
        let admin = s.cluster.admin(node);
        let metrics = admin.metrics().await.unwrap();
        assert!(!metrics.contains("service=\"audit\""), "{metrics}");
        let workers: Vec<String> = (admin.workers().await.unwrap().into_iter())
            .map(|w| w.name)
            .collect();
        assert!(
            !workers.iter().any(|w| w.starts_with("audit/")),
            "{workers:?}"
        );
        assert!(
            workers.iter().any(|w| w.starts_with("inventory/")),
            "{workers:?}"
        );
        // Every worker of the removed service ended by itself, none had to be aborted.
        let log = std::fs::read_to_string(s.cluster.log_path(node, Process::Node)).unwrap();
        assert!(!log.contains("did not stop in time"), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_the_node_cannot_take_changes_nothing_and_sighup_reloads() {
    let s = start().await;
    let config_path = s.cluster.slots[0].config_path.clone();
    let good = std::fs::read_to_string(&config_path).unwrap();
    let reload = format!("{}/services/reload", s.cluster.slots[0].admin_url());

    let bad_name = good.replace("name = \"billing\"", "name = \"Billing\"");
    std::fs::write(&config_path, &bad_name).unwrap();
    let refused = s.http.post(&reload, "").await.unwrap();
    assert_eq!(refused.status, 400);
    let line = bad_name
        .lines()
        .position(|l| l == "name = \"Billing\"")
        .unwrap()
        + 1;
    assert!(
        refused
            .text()
            .contains(&format!("key `service[1].name` (line {line})")),
        "{}",
        refused.text()
    );

    let moved = good.replace("zone = \"zone-1\"", "zone = \"zone-9\"");
    std::fs::write(&config_path, &moved).unwrap();
    let refused = s.http.post(&reload, "").await.unwrap();
    assert_eq!(refused.status, 400);
    let refusal: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(
        refusal,
        serde_json::json!({
            "code": "bad-request",
            "message": "the config changes node.zone, which a running node cannot take: restart the node for them (nothing was reloaded)"
        })
    );
    assert_eq!(service_names(&s, 0).await, names(&SERVICES));

    // Without the audit table, a hangup stops audit and keeps its data.
    let start = good.find("[[service]]\nname = \"audit\"").unwrap();
    let end = start + good[start..].find("[[peers]]").unwrap();
    std::fs::write(&config_path, format!("{}{}", &good[..start], &good[end..])).unwrap();
    s.cluster.hang_up_node(0).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while service_names(&s, 0).await != names(&[ORDERS, BILLING]) {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.cluster.data_dir(0).join(AUDIT).is_dir());
    let reply = s.client(0).append(ORDERS, "orders-0").await.unwrap();
    assert_eq!(reply.status, 201);
}

/// Each service's leader as node 1 (or the first running node) sees it.
async fn leaders(s: &Services, services: &[&str]) -> Vec<Option<u64>> {
    let node = (0..3).find(|i| s.cluster.slots[*i].node_running()).unwrap();
    let mut leaders = Vec::new();
    for service in services {
        let status = s.cluster.status_of(node, Some(service)).await;
        leaders.push(status.ok().and_then(|st| st.leader_id));
    }
    leaders
}

/// Waits until the three `services` are led by three different nodes.
async fn wait_spread(s: &Services, services: &[&str], within: Duration) -> Vec<Option<u64>> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = leaders(s, services).await;
        let distinct: BTreeSet<u64> = now.iter().flatten().copied().collect();
        if now.iter().all(Option::is_some) && distinct.len() == 3 {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leaders not spread: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_spread_over_the_nodes_and_spread_again_after_a_kill() {
    let mut s = start().await;
    let spread = leaders(&s, &SERVICES).await;
    let victim = spread[0].unwrap() as usize - 1;
    s.cluster.kill_node(victim);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = leaders(&s, &SERVICES).await;
        let elsewhere = |l: &Option<u64>| l.is_some_and(|id| id as usize - 1 != victim);
        if now.iter().all(elsewhere) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no new leaders: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.cluster.start_node(victim).unwrap();
    wait_spread(&s, &SERVICES, Duration::from_secs(30)).await;
}

/// One node with a service `noisy` limited by `limits` and a service `quiet` beside it.
async fn quota_cluster(limits: &str) -> (tempfile::TempDir, LocalCluster) {
    let dir = common::test_dir("haven-quota-");
    let app = AppKind::LogApp { prepopulate: 0 };
    let noisy = ServiceSpec {
        tables: format!("[service.limits]\n{limits}"),
        ..ServiceSpec::new("noisy", app.clone())
    };
    let spec = ClusterSpec {
        site: String::new(),
        nodes: 1,
        exe: PathBuf::from(env!("CARGO_BIN_EXE_haven")),
        dir: dir.path().to_path_buf(),
        extra_config: String::new(),
        app: app.clone(),
        managed: true,
        services: vec![noisy, ServiceSpec::new("quiet", app)],
    };
    let cluster = LocalCluster::start(spec).unwrap();
    for service in ["noisy", "quiet"] {
        (cluster
            .wait_for_leader_of(Some(service), Duration::from_secs(20))
            .await)
            .unwrap();
    }
    (dir, cluster)
}

/// `count` appends to `noisy` at once: each reply and when it came.
async fn burst_of_appends(http: &Http, base: &str, count: usize) -> Vec<(Reply, Duration)> {
    let started = std::time::Instant::now();
    let burst: Vec<_> = (0..count)
        .map(|n| {
            let url = format!("{base}/noisy/append");
            let http = http.clone();
            tokio::spawn(async move {
                let reply = http.post(&url, format!("noisy-{n}")).await.unwrap();
                (reply, started.elapsed())
            })
        })
        .collect();
    let mut replies = Vec::new();
    for reply in burst {
        replies.push(reply.await.unwrap());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_over_its_rate_quota_gets_429_and_its_neighbour_does_not() {
    let (_dir, cluster) = quota_cluster("rate_per_s = 20\nrate_burst = 5\n").await;
    let http = Http::new(Duration::from_secs(10));
    let base = cluster.slots[0].client_url();
    // 30 at once: the burst of 5 passes, most of the rest is refused, each refusal held
    // for a second first.
    let replies = burst_of_appends(&http, &base, 30).await;
    let (accepted, refused): (Vec<_>, Vec<_>) = replies.iter().partition(|(r, _)| r.status == 201);
    for (reply, after) in &refused {
        assert_eq!(reply.status, 429, "{}", reply.text());
        assert!(
            *after >= Duration::from_secs(1),
            "a refusal after {after:?}"
        );
        assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
        assert_eq!(reply.header("haven-error").as_deref(), Some("rate-limited"));
        assert_eq!(
            reply.text(),
            "haven: over this service's quota of 20 requests/s on this node\n"
        );
    }
    // The burst, plus what the rate refilled while the accepted ones arrived.
    let last_accepted = accepted
        .iter()
        .map(|(_, after)| after.as_secs_f64())
        .fold(0.0, f64::max);
    let allowed = 5 + (last_accepted * 20.0).ceil() as usize;
    assert!(
        accepted.len() >= 5 && accepted.len() <= allowed,
        "{} accepted within {last_accepted:.2} s",
        accepted.len()
    );
    let refused = refused.len();
    for n in 0..30 {
        let reply = http
            .post(&format!("{base}/quiet/append"), format!("q-{n}"))
            .await
            .unwrap();
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let labels = [("service", "noisy"), ("reason", "rate-limited")];
    let counted = cluster
        .metric(0, "haven_request_errors_total", &labels)
        .await
        .unwrap();
    assert_eq!(counted, refused as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_rate_wait_requests_over_the_quota_are_let_in_one_token_apart() {
    let limits = "rate_per_s = 20\nrate_burst = 5\nrate_wait_ms = 1000\n";
    let (_dir, cluster) = quota_cluster(limits).await;
    let http = Http::new(Duration::from_secs(10));
    let base = cluster.slots[0].client_url();
    // 30 at once: 5 from the burst, then one every 50 ms for the second the others may
    // wait (20 more), and only those past that second are refused.
    let mut replies = burst_of_appends(&http, &base, 30).await;
    replies.sort_by_key(|(_, after)| *after);
    let (accepted, refused): (Vec<_>, Vec<_>) = replies.iter().partition(|(r, _)| r.status == 201);
    assert!(
        (25..=27).contains(&accepted.len()),
        "{} accepted",
        accepted.len()
    );
    for (reply, _) in &refused {
        assert_eq!(reply.status, 429, "{}", reply.text());
    }
    let last = accepted.last().map(|(_, after)| *after).unwrap();
    assert!(
        last >= Duration::from_millis(900),
        "the waiting ones were let in over a second, the last after {last:?}"
    );
    let tenth = accepted[9].1;
    assert!(
        tenth >= Duration::from_millis(200),
        "spaced one token apart, not at once: the tenth after {tenth:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_shared_settings_differ_is_refused_by_its_peers_naming_them() {
    let s = start().await;
    let path = s.cluster.slots[2].config_path.clone();
    let config = std::fs::read_to_string(&path).unwrap();
    let audit = "[[service]]\nname = \"audit\"";
    let changed = config.replace(
        audit,
        &format!("[service.limits]\nidempotency_keys_max = 5000\n\n{audit}"),
    );
    assert_ne!(changed, config);
    std::fs::write(&path, changed).unwrap();
    let reload = format!("{}/services/reload", s.cluster.slots[2].admin_url());
    let reply = s.http.post(&reload, "").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.text().contains("\"restarted\":[\"billing\"]"),
        "{}",
        reply.text()
    );

    let log_path = s.cluster.log_path(2, Process::Node);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap();
        let named = log.lines().any(|l| {
            l.contains("service `billing`: settings that must be equal on every node differ: `limits.idempotency_keys_max` is ")
                && l.contains("5000 on node 3")
                && l.contains("100000 on node ")
        });
        if named {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal naming the setting:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The two nodes that agree keep the service going (once they elect a leader, if
    // node 3 led it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = s.client(0).append(BILLING, "billing-after").await.unwrap();
        if reply.status == 201 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
