//! Which service a client request is for: by its `Host`, else by the longest path prefix
//! a service claims (stripped before the request goes on, so the app sees the paths it
//! would see alone). The first step of the request path on a node with several services.

use std::sync::Arc;
use std::sync::RwLock;

use http::Request;
use http::StatusCode;
use http::Uri;
use hyper::body::Incoming;

use super::HttpResponse;
use super::Ingress;
use super::error_response;
use haven_base::config::Matcher;

/// The `Haven-Error` code of a request no service claims.
pub const UNKNOWN_SERVICE: &str = "unknown-service";

struct Entry {
    name: String,
    matcher: Matcher,
    ingress: Arc<Ingress>,
}

/// The services a node's client port serves; services come and go while it runs.
#[derive(Default)]
pub struct Directory {
    entries: RwLock<Vec<Entry>>,
}

/// Where a request goes: the service, and how many leading path bytes to strip.
struct Pick {
    ingress: Arc<Ingress>,
    strip: usize,
}

impl Directory {
    pub fn insert(&self, name: &str, matcher: Matcher, ingress: Arc<Ingress>) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.retain(|e| e.name != name);
        entries.push(Entry {
            name: name.to_string(),
            matcher,
            ingress,
        });
    }

    /// The service's ingress, if the node runs it.
    pub fn get(&self, name: &str) -> Option<Arc<Ingress>> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        (entries.iter())
            .find(|e| e.name == name)
            .map(|e| e.ingress.clone())
    }

    /// Every service's ingress, by name.
    pub fn all(&self) -> Vec<(String, Arc<Ingress>)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        (entries.iter())
            .map(|e| (e.name.clone(), e.ingress.clone()))
            .collect()
    }

    pub fn remove(&self, name: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.retain(|e| e.name != name);
    }

    /// Hands the request to its service, or answers 404 `unknown-service`.
    pub async fn handle(&self, mut req: Request<Incoming>) -> HttpResponse {
        let host = request_host(&req);
        let Some(pick) = self.pick(host.as_deref(), req.uri().path()) else {
            let reason = format!(
                "no service here answers host `{}` or path `{}`",
                host.as_deref().unwrap_or(""),
                req.uri().path()
            );
            return error_response(StatusCode::NOT_FOUND, UNKNOWN_SERVICE, &reason);
        };
        if pick.strip > 0 {
            *req.uri_mut() = strip_path(req.uri(), pick.strip);
        }
        pick.ingress.handle(req).await
    }

    fn pick(&self, host: Option<&str>, path: &str) -> Option<Pick> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let by_host = entries.iter().find(|e| match &e.matcher {
            Matcher::By { host: Some(h), .. } => Some(h.as_str()) == host,
            _ => false,
        });
        if let Some(entry) = by_host {
            return Some(Pick {
                ingress: entry.ingress.clone(),
                strip: 0,
            });
        }
        let by_prefix = entries
            .iter()
            .filter_map(|e| match &e.matcher {
                Matcher::By {
                    path_prefix: Some(p),
                    ..
                } if under_prefix(path, p) => Some((e, p.len())),
                _ => None,
            })
            .max_by_key(|(_, len)| *len);
        if let Some((entry, strip)) = by_prefix {
            return Some(Pick {
                ingress: entry.ingress.clone(),
                strip,
            });
        }
        let everything = entries.iter().find(|e| e.matcher == Matcher::Everything)?;
        Some(Pick {
            ingress: everything.ingress.clone(),
            strip: 0,
        })
    }
}

/// `/orders` and `/orders/...` are under `/orders`; `/ordersx` is not.
fn under_prefix(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The request's host, lower-case, without port: from `Host`, else from the URI.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.headers().get(http::header::HOST) {
        Some(value) => value.to_str().ok()?.to_string(),
        None => req.uri().host()?.to_string(),
    };
    let host = match raw.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => raw.as_str(),
    };
    Some(host.to_ascii_lowercase())
}

/// The URI with its first `strip` path bytes removed (`/orders/items?a=1` → `/items?a=1`,
/// `/orders` → `/`).
fn strip_path(uri: &Uri, strip: usize) -> Uri {
    let path = &uri.path()[strip..];
    let path = if path.is_empty() { "/" } else { path };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    // A suffix of a valid path is a valid path; keep the original if not.
    path_and_query.parse().unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_matches_whole_segments_and_is_stripped_with_the_query_kept() {
        assert!(under_prefix("/orders", "/orders"));
        assert!(under_prefix("/orders/items", "/orders"));
        assert!(!under_prefix("/ordersx", "/orders"));
        assert!(!under_prefix("/", "/orders"));
        let uri: Uri = "/orders/items?a=1".parse().unwrap();
        assert_eq!(strip_path(&uri, 7), "/items?a=1");
        let uri: Uri = "/orders".parse().unwrap();
        assert_eq!(strip_path(&uri, 7), "/");
        let uri: Uri = "/orders?x".parse().unwrap();
        assert_eq!(strip_path(&uri, 7), "/?x");
    }

    #[test]
    fn the_host_is_read_without_port_and_case() {
        let req = Request::get("/")
            .header("host", "Orders.Example:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("orders.example"));
        let req = Request::get("http://stock.example/x").body(()).unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("stock.example"));
        let req = Request::get("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("[::1]"));
    }
}
