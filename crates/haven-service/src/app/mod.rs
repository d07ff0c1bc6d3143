//! The way to this node's replica of the user's app. Ordered entries travel on one
//! pipelined connection ([`pipeline`]), replayed exactly (method, path+query, end-to-end
//! headers, body) plus Haven's determinism headers; reads go through a pooled hyper
//! client ([`AppClient`]). Either way the replica's whole response comes back, and every
//! call has a deadline: a dead app must cost a timeout, never a hung apply loop.

pub mod hooks;
pub mod http1;
pub mod pipeline;
pub mod process;

use std::time::Duration;

use bytes::Bytes;
use haven_contract::AppResponse;
use http::HeaderMap;
use http::HeaderName;
use http::HeaderValue;
use http::Request;
use http_body_util::BodyExt;
use http_body_util::Full;
use http_body_util::Limited;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest response body Haven will carry back from the app (64 MiB). Bigger responses
/// are a 502 to the client rather than unbounded memory.
pub const MAX_APP_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("app at {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("app at {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("app at {url} sent a bad response: {reason}")]
    BadResponse { url: String, reason: String },
    #[error("request cannot be replayed: {0}")]
    BadRequest(String),
}

/// The determinism aids attached to one delivery.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub index: u64,
    pub time_rfc3339: String,
    pub seed: u64,
}

#[derive(Clone)]
pub struct AppClient {
    base_url: String,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl AppClient {
    pub fn new(base_url: &str, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            client,
            timeout,
        }
    }

    pub fn url(&self) -> &str {
        &self.base_url
    }

    /// Sends a read straight to the replica (local and linearizable reads).
    pub async fn read(
        &self,
        method: &str,
        uri: &str,
        headers: &[(String, Bytes)],
        body: Bytes,
    ) -> Result<AppResponse, AppError> {
        let request = self
            .builder(method, uri, headers)
            .body(Full::new(body))
            .map_err(|e| AppError::BadRequest(e.to_string()))?;
        self.send(request).await
    }

    /// The request as the client sent it, minus any `Haven-*` header a client tried to
    /// forge: those are Haven's to set.
    fn builder(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(String, Bytes)],
    ) -> http::request::Builder {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base_url, path_and_query));
        for (name, value) in headers
            .iter()
            .filter(|(name, _)| !haven_contract::headers::is_delivery_header(name))
        {
            builder = builder.header(name.as_str(), value.as_ref());
        }
        builder
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<AppResponse, AppError> {
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|e| AppError::Unreachable {
                        url: self.base_url.clone(),
                        reason: haven_base::errors::chain(&e),
                    })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_APP_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| AppError::BadResponse {
                    url: self.base_url.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok(AppResponse {
                status: parts.status.as_u16(),
                headers: end_to_end_headers(&parts.headers),
                body,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(AppError::Timeout {
                url: self.base_url.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

/// Headers meaningful only for one connection (RFC 9110 §7.6.1): never ordered, never
/// relayed. `Content-Length` is dropped too; each hop recomputes it from the exact body.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Keeps the end-to-end headers in order, dropping hop-by-hop ones and every header the
/// `Connection` header names.
pub fn end_to_end_headers(headers: &HeaderMap) -> Vec<(String, Bytes)> {
    let named_by_connection: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            !HOP_BY_HOP.contains(&name) && !named_by_connection.iter().any(|n| n == name)
        })
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

/// Rebuilds a header map from stored pairs; pairs that are no longer valid are skipped
/// (they were valid when stored, so this only guards against a corrupted state file).
pub fn header_map(pairs: &[(String, Bytes)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-trace", HeaderValue::from_static("abc"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.append("x-multi", HeaderValue::from_static("1"));
        headers.append("x-multi", HeaderValue::from_static("2"));
        let kept = end_to_end_headers(&headers);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, vec!["content-type", "x-multi", "x-multi"]);
        let rebuilt = header_map(&kept);
        assert_eq!(rebuilt.get_all("x-multi").iter().count(), 2);
    }
}
