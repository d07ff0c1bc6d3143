//! Error type of the log store.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the log store.
///
/// Errors always name the file involved: an operator facing a node that refuses to start needs
/// to know which file to inspect, not just that "something is corrupt".
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An operating-system I/O call failed.
    #[error("log i/o error on {}: {source}", path.display())]
    Io {
        /// The file or directory the call was about.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },

    /// Data on disk fails validation and cannot be explained by a torn final write.
    ///
    /// The node must not start on a corrupt log: guessing could un-acknowledge entries that a
    /// quorum relies on.
    #[error("corrupt log record in {} at offset {offset}: {reason}", file.display())]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the damaged record (or header) inside `file`.
        offset: u64,
        /// What check failed.
        reason: String,
    },

    /// An earlier write or fsync failed; the store refuses further writes.
    ///
    /// After a failed fsync the kernel may have dropped dirty pages, so retrying could report
    /// success for data that never reached the disk ("fsyncgate"). Failing fast is the only
    /// safe answer.
    #[error("log store stopped after an earlier write failure: {0}")]
    Failed(String),

    /// An entry or metadata value could not be serialized.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The serializer's message.
        reason: String,
    },

    /// The caller asked for something the Raft log cannot do (e.g. a hole in the log).
    #[error("invalid log operation: {0}")]
    Invalid(String),

    /// The writer thread is gone (the store is shutting down).
    #[error("log writer thread has stopped")]
    WriterGone,
}

impl LogError {
    /// Wraps an `io::Error` with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        LogError::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds a [`LogError::Corrupt`].
    pub(crate) fn corrupt(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        LogError::Corrupt {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }
}

impl From<LogError> for io::Error {
    /// openraft's storage traits speak `io::Error`; keep our message (file, offset) intact and
    /// keep the `LogError` itself as the inner error so callers can downcast to it.
    fn from(e: LogError) -> Self {
        let kind = match &e {
            LogError::Io { source, .. } => source.kind(),
            LogError::Corrupt { .. } => io::ErrorKind::InvalidData,
            LogError::Encode { .. } | LogError::Invalid(_) => io::ErrorKind::InvalidInput,
            LogError::Failed(_) | LogError::WriterGone => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
