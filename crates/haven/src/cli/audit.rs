//! `haven audit --config NODE.toml [--json]`: the node's trail of admin changes (who by
//! token holder, what, when, the answer), oldest first.

use std::path::PathBuf;

use clap::Args;
use haven_base::config::Config;
use haven_node::admin::auth;

#[derive(Args)]
pub struct AuditArgs {
    /// The node's config (its data directory holds the trail).
    #[arg(long)]
    config: PathBuf,
    /// One JSON array (the whole trail) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &AuditArgs) -> anyhow::Result<String> {
    let config = Config::load(&args.config)?;
    let trail = auth::read_trail(&config.node.data_dir)?;
    if args.json {
        return Ok(format!("{}\n", serde_json::to_string(&trail)?));
    }
    let mut text = String::new();
    for e in &trail {
        text.push_str(&format!(
            "{}  {:<12} {:>3}  {} {}\n",
            e.time,
            e.who.as_deref().unwrap_or("(refused)"),
            e.status,
            e.method,
            e.path
        ));
    }
    if trail.is_empty() {
        text.push_str("(no admin change recorded)\n");
    }
    Ok(text)
}
