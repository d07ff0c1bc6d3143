//! Bad input, end to end: malformed, oversized, slow and abandoned traffic on the client,
//! raft and admin ports, a dead app replica and a bad config file. Each case checks the
//! exact answer (status and reason), and then that the node still serves writes, that the
//! replicas stay identical and that no acknowledged write was lost.
//!
//! Malformed traffic goes through raw `TcpStream`s: no client library would send it.

use std::net::SocketAddr;
use std::time::Duration;
use std::time::Instant;

use haven_consensus::wire;
use haven_testkit::cluster::Process;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

mod common;
use common::PREPOPULATE;
use common::TestCluster;

/// Longest any raw exchange may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(10);
/// For the tests that check the leader stays leader: election timeouts well above the
/// scheduling stalls of a loaded 2-core CI machine running debug builds, so an election
/// can only come from the bad input itself.
const STEADY_RAFT: &str =
    "[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 1500\nelection_timeout_max_ms = 3000\n";

/// A response read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// What the server did with a raw request.
#[derive(Debug)]
enum Outcome {
    Answered(Raw),
    /// Closed (or reset) without a complete response; `bytes` is what it sent first.
    Closed {
        bytes: usize,
    },
}

impl Outcome {
    fn answered(self) -> Raw {
        match self {
            Outcome::Answered(raw) => raw,
            Outcome::Closed { bytes } => {
                panic!("the server closed the connection after {bytes} bytes, no response")
            }
        }
    }
}

/// Parses one complete response from `buf`, if it holds one (Content-Length framing, which
/// is all Haven and hyper's automatic error responses use).
fn parse_response(buf: &[u8]) -> Option<Raw> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let mut raw = Raw {
        status,
        head,
        body: String::new(),
    };
    let length: usize = raw
        .header("content-length")
        .map_or(Some(0), |v| v.parse().ok())?;
    let body = buf.get(end + 4..end + 4 + length)?;
    raw.body = String::from_utf8_lossy(body).into_owned();
    Some(raw)
}

/// Reads until one whole response arrived or the server closed; panics after `HANG`.
async fn read_outcome(stream: &mut TcpStream) -> Outcome {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(raw) = parse_response(&buf) {
                return Outcome::Answered(raw);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Outcome::Closed { bytes: buf.len() },
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(HANG, read)
        .await
        .expect("the server neither answered nor closed: hung")
}

/// Sends `bytes` on a fresh connection (write errors are fine: the server may close early)
/// and reads what comes back.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Outcome {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    read_outcome(&mut stream).await
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: haven\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every acknowledged body is in the replicas exactly once; returns the replica's lines.
async fn assert_acked_present_once(c: &TestCluster, acked: &[String]) -> Vec<String> {
    let lines = lines(&c.assert_replicas_identical().await);
    for body in acked {
        let count = lines.iter().filter(|l| *l == body).count();
        assert_eq!(
            count, 1,
            "acknowledged write {body:?} present {count} times"
        );
    }
    lines
}

/// Appends through `node`, asserting 201, and remembers the body as acknowledged.
async fn write_ok(c: &TestCluster, node: usize, body: String, acked: &mut Vec<String>) {
    let reply = c.append(node, &body).await;
    assert_eq!(reply.status, 201, "{body}: {}", reply.text());
    acked.push(body);
}

/// Raises this process's open-file limit (inherited by the nodes it starts) to what the
/// half-open connection case needs: CI machines often default to a soft limit of 1024.
fn raise_fd_limit(wanted: u64) {
    use rustix::process::Resource;
    let limit = rustix::process::getrlimit(Resource::Nofile);
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft >= wanted {
        return;
    }
    let raised = limit.maximum.map_or(wanted, |hard| hard.min(wanted));
    let new = rustix::process::Rlimit {
        current: Some(raised),
        maximum: limit.maximum,
    };
    rustix::process::setrlimit(Resource::Nofile, new).unwrap();
}

// ---------------------------------------------------------------------------------------
// Client port
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_with_the_reason_however_they_are_framed() {
    let c = common::start(3, false, "[limits]\nmax_body_bytes = 1024\n").await;
    let addr = c.slots[1].client_addr;
    let reason = "haven: request body exceeds the 1024-byte limit\n";
    let mut acked = Vec::new();
    write_ok(&c, 1, "before".to_string(), &mut acked).await;

    // Honest Content-Length over the limit.
    let raw = exchange(addr, &post("/append", &"x".repeat(2048)))
        .await
        .answered();
    assert_eq!((raw.status, raw.body.as_str()), (413, reason), "{raw:?}");
    assert_eq!(raw.header("haven-error"), Some("body-too-large"));

    // A Content-Length claiming 100 MB followed by a few bytes, the connection left open:
    // refused at once from the header, without waiting for a body that never comes.
    let started = Instant::now();
    let lying =
        b"POST /append HTTP/1.1\r\nHost: haven\r\nContent-Length: 100000000\r\n\r\nonly this";
    let raw = exchange(addr, lying).await.answered();
    assert_eq!((raw.status, raw.body.as_str()), (413, reason), "{raw:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Chunked: no length announced, 4 chunks of 512 bytes.
    let mut chunked =
        b"POST /append HTTP/1.1\r\nHost: haven\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(format!("200\r\n{}\r\n", "c".repeat(512)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let raw = exchange(addr, &chunked).await.answered();
    assert_eq!((raw.status, raw.body.as_str()), (413, reason), "{raw:?}");

    // Chunked with one chunk claiming 4 GiB, of which 2 KiB arrive: cut at the limit.
    let mut huge_chunk =
        b"POST /append HTTP/1.1\r\nHost: haven\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\n"
            .to_vec();
    huge_chunk.extend_from_slice("h".repeat(2048).as_bytes());
    let raw = exchange(addr, &huge_chunk).await.answered();
    assert_eq!((raw.status, raw.body.as_str()), (413, reason), "{raw:?}");

    // Exactly at the limit still goes through, by either framing.
    write_ok(&c, 1, "y".repeat(1024), &mut acked).await;
    let mut at_limit =
        b"POST /append HTTP/1.1\r\nHost: haven\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    at_limit.extend_from_slice(format!("400\r\n{}\r\n0\r\n\r\n", "z".repeat(1024)).as_bytes());
    let raw = exchange(addr, &at_limit).await.answered();
    assert_eq!(raw.status, 201, "{raw:?}");
    acked.push("z".repeat(1024));
    write_ok(&c, 2, "after".to_string(), &mut acked).await;

    assert!(
        c.metric(
            1,
            "haven_request_errors_total",
            &[("reason", "body-too-large")]
        )
        .await
        .unwrap()
            >= 4.0
    );
    let lines = assert_acked_present_once(&c, &acked).await;
    assert_eq!(
        lines.len() as u64,
        PREPOPULATE + acked.len() as u64,
        "no refused body reached a replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_abandoned_requests_get_4xx_or_a_close_and_harm_nothing() {
    let c = common::start(3, false, "").await;
    let addr = c.slots[0].client_addr;
    let mut acked = Vec::new();
    write_ok(&c, 0, "before".to_string(), &mut acked).await;

    let bad_requests: [(&str, Vec<u8>); 4] = [
        (
            "garbage bytes",
            b"\x00\xff\x13\x37 not http at all \xfe\r\n\r\n".to_vec(),
        ),
        (
            "a header line without a colon",
            b"GET /count HTTP/1.1\r\nHost: haven\r\nthis line has no colon\r\n\r\n".to_vec(),
        ),
        (
            "an invalid method token",
            b"P(S)T /append HTTP/1.1\r\nHost: haven\r\nContent-Length: 1\r\n\r\nx".to_vec(),
        ),
        (
            "a bad protocol version",
            b"POST /append HTTP/9.9\r\nHost: haven\r\nContent-Length: 1\r\n\r\nx".to_vec(),
        ),
    ];
    for (what, bytes) in bad_requests {
        // hyper answers a head it cannot parse itself: 400, no body, and closes.
        let raw = exchange(addr, &bytes).await.answered();
        assert_eq!(raw.status, 400, "{what}: {raw:?}");
        assert_eq!(raw.header("connection"), Some("close"), "{what}: {raw:?}");
    }

    // A request head over 64 KiB: 431 (it got 200 before the fix: hyper's buffer limit
    // alone let a head through when one read overshot it).
    let mut big_head = b"GET /count HTTP/1.1\r\nHost: haven\r\nX-Padding: ".to_vec();
    big_head.extend(std::iter::repeat_n(b'p', 70 * 1024));
    big_head.extend_from_slice(b"\r\n\r\n");
    let raw = exchange(addr, &big_head).await.answered();
    assert_eq!(raw.status, 431, "{raw:?}");
    assert_eq!(raw.header("connection"), Some("close"), "{raw:?}");
    // Just under the limit is served.
    let mut fits =
        b"GET /count HTTP/1.1\r\nHost: haven\r\nConnection: close\r\nX-Padding: ".to_vec();
    fits.extend(std::iter::repeat_n(b'p', 60 * 1024));
    fits.extend_from_slice(b"\r\n\r\n");
    let raw = exchange(addr, &fits).await.answered();
    assert_eq!(raw.status, 200, "{raw:?}");

    // Idempotency keys outside 1..=256 bytes.
    for key in [String::new(), "k".repeat(257)] {
        let request = format!(
            "POST /append HTTP/1.1\r\nHost: haven\r\nIdempotency-Key: {key}\r\nContent-Length: 4\r\nConnection: close\r\n\r\nkeyd"
        );
        let raw = exchange(addr, request.as_bytes()).await.answered();
        assert_eq!(
            (raw.status, raw.body.as_str()),
            (400, "haven: Idempotency-Key must be 1 to 256 bytes\n"),
            "{raw:?}"
        );
        assert_eq!(raw.header("haven-error"), Some("bad-idempotency-key"));
    }

    // Disconnect mid-request: half the announced body, then gone. Never ordered.
    for _ in 0..5 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let partial =
            b"POST /append HTTP/1.1\r\nHost: haven\r\nContent-Length: 100\r\n\r\nhalf a body";
        stream.write_all(partial).await.unwrap();
        drop(stream);
    }
    // Disconnect mid-response: whole requests sent, the connection dropped before the
    // answer is read; and a pipelined burst of which only the first answer is read.
    for i in 0..5 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&post("/append", &format!("unread answer {i}")))
            .await
            .unwrap();
        drop(stream);
    }
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut burst = Vec::new();
    for i in 0..20 {
        let body = format!("pipelined {i}");
        burst.extend_from_slice(
            format!(
                "POST /append HTTP/1.1\r\nHost: haven\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    stream.write_all(&burst).await.unwrap();
    let first = read_outcome(&mut stream).await.answered();
    assert_eq!(first.status, 201, "{first:?}");
    acked.push("pipelined 0".to_string());
    drop(stream);

    // The node is unharmed: it serves writes through itself and the others.
    for node in 0..3 {
        write_ok(&c, node, format!("after via {}", node + 1), &mut acked).await;
    }
    let lines = assert_acked_present_once(&c, &acked).await;
    assert!(
        !lines.iter().any(|l| l.contains("half a body")),
        "an abandoned request body was ordered"
    );
    // Requests the client stopped listening to are still applied at most once.
    for i in 0..5 {
        let body = format!("unread answer {i}");
        assert!(lines.iter().filter(|l| **l == body).count() <= 1);
    }
    for i in 0..20 {
        let body = format!("pipelined {i}");
        assert!(lines.iter().filter(|l| **l == body).count() <= 1);
    }
    assert!(c.slots.iter().all(|s| s.node_running()));
}

/// Slowloris: clients that send their request head one byte every 500 ms are cut off by
/// the 10 s header timeout, and nobody else waits for them meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_while_other_clients_are_served() {
    let c = common::start(3, false, "").await;
    let addr = c.slots[0].client_addr;
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..20 {
        slow.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let trickle = async move {
                let head = b"POST /append HTTP/1.1\r\nHost: haven\r\nX-Slow: ".iter();
                for byte in head.chain(std::iter::repeat(&b's')) {
                    if writer.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            };
            let trickler = tokio::spawn(trickle);
            let mut got = Vec::new();
            // Closed when the read ends, with or without an error (reset).
            let _ = tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut got))
                .await
                .expect("a slow client was never cut off");
            trickler.abort();
            (started.elapsed(), got)
        }));
    }
    let mut acked = Vec::new();
    let mut worst = Duration::ZERO;
    let mut i = 0;
    while started.elapsed() < ingress_header_timeout() + Duration::from_secs(1) {
        let sent = Instant::now();
        write_ok(&c, i % 3, format!("while slow {i}"), &mut acked).await;
        worst = worst.max(sent.elapsed());
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        worst < Duration::from_secs(1),
        "a write took {worst:?} while slow clients were connected"
    );
    for task in slow {
        let (closed_after, got) = task.await.unwrap();
        assert!(
            got.is_empty(),
            "a slow client got {:?}",
            String::from_utf8_lossy(&got)
        );
        let timeout = ingress_header_timeout();
        assert!(
            closed_after >= timeout - Duration::from_millis(500)
                && closed_after < timeout + Duration::from_secs(5),
            "cut off after {closed_after:?}, header timeout {timeout:?}"
        );
    }
    assert_acked_present_once(&c, &acked).await;
}

fn ingress_header_timeout() -> Duration {
    haven_node::ingress::HEADER_READ_TIMEOUT
}

/// A body sent slower than the request budget gets 408 within the budget, and while it
/// trickles it holds one of the node's in-flight slots; with every slot held the next
/// request gets 503 + Retry-After at once. Then a flood far beyond the limit: each request
/// is answered 201 or 503, none hangs, no refused write is applied, and the node serves
/// normally afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_get_408_and_a_flood_beyond_the_inflight_limit_gets_503() {
    let config = "[limits]\nmax_inflight_requests = 8\nrequest_timeout_ms = 3000\n";
    let c = common::start(3, false, config).await;
    let node = 0;
    let addr = c.slots[node].client_addr;
    let mut acked = Vec::new();
    write_ok(&c, node, "before".to_string(), &mut acked).await;

    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..8 {
        slow.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let head = b"POST /append HTTP/1.1\r\nHost: haven\r\nContent-Length: 100\r\n\r\n";
            writer.write_all(head).await.unwrap();
            let trickler = tokio::spawn(async move {
                for _ in 0..100 {
                    if writer.write_all(b"b").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
            let mut got = Vec::new();
            let read = async {
                let mut chunk = [0u8; 4096];
                loop {
                    if let Some(raw) = parse_response(&got) {
                        return Some(raw);
                    }
                    match reader.read(&mut chunk).await {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            let raw = tokio::time::timeout(HANG, read)
                .await
                .expect("slow body hung");
            trickler.abort();
            (raw, started.elapsed())
        }));
    }
    // Every slot is held by a trickling body: the next request is refused at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused_at = Instant::now();
    let refused = exchange(addr, &post("/append", "refused")).await.answered();
    assert!(refused_at.elapsed() < Duration::from_secs(1));
    assert_eq!(
        (refused.status, refused.body.as_str()),
        (503, "haven: too many requests in progress on this node\n"),
        "{refused:?}"
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.header("haven-error"), Some("overloaded"));
    // Another node is not affected.
    write_ok(&c, 1, "via another node".to_string(), &mut acked).await;

    for task in slow {
        let (raw, elapsed) = task.await.unwrap();
        let raw = raw.expect("the slow body got no answer");
        assert_eq!(
            (raw.status, raw.body.as_str()),
            (408, "haven: request body not received within 3000 ms\n"),
            "{raw:?}"
        );
        assert_eq!(raw.header("haven-error"), Some("body-timeout"));
        assert!(
            elapsed > Duration::from_millis(2500) && elapsed < Duration::from_secs(6),
            "answered after {elapsed:?}"
        );
    }
    // The slots are free again.
    write_ok(&c, node, "after the slow bodies".to_string(), &mut acked).await;

    // The flood: 200 connections at once, each one write.
    let flood: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let body = format!("flood {i}");
                (exchange(addr, &post("/append", &body)).await, body)
            })
        })
        .collect();
    let (mut created, mut overloaded) = (0, 0);
    let mut refused_bodies = Vec::new();
    for task in flood {
        let (outcome, body) = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a flooding request hung")
            .unwrap();
        let raw = outcome.answered();
        match raw.status {
            201 => {
                created += 1;
                acked.push(body);
            }
            503 => {
                assert_eq!(raw.header("retry-after"), Some("1"), "{raw:?}");
                assert_eq!(raw.header("haven-error"), Some("overloaded"), "{raw:?}");
                overloaded += 1;
                refused_bodies.push(body);
            }
            other => panic!("flood request answered {other}: {raw:?}"),
        }
    }
    assert!(
        overloaded > 0,
        "200 concurrent writes never exceeded 8 in flight"
    );
    assert!(created > 0, "the node accepted nothing during the flood");

    // Normal service afterwards, at normal latency.
    for i in 0..10 {
        let sent = Instant::now();
        write_ok(&c, node, format!("after the flood {i}"), &mut acked).await;
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "{:?}",
            sent.elapsed()
        );
    }
    let lines = assert_acked_present_once(&c, &acked).await;
    for body in refused_bodies.iter().chain([&"refused".to_string()]) {
        assert!(!lines.contains(body), "refused write {body:?} was applied");
    }
    assert!(
        !lines.iter().any(|l| l.chars().all(|ch| ch == 'b')),
        "a timed-out body was applied"
    );
}

// ---------------------------------------------------------------------------------------
// Raft port
// ---------------------------------------------------------------------------------------

/// Sends `bytes` to a raft port and expects the node to drop the connection without a
/// word (the test checks the node's log for the reasons afterwards).
async fn raft_refuses(addr: SocketAddr, bytes: &[u8]) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(HANG, stream.read_to_end(&mut got))
        .await
        .expect("the raft port kept a bad connection open");
    assert!(
        got.is_empty(),
        "the raft port answered garbage with {got:?}"
    );
}

fn hello(cluster: &str, service: &str) -> Vec<u8> {
    let hello = wire::Hello {
        cluster: cluster.into(),
        service: service.into(),
        node: 99,
        settings: Vec::new(),
    };
    hello.encode().unwrap()
}

/// A valid hello for the test cluster's only service, then a frame header claiming `len`.
fn frame_header(len: u32) -> Vec<u8> {
    let mut bytes = hello("haven", "app");
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes
}

/// Sends `hello` and returns the reason the raft port gives for refusing it.
async fn raft_refusal(addr: SocketAddr, hello: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(hello).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(HANG, stream.read_to_end(&mut got))
        .await
        .expect("the raft port kept a refused connection open")
        .unwrap();
    let (id, reply) = wire::read_frame::<_, wire::RpcReply>(&mut &got[..], &mut Vec::new())
        .await
        .unwrap();
    match (id, reply) {
        (0, wire::RpcReply::Refused(reason)) => reason,
        other => panic!("not a refusal: {other:?}"),
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_port_drops_garbage_and_half_open_connections_and_keeps_committing() {
    const HALF_OPEN: usize = 2000;
    raise_fd_limit(HALF_OPEN as u64 + 1024);
    let c = common::start(3, false, STEADY_RAFT).await;
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    let follower = c.follower_of(leader);
    let leader_id = c.slots[leader].id;
    let mut acked = Vec::new();
    for i in 0..6 {
        write_ok(&c, i % 3, format!("before {i}"), &mut acked).await;
    }

    let mut undecodable = frame_header(12);
    undecodable.extend_from_slice(&[0xff; 12]);
    let mut no_id = frame_header(4);
    no_id.extend_from_slice(&[0; 4]);
    let mut over_limit = frame_header(u32::MAX);
    over_limit.extend_from_slice(&[0; 64]);
    for target in [leader, follower] {
        let addr = c.slots[target].raft_addr;
        raft_refuses(addr, b"\x00\x01garbage garbage garbage\xff\xfe").await;
        raft_refuses(addr, b"GET /status HTTP/1.1\r\nHost: haven\r\n\r\n").await;
        raft_refuses(addr, b"HVNRAFT9").await;
        raft_refuses(addr, &undecodable).await;
        raft_refuses(addr, &no_id).await;
        raft_refuses(addr, &over_limit).await;
        // A valid hello and a frame claiming the 128 MiB maximum, then the sender leaves.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(&frame_header(wire::MAX_FRAME_BYTES as u32))
            .await
            .unwrap();
        stream.write_all(&[7; 1024]).await.unwrap();
        drop(stream);
        write_ok(&c, target, format!("after garbage to {target}"), &mut acked).await;
    }
    // A well-formed hello for a service or cluster the node does not have: refused with
    // the reason, never served by the node's group.
    let addr = c.slots[follower].raft_addr;
    assert_eq!(
        raft_refusal(addr, &hello("haven", "nope")).await,
        "this node does not run service `nope` (it runs: app)"
    );
    assert_eq!(
        raft_refusal(addr, &hello("other", "app")).await,
        "the dialer belongs to cluster `other`, this node to cluster `haven`"
    );
    write_ok(&c, follower, "after refusals".to_string(), &mut acked).await;
    for target in [leader, follower] {
        let log = std::fs::read_to_string(c.log_path(target, Process::Node)).unwrap();
        if target == follower {
            assert!(
                log.contains("raft connection refused"),
                "refusal not logged"
            );
        }
        for why in [
            "bad hello",
            "undecodable frame",
            "has no id",
            "exceeds the 134217728-byte limit",
        ] {
            assert!(log.contains(why), "node {} did not log {why:?}", target + 1);
        }
    }

    // Claims cost no memory: 16 connections each promising a 128 MiB frame, held open.
    let pid = c.slots[follower].node_pid().unwrap();
    let rss_before = vm_rss_kib(pid);
    let mut claims = Vec::new();
    for _ in 0..16 {
        let mut stream = TcpStream::connect(c.slots[follower].raft_addr)
            .await
            .unwrap();
        stream
            .write_all(&frame_header(wire::MAX_FRAME_BYTES as u32))
            .await
            .unwrap();
        stream.write_all(&[7; 64 * 1024]).await.unwrap();
        claims.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_mib = vm_rss_kib(pid).saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 128,
        "16 frame claims grew the node by {grown_mib} MiB"
    );
    drop(claims);

    // Thousands of half-open connections: connected, then silent or stuck mid-hello.
    let mut half_open = Vec::with_capacity(HALF_OPEN);
    for batch in 0..HALF_OPEN / 100 {
        let connects = (0..100).map(|i| {
            let target = if (batch + i) % 2 == 0 {
                leader
            } else {
                follower
            };
            let addr = c.slots[target].raft_addr;
            async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                if i % 2 == 0 {
                    stream.write_all(b"HVN").await.unwrap();
                }
                stream
            }
        });
        half_open.extend(futures_join_all(connects).await);
    }
    // Meanwhile the cluster keeps committing, through every node.
    for i in 0..9 {
        write_ok(&c, i % 3, format!("while half-open {i}"), &mut acked).await;
    }
    // Every one is dropped once the hello timeout passes.
    let closes = half_open.into_iter().map(|mut stream| async move {
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got).await;
        got.len()
    });
    let sent = tokio::time::timeout(
        wire::HELLO_TIMEOUT + Duration::from_secs(10),
        futures_join_all(closes),
    )
    .await
    .expect("half-open raft connections were never dropped");
    assert!(sent.iter().all(|n| *n == 0));

    for i in 0..6 {
        write_ok(&c, i % 3, format!("after {i}"), &mut acked).await;
    }
    for i in 0..3 {
        let status = c.status(i).await.unwrap();
        assert_eq!(
            status.leader_id,
            Some(leader_id),
            "node {}: {status:?}",
            i + 1
        );
        let role = if i == leader { "leader" } else { "follower" };
        assert_eq!(status.role, role, "node {}", i + 1);
    }
    assert_acked_present_once(&c, &acked).await;
}

/// `futures::future::join_all` without the dependency: spawn each, await in order.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

// ---------------------------------------------------------------------------------------
// Admin port
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_refuses_bad_membership_requests_with_a_reason() {
    let c = common::start(3, false, STEADY_RAFT).await;
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    let follower = c.follower_of(leader);
    let leader_id = c.slots[leader].id;
    let mut acked = Vec::new();
    write_ok(&c, 0, "before".to_string(), &mut acked).await;
    let admin = |i: usize, path: &str| format!("{}{path}", c.slots[i].admin_url());
    let json = [("content-type", "application/json")];
    let send = |i: usize, path: &str, body: &str| {
        let url = admin(i, path);
        let body = bytes::Bytes::from(body.to_string());
        let http = c.http.clone();
        async move { http.send("POST", &url, &json, body).await.unwrap() }
    };

    let reply = send(leader, "/members/promote", "{not json").await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.text().starts_with(
            r#"{"code":"bad-request","message":"Failed to parse the request body as JSON"#
        ),
        "{}",
        reply.text()
    );
    let reply = send(leader, "/members/remove", "{}").await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(
        reply.text().contains("missing field `id`"),
        "{}",
        reply.text()
    );
    let reply = send(leader, "/members/learner", r#"{"id": 4}"#).await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(
        reply.text().contains("missing field `raft_addr`"),
        "{}",
        reply.text()
    );
    let reply = send(leader, "/members/promote", r#"{"id": "four"}"#).await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(
        reply.text().contains("id: invalid type"),
        "{}",
        reply.text()
    );
    let reply = c
        .http
        .post(&admin(leader, "/members/remove"), r#"{"id": 2}"#)
        .await
        .unwrap();
    assert_eq!(reply.status, 415, "{}", reply.text());
    assert!(
        reply.text().contains("Content-Type: application/json"),
        "{}",
        reply.text()
    );

    // Well-formed, but about nodes that are not there.
    let error = |reply: &haven_client::http::Reply| -> serde_json::Value {
        serde_json::from_slice(&reply.body).unwrap()
    };
    let reply = send(leader, "/members/promote", r#"{"id": 9}"#).await;
    assert_eq!(reply.status, 409);
    assert_eq!(
        error(&reply)["message"],
        "node 9 is not a learner; add it first"
    );
    let reply = send(leader, "/members/remove", r#"{"id": 9}"#).await;
    assert_eq!(reply.status, 404);
    assert_eq!(error(&reply)["message"], "node 9 is not a member");
    let new = r#"{"id": 10, "raft_addr": "127.0.0.1:1", "client_addr": "127.0.0.1:2"}"#;
    let reply = send(
        leader,
        "/members/replace",
        &format!(r#"{{"old": 9, "new": {new}}}"#),
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(error(&reply)["message"], "node 9 is not a voter");
    let replace_self = format!(r#"{{"old": {leader_id}, "new": {new}}}"#);
    let reply = send(leader, "/members/replace", &replace_self).await;
    assert_eq!(reply.status, 409);
    assert_eq!(
        error(&reply)["message"],
        "the leader cannot replace itself; transfer leadership first"
    );
    let reply = send(follower, "/members/remove", r#"{"id": 9}"#).await;
    assert_eq!(reply.status, 409);
    assert_eq!(
        error(&reply)["message"],
        format!(
            "node {} is not the leader; send membership changes to the leader (node {leader_id})",
            c.slots[follower].id
        )
    );
    assert_eq!(error(&reply)["leader_id"], leader_id);
    // An address that is not host:port would be replicated into the membership and dialled
    // for ever: refused up front, by both calls that take one.
    for (path, body) in [
        (
            "/members/learner",
            r#"{"id": 4, "raft_addr": "not-an-address", "client_addr": "127.0.0.1:2"}"#.to_string(),
        ),
        (
            "/members/replace",
            format!(
                r#"{{"old": {}, "new": {{"id": 4, "raft_addr": "127.0.0.1:1", "client_addr": "nowhere"}}}}"#,
                c.slots[follower].id
            ),
        ),
    ] {
        let reply = send(leader, path, &body).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
        let reason = error(&reply)["message"].as_str().unwrap().to_string();
        assert!(reason.contains("is not host:port"), "{reason}");
    }

    // Checkpoints are not configured.
    let reply = c
        .http
        .post(&admin(leader, "/checkpoints"), "")
        .await
        .unwrap();
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (
            409,
            r#"{"code":"conflict","message":"checkpoints are off ([checkpoints] is not configured)"}"#
        )
    );

    // Nothing changed, and the cluster still takes writes.
    let status = c.status(leader).await.unwrap();
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert!(status.learners.is_empty(), "{status:?}");
    for node in 0..3 {
        write_ok(&c, node, format!("after via {}", node + 1), &mut acked).await;
    }
    assert_acked_present_once(&c, &acked).await;
}

// ---------------------------------------------------------------------------------------
// Dead app
// ---------------------------------------------------------------------------------------

/// The *leader's* replica dies (cluster.rs covers a follower's): the leader hands
/// leadership over, commits go on, the other nodes answer writes, the dead replica's node
/// answers its own clients 504 after the budget and its admin port keeps answering, also
/// after more writes than its replica's queue holds; once the app is back it catches up
/// without diverging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_app_on_the_leader_costs_a_metric_and_timeouts_never_the_node() {
    let config = format!("{STEADY_RAFT}[limits]\nrequest_timeout_ms = 2000\n");
    let mut c = common::start(3, false, &config).await;
    let leader = c.wait_for_leader(Duration::from_secs(5)).await.unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut acked = Vec::new();
    for i in 0..3 {
        write_ok(&c, i, format!("before {i}"), &mut acked).await;
    }
    let failures_before = c
        .metric(leader, "haven_app_delivery_failures_total", &[])
        .await
        .unwrap();
    c.kill_app(leader);
    for i in 0..10 {
        write_ok(&c, others[i % 2], format!("app down {i}"), &mut acked).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.status(leader).await.unwrap().app_up {
        assert!(
            Instant::now() < deadline,
            "app_up still true with the app dead"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        c.metric(leader, "haven_app_delivery_failures_total", &[])
            .await
            .unwrap()
            > failures_before
    );

    let started = Instant::now();
    let stalled = c.append(leader, "through the dead app's node").await;
    let elapsed = started.elapsed();
    assert_eq!(stalled.status, 504, "{}", stalled.text());
    assert_eq!(
        stalled.header("haven-error").as_deref(),
        Some("apply-timeout")
    );
    let text = stalled.text();
    assert!(
        text.starts_with("haven: entry ")
            && text.ends_with(
                " is committed but this node's replica has not applied it within 2000 ms\n"
            ),
        "{text}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "answered after {elapsed:?}"
    );
    // The node itself answers its admin port at once, its health names the dead replica,
    // and it has handed leadership to a node whose replica works (`consensus::step_aside`).
    let started = Instant::now();
    let health = c
        .http
        .get(&format!("{}/health", c.slots[leader].admin_url()))
        .await
        .unwrap();
    let app = c.slots[leader].app_url();
    let expected = format!(
        r#"{{"status":"unhealthy","problems":[{{"service":"app","code":"app-down","message":"the replica at {app} does not answer HTTP within 1000 ms"}}]}}"#
    );
    assert_eq!((health.status, health.text()), (503, expected));
    assert!(started.elapsed() < Duration::from_secs(1));
    let status = c.status(leader).await.unwrap();
    assert_eq!(status.role, "follower");
    assert!(
        others
            .iter()
            .any(|i| status.leader_id == Some(c.slots[*i].id))
    );
    assert!(!status.app_up);
    assert!(
        c.metric(leader, "haven_leadership_handoffs_total", &[])
            .await
            .unwrap()
            >= 1.0
    );
    assert!(c.slots[leader].node_running());

    // More writes than the dead replica's queue holds: before the hand-over existed, the
    // old leader froze once its queue was full, went on calling itself leader, and the
    // cluster lost writes for an election. Now they just go on.
    let burst_ok = burst(&c, &others, 64, 100).await;
    assert_eq!(burst_ok, 6400);
    let status = c.status(leader).await.unwrap();
    assert_ne!(status.role, "leader");
    assert!(c.slots[leader].node_running());

    c.start_app(leader).unwrap();
    let lines = assert_acked_present_once(&c, &acked).await;
    assert_eq!(
        lines
            .iter()
            .filter(|l| *l == "through the dead app's node")
            .count(),
        1,
        "the committed write is applied exactly once when the app is back"
    );
    let bursts = lines.iter().filter(|l| l.starts_with("burst ")).count();
    assert_eq!(
        bursts, burst_ok,
        "every acknowledged burst write applied once"
    );
    assert!(c.status(leader).await.unwrap().app_up);
    write_ok(&c, leader, "after the app is back".to_string(), &mut acked).await;
    assert_acked_present_once(&c, &acked).await;
}

/// `writers` concurrent writers, `each` appends apiece, spread over `nodes`; returns how
/// many were acknowledged with 201.
async fn burst(c: &TestCluster, nodes: &[usize], writers: usize, each: usize) -> usize {
    let urls: Vec<String> = nodes
        .iter()
        .map(|i| format!("{}/append", c.slots[*i].client_url()))
        .collect();
    let acked = futures_join_all((0..writers).map(|w| {
        let (http, url) = (c.http.clone(), urls[w % urls.len()].clone());
        async move {
            let mut ok = 0;
            for n in 0..each {
                let reply = http.post(&url, format!("burst {w} {n}")).await;
                ok += usize::from(reply.is_ok_and(|r| r.status == 201));
            }
            ok
        }
    }))
    .await;
    acked.into_iter().sum()
}

// ---------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------

#[test]
fn bad_config_file_exits_non_zero_naming_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = "[node]\nid = 1\nzone = \"a\"\nclient_addr = \"127.0.0.1:1\"\nraft_addr = \"127.0.0.1:2\"\nadmin_addr = \"127.0.0.1:3\"\ndata_dir = \"DATA\"\n\n[app]\nurl = \"http://127.0.0.1:4\"\n\n[[peers]]\nid = 1\nraft_addr = \"127.0.0.1:2\"\nclient_addr = \"127.0.0.1:1\"\n\n[limits]\nmax_body_bytes = 1024\n";
    let good = good.replace("DATA", &dir.path().join("data").display().to_string());
    let cases = [
        (
            good.replace(
                "max_body_bytes = 1024",
                "max_body_bytes = 1024\nmax_bodies = 3",
            ),
            ["unknown field `max_bodies`", "line 19"],
        ),
        (
            good.replace("max_body_bytes = 1024", "max_body_bytes = 0"),
            ["limits.max_body_bytes", "line 18"],
        ),
    ];
    for (text, wanted) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
            .args(["node", "--config", &path.display().to_string()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "started with:\n{text}");
        for what in wanted {
            assert!(stderr.contains(what), "{what:?} not in {stderr}");
        }
        assert!(
            !dir.path().join("data").exists(),
            "a bad config touched the data dir"
        );
    }
}

#[test]
fn a_runtime_without_workers_is_refused_with_the_range() {
    for (threads, reason) in [("0", "0 is not in 1..=1024"), ("many", "invalid digit")] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
            .args(["--threads", threads, "status", "--admin", "127.0.0.1:1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "invalid value '{threads}' for '--threads <THREADS>': {reason}"
            )),
            "{stderr}"
        );
    }
}

/// A listen port the kernel may hand out as a source port gets a warning naming the range.
#[test]
fn a_listen_port_inside_the_ephemeral_range_is_warned_about_at_start() {
    use std::io::BufRead;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let mut bounds = range.split_whitespace();
    let (low, high) = (bounds.next().unwrap(), bounds.next().unwrap());
    // Port 0 binds a free port from the ephemeral range itself.
    let inside = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (raft, admin) = (
        haven_testkit::cluster::free_addr().unwrap(),
        haven_testkit::cluster::free_addr().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[node]\nid = 1\nzone = \"a\"\nclient_addr = \"{inside}\"\nraft_addr = \"{raft}\"\nadmin_addr = \"{admin}\"\ndata_dir = \"{}\"\n\n[app]\nurl = \"http://127.0.0.1:4\"\n\n[[peers]]\nid = 1\nraft_addr = \"{raft}\"\nclient_addr = \"{inside}\"\n",
        dir.path().join("data").display()
    );
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config).unwrap();
    let mut node = std::process::Command::new(env!("CARGO_BIN_EXE_haven"))
        .args(["node", "--config", &path.display().to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stderr = node.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let wanted = format!(
        "the client port lies inside the ephemeral port range {low}-{high} (/proc/sys/net/ipv4/ip_local_port_range)"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let warned = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(&wanted) => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    node.kill().unwrap();
    node.wait().unwrap();
    assert!(warned, "no warning for port {inside}:\n{}", seen.join("\n"));
    assert!(
        !seen.iter().any(|l| l.contains("the raft port lies inside")),
        "the raft port {raft} is below the range: {seen:?}"
    );
}
