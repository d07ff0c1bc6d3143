//! Talking to a running node over HTTP: one typed client of the admin API ([`admin`]),
//! shared by the CLI, the cluster harness, the benchmarks and the tests; the plain HTTP
//! client beneath it ([`http`]); and one parser of the `/metrics` page ([`metrics_text`]).

pub mod admin;
pub mod http;
pub mod metrics_text;

pub use admin::AdminClient;
pub use http::ClientError;
pub use http::Http;
pub use http::Reply;
