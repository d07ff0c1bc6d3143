//! Taking the replica's state out and putting it back, in either mode.
//!
//! Capture is split in two: [`Capture::stage`] runs while the state machine holds its lock
//! (nothing in flight, the app idle) and makes a private raw copy;
//! [`super::Checkpoints::seal`] compresses and checksums that copy afterwards, while
//! entries flow again. Where peers answer this node's clients during a pause, a managed
//! app's directory is sealed in place instead, still paused: a longer pause nobody waits
//! for, and no copy of a large state written to disk (at 1 GB, the copies of three nodes
//! checkpointing in turn kept the disk and both cores of the test machine busy).

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::app::hooks::Hooks;
use crate::app::process::ManagedApp;
use haven_checkpoint::dirtar;
use haven_checkpoint::format;
use haven_checkpoint::format::CaptureMode;
use haven_checkpoint::format::PayloadSource;

/// How long a managed app has to exit on SIGTERM before a restore kills it.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// How this node reaches its replica's state.
pub enum Capture {
    /// The app's snapshot and restore endpoints.
    Hooks(Hooks),
    /// A copy of the data directory of the app Haven runs.
    Managed(Arc<ManagedApp>),
}

/// The replica's state to seal: a raw copy private to one checkpoint, or the managed
/// app's own directory, sealed while deliveries stay paused.
pub struct Staged {
    pub path: PathBuf,
    mode: CaptureMode,
    /// False for the app's own directory, which must outlive the checkpoint.
    copy: bool,
}

impl Staged {
    pub fn source(&self) -> PayloadSource<'_> {
        match self.mode {
            CaptureMode::Hooks => PayloadSource::File(&self.path),
            CaptureMode::Managed => PayloadSource::Directory(&self.path),
        }
    }

    /// Removes a private copy; the app's own directory stays.
    pub fn remove(&self) -> io::Result<()> {
        match self.copy {
            true => dirtar::remove_tree(&self.path),
            false => Ok(()),
        }
    }

    /// Whether this is a private copy, which can be sealed once deliveries resumed.
    pub fn is_copy(&self) -> bool {
        self.copy
    }
}

impl Capture {
    pub fn mode(&self) -> CaptureMode {
        match self {
            Capture::Hooks(_) => CaptureMode::Hooks,
            Capture::Managed(_) => CaptureMode::Managed,
        }
    }

    /// Copies the replica's current state to `dir/.tmp-stage-<index>`. The caller must
    /// hold deliveries back until this returns. With `in_place`, a managed app's
    /// directory is not copied: the caller then holds deliveries back until it is sealed
    /// (longer, but no copy of the whole state is written to disk).
    pub async fn stage(&self, dir: &Path, index: u64, in_place: bool) -> io::Result<Staged> {
        if let (true, Capture::Managed(app)) = (in_place, self) {
            return Ok(Staged {
                path: app.data_dir().to_path_buf(),
                mode: CaptureMode::Managed,
                copy: false,
            });
        }
        let path = dir.join(format!(".tmp-stage-{index}"));
        dirtar::remove_tree(&path)?;
        match self {
            Capture::Hooks(hooks) => {
                let mut file = tokio::fs::File::create(&path).await?;
                hooks
                    .snapshot_to(&mut file)
                    .await
                    .map_err(io::Error::other)?;
                tokio::io::AsyncWriteExt::flush(&mut file).await?;
            }
            Capture::Managed(app) => {
                let src = app.data_dir().to_path_buf();
                let dst = path.clone();
                blocking(move || dirtar::copy_tree(&src, &dst)).await?;
            }
        }
        Ok(Staged {
            path,
            mode: self.mode(),
            copy: true,
        })
    }

    /// Replaces the replica's state with the checkpoint at `checkpoint`, which becomes the
    /// state as of `index`. The checkpoint is verified before anything is replaced; `dir`
    /// holds temporary files.
    pub async fn restore(&self, dir: &Path, checkpoint: &Path, index: u64) -> io::Result<()> {
        match self {
            Capture::Hooks(hooks) => restore_through_hook(hooks, dir, checkpoint, index).await,
            Capture::Managed(app) => {
                let checkpoint = checkpoint.to_path_buf();
                app.with_stopped(STOP_GRACE, move |data_dir| {
                    replace_dir(&checkpoint, data_dir)
                })
                .await
                .map_err(io::Error::other)
            }
        }
    }
}

/// The payload goes to the app from a plain file beside the checkpoint: a verified,
/// decompressed copy, so the app never sees bytes that failed the checksum.
async fn restore_through_hook(
    hooks: &Hooks,
    dir: &Path,
    checkpoint: &Path,
    index: u64,
) -> io::Result<()> {
    let plain = dir.join(format!(".tmp-restore-{index}"));
    let _ = std::fs::remove_file(&plain);
    let (src, dst) = (checkpoint.to_path_buf(), plain.clone());
    blocking(move || {
        format::extract(&src, &dst)
            .map(|_| ())
            .map_err(io::Error::other)
    })
    .await?;
    let file = tokio::fs::File::open(&plain).await?;
    let outcome = hooks.restore_from(index, file).await;
    let _ = std::fs::remove_file(&plain);
    outcome.map_err(io::Error::other)
}

/// Unpacks next to the data directory, then swaps: a crash leaves either the old
/// directory, or none (the app starts empty and Haven installs the checkpoint again).
fn replace_dir(checkpoint: &Path, data_dir: &Path) -> io::Result<()> {
    let unpacked = sibling(data_dir, "haven-restore");
    dirtar::remove_tree(&unpacked)?;
    format::extract(checkpoint, &unpacked).map_err(io::Error::other)?;
    dirtar::remove_tree(data_dir)?;
    std::fs::rename(&unpacked, data_dir)?;
    haven_frame::sync_parent_dir(data_dir)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

/// The nice value of the thread that compresses a checkpoint.
const BACKGROUND_NICE: i32 = 19;

/// Runs CPU-heavy work no client waits for (compressing and checksumming a checkpoint) on
/// a thread of its own at the lowest priority: on a busy machine it takes what request
/// handling leaves instead of competing with it. Its own thread, because an unprivileged
/// process cannot raise a lowered priority again (a pool thread would stay lowered).
pub async fn in_background<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("checkpoint-seal".to_string())
        .spawn(move || {
            // `None`: the calling thread, not the whole process.
            if let Err(e) = rustix::process::setpriority_process(None, BACKGROUND_NICE) {
                tracing::debug!(error = %e, "checkpoint compression runs at normal priority");
            }
            let _ = tx.send(work());
        })?;
    rx.await
        .map_err(|_| io::Error::other("the checkpoint thread ended without a result"))?
}

/// Runs blocking file work off the async threads.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(io::Error::other)?
}
