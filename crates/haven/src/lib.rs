//! The `haven` binary's library half: one module per command that talks to nodes
//! ([`cli`]). The process cluster, the torture run and the benchmarks it launches live in
//! `haven_testkit`; the admin client in `haven_client`.

pub mod cli;
