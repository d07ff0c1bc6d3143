//! Which site writes a service. A service with an off-site archive is, at any time, the
//! *primary* (it takes writes and archives them), a *standby* (it follows another site's
//! archive and serves stale reads) or *fenced* (it was primary and another site took
//! over). The role is kept in `site.json` in the service's directory, written before it
//! takes effect: a fenced node that restarts stays fenced, and a promoted standby stays
//! primary, whatever its config file says about where it started.

use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

const SITE_FILE: &str = "site.json";
/// What a client is told while its site hands the service over.
pub const HANDING_OVER: &str = "a planned switchover is under way: this site takes no new writes and hands the service to the standby site, which takes them once promoted";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Role {
    /// Takes writes and archives them.
    #[default]
    Primary,
    /// Follows another site's archive; reads are stale, writes refused.
    Standby,
    /// Was primary until another site took over; takes no writes.
    Fenced { reason: String },
    /// Primary during a planned switchover: takes no new writes while the archive
    /// catches up with what it has, so the standby promoted next starts from all of it.
    #[serde(rename = "handing-over")]
    HandingOver,
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Fenced { .. } => "fenced",
            Role::HandingOver => "handing-over",
        }
    }

    /// `haven_site_role`.
    pub fn metric(&self) -> i64 {
        match self {
            Role::Primary => 0,
            Role::Standby => 1,
            Role::Fenced { .. } => 2,
            Role::HandingOver => 3,
        }
    }

    /// Why writes are refused in this role, if they are.
    pub fn refusal(&self) -> Option<String> {
        match self {
            Role::Primary | Role::Standby => None,
            Role::Fenced { reason } => Some(reason.clone()),
            Role::HandingOver => Some(HANDING_OVER.to_string()),
        }
    }
}

/// What status shows about the service's site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// This node's `[node] site`.
    pub site: String,
    pub role: Role,
    /// The archive's newest epoch as this node last saw it.
    pub epoch: Option<u64>,
    /// Who writes that epoch, as the archive names it (`cluster/service at site b`).
    pub writer: Option<String>,
    /// A standby's applied index and the archive's end.
    pub applied_index: Option<u64>,
    pub archive_index: Option<u64>,
    /// How far a standby is behind the archive: entries, and entry time in milliseconds.
    pub lag_entries: u64,
    pub lag_ms: u64,
    /// When a standby last read the archive successfully (microseconds since the epoch).
    pub looked_at_us: Option<i64>,
    pub last_error: Option<String>,
}

impl SiteStatus {
    /// How stale a standby's reads are at `now_us`: its lag behind the archive when it
    /// last looked, plus the time since.
    pub fn staleness_ms(&self, now_us: i64) -> u64 {
        let since = self
            .looked_at_us
            .map_or(0, |at| (now_us - at).max(0) as u64 / 1000);
        self.lag_ms + since
    }
}

/// A service's role, persisted, and its site status, shared with ingress and status.
#[derive(Clone)]
pub struct SiteState {
    dir: PathBuf,
    status: watch::Sender<SiteStatus>,
}

impl SiteState {
    /// The role recorded in `service_dir`, or the configured one when none is (standby
    /// when the service has a `[standby]` table).
    pub fn open(service_dir: &Path, site: &str, standby: bool) -> std::io::Result<Self> {
        let role = match std::fs::read(service_dir.join(SITE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!(
                    "{} is damaged: {e}",
                    service_dir.join(SITE_FILE).display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match standby {
                true => Role::Standby,
                false => Role::Primary,
            },
            Err(e) => return Err(e),
        };
        let status = SiteStatus {
            site: site.to_string(),
            role,
            ..SiteStatus::default()
        };
        Ok(Self {
            dir: service_dir.to_path_buf(),
            status: watch::channel(status).0,
        })
    }

    pub fn role(&self) -> Role {
        self.status.borrow().role.clone()
    }

    pub fn status(&self) -> SiteStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<SiteStatus> {
        self.status.subscribe()
    }

    /// Records `role` on disk (fsynced), then makes it the role everyone sees.
    pub fn set_role(&self, role: Role) -> std::io::Result<()> {
        let path = self.dir.join(SITE_FILE);
        let tmp = self.dir.join(format!(".{SITE_FILE}.tmp"));
        let json = serde_json::to_vec_pretty(&role).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, json)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        haven_frame::sync_path(&self.dir)?;
        tracing::info!(role = role.name(), "site role recorded");
        self.status.send_modify(|s| s.role = role);
        Ok(())
    }

    /// The service's directory, where `site.json` lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn update(&self, change: impl FnOnce(&mut SiteStatus)) {
        self.status.send_modify(change);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_role_outlives_the_configured_one() {
        let dir = tempfile::tempdir().unwrap();
        let state = SiteState::open(dir.path(), "b", true).unwrap();
        assert_eq!(state.role(), Role::Standby);
        state.set_role(Role::Primary).unwrap();
        let reopened = SiteState::open(dir.path(), "b", true).unwrap();
        assert_eq!(reopened.role(), Role::Primary);
        let fenced = Role::Fenced {
            reason: "epoch 2 by haven/orders at site b".into(),
        };
        reopened.set_role(fenced.clone()).unwrap();
        assert_eq!(
            SiteState::open(dir.path(), "a", false).unwrap().role(),
            fenced
        );
    }

    #[test]
    fn staleness_grows_with_the_time_since_the_last_look() {
        let status = SiteStatus {
            lag_ms: 150,
            looked_at_us: Some(1_000_000),
            ..SiteStatus::default()
        };
        assert_eq!(status.staleness_ms(1_500_000), 650);
        assert_eq!(status.staleness_ms(900_000), 150);
    }
}
