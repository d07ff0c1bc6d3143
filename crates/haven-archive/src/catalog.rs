//! What an archive holds, from its object names and its manifests.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::Serialize;

use crate::ArchiveError;
use crate::FORMAT_VERSION;
use crate::epoch;
use crate::epoch::EpochMarker;
use crate::names;
use crate::names::Parsed;
use crate::seal;
use crate::seal::Protection;
use crate::store::Store;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogObject {
    pub name: String,
    pub epoch: u64,
    pub first: u64,
    pub last: u64,
    /// Entry time of the last entry.
    pub time_us: i64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointObject {
    pub name: String,
    pub epoch: u64,
    pub index: u64,
    pub term: u64,
    pub time_us: i64,
    pub size: u64,
}

/// A manifest: every object of one epoch the writer knew of when it wrote it, with the
/// size and BLAKE3 of the stored bytes. Immutable like everything else: a newer one is
/// written beside it (named by the last index it covers) and older ones are deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub cluster: String,
    pub service: String,
    pub epoch: u64,
    pub last: u64,
    pub objects: Vec<ManifestObject>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestObject {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

impl Manifest {
    pub fn seal(&self, protection: &Protection, written_us: i64) -> (String, Vec<u8>) {
        let name = names::manifest(self.epoch, self.last, written_us);
        let content =
            serde_json::to_vec(self).unwrap_or_else(|e| unreachable!("a manifest to JSON: {e}"));
        let sealed = seal::seal(&name, &content, protection);
        (name, sealed)
    }

    pub async fn read(
        store: &Store,
        protection: &Protection,
        name: &str,
    ) -> Result<Self, ArchiveError> {
        let stored = store.get(name).await?;
        let content = seal::open(name, &stored, protection)?;
        let manifest: Self = serde_json::from_slice(&content)
            .map_err(|e| ArchiveError::damaged(name, format!("undecodable manifest: {e}")))?;
        if manifest.version != FORMAT_VERSION {
            return Err(ArchiveError::Version {
                name: name.to_string(),
                found: manifest.version,
                known: FORMAT_VERSION,
            });
        }
        Ok(manifest)
    }
}

/// The checksum a manifest records for an object's stored bytes.
pub fn checksum(stored: &[u8]) -> String {
    blake3::hash(stored).to_hex().to_string()
}

#[derive(Debug, Clone)]
pub struct Catalog {
    pub url: String,
    pub epochs: Vec<EpochMarker>,
    pub log: Vec<LogObject>,
    pub checkpoints: Vec<CheckpointObject>,
    /// Newest manifest of each epoch, by name.
    pub manifests: BTreeMap<u64, String>,
    /// Names Haven did not write: reported, never used.
    pub unknown: Vec<String>,
}

impl Catalog {
    pub async fn load(store: &Store, protection: &Protection) -> Result<Self, ArchiveError> {
        let mut epochs = Vec::new();
        for number in epoch::list(store).await? {
            epochs.push(epoch::read(store, protection, number).await?);
        }
        let mut catalog = Self {
            url: store.url().to_string(),
            epochs,
            log: Vec::new(),
            checkpoints: Vec::new(),
            manifests: BTreeMap::new(),
            unknown: Vec::new(),
        };
        for dir in [names::LOG, names::CHECKPOINTS, names::MANIFESTS] {
            for listed in store.list(dir, None).await? {
                catalog.add(listed.name, listed.size);
            }
        }
        catalog.settle();
        Ok(catalog)
    }

    /// Adds the log objects and checkpoints written since this catalog was loaded or last
    /// refreshed: a listing of only the names after the newest known ones, so a node
    /// following the archive pays for what is new, not for the whole archive.
    pub async fn refresh(
        &mut self,
        store: &Store,
        protection: &Protection,
    ) -> Result<(), ArchiveError> {
        let known = self.epochs.last().map(|m| m.epoch).unwrap_or(0);
        for number in epoch::list(store).await? {
            if number > known {
                self.epochs
                    .push(epoch::read(store, protection, number).await?);
            }
        }
        let newest_log = self.log.iter().map(|o| o.name.clone()).max();
        let newest_checkpoint = self.checkpoints.iter().map(|c| c.name.clone()).max();
        for (dir, after) in [
            (names::LOG, newest_log),
            (names::CHECKPOINTS, newest_checkpoint),
        ] {
            for listed in store.list(dir, after.as_deref()).await? {
                self.add(listed.name, listed.size);
            }
        }
        self.settle();
        Ok(())
    }

    /// Sorts what was added and drops what a newer epoch cut off: checkpoints an old
    /// writer took beyond the point where the next epoch starts, and log objects that
    /// start there. A log object that straddles the cut is kept and read only up to it.
    fn settle(&mut self) {
        self.epochs.sort_by_key(|m| m.epoch);
        let cuts: Vec<(u64, u64)> = self
            .epochs
            .iter()
            .map(|m| (m.epoch, self.cut(m.epoch)))
            .collect();
        let cut_of = |epoch: u64| {
            cuts.iter()
                .find(|(e, _)| *e == epoch)
                .map_or(u64::MAX, |(_, c)| *c)
        };
        self.checkpoints.retain(|c| c.index <= cut_of(c.epoch));
        self.log.retain(|o| o.first <= cut_of(o.epoch));
        self.log.sort_by_key(|o| (o.first, o.last, o.epoch));
        self.checkpoints.sort_by_key(|c| (c.index, c.epoch));
    }

    /// The last index epoch `epoch` may hold: the entry before the next epoch's start.
    fn cut(&self, epoch: u64) -> u64 {
        self.epochs
            .iter()
            .filter(|m| m.epoch > epoch)
            .map(|m| m.start_index.saturating_sub(1))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The last index of `object` that counts: its own last, or its epoch's cut.
    fn end_of(&self, object: &LogObject) -> u64 {
        object.last.min(self.cut(object.epoch))
    }

    /// The newest epoch's marker, if any.
    pub fn newest_epoch(&self) -> Option<&EpochMarker> {
        self.epochs.last()
    }

    /// Forgets what a reader that has applied everything up to `applied` no longer needs
    /// (log objects that end there, checkpoints older than the newest), keeping the newest
    /// name of each kind for the next [`Self::refresh`].
    pub fn forget_through(&mut self, applied: u64) {
        let newest_log = self.log.iter().map(|o| o.name.clone()).max();
        let newest_checkpoint = self.checkpoints.iter().map(|c| c.name.clone()).max();
        let newest_index = self.checkpoints.iter().map(|c| c.index).max();
        self.log
            .retain(|o| o.last > applied || Some(&o.name) == newest_log.as_ref());
        self.checkpoints.retain(|c| {
            Some(c.index) == newest_index || Some(&c.name) == newest_checkpoint.as_ref()
        });
    }

    /// Forgets what finding the archive's end no longer needs: log objects before the
    /// newest checkpoint and older checkpoints (retention deletes them in the store too),
    /// keeping the newest name of each kind for the next [`Self::refresh`]. A node that
    /// follows the archive for good would otherwise hold every object ever written.
    pub fn forget_before_newest_checkpoint(&mut self) {
        let Some(newest) = self.checkpoints.iter().map(|c| c.index).max() else {
            return;
        };
        let newest_log = self.log.iter().map(|o| o.name.clone()).max();
        let newest_checkpoint = self.checkpoints.iter().map(|c| c.name.clone()).max();
        self.log
            .retain(|o| o.last > newest || Some(&o.name) == newest_log.as_ref());
        self.checkpoints
            .retain(|c| c.index == newest || Some(&c.name) == newest_checkpoint.as_ref());
    }

    fn add(&mut self, name: String, size: u64) {
        match names::parse(&name) {
            Some(Parsed::Log {
                epoch,
                first,
                last,
                time_us,
            }) => self.log.push(LogObject {
                name,
                epoch,
                first,
                last,
                time_us,
                size,
            }),
            Some(Parsed::Checkpoint {
                epoch,
                index,
                term,
                time_us,
            }) => self.checkpoints.push(CheckpointObject {
                name,
                epoch,
                index,
                term,
                time_us,
                size,
            }),
            Some(Parsed::Manifest { epoch, .. }) => {
                let newest = self.manifests.entry(epoch).or_default();
                if name > *newest {
                    *newest = name;
                }
            }
            _ => self.unknown.push(name),
        }
    }

    /// The epoch whose objects hold index `index`: the newest one that started at or before it.
    fn owner(&self, index: u64) -> Option<u64> {
        self.epochs
            .iter()
            .filter(|m| m.start_index <= index)
            .map(|m| m.epoch)
            .max()
    }

    /// The object of the owning epoch that holds `index` and reaches furthest.
    fn holding(&self, index: u64) -> Option<&LogObject> {
        let owner = self.owner(index);
        self.log
            .iter()
            .filter(|o| Some(o.epoch) == owner && o.first <= index && index <= self.end_of(o))
            .max_by_key(|o| self.end_of(o))
    }

    /// The log objects that hold `first..=last`, in order; a gap is an error naming it.
    pub fn covering(&self, first: u64, last: u64) -> Result<Vec<&LogObject>, ArchiveError> {
        let mut chosen = Vec::new();
        let mut next = first;
        while next <= last {
            let Some(object) = self.holding(next) else {
                return Err(ArchiveError::Inconsistent {
                    url: self.url.clone(),
                    reason: format!("entry {next} is in no log object (a gap in the archive)"),
                });
            };
            chosen.push(object);
            next = self.end_of(object) + 1;
        }
        Ok(chosen)
    }

    /// The last index reachable without a gap from `from` (the entry after a checkpoint,
    /// or the first archived entry). Steps from object to object as [`Self::covering`]
    /// does, but in one pass over the objects sorted by first index, keeping per epoch
    /// the furthest end of those that start at or before the next index (the object
    /// [`Self::holding`] picks): a leader asks after every upload, and looking each step
    /// up among thousands of objects made that quadratic (tens of ms on the write path
    /// of `ack = "quorum+archive"`).
    pub fn contiguous_end(&self, from: u64) -> Option<u64> {
        let mut objects: Vec<(u64, u64, u64)> = self
            .log
            .iter()
            .map(|o| (o.first, o.epoch, self.end_of(o)))
            .collect();
        objects.sort_unstable();
        let mut objects = objects.into_iter().peekable();
        let mut furthest: BTreeMap<u64, u64> = BTreeMap::new();
        let mut end = None;
        let mut next = from;
        loop {
            while let Some((_, epoch, last)) = objects.next_if(|(first, ..)| *first <= next) {
                let reach = furthest.entry(epoch).or_insert(last);
                *reach = (*reach).max(last);
            }
            let owner = self.owner(next);
            match owner.and_then(|epoch| furthest.get(&epoch)) {
                Some(&last) if last >= next => {
                    end = Some(last);
                    next = last + 1;
                }
                _ => return end,
            }
        }
    }

    /// Where history starts: just after the oldest checkpoint, or at the first entry.
    pub fn history_start(&self) -> Option<u64> {
        let after_checkpoint = self.checkpoints.first().map(|c| c.index + 1);
        after_checkpoint.or_else(|| self.log.first().map(|o| o.first))
    }

    /// The last archived index (and its entry time) that a restore of the newest state
    /// reaches: the end of the log that runs without a gap from the newest checkpoint (or
    /// from the first entry when there is none).
    pub fn last_entry(&self) -> Option<(u64, i64)> {
        let newest = self.checkpoints.last();
        let start = match newest {
            Some(c) => c.index + 1,
            None => self.log.first()?.first,
        };
        self.reach_from(start)
            .or_else(|| newest.map(|c| (c.index, c.time_us)))
    }

    /// The last index reachable without a gap from `from`, and its entry time: where a
    /// reader that applied everything before `from` can go (a follower whose catalog
    /// forgot what it applied).
    pub fn reach_from(&self, from: u64) -> Option<(u64, i64)> {
        let end = self.contiguous_end(from)?;
        let time = self
            .log
            .iter()
            .filter(|o| self.end_of(o) == end)
            .map(|o| o.time_us)
            .max()
            .unwrap_or(0);
        Some((end, time))
    }

    /// The last entry at or before `time_us`, from the names alone; exact within the
    /// object that straddles the time only after reading it (see the reader).
    pub fn object_at_time(&self, time_us: i64) -> Option<&LogObject> {
        self.log.iter().find(|o| o.time_us > time_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(epoch: u64, start_index: u64) -> EpochMarker {
        EpochMarker {
            version: FORMAT_VERSION,
            epoch,
            cluster: "a".to_string(),
            site: String::new(),
            service: "orders".to_string(),
            node: 1,
            created_us: 0,
            start_index,
        }
    }

    fn catalog_of(epochs: Vec<EpochMarker>, objects: &[(u64, u64, u64)]) -> Catalog {
        let mut catalog = Catalog {
            url: "file:///archive".to_string(),
            epochs,
            log: Vec::new(),
            checkpoints: Vec::new(),
            manifests: BTreeMap::new(),
            unknown: Vec::new(),
        };
        for &(epoch, first, last) in objects {
            catalog.add(names::log(epoch, first, last, last as i64), 1);
        }
        catalog.settle();
        catalog
    }

    #[test]
    fn the_contiguous_end_follows_overlaps_and_epoch_cuts_and_stops_at_a_gap() {
        // Epoch 1 wrote 1..=40 (two leaders overlapping at 21..=30, an object beyond the
        // cut at 35); epoch 2 starts at 31; then a gap after 60.
        let objects = [
            (1, 1, 10),
            (1, 11, 30),
            (1, 21, 40),
            (2, 31, 50),
            (2, 41, 60),
            (2, 71, 80),
        ];
        let catalog = catalog_of(vec![marker(1, 1), marker(2, 31)], &objects);
        assert_eq!(catalog.contiguous_end(1), Some(60));
        assert_eq!(catalog.contiguous_end(25), Some(60));
        assert_eq!(catalog.contiguous_end(61), None);
        assert_eq!(catalog.contiguous_end(71), Some(80));
        let covering: Vec<&str> = catalog
            .covering(1, 60)
            .unwrap()
            .iter()
            .map(|o| o.name.as_str())
            .collect();
        assert_eq!(covering.len(), 4, "{covering:?}");
        // Without epoch 2's objects the history ends where epoch 1 was cut.
        let cut = catalog_of(vec![marker(1, 1), marker(2, 31)], &objects[..3]);
        assert_eq!(cut.contiguous_end(1), Some(30));
        assert_eq!(cut.last_entry(), Some((30, 40)));
    }
}
