//! Log append with group commit: the time from `RaftLogStorage::append` to the flush callback,
//! which comes only after the fsync that covers the entries.
//!
//! * `append/N`: one append of N entries at a time, each awaited before the next (a lone
//!   writer: one fsync per append).
//! * `append_pipelined/64`: 64 single-entry appends queued before awaiting any, as openraft
//!   does under load; the writer drains them into few fsyncs.
//!
//! Each benchmark writes to a fresh store under the target dir (a real disk, not tmpfs) and
//! prints one line to stderr with its entries per fsync from [`LogStore::stats`].
//!
//! Run: `cargo bench -p haven-log --bench append`.

use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use criterion::BenchmarkId;
use criterion::Criterion;
use criterion::Throughput;
use criterion::criterion_group;
use criterion::criterion_main;
use haven_log::LogOptions;
use haven_log::LogStats;
use haven_log::LogStore;
use openraft::RaftTypeConfig;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::type_config::TypeConfigExt;
use openraft::type_config::alias::LogIdOf;
use openraft::vote::RaftLeaderIdExt;

openraft::declare_raft_types!(
    /// String requests and responses, u64 node ids.
    pub BenchConfig:
        D = String,
        R = String,
);

type C = BenchConfig;
type Store = LogStore<C>;
type Ent = <C as RaftTypeConfig>::Entry;

const PAYLOAD_BYTES: usize = 128;
const BATCHES: [usize; 3] = [1, 16, 256];
const PIPELINE_DEPTH: usize = 64;

/// Builds entries `first..first + n` with a 128-byte payload each.
fn entries(first: u64, n: usize) -> Vec<Ent> {
    let leader = <C as RaftTypeConfig>::LeaderId::new_committed(1, 1);
    (first..first + n as u64)
        .map(|i| {
            let payload = format!("{i:020}-{}", "x".repeat(PAYLOAD_BYTES - 21));
            Ent::new_normal(LogIdOf::<C>::new(leader, i), payload)
        })
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A temp dir on the same disk as the build, so fsync has its real cost.
fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Opens a store and appends entry 1, so the first segment's creation (and its directory
/// fsync) is not counted. The next entry to append is 2.
fn open(rt: &tokio::runtime::Runtime, dir: &Path) -> Store {
    let mut store = Store::open(dir, LogOptions::default()).unwrap();
    rt.block_on(async { submit(&mut store, entries(1, 1)).await.await });
    store
}

/// Queues `entries` as one append; the receiver yields once they are durable.
async fn submit(store: &mut Store, entries: Vec<Ent>) -> impl Future<Output = ()> + use<> {
    let (tx, rx) = C::oneshot();
    store.append(entries, IOFlushed::signal(tx)).await.unwrap();
    async move { rx.await.unwrap().unwrap() }
}

/// One line per benchmark: how many entries shared each fsync.
fn report(name: &str, before: LogStats, after: LogStats) {
    let entries = after.entries_appended - before.entries_appended;
    let fsyncs = after.fsyncs - before.fsyncs;
    if entries == 0 {
        return; // Filtered out.
    }
    eprintln!(
        "{name}: {entries} entries, {} appends, {fsyncs} fsyncs, {} group commits, {:.1} entries/fsync",
        after.append_calls - before.append_calls,
        after.group_commits - before.group_commits,
        entries as f64 / fsyncs.max(1) as f64,
    );
}

fn append_batches(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append");
    for batch in BATCHES {
        let dir = tempdir();
        let mut store = open(&rt, dir.path());
        let mut next = 2u64;
        let before = store.stats();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter_custom(|iters| {
                let batches: Vec<Vec<Ent>> = (0..iters)
                    .map(|k| entries(next + k * batch as u64, batch))
                    .collect();
                next += iters * batch as u64;
                rt.block_on(async {
                    let start = Instant::now();
                    for entries in batches {
                        submit(&mut store, entries).await.await;
                    }
                    start.elapsed()
                })
            })
        });
        report(&format!("append/{batch}"), before, store.stats());
    }
    group.finish();
}

fn append_pipelined(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("append_pipelined");
    let dir = tempdir();
    let mut store = open(&rt, dir.path());
    let mut next = 2u64;
    let before = store.stats();
    group.throughput(Throughput::Elements(PIPELINE_DEPTH as u64));
    group.bench_function(BenchmarkId::from_parameter(PIPELINE_DEPTH), |b| {
        b.iter_custom(|iters| {
            let rounds: Vec<Vec<Ent>> = (0..iters)
                .map(|k| entries(next + k * PIPELINE_DEPTH as u64, PIPELINE_DEPTH))
                .collect();
            next += iters * PIPELINE_DEPTH as u64;
            rt.block_on(async {
                let start = Instant::now();
                for round in rounds {
                    let mut flushed = Vec::with_capacity(PIPELINE_DEPTH);
                    for entry in round {
                        flushed.push(submit(&mut store, vec![entry]).await);
                    }
                    for done in flushed {
                        done.await;
                    }
                }
                start.elapsed()
            })
        })
    });
    report(
        &format!("append_pipelined/{PIPELINE_DEPTH}"),
        before,
        store.stats(),
    );
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = append_batches, append_pipelined
}
criterion_main!(benches);
