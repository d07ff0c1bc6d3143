//! The request both benches measure, built in one place so their figures compare.

use std::time::Duration;

use bytes::Bytes;
use criterion::Criterion;
use haven_contract::OrderedRequest;
use haven_contract::RequestTag;

pub const BODY_BYTES: usize = 128;

/// A typical forwarded write: a 128-byte body and four end-to-end headers, as the leader
/// stamps it (time and seed set; a follower's forward carries zeros there, same size).
pub fn request(seq: u64) -> OrderedRequest {
    let body: Vec<u8> = (0..BODY_BYTES).map(|i| b'a' + (i % 26) as u8).collect();
    let key = format!("8c1f5e2a-4b7d-4e21-9a3c-{seq:012x}");
    OrderedRequest {
        tag: RequestTag {
            origin: 2,
            seq: 1_700_000_000_000_000_000 + seq,
        },
        method: "POST".to_string(),
        uri: "/append?stream=orders".to_string(),
        headers: vec![
            (
                "content-type".to_string(),
                Bytes::from_static(b"application/json"),
            ),
            (
                "user-agent".to_string(),
                Bytes::from_static(b"haven-bench/0.1"),
            ),
            ("accept".to_string(), Bytes::from_static(b"*/*")),
            ("idempotency-key".to_string(), Bytes::from(key.clone())),
        ],
        body: Bytes::from(body),
        idempotency_key: Some(key),
        time_unix_us: 1_763_000_000_000_000,
        seed: 0x9e37_79b9_7f4a_7c15 ^ seq,
    }
}

/// Short runs: both benches compare against a baseline in the same run, so a few seconds
/// each is enough on a noisy machine.
pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}
