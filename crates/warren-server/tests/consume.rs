//! Getting messages out: basic.consume and cancel, prefetch, ack / nack / reject (single and
//! multiple, requeue or not), redelivery flags and order, basic.get, basic.recover, exclusive
//! consumers, consumer-tag rules, no-ack consumers, and the reply codes for acking what
//! cannot be acked.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRecoverAsyncOptions, BasicRecoverOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use support::{assert_code, code, next_delivery, run, unique, within};

/// Publishes `bodies` to a queue through a confirm channel, so they are all in the queue
/// when this returns.
async fn fill(conn: &Connection, queue: &str, bodies: &[&str]) {
    let ch = support::channel(conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    for b in bodies {
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        assert!(within("confirm", c).await.expect("confirm").is_ack());
    }
    let _ = ch.close(200, "bye".into()).await;
}

async fn consume(ch: &Channel, queue: &str, tag: &str, opts: BasicConsumeOptions) -> Consumer {
    within(
        "basic.consume",
        ch.basic_consume(queue.into(), tag.into(), opts, FieldTable::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("basic.consume on {queue}: {e}"))
}

fn text(d: &lapin::message::Delivery) -> &str {
    std::str::from_utf8(&d.data).expect("utf-8 body")
}

const NO_ACK: BasicConsumeOptions = BasicConsumeOptions {
    no_local: false,
    no_ack: true,
    exclusive: false,
    nowait: false,
};

#[test]
fn consume_in_order_then_cancel() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "order").await;
        let bodies: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
        fill(&conn, &q, &refs).await;

        let mut consumer = consume(&ch, &q, "", BasicConsumeOptions::default()).await;
        assert!(
            consumer.tag().as_str().starts_with("amq.ctag-"),
            "server-generated tag {:?}",
            consumer.tag()
        );
        let mut tags = Vec::new();
        for want in &bodies {
            let d = next_delivery(&mut consumer).await;
            assert_eq!(text(&d), want);
            assert!(!d.redelivered);
            assert_eq!(d.routing_key.as_str(), q);
            tags.push(d.delivery_tag);
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        // Delivery tags count up from 1 on the channel.
        assert_eq!(tags, (1..=100).collect::<Vec<u64>>());

        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .expect("basic.cancel");
        match within("consumer stream to end", consumer.next()).await {
            None => {}
            Some(other) => panic!("expected the stream to end, got {other:?}"),
        }
        // After the cancel, messages stay in the queue.
        fill(&conn, &q, &["after"]).await;
        assert_eq!(support::ready_count(&ch, &q).await, 1);
        // Cancelling an unknown tag is not an error.
        ch.basic_cancel("no-such-tag".into(), BasicCancelOptions::default())
            .await
            .expect("cancel of an unknown tag");
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn prefetch_one_waits_for_the_ack() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "prefetch").await;
        fill(&conn, &q, &["1", "2", "3"]).await;
        ch.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = consume(&ch, &q, "p1", BasicConsumeOptions::default()).await;
        let first = next_delivery(&mut consumer).await;
        assert_eq!(text(&first), "1");
        let probe = support::channel(&conn).await;
        assert_eq!(support::ready_count(&probe, &q).await, 2);
        support::assert_no_delivery(&mut consumer, Duration::from_millis(500)).await;
        first.ack(BasicAckOptions::default()).await.expect("ack");
        let second = next_delivery(&mut consumer).await;
        assert_eq!(text(&second), "2");
        support::assert_no_delivery(&mut consumer, Duration::from_millis(300)).await;
        assert_eq!(support::ready_count(&probe, &q).await, 1);
        second.ack(BasicAckOptions::default()).await.expect("ack");
        let third = next_delivery(&mut consumer).await;
        assert_eq!(text(&third), "3");
        third.ack(BasicAckOptions::default()).await.expect("ack");
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn prefetch_limits_each_consumer() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "prefetch3").await;
        let bodies: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
        fill(&conn, &q, &refs).await;
        ch.basic_qos(3, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = consume(&ch, &q, "p3", BasicConsumeOptions::default()).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(next_delivery(&mut consumer).await);
        }
        support::assert_no_delivery(&mut consumer, Duration::from_millis(400)).await;
        let probe = support::channel(&conn).await;
        assert_eq!(support::ready_count(&probe, &q).await, 7);
        // Acking two at once (multiple) frees two slots.
        held[1]
            .ack(BasicAckOptions { multiple: true })
            .await
            .expect("ack multiple");
        let a = next_delivery(&mut consumer).await;
        let b2 = next_delivery(&mut consumer).await;
        assert_eq!((text(&a), text(&b2)), ("3", "4"));
        support::assert_no_delivery(&mut consumer, Duration::from_millis(300)).await;
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn ack_multiple_and_requeue_on_channel_close() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let q = {
            let ch = support::channel(&conn).await;
            let q = support::temp_queue(&ch, "ackmulti").await;
            ch.close(200, "bye".into()).await.expect("close");
            q
        };
        fill(&conn, &q, &["a", "b", "c", "d", "e"]).await;
        let ch = support::channel(&conn).await;
        let mut consumer = consume(&ch, &q, "", BasicConsumeOptions::default()).await;
        let mut ds = Vec::new();
        for _ in 0..5 {
            ds.push(next_delivery(&mut consumer).await);
        }
        // Acks a, b, c, d at once; e stays unacked.
        ch.basic_ack(ds[3].delivery_tag, BasicAckOptions { multiple: true })
            .await
            .expect("ack multiple");
        within("channel.close", ch.close(200, "bye".into()))
            .await
            .expect("close");
        // Closing the channel requeues e, flagged as redelivered.
        let ch = support::channel(&conn).await;
        support::wait_ready_count(&ch, &q, 1).await;
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("message");
        assert_eq!(got.delivery.data, b"e");
        assert!(got.delivery.redelivered);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn nack_requeue_and_discard_single_and_multiple() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "nack").await;
        fill(&conn, &q, &["1", "2", "3", "4", "5"]).await;
        let cch = support::channel(&conn).await;
        let mut consumer = consume(&cch, &q, "", BasicConsumeOptions::default()).await;
        let mut ds = Vec::new();
        for _ in 0..5 {
            ds.push(next_delivery(&mut consumer).await);
        }
        // 1: dropped.
        ds[0]
            .nack(BasicNackOptions {
                multiple: false,
                requeue: false,
            })
            .await
            .expect("nack");
        // 2 and 3: requeued together.
        cch.basic_nack(
            ds[2].delivery_tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .expect("nack multiple");
        let r1 = next_delivery(&mut consumer).await;
        let r2 = next_delivery(&mut consumer).await;
        assert_eq!((text(&r1), text(&r2)), ("2", "3"));
        assert!(r1.redelivered && r2.redelivered);
        assert!(r1.delivery_tag > 5 && r2.delivery_tag > r1.delivery_tag);
        // 4, 5 and the two redeliveries: dropped in one go.
        cch.basic_nack(
            r2.delivery_tag,
            BasicNackOptions {
                multiple: true,
                requeue: false,
            },
        )
        .await
        .expect("nack multiple discard");
        support::assert_no_delivery(&mut consumer, Duration::from_millis(300)).await;
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        // Nothing is left unacked: closing the channel requeues nothing.
        cch.close(200, "bye".into()).await.expect("close");
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn reject_requeue_redelivers_first_in_line() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "reject").await;
        fill(&conn, &q, &["A", "B", "C"]).await;
        let a = ch
            .basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("A");
        assert_eq!(a.delivery.data, b"A");
        assert!(!a.delivery.redelivered);
        a.delivery
            .reject(BasicRejectOptions { requeue: true })
            .await
            .expect("reject");
        // The requeued message goes back to the head of the queue, marked redelivered.
        let mut order = Vec::new();
        for _ in 0..3 {
            let m = ch
                .basic_get(q.as_str().into(), BasicGetOptions::default())
                .await
                .expect("get")
                .expect("message");
            order.push((
                String::from_utf8(m.delivery.data.clone()).unwrap(),
                m.delivery.redelivered,
            ));
            if m.delivery.data == b"B" {
                m.delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                    .expect("reject");
            } else {
                m.delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .expect("ack");
            }
        }
        assert_eq!(
            order,
            vec![
                ("A".to_owned(), true),
                ("B".to_owned(), false),
                ("C".to_owned(), false)
            ]
        );
        // B was rejected without requeue: gone.
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn unknown_delivery_tag_is_406() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let probe = support::CloseProbe::arm(&ch).await;
        ch.basic_ack(4242, BasicAckOptions::default())
            .await
            .expect("ack is asynchronous");
        probe.assert_closed_with(code::PRECONDITION_FAILED).await;

        for op in ["nack", "reject"] {
            let ch = support::channel(&conn).await;
            let probe = support::CloseProbe::arm(&ch).await;
            match op {
                "nack" => ch
                    .basic_nack(77, BasicNackOptions::default())
                    .await
                    .expect("nack"),
                _ => ch
                    .basic_reject(77, BasicRejectOptions::default())
                    .await
                    .expect("reject"),
            }
            probe.assert_closed_with(code::PRECONDITION_FAILED).await;
        }
        assert!(conn.status().connected());
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn double_ack_is_406() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "double").await;
        fill(&conn, &q, &["once"]).await;
        let m = ch
            .basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("message");
        let tag = m.delivery.delivery_tag;
        let probe = support::CloseProbe::arm(&ch).await;
        ch.basic_ack(tag, BasicAckOptions::default())
            .await
            .expect("first ack");
        ch.basic_ack(tag, BasicAckOptions::default())
            .await
            .expect("second ack is sent");
        probe.assert_closed_with(code::PRECONDITION_FAILED).await;
        // The first ack counted: the message is not requeued by the channel's end.
        let ch = support::channel(&conn).await;
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn ack_of_a_no_ack_delivery_is_406() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "noackack").await;
        fill(&conn, &q, &["x"]).await;
        let m = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("message");
        let probe = support::CloseProbe::arm(&ch).await;
        ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .expect("ack is sent");
        probe.assert_closed_with(code::PRECONDITION_FAILED).await;
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn basic_get_ok_and_empty() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "get").await;
        assert!(
            ch.basic_get(q.as_str().into(), BasicGetOptions::default())
                .await
                .expect("get on empty")
                .is_none()
        );
        fill(&conn, &q, &["1", "2", "3"]).await;
        let mut counts = Vec::new();
        for want in ["1", "2", "3"] {
            let m = ch
                .basic_get(q.as_str().into(), BasicGetOptions::default())
                .await
                .expect("get")
                .expect("message");
            assert_eq!(text(&m.delivery), want);
            assert_eq!(m.delivery.exchange.as_str(), "");
            assert_eq!(m.delivery.routing_key.as_str(), q);
            counts.push(m.message_count);
            m.delivery
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        // message-count is what is left behind the one handed out.
        assert_eq!(counts, [2, 1, 0]);
        assert!(
            ch.basic_get(q.as_str().into(), BasicGetOptions::default())
                .await
                .expect("get on drained")
                .is_none()
        );
        let res = ch
            .basic_get(
                unique("missing").as_str().into(),
                BasicGetOptions::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn basic_recover_requeues_unacked() {
    recover_requeues_unacked(false);
}

/// basic.recover-async (deprecated, no reply) does the same as basic.recover.
#[test]
fn basic_recover_async_requeues_unacked() {
    recover_requeues_unacked(true);
}

fn recover_requeues_unacked(without_reply: bool) {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "recover").await;
        fill(&conn, &q, &["r1", "r2"]).await;
        let cch = support::channel(&conn).await;
        let mut consumer = consume(&cch, &q, "", BasicConsumeOptions::default()).await;
        let d1 = next_delivery(&mut consumer).await;
        let d2 = next_delivery(&mut consumer).await;
        assert!(!d1.redelivered && !d2.redelivered);
        if without_reply {
            cch.basic_recover_async(BasicRecoverAsyncOptions { requeue: true })
                .await
                .expect("basic.recover-async");
        } else {
            cch.basic_recover(BasicRecoverOptions { requeue: true })
                .await
                .expect("basic.recover");
        }
        let mut again = Vec::new();
        for _ in 0..2 {
            let d = next_delivery(&mut consumer).await;
            assert!(
                d.redelivered,
                "recovered delivery must be flagged redelivered"
            );
            again.push(text(&d).to_owned());
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        again.sort();
        assert_eq!(again, ["r1", "r2"]);
        support::assert_no_delivery(&mut consumer, Duration::from_millis(300)).await;
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn exclusive_consumer_refuses_others() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "exclusive-consumer").await;
        let _owner = consume(
            &ch,
            &q,
            "owner",
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
        )
        .await;
        let ch2 = support::channel(&conn).await;
        let res = ch2
            .basic_consume(
                q.as_str().into(),
                "second".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::ACCESS_REFUSED);

        // And an exclusive consume on a queue that already has a consumer.
        let q2 = support::temp_queue(&ch, "shared").await;
        let _plain = consume(&ch, &q2, "plain", BasicConsumeOptions::default()).await;
        let ch3 = support::channel(&conn).await;
        let res = ch3
            .basic_consume(
                q2.as_str().into(),
                "wants-it-all".into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::ACCESS_REFUSED);
        assert!(conn.status().connected());
        support::delete_queue(&conn, &q).await;
        support::delete_queue(&conn, &q2).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn consumer_tag_reuse_on_a_channel_is_530() {
    let b = support::broker();
    run(async {
        let setup = support::connect(b.url()).await;
        let sch = support::channel(&setup).await;
        let q1 = support::temp_queue(&sch, "tag1").await;
        let q2 = support::temp_queue(&sch, "tag2").await;

        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let _c = consume(&ch, &q1, "same-tag", BasicConsumeOptions::default()).await;
        // The same tag on another channel is fine.
        let other = support::channel(&conn).await;
        let _c2 = consume(&other, &q1, "same-tag", BasicConsumeOptions::default()).await;
        let res = ch
            .basic_consume(
                q2.as_str().into(),
                "same-tag".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        // NOT_ALLOWED is a connection-level error.
        assert_code(res, code::NOT_ALLOWED);
        support::eventually("the connection to close", support::WAIT, || {
            let closed = !conn.status().connected();
            async move { closed }
        })
        .await;
        support::delete_queue(&setup, &q1).await;
        support::delete_queue(&setup, &q2).await;
        setup.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn consume_from_missing_queue_is_404() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let res = ch
            .basic_consume(
                unique("missing").as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn no_ack_consumer_needs_no_acks() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "noack").await;
        fill(&conn, &q, &["1", "2", "3"]).await;
        let cch = support::channel(&conn).await;
        // Prefetch does not hold back a no-ack consumer.
        cch.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = consume(&cch, &q, "", NO_ACK).await;
        for want in ["1", "2", "3"] {
            let d = next_delivery(&mut consumer).await;
            assert_eq!(text(&d), want);
        }
        // Closing the channel requeues nothing: the messages were settled on delivery.
        cch.close(200, "bye".into()).await.expect("close");
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn two_consumers_share_the_queue() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "shared").await;
        let ch1 = support::channel(&conn).await;
        let ch2 = support::channel(&conn).await;
        let mut c1 = consume(&ch1, &q, "c1", NO_ACK).await;
        let mut c2 = consume(&ch2, &q, "c2", NO_ACK).await;
        let bodies: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
        fill(&conn, &q, &refs).await;
        let mut got = BTreeSet::new();
        let (mut n1, mut n2) = (0, 0);
        for _ in 0..20 {
            tokio::select! {
                d = c1.next() => { got.insert(text(&d.expect("c1").expect("c1")).to_owned()); n1 += 1; }
                d = c2.next() => { got.insert(text(&d.expect("c2").expect("c2")).to_owned()); n2 += 1; }
                _ = tokio::time::sleep(support::WAIT) => panic!("deliveries stopped"),
            }
        }
        assert_eq!(got.len(), 20, "every message exactly once");
        // Round-robin: both consumers take part.
        assert!(n1 > 0 && n2 > 0, "c1 got {n1}, c2 got {n2}");
        support::assert_no_delivery(&mut c1, Duration::from_millis(200)).await;
        support::assert_no_delivery(&mut c2, Duration::from_millis(200)).await;
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn global_prefetch_limits_the_whole_channel() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q1 = support::temp_queue(&ch, "g1").await;
        let q2 = support::temp_queue(&ch, "g2").await;
        fill(&conn, &q1, &["a1", "a2", "a3", "a4", "a5"]).await;
        fill(&conn, &q2, &["b1", "b2", "b3", "b4", "b5"]).await;
        let cch = support::channel(&conn).await;
        // global=true: two unacked messages for the channel as a whole.
        cch.basic_qos(2, BasicQosOptions { global: true })
            .await
            .expect("qos");
        let mut c1 = consume(&cch, &q1, "c1", BasicConsumeOptions::default()).await;
        let mut c2 = consume(&cch, &q2, "c2", BasicConsumeOptions::default()).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            tokio::select! {
                d = c1.next() => held.push(d.expect("c1").expect("c1")),
                d = c2.next() => held.push(d.expect("c2").expect("c2")),
                _ = tokio::time::sleep(support::WAIT) => panic!("no delivery within {:?}", support::WAIT),
            }
        }
        support::assert_no_delivery(&mut c1, Duration::from_millis(300)).await;
        support::assert_no_delivery(&mut c2, Duration::from_millis(300)).await;
        // RabbitMQ keeps the other eight ready; Warren may check out up to the limit per
        // consumer, holding what the channel may not show yet (docs/amqp-compat.md).
        let ready = support::ready_count(&ch, &q1).await + support::ready_count(&ch, &q2).await;
        assert!(
            (6..=8).contains(&ready),
            "{ready} ready: at most 2 per consumer out"
        );
        held[0].ack(BasicAckOptions::default()).await.expect("ack");
        tokio::select! {
            d = c1.next() => { d.expect("c1").expect("c1"); }
            d = c2.next() => { d.expect("c2").expect("c2"); }
            _ = tokio::time::sleep(support::WAIT) => panic!("the freed slot was not used"),
        }
        support::delete_queue(&conn, &q1).await;
        support::delete_queue(&conn, &q2).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn concurrent_publishers_and_consumers_lose_nothing() {
    const PUBLISHERS: u32 = 4;
    const PER_PUBLISHER: u32 = 500;
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "concurrent").await;
        let total = (PUBLISHERS * PER_PUBLISHER) as usize;

        // Two consumers on their own connections, acking every message.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
        let mut consumers = Vec::new();
        for c in 0..2 {
            let url = b.url().to_owned();
            let q = q.clone();
            let tx = tx.clone();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            consumers.push(tokio::spawn(async move {
                let conn = support::connect(&url).await;
                let ch = support::channel(&conn).await;
                ch.basic_qos(50, BasicQosOptions::default())
                    .await
                    .expect("qos");
                let mut consumer = consume(&ch, &q, &format!("c{c}"), Default::default()).await;
                let _ = ready_tx.send(());
                while let Some(d) = consumer.next().await {
                    let d = d.expect("delivery");
                    d.ack(BasicAckOptions::default()).await.expect("ack");
                    if tx.send((c, text(&d).to_owned())).is_err() {
                        break;
                    }
                }
                conn
            }));
            ready_rx.await.expect("consumer started");
        }
        drop(tx);

        // Publishers, each on its own connection with confirms.
        let mut publishers = Vec::new();
        for p in 0..PUBLISHERS {
            let url = b.url().to_owned();
            let q = q.clone();
            publishers.push(tokio::spawn(async move {
                let conn = support::connect(&url).await;
                let ch = support::channel(&conn).await;
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .expect("confirm.select");
                let mut pending = Vec::new();
                for i in 0..PER_PUBLISHER {
                    pending.push(
                        ch.basic_publish(
                            "".into(),
                            q.as_str().into(),
                            BasicPublishOptions::default(),
                            format!("p{p}-{i}").as_bytes(),
                            BasicProperties::default(),
                        )
                        .await
                        .expect("publish"),
                    );
                }
                for c in pending {
                    assert!(c.await.expect("confirm").is_ack());
                }
                conn.close(200, "bye".into()).await.expect("close");
            }));
        }
        for p in publishers {
            within("a publisher to finish", p)
                .await
                .expect("publisher task");
        }

        let mut seen = BTreeSet::new();
        let mut per_publisher = vec![Vec::new(); PUBLISHERS as usize];
        // Last sequence number each consumer saw from each publisher.
        let mut last = [[None::<u32>; PUBLISHERS as usize]; 2];
        while seen.len() < total {
            let (c, body) = within("the next delivery", rx.recv())
                .await
                .expect("consumers stopped early");
            assert!(seen.insert(body.clone()), "{body} delivered twice");
            let (p, i) = body[1..].split_once('-').unwrap();
            let (p, i) = (p.parse::<usize>().unwrap(), i.parse::<u32>().unwrap());
            // A publisher's messages are queued in publish order, and each consumer gets
            // its share of them in that order.
            if let Some(prev) = last[c][p] {
                assert!(i > prev, "consumer {c} got p{p}-{i} after p{p}-{prev}");
            }
            last[c][p] = Some(i);
            per_publisher[p].push(i);
        }
        for (p, got) in per_publisher.iter_mut().enumerate() {
            got.sort_unstable();
            assert_eq!(
                *got,
                (0..PER_PUBLISHER).collect::<Vec<_>>(),
                "publisher {p}"
            );
        }
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        support::delete_queue(&conn, &q).await;
        for c in consumers {
            let conn = within("consumer to end", c).await.expect("consumer task");
            let _ = conn.close(200, "bye".into()).await;
        }
        conn.close(200, "bye".into()).await.expect("close");
    });
}

/// channel.flow with active=false pauses deliveries on that channel until it is re-enabled;
/// nothing is lost meanwhile. RabbitMQ 3.x refuses active=false (540), so this runs against
/// Warren only.
#[test]
fn channel_flow_pauses_and_resumes_deliveries() {
    let Some(b) = support::process_broker("channel_flow_pauses_and_resumes_deliveries") else {
        return;
    };
    let url = b.amqp_url();
    run(async {
        let conn = support::connect(&url).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "flow").await;
        let cch = support::channel(&conn).await;
        let mut consumer = consume(&cch, &q, "", BasicConsumeOptions::default()).await;
        let flow = within(
            "channel.flow",
            cch.channel_flow(lapin::options::ChannelFlowOptions { active: false }),
        )
        .await
        .expect("channel.flow off");
        assert!(!flow, "flow-ok must echo active=false");
        fill(&conn, &q, &["held-1", "held-2"]).await;
        support::assert_no_delivery(&mut consumer, Duration::from_millis(300)).await;
        within(
            "channel.flow",
            cch.channel_flow(lapin::options::ChannelFlowOptions { active: true }),
        )
        .await
        .expect("channel.flow on");
        let mut got = Vec::new();
        for _ in 0..2 {
            let d = next_delivery(&mut consumer).await;
            got.push(text(&d).to_owned());
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        assert_eq!(got, ["held-1", "held-2"]);
        conn.close(200, "bye".into()).await.expect("close");
    });
}
