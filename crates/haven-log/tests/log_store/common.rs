//! Shared test fixtures: a type config, entry builders and file helpers.

use std::fs;
use std::io;
use std::path::Path;
use std::path::PathBuf;

use haven_log::LogOptions;
use haven_log::LogStore;
use openraft::Membership;
use openraft::RaftTypeConfig;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::VoteOf;
use openraft::vote::RaftLeaderIdExt;

openraft::declare_raft_types!(
    /// Type config used by all tests: String requests and responses, u64 node ids.
    pub TestConfig:
        D = String,
        R = String,
);

pub type C = TestConfig;
pub type Store = LogStore<C>;
pub type Ent = <C as RaftTypeConfig>::Entry;

/// A temp dir on the same disk as the build (real fsync cost, unlike tmpfs).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

pub fn open(dir: &Path, options: LogOptions) -> Store {
    Store::open(dir, options).unwrap()
}

pub fn small_segments() -> LogOptions {
    LogOptions {
        segment_bytes: 1024,
        cache_bytes: 0,
    }
}

pub fn log_id(term: u64, index: u64) -> LogIdOf<C> {
    LogIdOf::<C>::new(
        <C as RaftTypeConfig>::LeaderId::new_committed(term, 1),
        index,
    )
}

pub fn vote(term: u64, node: u64) -> VoteOf<C> {
    VoteOf::<C>::new(term, node)
}

/// A normal entry with a payload whose size varies with the index; every 97th entry is a
/// membership change so both payload kinds round-trip.
pub fn entry(term: u64, index: u64) -> Ent {
    if index % 97 == 5 {
        let voters = [1u64, 2, 3].into_iter().collect();
        return Ent::new_membership(
            log_id(term, index),
            Membership::new_with_defaults(vec![voters], []),
        );
    }
    Ent::new_normal(
        log_id(term, index),
        format!("req-{index}-{}", "x".repeat((index % 41) as usize)),
    )
}

pub fn entries(term: u64, range: std::ops::Range<u64>) -> Vec<Ent> {
    range.map(|i| entry(term, i)).collect()
}

/// Appends and waits until the store reports the entries durable.
pub async fn append(store: &mut Store, entries: Vec<Ent>) -> io::Result<()> {
    let (tx, rx) = C::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await?;
    rx.await.map_err(io::Error::other)?
}

/// Appends `entries` in chunks of `chunk`, waiting for each.
pub async fn append_chunked(store: &mut Store, entries: &[Ent], chunk: usize) {
    for c in entries.chunks(chunk) {
        append(store, c.to_vec()).await.unwrap();
    }
}

/// Segment files in index order.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// `(offset, total_len)` of each record in a segment file, parsed independently of the crate:
/// `HVNLOG02`, then frames whose length counts the kind byte and the payload.
pub fn record_spans(path: &Path) -> Vec<(u64, u64)> {
    let bytes = fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"HVNLOG02");
    let mut out = Vec::new();
    let mut off = 8usize;
    while off < bytes.len() {
        let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        out.push((off as u64, (8 + len) as u64));
        off += 8 + len;
    }
    assert_eq!(off, bytes.len(), "records must tile the file exactly");
    out
}

/// Rewrites a segment as an older version wrote it (`HVNLOG01`: the length field counts
/// the payload only, not the kind byte); everything else is the same bytes.
pub fn downgrade_to_v1(path: &Path) {
    let spans = record_spans(path);
    let mut bytes = fs::read(path).unwrap();
    bytes[..8].copy_from_slice(b"HVNLOG01");
    for (off, _) in spans {
        let at = off as usize..off as usize + 4;
        let len = u32::from_le_bytes(bytes[at.clone()].try_into().unwrap());
        bytes[at].copy_from_slice(&(len - 1).to_le_bytes());
    }
    fs::write(path, bytes).unwrap();
}

/// XORs one byte of a file.
pub fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset as usize] ^= 0x5a;
    fs::write(path, bytes).unwrap();
}
