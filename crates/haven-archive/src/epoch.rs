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
    pub service: String,
    pub node: u64,
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
/// if the archive is empty. Another cluster's archive is refused.
pub async fn claim(
    store: &Store,
    protection: &Protection,
    writer: &Writer,
    now_us: i64,
) -> Result<EpochMarker, ArchiveError> {
    loop {
        if let Some(marker) = newest(store, protection).await? {
            if marker.cluster != writer.cluster || marker.service != writer.service {
                return Err(ArchiveError::OtherCluster {
                    url: store.url().to_string(),
                    owner: format!("{}/{}", marker.cluster, marker.service),
                    epoch: marker.epoch,
                    ours: format!("{}/{}", writer.cluster, writer.service),
                });
            }
            return Ok(marker);
        }
        let marker = EpochMarker {
            version: FORMAT_VERSION,
            epoch: 1,
            cluster: writer.cluster.clone(),
            service: writer.service.clone(),
            node: writer.node,
            created_us: now_us,
            start_index: 0,
        };
        let name = names::epoch(1);
        let content =
            serde_json::to_vec(&marker).map_err(|e| ArchiveError::damaged(&name, e.to_string()))?;
        if store
            .create(&name, seal::seal(&name, &content, protection))
            .await?
            == Created::Created
        {
            tracing::info!(
                url = store.url(),
                epoch = 1,
                "archive claimed: first epoch marker created"
            );
            return Ok(marker);
        }
        // Someone created it first: read whose it is.
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
        owner: marker.cluster,
        ours,
    })
}
