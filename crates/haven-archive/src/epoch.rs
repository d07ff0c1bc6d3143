//! Who writes an archive. An epoch marker is created once (create-only) and names the
//! cluster that writes under it and the first index it writes; every other object is
//! named by its epoch. A second cluster finds the marker naming another cluster and is
//! refused; a standby promoted at another site (the sites issue) creates the next
//! epoch's marker, and a writer of an older epoch that sees it knows it is fenced.

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

    fn describe(&self) -> String {
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
    let content = seal::open(&name, &stored, protection)?;
    let marker: EpochMarker = serde_json::from_slice(&content)
        .map_err(|e| ArchiveError::damaged(&name, format!("undecodable marker: {e}")))?;
    if marker.version != FORMAT_VERSION {
        return Err(ArchiveError::Version {
            name,
            found: marker.version,
            known: FORMAT_VERSION,
        });
    }
    if marker.epoch != epoch {
        return Err(ArchiveError::damaged(
            &name,
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
                ours: writer.describe(),
            });
        }
        if let Some(marker) = create(store, protection, writer, 1, 0, now_us).await? {
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

/// Creates epoch `epoch`'s marker unless it exists (then `None`: someone else did).
async fn create(
    store: &Store,
    protection: &Protection,
    writer: &Writer,
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
    let name = names::epoch(epoch);
    let content =
        serde_json::to_vec(&marker).map_err(|e| ArchiveError::damaged(&name, e.to_string()))?;
    let created = store
        .create(&name, seal::seal(&name, &content, protection))
        .await?;
    if created != Created::Created {
        return Ok(None);
    }
    tracing::info!(
        url = store.url(),
        epoch,
        start_index,
        owner = marker.owner(),
        "epoch marker created"
    );
    Ok(Some(marker))
}

/// Takes the archive over for `writer` (a standby being promoted): creates the marker of
/// the epoch after `follows` (the epoch the standby followed; `None` when the archive had
/// none), once, starting at `start_index` (the entry after the last one the promoted site
/// applies). The create-only write is the fence: of two promotions of standbys that
/// follow the same epoch, only one creates the marker, and the old primary's next upload
/// meets it.
pub async fn promote(
    store: &Store,
    protection: &Protection,
    writer: &Writer,
    follows: Option<u64>,
    start_index: u64,
    now_us: i64,
) -> Result<EpochMarker, ArchiveError> {
    let next = follows.map_or(1, |e| e + 1);
    match create(store, protection, writer, next, start_index, now_us).await? {
        Some(marker) => Ok(marker),
        None => {
            let winner = read(store, protection, next).await?;
            Err(ArchiveError::Promotion {
                url: store.url().to_string(),
                reason: format!(
                    "epoch {next} was created first by {} (node {}): another promotion won",
                    winner.owner(),
                    winner.node
                ),
            })
        }
    }
}

/// Refuses to go on writing once a newer epoch exists.
pub async fn check_not_fenced(
    store: &Store,
    protection: &Protection,
    ours: u64,
) -> Result<(), ArchiveError> {
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
