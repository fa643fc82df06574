//! Deliveries and consumer removals for consumers attached on other nodes: one ordered
//! outbox per peer, drained by a task that sends batches over the transport.
//!
//! A queue's serving node puts items here from state-machine apply (`QueueHandle::run_effects`),
//! so sending never blocks apply. Items for a peer stay in order; a batch that fails is
//! retried until the peer answers or is declared down. Then its deliveries are dropped (the
//! queue's node-down command returns those messages to the queue anyway), but not its
//! consumer removals: a peer declared down may only be cut off from this node, and a consumer
//! there that is never told it is gone waits for deliveries forever. Those are sent once the
//! peer answers again, and dropped only when it leaves the cluster. The receiving side is
//! `Node::handle_deliver`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::debug;
use warren_core::{ConsumerKey, MessageContent, MsgId, NodeId};

use crate::db::encode;
use crate::transport::{PeerRequest, PeerResponse, Transport};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RemoteItem {
    Deliver {
        queue: u64,
        consumer: ConsumerKey,
        msg: MsgId,
        delivery_count: u32,
        no_ack: bool,
        resend: bool,
        content: MessageContent,
    },
    ConsumerGone {
        queue: u64,
        consumer: ConsumerKey,
    },
}

/// The node's view of which peers are down, shared with the failure detector.
pub trait Liveness: Send + Sync {
    fn is_down(&self, node: NodeId) -> bool;
    /// Whether `node` is no longer a member of the cluster: nothing will ever reach it.
    fn has_left(&self, node: NodeId) -> bool;
}

const BATCH: usize = 512;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Outbox {
    /// This node, named in every batch so the receiver knows whose deliveries they are.
    node: NodeId,
    transport: Arc<dyn Transport>,
    liveness: RwLock<Option<Arc<dyn Liveness>>>,
    peers: Mutex<HashMap<NodeId, mpsc::UnboundedSender<RemoteItem>>>,
}

impl Outbox {
    pub fn new(node: NodeId, transport: Arc<dyn Transport>) -> Arc<Self> {
        Arc::new(Outbox {
            node,
            transport,
            liveness: RwLock::new(None),
            peers: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn set_liveness(&self, liveness: Arc<dyn Liveness>) {
        *self.liveness.write().unwrap_or_else(|p| p.into_inner()) = Some(liveness);
    }

    /// The failure detector's view, once the node has set it.
    fn liveness(&self) -> Option<Arc<dyn Liveness>> {
        self.liveness
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn send(self: &Arc<Self>, node: NodeId, item: RemoteItem) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let tx = peers.entry(node).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(drain(Arc::downgrade(self), node, rx));
            tx
        });
        let _ = tx.send(item);
    }
}

async fn drain(
    outbox: std::sync::Weak<Outbox>,
    node: NodeId,
    mut rx: mpsc::UnboundedReceiver<RemoteItem>,
) {
    let mut backoff = Duration::from_millis(20);
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        while items.len() < BATCH {
            match rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        loop {
            let Some(outbox) = outbox.upgrade() else {
                return;
            };
            // Encoded for each attempt rather than encoded once and copied for each: the
            // first attempt, nearly always the only one, then copies no body.
            let encoded: Vec<Vec<u8>> = items.iter().filter_map(|i| encode(i).ok()).collect();
            let call = outbox.transport.call(
                node,
                PeerRequest::Deliver {
                    from: outbox.node,
                    items: encoded,
                },
                CALL_TIMEOUT,
            );
            match call.await {
                Ok(PeerResponse::Delivered) => {
                    backoff = Duration::from_millis(20);
                    break;
                }
                result => {
                    let liveness = outbox.liveness();
                    if liveness.as_ref().is_some_and(|l| l.has_left(node)) {
                        debug!(
                            node,
                            items = items.len(),
                            "dropping items for a former member"
                        );
                        break;
                    }
                    if liveness.as_ref().is_some_and(|l| l.is_down(node)) {
                        let before = items.len();
                        items.retain(|i| matches!(i, RemoteItem::ConsumerGone { .. }));
                        if before != items.len() {
                            debug!(
                                node,
                                dropped = before - items.len(),
                                "dropping deliveries for a down node"
                            );
                        }
                        if items.is_empty() {
                            break;
                        }
                    }
                    debug!(node, ?result, "delivery batch failed; retrying");
                    drop((outbox, liveness));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}
