//! Everything that can go wrong with an archive, each naming the object or file involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive key file {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("archive url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("object store {op} {name}: {source}")]
    Store {
        op: &'static str,
        name: String,
        source: object_store::Error,
    },
    #[error("object store {op} {name}: no answer within {seconds} s")]
    Timeout {
        op: &'static str,
        name: String,
        seconds: u64,
    },
    #[error("object {name} is damaged: {reason}")]
    Damaged { name: String, reason: String },
    #[error(
        "object {name} was sealed with key {found}, not with this key ({expected}): wrong key file?"
    )]
    WrongKey {
        name: String,
        found: String,
        expected: String,
    },
    #[error(
        "object {name} is stored in plaintext, and this archive is configured to be encrypted: refusing it"
    )]
    Plaintext { name: String },
    #[error(
        "the archive at {url} belongs to cluster {owner:?} (epoch {epoch}); this is cluster {ours:?}: two clusters must not write one archive"
    )]
    OtherCluster {
        url: String,
        owner: String,
        epoch: u64,
        ours: String,
    },
    #[error(
        "the archive at {url} was taken over: epoch {newer} (by {owner:?}) is newer than this writer's epoch {ours}"
    )]
    Fenced {
        url: String,
        newer: u64,
        owner: String,
        ours: u64,
    },
    #[error("cannot promote at {url}: {reason}")]
    Promotion { url: String, reason: String },
    #[error("object {name}: format version {found} is not known to this Haven (it reads {known})")]
    Version {
        name: String,
        found: u32,
        known: u32,
    },
    #[error("archive {url}: {reason}")]
    Inconsistent { url: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl ArchiveError {
    pub fn damaged(name: &str, reason: impl Into<String>) -> Self {
        Self::Damaged {
            name: name.to_string(),
            reason: reason.into(),
        }
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// A store that did not answer, or answered with an error: worth a retry later, unlike
    /// a damaged object or a foreign writer.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Store { .. } | Self::Timeout { .. })
    }
}
