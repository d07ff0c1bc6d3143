//! A directory of checkpoint files: listing, retention, and picking one to restore.
//!
//! The directory is the catalog: there is no index file to get out of step with it.
//! Files are recognised by their name ([`format::file_name`]); their metadata comes from
//! their trailers only ([`format::read_info`]), so listing stays cheap. Files being
//! written are named `.tmp-*` and ignored; after a crash they are debris, removed by
//! [`remove_debris`].

use std::fs;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use crate::dirtar;
use crate::format;
use crate::format::CheckpointError;
use crate::format::CheckpointInfo;

/// One checkpoint file and what reading its trailer gave.
#[derive(Debug)]
pub struct Listed {
    pub path: PathBuf,
    pub info: Result<CheckpointInfo, CheckpointError>,
}

/// How many checkpoints to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The newest `keep` valid checkpoints are kept (treated as at least 1).
    pub keep: usize,
    /// Checkpoints created longer ago than this are removed, except the newest valid one.
    pub max_age: Option<Duration>,
}

/// Every checkpoint file in `dir` (recognised by name), ascending by index (then term);
/// unreadable ones are listed with their error, including a file whose name disagrees
/// with its trailer. A missing directory is an empty list.
pub fn list(dir: &Path) -> Result<Vec<Listed>, CheckpointError> {
    let mut named = Vec::new();
    for name in file_names(dir).map_err(|source| list_error(dir, source))? {
        if let Some(key) = name.to_str().and_then(format::parse_file_name) {
            named.push((key, dir.join(name)));
        }
    }
    named.sort();
    let listed = named.into_iter().map(|((index, term), path)| Listed {
        info: format::read_info(&path).and_then(|info| check_name(info, index, term)),
        path,
    });
    Ok(listed.collect())
}

fn list_error(dir: &Path, source: io::Error) -> CheckpointError {
    CheckpointError::Io {
        path: dir.to_path_buf(),
        action: "list",
        source,
    }
}

/// The names in `dir`; none when it does not exist.
fn file_names(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        entries => entries?.map(|entry| entry.map(|e| e.file_name())).collect(),
    }
}

/// A file renamed by hand would otherwise be ordered, and restored, by the wrong index.
fn check_name(
    info: CheckpointInfo,
    index: u64,
    term: u64,
) -> Result<CheckpointInfo, CheckpointError> {
    if (info.index, info.term) == (index, term) {
        return Ok(info);
    }
    let reason = format!(
        "file name says index {index} term {term}, trailer says index {} term {}",
        info.index, info.term
    );
    Err(CheckpointError::Corrupt {
        path: info.path,
        reason,
    })
}

/// Deletes every `.tmp-*` entry in `dir`: files (or trees) of writes a crash
/// interrupted. Call once at startup, before any write can be under way. Returns how
/// many were removed; a missing directory is 0.
pub fn remove_debris(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for name in file_names(dir)? {
        if name.to_string_lossy().starts_with(format::TEMP_PREFIX) {
            dirtar::remove_tree(&dir.join(name))?;
            removed += 1;
        }
    }
    if removed > 0 {
        haven_frame::sync_path(dir)?;
    }
    Ok(removed)
}

/// Deletes valid checkpoints beyond the newest `keep` and those created more than
/// `max_age` before `now_us`, but never the newest valid one; deletes corrupt files too,
/// unless there is no valid checkpoint at all (then it deletes nothing: the damaged file
/// may be all there is to salvage). Files that failed to read for I/O reasons (e.g. too
/// many open files) are kept: they may be fine. Returns the paths removed; fsyncs `dir`.
pub fn apply_retention(
    dir: &Path,
    retention: Retention,
    now_us: i64,
) -> Result<Vec<PathBuf>, CheckpointError> {
    let doomed = doomed(&list(dir)?, retention, now_us);
    for path in &doomed {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(CheckpointError::Io {
                    path: path.clone(),
                    action: "delete",
                    source: e,
                });
            }
            _ => {}
        }
    }
    if !doomed.is_empty() {
        haven_frame::sync_path(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            action: "fsync directory",
            source,
        })?;
    }
    Ok(doomed)
}

/// The paths [`apply_retention`] removes, in index order.
fn doomed(listed: &[Listed], retention: Retention, now_us: i64) -> Vec<PathBuf> {
    let valid: Vec<&CheckpointInfo> = listed.iter().filter_map(|l| l.info.as_ref().ok()).collect();
    if valid.is_empty() {
        return Vec::new();
    }
    let keep = retention.keep.max(1);
    let cutoff = retention
        .max_age
        .map(|age| now_us.saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX)));
    let too_old = |info: &CheckpointInfo| cutoff.is_some_and(|cutoff| info.created_us < cutoff);
    let mut doomed: Vec<PathBuf> = valid
        .iter()
        .rev()
        .enumerate()
        .skip(1)
        .filter(|(rank, info)| *rank >= keep || too_old(info))
        .map(|(_, info)| info.path.clone())
        .collect();
    let corrupt = listed
        .iter()
        .filter(|l| matches!(l.info, Err(CheckpointError::Corrupt { .. })));
    doomed.extend(corrupt.map(|l| l.path.clone()));
    doomed.sort();
    doomed
}

/// The newest valid checkpoint (trailer readable) with index <= `index`: where a
/// point-in-time restore starts.
pub fn newest_at_or_before(
    dir: &Path,
    index: u64,
) -> Result<Option<CheckpointInfo>, CheckpointError> {
    let listed = list(dir)?;
    let found = listed
        .into_iter()
        .rev()
        .filter_map(|l| l.info.ok())
        .find(|info| info.index <= index);
    Ok(found)
}

/// The newest valid checkpoint (trailer readable).
pub fn newest(dir: &Path) -> Result<Option<CheckpointInfo>, CheckpointError> {
    newest_at_or_before(dir, u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::flip;
    use crate::testing::tiny;

    const HOUR_US: i64 = 3_600_000_000;
    const NOW: i64 = 1_000 * HOUR_US;

    fn indexes(dir: &Path) -> Vec<u64> {
        list(dir)
            .unwrap()
            .into_iter()
            .filter_map(|l| l.info.ok())
            .map(|info| info.index)
            .collect()
    }

    #[test]
    fn missing_dir_lists_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        assert!(list(&missing).unwrap().is_empty());
        assert_eq!(newest(&missing).unwrap(), None);
        assert_eq!(remove_debris(&missing).unwrap(), 0);
        assert!(
            apply_retention(
                &missing,
                Retention {
                    keep: 1,
                    max_age: None
                },
                NOW
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn lists_2048_checkpoints_in_index_order() {
        let tmp = tempfile::tempdir().unwrap();
        // Written in a scrambled order (1237 is odd, so this visits every index once).
        for i in 0..2048u64 {
            tiny(tmp.path(), (i * 1237) % 2048 + 1, NOW);
        }
        fs::write(tmp.path().join("README"), b"not a checkpoint").unwrap();
        let listed = list(tmp.path()).unwrap();
        assert_eq!(listed.len(), 2048);
        for (i, l) in listed.iter().enumerate() {
            let info = l.info.as_ref().unwrap();
            assert_eq!((info.index, &info.path), (i as u64 + 1, &l.path));
        }
        assert_eq!(newest(tmp.path()).unwrap().unwrap().index, 2048);
    }

    #[test]
    fn retention_keeps_the_newest_three() {
        let tmp = tempfile::tempdir().unwrap();
        let infos: Vec<_> = (1..=8).map(|i| tiny(tmp.path(), i * 10, NOW)).collect();
        let removed = apply_retention(
            tmp.path(),
            Retention {
                keep: 3,
                max_age: None,
            },
            NOW,
        )
        .unwrap();
        assert_eq!(
            removed,
            infos[..5]
                .iter()
                .map(|i| i.path.clone())
                .collect::<Vec<_>>()
        );
        assert_eq!(indexes(tmp.path()), [60, 70, 80]);
        assert!(
            apply_retention(
                tmp.path(),
                Retention {
                    keep: 3,
                    max_age: None
                },
                NOW
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn age_retention_removes_old_checkpoints() {
        let tmp = tempfile::tempdir().unwrap();
        for (index, hours_ago) in [(1, 50), (2, 30), (3, 20), (4, 5), (5, 1)] {
            tiny(tmp.path(), index, NOW - hours_ago * HOUR_US);
        }
        let day = Retention {
            keep: 10,
            max_age: Some(Duration::from_secs(24 * 3600)),
        };
        assert_eq!(apply_retention(tmp.path(), day, NOW).unwrap().len(), 2);
        assert_eq!(indexes(tmp.path()), [3, 4, 5]);
        // Everything is old a week later, but the newest valid checkpoint stays.
        assert_eq!(
            apply_retention(tmp.path(), day, NOW + 7 * 24 * HOUR_US)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(indexes(tmp.path()), [5]);
    }

    #[test]
    fn retention_never_deletes_the_last_valid_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let infos: Vec<_> = (1..=3)
            .map(|i| tiny(tmp.path(), i, NOW - 100 * HOUR_US))
            .collect();
        flip(&infos[2].path, infos[2].size - 20);
        let strict = Retention {
            keep: 1,
            max_age: Some(Duration::ZERO),
        };
        let removed = apply_retention(tmp.path(), strict, NOW).unwrap();
        assert_eq!(
            removed,
            [infos[0].path.clone(), infos[2].path.clone()],
            "the corrupt newest and the oldest"
        );
        assert_eq!(indexes(tmp.path()), [2]);
        assert_eq!(newest(tmp.path()).unwrap().unwrap().index, 2);

        // Nothing valid left: nothing is deleted, not even the corrupt file.
        flip(&infos[1].path, infos[1].size - 20);
        assert!(apply_retention(tmp.path(), strict, NOW).unwrap().is_empty());
        assert!(infos[1].path.exists());
        assert_eq!(newest(tmp.path()).unwrap(), None);
    }

    #[test]
    fn newest_at_or_before_picks_the_point_in_time() {
        let tmp = tempfile::tempdir().unwrap();
        for index in [10, 20, 30] {
            tiny(tmp.path(), index, NOW);
        }
        let at = |index| {
            newest_at_or_before(tmp.path(), index)
                .unwrap()
                .map(|info| info.index)
        };
        assert_eq!(
            (at(5), at(10), at(25), at(1000)),
            (None, Some(10), Some(20), Some(30))
        );
        let info = tiny(tmp.path(), 40, NOW);
        flip(&info.path, info.size - 20);
        assert_eq!(at(1000), Some(30), "a corrupt newer file is skipped");
    }

    #[test]
    fn renamed_file_is_listed_as_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let info = tiny(tmp.path(), 5, NOW);
        let renamed = tmp.path().join(format::file_name(500, 2));
        fs::rename(&info.path, &renamed).unwrap();
        let listed = list(tmp.path()).unwrap();
        let e = listed[0].info.as_ref().unwrap_err();
        let expected = "file name says index 500 term 2, trailer says index 5 term 2";
        assert_eq!(
            e.to_string(),
            format!("corrupt checkpoint {}: {expected}", renamed.display())
        );
    }

    #[test]
    fn debris_is_removed_and_never_listed() {
        let tmp = tempfile::tempdir().unwrap();
        tiny(tmp.path(), 1, NOW);
        fs::write(
            tmp.path().join(".tmp-7-00000000deadbeef"),
            b"half a checkpoint",
        )
        .unwrap();
        fs::create_dir(tmp.path().join(".tmp-adopt-dir")).unwrap();
        assert_eq!(list(tmp.path()).unwrap().len(), 1);
        assert_eq!(remove_debris(tmp.path()).unwrap(), 2);
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from(format::file_name(1, 2))]);
        assert_eq!(remove_debris(tmp.path()).unwrap(), 0);
    }
}
