//! The admin port with `[admin] token_file`, end to end: changes without a token, or with
//! a wrong one, are refused with 401 and a JSON reason, counted, audited, and change
//! nothing; with a token they go through and are audited under its holder's name; reads
//! stay open; the token never reaches the node's log.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use haven_client::http::Http;
use haven_testkit::cluster::Process;

mod common;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
const TOKEN: &str = "s3cr3t-0123456789-ops";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_need_a_token_and_every_one_is_audited() {
    let dir = common::test_dir("haven-admin-");
    let tokens = dir.path().join("admin.tokens");
    std::fs::write(&tokens, format!("# who may change things\nops {TOKEN}\n")).unwrap();
    let config = format!("[admin]\ntoken_file = \"{}\"\n", tokens.display());
    let cluster = common::start(1, true, &config).await;
    let admin = cluster.slots[0].admin_url();
    let http = Http::new(Duration::from_secs(10));
    let reload = format!("{admin}/services/reload");
    let post = |bearer: Option<&str>| {
        let header = bearer.map(|t| format!("Bearer {t}"));
        let http = http.clone();
        let reload = reload.clone();
        async move {
            let headers: Vec<(&str, &str)> = header
                .iter()
                .map(|h| ("authorization", h.as_str()))
                .collect();
            http.send("POST", &reload, &headers, Bytes::new())
                .await
                .unwrap()
        }
    };

    let missing = post(None).await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.header("www-authenticate").as_deref(),
        Some("Bearer")
    );
    assert_eq!(
        missing.text(),
        r#"{"code":"unauthorized","message":"this admin request needs Authorization: Bearer <token> ([admin] token_file)"}"#
    );
    let wrong = post(Some("s3cr3t-0123456789-opz")).await;
    assert_eq!(wrong.status, 401);
    assert!(
        wrong.text().contains("this token is not accepted here"),
        "{}",
        wrong.text()
    );
    let metric = cluster
        .metric(0, "haven_admin_unauthorized_total", &[])
        .await
        .unwrap();
    assert_eq!(metric, 2.0);
    assert_eq!(post(Some(TOKEN)).await.status, 200);

    // Reads stay open; the CLI sends HAVEN_ADMIN_TOKEN.
    assert_eq!(
        http.get(&format!("{admin}/status")).await.unwrap().status,
        200
    );
    assert_eq!(
        http.get(&format!("{admin}/health")).await.unwrap().status,
        200
    );
    let addr = cluster.slots[0].admin_addr.to_string();
    let refused = Command::new(HAVEN)
        .args(["services", "reload", "--admin", &addr])
        .env_remove("HAVEN_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let allowed = Command::new(HAVEN)
        .args(["services", "reload", "--admin", &addr])
        .env("HAVEN_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );

    // The trail: who (never the token), what, the answer.
    let trail = audit_trail(&cluster.slots[0].config_path);
    let seen: Vec<(Option<&str>, u64)> = (trail.iter())
        .map(|e| (e["who"].as_str(), e["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            (None, 401),
            (None, 401),
            (Some("ops"), 200),
            (None, 401),
            (Some("ops"), 200)
        ]
    );
    assert!(
        trail
            .iter()
            .all(|e| e["path"] == "/services/reload?wipe=false" || e["path"] == "/services/reload")
    );

    // No secret in the node's log.
    let log = std::fs::read_to_string(cluster.log_path(0, Process::Node)).unwrap();
    assert!(
        !log.contains(TOKEN) && !log.contains("opz"),
        "a token is in the node's log"
    );
}

/// `haven audit --json`: the node's trail of admin changes.
fn audit_trail(config: &std::path::Path) -> Vec<serde_json::Value> {
    let output = Command::new(HAVEN)
        .args(["audit", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn a_bad_token_file_stops_the_node_naming_file_and_line() {
    let dir = common::test_dir("haven-admin-bad-");
    let tokens = dir.path().join("admin.tokens");
    std::fs::write(&tokens, "ops short\n").unwrap();
    let [client, raft, admin, app] = [(); 4].map(|_| haven_testkit::cluster::free_addr().unwrap());
    let config = format!(
        "[node]\nid = 1\nclient_addr = \"{client}\"\nraft_addr = \"{raft}\"\nadmin_addr = \"{admin}\"\ndata_dir = \"{}\"\n\
         [[peers]]\nid = 1\nraft_addr = \"{raft}\"\nclient_addr = \"{client}\"\n\
         [admin]\ntoken_file = \"{}\"\n[app]\nurl = \"http://{app}\"\n",
        dir.path().join("data").display(),
        tokens.display()
    );
    let path = dir.path().join("n1.toml");
    std::fs::write(&path, config).unwrap();
    let said = common::refused_start(&path);
    assert!(
        said.contains(&format!(
            "admin token file {}: line 1: a token has at least 16 characters",
            tokens.display()
        )),
        "{said}"
    );
}

/// Two services on one node: `orders` with tokens of its own (`[service.admin]`),
/// `billing` with the node's. Each service's changes take only its own tokens; a refused
/// change changes nothing; the trail names each holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_own_tokens_guard_its_changes_and_only_its_changes() {
    use haven_testkit::cluster::AppKind;
    use haven_testkit::cluster::ClusterSpec;
    use haven_testkit::cluster::LocalCluster;
    use haven_testkit::cluster::ServiceSpec;

    const ORDERS_TOKEN: &str = "orders-team-0123456789";
    let dir = common::test_dir("haven-admin-svc-");
    let node_tokens = dir.path().join("node.tokens");
    std::fs::write(&node_tokens, format!("ops {TOKEN}\n")).unwrap();
    let orders_tokens = dir.path().join("orders.tokens");
    std::fs::write(&orders_tokens, format!("orders-team {ORDERS_TOKEN}\n")).unwrap();
    let checkpoints =
        "[service.checkpoints]\nmode = \"managed\"\nevery_entries = 100000\nevery_seconds = 0\n";
    let app = AppKind::LogApp {
        prepopulate: common::PREPOPULATE,
    };
    let mut orders = ServiceSpec::new("orders", app.clone());
    orders.tables = format!(
        "{checkpoints}[service.admin]\ntoken_file = \"{}\"\n",
        orders_tokens.display()
    );
    let mut billing = ServiceSpec::new("billing", app.clone());
    billing.tables = checkpoints.to_string();
    let cluster = LocalCluster::start(ClusterSpec {
        site: String::new(),
        nodes: 1,
        exe: HAVEN.into(),
        dir: dir.path().join("cluster"),
        extra_config: format!("[admin]\ntoken_file = \"{}\"\n", node_tokens.display()),
        app,
        managed: true,
        services: vec![orders, billing],
    })
    .unwrap();
    for service in ["orders", "billing"] {
        (cluster.wait_for_leader_of(Some(service), Duration::from_secs(30)))
            .await
            .unwrap();
    }
    let http = Http::new(Duration::from_secs(10));
    let admin = cluster.slots[0].admin_url();
    let checkpoint = |service: &'static str, token: &'static str| {
        let (http, url) = (
            http.clone(),
            format!("{admin}/checkpoints?service={service}"),
        );
        async move {
            let bearer = format!("Bearer {token}");
            let headers = [("authorization", bearer.as_str())];
            let reply = http
                .send("POST", &url, &headers, Bytes::new())
                .await
                .unwrap();
            (reply.status, reply.text())
        }
    };
    let checkpoints_of = |service: &'static str| {
        let (http, url) = (
            http.clone(),
            format!("{admin}/checkpoints?service={service}"),
        );
        async move { http.get(&url).await.unwrap().text() }
    };

    let before = checkpoints_of("orders").await;
    let (status, text) = checkpoint("orders", TOKEN).await;
    assert_eq!(status, 401, "the node's token changed orders: {text}");
    assert!(text.contains("this token is not accepted here"), "{text}");
    assert_eq!(
        checkpoints_of("orders").await,
        before,
        "a refused change changed orders"
    );
    let (status, text) = checkpoint("orders", ORDERS_TOKEN).await;
    assert_eq!(status, 200, "{text}");
    let (status, _) = checkpoint("billing", ORDERS_TOKEN).await;
    assert_eq!(status, 401, "orders' token changed billing");
    let (status, text) = checkpoint("billing", TOKEN).await;
    assert_eq!(status, 200, "{text}");

    let trail = audit_trail(&cluster.slots[0].config_path);
    let seen: Vec<(Option<&str>, Option<&str>, u64)> = (trail.iter())
        .map(|e| {
            let who = e["who"].as_str();
            (who, e["service"].as_str(), e["status"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        seen,
        [
            (None, Some("orders"), 401),
            (Some("orders-team"), Some("orders"), 200),
            (None, Some("billing"), 401),
            (Some("ops"), Some("billing"), 200),
        ]
    );
    let log = std::fs::read_to_string(cluster.log_path(0, Process::Node)).unwrap();
    assert!(
        !log.contains(TOKEN) && !log.contains(ORDERS_TOKEN),
        "a token is in the node's log"
    );
}
