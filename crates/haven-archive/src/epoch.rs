//! Who writes an archive. An epoch marker is created once (create-only) and names the
//! cluster that writes under it and the first index it writes; every other object is
//! named by its epoch. A second cluster finds the marker naming another cluster and is
//! refused.
//!
//! A standby promoted at another site takes the archive over in two create-only steps:
//! first the *fence* of the next epoch (whoever creates it wins; from then on the old
//! writer acknowledges nothing more, see [`check_fence`]), then, having read the
//! archive's end, the next epoch's marker starting after it. Because the end is read
//! after the fence, every entry the old writer confirmed unfenced after uploading it is
//! inside the new epoch's history: the promise `ack = "quorum+archive"` rests on.

use serde::Deserialize;
use serde::Serialize;

use crate::ArchiveError;
use crate::FORMAT_VERSION;
use crate::names;
use crate::seal;
use crate::seal::Protection;
use crate::store::Created;
use crate::store::Store;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochMarker {
    pub version: u32,
    pub epoch: u64,
    pub cluster: String,
    /// The site of the cluster that writes under this epoch (empty in markers written
    /// before sites existed).
    #[serde(default)]
    pub site: String,
    pub service: String,
    /// The node that created the marker.
    pub node: u64,
    pub created_us: i64,
    /// The first index written under this epoch (entries before it belong to older ones).
    pub start_index: u64,
}

/// Who is asking to write.
#[derive(Debug, Clone)]
pub struct Writer {
    pub cluster: String,
    pub site: String,
    pub service: String,
    pub node: u64,
}

impl Writer {
    /// The same cluster at the same site, writing the same service: two sites of one
    /// service may share a cluster name, and must still fence each other.
    pub fn owns(&self, marker: &EpochMarker) -> bool {
        (&marker.cluster, &marker.site, &marker.service)
            == (&self.cluster, &self.site, &self.service)
    }

    /// As [`EpochMarker::owner`] says it of this writer's epochs.
    pub fn owner(&self) -> String {
        describe(&self.cluster, &self.site, &self.service)
    }
}

impl EpochMarker {
    /// `cluster/service` and the site when there is one, for messages.
    pub fn owner(&self) -> String {
        describe(&self.cluster, &self.site, &self.service)
    }
}

fn describe(cluster: &str, site: &str, service: &str) -> String {
    match site {
        "" => format!("{cluster}/{service}"),
        site => format!("{cluster}/{service} at site {site}"),
    }
}

pub async fn read(
    store: &Store,
    protection: &Protection,
    epoch: u64,
) -> Result<EpochMarker, ArchiveError> {
    let name = names::epoch(epoch);
    let stored = store.get(&name).await?;
    decode(&name, &stored, protection, epoch)
}

/// The fence of `epoch` (a marker whose start index is not known yet), if a promotion to
/// it began.
pub async fn read_fence(
    store: &Store,
    protection: &Protection,
    epoch: u64,
) -> Result<Option<EpochMarker>, ArchiveError> {
    let name = names::fence(epoch);
    match store.get_if_exists(&name).await? {
        Some(stored) => decode(&name, &stored, protection, epoch).map(Some),
        None => Ok(None),
    }
}

fn decode(
    name: &str,
    stored: &[u8],
    protection: &Protection,
    epoch: u64,
) -> Result<EpochMarker, ArchiveError> {
    let content = seal::open(name, stored, protection)?;
    let marker: EpochMarker = serde_json::from_slice(&content)
        .map_err(|e| ArchiveError::damaged(name, format!("undecodable marker: {e}")))?;
    if marker.version != FORMAT_VERSION {
        return Err(ArchiveError::Version {
            name: name.to_string(),
            found: marker.version,
            known: FORMAT_VERSION,
        });
    }
    if marker.epoch != epoch {
        return Err(ArchiveError::damaged(
            name,
            format!("names epoch {}", marker.epoch),
        ));
    }
    Ok(marker)
}

/// Every epoch number in the archive, oldest first.
pub async fn list(store: &Store) -> Result<Vec<u64>, ArchiveError> {
    let listed = store.list(names::EPOCHS, None).await?;
    Ok(listed
        .iter()
        .filter_map(|l| match names::parse(&l.name) {
            Some(names::Parsed::Epoch(e)) => Some(e),
            _ => None,
        })
        .collect())
}

/// The newest epoch's marker, if the archive has any.
pub async fn newest(
    store: &Store,
    protection: &Protection,
) -> Result<Option<EpochMarker>, ArchiveError> {
    match list(store).await?.last() {
        Some(&epoch) => read(store, protection, epoch).await.map(Some),
        None => Ok(None),
    }
}

/// The epoch this writer writes under: the newest one if its cluster owns it, a first one
/// if the archive is empty. A writer that owned an older epoch is fenced; another
/// cluster's archive is refused.
pub async fn claim(
    store: &Store,
    protection: &Protection,
    writer: &Writer,
    now_us: i64,
) -> Result<EpochMarker, ArchiveError> {
    loop {
        let numbers = list(store).await?;
        if let Some(&newest) = numbers.last() {
            let marker = read(store, protection, newest).await?;
            if writer.owns(&marker) {
                check_fence(store, protection, newest).await?;
                return Ok(marker);
            }
            if let Some(ours) = owned_before(store, protection, writer, &numbers).await? {
                return Err(ArchiveError::Fenced {
                    url: store.url().to_string(),
                    newer: marker.epoch,
                    owner: marker.owner(),
                    ours,
                });
            }
            return Err(ArchiveError::OtherCluster {
                url: store.url().to_string(),
                owner: marker.owner(),
                epoch: marker.epoch,
                ours: writer.owner(),
            });
        }
        let first = names::epoch(1);
        if let Some(marker) = create(store, protection, writer, &first, 1, 0, now_us).await? {
            return Ok(marker);
        }
        // Someone created it first: read whose it is.
    }
}

/// The newest older epoch this writer owned, if any.
async fn owned_before(
    store: &Store,
    protection: &Protection,
    writer: &Writer,
    numbers: &[u64],
) -> Result<Option<u64>, ArchiveError> {
    for &number in numbers.iter().rev().skip(1) {
        if writer.owns(&read(store, protection, number).await?) {
            return Ok(Some(number));
        }
    }
    Ok(None)
}

/// Creates `name`, epoch `epoch`'s marker or fence, unless it exists (then `None`:
/// someone else did).
async fn create(
    store: &Store,
    protection: &Protection,
    writer: &Writer,
    name: &str,
    epoch: u64,
    start_index: u64,
    now_us: i64,
) -> Result<Option<EpochMarker>, ArchiveError> {
    let marker = EpochMarker {
        version: FORMAT_VERSION,
        epoch,
        cluster: writer.cluster.clone(),
        site: writer.site.clone(),
        service: writer.service.clone(),
        node: writer.node,
        created_us: now_us,
        start_index,
    };
    let content =
        serde_json::to_vec(&marker).map_err(|e| ArchiveError::damaged(name, e.to_string()))?;
    let created = store
        .create(name, seal::seal(name, &content, protection))
        .await?;
    if created != Created::Created {
        return Ok(None);
    }
    tracing::info!(
        url = store.url(),
        name,
        start_index,
        owner = marker.owner(),
        "created"
    );
    Ok(Some(marker))
}

/// Begins taking the archive over for `writer` (a standby being promoted): creates the
/// fence of the epoch after `follows` (the epoch the standby followed; `None` when the
/// archive had none), once. Of two promotions of standbys that follow the same epoch, only
/// one creates it; the same writer trying again finds its own. Returns that epoch.
pub async fn fence(
    store: &Store,
    protection: &Protection,
    writer: &Writer,
    follows: Option<u64>,
    now_us: i64,
) -> Result<u64, ArchiveError> {
    let next = follows.map_or(1, |e| e + 1);
    let name = names::fence(next);
    if create(store, protection, writer, &name, next, 0, now_us)
        .await?
        .is_none()
    {
        let fence = read_fence(store, protection, next).await?;
        let winner =
            fence.ok_or_else(|| ArchiveError::damaged(&name, "vanished after its creation"))?;
        if !writer.owns(&winner) {
            return Err(lost(store, &winner));
        }
    }
    Ok(next)
}

/// Completes the take-over behind this writer's fence of `epoch`: creates the epoch's
/// marker starting at `start_index` (the entry after the archive's end as read after the
/// fence). A marker this writer created before (a retried promotion) is returned as it is.
pub async fn promote(
    store: &Store,
    protection: &Protection,
    writer: &Writer,
    epoch: u64,
    start_index: u64,
    now_us: i64,
) -> Result<EpochMarker, ArchiveError> {
    match read_fence(store, protection, epoch).await? {
        Some(fence) if writer.owns(&fence) => {}
        Some(fence) => return Err(lost(store, &fence)),
        None => {
            return Err(ArchiveError::Promotion {
                url: store.url().to_string(),
                reason: format!("epoch {epoch} is not fenced: the fence comes first"),
            });
        }
    }
    let name = names::epoch(epoch);
    if let Some(marker) =
        create(store, protection, writer, &name, epoch, start_index, now_us).await?
    {
        return Ok(marker);
    }
    let marker = read(store, protection, epoch).await?;
    match writer.owns(&marker) {
        true => Ok(marker),
        false => Err(lost(store, &marker)),
    }
}

fn lost(store: &Store, winner: &EpochMarker) -> ArchiveError {
    ArchiveError::Promotion {
        url: store.url().to_string(),
        reason: format!(
            "epoch {} was claimed first by {} (node {}): another promotion won",
            winner.epoch,
            winner.owner(),
            winner.node
        ),
    }
}

/// Refuses once a promotion past `ours` began: one read, cheap enough to run after every
/// upload a write waits for.
pub async fn check_fence(
    store: &Store,
    protection: &Protection,
    ours: u64,
) -> Result<(), ArchiveError> {
    match read_fence(store, protection, ours + 1).await? {
        Some(fence) => Err(ArchiveError::Fenced {
            url: store.url().to_string(),
            newer: fence.epoch,
            owner: fence.owner(),
            ours,
        }),
        None => Ok(()),
    }
}

/// Refuses to go on writing once a newer epoch exists, or its fence.
pub async fn check_not_fenced(
    store: &Store,
    protection: &Protection,
    ours: u64,
) -> Result<(), ArchiveError> {
    check_fence(store, protection, ours).await?;
    let newer = store.list(names::EPOCHS, Some(&names::epoch(ours))).await?;
    let Some(newest) = newer
        .iter()
        .filter_map(|l| match names::parse(&l.name) {
            Some(names::Parsed::Epoch(e)) if e > ours => Some(e),
            _ => None,
        })
        .max()
    else {
        return Ok(());
    };
    let marker = read(store, protection, newest).await?;
    Err(ArchiveError::Fenced {
        url: store.url().to_string(),
        newer: newest,
        owner: marker.owner(),
        ours,
    })
}
