//! The queue state machine: which messages a queue holds, which are ready, which are out with
//! which channel, which are on their way to a dead-letter exchange, and who consumes them.
//!
//! It is the replicated part of a queue. The cluster crate feeds it the queue group's committed
//! log (or, for transient queues, applies commands directly), and carries out the effects it
//! returns: only the group's leader sends `Deliver`s, publishes `DeadLetter`s and arms
//! `Timer`s. Message bodies are not here: the adapter stores them by `MsgId` and deletes them on
//! `Release`, which keeps this state small and snapshots cheap. Everything is deterministic —
//! ordered maps, no clock (the leader stamps `now_ms` into each command's log entry), no
//! randomness — because every replica must reach the same state from the same log.
//!
//! The queue arguments RabbitMQ users rely on live in `QueueConfig`: message TTL, max length
//! and bytes with the three overflow behaviours, dead-lettering, the delivery limit, priorities
//! and single active consumer. Their rules follow RabbitMQ's quorum queues, except where the
//! feature table asks for more (reject-publish-dlx, at-least-once dead-lettering everywhere).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use warren_codec::{FieldTable, FieldValue};

use crate::error::AmqpError;
use crate::ids::{ChannelRef, ConsumerKey, MsgId, NodeId, NodeRun, TxId};
use crate::submission_order::{Origin, SubmissionOrder};

#[path = "queue_paging.rs"]
mod paging;
#[path = "queue_tx.rs"]
mod tx;
pub use paging::PagedEntry;
use paging::PagedLevel;
use tx::StagedTx;
pub use tx::{PendingTx, TxSettle, TxWork};

/// What the queue needs to know about a message; the body and properties stay outside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// Body size in bytes, for byte-based limits and statistics.
    pub size: u64,
    /// The message's `priority` property (0 when absent).
    pub priority: u8,
    /// The message's `expiration` property, in milliseconds.
    pub ttl: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Message {
    meta: MessageMeta,
    /// How many times the message went back to the queue after a delivery; > 0 means the
    /// next delivery carries `redelivered = true` (and an `x-delivery-count` header).
    delivery_count: u32,
    /// When the message expires (ms since the epoch, from the leader's clock).
    expires_at: Option<u64>,
}

/// Who holds a delivered, unsettled message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CheckedOut {
    channel: ChannelRef,
    /// None for basic.get; the consumer tag otherwise (its credit comes back on settle).
    consumer: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    /// Maximum unsettled deliveries; 0 means unlimited.
    pub prefetch: u32,
    pub in_flight: u32,
    pub no_ack: bool,
    pub exclusive: bool,
    /// The consumer's `x-priority`: higher priorities are served first.
    pub priority: i32,
    /// Registration order, for single active consumer.
    order: u64,
}

impl ConsumerState {
    fn has_credit(&self) -> bool {
        self.no_ack || self.prefetch == 0 || self.in_flight < self.prefetch
    }
}

/// Who published a message, for recognising resends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PublisherId {
    /// A client channel, with a sequence number per queue.
    Channel(ChannelRef),
    /// Another queue dead-lettering into this one, with its dead-letter sequence number.
    Queue(u64),
}

/// A publish's origin and sequence number. A publish that is resent after a leader change
/// (its first outcome unknown) carries the same number, so the queue takes it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publisher {
    pub id: PublisherId,
    pub seq: u64,
}

/// What happens when a publish would take a queue over its length limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest ready messages.
    #[default]
    DropHead,
    /// Refuse the publish: the publisher gets a nack.
    RejectPublish,
    /// Refuse the publish and dead-letter the refused message.
    RejectPublishDlx,
}

/// Why a message left for the dead-letter exchange; the names are the `x-death` reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadLetterReason {
    Rejected,
    Expired,
    MaxLen,
    DeliveryLimit,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::Expired => "expired",
            DeadLetterReason::MaxLen => "maxlen",
            DeadLetterReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// The queue behaviours set by arguments (`x-message-ttl`, ...) or policies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub message_ttl: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// Whether messages that die go to a dead-letter exchange (the adapter knows which);
    /// without one they are dropped.
    pub dead_letter: bool,
    pub delivery_limit: Option<u32>,
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    /// `x-expires`: the queue is deleted after this long unused (no consumers, no
    /// basic.get, no redeclare).
    pub expires: Option<u64>,
}

fn arg_u64(args: &FieldTable, key: &str) -> Result<Option<u64>, AmqpError> {
    match args.get(key) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => Ok(Some(n as u64)),
            _ => Err(AmqpError::precondition_failed(format!(
                "invalid arg '{key}': expected a non-negative integer, got {v:?}"
            ))),
        },
    }
}

impl QueueConfig {
    /// Reads and validates the queue arguments RabbitMQ defines; invalid values are 406, as
    /// RabbitMQ answers them.
    pub fn from_arguments(args: &FieldTable) -> Result<QueueConfig, AmqpError> {
        let overflow = match args.get("x-overflow") {
            None => Overflow::DropHead,
            Some(v) => match v.as_str() {
                Some("drop-head") => Overflow::DropHead,
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                _ => {
                    return Err(AmqpError::precondition_failed(format!(
                        "invalid arg 'x-overflow': {v:?}; expected drop-head, reject-publish \
                         or reject-publish-dlx"
                    )));
                }
            },
        };
        let dead_letter = match args.get("x-dead-letter-exchange") {
            None => false,
            Some(v) if v.as_str().is_some() => true,
            Some(v) => {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid arg 'x-dead-letter-exchange': expected a string, got {v:?}"
                )));
            }
        };
        if let Some(v) = args.get("x-dead-letter-routing-key")
            && v.as_str().is_none()
        {
            return Err(AmqpError::precondition_failed(format!(
                "invalid arg 'x-dead-letter-routing-key': expected a string, got {v:?}"
            )));
        }
        let max_priority = match arg_u64(args, "x-max-priority")? {
            None => None,
            Some(p) if (1..=255).contains(&p) => Some(p as u8),
            Some(p) => {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid arg 'x-max-priority': {p} is outside 1..=255"
                )));
            }
        };
        let single_active_consumer = match args.get("x-single-active-consumer") {
            None => false,
            Some(FieldValue::Bool(b)) => *b,
            Some(v) => {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid arg 'x-single-active-consumer': expected a boolean, got {v:?}"
                )));
            }
        };
        let expires = match arg_u64(args, "x-expires")? {
            Some(0) => {
                return Err(AmqpError::precondition_failed(
                    "invalid arg 'x-expires': 0 is not positive",
                ));
            }
            e => e,
        };
        // Read by the connections that deliver, not by the queue; validated here with the rest.
        arg_u64(args, "x-consumer-timeout")?;
        Ok(QueueConfig {
            expires,
            message_ttl: arg_u64(args, "x-message-ttl")?,
            max_length: arg_u64(args, "x-max-length")?,
            max_length_bytes: arg_u64(args, "x-max-length-bytes")?,
            overflow,
            dead_letter,
            delivery_limit: arg_u64(args, "x-delivery-limit")?
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            max_priority,
            single_active_consumer,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum QueueCmd {
    Enqueue {
        meta: MessageMeta,
        publisher: Option<Publisher>,
    },
    Consume {
        consumer: ConsumerKey,
        prefetch: u32,
        no_ack: bool,
        exclusive: bool,
        /// The consumer's `x-priority` argument.
        priority: i32,
    },
    Cancel {
        consumer: ConsumerKey,
    },
    /// basic.ack: the messages are done.
    Settle {
        channel: ChannelRef,
        msgs: Vec<MsgId>,
    },
    /// basic.nack / basic.reject with requeue, basic.recover: back to the queue, redelivered.
    Requeue {
        channel: ChannelRef,
        msgs: Vec<MsgId>,
    },
    /// basic.nack / basic.reject without requeue: dead-lettered (reason `rejected`) or dropped.
    Discard {
        channel: ChannelRef,
        msgs: Vec<MsgId>,
    },
    Get {
        channel: ChannelRef,
        no_ack: bool,
    },
    Purge,
    /// Reads the counters through the log, so they include every command before it (a
    /// declare-ok or conditional delete on a node that does not serve the queue).
    Stats,
    /// The channel closed or its connection died: its consumers go and its unsettled
    /// messages come back.
    ChannelDown {
        channel: ChannelRef,
    },
    /// A node started a new run, so channels of its earlier runs are gone.
    NodeRestarted {
        run: NodeRun,
    },
    /// A node is down (failure detector): channels of all its runs are gone.
    NodeDown {
        node: NodeId,
    },
    /// A new leader took over: what channels on `down` nodes held comes back, every delivery
    /// still out with a live consumer is sent again (`resend`), since the old leader may have
    /// decided it without sending it, and dead-letters in progress are published again.
    /// Connections drop resends they already have; target queues drop repeated dead-letters.
    LeaderRecovery {
        down: Vec<NodeId>,
    },
    /// Sets the queue's behaviours (declaration arguments, then policy changes). `version`
    /// is the metadata's policy version the config was computed at: one older than the
    /// config in force arrived late (from a previous leader) and is ignored.
    Configure {
        config: QueueConfig,
        version: u64,
    },
    /// Time passed: messages at the head whose TTL ran out expire, an unused queue with
    /// `x-expires` may expire.
    Tick,
    /// The queue was declared again (or first): it counts as used for `x-expires`.
    Touch,
    /// Every target of these dead-lettered messages has committed them (or there was none):
    /// the queue lets them go.
    DeadLettered {
        msgs: Vec<MsgId>,
    },
    /// Part of a transaction's commit, kept aside until the transaction is resolved: not
    /// visible to consumers, limits or TTLs. `part` numbers the transaction's stages so a
    /// resent stage is taken once.
    TxStage {
        tx: TxId,
        part: u32,
        work: TxWork,
    },
    /// The transaction's outcome, as the metadata decided it: its staged work takes effect
    /// (publishes enqueue, settlements apply) or is dropped.
    TxResolve {
        tx: TxId,
        commit: bool,
    },
    /// The next index entries of a paged priority level, read by the leader from its disk
    /// (`Effect::WantPageIn`): ready in memory again. `seq` must be the level's page-in number,
    /// else the command was overtaken and is ignored.
    PageIn {
        priority: u8,
        seq: u64,
        entries: Vec<(MsgId, PagedEntry)>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum QueueReply {
    Enqueued {
        msg: MsgId,
    },
    /// The publisher's sequence number was already taken: this is a resend of a message the
    /// queue has (or had) already.
    Duplicate,
    /// A transaction's stage was kept; a publish's body is to be stored under `msg`.
    Staged {
        msg: Option<MsgId>,
    },
    /// Refused by `x-overflow: reject-publish(-dlx)`: the publisher gets a nack. With
    /// reject-publish-dlx the message is kept as `msg` until its dead-letter commits, so its
    /// body must be stored like an enqueued one's.
    Rejected {
        msg: Option<MsgId>,
    },
    Done,
    GetOk {
        msg: MsgId,
        delivery_count: u32,
        /// Ready messages left after this one, for get-ok's message-count.
        remaining: u64,
    },
    GetEmpty,
    Purged {
        count: u64,
    },
    Stats {
        ready: u64,
        unacked: u64,
        consumers: u64,
    },
    Error(AmqpError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Send a message to a consumer (leader only). With `no_ack` the message is already gone
    /// from the queue, and its body is released by a following `Release`.
    Deliver {
        consumer: ConsumerKey,
        msg: MsgId,
        delivery_count: u32,
        no_ack: bool,
        /// A repeat of a delivery already decided earlier (after a leader change).
        resend: bool,
    },
    /// These messages left the queue for good: their bodies can be deleted. Executed after the
    /// command's reply and earlier effects have read what they need.
    Release { msgs: Vec<MsgId> },
    /// Publish this message to the queue's dead-letter exchange, then commit `DeadLettered`
    /// (leader only). `seq` numbers this queue's dead-letters so targets take each once.
    DeadLetter {
        msg: MsgId,
        reason: DeadLetterReason,
        seq: u64,
        delivery_count: u32,
    },
    /// Commit a `Tick` at this time (ms since the epoch): a message will expire then.
    Timer { at: u64 },
    /// The queue lost its last consumer (auto-delete queues go now).
    LastConsumerGone,
    /// The queue went unused for its `x-expires`: delete it (leader only). Emitted once.
    QueueExpired,
    /// The queue dropped this consumer on its own (its node was declared down); the consumer's
    /// connection, if it still exists, must tell the client.
    ConsumerGone { consumer: ConsumerKey },
    /// Store this ready message's index entry on disk (every replica): it left memory.
    PageOut {
        priority: u8,
        msg: MsgId,
        entry: PagedEntry,
    },
    /// These entries of a level are back in memory: delete them from disk (every replica).
    Unpage { priority: u8, msgs: Vec<MsgId> },
    /// A purge dropped every message of a level on disk: delete their entries and bodies
    /// (every replica).
    DropPaged { priority: u8 },
    /// Read the first entries of this level from disk and propose `QueueCmd::PageIn` with
    /// them and `seq` (leader only; repeated while wanted, so one request at a time).
    WantPageIn { priority: u8, seq: u64, from: MsgId },
}

/// Ready messages in delivery order: highest priority first, then oldest.
type ReadyKey = (Reverse<u8>, MsgId);

/// The sequence number of a publisher whose channel is down: every publish is below it.
const CLOSED: u64 = u64::MAX;

/// How many closed channels' publisher entries a queue keeps (a few dozen bytes each). A late
/// copy of a publish arrives within seconds of its channel closing; thousands of channels
/// closing in between would be needed for it to find no entry.
const CLOSED_PUBLISHERS_KEPT: usize = 4096;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    config: QueueConfig,
    next_msg: MsgId,
    messages: BTreeMap<MsgId, Message>,
    ready: BTreeSet<ReadyKey>,
    checked_out: BTreeMap<MsgId, CheckedOut>,
    /// Messages on their way to the dead-letter exchange: the seq and reason of each.
    dead_lettering: BTreeMap<MsgId, (u64, DeadLetterReason)>,
    next_dead_letter: u64,
    consumers: BTreeMap<ConsumerKey, ConsumerState>,
    /// Round-robin order of consumers: the front gets the next message it has credit for.
    rotation: VecDeque<ConsumerKey>,
    next_consumer_order: u64,
    /// Bytes of every ready message, in memory or paged out.
    ready_bytes: u64,
    /// Highest sequence number taken from each publisher; `CLOSED` once its channel is down.
    publishers: BTreeMap<PublisherId, u64>,
    /// Publishers whose channel went down, oldest first: their entries stay (as `CLOSED`) for
    /// the last `CLOSED_PUBLISHERS_KEPT` of them, then go.
    closed_publishers: VecDeque<PublisherId>,
    /// The last command taken from each proposer (`submission_order.rs`).
    order: SubmissionOrder,
    /// Last use for `x-expires` (ms since the epoch); 0 until the first use or touch.
    last_used_ms: u64,
    /// `QueueExpired` was emitted: the deletion is under way.
    expired: bool,
    /// The policy version of the config in force (0: from the declaration).
    config_version: u64,
    /// Ready messages beyond this many go to disk (0: none do). See `queue_paging.rs`.
    page_window: u32,
    /// Ready messages on disk, per priority level.
    paged: BTreeMap<u8, PagedLevel>,
    /// Transactions staged here and not yet resolved.
    staged: BTreeMap<TxId, StagedTx>,
    /// Transactions resolved lately (the last `RESOLVED_TXS_KEPT`, in `resolved_order`): a
    /// stage that arrives after its transaction's resolution is a late copy and is refused.
    resolved_txs: BTreeSet<TxId>,
    resolved_order: VecDeque<TxId>,
    /// No-ack deliveries of the dispatch in progress; empty between commands.
    #[serde(skip)]
    pending_release: Vec<MsgId>,
}

/// Counters for queue.declare-ok, metrics and the management API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
    pub ready_bytes: u64,
}

impl QueueState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_config(config: QueueConfig) -> Self {
        QueueState {
            config,
            ..Self::default()
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    pub fn stats(&self) -> QueueStats {
        QueueStats {
            ready: self.ready_count(),
            unacked: self.checked_out.len() as u64,
            consumers: self.consumers.len() as u64,
            ready_bytes: self.ready_bytes,
        }
    }

    /// Ready messages, in memory and paged out.
    fn ready_count(&self) -> u64 {
        self.ready.len() as u64 + self.paged_count()
    }

    pub fn consumer(&self, key: &ConsumerKey) -> Option<&ConsumerState> {
        self.consumers.get(key)
    }

    pub fn consumer_keys(&self) -> impl Iterator<Item = &ConsumerKey> {
        self.consumers.keys()
    }

    /// Messages currently out with a channel, for tests and diagnostics.
    pub fn checked_out_to(&self, channel: &ChannelRef) -> Vec<MsgId> {
        self.checked_out
            .iter()
            .filter(|(_, c)| c.channel == *channel)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every message whose body the queue needs: those it holds (ready, out or being
    /// dead-lettered) in id order, then the publishes of staged transactions.
    pub fn message_ids(&self) -> impl Iterator<Item = MsgId> + '_ {
        self.messages
            .keys()
            .copied()
            .chain(self.staged_message_ids())
    }

    pub fn is_ready(&self, msg: MsgId) -> bool {
        self.messages
            .get(&msg)
            .is_some_and(|m| self.ready.contains(&(Reverse(m.meta.priority), msg)))
    }

    /// Whether the queue takes a command its proposer numbered `origin`, or refuses it as
    /// arriving after a gap (`submission_order.rs`). The adapter asks before `apply`;
    /// a command taken is recorded as such.
    pub fn in_order(&mut self, origin: Origin) -> bool {
        self.order.admit(origin)
    }

    /// Applies one command at `now_ms` (the leader's clock, from the command's log entry).
    pub fn apply(&mut self, cmd: QueueCmd, now_ms: u64) -> (QueueReply, Vec<Effect>) {
        let mut fx = Vec::new();
        if matches!(
            cmd,
            QueueCmd::Consume { .. }
                | QueueCmd::Cancel { .. }
                | QueueCmd::Get { .. }
                | QueueCmd::Touch
        ) {
            self.last_used_ms = self.last_used_ms.max(now_ms);
        }
        let reply = match cmd {
            QueueCmd::Enqueue { meta, publisher } => {
                if let Some(p) = publisher {
                    let last = self.publishers.entry(p.id).or_insert(0);
                    if p.seq <= *last {
                        return (QueueReply::Duplicate, Vec::new());
                    }
                    *last = p.seq;
                }
                self.enqueue(meta, now_ms, &mut fx)
            }
            QueueCmd::TxStage { tx, part, work } => self.tx_stage(tx, part, work, now_ms),
            QueueCmd::TxResolve { tx, commit } => {
                self.tx_resolve(tx, commit, now_ms, &mut fx);
                QueueReply::Done
            }
            QueueCmd::PageIn {
                priority,
                seq,
                entries,
            } => {
                self.page_in(priority, seq, entries, &mut fx);
                QueueReply::Done
            }
            QueueCmd::Consume {
                consumer,
                prefetch,
                no_ack,
                exclusive,
                priority,
            } => self.consume(consumer, prefetch, no_ack, exclusive, priority),
            QueueCmd::Cancel { consumer } => {
                self.remove_consumer(&consumer, &mut fx);
                QueueReply::Done
            }
            QueueCmd::Settle { channel, msgs } => {
                let settled = self.take_checked_out(&channel, &msgs);
                self.forget(settled, &mut fx);
                QueueReply::Done
            }
            QueueCmd::Discard { channel, msgs } => {
                for id in self.take_checked_out(&channel, &msgs) {
                    self.dead_letter(id, DeadLetterReason::Rejected, &mut fx);
                }
                QueueReply::Done
            }
            QueueCmd::Requeue { channel, msgs } => {
                for id in self.take_checked_out(&channel, &msgs) {
                    self.return_message(id, &mut fx);
                }
                QueueReply::Done
            }
            QueueCmd::Get { channel, no_ack } => self.get(channel, no_ack, now_ms, &mut fx),
            QueueCmd::Stats => {
                let s = self.stats();
                QueueReply::Stats {
                    ready: s.ready,
                    unacked: s.unacked,
                    consumers: s.consumers,
                }
            }
            QueueCmd::Purge => {
                let purged: Vec<MsgId> = std::mem::take(&mut self.ready)
                    .into_iter()
                    .map(|(_, id)| id)
                    .collect();
                self.ready_bytes = 0;
                let count = purged.len() as u64 + self.purge_paged(&mut fx);
                self.forget(purged, &mut fx);
                QueueReply::Purged { count }
            }
            QueueCmd::ChannelDown { channel } => {
                // A publish of this channel can still arrive after its ChannelDown: a copy
                // whose first send had an unknown outcome (a partition) and was resent, then
                // turned up late. No new publish can come from a closed channel, so whatever
                // comes is such a copy: the entry stays, marked closed, and refuses it.
                let id = PublisherId::Channel(channel);
                if self.publishers.insert(id, CLOSED) != Some(CLOSED) {
                    self.closed_publishers.push_back(id);
                    while self.closed_publishers.len() > CLOSED_PUBLISHERS_KEPT {
                        if let Some(old) = self.closed_publishers.pop_front() {
                            self.publishers.remove(&old);
                        }
                    }
                }
                if self.channels_down(|c| *c == channel, &mut fx) {
                    fx.push(Effect::LastConsumerGone);
                }
                QueueReply::Done
            }
            QueueCmd::NodeRestarted { run } => {
                // Consumers lost to a restart do not count as unsubscribing: an auto-delete
                // queue survives its node's restart, as it does in RabbitMQ.
                let gone = |c: &ChannelRef| {
                    c.conn.run.node == run.node && c.conn.run.incarnation < run.incarnation
                };
                self.publishers.retain(|p, _| match p {
                    PublisherId::Channel(c) => !gone(c),
                    PublisherId::Queue(_) => true,
                });
                self.order.node_restarted(run);
                self.tx_orphaned(gone);
                self.channels_down(gone, &mut fx);
                QueueReply::Done
            }
            QueueCmd::NodeDown { node } => {
                self.node_down(node, &mut fx);
                QueueReply::Done
            }
            QueueCmd::LeaderRecovery { down } => {
                for node in down {
                    self.node_down(node, &mut fx);
                }
                fx.extend(self.resend_unsettled());
                fx.extend(self.resend_dead_letters());
                QueueReply::Done
            }
            QueueCmd::Configure { config, version } => {
                if version >= self.config_version {
                    self.config = config;
                    self.config_version = version;
                }
                QueueReply::Done
            }
            QueueCmd::Tick | QueueCmd::Touch => QueueReply::Done,
            QueueCmd::DeadLettered { msgs } => {
                let done: Vec<MsgId> = msgs
                    .into_iter()
                    .filter(|id| self.dead_lettering.remove(id).is_some())
                    .collect();
                self.forget(done, &mut fx);
                QueueReply::Done
            }
        };
        self.expire(now_ms, &mut fx);
        // Deliveries go before releases so that a Release never frees a body a Deliver of the
        // same command still needs.
        let mut out = self.dispatch(now_ms);
        // Like RabbitMQ, limits apply after consumers took what they can: a requeue or a
        // new limit can push the ready count over, and the oldest ready messages go.
        self.enforce_limits(&mut fx);
        let releases: Vec<Effect> = fx
            .iter()
            .filter(|e| matches!(e, Effect::Release { .. }))
            .cloned()
            .collect();
        out.extend(
            fx.into_iter()
                .filter(|e| !matches!(e, Effect::Release { .. })),
        );
        out.extend(self.dispatch_releases());
        out.extend(releases);
        let unused_until = self.unused_deadline();
        if unused_until.is_some_and(|at| at <= now_ms) {
            self.expired = true;
            out.push(Effect::QueueExpired);
        }
        let next = [self.next_expiry(), self.unused_deadline()]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = next {
            out.push(Effect::Timer { at });
        }
        out.extend(self.page_in_wanted());
        (reply, out)
    }

    fn enqueue(&mut self, meta: MessageMeta, now_ms: u64, fx: &mut Vec<Effect>) -> QueueReply {
        if self.refuses(meta.size) {
            return QueueReply::Rejected { msg: None };
        }
        let id = self.next_msg;
        self.next_msg += 1;
        self.admit(id, meta, now_ms, true, fx)
    }

    /// Whether the queue is full and its overflow behaviour refuses a publish of `size`
    /// bytes outright (reject-publish; reject-publish-dlx without a dead-letter exchange).
    fn refuses(&self, size: u64) -> bool {
        self.is_full(size)
            && (self.config.overflow == Overflow::RejectPublish
                || (self.config.overflow == Overflow::RejectPublishDlx && !self.config.dead_letter))
    }

    fn is_full(&self, size: u64) -> bool {
        self.config
            .max_length
            .is_some_and(|max| self.ready_count() >= max)
            || self
                .config
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes + size > max)
    }

    /// Takes a message the queue does not refuse under `id` (already allocated): ready, or
    /// dead-lettered at once under reject-publish-dlx when the queue is full. Only a `fresh`
    /// id (the newest so far) may be paged out.
    fn admit(
        &mut self,
        id: MsgId,
        meta: MessageMeta,
        now_ms: u64,
        fresh: bool,
        fx: &mut Vec<Effect>,
    ) -> QueueReply {
        let reject = self.is_full(meta.size) && self.config.overflow == Overflow::RejectPublishDlx;
        let ttl = match (meta.ttl, self.config.message_ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.messages.insert(
            id,
            Message {
                meta: MessageMeta {
                    priority: self.capped_priority(meta.priority),
                    ..meta
                },
                delivery_count: 0,
                expires_at: ttl.map(|t| now_ms.saturating_add(t)),
            },
        );
        if reject {
            // reject-publish-dlx: the publisher gets a nack, the message goes to the
            // dead-letter exchange. The body is stored under `id` like any message's.
            self.dead_letter(id, DeadLetterReason::MaxLen, fx);
            return QueueReply::Rejected { msg: Some(id) };
        }
        if fresh {
            self.make_ready_fresh(id, fx);
        } else {
            self.make_ready(id);
        }
        // A message with TTL 0 is delivered only if a consumer takes it at once (RabbitMQ);
        // `expire` after dispatch drops it otherwise.
        QueueReply::Enqueued { msg: id }
    }

    fn capped_priority(&self, priority: u8) -> u8 {
        match self.config.max_priority {
            Some(max) => priority.min(max),
            None => 0,
        }
    }

    /// drop-head: the oldest ready messages make room, dead-lettered with reason `maxlen`.
    fn enforce_limits(&mut self, fx: &mut Vec<Effect>) {
        if self.config.overflow != Overflow::DropHead {
            return;
        }
        loop {
            let over = self
                .config
                .max_length
                .is_some_and(|max| self.ready_count() > max)
                || self
                    .config
                    .max_length_bytes
                    .is_some_and(|max| self.ready_bytes > max);
            if !over {
                return;
            }
            let Some(id) = self.take_oldest_ready() else {
                return;
            };
            self.dead_letter(id, DeadLetterReason::MaxLen, fx);
        }
    }

    /// The oldest ready message regardless of priority (what drop-head drops).
    fn take_oldest_ready(&mut self) -> Option<MsgId> {
        let key = *self.ready.iter().min_by_key(|(_, id)| *id)?;
        self.remove_ready(key);
        Some(key.1)
    }

    fn remove_ready(&mut self, key: ReadyKey) {
        if self.ready.remove(&key)
            && let Some(m) = self.messages.get(&key.1)
        {
            self.ready_bytes = self.ready_bytes.saturating_sub(m.meta.size);
        }
    }

    fn make_ready(&mut self, id: MsgId) {
        if let Some(m) = self.messages.get(&id) {
            self.ready_bytes += m.meta.size;
            self.ready.insert((Reverse(m.meta.priority), id));
        }
    }

    fn take_ready(&mut self) -> Option<MsgId> {
        let key = *self.ready.first()?;
        self.remove_ready(key);
        Some(key.1)
    }

    /// Messages at the head whose TTL ran out expire (as in RabbitMQ, only at the head: a
    /// message with a shorter TTL behind a longer one waits for it).
    fn expire(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        while let Some(&key) = self.ready.first() {
            let expired = self
                .messages
                .get(&key.1)
                .and_then(|m| m.expires_at)
                .is_some_and(|at| at <= now_ms);
            if !expired {
                return;
            }
            self.remove_ready(key);
            self.dead_letter(key.1, DeadLetterReason::Expired, fx);
        }
    }

    /// When the queue expires for want of use, if it has `x-expires`, no consumers and was
    /// used or declared at all (and is not expiring already).
    fn unused_deadline(&self) -> Option<u64> {
        let expires = self.config.expires?;
        if self.expired || self.last_used_ms == 0 || !self.consumers.is_empty() {
            return None;
        }
        Some(self.last_used_ms.saturating_add(expires))
    }

    fn next_expiry(&self) -> Option<u64> {
        let (_, id) = self.ready.first()?;
        self.messages.get(id)?.expires_at
    }

    /// A message that dies goes to the dead-letter exchange if the queue has one (it stays
    /// here, out of reach, until its targets committed it), else it is dropped.
    fn dead_letter(&mut self, id: MsgId, reason: DeadLetterReason, fx: &mut Vec<Effect>) {
        if !self.config.dead_letter {
            self.forget(vec![id], fx);
            return;
        }
        let seq = self.next_dead_letter + 1;
        self.next_dead_letter = seq;
        self.dead_lettering.insert(id, (seq, reason));
        fx.push(Effect::DeadLetter {
            msg: id,
            reason,
            seq,
            delivery_count: self.messages.get(&id).map_or(0, |m| m.delivery_count),
        });
    }

    /// In `seq` order: a target takes each source's dead-letters in rising sequence only (a
    /// lower number after a higher one counts as a resend), so they must reach it that way.
    fn resend_dead_letters(&self) -> Vec<Effect> {
        let mut pending: Vec<(u64, MsgId, DeadLetterReason)> = self
            .dead_lettering
            .iter()
            .map(|(id, (seq, reason))| (*seq, *id, *reason))
            .collect();
        pending.sort_unstable_by_key(|(seq, _, _)| *seq);
        pending
            .into_iter()
            .map(|(seq, id, reason)| Effect::DeadLetter {
                msg: id,
                reason,
                seq,
                delivery_count: self.messages.get(&id).map_or(0, |m| m.delivery_count),
            })
            .collect()
    }

    /// A down node's consumers leave without counting as unsubscribing (the node may come
    /// back), like a restart. If the node was only unreachable, its connections learn that
    /// their consumers are gone (`ConsumerGone`), so clients get a cancel notification
    /// rather than a consumer that silently receives nothing.
    ///
    /// The node's publishers are kept: a node only suspected down (cut off for a moment) still
    /// resends the publishes it had in flight, and they must be recognised as resends. Its
    /// numbering goes when the node restarts (`NodeRestarted`) or its channels close.
    fn node_down(&mut self, node: NodeId, fx: &mut Vec<Effect>) {
        for key in self
            .consumers
            .keys()
            .filter(|k| k.channel.conn.run.node == node)
        {
            fx.push(Effect::ConsumerGone {
                consumer: key.clone(),
            });
        }
        self.tx_orphaned(|c| c.conn.run.node == node);
        self.channels_down(|c| c.conn.run.node == node, fx);
    }

    /// Deliveries for everything out with a consumer that still exists, in id order.
    fn resend_unsettled(&self) -> Vec<Effect> {
        self.checked_out
            .iter()
            .filter_map(|(id, out)| {
                let tag = out.consumer.as_ref()?;
                let key = ConsumerKey {
                    channel: out.channel,
                    tag: tag.clone(),
                };
                let consumer = self.consumers.get(&key)?;
                Some(Effect::Deliver {
                    consumer: key,
                    msg: *id,
                    delivery_count: self.messages.get(id).map_or(0, |m| m.delivery_count),
                    no_ack: consumer.no_ack,
                    resend: true,
                })
            })
            .collect()
    }

    fn consume(
        &mut self,
        consumer: ConsumerKey,
        prefetch: u32,
        no_ack: bool,
        exclusive: bool,
        priority: i32,
    ) -> QueueReply {
        if let Some(existing) = self.consumers.get(&consumer) {
            // The same request again (a resend after a leader change) is not a reuse.
            if existing.prefetch == prefetch
                && existing.no_ack == no_ack
                && existing.exclusive == exclusive
                && existing.priority == priority
            {
                return QueueReply::Done;
            }
            return QueueReply::Error(AmqpError::new(
                warren_codec::reply_code::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{}'", consumer.tag),
            ));
        }
        let exclusive_taken = self.consumers.values().any(|c| c.exclusive);
        if exclusive_taken || (exclusive && !self.consumers.is_empty()) {
            return QueueReply::Error(AmqpError::access_refused(
                "queue is in exclusive use by another consumer",
            ));
        }
        let order = self.next_consumer_order;
        self.next_consumer_order += 1;
        self.consumers.insert(
            consumer.clone(),
            ConsumerState {
                prefetch,
                in_flight: 0,
                no_ack,
                exclusive,
                priority,
                order,
            },
        );
        self.rotation.push_back(consumer);
        QueueReply::Done
    }

    fn remove_consumer(&mut self, key: &ConsumerKey, fx: &mut Vec<Effect>) {
        if self.consumers.remove(key).is_some() {
            self.rotation.retain(|k| k != key);
            // Its unsettled messages stay with the channel, but no longer count against a
            // consumer: a later consumer reusing the tag starts with its own credit.
            for out in self.checked_out.values_mut() {
                if out.channel == key.channel && out.consumer.as_deref() == Some(&key.tag) {
                    out.consumer = None;
                }
            }
            if self.consumers.is_empty() {
                fx.push(Effect::LastConsumerGone);
            }
        }
    }

    /// Removes the listed messages from the channel's unsettled set. Ids the channel does not
    /// hold (a stale ack after the message came back, say) are ignored: the channel already
    /// checked its delivery tags, and replicas must not diverge on such races.
    fn take_checked_out(&mut self, channel: &ChannelRef, msgs: &[MsgId]) -> Vec<MsgId> {
        let mut taken = Vec::with_capacity(msgs.len());
        for id in msgs {
            let held = self
                .checked_out
                .get(id)
                .is_some_and(|c| c.channel == *channel);
            if !held {
                continue;
            }
            if let Some(out) = self.checked_out.remove(id) {
                self.credit_back(&out);
            }
            taken.push(*id);
        }
        taken
    }

    /// Drops messages for good and asks the adapter to free their bodies.
    fn forget(&mut self, msgs: Vec<MsgId>, fx: &mut Vec<Effect>) {
        if msgs.is_empty() {
            return;
        }
        for id in &msgs {
            self.messages.remove(id);
        }
        fx.push(Effect::Release { msgs });
    }

    fn credit_back(&mut self, out: &CheckedOut) {
        if let Some(tag) = &out.consumer {
            let key = ConsumerKey {
                channel: out.channel,
                tag: tag.clone(),
            };
            if let Some(c) = self.consumers.get_mut(&key) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
        }
    }

    /// A delivered message comes back: ready again (original position), or dead-lettered
    /// when it has now been returned more often than the delivery limit allows.
    fn return_message(&mut self, id: MsgId, fx: &mut Vec<Effect>) {
        let limit = self.config.delivery_limit;
        let Some(m) = self.messages.get_mut(&id) else {
            return;
        };
        m.delivery_count = m.delivery_count.saturating_add(1);
        if limit.is_some_and(|l| m.delivery_count > l) {
            self.dead_letter(id, DeadLetterReason::DeliveryLimit, fx);
        } else {
            self.make_ready(id);
        }
    }

    fn get(
        &mut self,
        channel: ChannelRef,
        no_ack: bool,
        now_ms: u64,
        fx: &mut Vec<Effect>,
    ) -> QueueReply {
        self.expire(now_ms, fx);
        let Some(id) = self.take_ready() else {
            return QueueReply::GetEmpty;
        };
        let delivery_count = self.messages.get(&id).map_or(0, |m| m.delivery_count);
        if no_ack {
            self.forget(vec![id], fx);
        } else {
            self.checked_out.insert(
                id,
                CheckedOut {
                    channel,
                    consumer: None,
                },
            );
        }
        QueueReply::GetOk {
            msg: id,
            delivery_count,
            remaining: self.ready_count(),
        }
    }

    /// Returns the messages and drops the consumers of the channels `gone` matches; true when
    /// that removed the queue's last consumer.
    fn channels_down(&mut self, gone: impl Fn(&ChannelRef) -> bool, fx: &mut Vec<Effect>) -> bool {
        // Messages a staged transaction settles wait for its outcome rather than come back.
        let held = self.tx_channels_gone(&gone);
        for id in &held {
            // Its consumer goes with the channel; a consumer that comes back under the same
            // key must not count it as its own.
            if let Some(out) = self.checked_out.get_mut(id)
                && gone(&out.channel)
            {
                out.consumer = None;
            }
        }
        let returned: Vec<MsgId> = self
            .checked_out
            .iter()
            .filter(|(id, c)| gone(&c.channel) && !held.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in returned {
            self.checked_out.remove(&id);
            self.return_message(id, fx);
        }
        let had_consumers = !self.consumers.is_empty();
        self.consumers.retain(|k, _| !gone(&k.channel));
        self.rotation.retain(|k| !gone(&k.channel));
        had_consumers && self.consumers.is_empty()
    }

    /// The consumer the next message goes to: with single active consumer, the earliest
    /// registered one (if it has credit); otherwise, among the consumers with credit and the
    /// highest priority, the next in round-robin order.
    fn next_consumer(&mut self) -> Option<ConsumerKey> {
        if self.config.single_active_consumer {
            let (key, c) = self.consumers.iter().min_by_key(|(_, c)| c.order)?;
            return c.has_credit().then(|| key.clone());
        }
        let top = self
            .consumers
            .values()
            .filter(|c| c.has_credit())
            .map(|c| c.priority)
            .max()?;
        let pos = self.rotation.iter().position(|k| {
            self.consumers
                .get(k)
                .is_some_and(|c| c.has_credit() && c.priority == top)
        })?;
        let key = self.rotation.remove(pos)?;
        self.rotation.push_back(key.clone());
        Some(key)
    }

    /// Hands ready messages to consumers with credit until either runs out.
    fn dispatch(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        loop {
            self.expire(now_ms, &mut fx);
            if self.ready.is_empty() {
                break;
            }
            let Some(key) = self.next_consumer() else {
                break;
            };
            let Some(id) = self.take_ready() else {
                break;
            };
            let Some(consumer) = self.consumers.get_mut(&key) else {
                break;
            };
            let no_ack = consumer.no_ack;
            let delivery_count = self.messages.get(&id).map_or(0, |m| m.delivery_count);
            if no_ack {
                self.pending_release.push(id);
            } else {
                consumer.in_flight += 1;
                self.checked_out.insert(
                    id,
                    CheckedOut {
                        channel: key.channel,
                        consumer: Some(key.tag.clone()),
                    },
                );
            }
            fx.push(Effect::Deliver {
                consumer: key,
                msg: id,
                delivery_count,
                no_ack,
                resend: false,
            });
        }
        fx
    }

    /// Bodies of no-ack deliveries of the last dispatch: gone from the queue once sent.
    fn dispatch_releases(&mut self) -> Vec<Effect> {
        let released = std::mem::take(&mut self.pending_release);
        if released.is_empty() {
            return Vec::new();
        }
        for id in &released {
            self.messages.remove(id);
        }
        vec![Effect::Release { msgs: released }]
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
