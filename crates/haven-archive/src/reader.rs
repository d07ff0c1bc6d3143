//! Reading an archive back: entries by index range, checkpoints to local files, and a
//! full verification. Everything read is authenticated before it is used.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;

use futures::StreamExt;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::ArchiveError;
use crate::batch;
use crate::batch::ArchivedEntry;
use crate::catalog::Catalog;
use crate::catalog::CheckpointObject;
use crate::catalog::LogObject;
use crate::catalog::Manifest;
use crate::catalog::checksum;
use crate::seal;
use crate::seal::HEADER_LEN;
use crate::seal::Opener;
use crate::seal::Protection;
use crate::store::Store;

/// A log object's entries, authenticated and decoded.
type LogEntries = Arc<Vec<ArchivedEntry>>;
/// A log object being fetched, by name.
type Fetching = (String, JoinHandle<Result<LogEntries, ArchiveError>>);

pub struct Reader {
    store: Store,
    protection: Protection,
    catalog: Catalog,
    /// The last log object read: a replay asks for its entries in steps smaller than an
    /// object, and must not fetch and decrypt it once per step.
    last_read: Mutex<Option<(String, LogEntries)>>,
    /// The object after the last one read, fetched and decrypted meanwhile: a replay reads
    /// the archive in order, and would otherwise wait for the store once per object while
    /// the app idles.
    ahead: Mutex<Option<Fetching>>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some((_, fetching)) = lock(&self.ahead).take() {
            fetching.abort();
        }
    }
}

/// A poisoned slot still holds a valid value.
fn lock<T>(slot: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

impl Reader {
    pub async fn open(store: Store, protection: Protection) -> Result<Self, ArchiveError> {
        let catalog = Catalog::load(&store, &protection).await?;
        Ok(Self {
            store,
            protection,
            catalog,
            last_read: Mutex::new(None),
            ahead: Mutex::new(None),
        })
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Learns what was written since the catalog was loaded (a standby following the
    /// archive), and forgets what lies at or before `applied`.
    pub async fn refresh(&mut self, applied: u64) -> Result<(), ArchiveError> {
        self.catalog.refresh(&self.store, &self.protection).await?;
        self.catalog.forget_through(applied);
        Ok(())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// One log object's entries, authenticated and checked against its name; the next
    /// object is fetched meanwhile.
    pub async fn read_log(&self, object: &LogObject) -> Result<LogEntries, ArchiveError> {
        if let Some((name, entries)) = lock(&self.last_read).as_ref()
            && *name == object.name
        {
            return Ok(entries.clone());
        }
        let fetched = match lock(&self.ahead).take() {
            Some((name, fetching)) if name == object.name => Some(fetching),
            Some((_, elsewhere)) => {
                elsewhere.abort();
                None
            }
            None => None,
        };
        let entries = match fetched {
            Some(fetching) => fetching.await.map_err(|e| {
                ArchiveError::io(format!("cannot read {}", object.name))(std::io::Error::other(e))
            })??,
            None => fetch_log(self.store.clone(), self.protection.clone(), object.clone()).await?,
        };
        *lock(&self.last_read) = Some((object.name.clone(), entries.clone()));
        self.fetch_ahead(object);
        Ok(entries)
    }

    /// Starts fetching the object holding the entry after `object`, if the catalog has one.
    fn fetch_ahead(&self, object: &LogObject) {
        let next = object.last + 1;
        let Some(following) = self
            .catalog
            .covering(next, next)
            .ok()
            .and_then(|o| o.first().map(|o| (*o).clone()))
        else {
            return;
        };
        let name = following.name.clone();
        let fetching = tokio::spawn(fetch_log(
            self.store.clone(),
            self.protection.clone(),
            following,
        ));
        if let Some((_, replaced)) = lock(&self.ahead).replace((name, fetching)) {
            replaced.abort();
        }
    }

    /// Entries `first..=last`, in order, read object by object.
    pub async fn entries(&self, first: u64, last: u64) -> Result<Vec<ArchivedEntry>, ArchiveError> {
        let mut wanted = Vec::new();
        if first > last {
            return Ok(wanted);
        }
        for object in self.catalog.covering(first, last)? {
            let entries = self.read_log(object).await?;
            wanted.extend(
                entries
                    .iter()
                    .filter(|e| first <= e.index && e.index <= last)
                    .cloned(),
            );
        }
        Ok(wanted)
    }

    /// The last entry at or before `time_us` (reads the one object that straddles it).
    pub async fn index_at_time(&self, time_us: i64) -> Result<Option<(u64, i64)>, ArchiveError> {
        let checkpoint = self
            .catalog
            .checkpoints
            .iter()
            .rev()
            .find(|c| c.time_us <= time_us)
            .map(|c| (c.index, c.time_us));
        let Some(straddling) = self.catalog.object_at_time(time_us) else {
            return Ok(self
                .catalog
                .last_entry()
                .filter(|(_, t)| *t <= time_us)
                .or(checkpoint));
        };
        let before = self
            .catalog
            .log
            .iter()
            .filter(|o| o.last < straddling.first && o.time_us <= time_us)
            .map(|o| (o.last, o.time_us))
            .max();
        let inside = self
            .read_log(straddling)
            .await?
            .iter()
            .filter(|e| e.time_us <= time_us)
            .map(|e| (e.index, e.time_us))
            .max();
        Ok(inside.or(before).or(checkpoint))
    }

    /// Decrypts a checkpoint object into `dest` chunk by chunk (memory stays at a chunk);
    /// returns the size and checksum of the stored bytes, as a manifest records them.
    pub async fn fetch_checkpoint(
        &self,
        object: &CheckpointObject,
        dest: &Path,
    ) -> Result<Stored, ArchiveError> {
        let name = &object.name;
        let mut out = std::fs::File::create(dest).map_err(ArchiveError::io(format!(
            "cannot create {}",
            dest.display()
        )))?;
        let mut stream = self.store.get_stream(name).await?;
        let mut pending: Vec<u8> = Vec::new();
        let mut opener: Option<Opener> = None;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let write_err = || ArchiveError::io(format!("cannot write {}", dest.display()));
        while let Some(bytes) = stream.next().await {
            let bytes = bytes?;
            hasher.update(&bytes);
            size += bytes.len() as u64;
            pending.extend_from_slice(&bytes);
            if opener.is_none() && pending.len() >= HEADER_LEN {
                opener = Some(Opener::new(name, &pending, &self.protection)?);
                pending.drain(..HEADER_LEN);
            }
            let Some(opener) = opener.as_mut() else {
                continue;
            };
            // A full chunk is opened only once more bytes follow: the last one is flagged.
            while pending.len() > opener.sealed_chunk_len() {
                let rest = pending.split_off(opener.sealed_chunk_len());
                let content = opener.open_chunk(&pending, false)?;
                out.write_all(&content).map_err(write_err())?;
                pending = rest;
            }
        }
        let Some(mut opener) = opener else {
            return Err(ArchiveError::damaged(
                name,
                "shorter than its header (truncated)",
            ));
        };
        let content = opener.open_chunk(&pending, true)?;
        out.write_all(&content).map_err(write_err())?;
        out.sync_all().map_err(write_err())?;
        Ok(Stored {
            size,
            blake3: hasher.finalize().to_hex().to_string(),
        })
    }
}

async fn fetch_log(
    store: Store,
    protection: Protection,
    object: LogObject,
) -> Result<LogEntries, ArchiveError> {
    let stored = store.get(&object.name).await?;
    decode_log(&object, &stored, &protection).map(Arc::new)
}

/// A log object's stored bytes, authenticated, decoded and checked against its name.
fn decode_log(
    object: &LogObject,
    stored: &[u8],
    protection: &Protection,
) -> Result<Vec<ArchivedEntry>, ArchiveError> {
    let content = seal::open(&object.name, stored, protection)?;
    batch::decode(&object.name, &content, object.first, object.last)
}

/// An object's stored bytes as a manifest describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub size: u64,
    pub blake3: String,
}

/// What `verify` found: everything read, and every problem by object name.
#[derive(Debug, Default, Serialize)]
pub struct Verification {
    pub objects: u64,
    pub bytes: u64,
    pub entries: u64,
    pub checkpoints: u64,
    pub first_index: Option<u64>,
    pub last_index: Option<u64>,
    pub problems: Vec<String>,
}

impl Verification {
    pub fn sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Reads and authenticates every object, checks each checkpoint's own format (through
/// `check_checkpoint`, which the caller supplies: the checkpoint format lives in another
/// crate), compares objects with the newest manifest of their epoch, and checks that the
/// log runs without a gap from every checkpoint to the end.
pub async fn verify(
    reader: &Reader,
    scratch: &Path,
    check_checkpoint: &dyn Fn(&Path) -> Result<(), String>,
) -> Verification {
    let catalog = reader.catalog();
    let mut found = Verification::default();
    for name in &catalog.unknown {
        found
            .problems
            .push(format!("{name}: not an object Haven writes"));
    }
    let manifested = manifests(reader, &mut found).await;
    // What each object's stored bytes were when read, to compare with the manifests
    // without fetching anything twice.
    let mut read: HashMap<&str, Stored> = HashMap::new();
    for object in &catalog.log {
        found.objects += 1;
        found.bytes += object.size;
        let entries = match reader.store().get(&object.name).await {
            Ok(stored) => {
                read.insert(&object.name, stored_of(&stored));
                decode_log(object, &stored, &reader.protection)
            }
            Err(e) => Err(e),
        };
        match entries {
            Ok(entries) => found.entries += entries.len() as u64,
            Err(e) => found.problems.push(e.to_string()),
        }
    }
    for object in &catalog.checkpoints {
        found.objects += 1;
        found.bytes += object.size;
        found.checkpoints += 1;
        let path = scratch.join("verify-checkpoint");
        let checked = match reader.fetch_checkpoint(object, &path).await {
            Ok(stored) => {
                read.insert(&object.name, stored);
                check_checkpoint(&path).map_err(|e| format!("{}: {e}", object.name))
            }
            Err(e) => Err(e.to_string()),
        };
        let _ = std::fs::remove_file(&path);
        if let Err(problem) = checked {
            found.problems.push(problem);
        }
    }
    for (name, listed) in manifested {
        // An object that could not be read whole is fetched again to say how it differs.
        let actual = match read.get(name.as_str()) {
            Some(stored) => Ok(stored.clone()),
            None => reader.store().get(&name).await.map(|s| stored_of(&s)),
        };
        match actual {
            Ok(actual) if actual == listed => {}
            Ok(_) => found.problems.push(format!(
                "{name}: differs from its manifest (size or checksum)"
            )),
            Err(e) => found.problems.push(format!(
                "{name}: listed in the manifest but unreadable: {e}"
            )),
        }
    }
    continuity(catalog, &mut found);
    found
}

async fn manifests(reader: &Reader, found: &mut Verification) -> Vec<(String, Stored)> {
    let mut listed = Vec::new();
    for name in reader.catalog().manifests.values() {
        match Manifest::read(reader.store(), &reader.protection, name).await {
            Ok(manifest) => listed.extend(manifest.objects.into_iter().map(|o| {
                let stored = Stored {
                    size: o.size,
                    blake3: o.blake3,
                };
                (o.name, stored)
            })),
            Err(e) => found.problems.push(e.to_string()),
        }
    }
    listed
}

fn stored_of(stored: &[u8]) -> Stored {
    Stored {
        size: stored.len() as u64,
        blake3: checksum(stored),
    }
}

fn continuity(catalog: &Catalog, found: &mut Verification) {
    found.first_index = catalog.history_start();
    found.last_index = catalog.last_entry().map(|(index, _)| index);
    let Some(end) = catalog.log.iter().map(|o| o.last).max() else {
        return;
    };
    let starts = catalog
        .checkpoints
        .iter()
        .map(|c| c.index + 1)
        .chain(catalog.history_start());
    for start in starts.filter(|s| *s <= end) {
        if let Err(e) = catalog.covering(start, end) {
            found.problems.push(format!("from index {start}: {e}"));
        }
    }
}
