//! The demo's last act: the whole site is lost (every node killed with SIGKILL), and the
//! log service's state is rebuilt from the off-site archive alone (the embedded default:
//! a `file://` directory beside the cluster, encrypted with a key made for the run).

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use anyhow::bail;
use haven_archive::key::ArchiveKey;
use haven_archive::reader::Reader;
use haven_archive::seal::Protection;
use haven_archive::store::Store;
use haven_archive::store::StoreSettings;
use haven_base::config::Config;
use haven_service::restore;
use haven_service::restore::AppSettings;
use haven_service::restore::ArchiveRestore;
use haven_service::restore::Progress;
use haven_service::restore::RestoreOptions;
use haven_service::restore::Target;
use haven_testkit::cluster::LocalCluster;
use serde::Serialize;

const CATCH_UP: Duration = Duration::from_secs(30);

/// Where the archive of the demo's log service goes, and its key.
pub struct DemoArchive {
    pub url: String,
    pub key_file: PathBuf,
}

impl DemoArchive {
    /// A key for the run and a directory standing in for the other site.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let key_file = dir.join("archive.key");
        std::fs::write(&key_file, ArchiveKey::generate().to_file_text())?;
        let url = format!("file://{}", dir.join("site-b-archive").display());
        Ok(Self { url, key_file })
    }

    /// The log service's tables: checkpoints (the archive ships them) and the archive.
    pub fn tables(&self) -> String {
        format!(
            "[service.checkpoints]\nmode = \"managed\"\nevery_entries = 500\nevery_seconds = 0\nkeep = 3\n\
             [service.archive]\nurl = \"{}\"\nkey_file = \"{}\"\nflush_ms = 100\n",
            self.url,
            self.key_file.display()
        )
    }
}

#[derive(Debug, Serialize)]
pub struct SiteLoss {
    /// The archive's last index when the site was lost.
    pub archived_index: u64,
    /// What was committed then: equal, once the archive caught up.
    pub committed_index: u64,
    pub restore_ms: u64,
    pub entries_replayed: u64,
    pub checkpoint_index: Option<u64>,
    /// The state rebuilt from the archive alone equals the replicas' byte for byte.
    pub restored_identical: bool,
}

struct Quiet;

impl Progress for Quiet {
    fn start(&self, _total: u64) {}
    fn advance(&self, _done: u64) {}
}

/// Waits for the archive to hold everything, kills every node, and restores the service
/// from the archive into a fresh replica beside the dead cluster.
pub async fn lose_the_site(
    cluster: &mut LocalCluster,
    archive: &DemoArchive,
    service: &str,
    replica: &[u8],
    file: &str,
) -> anyhow::Result<SiteLoss> {
    let (archived_index, committed_index) = wait_archived(cluster, service).await?;
    for i in 0..cluster.slots.len() {
        cluster.kill_node(i);
    }
    tracing::info!("the whole site is lost: every node killed with SIGKILL");
    let settings = settings_of(&cluster.dir().join("node1").join("haven.toml"), service)?;
    haven_archive::store::install_crypto_provider();
    let store = Store::open(&StoreSettings {
        url: archive.url.clone(),
        endpoint: None,
    })?;
    let protection = Protection::Encrypted(ArchiveKey::load(&archive.key_file)?);
    let reader = Reader::open(store, protection).await?;
    let out = cluster.dir().join("restored-at-site-b");
    let options = RestoreOptions {
        data_dir: PathBuf::new(),
        target: Target::Latest,
        out: out.clone(),
        from_scratch: false,
        app_url: None,
        check: None,
    };
    let started = Instant::now();
    let report = restore::run_from_archive(ArchiveRestore { reader, settings }, options, &Quiet)
        .await
        .context("restoring from the archive")?;
    let restore_ms = started.elapsed().as_millis() as u64;
    let restored = std::fs::read(out.join(file)).context("reading the restored replica")?;
    Ok(SiteLoss {
        archived_index,
        committed_index,
        restore_ms,
        entries_replayed: report.entries_replayed,
        checkpoint_index: report.checkpoint_index,
        restored_identical: restored == replica,
    })
}

fn settings_of(config: &Path, service: &str) -> anyhow::Result<AppSettings> {
    let config = Config::load(config)?;
    let found = config.services.iter().find(|s| s.name == service);
    Ok(AppSettings::from_config(
        found.context("the demo's log service")?,
    ))
}

/// The leader's archive index once it equals its applied index, and that index.
async fn wait_archived(cluster: &LocalCluster, service: &str) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let leader = cluster.wait_for_leader_of(Some(service), CATCH_UP).await?;
        let status = cluster.status_of(leader, Some(service)).await?;
        let archived = status.archive.as_ref().and_then(|a| a.archived_index);
        if let (Some(archived), Some(applied)) = (archived, status.applied_index)
            && archived == applied
        {
            return Ok((archived, status.commit_index.unwrap_or(applied)));
        }
        if Instant::now() > deadline {
            bail!("the archive did not catch up within {CATCH_UP:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
