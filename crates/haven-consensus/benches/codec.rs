//! Entry encode/decode: the postcard encoding of one log entry, as the log store writes it
//! into every record and the raft wire carries it in every append.
//!
//! Run: `cargo bench -p haven-consensus --bench codec`.

mod common;

use std::hint::black_box;

use common::request;
use criterion::BenchmarkId;
use criterion::Criterion;
use criterion::Throughput;
use criterion::criterion_group;
use criterion::criterion_main;
use haven_consensus::types::Entry;
use haven_consensus::types::LogId;
use haven_consensus::types::TypeConfig;
use openraft::RaftTypeConfig;
use openraft::entry::RaftEntry;
use openraft::vote::RaftLeaderIdExt;

const BATCH: usize = 64;

fn entry(index: u64) -> Entry {
    let leader = <TypeConfig as RaftTypeConfig>::LeaderId::new_committed(3, 1);
    Entry::new_normal(LogId::new(leader, index), request(index))
}

fn single(c: &mut Criterion) {
    let entry = entry(1_000_000);
    let encoded = postcard::to_stdvec(&entry).unwrap();
    let mut group = c.benchmark_group("entry");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function(BenchmarkId::new("encode", encoded.len()), |b| {
        b.iter(|| postcard::to_stdvec(black_box(&entry)).unwrap())
    });
    group.bench_function(BenchmarkId::new("decode", encoded.len()), |b| {
        b.iter(|| postcard::from_bytes::<Entry>(black_box(&encoded)).unwrap())
    });
    group.finish();
}

/// 64 entries as one sequence, the shape of an append request's `entries`.
fn batch(c: &mut Criterion) {
    let entries: Vec<Entry> = (0..BATCH as u64).map(|i| entry(1_000_000 + i)).collect();
    let encoded = postcard::to_stdvec(&entries).unwrap();
    let mut group = c.benchmark_group("entry_batch64");
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function(BenchmarkId::new("encode", encoded.len()), |b| {
        b.iter(|| postcard::to_stdvec(black_box(&entries)).unwrap())
    });
    group.bench_function(BenchmarkId::new("decode", encoded.len()), |b| {
        b.iter(|| postcard::from_bytes::<Vec<Entry>>(black_box(&encoded)).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = single, batch
}
criterion_main!(benches);
