//! End-to-end tests of the tree app over HTTP, on a real listener and real files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use haven_treeapp::tree::MAX_DATA_LEN;
use haven_treeapp::{
    JOURNAL_FILE, JOURNAL_RESTORE_FILE, RESTORE_MARKER_FILE, SNAPSHOT_HEADER_LEN, SNAPSHOT_MAGIC,
    TreeApp, TreeAppConfig, TreeAppError, serve,
};
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const BAD_INDEX: &str =
    "invalid Haven-Index header: expected one decimal log index from 1 to 18446744073709551615";
const BAD_IF_VERSION: &str =
    "invalid If-Version header: expected one decimal version from 0 to 18446744073709551615";

type Answer = (StatusCode, HeaderMap, Bytes);

struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), TreeAppError>>,
}

impl Server {
    async fn start(dir: &Path) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let config = TreeAppConfig {
            dir: dir.to_path_buf(),
        };
        let task = tokio::spawn(serve(listener, config, async move {
            let _ = stopped.await;
        }));
        let server = Server { addr, stop, task };
        // Wait until the data is open and the server answers.
        for _ in 0..200 {
            if server.try_get("/digest").await {
                return server;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("tree app did not start");
    }

    async fn try_get(&self, path: &str) -> bool {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = Request::get(format!("http://{}{path}", self.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.request(req).await.is_ok()
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
    ) -> Answer {
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

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, &[], b"").await
    }

    async fn text(&self, path: &str) -> String {
        let (status, headers, body) = self.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body:?}");
        assert!(
            headers[CONTENT_TYPE] == "text/plain" || headers[CONTENT_TYPE] == "application/json"
        );
        String::from_utf8(body.to_vec()).unwrap()
    }

    async fn dump(&self) -> String {
        self.text("/dump").await
    }

    async fn digest(&self) -> String {
        self.text("/digest").await
    }

    /// `GET /_haven/snapshot`, asserting a `200` with the exact length.
    async fn snapshot(&self) -> Bytes {
        let (status, headers, body) = self.get("/_haven/snapshot").await;
        assert_eq!(status, StatusCode::OK, "body {body:?}");
        assert_eq!(headers[CONTENT_TYPE], "application/octet-stream");
        assert_eq!(headers[CONTENT_LENGTH], body.len().to_string().as_str());
        body
    }

    async fn restore(&self, index: Option<&str>, body: &[u8]) -> Answer {
        let headers: Vec<(&str, &str)> =
            index.map(|i| vec![("Haven-Index", i)]).unwrap_or_default();
        self.call(Method::PUT, "/_haven/restore", &headers, body)
            .await
    }

    /// Sends one request of a scripted sequence (see [`script`]).
    async fn step(&self, step: &Step) -> Answer {
        let index = step.index.map(|i| i.to_string());
        let mut headers = Vec::new();
        if let Some(i) = &index {
            headers.push(("Haven-Index", i.as_str()));
        }
        if let Some(v) = step.if_version {
            headers.push(("If-Version", v));
        }
        self.call(step.method.clone(), step.path, &headers, step.body)
            .await
    }
}

fn assert_text(got: &Answer, status: StatusCode, body: &str) {
    assert_eq!(got.0, status, "body {:?}", got.2);
    assert_eq!(got.1[CONTENT_TYPE], "text/plain");
    assert_eq!(got.2, body.as_bytes());
}

fn assert_json(got: &Answer, status: StatusCode, body: &str) {
    assert_eq!(got.0, status, "body {:?}", got.2);
    assert_eq!(got.1[CONTENT_TYPE], "application/json");
    assert_eq!(got.2, body.as_bytes());
}

fn assert_data(got: &Answer, data: &[u8], version: u64) {
    assert_eq!(got.0, StatusCode::OK, "body {:?}", got.2);
    assert_eq!(got.1[CONTENT_TYPE], "application/octet-stream");
    assert_eq!(got.1["tree-version"], version.to_string().as_str());
    assert_eq!(got.2, data);
}

/// One request of a scripted sequence.
struct Step {
    method: Method,
    path: &'static str,
    index: Option<u64>,
    if_version: Option<&'static str>,
    body: &'static [u8],
}

fn step(method: Method, path: &'static str, index: Option<u64>, body: &'static [u8]) -> Step {
    Step {
        method,
        path,
        index,
        if_version: None,
        body,
    }
}

/// A mixed sequence: creates, sets (plain and CAS), deletes, syncs, failures,
/// with and without `Haven-Index`, and gaps between indexes.
fn script() -> Vec<Step> {
    vec![
        step(Method::PUT, "/tree/a", Some(1), b"alpha"),
        step(Method::PUT, "/tree/a/b", Some(2), b"\x00\xffbin"),
        step(Method::PUT, "/tree/a/b", Some(4), b"dup"),
        step(Method::PUT, "/tree/x/y", None, b"orphan"),
        step(Method::POST, "/tree/a", Some(5), b"alpha2"),
        Step {
            if_version: Some("0"),
            ..step(Method::POST, "/tree/a", Some(6), b"stale")
        },
        Step {
            if_version: Some("1"),
            ..step(Method::POST, "/tree/a", Some(7), b"alpha3")
        },
        step(Method::DELETE, "/tree/a", Some(9), b""),
        step(Method::PUT, "/tree/c", None, b""),
        step(Method::POST, "/sync", Some(10), b""),
        step(Method::DELETE, "/tree/c", None, b""),
        step(Method::PUT, "/tree/a/b/c", Some(12), b"deep"),
        step(Method::PUT, "/tree/a//b", Some(13), b""),
        step(Method::POST, "/tree/", None, b"root data"),
        step(Method::POST, "/sync", None, b""),
    ]
}

async fn run_script(server: &Server) -> Vec<Answer> {
    let mut answers = Vec::new();
    for step in &script() {
        answers.push(server.step(step).await);
    }
    answers
}

fn journal(dir: &Path) -> PathBuf {
    dir.join(JOURNAL_FILE)
}

#[tokio::test]
async fn create_get_set_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;

    let created = server.call(Method::PUT, "/tree/a", &[], b"hello").await;
    assert_json(
        &created,
        StatusCode::CREATED,
        r#"{"path":"/a","version":0}"#,
    );
    let created = server.call(Method::PUT, "/tree/a/b", &[], b"").await;
    assert_json(
        &created,
        StatusCode::CREATED,
        r#"{"path":"/a/b","version":0}"#,
    );
    assert_data(&server.get("/tree/a").await, b"hello", 0);
    assert_data(&server.get("/tree/a/b").await, b"", 0);

    let set = server
        .call(Method::POST, "/tree/a", &[], b"\x00world\xff")
        .await;
    assert_json(&set, StatusCode::OK, r#"{"path":"/a","version":1}"#);
    let cas = server
        .call(Method::POST, "/tree/a", &[("If-Version", "1")], b"cas")
        .await;
    assert_json(&cas, StatusCode::OK, r#"{"path":"/a","version":2}"#);
    assert_data(&server.get("/tree/a").await, b"cas", 2);

    server.call(Method::PUT, "/tree/a/c%20d", &[], b"").await;
    server.call(Method::PUT, "/tree/a-", &[], b"").await;
    assert_json(
        &server.get("/children/a").await,
        StatusCode::OK,
        r#"["b","c d"]"#,
    );
    assert_json(
        &server.get("/children/").await,
        StatusCode::OK,
        r#"["a","a-"]"#,
    );
    assert_json(&server.get("/children/a/b").await, StatusCode::OK, "[]");

    let deleted = server
        .call(Method::DELETE, "/tree/a/b", &[("If-Version", "0")], b"")
        .await;
    assert_eq!(deleted.0, StatusCode::NO_CONTENT);
    assert!(deleted.2.is_empty());
    assert_text(
        &server.get("/tree/a/b").await,
        StatusCode::NOT_FOUND,
        "no node: /a/b",
    );

    // The root: readable, settable, listed.
    assert_data(&server.get("/tree/").await, b"", 0);
    let root = server.call(Method::POST, "/tree/", &[], b"r").await;
    assert_json(&root, StatusCode::OK, r#"{"path":"/","version":1}"#);
    assert_data(&server.get("/tree/").await, b"r", 1);

    // 4 creates, 3 sets and 1 delete so far.
    let synced = server.call(Method::POST, "/sync", &[], b"").await;
    assert_text(&synced, StatusCode::OK, "8");
    // HEAD on a GET route (axum's default).
    let head = server.call(Method::HEAD, "/tree/a", &[], b"").await;
    assert_eq!(head.0, StatusCode::OK);
    server.stop().await;
}

/// A request (method, path, headers) and its expected status and body.
type ErrorCase = (
    Method,
    &'static str,
    &'static [(&'static str, &'static str)],
    StatusCode,
    &'static str,
);

#[tokio::test]
async fn errors_have_exact_statuses_and_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    server.call(Method::PUT, "/tree/a", &[], b"").await;
    server.call(Method::PUT, "/tree/a/b", &[], b"").await;
    server.call(Method::POST, "/tree/a/b", &[], b"1").await;
    let before = server.dump().await;

    let cases: Vec<ErrorCase> = vec![
        (
            Method::PUT,
            "/tree/a/b",
            &[],
            StatusCode::CONFLICT,
            "node exists: /a/b",
        ),
        (
            Method::PUT,
            "/tree/x/y",
            &[],
            StatusCode::NOT_FOUND,
            "no node: /x",
        ),
        (
            Method::PUT,
            "/tree/",
            &[],
            StatusCode::BAD_REQUEST,
            "cannot create /: the root always exists",
        ),
        (
            Method::GET,
            "/tree/a/x",
            &[],
            StatusCode::NOT_FOUND,
            "no node: /a/x",
        ),
        (
            Method::GET,
            "/children/q",
            &[],
            StatusCode::NOT_FOUND,
            "no node: /q",
        ),
        (
            Method::POST,
            "/tree/q",
            &[],
            StatusCode::NOT_FOUND,
            "no node: /q",
        ),
        (
            Method::POST,
            "/tree/a/b",
            &[("If-Version", "2")],
            StatusCode::CONFLICT,
            "bad version: /a/b has version 1, expected 2",
        ),
        (
            Method::POST,
            "/tree/a",
            &[("If-Version", "-1")],
            StatusCode::BAD_REQUEST,
            BAD_IF_VERSION,
        ),
        (
            Method::DELETE,
            "/tree/a/b",
            &[("If-Version", "x")],
            StatusCode::BAD_REQUEST,
            BAD_IF_VERSION,
        ),
        (
            Method::DELETE,
            "/tree/q",
            &[],
            StatusCode::NOT_FOUND,
            "no node: /q",
        ),
        (
            Method::DELETE,
            "/tree/a",
            &[],
            StatusCode::CONFLICT,
            "not empty: /a",
        ),
        (
            Method::DELETE,
            "/tree/a",
            &[("If-Version", "3")],
            StatusCode::CONFLICT,
            "bad version: /a has version 0, expected 3",
        ),
        (
            Method::DELETE,
            "/tree/",
            &[],
            StatusCode::BAD_REQUEST,
            "cannot delete /: the root always exists",
        ),
        (
            Method::PUT,
            "/tree/a//b",
            &[],
            StatusCode::BAD_REQUEST,
            "bad path: empty component in \"/a//b\"",
        ),
        (
            Method::GET,
            "/tree/a/",
            &[],
            StatusCode::BAD_REQUEST,
            "bad path: empty component in \"/a/\"",
        ),
        (
            Method::GET,
            "/children/a/%2E%2E",
            &[],
            StatusCode::BAD_REQUEST,
            "bad path: component \"..\" in \"/a/..\"",
        ),
        (
            Method::PUT,
            "/tree/a%09b",
            &[],
            StatusCode::BAD_REQUEST,
            "bad path: character '\\t' in \"/a\\tb\" is not printable ASCII",
        ),
        (
            Method::GET,
            "/tree/a",
            &[("Haven-Index", "0")],
            StatusCode::BAD_REQUEST,
            BAD_INDEX,
        ),
        (
            Method::GET,
            "/dump",
            &[("Haven-Index", "x")],
            StatusCode::BAD_REQUEST,
            BAD_INDEX,
        ),
        (
            Method::POST,
            "/sync",
            &[("Haven-Index", "")],
            StatusCode::BAD_REQUEST,
            BAD_INDEX,
        ),
        // Haven-Index is checked first.
        (
            Method::POST,
            "/tree/a",
            &[("Haven-Index", "0"), ("If-Version", "x")],
            StatusCode::BAD_REQUEST,
            BAD_INDEX,
        ),
    ];
    for (method, path, headers, status, body) in cases {
        let got = server.call(method.clone(), path, headers, b"").await;
        assert_eq!(got.0, status, "{method} {path}: {:?}", got.2);
        assert_text(&got, status, body);
    }

    // Data one byte over the limit gets the model's answer; far over, axum's.
    let big = vec![b'x'; MAX_DATA_LEN + 1];
    let got = server.call(Method::POST, "/tree/a", &[], &big).await;
    assert_text(
        &got,
        StatusCode::PAYLOAD_TOO_LARGE,
        "data too large: 1048577 bytes, at most 1048576",
    );
    let got = server.call(Method::PUT, "/tree/big", &[], &big).await;
    assert_text(
        &got,
        StatusCode::PAYLOAD_TOO_LARGE,
        "data too large: 1048577 bytes, at most 1048576",
    );
    let huge = vec![b'x'; MAX_DATA_LEN + 8192];
    let got = server.call(Method::POST, "/tree/a", &[], &huge).await;
    assert_eq!(got.0, StatusCode::PAYLOAD_TOO_LARGE);

    // Undecodable percent-escapes are refused before the model.
    let got = server.get("/tree/%FF").await;
    assert_eq!(got.0, StatusCode::BAD_REQUEST);
    assert!(got.2.starts_with(b"bad path: "), "{:?}", got.2);

    assert_eq!(server.get("/nope").await.0, StatusCode::NOT_FOUND);
    assert_eq!(server.get("/tree").await.0, StatusCode::NOT_FOUND);
    assert_eq!(server.get("/sync").await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        server.call(Method::PATCH, "/tree/a", &[], b"").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );

    assert_eq!(
        server.dump().await,
        before,
        "failed requests change nothing"
    );
    assert_text(
        &server.call(Method::POST, "/sync", &[], b"").await,
        StatusCode::OK,
        "3",
    );
    server.stop().await;
}

#[tokio::test]
async fn dump_and_digest_describe_the_whole_replica() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let empty_digest = server.digest().await;
    assert_eq!(
        server.dump().await,
        r#"{"haven_index":0,"mutations":0,"nodes":[{"path":"/","version":0,"data":""}]}"#
    );
    server
        .call(
            Method::PUT,
            "/tree/q%22%5C",
            &[("Haven-Index", "3")],
            b"\x01\xab",
        )
        .await;
    server
        .call(Method::POST, "/tree/q%22%5C", &[], b"\x02")
        .await;
    let dump = server.dump().await;
    assert_eq!(
        dump,
        r#"{"haven_index":3,"mutations":2,"nodes":[{"path":"/","version":0,"data":""},{"path":"/q\"\\","version":1,"data":"02"}]}"#
    );
    let parsed: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(parsed["nodes"][1]["path"], "/q\"\\");

    let digest = server.digest().await;
    assert_eq!(digest.len(), 16);
    assert!(
        digest
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_ne!(digest, empty_digest);
    // A sync without Haven-Index changes nothing; with one, the high-water mark.
    server.call(Method::POST, "/sync", &[], b"").await;
    assert_eq!(server.digest().await, digest);
    server
        .call(Method::POST, "/sync", &[("Haven-Index", "4")], b"")
        .await;
    assert_ne!(server.digest().await, digest);
    server.stop().await;
}

/// A request: method, path, headers, body.
type Req = (
    Method,
    &'static str,
    Vec<(&'static str, &'static str)>,
    &'static [u8],
);

fn indexed(method: Method, path: &'static str, index: &'static str, body: &'static [u8]) -> Req {
    (method, path, vec![("Haven-Index", index)], body)
}

/// Sends `requests` again and asserts each gets exactly its `first` answer.
async fn assert_replays(server: &Server, requests: &[Req], first: &[Answer]) {
    for ((method, path, headers, body), first) in requests.iter().zip(first) {
        let again = server.call(method.clone(), path, headers, body).await;
        assert_eq!(again.0, first.0, "{method} {path} {headers:?}");
        assert_eq!(again.1.get(CONTENT_TYPE), first.1.get(CONTENT_TYPE));
        assert_eq!(again.2, first.2, "{method} {path} {headers:?}");
    }
}

#[tokio::test]
async fn haven_index_replays_change_nothing_and_answer_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    // Index 2 fails (no /x yet); index 3 then creates /x; index 4 never comes.
    let requests = vec![
        indexed(Method::PUT, "/tree/a", "1", b"one"),
        indexed(Method::POST, "/tree/x", "2", b"set"),
        indexed(Method::PUT, "/tree/x", "3", b"x"),
        indexed(Method::POST, "/sync", "5", b""),
        (
            Method::POST,
            "/tree/a",
            vec![("Haven-Index", "6"), ("If-Version", "0")],
            b"two",
        ),
        indexed(Method::PUT, "/tree/a/", "7", b""),
        indexed(Method::DELETE, "/tree/a", "8", b""),
    ];
    let mut first = Vec::new();
    for (method, path, headers, body) in &requests {
        first.push(server.call(method.clone(), path, headers, body).await);
    }
    assert_json(
        &first[0],
        StatusCode::CREATED,
        r#"{"path":"/a","version":0}"#,
    );
    assert_text(&first[1], StatusCode::NOT_FOUND, "no node: /x");
    assert_json(
        &first[2],
        StatusCode::CREATED,
        r#"{"path":"/x","version":0}"#,
    );
    assert_text(&first[3], StatusCode::OK, "2");
    assert_json(&first[4], StatusCode::OK, r#"{"path":"/a","version":1}"#);
    assert_text(
        &first[5],
        StatusCode::BAD_REQUEST,
        "bad path: empty component in \"/a/\"",
    );
    assert_eq!(first[6].0, StatusCode::NO_CONTENT);
    let state = server.dump().await;

    assert_replays(&server, &requests, &first).await;
    // The subtle case: /x exists now, but the replay of index 2 did not set it.
    assert_data(&server.get("/tree/x").await, b"x", 0);
    // A replay's body is not looked at: nothing is applied.
    let other = server
        .call(Method::PUT, "/tree/b", &[("Haven-Index", "1")], b"other")
        .await;
    assert_json(&other, StatusCode::CREATED, r#"{"path":"/a","version":0}"#);
    let never = server
        .call(Method::DELETE, "/tree/x", &[("Haven-Index", "4")], b"")
        .await;
    let never_body = "Haven-Index 4 is not above the applied high-water mark 8 but was never applied \
                      here; nothing was changed";
    assert_text(&never, StatusCode::CONFLICT, never_body);
    assert_eq!(server.dump().await, state, "replays change nothing");

    // Reads validate the header and otherwise ignore it.
    assert_data(
        &server
            .call(Method::GET, "/tree/x", &[("Haven-Index", "1")], b"")
            .await,
        b"x",
        0,
    );
    let zero = server
        .call(Method::PUT, "/tree/z", &[("Haven-Index", "0")], b"")
        .await;
    assert_text(&zero, StatusCode::BAD_REQUEST, BAD_INDEX);
    // Without the header, identical requests are applied each time.
    server.call(Method::POST, "/tree/x", &[], b"again").await;
    server.call(Method::POST, "/tree/x", &[], b"again").await;
    assert_data(&server.get("/tree/x").await, b"again", 2);
    let state = server.dump().await;
    server.stop().await;

    // The same answers after a restart, rebuilt from the journal.
    let server = Server::start(dir.path()).await;
    assert_eq!(server.dump().await, state);
    assert_replays(&server, &requests, &first).await;
    let never = server
        .call(Method::DELETE, "/tree/x", &[("Haven-Index", "4")], b"")
        .await;
    assert_text(&never, StatusCode::CONFLICT, never_body);
    assert_eq!(server.dump().await, state);
    server.stop().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    run_script(&server).await;
    let (dump, digest) = (server.dump().await, server.digest().await);
    server.stop().await;

    let server = Server::start(dir.path()).await;
    assert_eq!(server.dump().await, dump);
    assert_eq!(server.digest().await, digest);
    // And it goes on from there.
    let next = server
        .call(Method::PUT, "/tree/n", &[("Haven-Index", "20")], b"")
        .await;
    assert_eq!(next.0, StatusCode::CREATED);
    let dump = server.dump().await;
    server.stop().await;
    let app = TreeApp::open(&TreeAppConfig {
        dir: dir.path().to_path_buf(),
    })
    .unwrap();
    assert_eq!(app.dump(), dump);
    assert_eq!(app.applied_haven_index(), 20);
    assert_eq!(app.dir(), dir.path());
}

#[tokio::test]
async fn identical_sequences_give_identical_replicas() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        Server::start(one.path()).await,
        Server::start(two.path()).await,
    );
    let answers_a = run_script(&a).await;
    let answers_b = run_script(&b).await;
    let strip = |answers: Vec<Answer>| -> Vec<(StatusCode, Option<String>, Bytes)> {
        answers
            .into_iter()
            .map(|(status, headers, body)| {
                let content_type = headers
                    .get(CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_owned());
                (status, content_type, body)
            })
            .collect()
    };
    assert_eq!(strip(answers_a), strip(answers_b));
    assert_eq!(a.dump().await, b.dump().await);
    assert_eq!(a.digest().await, b.digest().await);
    // The script's expected end state.
    assert_eq!(
        a.dump().await,
        r#"{"haven_index":13,"mutations":8,"nodes":[{"path":"/","version":1,"data":"726f6f742064617461"},{"path":"/a","version":2,"data":"616c70686133"},{"path":"/a/b","version":0,"data":"00ff62696e"},{"path":"/a/b/c","version":0,"data":"64656570"}]}"#
    );
    assert_eq!(
        std::fs::read(journal(one.path())).unwrap(),
        std::fs::read(journal(two.path())).unwrap()
    );

    // One different request, and the digests differ.
    b.call(Method::POST, "/tree/a/b/c", &[], b"").await;
    assert_ne!(a.digest().await, b.digest().await);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_torn_last_record_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    server.call(Method::PUT, "/tree/a", &[], b"kept").await;
    let intact = std::fs::metadata(journal(dir.path())).unwrap().len();
    server.call(Method::PUT, "/tree/b", &[], b"torn").await;
    let dump = server.dump().await;
    server.stop().await;

    let full = std::fs::read(journal(dir.path())).unwrap();
    // Every cut inside the last record, header or payload, loses just it.
    for cut in [intact as usize + 1, intact as usize + 12, full.len() - 1] {
        std::fs::write(journal(dir.path()), &full[..cut]).unwrap();
        let app = TreeApp::open(&TreeAppConfig {
            dir: dir.path().to_path_buf(),
        })
        .unwrap();
        assert!(app.dump().contains("/a"));
        assert!(!app.dump().contains("/b"), "cut at {cut}");
        assert_eq!(
            std::fs::metadata(journal(dir.path())).unwrap().len(),
            intact
        );
    }
    // A bad checksum in the last record, right at the end, is torn too.
    let mut flipped = full.clone();
    *flipped.last_mut().unwrap() ^= 0xff;
    std::fs::write(journal(dir.path()), &flipped).unwrap();
    let server = Server::start(dir.path()).await;
    assert_ne!(server.dump().await, dump);
    // Haven delivers it again; it is journaled anew and survives.
    server.call(Method::PUT, "/tree/b", &[], b"torn").await;
    assert_eq!(server.dump().await, dump);
    server.stop().await;
    assert_eq!(std::fs::read(journal(dir.path())).unwrap(), full);
}

#[tokio::test]
async fn damage_before_the_end_names_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    server.call(Method::PUT, "/tree/a", &[], b"first").await;
    let second = std::fs::metadata(journal(dir.path())).unwrap().len();
    server.call(Method::PUT, "/tree/b", &[], b"second").await;
    server.call(Method::PUT, "/tree/c", &[], b"third").await;
    server.stop().await;

    let full = std::fs::read(journal(dir.path())).unwrap();
    let config = TreeAppConfig {
        dir: dir.path().to_path_buf(),
    };
    let open_err = |bytes: &[u8]| {
        std::fs::write(journal(dir.path()), bytes).unwrap();
        TreeApp::open(&config).unwrap_err()
    };
    // A flipped payload byte in the second record.
    let mut bad = full.clone();
    bad[second as usize + 14] ^= 1;
    let err = open_err(&bad);
    assert!(
        matches!(&err, TreeAppError::Corrupt { offset, .. } if *offset == second),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}: corrupt at byte offset {second}: a frame with a bad checksum",
            journal(dir.path()).display()
        )
    );
    // An absurd length in the first record's header (after the 8-byte magic).
    let mut bad = full.clone();
    bad[11] = 0x7f;
    let err = open_err(&bad);
    assert!(
        err.to_string().starts_with(&format!(
            "{}: corrupt at byte offset 8: a frame length of ",
            journal(dir.path()).display()
        )),
        "{err}"
    );
    // Nothing was truncated: the damage is left for an operator to look at.
    assert_eq!(std::fs::read(journal(dir.path())).unwrap(), bad);
    // And `serve` refuses to start.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = serve(listener, config.clone(), async {}).await.unwrap_err();
    assert!(
        matches!(err, TreeAppError::Corrupt { offset: 8, .. }),
        "{err:?}"
    );
}

/// Every file of a data directory, by name, to compare replicas.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// A snapshot in the documented format around the given file contents.
fn build_snapshot(tree_snapshot: &[u8], journal: &[u8]) -> Vec<u8> {
    haven_snapshot_frame::frame(&SNAPSHOT_MAGIC, tree_snapshot, journal)
}

#[tokio::test]
async fn snapshot_restores_into_a_fresh_app_byte_for_byte() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(one.path()).await;
    let answers = run_script(&a).await;
    let b = Server::start(two.path()).await;
    let stale = b
        .call(Method::PUT, "/tree/stale", &[("Haven-Index", "50")], b"")
        .await;
    assert_eq!(stale.0, StatusCode::CREATED);

    let snapshot = a.snapshot().await;
    let journal_len = std::fs::metadata(journal(one.path())).unwrap().len();
    assert!(snapshot.starts_with(&SNAPSHOT_MAGIC));
    assert_eq!(snapshot.len() as u64, SNAPSHOT_HEADER_LEN + journal_len + 4);
    let got = b.restore(Some("13"), &snapshot).await;
    assert_eq!(got.0, StatusCode::NO_CONTENT, "body {:?}", got.2);
    assert!(got.2.is_empty());
    assert_eq!(files(two.path()), files(one.path()));
    assert_eq!(b.dump().await, a.dump().await);
    assert_eq!(b.digest().await, a.digest().await);
    assert_eq!(b.get("/tree/a/b").await, a.get("/tree/a/b").await);
    assert_eq!(b.get("/children/a").await, a.get("/children/a").await);
    assert_eq!(
        b.snapshot().await,
        snapshot,
        "the restored replica snapshots the same"
    );

    // Replays of the script's indexes answer as on A, even failures.
    for (step, first) in script().iter().zip(&answers) {
        if step.index.is_some() {
            assert_eq!(b.step(step).await, *first, "{} {}", step.method, step.path);
        }
    }
    assert_eq!(b.dump().await, a.dump().await);
    // A new index applies; an index at most 13 the script never used is refused.
    let next = b
        .call(Method::PUT, "/tree/stale", &[("Haven-Index", "50")], b"")
        .await;
    assert_eq!(next.0, StatusCode::CREATED);
    assert_text(
        &b.call(Method::PUT, "/tree/q", &[("Haven-Index", "3")], b"")
            .await,
        StatusCode::CONFLICT,
        "Haven-Index 3 is not above the applied high-water mark 50 but was never applied \
         here; nothing was changed",
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn restored_state_survives_a_restart() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(one.path()).await;
    run_script(&a).await;
    let snapshot = a.snapshot().await;
    let dump = a.dump().await;
    a.stop().await;
    let b = Server::start(two.path()).await;
    assert_eq!(
        b.restore(Some("13"), &snapshot).await.0,
        StatusCode::NO_CONTENT
    );
    b.stop().await;

    let b = Server::start(two.path()).await;
    assert_eq!(b.dump().await, dump);
    assert_eq!(files(two.path()), files(one.path()));
    let next = b
        .call(Method::PUT, "/tree/n", &[("Haven-Index", "14")], b"")
        .await;
    assert_eq!(next.0, StatusCode::CREATED);
    b.stop().await;
}

#[tokio::test]
async fn invalid_snapshots_are_rejected_and_change_nothing() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(one.path()).await;
    a.call(Method::PUT, "/tree/a", &[("Haven-Index", "1")], b"first")
        .await;
    let second = std::fs::metadata(journal(one.path())).unwrap().len() as usize;
    a.call(Method::PUT, "/tree/b", &[("Haven-Index", "2")], b"second")
        .await;
    a.call(Method::PUT, "/tree/c", &[("Haven-Index", "3")], b"third")
        .await;
    let snapshot = a.snapshot().await.to_vec();
    a.stop().await;
    let b = Server::start(two.path()).await;
    b.call(Method::PUT, "/tree/mine", &[("Haven-Index", "7")], b"")
        .await;
    let before = files(two.path());
    let dump = b.dump().await;

    let full = std::fs::read(journal(one.path())).unwrap();
    let mut flipped = snapshot.clone();
    flipped[SNAPSHOT_HEADER_LEN as usize + 20] ^= 0x01;
    let mut header_flipped = snapshot.clone();
    header_flipped[21] ^= 0x01;
    let mut trailing = snapshot.clone();
    trailing.push(0);
    let mut bad_record = full.clone();
    bad_record[second + 14] ^= 1;
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "drop last byte",
            snapshot[..snapshot.len() - 1].to_vec(),
            "truncated".into(),
        ),
        (
            "half",
            snapshot[..snapshot.len() / 2].to_vec(),
            "truncated".into(),
        ),
        ("header only", snapshot[..20].to_vec(), "truncated".into()),
        ("empty", Vec::new(), "truncated".into()),
        ("flipped byte", flipped, "checksum mismatch".into()),
        (
            "flipped length",
            header_flipped,
            "header checksum mismatch".into(),
        ),
        (
            "trailing byte",
            trailing,
            "trailing bytes after the checksum".into(),
        ),
        (
            "garbage",
            b"garbage garbage garbage garbage garbage".to_vec(),
            "bad magic".into(),
        ),
        (
            "torn record",
            build_snapshot(b"", &full[..full.len() - 1]),
            "the journal ends with a torn record".into(),
        ),
        (
            "damaged record",
            build_snapshot(b"", &bad_record),
            format!("journal at byte offset {second}: a frame with a bad checksum"),
        ),
        (
            "garbled tree.snapshot",
            build_snapshot(b"not a snapshot", b""),
            format!(
                "tree.snapshot at byte offset 0: record length {} is above 14",
                u64::from_le_bytes(*b"not a sn")
            ),
        ),
    ];
    for (what, body, reason) in cases {
        let got = b.restore(Some("10"), &body).await;
        assert_text(
            &got,
            StatusCode::BAD_REQUEST,
            &format!("invalid snapshot: {reason}"),
        );
        assert_eq!(files(two.path()), before, "{what}");
    }
    assert_text(
        &b.restore(Some("2"), &snapshot).await,
        StatusCode::BAD_REQUEST,
        "invalid snapshot: it records Haven-Index 3, above the restore's Haven-Index 2",
    );
    assert_eq!(files(two.path()), before);
    assert_eq!(b.dump().await, dump);
    let next = b
        .call(Method::PUT, "/tree/more", &[("Haven-Index", "8")], b"")
        .await;
    assert_eq!(next.0, StatusCode::CREATED);
    b.stop().await;
}

#[tokio::test]
async fn restore_requires_a_haven_index() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(one.path()).await;
    run_script(&a).await;
    let snapshot = a.snapshot().await;
    a.stop().await;
    let b = Server::start(two.path()).await;
    let before = files(two.path());
    for index in haven_snapshot_frame::MALFORMED_HAVEN_INDEXES {
        assert_text(
            &b.restore(index, &snapshot).await,
            StatusCode::BAD_REQUEST,
            BAD_INDEX,
        );
    }
    assert_text(
        &b.call(
            Method::GET,
            "/_haven/snapshot",
            &[("Haven-Index", "-1")],
            b"",
        )
        .await,
        StatusCode::BAD_REQUEST,
        BAD_INDEX,
    );
    assert_eq!(files(two.path()), before);
    b.stop().await;
}

#[tokio::test]
async fn a_large_snapshot_streams_with_its_length() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(one.path()).await;
    let data: Vec<u8> = (0..MAX_DATA_LEN).map(|i| (i % 251) as u8).collect();
    for i in 0..4 {
        let path = format!("/tree/n{i}");
        let index = (i + 1).to_string();
        let got = a
            .call(
                Method::PUT,
                &path,
                &[("Haven-Index", index.as_str())],
                &data,
            )
            .await;
        assert_eq!(got.0, StatusCode::CREATED);
    }
    let snapshot = a.snapshot().await;
    let journal_len = std::fs::metadata(journal(one.path())).unwrap().len();
    assert!(journal_len > 4 << 20, "a few MB");
    assert_eq!(snapshot.len() as u64, SNAPSHOT_HEADER_LEN + journal_len + 4);
    let b = Server::start(two.path()).await;
    assert_eq!(
        b.restore(Some("4"), &snapshot).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(files(two.path()), files(one.path()));
    assert_eq!(b.digest().await, a.digest().await);
    assert_data(&b.get("/tree/n3").await, &data, 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_crash_mid_restore_leaves_an_app_that_opens() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(one.path()).await;
    run_script(&a).await;
    let new_dump = a.dump().await;
    a.stop().await;
    let new_journal = std::fs::read(journal(one.path())).unwrap();
    let b = Server::start(two.path()).await;
    b.call(Method::PUT, "/tree/old", &[("Haven-Index", "1")], b"")
        .await;
    let old_dump = b.dump().await;
    b.stop().await;
    let old = files(two.path());
    let staged = two.path().join(JOURNAL_RESTORE_FILE);

    // Killed while receiving (no marker), even mid-way: the old state.
    std::fs::write(&staged, &new_journal[..new_journal.len() / 2]).unwrap();
    let b = Server::start(two.path()).await;
    assert_eq!(b.dump().await, old_dump);
    b.stop().await;
    assert_eq!(files(two.path()), old);

    // Killed after the commit (marker renamed into place), before the
    // journal's rename: the new state.
    std::fs::write(&staged, &new_journal).unwrap();
    std::fs::write(two.path().join(RESTORE_MARKER_FILE), b"0").unwrap();
    let b = Server::start(two.path()).await;
    assert_eq!(b.dump().await, new_dump);
    b.stop().await;
    assert_eq!(files(two.path()), files(one.path()));
}
