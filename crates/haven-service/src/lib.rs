//! One protected app, a *service*, in the order a committed entry meets it:
//! - [`apply`]: the state machine openraft drives; delivers committed entries to the
//!   replica in order, holds the idempotency table and answers the waiting client.
//! - [`app`]: the replica itself: the HTTP/1 pipeline toward it, the managed process,
//!   and the pause/resume hooks.
//! - [`checkpoint`]: capturing, keeping and serving the service's checkpoints.
//! - [`restore`]: rebuilding a replica from a checkpoint and the log.
//! - [`divergence`]: the replicas' answers compared, and the first one that differs.
//! - [`archive`], [`site`], [`standby`], [`failback`]: the off-site tier: shipping to
//!   the archive, the site's role, following another site's archive and taking over,
//!   and handing the service back.
//! - [`service`]: opening all of the above in order, starting its Raft group, and
//!   shutting it down in reverse.

pub mod app;
pub mod apply;
pub mod archive;
pub mod checkpoint;
pub mod divergence;
pub mod failback;
pub mod restore;
pub mod service;
pub mod site;
pub mod standby;

pub use service::NodeShared;
pub use service::Service;
pub use service::ServiceError;
