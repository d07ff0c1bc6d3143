//! The demo's last act: a fire at site A. From the start, site B runs a one-node standby
//! of the log service that follows A's off-site archive (the embedded default: a
//! `file://` directory standing in for the object store between the sites, encrypted with
//! a key made for the run). Under a fresh write load every node of site A is killed with
//! SIGKILL and its data deleted; site B is promoted (the same call as `haven site
//! promote`) and takes writes; then what B holds is checked against what A acknowledged.

use std::collections::HashMap;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use haven_archive::key::ArchiveKey;
use haven_client::http::Http;
use haven_testkit::cluster::AppKind;
use haven_testkit::cluster::ClusterSpec;
use haven_testkit::cluster::LocalCluster;
use haven_testkit::cluster::PREPOPULATED_LINES;
use haven_testkit::cluster::ServiceSpec;
use serde::Serialize;

use super::AdminTarget;
use super::demo_load::Tally;
use super::demo_load::Write;
use super::demo_load::client_loop;
use super::promote;

/// The recovery point the site tier promises under `ack = "quorum"` (docs/SITES.md):
/// every append acknowledged longer than this before the fire survives it.
const RPO_TARGET: Duration = Duration::from_secs(1);
/// The write load site A is under when it burns.
const FIRE_CLIENTS: usize = 8;
/// Client numbers of the last act, apart from the earlier acts' (their lines differ).
const FIRST_FIRE_CLIENT: usize = 100;
const LOAD_BEFORE_FIRE: Duration = Duration::from_millis(2500);
/// How long the standby may take to catch up with the archive before the fire.
const CATCH_UP: Duration = Duration::from_secs(60);

/// Where the archive of the demo's log service goes, and its key.
pub struct DemoArchive {
    pub url: String,
    pub key_file: PathBuf,
}

impl DemoArchive {
    /// A key for the run and a directory standing in for the store between the sites.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let key_file = dir.join("archive.key");
        std::fs::write(&key_file, ArchiveKey::generate().to_file_text())?;
        let url = format!("file://{}", dir.join("archive").display());
        Ok(Self { url, key_file })
    }

    /// The primary's log service tables: checkpoints (the archive ships them), the archive.
    pub fn tables(&self) -> String {
        format!(
            "{CHECKPOINTS}[service.archive]\nurl = \"{}\"\nkey_file = \"{}\"\nflush_ms = 100\n",
            self.url,
            self.key_file.display()
        )
    }

    /// The standby's: the same checkpoints, and the archive it follows.
    fn standby_tables(&self) -> String {
        format!(
            "{CHECKPOINTS}[service.standby]\nfrom = \"{}\"\nkey_file = \"{}\"\npoll_ms = 100\n",
            self.url,
            self.key_file.display()
        )
    }

    /// Site B: one node with a standby of the log service, in `dir`.
    /// `extra_config`: more of every node's config (the demo's `[tls]` table).
    pub fn start_standby(
        &self,
        exe: PathBuf,
        dir: &Path,
        service: &str,
        extra_config: &str,
    ) -> anyhow::Result<Site> {
        std::fs::create_dir_all(dir)?;
        let app = AppKind::LogApp {
            prepopulate: PREPOPULATED_LINES,
        };
        let mut standby = ServiceSpec::new(service, app.clone());
        standby.tables = self.standby_tables();
        let spec = ClusterSpec {
            site: "b".to_string(),
            nodes: 1,
            exe,
            dir: dir.to_path_buf(),
            extra_config: extra_config.to_string(),
            app,
            managed: true,
            services: vec![standby],
        };
        Ok(Site {
            cluster: LocalCluster::start(spec)?,
            service: service.to_string(),
        })
    }
}

const CHECKPOINTS: &str =
    "[service.checkpoints]\nmode = \"managed\"\nevery_entries = 500\nevery_seconds = 0\nkeep = 3\n";

/// The standby site.
pub struct Site {
    pub cluster: LocalCluster,
    service: String,
}

#[derive(Debug, Serialize)]
pub struct SiteLoss {
    /// How far site B was behind the archive just before the fire.
    pub standby_lag_entries: u64,
    pub standby_lag_ms: u64,
    /// Appends site A acknowledged in the last act, and how many of them site B lacks
    /// (acknowledged, not yet archived when the site burned: `ack = "quorum"`).
    pub appends_acknowledged: u64,
    pub appends_lost: u64,
    /// How long before the fire the oldest lost append was acknowledged: the recovery
    /// point actually suffered (0 when nothing was lost).
    pub lost_window_ms: u64,
    /// The recovery point the promotion reported: the age of the archive's last entry
    /// when the fence went up.
    pub reported_rpo_ms: u64,
    pub epoch: u64,
    /// From the promote command to site B's leader taking writes, and to its first
    /// acknowledged append (the recovery time).
    pub writable_after_ms: u64,
    pub rto_ms: u64,
    /// Site B's replica begins with site A's as it was before the last act, byte for byte.
    pub history_identical: bool,
    /// No append of site A appears twice at B, and B's first append is there.
    pub acknowledged_once: bool,
    /// Every append A acknowledged more than `RPO_TARGET` before the fire is at B.
    pub within_rpo_target: bool,
}

impl SiteLoss {
    pub fn passed(&self) -> bool {
        self.history_identical && self.acknowledged_once && self.within_rpo_target
    }
}

/// Site A under load burns (every node SIGKILLed, its data deleted); site B is promoted,
/// takes its first write, and is checked against what A acknowledged.
pub async fn lose_the_site(
    site_a: &mut LocalCluster,
    site_b: &Site,
    service: &str,
) -> anyhow::Result<SiteLoss> {
    let before = site_a.service_replica_bytes(0, service)?;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = (site_a.slots.iter())
        .map(|s| format!("{}/{service}", s.client_url()))
        .collect();
    let workers: Vec<_> = (FIRST_FIRE_CLIENT..FIRST_FIRE_CLIENT + FIRE_CLIENTS)
        .map(|c| tokio::spawn(client_loop(c, urls.clone(), tally.clone(), stop.clone())))
        .collect();
    site_b.wait_caught_up().await?;
    tokio::time::sleep(LOAD_BEFORE_FIRE).await;
    let lag = site_b.lag().await?;
    let fire = Instant::now();
    burn(site_a);
    stop.store(true, Ordering::Release);
    let target = AdminTarget {
        admin: site_b.cluster.slots[0].admin_addr.to_string(),
        service: Some(service.to_string()),
    };
    let promoting = Instant::now();
    let promoted = promote::promote(&target)
        .await
        .context("promoting site B")?;
    site_b.first_write().await?;
    let rto_ms = promoting.elapsed().as_millis() as u64;
    for worker in workers {
        worker.await.context("workload task")?;
    }
    let replica = site_b.cluster.service_replica_bytes(0, service)?;
    let mut loss = tally_loss(&tally.acked_at(), &replica, fire);
    loss.standby_lag_entries = lag.0;
    loss.standby_lag_ms = lag.1;
    loss.reported_rpo_ms = promoted.promoted.promotion.last_archived_age_ms;
    loss.epoch = promoted.promoted.promotion.epoch;
    loss.writable_after_ms = promoted.writable_after_ms;
    loss.rto_ms = rto_ms;
    loss.history_identical = replica.starts_with(&before);
    loss.acknowledged_once &= String::from_utf8_lossy(&replica).contains(FIRST_AT_B);
    Ok(loss)
}

/// The fire: every node of the site killed with SIGKILL, then its data deleted.
fn burn(site: &mut LocalCluster) {
    for i in 0..site.slots.len() {
        site.kill_node(i);
    }
    for i in 0..site.slots.len() {
        let _ = std::fs::remove_dir_all(site.data_dir(i));
    }
    tracing::info!("fire at site A: every node killed with SIGKILL, its data deleted");
}

/// What of `acked` (line → acknowledged at) the replica holds, against the fire.
fn tally_loss(acked: &HashMap<String, Instant>, replica: &[u8], fire: Instant) -> SiteLoss {
    let text = String::from_utf8_lossy(replica);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in text.lines().filter(|l| l.starts_with("demo ")) {
        *counts.entry(line).or_default() += 1;
    }
    let lost: Vec<Duration> = (acked.iter())
        .filter(|(line, _)| !counts.contains_key(line.as_str()))
        .map(|(_, at)| fire.saturating_duration_since(*at))
        .collect();
    let lost_window = lost.iter().max().copied().unwrap_or_default();
    SiteLoss {
        standby_lag_entries: 0,
        standby_lag_ms: 0,
        appends_acknowledged: acked.len() as u64,
        appends_lost: lost.len() as u64,
        lost_window_ms: lost_window.as_millis() as u64,
        reported_rpo_ms: 0,
        epoch: 0,
        writable_after_ms: 0,
        rto_ms: 0,
        history_identical: false,
        acknowledged_once: !acked.is_empty() && counts.values().all(|n| *n == 1),
        within_rpo_target: lost_window <= RPO_TARGET,
    }
}

/// The append site B takes first once promoted.
const FIRST_AT_B: &str = "demo: the first append at site B";

impl Site {
    /// Until the standby has applied everything the archive holds.
    async fn wait_caught_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let status = self.cluster.status_of(0, Some(&self.service)).await;
            let site = status.ok().and_then(|s| s.site);
            if let Some(s) = site
                && s.applied_index.is_some()
                && s.applied_index >= s.archive_index
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "site B did not catch up with the archive within {CATCH_UP:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Entries and milliseconds behind the archive.
    async fn lag(&self) -> anyhow::Result<(u64, u64)> {
        let status = self.cluster.status_of(0, Some(&self.service)).await?;
        let site = status.site.context("site B reports no site status")?;
        Ok((site.lag_entries, site.lag_ms))
    }

    /// Site B's first append, retried until acknowledged.
    async fn first_write(&self) -> anyhow::Result<()> {
        let url = format!("{}/{}", self.cluster.slots[0].client_url(), self.service);
        let write = Write {
            method: "POST",
            path: "/append".to_string(),
            body: FIRST_AT_B.to_string(),
            key: "demo-first-at-site-b".to_string(),
        };
        let http = Http::new(Duration::from_secs(5));
        write
            .send_with_retries(&http, &[url], &mut 0)
            .await
            .context("site B acknowledged no append after its promotion")?;
        Ok(())
    }
}
