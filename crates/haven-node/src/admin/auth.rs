//! Who may change things through the admin port, and the trail of what they changed.
//!
//! With `[admin] token_file`, every request that changes anything (`POST`) needs
//! `Authorization: Bearer <token>` of that file, or of the service's own
//! (`[service.admin] token_file`) for a request about that service; reads need it too
//! unless `public_reads` (the default); `/health`, `/ready` (load balancers hold no
//! token) and the console's page (static, it asks for a token itself) are always open. A
//! missing or wrong token gets 401 with a JSON reason before any handler runs, and is counted
//! (`haven_admin_unauthorized_total`). Every change, allowed or refused, is appended to
//! `<data_dir>/audit.log` (one JSON object per line, fsynced): when, which token's
//! holder (never the token), what, about which service, the answer's status.

use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;

use axum::Json;
use axum::extract::Request;
use axum::extract::State;
use axum::http::Method;
use axum::http::StatusCode;
use axum::http::header;
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::response::Response;
use serde::Deserialize;
use serde::Serialize;

use super::AdminState;

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_CHARS: usize = 16;
/// The audit trail, in the node's data directory.
pub const AUDIT_FILE: &str = "audit.log";

/// The holders of a token file: name and token.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<(String, String)>,
}

impl std::fmt::Debug for Tokens {
    /// Names only: a token never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Tokens").field("holders", &names).finish()
    }
}

impl Tokens {
    /// Reads `path`; fails closed, naming the file and line (never the token).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("admin token file {}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<(String, String)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| Err(format!("line {}: {reason}", n + 1));
            let mut words = line.split_whitespace();
            let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return bad("write NAME TOKEN");
            };
            let named = |c: char| c.is_ascii_alphanumeric() || "-_.@".contains(c);
            if name.len() > 64 || !name.chars().all(named) {
                return bad("a name is 1 to 64 of a-z, A-Z, 0-9, -, _, ., @");
            }
            if token.chars().count() < MIN_TOKEN_CHARS {
                return bad(&format!(
                    "a token has at least {MIN_TOKEN_CHARS} characters"
                ));
            }
            if entries.iter().any(|(other, _)| other == name) {
                return bad(&format!("{name} appears twice"));
            }
            entries.push((name.to_string(), token.to_string()));
        }
        if entries.is_empty() {
            return Err("it holds no token: write NAME TOKEN lines".to_string());
        }
        Ok(Self { entries })
    }

    /// The holder of `presented`. Every token is compared in full, in constant time, so
    /// the answer's timing says nothing about how much of a token was right.
    pub fn holder(&self, presented: &str) -> Option<&str> {
        let mut found = None;
        for (name, token) in &self.entries {
            if same(token.as_bytes(), presented.as_bytes()) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

fn same(a: &[u8], b: &[u8]) -> bool {
    let differ = (a.len() ^ b.len()) as u8;
    let mixed = a
        .iter()
        .zip(b.iter().cycle())
        .fold(differ, |acc, (x, y)| acc | (x ^ y));
    mixed == 0 && !b.is_empty()
}

/// The node's admin settings and its audit trail.
pub struct Guard {
    /// The node's tokens; none: the port is open.
    pub tokens: Option<Tokens>,
    pub public_reads: bool,
    pub audit: Audit,
}

/// One line of the audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    pub time: String,
    /// The token's holder; `-` when the port needs none; none when refused.
    pub who: Option<String>,
    pub method: String,
    pub path: String,
    pub service: Option<String>,
    pub status: u16,
}

/// `<data_dir>/audit.log`, appended to.
pub struct Audit {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl Audit {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(AUDIT_FILE),
            file: Mutex::new(None),
        }
    }

    /// Appends and fsyncs `entry` (admin changes are rare; each is kept).
    fn record(&self, entry: &AuditEntry) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let written = (|| {
            if file.is_none() {
                let opened = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?;
                *file = Some(opened);
            }
            let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
            line.push(b'\n');
            let out = file
                .as_mut()
                .ok_or_else(|| std::io::Error::other("closed"))?;
            out.write_all(&line)?;
            out.sync_data()
        })();
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "cannot append to the audit trail");
            *file = None;
        }
    }
}

/// Every entry of an audit trail, oldest first.
pub fn read_trail(data_dir: &Path) -> std::io::Result<Vec<AuditEntry>> {
    let text = match std::fs::read_to_string(data_dir.join(AUDIT_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

/// The admin router's middleware: checks the token, runs the request, audits changes.
pub async fn guard(State(state): State<Arc<AdminState>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let what = request
        .uri()
        .path_and_query()
        .map_or(path.clone(), |p| p.to_string());
    let service = service_named(request.uri().query());
    let changes = method != Method::GET && method != Method::HEAD;
    let guard = &state.guard;
    if always_open(&path) || (!changes && guard.public_reads) {
        return next.run(request).await;
    }
    let tokens = state.tokens_for(service.as_deref());
    let presented = bearer(&request);
    let who = match &tokens {
        None => Some("-".to_string()),
        Some(tokens) => presented
            .and_then(|p| tokens.holder(&p))
            .map(str::to_string),
    };
    let entry = |who: Option<String>, status: StatusCode| AuditEntry {
        time: haven_service::apply::rfc3339(chrono::Utc::now().timestamp_micros()),
        who,
        method: method.to_string(),
        path: what.clone(),
        service: service.clone(),
        status: status.as_u16(),
    };
    let Some(who) = who else {
        state.metrics.admin_unauthorized.inc();
        tracing::warn!(%method, path = %what, "admin request refused: missing or wrong token");
        if changes {
            guard.audit.record(&entry(None, StatusCode::UNAUTHORIZED));
        }
        return unauthorized(bearer(&request).is_some());
    };
    let response = next.run(request).await;
    if changes {
        guard.audit.record(&entry(Some(who), response.status()));
    }
    response
}

fn unauthorized(presented: bool) -> Response {
    let error = match presented {
        true => "this token is not accepted here (wrong token, or one of another service)",
        false => "this admin request needs Authorization: Bearer <token> ([admin] token_file)",
    };
    let mut response = (
        StatusCode::UNAUTHORIZED,
        Json(super::AdminError::new(
            StatusCode::UNAUTHORIZED,
            error.to_string(),
        )),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Paths served to anyone: the health check, and the console's page, which holds no data
/// (it fetches `/services` with the token it is given).
fn always_open(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/" | "/console")
}

fn bearer(request: &Request) -> Option<String> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn service_named(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("service="))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_names_its_holders_and_bad_lines() {
        let tokens =
            Tokens::parse("# ops\nalice 0123456789abcdef\nci   fedcba9876543210xyz\n").unwrap();
        assert_eq!(tokens.holder("0123456789abcdef"), Some("alice"));
        assert_eq!(tokens.holder("fedcba9876543210xyz"), Some("ci"));
        assert_eq!(tokens.holder("0123456789abcdeX"), None);
        assert_eq!(tokens.holder("0123456789abcdef0"), None);
        assert_eq!(tokens.holder(""), None);
        assert_eq!(
            format!("{tokens:?}"),
            r#"Tokens { holders: ["alice", "ci"] }"#
        );
        let cases = [
            ("alice\n", "line 1: write NAME TOKEN"),
            (
                "alice short\n",
                "line 1: a token has at least 16 characters",
            ),
            (
                "al/ice 0123456789abcdef\n",
                "line 1: a name is 1 to 64 of a-z, A-Z, 0-9, -, _, ., @",
            ),
            (
                "a 0123456789abcdef\na 0123456789abcdeg\n",
                "line 2: a appears twice",
            ),
            ("# nothing\n", "it holds no token: write NAME TOKEN lines"),
        ];
        for (text, reason) in cases {
            assert_eq!(Tokens::parse(text).unwrap_err(), reason, "{text:?}");
        }
    }

    #[test]
    fn the_audit_trail_keeps_every_change_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::new(dir.path());
        let entry = |who: Option<&str>, status| AuditEntry {
            time: "2026-12-06T00:00:00Z".into(),
            who: who.map(str::to_string),
            method: "POST".into(),
            path: "/checkpoints?service=orders".into(),
            service: Some("orders".into()),
            status,
        };
        audit.record(&entry(None, 401));
        audit.record(&entry(Some("alice"), 200));
        assert_eq!(
            read_trail(dir.path()).unwrap(),
            [entry(None, 401), entry(Some("alice"), 200)]
        );
    }
}
