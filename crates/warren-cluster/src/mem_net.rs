//! An in-process network for cluster tests: nodes register their `PeerHandler`, and each node
//! gets a `Transport` that calls the others directly, through filters that cut links
//! (one-way or both ways), isolate nodes, delay calls or drop a seeded share of them.
//!
//! A cut in the reply direction lets the request through and loses the answer, the case that
//! makes forwarded commands ambiguous, so tests exercise it. Used by `tests/cluster.rs`; the
//! real network is `grpc`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use warren_core::NodeId;

use crate::transport::{PeerHandler, PeerRequest, PeerResponse, Transport, TransportError};

#[derive(Default)]
struct Rules {
    /// (from, to): calls from `from` to `to` cannot get through.
    cut: HashSet<(NodeId, NodeId)>,
    delay: Duration,
    /// Drop one call in this many (0: none), chosen by a seeded generator.
    drop_one_in: u64,
    rng: u64,
}

impl Rules {
    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic for a given seed, which is all a test needs.
        let mut x = self.rng.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Default)]
pub struct MemNet {
    nodes: RwLock<HashMap<NodeId, Weak<dyn PeerHandler>>>,
    rules: Mutex<Rules>,
    /// Forwarded command batches (`Submit` calls) under way now, and the most there were at
    /// once: tells a test whether a proposer keeps several on their way.
    submits_in_flight: AtomicUsize,
    most_submits_in_flight: AtomicUsize,
}

/// Counts a `Submit` call as under way until dropped.
struct SubmitUnderWay(Arc<MemNet>);

impl SubmitUnderWay {
    fn start(net: &Arc<MemNet>) -> Self {
        let now = net.submits_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        net.most_submits_in_flight.fetch_max(now, Ordering::SeqCst);
        SubmitUnderWay(net.clone())
    }
}

impl Drop for SubmitUnderWay {
    fn drop(&mut self) {
        self.0.submits_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct MemTransport {
    net: Arc<MemNet>,
    from: NodeId,
}

impl MemNet {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The transport node `from` uses.
    pub fn transport(self: &Arc<Self>, from: NodeId) -> Arc<MemTransport> {
        Arc::new(MemTransport {
            net: self.clone(),
            from,
        })
    }

    pub fn register(&self, node: NodeId, handler: Weak<dyn PeerHandler>) {
        self.nodes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, handler);
    }

    /// The node crashed: calls to it fail as unreachable.
    pub fn unregister(&self, node: NodeId) {
        self.nodes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cuts every link between the two sides, both directions.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut rules = self.rules();
        for x in a {
            for y in b {
                rules.cut.insert((*x, *y));
                rules.cut.insert((*y, *x));
            }
        }
    }

    /// Cuts calls from `from` to `to` only (answers to calls the other way still flow).
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        self.rules().cut.insert((from, to));
    }

    /// Cuts `node` from every other registered node.
    pub fn isolate(&self, node: NodeId) {
        let others: Vec<NodeId> = self
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .filter(|n| *n != node)
            .collect();
        self.partition(&[node], &others);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.rules().delay = delay;
    }

    pub fn drop_one_in(&self, n: u64, seed: u64) {
        let mut rules = self.rules();
        rules.drop_one_in = n;
        rules.rng = seed;
    }

    /// The most forwarded command batches that were under way at once, over every link.
    pub fn most_submits_in_flight(&self) -> usize {
        self.most_submits_in_flight.load(Ordering::SeqCst)
    }

    /// Removes every cut, delay and drop.
    pub fn heal(&self) {
        *self.rules() = Rules::default();
    }
}

impl Transport for MemTransport {
    fn call(
        &self,
        target: NodeId,
        request: PeerRequest,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<PeerResponse, TransportError>> {
        let net = self.net.clone();
        let from = self.from;
        Box::pin(async move {
            let _under_way =
                matches!(request, PeerRequest::Submit { .. }).then(|| SubmitUnderWay::start(&net));
            let (forward_cut, reply_cut, delay, dropped) = {
                let mut rules = net.rules();
                let dropped = rules.drop_one_in > 0 && {
                    let n = rules.drop_one_in;
                    rules.next_random().is_multiple_of(n)
                };
                (
                    rules.cut.contains(&(from, target)),
                    rules.cut.contains(&(target, from)),
                    rules.delay,
                    dropped,
                )
            };
            let unreachable = |reason: &str| TransportError::Unreachable {
                node: target,
                reason: reason.to_owned(),
            };
            if forward_cut {
                return Err(unreachable("link cut"));
            }
            let handler = net
                .nodes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&target)
                .and_then(Weak::upgrade)
                .ok_or(TransportError::Refused { node: target })?;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if dropped {
                tokio::time::sleep(timeout).await;
                return Err(TransportError::Timeout {
                    node: target,
                    after: timeout,
                });
            }
            let response = tokio::time::timeout(timeout, handler.handle(request))
                .await
                .map_err(|_| TransportError::Timeout {
                    node: target,
                    after: timeout,
                })?;
            if reply_cut {
                // Processed, but the answer is lost on the way back.
                return Err(TransportError::Timeout {
                    node: target,
                    after: timeout,
                });
            }
            Ok(response)
        })
    }

    fn set_address(&self, _node: NodeId, _address: &str) {}
}
