//! Integration tests of `haven-log`: openraft conformance, durability, recovery, group commit.

mod common;
mod conformance;
mod durability;
mod migration;
mod raft_node;
