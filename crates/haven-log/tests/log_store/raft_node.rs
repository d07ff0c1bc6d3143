//! A real single-node openraft instance on `LogStore`: writes, restart, re-apply.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use haven_log::LogOptions;
use openraft::BasicNode;
use openraft::Config;
use openraft::OptionalSend;
use openraft::Raft;
use openraft::error::RPCError;
use openraft::error::ReplicationClosed;
use openraft::error::StreamingError;
use openraft::error::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkFactory;
use openraft::network::v2::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;
use openraft::type_config::alias::SnapshotOf;
use openraft::type_config::alias::VoteOf;

use crate::common::*;
use crate::conformance::MemSm;

/// A single node never talks to peers; every RPC reports the peer unreachable.
struct NoNetwork;

impl RaftNetworkFactory<C> for NoNetwork {
    type Network = NoNetwork;

    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> Self::Network {
        NoNetwork
    }
}

fn unreachable() -> Unreachable<C> {
    Unreachable::from_string("single-node test has no network")
}

impl RaftNetworkV2<C> for NoNetwork {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<C>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<C>,
        _option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: VoteOf<C>,
        _snapshot: SnapshotOf<C, Vec<u8>>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        Err(StreamingError::Unreachable(unreachable()))
    }
}

fn config() -> Arc<Config> {
    let c = Config {
        heartbeat_interval: 50,
        election_timeout_min: 150,
        election_timeout_max: 300,
        ..Default::default()
    };
    Arc::new(c.validate().unwrap())
}

async fn start(store: Store) -> Raft<C, MemSm> {
    Raft::new(1, config(), NoNetwork, store, MemSm::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_raft_writes_restarts_and_reapplies() {
    let dir = tempdir();
    let store = open(dir.path(), LogOptions::default());
    let raft = start(store.clone()).await;
    raft.initialize(BTreeMap::from([(1u64, BasicNode::default())]))
        .await
        .unwrap();
    raft.wait(Some(Duration::from_secs(5)))
        .current_leader(1, "elected")
        .await
        .unwrap();

    let before = store.stats();
    let writes = (0..100).map(|i| raft.client_write(format!("w{i}")));
    let responses = futures::future::join_all(writes).await;
    let last = responses
        .into_iter()
        .map(|r| r.unwrap().log_id.index())
        .max()
        .unwrap();
    let after = store.stats();
    let fsyncs = after.fsyncs - before.fsyncs;
    assert!(
        fsyncs < 50,
        "100 concurrent client writes cost {fsyncs} fsyncs"
    );

    raft.shutdown().await.unwrap();
    drop(raft);
    drop(store);

    let mut store = open(dir.path(), LogOptions::default());
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|l| l.index()), Some(last));
    assert!(store.read_vote().await.unwrap().is_some());
    assert_eq!(
        store.try_get_log_entries(..).await.unwrap().len() as u64,
        last + 1
    );

    let raft = start(store.clone()).await;
    raft.wait(Some(Duration::from_secs(5)))
        .applied_index_at_least(Some(last), "re-applied")
        .await
        .unwrap();
    raft.wait(Some(Duration::from_secs(5)))
        .current_leader(1, "re-elected")
        .await
        .unwrap();
    let r = raft
        .client_write("after restart".to_string())
        .await
        .unwrap();
    assert!(r.log_id.index() > last);
    raft.shutdown().await.unwrap();
}
