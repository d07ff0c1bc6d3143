//! The service's off-site archive: the leader ships committed entries and checkpoints to
//! the object store ([`haven_archive`]) every `flush_ms`, never in the path of a client
//! write; under `ack = "quorum+archive"` writes wait for it, so it ships as soon as
//! entries are applied, several objects at once, and releases them in index order. A new
//! leader resumes from what the archive holds; a follower ships nothing.
//!
//! No node compacts its log past what the archive holds ([`ArchiveProgress::floor`]; a
//! follower learns it by listing what is new in the archive every second): when the store
//! is down the logs grow instead, and past `max_backlog_entries` the leader says so (log,
//! metric) until the store is back. Whichever node leads next still has every entry the
//! archive lacks.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use haven_archive::ArchiveError;
use haven_archive::batch::ArchivedEntry;
use haven_archive::catalog::Catalog;
use haven_archive::epoch;
use haven_archive::key::ArchiveKey;
use haven_archive::seal::Protection;
use haven_archive::store::Store;
use haven_archive::store::StoreSettings;
use haven_archive::writer::ArchiveWriter;
use haven_archive::writer::Finished;
use haven_archive::writer::Shipped;
use haven_base::config::AckMode;
use haven_base::config::ArchiveSection;
use haven_base::metrics::Metrics;
use haven_consensus::propose::ArchiveWaiters;
use haven_consensus::propose::Durable;
use haven_consensus::propose::DurableGate;
use haven_consensus::types::Entry;
use haven_consensus::types::TypeConfig;
use haven_log::LogStore;
use openraft::EntryPayload;
use openraft::rt::WatchReceiver;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use crate::apply::Raft;
use crate::checkpoint::Checkpoints;
use crate::site::Role;
use crate::site::SiteState;

/// Entries and bytes per log object: large enough to keep object counts low under load,
/// small enough that one object is quick to upload and to read back.
const MAX_OBJECT_ENTRIES: u64 = 8_192;
const MAX_OBJECT_BYTES: usize = 8 << 20;
/// Pause after a failed upload before the next try (the store may be down).
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often a follower looks at how far the archive got (its log is kept back to it).
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// How often the leader's recovery point is measured ([`RecoveryPoint`]): between
/// uploads too, so an upload that hangs or fails shows as a lag that keeps growing.
const LAG_EVERY: Duration = Duration::from_millis(100);
/// Entries without a time (blank, membership) looked past for the first one with a time.
const UNTIMED_ENTRIES: u64 = 16;

/// The archive a service writes to: where, and the key, loaded when the service opens.
#[derive(Clone)]
pub struct ArchiveTarget {
    pub store: Store,
    pub protection: Protection,
    pub section: ArchiveSection,
}

impl ArchiveTarget {
    /// Fails closed: an unreadable or invalid key stops the service from opening.
    pub fn open(section: &ArchiveSection) -> Result<Self, ArchiveError> {
        haven_archive::store::install_crypto_provider();
        let protection = match (&section.key_file, section.encrypt) {
            (Some(path), true) => Protection::Encrypted(ArchiveKey::load(path)?),
            (_, false) => Protection::Plaintext,
            (None, true) => {
                return Err(ArchiveError::Key {
                    path: Default::default(),
                    reason: "archive.key_file is not set".to_string(),
                });
            }
        };
        let store = Store::open(&StoreSettings {
            url: section.url.clone(),
            endpoint: section.endpoint.clone(),
        })?;
        Ok(Self {
            store,
            protection,
            section: section.clone(),
        })
    }
}

/// What status shows about the archive.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchiveStatus {
    pub url: String,
    pub protection: String,
    /// Whether this node ships (it leads).
    pub uploading: bool,
    pub archived_index: Option<u64>,
    pub archived_entry_time_us: Option<i64>,
    pub lag_entries: u64,
    /// The recovery point if the site were lost now: how long ago (wall clock) the oldest
    /// committed entry the archive lacks was written; 0 when it lacks none.
    pub lag_ms: u64,
    pub last_error: Option<String>,
    /// Why this site refuses writes, when it does (fenced, or cut off from the archive
    /// for `fence_after_s`).
    #[serde(default)]
    pub writes_refused: Option<String>,
}

/// Shared between the uploader, log compaction and status.
#[derive(Clone)]
pub struct ArchiveProgress {
    status: watch::Sender<ArchiveStatus>,
    /// The archive's last index as this node knows it (0 until known): the log is kept
    /// after it on every node, so whichever node leads next can ship what is missing.
    floor: watch::Sender<Option<u64>>,
    /// What the leader's write path reads: why this site refuses writes, if it does, and
    /// (under `ack = "quorum+archive"`) the last index this node shipped and then found
    /// unfenced, up to which writes may be acknowledged.
    durable: watch::Sender<Durable>,
    /// Writes waiting for `durable` to cover them, woken after each change that does.
    waiters: Arc<ArchiveWaiters>,
}

impl ArchiveProgress {
    pub fn new(target: &ArchiveTarget) -> Self {
        let status = ArchiveStatus {
            url: target.store.url().to_string(),
            protection: target.protection.describe(),
            ..ArchiveStatus::default()
        };
        Self {
            status: watch::channel(status).0,
            floor: watch::channel(None).0,
            durable: watch::channel(Durable::default()).0,
            waiters: Arc::default(),
        }
    }

    /// What a leader checks before it proposes a write (is this site refused?) and, under
    /// `ack = "quorum+archive"`, waits for before it answers one.
    pub fn durable_gate(&self, section: &ArchiveSection, wait: Duration) -> DurableGate {
        DurableGate {
            durable: self.durable.subscribe(),
            waiters: Arc::downgrade(&self.waiters),
            archive_acks: section.ack == AckMode::QuorumArchive,
            wait,
        }
    }

    /// Refuses writes for `reason`, or takes them again (`None`).
    fn refuse_writes(&self, reason: Option<String>) {
        if self.durable.borrow().refusal == reason {
            return;
        }
        self.status
            .send_modify(|s| s.writes_refused.clone_from(&reason));
        let refused = reason.is_some();
        self.durable.send_modify(|d| d.refusal = reason);
        if refused {
            self.waiters.wake_all();
        }
    }

    /// Refuses writes as `role` requires, or takes them again: what every node does when
    /// nothing else (a fence, a cut-off archive) refuses them.
    pub fn refuse_for(&self, role: &Role) {
        self.refuse_writes(role.refusal());
    }

    pub fn status(&self) -> ArchiveStatus {
        self.status.borrow().clone()
    }

    pub fn floor(&self) -> watch::Receiver<Option<u64>> {
        self.floor.subscribe()
    }
}

/// What the uploader works with.
pub struct Uploader {
    pub target: ArchiveTarget,
    pub progress: ArchiveProgress,
    pub raft: Raft,
    pub log: LogStore<TypeConfig>,
    pub checkpoints: Option<Arc<Checkpoints>>,
    pub applied: watch::Receiver<u64>,
    pub metrics: Metrics,
    pub writer: epoch::Writer,
    /// Where a fence is recorded when another site took over.
    pub site: SiteState,
}

impl Uploader {
    /// Ships every `flush_ms` while this node leads, and follows the archive's progress
    /// while it does not, until `stop`.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        if let Role::Fenced { reason } = self.site.role() {
            // Fenced before a restart: forwarded writes are refused too, and nothing ships.
            self.progress.refuse_writes(Some(reason));
            return;
        }
        // Handing over before a restart: still refused.
        self.progress.refuse_for(&self.site.role());
        let mut writer: Option<ArchiveWriter> = None;
        let mut following: Option<Catalog> = None;
        let mut last_follow: Option<Instant> = None;
        // When this leader's last upload succeeded (or it began to lead).
        let mut last_ok: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.next_round() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            self.metrics.site_role.set(self.site.role().metric());
            if self.progress.floor.borrow().is_none() {
                // What the archive holds is not known yet: keep the whole log.
                self.progress.floor.send_replace(Some(0));
            }
            if !self.leads() {
                writer = None;
                last_ok = None;
                self.progress.refuse_for(&self.site.role());
                self.progress.status.send_modify(|s| s.uploading = false);
                if last_follow.is_none_or(|at| at.elapsed() >= FOLLOW_EVERY) {
                    last_follow = Some(Instant::now());
                    self.follow(&mut following).await;
                    if let Some(reason) = following.as_ref().and_then(|c| self.fenced_by(c)) {
                        self.fenced(reason);
                        return;
                    }
                }
                continue;
            }
            following = None;
            let since = *last_ok.get_or_insert_with(Instant::now);
            let shipped = self.ship_watched(&mut writer, since).await;
            if let Err(e @ ArchiveError::Fenced { .. }) = &shipped {
                self.fenced(e.to_string());
                return;
            }
            if shipped.is_ok() {
                last_ok = Some(Instant::now());
                self.progress.refuse_for(&self.site.role());
            }
            if let Err(e) = shipped {
                if !e.is_transient() {
                    writer = None;
                }
                self.failed(&e);
                // The archive stands still while entries keep coming: the lag must show it.
                let status = self.progress.status();
                let archived = status.archived_index.zip(status.archived_entry_time_us);
                let applied = *self.applied.borrow();
                self.update_lag(archived, applied);
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        }
    }

    /// Every `flush_ms`; under `ack = "quorum+archive"` a leader goes as soon as anything
    /// applied is not released yet, since writes wait for it (the round then goes on
    /// uploading for `flush_ms`, see [`Self::upload_gated`]).
    async fn next_round(&mut self) {
        let flush = self.target.section.flush();
        if self.target.section.ack == AckMode::Quorum || !self.leads() {
            return tokio::time::sleep(flush).await;
        }
        let durable = self.progress.durable.borrow().archived;
        let _ = tokio::time::timeout(flush, self.applied.wait_for(|a| *a > durable)).await;
    }

    /// A follower learns how far the archive got, so its log is kept from there: if it
    /// leads next, it ships what is missing. A store it cannot reach keeps the last value.
    async fn follow(&self, following: &mut Option<Catalog>) {
        let target = &self.target;
        let refreshed = match following.as_mut() {
            Some(catalog) => {
                let refreshed = catalog.refresh(&target.store, &target.protection).await;
                catalog.forget_before_newest_checkpoint();
                refreshed
            }
            None => match Catalog::load(&target.store, &target.protection).await {
                Ok(catalog) => {
                    *following = Some(catalog);
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        match (refreshed, following.as_ref()) {
            (Ok(()), Some(catalog)) => {
                let archived = catalog.last_entry().map_or(0, |(index, _)| index);
                self.progress.floor.send_replace(Some(archived));
                let newest = catalog.newest_epoch();
                self.site.update(|s| {
                    s.epoch = newest.map(|m| m.epoch);
                    s.writer = newest.map(|m| m.owner());
                });
            }
            (Err(e), _) => {
                tracing::debug!(error = %e, "cannot follow the archive; the log is kept");
            }
            (Ok(()), None) => {}
        }
    }

    /// Why this cluster is fenced, when the archive's newest epoch is another site's and
    /// this one wrote an older epoch: a follower learns it as soon as the leader does.
    fn fenced_by(&self, catalog: &Catalog) -> Option<String> {
        let newest = catalog.newest_epoch()?;
        let ours = catalog.epochs.iter().rev().find(|m| self.writer.owns(m))?;
        (!self.writer.owns(newest)).then(|| {
            format!(
                "epoch {} of the archive at {} belongs to {} (promoted at index {}); this site wrote epoch {}",
                newest.epoch,
                catalog.url,
                newest.owner(),
                newest.start_index,
                ours.epoch
            )
        })
    }

    /// Another site took over: record it, then stop shipping for good. The ingress
    /// refuses writes from here on, also after a restart.
    fn fenced(&self, reason: String) {
        self.metrics.site_role.set(2);
        // Writes waiting for the archive learn now that it never takes them.
        self.progress.refuse_writes(Some(reason.clone()));
        tracing::error!(%reason, "fenced: another site took this service over; writes are refused");
        self.progress
            .status
            .send_modify(|s| s.last_error = Some(reason.clone()));
        if let Err(e) = self.site.set_role(Role::Fenced { reason }) {
            tracing::error!(error = %e, "cannot record the fence; it holds until restart");
        }
    }

    /// Ships, opening the writer first if needed. With `fence_after_s`, writes are
    /// refused as soon as no upload succeeded for that long (`last_ok` on), even while this
    /// one still hangs: a site cut off from its archive stops acknowledging what a standby
    /// promoted meanwhile would never receive. A shipment that ends such a refusal first
    /// makes sure no promotion fenced this site meanwhile.
    async fn ship_watched(
        &mut self,
        writer: &mut Option<ArchiveWriter>,
        last_ok: Instant,
    ) -> Result<(), ArchiveError> {
        let (progress, url) = (self.progress.clone(), self.target.store.url().to_string());
        let limit = self.target.section.fence_after_s;
        let cut_off = async move {
            let Some(limit) = limit else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until((last_ok + Duration::from_secs(limit)).into()).await;
            let reason = format!(
                "no upload to the archive at {url} succeeded for {limit} s (archive.fence_after_s): writes are refused until one does"
            );
            if progress.durable.borrow().refusal.is_none() {
                tracing::error!(%reason, "cut off from the archive: writes refused");
            }
            progress.refuse_writes(Some(reason));
            std::future::pending().await
        };
        let refused = self.progress.durable.borrow().refusal.is_some();
        let shipping = async {
            let open = match writer {
                Some(open) => open,
                None => writer.insert(self.open_writer().await?),
            };
            self.ship(open).await?;
            match refused {
                true => open.confirm_unfenced().await,
                false => Ok(()),
            }
        };
        tokio::select! {
            shipped = shipping => shipped,
            never = cut_off => never,
        }
    }

    fn leads(&self) -> bool {
        leads(&self.raft)
    }

    async fn open_writer(&self) -> Result<ArchiveWriter, ArchiveError> {
        let now_us = chrono::Utc::now().timestamp_micros();
        let target = &self.target;
        let writer = ArchiveWriter::open(
            target.store.clone(),
            target.protection.clone(),
            &self.writer,
            now_us,
        )
        .await?;
        tracing::info!(
            url = target.store.url(),
            epoch = writer.epoch(),
            archived = ?writer.archived(),
            "archive open: this node leads and ships"
        );
        Ok(writer)
    }

    fn failed(&self, e: &ArchiveError) {
        self.metrics.archive_upload_errors.inc();
        tracing::warn!(url = self.target.store.url(), error = %e, "archive upload failed; retrying");
        self.progress
            .status
            .send_modify(|s| s.last_error = Some(e.to_string()));
    }

    /// Ships the committed entries the archive lacks, several objects at once, then starts
    /// a newer checkpoint's upload if there is one, then applies the archive's retention.
    async fn ship(&mut self, writer: &mut ArchiveWriter) -> Result<(), ArchiveError> {
        // Also when there is nothing to ship: an idle old primary must not take its next
        // write before it learns that another site took over (at most every second).
        writer.check_fence().await?;
        let (first_kept, last_in_log) = self.log_bounds().await?;
        let archived = writer.archived().map(|(index, _)| index);
        if let Some(archived) = archived.filter(|a| *a > last_in_log) {
            return Err(ArchiveError::Inconsistent {
                url: self.target.store.url().to_string(),
                reason: format!(
                    "it holds entries up to {archived}, beyond this node's log (which ends at {last_in_log}): does another cluster with the same [node] cluster and service name write to it?"
                ),
            });
        }
        let idle = writer.uploads_in_flight() == 0;
        if idle && archived.map_or(first_kept, |a| a + 1) < first_kept {
            // The log no longer holds what the archive needs: a checkpoint covers it.
            self.ship_newest_checkpoint(writer, first_kept.saturating_sub(1))
                .await?;
            self.finish_checkpoint(writer).await?;
        }
        match self.target.section.ack {
            AckMode::Quorum => self.upload_all(writer, first_kept).await?,
            AckMode::QuorumArchive => self.upload_gated(writer, first_kept).await?,
        }
        self.confirm_durable(writer).await?;
        self.ship_newest_checkpoint(writer, 0).await?;
        if self.target.section.ack == AckMode::Quorum {
            self.finish_checkpoint(writer).await?;
        }
        let section = &self.target.section;
        writer
            .apply_retention(section.keep, section.keep_days)
            .await?;
        writer.write_manifest_if_due().await?;
        let applied = *self.applied.borrow();
        self.report(writer, applied).await;
        Ok(())
    }

    /// Under `ack = "quorum"`: every entry applied when the round began, in objects
    /// uploading [`haven_archive::writer::MAX_UPLOADS_IN_FLIGHT`] at a time.
    async fn upload_all(
        &mut self,
        writer: &mut ArchiveWriter,
        first_kept: u64,
    ) -> Result<(), ArchiveError> {
        let applied = *self.applied.borrow();
        let mut tail = Tail::of(writer, first_kept);
        while self
            .start_uploads(writer, &mut tail, applied, false)
            .await?
        {
            let shipped = writer.finish_uploads().await?;
            self.count(shipped);
        }
        Ok(())
    }

    /// Under `ack = "quorum+archive"`, for one `flush_ms` (or until nothing is left in
    /// flight): starts an object of everything applied as soon as the previous object's
    /// PUT is done (up to [`haven_archive::writer::MAX_UPLOADS_IN_FLIGHT`] in flight), so
    /// a write waits for about one upload, not also for the one in progress, and under
    /// load the objects grow instead of multiplying. Each object's upload ends with a read
    /// of the next epoch's fence begun after its PUT, overlapping the next PUT; objects
    /// are taken back in index order, and each releases the writes it holds. A fence
    /// fails the upload that saw it and drops the later ones: their writes stay
    /// unreleased and time out as outcome-unknown, or learn of the fence at once
    /// ([`Self::fenced`]). A checkpoint uploads beside them.
    async fn upload_gated(
        &mut self,
        writer: &mut ArchiveWriter,
        first_kept: u64,
    ) -> Result<(), ArchiveError> {
        let round_ends = tokio::time::Instant::now() + self.target.section.flush();
        let mut tail = Tail::of(writer, first_kept);
        loop {
            let applied = *self.applied.borrow();
            self.start_uploads(writer, &mut tail, applied, true).await?;
            if writer.uploads_in_flight() == 0 && !writer.checkpoint_in_flight() {
                return Ok(());
            }
            // Everything applied is uploading or waits for a PUT: wait for more, for that
            // PUT, or for an upload to end.
            let put = writer.put_pending();
            let room = writer.has_room() && put.is_none() && tail.next > applied;
            let next = tail.next;
            tokio::select! {
                () = put_done(put.clone()), if put.is_some() => {}
                finished = writer.finish_next() => match finished {
                    Some(Finished::Log(shipped)) => {
                        self.count(shipped?);
                        self.release(writer);
                    }
                    Some(Finished::Checkpoint(shipped)) => self.checkpoint_archived(shipped?),
                    None => {}
                },
                more = async { self.applied.wait_for(|a| *a >= next).await.is_ok() }, if room => {
                    if !more {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep_until(round_ends) => return Ok(()),
            }
        }
    }

    /// Starts uploads of the entries after `tail`, up to `applied`, while there is room
    /// (with `confirm`, for `ack = "quorum+archive"`: one, once the previous PUT is done,
    /// see [`Self::upload_gated`]). Whether it started any.
    async fn start_uploads(
        &mut self,
        writer: &mut ArchiveWriter,
        tail: &mut Tail,
        applied: u64,
        confirm: bool,
    ) -> Result<bool, ArchiveError> {
        let mut started = false;
        let may_start = |writer: &ArchiveWriter| {
            writer.has_room() && (!confirm || writer.put_pending().is_none())
        };
        while may_start(writer) && tail.next <= applied {
            let entries = self.read(tail.next, applied, &mut tail.time_us).await?;
            let Some(last) = entries.last().map(|e| e.index) else {
                break;
            };
            started |= writer.start_upload(&entries, confirm)?;
            tail.next = last + 1;
        }
        Ok(started)
    }

    /// Under `ack = "quorum+archive"`, lets writes the archive held before this node
    /// uploaded anything (a new leader's) be acknowledged, once no promotion has fenced
    /// this site: a promotion reads the archive's end after its fence, so they are in its
    /// history. What this node uploads is released as each upload ends.
    async fn confirm_durable(&self, writer: &ArchiveWriter) -> Result<(), ArchiveError> {
        if self.target.section.ack == AckMode::Quorum || writer.uploads_in_flight() > 0 {
            return Ok(());
        }
        let Some((archived, _)) = writer.archived() else {
            return Ok(());
        };
        if archived <= self.progress.durable.borrow().archived {
            return Ok(());
        }
        writer.confirm_unfenced().await?;
        self.release(writer);
        Ok(())
    }

    /// Lets the writes up to the archive's end be acknowledged: called only after a read
    /// of the next epoch's fence, begun once all of them were stored, found none.
    fn release(&self, writer: &ArchiveWriter) {
        let Some((archived, _)) = writer.archived() else {
            return;
        };
        let advanced = self.progress.durable.send_if_modified(|durable| {
            let advanced = archived > durable.archived;
            durable.archived = durable.archived.max(archived);
            advanced
        });
        if advanced {
            self.progress.waiters.wake_up_to(archived);
        }
    }

    fn count(&self, shipped: Shipped) {
        self.metrics
            .archive_uploaded_objects
            .inc_by(shipped.objects);
        self.metrics.archive_uploaded_bytes.inc_by(shipped.bytes);
        if shipped.objects > 0 {
            let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
            self.metrics.archive_last_upload.set(now);
        }
    }

    /// Starts uploading the newest local checkpoint, when it is newer than the archive's
    /// newest and at or after `at_least` (and not beyond what the archive's log reaches,
    /// unless the log must be bridged), and no checkpoint is uploading already.
    async fn ship_newest_checkpoint(
        &self,
        writer: &mut ArchiveWriter,
        at_least: u64,
    ) -> Result<(), ArchiveError> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        // Runs every flush: the file is read only when the catalog's summary says a newer
        // checkpoint than the archive's exists.
        let archived_newest = writer.checkpoints().last().copied();
        let newest_local = checkpoints.summary().borrow().newest_index;
        if writer.checkpoint_in_flight()
            || newest_local.is_none()
            || newest_local <= archived_newest
        {
            return Ok(());
        }
        let local = checkpoints
            .newest()
            .await
            .map_err(ArchiveError::io("cannot list local checkpoints"))?;
        let Some(info) = local else { return Ok(()) };
        let reached = writer.archived().map_or(0, |(a, _)| a);
        let bridging = at_least > 0;
        let newer = archived_newest.is_none_or(|n| info.index > n);
        if !newer || info.index < at_least || (!bridging && info.index > reached) {
            return Ok(());
        }
        tracing::info!(index = info.index, "archiving checkpoint");
        writer.start_checkpoint(&info.path, info.index, info.term, info.entry_time_us);
        Ok(())
    }

    /// Waits for the checkpoint upload in flight, if any.
    async fn finish_checkpoint(&self, writer: &mut ArchiveWriter) -> Result<(), ArchiveError> {
        if let Some(shipped) = writer.finish_checkpoint().await {
            self.checkpoint_archived(shipped?);
        }
        Ok(())
    }

    fn checkpoint_archived(&self, shipped: Shipped) {
        tracing::info!(bytes = shipped.bytes, "checkpoint archived");
        self.count(shipped);
    }

    /// The first index the local log still holds, and its last.
    async fn log_bounds(&mut self) -> Result<(u64, u64), ArchiveError> {
        let state = self
            .log
            .get_log_state()
            .await
            .map_err(ArchiveError::io("cannot read the log state"))?;
        let first = state.last_purged_log_id.map_or(0, |p| p.index + 1);
        Ok((first, state.last_log_id.map_or(0, |l| l.index)))
    }

    /// Committed entries from `first`, as many as one object takes.
    async fn read(
        &mut self,
        first: u64,
        applied: u64,
        last_time: &mut i64,
    ) -> Result<Vec<ArchivedEntry>, ArchiveError> {
        let end = applied.min(first + MAX_OBJECT_ENTRIES - 1);
        let entries = self
            .log
            .try_get_log_entries(first..=end)
            .await
            .map_err(ArchiveError::io("cannot read the log"))?;
        let mut archived = Vec::with_capacity(entries.len());
        let mut bytes = 0;
        for (expected, entry) in (first..).zip(entries) {
            if entry.log_id.index != expected || bytes >= MAX_OBJECT_BYTES {
                break;
            }
            let payload = postcard::to_stdvec(&entry).map_err(|e| {
                ArchiveError::io("cannot encode an entry")(std::io::Error::other(e))
            })?;
            bytes += payload.len();
            *last_time = entry_time(&entry).unwrap_or(*last_time);
            archived.push(ArchivedEntry {
                index: entry.log_id.index,
                term: entry.log_id.leader_id.term,
                time_us: *last_time,
                payload: payload.into(),
            });
        }
        Ok(archived)
    }

    /// Status, metrics, the compaction floor and the backlog alarm after a shipment.
    async fn report(&mut self, writer: &ArchiveWriter, applied: u64) {
        let archived = writer.archived();
        let index = archived.map(|(i, _)| i);
        self.progress.floor.send_replace(Some(index.unwrap_or(0)));
        let (epoch, owner) = (writer.epoch(), self.writer.owner());
        self.site.update(|s| {
            s.epoch = Some(epoch);
            s.writer = Some(owner);
        });
        self.progress.status.send_modify(|s| {
            s.uploading = true;
            s.archived_index = index;
            s.archived_entry_time_us = archived.map(|(_, t)| t);
            s.last_error = None;
        });
        self.update_lag(archived, applied);
    }

    /// How far the archive is behind the replica in entries, and the backlog alarm (its
    /// age is [`RecoveryPoint`]'s).
    fn update_lag(&self, archived: Option<(u64, i64)>, applied: u64) {
        let index = archived.map(|(i, _)| i);
        let lag_entries = applied.saturating_sub(index.unwrap_or(0));
        self.metrics.archive_index.set(index.unwrap_or(0) as i64);
        self.metrics.archive_lag_entries.set(lag_entries as i64);
        let full = lag_entries > self.target.section.max_backlog_entries;
        if full {
            tracing::error!(
                lag_entries,
                limit = self.target.section.max_backlog_entries,
                "archive backlog over its limit: the object store is down or too slow; the log is kept until it is shipped"
            );
        }
        self.metrics.archive_backlog_full.set(i64::from(full));
        self.progress
            .status
            .send_modify(|s| s.lag_entries = lag_entries);
    }
}

/// Until the PUT `put` waits for is done, or failed.
async fn put_done(put: Option<watch::Receiver<bool>>) {
    if let Some(mut put) = put {
        let _ = put.wait_for(|stored| *stored).await;
    }
}

/// Where the next upload starts: the entry after what the archive holds or an upload in
/// flight will, and the entry time before it (entries without a time carry it on).
struct Tail {
    next: u64,
    time_us: i64,
}

impl Tail {
    fn of(writer: &ArchiveWriter, first_kept: u64) -> Self {
        let (next, time_us) = writer
            .upload_tail()
            .map_or((first_kept, 0), |(last, time)| (last + 1, time));
        Self { next, time_us }
    }
}

/// The leader's recovery point, measured every [`LAG_EVERY`] whatever the uploads do:
/// the wall-clock age of the oldest committed entry the archive lacks, which is how much
/// of the acknowledged history a site lost now would take with it (0 when the archive
/// has everything). An entry's time is the leader's clock when it was proposed.
pub struct RecoveryPoint {
    pub progress: ArchiveProgress,
    pub raft: Raft,
    pub log: LogStore<TypeConfig>,
    pub applied: watch::Receiver<u64>,
    pub metrics: Metrics,
}

impl RecoveryPoint {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // The oldest entry the archive lacks and its time, read once per archived index.
        let mut oldest: Option<(u64, i64)> = None;
        loop {
            let age_s = self.measure(&mut oldest).await;
            self.metrics.archive_lag_seconds.set(age_s);
            self.progress
                .status
                .send_modify(|s| s.lag_ms = (age_s * 1e3) as u64);
            tokio::select! {
                _ = tokio::time::sleep(LAG_EVERY) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Seconds; 0 on a node that does not lead (it ships nothing) and when nothing
    /// committed is missing from the archive.
    async fn measure(&mut self, oldest: &mut Option<(u64, i64)>) -> f64 {
        if !leads(&self.raft) {
            return 0.0;
        }
        // Both say what the archive holds at least: this node's uploads, and what it
        // learnt of the archive while it followed.
        let archived = self.progress.status().archived_index;
        let floor = *self.progress.floor.borrow();
        let missing = archived.max(floor).map_or(0, |a| a + 1);
        if missing > *self.applied.borrow() {
            return 0.0;
        }
        if oldest.is_none_or(|(index, _)| index != missing) {
            // Blank and membership entries carry no time: the first request's counts.
            let last = (missing + UNTIMED_ENTRIES).min(*self.applied.borrow());
            let entries = self.log.try_get_log_entries(missing..=last).await;
            let time = entries.ok().and_then(|e| e.iter().find_map(entry_time));
            *oldest = time.map(|t| (missing, t));
        }
        let now_us = chrono::Utc::now().timestamp_micros();
        oldest.map_or(0.0, |(_, t)| (now_us - t).max(0) as f64 / 1e6)
    }
}

fn leads(raft: &Raft) -> bool {
    let metrics = raft.metrics();
    let m = metrics.borrow_watched();
    m.current_leader == Some(m.id) && m.state.is_leader()
}
fn entry_time(entry: &Entry) -> Option<i64> {
    match &entry.payload {
        EntryPayload::Normal(request) => Some(request.time_unix_us),
        _ => None,
    }
}
