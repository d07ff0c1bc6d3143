//! The archive's one writer per service (the Raft leader's uploader drives it): log
//! objects in index order with nothing missing and nothing twice, checkpoints streamed
//! up, manifests, retention, and the fence check.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use tokio::io::AsyncReadExt;

use crate::ArchiveError;
use crate::FORMAT_VERSION;
use crate::batch;
use crate::batch::ArchivedEntry;
use crate::catalog::Catalog;
use crate::catalog::Manifest;
use crate::catalog::ManifestObject;
use crate::catalog::checksum;
use crate::epoch;
use crate::epoch::EpochMarker;
use crate::names;
use crate::seal;
use crate::seal::CHUNK_LEN;
use crate::seal::Protection;
use crate::seal::Sealer;
use crate::store::Created;
use crate::store::Store;

/// A new manifest after this many new objects (and after every checkpoint).
const MANIFEST_EVERY: usize = 64;
/// Manifests kept per epoch: the newest, and one before it in case the newest is damaged.
const MANIFESTS_KEPT: usize = 2;
/// How often the writer looks for a newer epoch (a promotion elsewhere): the longest a
/// fenced primary with an archive it can reach goes on acknowledging writes.
const FENCE_CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct ArchiveWriter {
    store: Store,
    protection: Protection,
    marker: EpochMarker,
    catalog: Catalog,
    /// Every object of this epoch the archive holds, for the next manifest.
    objects: Vec<ManifestObject>,
    since_manifest: usize,
    last_fence_check: Instant,
}

/// What one shipment put in the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shipped {
    pub objects: u64,
    pub bytes: u64,
}

impl ArchiveWriter {
    /// Claims (or resumes) this cluster's epoch and learns what the archive already holds.
    pub async fn open(
        store: Store,
        protection: Protection,
        writer: &epoch::Writer,
        now_us: i64,
    ) -> Result<Self, ArchiveError> {
        let marker = epoch::claim(&store, &protection, writer, now_us).await?;
        let catalog = Catalog::load(&store, &protection).await?;
        let objects = known_objects(&store, &protection, &catalog, marker.epoch).await?;
        Ok(Self {
            store,
            protection,
            marker,
            catalog,
            objects,
            since_manifest: 0,
            last_fence_check: Instant::now(),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.marker.epoch
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The last index the archive holds without a gap, and its entry time.
    pub fn archived(&self) -> Option<(u64, i64)> {
        self.catalog.last_entry()
    }

    /// Indexes of the checkpoints the archive holds.
    pub fn checkpoints(&self) -> Vec<u64> {
        self.catalog.checkpoints.iter().map(|c| c.index).collect()
    }

    /// Ships entries that continue the archive; those it already holds are skipped. A gap
    /// (entries that start after the archive's end) is refused: the caller must send from
    /// the archive's end.
    pub async fn ship_entries(
        &mut self,
        entries: &[ArchivedEntry],
    ) -> Result<Shipped, ArchiveError> {
        self.check_fence().await?;
        let next = self.archived().map(|(last, _)| last + 1);
        let fresh: Vec<ArchivedEntry> = entries
            .iter()
            .filter(|e| next.is_none_or(|n| e.index >= n))
            .cloned()
            .collect();
        let (Some(first), Some(last)) = (fresh.first(), fresh.last()) else {
            return Ok(Shipped::default());
        };
        if let Some(next) = next.filter(|n| first.index != *n) {
            return Err(ArchiveError::Inconsistent {
                url: self.store.url().to_string(),
                reason: format!(
                    "entries from {} would leave a gap after {}",
                    first.index,
                    next - 1
                ),
            });
        }
        let name = names::log(self.marker.epoch, first.index, last.index, last.time_us);
        let stored = seal::seal(&name, &batch::encode(&fresh), &self.protection);
        let size = stored.len() as u64;
        let sum = checksum(&stored);
        let created = self.store.create(&name, stored).await?;
        if created == Created::Exists {
            tracing::info!(
                name,
                "log object already archived (by another leader of this cluster)"
            );
        }
        self.record(&name, size, sum);
        self.catalog.log.push(crate::catalog::LogObject {
            name,
            epoch: self.marker.epoch,
            first: first.index,
            last: last.index,
            time_us: last.time_us,
            size,
        });
        if self.since_manifest >= MANIFEST_EVERY {
            self.write_manifest().await?;
        }
        Ok(Shipped {
            objects: 1,
            bytes: size,
        })
    }

    /// Streams a local checkpoint file up, encrypted chunk by chunk.
    pub async fn ship_checkpoint(
        &mut self,
        path: &Path,
        index: u64,
        term: u64,
        time_us: i64,
    ) -> Result<Shipped, ArchiveError> {
        self.check_fence().await?;
        let name = names::checkpoint(self.marker.epoch, index, term, time_us);
        let read_err = || ArchiveError::io(format!("cannot read checkpoint {}", path.display()));
        let mut file = tokio::fs::File::open(path).await.map_err(read_err())?;
        let mut sealer = Sealer::new(&name, &self.protection);
        let mut upload = self.store.upload(&name).await?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut put = async |bytes: &[u8], hasher: &mut blake3::Hasher| {
            hasher.update(bytes);
            size += bytes.len() as u64;
            upload.write(bytes).await
        };
        put(&sealer.header().clone(), &mut hasher).await?;
        let mut chunk = read_chunk(&mut file).await.map_err(read_err())?;
        loop {
            let next = read_chunk(&mut file).await.map_err(read_err())?;
            let last = next.is_empty();
            put(&sealer.seal_chunk(&chunk, last), &mut hasher).await?;
            if last {
                break;
            }
            chunk = next;
        }
        upload.finish().await?;
        self.record(&name, size, hasher.finalize().to_hex().to_string());
        self.catalog
            .checkpoints
            .push(crate::catalog::CheckpointObject {
                name,
                epoch: self.marker.epoch,
                index,
                term,
                time_us,
                size,
            });
        self.catalog.checkpoints.sort_by_key(|c| (c.index, c.epoch));
        self.write_manifest().await?;
        Ok(Shipped {
            objects: 1,
            bytes: size,
        })
    }

    fn record(&mut self, name: &str, size: u64, blake3: String) {
        self.objects.retain(|o| o.name != name);
        self.objects.push(ManifestObject {
            name: name.to_string(),
            size,
            blake3,
        });
        self.since_manifest += 1;
    }

    /// Writes a manifest of every object of this epoch, then deletes older manifests.
    pub async fn write_manifest(&mut self) -> Result<(), ArchiveError> {
        let last = self.archived().map_or(0, |(last, _)| last);
        let manifest = Manifest {
            version: FORMAT_VERSION,
            cluster: self.marker.cluster.clone(),
            service: self.marker.service.clone(),
            epoch: self.marker.epoch,
            last,
            objects: self.objects.clone(),
        };
        let (name, sealed) = manifest.seal(&self.protection, now_us());
        self.store.create(&name, sealed).await?;
        self.since_manifest = 0;
        let listed = self
            .store
            .list(&names::manifest_dir(self.marker.epoch), None)
            .await?;
        let older = listed.len().saturating_sub(MANIFESTS_KEPT);
        for old in listed.iter().take(older) {
            self.store.delete(&old.name).await?;
        }
        self.catalog.manifests.insert(self.marker.epoch, name);
        Ok(())
    }

    /// Keeps the newest `keep` archived checkpoints (and, with `keep_days`, only those
    /// younger than that by entry time; the newest always stays), and the log from the
    /// oldest kept one on. Returns how many objects were deleted.
    pub async fn apply_retention(
        &mut self,
        keep: usize,
        keep_days: Option<u64>,
    ) -> Result<u64, ArchiveError> {
        assert!(keep >= 1, "archive retention must keep a checkpoint");
        let count = self.catalog.checkpoints.len();
        let now_us = now_us();
        let too_old = |time_us: i64| {
            keep_days.is_some_and(|days| now_us - time_us > days as i64 * 86_400_000_000)
        };
        let doomed: HashSet<String> = self
            .catalog
            .checkpoints
            .iter()
            .enumerate()
            .filter(|(i, c)| *i + 1 < count && (*i + keep < count || too_old(c.time_us)))
            .map(|(_, c)| c.name.clone())
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        self.catalog
            .checkpoints
            .retain(|c| !doomed.contains(&c.name));
        let oldest_kept = self.catalog.checkpoints[0].index;
        let old_log = self
            .catalog
            .log
            .iter()
            .filter(|o| o.last <= oldest_kept)
            .map(|o| o.name.clone());
        let names: HashSet<String> = doomed.iter().cloned().chain(old_log).collect();
        // The manifest stops naming them before they go, so a verify never misses them.
        self.objects.retain(|o| !names.contains(&o.name));
        self.catalog.log.retain(|o| !names.contains(&o.name));
        self.write_manifest().await?;
        for name in &names {
            self.store.delete(name).await?;
        }
        tracing::info!(
            deleted = names.len(),
            oldest_kept,
            "archive retention applied"
        );
        Ok(names.len() as u64)
    }

    /// Fails with [`ArchiveError::Fenced`] once a promotion past this writer's epoch
    /// began: one read, after every upload that writes wait for.
    pub async fn confirm_unfenced(&self) -> Result<(), ArchiveError> {
        epoch::check_fence(&self.store, &self.protection, self.marker.epoch).await
    }

    /// Fails with [`ArchiveError::Fenced`] once a newer epoch exists (looked up at most
    /// every [`FENCE_CHECK_EVERY`]).
    pub async fn check_fence(&mut self) -> Result<(), ArchiveError> {
        if self.last_fence_check.elapsed() < FENCE_CHECK_EVERY {
            return Ok(());
        }
        epoch::check_not_fenced(&self.store, &self.protection, self.marker.epoch).await?;
        self.last_fence_check = Instant::now();
        Ok(())
    }
}

fn now_us() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_micros() as i64)
}

/// Up to [`CHUNK_LEN`] bytes; empty at the end of the file.
async fn read_chunk(file: &mut tokio::fs::File) -> std::io::Result<Vec<u8>> {
    let mut chunk = Vec::with_capacity(CHUNK_LEN);
    while chunk.len() < CHUNK_LEN {
        let read = (&mut *file)
            .take((CHUNK_LEN - chunk.len()) as u64)
            .read_to_end(&mut chunk)
            .await?;
        if read == 0 {
            break;
        }
    }
    Ok(chunk)
}

/// The objects of `epoch` with their sizes and checksums: from its newest manifest, and
/// by reading those written after it.
async fn known_objects(
    store: &Store,
    protection: &Protection,
    catalog: &Catalog,
    epoch: u64,
) -> Result<Vec<ManifestObject>, ArchiveError> {
    let mut known = match catalog.manifests.get(&epoch) {
        Some(name) => Manifest::read(store, protection, name).await?.objects,
        None => Vec::new(),
    };
    let names = catalog
        .log
        .iter()
        .filter(|o| o.epoch == epoch)
        .map(|o| &o.name)
        .chain(
            catalog
                .checkpoints
                .iter()
                .filter(|c| c.epoch == epoch)
                .map(|c| &c.name),
        );
    let present: HashSet<&String> = names.collect();
    known.retain(|o| present.contains(&o.name));
    let manifested: HashSet<String> = known.iter().map(|o| o.name.clone()).collect();
    for name in present {
        if !manifested.contains(name) {
            let stored = store.get(name).await?;
            known.push(ManifestObject {
                name: name.clone(),
                size: stored.len() as u64,
                blake3: checksum(&stored),
            });
        }
    }
    Ok(known)
}
