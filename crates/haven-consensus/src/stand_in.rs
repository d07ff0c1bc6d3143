//! A peer answers for a node whose replica is paused. While a checkpoint copies a large
//! state, a node's replica takes no entries for hundreds of milliseconds, and a node
//! answers its clients only once its own replica applied their entries. So during the
//! copy the node passes each client request to a peer over the client lane
//! (`RpcRequest::StandIn`), and the peer serves it as it would serve its own client: it
//! orders the request and answers with its own replica's response, identical by
//! construction to the one the paused replica would give. A request a peer serves this
//! way is never passed on again.

use std::sync::Arc;
use std::sync::OnceLock;

use futures::future::BoxFuture;

use haven_contract::AppResponse;
use haven_contract::OrderedRequest;

/// The serving side: a service's client ingress.
pub trait StandIn: Send + Sync + 'static {
    /// Serves a request another node received from its client, as this node serves its
    /// own clients' requests (Haven's own errors included), without passing it on.
    fn serve_for_peer(self: Arc<Self>, request: OrderedRequest) -> BoxFuture<'static, AppResponse>;
}

/// Where a service's ingress is put once it exists: its raft group is registered first.
#[derive(Clone, Default)]
pub struct StandInSlot(Arc<OnceLock<Arc<dyn StandIn>>>);

impl StandInSlot {
    /// Fills the slot; a second call keeps the first (a service has one ingress).
    pub fn set(&self, stand_in: Arc<dyn StandIn>) {
        let _ = self.0.set(stand_in);
    }

    /// The peer's answer, or `None` when this node cannot serve the request (the
    /// service's ingress is not up yet): the asker then waits for its own replica.
    pub async fn serve(&self, request: OrderedRequest) -> Option<AppResponse> {
        let stand_in = self.0.get()?.clone();
        Some(stand_in.serve_for_peer(request).await)
    }
}
