//! `haven cert init|issue`: a quick-start CA and node certificates for `[tls]`.

use std::path::PathBuf;

use clap::Subcommand;
use haven_base::certs;

#[derive(Subcommand)]
pub enum CertCommand {
    /// Create a cluster CA: `DIR/ca.pem` (give it to every node as `[tls] ca`) and
    /// `DIR/ca.key` (keep it off the nodes; it signs new node certificates). Never
    /// overwrites.
    Init {
        /// Where the CA's two files go (created if missing)
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue `DIR/NAME.pem` and `DIR/NAME.key` for one node (`[tls] cert` and `key`),
    /// signed by the CA in DIR, valid as TLS server and client for every `--host`.
    Issue {
        /// The CA's directory (`haven cert init`); the node's two files go there too
        #[arg(long)]
        dir: PathBuf,
        /// Names the files, e.g. `node1`.
        #[arg(long)]
        name: String,
        /// An IP address or DNS name the node is reached by (its raft, client and admin
        /// addresses' hosts); repeat for several.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
}

pub fn run(command: CertCommand) -> anyhow::Result<String> {
    let issued = match command {
        CertCommand::Init { dir } => certs::init(&dir)?,
        CertCommand::Issue { dir, name, hosts } => certs::issue(&dir, &name, &hosts)?,
    };
    Ok(format!(
        "wrote {} and {} (private: mode 0600)\n",
        issued.cert.display(),
        issued.key.display()
    ))
}
