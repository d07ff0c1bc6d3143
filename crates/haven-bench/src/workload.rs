//! What one request looks like: the application-specific half of a benchmark.
//!
//! The load generator decides *when* to send and whether the next request is a
//! read or a write; a [`Workload`] decides *what* to send. Keeping the two apart
//! lets the same honest timing code drive the log app behind Haven and etcd as
//! the baseline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Method, StatusCode};
use rand::{Rng, RngCore};
use tracing::debug;

use crate::BenchError;

/// Whether a request changes state; reported separately because replication
/// makes writes and reads cost very different amounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
}

/// One request, ready to send. Bodies are [`Bytes`] so that a pre-built body
/// is shared by every request instead of being copied.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub method: Method,
    pub path_and_query: PathAndQuery,
    pub body: Bytes,
    pub content_type: Option<&'static str>,
    pub kind: OpKind,
}

/// The application-specific half of a benchmark, shared by all load workers.
///
/// Methods take `&self` and may be called from many workers at once, so any
/// state a workload learns (such as which lines exist) must be atomic. The
/// generator passes each worker's own seeded random generator, which keeps
/// runs repeatable.
pub trait Workload: Send + Sync + 'static {
    fn write(&self, rng: &mut dyn RngCore) -> Result<RequestSpec, BenchError>;
    fn read(&self, rng: &mut dyn RngCore) -> Result<RequestSpec, BenchError>;
    /// Called with every 2xx answer to a write, so that later reads can aim at
    /// data that exists.
    fn on_write_ok(&self, _status: StatusCode, _body: &[u8]) {}
}

/// Which workload to build; kept as data so the CLI can also act on it (for
/// example, pre-populate the log app with the same number of lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadChoice {
    LogApp {
        body_size: usize,
        prepopulated_lines: u64,
    },
    Etcd {
        body_size: usize,
        keys: u64,
    },
}

impl WorkloadChoice {
    pub fn build(&self) -> Arc<dyn Workload> {
        match *self {
            Self::LogApp {
                body_size,
                prepopulated_lines,
            } => Arc::new(LogAppWorkload::new(body_size, prepopulated_lines)),
            Self::Etcd { body_size, keys } => Arc::new(EtcdWorkload::new(body_size, keys)),
        }
    }
}

/// Haven's reference app (`haven-logapp`): writes append a line, reads fetch a
/// random line that is known to exist.
///
/// "Known to exist" is a high-water mark: lines `0..prepopulated_lines`, plus
/// every line number a `201 Created` answer has returned (the app appends in
/// order, so line `n` existing means lines `0..n` do too). A read therefore
/// never asks for a line that has not been acknowledged, so a `404` in the
/// results means the system lost or has not yet made visible an acknowledged
/// write — which is exactly what a replication benchmark must not hide.
#[derive(Debug)]
pub struct LogAppWorkload {
    body: Bytes,
    known_lines: AtomicU64,
}

impl LogAppWorkload {
    pub fn new(body_size: usize, prepopulated_lines: u64) -> Self {
        Self {
            body: printable_body(body_size),
            known_lines: AtomicU64::new(prepopulated_lines),
        }
    }

    /// Number of lines reads may currently choose from.
    pub fn known_lines(&self) -> u64 {
        self.known_lines.load(Ordering::Relaxed)
    }
}

impl Workload for LogAppWorkload {
    fn write(&self, _rng: &mut dyn RngCore) -> Result<RequestSpec, BenchError> {
        Ok(RequestSpec {
            method: Method::POST,
            path_and_query: PathAndQuery::from_static("/append"),
            body: self.body.clone(),
            content_type: Some("text/plain"),
            kind: OpKind::Write,
        })
    }

    /// Before any line exists there is nothing to read, so the read falls back
    /// to `GET /count`, which is still a read through the same path.
    fn read(&self, rng: &mut dyn RngCore) -> Result<RequestSpec, BenchError> {
        let known = self.known_lines();
        let path_and_query = if known == 0 {
            PathAndQuery::from_static("/count")
        } else {
            dynamic_path(format!("/line/{}", rng.random_range(0..known)))?
        };
        Ok(RequestSpec {
            method: Method::GET,
            path_and_query,
            body: Bytes::new(),
            content_type: None,
            kind: OpKind::Read,
        })
    }

    fn on_write_ok(&self, status: StatusCode, body: &[u8]) {
        if status != StatusCode::CREATED {
            return;
        }
        match std::str::from_utf8(body)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(line) => {
                self.known_lines
                    .fetch_max(line.saturating_add(1), Ordering::Relaxed);
            }
            None => debug!(body = %String::from_utf8_lossy(body), "201 without a line number"),
        }
    }
}

/// etcd's v3 HTTP/JSON gateway, the baseline Haven is compared with. Writes
/// are `put`s of a fixed value under `bench-{i}`; reads are `range` requests on
/// one such key, which etcd serves linearizably by default (the fair
/// comparison with reads that go through Haven's log).
#[derive(Debug)]
pub struct EtcdWorkload {
    keys: u64,
    value_base64: String,
}

impl EtcdWorkload {
    /// Keys are `bench-{i}` for `i` in `0..keys`; `keys == 0` is treated as 1
    /// so that picking a key can never fail.
    pub fn new(body_size: usize, keys: u64) -> Self {
        Self {
            keys: keys.max(1),
            value_base64: base64(&printable_body(body_size)),
        }
    }

    fn random_key(&self, rng: &mut dyn RngCore) -> String {
        base64(format!("bench-{}", rng.random_range(0..self.keys)).as_bytes())
    }
}

impl Workload for EtcdWorkload {
    fn write(&self, rng: &mut dyn RngCore) -> Result<RequestSpec, BenchError> {
        let key = self.random_key(rng);
        let json = format!(r#"{{"key":"{key}","value":"{}"}}"#, self.value_base64);
        Ok(etcd_post("/v3/kv/put", json, OpKind::Write))
    }

    fn read(&self, rng: &mut dyn RngCore) -> Result<RequestSpec, BenchError> {
        let json = format!(r#"{{"key":"{}"}}"#, self.random_key(rng));
        Ok(etcd_post("/v3/kv/range", json, OpKind::Read))
    }
}

fn etcd_post(path: &'static str, json: String, kind: OpKind) -> RequestSpec {
    RequestSpec {
        method: Method::POST,
        path_and_query: PathAndQuery::from_static(path),
        body: Bytes::from(json),
        content_type: Some("application/json"),
        kind,
    }
}

fn dynamic_path(path: String) -> Result<PathAndQuery, BenchError> {
    PathAndQuery::try_from(path.as_str()).map_err(|source| BenchError::RequestPath { path, source })
}

/// A body of printable ASCII without newlines, which both apps accept as one
/// line or one value.
fn printable_body(size: usize) -> Bytes {
    (b'a'..=b'z').cycle().take(size).collect::<Vec<u8>>().into()
}

/// Standard base64 with padding, as etcd's JSON gateway expects for keys and
/// values; small enough not to warrant a dependency.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let triple = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(triple >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn logapp_write_is_an_append_of_printable_bytes() {
        let workload = LogAppWorkload::new(100, 0);
        let spec = workload.write(&mut rng()).expect("write spec");
        assert_eq!(spec.method, Method::POST);
        assert_eq!(spec.path_and_query.as_str(), "/append");
        assert_eq!(spec.kind, OpKind::Write);
        assert_eq!(spec.body.len(), 100);
        assert!(spec.body.iter().all(|b| b.is_ascii_graphic()));
    }

    #[test]
    fn logapp_reads_count_until_a_line_is_known() {
        let workload = LogAppWorkload::new(8, 0);
        let spec = workload.read(&mut rng()).expect("read spec");
        assert_eq!(
            (spec.method, spec.path_and_query.as_str(), spec.kind),
            (Method::GET, "/count", OpKind::Read)
        );
    }

    fn read_lines(workload: &LogAppWorkload, n: usize) -> Vec<u64> {
        let mut rng = rng();
        (0..n)
            .map(|_| {
                let spec = workload.read(&mut rng).expect("read spec");
                let path = spec.path_and_query.as_str();
                let line = path.strip_prefix("/line/").expect("a line read");
                line.parse().expect("decimal line")
            })
            .collect()
    }

    #[test]
    fn logapp_reads_only_known_lines() {
        let workload = LogAppWorkload::new(8, 5);
        assert!(read_lines(&workload, 200).iter().all(|&n| n < 5));

        workload.on_write_ok(StatusCode::CREATED, b"41");
        assert_eq!(workload.known_lines(), 42);
        let lines = read_lines(&workload, 500);
        assert!(lines.iter().all(|&n| n < 42));
        assert!(lines.iter().any(|&n| n >= 5), "new lines are read too");
    }

    #[test]
    fn logapp_high_water_ignores_older_and_odd_answers() {
        let workload = LogAppWorkload::new(8, 10);
        workload.on_write_ok(StatusCode::CREATED, b"3");
        workload.on_write_ok(StatusCode::CREATED, b"not a number");
        workload.on_write_ok(StatusCode::OK, b"99");
        assert_eq!(workload.known_lines(), 10);
    }

    #[test]
    fn etcd_requests_are_base64_json_on_the_gateway() {
        let workload = EtcdWorkload::new(3, 1);
        let put = workload.write(&mut rng()).expect("put spec");
        assert_eq!(put.path_and_query.as_str(), "/v3/kv/put");
        assert_eq!(put.content_type, Some("application/json"));
        // base64("bench-0") = YmVuY2gtMA==, base64("abc") = YWJj
        assert_eq!(&put.body[..], br#"{"key":"YmVuY2gtMA==","value":"YWJj"}"#);

        let range = workload.read(&mut rng()).expect("range spec");
        assert_eq!(
            (range.method, range.path_and_query.as_str(), range.kind),
            (Method::POST, "/v3/kv/range", OpKind::Read)
        );
        assert_eq!(&range.body[..], br#"{"key":"YmVuY2gtMA=="}"#);
    }

    #[test]
    fn etcd_keys_spread_over_the_key_space() {
        let workload = EtcdWorkload::new(1, 4);
        let mut rng = rng();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(workload.read(&mut rng).expect("range").body);
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn choice_builds_the_named_workload() {
        let choice = WorkloadChoice::Etcd {
            body_size: 1,
            keys: 0,
        };
        let spec = choice.build().write(&mut rng()).expect("put spec");
        assert_eq!(spec.path_and_query.as_str(), "/v3/kv/put");
    }
}
