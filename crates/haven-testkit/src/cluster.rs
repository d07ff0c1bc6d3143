//! A cluster of real `haven node` processes and app replicas (`haven logapp` or `haven
//! treeapp`) on loopback, in one directory: what the demo and the benchmarks run and what
//! end-to-end tests break. Every process is killed
//! when the cluster is dropped, also on panic.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::net::Ipv4Addr;
use std::net::SocketAddr;
use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use haven_node::admin::Status;

use haven_client::admin::AdminClient;

/// How long a node has to answer an admin request of the harness.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Lines the log app starts with, as in the reference workload.
pub const PREPOPULATED_LINES: u64 = 1000;

/// Runtime worker threads for each of `copies` processes of one kind sharing this machine:
/// its cores split between them, at least one each. A local cluster runs every node (and
/// every replica) on the same cores; with a worker per core in each, 3 nodes on 2 cores
/// spent their time waking each other's threads across cores, and one worker each gave
/// 15% more writes/s and a p99 at 9,000 writes/s of 8 ms instead of 21 to 56 ms
/// (`docs/PERFORMANCE.md`). Nodes on machines of their own keep the default, a worker per
/// core.
pub fn threads_per_copy(copies: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / copies.max(1)).max(1)
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// `[node] site` of every node (empty: none).
    pub site: String,
    pub nodes: usize,
    /// The `haven` executable to launch (the current one for the demo).
    pub exe: PathBuf,
    pub dir: PathBuf,
    /// TOML appended to every node's config (e.g. a `[limits]` table); `{node_id}` in it
    /// becomes each node's id (e.g. its own certificate's file).
    pub extra_config: String,
    pub app: AppKind,
    /// Each node starts and supervises its own replica (`[app] command`) instead of the
    /// cluster starting it.
    pub managed: bool,
    /// Several services on every node (`[[service]]` tables; managed clusters only); empty:
    /// the single-service layout with `app`.
    pub services: Vec<ServiceSpec>,
}

/// One of several services every node of a cluster runs.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub app: AppKind,
    /// The `match` value as TOML (e.g. `{ host = "orders.test" }`); none: the path prefix
    /// `/<name>`.
    pub matcher: Option<String>,
    /// More of the service's tables, after its app (e.g. `[service.limits]` and its keys).
    pub tables: String,
}

impl ServiceSpec {
    /// A service reached by the path prefix `/<name>`.
    pub fn new(name: &str, app: AppKind) -> Self {
        Self {
            name: name.to_string(),
            app,
            matcher: None,
            tables: String::new(),
        }
    }

    /// The name of the replica's file in its directory.
    fn file(&self) -> &str {
        self.app.file()
    }
}

/// Which example app every node replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppKind {
    /// The reference log app, starting with this many 128-byte lines.
    LogApp { prepopulate: u64 },
    /// The ZooKeeper-model tree app.
    TreeApp,
    /// Any program, started by each node (managed clusters only): `argv` takes the node
    /// config's placeholders (`{host}`, `{port}`, `{listen}`, `{data_dir}`), and `file`
    /// names the replica's file in its data directory.
    Command { argv: Vec<String>, file: String },
}

impl AppKind {
    /// The replica's file in its directory, the one replicas are compared by.
    pub fn file(&self) -> &str {
        match self {
            AppKind::Command { file, .. } => file,
            AppKind::LogApp { .. } | AppKind::TreeApp => "log.txt",
        }
    }
}

/// One node's addresses, files and processes.
#[derive(Debug)]
pub struct Slot {
    pub id: u64,
    pub client_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub app_addr: SocketAddr,
    /// Where each service's replica (`ClusterSpec::services`) listens on this node.
    pub service_app_addrs: BTreeMap<String, SocketAddr>,
    pub config_path: PathBuf,
    /// The app replica's directory; the log app keeps `log.txt` in it.
    pub app_dir: PathBuf,
    pub app_file: PathBuf,
    node: Option<Child>,
    app: Option<Child>,
    /// Command prefix that starts this node's processes on its host (empty: here).
    launcher: Vec<String>,
}

impl Slot {
    pub fn client_url(&self) -> String {
        format!("http://{}", self.client_addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    pub fn app_url(&self) -> String {
        format!("http://{}", self.app_addr)
    }

    pub fn node_running(&self) -> bool {
        self.node.is_some()
    }

    pub fn node_pid(&self) -> Option<u32> {
        self.node.as_ref().map(Child::id)
    }

    pub fn app_pid(&self) -> Option<u32> {
        self.app.as_ref().map(Child::id)
    }
}

pub struct LocalCluster {
    pub spec: ClusterSpec,
    pub slots: Vec<Slot>,
}

/// A CA made in `dir` and certificates `node1`..`node<nodes>` for 127.0.0.1, as the
/// `[tls]` table every node's config takes (`{node_id}` picks each node's own files).
pub fn loopback_tls(dir: &Path, nodes: usize) -> anyhow::Result<String> {
    haven_base::certs::init(dir)?;
    for id in 1..=nodes {
        haven_base::certs::issue(dir, &format!("node{id}"), &["127.0.0.1".to_string()])?;
    }
    Ok(format!(
        "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/node{{node_id}}.pem\"\nkey = \"{0}/node{{node_id}}.key\"\n",
        dir.display()
    ))
}

/// Reserves a free loopback port: one that binds now, for a node to bind later.
///
/// Ports come from below the kernel's ephemeral range (32768 and up), so the outgoing
/// connections of a busy machine cannot take one between this check and the node's bind
/// (a port handed out by `bind(0)` could, and a node then failed to start). A port is
/// never handed out twice by one process.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    free_addr_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Ports [`free_addr`] picks from.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A port free on 127.0.0.1, used on `ip`: hosts in their own network namespaces (whose
/// addresses do not bind here) start with every port free, so uniqueness within the
/// cluster is what matters for them.
fn free_addr_on(ip: IpAddr) -> anyhow::Result<SocketAddr> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1_000 {
        let port = rand::random_range(PORTS);
        let here = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        if !handed_out.contains(&port) && TcpListener::bind(here).is_ok() {
            handed_out.push(port);
            return Ok(SocketAddr::new(ip, port));
        }
    }
    bail!("no free port in {PORTS:?}")
}

/// Where one node and its app replica run: the address they listen on and the command
/// prefix that starts a process there (e.g. `ip netns exec hv2`).
#[derive(Debug, Clone)]
pub struct Host {
    pub ip: IpAddr,
    pub launcher: Vec<String>,
}

impl Default for Host {
    /// Here, on 127.0.0.1.
    fn default() -> Self {
        Self {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            launcher: Vec::new(),
        }
    }
}

impl LocalCluster {
    /// Writes configs and starts every app replica and node.
    pub fn start(spec: ClusterSpec) -> anyhow::Result<Self> {
        Self::start_on_hosts(spec, &[])
    }

    /// Like [`LocalCluster::start`], but node `i` and its app replica run on `hosts[i]`
    /// (nodes past the end of `hosts` run here, on 127.0.0.1): what partition tests need,
    /// since a network namespace per node is the only way to cut one node off from another.
    pub fn start_on_hosts(spec: ClusterSpec, hosts: &[Host]) -> anyhow::Result<Self> {
        if !spec.services.is_empty() && !spec.managed {
            bail!("several services run only in a managed cluster (ClusterSpec::managed)");
        }
        let mut cluster = Self {
            spec,
            slots: Vec::new(),
        };
        for i in 0..cluster.spec.nodes {
            let host = hosts.get(i).cloned().unwrap_or_default();
            let slot = cluster.new_slot(i as u64 + 1, host)?;
            cluster.slots.push(slot);
        }
        for i in 0..cluster.slots.len() {
            cluster.write_config(i, false)?;
        }
        for i in 0..cluster.slots.len() {
            cluster.start_app(i)?;
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    fn new_slot(&self, id: u64, host: Host) -> anyhow::Result<Slot> {
        let node_dir = self.spec.dir.join(format!("node{id}"));
        std::fs::create_dir_all(node_dir.join("app"))
            .with_context(|| format!("creating {}", node_dir.display()))?;
        Ok(Slot {
            id,
            client_addr: free_addr_on(host.ip)?,
            raft_addr: free_addr_on(host.ip)?,
            admin_addr: free_addr_on(host.ip)?,
            app_addr: free_addr_on(host.ip)?,
            service_app_addrs: (self.spec.services.iter())
                .map(|s| Ok((s.name.clone(), free_addr_on(host.ip)?)))
                .collect::<anyhow::Result<_>>()?,
            config_path: node_dir.join("haven.toml"),
            app_dir: node_dir.join("app"),
            app_file: node_dir.join("app").join(self.spec.app.file()),
            node: None,
            app: None,
            launcher: host.launcher,
        })
    }

    /// Where node `i` keeps its Haven state (`[node] data_dir`).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.spec
            .dir
            .join(format!("node{}", self.slots[i].id))
            .join("data")
    }

    /// Starts one more node, fresh, configured to join the running cluster (`join =
    /// true`); it becomes a member once the leader adds it. Returns its slot.
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let id = self.slots.iter().map(|s| s.id).max().unwrap_or(0) + 1;
        let slot = self.new_slot(id, Host::default())?;
        self.slots.push(slot);
        let i = self.slots.len() - 1;
        self.write_config(i, true)?;
        self.start_app(i)?;
        self.start_node(i)?;
        Ok(i)
    }

    /// Kills node `i` and its replica, erases their state (a dead machine's disk), and
    /// starts it again, fresh and configured to join: a replacement with the same id.
    pub fn replace_with_fresh(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill_node(i);
        self.kill_app(i);
        for dir in [self.data_dir(i), self.slots[i].app_dir.clone()] {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("erasing {}", dir.display()));
                }
                _ => {}
            }
        }
        std::fs::create_dir_all(&self.slots[i].app_dir)?;
        self.write_config(i, true)?;
        self.start_app(i)?;
        self.start_node(i)
    }

    fn write_config(&self, i: usize, join: bool) -> anyhow::Result<()> {
        let mut config = self.node_config(i);
        if join {
            config = config.replacen("[node]\n", "[node]\njoin = true\n", 1);
        }
        let path = &self.slots[i].config_path;
        std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))
    }

    fn node_config(&self, i: usize) -> String {
        let slot = &self.slots[i];
        let mut toml = format!(
            "[node]\nid = {}\nzone = \"zone-{}\"\nsite = {:?}\nclient_addr = \"{}\"\nraft_addr = \"{}\"\nadmin_addr = \"{}\"\ndata_dir = \"{}\"\n\n",
            slot.id,
            slot.id,
            self.spec.site,
            slot.client_addr,
            slot.raft_addr,
            slot.admin_addr,
            self.data_dir(i).display(),
        );
        if self.spec.services.is_empty() {
            toml.push_str(&self.app_table("[app]", &self.spec.app, slot.app_addr, &slot.app_dir));
        }
        for service in &self.spec.services {
            let addr = &slot.service_app_addrs[&service.name];
            let _ = writeln!(toml, "[[service]]\nname = \"{}\"", service.name);
            if let Some(matcher) = &service.matcher {
                let _ = writeln!(toml, "match = {matcher}");
            }
            let dir = self.service_app_dir(i, &service.name);
            toml.push_str(&self.app_table("[service.app]", &service.app, *addr, &dir));
            toml.push_str(&service.tables);
        }
        for peer in &self.slots {
            let _ = write!(
                toml,
                "[[peers]]\nid = {}\nraft_addr = \"{}\"\nclient_addr = \"{}\"\nzone = \"zone-{}\"\nsite = {:?}\n\n",
                peer.id, peer.raft_addr, peer.client_addr, peer.id, self.spec.site
            );
        }
        toml.push_str(
            &self
                .spec
                .extra_config
                .replace("{node_id}", &slot.id.to_string()),
        );
        toml
    }

    /// The app table (`header`) for a replica of `app` listening on `addr`, keeping its
    /// state in `dir` when the node manages it.
    fn app_table(&self, header: &str, app: &AppKind, addr: SocketAddr, dir: &Path) -> String {
        let mut toml = format!("{header}\nurl = \"http://{addr}\"\n");
        if self.spec.managed {
            let argv: Vec<String> = match app_args(app, addr, Path::new("{data_dir}")) {
                Some(args) => std::iter::once(self.spec.exe.display().to_string())
                    .chain(args)
                    .collect(),
                None => match app {
                    AppKind::Command { argv, .. } => argv.clone(),
                    _ => Vec::new(),
                },
            };
            let argv: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
            let _ = write!(
                toml,
                "command = [{}]\ndata_dir = \"{}\"\nstart_timeout_ms = {}\n",
                argv.join(", "),
                dir.display(),
                app_start_timeout_ms(app)
            );
        }
        toml.push('\n');
        toml
    }

    fn log_file(&self, name: &str) -> anyhow::Result<std::fs::File> {
        let path = self.spec.dir.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))
    }

    fn spawn(&self, launcher: &[String], args: &[String], log_name: &str) -> anyhow::Result<Child> {
        let log = self.log_file(log_name)?;
        let mut command = match launcher.split_first() {
            Some((program, prefix)) => {
                let mut command = Command::new(program);
                command.args(prefix).arg(&self.spec.exe);
                command
            }
            None => Command::new(&self.spec.exe),
        };
        command
            .args(args)
            .arg("--threads")
            .arg(threads_per_copy(self.slots.len()).to_string())
            .env(
                "RUST_LOG",
                std::env::var("HAVEN_CHILD_LOG").unwrap_or_else(|_| "info".to_string()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} {}", self.spec.exe.display(), args.join(" ")))
    }

    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let args = vec![
            "node".to_string(),
            "--config".to_string(),
            self.slots[i].config_path.display().to_string(),
        ];
        let log_name = format!("node{}.log", self.slots[i].id);
        let child = self.spawn(&self.slots[i].launcher, &args, &log_name)?;
        self.slots[i].node = Some(child);
        Ok(())
    }

    /// Starts node `i`'s replica, unless its node manages it.
    pub fn start_app(&mut self, i: usize) -> anyhow::Result<()> {
        if self.spec.managed {
            return Ok(());
        }
        let slot = &self.slots[i];
        let Some(args) = app_args(&self.spec.app, slot.app_addr, &slot.app_dir) else {
            bail!("a command app runs only in a managed cluster (ClusterSpec::managed)");
        };
        let child = self.spawn(&slot.launcher, &args, &format!("app{}.log", slot.id))?;
        self.slots[i].app = Some(child);
        Ok(())
    }

    /// Every running node and app process, for CPU accounting.
    pub fn pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .flat_map(|s| [s.node_pid(), s.app_pid()])
            .flatten()
            .collect()
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill_node(&mut self, i: usize) {
        kill(&mut self.slots[i].node);
    }

    pub fn kill_app(&mut self, i: usize) {
        kill(&mut self.slots[i].app);
    }

    /// Node `i`'s status (of its only service).
    pub async fn status(&self, i: usize) -> anyhow::Result<Status> {
        self.status_of(i, None).await
    }

    /// Node `i`'s status of `service` (its only one when `None`).
    pub async fn status_of(&self, i: usize, service: Option<&str>) -> anyhow::Result<Status> {
        Ok(self.admin(i).service(service).status().await?)
    }

    /// A client of node `i`'s admin API.
    pub fn admin(&self, i: usize) -> AdminClient {
        AdminClient::new(&self.slots[i].admin_url(), ADMIN_TIMEOUT)
    }

    /// The sum of node `i`'s series of metric `name` with these labels (0 when it has none).
    pub async fn metric(
        &self,
        i: usize,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<f64> {
        Ok(self.admin(i).metric(name, labels).await?)
    }

    /// Waits until a running node reports a leader that another running node agrees on.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        self.wait_for_leader_of(None, timeout).await
    }

    /// [`LocalCluster::wait_for_leader`] of `service` (the only one when `None`).
    pub async fn wait_for_leader_of(
        &self,
        service: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.agreed_leader(service).await {
                return Ok(i);
            }
            if Instant::now() > deadline {
                bail!(
                    "no leader within {timeout:?}; logs in {}",
                    self.spec.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node answers and knows the leader.
    pub async fn wait_all_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in (0..self.slots.len()).filter(|i| self.slots[*i].node_running()) {
            loop {
                if self.status(i).await.is_ok_and(|s| s.leader_id.is_some()) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {} not ready within {timeout:?}; logs in {}",
                        self.slots[i].id,
                        self.spec.dir.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    async fn agreed_leader(&self, service: Option<&str>) -> Option<usize> {
        for (i, slot) in self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.node_running())
        {
            let Ok(status) = self.status_of(i, service).await else {
                continue;
            };
            if status.role == "leader" && status.leader_id == Some(slot.id) {
                return Some(i);
            }
        }
        None
    }

    /// Waits until every running node has applied everything the leader committed.
    pub async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<u64> {
        self.wait_converged_of(None, timeout).await
    }

    /// [`LocalCluster::wait_converged`] for `service` (the only one when `None`).
    pub async fn wait_converged_of(
        &self,
        service: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut applied = Vec::new();
            let mut committed = 0;
            for i in (0..self.slots.len()).filter(|i| self.slots[*i].node_running()) {
                if let Ok(status) = self.status_of(i, service).await {
                    committed = committed.max(status.commit_index.unwrap_or(0));
                    applied.push(status.applied_index.unwrap_or(0));
                }
            }
            let running = self.slots.iter().filter(|s| s.node_running()).count();
            if applied.len() == running && applied.iter().all(|a| *a == committed) && committed > 0
            {
                return Ok(committed);
            }
            if Instant::now() > deadline {
                bail!(
                    "replicas did not converge within {timeout:?}: committed {committed}, applied {applied:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn replica_bytes(&self, i: usize) -> anyhow::Result<Vec<u8>> {
        let path = &self.slots[i].app_file;
        std::fs::read(path).with_context(|| format!("reading replica {}", path.display()))
    }

    /// Rewrites every node's config to run `services` (new ones get a port on every node;
    /// every node as first configured, not joining); the nodes take it on a reload
    /// (`haven services reload`, or SIGHUP: [`LocalCluster::hang_up_node`]).
    pub fn set_services(&mut self, services: Vec<ServiceSpec>) -> anyhow::Result<()> {
        for slot in &mut self.slots {
            for service in &services {
                if !slot.service_app_addrs.contains_key(&service.name) {
                    let addr = free_addr_on(slot.client_addr.ip())?;
                    slot.service_app_addrs.insert(service.name.clone(), addr);
                }
            }
        }
        self.spec.services = services;
        for i in 0..self.slots.len() {
            self.write_config(i, false)?;
        }
        Ok(())
    }

    /// Where node `i` keeps `service`'s app data (a managed replica's `data_dir`).
    pub fn service_app_dir(&self, i: usize, service: &str) -> PathBuf {
        self.slots[i].app_dir.join(service)
    }

    /// The bytes of node `i`'s replica of `service` (one of `ClusterSpec::services`).
    pub fn service_replica_bytes(&self, i: usize, service: &str) -> anyhow::Result<Vec<u8>> {
        let Some(spec) = self.spec.services.iter().find(|s| s.name == service) else {
            bail!("the cluster runs no service `{service}`");
        };
        let path = self.service_app_dir(i, service).join(spec.file());
        std::fs::read(&path).with_context(|| format!("reading replica {}", path.display()))
    }

    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }
}

/// The `haven` arguments that run a replica of `app` listening on `listen` with its state
/// in `dir`; `None` for an app that is not one of Haven's own.
fn app_args(app: &AppKind, listen: SocketAddr, dir: &Path) -> Option<Vec<String>> {
    let listen = listen.to_string();
    let args = match app {
        AppKind::LogApp { prepopulate } => vec![
            "logapp".to_string(),
            "--listen".to_string(),
            listen,
            "--file".to_string(),
            dir.join("log.txt").display().to_string(),
            "--prepopulate".to_string(),
            prepopulate.to_string(),
        ],
        AppKind::TreeApp => vec![
            "treeapp".to_string(),
            "--listen".to_string(),
            listen,
            "--dir".to_string(),
            dir.display().to_string(),
        ],
        AppKind::Command { .. } => return None,
    };
    Some(args)
}

/// How long a managed replica has to answer after a start: the node's default, 10 s,
/// or more for a large pre-population (1 GB is 7 million lines, written and synced
/// by every replica at once; measured 12.5 s for three on a busy 2-core machine).
fn app_start_timeout_ms(app: &AppKind) -> u64 {
    match app {
        AppKind::LogApp { prepopulate } => (prepopulate / 100).max(10_000),
        AppKind::TreeApp | AppKind::Command { .. } => 10_000,
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            kill(&mut slot.node);
            kill(&mut slot.app);
        }
    }
}

/// One of the two processes a slot runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Process {
    Node,
    App,
}

impl Process {
    pub fn name(self) -> &'static str {
        match self {
            Process::Node => "node",
            Process::App => "app",
        }
    }
}

/// A process that ended by itself (not through [`LocalCluster::kill_node`] or
/// [`LocalCluster::kill_app`]).
#[derive(Debug)]
pub struct Exited {
    pub slot: usize,
    pub process: Process,
    pub status: std::process::ExitStatus,
}

/// Faults beyond `kill -9`, and noticing processes that died without being killed: what
/// the torture harness needs on top of the demo's kill and restart.
impl LocalCluster {
    /// SIGSTOP: the node freezes as in a long GC pause or a VM freeze. Its sockets stay
    /// open, so peers see silence, not a connection reset.
    pub fn pause_node(&self, i: usize) -> anyhow::Result<()> {
        self.signal_node(i, rustix::process::Signal::STOP)
    }

    /// SIGCONT after [`LocalCluster::pause_node`].
    pub fn resume_node(&self, i: usize) -> anyhow::Result<()> {
        self.signal_node(i, rustix::process::Signal::CONT)
    }

    /// SIGHUP: the node reads its config file again.
    pub fn hang_up_node(&self, i: usize) -> anyhow::Result<()> {
        self.signal_node(i, rustix::process::Signal::HUP)
    }

    /// SIGTERM, as a service manager stops a node (a leader hands leadership over first),
    /// then waits up to `limit` for the process to exit; past it the node is SIGKILLed and
    /// this fails. How the node exited.
    pub async fn stop_node(
        &mut self,
        i: usize,
        limit: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        self.signal_node(i, rustix::process::Signal::TERM)?;
        let deadline = Instant::now() + limit;
        let slot = &mut self.slots[i];
        while let Some(child) = slot.node.as_mut() {
            if let Some(status) = child.try_wait()? {
                slot.node = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                kill(&mut slot.node);
                bail!("node {} did not exit within {limit:?} of SIGTERM", slot.id);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("node {} is not running", slot.id)
    }

    fn signal_node(&self, i: usize, signal: rustix::process::Signal) -> anyhow::Result<()> {
        let slot = &self.slots[i];
        let Some(child) = slot.node.as_ref() else {
            bail!("node {} is not running", slot.id);
        };
        rustix::process::kill_process(rustix::process::Pid::from_child(child), signal)
            .with_context(|| format!("sending {signal:?} to node {}", slot.id))
    }

    /// Every node or app process that has exited since the last call, forgotten as if
    /// killed; a process that died while nobody killed it is a crash.
    pub fn reap_exited(&mut self) -> Vec<Exited> {
        let mut exited = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            for (process, child) in [
                (Process::Node, &mut slot.node),
                (Process::App, &mut slot.app),
            ] {
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    *child = None;
                    exited.push(Exited {
                        slot: i,
                        process,
                        status,
                    });
                }
            }
        }
        exited
    }

    /// Whether the slot's app replica process is up (as far as this cluster knows).
    pub fn app_running(&self, i: usize) -> bool {
        self.slots[i].app.is_some()
    }

    /// Where a process's stdout and stderr go.
    pub fn log_path(&self, i: usize, process: Process) -> PathBuf {
        self.spec
            .dir
            .join(format!("{}{}.log", process.name(), self.slots[i].id))
    }
}
