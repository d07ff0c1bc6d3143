//! The clients: each one, in a loop until the deadline, picks a key, a node and an
//! operation (linearizable read, set, or compare-and-set against the last version it
//! saw), sends it through that node, and records invocation, completion and outcome.
//!
//! Clients pace themselves so that each key's history stays within [`MAX_OPS_PER_KEY`]
//! over the whole run (the checker's search grows quickly with history length), and
//! every write carries a unique `Idempotency-Key` so an unknown outcome can be retried.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::time::Instant;

use super::history::OpKind;
use super::history::OpRecord;
use super::history::Outcome;
use super::history::Ret;
use super::history::classify;
use haven_client::http::Http;

/// The most operations recorded on one key in one run.
pub const MAX_OPS_PER_KEY: usize = 250;
/// Longest a client waits for one answer; longer than Haven's own request budget in the
/// torture config, so Haven usually answers first and says what happened.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A write whose outcome is unknown is retried with the same `Idempotency-Key` until
/// this long after its first attempt: every unknown left in the history is an operation
/// the checker must try at every later point, and its search grows quickly with them.
const RETRY_BUDGET: Duration = Duration::from_secs(8);
/// First pause between retries; it doubles up to [`MAX_RETRY_PAUSE`].
const RETRY_PAUSE: Duration = Duration::from_millis(200);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The path of key `k`.
pub fn key_path(k: usize) -> String {
    format!("/k{k}")
}

/// Data every key is created with.
pub const INITIAL_DATA: &str = "init";

/// What the clients share.
pub struct Workload {
    /// Every node's client URL, by node index.
    pub urls: Vec<String>,
    pub keys: usize,
    pub clients: usize,
    pub seed: u64,
    pub started: Instant,
    pub duration: Duration,
}

impl Workload {
    /// Runs every client to the deadline and returns all their records.
    pub async fn run(self) -> Vec<OpRecord> {
        let shared = Arc::new(Shared {
            budget: (0..self.keys).map(|_| AtomicUsize::new(0)).collect(),
            workload: self,
        });
        let tasks: Vec<_> = (0..shared.workload.clients)
            .map(|c| tokio::spawn(Client::new(c, shared.clone()).run()))
            .collect();
        let mut records = Vec::new();
        for task in tasks {
            match task.await {
                Ok(mut done) => records.append(&mut done),
                Err(e) => tracing::error!(error = %e, "a torture client task failed"),
            }
        }
        records
    }

    /// Mean pause between two operations of one client, so that all keys together reach
    /// about [`MAX_OPS_PER_KEY`] operations by the deadline.
    fn pace(&self) -> Duration {
        let total = (self.keys * MAX_OPS_PER_KEY).max(1) as u32;
        self.duration * self.clients as u32 / total
    }
}

struct Shared {
    workload: Workload,
    /// Operations started so far, per key.
    budget: Vec<AtomicUsize>,
}

struct Client {
    id: usize,
    shared: Arc<Shared>,
    rng: StdRng,
    http: Http,
    /// The last version this client saw per key, for its compare-and-sets.
    seen: Vec<u64>,
    /// Operations issued so far (names data and idempotency keys).
    count: u64,
    /// Completion time of the previous operation, so the next starts strictly later.
    last_ns: u64,
    records: Vec<OpRecord>,
}

impl Client {
    fn new(id: usize, shared: Arc<Shared>) -> Self {
        let seed = shared.workload.seed ^ ((id as u64 + 1) << 48);
        Self {
            id,
            seen: vec![0; shared.workload.keys],
            rng: StdRng::seed_from_u64(seed),
            http: Http::new(CLIENT_TIMEOUT),
            shared,
            count: 0,
            last_ns: 0,
            records: Vec::new(),
        }
    }

    async fn run(mut self) -> Vec<OpRecord> {
        let deadline = self.shared.workload.started + self.shared.workload.duration;
        let pace = self.shared.workload.pace();
        while Instant::now() < deadline {
            let Some(key) = self.take_key() else { break };
            let record = self.one(key).await;
            self.learn(&record);
            self.last_ns = record.completed_ns;
            self.records.push(record);
            let pause = pace.mul_f64(self.rng.random_range(0.0..2.0));
            tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
        }
        self.records
    }

    /// A random key that still has budget, counted as taken.
    fn take_key(&mut self) -> Option<usize> {
        let keys = self.shared.workload.keys;
        let start = self.rng.random_range(0..keys);
        (0..keys)
            .map(|i| (start + i) % keys)
            .find(|k| self.shared.budget[*k].fetch_add(1, Ordering::Relaxed) < MAX_OPS_PER_KEY)
    }

    fn now_ns(&self) -> u64 {
        let ns = self.shared.workload.started.elapsed().as_nanos() as u64;
        ns.max(self.last_ns + 1)
    }

    fn pick_kind(&mut self, key: usize) -> OpKind {
        self.count += 1;
        let data = format!("c{}-{}", self.id, self.count);
        match self.rng.random_range(0..4) {
            0 | 1 => OpKind::Read,
            2 => OpKind::Set { data },
            _ => OpKind::Cas {
                expected: self.seen[key],
                data,
            },
        }
    }

    fn pick_node(&mut self) -> usize {
        self.rng.random_range(0..self.shared.workload.urls.len())
    }

    async fn one(&mut self, key: usize) -> OpRecord {
        let kind = self.pick_kind(key);
        let node = self.pick_node();
        let idempotency_key = format!(
            "torture-{}-c{}-{}",
            self.shared.workload.seed, self.id, self.count
        );
        let invoked_ns = self.now_ns();
        let first = Instant::now();
        let mut outcome = self.send(node, key, &kind, &idempotency_key).await;
        let mut pause = RETRY_PAUSE;
        while kind.is_write()
            && matches!(outcome, Outcome::Unknown(_))
            && first.elapsed() + pause < RETRY_BUDGET
        {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
            let node = self.pick_node();
            let retry = self.send(node, key, &kind, &idempotency_key).await;
            outcome = outcome.then_retry(retry);
        }
        OpRecord {
            client: self.id,
            key,
            node,
            kind,
            invoked_ns,
            completed_ns: self.now_ns(),
            outcome,
        }
    }

    async fn send(&self, node: usize, key: usize, kind: &OpKind, idempotency_key: &str) -> Outcome {
        let url = format!("{}/tree{}", self.shared.workload.urls[node], key_path(key));
        let expected;
        let mut headers = vec![(haven_contract::headers::IDEMPOTENCY_KEY, idempotency_key)];
        let (method, body) = match kind {
            OpKind::Read => {
                headers.clear();
                ("GET", Bytes::new())
            }
            OpKind::Set { data } => ("POST", Bytes::from(data.clone())),
            OpKind::Cas { expected: v, data } => {
                expected = v.to_string();
                headers.push(("if-version", &expected));
                ("POST", Bytes::from(data.clone()))
            }
        };
        let reply = self.http.send(method, &url, &headers, body).await;
        classify(kind, reply.as_ref())
    }

    /// Remembers the versions an answer revealed, so later compare-and-sets mostly hit.
    fn learn(&mut self, record: &OpRecord) {
        let seen = &mut self.seen[record.key];
        match record.outcome {
            Outcome::Done(Ret::Value { version, .. } | Ret::Written { version })
            | Outcome::Done(Ret::BadVersion { actual: version }) => *seen = version,
            _ => {}
        }
    }
}
