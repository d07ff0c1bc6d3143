//! The raft wire decoder (`haven_consensus::wire`) on arbitrary bytes.
//!
//! The input is what a peer could send on the raft port: the first byte picks what the
//! receiver expects (the server reads `HELLO` and then `RpcRequest` frames, the client reads
//! `RpcReply` frames); the rest is the byte stream, read frame after frame with one reused
//! buffer, exactly as `consensus::server` and `consensus::client` do.
//!
//! Properties:
//! * never panics, never blocks (the reader is an in-memory slice);
//! * a length prefix above `MAX_FRAME_BYTES` is refused with `TooLarge(len)` and no
//!   allocation of (anywhere near) the claimed size happens first — checked with a counting
//!   global allocator;
//! * a frame shorter than its 8-byte id is refused; a clean end between frames is `Closed`;
//! * every decoded message round-trips: `encode(id, msg)` reads back to the same id and to a
//!   message that encodes to the same bytes again (postcard is deterministic on output);
//! * `read_hello` accepts exactly `HVNRAFT1`.

#![no_main]

use std::alloc::GlobalAlloc;
use std::alloc::Layout;
use std::alloc::System;
use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::task::Context;
use std::task::Poll;
use std::task::Waker;

use haven_consensus::wire;
use haven_consensus::wire::MAX_FRAME_BYTES;
use haven_consensus::wire::RpcReply;
use haven_consensus::wire::RpcRequest;
use haven_consensus::wire::WireError;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Tracks the largest single allocation (or reallocation target) since the last reset.
struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Polls a future that must complete without waiting (all readers here are in memory).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("wire decoder waited on an in-memory reader"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            // The server side: hello, then requests.
            let mut reader = stream;
            let hello = ready(wire::read_hello(&mut reader));
            let starts_with_hello = stream.starts_with(wire::HELLO);
            match hello {
                Ok(()) => assert!(starts_with_hello),
                Err(WireError::BadHello(got)) => {
                    assert!(!starts_with_hello);
                    assert_eq!(&got[..], &stream[..8]);
                }
                Err(WireError::Io(e)) => {
                    assert!(stream.len() < 8);
                    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
                }
                Err(e) => panic!("unexpected hello error: {e}"),
            }
            if starts_with_hello {
                read_stream::<RpcRequest>(reader);
            }
        }
        1 => read_stream::<RpcRequest>(stream),
        _ => read_stream::<RpcReply>(stream),
    }
});

/// Reads frames until the first error, checking each step against the frame layout.
fn read_stream<T>(stream: &[u8])
where
    T: Serialize + DeserializeOwned + std::fmt::Debug,
{
    let mut reader = stream;
    let mut buf = Vec::new();
    loop {
        let before = reader;
        LARGEST.store(0, Ordering::Relaxed);
        let result = ready(wire::read_frame::<_, T>(&mut reader, &mut buf));
        let largest = LARGEST.load(Ordering::Relaxed);
        let claimed = before
            .get(..4)
            .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize);
        match result {
            Ok((id, message)) => {
                let len = claimed.expect("a frame has a header");
                assert!((8..=MAX_FRAME_BYTES).contains(&len));
                assert!(before.len() >= 4 + len);
                assert_eq!(id.to_le_bytes(), before[4..12]);
                assert_eq!(reader.len(), before.len() - 4 - len, "frame boundary");
                round_trip(id, &message);
            }
            Err(err) => {
                match (&err, claimed) {
                    (WireError::Closed, _) => assert!(before.len() < 4, "Closed mid-stream"),
                    (WireError::TooLarge(n), Some(len)) => {
                        assert_eq!(*n, len);
                        assert!(len > MAX_FRAME_BYTES);
                        // Refused before any buffer of the claimed size exists.
                        assert!(
                            largest < 1 << 20,
                            "{largest}-byte allocation before refusing a {len}-byte frame"
                        );
                    }
                    (WireError::Decode(_), Some(len)) => assert!(len <= MAX_FRAME_BYTES),
                    (WireError::Io(e), Some(len)) => {
                        // The frame is cut short by the end of the input.
                        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
                        assert!((8..=MAX_FRAME_BYTES).contains(&len));
                        assert!(before.len() < 4 + len);
                    }
                    (e, claimed) => panic!("unexpected {e} with header {claimed:?}"),
                }
                return;
            }
        }
    }
}

/// `decode(encode(m))` is `m`, compared through its (deterministic) encoding.
fn round_trip<T>(id: u64, message: &T)
where
    T: Serialize + DeserializeOwned + std::fmt::Debug,
{
    let frame = wire::encode(id, message).expect("a decoded message encodes");
    let mut reader = &frame[..];
    let mut buf = Vec::new();
    let (id2, back): (u64, T) =
        ready(wire::read_frame(&mut reader, &mut buf)).expect("an encoded frame decodes");
    assert!(reader.is_empty(), "encode wrote more than one frame");
    assert_eq!(id, id2);
    let frame2 = wire::encode(id2, &back).expect("re-encode");
    assert_eq!(frame, frame2, "round trip changed the message: {message:?} vs {back:?}");
}
