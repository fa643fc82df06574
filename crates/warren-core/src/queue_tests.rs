//! Tests of the queue state machine: named scenarios for the AMQP rules, and a model-based
//! property test that drives random command sequences and checks the invariants after every
//! step (nothing lost or duplicated, prefetch respected, work-conserving dispatch, replay from a
//! snapshot equals direct application).

use super::*;
use crate::ids::{ConnectionRef, NodeRun};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn channel(n: u16) -> ChannelRef {
    ChannelRef {
        conn: ConnectionRef {
            run: NodeRun {
                node: 1,
                incarnation: 1,
            },
            conn: 1,
        },
        channel: n,
        opened: 1,
    }
}

fn consumer(ch: u16, tag: &str) -> ConsumerKey {
    ConsumerKey {
        channel: channel(ch),
        tag: tag.to_owned(),
    }
}

fn enqueue(q: &mut QueueState) -> (MsgId, Vec<Effect>) {
    match q.apply(
        QueueCmd::Enqueue {
            meta: MessageMeta {
                size: 10,
                ..Default::default()
            },
            publisher: None,
        },
        0,
    ) {
        (QueueReply::Enqueued { msg }, fx) => (msg, fx),
        other => panic!("unexpected {other:?}"),
    }
}

fn delivered(fx: &[Effect]) -> Vec<(String, MsgId, u32)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Deliver {
                consumer,
                msg,
                delivery_count,
                resend: false,
                ..
            } => Some((consumer.tag.clone(), *msg, *delivery_count)),
            _ => None,
        })
        .collect()
}

fn consume(q: &mut QueueState, c: &ConsumerKey, prefetch: u32) -> Vec<Effect> {
    let (reply, fx) = q.apply(
        QueueCmd::Consume {
            consumer: c.clone(),
            prefetch,
            no_ack: false,
            exclusive: false,
            priority: 0,
        },
        0,
    );
    assert_eq!(reply, QueueReply::Done);
    fx
}

#[test]
fn prefetch_one_waits_for_ack() {
    let mut q = QueueState::new();
    let c = consumer(1, "c");
    consume(&mut q, &c, 1);
    let (a, fx) = enqueue(&mut q);
    assert_eq!(delivered(&fx), vec![("c".into(), a, 0)]);
    let (b, fx) = enqueue(&mut q);
    assert!(
        delivered(&fx).is_empty(),
        "prefetch 1 must hold the second message"
    );
    let (_, fx) = q.apply(
        QueueCmd::Settle {
            channel: channel(1),
            msgs: vec![a],
        },
        0,
    );
    assert_eq!(delivered(&fx), vec![("c".into(), b, 0)]);
    assert!(fx.contains(&Effect::Release { msgs: vec![a] }));
}

#[test]
fn round_robin_between_consumers() {
    let mut q = QueueState::new();
    consume(&mut q, &consumer(1, "a"), 0);
    consume(&mut q, &consumer(1, "b"), 0);
    let tags: Vec<String> = (0..4)
        .flat_map(|_| delivered(&enqueue(&mut q).1))
        .map(|(t, _, _)| t)
        .collect();
    assert_eq!(tags, vec!["a", "b", "a", "b"]);
}

#[test]
fn requeue_redelivers_in_original_order_with_count() {
    let mut q = QueueState::new();
    let ids: Vec<MsgId> = (0..3).map(|_| enqueue(&mut q).0).collect();
    let c = consumer(1, "c");
    let fx = consume(&mut q, &c, 0);
    assert_eq!(delivered(&fx).len(), 3);
    let (_, fx) = q.apply(
        QueueCmd::Cancel {
            consumer: c.clone(),
        },
        0,
    );
    assert_eq!(fx, vec![Effect::LastConsumerGone]);
    // Unsettled messages stay with the channel after cancel, and can be requeued later.
    assert_eq!(q.checked_out_to(&channel(1)), ids);
    q.apply(
        QueueCmd::Requeue {
            channel: channel(1),
            msgs: vec![ids[2], ids[0]],
        },
        0,
    );
    let fx = consume(&mut q, &consumer(2, "d"), 0);
    assert_eq!(
        delivered(&fx),
        vec![("d".into(), ids[0], 1), ("d".into(), ids[2], 1)]
    );
}

#[test]
fn channel_down_returns_everything_and_removes_consumers() {
    let mut q = QueueState::new();
    let c = consumer(1, "c");
    consume(&mut q, &c, 2);
    let a = enqueue(&mut q).0;
    let b = enqueue(&mut q).0;
    let (_, fx) = q.apply(
        QueueCmd::ChannelDown {
            channel: channel(1),
        },
        0,
    );
    assert_eq!(fx, vec![Effect::LastConsumerGone]);
    assert!(q.is_ready(a) && q.is_ready(b));
    assert_eq!(q.stats().consumers, 0);
    match q.apply(
        QueueCmd::Get {
            channel: channel(2),
            no_ack: true,
        },
        0,
    ) {
        (
            QueueReply::GetOk {
                msg,
                delivery_count,
                remaining,
            },
            fx,
        ) => {
            assert_eq!((msg, delivery_count, remaining), (a, 1, 1));
            assert_eq!(fx, vec![Effect::Release { msgs: vec![a] }]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn node_restart_returns_messages_of_earlier_runs_only() {
    let mut q = QueueState::new();
    let old = consumer(1, "old");
    consume(&mut q, &old, 0);
    let a = enqueue(&mut q).0;
    let newer = ConsumerKey {
        channel: ChannelRef {
            conn: ConnectionRef {
                run: NodeRun {
                    node: 1,
                    incarnation: 2,
                },
                conn: 9,
            },
            channel: 1,
            opened: 1,
        },
        tag: "new".into(),
    };
    consume(&mut q, &newer, 0);
    let (_, fx) = q.apply(
        QueueCmd::NodeRestarted {
            run: NodeRun {
                node: 1,
                incarnation: 2,
            },
        },
        0,
    );
    // The message of the dead run goes straight to the live consumer, marked redelivered.
    assert_eq!(delivered(&fx), vec![("new".into(), a, 1)]);
    assert!(q.consumer(&old).is_none());
}

#[test]
fn exclusive_consumer_and_tag_reuse_are_refused() {
    let mut q = QueueState::new();
    let (r, _) = q.apply(
        QueueCmd::Consume {
            consumer: consumer(1, "x"),
            prefetch: 0,
            no_ack: false,
            exclusive: true,
            priority: 0,
        },
        0,
    );
    assert_eq!(r, QueueReply::Done);
    let (r, _) = q.apply(
        QueueCmd::Consume {
            consumer: consumer(2, "y"),
            prefetch: 0,
            no_ack: false,
            exclusive: false,
            priority: 0,
        },
        0,
    );
    assert!(matches!(r, QueueReply::Error(e) if e.code == 403));
    // The same consume again is a resend and succeeds; the tag with other settings is a reuse.
    let (r, _) = q.apply(
        QueueCmd::Consume {
            consumer: consumer(1, "x"),
            prefetch: 0,
            no_ack: false,
            exclusive: true,
            priority: 0,
        },
        0,
    );
    assert_eq!(r, QueueReply::Done);
    let (r, _) = q.apply(
        QueueCmd::Consume {
            consumer: consumer(1, "x"),
            prefetch: 5,
            no_ack: false,
            exclusive: true,
            priority: 0,
        },
        0,
    );
    assert!(matches!(r, QueueReply::Error(e) if e.code == 530));
}

#[test]
fn purge_drops_ready_but_not_unacked() {
    let mut q = QueueState::new();
    let a = enqueue(&mut q).0;
    let _ = q.apply(
        QueueCmd::Get {
            channel: channel(1),
            no_ack: false,
        },
        0,
    );
    let b = enqueue(&mut q).0;
    let c = enqueue(&mut q).0;
    let (r, fx) = q.apply(QueueCmd::Purge, 0);
    assert_eq!(r, QueueReply::Purged { count: 2 });
    assert_eq!(fx, vec![Effect::Release { msgs: vec![b, c] }]);
    assert_eq!(q.checked_out_to(&channel(1)), vec![a]);
    assert_eq!(q.stats().ready, 0);
}

#[test]
fn stale_settle_is_ignored() {
    let mut q = QueueState::new();
    let a = enqueue(&mut q).0;
    let _ = q.apply(
        QueueCmd::Get {
            channel: channel(1),
            no_ack: false,
        },
        0,
    );
    // Another channel cannot settle what channel 1 holds.
    let (_, fx) = q.apply(
        QueueCmd::Settle {
            channel: channel(2),
            msgs: vec![a, 999],
        },
        0,
    );
    assert!(fx.is_empty());
    assert_eq!(q.checked_out_to(&channel(1)), vec![a]);
}

// ---- model-based property test ----

#[derive(Clone, Debug)]
enum Op {
    Enqueue {
        priority: u8,
        ttl: Option<u64>,
    },
    Consume {
        who: usize,
        prefetch: u32,
        no_ack: bool,
        priority: i32,
    },
    Cancel {
        who: usize,
    },
    Settle {
        ch: u16,
        pick: Vec<usize>,
    },
    Requeue {
        ch: u16,
        pick: Vec<usize>,
    },
    Discard {
        ch: u16,
        pick: Vec<usize>,
    },
    Get {
        ch: u16,
        no_ack: bool,
    },
    Purge,
    ChannelDown {
        ch: u16,
    },
    LeaderRecovery,
    Configure(QueueConfig),
    /// Time passes by this many milliseconds.
    Tick(u64),
    DeadLettered {
        pick: Vec<usize>,
    },
    Snapshot,
    /// A publish staged by transaction `t` of channel 1.
    TxPublish {
        t: u64,
    },
    /// Settlements of messages out with channel 1, staged by its transaction `t`.
    TxSettle {
        t: u64,
        how: TxSettle,
        pick: Vec<usize>,
    },
    TxResolve {
        t: u64,
        commit: bool,
    },
    /// The leader answers the queue's latest `WantPageIn` with up to this many entries read
    /// from the simulated disk.
    PageIn {
        max: usize,
    },
}

const CONSUMERS: [(u16, &str); 4] = [(1, "a"), (1, "b"), (2, "c"), (3, "d")];

fn config() -> impl Strategy<Value = QueueConfig> {
    (
        proptest::option::of(1u64..50),
        proptest::option::of(1u64..6),
        proptest::option::of(1u64..40),
        prop_oneof![
            Just(Overflow::DropHead),
            Just(Overflow::RejectPublish),
            Just(Overflow::RejectPublishDlx)
        ],
        any::<bool>(),
        proptest::option::of(0u32..3),
        proptest::option::of(1u8..5),
        proptest::bool::weighted(0.2),
        proptest::option::of(1u64..100),
    )
        .prop_map(
            |(
                ttl,
                max_length,
                max_bytes,
                overflow,
                dead_letter,
                limit,
                max_priority,
                sac,
                expires,
            )| {
                QueueConfig {
                    message_ttl: ttl,
                    max_length,
                    max_length_bytes: max_bytes,
                    overflow,
                    dead_letter,
                    delivery_limit: limit,
                    max_priority,
                    single_active_consumer: sac,
                    expires,
                }
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let pick = proptest::collection::vec(0usize..8, 0..4);
    prop_oneof![
        6 => (0u8..6, proptest::option::of(0u64..60))
            .prop_map(|(priority, ttl)| Op::Enqueue { priority, ttl }),
        2 => (0usize..4, 0u32..4, proptest::bool::weighted(0.2), -1i32..2)
            .prop_map(|(who, prefetch, no_ack, priority)| Op::Consume { who, prefetch, no_ack, priority }),
        1 => (0usize..4).prop_map(|who| Op::Cancel { who }),
        4 => (1u16..4, pick.clone()).prop_map(|(ch, pick)| Op::Settle { ch, pick }),
        2 => (1u16..4, pick.clone()).prop_map(|(ch, pick)| Op::Requeue { ch, pick }),
        1 => (1u16..4, pick.clone()).prop_map(|(ch, pick)| Op::Discard { ch, pick }),
        2 => (1u16..4, any::<bool>()).prop_map(|(ch, no_ack)| Op::Get { ch, no_ack }),
        1 => Just(Op::Purge),
        1 => (1u16..4).prop_map(|ch| Op::ChannelDown { ch }),
        1 => Just(Op::LeaderRecovery),
        1 => config().prop_map(Op::Configure),
        2 => (0u64..40).prop_map(Op::Tick),
        2 => pick.prop_map(|pick| Op::DeadLettered { pick }),
        1 => Just(Op::Snapshot),
        2 => (0u64..2).prop_map(|t| Op::TxPublish { t }),
        2 => (
            0u64..2,
            prop_oneof![Just(TxSettle::Ack), Just(TxSettle::Requeue), Just(TxSettle::Discard)],
            proptest::collection::vec(0usize..8, 0..4),
        )
            .prop_map(|(t, how, pick)| Op::TxSettle { t, how, pick }),
        2 => (0u64..2, any::<bool>()).prop_map(|(t, commit)| Op::TxResolve { t, commit }),
        3 => (1usize..4).prop_map(|max| Op::PageIn { max }),
    ]
}

fn to_cmd(q: &QueueState, model: &Model, op: &Op) -> Option<QueueCmd> {
    let picks = |ch: u16, pick: &[usize]| {
        let held = q.checked_out_to(&channel(ch));
        let mut msgs: Vec<MsgId> = pick.iter().filter_map(|i| held.get(*i).copied()).collect();
        msgs.dedup();
        msgs
    };
    Some(match op {
        Op::Enqueue { priority, ttl } => QueueCmd::Enqueue {
            meta: MessageMeta {
                size: 3,
                priority: *priority,
                ttl: *ttl,
            },
            publisher: None,
        },
        Op::Consume {
            who,
            prefetch,
            no_ack,
            priority,
        } => {
            let (ch, tag) = CONSUMERS[*who];
            QueueCmd::Consume {
                consumer: consumer(ch, tag),
                prefetch: *prefetch,
                no_ack: *no_ack,
                exclusive: false,
                priority: *priority,
            }
        }
        Op::Cancel { who } => {
            let (ch, tag) = CONSUMERS[*who];
            QueueCmd::Cancel {
                consumer: consumer(ch, tag),
            }
        }
        Op::Settle { ch, pick } => QueueCmd::Settle {
            channel: channel(*ch),
            msgs: picks(*ch, pick),
        },
        Op::Requeue { ch, pick } => QueueCmd::Requeue {
            channel: channel(*ch),
            msgs: picks(*ch, pick),
        },
        Op::Discard { ch, pick } => QueueCmd::Discard {
            channel: channel(*ch),
            msgs: picks(*ch, pick),
        },
        Op::Get { ch, no_ack } => QueueCmd::Get {
            channel: channel(*ch),
            no_ack: *no_ack,
        },
        Op::Purge => QueueCmd::Purge,
        Op::ChannelDown { ch } => QueueCmd::ChannelDown {
            channel: channel(*ch),
        },
        Op::LeaderRecovery => QueueCmd::LeaderRecovery { down: vec![] },
        Op::Configure(config) => QueueCmd::Configure {
            config: config.clone(),
            version: 1,
        },
        Op::Tick(_) => QueueCmd::Tick,
        Op::DeadLettered { pick } => {
            let dying: Vec<MsgId> = q.dead_lettering.keys().copied().collect();
            QueueCmd::DeadLettered {
                msgs: pick.iter().filter_map(|i| dying.get(*i).copied()).collect(),
            }
        }
        Op::Snapshot => return None,
        Op::TxPublish { t } => {
            let tx = model_tx(q, *t);
            QueueCmd::TxStage {
                tx,
                part: next_part(q, &tx),
                work: TxWork::Publish {
                    meta: MessageMeta {
                        size: 3,
                        ..Default::default()
                    },
                },
            }
        }
        Op::TxSettle { t, how, pick } => {
            let tx = model_tx(q, *t);
            QueueCmd::TxStage {
                tx,
                part: next_part(q, &tx),
                work: TxWork::Settle {
                    how: *how,
                    msgs: picks(1, pick),
                },
            }
        }
        Op::TxResolve { t, commit } => QueueCmd::TxResolve {
            tx: model_tx(q, *t),
            commit: *commit,
        },
        Op::PageIn { max } => {
            let (priority, seq) = model.wanted?;
            QueueCmd::PageIn {
                priority,
                seq,
                entries: model
                    .disk
                    .range((priority, 0)..=(priority, MsgId::MAX))
                    .take(*max)
                    .map(|((_, id), e)| (*id, *e))
                    .collect(),
            }
        }
    })
}

/// Transaction `t` of channel 1; a resolved transaction is followed by a fresh one.
fn model_tx(q: &QueueState, t: u64) -> TxId {
    TxId {
        channel: channel(1),
        commit: q.resolved_order.len() as u64 * 2 + t,
    }
}

fn next_part(q: &QueueState, tx: &TxId) -> u32 {
    q.staged.get(tx).map_or(0, |s| s.parts.len() as u32)
}

/// What a transaction's resolution settles and returns, worked out before it applies: the
/// settlements of a commit (the first naming a message wins), or on an abort after the
/// channel went down, everything its settlements held.
fn tx_outcome(q: &QueueState, tx: &TxId, commit: bool) -> (BTreeSet<MsgId>, BTreeSet<MsgId>) {
    let (mut settled, mut returned) = (BTreeSet::new(), BTreeSet::new());
    let Some(staged) = q.staged.get(tx) else {
        return (settled, returned);
    };
    let mut out: BTreeSet<MsgId> = q.checked_out_to(&tx.channel).into_iter().collect();
    for (how, msgs) in &staged.settlements {
        for m in msgs {
            if !out.remove(m) {
                continue;
            }
            if !commit {
                if staged.channel_gone {
                    returned.insert(*m);
                }
            } else if *how == TxSettle::Requeue {
                returned.insert(*m);
            } else {
                settled.insert(*m);
            }
        }
    }
    (settled, returned)
}

/// What an observer outside the state machine knows: which messages exist, which are out
/// with a channel, which are on their way to the dead-letter exchange.
#[derive(Default)]
struct Model {
    live: BTreeSet<MsgId>,
    out: BTreeSet<MsgId>,
    dying: BTreeSet<MsgId>,
    returned: BTreeMap<MsgId, u32>,
    /// Publishes staged by transactions not yet resolved.
    staged: BTreeSet<MsgId>,
    /// What the adapter would hold on disk for paged-out messages, by (priority, id).
    disk: BTreeMap<(u8, MsgId), PagedEntry>,
    /// The page-in the queue asked for in its last command.
    wanted: Option<(u8, u64)>,
    now: u64,
}

fn check_invariants(q: &QueueState) -> Result<(), TestCaseError> {
    for id in q.messages.keys() {
        let ready = q.ready.iter().any(|(_, r)| r == id);
        let out = q.checked_out.contains_key(id);
        let dying = q.dead_lettering.contains_key(id);
        prop_assert!(
            u8::from(ready) + u8::from(out) + u8::from(dying) == 1,
            "message {id} must be exactly one of ready/out/dead-lettering"
        );
    }
    prop_assert_eq!(
        q.ready.len() + q.checked_out.len() + q.dead_lettering.len(),
        q.messages.len()
    );
    for (prio, id) in &q.ready {
        prop_assert_eq!(prio.0, q.messages[id].meta.priority, "ready key of {}", id);
    }
    let bytes: u64 = q.ready.iter().map(|(_, id)| q.messages[id].meta.size).sum();
    prop_assert_eq!(bytes + q.paged_bytes(), q.ready_bytes);
    // Drop-head limits are enforced on what is in memory: messages paged out before the
    // limit came into force are dropped when they come back.
    if q.config.overflow == Overflow::DropHead && q.paged_count() == 0 {
        if let Some(max) = q.config.max_length {
            prop_assert!(q.ready.len() as u64 <= max, "over x-max-length");
        }
        if let Some(max) = q.config.max_length_bytes {
            prop_assert!(q.ready_bytes <= max.max(3), "over x-max-length-bytes");
        }
    }
    for (key, c) in &q.consumers {
        let held = q
            .checked_out
            .values()
            .filter(|o| o.channel == key.channel && o.consumer.as_deref() == Some(&key.tag))
            .count() as u32;
        prop_assert_eq!(held, c.in_flight, "in-flight count of {:?}", key);
        if c.prefetch > 0 && !c.no_ack {
            prop_assert!(c.in_flight <= c.prefetch, "prefetch exceeded for {:?}", key);
        }
    }
    // Work-conserving: nothing ready while a consumer that may take it has credit.
    if !q.ready.is_empty() {
        let eligible: Vec<&ConsumerState> = if q.config.single_active_consumer {
            q.consumers
                .values()
                .min_by_key(|c| c.order)
                .into_iter()
                .collect()
        } else {
            q.consumers.values().collect()
        };
        for c in eligible {
            prop_assert!(
                !c.has_credit(),
                "an eligible consumer idles while messages are ready"
            );
        }
    }
    prop_assert_eq!(q.rotation.len(), q.consumers.len());
    Ok(())
}

fn step(
    q: &mut QueueState,
    model: &mut Model,
    cmd: QueueCmd,
) -> Result<Vec<Effect>, TestCaseError> {
    // Paged-out messages are ready too, on disk.
    let ready_before: BTreeSet<MsgId> = q
        .ready
        .iter()
        .map(|(_, id)| *id)
        .chain(model.disk.keys().map(|(_, id)| *id))
        .collect();
    let priority_before: BTreeMap<MsgId, u8> = q
        .messages
        .iter()
        .map(|(id, m)| (*id, m.meta.priority))
        .collect();
    // Only what the channel really holds comes back, each message once.
    let requeued: BTreeSet<MsgId> = match &cmd {
        QueueCmd::Requeue { channel, msgs } => {
            let held: BTreeSet<MsgId> = q.checked_out_to(channel).into_iter().collect();
            msgs.iter().copied().filter(|m| held.contains(m)).collect()
        }
        QueueCmd::ChannelDown { channel } => {
            // Except what a staged transaction of the channel settles: it waits for it.
            let held: BTreeSet<MsgId> = q
                .staged
                .iter()
                .filter(|(tx, _)| tx.channel == *channel)
                .flat_map(|(_, s)| s.settlements.iter().flat_map(|(_, m)| m.iter().copied()))
                .collect();
            q.checked_out_to(channel)
                .into_iter()
                .filter(|m| !held.contains(m))
                .collect()
        }
        QueueCmd::TxResolve { tx, commit } => tx_outcome(q, tx, *commit).1,
        _ => BTreeSet::new(),
    };
    let rejected_or_settled: BTreeSet<MsgId> = match &cmd {
        QueueCmd::Settle { channel, msgs } | QueueCmd::Discard { channel, msgs } => {
            let held: BTreeSet<MsgId> = q.checked_out_to(channel).into_iter().collect();
            msgs.iter().copied().filter(|m| held.contains(m)).collect()
        }
        QueueCmd::TxResolve { tx, commit } => tx_outcome(q, tx, *commit).0,
        _ => BTreeSet::new(),
    };
    let committed: BTreeSet<MsgId> = match &cmd {
        QueueCmd::TxResolve { tx, commit: true } => q
            .staged
            .get(tx)
            .map(|s| s.publishes.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default(),
        _ => BTreeSet::new(),
    };
    let next_id = q.next_msg;
    let (reply, fx) = q.apply(cmd, model.now);
    let mut enqueued = None;
    match reply {
        QueueReply::Enqueued { msg } => {
            prop_assert!(model.live.insert(msg), "id reused");
            enqueued = Some(msg);
        }
        QueueReply::Rejected { msg } => {
            // reject-publish-dlx keeps the refused message until its dead-letter commits.
            prop_assert_eq!(msg.is_some(), q.messages.contains_key(&next_id));
            if let Some(msg) = msg {
                prop_assert_eq!(msg, next_id);
                prop_assert!(model.live.insert(msg));
            }
        }
        QueueReply::Staged { msg: Some(msg) } => {
            prop_assert_eq!(msg, next_id);
            prop_assert!(!q.messages.contains_key(&msg), "staged {msg} is visible");
            prop_assert!(model.staged.insert(msg), "id reused");
        }
        _ => {}
    }
    // Committed publishes join the queue (a refused one is released below).
    for id in &committed {
        prop_assert!(model.staged.remove(id));
        prop_assert!(model.live.insert(*id), "committed {id} twice");
    }
    for id in requeued.iter().chain(&rejected_or_settled) {
        model.out.remove(id);
    }
    for id in &requeued {
        *model.returned.entry(*id).or_default() += 1;
    }
    let mut took = vec![];
    if let QueueReply::GetOk {
        msg,
        delivery_count,
        ..
    } = reply
    {
        took.push((msg, delivery_count));
    }
    for e in &fx {
        match e {
            Effect::Deliver {
                msg,
                delivery_count,
                resend: false,
                ..
            } => took.push((*msg, *delivery_count)),
            // A resend repeats a delivery that is still out, with its count unchanged.
            Effect::Deliver {
                msg,
                delivery_count,
                resend: true,
                ..
            } => {
                prop_assert!(model.out.contains(msg), "resent {msg}, which is not out");
                prop_assert_eq!(
                    *delivery_count,
                    model.returned.get(msg).copied().unwrap_or(0)
                );
            }
            Effect::DeadLetter { msg, .. } => {
                prop_assert!(model.live.contains(msg), "dead-lettered unknown {msg}");
                prop_assert!(!model.out.contains(msg), "dead-lettered {msg} while out");
                model.dying.insert(*msg);
            }
            _ => {}
        }
    }
    for (msg, count) in &took {
        prop_assert!(model.live.contains(msg), "delivered unknown {msg}");
        prop_assert!(
            !model.dying.contains(msg),
            "delivered {msg} while dead-lettering"
        );
        prop_assert!(model.out.insert(*msg), "delivered {msg} twice");
        let became_ready =
            Some(*msg) == enqueued || requeued.contains(msg) || committed.contains(msg);
        prop_assert!(
            ready_before.contains(msg) || became_ready,
            "{msg} was not ready"
        );
        prop_assert_eq!(*count, model.returned.get(msg).copied().unwrap_or(0));
    }
    // Deliveries of one command take the highest-priority, then lowest, ready ids first.
    for (msg, _) in &took {
        let key = priority_before
            .get(msg)
            .or_else(|| q.messages.get(msg).map(|m| &m.meta.priority))
            .map(|p| (Reverse(*p), *msg));
        if let (Some(key), Some(lowest_left)) = (key, q.ready.first()) {
            prop_assert!(
                key < *lowest_left,
                "{msg} delivered before ready {lowest_left:?}"
            );
        }
    }
    for e in &fx {
        if let Effect::Release { msgs } = e {
            for m in msgs {
                prop_assert!(
                    model.live.remove(m) || model.staged.remove(m),
                    "released {m} twice or unknown"
                );
                model.out.remove(m);
                model.dying.remove(m);
                prop_assert!(!q.messages.contains_key(m), "released {m} still held");
            }
        }
    }
    // Every live message is held by the state, every held message is live.
    model.wanted = None;
    for e in &fx {
        match e {
            Effect::PageOut {
                priority,
                msg,
                entry,
            } => {
                prop_assert!(!q.messages.contains_key(msg), "paged-out {msg} still held");
                prop_assert!(model.disk.insert((*priority, *msg), *entry).is_none());
            }
            Effect::Unpage { priority, msgs } => {
                // Back in memory (and maybe delivered, expired or dropped at once).
                for m in msgs {
                    prop_assert!(model.disk.remove(&(*priority, *m)).is_some());
                }
            }
            Effect::DropPaged { priority } => {
                let dropped: Vec<(u8, MsgId)> = model
                    .disk
                    .range((*priority, 0)..=(*priority, MsgId::MAX))
                    .map(|(k, _)| *k)
                    .collect();
                for k in dropped {
                    model.disk.remove(&k);
                    prop_assert!(model.live.remove(&k.1));
                }
            }
            Effect::WantPageIn {
                priority,
                seq,
                from,
            } => {
                // Every entry of the level on disk is at `from` or after.
                prop_assert!(
                    model
                        .disk
                        .range((*priority, 0)..(*priority, *from))
                        .next()
                        .is_none(),
                    "entries of level {priority} below {from}"
                );
                model.wanted = Some((*priority, *seq));
            }
            _ => {}
        }
    }
    // The paged levels count exactly what is on disk.
    let mut on_disk: BTreeMap<u8, u64> = BTreeMap::new();
    for (p, _) in model.disk.keys() {
        *on_disk.entry(*p).or_default() += 1;
    }
    let counted: BTreeMap<u8, u64> = q
        .paged_levels()
        .into_iter()
        .filter(|(_, (count, _))| *count > 0)
        .map(|(p, (count, _))| (p, count))
        .collect();
    prop_assert_eq!(on_disk, counted);
    let held: BTreeSet<MsgId> = q
        .messages
        .keys()
        .copied()
        .chain(model.disk.keys().map(|(_, id)| *id))
        .collect();
    prop_assert_eq!(&held, &model.live);
    let out: BTreeSet<MsgId> = q.checked_out.keys().copied().collect();
    prop_assert_eq!(&out, &model.out);
    let dying: BTreeSet<MsgId> = q.dead_lettering.keys().copied().collect();
    prop_assert_eq!(&dying, &model.dying);
    let staged: BTreeSet<MsgId> = q.staged_message_ids().collect();
    prop_assert_eq!(&staged, &model.staged);
    check_invariants(q)?;
    Ok(fx)
}

fn roundtrip(q: &QueueState) -> QueueState {
    let bytes = postcard::to_allocvec(q).expect("encode");
    postcard::from_bytes(&bytes).expect("decode")
}

fn run_sequence(mut q: QueueState, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    // A replica that restores from a snapshot at every Snapshot op must stay identical.
    let mut replica = q.clone();
    for op in ops {
        if let Op::Tick(advance) = op {
            model.now += advance;
        }
        if let Op::Snapshot = op {
            replica = roundtrip(&q);
            prop_assert_eq!(&replica, &q);
            continue;
        }
        let Some(cmd) = to_cmd(&q, &model, op) else {
            continue;
        };
        let fx = step(&mut q, &mut model, cmd.clone())?;
        let (_, replica_fx) = replica.apply(cmd, model.now);
        prop_assert_eq!(fx, replica_fx);
    }
    prop_assert_eq!(&replica, &q);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_sequences_keep_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        run_sequence(QueueState::new(), &ops)?;
    }

    /// The same with a page window of 3: most ready messages go to disk and come back.
    #[test]
    fn random_sequences_with_paging_keep_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        run_sequence(QueueState::new().with_page_window(3), &ops)?;
    }
}

// ---- queue arguments ----

fn configured(config: QueueConfig) -> QueueState {
    QueueState::with_config(config)
}

fn put(q: &mut QueueState, meta: MessageMeta, now: u64) -> (QueueReply, Vec<Effect>) {
    q.apply(
        QueueCmd::Enqueue {
            meta,
            publisher: None,
        },
        now,
    )
}

fn sized(size: u64) -> MessageMeta {
    MessageMeta {
        size,
        ..Default::default()
    }
}

fn dead_letters(fx: &[Effect]) -> Vec<(MsgId, DeadLetterReason)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::DeadLetter { msg, reason, .. } => Some((*msg, *reason)),
            _ => None,
        })
        .collect()
}

fn released(fx: &[Effect]) -> Vec<MsgId> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Release { msgs } => Some(msgs.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn message_ttl_expires_at_the_head_and_arms_a_timer() {
    let mut q = configured(QueueConfig {
        message_ttl: Some(100),
        ..Default::default()
    });
    let (_, fx) = put(&mut q, sized(1), 1_000);
    assert!(fx.contains(&Effect::Timer { at: 1_100 }));
    // A per-message expiration shorter than the queue's wins.
    let short = MessageMeta {
        size: 1,
        ttl: Some(10),
        ..Default::default()
    };
    put(&mut q, short, 1_000);
    let (_, fx) = q.apply(QueueCmd::Tick, 1_050);
    assert!(released(&fx).is_empty(), "the head has not expired yet");
    let (_, fx) = q.apply(QueueCmd::Tick, 1_100);
    // Both go: the first at its time, the second (already past its own) right behind it.
    assert_eq!(released(&fx), vec![0, 1]);
    assert_eq!(q.stats().ready, 0);
    assert!(!fx.iter().any(|e| matches!(e, Effect::Timer { .. })));
}

#[test]
fn expired_messages_go_to_the_dead_letter_exchange_once_committed() {
    let mut q = configured(QueueConfig {
        message_ttl: Some(5),
        dead_letter: true,
        ..Default::default()
    });
    put(&mut q, sized(1), 0);
    let (_, fx) = q.apply(QueueCmd::Tick, 10);
    assert_eq!(dead_letters(&fx), vec![(0, DeadLetterReason::Expired)]);
    assert!(
        released(&fx).is_empty(),
        "kept until the target committed it"
    );
    // A new leader publishes it again; the target recognises the repeat by its seq.
    let (_, fx) = q.apply(QueueCmd::LeaderRecovery { down: vec![] }, 11);
    assert_eq!(dead_letters(&fx), vec![(0, DeadLetterReason::Expired)]);
    let (_, fx) = q.apply(QueueCmd::DeadLettered { msgs: vec![0] }, 12);
    assert_eq!(released(&fx), vec![0]);
    let (_, fx) = q.apply(QueueCmd::DeadLettered { msgs: vec![0] }, 13);
    assert!(
        released(&fx).is_empty(),
        "a repeated confirmation changes nothing"
    );
}

#[test]
fn max_length_drop_head_and_reject_publish() {
    let mut q = configured(QueueConfig {
        max_length: Some(2),
        dead_letter: true,
        ..Default::default()
    });
    put(&mut q, sized(1), 0);
    put(&mut q, sized(1), 0);
    let (reply, fx) = put(&mut q, sized(1), 0);
    assert!(matches!(reply, QueueReply::Enqueued { msg: 2 }));
    assert_eq!(dead_letters(&fx), vec![(0, DeadLetterReason::MaxLen)]);
    assert_eq!(q.stats().ready, 2);

    let mut q = configured(QueueConfig {
        max_length_bytes: Some(10),
        overflow: Overflow::RejectPublish,
        ..Default::default()
    });
    assert!(matches!(
        put(&mut q, sized(6), 0).0,
        QueueReply::Enqueued { .. }
    ));
    assert_eq!(
        put(&mut q, sized(6), 0).0,
        QueueReply::Rejected { msg: None }
    );
    assert_eq!(q.stats().ready, 1);

    let mut q = configured(QueueConfig {
        max_length: Some(1),
        overflow: Overflow::RejectPublishDlx,
        dead_letter: true,
        ..Default::default()
    });
    put(&mut q, sized(1), 0);
    let (reply, fx) = put(&mut q, sized(1), 0);
    assert_eq!(reply, QueueReply::Rejected { msg: Some(1) });
    assert_eq!(dead_letters(&fx), vec![(1, DeadLetterReason::MaxLen)]);
    assert_eq!(q.stats().ready, 1);
}

#[test]
fn delivery_limit_dead_letters_poison_messages() {
    let mut q = configured(QueueConfig {
        delivery_limit: Some(1),
        dead_letter: true,
        ..Default::default()
    });
    let a = enqueue(&mut q).0;
    for round in 0..2 {
        let (reply, _) = q.apply(
            QueueCmd::Get {
                channel: channel(1),
                no_ack: false,
            },
            0,
        );
        assert!(
            matches!(reply, QueueReply::GetOk { delivery_count, .. } if delivery_count == round)
        );
        let (_, fx) = q.apply(
            QueueCmd::Requeue {
                channel: channel(1),
                msgs: vec![a],
            },
            0,
        );
        if round == 1 {
            assert_eq!(
                dead_letters(&fx),
                vec![(a, DeadLetterReason::DeliveryLimit)]
            );
        } else {
            assert!(dead_letters(&fx).is_empty());
        }
    }
    assert_eq!(q.stats().ready, 0);
}

#[test]
fn rejected_messages_are_dead_lettered_or_dropped() {
    for dead_letter in [true, false] {
        let mut q = configured(QueueConfig {
            dead_letter,
            ..Default::default()
        });
        let a = enqueue(&mut q).0;
        q.apply(
            QueueCmd::Get {
                channel: channel(1),
                no_ack: false,
            },
            0,
        );
        let (_, fx) = q.apply(
            QueueCmd::Discard {
                channel: channel(1),
                msgs: vec![a],
            },
            0,
        );
        if dead_letter {
            assert_eq!(dead_letters(&fx), vec![(a, DeadLetterReason::Rejected)]);
        } else {
            assert_eq!(released(&fx), vec![a]);
        }
    }
}

#[test]
fn priorities_deliver_highest_first_and_cap_at_the_maximum() {
    let mut q = configured(QueueConfig {
        max_priority: Some(5),
        ..Default::default()
    });
    for p in [1u8, 9, 3, 0] {
        put(
            &mut q,
            MessageMeta {
                size: 1,
                priority: p,
                ..Default::default()
            },
            0,
        );
    }
    let fx = consume(&mut q, &consumer(1, "c"), 0);
    let order: Vec<MsgId> = delivered(&fx).into_iter().map(|(_, m, _)| m).collect();
    // 9 is capped at 5 and still comes first; equal priorities keep their order.
    assert_eq!(order, vec![1, 2, 0, 3]);
}

#[test]
fn without_max_priority_messages_keep_arrival_order() {
    let mut q = QueueState::new();
    for p in [1u8, 9] {
        put(
            &mut q,
            MessageMeta {
                size: 1,
                priority: p,
                ..Default::default()
            },
            0,
        );
    }
    let fx = consume(&mut q, &consumer(1, "c"), 0);
    let order: Vec<MsgId> = delivered(&fx).into_iter().map(|(_, m, _)| m).collect();
    assert_eq!(order, vec![0, 1]);
}

#[test]
fn single_active_consumer_hands_over_on_cancel() {
    let mut q = configured(QueueConfig {
        single_active_consumer: true,
        ..Default::default()
    });
    consume(&mut q, &consumer(1, "first"), 0);
    consume(&mut q, &consumer(2, "second"), 0);
    let tags: Vec<String> = (0..3)
        .flat_map(|_| delivered(&enqueue(&mut q).1))
        .map(|(t, _, _)| t)
        .collect();
    assert_eq!(tags, vec!["first"; 3]);
    q.apply(
        QueueCmd::Cancel {
            consumer: consumer(1, "first"),
        },
        0,
    );
    let (_, fx) = enqueue(&mut q);
    assert_eq!(delivered(&fx)[0].0, "second");
}

#[test]
fn higher_priority_consumers_are_served_first() {
    let mut q = QueueState::new();
    let (reply, _) = q.apply(
        QueueCmd::Consume {
            consumer: consumer(1, "low"),
            prefetch: 0,
            no_ack: false,
            exclusive: false,
            priority: 0,
        },
        0,
    );
    assert_eq!(reply, QueueReply::Done);
    q.apply(
        QueueCmd::Consume {
            consumer: consumer(2, "high"),
            prefetch: 2,
            no_ack: false,
            exclusive: false,
            priority: 10,
        },
        0,
    );
    let tags: Vec<String> = (0..4)
        .flat_map(|_| delivered(&enqueue(&mut q).1))
        .map(|(t, _, _)| t)
        .collect();
    // The high-priority consumer takes what its prefetch allows; the rest go to the other.
    assert_eq!(tags, vec!["high", "high", "low", "low"]);
}

#[test]
fn arguments_are_validated_like_rabbitmq() {
    use warren_codec::{FieldTable, FieldValue, LongStr, ShortStr};
    let args = |pairs: &[(&str, FieldValue)]| {
        let mut t = FieldTable::new();
        for (k, v) in pairs {
            t.insert(ShortStr::try_from(*k).unwrap(), v.clone());
        }
        t
    };
    let c = QueueConfig::from_arguments(&args(&[
        ("x-message-ttl", FieldValue::I32(60_000)),
        ("x-max-length", FieldValue::I64(10)),
        (
            "x-overflow",
            FieldValue::LongStr(LongStr::from("reject-publish-dlx")),
        ),
        (
            "x-dead-letter-exchange",
            FieldValue::LongStr(LongStr::from("dlx")),
        ),
        ("x-delivery-limit", FieldValue::U8(3)),
        ("x-max-priority", FieldValue::U8(10)),
        ("x-single-active-consumer", FieldValue::Bool(true)),
    ]))
    .unwrap();
    assert_eq!(c.message_ttl, Some(60_000));
    assert_eq!(c.overflow, Overflow::RejectPublishDlx);
    assert!(c.dead_letter && c.single_active_consumer);
    assert_eq!((c.delivery_limit, c.max_priority), (Some(3), Some(10)));
    for bad in [
        args(&[("x-message-ttl", FieldValue::I32(-1))]),
        args(&[("x-message-ttl", FieldValue::LongStr(LongStr::from("x")))]),
        args(&[("x-overflow", FieldValue::LongStr(LongStr::from("explode")))]),
        args(&[("x-max-priority", FieldValue::I32(300))]),
        args(&[("x-single-active-consumer", FieldValue::I32(1))]),
        args(&[("x-dead-letter-exchange", FieldValue::I32(1))]),
    ] {
        let e = QueueConfig::from_arguments(&bad).unwrap_err();
        assert_eq!(e.code, 406, "{bad:?}");
    }
}

#[test]
fn an_unused_queue_expires_after_x_expires() {
    let mut q = configured(QueueConfig {
        expires: Some(1000),
        ..Default::default()
    });
    let (_, fx) = q.apply(QueueCmd::Touch, 5_000);
    assert!(fx.contains(&Effect::Timer { at: 6_000 }), "{fx:?}");
    let (_, fx) = q.apply(QueueCmd::Tick, 5_999);
    assert!(!fx.contains(&Effect::QueueExpired));
    // A basic.get counts as use and moves the deadline.
    let ch = channel(1);
    q.apply(
        QueueCmd::Get {
            channel: ch,
            no_ack: true,
        },
        5_500,
    );
    let (_, fx) = q.apply(QueueCmd::Tick, 6_000);
    assert!(!fx.contains(&Effect::QueueExpired), "{fx:?}");
    let (_, fx) = q.apply(QueueCmd::Tick, 6_500);
    assert!(fx.contains(&Effect::QueueExpired), "{fx:?}");
    let (_, fx) = q.apply(QueueCmd::Tick, 7_000);
    assert!(!fx.contains(&Effect::QueueExpired), "emitted once");
}

#[test]
fn a_queue_with_consumers_never_expires() {
    let mut q = configured(QueueConfig {
        expires: Some(1000),
        ..Default::default()
    });
    q.apply(
        QueueCmd::Consume {
            consumer: consumer(1, "c"),
            prefetch: 0,
            no_ack: false,
            exclusive: false,
            priority: 0,
        },
        1_000,
    );
    let (_, fx) = q.apply(QueueCmd::Tick, 100_000);
    assert!(!fx.contains(&Effect::QueueExpired));
    let (_, fx) = q.apply(
        QueueCmd::Cancel {
            consumer: consumer(1, "c"),
        },
        100_000,
    );
    assert!(fx.contains(&Effect::Timer { at: 101_000 }), "{fx:?}");
    let (_, fx) = q.apply(QueueCmd::Tick, 101_000);
    assert!(fx.contains(&Effect::QueueExpired));
}

#[test]
fn x_expires_must_be_positive() {
    let mut args = warren_codec::FieldTable::new();
    args.insert(
        warren_codec::ShortStr::from_static("x-expires"),
        warren_codec::FieldValue::I64(0),
    );
    assert!(QueueConfig::from_arguments(&args).is_err());
}

/// The queue takes a publisher's numbers in rising order and treats a lower one as a resend
/// of a publish already taken. So whoever submits must never let a later publish be taken
/// before an earlier one that may still be resent (the proposer keeps one batch in flight:
/// with more, a refused batch resent after the next one was taken lost its publishes).
#[test]
fn a_publish_numbered_below_the_highest_taken_is_a_resend() {
    let mut q = QueueState::default();
    let publish = |q: &mut QueueState, seq| {
        let cmd = QueueCmd::Enqueue {
            meta: MessageMeta {
                size: 10,
                ..Default::default()
            },
            publisher: Some(Publisher {
                id: PublisherId::Channel(channel(1)),
                seq,
            }),
        };
        matches!(q.apply(cmd, 0).0, QueueReply::Enqueued { .. })
    };
    assert!(publish(&mut q, 1));
    assert!(publish(&mut q, 3));
    assert!(!publish(&mut q, 2));
    assert!(!publish(&mut q, 3));
    assert!(publish(&mut q, 4));
    assert_eq!(q.message_ids().count(), 3);
}

#[test]
fn a_configure_older_than_the_config_in_force_is_ignored() {
    let mut q = QueueState::new();
    let configure = |q: &mut QueueState, max_length, version| {
        let config = QueueConfig {
            max_length: Some(max_length),
            ..QueueConfig::default()
        };
        q.apply(QueueCmd::Configure { config, version }, 0);
    };
    configure(&mut q, 10, 7);
    // A previous leader's Configure, computed from an older policy, arrives late.
    configure(&mut q, 3, 5);
    assert_eq!(q.config().max_length, Some(10));
    // The same version again (a new leader re-applying it) and newer ones apply.
    configure(&mut q, 10, 7);
    configure(&mut q, 20, 8);
    assert_eq!(q.config().max_length, Some(20));
}

/// Found by the chaos partition nemesis (seed 8): a publish whose first send had an unknown
/// outcome was resent, its channel then closed, and a late copy arrived after the
/// ChannelDown: the queue had forgotten the channel's numbering and enqueued it again.
#[test]
fn a_publish_arriving_after_its_channel_is_down_is_a_resend() {
    let mut q = QueueState::default();
    let publish = |q: &mut QueueState, ch: u16, seq| {
        let cmd = QueueCmd::Enqueue {
            meta: MessageMeta {
                size: 10,
                ..Default::default()
            },
            publisher: Some(Publisher {
                id: PublisherId::Channel(channel(ch)),
                seq,
            }),
        };
        matches!(q.apply(cmd, 0).0, QueueReply::Enqueued { .. })
    };
    assert!(publish(&mut q, 1, 1));
    q.apply(
        QueueCmd::ChannelDown {
            channel: channel(1),
        },
        0,
    );
    assert!(!publish(&mut q, 1, 1), "a late copy of the publish taken");
    assert!(
        !publish(&mut q, 1, 2),
        "nothing new comes from a closed channel"
    );
    assert_eq!(q.message_ids().count(), 1);
    // Other channels are unaffected, and only the last closed channels are remembered.
    for ch in 2..(2 + 4200) {
        assert!(publish(&mut q, ch, 1));
        q.apply(
            QueueCmd::ChannelDown {
                channel: channel(ch),
            },
            0,
        );
    }
    assert!(
        !publish(&mut q, 4000, 1),
        "a recently closed channel is still known"
    );
    assert!(
        publish(&mut q, 1, 1),
        "the oldest closed channels are forgotten"
    );
}

// ---- transactions (ADR 0005) ----

fn tx(ch: u16, commit: u64) -> TxId {
    TxId {
        channel: channel(ch),
        commit,
    }
}

fn stage_publish(q: &mut QueueState, t: TxId, part: u32) -> MsgId {
    match q.apply(
        QueueCmd::TxStage {
            tx: t,
            part,
            work: TxWork::Publish { meta: sized(10) },
        },
        0,
    ) {
        (QueueReply::Staged { msg: Some(msg) }, fx) => {
            assert!(fx.is_empty(), "a stage has no effect: {fx:?}");
            msg
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn resolve(q: &mut QueueState, t: TxId, commit: bool) -> Vec<Effect> {
    let (reply, fx) = q.apply(QueueCmd::TxResolve { tx: t, commit }, 0);
    assert_eq!(reply, QueueReply::Done);
    fx
}

#[test]
fn a_staged_publish_is_invisible_until_its_commit() {
    let mut q = QueueState::new();
    let c = consumer(2, "c");
    consume(&mut q, &c, 0);
    let a = stage_publish(&mut q, tx(1, 1), 0);
    let b = stage_publish(&mut q, tx(1, 1), 1);
    assert_eq!(q.stats().ready + q.stats().unacked, 0);
    // Its body must travel with a snapshot all the same.
    assert_eq!(q.message_ids().collect::<Vec<_>>(), vec![a, b]);
    assert_eq!(q.pending_txs().len(), 1);
    let fx = resolve(&mut q, tx(1, 1), true);
    assert_eq!(
        delivered(&fx),
        vec![("c".to_owned(), a, 0), ("c".to_owned(), b, 0)]
    );
    assert!(q.pending_txs().is_empty());
}

#[test]
fn an_aborted_transaction_releases_its_staged_bodies() {
    let mut q = QueueState::new();
    let a = stage_publish(&mut q, tx(1, 1), 0);
    let fx = resolve(&mut q, tx(1, 1), false);
    assert_eq!(fx, vec![Effect::Release { msgs: vec![a] }]);
    assert_eq!(q.message_ids().count(), 0);
    assert_eq!(q.stats().ready, 0);
}

#[test]
fn a_resent_stage_and_a_stage_after_resolution_are_refused() {
    let mut q = QueueState::new();
    stage_publish(&mut q, tx(1, 1), 0);
    let again = QueueCmd::TxStage {
        tx: tx(1, 1),
        part: 0,
        work: TxWork::Publish { meta: sized(10) },
    };
    assert_eq!(q.apply(again.clone(), 0).0, QueueReply::Duplicate);
    resolve(&mut q, tx(1, 1), true);
    assert_eq!(q.apply(again, 0).0, QueueReply::Duplicate);
    let late = QueueCmd::TxStage {
        tx: tx(1, 1),
        part: 7,
        work: TxWork::Publish { meta: sized(10) },
    };
    assert_eq!(q.apply(late, 0).0, QueueReply::Duplicate);
    assert_eq!(q.stats().ready, 1);
    // A second resolution changes nothing.
    assert!(resolve(&mut q, tx(1, 1), false).is_empty());
    assert_eq!(q.stats().ready, 1);
}

#[test]
fn limits_apply_to_staged_publishes_at_commit() {
    let mut q = configured(QueueConfig {
        max_length: Some(1),
        overflow: Overflow::RejectPublish,
        ..Default::default()
    });
    let a = stage_publish(&mut q, tx(1, 1), 0);
    let b = stage_publish(&mut q, tx(1, 1), 1);
    let fx = resolve(&mut q, tx(1, 1), true);
    assert!(q.is_ready(a));
    assert_eq!(released(&fx), vec![b]);
}

fn stage_ack(q: &mut QueueState, t: TxId, part: u32, msgs: Vec<MsgId>) {
    let (reply, _) = q.apply(
        QueueCmd::TxStage {
            tx: t,
            part,
            work: TxWork::Settle {
                how: TxSettle::Ack,
                msgs,
            },
        },
        0,
    );
    assert_eq!(reply, QueueReply::Staged { msg: None });
}

#[test]
fn a_committed_ack_settles_even_after_its_channel_went_down() {
    let mut q = QueueState::new();
    let c = consumer(1, "c");
    consume(&mut q, &c, 0);
    let a = enqueue(&mut q).0;
    let b = enqueue(&mut q).0;
    stage_ack(&mut q, tx(1, 1), 0, vec![a]);
    // The channel closes (or its node dies) between the stage and the resolution: the
    // message the transaction acknowledges waits; the other one comes back.
    q.apply(
        QueueCmd::ChannelDown {
            channel: channel(1),
        },
        0,
    );
    assert!(!q.is_ready(a));
    assert!(q.is_ready(b));
    let fx = resolve(&mut q, tx(1, 1), true);
    assert_eq!(released(&fx), vec![a]);
    assert_eq!(q.message_ids().collect::<Vec<_>>(), vec![b]);
}

#[test]
fn an_aborted_ack_returns_the_message_once_its_channel_is_gone() {
    let mut q = QueueState::new();
    let c = consumer(1, "c");
    consume(&mut q, &c, 0);
    let a = enqueue(&mut q).0;
    stage_ack(&mut q, tx(1, 1), 0, vec![a]);
    // Channel alive: a rolled-back ack leaves the message out with it.
    resolve(&mut q, tx(1, 1), false);
    assert_eq!(q.checked_out_to(&channel(1)), vec![a]);
    stage_ack(&mut q, tx(1, 2), 0, vec![a]);
    q.apply(
        QueueCmd::NodeDown {
            node: channel(1).conn.run.node,
        },
        0,
    );
    assert_eq!(
        q.pending_txs(),
        vec![PendingTx {
            tx: tx(1, 2),
            staged_at_ms: 0,
            orphaned: true
        }]
    );
    assert!(!q.is_ready(a));
    resolve(&mut q, tx(1, 2), false);
    assert!(q.is_ready(a));
}

#[test]
fn staged_work_survives_a_snapshot() {
    let mut q = QueueState::new();
    let c = consumer(1, "c");
    consume(&mut q, &c, 0);
    let a = enqueue(&mut q).0;
    stage_ack(&mut q, tx(1, 1), 0, vec![a]);
    let p = stage_publish(&mut q, tx(1, 1), 1);
    let mut restored = roundtrip(&q);
    assert_eq!(restored, q);
    let fx = resolve(&mut restored, tx(1, 1), true);
    assert_eq!(released(&fx), vec![a]);
    assert!(restored.is_ready(p) || restored.checked_out_to(&channel(1)) == vec![p]);
}

// ---- paging (deep queues) ----

fn paged_out(fx: &[Effect]) -> Vec<(MsgId, PagedEntry)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::PageOut { msg, entry, .. } => Some((*msg, *entry)),
            _ => None,
        })
        .collect()
}

fn wanted(fx: &[Effect]) -> Option<(u8, u64)> {
    fx.iter().find_map(|e| match e {
        Effect::WantPageIn { priority, seq, .. } => Some((*priority, *seq)),
        _ => None,
    })
}

#[test]
fn a_deep_queue_keeps_a_window_in_memory_and_pages_in_the_rest_in_order() {
    let mut q = QueueState::new().with_page_window(4);
    let mut disk = Vec::new();
    for _ in 0..10 {
        let (_, fx) = enqueue(&mut q);
        disk.extend(paged_out(&fx));
    }
    assert_eq!(
        disk.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        (4..10).collect::<Vec<_>>()
    );
    assert_eq!(q.stats().ready, 10);
    assert_eq!(q.stats().ready_bytes, 100);
    assert_eq!(q.message_ids().count(), 4, "only the window is in memory");
    // A snapshot holds the window and the counters only.
    assert_eq!(roundtrip(&q), q);
    let c = consumer(1, "c");
    let fx = consume(&mut q, &c, 0);
    assert_eq!(delivered(&fx).len(), 4);
    assert_eq!(wanted(&fx), Some((0, 0)));
    let (_, fx) = q.apply(
        QueueCmd::PageIn {
            priority: 0,
            seq: 0,
            entries: disk[..3].to_vec(),
        },
        0,
    );
    let got: Vec<MsgId> = delivered(&fx).into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(got, vec![4, 5, 6]);
    assert!(fx.contains(&Effect::Unpage {
        priority: 0,
        msgs: vec![4, 5, 6]
    }));
    assert_eq!(wanted(&fx), Some((0, 1)));
    // The same page-in again (a resend) changes nothing.
    let (_, fx) = q.apply(
        QueueCmd::PageIn {
            priority: 0,
            seq: 0,
            entries: disk[..3].to_vec(),
        },
        0,
    );
    assert!(delivered(&fx).is_empty());
    assert_eq!(q.stats().ready, 3);
}

#[test]
fn a_purge_drops_the_paged_messages_and_overtakes_a_page_in() {
    let mut q = QueueState::new().with_page_window(2);
    let mut disk = Vec::new();
    for _ in 0..5 {
        disk.extend(paged_out(&enqueue(&mut q).1));
    }
    let (reply, fx) = q.apply(QueueCmd::Purge, 0);
    assert_eq!(reply, QueueReply::Purged { count: 5 });
    assert!(fx.contains(&Effect::DropPaged { priority: 0 }));
    assert_eq!(q.stats().ready, 0);
    let (_, fx) = q.apply(
        QueueCmd::PageIn {
            priority: 0,
            seq: 0,
            entries: disk,
        },
        0,
    );
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(q.stats().ready, 0);
    // New publishes are in memory again.
    let (id, fx) = enqueue(&mut q);
    assert!(paged_out(&fx).is_empty());
    assert!(q.is_ready(id));
}

#[test]
fn a_higher_priority_on_disk_is_paged_in_before_the_window_drains() {
    let mut q = configured(QueueConfig {
        max_priority: Some(9),
        ..Default::default()
    })
    .with_page_window(2);
    put(&mut q, sized(1), 0);
    put(&mut q, sized(1), 0);
    let urgent = MessageMeta {
        priority: 7,
        ..sized(1)
    };
    let (_, fx) = put(&mut q, urgent, 0);
    assert_eq!(paged_out(&fx).len(), 1);
    assert_eq!(wanted(&fx), Some((7, 0)));
}
