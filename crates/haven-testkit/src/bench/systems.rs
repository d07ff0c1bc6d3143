//! The systems a reference run measures, launched on loopback and torn down when dropped:
//! the log app alone (the baseline), Haven with 1 or 3 nodes, and a 3-member etcd (the
//! peer). Each hands the load generator its URLs and the CPU meter its process ids.

use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use haven_bench::workload::WorkloadChoice;

use crate::cluster::AppKind;
use crate::cluster::ClusterSpec;
use crate::cluster::LocalCluster;
use crate::cluster::PREPOPULATED_LINES;
use crate::cluster::free_addr;
use crate::cluster::threads_per_copy;
use haven_client::http::Http;

/// Bytes per request body, as in the reference workload.
pub const BODY_BYTES: usize = 128;
/// Keys the etcd workload spreads its puts and reads over.
const ETCD_KEYS: u64 = 1000;
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemKind {
    AppAlone,
    Haven {
        nodes: usize,
    },
    /// Haven's nodes speaking mutual TLS to each other (`[tls]`; clients in plaintext).
    HavenTls {
        nodes: usize,
    },
    Etcd,
}

impl SystemKind {
    pub fn label(self) -> String {
        match self {
            Self::AppAlone => "log app alone".to_string(),
            Self::Haven { nodes: 1 } => "haven, 1 node".to_string(),
            Self::Haven { nodes } => format!("haven, {nodes} nodes"),
            Self::HavenTls { nodes } => format!("haven, {nodes} nodes, TLS"),
            Self::Etcd => "etcd, 3 members".to_string(),
        }
    }

    /// The request shapes this system understands.
    pub fn workload(self) -> WorkloadChoice {
        match self {
            Self::Etcd => WorkloadChoice::Etcd {
                body_size: BODY_BYTES,
                keys: ETCD_KEYS,
            },
            _ => WorkloadChoice::LogApp {
                body_size: BODY_BYTES,
                prepopulated_lines: PREPOPULATED_LINES,
            },
        }
    }
}

/// A launched system; dropping it kills every process.
pub struct RunningSystem {
    pub targets: Vec<String>,
    processes: Processes,
}

enum Processes {
    Children(Vec<ChildGuard>),
    Haven(Box<LocalCluster>),
}

impl RunningSystem {
    /// Every process whose CPU time counts toward the system's cost.
    pub fn pids(&self) -> Vec<u32> {
        match &self.processes {
            Processes::Children(children) => children.iter().map(|c| c.0.id()).collect(),
            Processes::Haven(cluster) => cluster.pids(),
        }
    }

    /// Haven's node processes only (no app replicas); empty for other systems.
    pub fn node_pids(&self) -> Vec<u32> {
        match &self.processes {
            Processes::Children(_) => Vec::new(),
            Processes::Haven(cluster) => {
                cluster.slots.iter().filter_map(|s| s.node_pid()).collect()
            }
        }
    }
}

/// Kills its process when dropped, also on panic.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn launch(kind: SystemKind, exe: &Path, dir: &Path) -> anyhow::Result<RunningSystem> {
    let dir = dir.join(kind.label().replace([',', ' '], "-"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    match kind {
        SystemKind::AppAlone => launch_app_alone(exe, &dir).await,
        SystemKind::Haven { nodes } => launch_haven(exe, &dir, nodes, String::new()).await,
        SystemKind::HavenTls { nodes } => {
            let tls = crate::cluster::loopback_tls(&dir.join("certs"), nodes)?;
            launch_haven(exe, &dir, nodes, tls).await
        }
        SystemKind::Etcd => launch_etcd(&dir).await,
    }
}

async fn launch_app_alone(exe: &Path, dir: &Path) -> anyhow::Result<RunningSystem> {
    let addr = free_addr()?;
    let args = [
        "logapp".to_string(),
        "--listen".to_string(),
        addr.to_string(),
        "--file".to_string(),
        dir.join("log.txt").display().to_string(),
        "--prepopulate".to_string(),
        PREPOPULATED_LINES.to_string(),
    ];
    let child = spawn(exe, &args, &[], &dir.join("app.log"))?;
    let url = format!("http://{addr}");
    wait_until_ok(&format!("{url}/count")).await?;
    Ok(RunningSystem {
        targets: vec![url],
        processes: Processes::Children(vec![child]),
    })
}

async fn launch_haven(
    exe: &Path,
    dir: &Path,
    nodes: usize,
    extra_config: String,
) -> anyhow::Result<RunningSystem> {
    let spec = ClusterSpec {
        extra_config,
        ..log_app_cluster(nodes, exe, dir, PREPOPULATED_LINES)
    };
    let cluster = LocalCluster::start(spec)?;
    cluster.wait_for_leader(START_TIMEOUT).await?;
    cluster.wait_all_ready(START_TIMEOUT).await?;
    let targets = cluster.slots.iter().map(|s| s.client_url()).collect();
    Ok(RunningSystem {
        targets,
        processes: Processes::Haven(Box::new(cluster)),
    })
}

/// A log-app cluster in `dir` whose replicas the cluster starts itself, with no extra
/// config: what every bench launches, before any changes of its own.
pub fn log_app_cluster(nodes: usize, exe: &Path, dir: &Path, prepopulate: u64) -> ClusterSpec {
    ClusterSpec {
        site: String::new(),
        nodes,
        exe: exe.to_path_buf(),
        dir: dir.to_path_buf(),
        extra_config: String::new(),
        app: AppKind::LogApp { prepopulate },
        managed: false,
        services: Vec::new(),
    }
}

/// Three etcd members on loopback, driven through etcd's HTTP/JSON gateway.
async fn launch_etcd(dir: &Path) -> anyhow::Result<RunningSystem> {
    let members: Vec<(String, String, String)> = (1..=3)
        .map(|i| {
            Ok((
                format!("m{i}"),
                format!("http://{}", free_addr()?),
                format!("http://{}", free_addr()?),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let initial_cluster = members
        .iter()
        .map(|(name, _, peer)| format!("{name}={peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut children = Vec::new();
    for (name, client, peer) in &members {
        let args = [
            format!("--name={name}"),
            format!("--data-dir={}", dir.join(name).display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={initial_cluster}"),
            "--initial-cluster-state=new".to_string(),
            "--initial-cluster-token=haven-bench".to_string(),
            "--log-level=error".to_string(),
            "--logger=zap".to_string(),
        ];
        let log = dir.join(format!("{name}.log"));
        // Go's counterpart of Haven's worker threads: the members split the cores alike.
        let procs = [("GOMAXPROCS", threads_per_copy(members.len()).to_string())];
        children.push(spawn(Path::new("etcd"), &args, &procs, &log).context(
            "cannot start etcd; install it with `apt-get install etcd-server` or run without --peer etcd",
        )?);
    }
    for (_, client, _) in &members {
        wait_until_ok(&format!("{client}/health")).await?;
    }
    Ok(RunningSystem {
        targets: members.into_iter().map(|(_, client, _)| client).collect(),
        processes: Processes::Children(children),
    })
}

fn spawn(
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &PathBuf,
) -> anyhow::Result<ChildGuard> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(ChildGuard(child))
}

async fn wait_until_ok(url: &str) -> anyhow::Result<()> {
    let http = Http::new(Duration::from_secs(1));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if http.get(url).await.is_ok_and(|r| r.status == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
