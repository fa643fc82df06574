//! The total-queue checker: reads a history (`history.rs`) after the cluster was healed and
//! drained, and decides whether the broker kept its promises.
//!
//! - **lost**: a publish that was confirmed (`ok`) must have been delivered to, and acked
//!   from, every queue it routes to. A confirmed message that never arrived, or whose every
//!   delivery was answered with a requeue and never came back, is lost.
//! - **unexpected**: a delivery of a message that was never published, or from a queue its
//!   publish does not route to.
//! - **duplicates** are allowed (at-least-once); they are counted, with how many carried
//!   `redelivered = true` and how many came after the message had been acked.
//! - publishes with an unknown outcome (`info`) may or may not appear; nacked or returned
//!   ones (`fail`) are counted when they appear anyway.
//! - **transactions**: the publishes of one transaction (`value.tx` on their invokes) take
//!   effect together: either every (message, queue) pair of the transaction is delivered or
//!   none is. A committed transaction's pairs are checked like confirmed publishes; one whose
//!   commit failed or timed out may go either way, but never in part (**partial**).
//! - **order**: within one consumer connection, the first deliveries of one producer
//!   connection's messages that arrive with `redelivered = false` arrive in publish order.
//!   A later copy of a message arriving without the flag is counted as an unflagged
//!   duplicate instead (the queue held a second copy, or forgot it had delivered it).
//!
//! The checker is pure over the operations so it can be tested on hand-written histories;
//! `run.rs` adds the cluster-level checks (metadata agreement, panics) to the verdict.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::history::{Op, OpType, parse_msg_id};

/// How many examples of each anomaly the summary lists.
const EXAMPLES: usize = 25;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Pending,
    Ok,
    Fail,
    Info,
}

#[derive(Debug)]
struct Publish {
    targets: Vec<String>,
    outcome: Outcome,
    returned: bool,
    node: Option<u64>,
    session: Option<u64>,
    invoked_ms: u64,
    completed_ms: Option<u64>,
    /// The transaction it was published in, if any.
    tx: Option<String>,
}

/// A message the checker found missing, with what is known about its publish.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LostMessage {
    pub msg: String,
    pub queue: String,
    /// Published through this node.
    pub node: Option<u64>,
    pub invoked_ms: u64,
    pub confirmed_ms: Option<u64>,
    /// Deliveries seen of it from this queue (all answered with a requeue).
    pub deliveries: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OrderViolation {
    pub consumer: String,
    pub session: u64,
    pub queue: String,
    /// Producer and its session whose messages went backwards.
    pub producer: u32,
    pub producer_session: u64,
    pub after_seq: u64,
    pub got_seq: u64,
    pub index: u64,
}

/// Everything the checker counted; `lost`, `unexpected` and `order_violations` decide.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CheckResult {
    pub publishes_invoked: usize,
    pub publishes_ok: usize,
    pub publishes_nacked: usize,
    pub publishes_returned: usize,
    pub publishes_info: usize,
    /// Confirmed (message, queue) pairs that must be consumed.
    pub expected_pairs: usize,
    pub deliveries: usize,
    pub distinct_delivered_pairs: usize,
    pub acks_sent: usize,
    pub requeues_sent: usize,
    pub lost: usize,
    /// Lost pairs never delivered at all.
    pub lost_never_delivered: usize,
    /// Lost pairs delivered, but every delivery was requeued and none came back.
    pub lost_after_requeue: usize,
    pub lost_examples: Vec<LostMessage>,
    pub unexpected: usize,
    pub unexpected_examples: Vec<String>,
    /// Deliveries beyond the first of a (message, queue) pair.
    pub duplicates: usize,
    pub duplicates_redelivered_flag: usize,
    /// Repeats of a pair after an ack for it was sent (true at-least-once duplicates).
    pub duplicates_after_ack: usize,
    /// Repeats that arrived with `redelivered = false`.
    pub duplicates_unflagged: usize,
    /// Of those, repeats on the same consumer connection that had the message already:
    /// that node knew it had delivered it, so the missing flag is the broker's doing (a
    /// paused node's stale copy arriving late, on another connection, is not).
    pub duplicates_unflagged_same_session: usize,
    pub unflagged_examples: Vec<String>,
    /// Unknown-outcome publishes that were delivered / never delivered.
    pub info_delivered: usize,
    pub info_not_delivered: usize,
    /// Nacked or returned publishes that were delivered anyway.
    pub failed_but_delivered: usize,
    pub order_violations: usize,
    pub order_examples: Vec<OrderViolation>,
    /// Transactions whose commit was answered commit-ok.
    pub tx_committed: usize,
    /// Transactions with an unknown outcome that took effect / that did not.
    pub tx_unknown_applied: usize,
    pub tx_unknown_dropped: usize,
    /// Transactions of which some pairs were delivered and others not.
    pub tx_partial: usize,
    pub tx_partial_examples: Vec<String>,
}

impl CheckResult {
    /// The history-level verdict.
    pub fn valid(&self) -> bool {
        self.lost == 0 && self.unexpected == 0 && self.order_violations == 0 && self.tx_partial == 0
    }
}

fn push_example<T>(v: &mut Vec<T>, x: T) {
    if v.len() < EXAMPLES {
        v.push(x);
    }
}

/// Checks a whole history.
pub fn check(ops: &[Op]) -> CheckResult {
    let mut r = CheckResult::default();
    let mut pubs: HashMap<&str, Publish> = HashMap::new();
    for op in ops.iter().filter(|o| o.f == "publish") {
        let Some(msg) = op.msg.as_deref() else {
            continue;
        };
        match op.kind {
            Some(OpType::Invoke) => {
                pubs.insert(
                    msg,
                    Publish {
                        targets: op.targets.clone().unwrap_or_default(),
                        outcome: Outcome::Pending,
                        returned: false,
                        node: op.node,
                        session: op.session,
                        invoked_ms: op.time_ms,
                        completed_ms: None,
                        tx: op
                            .value
                            .as_ref()
                            .and_then(|v| v.get("tx"))
                            .and_then(|v| v.as_str())
                            .map(str::to_owned),
                    },
                );
            }
            Some(kind) => {
                if let Some(p) = pubs.get_mut(msg) {
                    p.outcome = match kind {
                        OpType::Ok => Outcome::Ok,
                        OpType::Fail => Outcome::Fail,
                        _ => Outcome::Info,
                    };
                    p.completed_ms = Some(op.time_ms);
                    p.returned = op
                        .value
                        .as_ref()
                        .and_then(|v| v.get("returned"))
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false);
                }
            }
            None => {}
        }
    }
    r.publishes_invoked = pubs.len();
    for p in pubs.values_mut() {
        if p.outcome == Outcome::Pending {
            p.outcome = Outcome::Info;
        }
        match p.outcome {
            Outcome::Ok => r.publishes_ok += 1,
            Outcome::Fail if p.returned => r.publishes_returned += 1,
            Outcome::Fail => r.publishes_nacked += 1,
            _ => r.publishes_info += 1,
        }
    }

    // Per (queue, message): deliveries in history order, and what was sent back for them.
    #[derive(Default)]
    struct PairState {
        deliveries: usize,
        acked: bool,
        requeued: usize,
        /// Consumer connections (process, session) that received the pair.
        sessions: Vec<(String, u64)>,
    }
    let mut pairs: HashMap<(String, String), PairState> = HashMap::new();
    let mut delivered_msgs: HashSet<String> = HashSet::new();
    // Order: (consumer, session, queue, producer, producer session) -> last seq seen.
    let mut last_seq: HashMap<(String, u64, String, u32, u64), u64> = HashMap::new();
    for op in ops {
        match (op.f.as_str(), op.kind) {
            ("deliver", Some(OpType::Ok)) => {
                r.deliveries += 1;
                let queue = op.queue.clone().unwrap_or_default();
                let Some(msg) = op.msg.clone() else {
                    r.unexpected += 1;
                    push_example(
                        &mut r.unexpected_examples,
                        format!(
                            "#{} {} from {queue}: foreign body {}",
                            op.index,
                            op.process,
                            op.value.clone().unwrap_or_default()
                        ),
                    );
                    continue;
                };
                let known = pubs.get(msg.as_str());
                match known {
                    None => {
                        r.unexpected += 1;
                        push_example(
                            &mut r.unexpected_examples,
                            format!("#{} {msg} from {queue}: never published", op.index),
                        );
                        continue;
                    }
                    Some(p) if !p.targets.contains(&queue) => {
                        r.unexpected += 1;
                        push_example(
                            &mut r.unexpected_examples,
                            format!(
                                "#{} {msg} from {queue}: published to {:?} only",
                                op.index, p.targets
                            ),
                        );
                        continue;
                    }
                    Some(_) => {}
                }
                delivered_msgs.insert(msg.clone());
                let redelivered = op.redelivered.unwrap_or(false);
                let st = pairs.entry((queue.clone(), msg.clone())).or_default();
                if st.deliveries > 0 {
                    r.duplicates += 1;
                    if redelivered {
                        r.duplicates_redelivered_flag += 1;
                    } else {
                        r.duplicates_unflagged += 1;
                        let here = (op.process.clone(), op.session.unwrap_or(0));
                        if st.sessions.contains(&here) {
                            r.duplicates_unflagged_same_session += 1;
                        }
                        push_example(
                            &mut r.unflagged_examples,
                            format!(
                                "#{} {msg} from {queue} to {} (delivery {})",
                                op.index,
                                op.process,
                                st.deliveries + 1
                            ),
                        );
                    }
                    if st.acked {
                        r.duplicates_after_ack += 1;
                    }
                }
                st.deliveries += 1;
                st.sessions
                    .push((op.process.clone(), op.session.unwrap_or(0)));
                // Only first deliveries count for order: a repeat without the flag is
                // already counted above (it is a second copy, not a reordering).
                let first = st.deliveries == 1;
                if first
                    && !redelivered
                    && let Some((producer, seq)) = parse_msg_id(&msg)
                {
                    let psession = op
                        .value
                        .as_ref()
                        .and_then(|v| v.get("producer_session"))
                        .and_then(|v| v.as_u64())
                        .unwrap_or(0);
                    let key = (
                        op.process.clone(),
                        op.session.unwrap_or(0),
                        queue.clone(),
                        producer,
                        psession,
                    );
                    if let Some(&last) = last_seq.get(&key)
                        && seq < last
                    {
                        r.order_violations += 1;
                        push_example(
                            &mut r.order_examples,
                            OrderViolation {
                                consumer: op.process.clone(),
                                session: op.session.unwrap_or(0),
                                queue: queue.clone(),
                                producer,
                                producer_session: psession,
                                after_seq: last,
                                got_seq: seq,
                                index: op.index,
                            },
                        );
                    }
                    let e = last_seq.entry(key).or_insert(seq);
                    *e = (*e).max(seq);
                }
            }
            ("ack", Some(OpType::Ok)) => {
                r.acks_sent += 1;
                if let (Some(q), Some(m)) = (&op.queue, &op.msg) {
                    pairs.entry((q.clone(), m.clone())).or_default().acked = true;
                }
            }
            ("nack" | "reject", Some(OpType::Ok)) => {
                r.requeues_sent += 1;
                if let (Some(q), Some(m)) = (&op.queue, &op.msg) {
                    pairs.entry((q.clone(), m.clone())).or_default().requeued += 1;
                }
            }
            _ => {}
        }
    }
    r.distinct_delivered_pairs = pairs.values().filter(|s| s.deliveries > 0).count();

    // Sorted so examples and counts do not depend on hash order.
    let sorted: BTreeMap<&str, &Publish> = pubs.iter().map(|(k, v)| (*k, v)).collect();
    for (msg, p) in sorted {
        let delivered = delivered_msgs.contains(msg);
        match p.outcome {
            Outcome::Info if delivered => r.info_delivered += 1,
            Outcome::Info => r.info_not_delivered += 1,
            Outcome::Fail if delivered => r.failed_but_delivered += 1,
            _ => {}
        }
        if p.outcome != Outcome::Ok {
            continue;
        }
        for q in &p.targets {
            r.expected_pairs += 1;
            let st = pairs.get(&(q.clone(), msg.to_owned()));
            let (deliveries, acked) = st.map(|s| (s.deliveries, s.acked)).unwrap_or((0, false));
            if acked {
                continue;
            }
            r.lost += 1;
            if deliveries == 0 {
                r.lost_never_delivered += 1;
            } else {
                r.lost_after_requeue += 1;
            }
            push_example(
                &mut r.lost_examples,
                LostMessage {
                    msg: msg.to_owned(),
                    queue: q.clone(),
                    node: p.node,
                    invoked_ms: p.invoked_ms,
                    confirmed_ms: p.completed_ms,
                    deliveries,
                },
            );
        }
        let _ = p.session;
    }

    // Transactions: all of their pairs delivered, or none.
    let mut txs: BTreeMap<&str, Vec<(&str, &Publish)>> = BTreeMap::new();
    for (msg, p) in &pubs {
        if let Some(tx) = p.tx.as_deref() {
            txs.entry(tx).or_default().push((msg, p));
        }
    }
    for (tx, msgs) in txs {
        let (mut total, mut delivered) = (0usize, 0usize);
        for (msg, p) in &msgs {
            for q in &p.targets {
                total += 1;
                if pairs
                    .get(&(q.clone(), (*msg).to_owned()))
                    .is_some_and(|s| s.deliveries > 0)
                {
                    delivered += 1;
                }
            }
        }
        let committed = msgs.iter().all(|(_, p)| p.outcome == Outcome::Ok);
        if committed {
            r.tx_committed += 1;
        } else if delivered == 0 {
            r.tx_unknown_dropped += 1;
        } else if delivered == total {
            r.tx_unknown_applied += 1;
        }
        if delivered > 0 && delivered < total {
            r.tx_partial += 1;
            push_example(
                &mut r.tx_partial_examples,
                format!("{tx}: {delivered} of {total} message-queue pairs delivered"),
            );
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(msg: &str, targets: &[&str], outcome: OpType) -> Vec<Op> {
        let t: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
        vec![
            Op::new("producer-1", OpType::Invoke, "publish")
                .msg(msg)
                .targets(&t)
                .session(1),
            Op::new("producer-1", outcome, "publish").msg(msg),
        ]
    }

    fn deliver(consumer: &str, queue: &str, msg: &str, redelivered: bool) -> Op {
        Op::new(consumer, OpType::Ok, "deliver")
            .queue(queue)
            .msg(msg)
            .session(1)
            .redelivered(redelivered)
            .value(serde_json::json!({"producer_session": 1}))
    }

    fn settle(consumer: &str, f: &str, queue: &str, msg: &str) -> Op {
        Op::new(consumer, OpType::Ok, f).queue(queue).msg(msg)
    }

    fn in_tx(msg: &str, targets: &[&str], outcome: OpType, tx: &str) -> Vec<Op> {
        let mut ops = publish(msg, targets, outcome);
        ops[0].value = Some(serde_json::json!({ "tx": tx }));
        ops
    }

    #[test]
    fn a_transaction_takes_effect_whole_or_not_at_all() {
        // t1 committed and fully delivered; t2 unknown and dropped; t3 unknown, half there.
        let mut h = in_tx("p9-1", &["q1"], OpType::Ok, "t1");
        h.extend(in_tx("p9-2", &["q2"], OpType::Ok, "t1"));
        h.extend(in_tx("p9-3", &["q1"], OpType::Info, "t2"));
        h.extend(in_tx("p9-4", &["q2"], OpType::Info, "t2"));
        h.extend(in_tx("p9-5", &["q1"], OpType::Info, "t3"));
        h.extend(in_tx("p9-6", &["q2"], OpType::Info, "t3"));
        for (q, m) in [("q1", "p9-1"), ("q2", "p9-2"), ("q1", "p9-5")] {
            h.push(deliver("c", q, m, false));
            h.push(settle("c", "ack", q, m));
        }
        let r = check(&indexed(h));
        assert_eq!(
            (
                r.tx_committed,
                r.tx_unknown_dropped,
                r.tx_unknown_applied,
                r.tx_partial
            ),
            (1, 1, 0, 1)
        );
        assert!(!r.valid());
        assert_eq!(r.lost, 0);
    }

    fn indexed(mut ops: Vec<Op>) -> Vec<Op> {
        for (i, op) in ops.iter_mut().enumerate() {
            op.index = i as u64;
        }
        ops
    }

    #[test]
    fn confirmed_and_consumed_is_valid() {
        let mut h = publish("p1-1", &["q1"], OpType::Ok);
        h.push(deliver("c", "q1", "p1-1", false));
        h.push(settle("c", "ack", "q1", "p1-1"));
        let r = check(&indexed(h));
        assert!(r.valid(), "{r:?}");
        assert_eq!((r.publishes_ok, r.expected_pairs, r.lost), (1, 1, 0));
    }

    #[test]
    fn a_confirmed_message_never_delivered_is_lost() {
        let h = publish("p1-1", &["q1", "q2"], OpType::Ok);
        let mut h = h;
        h.push(deliver("c", "q1", "p1-1", false));
        h.push(settle("c", "ack", "q1", "p1-1"));
        let r = check(&indexed(h));
        assert!(!r.valid());
        assert_eq!(r.lost, 1);
        assert_eq!(r.lost_never_delivered, 1);
        assert_eq!(r.lost_examples[0].queue, "q2");
    }

    #[test]
    fn a_requeued_message_that_never_returns_is_lost() {
        let mut h = publish("p1-1", &["q1"], OpType::Ok);
        h.push(deliver("c", "q1", "p1-1", false));
        h.push(settle("c", "nack", "q1", "p1-1"));
        let r = check(&indexed(h));
        assert_eq!((r.lost, r.lost_after_requeue), (1, 1));
    }

    #[test]
    fn unknown_and_failed_publishes_may_appear_or_not() {
        let mut h = publish("p1-1", &["q1"], OpType::Info);
        h.extend(publish("p1-2", &["q1"], OpType::Info));
        h.extend(publish("p1-3", &["q1"], OpType::Fail));
        // Invoked with no completion at all: unknown too.
        h.push(
            Op::new("producer-1", OpType::Invoke, "publish")
                .msg("p1-4")
                .targets(&["q1".to_owned()]),
        );
        h.push(deliver("c", "q1", "p1-1", false));
        h.push(deliver("c", "q1", "p1-3", false));
        let r = check(&indexed(h));
        assert!(r.valid(), "{r:?}");
        assert_eq!(r.publishes_info, 3);
        assert_eq!((r.info_delivered, r.info_not_delivered), (1, 2));
        assert_eq!(r.failed_but_delivered, 1);
    }

    #[test]
    fn deliveries_never_published_or_misrouted_are_unexpected() {
        let mut h = publish("p1-1", &["q1"], OpType::Ok);
        h.push(deliver("c", "q1", "p1-1", false));
        h.push(settle("c", "ack", "q1", "p1-1"));
        h.push(deliver("c", "q2", "p1-1", false));
        h.push(deliver("c", "q1", "p9-9", false));
        h.push(
            Op::new("c", OpType::Ok, "deliver")
                .queue("q1")
                .value("junk"),
        );
        let r = check(&indexed(h));
        assert!(!r.valid());
        assert_eq!(r.unexpected, 3);
    }

    #[test]
    fn duplicates_are_counted_with_their_flags() {
        let mut h = publish("p1-1", &["q1"], OpType::Ok);
        h.push(deliver("c", "q1", "p1-1", false));
        h.push(settle("c", "ack", "q1", "p1-1"));
        h.push(deliver("c", "q1", "p1-1", true));
        h.push(deliver("c", "q1", "p1-1", false));
        let r = check(&indexed(h));
        assert!(r.valid(), "{r:?}");
        assert_eq!(r.duplicates, 2);
        assert_eq!(r.duplicates_redelivered_flag, 1);
        assert_eq!(r.duplicates_unflagged, 1);
        assert_eq!(r.duplicates_unflagged_same_session, 1);
        assert_eq!(r.duplicates_after_ack, 2);
    }

    #[test]
    fn first_deliveries_out_of_publish_order_are_an_order_violation() {
        let mut h = publish("p1-1", &["q1"], OpType::Ok);
        h.extend(publish("p1-2", &["q1"], OpType::Ok));
        h.push(deliver("c", "q1", "p1-2", false));
        h.push(deliver("c", "q1", "p1-1", false));
        h.push(settle("c", "ack", "q1", "p1-1"));
        h.push(settle("c", "ack", "q1", "p1-2"));
        let r = check(&indexed(h));
        assert_eq!(r.order_violations, 1);
        assert_eq!(r.lost, 0);
        // Redelivered ones, and other consumers, may come in any order.
        let mut h = publish("p1-1", &["q1"], OpType::Ok);
        h.extend(publish("p1-2", &["q1"], OpType::Ok));
        h.push(deliver("c", "q1", "p1-2", false));
        h.push(deliver("c", "q1", "p1-1", true));
        h.push(deliver("d", "q1", "p1-1", false));
        let r = check(&indexed(h));
        assert_eq!(r.order_violations, 0);
    }

    #[test]
    fn a_second_unflagged_copy_is_a_duplicate_not_a_reordering() {
        let mut h = publish("p1-1", &["q1"], OpType::Ok);
        h.extend(publish("p1-2", &["q1"], OpType::Ok));
        h.push(deliver("c", "q1", "p1-1", false));
        h.push(settle("c", "ack", "q1", "p1-1"));
        h.push(deliver("c", "q1", "p1-2", false));
        h.push(settle("c", "ack", "q1", "p1-2"));
        h.push(deliver("c", "q1", "p1-1", false));
        let r = check(&indexed(h));
        assert_eq!(r.order_violations, 0);
        assert_eq!((r.duplicates_unflagged, r.duplicates_after_ack), (1, 1));
        assert!(r.valid());
    }
}
