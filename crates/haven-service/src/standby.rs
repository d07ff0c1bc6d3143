//! A standby follows another site's archive: it restores the newest archived checkpoint
//! into its own replica and then applies every archived entry as it appears, through the
//! same code as `haven restore` ([`crate::restore`]). It runs no Raft until it is
//! promoted.
//!
//! A promotion is a create-only epoch marker in the archive ([`promote`]): the fence the
//! old primary meets on its next upload, and the signal every node of the standby site
//! follows. Each of them applies the archive up to the marker's start, makes its own
//! `[[peers]]` the membership at that index ([`StateMachine::take_over`]), records the
//! primary role, and asks the node to open the service again, now with Raft: the group
//! elects a leader at the next term and archives under the new epoch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use haven_archive::catalog::Catalog;
use haven_archive::epoch;
use haven_archive::epoch::EpochMarker;
use haven_archive::reader::Reader;
use haven_base::metrics::Metrics;
use haven_consensus::types::TypeConfig;
use haven_consensus::types::Vote;
use haven_contract::NodeId;
use haven_contract::PeerNode;
use haven_log::LogStore;
use openraft::storage::RaftLogStorage;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::watch;

use crate::apply::StateMachine;
use crate::archive::ArchiveTarget;
use crate::restore::History;
use crate::restore::Progress;
use crate::restore::RestoreError;
use crate::site::Role;
use crate::site::SiteState;

/// Most entries replayed per look at the archive, so status and the promotion signal stay
/// fresh while a standby catches up on a long history.
const MAX_ENTRIES_PER_STEP: u64 = 65_536;
/// A failed look is logged at most this often (the store may be down for hours).
const WARN_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Archive(#[from] haven_archive::ArchiveError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// Who this standby is and where it writes once promoted.
#[derive(Clone)]
pub struct SiteHandle {
    pub target: ArchiveTarget,
    pub writer: epoch::Writer,
    pub site: SiteState,
}

/// What a promotion did, and the recovery point it suffered.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Promotion {
    pub epoch: u64,
    /// The first index the promoted site writes.
    pub start_index: u64,
    /// The last entry the archive held from the old primary: everything it acknowledged
    /// up to here survives; what it acknowledged after is the loss.
    pub last_archived_index: u64,
    /// That entry's time (microseconds since the Unix epoch; 0 when the archive is empty).
    pub last_archived_time_us: i64,
    /// How old that entry was when the fence went up, in milliseconds.
    pub last_archived_age_ms: u64,
    /// Who wrote the archive before.
    pub previous_writer: Option<String>,
}

/// Fences the old primary and starts the take-over: creates the next epoch's fence, then
/// its marker, starting after the archive's last entry as read after the fence. The
/// standby nodes see the marker and take over once they have applied everything before
/// it.
pub async fn promote(handle: &SiteHandle) -> Result<Promotion, StandbyError> {
    let role = handle.site.role();
    if role != Role::Standby {
        return Err(StandbyError::Refused(format!(
            "this service is {} here, not a standby: only a standby can be promoted",
            role.name()
        )));
    }
    let target = &handle.target;
    let mut catalog = Catalog::load(&target.store, &target.protection).await?;
    let previous = catalog.newest_epoch().cloned();
    if let Some(marker) = previous.as_ref().filter(|m| handle.writer.owns(m)) {
        return Err(StandbyError::Refused(same_identity(marker)));
    }
    // Two standby sites promoted at once both follow the same epoch and race for the
    // next one's fence; one that finds a newer epoch than it follows lost already.
    let newest = previous.as_ref().map(|m| m.epoch);
    let follows = handle.site.status().epoch.or(newest);
    if let Some(marker) = previous.as_ref().filter(|m| Some(m.epoch) > follows) {
        return Err(StandbyError::Refused(format!(
            "epoch {} was created by {} while this standby followed epoch {}: another promotion won, and this standby now follows it",
            marker.epoch,
            marker.owner(),
            follows.unwrap_or(0)
        )));
    }
    let now_us = chrono::Utc::now().timestamp_micros();
    let (store, protection) = (&target.store, &target.protection);
    let epoch = epoch::fence(store, protection, &handle.writer, follows, now_us).await?;
    // Read after the fence: everything the old primary confirmed unfenced is here.
    catalog.refresh(store, protection).await?;
    let last = catalog.last_entry();
    let (last_index, last_time_us) = last.unwrap_or((0, 0));
    let start_index = last.map_or(0, |(index, _)| index + 1);
    let marker = epoch::promote(
        store,
        protection,
        &handle.writer,
        epoch,
        start_index,
        now_us,
    )
    .await?;
    let start_index = marker.start_index;
    tracing::warn!(
        epoch = marker.epoch,
        start_index,
        last_archived = last_index,
        "promoted: the archive is fenced against the old primary"
    );
    Ok(Promotion {
        epoch: marker.epoch,
        start_index,
        last_archived_index: last_index,
        last_archived_time_us: last_time_us,
        last_archived_age_ms: match last_time_us {
            0 => 0,
            t => ((now_us - t).max(0) / 1000) as u64,
        },
        previous_writer: previous.map(|m| m.owner()),
    })
}

fn same_identity(marker: &EpochMarker) -> String {
    format!(
        "the archive's epoch {} is written by {}, which is this standby's own cluster, site and service: give the standby's [node] site (or cluster) a value of its own",
        marker.epoch,
        marker.owner()
    )
}

/// The follow loop's parts, given by the service when it opens as a standby.
pub struct Follower {
    pub service: String,
    pub handle: SiteHandle,
    pub machine: StateMachine,
    pub log: LogStore<TypeConfig>,
    pub node: NodeId,
    pub voters: BTreeMap<NodeId, PeerNode>,
    pub poll: Duration,
    /// Take a local checkpoint every this many applied entries (crash recovery, restore).
    pub checkpoint_every: Option<u64>,
    /// Where archived checkpoints are fetched to before they are installed.
    pub scratch: PathBuf,
    pub metrics: Metrics,
    /// Asks the node to open this service again (as the primary it has become).
    pub reopen: mpsc::UnboundedSender<String>,
}

/// What one look at the archive ended with.
enum Step {
    Following,
    /// Nothing applied: a promotion's fence is up and its marker not yet (the reason).
    Waiting(String),
    TookOver,
}

impl Follower {
    /// Follows the archive every `poll` until `stop`, or until this site took over.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        self.metrics.site_role.set(1);
        let mut history: Option<History> = None;
        let mut last_checkpoint = self.machine.shared().applied_index();
        let mut last_warned: Option<tokio::time::Instant> = None;
        loop {
            match self.step(&mut history).await {
                Ok(Step::TookOver) => {
                    let _ = self.reopen.send(self.service.clone());
                    return;
                }
                Ok(Step::Following) => {
                    self.handle.site.update(|s| s.last_error = None);
                    self.checkpoint_if_due(&mut last_checkpoint).await;
                }
                Ok(Step::Waiting(reason)) => {
                    self.handle.site.update(|s| s.last_error = Some(reason));
                }
                Err(e) => {
                    self.metrics.standby_errors.inc();
                    if last_warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                        last_warned = Some(tokio::time::Instant::now());
                        tracing::warn!(error = %e, "standby cannot follow the archive; retrying");
                    }
                    self.handle
                        .site
                        .update(|s| s.last_error = Some(e.to_string()));
                    // Retention may have deleted what the catalog still names: read the
                    // archive afresh on the next look.
                    history = None;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    async fn step(&mut self, history: &mut Option<History>) -> Result<Step, StandbyError> {
        let history = match history {
            Some(history) => history,
            None => history.insert(self.open_history().await?),
        };
        let (position, _) = self.machine.position().await;
        let applied = position.map(|l| l.index);
        let catalog = history.follow(applied.unwrap_or(0)).await?;
        let newest = catalog.newest_epoch().cloned();
        let promoted = newest.as_ref().filter(|m| self.handle.writer.owns(m));
        if let Some(marker) = promoted
            && marker.epoch == 1
        {
            return Err(StandbyError::Refused(same_identity(marker)));
        }
        // The catalog forgets what was applied; from the next entry on is what counts.
        let reach = applied.and_then(|a| catalog.reach_from(a + 1));
        let archive_end = [reach, catalog.last_entry()]
            .into_iter()
            .flatten()
            .max_by_key(|(index, _)| *index);
        // Only something new to apply can lie beyond a promotion's start.
        let news = archive_end.is_some_and(|(end, _)| applied.is_none_or(|a| end > a));
        if promoted.is_none()
            && news
            && let Some(reason) = self.promotion_under_way(newest.as_ref()).await?
        {
            return Ok(Step::Waiting(reason));
        }
        // A promotion ends the old primary's history where the new epoch starts.
        let end = match promoted {
            Some(marker) => Some(marker.start_index.saturating_sub(1)),
            None => archive_end.map(|(index, _)| index),
        };
        let Some(end) = end else {
            self.report(newest.as_ref(), None).await;
            return Ok(Step::Following);
        };
        if promoted.is_some() && applied.is_some_and(|a| a > end) {
            return Err(StandbyError::Refused(format!(
                "this standby applied entries up to {} but the promotion starts at {}: it cannot take over (wipe its data directory and let it follow again)",
                applied.unwrap_or(0),
                end + 1
            )));
        }
        let next = applied.map_or(0, |a| a + 1);
        let newest_checkpoint = catalog.checkpoints.last().map(|c| c.index);
        // A fresh standby starts from the newest checkpoint when there is one: replaying
        // the whole history would be slower, and retention may delete it meanwhile.
        let fresh = applied.is_none() && newest_checkpoint.is_some();
        let first = match !fresh && (next > end || catalog.covering(next, next).is_ok()) {
            true => next,
            false => {
                self.install_newest(history, applied, newest_checkpoint, end)
                    .await?
            }
        };
        let last = end.min(first + MAX_ENTRIES_PER_STEP - 1);
        if first <= last {
            crate::restore::replay(&self.machine, history, first..=last, &Silent).await?;
        }
        self.report(newest.as_ref(), archive_end).await;
        match promoted {
            Some(marker) if last == end => {
                self.take_over(marker).await?;
                Ok(Step::TookOver)
            }
            _ => Ok(Step::Following),
        }
    }

    /// Whether the next epoch's fence is up (read after the archive was listed). A
    /// promotion reads the archive's end after its fence: entries the old primary uploads
    /// meanwhile lie beyond the new epoch's start, and a standby that applied them could
    /// not take over at it. What was listed before the fence went up is within that end.
    async fn promotion_under_way(
        &self,
        newest: Option<&EpochMarker>,
    ) -> Result<Option<String>, StandbyError> {
        let Some(newest) = newest else {
            return Ok(None);
        };
        let target = &self.handle.target;
        let fence = epoch::read_fence(&target.store, &target.protection, newest.epoch + 1).await?;
        Ok(fence.map(|fence| {
            format!(
                "a promotion to epoch {} by {} is under way (its fence is up, its marker not yet): nothing is applied until the marker says where the new epoch starts",
                fence.epoch,
                fence.owner()
            )
        }))
    }

    async fn open_history(&self) -> Result<History, StandbyError> {
        let target = &self.handle.target;
        let reader = Reader::open(target.store.clone(), target.protection.clone()).await?;
        std::fs::create_dir_all(&self.scratch).map_err(|source| StandbyError::Io {
            what: "cannot create the standby's scratch directory",
            source,
        })?;
        Ok(History::Archive {
            reader: Box::new(reader),
            scratch: self.scratch.clone(),
        })
    }

    /// Installs the archive's newest checkpoint, when the archive no longer holds the next
    /// entry (a fresh standby, or one that was down while retention went on); the entry
    /// after it, where replay goes on.
    async fn install_newest(
        &self,
        history: &mut History,
        applied: Option<u64>,
        newest: Option<u64>,
        end: u64,
    ) -> Result<u64, StandbyError> {
        let Some(checkpoint) = newest.filter(|&c| applied.is_none_or(|a| c > a) && c <= end) else {
            return Err(StandbyError::Refused(format!(
                "the archive holds neither entry {} nor a checkpoint after it: this standby cannot catch up (wipe its data directory to start again from the newest checkpoint)",
                applied.map_or(0, |a| a + 1)
            )));
        };
        let base = history.materialize(checkpoint).await?;
        crate::restore::install(&self.machine, &base).await?;
        let _ = std::fs::remove_file(&base.path);
        tracing::info!(
            checkpoint,
            "standby installed the archive's newest checkpoint"
        );
        Ok(checkpoint + 1)
    }

    /// Status and metrics: how far behind the archive this standby is.
    async fn report(&self, newest: Option<&EpochMarker>, archive_end: Option<(u64, i64)>) {
        let (position, applied_time) = self.machine.position().await;
        let applied = position.map(|l| l.index);
        let (archive_index, archive_time) = archive_end.unzip();
        let lag_entries = archive_index.map_or(0, |end| end.saturating_sub(applied.unwrap_or(0)));
        let lag_ms = archive_time.map_or(0, |t| ((t - applied_time).max(0) / 1000) as u64);
        self.metrics.standby_lag_entries.set(lag_entries as i64);
        self.metrics.standby_lag_seconds.set(lag_ms as f64 / 1000.0);
        if let Some(marker) = newest {
            self.metrics.site_epoch.set(marker.epoch as i64);
        }
        self.handle.site.update(|s| {
            s.epoch = newest.map(|m| m.epoch);
            s.writer = newest.map(|m| m.owner());
            s.applied_index = applied;
            s.archive_index = archive_index;
            s.lag_entries = lag_entries;
            s.lag_ms = lag_ms;
            s.looked_at_us = Some(chrono::Utc::now().timestamp_micros());
        });
    }

    async fn checkpoint_if_due(&self, last: &mut u64) {
        let applied = self.machine.shared().applied_index();
        let Some(every) = self.checkpoint_every else {
            return;
        };
        if applied < last.saturating_add(every) {
            return;
        }
        match self.machine.checkpoint_now().await {
            Ok(index) => *last = index,
            Err(e) => tracing::warn!(error = %e, "standby checkpoint failed"),
        }
    }

    /// This site becomes the primary at `marker.start_index`.
    async fn take_over(&mut self, marker: &EpochMarker) -> Result<(), StandbyError> {
        let io = |what| move |source| StandbyError::Io { what, source };
        let last = self
            .machine
            .take_over(self.voters.clone())
            .await
            .map_err(io("cannot take the service over"))?;
        // The next leader must be elected at a term above every archived entry's.
        let vote = Vote::new(last.leader_id.term, self.node);
        self.log
            .save_vote(&vote)
            .await
            .map_err(io("cannot record the vote"))?;
        self.handle
            .site
            .set_role(Role::Primary)
            .map_err(io("cannot record the primary role"))?;
        self.metrics.site_role.set(0);
        tracing::warn!(
            epoch = marker.epoch,
            index = last.index,
            "standby took over: this site is the primary"
        );
        Ok(())
    }
}

/// Replay progress goes to status, not to a progress bar.
pub(crate) struct Silent;

impl Progress for Silent {
    fn start(&self, _total: u64) {}
    fn advance(&self, _done: u64) {}
}
