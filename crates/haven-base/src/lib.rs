//! What every layer of a Haven node shares and that knows nothing of Raft or of the app:
//! the configuration file ([`config`]), the metrics registry ([`metrics`]), named
//! background tasks ([`workers`]) and the lock on a data directory ([`lock`]).

pub mod config;
pub mod lock;
pub mod metrics;
pub mod workers;
