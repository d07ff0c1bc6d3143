//! What every layer of a Haven node shares and that knows nothing of Raft or of the app:
//! the configuration file ([`config`]), the keys the environment overrides
//! ([`overrides`]) and the checks and intervals written in it ([`checks`]), the alert and
//! scale rules ([`rules`]), the metrics registry ([`metrics`]), named
//! background tasks ([`workers`]), the lock on a data directory ([`lock`]) and how an
//! error is described with its causes ([`errors`]).

pub mod certs;
pub mod checks;
pub mod config;
pub mod errors;
pub mod lock;
pub mod metrics;
pub mod overrides;
pub mod rules;
pub mod tls;
pub mod workers;
