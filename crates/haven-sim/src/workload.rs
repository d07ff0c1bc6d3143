//! Simulated clients. They speak Haven's own node-to-node protocol to the nodes: a write
//! is the `Forward` a follower sends the leader, a read is a `ReadIndex`. Each records what
//! it was told, for the checks.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use haven_consensus::link::Lane;
use haven_consensus::link::Transport;
use haven_consensus::wire::ForwardOutcome;
use haven_consensus::wire::ReadIndexOutcome;
use haven_consensus::wire::RpcReply;
use haven_consensus::wire::RpcRequest;
use haven_contract::NodeId;
use haven_contract::OrderedRequest;
use haven_contract::RequestTag;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::check::Ack;
use crate::check::Checker;
use crate::check::ReadGrant;
use crate::lock;
use crate::net::RAFT_PORT;
use crate::net::sim_transport;

/// How long a client waits for an answer before it counts the outcome as unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// After the heal, a write must succeed within this time (liveness).
pub const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);

pub fn host_name(node: NodeId) -> String {
    format!("node{node}")
}

/// One client's connection to the cluster and what it knows about the leader.
struct Session {
    id: u64,
    nodes: u64,
    transport: Transport,
    leader: Option<NodeId>,
    next_seq: u64,
    rng: StdRng,
    checker: Arc<Mutex<Checker>>,
}

impl Session {
    fn new(id: u64, nodes: u64, seed: u64, checker: Arc<Mutex<Checker>>) -> Self {
        Self {
            id,
            nodes,
            transport: sim_transport().expect("metric names are unique"),
            leader: None,
            next_seq: 0,
            rng: StdRng::seed_from_u64(seed),
            checker,
        }
    }

    async fn call(&mut self, request: RpcRequest) -> Option<RpcReply> {
        let target = match self.leader {
            Some(leader) => leader,
            None => self.rng.random_range(1..=self.nodes),
        };
        let addr = format!("{}:{RAFT_PORT}", host_name(target));
        let link = self.transport.link(&addr, Lane::Client);
        let reply = link.call(&request, OP_TIMEOUT).await.ok();
        if reply.is_none() {
            self.leader = None;
        }
        reply
    }

    /// Proposes one write; true if it was acknowledged.
    async fn write(&mut self) -> bool {
        self.next_seq += 1;
        let tag = RequestTag {
            origin: 1000 + self.id,
            seq: self.next_seq,
        };
        let request = OrderedRequest {
            tag,
            method: "POST".to_string(),
            uri: "/".to_string(),
            headers: Vec::new(),
            body: Bytes::from(format!("client {} write {}", self.id, self.next_seq)),
            idempotency_key: None,
            time_unix_us: 0,
            seed: 0,
        };
        match self.call(RpcRequest::Forward(request)).await {
            Some(RpcReply::Forward(ForwardOutcome::Committed { index })) => {
                let at = turmoil::elapsed();
                lock(&self.checker).observe_ack(Ack { tag, index, at });
                true
            }
            Some(RpcReply::Forward(ForwardOutcome::NotLeader { leader })) => {
                self.leader = leader;
                false
            }
            _ => {
                lock(&self.checker).unknown_writes += 1;
                self.leader = None;
                false
            }
        }
    }

    async fn read(&mut self) {
        let invoked = turmoil::elapsed();
        match self.call(RpcRequest::ReadIndex).await {
            Some(RpcReply::ReadIndex(ReadIndexOutcome::Ready { index })) => {
                lock(&self.checker).observe_read(ReadGrant { invoked, index });
            }
            Some(RpcReply::ReadIndex(ReadIndexOutcome::NotLeader { leader })) => {
                self.leader = leader;
            }
            _ => self.leader = None,
        }
    }
}

/// Writes and reads at random until `until` (simulated time).
pub async fn client(
    id: u64,
    nodes: u64,
    seed: u64,
    until: Duration,
    checker: Arc<Mutex<Checker>>,
) -> turmoil::Result {
    let mut session = Session::new(id, nodes, seed, checker);
    while turmoil::elapsed() < until {
        if session.rng.random_bool(0.7) {
            session.write().await;
        } else {
            session.read().await;
        }
        let pause = session.rng.random_range(2..30);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    Ok(())
}

/// After the heal at `healed`, writes until one is acknowledged; the cluster must accept
/// writes again within [`RECOVERY_DEADLINE`].
pub async fn prober(
    nodes: u64,
    seed: u64,
    healed: Duration,
    checker: Arc<Mutex<Checker>>,
) -> turmoil::Result {
    tokio::time::sleep(healed.saturating_sub(turmoil::elapsed())).await;
    let mut session = Session::new(0, nodes, seed, checker.clone());
    while !session.write().await {
        if turmoil::elapsed() > healed + RECOVERY_DEADLINE {
            let mut checker = lock(&checker);
            let message =
                format!("liveness: no write acknowledged within {RECOVERY_DEADLINE:?} of healing");
            checker.violations.push(message);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
