//! What the clients record: one [`OpRecord`] per operation, and the pure rules that turn
//! an HTTP reply into an [`Outcome`].
//!
//! # How outcomes are classified
//!
//! The checker is only as sound as this classification, so every doubt goes to
//! [`Outcome::Unknown`] (the operation may or may not have taken effect; the checker lets
//! it take effect at any point after its invocation, or never):
//!
//! - **Done**: the app replica answered through Haven: `200` (a read with its
//!   `Tree-Version`, or a set with its new version) or `409 bad version` (a compare-and-set
//!   that was ordered, applied, and refused by the app: it changed nothing).
//! - **Failed** (certainly not applied): Haven refused the request before ordering it:
//!   `503` with `Haven-Error: no-leader` (ingress only gives up looking for a leader when
//!   every earlier attempt was certainly not proposed: the leader said "not leader" or
//!   could not be reached at all) or `overloaded`, and any `4xx` carrying a `Haven-Error`
//!   (body or key refused at the door). A read that did not answer `200` is also
//!   dropped: reads change nothing, so leaving them out is sound.
//! - **Unknown**: everything else: a timeout or connection error, `503 outcome-unknown`,
//!   `504 apply-timeout` (committed, not yet applied on that node), any other status, or a
//!   body this module cannot parse.
//!
//! A write that came back unknown is retried with the same `Idempotency-Key`; a retry that
//! gets the app's answer (fresh or replayed by Haven) settles the outcome, while a retry
//! refused at the door settles nothing (the first attempt may still apply).

use serde::Serialize;

use haven_client::http::ClientError;
use haven_client::http::Reply;

/// The header carrying a node's version on `GET /tree/...`.
const TREE_VERSION: &str = "tree-version";
const HAVEN_ERROR: &str = haven_contract::headers::ERROR;

/// What an operation does to one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum OpKind {
    /// A linearizable `GET /tree/{key}`.
    Read,
    /// `POST /tree/{key}`: set unconditionally.
    Set { data: String },
    /// `POST /tree/{key}` with `If-Version: expected`.
    Cas { expected: u64, data: String },
}

impl OpKind {
    pub fn is_write(&self) -> bool {
        !matches!(self, OpKind::Read)
    }

    /// The data a write stores.
    pub fn data(&self) -> Option<&str> {
        match self {
            OpKind::Read => None,
            OpKind::Set { data } | OpKind::Cas { data, .. } => Some(data),
        }
    }
}

/// What the app answered, in the terms of the sequential model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Ret {
    Value { version: u64, data: String },
    Written { version: u64 },
    BadVersion { actual: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outcome {
    Done(Ret),
    /// Certainly not applied; the reason is kept for the report.
    Failed(String),
    /// May or may not have been applied.
    Unknown(String),
}

impl Outcome {
    /// Folds the outcome of a retry (same `Idempotency-Key`) into the first attempt's.
    pub fn then_retry(self, retry: Outcome) -> Outcome {
        match (self, retry) {
            (Outcome::Unknown(_), done @ Outcome::Done(_)) => done,
            (Outcome::Unknown(first), _) => Outcome::Unknown(first),
            (settled, _) => settled,
        }
    }
}

/// One operation as a client saw it. Times are offsets from the start of the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpRecord {
    pub client: usize,
    pub key: usize,
    /// The node (0-based) the first attempt went through.
    pub node: usize,
    pub kind: OpKind,
    pub invoked_ns: u64,
    pub completed_ns: u64,
    pub outcome: Outcome,
}

/// Classifies the reply to `kind` (or the transport error that replaced it).
pub fn classify(kind: &OpKind, reply: Result<&Reply, &ClientError>) -> Outcome {
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => return Outcome::Unknown(e.to_string()),
    };
    let status = reply.status;
    let parsed = match (kind, status) {
        (OpKind::Read, 200) => read_value(reply),
        (OpKind::Read, _) => {
            return Outcome::Failed(format!("read answered {status}: {}", brief(reply)));
        }
        (_, 200) => written(reply),
        (_, 409) if reply.header(haven_contract::headers::INDEX).is_some() => bad_version(reply),
        (_, 503) if refused_at_the_door(reply) => {
            return Outcome::Failed(format!("{status}: {}", brief(reply)));
        }
        (_, 400..=499) if reply.header(HAVEN_ERROR).is_some() => {
            return Outcome::Failed(format!("{status}: {}", brief(reply)));
        }
        _ => None,
    };
    parsed.map_or_else(
        || Outcome::Unknown(format!("{status}: {}", brief(reply))),
        Outcome::Done,
    )
}

/// Haven's own words that the request was never proposed.
fn refused_at_the_door(reply: &Reply) -> bool {
    matches!(
        reply.header(HAVEN_ERROR).as_deref(),
        Some("no-leader" | "overloaded")
    )
}

fn read_value(reply: &Reply) -> Option<Ret> {
    let version = reply.header(TREE_VERSION)?.parse().ok()?;
    Some(Ret::Value {
        version,
        data: reply.text(),
    })
}

/// `{"path":"/k0","version":N}`.
fn written(reply: &Reply) -> Option<Ret> {
    let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
    let version = body.get("version")?.as_u64()?;
    Some(Ret::Written { version })
}

/// `bad version: /k0 has version 3, expected 2`.
fn bad_version(reply: &Reply) -> Option<Ret> {
    let text = reply.text();
    let rest = text.strip_prefix("bad version: ")?;
    let (_, after) = rest.rsplit_once(" has version ")?;
    let (actual, _) = after.split_once(", expected ")?;
    Some(Ret::BadVersion {
        actual: actual.parse().ok()?,
    })
}

fn brief(reply: &Reply) -> String {
    let text = reply.text();
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, headers: &[(&'static str, &str)], body: &str) -> Reply {
        let mut map = http::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        Reply {
            status,
            headers: map,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    fn set() -> OpKind {
        OpKind::Set { data: "x".into() }
    }

    #[test]
    fn app_answers_are_done() {
        let read = reply(200, &[("tree-version", "4")], "c1-7");
        assert_eq!(
            classify(&OpKind::Read, Ok(&read)),
            Outcome::Done(Ret::Value {
                version: 4,
                data: "c1-7".into()
            })
        );
        let ok = reply(
            200,
            &[("haven-index", "9")],
            r#"{"path":"/k0","version":5}"#,
        );
        assert_eq!(
            classify(&set(), Ok(&ok)),
            Outcome::Done(Ret::Written { version: 5 })
        );
        let refused = reply(
            409,
            &[("haven-index", "9")],
            "bad version: /k0 has version 3, expected 2",
        );
        let cas = OpKind::Cas {
            expected: 2,
            data: "y".into(),
        };
        assert_eq!(
            classify(&cas, Ok(&refused)),
            Outcome::Done(Ret::BadVersion { actual: 3 })
        );
    }

    #[test]
    fn haven_refusals_before_ordering_are_failures() {
        for code in ["no-leader", "overloaded"] {
            let r = reply(
                503,
                &[("haven-error", code), ("retry-after", "1")],
                "haven: no",
            );
            assert!(
                matches!(classify(&set(), Ok(&r)), Outcome::Failed(_)),
                "{code}"
            );
        }
        let r = reply(413, &[("haven-error", "body-too-large")], "haven: big");
        assert!(matches!(classify(&set(), Ok(&r)), Outcome::Failed(_)));
        let r = reply(502, &[("haven-error", "app-unavailable")], "haven: down");
        assert!(matches!(
            classify(&OpKind::Read, Ok(&r)),
            Outcome::Failed(_)
        ));
    }

    #[test]
    fn every_doubt_is_unknown() {
        let cases = [
            reply(
                503,
                &[("haven-error", "outcome-unknown"), ("retry-after", "1")],
                "haven: ?",
            ),
            reply(504, &[("haven-error", "apply-timeout")], "haven: slow"),
            reply(200, &[], "not json"),
            reply(409, &[], "bad version: /k0 has version 3, expected 2"),
            reply(
                409,
                &[("haven-index", "3")],
                "Haven-Index 3 is older than the replay window",
            ),
            reply(500, &[], "journal"),
        ];
        for r in &cases {
            assert!(
                matches!(classify(&set(), Ok(r)), Outcome::Unknown(_)),
                "{r:?}"
            );
        }
        let timeout = ClientError::Request {
            method: "PUT".to_string(),
            url: "http://127.0.0.1:1/k".to_string(),
            reason: "no answer within 5s".to_string(),
        };
        assert!(matches!(
            classify(&set(), Err(&timeout)),
            Outcome::Unknown(_)
        ));
        let no_version = reply(200, &[], "data");
        assert!(matches!(
            classify(&OpKind::Read, Ok(&no_version)),
            Outcome::Unknown(_)
        ));
    }

    #[test]
    fn a_retry_settles_only_with_the_apps_answer() {
        let unknown = || Outcome::Unknown("timeout".into());
        let done = Outcome::Done(Ret::Written { version: 2 });
        assert_eq!(unknown().then_retry(done.clone()), done);
        assert_eq!(
            unknown().then_retry(Outcome::Failed("no-leader".into())),
            unknown()
        );
        assert_eq!(done.clone().then_retry(unknown()), done);
    }
}
