//! Paging of a deep queue's ready messages to disk, so that a queue's memory (and its
//! snapshots, and so a node's restart time) stays bounded however long its backlog.
//!
//! A queue with a page window keeps at most about that many ready messages in memory. A
//! publish that arrives when the window is full, or when older messages of its priority are
//! on disk already, is paged out: the state keeps only counters per priority level, and the
//! `PageOut` effect asks the adapter to store the message's index entry next to its body.
//! When the window runs low (or a higher priority waits on disk), the state asks its leader
//! for the next entries of a level (`WantPageIn`); the leader reads them from its disk and
//! proposes `QueueCmd::PageIn` carrying them, so every replica takes the same entries back
//! from the log, never from its own disk, and replaying the log gives the same state. A
//! `PageIn` is numbered per level; one that a purge or an earlier page-in overtook is
//! ignored. Only fresh publishes are paged out (their ids grow), so a level's entries on disk
//! are always the ones a page-in reads first. Neighbours: the rest of the queue state machine
//! (`queue.rs`); the cluster crate's queue state machine stores the entries.

use std::cmp::Reverse;

use serde::{Deserialize, Serialize};

use super::{Effect, Message, MessageMeta, QueueState};
use crate::ids::MsgId;

/// A paged-out message's index entry, as the adapter stores it and a page-in brings it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedEntry {
    pub meta: MessageMeta,
    pub expires_at: Option<u64>,
}

/// The ready messages of one priority level that are on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PagedLevel {
    pub(super) count: u64,
    pub(super) bytes: u64,
    /// Page-ins applied to this level, or cancelled by a purge: the number the next page-in
    /// must carry. Levels are kept once created so the numbering never restarts.
    pub(super) page_ins: u64,
    /// Every entry of the level on disk has an id at least this: where a page-in starts
    /// reading, past the entries taken back before (whose deletions a store may still have
    /// to skip).
    pub(super) from: MsgId,
}

impl QueueState {
    /// Ready messages beyond `window` stay on disk (0: everything in memory, the default).
    /// Set once by the adapter when it creates the state; snapshots keep it.
    pub fn with_page_window(mut self, window: u32) -> Self {
        self.page_window = window;
        self
    }

    /// Whether fresh publishes may go to disk. Not under drop-head length limits: those drop
    /// the oldest ready messages at once, which must then be in memory (the limit bounds the
    /// queue anyway). Entries paged before such a limit came into force are dropped as they
    /// come back.
    fn pages_out(&self) -> bool {
        self.page_window > 0
            && !(self.config.overflow == super::Overflow::DropHead
                && (self.config.max_length.is_some() || self.config.max_length_bytes.is_some()))
    }

    /// Ready messages on disk.
    pub(super) fn paged_count(&self) -> u64 {
        self.paged.values().map(|l| l.count).sum()
    }

    /// Makes a freshly published message ready, in memory or on disk.
    pub(super) fn make_ready_fresh(&mut self, id: MsgId, fx: &mut Vec<Effect>) {
        let Some(m) = self.messages.get(&id) else {
            return;
        };
        let priority = m.meta.priority;
        let behind_paged = self.paged.get(&priority).is_some_and(|l| l.count > 0);
        let full = self.ready.len() >= self.page_window as usize;
        if !self.pages_out() || !(behind_paged || full) {
            self.make_ready(id);
            return;
        }
        let Some(m) = self.messages.remove(&id) else {
            return;
        };
        let level = self.paged.entry(priority).or_default();
        level.count += 1;
        level.bytes += m.meta.size;
        self.ready_bytes += m.meta.size;
        fx.push(Effect::PageOut {
            priority,
            msg: id,
            entry: PagedEntry {
                meta: m.meta,
                expires_at: m.expires_at,
            },
        });
    }

    pub(super) fn page_in(
        &mut self,
        priority: u8,
        seq: u64,
        entries: Vec<(MsgId, PagedEntry)>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(level) = self.paged.get_mut(&priority) else {
            return;
        };
        if level.page_ins != seq {
            return;
        }
        level.page_ins += 1;
        if let Some(last) = entries.iter().map(|(id, _)| *id).max() {
            level.from = level.from.max(last + 1);
        }
        let mut taken = Vec::with_capacity(entries.len());
        for (id, entry) in entries {
            if level.count == 0 || self.messages.contains_key(&id) {
                continue;
            }
            level.count -= 1;
            level.bytes = level.bytes.saturating_sub(entry.meta.size);
            self.messages.insert(
                id,
                Message {
                    meta: entry.meta,
                    delivery_count: 0,
                    expires_at: entry.expires_at,
                },
            );
            // Its bytes are counted in `ready_bytes` already.
            self.ready.insert((Reverse(priority), id));
            taken.push(id);
        }
        if !taken.is_empty() {
            fx.push(Effect::Unpage {
                priority,
                msgs: taken,
            });
        }
    }

    /// A purge drops the paged messages with the rest; their count for purge-ok.
    pub(super) fn purge_paged(&mut self, fx: &mut Vec<Effect>) -> u64 {
        let mut purged = 0;
        let next = self.next_msg;
        for (priority, level) in self.paged.iter_mut() {
            if level.count == 0 {
                continue;
            }
            purged += level.count;
            level.count = 0;
            level.bytes = 0;
            level.page_ins += 1;
            level.from = next;
            fx.push(Effect::DropPaged {
                priority: *priority,
            });
        }
        purged
    }

    /// The level whose entries the queue wants back, with the number its page-in must carry:
    /// the highest priority on disk, when the window is running low or that priority is
    /// above everything in memory.
    pub(super) fn page_in_wanted(&self) -> Option<Effect> {
        if self.page_window == 0 {
            return None;
        }
        let (&priority, level) = self.paged.iter().rev().find(|(_, l)| l.count > 0)?;
        let low = self.ready.len() < (self.page_window as usize / 2).max(1);
        let outranked = self
            .ready
            .first()
            .is_none_or(|(Reverse(top), _)| priority > *top);
        (low || outranked).then_some(Effect::WantPageIn {
            priority,
            seq: level.page_ins,
            from: level.from,
        })
    }

    /// Bytes of the paged levels, for the invariants of the tests.
    #[cfg(test)]
    pub(super) fn paged_bytes(&self) -> u64 {
        self.paged.values().map(|l| l.bytes).sum()
    }

    #[cfg(test)]
    pub(super) fn paged_levels(&self) -> std::collections::BTreeMap<u8, (u64, u64)> {
        self.paged
            .iter()
            .map(|(p, l)| (*p, (l.count, l.page_ins)))
            .collect()
    }
}
