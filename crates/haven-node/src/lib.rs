//! One Haven node: the top layer. A client request meets, in order:
//! - [`ingress`]: client HTTP; picks the service (Host or path prefix), applies its
//!   limits, classifies the request ([`routes`]) and orders it or reads it through
//!   `haven_consensus::client`;
//! - `haven_consensus` (crate): the service's Raft group orders it over the shared raft
//!   port; `haven_log` (crate) makes it durable;
//! - `haven_service` (crate): applies it to the replica and answers the waiting client.
//!
//! Beside the request path: [`admin`] (status, metrics, membership, checkpoints, reload
//! on the admin port), [`node`] (assembly, the services a node hosts, their start
//! order, reload and shutdown) and [`rules`] (alert and scale rules over the node's own
//! metrics).

pub mod admin;
pub mod ingress;
pub mod node;
pub mod progress;
pub mod routes;
pub mod rules;
