//! One module per subcommand; `main.rs` only parses flags and dispatches.

pub mod bench;
pub mod checkpoints;
pub mod demo;
pub mod members;
pub mod status;

/// A node's admin base URL from `--admin`, which may omit the scheme.
pub fn admin_base(admin: &str) -> String {
    if admin.starts_with("http://") {
        admin.to_string()
    } else {
        format!("http://{admin}")
    }
}
