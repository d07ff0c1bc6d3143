//! Where the node-to-node transport gets its byte streams. Production uses TCP; the
//! deterministic simulation (`haven-sim`) plugs in simulated sockets here, so the same
//! client and server code runs under both.

use std::io;
use std::net::SocketAddr;

use futures::future::BoxFuture;
use haven_base::tls;
use haven_base::tls::PortListener;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Opens a connection to a peer's raft address.
pub trait Dial: Send + Sync + 'static {
    fn dial(&self, addr: &str) -> BoxFuture<'static, io::Result<(Reader, Writer)>>;
}

/// Accepts the connections of peers.
pub trait Accept: Send + 'static {
    fn accept(&mut self) -> impl Future<Output = io::Result<(Reader, Writer, SocketAddr)>> + Send;
}

/// TCP with Nagle off: appends and votes are small and latency-bound.
pub struct Tcp;

impl Dial for Tcp {
    fn dial(&self, addr: &str) -> BoxFuture<'static, io::Result<(Reader, Writer)>> {
        let addr = addr.to_string();
        Box::pin(async move { halves(refuse_self_connection(TcpStream::connect(addr).await?)?) })
    }
}

/// Refuses a connection that reached itself. Dialing a loopback port nobody listens on
/// can be answered by the kernel choosing that very port as the source (TCP simultaneous
/// open): the socket is then connected to itself, and it holds the port, so the peer that
/// owns it cannot listen there when it restarts. Resetting it (linger 0: no FIN, no
/// TIME_WAIT) frees the port at once; the dial counts as failed.
pub fn refuse_self_connection(stream: TcpStream) -> io::Result<TcpStream> {
    let local = stream.local_addr()?;
    if local == stream.peer_addr()? {
        socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO))?;
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("connection to {local} reached itself (no listener there); closed"),
        ));
    }
    Ok(stream)
}

impl Accept for TcpListener {
    async fn accept(&mut self) -> io::Result<(Reader, Writer, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let (reader, writer) = halves(stream)?;
        Ok((reader, writer, peer))
    }
}

/// TCP wrapped in mutual TLS (`[tls]`): the peer's certificate must come from the
/// cluster's CA and name the dialed host; ours goes with the handshake.
pub struct TlsTcp {
    pub connector: TlsConnector,
}

impl Dial for TlsTcp {
    fn dial(&self, addr: &str) -> BoxFuture<'static, io::Result<(Reader, Writer)>> {
        let (connector, addr) = (self.connector.clone(), addr.to_string());
        Box::pin(async move {
            let name = tls::server_name(&addr)?;
            let stream = refuse_self_connection(TcpStream::connect(&addr).await?)?;
            stream.set_nodelay(true)?;
            let handshake =
                tokio::time::timeout(tls::HANDSHAKE_TIMEOUT, connector.connect(name, stream));
            let refused = |reason: String| {
                io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("TLS handshake with {addr}: {reason}"),
                )
            };
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(refused(tls::describe(&e))),
                Err(_) => {
                    return Err(refused(format!(
                        "no answer within {:?}",
                        tls::HANDSHAKE_TIMEOUT
                    )));
                }
            };
            let (reader, writer) = tokio::io::split(stream);
            Ok((Box::new(reader) as Reader, Box::new(writer) as Writer))
        })
    }
}

impl Accept for PortListener {
    async fn accept(&mut self) -> io::Result<(Reader, Writer, SocketAddr)> {
        match self {
            PortListener::Plain(listener) => Accept::accept(listener).await,
            PortListener::Tls(listener) => {
                let (stream, peer) = listener.accept().await?;
                let (reader, writer) = tokio::io::split(stream);
                Ok((Box::new(reader), Box::new(writer), peer))
            }
        }
    }
}

fn halves(stream: TcpStream) -> io::Result<(Reader, Writer)> {
    stream.set_nodelay(true)?;
    let (reader, writer) = stream.into_split();
    Ok((Box::new(reader), Box::new(writer)))
}

#[cfg(test)]
mod tests {
    use socket2::Domain;
    use socket2::Socket;
    use socket2::Type;

    use super::*;

    /// A socket bound to a port and connected to that same port: what the kernel produces
    /// by itself, rarely, when a dial's source port equals its listener-less destination.
    async fn self_connected() -> TcpStream {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.bind(&port.into()).unwrap();
        socket.connect(&port.into()).unwrap();
        socket.set_nonblocking(true).unwrap();
        TcpStream::from_std(socket.into()).unwrap()
    }

    #[tokio::test]
    async fn a_connection_to_itself_is_refused_and_frees_its_port() {
        let stream = self_connected().await;
        let port = stream.local_addr().unwrap();
        assert_eq!(stream.peer_addr().unwrap(), port, "not self-connected");
        let err = refuse_self_connection(stream).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            err.to_string(),
            format!("connection to {port} reached itself (no listener there); closed")
        );
        TcpListener::bind(port)
            .await
            .expect("the port is free again once the connection is refused");
    }

    #[tokio::test]
    async fn a_connection_to_a_listener_is_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        refuse_self_connection(stream).unwrap();
    }
}
