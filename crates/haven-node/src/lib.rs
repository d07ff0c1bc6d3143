//! One Haven node, its modules in the order a client request meets them.
//!
//! # Layout
//! - [`ingress`]: client HTTP; classifies each request ([`routes`]) and orders or reads it.
//! - [`consensus`]: openraft wiring, the node-to-node transport, proposing on the leader.
//! - `haven_log` (crate): the durable Raft log.
//! - [`apply`]: the state machine; delivers committed entries to the replica in order,
//!   holds the idempotency table and answers the waiting client.
//! - [`app`]: the HTTP client toward this node's replica.
//! - [`admin`] and [`metrics`]: status and Prometheus metrics on the admin port.
//! - [`config`]: the TOML file; [`types`]: values shared by the above; [`runtime`]:
//!   openraft's runtime (tokio, seedable for the simulation).
//! - [`service`]: one protected app: its Raft group, log, apply state, replica and
//!   checkpoints.
//! - [`node`]: assembly, start order and shutdown; [`workers`]: its named background tasks.

pub mod admin;
pub mod app;
pub mod apply;
pub mod checkpoint;
pub mod config;
pub mod consensus;
pub mod ingress;
pub mod lock;
pub mod metrics;
pub mod node;
pub mod restore;
pub mod routes;
pub mod runtime;
pub mod service;
pub mod types;
pub mod workers;
