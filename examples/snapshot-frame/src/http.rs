//! The hooks' HTTP answers.

use std::fmt::Display;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::warn;

use crate::fsutil::IoError;
use crate::receive::ReceiveError;

/// A `text/plain` answer.
pub fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        body,
    )
        .into_response()
}

/// `Haven-Index` values (`None`: no header) that `PUT /_haven/restore` must
/// refuse with `400` before it reads the body, since the header is required
/// and is one decimal log index from 1 to 2^64-1: absent, empty, zero, not a
/// number, too large. For the apps' tests of that refusal.
pub const MALFORMED_HAVEN_INDEXES: [Option<&str>; 5] = [
    None,
    Some(""),
    Some("0"),
    Some("x"),
    Some("18446744073709551616"),
];

/// Why a restore failed: `R` is the app's reason for an invalid body, `A` its
/// error.
#[derive(Debug)]
pub enum RestoreError<R, A> {
    /// The body is not a valid snapshot (`400`); nothing changed.
    Invalid(R),
    /// The request body could not be read (`400`); nothing changed.
    Body(axum::Error),
    /// The app could not write or swap the files (`500`).
    App(A),
}

impl<R, A: From<IoError>> From<IoError> for RestoreError<R, A> {
    fn from(e: IoError) -> Self {
        RestoreError::App(e.into())
    }
}

impl<R0, R: From<R0>, A: From<IoError>> From<ReceiveError<R0>> for RestoreError<R, A> {
    fn from(e: ReceiveError<R0>) -> Self {
        match e {
            ReceiveError::Invalid(why) => RestoreError::Invalid(why.into()),
            ReceiveError::Io(e) => e.into(),
        }
    }
}

/// The answer to `PUT /_haven/restore` at `Haven-Index: index`: `204`, or `400
/// invalid snapshot: {reason}`, `400 cannot read the snapshot body: {error}`,
/// or the app's `internal_error` answer.
pub fn respond<R: Display, A>(
    index: u64,
    result: Result<(), RestoreError<R, A>>,
    internal_error: impl FnOnce(&A) -> Response,
) -> Response {
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(RestoreError::Invalid(why)) => {
            warn!(haven_index = index, reason = %why, "rejected a snapshot");
            text(StatusCode::BAD_REQUEST, format!("invalid snapshot: {why}"))
        }
        Err(RestoreError::Body(e)) => text(
            StatusCode::BAD_REQUEST,
            format!("cannot read the snapshot body: {e}"),
        ),
        Err(RestoreError::App(e)) => internal_error(&e),
    }
}
