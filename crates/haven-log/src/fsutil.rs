//! Small file-system helpers: directory fsync and crash-safe metadata files.

use std::fs;
use std::fs::File;
use std::io;
use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::LogError;
use crate::format;
use crate::stats::Counters;

/// `haven_frame::sync_path` of a directory, counted: a freshly created segment or a renamed metadata file
/// can otherwise vanish after a power failure even though its own data was fsynced.
pub(crate) fn sync_dir(dir: &Path, counters: &Counters) -> Result<(), LogError> {
    haven_frame::sync_path(dir).map_err(|e| LogError::io(dir, e))?;
    Counters::add(&counters.fsyncs, 1);
    Ok(())
}

/// Replaces `dir/name` with `bytes` atomically: write `name.tmp`, (fsync), rename, (fsync dir).
///
/// Readers therefore see either the old or the new file, never a mix. With `durable == false`
/// the fsyncs are skipped: the rename is still atomic, but the new value may be lost on a crash.
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    durable: bool,
    counters: &Counters,
) -> Result<(), LogError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| LogError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| LogError::io(&tmp, e))?;
    Counters::add(&counters.bytes_written, bytes.len() as u64);
    if durable {
        f.sync_all().map_err(|e| LogError::io(&tmp, e))?;
        Counters::add(&counters.fsyncs, 1);
    }
    drop(f);
    fs::rename(&tmp, &dst).map_err(|e| LogError::io(&dst, e))?;
    if durable {
        sync_dir(dir, counters)?;
    }
    Ok(())
}

/// Reads and validates `dir/name`; `Ok(None)` if it does not exist.
pub(crate) fn read_meta<T: DeserializeOwned>(
    dir: &Path,
    name: &str,
) -> Result<Option<T>, LogError> {
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(bytes) => format::decode_meta(&bytes, &path).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LogError::io(&path, e)),
    }
}

/// Like [`read_meta`], but a damaged file counts as absent: a zero-length or all-zero file
/// quietly (a crash artifact), any other damage with a warning naming the file and offset.
///
/// Used for `committed`, which is an optimisation only: it is overwritten in place without
/// fsync, and a lower (or no) committed log id is always safe, since openraft learns the
/// commit index again from the leader or by committing a new entry. Refusing to start over
/// it would turn a hint into an outage; the damaged value is never used.
pub(crate) fn read_meta_lenient<T: DeserializeOwned>(
    dir: &Path,
    name: &str,
) -> Result<Option<T>, LogError> {
    let path = dir.join(name);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io(&path, e)),
    };
    if bytes.iter().all(|b| *b == 0) {
        tracing::warn!(file = %path.display(), len = bytes.len(), "ignoring empty metadata file left by a crash");
        return Ok(None);
    }
    match format::decode_meta(&bytes, &path) {
        Ok(value) => Ok(Some(value)),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring damaged metadata file (an optimisation only)");
            Ok(None)
        }
    }
}

/// Removes leftover `*.tmp` files from an interrupted [`write_atomic`].
pub(crate) fn remove_tmp_files(dir: &Path) -> Result<(), LogError> {
    for entry in fs::read_dir(dir).map_err(|e| LogError::io(dir, e))? {
        let path = entry.map_err(|e| LogError::io(dir, e))?.path();
        if path.extension().is_some_and(|ext| ext == "tmp") {
            tracing::warn!(file = %path.display(), "removing leftover temporary file");
            fs::remove_file(&path).map_err(|e| LogError::io(&path, e))?;
        }
    }
    Ok(())
}
