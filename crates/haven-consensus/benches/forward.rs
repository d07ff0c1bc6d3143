//! Request forwarding on the raft transport's client lane: a follower sends the leader
//! `RpcRequest::Forward(OrderedRequest)` and gets `RpcReply::Forward(ForwardOutcome)` back.
//!
//! * `forward_frame`: encode and decode of the request frame (`wire::encode`,
//!   `wire::read_frame`), without I/O.
//! * `forward_loopback`: the real client (`Transport` → `PeerLink::call`) against a tiny
//!   echo server on 127.0.0.1 that speaks the wire format and answers every `Forward` with
//!   `Committed` at once (no openraft): one call at a time, and 64 calls in flight.
//!
//! Run: `cargo bench -p haven-consensus --bench forward`.

mod common;

use std::hint::black_box;
use std::time::Duration;
use std::time::Instant;

use common::request;
use criterion::BenchmarkId;
use criterion::Criterion;
use criterion::Throughput;
use criterion::criterion_group;
use criterion::criterion_main;
use futures::FutureExt;
use haven_base::metrics::Metrics;
use haven_consensus::link::Lane;
use haven_consensus::link::Transport;
use haven_consensus::wire;
use haven_consensus::wire::ForwardOutcome;
use haven_consensus::wire::RpcReply;
use haven_consensus::wire::RpcRequest;
use tokio::io::BufWriter;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const IN_FLIGHT: usize = 64;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Decodes one frame from memory. `read_frame` on a byte slice never waits, so it is polled
/// once instead of paying for a runtime's `block_on`.
fn decode(frame: &[u8], buf: &mut Vec<u8>) -> (u64, RpcRequest) {
    let mut reader = frame;
    wire::read_frame(&mut reader, buf)
        .now_or_never()
        .expect("reading from memory never waits")
        .unwrap()
}

fn frame(c: &mut Criterion) {
    let message = RpcRequest::Forward(request(1));
    let encoded = wire::encode(1, &message).unwrap();
    let mut group = c.benchmark_group("forward_frame");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function(BenchmarkId::new("encode", encoded.len()), |b| {
        b.iter(|| wire::encode(black_box(1), black_box(&message)).unwrap())
    });
    group.bench_function(BenchmarkId::new("decode", encoded.len()), |b| {
        let mut buf = Vec::new();
        b.iter(|| decode(black_box(&encoded), &mut buf))
    });
    group.bench_function(BenchmarkId::new("encode_decode", encoded.len()), |b| {
        let mut buf = Vec::new();
        b.iter(|| {
            let frame = wire::encode(black_box(1), black_box(&message)).unwrap();
            decode(&frame, &mut buf)
        })
    });
    group.finish();
}

/// Accepts connections and answers each `Forward` with `Committed`, framed like the raft
/// server does (hello, then frames; replies through a queue drained by `write_frames`).
async fn echo_server(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(echo_connection(stream));
    }
}

async fn echo_connection(stream: TcpStream) -> Result<(), wire::WireError> {
    stream.set_nodelay(true)?;
    let (mut reader, writer) = stream.into_split();
    wire::read_hello(&mut reader).await?;
    let (replies, rx) = mpsc::channel::<Vec<u8>>(1024);
    tokio::spawn(async move {
        let _ = wire::write_frames(&mut BufWriter::new(writer), rx).await;
    });
    let mut buf = Vec::new();
    let mut index = 0u64;
    loop {
        let (id, request) = wire::read_frame::<_, RpcRequest>(&mut reader, &mut buf).await?;
        let reply = match request {
            RpcRequest::Forward(_) => {
                index += 1;
                RpcReply::Forward(ForwardOutcome::Committed { index })
            }
            _ => RpcReply::Forward(ForwardOutcome::Unknown {
                reason: "echo server only answers forwards".to_string(),
            }),
        };
        if replies.send(wire::encode(id, &reply)?).await.is_err() {
            return Ok(());
        }
    }
}

fn assert_committed(reply: RpcReply) {
    assert!(
        matches!(reply, RpcReply::Forward(ForwardOutcome::Committed { .. })),
        "unexpected reply {reply:?}"
    );
}

fn loopback(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(echo_server(listener));
        addr
    });
    let hello = wire::Hello {
        cluster: "bench".into(),
        service: "app".into(),
        node: 0,
        settings: Vec::new(),
    };
    let link = Transport::tcp(Metrics::new().unwrap().node.peers, hello).link(&addr, Lane::Client);
    let message = RpcRequest::Forward(request(1));
    // Connect outside the measurement.
    rt.block_on(async { assert_committed(link.call(&message, CALL_TIMEOUT).await.unwrap()) });

    let mut group = c.benchmark_group("forward_loopback");
    group.throughput(Throughput::Elements(1));
    group.bench_function("round_trip", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    assert_committed(link.call(&message, CALL_TIMEOUT).await.unwrap());
                }
                start.elapsed()
            })
        })
    });
    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    group.bench_function(BenchmarkId::new("in_flight", IN_FLIGHT), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let calls = (0..IN_FLIGHT).map(|_| link.call(&message, CALL_TIMEOUT));
                    for reply in futures::future::join_all(calls).await {
                        assert_committed(reply.unwrap());
                    }
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = frame, loopback
}
criterion_main!(benches);
