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
use super::AppResponse;
use super::Stamp;
use super::http1;
use crate::types::OrderedRequest;

/// Read buffer growth step; responses of the log app are a few hundred bytes each.
const READ_CHUNK: usize = 64 * 1024;

/// One delivery: the ordered request and the stamp it carries.
pub struct Delivery<'a> {
    pub request: &'a OrderedRequest,
    pub stamp: Stamp,
}

/// What a window brought back: answers for a prefix of the deliveries, and why it stopped
/// short, if it did.
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
        if closes && responses.len() < plan.len() {
            return Err(AppError::Unreachable {
                url: self.url.clone(),
                reason: "the app closed the connection with requests still pipelined".into(),
            });
        }
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
