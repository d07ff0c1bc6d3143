//! The HTTP routes over a [`TreeApp`]; the crate docs give the interface.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path as UrlPath, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use haven_snapshot_frame::text;
use tracing::{debug, error, info, warn};

use crate::state::{Executed, json_string};
use crate::tree::{Done, MAX_DATA_LEN, Op, Outcome, TreeError};
use crate::{TreeApp, TreeAppError};

/// Name of the header carrying the log index of a request delivered by Haven.
pub const HAVEN_INDEX_HEADER: &str = haven_contract::headers::INDEX;

/// Name of the request header that makes a set or delete a compare-and-set.
pub const IF_VERSION_HEADER: &str = "if-version";

/// Name of the response header carrying a node's version on `GET /tree/...`.
pub const TREE_VERSION_HEADER: &str = "tree-version";

/// Largest request body: the largest data plus a margin, so that data just
/// over the limit gets the model's exact `413` rather than axum's.
const MAX_BODY_LEN: usize = MAX_DATA_LEN + 4096;

const BAD_HAVEN_INDEX: &str =
    "invalid Haven-Index header: expected one decimal log index from 1 to 18446744073709551615";

const BAD_IF_VERSION: &str =
    "invalid If-Version header: expected one decimal version from 0 to 18446744073709551615";

/// The tree app's routes (see the crate docs) over `app`.
pub fn router(app: Arc<TreeApp>) -> Router {
    let node = put(create).get(read).post(set).delete(delete);
    Router::new()
        .route("/tree/", node.clone())
        .route("/tree/{*path}", node)
        .route("/children/", get(children))
        .route("/children/{*path}", get(children))
        .route("/sync", post(sync))
        .route("/digest", get(digest))
        .route("/dump", get(dump))
        .route(haven_contract::paths::SNAPSHOT, get(snapshot))
        // Streamed; the body limit applies only to the extractors that buffer.
        .route(haven_contract::paths::RESTORE, put(restore))
        .layer(DefaultBodyLimit::max(MAX_BODY_LEN))
        .with_state(app)
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The node path of a `/tree/...` or `/children/...` URL (`/` when the URL
/// names the root). Path syntax is left to the model, so it is journaled like
/// any other error.
struct NodePath(String);

impl<S: Send + Sync> FromRequestParts<S> for NodePath {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<NodePath, Response> {
        match Option::<UrlPath<String>>::from_request_parts(parts, state).await {
            Ok(rest) => Ok(NodePath(format!(
                "/{}",
                rest.map(|UrlPath(rest)| rest).unwrap_or_default()
            ))),
            Err(rejection) => Err(text(
                StatusCode::BAD_REQUEST,
                format!("bad path: {}", rejection.body_text()),
            )),
        }
    }
}

/// A malformed header; answered `400` with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BadHeader(&'static str);

impl IntoResponse for BadHeader {
    fn into_response(self) -> Response {
        text(StatusCode::BAD_REQUEST, self.0.to_owned())
    }
}

/// Parses a header holding one decimal number of at least `min`: `Ok(None)` if
/// absent, `Err(bad)` if malformed (empty, signs, spaces, overflow, twice).
fn decimal_header(
    headers: &HeaderMap,
    name: &str,
    min: u64,
    bad: &'static str,
) -> Result<Option<u64>, BadHeader> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let digits = value.as_bytes();
    if values.next().is_some() || digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(BadHeader(bad));
    }
    match std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(n) if n >= min => Ok(Some(n)),
        _ => Err(BadHeader(bad)),
    }
}

fn haven_index(headers: &HeaderMap) -> Result<Option<u64>, BadHeader> {
    decimal_header(headers, HAVEN_INDEX_HEADER, 1, BAD_HAVEN_INDEX)
}

fn if_version(headers: &HeaderMap) -> Result<Option<u64>, BadHeader> {
    decimal_header(headers, IF_VERSION_HEADER, 0, BAD_IF_VERSION)
}

fn status_of(e: &TreeError) -> StatusCode {
    match e {
        TreeError::BadPath(_) | TreeError::CreateRoot | TreeError::DeleteRoot => {
            StatusCode::BAD_REQUEST
        }
        TreeError::NoNode(_) => StatusCode::NOT_FOUND,
        TreeError::NodeExists(_)
        | TreeError::NotEmpty(_)
        | TreeError::BadVersion { .. }
        | TreeError::VersionOverflow(_) => StatusCode::CONFLICT,
        TreeError::DataTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
    }
}

fn tree_error(e: &TreeError) -> Response {
    text(status_of(e), e.to_string())
}

fn internal_error(e: &TreeAppError) -> Response {
    error!(error = %e, "tree app request failed");
    text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// `{"path":...,"version":...}`, the body of a create or set.
fn node_json(path: &str, version: u64) -> String {
    format!("{{\"path\":{},\"version\":{version}}}", json_string(path))
}

/// The answer to an outcome; the same for its first delivery and its replays.
fn render(outcome: &Outcome) -> Response {
    match outcome {
        Ok(Done::Created { path }) => json(StatusCode::CREATED, node_json(path, 0)),
        Ok(Done::Set { path, version }) => json(StatusCode::OK, node_json(path, *version)),
        Ok(Done::Deleted) => StatusCode::NO_CONTENT.into_response(),
        Ok(Done::Synced { mutations }) => text(StatusCode::OK, mutations.to_string()),
        Err(e) => tree_error(e),
    }
}

async fn mutate(app: &Arc<TreeApp>, index: Option<u64>, op: Op) -> Response {
    match app.execute(index, op).await {
        Ok(Executed::Fresh(outcome)) => {
            debug!(haven_index = index, ?outcome, "applied");
            render(&outcome)
        }
        Ok(Executed::Replayed(outcome)) => {
            info!(haven_index = index, "replayed Haven-Index; nothing changed");
            render(&outcome)
        }
        Ok(Executed::TooOld(i)) => {
            warn!(
                haven_index = i,
                "replayed Haven-Index older than the replay window"
            );
            text(
                StatusCode::CONFLICT,
                format!("Haven-Index {i} is older than the replay window"),
            )
        }
        Ok(Executed::Unrecorded { index, applied }) => {
            warn!(
                haven_index = index,
                applied, "replayed Haven-Index never applied here"
            );
            text(
                StatusCode::CONFLICT,
                format!(
                    "Haven-Index {index} is not above the applied high-water mark {applied} \
                     but was never applied here; nothing was changed"
                ),
            )
        }
        Err(e) => internal_error(&e),
    }
}

async fn create(
    State(app): State<Arc<TreeApp>>,
    NodePath(path): NodePath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, BadHeader> {
    let index = haven_index(&headers)?;
    let op = Op::Create {
        path,
        data: body.into(),
    };
    Ok(mutate(&app, index, op).await)
}

async fn set(
    State(app): State<Arc<TreeApp>>,
    NodePath(path): NodePath,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, BadHeader> {
    let index = haven_index(&headers)?;
    let op = Op::Set {
        path,
        data: body.into(),
        if_version: if_version(&headers)?,
    };
    Ok(mutate(&app, index, op).await)
}

async fn delete(
    State(app): State<Arc<TreeApp>>,
    NodePath(path): NodePath,
    headers: HeaderMap,
) -> Result<Response, BadHeader> {
    let index = haven_index(&headers)?;
    let op = Op::Delete {
        path,
        if_version: if_version(&headers)?,
    };
    Ok(mutate(&app, index, op).await)
}

async fn sync(State(app): State<Arc<TreeApp>>, headers: HeaderMap) -> Result<Response, BadHeader> {
    let index = haven_index(&headers)?;
    Ok(mutate(&app, index, Op::Sync).await)
}

async fn read(
    State(app): State<Arc<TreeApp>>,
    NodePath(path): NodePath,
    headers: HeaderMap,
) -> Result<Response, BadHeader> {
    haven_index(&headers)?;
    let state = app.read_state();
    Ok(match state.tree.get(&path) {
        Ok((data, version)) => (
            StatusCode::OK,
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    header::HeaderName::from_static(TREE_VERSION_HEADER),
                    HeaderValue::from(version),
                ),
            ],
            data.to_vec(),
        )
            .into_response(),
        Err(e) => tree_error(&e),
    })
}

async fn children(
    State(app): State<Arc<TreeApp>>,
    NodePath(path): NodePath,
    headers: HeaderMap,
) -> Result<Response, BadHeader> {
    haven_index(&headers)?;
    let state = app.read_state();
    Ok(match state.tree.children(&path) {
        Ok(names) => {
            let names: Vec<String> = names.into_iter().map(json_string).collect();
            json(StatusCode::OK, format!("[{}]", names.join(",")))
        }
        Err(e) => tree_error(&e),
    })
}

async fn digest(
    State(app): State<Arc<TreeApp>>,
    headers: HeaderMap,
) -> Result<Response, BadHeader> {
    haven_index(&headers)?;
    Ok(text(StatusCode::OK, app.digest()))
}

async fn dump(State(app): State<Arc<TreeApp>>, headers: HeaderMap) -> Result<Response, BadHeader> {
    haven_index(&headers)?;
    Ok(json(StatusCode::OK, app.dump()))
}

async fn snapshot(
    State(app): State<Arc<TreeApp>>,
    headers: HeaderMap,
) -> Result<Response, BadHeader> {
    haven_index(&headers)?;
    Ok(match app.snapshot_stream().await {
        Ok((len, body)) => haven_snapshot_frame::snapshot_response(len, body),
        Err(e) => internal_error(&e),
    })
}

async fn restore(
    State(app): State<Arc<TreeApp>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, BadHeader> {
    let index = haven_index(&headers)?.ok_or(BadHeader(BAD_HAVEN_INDEX))?;
    let restored = app.restore(index, body).await;
    Ok(haven_snapshot_frame::respond(
        index,
        restored,
        internal_error,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_headers_are_strict() {
        let parse = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(HAVEN_INDEX_HEADER, HeaderValue::from_str(v).unwrap());
                headers.append(IF_VERSION_HEADER, HeaderValue::from_str(v).unwrap());
            }
            (haven_index(&headers), if_version(&headers))
        };
        let bad = (
            Err(BadHeader(BAD_HAVEN_INDEX)),
            Err(BadHeader(BAD_IF_VERSION)),
        );
        assert_eq!(parse(&[]), (Ok(None), Ok(None)));
        assert_eq!(parse(&["1"]), (Ok(Some(1)), Ok(Some(1))));
        assert_eq!(
            parse(&["18446744073709551615"]),
            (Ok(Some(u64::MAX)), Ok(Some(u64::MAX)))
        );
        assert_eq!(
            parse(&["0"]),
            (Err(BadHeader(BAD_HAVEN_INDEX)), Ok(Some(0)))
        );
        for value in ["", "+1", "-1", "1 2", " 1", "x", "18446744073709551616"] {
            assert_eq!(parse(&[value]), bad, "{value:?}");
        }
        assert_eq!(parse(&["1", "2"]), bad);
    }
}
