//! The checkpoint hooks: `GET /_haven/snapshot` streams the log file and its
//! sidecar in one self-validating blob, `PUT /_haven/restore` validates such a
//! blob completely and swaps it in. The crate docs ("Checkpoint hooks") give
//! the format and the guarantees; this module implements them.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use haven_snapshot_frame::{
    self as frame, Files, Header, Inspect, Part, Receiver, Source, Staged, Streamer,
};
use tracing::info;

use crate::{
    BadHavenIndex, ENTRY_LEN, Inner, LogApp, LogAppError, Writer, haven_index, internal_error,
    open_reconciled, with_suffix,
};

/// First 8 bytes of every log app snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"HAVENLOG";

/// Version of the snapshot format this app writes and reads.
pub const SNAPSHOT_VERSION: u32 = frame::VERSION;

/// Length of the snapshot header: magic, version, two lengths, header CRC.
pub const SNAPSHOT_HEADER_LEN: u64 = frame::HEADER_LEN;

/// Suffix of the temporary copies a restore writes next to the log file and
/// the sidecar (`{file}.restore.tmp`, `{file}.haven-index.restore.tmp`).
pub const RESTORE_TMP_SUFFIX: &str = ".restore.tmp";

/// Suffix of the marker (`{file}.restore.ready`) whose existence says a
/// restore's temporary files are complete and must be renamed into place.
pub const RESTORE_MARKER_SUFFIX: &str = ".restore.ready";

/// Why a restore body is not a valid snapshot; the `400` body is
/// `invalid snapshot: {this}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Invalid {
    /// Framing and checksums.
    #[error(transparent)]
    Frame(#[from] frame::Invalid),
    #[error("sidecar length {0} is not a multiple of 8")]
    SidecarLen(u64),
    #[error("the log does not end with a newline")]
    TornLine,
    #[error("the log has {lines} lines but the sidecar {entries} entries")]
    Mismatch { lines: u64, entries: u64 },
    #[error("sidecar entry {line} records Haven-Index {index}, not above {previous}")]
    NotIncreasing {
        line: u64,
        index: u64,
        previous: u64,
    },
    #[error("it records Haven-Index {recorded}, above the restore's Haven-Index {restore}")]
    AheadOfRestore { recorded: u64, restore: u64 },
}

/// Why a restore failed.
pub(crate) type RestoreError = frame::RestoreError<Invalid, LogAppError>;

/// The log file and its sidecar, in frame order, as a restore stages them:
/// `{file}.restore.tmp`, `{file}.haven-index.restore.tmp`, and the marker
/// `{file}.restore.ready`.
pub(crate) fn restore_files(path: &Path, sidecar: &Path) -> Files {
    let tmp = |p: &Path| with_suffix(p, RESTORE_TMP_SUFFIX);
    let marker = with_suffix(path, RESTORE_MARKER_SUFFIX);
    Files {
        dir: frame::parent_dir(path).to_path_buf(),
        parts: [
            Part::required(path.to_path_buf(), tmp(path)),
            Part::required(sidecar.to_path_buf(), tmp(sidecar)),
        ],
        marker_tmp: with_suffix(&marker, ".tmp"),
        marker,
    }
}

/// What the content checks found so far; the problems are reported only once
/// the checksum has matched, so damage reads as "checksum mismatch".
#[derive(Debug, Default)]
struct Content {
    lines: u64,
    last_byte: Option<u8>,
    /// A sidecar entry split across chunks.
    partial: Vec<u8>,
    entries: u64,
    previous: u64,
    problem: Option<Invalid>,
}

impl Content {
    fn log(&mut self, bytes: &[u8]) {
        self.lines += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        self.last_byte = bytes.last().copied().or(self.last_byte);
    }

    fn sidecar(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = (ENTRY_LEN as usize - self.partial.len()).min(bytes.len());
            self.partial.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.partial.len() == ENTRY_LEN as usize {
                let mut le = [0u8; ENTRY_LEN as usize];
                le.copy_from_slice(&self.partial);
                self.partial.clear();
                let index = u64::from_le_bytes(le);
                self.entry(index);
            }
        }
    }

    fn entry(&mut self, index: u64) {
        if index != 0 {
            if index <= self.previous && self.problem.is_none() {
                self.problem = Some(Invalid::NotIncreasing {
                    line: self.entries,
                    index,
                    previous: self.previous,
                });
            }
            self.previous = index;
        }
        self.entries += 1;
    }

    /// The checks that need the whole content: exactly what the app's open
    /// would otherwise have to repair.
    fn finish(&self, header: Header, restore: u64) -> Result<(), Invalid> {
        if let Some(problem) = &self.problem {
            return Err(problem.clone());
        }
        if header.first_len > 0 && self.last_byte != Some(b'\n') {
            return Err(Invalid::TornLine);
        }
        if self.lines != self.entries {
            return Err(Invalid::Mismatch {
                lines: self.lines,
                entries: self.entries,
            });
        }
        if self.previous > restore {
            return Err(Invalid::AheadOfRestore {
                recorded: self.previous,
                restore,
            });
        }
        Ok(())
    }
}

impl Inspect for Content {
    type Reason = Invalid;

    fn lengths(&mut self, header: Header) -> Result<(), Invalid> {
        if !header.second_len.is_multiple_of(ENTRY_LEN) {
            return Err(Invalid::SidecarLen(header.second_len));
        }
        Ok(())
    }

    fn bytes(&mut self, part: usize, bytes: &[u8]) {
        if part == 0 {
            self.log(bytes);
        } else {
            self.sidecar(bytes);
        }
    }
}

fn task_error(inner: &Inner, e: &tokio::task::JoinError) -> LogAppError {
    LogAppError::Task {
        path: inner.path.clone(),
        message: e.to_string(),
    }
}

impl LogApp {
    /// Restores the state from a snapshot body (see the crate docs): stages
    /// and checks it without blocking appends, then swaps it in under the
    /// writer lock. Both blocking halves run to completion even if the request
    /// is dropped.
    async fn restore(&self, index: u64, body: Body) -> Result<(), RestoreError> {
        let restoring = Arc::clone(&self.inner.restoring).lock_owned().await;
        if self.inner.writer.lock().await.failed {
            // A failed install may have left a committed marker behind: only
            // a restart may finish it.
            return Err(RestoreError::App(LogAppError::Failed {
                path: self.inner.path.clone(),
            }));
        }
        let files = restore_files(&self.inner.path, &self.inner.sidecar_path);
        let task_err = |e| task_error(&self.inner, &e);
        let staged = frame::receive(body, task_err, move |chunks| -> Result<_, RestoreError> {
            let receiver = Receiver::create(SNAPSHOT_MAGIC, files, Content::default(), restoring)?;
            let received = receiver.read(chunks)?;
            let header = received.header();
            received
                .inspect
                .finish(header, index)
                .map_err(RestoreError::Invalid)?;
            Ok(received.sync()?)
        })
        .await?;
        let writer = Arc::clone(&self.inner.writer).lock_owned().await;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            inner.install(&mut writer, staged)
        })
        .await
        .map_err(|e| task_error(&self.inner, &e))
        .and_then(|installed| installed)
        .map_err(RestoreError::App)
    }
}

impl Inner {
    /// Swaps the staged files in and reopens them (blocking, under the writer
    /// lock). Failing after the commit leaves the app refusing appends until a
    /// restart finishes the restore.
    fn install(&self, writer: &mut Writer, mut staged: Staged) -> Result<(), LogAppError> {
        let result = staged
            .swap_in()
            .map_err(LogAppError::from)
            .and_then(|()| open_reconciled(&self.path, &self.sidecar_path));
        match result {
            Ok(opened) => {
                info!(
                    file = %self.path.display(),
                    lines = opened.index.count(),
                    "state restored from a snapshot"
                );
                *self.write_view() = opened.into_view();
                writer.failed = false;
                Ok(())
            }
            Err(e) => {
                writer.failed |= staged.committed();
                Err(e)
            }
        }
    }

    /// What one snapshot streams, fixed when the request arrives: the files'
    /// handles (kept across a later restore's renames) and the lengths that
    /// hold exactly the appends answered so far. Both files are append-only,
    /// so later appends never change those bytes and need not wait.
    fn streamer(&self) -> Streamer {
        let view = self.read_view();
        let log = Source {
            file: Arc::clone(&view.file),
            len: view.index.starts.last().copied().unwrap_or(0),
            path: self.path.clone(),
        };
        let sidecar = Source {
            file: Arc::clone(&view.sidecar),
            len: view.index.count().saturating_mul(ENTRY_LEN),
            path: self.sidecar_path.clone(),
        };
        Streamer::new(SNAPSHOT_MAGIC, [Some(log), Some(sidecar)])
    }
}

/// `GET /_haven/snapshot`.
pub(crate) async fn snapshot(State(app): State<LogApp>, headers: HeaderMap) -> Response {
    if let Err(bad) = haven_index(&headers) {
        return bad.into_response();
    }
    app.inner.streamer().into_response()
}

/// `PUT /_haven/restore`.
pub(crate) async fn restore(State(app): State<LogApp>, headers: HeaderMap, body: Body) -> Response {
    let index = match haven_index(&headers) {
        Ok(Some(index)) => index,
        Ok(None) | Err(_) => return BadHavenIndex.into_response(),
    };
    frame::respond(index, app.restore(index, body).await, internal_error)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn the_sidecar_length_is_checked_with_the_header() {
        let decode = |header: Header| {
            let bytes = header.encode(&SNAPSHOT_MAGIC);
            Header::decode_checked(&SNAPSHOT_MAGIC, &bytes, |h| Content::default().lengths(h))
        };
        let header = Header {
            first_len: 10,
            second_len: 16,
        };
        assert_eq!(decode(header), Ok(header));
        let odd = Header {
            first_len: 0,
            second_len: 9,
        };
        assert_eq!(decode(odd), Err(Invalid::SidecarLen(9)));
        let huge = Header {
            first_len: u64::MAX - 8,
            second_len: 8,
        };
        assert_eq!(decode(huge), Err(frame::Invalid::Overflow.into()));
    }

    #[test]
    fn content_checks_name_the_first_problem() {
        let header = Header {
            first_len: 4,
            second_len: 16,
        };
        let mut content = Content::default();
        content.log(b"a\nb\n");
        content.sidecar(&5u64.to_le_bytes()[..3]);
        content.sidecar(&[&5u64.to_le_bytes()[3..], &0u64.to_le_bytes()[..]].concat());
        assert_eq!(content.finish(header, 5), Ok(()));
        assert_eq!(
            content.finish(header, 4),
            Err(Invalid::AheadOfRestore {
                recorded: 5,
                restore: 4
            })
        );
        content.sidecar(&3u64.to_le_bytes());
        assert_eq!(
            content.finish(header, 9),
            Err(Invalid::NotIncreasing {
                line: 2,
                index: 3,
                previous: 5
            })
        );
        let mut torn = Content::default();
        torn.log(b"a\nb");
        assert_eq!(torn.finish(header, 9), Err(Invalid::TornLine));
        let mut short = Content::default();
        short.log(b"a\n");
        assert_eq!(
            short.finish(header, 9),
            Err(Invalid::Mismatch {
                lines: 1,
                entries: 0
            })
        );
    }

    #[tokio::test]
    async fn a_restore_committed_before_a_crash_is_finished_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log.txt");
        let sidecar = crate::sidecar_path(&file);
        fs::write(&file, b"old\n").unwrap();
        fs::write(&sidecar, 1u64.to_le_bytes()).unwrap();
        // A crash after the sidecar's rename, before the log's.
        fs::write(with_suffix(&file, RESTORE_TMP_SUFFIX), b"new\nlines\n").unwrap();
        fs::write(&sidecar, [7u64.to_le_bytes(), 8u64.to_le_bytes()].concat()).unwrap();
        restore_files(&file, &sidecar)
            .write_marker([true, true])
            .unwrap();
        let config = crate::LogAppConfig {
            file: file.clone(),
            prepopulate: 0,
        };
        let app = LogApp::open(&config).unwrap();
        assert_eq!(app.count(), 2);
        assert_eq!(app.last_haven_index(), Some(8));
        assert_eq!(fs::read(&file).unwrap(), b"new\nlines\n");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "temporary files and marker gone");
    }
}
