//! Hooks mode: the app captures and restores its own state over HTTP.
//!
//! - `GET <snapshot_path>` answers 200 with the app's whole state in its own format.
//! - `PUT <restore_path>` with `Haven-Index: N` and a body a snapshot returned answers
//!   2xx once the state was replaced, or an error status with a text reason.
//!
//! A state can be gigabytes, so both directions stream in bounded chunks and nothing
//! holds a whole body. A transfer has no overall deadline (its length is unknown); it
//! fails when it stops moving for longer than [`Hooks::timeout`]. Each call uses its own
//! HTTP/1.1 connection: it is rare and long, and must not share fate with deliveries.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use bytes::BytesMut;
use haven_base::errors::chain;
use http::Request;
use http::StatusCode;
use http::header;
use http_body_util::BodyExt;
use http_body_util::Empty;
use http_body_util::StreamBody;
use hyper::body::Body;
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncRead;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWrite;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use haven_contract::headers;
use haven_contract::paths;

/// Size of the pieces a restore body is read and sent in.
const CHUNK_BYTES: usize = 256 * 1024;
/// How much of an error answer's body is quoted as its reason.
const REASON_BYTES: usize = 1024;

/// Where the app's snapshot and restore endpoints are.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// The app's base url, `http://host:port` (a path prefix is kept).
    pub url: String,
    pub snapshot_path: String,
    pub restore_path: String,
    /// Longest wait for any progress: connecting, the answer's head, each body chunk
    /// either way, and the answer after the last byte of a restore.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    #[error("app url {url} has no host and port")]
    BadUrl { url: String },
    #[error("cannot connect to the {hook} hook at {url}: {reason}")]
    Connect {
        hook: &'static str,
        url: String,
        reason: String,
    },
    #[error("{hook} hook at {url} answered {status}: {reason}")]
    Status {
        hook: &'static str,
        url: String,
        status: StatusCode,
        reason: String,
    },
    #[error("{hook} hook at {url} made no progress for {timeout:?}")]
    Stalled {
        hook: &'static str,
        url: String,
        timeout: Duration,
    },
    #[error("{hook} hook at {url} failed: {reason}")]
    Transfer {
        hook: &'static str,
        url: String,
        reason: String,
    },
    #[error("cannot write the snapshot from {url}: {source}")]
    Write { url: String, source: io::Error },
    #[error("cannot read the state to restore through {url}: {source}")]
    Read { url: String, source: io::Error },
}

impl Hooks {
    /// The default endpoint paths.
    pub fn new(url: &str, timeout: Duration) -> Self {
        Self {
            url: url.to_string(),
            snapshot_path: paths::SNAPSHOT.to_string(),
            restore_path: paths::RESTORE.to_string(),
            timeout,
        }
    }

    /// Streams the app's snapshot into `dest` and flushes it; returns the bytes written.
    /// Anything but 200 is an error quoting the start of the answer.
    pub async fn snapshot_to<W: AsyncWrite + Unpin>(
        &self,
        dest: &mut W,
    ) -> Result<u64, HooksError> {
        let call = self.call("snapshot", &self.snapshot_path)?;
        let (mut sender, _connection) = call.open::<Empty<Bytes>>().await?;
        let request = call.request(http::Method::GET).body(Empty::new());
        let request = request.map_err(|e| call.transfer(&e))?;
        let response = call.idle(sender.send_request(request)).await?;
        let response = response.map_err(|e| call.transfer(&e))?;
        if response.status() != StatusCode::OK {
            return Err(call.refused(response).await);
        }
        call.copy_body(response.into_body(), dest).await
    }

    /// Sends `source` as the restore body (chunked) with `Haven-Index: index` and waits for
    /// the app's verdict: 2xx means its state was replaced.
    pub async fn restore_from<R: AsyncRead + Send + Unpin + 'static>(
        &self,
        index: u64,
        source: R,
    ) -> Result<(), HooksError> {
        let call = self.call("restore", &self.restore_path)?;
        let upload = Upload::new(source);
        let progress = upload.progress.clone();
        let failure = upload.failure.clone();
        let (mut sender, _connection) = call.open::<UploadBody>().await?;
        let request = call
            .request(http::Method::PUT)
            .header(headers::INDEX, index)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(upload.into_body());
        let request = request.map_err(|e| call.transfer(&e))?;
        progress.touch(); // connecting had its own timeout
        let answer = call.watch(&progress, sender.send_request(request)).await;
        if let Some(source) = take(&failure) {
            return Err(HooksError::Read {
                url: call.url,
                source,
            });
        }
        let response = answer?.map_err(|e| call.transfer(&e))?;
        if !response.status().is_success() {
            return Err(call.refused(response).await);
        }
        Ok(())
    }

    fn call(&self, hook: &'static str, path: &str) -> Result<Call, HooksError> {
        let bad_url = || HooksError::BadUrl {
            url: self.url.clone(),
        };
        let base: http::Uri = self.url.parse().map_err(|_| bad_url())?;
        let host = base.host().filter(|h| !h.is_empty()).ok_or_else(bad_url)?;
        let authority = format!("{host}:{}", base.port_u16().unwrap_or(80));
        let path = format!("{}{path}", base.path().trim_end_matches('/'));
        Ok(Call {
            hook,
            url: format!("http://{authority}{path}"),
            authority,
            path,
            timeout: self.timeout,
        })
    }
}

/// One hook call: where it goes and how its errors read.
struct Call {
    hook: &'static str,
    /// The full url, for messages.
    url: String,
    authority: String,
    path: String,
    timeout: Duration,
}

/// Aborts the task driving a connection when the call is over, however it ended.
struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Call {
    /// A fresh HTTP/1.1 connection, driven by its own task for as long as the guard lives.
    async fn open<B>(&self) -> Result<(http1::SendRequest<B>, Connection), HooksError>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let connect_error = |reason: String| HooksError::Connect {
            hook: self.hook,
            url: self.url.clone(),
            reason,
        };
        let stream = self.idle(TcpStream::connect(&self.authority)).await?;
        let stream = stream.map_err(|e| connect_error(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let handshake = http1::handshake(TokioIo::new(stream)).await;
        let (sender, connection) = handshake.map_err(|e| connect_error(chain(&e)))?;
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %chain(&e), "hook connection ended");
            }
        });
        Ok((sender, Connection(driver)))
    }

    fn request(&self, method: http::Method) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(&self.path)
            .header(header::HOST, &self.authority)
    }

    /// Writes every data frame of `body` to `dest`, each step bounded by the idle timeout.
    async fn copy_body<W: AsyncWrite + Unpin>(
        &self,
        mut body: Incoming,
        dest: &mut W,
    ) -> Result<u64, HooksError> {
        let write_error = |source| HooksError::Write {
            url: self.url.clone(),
            source,
        };
        let mut written = 0u64;
        while let Some(frame) = self.idle(body.frame()).await? {
            let frame = frame.map_err(|e| self.transfer(&e))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers carry no state
            };
            self.idle(dest.write_all(&data))
                .await?
                .map_err(write_error)?;
            written += data.len() as u64;
        }
        self.idle(dest.flush()).await?.map_err(write_error)?;
        Ok(written)
    }

    /// The error for a refusing answer, quoting the first KiB of its body.
    async fn refused(&self, response: http::Response<Incoming>) -> HooksError {
        let status = response.status();
        let mut body = response.into_body();
        let mut reason = Vec::new();
        while reason.len() < REASON_BYTES {
            let Ok(Some(Ok(frame))) = self.idle(body.frame()).await else {
                break;
            };
            if let Ok(data) = frame.into_data() {
                reason.extend_from_slice(&data);
            }
        }
        reason.truncate(REASON_BYTES);
        let reason = String::from_utf8_lossy(&reason).trim().to_string();
        HooksError::Status {
            hook: self.hook,
            url: self.url.clone(),
            status,
            reason: if reason.is_empty() {
                "(no reason given)".into()
            } else {
                reason
            },
        }
    }

    /// `step`, or a stall error if it does not finish within the idle timeout.
    async fn idle<F: Future>(&self, step: F) -> Result<F::Output, HooksError> {
        tokio::time::timeout(self.timeout, step)
            .await
            .map_err(|_| self.stalled())
    }

    /// `call`, or a stall error once `progress` has not moved for the idle timeout.
    /// The upload marks progress each time hyper takes a chunk, so a peer that stops
    /// reading (full socket buffers) or stops answering both count as stalls.
    async fn watch<F: Future>(
        &self,
        progress: &Progress,
        call: F,
    ) -> Result<F::Output, HooksError> {
        let mut call = pin!(call);
        loop {
            let deadline = progress.last() + self.timeout;
            tokio::select! {
                output = &mut call => return Ok(output),
                () = tokio::time::sleep_until(deadline) => {
                    if progress.last() + self.timeout <= Instant::now() {
                        return Err(self.stalled());
                    }
                }
            }
        }
    }

    fn stalled(&self) -> HooksError {
        HooksError::Stalled {
            hook: self.hook,
            url: self.url.clone(),
            timeout: self.timeout,
        }
    }

    fn transfer(&self, e: &dyn StdError) -> HooksError {
        HooksError::Transfer {
            hook: self.hook,
            url: self.url.clone(),
            reason: chain(e),
        }
    }
}

/// When an upload last moved.
struct Progress {
    start: Instant,
    millis: AtomicU64,
}

impl Progress {
    fn touch(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(millis, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.millis.load(Ordering::Relaxed))
    }
}

type UploadBody = StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, io::Error>>>;

/// A restore body: `source` read in chunks of up to [`CHUNK_BYTES`], one in flight.
struct Upload<R> {
    source: R,
    progress: Arc<Progress>,
    /// The source's read error, kept so the caller reports it rather than the aborted
    /// request hyper sees.
    failure: Arc<Mutex<Option<io::Error>>>,
}

impl<R: AsyncRead + Send + Unpin + 'static> Upload<R> {
    fn new(source: R) -> Self {
        let progress = Progress {
            start: Instant::now(),
            millis: AtomicU64::new(0),
        };
        Self {
            source,
            progress: Arc::new(progress),
            failure: Arc::new(Mutex::new(None)),
        }
    }

    fn into_body(self) -> UploadBody {
        let chunks = futures::stream::unfold(Some(self), |upload| async move {
            let mut upload = upload?;
            upload.progress.touch();
            match read_chunk(&mut upload.source).await {
                Ok(chunk) if chunk.is_empty() => None,
                Ok(chunk) => {
                    upload.progress.touch();
                    Some((Ok(Frame::data(chunk)), Some(upload)))
                }
                Err(e) => {
                    let for_hyper = io::Error::new(e.kind(), e.to_string());
                    if let Ok(mut slot) = upload.failure.lock() {
                        *slot = Some(e);
                    }
                    Some((Err(for_hyper), None))
                }
            }
        });
        StreamBody::new(Box::pin(chunks))
    }
}

/// Up to [`CHUNK_BYTES`] from `source`; empty at the end.
async fn read_chunk<R: AsyncRead + Unpin>(source: &mut R) -> io::Result<Bytes> {
    let mut chunk = BytesMut::with_capacity(CHUNK_BYTES);
    while chunk.len() < CHUNK_BYTES {
        if source.read_buf(&mut chunk).await? == 0 {
            break;
        }
    }
    Ok(chunk.freeze())
}

fn take(failure: &Mutex<Option<io::Error>>) -> Option<io::Error> {
    failure.lock().ok()?.take()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body as AxumBody;
    use axum::routing::get;
    use axum::routing::put;
    use futures::StreamExt;

    const MIB: usize = 1024 * 1024;
    const TIMEOUT: Duration = Duration::from_secs(5);

    /// Byte `i` of the test state: a pattern a reordered or dropped chunk breaks.
    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{addr}")
    }

    /// 20 MiB of pattern in 1 MiB chunks; after `stall_after` chunks it stops sending.
    fn snapshot_body(stall_after: usize) -> AxumBody {
        let chunks = futures::stream::iter(0..20).then(move |n| async move {
            if n >= stall_after {
                futures::future::pending::<()>().await;
            }
            let chunk: Vec<u8> = (n * MIB..(n + 1) * MIB).map(pattern).collect();
            Ok::<_, io::Error>(chunk)
        });
        AxumBody::from_stream(chunks)
    }

    #[tokio::test]
    async fn a_snapshot_streams_into_the_destination() {
        let app = Router::new().route(paths::SNAPSHOT, get(|| async { snapshot_body(20) }));
        let hooks = Hooks::new(&serve(app).await, TIMEOUT);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot");
        let mut file = tokio::fs::File::create(&path).await.unwrap();
        let written = hooks.snapshot_to(&mut file).await.unwrap();
        assert_eq!(written, 20 * MIB as u64);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 20 * MIB);
        assert!(bytes.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    }

    #[tokio::test]
    async fn a_refused_snapshot_quotes_status_and_reason() {
        let refuse = || async { (StatusCode::SERVICE_UNAVAILABLE, "not ready yet\n") };
        let app = Router::new().route("/app/state", get(refuse));
        let base = serve(app).await;
        let mut hooks = Hooks::new(&format!("{base}/app/"), TIMEOUT);
        hooks.snapshot_path = "/state".into();
        let err = hooks.snapshot_to(&mut Vec::new()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "snapshot hook at {base}/app/state answered 503 Service Unavailable: not ready yet"
            )
        );
    }

    #[tokio::test]
    async fn only_the_first_kib_of_a_reason_is_kept() {
        let refuse = || async { (StatusCode::INTERNAL_SERVER_ERROR, "x".repeat(100_000)) };
        let app = Router::new().route(paths::SNAPSHOT, get(refuse));
        let hooks = Hooks::new(&serve(app).await, TIMEOUT);
        let err = hooks.snapshot_to(&mut Vec::new()).await.unwrap_err();
        let HooksError::Status { status, reason, .. } = err else {
            panic!("{err}");
        };
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(reason, "x".repeat(1024));
    }

    #[tokio::test]
    async fn a_snapshot_that_stops_mid_body_times_out() {
        let app = Router::new().route(paths::SNAPSHOT, get(|| async { snapshot_body(3) }));
        let base = serve(app).await;
        let hooks = Hooks::new(&base, Duration::from_millis(300));
        let mut received = Vec::new();
        let err = hooks.snapshot_to(&mut received).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("snapshot hook at {base}/_haven/snapshot made no progress for 300ms")
        );
        assert_eq!(received.len(), 3 * MIB);
    }

    #[tokio::test]
    async fn an_unreachable_app_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let hooks = Hooks::new(&format!("http://127.0.0.1:{port}"), TIMEOUT);
        let err = hooks.snapshot_to(&mut Vec::new()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot connect to the snapshot hook at http://127.0.0.1:{port}/_haven/snapshot: \
                 Connection refused (os error 111)"
            )
        );
    }

    /// What the restore endpoint saw: `Haven-Index` and the body's length, if the body
    /// followed the pattern.
    type Seen = Arc<Mutex<Option<(String, Option<usize>)>>>;

    async fn restore_server(status: StatusCode, answer: &'static str) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let handler = move |headers: http::HeaderMap, body: AxumBody| async move {
            let index = headers
                .get("haven-index")
                .map(|v| v.to_str().unwrap().to_string());
            let mut stream = body.into_data_stream();
            let (mut len, mut intact) = (0usize, true);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.unwrap();
                intact &= chunk
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern(len + i));
                len += chunk.len();
            }
            *record.lock().unwrap() = Some((index.unwrap_or_default(), intact.then_some(len)));
            (status, answer)
        };
        let app = Router::new().route(paths::RESTORE, put(handler));
        (serve(app).await, seen)
    }

    fn state(len: usize) -> std::io::Cursor<Vec<u8>> {
        std::io::Cursor::new((0..len).map(pattern).collect())
    }

    #[tokio::test]
    async fn a_restore_streams_the_state_with_its_index() {
        let (base, seen) = restore_server(StatusCode::NO_CONTENT, "").await;
        let hooks = Hooks::new(&base, TIMEOUT);
        hooks.restore_from(42, state(20 * MIB + 7)).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, Some(("42".to_string(), Some(20 * MIB + 7))));
    }

    #[tokio::test]
    async fn a_refused_restore_quotes_status_and_reason() {
        let (base, _) = restore_server(StatusCode::CONFLICT, "index 5 is behind 7").await;
        let hooks = Hooks::new(&base, TIMEOUT);
        let err = hooks.restore_from(5, state(1000)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "restore hook at {base}/_haven/restore answered 409 Conflict: index 5 is behind 7"
            )
        );
    }

    /// Reads `good` bytes of pattern, then fails.
    struct Failing {
        good: usize,
        at: usize,
    }

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if self.at >= self.good {
                return std::task::Poll::Ready(Err(io::Error::other("checkpoint is corrupt")));
            }
            let n = buf.remaining().min(self.good - self.at);
            let bytes: Vec<u8> = (self.at..self.at + n).map(pattern).collect();
            buf.put_slice(&bytes);
            self.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failing_source_is_reported_as_such() {
        let (base, seen) = restore_server(StatusCode::NO_CONTENT, "").await;
        let hooks = Hooks::new(&base, TIMEOUT);
        let source = Failing {
            good: 3 * MIB,
            at: 0,
        };
        let err = hooks.restore_from(9, source).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read the state to restore through {base}/_haven/restore: \
                 checkpoint is corrupt"
            )
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            *seen.lock().unwrap(),
            None,
            "the app never saw a complete body"
        );
    }

    #[tokio::test]
    async fn a_restore_the_app_stops_reading_times_out() {
        let stuck = |_: http::HeaderMap| async {
            futures::future::pending::<()>().await;
            StatusCode::NO_CONTENT
        };
        let app = Router::new().route(paths::RESTORE, put(stuck));
        let base = serve(app).await;
        let hooks = Hooks::new(&base, Duration::from_millis(300));
        let err = hooks.restore_from(1, state(64 * MIB)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("restore hook at {base}/_haven/restore made no progress for 300ms")
        );
    }

    #[tokio::test]
    async fn a_restore_the_app_never_answers_times_out() {
        let swallow = |body: AxumBody| async move {
            let _ = body.collect().await;
            futures::future::pending::<()>().await;
        };
        let app = Router::new().route(paths::RESTORE, put(swallow));
        let base = serve(app).await;
        let hooks = Hooks::new(&base, Duration::from_millis(300));
        let err = hooks.restore_from(1, state(MIB)).await.unwrap_err();
        assert!(
            matches!(
                err,
                HooksError::Stalled {
                    hook: "restore",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_restore_refused_before_the_body_is_read_quotes_the_reason() {
        let refuse = || async { (StatusCode::UNPROCESSABLE_ENTITY, "unknown format") };
        let app = Router::new().route(paths::RESTORE, put(refuse));
        let base = serve(app).await;
        let hooks = Hooks::new(&base, TIMEOUT);
        let err = hooks.restore_from(3, state(64 * MIB)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "restore hook at {base}/_haven/restore answered 422 Unprocessable Entity: \
                 unknown format"
            )
        );
    }
}
