//! Simulated sockets for Haven's transport: turmoil's TCP, which delivers, delays, holds or
//! drops segments as the fault schedule says, all on simulated time.

use std::io;
use std::net::SocketAddr;

use futures::future::BoxFuture;
use haven_base::metrics::Metrics;
use haven_base::metrics::MetricsError;
use haven_consensus::link::Transport;
use haven_consensus::net::Accept;
use haven_consensus::net::Dial;
use haven_consensus::net::Reader;
use haven_consensus::net::Writer;
use haven_consensus::wire::Hello;

/// Port every simulated node listens on for raft traffic.
pub const RAFT_PORT: u16 = 7000;

/// The cluster and service every simulated node and client speaks for.
pub const SIM_CLUSTER: &str = "sim";
pub const SIM_SERVICE: &str = "app";

/// Peer links over simulated TCP, for the simulated service.
pub fn sim_transport() -> Result<Transport, MetricsError> {
    let hello = Hello {
        cluster: SIM_CLUSTER.to_string(),
        service: SIM_SERVICE.to_string(),
        node: 0,
        settings: Vec::new(),
    };
    Ok(Transport::with_dialer(
        std::sync::Arc::new(SimDial),
        Metrics::new()?.node.peers,
        hello,
    ))
}

pub struct SimDial;

impl Dial for SimDial {
    fn dial(&self, addr: &str) -> BoxFuture<'static, io::Result<(Reader, Writer)>> {
        let addr = addr.to_string();
        tracing::debug!(%addr, "dial");
        Box::pin(async move {
            let (reader, writer) = turmoil::net::TcpStream::connect(addr).await?.into_split();
            Ok((Box::new(reader) as Reader, Box::new(writer) as Writer))
        })
    }
}

pub struct SimListener(pub turmoil::net::TcpListener);

impl SimListener {
    pub async fn bind() -> io::Result<Self> {
        Ok(Self(
            turmoil::net::TcpListener::bind(("0.0.0.0", RAFT_PORT)).await?,
        ))
    }
}

impl Accept for SimListener {
    async fn accept(&mut self) -> io::Result<(Reader, Writer, SocketAddr)> {
        let (stream, peer) = self.0.accept().await?;
        let (reader, writer) = stream.into_split();
        Ok((Box::new(reader), Box::new(writer), peer))
    }
}
