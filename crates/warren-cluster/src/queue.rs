//! A queue as the rest of the node sees it: a `QueueHandle` that takes commands in order and
//! reports their results, plus the consumers attached to it on this node.
//!
//! Every node has a handle for every queue of the cluster. Behind it is either the queue
//! itself, in memory (a transient or exclusive queue declared on this node), or a proposer
//! (`proposer`) that gets commands to wherever the queue is served: this node's Raft group if
//! it leads, the leading node otherwise. The Raft state machine (`queue_sm`) calls back into
//! the handle to carry out effects: deliveries to consumers on this node, or through the
//! node's outbox (`outbox`) to consumers on other nodes. The server's connections only ever
//! see the handle, the `DeliverySink` they attach and the `Completion` they pass with a
//! command.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::{mpsc, oneshot};
use tracing::warn;
use warren_codec::FieldTable;
use warren_core::meta::{Placement, QueueDef};
use warren_core::queue::{
    DeadLetterReason, Effect, PendingTx, QueueCmd, QueueConfig, QueueReply, QueueState, QueueStats,
};
use warren_core::{ConsumerKey, MessageContent, MsgId, NodeId};

use crate::outbox::{Outbox, RemoteItem};
use crate::queue_sm::QueueMachine;
use crate::types::{QueueOutcome, QueueRequest, Raft, now_ms};

/// How long a page-in that has not applied is left alone before it is asked for again.
const PAGE_IN_RETRY: std::time::Duration = std::time::Duration::from_secs(3);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("queue '{0}' was deleted")]
    QueueGone(String),
    #[error("queue '{0}' is unavailable: its node is down")]
    QueueUnavailable(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("no leader for the metadata group yet")]
    NoMetaLeader,
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
    /// A repeat after a leader change; the connection drops it if it has it already.
    pub resend: bool,
    pub content: MessageContent,
}

/// Where a queue sends what concerns a consumer: implemented by the connection that owns it.
/// Both methods must return quickly and never block (they run inside state-machine apply).
pub trait DeliverySink: Send + Sync {
    fn deliver(&self, delivery: Delivery);
    /// The consumer no longer exists in the queue (queue deleted, or its node was declared
    /// down while the connection lived on).
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

pub(crate) type Submission = (QueueRequest, ReplyTo);

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

pub(crate) enum Backend {
    /// Commands go through the proposer task.
    Proposer {
        tx: mpsc::UnboundedSender<Submission>,
    },
    /// A transient or exclusive queue of this node, applied in place.
    Local(Box<Mutex<LocalQueue>>),
}

pub(crate) struct LocalQueue {
    state: QueueState,
    bodies: HashMap<MsgId, MessageContent>,
}

/// Called when an auto-delete queue loses its last consumer.
pub(crate) type UnusedHook = Arc<dyn Fn(&QueueHandle) + Send + Sync>;

/// A message the queue's leader must publish to the queue's dead-letter exchange; once every
/// target queue has it, the source commits `DeadLettered`.
pub(crate) struct DeadLetter {
    pub source: Arc<QueueHandle>,
    pub msg: MsgId,
    pub reason: DeadLetterReason,
    pub seq: u64,
    pub content: MessageContent,
}

/// Hands dead-letters to the node, which can route them; must not block.
pub(crate) type DeadLetterHook = Arc<dyn Fn(DeadLetter) + Send + Sync>;

/// A queue's behaviours from its declaration arguments, which were validated at declare.
fn config_of(def: &QueueDef) -> QueueConfig {
    QueueConfig::from_arguments(&def.arguments).unwrap_or_default()
}

/// Messages that went through one node's clients for a queue (publishes from them,
/// deliveries and gets to them, their acks), counted by the AMQP server for the management
/// API's message rates; the whole queue's figures are the sum over nodes.
#[derive(Debug, Default)]
pub struct Traffic {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
}

impl Traffic {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// (published, delivered, acked) now.
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.published.load(Ordering::Relaxed),
            self.delivered.load(Ordering::Relaxed),
            self.acked.load(Ordering::Relaxed),
        )
    }
}

pub struct QueueHandle {
    node: NodeId,
    /// Counted by the AMQP server on the hot path, hence atomics outside every lock.
    pub traffic: Traffic,
    /// The queue's id (its Raft group), which never changes: read on every delivery and by
    /// every supervisor round, so kept out of the lock around `def`.
    id: u64,
    vhost: String,
    def: Mutex<QueueDef>,
    backend: Backend,
    consumers: Mutex<HashMap<ConsumerKey, Arc<dyn DeliverySink>>>,
    stats: Mutex<QueueStats>,
    pending_txs: Mutex<Vec<PendingTx>>,
    /// The page-in last asked for per priority level, and when (see `should_page_in`).
    page_ins_asked: Mutex<HashMap<u8, (u64, std::time::Instant)>>,
    /// Only the serving node delivers; replicas apply the same effects silently.
    leader: AtomicBool,
    /// The node believed to serve the queue, for forwarding (0: unknown).
    leader_hint: AtomicU64,
    closed: AtomicBool,
    on_unused: Option<UnusedHook>,
    outbox: Arc<Outbox>,
    raft: Mutex<Option<Raft<QueueMachine>>>,
    /// The group is new (this node learnt of the queue from its declaration, not from a
    /// replica change): one of its first replicas may create it. A replica added later never
    /// does; it waits for the leader's log.
    may_initialize: AtomicBool,
    self_ref: OnceLock<Weak<QueueHandle>>,
    on_dead_letter: OnceLock<DeadLetterHook>,
    /// The arguments in force when a policy applies (the queue's own over the policy's),
    /// with the metadata's policy version they were decided at; None: only the queue's own.
    policy_arguments: Mutex<Option<(FieldTable, u64)>>,
    /// See `set_leader_term`.
    leader_term: AtomicU64,
    /// See `set_recovered_term`.
    recovered_term: AtomicU64,
    /// When the armed expiry timer fires (ms since the epoch; 0: none armed).
    timer_at: AtomicU64,
    /// When this replica last refused a candidate whose log is behind its own (see
    /// `supervisor`: it then stands without waiting its turn).
    refused_a_candidate_behind: Mutex<Option<std::time::Instant>>,
}

impl QueueHandle {
    pub(crate) fn new(
        node: NodeId,
        vhost: String,
        def: QueueDef,
        backend: Backend,
        on_unused: Option<UnusedHook>,
        outbox: Arc<Outbox>,
    ) -> Arc<Self> {
        let local = matches!(backend, Backend::Local(_));
        let hint = match &def.placement {
            Placement::Replicated { replicas, .. } => replicas.first().copied().unwrap_or(0),
            Placement::Local { run } => run.node,
        };
        let handle = Arc::new(QueueHandle {
            node,
            traffic: Traffic::default(),
            id: def.id,
            vhost,
            def: Mutex::new(def),
            backend,
            consumers: Mutex::new(HashMap::new()),
            stats: Mutex::new(QueueStats::default()),
            pending_txs: Mutex::new(Vec::new()),
            page_ins_asked: Mutex::new(HashMap::new()),
            leader: AtomicBool::new(local),
            leader_hint: AtomicU64::new(hint),
            closed: AtomicBool::new(false),
            on_unused,
            outbox,
            raft: Mutex::new(None),
            may_initialize: AtomicBool::new(false),
            self_ref: OnceLock::new(),
            on_dead_letter: OnceLock::new(),
            policy_arguments: Mutex::new(None),
            leader_term: AtomicU64::new(0),
            recovered_term: AtomicU64::new(0),
            timer_at: AtomicU64::new(0),
            refused_a_candidate_behind: Mutex::new(None),
        });
        let _ = handle.self_ref.set(Arc::downgrade(&handle));
        handle
    }

    pub(crate) fn new_local(
        node: NodeId,
        vhost: String,
        def: QueueDef,
        on_unused: Option<UnusedHook>,
        outbox: Arc<Outbox>,
    ) -> Arc<Self> {
        let config = config_of(&def);
        Self::new(
            node,
            vhost,
            def,
            Backend::Local(Box::new(Mutex::new(LocalQueue {
                state: QueueState::with_config(config),
                bodies: HashMap::new(),
            }))),
            on_unused,
            outbox,
        )
    }

    pub(crate) fn set_dead_letter_hook(&self, hook: DeadLetterHook) {
        let _ = self.on_dead_letter.set(hook);
    }

    /// Commits a `Tick` at `at` (ms since the epoch), when the message at the head expires.
    /// One timer is armed at a time, the earliest asked for; every command's effects ask again
    /// for the then earliest expiry, so a timer that fires early or late is corrected.
    fn arm_timer(&self, at: u64) {
        let armed = self.timer_at.load(Ordering::Acquire);
        if armed != 0 && armed <= at {
            return;
        }
        if self
            .timer_at
            .compare_exchange(armed, at, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let Some(handle) = self.arc() else { return };
        let weak = Arc::downgrade(&handle);
        drop(handle);
        tokio::spawn(async move {
            let wait = at.saturating_sub(now_ms());
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            let Some(h) = weak.upgrade() else { return };
            // A later, earlier timer may have replaced this one; it then does the work.
            if h.timer_at
                .compare_exchange(at, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
                && !h.is_closed()
            {
                h.submit(QueueRequest::new(QueueCmd::Tick), ReplyTo::None);
            }
        });
    }

    /// The arguments in force: the queue's own, over its policy's if one applies.
    pub fn arguments(&self) -> FieldTable {
        let policy = self
            .policy_arguments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        policy.map_or_else(|| self.def().arguments, |(arguments, _)| arguments)
    }

    /// A policy changed what is in force: remembered for the dead-letter service and for
    /// the next leader, and applied now by the leader through the queue's log (replicas
    /// take behaviours from the log only, so they all agree).
    pub(crate) fn set_policy_arguments(&self, arguments: FieldTable, version: u64) {
        {
            let mut current = self
                .policy_arguments
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if current.as_ref().is_some_and(|(_, v)| *v > version) {
                return;
            }
            *current = Some((arguments, version));
        }
        if self.is_leader() {
            self.submit(QueueRequest::new(self.configure_cmd()), ReplyTo::None);
        }
    }

    /// The command that puts the behaviours in force, policy included, under the policy
    /// version they come from (the queue ignores one older than what it has).
    pub(crate) fn configure_cmd(&self) -> QueueCmd {
        let version = self
            .policy_arguments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |(_, v)| *v);
        QueueCmd::Configure {
            config: QueueConfig::from_arguments(&self.arguments()).unwrap_or_default(),
            version,
        }
    }

    /// Whether a policy ever applied to this queue (its leader then re-applies it on taking
    /// over, in case the previous leader died before committing it).
    pub(crate) fn has_policy(&self) -> bool {
        self.policy_arguments
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The queue's behaviours, from its declaration arguments.
    pub fn config(&self) -> QueueConfig {
        config_of(&self.def.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The queue's cluster-wide id (its Raft group for a replicated queue).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn name(&self) -> String {
        self.def().name
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn def(&self) -> QueueDef {
        self.def.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_def(&self, def: QueueDef) {
        *self.def.lock().unwrap_or_else(|p| p.into_inner()) = def;
    }

    pub fn replicas(&self) -> Vec<NodeId> {
        self.with_replicas(<[NodeId]>::to_vec)
    }

    /// Reads the replica list (preference order) without copying it.
    pub(crate) fn with_replicas<T>(&self, read: impl FnOnce(&[NodeId]) -> T) -> T {
        match &self.def.lock().unwrap_or_else(|p| p.into_inner()).placement {
            Placement::Replicated { replicas, .. } => read(replicas),
            Placement::Local { run } => read(&[run.node]),
        }
    }

    /// Counters of the queue as this node last saw them: exact where the queue is served,
    /// possibly behind on a follower, unknown (zero) elsewhere.
    pub fn stats(&self) -> QueueStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_replicated(&self) -> bool {
        matches!(self.def().placement, Placement::Replicated { .. })
    }

    pub(crate) fn is_local_queue(&self) -> bool {
        matches!(self.backend, Backend::Local(_))
    }

    pub(crate) fn set_stats(&self, stats: QueueStats) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = stats;
    }

    /// Transactions staged in the queue and not yet resolved, as of the last command this
    /// node applied; the supervisor resolves those whose coordinator is gone.
    pub fn pending_txs(&self) -> Vec<PendingTx> {
        self.pending_txs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_pending_txs(&self, txs: Vec<PendingTx>) {
        let mut pending = self.pending_txs.lock().unwrap_or_else(|p| p.into_inner());
        if pending.is_empty() && txs.is_empty() {
            return;
        }
        *pending = txs;
    }

    /// The Raft term this node leads the queue's group in (0: not leading).
    pub(crate) fn set_leader_term(&self, term: u64) {
        self.leader_term.store(term, Ordering::Release);
    }

    pub(crate) fn leader_term(&self) -> u64 {
        self.leader_term.load(Ordering::Acquire)
    }

    /// The term whose leader-recovery command this node applied as its leader. Until then a
    /// new leader holds back deliveries to consumers that ack: the old leader may have decided
    /// some it never sent, and the recovery command resends every one still out in queue
    /// order, so a delivery decided in the new term must not overtake them.
    pub(crate) fn set_recovered_term(&self, term: u64) {
        self.recovered_term.store(term, Ordering::Release);
    }

    pub(crate) fn recovered_term(&self) -> u64 {
        self.recovered_term.load(Ordering::Acquire)
    }

    pub(crate) fn node_id(&self) -> NodeId {
        self.node
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Release);
        if leader {
            self.leader_hint.store(self.node, Ordering::Release);
        }
    }

    /// Whether this node serves the queue (leads its group, or holds the transient queue).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Acquire)
    }

    pub(crate) fn leader_hint(&self) -> Option<NodeId> {
        match self.leader_hint.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    pub(crate) fn set_leader_hint(&self, node: Option<NodeId>) {
        self.leader_hint.store(node.unwrap_or(0), Ordering::Release);
    }

    /// A candidate of this group asked for this replica's vote with a log shorter than this
    /// replica's; the supervisor has this replica stand at once if the candidate cannot win
    /// without its vote.
    pub(crate) fn note_refused_candidate_behind(&self) {
        *self
            .refused_a_candidate_behind
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
    }

    /// Whether a candidate behind this replica was refused within `recent`.
    pub(crate) fn refused_candidate_behind_within(&self, recent: std::time::Duration) -> bool {
        self.refused_a_candidate_behind
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at.elapsed() < recent)
    }

    pub(crate) fn may_initialize(&self) -> bool {
        self.may_initialize.load(Ordering::Acquire)
    }

    pub(crate) fn set_may_initialize(&self, may: bool) {
        self.may_initialize.store(may, Ordering::Release);
    }

    pub(crate) fn set_raft(&self, raft: Option<Raft<QueueMachine>>) {
        *self.raft.lock().unwrap_or_else(|p| p.into_inner()) = raft;
    }

    pub(crate) fn raft(&self) -> Option<Raft<QueueMachine>> {
        self.raft.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

    pub(crate) fn sink_of(&self, consumer: &ConsumerKey) -> Option<Arc<dyn DeliverySink>> {
        self.consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(consumer)
            .cloned()
    }

    pub(crate) fn arc(&self) -> Option<Arc<QueueHandle>> {
        self.self_ref.get().and_then(Weak::upgrade)
    }

    /// Submits a command; commands submitted from one task are applied in submission order.
    pub fn submit(&self, request: QueueRequest, reply: ReplyTo) {
        if self.closed.load(Ordering::Acquire) {
            reply.send(Err(ClusterError::QueueGone(self.name())));
            return;
        }
        match &self.backend {
            Backend::Proposer { tx } => {
                if let Err(mpsc::error::SendError((_, reply))) = tx.send((request, reply)) {
                    reply.send(Err(ClusterError::QueueGone(self.name())));
                }
            }
            Backend::Local(_) => reply.send(Ok(self.apply_local(request))),
        }
    }

    /// Submits and waits for the result.
    ///
    /// The command is submitted when `call` is called, not when the future is first polled:
    /// a connection that starts an operation on a task and then closes the channel relies on
    /// the operation's command reaching the queue before the channel's `ChannelDown`.
    pub fn call(
        &self,
        cmd: QueueCmd,
        content: Option<MessageContent>,
    ) -> impl std::future::Future<Output = Result<QueueOutcome, ClusterError>> + Send + use<> {
        let (tx, rx) = oneshot::channel();
        self.submit(
            QueueRequest {
                cmd,
                content,
                at_ms: 0,
                origin: None,
            },
            ReplyTo::Oneshot(tx),
        );
        let name = self.name();
        async move {
            rx.await
                .unwrap_or_else(|_| Err(ClusterError::QueueGone(name)))
        }
    }

    /// Applies a command to this node's in-memory queue. Panics are impossible by
    /// construction: only local handles reach here.
    pub(crate) fn apply_local(&self, request: QueueRequest) -> QueueOutcome {
        let Backend::Local(local) = &self.backend else {
            return QueueOutcome {
                reply: QueueReply::Error(warren_core::AmqpError::internal(
                    "queue is not held by this node",
                )),
                content: None,
            };
        };
        let mut local = local.lock().unwrap_or_else(|p| p.into_inner());
        let LocalQueue { state, bodies } = &mut *local;
        let QueueRequest { cmd, content, .. } = request;
        let (reply, effects) = state.apply(cmd, now_ms());
        if let (
            QueueReply::Enqueued { msg }
            | QueueReply::Rejected { msg: Some(msg) }
            | QueueReply::Staged { msg: Some(msg) },
            Some(content),
        ) = (&reply, content)
        {
            bodies.insert(*msg, content);
        }
        let get_content = match &reply {
            QueueReply::GetOk { msg, .. } => HashMap::get(bodies, msg).cloned(),
            _ => None,
        };
        self.run_effects(effects, bodies);
        self.set_stats(state.stats());
        self.set_pending_txs(state.pending_txs());
        QueueOutcome {
            reply,
            content: get_content,
        }
    }

    /// Carries out a command's effects: deliveries (where the queue is served), body
    /// releases, consumer removals and the auto-delete trigger.
    pub(crate) fn run_effects(&self, effects: Vec<Effect>, bodies: &mut dyn Bodies) {
        self.run_effects_as(self.is_leader(), effects, bodies);
    }

    /// `leader`: whether this command's effects are this node's to carry out. A new leader
    /// applying entries its predecessor wrote does not carry theirs out: the predecessor did
    /// (or died first), and the new leader's recovery command resends what is still out, as
    /// repeats. Sending them again here would reach clients as fresh deliveries.
    pub(crate) fn run_effects_as(
        &self,
        leader: bool,
        effects: Vec<Effect>,
        bodies: &mut dyn Bodies,
    ) {
        for effect in effects {
            match effect {
                Effect::Deliver {
                    consumer,
                    msg,
                    delivery_count,
                    no_ack,
                    resend,
                } => {
                    if !leader {
                        continue;
                    }
                    let owner = consumer.channel.conn.run.node;
                    let sink = self.sink_of(&consumer);
                    if sink.is_none() && owner == self.node {
                        // A consumer of a connection that is gone; its channel-down command
                        // (or the node-restart command) returns the message.
                        continue;
                    }
                    let Some(content) = bodies.get(msg) else {
                        warn!(queue = %self.name(), msg, "no body for a delivery");
                        continue;
                    };
                    match sink {
                        Some(sink) => {
                            let Some(handle) = self.arc() else { continue };
                            sink.deliver(Delivery {
                                handle,
                                consumer,
                                msg,
                                delivery_count,
                                no_ack,
                                resend,
                                content,
                            });
                        }
                        None => self.outbox.send(
                            owner,
                            RemoteItem::Deliver {
                                queue: self.id(),
                                consumer,
                                msg,
                                delivery_count,
                                no_ack,
                                resend,
                                content,
                            },
                        ),
                    }
                }
                Effect::Release { msgs } => bodies.release(&msgs),
                Effect::ConsumerGone { consumer } => {
                    if !leader {
                        continue;
                    }
                    let owner = consumer.channel.conn.run.node;
                    if let Some(sink) = self.sink_of(&consumer) {
                        self.detach(&consumer);
                        sink.consumer_gone(&consumer);
                    } else if owner != self.node {
                        self.outbox.send(
                            owner,
                            RemoteItem::ConsumerGone {
                                queue: self.id(),
                                consumer,
                            },
                        );
                    }
                }
                Effect::Timer { at } => {
                    if leader {
                        self.arm_timer(at);
                    }
                }
                Effect::DeadLetter {
                    msg, reason, seq, ..
                } => {
                    if !leader {
                        continue;
                    }
                    let Some(handle) = self.arc() else { continue };
                    match bodies.get(msg) {
                        Some(content) => {
                            if let Some(hook) = self.on_dead_letter.get() {
                                hook(DeadLetter {
                                    source: handle,
                                    msg,
                                    reason,
                                    seq,
                                    content,
                                });
                            }
                        }
                        None => {
                            // Nothing left to publish: let the message go rather than hold
                            // it forever.
                            warn!(queue = %self.name(), msg, "no body for a dead-letter");
                            // Not from here: a local queue is locked while its effects run.
                            tokio::spawn(async move {
                                handle.submit(
                                    QueueRequest::new(QueueCmd::DeadLettered { msgs: vec![msg] }),
                                    ReplyTo::None,
                                );
                            });
                        }
                    }
                }
                Effect::QueueExpired => {
                    if leader && let Some(hook) = &self.on_unused {
                        hook(self);
                    }
                }
                Effect::LastConsumerGone => {
                    if leader
                        && self.def().auto_delete
                        && let Some(hook) = &self.on_unused
                    {
                        hook(self);
                    }
                }
                // Paging is storage work, done by the replicated state machine before the
                // other effects run; a queue in memory never pages.
                Effect::PageOut { .. }
                | Effect::Unpage { .. }
                | Effect::DropPaged { .. }
                | Effect::WantPageIn { .. } => {}
            }
        }
    }

    /// Whether to answer the state machine's wish for a page-in of `priority` numbered
    /// `seq`: not while the same one is on its way (it is asked for after every command
    /// until it applies), unless that one seems lost.
    pub(crate) fn should_page_in(&self, priority: u8, seq: u64) -> bool {
        let mut asked = self
            .page_ins_asked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match asked.get(&priority) {
            Some((s, at)) if *s == seq && now.duration_since(*at) < PAGE_IN_RETRY => false,
            _ => {
                asked.insert(priority, (seq, now));
                true
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
