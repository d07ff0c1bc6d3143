//! The checkpoint hooks: `GET /_haven/snapshot` streams the data directory's
//! `tree.snapshot` and `journal` in one self-validating blob, `PUT
//! /_haven/restore` validates such a blob completely and swaps it in. The
//! crate docs ("Checkpoint hooks") give the format and the guarantees.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use haven_snapshot_frame::{self as frame, Files, Part, Receiver, Source, Staged, Streamer};
use tracing::info;

use crate::{JOURNAL_FILE, Loaded, SNAPSHOT_FILE, TreeApp, TreeAppError, Writer, io_err, task_err};

/// First 8 bytes of every tree app snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"HAVENTRE";

/// Version of the snapshot format this app writes and reads.
pub const SNAPSHOT_VERSION: u32 = frame::VERSION;

/// Length of the snapshot header: magic, version, two lengths, header CRC.
pub const SNAPSHOT_HEADER_LEN: u64 = frame::HEADER_LEN;

/// Name of the marker, in the data directory, whose existence says a
/// restore's temporary files are complete and must be renamed into place. It
/// holds `1` if the restored state has a `tree.snapshot` file, `0` if not.
pub const RESTORE_MARKER_FILE: &str = "restore.ready";

/// Where the marker is written before it is renamed into place, so that it
/// never exists with a partial content.
const RESTORE_MARKER_TMP_FILE: &str = "restore.ready.tmp";

/// Where a restore writes the restored `tree.snapshot` before renaming it.
pub const SNAPSHOT_RESTORE_FILE: &str = "tree.snapshot.restore.tmp";

/// Where a restore writes the restored journal before renaming it.
pub const JOURNAL_RESTORE_FILE: &str = "journal.restore.tmp";

/// Why a restore body is not a valid snapshot; the `400` body is
/// `invalid snapshot: {this}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Invalid {
    /// Framing and checksums.
    #[error(transparent)]
    Frame(#[from] frame::Invalid),
    /// A file that does not load; names the file (`tree.snapshot` or
    /// `journal`), the offset and the reason, as start-up would.
    #[error("{file} at byte offset {offset}: {reason}")]
    Corrupt {
        file: &'static str,
        offset: u64,
        reason: String,
    },
    #[error("the journal ends with a torn record")]
    Torn,
    #[error("it records Haven-Index {recorded}, above the restore's Haven-Index {restore}")]
    AheadOfRestore { recorded: u64, restore: u64 },
}

/// Why a restore failed.
pub(crate) type RestoreError = frame::RestoreError<Invalid, TreeAppError>;

/// The data directory's two files, in frame order, as a restore stages them.
/// `tree.snapshot` is optional: a snapshot of a state without one has `S = 0`.
pub(crate) fn restore_files(dir: &Path) -> Files {
    Files {
        dir: dir.to_path_buf(),
        parts: [
            Part::optional(dir.join(SNAPSHOT_FILE), dir.join(SNAPSHOT_RESTORE_FILE)),
            Part::required(dir.join(JOURNAL_FILE), dir.join(JOURNAL_RESTORE_FILE)),
        ],
        marker: dir.join(RESTORE_MARKER_FILE),
        marker_tmp: dir.join(RESTORE_MARKER_TMP_FILE),
    }
}

/// A checked snapshot: its files staged, its state loaded from them.
struct Checked {
    staged: Staged,
    loaded: Loaded,
}

/// Loads the staged files; whatever start-up would refuse or repair is an
/// invalid snapshot.
fn load_staged(staged: &Staged, restore: u64) -> Result<Loaded, RestoreError> {
    let [snapshot, journal] = staged.files().parts.each_ref().map(|part| &part.tmp);
    let loaded = crate::load(snapshot, journal).map_err(|e| match e {
        TreeAppError::Corrupt {
            path,
            offset,
            reason,
        } => {
            let file = if path == *snapshot {
                SNAPSHOT_FILE
            } else {
                JOURNAL_FILE
            };
            RestoreError::Invalid(Invalid::Corrupt {
                file,
                offset,
                reason,
            })
        }
        other => RestoreError::App(other),
    })?;
    if loaded.len != staged.header().second_len {
        return Err(RestoreError::Invalid(Invalid::Torn));
    }
    let recorded = loaded.state.applied();
    if recorded > restore {
        return Err(RestoreError::Invalid(Invalid::AheadOfRestore {
            recorded,
            restore,
        }));
    }
    Ok(loaded)
}

impl TreeApp {
    /// Restores the state from a snapshot body (see the crate docs): stages,
    /// checks and loads it without blocking writes, then swaps it in under the
    /// writer lock. Both blocking halves run to completion even if the request
    /// is dropped.
    pub(crate) async fn restore(
        self: &Arc<Self>,
        index: u64,
        body: Body,
    ) -> Result<(), RestoreError> {
        let restoring = Arc::clone(&self.restoring).lock_owned().await;
        if self.writer.lock().await.failed {
            // A failed install may have left a committed marker behind: only
            // a restart may finish it.
            return Err(RestoreError::App(TreeAppError::Failed {
                path: self.journal_path.clone(),
            }));
        }
        let files = restore_files(&self.dir);
        let checked = frame::receive(body, task_err(&self.dir), move |chunks| {
            let receiver = Receiver::create(SNAPSHOT_MAGIC, files, (), restoring)?;
            // Synced first, then loaded exactly as start-up would.
            let staged = receiver.read(chunks)?.sync()?;
            let loaded = load_staged(&staged, index)?;
            Ok(Checked { staged, loaded })
        })
        .await?;
        let writer = Arc::clone(&self.writer).lock_owned().await;
        let app = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            app.install(&mut writer, checked)
        })
        .await
        .map_err(task_err(&self.journal_path))
        .and_then(|installed| installed)
        .map_err(RestoreError::App)
    }

    /// Swaps the checked files and state in (blocking, under the writer lock).
    /// The loaded journal handle was opened on the temporary file, whose
    /// inode the rename keeps. Failing after the commit leaves the app
    /// refusing writes until a restart finishes the restore.
    fn install(&self, writer: &mut Writer, checked: Checked) -> Result<(), TreeAppError> {
        let Checked {
            mut staged,
            mut loaded,
        } = checked;
        if let Err(e) = staged.swap_in() {
            writer.failed |= staged.committed();
            return Err(e.into());
        }
        // The files in place are the snapshot's; the state in memory is not yet.
        if let Err(e) = loaded.upgrade(&self.dir) {
            writer.failed = true;
            return Err(e);
        }
        let (state, restored) = loaded.into_writer();
        info!(
            dir = %self.dir.display(),
            haven_index = state.applied(),
            journal_bytes = restored.len,
            "state restored from a snapshot"
        );
        *self.write_state() = state;
        *writer = restored;
        Ok(())
    }

    /// Fixes what a snapshot streams, under the writer lock so that it holds
    /// exactly the writes answered so far: handles on `tree.snapshot` (if any)
    /// and the journal, and their lengths. Later writes only append to the
    /// journal, and compaction and restores rename new files in, so these
    /// handles keep their bytes without blocking writers while streaming.
    pub(crate) async fn snapshot_stream(self: &Arc<Self>) -> Result<(u64, Body), TreeAppError> {
        let writer = Arc::clone(&self.writer).lock_owned().await;
        let app = Arc::clone(self);
        let streamer = tokio::task::spawn_blocking(move || app.streamer(&writer))
            .await
            .map_err(task_err(&self.dir))??;
        Ok((streamer.total_len(), streamer.into_body()))
    }

    fn streamer(&self, writer: &Writer) -> Result<Streamer, TreeAppError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let snapshot = match File::open(&path) {
            Ok(file) => {
                let len = file
                    .metadata()
                    .map_err(io_err(&path, "stat the snapshot"))?
                    .len();
                Some(Source {
                    file: Arc::new(file),
                    len,
                    path,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path, "open the snapshot")(e)),
        };
        let journal = writer.journal.try_clone().map_err(io_err(
            &self.journal_path,
            "open the journal for a snapshot",
        ))?;
        let journal = Source {
            file: Arc::new(journal),
            len: writer.len,
            path: self.journal_path.clone(),
        };
        Ok(Streamer::new(SNAPSHOT_MAGIC, [snapshot, Some(journal)]))
    }
}
