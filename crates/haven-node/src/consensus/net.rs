//! Where the node-to-node transport gets its byte streams. Production uses TCP; the
//! deterministic simulation (`haven-sim`) plugs in simulated sockets here, so the same
//! client and server code runs under both.

use std::io;
use std::net::SocketAddr;

use futures::future::BoxFuture;
use tokio::io::AsyncRead;
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::net::TcpStream;

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
        Box::pin(async move { halves(TcpStream::connect(addr).await?) })
    }
}

impl Accept for TcpListener {
    async fn accept(&mut self) -> io::Result<(Reader, Writer, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let (reader, writer) = halves(stream)?;
        Ok((reader, writer, peer))
    }
}

fn halves(stream: TcpStream) -> io::Result<(Reader, Writer)> {
    stream.set_nodelay(true)?;
    let (reader, writer) = stream.into_split();
    Ok((Box::new(reader), Box::new(writer)))
}
