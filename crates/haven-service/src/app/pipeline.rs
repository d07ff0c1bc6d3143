//! The one connection on which a node delivers ordered entries to its replica, pipelined.
//!
//! A window of entries is written back to back while the answers are read, in order, on
//! the same connection; the app sees the requests one after another exactly as before,
//! but the node pays one round trip per window instead of one per entry. When the
//! connection fails part way, the answered prefix counts and the rest is sent again on a
//! new connection with the same `Haven-Index` (an app that honours the header treats a
//! request it had already processed as a replay).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::AppError;
use super::Stamp;
use super::http1;
use haven_contract::AppResponse;
use haven_contract::OrderedRequest;

/// Read buffer growth step; responses of the log app are a few hundred bytes each.
const READ_CHUNK: usize = 64 * 1024;

/// One delivery: the ordered request and the stamp it carries.
pub struct Delivery<'a> {
    pub request: &'a OrderedRequest,
    pub stamp: Stamp,
}

/// What a window brought back: answers for a prefix of the deliveries, and the error that
/// cut it short, if any (a server that closes the connection cuts it short without one).
pub struct WindowOutcome {
    pub responses: Vec<AppResponse>,
    pub error: Option<AppError>,
}

pub struct OrderedConnection {
    url: String,
    /// `host:port` of the app, used both to connect and as the `Host` header.
    authority: String,
    timeout: Duration,
    stream: Option<TcpStream>,
    read_buf: BytesMut,
}

impl OrderedConnection {
    /// `base_url` is `http://host:port` (a path, if any, is ignored).
    pub fn new(base_url: &str, timeout: Duration) -> Self {
        let authority = base_url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        Self {
            url: base_url.to_string(),
            authority,
            timeout,
            stream: None,
            read_buf: BytesMut::new(),
        }
    }

    /// Sends every delivery in order and reads the answers. A request that can never be
    /// sent (invalid header) gets a synthetic `400` instead of being retried forever; the
    /// refusal is deterministic, so every replica answers it the same way.
    pub async fn deliver(&mut self, deliveries: &[Delivery<'_>]) -> WindowOutcome {
        let mut encoded = Vec::with_capacity(deliveries.len() * 512);
        let mut plan = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let start = encoded.len();
            match http1::encode_request(
                &mut encoded,
                &self.authority,
                delivery.request,
                &delivery.stamp,
            ) {
                Ok(()) => plan.push(Planned::Sent {
                    bodiless: delivery.request.method == "HEAD",
                }),
                Err(reason) => {
                    encoded.truncate(start);
                    plan.push(Planned::Refused(reason));
                }
            }
        }
        let mut responses = Vec::with_capacity(plan.len());
        let error = self.exchange(&encoded, &plan, &mut responses).await.err();
        if error.is_some() {
            self.stream = None;
        }
        WindowOutcome { responses, error }
    }

    async fn exchange(
        &mut self,
        encoded: &[u8],
        plan: &[Planned],
        responses: &mut Vec<AppResponse>,
    ) -> Result<(), AppError> {
        let timeout = self.timeout;
        let url = self.url.clone();
        let mut stream = match self.stream.take() {
            Some(stream) => stream,
            None => self.connect().await?,
        };
        self.read_buf.clear();
        let (mut reader, mut writer) = stream.split();
        let read_buf = &mut self.read_buf;
        let write = async {
            writer
                .write_all(encoded)
                .await
                .map_err(|e| unreachable(&url, &e))?;
            std::future::pending::<Result<bool, AppError>>().await
        };
        let read = async {
            let mut closes = false;
            for planned in plan {
                let parsed = match planned {
                    Planned::Refused(reason) => {
                        responses.push(refused(reason));
                        continue;
                    }
                    Planned::Sent { bodiless } => {
                        next_response(&mut reader, read_buf, *bodiless, timeout, &url).await?
                    }
                };
                responses.push(parsed.response);
                if parsed.closes {
                    closes = true;
                    break;
                }
            }
            Ok(closes)
        };
        let closes = tokio::select! {
            result = read => result?,
            result = write => result?,
        };
        // After `Connection: close` the requests behind the answered one were not
        // processed; the caller sends them again on a new connection, which is normal
        // operation for such servers, not a failure.
        if !closes {
            self.stream = Some(stream);
        }
        Ok(())
    }

    async fn connect(&self) -> Result<TcpStream, AppError> {
        let connecting = TcpStream::connect(&self.authority);
        let stream = match tokio::time::timeout(self.timeout, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(unreachable(&self.url, &e)),
            Err(_) => return Err(self.timed_out()),
        };
        stream
            .set_nodelay(true)
            .map_err(|e| unreachable(&self.url, &e))?;
        Ok(stream)
    }

    fn timed_out(&self) -> AppError {
        AppError::Timeout {
            url: self.url.clone(),
            timeout: self.timeout,
        }
    }
}

enum Planned {
    Sent { bodiless: bool },
    Refused(String),
}

/// Reads until one whole response is buffered. Each read must bring bytes within
/// `timeout`: an app that stops answering costs a timeout, never a hung apply loop.
async fn next_response(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    buf: &mut BytesMut,
    bodiless: bool,
    timeout: Duration,
    url: &str,
) -> Result<http1::Parsed, AppError> {
    let mut eof = false;
    loop {
        let bad = |reason: String| AppError::BadResponse {
            url: url.to_string(),
            reason,
        };
        if let Some(parsed) = http1::take_response(buf, bodiless, eof).map_err(bad)? {
            return Ok(parsed);
        }
        if eof {
            return Err(AppError::Unreachable {
                url: url.to_string(),
                reason: "connection closed before the response was complete".into(),
            });
        }
        buf.reserve(READ_CHUNK);
        acknowledge_at_once(reader);
        match tokio::time::timeout(timeout, reader.read_buf(buf)).await {
            Ok(Ok(0)) => eof = true,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(unreachable(url, &e)),
            Err(_) => {
                return Err(AppError::Timeout {
                    url: url.to_string(),
                    timeout,
                });
            }
        }
    }
}

/// Many servers leave Nagle's algorithm on, so their second pipelined answer waits until
/// the first is acknowledged, and Linux delays acknowledgements by up to 40 ms. Asking
/// for immediate acks before each read keeps pipelining fast with such servers. Best
/// effort: failing to set it costs speed, never correctness.
fn acknowledge_at_once(reader: &tokio::net::tcp::ReadHalf<'_>) {
    let socket = socket2::SockRef::from(reader.as_ref());
    if let Err(e) = socket.set_tcp_quickack(true) {
        tracing::debug!(error = %e, "cannot set TCP_QUICKACK on the app connection");
    }
}

fn unreachable(url: &str, e: &std::io::Error) -> AppError {
    AppError::Unreachable {
        url: url.to_string(),
        reason: e.to_string(),
    }
}

fn refused(reason: &str) -> AppResponse {
    AppResponse {
        status: 400,
        headers: vec![(
            "content-type".to_string(),
            bytes::Bytes::from_static(b"text/plain"),
        )],
        body: bytes::Bytes::from(format!("Haven cannot deliver this request: {reason}")),
    }
}

/// Test apps shared with the apply tests.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use haven_contract::RequestTag;
    use tokio::io::AsyncBufReadExt;
    use tokio::io::BufReader;
    use tokio::net::TcpListener;

    pub(crate) fn request(i: u64) -> OrderedRequest {
        OrderedRequest {
            tag: RequestTag { origin: 1, seq: i },
            method: "POST".into(),
            uri: format!("/r/{i}"),
            headers: vec![],
            body: bytes::Bytes::new(),
            idempotency_key: None,
            time_unix_us: 0,
            seed: 0,
        }
    }

    fn deliveries(requests: &[OrderedRequest]) -> Vec<Delivery<'_>> {
        requests
            .iter()
            .enumerate()
            .map(|(i, request)| Delivery {
                request,
                stamp: Stamp {
                    index: i as u64 + 1,
                    time_rfc3339: String::new(),
                    seed: 0,
                },
            })
            .collect()
    }

    async fn server(close_every: Option<usize>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        path_echo_app(close_every, None).await
    }

    /// A server that answers each request with its path as the body, and returns the paths
    /// once no connection came for 500 ms. With `close_every` it closes the connection
    /// after that many answers (saying so in the last one); with `gate` it reads nothing
    /// until the gate opens.
    pub(crate) async fn path_echo_app(
        close_every: Option<usize>,
        gate: Option<std::sync::Arc<tokio::sync::Notify>>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        answering_app(close_every, gate, |path| ("200 OK", path.to_string())).await
    }

    /// [`path_echo_app`] with the status line and body `answer` makes of each path.
    pub(crate) async fn answering_app(
        close_every: Option<usize>,
        gate: Option<std::sync::Arc<tokio::sync::Notify>>,
        answer: fn(&str) -> (&'static str, String),
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let Ok(Ok((stream, _))) =
                    tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
                else {
                    return seen;
                };
                if let Some(gate) = &gate {
                    gate.notified().await;
                }
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let mut answered = 0;
                while let Ok(Some(line)) = lines.next_line().await {
                    let Some(path) = line.strip_prefix("POST ") else {
                        continue;
                    };
                    let path = path.trim_end_matches(" HTTP/1.1").to_string();
                    // Skip the head; bodies are empty.
                    while let Ok(Some(h)) = lines.next_line().await {
                        if h.is_empty() {
                            break;
                        }
                    }
                    seen.push(path.clone());
                    answered += 1;
                    let closing = close_every.is_some_and(|n| answered == n);
                    let connection = if closing { "connection: close\r\n" } else { "" };
                    let (status, body) = answer(&path);
                    let reply = format!(
                        "HTTP/1.1 {status}\r\n{connection}content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    write.write_all(reply.as_bytes()).await.unwrap();
                    if closing {
                        break;
                    }
                }
            }
        });
        (url, handle)
    }

    fn bodies(responses: &[AppResponse]) -> Vec<String> {
        responses
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_window_is_answered_in_order_on_one_connection() {
        let (url, server) = server(None).await;
        let requests: Vec<_> = (0..50).map(request).collect();
        let mut connection = OrderedConnection::new(&url, Duration::from_secs(2));
        let outcome = connection.deliver(&deliveries(&requests)).await;
        assert!(outcome.error.is_none());
        let expected: Vec<String> = (0..50).map(|i| format!("/r/{i}")).collect();
        assert_eq!(bodies(&outcome.responses), expected);
        drop(connection);
        assert_eq!(server.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_server_that_closes_gets_the_rest_on_a_new_connection() {
        let (url, server) = server(Some(3)).await;
        let requests: Vec<_> = (0..7).map(request).collect();
        let all = deliveries(&requests);
        let mut connection = OrderedConnection::new(&url, Duration::from_secs(2));
        let mut answered = Vec::new();
        while answered.len() < all.len() {
            let outcome = connection.deliver(&all[answered.len()..]).await;
            assert!(outcome.error.is_none());
            assert!(!outcome.responses.is_empty());
            answered.extend(outcome.responses);
        }
        let expected: Vec<String> = (0..7).map(|i| format!("/r/{i}")).collect();
        assert_eq!(bodies(&answered), expected);
        drop(connection);
        // Requests behind a closing answer were never processed, so none ran twice.
        assert_eq!(server.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_dead_app_is_an_error_not_a_hang() {
        let url = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let requests = [request(0)];
        let mut connection = OrderedConnection::new(&url, Duration::from_millis(200));
        let outcome = connection.deliver(&deliveries(&requests)).await;
        assert!(outcome.responses.is_empty());
        assert!(matches!(outcome.error, Some(AppError::Unreachable { .. })));
    }
}
