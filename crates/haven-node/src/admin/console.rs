//! The web console: one page, shipped inside the binary (no build step, nothing fetched
//! from anywhere else), that asks this node's `/services` once a second and draws every
//! service, its members and their health. It only reads, so it carries no token of its
//! own: where `[admin] public_reads = false`, the page asks for one and keeps it for the
//! browser tab only.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::Html;
use axum::response::IntoResponse;
use axum::routing::get;

use super::AdminState;

const PAGE: &str = include_str!("console.html");

/// The page may run its own inline script and style and talk to this node alone.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /` and `GET /console`.
pub fn routes() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/", get(page))
        .route("/console", get(page))
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(PAGE),
    )
}
