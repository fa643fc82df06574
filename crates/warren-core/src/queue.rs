//! The queue state machine: which messages a queue holds, which are ready, which are out with
//! which channel, and who consumes them.
//!
//! It is the replicated part of a queue. The cluster crate feeds it the queue group's committed
//! log (or, for transient queues, applies commands directly), and the server executes the
//! effects it returns: only the group's leader sends `Deliver`s. Message bodies are not here:
//! the adapter stores them by `MsgId` and deletes them on `Release`, which keeps this state
//! small and snapshots cheap. Everything is deterministic — ordered maps, no clock, no
//! randomness — because every replica must reach the same state from the same log.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::error::AmqpError;
use crate::ids::{ChannelRef, ConsumerKey, MsgId, NodeId, NodeRun};

/// What the queue needs to know about a message; the body and properties stay outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageMeta {
    /// Body size in bytes, for byte-based limits and statistics.
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Message {
    meta: MessageMeta,
    /// How many times the message went back to the queue after a delivery; > 0 means the
    /// next delivery carries `redelivered = true`.
    delivery_count: u32,
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
}

impl ConsumerState {
    fn has_credit(&self) -> bool {
        self.no_ack || self.prefetch == 0 || self.in_flight < self.prefetch
    }
}

/// Who published a message: the channel and its per-queue sequence number. A publish that is
/// resent after a leader change (its first outcome unknown) carries the same number, so the
/// queue takes it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publisher {
    pub channel: ChannelRef,
    pub seq: u64,
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
    /// basic.nack / basic.reject without requeue: dropped (dead-lettered once that exists).
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
    /// A new leader took over: what channels on `down` nodes held comes back, and every
    /// delivery still out with a live consumer is sent again (`resend`), since the old leader
    /// may have decided it without sending it. Connections drop resends they already have.
    LeaderRecovery {
        down: Vec<NodeId>,
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
    /// The queue lost its last consumer (auto-delete queues go now).
    LastConsumerGone,
    /// The queue dropped this consumer on its own (its node was declared down); the consumer's
    /// connection, if it still exists, must tell the client.
    ConsumerGone { consumer: ConsumerKey },
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueState {
    next_msg: MsgId,
    messages: BTreeMap<MsgId, Message>,
    ready: BTreeSet<MsgId>,
    checked_out: BTreeMap<MsgId, CheckedOut>,
    consumers: BTreeMap<ConsumerKey, ConsumerState>,
    /// Round-robin order of consumers: the front gets the next message it has credit for.
    rotation: VecDeque<ConsumerKey>,
    ready_bytes: u64,
    /// Highest sequence number taken from each publishing channel.
    publishers: BTreeMap<ChannelRef, u64>,
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

    pub fn stats(&self) -> QueueStats {
        QueueStats {
            ready: self.ready.len() as u64,
            unacked: self.checked_out.len() as u64,
            consumers: self.consumers.len() as u64,
            ready_bytes: self.ready_bytes,
        }
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

    /// Every message the queue holds (ready or out), in id order.
    pub fn message_ids(&self) -> impl Iterator<Item = MsgId> + '_ {
        self.messages.keys().copied()
    }

    pub fn is_ready(&self, msg: MsgId) -> bool {
        self.ready.contains(&msg)
    }

    pub fn apply(&mut self, cmd: QueueCmd) -> (QueueReply, Vec<Effect>) {
        let mut fx = Vec::new();
        let reply = match cmd {
            QueueCmd::Enqueue { meta, publisher } => {
                if let Some(p) = publisher {
                    let last = self.publishers.entry(p.channel).or_insert(0);
                    if p.seq <= *last {
                        return (QueueReply::Duplicate, Vec::new());
                    }
                    *last = p.seq;
                }
                let id = self.next_msg;
                self.next_msg += 1;
                self.messages.insert(
                    id,
                    Message {
                        meta,
                        delivery_count: 0,
                    },
                );
                self.make_ready(id);
                QueueReply::Enqueued { msg: id }
            }
            QueueCmd::Consume {
                consumer,
                prefetch,
                no_ack,
                exclusive,
            } => self.consume(consumer, prefetch, no_ack, exclusive),
            QueueCmd::Cancel { consumer } => {
                self.remove_consumer(&consumer, &mut fx);
                QueueReply::Done
            }
            QueueCmd::Settle { channel, msgs } | QueueCmd::Discard { channel, msgs } => {
                let released = self.take_checked_out(&channel, &msgs);
                self.forget(released, &mut fx);
                QueueReply::Done
            }
            QueueCmd::Requeue { channel, msgs } => {
                for id in self.take_checked_out(&channel, &msgs) {
                    self.return_message(id);
                }
                QueueReply::Done
            }
            QueueCmd::Get { channel, no_ack } => self.get(channel, no_ack, &mut fx),
            QueueCmd::Stats => {
                let s = self.stats();
                QueueReply::Stats {
                    ready: s.ready,
                    unacked: s.unacked,
                    consumers: s.consumers,
                }
            }
            QueueCmd::Purge => {
                let purged: Vec<MsgId> = std::mem::take(&mut self.ready).into_iter().collect();
                for id in &purged {
                    self.messages.remove(id);
                }
                self.ready_bytes = 0;
                let count = purged.len() as u64;
                if !purged.is_empty() {
                    fx.push(Effect::Release { msgs: purged });
                }
                QueueReply::Purged { count }
            }
            QueueCmd::ChannelDown { channel } => {
                self.publishers.remove(&channel);
                if self.channels_down(|c| *c == channel) {
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
                self.publishers.retain(|c, _| !gone(c));
                self.channels_down(gone);
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
                QueueReply::Done
            }
        };
        // Deliveries go before releases so that a Release never frees a body a Deliver of the
        // same command still needs.
        let mut deliveries = self.dispatch();
        deliveries.append(&mut fx);
        (reply, deliveries)
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
        self.channels_down(|c| c.conn.run.node == node);
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

    fn make_ready(&mut self, id: MsgId) {
        if let Some(m) = self.messages.get(&id) {
            self.ready_bytes += m.meta.size;
            self.ready.insert(id);
        }
    }

    fn take_ready(&mut self) -> Option<MsgId> {
        let id = self.ready.pop_first()?;
        if let Some(m) = self.messages.get(&id) {
            self.ready_bytes = self.ready_bytes.saturating_sub(m.meta.size);
        }
        Some(id)
    }

    fn consume(
        &mut self,
        consumer: ConsumerKey,
        prefetch: u32,
        no_ack: bool,
        exclusive: bool,
    ) -> QueueReply {
        if let Some(existing) = self.consumers.get(&consumer) {
            // The same request again (a resend after a leader change) is not a reuse.
            if existing.prefetch == prefetch
                && existing.no_ack == no_ack
                && existing.exclusive == exclusive
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
        self.consumers.insert(
            consumer.clone(),
            ConsumerState {
                prefetch,
                in_flight: 0,
                no_ack,
                exclusive,
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

    /// Drops settled messages for good and asks the adapter to free their bodies.
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

    fn return_message(&mut self, id: MsgId) {
        if let Some(m) = self.messages.get_mut(&id) {
            m.delivery_count = m.delivery_count.saturating_add(1);
            self.make_ready(id);
        }
    }

    fn get(&mut self, channel: ChannelRef, no_ack: bool, fx: &mut Vec<Effect>) -> QueueReply {
        let Some(id) = self.take_ready() else {
            return QueueReply::GetEmpty;
        };
        let delivery_count = self.messages.get(&id).map_or(0, |m| m.delivery_count);
        if no_ack {
            self.messages.remove(&id);
            fx.push(Effect::Release { msgs: vec![id] });
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
            remaining: self.ready.len() as u64,
        }
    }

    /// Returns the messages and drops the consumers of the channels `gone` matches; true when
    /// that removed the queue's last consumer.
    fn channels_down(&mut self, gone: impl Fn(&ChannelRef) -> bool) -> bool {
        let returned: Vec<MsgId> = self
            .checked_out
            .iter()
            .filter(|(_, c)| gone(&c.channel))
            .map(|(id, _)| *id)
            .collect();
        for id in returned {
            self.checked_out.remove(&id);
            self.return_message(id);
        }
        let had_consumers = !self.consumers.is_empty();
        self.consumers.retain(|k, _| !gone(&k.channel));
        self.rotation.retain(|k| !gone(&k.channel));
        had_consumers && self.consumers.is_empty()
    }

    /// Hands ready messages to consumers with credit, round-robin, until either runs out.
    fn dispatch(&mut self) -> Vec<Effect> {
        let mut fx = Vec::new();
        let mut released = Vec::new();
        'outer: while !self.ready.is_empty() {
            let mut tries = self.rotation.len();
            let key = loop {
                if tries == 0 {
                    break 'outer;
                }
                tries -= 1;
                let Some(key) = self.rotation.pop_front() else {
                    break 'outer;
                };
                self.rotation.push_back(key.clone());
                if self
                    .consumers
                    .get(&key)
                    .is_some_and(ConsumerState::has_credit)
                {
                    break key;
                }
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
                self.messages.remove(&id);
                released.push(id);
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
        if !released.is_empty() {
            fx.push(Effect::Release { msgs: released });
        }
        fx
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
