//! Drills end to end, with real processes and a real S3 server (SeaweedFS): a 3-node
//! cluster archives while writers keep appending; `haven drill` restores the archive into
//! a sandbox beside it, checks the restored app and reports, without touching production;
//! a drill whose checks fail, or whose restore cannot be done, exits non-zero and says
//! exactly what failed.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;

use haven_archive::store::Store;
use haven_archive::store::StoreSettings;
use haven_archive::testing::SeaweedServer;
use haven_client::http::Http;

mod common;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
const URL: &str = "s3://haven/drills";

fn config(endpoint: &str, key: &Path) -> String {
    format!(
        "[checkpoints]\nmode = \"managed\"\nevery_entries = 200\nevery_seconds = 0\nkeep = 3\n\
         [archive]\nurl = \"{URL}\"\nendpoint = \"{endpoint}\"\nkey_file = \"{}\"\nflush_ms = 100\nkeep = 2\n",
        key.display()
    )
}

/// `haven drill --config <node 1's config> <args> --json`: its report and exit status.
fn drill(cluster: &common::TestCluster, args: &[&str]) -> (serde_json::Value, bool) {
    let output = Command::new(HAVEN)
        .arg("drill")
        .arg("--config")
        .arg(&cluster.slots[0].config_path)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (report, output.status.success())
}

/// Every object's name in the archive under `dir`.
async fn objects(store: &Store, dir: &str) -> Vec<String> {
    let listed = store.list(dir, None).await.unwrap();
    listed.into_iter().map(|l| l.name).collect()
}

/// One writer appending through every node until `stop`.
fn keep_writing(
    cluster: &common::TestCluster,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let urls: Vec<String> = cluster.slots.iter().map(|s| s.client_url()).collect();
    tokio::spawn(async move {
        let http = Http::new(Duration::from_secs(10));
        let mut acknowledged = 0;
        for n in 0.. {
            if stop.load(Ordering::Acquire) {
                break;
            }
            let url = format!("{}/append", urls[n % urls.len()]);
            if let Ok(reply) = http.post(&url, format!("load {n}")).await
                && reply.status == 201
            {
                acknowledged += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acknowledged
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_restores_the_archive_beside_production_and_reports() {
    let server = SeaweedServer::start().await;
    server.set_env();
    let dir = common::test_dir("haven-drills-");
    let key = common::keygen(dir.path());
    let cluster = common::start(3, true, &config(&server.endpoint, &key)).await;
    for i in 0..300 {
        assert_eq!(
            cluster.append(i % 3, &format!("before {i}")).await.status,
            201
        );
    }
    let archived = cluster.wait_archived(Duration::from_secs(30)).await;
    let store = Store::open(&StoreSettings {
        url: URL.to_string(),
        endpoint: Some(server.endpoint.clone()),
    })
    .unwrap();
    let epochs_before = (
        objects(&store, "epochs/").await,
        objects(&store, "fences/").await,
    );
    let data_dir = cluster.data_dir(0);
    let top_before = entries(&data_dir);

    // A drill while production takes writes.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(&cluster, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (report, passed) = drill(
        &cluster,
        &[
            "--check-http",
            "GET /count 200",
            "--check-http",
            "GET /line/1 200",
            "--check-cmd",
            "test -s \"$HAVEN_DRILL_DIR/log.txt\" && echo restored at $HAVEN_DRILL_URL",
            "--keep",
        ],
    );
    stop.store(true, Ordering::Release);
    let written_meanwhile = writer.await.unwrap();
    assert!(passed, "{report:#}");
    assert_eq!(report["ok"], true);
    let restored = report["restored_index"].as_u64().unwrap();
    assert!(restored >= archived, "{restored} < {archived}");
    let rto = report["rto_seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rto >= report["restore_seconds"].as_f64().unwrap());
    let checks = report["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "restore verified",
            "first healthy answer",
            "GET /count → 200",
            "GET /line/1 → 200",
            "test -s \"$HAVEN_DRILL_DIR/log.txt\" && echo restored at $HAVEN_DRILL_URL"
        ]
    );
    assert!(checks.iter().all(|c| c["ok"] == true), "{report:#}");
    eprintln!(
        "drill: index {restored}, restore {} s, RTO {rto} s, {} entries replayed; production took {written_meanwhile} writes meanwhile",
        report["restore_seconds"], report["entries_replayed"]
    );

    // The restored replica is production's as it was at that index: a prefix of it.
    let sandbox = std::path::PathBuf::from(report["sandbox"].as_str().unwrap());
    let drilled = std::fs::read(sandbox.join("app").join("log.txt")).unwrap();
    let production = cluster.replica_bytes(0).unwrap();
    assert!(production.starts_with(&drilled) && drilled.len() > 1000);
    std::fs::remove_dir_all(&sandbox).unwrap();

    // Production untouched: no epoch or fence created, and the drill's only trace in the
    // data directory is its report.
    let epochs_after = (
        objects(&store, "epochs/").await,
        objects(&store, "fences/").await,
    );
    assert_eq!(epochs_after, epochs_before);
    let mut top_after = entries(&data_dir);
    top_after.retain(|e| e != "drills");
    assert_eq!(top_after, top_before);
    let id = report["id"].as_str().unwrap();
    let drill_dir = data_dir.join("drills").join(id);
    assert_eq!(entries(&drill_dir), ["report.json", "report.md"]);
    let leader = cluster
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        cluster.status(leader).await.unwrap().term,
        cluster.status(0).await.unwrap().term
    );

    // The node exports the newest drill it keeps.
    let started = report["started_unix_s"].as_f64().unwrap();
    wait_metric(
        &cluster,
        "haven_drill_last_success_timestamp_seconds",
        started,
    )
    .await;
    assert_eq!(metric(&cluster, "haven_drill_last_ok").await, 1.0);

    // A drill whose checks fail says which and how, and exits non-zero.
    let (failed, passed) = drill(
        &cluster,
        &[
            "--check-http",
            "GET /count 200",
            "--check-http",
            "GET /line/1 404",
            "--check-cmd",
            "echo 41 lines; exit 3",
        ],
    );
    assert!(!passed && failed["ok"] == false, "{failed:#}");
    let outcomes: Vec<(&str, bool, &str)> = (failed["checks"].as_array().unwrap().iter())
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["ok"].as_bool().unwrap(),
                c["detail"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(outcomes[3].0, "GET /line/1 → 404");
    assert!(
        !outcomes[3].1
            && outcomes[3]
                .2
                .starts_with("status 200 (expected 404); body: "),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes[4],
        (
            "echo 41 lines; exit 3",
            false,
            "exit status: 3; output: 41 lines"
        )
    );
    assert!(!Path::new(failed["sandbox"].as_str().unwrap()).exists());

    // A restore that cannot be done is a failed check too, and nothing else runs.
    let (unrestorable, passed) = drill(&cluster, &["--to-index", "99999999"]);
    assert!(!passed, "{unrestorable:#}");
    let checks = unrestorable["checks"].as_array().unwrap();
    assert_eq!(
        (checks.len(), &checks[0]["name"], &checks[0]["ok"]),
        (1, &"restore verified".into(), &false.into())
    );
    assert_eq!(
        unrestorable["error"],
        "the restore failed, so nothing else was checked"
    );

    // Without a config: the archive, its key and the app's command on the command line.
    let elsewhere = dir.path().join("elsewhere");
    let app = format!("{HAVEN} logapp --listen {{listen}} --file {{data_dir}}/log.txt");
    let output = Command::new(HAVEN)
        .args([
            "drill",
            "--json",
            "--archive",
            URL,
            "--endpoint",
            &server.endpoint,
        ])
        .arg("--key-file")
        .arg(&key)
        .args(["--app-command", &app, "--check-http", "GET /line/1 200"])
        .arg("--dir")
        .arg(&elsewhere)
        .output()
        .unwrap();
    let bare: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(output.status.success() && bare["ok"] == true, "{bare:#}");
    assert!(bare["restored_index"].as_u64().unwrap() >= restored);
    assert_eq!(entries(&elsewhere).len(), 1);

    // All three are listed.
    let output = Command::new(HAVEN)
        .args(["drill", "list", "--json", "--config"])
        .arg(&cluster.slots[0].config_path)
        .output()
        .unwrap();
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let results: Vec<bool> = listed.iter().map(|l| l["ok"].as_bool().unwrap()).collect();
    assert_eq!(results, [true, false, false]);
    wait_metric(&cluster, "haven_drill_last_ok", 0.0).await;
    let rto = metric(&cluster, "haven_drill_last_rto_seconds").await;
    assert_eq!(rto, report["rto_seconds"].as_f64().unwrap());
}

/// `[drill] every`: the node drills on its own, keeps the report and exports the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_drill_runs_on_its_own_and_is_exported() {
    let server = SeaweedServer::start().await;
    server.set_env();
    let dir = common::test_dir("haven-drills-scheduled-");
    let key = common::keygen(dir.path());
    let tables = format!(
        "{}[drill]\nevery = \"10s\"\ncheck_http = [\"GET /count 200\"]\n",
        config(&server.endpoint, &key)
    );
    let cluster = common::start(1, true, &tables).await;
    for i in 0..50 {
        assert_eq!(cluster.append(0, &format!("line {i}")).await.status, 201);
    }
    cluster.wait_archived(Duration::from_secs(30)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while metric(&cluster, "haven_drill_last_success_timestamp_seconds").await == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled drill passed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(metric(&cluster, "haven_drill_last_ok").await, 1.0);
    assert!(metric(&cluster, "haven_drill_last_rto_seconds").await > 0.0);
    let reports = entries(&cluster.data_dir(0).join("drills"));
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(reports[0].starts_with("app-"));
}

async fn metric(cluster: &common::TestCluster, name: &str) -> f64 {
    cluster
        .metric(0, name, &[("service", "app")])
        .await
        .unwrap()
}

/// Until node 1 exports `value` for `name` (it looks at its drills every 5 s).
async fn wait_metric(cluster: &common::TestCluster, name: &str, value: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found = metric(cluster, name).await;
        if (found - value).abs() < 1e-3 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} is {found}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The names in a directory, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// One node at `site` running `services` (name, app), each with the archive of its own
/// (`[service.archive]`, or `[service.standby]` following it).
fn one_node_site(
    site: &str,
    services: &[(&str, haven_testkit::cluster::AppKind)],
    standby: bool,
    (endpoint, key): (&str, &Path),
    dir: &Path,
) -> haven_testkit::cluster::LocalCluster {
    use haven_testkit::cluster::ClusterSpec;
    use haven_testkit::cluster::LocalCluster;
    use haven_testkit::cluster::ServiceSpec;
    let table = if standby {
        "standby]\nfrom"
    } else {
        "archive]\nurl"
    };
    let services = (services.iter())
        .map(|(name, app)| {
            let mut service = ServiceSpec::new(name, app.clone());
            service.tables = format!(
                "[service.checkpoints]\nmode = \"managed\"\nevery_entries = 50\nevery_seconds = 0\n\
                 [service.{table} = \"{URL}-{name}\"\nendpoint = \"{endpoint}\"\nkey_file = \"{}\"\n",
                key.display()
            );
            service
        })
        .collect();
    LocalCluster::start(ClusterSpec {
        site: site.to_string(),
        nodes: 1,
        exe: std::path::PathBuf::from(HAVEN),
        dir: dir.join(format!("site-{site}")),
        extra_config: String::new(),
        app: haven_testkit::cluster::AppKind::LogApp {
            prepopulate: common::PREPOPULATE,
        },
        managed: true,
        services,
    })
    .unwrap()
}

fn log_app() -> haven_testkit::cluster::AppKind {
    haven_testkit::cluster::AppKind::LogApp {
        prepopulate: common::PREPOPULATE,
    }
}

/// `--failover`: the primary site of two services is lost; the plan promotes each
/// service's standby in order and checks its gate there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_plan_promotes_each_standby_in_order() {
    let server = SeaweedServer::start().await;
    server.set_env();
    let dir = common::test_dir("haven-plan-failover-");
    let key = common::keygen(dir.path());
    let services = [("api", log_app()), ("web", log_app())];
    let store = (server.endpoint.as_str(), key.as_path());
    let mut a = one_node_site("a", &services, false, store, dir.path());
    let http = Http::new(Duration::from_secs(10));
    for (service, _) in &services {
        a.wait_for_leader_of(Some(service), Duration::from_secs(30))
            .await
            .unwrap();
        let url = format!("{}/{service}/append", a.slots[0].client_url());
        assert_eq!(
            http.post(&url, format!("{service} at a"))
                .await
                .unwrap()
                .status,
            201
        );
    }
    let b = one_node_site("b", &services, true, store, dir.path());
    for (service, _) in &services {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !b.status_of(0, Some(service)).await.is_ok_and(|s| {
            s.site
                .is_some_and(|site| site.applied_index.is_some() && site.lag_entries == 0)
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "{service} standby never caught up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    a.kill_node(0);
    a.kill_app(0);

    let (admin, client) = (b.slots[0].admin_addr, b.slots[0].client_url());
    let plan = format!(
        "[[service]]\nname = \"web\"\ndepends_on = [\"api\"]\ngate = \"GET /count 200\"\nadmin = \"{admin}\"\nurl = \"{client}/web\"\n\n\
         [[service]]\nname = \"api\"\ngate = \"GET /count 200\"\nadmin = \"{admin}\"\nurl = \"{client}/api\"\n"
    );
    let path = dir.path().join("failover.toml");
    std::fs::write(&path, plan).unwrap();
    let output = Command::new(HAVEN)
        .args(["plan", "run", "--failover", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    assert!(output.status.success(), "{report:#}");
    let steps = report["steps"].as_array().unwrap();
    let order: Vec<(&str, &str)> = (steps.iter())
        .map(|s| (s["service"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(order, [("api", "up"), ("web", "up")]);
    for (service, _) in &services {
        let site = b.status_of(0, Some(service)).await.unwrap().site.unwrap();
        assert_eq!(site.role.name(), "primary", "{service}");
        let url = format!("{client}/{service}/append");
        assert_eq!(
            http.post(&url, format!("{service} at b"))
                .await
                .unwrap()
                .status,
            201
        );
    }
}

/// One node running three services, each with an archive of its own: a tree app as `db`,
/// log apps as `api` and `web`.
async fn three_services(
    endpoint: &str,
    key: &Path,
    dir: &Path,
) -> haven_testkit::cluster::LocalCluster {
    let services = [
        ("db", haven_testkit::cluster::AppKind::TreeApp),
        ("api", log_app()),
        ("web", log_app()),
    ];
    let cluster = one_node_site("", &services, false, (endpoint, key), dir);
    for service in ["db", "api", "web"] {
        let leader = cluster.wait_for_leader_of(Some(service), Duration::from_secs(30));
        leader.await.unwrap();
    }
    let http = Http::new(Duration::from_secs(10));
    for service in ["api", "web"] {
        for i in 0..20 {
            let url = format!("{}/{service}/append", cluster.slots[0].client_url());
            assert_eq!(
                http.post(&url, format!("{service} {i}"))
                    .await
                    .unwrap()
                    .status,
                201
            );
        }
    }
    for service in ["db", "api", "web"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = cluster.status_of(0, Some(service)).await.unwrap();
            let archived = status.archive.as_ref().and_then(|a| a.archived_index);
            if archived.is_some() && archived == status.applied_index {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{service} not archived: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster
}

/// `haven plan run <plan> --drill --json`: the report, and the exit status.
fn run_plan(dir: &Path, plan: &str) -> (Option<serde_json::Value>, bool, String) {
    let path = dir.join("plan.toml");
    std::fs::write(&path, plan).unwrap();
    let output = Command::new(HAVEN)
        .args(["plan", "run", "--drill", "--json"])
        .arg(&path)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&output.stdout).ok();
    (
        report,
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn plan(config: &Path, api_gate: &str) -> String {
    let config = config.display();
    format!(
        "[[service]]\nname = \"web\"\nconfig = \"{config}\"\ndepends_on = [\"api\"]\ngate = \"GET /count 200\"\n\n\
         [[service]]\nname = \"db\"\nconfig = \"{config}\"\ngate = \"GET /digest 200\"\n\n\
         [[service]]\nname = \"api\"\nconfig = \"{config}\"\ndepends_on = [\"db\"]\ngate = \"{api_gate}\"\ngate_timeout = \"2s\"\n\
         post = \"test -n \\\"$HAVEN_PLAN_URL_DB\\\" && test -n \\\"$HAVEN_PLAN_URL\\\"\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_plan_brings_services_up_in_order_and_stops_at_a_failed_gate() {
    let server = SeaweedServer::start().await;
    server.set_env();
    let dir = common::test_dir("haven-plan-");
    let key = common::keygen(dir.path());
    let cluster = three_services(&server.endpoint, &key, dir.path()).await;
    let config = &cluster.slots[0].config_path;

    let (report, passed, stderr) = run_plan(dir.path(), &plan(config, "GET /count 200"));
    let report = report.unwrap_or_else(|| panic!("{stderr}"));
    assert!(passed, "{report:#}");
    let steps = report["steps"].as_array().unwrap();
    let order: Vec<&str> = steps
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["db", "api", "web"]);
    assert!(steps.iter().all(|s| s["state"] == "up"), "{report:#}");
    // Each started only once what it depends on was up.
    for (before, after) in [(0, 1), (1, 2)] {
        let up = steps[before]["up_after_s"].as_f64().unwrap();
        let started = steps[after]["started_after_s"].as_f64().unwrap();
        assert!(started >= up, "{report:#}");
    }
    assert!(stderr.contains("plan: api: up"), "{stderr}");

    // A gate that fails stops the plan: what is up, what failed and why, what never started.
    let (report, passed, _) = run_plan(dir.path(), &plan(config, "GET /count 500"));
    let report = report.unwrap();
    assert!(!passed && report["ok"] == false);
    let steps = report["steps"].as_array().unwrap();
    let states: Vec<&str> = steps.iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["up", "failed", "not_started"]);
    let why = steps[1]["detail"].as_str().unwrap();
    assert!(
        why.starts_with("its gate did not pass: GET /count → 500: none within 2s; last: status 200 (expected 500)"),
        "{why}"
    );
    assert_eq!(
        steps[2]["detail"],
        "not started: the plan stopped when `api` failed"
    );

    // A cyclic plan is refused before anything starts.
    let cyclic = plan(config, "GET /count 200")
        .replace("name = \"db\"\n", "name = \"db\"\ndepends_on = [\"web\"]\n");
    let (report, passed, stderr) = run_plan(dir.path(), &cyclic);
    assert!(!passed && report.is_none());
    assert!(
        stderr.contains("a cycle of dependencies: web → api → db → web (service `web`, line 2)"),
        "{stderr}"
    );

    // Every sandbox is gone; the drills' reports stay.
    for drill in entries(&cluster.data_dir(0).join("drills")) {
        let kept = entries(&cluster.data_dir(0).join("drills").join(&drill));
        assert_eq!(kept, ["report.json", "report.md"], "{drill}");
    }
}
