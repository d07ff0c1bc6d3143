//! One module per subcommand; `main.rs` only parses flags and dispatches.

pub mod bench;
pub mod checkpoints;
pub mod demo;
pub mod status;
