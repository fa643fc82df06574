//! The queue arguments RabbitMQ apps rely on, on replicated (durable) queues through a real
//! client: message TTL per queue and per message, dead-lettering with the `x-death` header
//! for each reason, max-length and max-length-bytes with the three overflow modes, the
//! delivery limit and `x-delivery-count`, priorities, single active consumer, consumer
//! priorities, and the 406 for invalid arguments.
//!
//! Queues are declared with `x-queue-type: quorum` so that the same tests run against
//! RabbitMQ (`WARREN_TEST_EXTERNAL_AMQP`), which is how their expectations were checked.

mod support;

use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer, ExchangeKind};
use support::{assert_code, next_delivery, run, unique, within};

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn int(v: i64) -> AMQPValue {
    AMQPValue::LongLongInt(v)
}

/// Declares a durable quorum-type queue with `extra` arguments.
async fn declare(ch: &Channel, name: &str, extra: &[(&str, AMQPValue)]) {
    let mut pairs = vec![("x-queue-type", s("quorum"))];
    pairs.extend(extra.iter().cloned());
    declare_with(ch, name, &pairs).await;
}

/// A durable queue of RabbitMQ's default type, for what its quorum queues refuse or do
/// differently (priorities, exact reject-publish); in Warren every durable queue is
/// replicated all the same.
async fn declare_classic(ch: &Channel, name: &str, extra: &[(&str, AMQPValue)]) {
    declare_with(ch, name, extra).await;
}

async fn declare_with(ch: &Channel, name: &str, pairs: &[(&str, AMQPValue)]) {
    within(
        "queue.declare",
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args(pairs),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.declare {name}: {e}"));
}

/// A fanout dead-letter exchange with one durable queue bound to it; returns (exchange,
/// queue).
async fn dead_letter_sink(ch: &Channel, prefix: &str) -> (String, String) {
    let dlx = unique(&format!("{prefix}-dlx"));
    let dead = unique(&format!("{prefix}-dead"));
    within(
        "exchange.declare",
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.declare");
    declare(ch, &dead, &[]).await;
    within(
        "queue.bind",
        ch.queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.bind");
    (dlx, dead)
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = support::channel(conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    ch
}

/// Publishes to the default exchange and returns whether the broker acked it.
async fn publish(ch: &Channel, queue: &str, body: &str, props: BasicProperties) -> bool {
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        ),
    )
    .await
    .expect("basic.publish");
    within("confirm", confirm).await.expect("confirm").is_ack()
}

async fn publish_all(ch: &Channel, queue: &str, bodies: &[&str]) {
    for b in bodies {
        assert!(
            publish(ch, queue, b, BasicProperties::default()).await,
            "publish {b} nacked"
        );
    }
}

async fn consume(ch: &Channel, queue: &str, arguments: FieldTable) -> Consumer {
    within(
        "basic.consume",
        ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            arguments,
        ),
    )
    .await
    .expect("basic.consume")
}

fn text(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

fn header<'a>(d: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from(name)))
}

fn as_text(v: Option<&AMQPValue>) -> String {
    match v {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        other => panic!("expected a string, got {other:?}"),
    }
}

fn as_int(v: Option<&AMQPValue>) -> i64 {
    match v {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => (*n).into(),
        Some(AMQPValue::LongUInt(n)) => (*n).into(),
        Some(AMQPValue::ShortInt(n)) => (*n).into(),
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// The `x-death` entries of a delivery, most recent first.
fn deaths(d: &lapin::message::Delivery) -> Vec<FieldTable> {
    match header(d, "x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .map(|e| match e {
                AMQPValue::FieldTable(t) => t.clone(),
                other => panic!("x-death entry is not a table: {other:?}"),
            })
            .collect(),
        other => panic!("no x-death array: {other:?}"),
    }
}

fn field<'a>(t: &'a FieldTable, name: &str) -> Option<&'a AMQPValue> {
    t.inner().get(&ShortString::from(name))
}

async fn get_body(ch: &Channel, queue: &str) -> Option<String> {
    within(
        "basic.get",
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    .map(|m| text(&m.delivery))
}

#[test]
fn queue_ttl_dead_letters_expired_messages_with_x_death() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let (dlx, dead) = dead_letter_sink(&ch, "ttl").await;
        let q = unique("ttl");
        declare(
            &ch,
            &q,
            &[
                ("x-message-ttl", int(100)),
                ("x-dead-letter-exchange", s(&dlx)),
            ],
        )
        .await;
        let pub_ch = confirm_channel(&conn).await;
        publish_all(&pub_ch, &q, &["a", "b", "c"]).await;

        let mut dead_consumer = consume(&ch, &dead, FieldTable::default()).await;
        let mut got = Vec::new();
        for _ in 0..3 {
            let d = next_delivery(&mut dead_consumer).await;
            let entries = deaths(&d);
            assert_eq!(entries.len(), 1, "one death");
            let e = &entries[0];
            assert_eq!(as_text(field(e, "reason")), "expired");
            assert_eq!(as_text(field(e, "queue")), q);
            assert_eq!(as_text(field(e, "exchange")), "");
            assert_eq!(as_int(field(e, "count")), 1);
            match field(e, "routing-keys") {
                Some(AMQPValue::FieldArray(a)) => {
                    assert_eq!(a.as_slice(), &[s(&q)]);
                }
                other => panic!("routing-keys: {other:?}"),
            }
            assert!(matches!(field(e, "time"), Some(AMQPValue::Timestamp(_))));
            assert_eq!(as_text(header(&d, "x-first-death-reason")), "expired");
            assert_eq!(as_text(header(&d, "x-first-death-queue")), q);
            assert_eq!(d.exchange.as_str(), dlx);
            got.push(text(&d));
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        assert_eq!(got, ["a", "b", "c"]);
        assert_eq!(get_body(&ch, &q).await, None, "the source is empty");
    });
}

#[test]
fn per_message_expiration_and_its_original_expiration() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let (dlx, dead) = dead_letter_sink(&ch, "exp").await;
        let q = unique("exp");
        declare(&ch, &q, &[("x-dead-letter-exchange", s(&dlx))]).await;
        let pub_ch = confirm_channel(&conn).await;
        assert!(
            publish(
                &pub_ch,
                &q,
                "short",
                BasicProperties::default().with_expiration("50".into()),
            )
            .await
        );
        let mut dead_consumer = consume(&ch, &dead, FieldTable::default()).await;
        let d = next_delivery(&mut dead_consumer).await;
        assert_eq!(text(&d), "short");
        assert_eq!(d.properties.expiration(), &None, "no second expiry");
        let e = &deaths(&d)[0];
        assert_eq!(as_text(field(e, "original-expiration")), "50");
        assert_eq!(as_text(field(e, "reason")), "expired");
        // A message without expiration stays.
        assert!(publish(&pub_ch, &q, "stays", BasicProperties::default()).await);
        assert_eq!(get_body(&ch, &q).await.as_deref(), Some("stays"));
    });
}

#[test]
fn invalid_expiration_is_406() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = unique("badexp");
        declare(&ch, &q, &[]).await;
        let pub_ch = confirm_channel(&conn).await;
        let probe = support::CloseProbe::arm(&pub_ch).await;
        let _ = pub_ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default().with_expiration("soon".into()),
            )
            .await;
        probe.assert_closed_with(406).await;
    });
}

#[test]
fn rejected_messages_go_to_the_dead_letter_routing_key() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let dlx = unique("rej-dlx");
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange.declare");
        let dead = unique("rej-dead");
        declare(&ch, &dead, &[]).await;
        ch.queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            "graveyard".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue.bind");
        let q = unique("rej");
        declare(
            &ch,
            &q,
            &[
                ("x-dead-letter-exchange", s(&dlx)),
                ("x-dead-letter-routing-key", s("graveyard")),
            ],
        )
        .await;
        let pub_ch = confirm_channel(&conn).await;
        publish_all(&pub_ch, &q, &["one", "two"]).await;
        let mut c = consume(&ch, &q, FieldTable::default()).await;
        let first = next_delivery(&mut c).await;
        first
            .reject(BasicRejectOptions { requeue: false })
            .await
            .expect("reject");
        let second = next_delivery(&mut c).await;
        second
            .nack(BasicNackOptions {
                requeue: false,
                multiple: false,
            })
            .await
            .expect("nack");
        let mut dc = consume(&ch, &dead, FieldTable::default()).await;
        for want in ["one", "two"] {
            let d = next_delivery(&mut dc).await;
            assert_eq!(text(&d), want);
            assert_eq!(d.routing_key.as_str(), "graveyard");
            assert_eq!(as_text(field(&deaths(&d)[0], "reason")), "rejected");
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
    });
}

#[test]
fn max_length_drops_the_head_and_dead_letters_it_as_maxlen() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let (dlx, dead) = dead_letter_sink(&ch, "maxlen").await;
        let q = unique("maxlen");
        declare(
            &ch,
            &q,
            &[
                ("x-max-length", int(2)),
                ("x-dead-letter-exchange", s(&dlx)),
            ],
        )
        .await;
        let pub_ch = confirm_channel(&conn).await;
        publish_all(&pub_ch, &q, &["m0", "m1", "m2", "m3", "m4"]).await;
        assert_eq!(get_body(&ch, &q).await.as_deref(), Some("m3"));
        assert_eq!(get_body(&ch, &q).await.as_deref(), Some("m4"));
        assert_eq!(get_body(&ch, &q).await, None);
        let mut dc = consume(&ch, &dead, FieldTable::default()).await;
        for want in ["m0", "m1", "m2"] {
            let d = next_delivery(&mut dc).await;
            assert_eq!(text(&d), want);
            assert_eq!(as_text(field(&deaths(&d)[0], "reason")), "maxlen");
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
    });
}

#[test]
fn max_length_bytes_keeps_the_newest_that_fit() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = unique("maxbytes");
        declare(&ch, &q, &[("x-max-length-bytes", int(10))]).await;
        let pub_ch = confirm_channel(&conn).await;
        publish_all(&pub_ch, &q, &["aaaa", "bbbb", "cccc"]).await;
        assert_eq!(get_body(&ch, &q).await.as_deref(), Some("bbbb"));
        assert_eq!(get_body(&ch, &q).await.as_deref(), Some("cccc"));
        assert_eq!(get_body(&ch, &q).await, None);
    });
}

#[test]
fn reject_publish_nacks_what_does_not_fit() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = unique("rejpub");
        declare_classic(
            &ch,
            &q,
            &[
                ("x-max-length", int(1)),
                ("x-overflow", s("reject-publish")),
            ],
        )
        .await;
        let pub_ch = confirm_channel(&conn).await;
        assert!(publish(&pub_ch, &q, "fits", BasicProperties::default()).await);
        assert!(!publish(&pub_ch, &q, "refused", BasicProperties::default()).await);
        assert_eq!(get_body(&ch, &q).await.as_deref(), Some("fits"));
        // Room again: taken.
        assert!(publish(&pub_ch, &q, "later", BasicProperties::default()).await);
        assert_eq!(get_body(&ch, &q).await.as_deref(), Some("later"));
    });
}

#[test]
fn reject_publish_dlx_nacks_and_dead_letters() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let (dlx, dead) = dead_letter_sink(&ch, "rejdlx").await;
        let q = unique("rejdlx");
        declare_classic(
            &ch,
            &q,
            &[
                ("x-max-length", int(1)),
                ("x-overflow", s("reject-publish-dlx")),
                ("x-dead-letter-exchange", s(&dlx)),
            ],
        )
        .await;
        let pub_ch = confirm_channel(&conn).await;
        assert!(publish(&pub_ch, &q, "fits", BasicProperties::default()).await);
        assert!(!publish(&pub_ch, &q, "refused", BasicProperties::default()).await);
        let mut dc = consume(&ch, &dead, FieldTable::default()).await;
        let d = next_delivery(&mut dc).await;
        assert_eq!(text(&d), "refused");
        assert_eq!(as_text(field(&deaths(&d)[0], "reason")), "maxlen");
        assert_eq!(get_body(&ch, &q).await.as_deref(), Some("fits"));
    });
}

#[test]
fn delivery_limit_counts_and_dead_letters_poison_messages() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let (dlx, dead) = dead_letter_sink(&ch, "limit").await;
        let q = unique("limit");
        declare(
            &ch,
            &q,
            &[
                ("x-delivery-limit", int(2)),
                ("x-dead-letter-exchange", s(&dlx)),
            ],
        )
        .await;
        let pub_ch = confirm_channel(&conn).await;
        publish_all(&pub_ch, &q, &["poison"]).await;
        let mut c = consume(&ch, &q, FieldTable::default()).await;
        for attempt in 0..3 {
            let d = next_delivery(&mut c).await;
            assert_eq!(text(&d), "poison");
            assert_eq!(d.redelivered, attempt > 0, "attempt {attempt}");
            if attempt == 0 {
                assert!(header(&d, "x-delivery-count").is_none());
            } else {
                assert_eq!(as_int(header(&d, "x-delivery-count")), attempt);
            }
            d.nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .expect("nack");
        }
        let mut dc = consume(&ch, &dead, FieldTable::default()).await;
        let d = next_delivery(&mut dc).await;
        assert_eq!(text(&d), "poison");
        assert_eq!(as_text(field(&deaths(&d)[0], "reason")), "delivery_limit");
    });
}

#[test]
fn priorities_deliver_highest_first() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = unique("prio");
        declare_classic(&ch, &q, &[("x-max-priority", int(10))]).await;
        let pub_ch = confirm_channel(&conn).await;
        for (body, p) in [
            ("low", 1),
            ("none", 0),
            ("high", 9),
            ("mid", 5),
            ("high2", 9),
        ] {
            let props = BasicProperties::default().with_priority(p);
            assert!(publish(&pub_ch, &q, body, props).await);
        }
        let mut order = Vec::new();
        while let Some(b) = get_body(&ch, &q).await {
            order.push(b);
        }
        assert_eq!(order, ["high", "high2", "mid", "low", "none"]);
    });
}

#[test]
fn single_active_consumer_hands_over_on_cancel() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = unique("sac");
        declare(
            &ch,
            &q,
            &[("x-single-active-consumer", AMQPValue::Boolean(true))],
        )
        .await;
        let ch2 = support::channel(&conn).await;
        let mut first = consume(&ch, &q, FieldTable::default()).await;
        let mut second = consume(&ch2, &q, FieldTable::default()).await;
        let pub_ch = confirm_channel(&conn).await;
        publish_all(&pub_ch, &q, &["1", "2", "3"]).await;
        for want in ["1", "2", "3"] {
            let d = next_delivery(&mut first).await;
            assert_eq!(text(&d), want);
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
        ch.basic_cancel(first.tag(), BasicCancelOptions::default())
            .await
            .expect("cancel");
        publish_all(&pub_ch, &q, &["4"]).await;
        let d = next_delivery(&mut second).await;
        assert_eq!(text(&d), "4", "the second consumer takes over");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    });
}

#[test]
fn consumer_priority_serves_the_highest_with_credit_first() {
    let b = support::broker();
    run(async {
        let (conn, _) = support::open(b.url()).await;
        let q = unique("cprio");
        let low_ch = support::channel(&conn).await;
        let high_ch = support::channel(&conn).await;
        declare(&low_ch, &q, &[]).await;
        for ch in [&low_ch, &high_ch] {
            ch.basic_qos(2, BasicQosOptions::default())
                .await
                .expect("qos");
        }
        let mut low = consume(&low_ch, &q, args(&[("x-priority", int(1))])).await;
        let mut high = consume(&high_ch, &q, args(&[("x-priority", int(10))])).await;
        let pub_ch = confirm_channel(&conn).await;
        publish_all(&pub_ch, &q, &["a", "b", "c"]).await;
        // The high-priority consumer takes what its prefetch allows, the rest goes lower.
        let h1 = next_delivery(&mut high).await;
        let h2 = next_delivery(&mut high).await;
        let l1 = next_delivery(&mut low).await;
        assert_eq!([text(&h1), text(&h2), text(&l1)], ["a", "b", "c"]);
        for d in [h1, h2, l1] {
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
    });
}

#[test]
fn invalid_queue_arguments_are_406() {
    let b = support::broker();
    run(async {
        let (conn, _) = support::open(b.url()).await;
        for (arg, value) in [
            ("x-overflow", s("drop-tail")),
            ("x-max-priority", int(300)),
            ("x-message-ttl", int(-1)),
            ("x-max-length", s("ten")),
            ("x-single-active-consumer", s("yes")),
        ] {
            let ch = support::channel(&conn).await;
            let res = ch
                .queue_declare(
                    unique("badarg").as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args(&[(arg, value.clone())]),
                )
                .await;
            assert_code(res, 406);
        }
    });
}

#[test]
fn a_consumer_with_a_bad_priority_is_406() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = unique("badcprio");
        declare(&ch, &q, &[]).await;
        let ch = support::channel(&conn).await;
        let res = ch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                args(&[("x-priority", s("high"))]),
            )
            .await;
        assert_code(res, 406);
    });
}

/// Polls a passive declare until the queue is gone (404), within `support::WAIT`.
async fn wait_gone(conn: &Connection, queue: &str) {
    let deadline = std::time::Instant::now() + support::WAIT;
    loop {
        let ch = support::channel(conn).await;
        let res = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match res {
            Err(e) if support::reply_code(&e) == Some(404) => return,
            Err(e) => panic!("passive declare of {queue}: {e}"),
            Ok(_) => {
                let _ = ch.close(200, "bye".into()).await;
                assert!(
                    std::time::Instant::now() < deadline,
                    "{queue} still exists after {:?}",
                    support::WAIT
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[test]
fn an_unused_queue_expires_and_a_consumed_one_does_not() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let idle = unique("expires-idle");
        declare(&ch, &idle, &[("x-expires", int(300))]).await;
        let busy = unique("expires-busy");
        declare(&ch, &busy, &[("x-expires", int(300))]).await;
        let cch = support::channel(&conn).await;
        let consumer = consume(&cch, &busy, FieldTable::default()).await;
        wait_gone(&conn, &idle).await;
        // The consumed queue outlives the other's expiry by far.
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        let still = ch
            .queue_declare(
                busy.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(still.is_ok(), "a queue with a consumer expired: {still:?}");
        cch.basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .expect("cancel");
        wait_gone(&conn, &busy).await;
    });
}

/// A delivery left unacknowledged past the queue's `x-consumer-timeout` closes its channel
/// with 406, and the message goes back to the queue for the next consumer.
#[test]
fn consumer_timeout_closes_the_channel_and_returns_the_message() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = unique("ctimeout");
        declare(&ch, &q, &[("x-consumer-timeout", int(300))]).await;
        let pub_ch = confirm_channel(&conn).await;
        publish_all(&pub_ch, &q, &["slow"]).await;
        let cch = support::channel(&conn).await;
        let probe = support::CloseProbe::arm(&cch).await;
        let mut c = consume(&cch, &q, FieldTable::default()).await;
        let d = next_delivery(&mut c).await;
        assert_eq!(text(&d), "slow");
        probe.assert_closed_with(406).await;
        let again = within(
            "basic.get",
            ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get");
        let again = match again {
            Some(m) => m,
            None => {
                // The close's return may still be on its way.
                let mut other = consume(&ch, &q, FieldTable::default()).await;
                let d = next_delivery(&mut other).await;
                assert!(d.redelivered);
                assert_eq!(text(&d), "slow");
                return;
            }
        };
        assert!(again.delivery.redelivered);
        assert_eq!(text(&again.delivery), "slow");
    });
}
