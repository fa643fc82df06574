//! Keeping every proposer's commands to a queue in the order it sent them, even when it keeps
//! several batches in the queue's log at once.
//!
//! A proposer (the task in the cluster crate that gets one node's commands for one queue into
//! the queue's Raft log) numbers the commands it sends, 1, 2, 3, … A batch can be refused
//! without being logged (the leader's lease ran out, leadership moved) while the batch behind
//! it is logged a moment later. Taking that later batch would reorder the proposer's commands
//! (and a publisher's resend numbering with them), so the queue refuses any command that does
//! not follow the last one it took from its proposer; the proposer sends the refused batch and
//! everything after it again, in order. A command numbered at or below the last one taken is a
//! resend of a command whose outcome was unknown: it goes through, as every queue command is
//! idempotent on resend (publishes carry their publisher's number).
//!
//! Neighbours: `queue.rs` holds one [`SubmissionOrder`] per queue and drops a node's earlier
//! runs with `NodeRestarted`; the cluster crate stamps an [`Origin`] on each command and
//! answers a refused one by sending it again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::NodeRun;

/// One proposer: a node run and a number unique within it (a queue handle's proposer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProposerId {
    pub run: NodeRun,
    pub serial: u64,
}

/// Who sent a command, and its number among the commands that proposer sent to the queue
/// (from 1, no gaps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub proposer: ProposerId,
    pub seq: u64,
}

/// How many proposers of one node a queue remembers. A node has one proposer per queue at a
/// time; a new one appears when the queue's handle is made again (a redeclaration after a
/// deletion, a replica set change), so a handful is plenty.
const PROPOSERS_KEPT_PER_NODE: usize = 8;

/// The last command number taken from each proposer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmissionOrder {
    last: BTreeMap<ProposerId, u64>,
}

impl SubmissionOrder {
    /// Whether the queue takes a command from `origin`: false when it would skip over a
    /// command of the same proposer not taken yet (the proposer must send that one first).
    pub fn admit(&mut self, origin: Origin) -> bool {
        if let Some(last) = self.last.get_mut(&origin.proposer) {
            if origin.seq <= *last {
                return true;
            }
            if origin.seq == *last + 1 {
                *last = origin.seq;
                return true;
            }
            return false;
        }
        if self.forgotten(origin.proposer) {
            // Older than every proposer kept for its node: a proposer of a queue handle since
            // replaced, with nothing to keep in order against. Its commands go through, as
            // resends do.
            return true;
        }
        if origin.seq != 1 {
            return false;
        }
        self.last.insert(origin.proposer, 1);
        self.trim(origin.proposer.run.node);
        true
    }

    /// A node started again as `run`: proposers of its earlier runs are gone with them.
    pub fn node_restarted(&mut self, run: NodeRun) {
        self.last
            .retain(|p, _| !(p.run.node == run.node && p.run.incarnation < run.incarnation));
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    fn of_node(&self, node: u64) -> impl Iterator<Item = &ProposerId> {
        let from = ProposerId {
            run: NodeRun {
                node,
                incarnation: 0,
            },
            serial: 0,
        };
        self.last
            .range(from..)
            .map(|(p, _)| p)
            .take_while(move |p| p.run.node == node)
    }

    /// True when the node has proposers kept and every one of them is newer than `proposer`.
    fn forgotten(&self, proposer: ProposerId) -> bool {
        self.of_node(proposer.run.node)
            .next()
            .is_some_and(|oldest| *oldest > proposer)
            && self.of_node(proposer.run.node).count() >= PROPOSERS_KEPT_PER_NODE
    }

    fn trim(&mut self, node: u64) {
        while self.of_node(node).count() > PROPOSERS_KEPT_PER_NODE {
            let Some(oldest) = self.of_node(node).next().copied() else {
                return;
            };
            self.last.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn proposer(node: u64, incarnation: u64, serial: u64) -> ProposerId {
        ProposerId {
            run: NodeRun { node, incarnation },
            serial,
        }
    }

    fn origin(p: ProposerId, seq: u64) -> Origin {
        Origin { proposer: p, seq }
    }

    #[test]
    fn a_command_after_a_gap_is_refused_until_the_missing_one_comes() {
        let p = proposer(1, 1, 1);
        let mut order = SubmissionOrder::default();
        assert!(order.admit(origin(p, 1)));
        assert!(!order.admit(origin(p, 3)), "2 was not taken yet");
        assert!(order.admit(origin(p, 2)));
        assert!(order.admit(origin(p, 3)));
    }

    #[test]
    fn a_new_proposer_starts_at_one() {
        let p = proposer(1, 1, 1);
        let mut order = SubmissionOrder::default();
        assert!(!order.admit(origin(p, 2)), "its first batch was refused");
        assert!(order.is_empty());
        assert!(order.admit(origin(p, 1)));
        assert!(order.admit(origin(p, 2)));
    }

    #[test]
    fn a_resend_of_a_command_taken_goes_through() {
        let p = proposer(1, 1, 1);
        let mut order = SubmissionOrder::default();
        for seq in 1..=3 {
            assert!(order.admit(origin(p, seq)));
        }
        assert!(order.admit(origin(p, 2)));
        assert!(order.admit(origin(p, 4)));
    }

    #[test]
    fn a_restart_forgets_the_earlier_runs_of_that_node_only() {
        let mut order = SubmissionOrder::default();
        assert!(order.admit(origin(proposer(1, 1, 1), 1)));
        assert!(order.admit(origin(proposer(2, 1, 1), 1)));
        order.node_restarted(NodeRun {
            node: 1,
            incarnation: 2,
        });
        assert_eq!(order.len(), 1);
        assert!(order.admit(origin(proposer(2, 1, 1), 2)));
    }

    #[test]
    fn a_node_keeps_a_bounded_number_of_proposers_and_lets_forgotten_ones_through() {
        let mut order = SubmissionOrder::default();
        for serial in 1..=20 {
            assert!(order.admit(origin(proposer(1, 1, serial), 1)));
        }
        assert!(order.admit(origin(proposer(2, 1, 1), 1)));
        assert_eq!(order.len(), PROPOSERS_KEPT_PER_NODE + 1);
        // Serial 3 was forgotten: a late command of it is not held back for ever.
        assert!(order.admit(origin(proposer(1, 1, 3), 7)));
        // The newest are still kept in order.
        assert!(!order.admit(origin(proposer(1, 1, 20), 3)));
        // A proposer newer than all of them starts at one.
        assert!(!order.admit(origin(proposer(1, 1, 21), 2)));
    }

    proptest! {
        /// A proposer sends its numbered commands in batches, several at a time; any batch
        /// may be lost before the log (and with it every later batch in flight), or be taken
        /// and its answer lost. Whatever the losses, the commands the queue takes the first
        /// time are exactly 1, 2, 3, … in order, and every command is taken in the end.
        #[test]
        fn every_command_is_taken_once_in_order_whatever_is_lost(
            batches in proptest::collection::vec(1usize..5, 1..30),
            window in 1usize..5,
            losses in proptest::collection::vec(0u8..4, 1..200),
        ) {
            let p = proposer(1, 1, 1);
            let mut order = SubmissionOrder::default();
            let mut next = 1u64;
            // Batches of command numbers, as the proposer forms them.
            let mut unsent: std::collections::VecDeque<Vec<u64>> = batches
                .iter()
                .map(|n| {
                    let b: Vec<u64> = (next..next + *n as u64).collect();
                    next += *n as u64;
                    b
                })
                .collect();
            let total = next - 1;
            let mut first_takes = Vec::new();
            let mut taken_highest = 0u64;
            // The losses run out, as a partition ends: then everything gets through.
            let mut loss = losses.iter();
            let mut rounds = 0;
            while !unsent.is_empty() {
                rounds += 1;
                prop_assert!(rounds < 10_000, "no progress");
                // A window of batches in flight: refusals form a suffix of what was taken
                // at the moment a batch is lost before the log.
                let in_flight: Vec<Vec<u64>> =
                    unsent.iter().take(window).cloned().collect();
                let mut answered_upto = 0usize;
                let mut failed = false;
                for batch in &in_flight {
                    let fate = loss.next().copied().unwrap_or(2);
                    if fate == 0 {
                        // Lost before the log: not applied. Batches behind it may be logged.
                        failed = true;
                        continue;
                    }
                    let mut all_taken = true;
                    for &seq in batch {
                        if order.admit(origin(p, seq)) {
                            if seq > taken_highest {
                                first_takes.push(seq);
                                taken_highest = seq;
                            }
                        } else {
                            all_taken = false;
                        }
                    }
                    // fate 1: applied but the answer was lost, so it is sent again.
                    if all_taken && fate != 1 && !failed {
                        answered_upto += 1;
                    } else {
                        failed = true;
                    }
                }
                for _ in 0..answered_upto {
                    unsent.pop_front();
                }
            }
            prop_assert_eq!(first_takes, (1..=total).collect::<Vec<_>>());
        }
    }
}
