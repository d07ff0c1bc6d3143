//! `haven_base::config::Config::parse` on arbitrary text.
//!
//! Properties:
//! * never panics (including arithmetic overflow: the fuzz profile keeps overflow checks on);
//! * a parse error (`ConfigError::Parse`) names a line or a key;
//! * a validation error (`ConfigError::Invalid`) names a `table.key` and a line that exists
//!   in the text, and its message shows both;
//! * an accepted config satisfies every rule `validate` promises (so a later refactor that
//!   drops a check is caught);
//! * parsing is deterministic.

#![no_main]

use std::path::Path;

use haven_base::config::Config;
use haven_base::config::ConfigError;
use haven_base::config::MAX_BODY_BYTES_CEILING;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.toml");
    let result = Config::parse(&text, path);
    if std::env::var_os("HAVEN_FUZZ_DEBUG").is_some() {
        eprintln!("{:?}", result.as_ref().map_err(|e| e.to_string()));
    }
    match &result {
        Ok(config) => check_accepted(config),
        Err(err) => check_error(&text, err),
    }
    // Deterministic: the same text gives the same verdict and message.
    let again = Config::parse(&text, path);
    assert_eq!(
        result.as_ref().map(|c| format!("{c:?}")).map_err(|e| e.to_string()),
        again.as_ref().map(|c| format!("{c:?}")).map_err(|e| e.to_string()),
    );
});

fn check_error(text: &str, err: &ConfigError) {
    let message = err.to_string();
    assert!(message.starts_with("invalid config fuzz.toml: "), "{message}");
    match err {
        ConfigError::Read { .. } => panic!("parse never reads a file: {message}"),
        ConfigError::Parse { message: inner, .. } => {
            assert!(!inner.is_empty(), "empty parse error");
            // toml locates syntax and type errors ("at line N, column M"); errors about the
            // whole document (a missing table) name the key in backticks instead.
            let names_line = inner.contains("line ");
            let names_key = inner.contains('`');
            assert!(
                names_line || names_key,
                "parse error names neither a line nor a key: {inner:?}\ninput: {text:?}"
            );
        }
        ConfigError::Invalid { key, line, reason, .. } => {
            let (table, field) = key.split_once('.').expect("qualified key");
            assert!(!table.is_empty() && !field.is_empty(), "bad key {key:?}");
            assert!(!reason.is_empty());
            let lines = text.lines().count().max(1);
            assert!(
                (1..=lines).contains(line),
                "line {line} outside the {lines}-line input: {message}"
            );
            assert!(message.contains(&format!("key `{key}` (line {line})")), "{message}");
        }
    }
}

/// Everything `Config::validate` is documented to guarantee.
fn check_accepted(c: &Config) {
    assert!(c.app.url.starts_with("http://"));
    assert!(c.app.timeout_ms > 0);
    assert!(!c.app.name.is_empty());
    assert!(
        c.app
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
    );
    let mut ids: Vec<_> = c.peers.iter().map(|p| p.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), c.peers.len(), "duplicate peer ids accepted");
    let me = c
        .peers
        .iter()
        .find(|p| p.id == c.node.id)
        .expect("own id listed in peers");
    assert_eq!(me.raft_addr, c.node.raft_addr);
    for r in &c.routes {
        assert!(r.path_prefix.starts_with('/'));
        for m in &r.methods {
            assert!(http_method_ok(m), "bad method {m:?} accepted");
        }
    }
    let l = &c.limits;
    assert!((1..=MAX_BODY_BYTES_CEILING).contains(&l.max_body_bytes));
    assert!(l.request_timeout_ms > 0);
    assert!(l.max_inflight_requests > 0);
    let r = &c.raft;
    assert!(u128::from(r.election_timeout_min_ms) > 2 * u128::from(r.heartbeat_ms));
    assert!(r.election_timeout_max_ms > r.election_timeout_min_ms);
    // The accessors used at start-up must not panic either.
    let _ = c.voters();
    let _ = c.service_dir();
    let _ = (c.request_timeout(), c.no_leader_timeout(), c.app_timeout());
    let _ = haven_consensus::raft_config(&c.raft);
}

/// RFC 9110 token characters, which is what `http::Method::from_bytes` accepts.
fn http_method_ok(m: &str) -> bool {
    !m.is_empty()
        && m.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}
