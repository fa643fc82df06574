//! A queue's side of an atomic transaction commit (ADR 0005): staged work, kept aside until
//! the transaction's outcome arrives, then applied or dropped.
//!
//! A commit spans several queues, each its own Raft group, so the committing connection
//! first stages its publishes and settlements in every queue, then has the metadata group
//! decide (the first decision for a transaction wins), then resolves every queue. Until the
//! resolution a staged publish is invisible (not ready, not counted, no TTL running) and a
//! message a staged settlement names stays out with its channel, even when that channel goes
//! down, so that a commit either happens everywhere or nowhere. The queue records which
//! transactions lost their coordinator (its node went down or restarted), so the adapter can
//! have them decided without waiting. Neighbours: the rest of the queue state machine
//! (`queue.rs`), the metadata's decisions (`meta.rs`).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{DeadLetterReason, Effect, MessageMeta, QueueReply, QueueState};
use crate::ids::{ChannelRef, MsgId, TxId};

/// How many resolved transactions a queue remembers. A late copy of a stage arrives within
/// seconds of its transaction's resolution; thousands of commits in between would be needed
/// for it to be taken again.
const RESOLVED_TXS_KEPT: usize = 4096;

/// What one stage of a transaction carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxWork {
    /// A publish routed to this queue; its body travels with the command as an enqueue's.
    Publish { meta: MessageMeta },
    /// Acknowledgements, rejections or requeues of messages out with the transaction's
    /// channel.
    Settle { how: TxSettle, msgs: Vec<MsgId> },
}

/// The settlement a transaction applies at commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxSettle {
    /// basic.ack: the messages are done.
    Ack,
    /// basic.nack / basic.reject with requeue.
    Requeue,
    /// basic.nack / basic.reject without requeue: dead-lettered (reason `rejected`) or dropped.
    Discard,
}

/// A transaction staged here and not yet resolved, as the adapter sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingTx {
    pub tx: TxId,
    /// When its first stage was applied (the leader's clock).
    pub staged_at_ms: u64,
    /// Its coordinator's node went down or restarted: nobody may come to resolve it.
    pub orphaned: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StagedTx {
    pub(super) staged_at_ms: u64,
    pub(super) parts: BTreeSet<u32>,
    pub(super) publishes: Vec<(MsgId, MessageMeta)>,
    pub(super) settlements: Vec<(TxSettle, Vec<MsgId>)>,
    /// The transaction's channel went down while it was staged: on abort, the messages its
    /// settlements held come back to the queue instead of staying out with the channel.
    pub(super) channel_gone: bool,
    orphaned: bool,
}

impl QueueState {
    pub(super) fn tx_stage(
        &mut self,
        tx: TxId,
        part: u32,
        work: TxWork,
        now_ms: u64,
    ) -> QueueReply {
        if self.resolved_txs.contains(&tx) {
            return QueueReply::Duplicate;
        }
        let staged = self.staged.entry(tx).or_insert_with(|| StagedTx {
            staged_at_ms: now_ms,
            ..StagedTx::default()
        });
        if !staged.parts.insert(part) {
            return QueueReply::Duplicate;
        }
        match work {
            TxWork::Publish { meta } => {
                let id = self.next_msg;
                self.next_msg += 1;
                staged.publishes.push((id, meta));
                QueueReply::Staged { msg: Some(id) }
            }
            TxWork::Settle { how, msgs } => {
                staged.settlements.push((how, msgs));
                QueueReply::Staged { msg: None }
            }
        }
    }

    pub(super) fn tx_resolve(&mut self, tx: TxId, commit: bool, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.resolved_txs.insert(tx) {
            self.resolved_order.push_back(tx);
            if self.resolved_order.len() > RESOLVED_TXS_KEPT
                && let Some(oldest) = self.resolved_order.pop_front()
            {
                self.resolved_txs.remove(&oldest);
            }
        }
        let Some(staged) = self.staged.remove(&tx) else {
            return;
        };
        if commit {
            for (id, meta) in staged.publishes {
                // Limits apply at commit, as to any publish; a refused one's body goes.
                if self.refuses(meta.size) {
                    fx.push(Effect::Release { msgs: vec![id] });
                } else {
                    self.admit(id, meta, now_ms, false, fx);
                }
            }
            for (how, msgs) in staged.settlements {
                let taken = self.take_checked_out(&tx.channel, &msgs);
                match how {
                    TxSettle::Ack => self.forget(taken, fx),
                    TxSettle::Requeue => {
                        for id in taken {
                            self.return_message(id, fx);
                        }
                    }
                    TxSettle::Discard => {
                        for id in taken {
                            self.dead_letter(id, DeadLetterReason::Rejected, fx);
                        }
                    }
                }
            }
        } else {
            let bodies: Vec<MsgId> = staged.publishes.iter().map(|(id, _)| *id).collect();
            if !bodies.is_empty() {
                fx.push(Effect::Release { msgs: bodies });
            }
            // Rolled back, the settlements never happened: the messages stay out with their
            // channel, or come back if it is gone.
            if staged.channel_gone {
                for (_, msgs) in staged.settlements {
                    for id in self.take_checked_out(&tx.channel, &msgs) {
                        self.return_message(id, fx);
                    }
                }
            }
        }
    }

    /// Marks the transactions of channels that are now gone and returns the messages their
    /// staged settlements hold.
    pub(super) fn tx_channels_gone(
        &mut self,
        gone: &impl Fn(&ChannelRef) -> bool,
    ) -> BTreeSet<MsgId> {
        let mut held = BTreeSet::new();
        for (tx, staged) in self.staged.iter_mut() {
            if gone(&tx.channel) {
                staged.channel_gone = true;
                for (_, msgs) in &staged.settlements {
                    held.extend(msgs.iter().copied());
                }
            }
        }
        held
    }

    /// Marks the transactions whose coordinator's node is down or restarted.
    pub(super) fn tx_orphaned(&mut self, gone: impl Fn(&ChannelRef) -> bool) {
        for (tx, staged) in self.staged.iter_mut() {
            if gone(&tx.channel) {
                staged.orphaned = true;
            }
        }
    }

    pub(super) fn staged_message_ids(&self) -> impl Iterator<Item = MsgId> + '_ {
        self.staged
            .values()
            .flat_map(|s| s.publishes.iter().map(|(id, _)| *id))
    }

    /// Transactions staged here and not yet resolved, oldest first by id.
    pub fn pending_txs(&self) -> Vec<PendingTx> {
        self.staged
            .iter()
            .map(|(tx, s)| PendingTx {
                tx: *tx,
                staged_at_ms: s.staged_at_ms,
                orphaned: s.orphaned,
            })
            .collect()
    }
}
