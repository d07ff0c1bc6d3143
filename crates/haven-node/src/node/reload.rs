//! A reload brings a running node's services in line with its config file: services the
//! file no longer names stop (and with `wipe` lose their log, checkpoints and managed
//! app data), new ones open and start as on a first start (each node proposes the same
//! initial membership, so the group forms once every node has reloaded), and changed
//! ones restart with their new settings. What the node shares (`[node]`, `[raft]`)
//! cannot change while it runs: such a file is refused whole, and nothing changes.

use std::path::Path;

use super::Node;
use crate::admin::reload::Failed;
use crate::admin::reload::ReloadReport;
use crate::admin::reload::Wiped;
use haven_base::config::Config;
use haven_base::config::ServiceConfig;

/// Which services a reload adds, removes, restarts and keeps, by name.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
    unchanged: Vec<String>,
}

impl Plan {
    fn new(old: &[ServiceConfig], new: &[ServiceConfig]) -> Self {
        let find =
            |list: &[ServiceConfig], name: &str| list.iter().find(|s| s.name == name).cloned();
        let mut plan = Plan::default();
        for service in old {
            match find(new, &service.name) {
                None => plan.removed.push(service.name.clone()),
                Some(now) if now != *service => plan.changed.push(service.name.clone()),
                Some(_) => plan.unchanged.push(service.name.clone()),
            }
        }
        plan.added = new
            .iter()
            .filter(|s| find(old, &s.name).is_none())
            .map(|s| s.name.clone())
            .collect();
        plan
    }
}

impl Node {
    /// Reads `path` again and applies it; the reason when the file is refused.
    pub(super) async fn reload(&mut self, path: &Path, wipe: bool) -> Result<ReloadReport, String> {
        let new = Config::load(path).map_err(|e| e.to_string())?;
        refuse_shared_changes(&self.config, &new)?;
        let plan = Plan::new(&self.config.services, &new.services);
        let old = std::mem::replace(&mut self.config, new);
        for name in plan.removed.iter().chain(&plan.changed) {
            if let Some(at) = self.services.iter().position(|r| r.service.name == *name) {
                let running = self.services.remove(at);
                self.stop_service(running).await;
            }
        }
        let mut report = ReloadReport {
            node: self.config.node.id,
            ..ReloadReport::default()
        };
        if wipe {
            for service in old
                .services
                .iter()
                .filter(|s| plan.removed.contains(&s.name))
            {
                match wipe_service(&old, service) {
                    Ok(wiped) => report.wiped.extend(wiped),
                    Err(error) => report.failed.push(Failed {
                        service: service.name.clone(),
                        error,
                    }),
                }
            }
        }
        for name in plan.added.iter().chain(&plan.changed) {
            if let Err(e) = self.open_and_start(name).await {
                tracing::error!(service = %name, error = %e, "service did not start");
                report.failed.push(Failed {
                    service: name.clone(),
                    error: e.to_string(),
                });
            }
        }
        let Plan {
            added,
            removed,
            changed,
            unchanged,
        } = plan;
        Ok(ReloadReport {
            added,
            removed,
            restarted: changed,
            unchanged,
            ..report
        })
    }

    pub(super) async fn open_and_start(
        &mut self,
        name: &str,
    ) -> Result<(), haven_service::service::ServiceError> {
        let Some(config) = self
            .config
            .services
            .iter()
            .find(|s| s.name == name)
            .cloned()
        else {
            return Ok(());
        };
        let running = self.open(config).await?;
        self.serve_raft(&running);
        self.start(running).await
    }
}

/// A running node keeps its identity, addresses, data directory and Raft timing: they are
/// bound, locked or shared by every service. `join` and `[[peers]]` may change (peers
/// only matter to services that start later).
fn refuse_shared_changes(old: &Config, new: &Config) -> Result<(), String> {
    let (a, b) = (&old.node, &new.node);
    let mut changed = Vec::new();
    let mut check = |key: &str, same: bool| {
        if !same {
            changed.push(key.to_string());
        }
    };
    check("node.id", a.id == b.id);
    check("node.cluster", a.cluster == b.cluster);
    check("node.zone", a.zone == b.zone);
    check("node.client_addr", a.client_addr == b.client_addr);
    check("node.raft_addr", a.raft_addr == b.raft_addr);
    check("node.admin_addr", a.admin_addr == b.admin_addr);
    check("node.data_dir", a.data_dir == b.data_dir);
    check("raft", old.raft == new.raft);
    if changed.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the config changes {}, which a running node cannot take: restart the node for them (nothing was reloaded)",
        changed.join(", ")
    ))
}

/// Deletes a removed service's directory under the node's data directory and, when
/// Haven managed its app, the app's data directory.
fn wipe_service(config: &Config, service: &ServiceConfig) -> Result<Vec<Wiped>, String> {
    let mut dirs = vec![config.service_dir(service)];
    if service.app.command.is_some()
        && let Some(app_dir) = &service.app.data_dir
    {
        if config.node.data_dir.starts_with(app_dir) {
            return Err(format!(
                "not wiping {}: it holds the node's data directory {}",
                app_dir.display(),
                config.node.data_dir.display()
            ));
        }
        dirs.push(app_dir.clone());
    }
    let mut wiped = Vec::new();
    for path in dirs {
        let bytes = dir_bytes(&path);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot wipe {}: {e}", path.display())),
        }
        tracing::info!(service = %service.name, path = %path.display(), bytes, "wiped");
        wiped.push(Wiped {
            service: service.name.clone(),
            path,
            bytes,
        });
    }
    Ok(wiped)
}

/// Bytes of the files under `path`, not following symlinks; what can't be read counts 0.
fn dir_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| dir_bytes(&entry.path()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, url: &str) -> ServiceConfig {
        let text = format!(
            "[node]\nid = 1\nclient_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:2\"\nadmin_addr = \"127.0.0.1:3\"\ndata_dir = \"/d\"\n[[peers]]\nid = 1\nraft_addr = \"127.0.0.1:2\"\nclient_addr = \"127.0.0.1:1\"\n[[service]]\nname = \"{name}\"\n[service.app]\nurl = \"{url}\"\n"
        );
        haven_base::config::Config::parse(&text, Path::new("t.toml"))
            .unwrap()
            .services
            .remove(0)
    }

    #[test]
    fn a_plan_sorts_services_by_what_changes() {
        let old = [
            service("a", "http://x:1"),
            service("b", "http://x:2"),
            service("c", "http://x:3"),
        ];
        let new = [
            service("c", "http://x:3"),
            service("b", "http://x:9"),
            service("d", "http://x:4"),
        ];
        let plan = Plan::new(&old, &new);
        assert_eq!(
            plan,
            Plan {
                added: vec!["d".into()],
                removed: vec!["a".into()],
                changed: vec!["b".into()],
                unchanged: vec!["c".into()],
            }
        );
    }

    #[test]
    fn a_wipe_counts_what_it_deletes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("x/y")).unwrap();
        std::fs::write(dir.path().join("x/a"), [0; 10]).unwrap();
        std::fs::write(dir.path().join("x/y/b"), [0; 5]).unwrap();
        assert_eq!(dir_bytes(&dir.path().join("x")), 15);
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
    }
}
