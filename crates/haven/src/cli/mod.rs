//! One module per subcommand; `main.rs` only parses flags and dispatches.

use haven_client::admin::AdminClient;

pub mod archive;
pub mod audit;
pub mod cert;
pub mod checkpoints;
pub mod demo;
pub mod demo_load;
pub mod demo_site;
pub mod drill;
pub mod failback;
pub mod members;
pub mod plan;
pub mod promote;
pub mod services;
pub mod site;
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
    /// A client of the node, about the service when one was given.
    pub fn client(&self, timeout: std::time::Duration) -> AdminClient {
        AdminClient::new(&self.admin, timeout).service(self.service.as_deref())
    }
}
