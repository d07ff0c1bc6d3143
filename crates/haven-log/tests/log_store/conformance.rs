//! openraft's own storage conformance suite, run against `LogStore`.

use std::io;
use std::sync::Arc;
use std::sync::Mutex;

use futures::Stream;
use futures::TryStreamExt;
use haven_log::LogOptions;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::StorageError;
use openraft::entry::RaftEntry;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use openraft::type_config::alias::LogIdOf;
use openraft::type_config::alias::SnapshotMetaOf;
use openraft::type_config::alias::SnapshotOf;
use openraft::type_config::alias::StoredMembershipOf;

use crate::common::C;
use crate::common::Store;

/// The smallest state machine the suite accepts: it tracks what was applied and the membership,
/// and its "snapshot" is just that metadata.
#[derive(Clone, Default)]
pub struct MemSm {
    inner: Arc<Mutex<SmState>>,
}

#[derive(Default)]
struct SmState {
    applied: Option<LogIdOf<C>>,
    membership: StoredMembershipOf<C>,
    snapshot: Option<SnapshotMetaOf<C>>,
}

impl MemSm {
    fn meta(&self) -> SnapshotMetaOf<C> {
        let s = self.inner.lock().unwrap();
        SnapshotMetaOf::<C> {
            last_log_id: s.applied,
            last_membership: s.membership.clone(),
        }
    }
}

impl RaftSnapshotBuilder<C> for MemSm {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Vec<u8>>, io::Error> {
        let meta = self.meta();
        self.inner.lock().unwrap().snapshot = Some(meta.clone());
        Ok(SnapshotOf::<C, Vec<u8>> {
            meta,
            snapshot: Vec::new(),
        })
    }
}

impl RaftStateMachine<C> for MemSm {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        let s = self.inner.lock().unwrap();
        Ok((s.applied, s.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            {
                let mut s = self.inner.lock().unwrap();
                s.applied = Some(entry.log_id());
                if let Some(m) = entry.get_membership() {
                    s.membership = StoredMembershipOf::<C>::new(Some(entry.log_id()), m);
                }
            }
            if let Some(r) = responder {
                r.send(String::new());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<C>,
        _snapshot: Vec<u8>,
    ) -> Result<(), io::Error> {
        let mut s = self.inner.lock().unwrap();
        s.applied = meta.last_log_id;
        s.membership = meta.last_membership.clone();
        s.snapshot = Some(meta.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, Vec<u8>>>, io::Error> {
        let s = self.inner.lock().unwrap();
        Ok(s.snapshot.clone().map(|meta| SnapshotOf::<C, Vec<u8>> {
            meta,
            snapshot: Vec::new(),
        }))
    }
}

/// Opens a fresh `LogStore` in its own temp dir for every suite case.
struct Builder {
    options: LogOptions,
}

impl StoreBuilder<C, Store, MemSm, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, Store, MemSm), StorageError<C>> {
        let dir = crate::common::tempdir();
        let store = crate::common::open(dir.path(), self.options);
        Ok((dir, store, MemSm::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_with_default_options() {
    let builder = Builder {
        options: LogOptions::default(),
    };
    Suite::test_all(builder).await.unwrap();
}

/// Same suite with one append per segment and no cache: every read goes to disk, and purge and
/// truncation cross segment boundaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_with_tiny_segments_and_no_cache() {
    let builder = Builder {
        options: LogOptions {
            segment_bytes: 1,
            cache_bytes: 0,
        },
    };
    Suite::test_all(builder).await.unwrap();
}
