//! The archive's one writer per service (the Raft leader's uploader drives it): log
//! objects in index order with nothing missing and nothing twice, checkpoints streamed
//! up, manifests, retention, and the fence check.
//!
//! Uploads run as tasks of their own, several log objects at once (at most
//! [`MAX_UPLOADS_IN_FLIGHT`]) and a checkpoint beside them, so the next batch of entries
//! does not wait for the previous one's fence read nor for a checkpoint of many
//! megabytes. Log objects' PUTs still run one after the other, so they appear in the
//! store in name order, as readers that list only what follows what they know require.
//! The writer takes them back one at a time in index order
//! ([`ArchiveWriter::finish_upload`]): its catalog, its manifests and whatever the caller
//! releases only ever count a prefix of the log without a gap.

use std::collections::HashSet;
use std::collections::VecDeque;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ArchiveError;
use crate::FORMAT_VERSION;
use crate::batch;
use crate::batch::ArchivedEntry;
use crate::catalog::Catalog;
use crate::catalog::CheckpointObject;
use crate::catalog::LogObject;
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
/// Log objects uploading at once, at most. Under `ack = "quorum+archive"` a write waits
/// for its object's PUT and a read of the next epoch's fence after it; with one upload at
/// a time, whatever was applied meanwhile also waited for the whole round in progress.
/// Four keep a loaded leader's batches moving without multiplying the store's requests
/// past what a small store answers (`docs/PERFORMANCE.md`, sites).
pub const MAX_UPLOADS_IN_FLIGHT: usize = 4;

pub struct ArchiveWriter {
    store: Store,
    protection: Protection,
    marker: EpochMarker,
    catalog: Catalog,
    /// Every object of this epoch the archive holds, for the next manifest.
    objects: Vec<ManifestObject>,
    since_manifest: usize,
    last_fence_check: Instant,
    /// Log objects on their way to the store, oldest first; each continues the previous.
    uploads: VecDeque<InFlight<LogObject>>,
    /// Turns true when the newest upload's PUT is done (closed unset if it failed): the
    /// next one's PUT waits for it, so log objects appear in the store in name order and
    /// a reader that lists only the names after the newest it knows misses none (the
    /// fence reads still overlap).
    previous_stored: Option<watch::Receiver<bool>>,
    checkpoint: Option<InFlight<CheckpointObject>>,
}

/// An object being stored by a task of its own (aborted when the writer goes: a
/// create-only object either exists whole or not at all), and what the catalog will
/// record of it once it is.
struct InFlight<T> {
    object: T,
    task: JoinHandle<Result<Stored, ArchiveError>>,
}

impl<T> Drop for InFlight<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What an upload task reports: the stored bytes' size and checksum.
struct Stored {
    size: u64,
    blake3: String,
}

type Joined = Result<Result<Stored, ArchiveError>, tokio::task::JoinError>;

/// An upload taken back by [`ArchiveWriter::finish_next`].
#[derive(Debug)]
pub enum Finished {
    Log(Result<Shipped, ArchiveError>),
    Checkpoint(Result<Shipped, ArchiveError>),
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
            uploads: VecDeque::new(),
            previous_stored: None,
            checkpoint: None,
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

    /// The last index the archive holds or an upload in flight will, and its entry time:
    /// the next upload starts after it.
    pub fn upload_tail(&self) -> Option<(u64, i64)> {
        let in_flight = self
            .uploads
            .back()
            .map(|u| (u.object.last, u.object.time_us));
        in_flight.or_else(|| self.archived())
    }

    /// Log objects in flight.
    pub fn uploads_in_flight(&self) -> usize {
        self.uploads.len()
    }

    /// Whether another log object may start uploading ([`MAX_UPLOADS_IN_FLIGHT`]).
    pub fn has_room(&self) -> bool {
        self.uploads.len() < MAX_UPLOADS_IN_FLIGHT
    }

    /// The newest upload's PUT while it is not done (a receiver that turns true when it
    /// is). An object started now would wait for it before its own PUT, so a caller that
    /// waits too and only then starts the object puts in it everything applied meanwhile:
    /// under load, fewer and larger objects, for no later PUT.
    pub fn put_pending(&self) -> Option<watch::Receiver<bool>> {
        let pending = self.previous_stored.as_ref()?;
        let failed = pending.has_changed().is_err();
        (!*pending.borrow() && !failed).then(|| pending.clone())
    }

    /// Ships entries that continue the archive; those it already holds are skipped. A gap
    /// (entries that start after the archive's end) is refused: the caller must send from
    /// the archive's end. Waits for every upload in flight.
    pub async fn ship_entries(
        &mut self,
        entries: &[ArchivedEntry],
    ) -> Result<Shipped, ArchiveError> {
        self.check_fence().await?;
        let mut shipped = self.finish_uploads().await?;
        self.start_upload(entries, false)?;
        shipped.add(self.finish_uploads().await?);
        self.write_manifest_if_due().await?;
        Ok(shipped)
    }

    /// Waits for every log object in flight, in order.
    pub async fn finish_uploads(&mut self) -> Result<Shipped, ArchiveError> {
        let mut shipped = Shipped::default();
        while let Some(done) = self.finish_upload().await {
            shipped.add(done?);
        }
        Ok(shipped)
    }

    /// Starts storing the entries that continue [`Self::upload_tail`] as one object (those
    /// before it are skipped; a gap after it is refused). With `confirm`, the upload then
    /// reads the next epoch's fence and fails if a promotion began: that read starts only
    /// once the object is stored, so an upload that succeeds holds an object every later
    /// promotion finds. Returns whether there was anything to store.
    pub fn start_upload(
        &mut self,
        entries: &[ArchivedEntry],
        confirm: bool,
    ) -> Result<bool, ArchiveError> {
        assert!(
            self.has_room(),
            "more than {MAX_UPLOADS_IN_FLIGHT} uploads in flight"
        );
        let next = self.upload_tail().map(|(last, _)| last + 1);
        let fresh: Vec<ArchivedEntry> = entries
            .iter()
            .filter(|e| next.is_none_or(|n| e.index >= n))
            .cloned()
            .collect();
        let (Some(first), Some(last)) = (fresh.first(), fresh.last()) else {
            return Ok(false);
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
        let object = LogObject {
            name: name.clone(),
            epoch: self.marker.epoch,
            first: first.index,
            last: last.index,
            time_us: last.time_us,
            size: stored.len() as u64,
        };
        let (store, protection, epoch) = (
            self.store.clone(),
            self.protection.clone(),
            self.marker.epoch,
        );
        let after = self.previous_stored.take();
        let (stored_tx, stored_rx) = watch::channel(false);
        self.previous_stored = Some(stored_rx);
        let url = store.url().to_string();
        let task = tokio::spawn(async move {
            let size = stored.len() as u64;
            let blake3 = checksum(&stored);
            if let Some(mut after) = after
                && after.wait_for(|stored| *stored).await.is_err()
            {
                return Err(ArchiveError::Inconsistent {
                    url,
                    reason: format!("{name} not stored: the object before it failed"),
                });
            }
            let created = store.create(&name, stored).await?;
            // Only now may the next object's PUT begin.
            let _ = stored_tx.send(true);
            if created == Created::Exists {
                tracing::info!(
                    name,
                    "log object already archived (by another leader of this cluster)"
                );
            }
            if confirm {
                epoch::check_fence(&store, &protection, epoch).await?;
            }
            Ok(Stored { size, blake3 })
        });
        self.uploads.push_back(InFlight { object, task });
        Ok(true)
    }

    /// Waits for the oldest log object in flight and records it: objects are taken back
    /// in index order, whatever order their uploads end in. `None` when none is in
    /// flight. Cancel-safe: dropped while waiting, the upload stays in flight.
    pub async fn finish_upload(&mut self) -> Option<Result<Shipped, ArchiveError>> {
        let joined = joined(Some(self.uploads.front_mut()?)).await;
        Some(self.took_upload(joined))
    }

    /// Waits for whichever ends first, the oldest log object in flight or the checkpoint,
    /// and records it (a checkpoint's manifest is written by the next
    /// [`Self::write_manifest_if_due`]). `None` when nothing is in flight. Cancel-safe
    /// like [`Self::finish_upload`].
    pub async fn finish_next(&mut self) -> Option<Finished> {
        if self.uploads.is_empty() && self.checkpoint.is_none() {
            return None;
        }
        let log_first = {
            let log = joined(self.uploads.front_mut());
            let checkpoint = joined(self.checkpoint.as_mut());
            tokio::select! {
                joined = log => Ok(joined),
                joined = checkpoint => Err(joined),
            }
        };
        Some(match log_first {
            Ok(joined) => Finished::Log(self.took_upload(joined)),
            Err(joined) => Finished::Checkpoint(self.took_checkpoint(joined)),
        })
    }

    /// Records the oldest upload, which ended as `joined`. A failed upload drops every
    /// later one too (some of them may be stored; a reader takes any object that covers
    /// the next index, so shipping their entries again is harmless).
    fn took_upload(&mut self, joined: Joined) -> Result<Shipped, ArchiveError> {
        let Some(head) = self.uploads.pop_front() else {
            unreachable!("an upload ended, so one was in flight")
        };
        let stored = stored(&head.object.name, joined).inspect_err(|_| {
            self.uploads.clear();
            self.previous_stored = None;
        })?;
        self.record(&head.object.name, stored.size, stored.blake3);
        self.catalog.log.push(head.object.clone());
        Ok(Shipped {
            objects: 1,
            bytes: stored.size,
        })
    }

    /// Streams a local checkpoint file up, encrypted chunk by chunk, and waits for it.
    pub async fn ship_checkpoint(
        &mut self,
        path: &Path,
        index: u64,
        term: u64,
        time_us: i64,
    ) -> Result<Shipped, ArchiveError> {
        self.check_fence().await?;
        if let Some(earlier) = self.finish_checkpoint().await {
            earlier?;
        }
        self.start_checkpoint(path, index, term, time_us);
        match self.finish_checkpoint().await {
            Some(done) => done,
            None => unreachable!("a checkpoint upload was just started"),
        }
    }

    /// Whether a checkpoint is uploading.
    pub fn checkpoint_in_flight(&self) -> bool {
        self.checkpoint.is_some()
    }

    /// Starts streaming a local checkpoint file up, beside the log uploads; one at a time
    /// (a second call while one is in flight replaces nothing and is ignored).
    pub fn start_checkpoint(&mut self, path: &Path, index: u64, term: u64, time_us: i64) {
        if self.checkpoint.is_some() {
            return;
        }
        let name = names::checkpoint(self.marker.epoch, index, term, time_us);
        let upload = stream_checkpoint(
            self.store.clone(),
            self.protection.clone(),
            name.clone(),
            path.to_path_buf(),
        );
        self.checkpoint = Some(InFlight {
            object: CheckpointObject {
                name,
                epoch: self.marker.epoch,
                index,
                term,
                time_us,
                size: 0,
            },
            task: tokio::spawn(upload),
        });
    }

    /// Waits for the checkpoint in flight, then records it and writes a manifest naming
    /// it. `None` when none is in flight.
    pub async fn finish_checkpoint(&mut self) -> Option<Result<Shipped, ArchiveError>> {
        let joined = joined(Some(self.checkpoint.as_mut()?)).await;
        let shipped = self.took_checkpoint(joined);
        Some(match self.write_manifest_if_due().await {
            Ok(()) => shipped,
            Err(e) => Err(e),
        })
    }

    /// Records the checkpoint upload, which ended as `joined`; the next
    /// [`Self::write_manifest_if_due`] writes a manifest naming it.
    fn took_checkpoint(&mut self, joined: Joined) -> Result<Shipped, ArchiveError> {
        let Some(done) = self.checkpoint.take() else {
            unreachable!("a checkpoint upload ended, so one was in flight")
        };
        let stored = stored(&done.object.name, joined)?;
        let object = CheckpointObject {
            size: stored.size,
            ..done.object.clone()
        };
        self.record(&object.name, stored.size, stored.blake3);
        self.catalog.checkpoints.push(object);
        self.catalog.checkpoints.sort_by_key(|c| (c.index, c.epoch));
        self.since_manifest = self.since_manifest.max(MANIFEST_EVERY);
        Ok(Shipped {
            objects: 1,
            bytes: stored.size,
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

    /// Writes a manifest when [`MANIFEST_EVERY`] objects were stored since the last one, or
    /// a checkpoint.
    pub async fn write_manifest_if_due(&mut self) -> Result<(), ArchiveError> {
        match self.since_manifest >= MANIFEST_EVERY {
            true => self.write_manifest().await,
            false => Ok(()),
        }
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

impl Shipped {
    pub fn add(&mut self, other: Shipped) {
        self.objects += other.objects;
        self.bytes += other.bytes;
    }
}

/// The end of `in_flight`'s task; never, when there is none.
async fn joined<T>(in_flight: Option<&mut InFlight<T>>) -> Joined {
    match in_flight {
        Some(in_flight) => (&mut in_flight.task).await,
        None => std::future::pending().await,
    }
}

/// An upload task's outcome; a task that panicked or was aborted is an I/O error naming
/// the object.
fn stored(name: &str, joined: Joined) -> Result<Stored, ArchiveError> {
    joined.map_err(|e| {
        ArchiveError::io(format!("the upload of {name} stopped"))(std::io::Error::other(e))
    })?
}

/// Streams the checkpoint file at `path` up as `name`, encrypted chunk by chunk.
async fn stream_checkpoint(
    store: Store,
    protection: Protection,
    name: String,
    path: PathBuf,
) -> Result<Stored, ArchiveError> {
    let read_err = || ArchiveError::io(format!("cannot read checkpoint {}", path.display()));
    let mut file = tokio::fs::File::open(&path).await.map_err(read_err())?;
    let mut sealer = Sealer::new(&name, &protection);
    let mut upload = store.upload(&name).await?;
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
    Ok(Stored {
        size,
        blake3: hasher.finalize().to_hex().to_string(),
    })
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
