//! The demo's clients, shared by its acts: appends and reads of the log service through
//! every node of a site, each append retried on the next node with the same
//! Idempotency-Key until acknowledged, and the tally of what was acknowledged when.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use haven_client::http::Http;
use haven_client::http::Reply;
use haven_testkit::cluster::PREPOPULATED_LINES;

/// Bytes per appended line, as in the reference workload.
const LINE_BYTES: usize = 128;
/// Attempts per append (each on the next node, same Idempotency-Key) before giving up.
const APPEND_ATTEMPTS: usize = 40;

#[derive(Default)]
pub struct Tally {
    /// Each acknowledged line: its line number in the log, and when it was acknowledged.
    pub acked: Mutex<HashMap<String, (u64, Instant)>>,
    pub abandoned: AtomicU64,
    pub reads_ok: AtomicU64,
    pub reads_failed: AtomicU64,
    pub tree_acked: Mutex<Vec<String>>,
    pub tree_abandoned: AtomicU64,
}

fn line_for(client: usize, seq: u64) -> String {
    let mut line = format!("demo c{client:02} s{seq:08} ");
    while line.len() < LINE_BYTES {
        line.push('x');
    }
    line
}

pub async fn client_loop(
    client: usize,
    urls: Vec<String>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let http = Http::new(Duration::from_secs(5));
    let mut seq = 0u64;
    let mut turn = client;
    while !stop.load(Ordering::Acquire) {
        seq += 1;
        turn += 1;
        if seq.is_multiple_of(2) {
            let url = format!(
                "{}/line/{}",
                urls[turn % urls.len()],
                seq % PREPOPULATED_LINES
            );
            let ok = http.get(&url).await.is_ok_and(|r| r.status == 200);
            let counter = if ok {
                &tally.reads_ok
            } else {
                &tally.reads_failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        append_with_retries(&http, &urls, &mut turn, client, seq, &tally).await;
    }
}

/// One append, retried on the next node with the same Idempotency-Key until acknowledged.
async fn append_with_retries(
    http: &Http,
    urls: &[String],
    turn: &mut usize,
    client: usize,
    seq: u64,
    tally: &Tally,
) {
    let line = line_for(client, seq);
    let write = Write {
        method: "POST",
        path: "/append".to_string(),
        body: line.clone(),
        key: format!("demo-c{client}-s{seq}"),
    };
    let Some(reply) = write.send_with_retries(http, urls, turn).await else {
        tally.abandoned.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let line_no = reply.text().trim().parse().unwrap_or(u64::MAX);
    lock(&tally.acked).insert(line, (line_no, Instant::now()));
}

impl Tally {
    /// Each acknowledged line, and when it was acknowledged.
    pub fn acked_at(&self) -> HashMap<String, Instant> {
        (lock(&self.acked).iter())
            .map(|(line, (_, at))| (line.clone(), *at))
            .collect()
    }
}

pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A write to one of the services, keyed so a retry on another node is answered once.
pub struct Write {
    pub method: &'static str,
    pub path: String,
    pub body: String,
    pub key: String,
}

impl Write {
    /// Sends it until a node answers 201, to the next node after every failure.
    pub async fn send_with_retries(
        &self,
        http: &Http,
        urls: &[String],
        turn: &mut usize,
    ) -> Option<Reply> {
        let headers = [(haven_contract::headers::IDEMPOTENCY_KEY, self.key.as_str())];
        for _ in 0..APPEND_ATTEMPTS {
            let url = format!("{}{}", urls[*turn % urls.len()], self.path);
            match http
                .send(self.method, &url, &headers, self.body.clone().into())
                .await
            {
                Ok(reply) if reply.status == 201 => return Some(reply),
                _ => {
                    *turn += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        None
    }
}
