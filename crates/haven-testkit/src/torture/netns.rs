//! Network partitions through network namespaces, with the shared `netns-hosts` tool:
//! one host (namespace) per node, plus one for the harness and its clients, on a bridge.
//! Cutting two hosts drops their packets both ways (iptables), so peers see silence, as
//! in a real partition, not a polite connection reset.
//!
//! The harness itself must sit on the bridge to reach the nodes, so the outer `haven
//! torture` creates the hosts and runs itself again inside the client host
//! ([`NetHosts::reexec`]); the inner run starts every node and app replica inside its own
//! host and cuts and heals links as the schedule says. The outer run deletes the hosts
//! when the inner one ends.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::ExitStatus;

use anyhow::Context;
use anyhow::bail;

use crate::cluster::Host;

/// The hosts of one run. Hosts `1..=nodes` carry the nodes, host `nodes + 1` the clients.
#[derive(Debug)]
pub struct NetHosts {
    tool: PathBuf,
    prefix: String,
    nodes: usize,
    /// The process that created the hosts deletes them when it is done.
    owner: bool,
}

/// Why partitions cannot be used here, if they cannot.
pub fn unavailable_reason(tool: &Path) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not running as root (network namespaces need it)".to_string());
    }
    if !tool.is_file() {
        return Some(format!("{} not found", tool.display()));
    }
    None
}

impl NetHosts {
    /// Creates `nodes + 1` hosts named `prefix1..` and tries one cut and heal (the tool
    /// needs iptables, which `up` does not use); on failure deletes what was made.
    pub fn up(tool: &Path, prefix: &str, nodes: usize) -> anyhow::Result<Self> {
        let hosts = Self {
            tool: tool.to_path_buf(),
            prefix: prefix.to_string(),
            nodes,
            owner: true,
        };
        hosts.tool(&["up", &(nodes + 1).to_string(), prefix])?;
        hosts.tool(&["cut", "1", "2", prefix])?;
        hosts.tool(&["heal", prefix])?;
        Ok(hosts)
    }

    /// The hosts an outer run created, as seen from inside the client host.
    pub fn attach(tool: &Path, prefix: &str, nodes: usize) -> Self {
        Self {
            tool: tool.to_path_buf(),
            prefix: prefix.to_string(),
            nodes,
            owner: false,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where node `i` (0-based) runs: its own host, at 127.100.0.(i+1).
    pub fn node_hosts(&self) -> Vec<Host> {
        (1..=self.nodes).map(|h| self.host(h)).collect()
    }

    fn host(&self, h: usize) -> Host {
        Host {
            ip: std::net::IpAddr::from([127, 100, 0, h as u8]),
            launcher: ["ip", "netns", "exec"]
                .iter()
                .map(|s| s.to_string())
                .chain([format!("{}{h}", self.prefix)])
                .collect(),
        }
    }

    /// Runs `exe args` inside the client host and waits for it.
    pub fn reexec(&self, exe: &Path, args: &[String]) -> anyhow::Result<ExitStatus> {
        let launcher = self.host(self.nodes + 1).launcher;
        Command::new(&launcher[0])
            .args(&launcher[1..])
            .arg(exe)
            .args(args)
            .status()
            .with_context(|| format!("running {} inside {}", exe.display(), launcher.join(" ")))
    }

    /// Drops all traffic between nodes `a` and `b` (0-based).
    pub async fn cut(&self, a: usize, b: usize) -> anyhow::Result<()> {
        let (a, b) = ((a + 1).to_string(), (b + 1).to_string());
        self.tool_async(&["cut", &a, &b, &self.prefix]).await
    }

    /// Removes every cut.
    pub async fn heal(&self) -> anyhow::Result<()> {
        self.tool_async(&["heal", &self.prefix]).await
    }

    fn tool(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new(&self.tool)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.tool.display()))?;
        check(&self.tool, args, output)
    }

    async fn tool_async(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = tokio::process::Command::new(&self.tool)
            .args(args)
            .output()
            .await
            .with_context(|| format!("running {}", self.tool.display()))?;
        check(&self.tool, args, output)
    }
}

fn check(tool: &Path, args: &[&str], output: std::process::Output) -> anyhow::Result<()> {
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            tool.display(),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for NetHosts {
    fn drop(&mut self) {
        if self.owner
            && let Err(e) = self.tool(&["down", &self.prefix])
        {
            tracing::warn!(error = %e, prefix = %self.prefix, "cannot delete the test hosts");
        }
    }
}
