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
    match q.apply(QueueCmd::Enqueue {
        meta: MessageMeta { size: 10 },
        publisher: None,
    }) {
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
    let (reply, fx) = q.apply(QueueCmd::Consume {
        consumer: c.clone(),
        prefetch,
        no_ack: false,
        exclusive: false,
    });
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
    let (_, fx) = q.apply(QueueCmd::Settle {
        channel: channel(1),
        msgs: vec![a],
    });
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
    let (_, fx) = q.apply(QueueCmd::Cancel {
        consumer: c.clone(),
    });
    assert_eq!(fx, vec![Effect::LastConsumerGone]);
    // Unsettled messages stay with the channel after cancel, and can be requeued later.
    assert_eq!(q.checked_out_to(&channel(1)), ids);
    q.apply(QueueCmd::Requeue {
        channel: channel(1),
        msgs: vec![ids[2], ids[0]],
    });
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
    let (_, fx) = q.apply(QueueCmd::ChannelDown {
        channel: channel(1),
    });
    assert_eq!(fx, vec![Effect::LastConsumerGone]);
    assert!(q.is_ready(a) && q.is_ready(b));
    assert_eq!(q.stats().consumers, 0);
    match q.apply(QueueCmd::Get {
        channel: channel(2),
        no_ack: true,
    }) {
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
    let (_, fx) = q.apply(QueueCmd::NodeRestarted {
        run: NodeRun {
            node: 1,
            incarnation: 2,
        },
    });
    // The message of the dead run goes straight to the live consumer, marked redelivered.
    assert_eq!(delivered(&fx), vec![("new".into(), a, 1)]);
    assert!(q.consumer(&old).is_none());
}

#[test]
fn exclusive_consumer_and_tag_reuse_are_refused() {
    let mut q = QueueState::new();
    let (r, _) = q.apply(QueueCmd::Consume {
        consumer: consumer(1, "x"),
        prefetch: 0,
        no_ack: false,
        exclusive: true,
    });
    assert_eq!(r, QueueReply::Done);
    let (r, _) = q.apply(QueueCmd::Consume {
        consumer: consumer(2, "y"),
        prefetch: 0,
        no_ack: false,
        exclusive: false,
    });
    assert!(matches!(r, QueueReply::Error(e) if e.code == 403));
    // The same consume again is a resend and succeeds; the tag with other settings is a reuse.
    let (r, _) = q.apply(QueueCmd::Consume {
        consumer: consumer(1, "x"),
        prefetch: 0,
        no_ack: false,
        exclusive: true,
    });
    assert_eq!(r, QueueReply::Done);
    let (r, _) = q.apply(QueueCmd::Consume {
        consumer: consumer(1, "x"),
        prefetch: 5,
        no_ack: false,
        exclusive: true,
    });
    assert!(matches!(r, QueueReply::Error(e) if e.code == 530));
}

#[test]
fn purge_drops_ready_but_not_unacked() {
    let mut q = QueueState::new();
    let a = enqueue(&mut q).0;
    let _ = q.apply(QueueCmd::Get {
        channel: channel(1),
        no_ack: false,
    });
    let b = enqueue(&mut q).0;
    let c = enqueue(&mut q).0;
    let (r, fx) = q.apply(QueueCmd::Purge);
    assert_eq!(r, QueueReply::Purged { count: 2 });
    assert_eq!(fx, vec![Effect::Release { msgs: vec![b, c] }]);
    assert_eq!(q.checked_out_to(&channel(1)), vec![a]);
    assert_eq!(q.stats().ready, 0);
}

#[test]
fn stale_settle_is_ignored() {
    let mut q = QueueState::new();
    let a = enqueue(&mut q).0;
    let _ = q.apply(QueueCmd::Get {
        channel: channel(1),
        no_ack: false,
    });
    // Another channel cannot settle what channel 1 holds.
    let (_, fx) = q.apply(QueueCmd::Settle {
        channel: channel(2),
        msgs: vec![a, 999],
    });
    assert!(fx.is_empty());
    assert_eq!(q.checked_out_to(&channel(1)), vec![a]);
}

// ---- model-based property test ----

#[derive(Clone, Debug)]
enum Op {
    Enqueue,
    Consume {
        who: usize,
        prefetch: u32,
        no_ack: bool,
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
    Snapshot,
}

const CONSUMERS: [(u16, &str); 4] = [(1, "a"), (1, "b"), (2, "c"), (3, "d")];

fn op() -> impl Strategy<Value = Op> {
    let pick = proptest::collection::vec(0usize..8, 0..4);
    prop_oneof![
        6 => Just(Op::Enqueue),
        2 => (0usize..4, 0u32..4, proptest::bool::weighted(0.2))
            .prop_map(|(who, prefetch, no_ack)| Op::Consume { who, prefetch, no_ack }),
        1 => (0usize..4).prop_map(|who| Op::Cancel { who }),
        4 => (1u16..4, pick.clone()).prop_map(|(ch, pick)| Op::Settle { ch, pick }),
        2 => (1u16..4, pick.clone()).prop_map(|(ch, pick)| Op::Requeue { ch, pick }),
        1 => (1u16..4, pick).prop_map(|(ch, pick)| Op::Discard { ch, pick }),
        2 => (1u16..4, any::<bool>()).prop_map(|(ch, no_ack)| Op::Get { ch, no_ack }),
        1 => Just(Op::Purge),
        1 => (1u16..4).prop_map(|ch| Op::ChannelDown { ch }),
        1 => Just(Op::LeaderRecovery),
        1 => Just(Op::Snapshot),
    ]
}

fn to_cmd(q: &QueueState, op: &Op) -> Option<QueueCmd> {
    let picks = |ch: u16, pick: &[usize]| {
        let held = q.checked_out_to(&channel(ch));
        let mut msgs: Vec<MsgId> = pick.iter().filter_map(|i| held.get(*i).copied()).collect();
        msgs.dedup();
        msgs
    };
    Some(match op {
        Op::Enqueue => QueueCmd::Enqueue {
            meta: MessageMeta { size: 3 },
            publisher: None,
        },
        Op::Consume {
            who,
            prefetch,
            no_ack,
        } => {
            let (ch, tag) = CONSUMERS[*who];
            QueueCmd::Consume {
                consumer: consumer(ch, tag),
                prefetch: *prefetch,
                no_ack: *no_ack,
                exclusive: false,
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
        Op::Snapshot => return None,
    })
}

/// What an observer outside the state machine knows: which messages exist and which are out.
#[derive(Default)]
struct Model {
    live: BTreeSet<MsgId>,
    out: BTreeSet<MsgId>,
    returned: BTreeMap<MsgId, u32>,
}

fn check_invariants(q: &QueueState) -> Result<(), TestCaseError> {
    for id in q.messages.keys() {
        let ready = q.ready.contains(id);
        let out = q.checked_out.contains_key(id);
        prop_assert!(ready ^ out, "message {id} must be exactly one of ready/out");
    }
    prop_assert_eq!(q.ready.len() + q.checked_out.len(), q.messages.len());
    let bytes: u64 = q.ready.iter().map(|id| q.messages[id].meta.size).sum();
    prop_assert_eq!(bytes, q.ready_bytes);
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
        if !q.ready.is_empty() {
            prop_assert!(
                !c.has_credit(),
                "idle consumer {:?} while messages are ready",
                key
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
    let ready_before: BTreeSet<MsgId> = q.ready.clone();
    // Only what the channel really holds comes back, each message once.
    let requeued: BTreeSet<MsgId> = match &cmd {
        QueueCmd::Requeue { channel, msgs } => {
            let held: BTreeSet<MsgId> = q.checked_out_to(channel).into_iter().collect();
            msgs.iter().copied().filter(|m| held.contains(m)).collect()
        }
        QueueCmd::ChannelDown { channel } => q.checked_out_to(channel).into_iter().collect(),
        _ => BTreeSet::new(),
    };
    let (reply, fx) = q.apply(cmd);
    let mut enqueued = None;
    if let QueueReply::Enqueued { msg } = reply {
        prop_assert!(model.live.insert(msg), "id reused");
        enqueued = Some(msg);
    }
    for id in &requeued {
        model.out.remove(id);
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
            _ => {}
        }
    }
    for (msg, count) in &took {
        prop_assert!(model.live.contains(msg), "delivered unknown {msg}");
        prop_assert!(model.out.insert(*msg), "delivered {msg} twice");
        let became_ready = Some(*msg) == enqueued || requeued.contains(msg);
        prop_assert!(
            ready_before.contains(msg) || became_ready,
            "{msg} was not ready"
        );
        prop_assert_eq!(*count, model.returned.get(msg).copied().unwrap_or(0));
    }
    // Deliveries of one command take the lowest ready ids first.
    for (msg, _) in &took {
        if let Some(lowest_left) = q.ready.first() {
            prop_assert!(
                msg < lowest_left,
                "{msg} delivered before lower ready {lowest_left}"
            );
        }
    }
    for e in &fx {
        if let Effect::Release { msgs } = e {
            for m in msgs {
                prop_assert!(model.live.remove(m), "released {m} twice or unknown");
                model.out.remove(m);
                prop_assert!(!q.messages.contains_key(m), "released {m} still held");
            }
        }
    }
    // Every live message is held by the state, every held message is live.
    let held: BTreeSet<MsgId> = q.messages.keys().copied().collect();
    prop_assert_eq!(&held, &model.live);
    let out: BTreeSet<MsgId> = q.checked_out.keys().copied().collect();
    prop_assert_eq!(&out, &model.out);
    check_invariants(q)?;
    Ok(fx)
}

fn roundtrip(q: &QueueState) -> QueueState {
    let bytes = postcard::to_allocvec(q).expect("encode");
    postcard::from_bytes(&bytes).expect("decode")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_sequences_keep_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let mut q = QueueState::new();
        let mut model = Model::default();
        // A replica that restores from a snapshot at every Snapshot op must stay identical.
        let mut replica = QueueState::new();
        for op in &ops {
            match to_cmd(&q, op) {
                None => {
                    replica = roundtrip(&q);
                    prop_assert_eq!(&replica, &q);
                }
                Some(cmd) => {
                    let fx = step(&mut q, &mut model, cmd.clone())?;
                    let (_, replica_fx) = replica.apply(cmd);
                    prop_assert_eq!(fx, replica_fx);
                }
            }
        }
        prop_assert_eq!(&replica, &q);
    }
}

#[test]
fn resent_publishes_are_taken_once() {
    let mut q = QueueState::new();
    let publish = |q: &mut QueueState, seq| {
        q.apply(QueueCmd::Enqueue {
            meta: MessageMeta { size: 1 },
            publisher: Some(Publisher {
                channel: channel(1),
                seq,
            }),
        })
        .0
    };
    assert!(matches!(publish(&mut q, 1), QueueReply::Enqueued { .. }));
    assert!(matches!(publish(&mut q, 2), QueueReply::Enqueued { .. }));
    assert_eq!(publish(&mut q, 1), QueueReply::Duplicate);
    assert_eq!(publish(&mut q, 2), QueueReply::Duplicate);
    assert!(matches!(publish(&mut q, 3), QueueReply::Enqueued { .. }));
    assert_eq!(q.stats().ready, 3);
    // Once the channel is gone its numbering is forgotten (a new channel starts at 1).
    q.apply(QueueCmd::ChannelDown {
        channel: channel(1),
    });
    assert!(matches!(publish(&mut q, 1), QueueReply::Enqueued { .. }));
}

#[test]
fn leader_recovery_returns_down_nodes_and_resends_the_rest() {
    let mut q = QueueState::new();
    let local = consumer(1, "local");
    consume(&mut q, &local, 0);
    let remote = ConsumerKey {
        channel: ChannelRef {
            conn: ConnectionRef {
                run: NodeRun {
                    node: 2,
                    incarnation: 1,
                },
                conn: 1,
            },
            channel: 1,
            opened: 1,
        },
        tag: "remote".into(),
    };
    consume(&mut q, &remote, 0);
    let a = enqueue(&mut q).0;
    let b = enqueue(&mut q).0;
    // a went to node 1's consumer, b to node 2's. Node 2 goes down.
    let (_, fx) = q.apply(QueueCmd::LeaderRecovery { down: vec![2] });
    let resent: Vec<(String, MsgId, bool)> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver {
                consumer,
                msg,
                resend,
                ..
            } => Some((consumer.tag.clone(), *msg, *resend)),
            _ => None,
        })
        .collect();
    // b comes back and goes to the live consumer (a fresh delivery, redelivered); a is resent.
    assert!(resent.contains(&("local".into(), a, true)), "{resent:?}");
    assert!(resent.contains(&("local".into(), b, false)), "{resent:?}");
    assert!(q.consumer(&remote).is_none());
}

#[test]
fn a_node_wrongly_declared_down_still_has_its_resends_recognised() {
    let mut q = QueueState::new();
    let publish = |q: &mut QueueState, seq| {
        q.apply(QueueCmd::Enqueue {
            meta: MessageMeta { size: 1 },
            publisher: Some(Publisher {
                channel: channel(1),
                seq,
            }),
        })
        .0
    };
    assert!(matches!(publish(&mut q, 1), QueueReply::Enqueued { .. }));
    q.apply(QueueCmd::NodeDown { node: 1 });
    q.apply(QueueCmd::LeaderRecovery { down: vec![1] });
    assert_eq!(publish(&mut q, 1), QueueReply::Duplicate);
    q.apply(QueueCmd::NodeRestarted {
        run: NodeRun {
            node: 1,
            incarnation: 2,
        },
    });
    assert!(matches!(publish(&mut q, 1), QueueReply::Enqueued { .. }));
}

#[test]
fn consumers_of_a_down_node_go() {
    let mut q = QueueState::new();
    let c = consumer(1, "c");
    consume(&mut q, &c, 0);
    let a = enqueue(&mut q).0;
    let (_, fx) = q.apply(QueueCmd::NodeDown { node: 1 });
    assert_eq!(fx, vec![Effect::ConsumerGone { consumer: c }]);
    assert!(q.is_ready(a));
    assert_eq!(q.stats().consumers, 0);
}
