//! A node's simulated disk: vote, log and commit index in memory, owned by the harness so
//! they outlive the node's software when the simulation kills and restarts it. A write is
//! durable once openraft is told it is (the log store's contract); the replica itself is
//! volatile and is rebuilt from the log at every start.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;

use haven_consensus::types::Entry;
use haven_consensus::types::LogId;
use haven_consensus::types::TypeConfig;
use haven_consensus::types::Vote;
use haven_contract::RequestTag;
use openraft::EntryPayload;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;

#[derive(Debug, Default)]
struct Disk {
    vote: Option<Vote>,
    log: BTreeMap<u64, Entry>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

/// One node's disk; clones share it.
#[derive(Debug, Clone, Default)]
pub struct SimLog {
    disk: Arc<Mutex<Disk>>,
}

impl SimLog {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        let disk = self.disk();
        disk.log.is_empty() && disk.vote.is_none()
    }

    /// The tag of the client request stored at `index`, if the log holds one there.
    pub fn tag_at(&self, index: u64) -> Option<RequestTag> {
        match &self.disk().log.get(&index)?.payload {
            EntryPayload::Normal(request) => Some(request.tag),
            _ => None,
        }
    }
}

impl RaftLogReader<TypeConfig> for SimLog {
    async fn try_get_log_entries<RB>(&mut self, range: RB) -> Result<Vec<Entry>, io::Error>
    where
        RB: RangeBounds<u64> + Clone + Debug + OptionalSend,
    {
        Ok(self
            .disk()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.disk().vote)
    }
}

impl RaftLogStorage<TypeConfig> for SimLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let disk = self.disk();
        let last = disk
            .log
            .values()
            .next_back()
            .map(|e| e.log_id())
            .or(disk.purged);
        Ok(LogState {
            last_purged_log_id: disk.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.disk().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.disk().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.disk().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut disk = self.disk();
            for entry in entries {
                disk.log.insert(entry.log_id().index, entry);
            }
        }
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> Result<(), io::Error> {
        let from = last.map_or(0, |l| l.index + 1);
        self.disk().log.split_off(&from);
        Ok(())
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), io::Error> {
        let mut disk = self.disk();
        disk.log = disk.log.split_off(&(upto.index + 1));
        disk.purged = Some(upto);
        Ok(())
    }
}
