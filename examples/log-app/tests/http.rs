//! End-to-end tests of the log app over HTTP, on a real listener and real files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use haven_logapp::{
    LogAppConfig, LogAppError, PREPOPULATE_LINE_LEN, RESTORE_MARKER_SUFFIX, RESTORE_TMP_SUFFIX,
    SNAPSHOT_HEADER_LEN, SNAPSHOT_MAGIC, serve, sidecar_path,
};
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const BAD_INDEX: &str =
    "invalid Haven-Index header: expected one decimal log index from 1 to 18446744073709551615";

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), LogAppError>>,
}

impl Server {
    async fn start(file: &Path, prepopulate: u64) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let config = LogAppConfig {
            file: file.to_path_buf(),
            prepopulate,
        };
        let task = tokio::spawn(serve(listener, config, async move {
            let _ = stopped.await;
        }));
        let server = Server { addr, stop, task };
        // Wait until the file is open and the server answers.
        for _ in 0..200 {
            if server.try_get("/count").await.is_some() {
                return server;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("log app did not start");
    }

    async fn try_get(&self, path: &str) -> Option<StatusCode> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = Request::get(format!("http://{}{path}", self.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.request(req).await.ok().map(|r| r.status())
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (StatusCode, HeaderMap, Bytes) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for &(name, value) in headers {
            req = req.header(name, value);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
        let response = client.request(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, body)
    }

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
        self.call(Method::GET, path, headers, b"").await
    }

    async fn append(&self, index: Option<u64>, body: &[u8]) -> (StatusCode, HeaderMap, Bytes) {
        let value = index.map(|i| i.to_string());
        let headers: Vec<(&str, &str)> = value
            .as_deref()
            .map(|v| vec![("Haven-Index", v)])
            .unwrap_or_default();
        self.call(Method::POST, "/append", &headers, body).await
    }

    /// Asserts a `201` append answer for line `n`.
    async fn append_ok(&self, index: Option<u64>, body: &[u8], n: u64) {
        let (status, headers, got) = self.append(index, body).await;
        assert_eq!(status, StatusCode::CREATED, "body {got:?}");
        assert_eq!(headers[CONTENT_TYPE], "text/plain");
        assert_eq!(headers[LOCATION], format!("/line/{n}").as_str());
        assert_eq!(got, n.to_string().as_bytes());
    }

    async fn count(&self) -> String {
        let (status, headers, body) = self.get("/count", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[CONTENT_TYPE], "text/plain");
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// `GET /_haven/snapshot`, asserting a `200` with the exact length.
    async fn snapshot(&self) -> Bytes {
        let (status, headers, body) = self.get("/_haven/snapshot", &[]).await;
        assert_eq!(status, StatusCode::OK, "body {body:?}");
        assert_eq!(headers[CONTENT_TYPE], "application/octet-stream");
        assert_eq!(headers[CONTENT_LENGTH], body.len().to_string().as_str());
        body
    }

    async fn restore(&self, index: Option<&str>, body: &[u8]) -> (StatusCode, HeaderMap, Bytes) {
        let headers: Vec<(&str, &str)> =
            index.map(|i| vec![("Haven-Index", i)]).unwrap_or_default();
        self.call(Method::PUT, "/_haven/restore", &headers, body)
            .await
    }

    async fn line(&self, n: u64) -> Bytes {
        let (status, headers, body) = self.get(&format!("/line/{n}"), &[]).await;
        assert_eq!(status, StatusCode::OK, "line {n}: {body:?}");
        assert_eq!(headers[CONTENT_TYPE], "application/octet-stream");
        body
    }
}

fn log_file(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("log.txt")
}

fn sidecar(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|i| i.to_le_bytes()).collect()
}

fn assert_text(got: &(StatusCode, HeaderMap, Bytes), status: StatusCode, body: &str) {
    assert_eq!(got.0, status, "body {:?}", got.2);
    assert_eq!(got.1[CONTENT_TYPE], "text/plain");
    assert_eq!(got.2, body.as_bytes());
}

#[tokio::test]
async fn append_get_count_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    let server = Server::start(&file, 0).await;

    assert_eq!(server.count().await, "0");
    server.append_ok(None, b"hello", 0).await;
    server.append_ok(None, b"", 1).await;
    server.append_ok(None, b"world \x00\xff bytes", 2).await;
    // Without Haven-Index, identical requests are distinct appends.
    server.append_ok(None, b"hello", 3).await;

    assert_eq!(server.count().await, "4");
    assert_eq!(server.line(0).await, &b"hello"[..]);
    assert_eq!(server.line(1).await, &b""[..]);
    assert_eq!(server.line(2).await, &b"world \x00\xff bytes"[..]);
    assert_eq!(server.line(3).await, &b"hello"[..]);
    // HEAD on a GET route (axum's default).
    let head = server.call(Method::HEAD, "/count", &[], b"").await;
    assert_eq!(head.0, StatusCode::OK);

    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"hello\n\nworld \x00\xff bytes\nhello\n"
    );
    assert_eq!(
        std::fs::read(sidecar_path(&file)).unwrap(),
        sidecar(&[0, 0, 0, 0])
    );
    server.stop().await;
}

#[tokio::test]
async fn errors_have_exact_statuses_and_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    let server = Server::start(&file, 0).await;
    server.append_ok(None, b"only", 0).await;

    assert_text(
        &server.get("/line/1", &[]).await,
        StatusCode::NOT_FOUND,
        "no line 1",
    );
    assert_text(
        &server.get("/line/0001", &[]).await,
        StatusCode::NOT_FOUND,
        "no line 1",
    );
    assert_text(
        &server.get("/line/99999999999999999999", &[]).await,
        StatusCode::NOT_FOUND,
        "no line 99999999999999999999",
    );
    assert_text(
        &server.get("/line/abc", &[]).await,
        StatusCode::BAD_REQUEST,
        "line number must be a decimal integer, got \"abc\"",
    );
    assert_text(
        &server.get("/line/-1", &[]).await,
        StatusCode::BAD_REQUEST,
        "line number must be a decimal integer, got \"-1\"",
    );
    assert_text(
        &server.get("/line/%2B1", &[]).await,
        StatusCode::BAD_REQUEST,
        "line number must be a decimal integer, got \"+1\"",
    );
    assert_eq!(server.line(0).await, &b"only"[..]);

    let before = std::fs::read(&file).unwrap();
    for body in [&b"two\nlines"[..], b"cr\r", b"\n", b"trailing\n"] {
        assert_text(
            &server.append(None, body).await,
            StatusCode::BAD_REQUEST,
            "a line must not contain \\n or \\r",
        );
    }
    for bad in ["", "0", "abc", "-3", "+3", "1 2", "18446744073709551616"] {
        let got = server
            .call(Method::POST, "/append", &[("Haven-Index", bad)], b"x")
            .await;
        assert_text(&got, StatusCode::BAD_REQUEST, BAD_INDEX);
        let got = server.get("/count", &[("Haven-Index", bad)]).await;
        assert_text(&got, StatusCode::BAD_REQUEST, BAD_INDEX);
        let got = server.get("/line/0", &[("Haven-Index", bad)]).await;
        assert_text(&got, StatusCode::BAD_REQUEST, BAD_INDEX);
    }
    let twice = server
        .call(
            Method::POST,
            "/append",
            &[("Haven-Index", "5"), ("Haven-Index", "6")],
            b"x",
        )
        .await;
    assert_text(&twice, StatusCode::BAD_REQUEST, BAD_INDEX);
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert_eq!(server.count().await, "1");

    assert_eq!(
        server.get("/nope", &[]).await.0,
        StatusCode::NOT_FOUND,
        "unknown path"
    );
    assert_eq!(
        server.get("/append", &[]).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        server.call(Method::POST, "/count", &[], b"").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        server.call(Method::PUT, "/line/0", &[], b"").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    server.stop().await;
}

#[tokio::test]
async fn haven_index_replay_changes_nothing_and_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    let server = Server::start(&file, 0).await;

    server.append_ok(Some(10), b"a", 0).await;
    server.append_ok(Some(11), b"b", 1).await;
    let file_before = std::fs::read(&file).unwrap();
    let sidecar_before = std::fs::read(sidecar_path(&file)).unwrap();
    assert_eq!(file_before, b"a\nb\n");
    assert_eq!(sidecar_before, sidecar(&[10, 11]));

    // Replays answer with the original line, whatever the body now says.
    server.append_ok(Some(10), b"a", 0).await;
    server.append_ok(Some(11), b"b", 1).await;
    server.append_ok(Some(10), b"a", 0).await;
    // A replayed index that appended nothing.
    assert_text(
        &server.append(Some(5), b"x").await,
        StatusCode::CONFLICT,
        "Haven-Index 5 was already applied and appended no line; nothing was changed",
    );
    // Validation comes first, so a replayed bad request gets the same 400.
    assert_text(
        &server.append(Some(10), b"bad\n").await,
        StatusCode::BAD_REQUEST,
        "a line must not contain \\n or \\r",
    );
    assert_eq!(std::fs::read(&file).unwrap(), file_before);
    assert_eq!(std::fs::read(sidecar_path(&file)).unwrap(), sidecar_before);
    assert_eq!(server.count().await, "2");

    // New indexes append; unindexed appends are recorded as 0.
    server.append_ok(Some(12), b"c", 2).await;
    server.append_ok(None, b"plain", 3).await;
    server.append_ok(Some(20), b"d", 4).await;
    server.append_ok(Some(12), b"c", 2).await;
    assert_text(
        &server.append(Some(13), b"e").await,
        StatusCode::CONFLICT,
        "Haven-Index 13 was already applied and appended no line; nothing was changed",
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"a\nb\nc\nplain\nd\n");
    assert_eq!(
        std::fs::read(sidecar_path(&file)).unwrap(),
        sidecar(&[10, 11, 12, 0, 20])
    );

    // Reads carrying Haven-Index are answered as of that index.
    for (at, count) in [
        ("1", "0"),
        ("10", "1"),
        ("11", "2"),
        ("12", "4"),
        ("19", "4"),
    ] {
        let got = server.get("/count", &[("Haven-Index", at)]).await;
        assert_text(&got, StatusCode::OK, count);
    }
    assert_text(
        &server.get("/count", &[("Haven-Index", "20")]).await,
        StatusCode::OK,
        "5",
    );
    assert_text(
        &server.get("/count", &[("Haven-Index", "1000")]).await,
        StatusCode::OK,
        "5",
    );
    assert_text(
        &server.get("/line/2", &[("Haven-Index", "11")]).await,
        StatusCode::NOT_FOUND,
        "no line 2",
    );
    let got = server.get("/line/2", &[("Haven-Index", "12")]).await;
    assert_eq!((got.0, &got.2[..]), (StatusCode::OK, &b"c"[..]));
    let got = server.get("/line/4", &[("Haven-Index", "21")]).await;
    assert_eq!((got.0, &got.2[..]), (StatusCode::OK, &b"d"[..]));
    server.stop().await;
}

#[tokio::test]
async fn restart_keeps_lines_and_dedupe_state() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    let server = Server::start(&file, 0).await;
    server.append_ok(Some(1), b"one", 0).await;
    server.append_ok(Some(2), b"two", 1).await;
    server.append_ok(None, b"three", 2).await;
    server.stop().await;
    let file_before = std::fs::read(&file).unwrap();
    let sidecar_before = std::fs::read(sidecar_path(&file)).unwrap();

    let server = Server::start(&file, 0).await;
    assert_eq!(server.count().await, "3");
    assert_eq!(server.line(1).await, &b"two"[..]);
    server.append_ok(Some(2), b"two", 1).await;
    server.append_ok(Some(1), b"one", 0).await;
    assert_eq!(std::fs::read(&file).unwrap(), file_before);
    assert_eq!(std::fs::read(sidecar_path(&file)).unwrap(), sidecar_before);
    server.append_ok(Some(3), b"four", 3).await;
    server.stop().await;

    let server = Server::start(&file, 0).await;
    assert_eq!(server.count().await, "4");
    server.append_ok(Some(3), b"four", 3).await;
    assert_eq!(server.line(3).await, &b"four"[..]);
    assert_eq!(
        std::fs::read(sidecar_path(&file)).unwrap(),
        sidecar(&[1, 2, 0, 3])
    );
    server.stop().await;
}

#[tokio::test]
async fn start_reconciles_a_crash_between_or_during_writes() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    let side = sidecar_path(&file);
    let server = Server::start(&file, 0).await;
    server.append_ok(Some(1), b"one", 0).await;
    server.append_ok(Some(2), b"two", 1).await;
    server.stop().await;
    let file_before = std::fs::read(&file).unwrap();
    let sidecar_before = std::fs::read(&side).unwrap();

    // A crash after the sidecar entry of index 3 and part of its line, plus a
    // torn further sidecar entry.
    let mut torn_file = file_before.clone();
    torn_file.extend_from_slice(b"thr");
    std::fs::write(&file, &torn_file).unwrap();
    let mut torn_sidecar = sidecar_before.clone();
    torn_sidecar.extend_from_slice(&3u64.to_le_bytes());
    torn_sidecar.extend_from_slice(&[4, 0, 0]);
    std::fs::write(&side, &torn_sidecar).unwrap();

    let server = Server::start(&file, 0).await;
    assert_eq!(server.count().await, "2");
    assert_eq!(std::fs::read(&file).unwrap(), file_before);
    assert_eq!(std::fs::read(&side).unwrap(), sidecar_before);
    // Index 3 was not applied: its redelivery appends.
    server.append_ok(Some(3), b"three", 2).await;
    server.append_ok(Some(3), b"three", 2).await;
    assert_eq!(std::fs::read(&file).unwrap(), b"one\ntwo\nthree\n");
    assert_eq!(std::fs::read(&side).unwrap(), sidecar(&[1, 2, 3]));
    server.stop().await;

    // A crash between the two writes: a whole extra sidecar entry.
    let mut extra = std::fs::read(&side).unwrap();
    extra.extend_from_slice(&4u64.to_le_bytes());
    std::fs::write(&side, &extra).unwrap();
    let server = Server::start(&file, 0).await;
    assert_eq!(server.count().await, "3");
    assert_eq!(std::fs::read(&side).unwrap(), sidecar(&[1, 2, 3]));
    server.append_ok(Some(4), b"four", 3).await;
    server.stop().await;
}

#[tokio::test]
async fn start_pads_a_missing_sidecar_with_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    std::fs::write(&file, b"x\ny\npartial").unwrap();
    let server = Server::start(&file, 0).await;
    assert_eq!(server.count().await, "2");
    assert_eq!(std::fs::read(&file).unwrap(), b"x\ny\n");
    assert_eq!(
        std::fs::read(sidecar_path(&file)).unwrap(),
        sidecar(&[0, 0])
    );
    server.append_ok(Some(1), b"z", 2).await;
    server.append_ok(Some(1), b"z", 2).await;
    assert_eq!(
        std::fs::read(sidecar_path(&file)).unwrap(),
        sidecar(&[0, 0, 1])
    );
    server.stop().await;
}

#[tokio::test]
async fn corrupt_sidecar_fails_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    std::fs::write(&file, b"a\nb\nc\n").unwrap();
    std::fs::write(sidecar_path(&file), sidecar(&[5, 0, 3])).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = LogAppConfig {
        file: file.clone(),
        prepopulate: 0,
    };
    let err = serve(listener, config, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            LogAppError::CorruptSidecar {
                line: 2,
                index: 3,
                previous: 5,
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&sidecar_path(&file).display().to_string()),
        "{message}"
    );

    // A file that cannot be opened is named too.
    let missing = dir.path().join("no-such-dir").join("log.txt");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = LogAppConfig {
        file: missing.clone(),
        prepopulate: 0,
    };
    let err = serve(listener, config, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "{}: cannot open the log file: ",
            missing.display()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn prepopulate_is_fixed_and_identical_across_runs() {
    let n = 5u64;
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let file = log_file(&dir);
        let server = Server::start(&file, n).await;
        assert_eq!(server.count().await, n.to_string());
        for i in 0..n {
            let line = server.line(i).await;
            assert_eq!(line.len(), PREPOPULATE_LINE_LEN);
            let mut expected = format!("line-{i:06}").into_bytes();
            expected.resize(PREPOPULATE_LINE_LEN, b'.');
            assert_eq!(line, expected);
        }
        server.stop().await;
        files.push(std::fs::read(&file).unwrap());
        assert_eq!(
            std::fs::read(sidecar_path(&file)).unwrap(),
            sidecar(&[0; 5])
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
        dirs.push(dir);
    }
    assert_eq!(files[0], files[1]);
    assert_eq!(files[0].len() as u64, n * (PREPOPULATE_LINE_LEN as u64 + 1));
    let first = format!("line-000000{}\n", ".".repeat(PREPOPULATE_LINE_LEN - 11));
    assert!(files[0].starts_with(first.as_bytes()));

    // A file holding lines is not pre-populated again.
    let file = log_file(&dirs[0]);
    let server = Server::start(&file, n).await;
    server.append_ok(Some(7), b"mine", n).await;
    server.stop().await;
    let server = Server::start(&file, 3).await;
    assert_eq!(server.count().await, (n + 1).to_string());
    server.stop().await;

    // A hand-written file is left alone; a file holding only a torn line is
    // empty after reconciliation and gets pre-populated.
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    std::fs::write(&file, b"own\n").unwrap();
    let server = Server::start(&file, n).await;
    assert_eq!(server.count().await, "1");
    server.stop().await;
    std::fs::write(&file, b"torn").unwrap();
    std::fs::write(sidecar_path(&file), sidecar(&[9])).unwrap();
    let server = Server::start(&file, n).await;
    assert_eq!(server.count().await, n.to_string());
    server.stop().await;
    assert_eq!(std::fs::read(&file).unwrap(), files[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_and_reads_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    let server = std::sync::Arc::new(Server::start(&file, 10).await);
    let mut tasks = Vec::new();
    for t in 0..40u64 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("task-{t}");
            let (status, _, got) = server.append(None, body.as_bytes()).await;
            assert_eq!(status, StatusCode::CREATED);
            let n: u64 = std::str::from_utf8(&got).unwrap().parse().unwrap();
            // A concurrent read of an older line is never torn.
            assert_eq!(server.line(t % 10).await.len(), PREPOPULATE_LINE_LEN);
            assert_eq!(server.line(n).await, body.as_bytes());
            n
        }));
    }
    let mut numbers = Vec::new();
    for task in tasks {
        numbers.push(task.await.unwrap());
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (10..50).collect::<Vec<_>>());
    assert_eq!(server.count().await, "50");
    let server = std::sync::Arc::into_inner(server).unwrap();
    server.stop().await;
    let text = std::fs::read(&file).unwrap();
    assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 50);
    assert_eq!(
        std::fs::read(sidecar_path(&file)).unwrap(),
        sidecar(&[0; 50])
    );
}

/// The log file and sidecar bytes, to compare replicas.
fn files(file: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(file).unwrap(),
        std::fs::read(sidecar_path(file)).unwrap(),
    )
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Replica A of the checkpoint tests: indexed and plain lines, index 3
/// applied without appending (a rejected append).
async fn replica_a(file: &Path) -> Server {
    let server = Server::start(file, 0).await;
    server.append_ok(Some(1), b"one", 0).await;
    server.append_ok(Some(2), b"two", 1).await;
    let bad = server.append(Some(3), b"bad\n").await;
    assert_eq!(bad.0, StatusCode::BAD_REQUEST);
    server.append_ok(None, b"plain", 2).await;
    server.append_ok(Some(4), b"four \x00\xff", 3).await;
    server
}

#[tokio::test]
async fn snapshot_restores_into_a_fresh_app_byte_for_byte() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (file_a, file_b) = (log_file(&dir_a), log_file(&dir_b));
    let a = replica_a(&file_a).await;
    let b = Server::start(&file_b, 0).await;
    b.append_ok(Some(40), b"stale", 0).await;

    let snapshot = a.snapshot().await;
    let (log, side) = files(&file_a);
    assert!(snapshot.starts_with(&SNAPSHOT_MAGIC));
    assert_eq!(
        snapshot.len() as u64,
        SNAPSHOT_HEADER_LEN + log.len() as u64 + side.len() as u64 + 4
    );
    let got = b.restore(Some("5"), &snapshot).await;
    assert_eq!(got.0, StatusCode::NO_CONTENT, "body {:?}", got.2);
    assert!(got.2.is_empty());
    assert_eq!(files(&file_b), (log, side));
    assert_eq!(names(dir_b.path()), names(dir_a.path()));
    assert_eq!(b.count().await, a.count().await);
    for n in 0..4 {
        assert_eq!(b.line(n).await, a.line(n).await);
    }
    assert_eq!(
        b.snapshot().await,
        snapshot,
        "the restored replica snapshots the same"
    );

    // Replays of indexes the snapshot holds answer as on A; new ones append.
    b.append_ok(Some(2), b"two", 1).await;
    b.append_ok(Some(4), b"four \x00\xff", 3).await;
    assert_text(
        &b.append(Some(3), b"x").await,
        StatusCode::CONFLICT,
        "Haven-Index 3 was already applied and appended no line; nothing was changed",
    );
    assert_text(&b.append(Some(40), b"x").await, StatusCode::CREATED, "4");
    b.append_ok(Some(40), b"x", 4).await;
    assert_eq!(b.count().await, "5");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn restored_state_survives_a_restart() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (file_a, file_b) = (log_file(&dir_a), log_file(&dir_b));
    let a = replica_a(&file_a).await;
    let snapshot = a.snapshot().await;
    a.stop().await;
    let b = Server::start(&file_b, 0).await;
    assert_eq!(
        b.restore(Some("4"), &snapshot).await.0,
        StatusCode::NO_CONTENT
    );
    b.stop().await;

    let b = Server::start(&file_b, 0).await;
    assert_eq!(files(&file_b), files(&file_a));
    assert_eq!(b.count().await, "4");
    assert_eq!(b.line(3).await, &b"four \x00\xff"[..]);
    b.append_ok(Some(1), b"one", 0).await;
    b.append_ok(Some(9), b"nine", 4).await;
    b.stop().await;
}

#[tokio::test]
async fn invalid_snapshots_are_rejected_and_change_nothing() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica_a(&log_file(&dir_a)).await;
    let snapshot = a.snapshot().await.to_vec();
    a.stop().await;
    let file_b = log_file(&dir_b);
    let b = Server::start(&file_b, 0).await;
    b.append_ok(Some(7), b"mine", 0).await;
    let before = files(&file_b);
    let names_before = names(dir_b.path());

    let mut flipped = snapshot.clone();
    let middle = SNAPSHOT_HEADER_LEN as usize + 2;
    flipped[middle] ^= 0x01;
    let mut header_flipped = snapshot.clone();
    header_flipped[14] ^= 0x01;
    let mut trailing = snapshot.clone();
    trailing.push(0);
    let mut version = snapshot.clone();
    version[8] = 9;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "drop last byte",
            snapshot[..snapshot.len() - 1].to_vec(),
            "truncated",
        ),
        ("half", snapshot[..snapshot.len() / 2].to_vec(), "truncated"),
        ("header only", snapshot[..10].to_vec(), "truncated"),
        ("empty", Vec::new(), "truncated"),
        ("flipped byte", flipped, "checksum mismatch"),
        ("flipped length", header_flipped, "header checksum mismatch"),
        (
            "trailing byte",
            trailing,
            "trailing bytes after the checksum",
        ),
        ("version", version, "unsupported version 9"),
        (
            "garbage",
            b"this is not a snapshot, it is garbage".to_vec(),
            "bad magic",
        ),
        ("short garbage", b"nope".to_vec(), "bad magic"),
    ];
    for (what, body, reason) in cases {
        let got = b.restore(Some("10"), &body).await;
        assert_text(
            &got,
            StatusCode::BAD_REQUEST,
            &format!("invalid snapshot: {reason}"),
        );
        assert_eq!(files(&file_b), before, "{what}");
        assert_eq!(
            names(dir_b.path()),
            names_before,
            "{what}: no temporary file left"
        );
    }
    // A valid snapshot that records an index above the restore's.
    assert_text(
        &b.restore(Some("3"), &snapshot).await,
        StatusCode::BAD_REQUEST,
        "invalid snapshot: it records Haven-Index 4, above the restore's Haven-Index 3",
    );
    assert_eq!(files(&file_b), before);
    assert_eq!(b.count().await, "1");
    b.append_ok(Some(7), b"mine", 0).await;
    b.append_ok(Some(8), b"more", 1).await;
    b.stop().await;
}

#[tokio::test]
async fn restore_requires_a_haven_index() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = replica_a(&log_file(&dir_a)).await;
    let snapshot = a.snapshot().await;
    a.stop().await;
    let file_b = log_file(&dir_b);
    let b = Server::start(&file_b, 0).await;
    let before = files(&file_b);
    for index in haven_snapshot_frame::MALFORMED_HAVEN_INDEXES {
        assert_text(
            &b.restore(index, &snapshot).await,
            StatusCode::BAD_REQUEST,
            BAD_INDEX,
        );
    }
    assert_text(
        &b.get("/_haven/snapshot", &[("Haven-Index", "0")]).await,
        StatusCode::BAD_REQUEST,
        BAD_INDEX,
    );
    assert_eq!(files(&file_b), before);
    b.stop().await;
}

#[tokio::test]
async fn a_large_snapshot_streams_with_its_length() {
    let lines = 30_000u64;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (file_a, file_b) = (log_file(&dir_a), log_file(&dir_b));
    let a = Server::start(&file_a, lines).await;
    a.append_ok(Some(3), b"last", lines).await;
    let snapshot = a.snapshot().await;
    let log_len = (lines * (PREPOPULATE_LINE_LEN as u64 + 1)) + 5;
    assert!(log_len > 3 << 20, "a few MB");
    assert_eq!(
        snapshot.len() as u64,
        SNAPSHOT_HEADER_LEN + log_len + (lines + 1) * 8 + 4
    );
    let b = Server::start(&file_b, 0).await;
    assert_eq!(
        b.restore(Some("3"), &snapshot).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(files(&file_b), files(&file_a));
    assert_eq!(b.count().await, (lines + 1).to_string());
    assert_eq!(b.line(lines).await, &b"last"[..]);
    a.stop().await;
    b.stop().await;
}

/// Writes B's side of a restore that was cut short by a crash: the temporary
/// copies of A's files, with or without the commit marker.
fn stage_restore(file_b: &Path, (log, side): &(Vec<u8>, Vec<u8>), marker: bool) {
    let tmp = |p: &Path| PathBuf::from(format!("{}{RESTORE_TMP_SUFFIX}", p.display()));
    std::fs::write(tmp(file_b), log).unwrap();
    std::fs::write(tmp(&sidecar_path(file_b)), side).unwrap();
    if marker {
        let marker = format!("{}{RESTORE_MARKER_SUFFIX}", file_b.display());
        std::fs::write(marker, b"").unwrap();
    }
}

#[tokio::test]
async fn a_crash_mid_restore_leaves_an_app_that_opens() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (file_a, file_b) = (log_file(&dir_a), log_file(&dir_b));
    replica_a(&file_a).await.stop().await;
    let new = files(&file_a);
    let b = Server::start(&file_b, 0).await;
    b.append_ok(Some(1), b"old", 0).await;
    b.stop().await;
    let old = files(&file_b);
    let names_old = names(dir_b.path());

    // Killed while receiving (no marker), even mid-way: the old state.
    stage_restore(&file_b, &(new.0[..5].to_vec(), new.1[..3].to_vec()), false);
    let b = Server::start(&file_b, 0).await;
    assert_eq!(b.count().await, "1");
    b.stop().await;
    assert_eq!(files(&file_b), old);
    assert_eq!(names(dir_b.path()), names_old);

    // Killed after the commit, before any rename: the new state.
    stage_restore(&file_b, &new, true);
    let b = Server::start(&file_b, 0).await;
    assert_eq!(b.count().await, "4");
    b.stop().await;
    assert_eq!(files(&file_b), new);
    assert_eq!(names(dir_b.path()), names_old);

    // Killed between the two renames: the new state too.
    std::fs::write(&file_b, &old.0).unwrap();
    std::fs::write(sidecar_path(&file_b), &old.1).unwrap();
    stage_restore(&file_b, &new, true);
    std::fs::rename(
        format!("{}{RESTORE_TMP_SUFFIX}", sidecar_path(&file_b).display()),
        sidecar_path(&file_b),
    )
    .unwrap();
    let b = Server::start(&file_b, 0).await;
    assert_eq!(b.count().await, "4");
    assert_eq!(b.line(3).await, &b"four \x00\xff"[..]);
    b.stop().await;
    assert_eq!(files(&file_b), new);
    assert_eq!(names(dir_b.path()), names_old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_during_appends_are_consistent_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let file = log_file(&dir);
    let server = std::sync::Arc::new(Server::start(&file, 1000).await);
    let writer = {
        let server = server.clone();
        tokio::spawn(async move {
            for i in 1..=100u64 {
                server.append_ok(Some(i), b"x", 999 + i).await;
            }
        })
    };
    let mut snapshots = Vec::new();
    for _ in 0..10 {
        snapshots.push(server.snapshot().await);
    }
    writer.await.unwrap();
    for (k, snapshot) in snapshots.iter().enumerate() {
        let other = tempfile::tempdir().unwrap();
        let restored = Server::start(&log_file(&other), 0).await;
        let got = restored.restore(Some("100"), snapshot).await;
        assert_eq!(got.0, StatusCode::NO_CONTENT, "snapshot {k}: {:?}", got.2);
        let count: u64 = restored.count().await.parse().unwrap();
        let (log, side) = files(&log_file(&other));
        let (full_log, full_side) = files(&file);
        assert_eq!(log, full_log[..log.len()], "snapshot {k} is a prefix");
        assert_eq!(side, full_side[..side.len()]);
        assert_eq!(side.len() as u64, count * 8);
        restored.stop().await;
    }
    let server = std::sync::Arc::into_inner(server).unwrap();
    server.stop().await;
}
