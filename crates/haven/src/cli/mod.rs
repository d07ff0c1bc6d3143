//! One module per subcommand; `main.rs` only parses flags and dispatches.

pub mod bench;
pub mod checkpoints;
pub mod demo;
pub mod members;
pub mod services;
pub mod status;

/// A node's admin endpoint and, on a node with several services, which one a command is
/// about.
#[derive(clap::Args, Debug, Clone)]
pub struct AdminTarget {
    /// The node's admin address, e.g. 127.0.0.1:7001.
    #[arg(long)]
    pub admin: String,
    /// The service, on a node that runs several (`[[service]] name`).
    #[arg(long)]
    pub service: Option<String>,
}

impl AdminTarget {
    /// `http://ADMIN/path`, naming the service when one was given.
    pub fn url(&self, path: &str) -> String {
        let base = admin_base(&self.admin);
        match &self.service {
            Some(service) => format!("{base}{path}?service={service}"),
            None => format!("{base}{path}"),
        }
    }
}

/// A node's admin base URL from `--admin`, which may omit the scheme.
pub fn admin_base(admin: &str) -> String {
    if admin.starts_with("http://") {
        admin.to_string()
    } else {
        format!("http://{admin}")
    }
}
