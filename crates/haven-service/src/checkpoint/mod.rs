//! Checkpoints of this node's replica: the replica's state at one log index, kept as
//! files in `<service dir>/checkpoints/` (the files themselves: `haven_checkpoint`), so
//! the log can be compacted, a lagging or new node can be brought up from a copy instead
//! of all history, and any retained index can be restored.
//!
//! - [`capture`]: getting the state out of the replica and back in (hooks or managed).
//! - [`policy`]: when to checkpoint, and compacting the log behind the oldest checkpoint.

pub mod capture;
pub mod policy;

use std::io;
use std::path::Path;
use std::path::PathBuf;

use tokio::sync::watch;

use capture::Capture;
use capture::Staged;
use capture::blocking;
use futures::FutureExt;
use futures::future::BoxFuture;
use haven_checkpoint::catalog;
use haven_checkpoint::catalog::Retention;
use haven_checkpoint::format;
use haven_checkpoint::format::CheckpointInfo;
use haven_checkpoint::format::CheckpointSpec;
use haven_consensus::snapshot::CheckpointInbox;

/// What the rest of the node needs to know about the catalog, republished after every
/// change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub oldest_index: Option<u64>,
    pub newest_index: Option<u64>,
    pub newest_created_us: Option<i64>,
}

/// The Raft-independent facts a checkpoint records besides the app's state.
pub struct Position {
    pub index: u64,
    pub term: u64,
    pub entry_time_us: i64,
    /// Haven's own replicated state at that index (idempotency table, membership).
    pub haven_state: Vec<u8>,
}

/// This node's checkpoint directory and the way to its replica.
pub struct Checkpoints {
    dir: PathBuf,
    cluster: String,
    capture: Capture,
    retention: Retention,
    summary: watch::Sender<Summary>,
}

impl Checkpoints {
    /// Opens (creating) `dir` and clears debris a crash left behind.
    pub fn open(
        dir: &Path,
        cluster: &str,
        capture: Capture,
        retention: Retention,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let removed = catalog::remove_debris(dir)?;
        if removed > 0 {
            tracing::info!(dir = %dir.display(), removed, "removed unfinished checkpoint files");
        }
        let summary = summarize(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cluster: cluster.to_string(),
            capture,
            retention,
            summary: watch::channel(summary).0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn summary(&self) -> watch::Receiver<Summary> {
        self.summary.subscribe()
    }

    /// The paused part of a checkpoint; see [`capture`].
    pub async fn stage(&self, index: u64, in_place: bool) -> io::Result<Staged> {
        self.capture.stage(&self.dir, index, in_place).await
    }

    /// Compresses and checksums a staged copy into a checkpoint file, then applies the
    /// retention policy.
    pub async fn seal(&self, staged: Staged, position: Position) -> io::Result<CheckpointInfo> {
        let spec = CheckpointSpec {
            cluster: self.cluster.clone(),
            index: position.index,
            term: position.term,
            entry_time_us: position.entry_time_us,
            mode: self.capture.mode(),
            haven_state: position.haven_state,
        };
        let dir = self.dir.clone();
        let info = capture::in_background(move || {
            let written = format::write(&dir, spec, staged.source()).map_err(io::Error::other);
            staged.remove()?;
            written
        })
        .await?;
        tracing::info!(
            index = info.index,
            bytes = info.size,
            app_bytes = info.app_bytes,
            "checkpoint written"
        );
        self.enforce_retention().await?;
        Ok(info)
    }

    async fn enforce_retention(&self) -> io::Result<()> {
        let (dir, retention) = (self.dir.clone(), self.retention);
        let now_us = chrono::Utc::now().timestamp_micros();
        let summary = blocking(move || {
            let removed =
                catalog::apply_retention(&dir, retention, now_us).map_err(io::Error::other)?;
            if !removed.is_empty() {
                tracing::info!(removed = removed.len(), "old checkpoints deleted");
            }
            summarize(&dir)
        })
        .await?;
        self.summary.send_replace(summary);
        Ok(())
    }

    /// The newest checkpoint, by its trailer only.
    pub async fn newest(&self) -> io::Result<Option<CheckpointInfo>> {
        let dir = self.dir.clone();
        blocking(move || catalog::newest(&dir).map_err(io::Error::other)).await
    }

    /// The newest checkpoint whose whole file matches its checksum: what a follower is
    /// sent. A damaged one is skipped with an error naming it (an older one still covers
    /// the log, which is purged only up to the oldest), so the leader neither ships a
    /// file every receiver refuses, over and over, nor stops.
    pub async fn newest_verified(&self) -> io::Result<Option<CheckpointInfo>> {
        let dir = self.dir.clone();
        blocking(move || {
            let listed = catalog::list(&dir).map_err(io::Error::other)?;
            for info in listed.into_iter().rev().filter_map(|l| l.info.ok()) {
                match format::verify(&info.path) {
                    Ok(info) => return Ok(Some(info)),
                    Err(e @ format::CheckpointError::Corrupt { .. }) => {
                        tracing::error!(error = %e, "checkpoint failed verification; not using it");
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
            Ok(None)
        })
        .await
    }

    /// Reads and checks a whole checkpoint file against its checksum.
    pub async fn verify(&self, path: &Path) -> io::Result<CheckpointInfo> {
        let path = path.to_path_buf();
        blocking(move || format::verify(&path).map_err(io::Error::other)).await
    }

    /// Verifies a checkpoint that arrived from the leader and files it under its name. A
    /// file that fails is deleted: the leader sends it again, and every refused copy left
    /// behind would hold the checkpoint's size of disk until the next start.
    pub async fn adopt(&self, received: &Path) -> io::Result<CheckpointInfo> {
        let (dir, received) = (self.dir.clone(), received.to_path_buf());
        let info = blocking(move || {
            format::adopt(&dir, &received).map_err(|e| {
                if let Err(rm) = std::fs::remove_file(&received)
                    && rm.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %received.display(), error = %rm, "cannot delete a refused checkpoint");
                }
                io::Error::other(e)
            })
        })
        .await?;
        self.enforce_retention().await?;
        Ok(info)
    }

    /// Puts the replica's state back to the checkpoint at `path`.
    pub async fn restore(&self, path: &Path, index: u64) -> io::Result<()> {
        self.capture.restore(&self.dir, path, index).await
    }

    /// Where a transfer in progress writes; named as debris until adopted.
    pub fn receiving_path(&self, transfer: u64) -> PathBuf {
        self.dir.join(format!(".tmp-recv-{transfer}"))
    }
}

/// The raft port files the checkpoints a leader sends here.
impl CheckpointInbox for Checkpoints {
    fn receiving_path(&self, transfer: u64) -> PathBuf {
        Checkpoints::receiving_path(self, transfer)
    }

    fn adopt<'a>(&'a self, received: &'a Path) -> BoxFuture<'a, io::Result<CheckpointInfo>> {
        Checkpoints::adopt(self, received).boxed()
    }
}

fn summarize(dir: &Path) -> io::Result<Summary> {
    let listed = catalog::list(dir).map_err(io::Error::other)?;
    let valid: Vec<&CheckpointInfo> = listed.iter().filter_map(|l| l.info.as_ref().ok()).collect();
    Ok(Summary {
        count: valid.len(),
        oldest_index: valid.first().map(|i| i.index),
        newest_index: valid.last().map(|i| i.index),
        newest_created_us: valid.last().map(|i| i.created_us),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::app::hooks::Hooks;

    fn open(dir: &Path) -> Checkpoints {
        let capture = Capture::Hooks(Hooks::new("http://127.0.0.1:9", Duration::from_secs(1)));
        let retention = Retention {
            keep: 10,
            max_age: None,
        };
        Checkpoints::open(dir, "c1", capture, retention).unwrap()
    }

    /// A damaged newest checkpoint is skipped for an older intact one (the log behind it
    /// is still there), never handed to openraft to ship.
    #[tokio::test]
    async fn newest_verified_skips_a_damaged_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let older = haven_checkpoint::testing::tiny(tmp.path(), 10, 1);
        let newer = haven_checkpoint::testing::tiny(tmp.path(), 20, 2);
        let checkpoints = open(tmp.path());
        let newest = checkpoints.newest_verified().await.unwrap().unwrap();
        assert_eq!(newest.index, 20);
        haven_checkpoint::testing::flip(&newer.path, format::MAGIC.len() as u64);
        assert_eq!(checkpoints.newest().await.unwrap().unwrap().index, 20);
        let newest = checkpoints.newest_verified().await.unwrap().unwrap();
        assert_eq!(newest.path, older.path);
        haven_checkpoint::testing::flip(&older.path, format::MAGIC.len() as u64);
        assert!(checkpoints.newest_verified().await.unwrap().is_none());
    }

    /// A received checkpoint that fails verification is refused and deleted, so repeated
    /// transfers of a damaged file cannot fill the disk.
    #[tokio::test]
    async fn a_refused_received_checkpoint_is_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("leader");
        std::fs::create_dir_all(&source).unwrap();
        let sent = haven_checkpoint::testing::tiny(&source, 7, 1);
        let checkpoints = open(&tmp.path().join("follower"));
        let received = checkpoints.receiving_path(1);
        std::fs::copy(&sent.path, &received).unwrap();
        haven_checkpoint::testing::flip(&received, format::MAGIC.len() as u64);
        let err = checkpoints.adopt(&received).await.unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(!received.exists());
        assert!(checkpoints.newest().await.unwrap().is_none());
        std::fs::copy(&sent.path, &received).unwrap();
        assert_eq!(checkpoints.adopt(&received).await.unwrap().index, 7);
    }
}
