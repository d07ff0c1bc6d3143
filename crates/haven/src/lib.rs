//! The `haven` binary's library half: command implementations and the local process
//! cluster that the demo runs and the end-to-end tests break. `anyhow` lives only here.

pub mod admin_client;
pub mod cli;
pub mod cluster;
pub mod http_client;
pub mod metrics_text;
pub mod torture;
