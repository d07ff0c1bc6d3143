//! TLS for every port of a node, from the PEM files of `[tls]`: mutual TLS between peers
//! (a peer is trusted only with a certificate the cluster's CA signed), and server-only
//! TLS on the client and admin ports. rustls with the `ring` provider: no C build.
//!
//! Handshakes run in tasks of their own ([`TlsListener`]), so one slow or hostile
//! client cannot hold up the accept loop, and each refusal is logged once with its
//! reason and counted in `haven_tls_handshake_failures_total{port}`.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounterVec;
use rustls::ClientConfig;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::TlsConnector;
use tokio_rustls::server::TlsStream;

use crate::config::TlsSection;

/// How long a client may take to finish its handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress on one port; a connection beyond them is closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Finished handshakes waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("tls.{key}: {path}: {reason}")]
    Content {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The node's TLS settings, built once at start.
#[derive(Clone)]
pub struct Tls {
    /// The raft port: a peer must present a certificate the CA signed.
    pub peer_server: TlsAcceptor,
    /// Dialing peers: their certificate must name the dialed host and come from the CA;
    /// ours goes with it.
    pub peer_client: TlsConnector,
    /// The client and admin ports when `[tls] client`/`admin` ask for it.
    pub https_server: TlsAcceptor,
    pub client_port: bool,
    pub admin_port: bool,
}

impl Tls {
    pub fn load(section: &TlsSection) -> Result<Self, TlsError> {
        let roots = root_store("ca", &section.ca)?;
        let certs = certificates("cert", &section.cert)?;
        let key = private_key(&section.key)?;
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let peer_server = server_builder(&provider)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| key_mismatch(section, e))?;
        let https_server = server_builder(&provider)?
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| key_mismatch(section, e))?;
        let peer_client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| key_mismatch(section, e))?;
        Ok(Self {
            peer_server: TlsAcceptor::from(Arc::new(peer_server)),
            peer_client: TlsConnector::from(Arc::new(peer_client)),
            https_server: TlsAcceptor::from(Arc::new(https_server)),
            client_port: section.client,
            admin_port: section.admin,
        })
    }
}

/// rustls 0.23.48 deprecates its ring provider for lacking post-quantum key exchange; the
/// alternative, aws-lc, is a C build this project avoids, and the ring suites remain
/// sound.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_builder(
    provider: &Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, rustls::Error> {
    ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()
}

fn key_mismatch(section: &TlsSection, e: rustls::Error) -> TlsError {
    TlsError::Content {
        key: "key",
        path: section.key.clone(),
        reason: format!("does not go with tls.cert {}: {e}", section.cert.display()),
    }
}

/// A client configuration trusting only the CA in `ca` (no client certificate): what
/// the CLI and tests use to reach a TLS client or admin port.
pub fn trusting(ca: &Path) -> Result<ClientConfig, TlsError> {
    let roots = root_store("ca", ca)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let content = |reason: String| TlsError::Content {
        key,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(content("holds no certificate (BEGIN CERTIFICATE)".into()));
    }
    Ok(certs)
}

fn root_store(key: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(key, path)? {
        roots.add(cert).map_err(|e| TlsError::Content {
            key,
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The key's bytes never reach an error or a log line: only what kind of problem it is.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Content {
        key: "key",
        path: path.to_path_buf(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "holds no private key".to_string(),
            _ => "not a PEM private key".to_string(),
        },
    })
}

/// The name a dialed peer's certificate must carry: the host of its `host:port`.
pub fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr}: not a TLS server name: {e}"),
        )
    })
}

/// A byte stream a port serves: plain TCP or TLS over it.
pub trait Connection: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection for T {}

/// A port's listener, with or without TLS: what the client and admin servers take.
pub enum PortListener {
    Plain(TcpListener),
    Tls(TlsListener),
}

impl PortListener {
    /// `tls`: the acceptor, when this port speaks TLS.
    pub fn new(
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        port: &'static str,
        failures: IntCounterVec,
    ) -> Self {
        match tls {
            Some(acceptor) => Self::Tls(TlsListener::new(listener, acceptor, port, failures)),
            None => Self::Plain(listener),
        }
    }

    pub async fn accept(&mut self) -> io::Result<(Box<dyn Connection>, SocketAddr)> {
        match self {
            Self::Plain(listener) => {
                let (stream, peer) = listener.accept().await?;
                stream.set_nodelay(true)?;
                Ok((Box::new(stream), peer))
            }
            Self::Tls(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((Box::new(stream), peer))
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Self::Plain(listener) => listener.local_addr(),
            Self::Tls(listener) => Ok(listener.local_addr),
        }
    }
}

/// A listener whose connections come out already through a TLS handshake.
pub struct TlsListener {
    pub local_addr: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    handshakes: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// `port` names the port in log lines and in the failure metric's label.
    pub fn new(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        port: &'static str,
        failures: IntCounterVec,
    ) -> Self {
        let local_addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (send, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        let refusals = Refusals {
            port,
            failures,
            logged: Arc::default(),
        };
        let handshakes = tokio::spawn(accept_loop(listener, acceptor, refusals, send));
        Self {
            local_addr,
            accepted,
            handshakes,
        }
    }

    pub async fn accept(&mut self) -> io::Result<(TlsStream<TcpStream>, SocketAddr)> {
        self.accepted.recv().await.ok_or_else(|| {
            io::Error::new(io::ErrorKind::BrokenPipe, "the TLS accept loop has stopped")
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.handshakes.abort();
    }
}

/// How often the same refusal is logged again: a misconfigured peer redials every
/// second, and one line says what is wrong (the metric counts every one).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Refusals {
    port: &'static str,
    failures: IntCounterVec,
    /// When each reason was last logged, and how many went unlogged since.
    logged: Arc<std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>>,
}

impl Refusals {
    fn refuse(&self, peer: SocketAddr, reason: &str) {
        self.failures.with_label_values(&[self.port]).inc();
        let now = std::time::Instant::now();
        let mut logged = match self.logged.lock() {
            Ok(logged) => logged,
            Err(poisoned) => poisoned.into_inner(),
        };
        match logged.get_mut(reason) {
            Some((last, quiet)) if now.duration_since(*last) < REFUSAL_LOG_INTERVAL => *quiet += 1,
            _ => {
                let (_, quiet) = logged
                    .insert(reason.to_string(), (now, 0))
                    .unwrap_or((now, 0));
                tracing::warn!(port = self.port, %peer, reason, since_last_line = quiet, "refused a TLS connection");
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    refusals: Refusals,
    accepted: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(port = refusals.port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            refusals.refuse(peer, "too many handshakes in progress");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, refusals, accepted) = (acceptor.clone(), refusals.clone(), accepted.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            drop(permit);
            match handshake {
                Ok(Ok(tls)) => {
                    let _ = accepted.send((tls, peer)).await;
                }
                // A connection closed before its first byte (a port probe: a follower
                // checks whether its leader still listens) is no refusal.
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(port = refusals.port, %peer, "connection closed before its TLS hello");
                }
                Ok(Err(e)) => refusals.refuse(peer, &describe(&e)),
                Err(_) => {
                    let reason = format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                    refusals.refuse(peer, &reason);
                }
            }
        });
    }
}

/// A handshake error in words an operator can act on.
pub fn describe(error: &io::Error) -> String {
    let text = error.to_string();
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        return format!("not TLS (a plaintext client or peer?): {text}");
    }
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        return format!("its certificate was not signed by this cluster's CA: {text}");
    }
    if text.contains("received fatal alert") {
        return format!(
            "the other side refused this node's certificate (one of another CA?): {text}"
        );
    }
    if text.contains("peer sent no certificates") || text.contains("NoCertificatesPresented") {
        return format!("it presented no certificate: {text}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dialed_peers_name_is_the_host_of_its_address() {
        let name = |addr| server_name(addr).map(|n| n.to_str().into_owned());
        assert_eq!(name("127.0.0.1:7000").unwrap(), "127.0.0.1");
        assert_eq!(name("haven-1.haven:7000").unwrap(), "haven-1.haven");
        assert_eq!(name("[::1]:7000").unwrap(), "::1");
        assert!(server_name("bad name:7000").is_err());
    }

    #[test]
    fn missing_and_empty_files_are_named_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let section = TlsSection {
            ca: dir.path().join("missing.pem"),
            cert: empty.clone(),
            key: empty.clone(),
            client: false,
            admin: false,
        };
        let err = Tls::load(&section).err().unwrap().to_string();
        assert!(err.starts_with("tls.ca: cannot read "), "{err}");
        let section = TlsSection {
            ca: empty.clone(),
            ..section
        };
        let err = Tls::load(&section).err().unwrap().to_string();
        assert_eq!(
            err,
            format!(
                "tls.ca: {}: holds no certificate (BEGIN CERTIFICATE)",
                empty.display()
            )
        );
        let err = private_key(&empty).err().unwrap().to_string();
        assert_eq!(
            err,
            format!("tls.key: {}: holds no private key", empty.display())
        );
    }
}
