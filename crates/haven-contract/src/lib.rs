//! What Haven and the apps it protects agree on, spelled once: the headers Haven adds to
//! every ordered delivery and to its answers ([`headers`]), the paths of the checkpoint
//! hooks an app may serve ([`paths`]), and the values that cross every layer of a node:
//! the ordered request every replica receives and the answer it gives. Pure data, no I/O,
//! so the example apps depend on it as the node does.

use std::fmt;

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

/// Header names, lower case as HTTP/2 and hyper write them (HTTP/1.1 compares them
/// without case).
pub mod headers {
    /// On every ordered delivery: the entry's log index. An app that keeps the highest
    /// index it applied can recognise a redelivery after a crash and answer it without
    /// applying it again; on `PUT /_haven/restore`, the index the state is at.
    pub const INDEX: &str = "haven-index";
    /// On every ordered delivery: the leader's clock when it ordered the entry (RFC 3339,
    /// never earlier than the previous entry's), for an app that needs "now".
    pub const TIME: &str = "haven-time";
    /// On every ordered delivery: a random number the leader chose, the same on every
    /// replica, for an app that needs randomness.
    pub const SEED: &str = "haven-seed";
    /// A client's key for a write that may be retried: the cluster answers a retry with
    /// the first answer instead of applying it again.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// On an answer Haven took from its idempotency table instead of the app.
    pub const REPLAYED: &str = "haven-replayed";
    /// On an error Haven gave itself (not the app): a short machine-readable code.
    pub const ERROR: &str = "haven-error";
    /// On a read a standby site served: how stale its replica may be, in milliseconds
    /// (its lag behind the primary's archive when it last looked, plus the time since).
    pub const LAG_MS: &str = "haven-lag-ms";

    /// Whether `name` (lower case) is one Haven sets on a delivery, so a client's own copy
    /// must not reach the app.
    pub fn is_delivery_header(name: &str) -> bool {
        [INDEX, TIME, SEED].contains(&name)
    }
}

/// The checkpoint hooks of an app in hooks mode (configurable per app; these are the
/// defaults).
pub mod paths {
    /// `GET`: the app's whole state, streamed, in a self-validating format of its own.
    pub const SNAPSHOT: &str = "/_haven/snapshot";
    /// `PUT` with `Haven-Index: N`: replace the whole state with a snapshot's bytes.
    pub const RESTORE: &str = "/_haven/restore";
}

/// A node's stable id, unique within a cluster.
pub type NodeId = u64;

/// Where a peer listens. Stored in Raft membership so a node learns its peers' addresses
/// from the replicated configuration, not only from its own file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub raft_addr: String,
    pub client_addr: String,
}

/// Why a peer address is not `host:port`: the host an IP address or a DNS name (so a
/// Kubernetes StatefulSet's stable pod names work: a pod's IP changes when it restarts,
/// its name does not; names are resolved at every dial).
pub fn check_peer_addr(addr: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("`{addr}` is not host:port ({why})"));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return bad("the port must be 1 to 65535"),
        Ok(_) => {}
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<std::net::Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => bad("not an IPv6 address between the brackets"),
        };
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() || is_dns_name(host) {
        Ok(())
    } else {
        bad("the host must be an IP address or a DNS name")
    }
}

/// RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens, each
/// at most 63 long, 253 in all; the last not all digits, so a mistyped IPv4 address
/// (`10.0.0.256`) is not taken for a name.
fn is_dns_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let numeric_top = host
        .rsplit('.')
        .next()
        .is_some_and(|top| top.bytes().all(|b| b.is_ascii_digit()));
    !host.is_empty() && host.len() <= 253 && host.split('.').all(label_ok) && !numeric_top
}

impl fmt::Display for PeerNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} client={}", self.raft_addr, self.client_addr)
    }
}

/// Identifies one client request across the cluster so the node that received it can
/// recognise its own entry when it applies it. `seq` starts from the boot time in
/// nanoseconds, so tags stay unique across restarts of the same node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestTag {
    pub origin: NodeId,
    pub seq: u64,
}

/// One client request as it is ordered: exactly what every replica receives, plus the
/// determinism aids the leader stamps when it proposes the entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderedRequest {
    pub tag: RequestTag,
    pub method: String,
    /// Path and query, as the client sent them.
    pub uri: String,
    /// End-to-end headers in the client's order; hop-by-hop headers are already removed.
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    /// The client's `Idempotency-Key`, if any: the deduplication key in the replicated state.
    pub idempotency_key: Option<String>,
    /// Leader's wall clock at proposal, microseconds since the Unix epoch. Apply clamps it so
    /// time never goes backwards along the log.
    pub time_unix_us: i64,
    /// Leader-chosen random seed handed to the app as `Haven-Seed`.
    pub seed: u64,
}

impl fmt::Display for OrderedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} ({} bytes, from node {})",
            self.method,
            self.uri,
            self.body.len(),
            self.tag.origin
        )
    }
}

/// A replica's answer, kept whole: it is what the client receives and what the idempotency
/// table stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppResponse {
    pub status: u16,
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_an_ip_or_a_dns_name_and_a_port() {
        for good in [
            "127.0.0.1:9001",
            "[::1]:9001",
            "haven-0.haven.default.svc.cluster.local:9001",
            "localhost:1",
        ] {
            assert_eq!(check_peer_addr(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("127.0.0.1", "no port"),
            ("host:0", "the port must be 1 to 65535"),
            ("host:65536", "the port must be 1 to 65535"),
            ("[::1:9001", "the host must be an IP address or a DNS name"),
            ("[zz]:9001", "not an IPv6 address between the brackets"),
            (
                "10.0.0.256:9001",
                "the host must be an IP address or a DNS name",
            ),
            (
                "-bad.example:9001",
                "the host must be an IP address or a DNS name",
            ),
            ("a..b:9001", "the host must be an IP address or a DNS name"),
            (":9001", "the host must be an IP address or a DNS name"),
            (
                "http://x:9001",
                "the host must be an IP address or a DNS name",
            ),
        ] {
            assert_eq!(
                check_peer_addr(bad),
                Err(format!("`{bad}` is not host:port ({why})")),
                "{bad}"
            );
        }
    }
}
