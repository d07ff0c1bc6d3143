//! Integration tests of `haven-log`: openraft conformance, durability, recovery, group commit.

mod common;
mod conformance;
mod durability;
mod raft_node;
