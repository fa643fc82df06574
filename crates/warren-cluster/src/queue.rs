//! A queue as the rest of the node sees it: a `QueueHandle` that takes commands in order and
//! reports their results, plus the consumers attached to it on this node.
//!
//! Two back ends sit behind the same handle. A replicated queue sends its commands through a
//! proposer task into its Raft group; the group's state machine (`queue_sm`) applies them and
//! calls back into the handle to deliver messages. A transient or exclusive queue applies the
//! same pure `QueueState` directly, in memory. The server's connections only ever see the
//! handle, the `DeliverySink` they attach and the `Completion` they pass with a command.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot};
use tracing::warn;
use warren_core::meta::QueueDef;
use warren_core::queue::{Effect, QueueCmd, QueueReply, QueueState, QueueStats};
use warren_core::{ConsumerKey, MessageContent, MsgId};

use crate::types::{QueueOutcome, QueueRequest};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("queue '{0}' was deleted")]
    QueueGone(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("the node is shutting down")]
    ShuttingDown,
}

/// A message on its way to a consumer on this node.
pub struct Delivery {
    pub handle: Arc<QueueHandle>,
    pub consumer: ConsumerKey,
    pub msg: MsgId,
    pub delivery_count: u32,
    pub no_ack: bool,
    pub content: MessageContent,
}

/// Where a queue sends what concerns a consumer: implemented by the connection that owns it.
/// Both methods must return quickly and never block (they run inside state-machine apply).
pub trait DeliverySink: Send + Sync {
    fn deliver(&self, delivery: Delivery);
    /// The queue went away (deleted); the consumer no longer exists.
    fn consumer_gone(&self, consumer: &ConsumerKey);
}

/// Receives the result of a submitted command, tagged with the caller's token.
pub trait Completion: Send + Sync {
    fn complete(&self, token: u64, result: Result<QueueOutcome, ClusterError>);
}

pub enum ReplyTo {
    None,
    Oneshot(oneshot::Sender<Result<QueueOutcome, ClusterError>>),
    Sink(Arc<dyn Completion>, u64),
}

impl ReplyTo {
    pub fn send(self, result: Result<QueueOutcome, ClusterError>) {
        match self {
            ReplyTo::None => {}
            ReplyTo::Oneshot(tx) => {
                let _ = tx.send(result);
            }
            ReplyTo::Sink(sink, token) => sink.complete(token, result),
        }
    }
}

/// Where a queue's message bodies live: memory for local queues, RocksDB for replicated ones.
pub(crate) trait Bodies {
    fn get(&mut self, msg: MsgId) -> Option<MessageContent>;
    fn release(&mut self, msgs: &[MsgId]);
}

impl Bodies for HashMap<MsgId, MessageContent> {
    fn get(&mut self, msg: MsgId) -> Option<MessageContent> {
        HashMap::get(self, &msg).cloned()
    }

    fn release(&mut self, msgs: &[MsgId]) {
        for m in msgs {
            self.remove(m);
        }
    }
}

pub(crate) type Submission = (QueueRequest, ReplyTo);

pub(crate) enum Backend {
    Raft {
        tx: mpsc::UnboundedSender<Submission>,
    },
    Local(Mutex<LocalQueue>),
}

pub(crate) struct LocalQueue {
    state: QueueState,
    bodies: HashMap<MsgId, MessageContent>,
}

/// Called when an auto-delete queue loses its last consumer.
pub(crate) type UnusedHook = Arc<dyn Fn(&QueueHandle) + Send + Sync>;

pub struct QueueHandle {
    id: u64,
    vhost: String,
    def: QueueDef,
    backend: Backend,
    consumers: Mutex<HashMap<ConsumerKey, Arc<dyn DeliverySink>>>,
    stats: Mutex<QueueStats>,
    /// Only the group's leader delivers; replicas apply the same effects silently.
    leader: AtomicBool,
    closed: AtomicBool,
    on_unused: Option<UnusedHook>,
    self_ref: OnceLock<std::sync::Weak<QueueHandle>>,
}

static NEXT_HANDLE_ID: AtomicU64 = AtomicU64::new(1);

impl QueueHandle {
    pub(crate) fn new(
        vhost: String,
        def: QueueDef,
        backend: Backend,
        on_unused: Option<UnusedHook>,
    ) -> Arc<Self> {
        let local = matches!(backend, Backend::Local(_));
        let handle = Arc::new(QueueHandle {
            id: NEXT_HANDLE_ID.fetch_add(1, Ordering::Relaxed),
            vhost,
            def,
            backend,
            consumers: Mutex::new(HashMap::new()),
            stats: Mutex::new(QueueStats::default()),
            leader: AtomicBool::new(local),
            closed: AtomicBool::new(false),
            on_unused,
            self_ref: OnceLock::new(),
        });
        let _ = handle.self_ref.set(Arc::downgrade(&handle));
        handle
    }

    pub(crate) fn new_local(
        vhost: String,
        def: QueueDef,
        on_unused: Option<UnusedHook>,
    ) -> Arc<Self> {
        Self::new(
            vhost,
            def,
            Backend::Local(Mutex::new(LocalQueue {
                state: QueueState::new(),
                bodies: HashMap::new(),
            })),
            on_unused,
        )
    }

    /// Unique per handle, for grouping settlements by queue.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn def(&self) -> &QueueDef {
        &self.def
    }

    pub fn stats(&self) -> QueueStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_replicated(&self) -> bool {
        matches!(self.backend, Backend::Raft { .. })
    }

    pub(crate) fn set_stats(&self, stats: QueueStats) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Release);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    /// Registers where deliveries for `consumer` go. Attach before the consume command is
    /// submitted: the first delivery can follow the command's commit immediately.
    pub fn attach(&self, consumer: ConsumerKey, sink: Arc<dyn DeliverySink>) {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(consumer, sink);
    }

    pub fn detach(&self, consumer: &ConsumerKey) {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(consumer);
    }

    fn sink_of(&self, consumer: &ConsumerKey) -> Option<Arc<dyn DeliverySink>> {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(consumer)
            .cloned()
    }

    fn arc(&self) -> Option<Arc<QueueHandle>> {
        self.self_ref.get().and_then(std::sync::Weak::upgrade)
    }

    /// Submits a command; commands submitted from one task are applied in submission order.
    pub fn submit(&self, request: QueueRequest, reply: ReplyTo) {
        if self.closed.load(Ordering::Acquire) {
            reply.send(Err(ClusterError::QueueGone(self.def.name.clone())));
            return;
        }
        match &self.backend {
            Backend::Raft { tx } => {
                if let Err(mpsc::error::SendError((_, reply))) = tx.send((request, reply)) {
                    reply.send(Err(ClusterError::QueueGone(self.def.name.clone())));
                }
            }
            Backend::Local(local) => {
                let mut local = local.lock().unwrap_or_else(|p| p.into_inner());
                let outcome = self.apply_local(&mut local, request);
                drop(local);
                reply.send(Ok(outcome));
            }
        }
    }

    /// Submits and waits for the result.
    pub async fn call(
        &self,
        cmd: QueueCmd,
        content: Option<MessageContent>,
    ) -> Result<QueueOutcome, ClusterError> {
        let (tx, rx) = oneshot::channel();
        self.submit(QueueRequest { cmd, content }, ReplyTo::Oneshot(tx));
        rx.await
            .unwrap_or_else(|_| Err(ClusterError::QueueGone(self.def.name.clone())))
    }

    fn apply_local(&self, local: &mut LocalQueue, request: QueueRequest) -> QueueOutcome {
        let QueueRequest { cmd, content } = request;
        let (reply, effects) = local.state.apply(cmd);
        if let (QueueReply::Enqueued { msg }, Some(content)) = (&reply, content) {
            local.bodies.insert(*msg, content);
        }
        let get_content = match &reply {
            QueueReply::GetOk { msg, .. } => local.bodies.get(msg).cloned(),
            _ => None,
        };
        self.run_effects(effects, &mut local.bodies);
        self.set_stats(local.state.stats());
        QueueOutcome {
            reply,
            content: get_content,
        }
    }

    /// Carries out a command's effects: deliveries (on the leader), body releases and the
    /// auto-delete trigger.
    pub(crate) fn run_effects(&self, effects: Vec<Effect>, bodies: &mut dyn Bodies) {
        let leader = self.is_leader();
        for effect in effects {
            match effect {
                Effect::Deliver {
                    consumer,
                    msg,
                    delivery_count,
                    no_ack,
                } => {
                    if !leader {
                        continue;
                    }
                    let Some(sink) = self.sink_of(&consumer) else {
                        // A consumer of a connection that is gone; its channel-down command
                        // (or the node-restart command) returns the message.
                        continue;
                    };
                    let (Some(content), Some(handle)) = (bodies.get(msg), self.arc()) else {
                        warn!(queue = %self.def.name, msg, "no body for a delivery");
                        continue;
                    };
                    sink.deliver(Delivery {
                        handle,
                        consumer,
                        msg,
                        delivery_count,
                        no_ack,
                        content,
                    });
                }
                Effect::Release { msgs } => bodies.release(&msgs),
                Effect::LastConsumerGone => {
                    if leader
                        && self.def.auto_delete
                        && let Some(hook) = &self.on_unused
                    {
                        hook(self);
                    }
                }
            }
        }
    }

    /// The queue was deleted: refuse further commands and tell every consumer.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let consumers: Vec<(ConsumerKey, Arc<dyn DeliverySink>)> = self
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (key, sink) in consumers {
            sink.consumer_gone(&key);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
