//! basic.publish as clients see it: routing through the default, direct, fanout, topic and
//! headers exchanges (checked against a reference matcher for topic patterns), mandatory
//! returns, publishing to a missing exchange, message bodies of awkward sizes and the
//! round trip of all fourteen basic properties and every header value type.

mod support;

use std::collections::BTreeMap;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use support::{code, run, unique, within};

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(
        "exchange.declare",
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                auto_delete: false,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.declare");
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, rk: &str, args: FieldTable) {
    within(
        "queue.bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            rk.into(),
            QueueBindOptions::default(),
            args,
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("queue.bind {queue} {exchange} {rk:?}: {e}"));
}

/// A channel in confirm mode, so "published" means "routed and stored".
async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = support::channel(conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    ch
}

async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    rk: &str,
    body: &[u8],
    props: BasicProperties,
) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            rk.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("basic.publish");
    let c = within("publisher confirm", confirm).await.expect("confirm");
    assert!(
        c.is_ack(),
        "publish to {exchange:?}/{rk:?} was not acked: {c:?}"
    );
}

/// Takes every ready message from a queue (no-ack) and returns the bodies in order.
async fn drain(ch: &Channel, queue: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        match within(
            "basic.get",
            ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get")
        {
            Some(m) => out.push(m.delivery.data),
            None => return out,
        }
    }
    panic!("queue {queue} did not run dry");
}

fn strings(bodies: Vec<Vec<u8>>) -> Vec<String> {
    bodies
        .into_iter()
        .map(|b| String::from_utf8(b).expect("utf-8 body"))
        .collect()
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

// ---------------------------------------------------------------------------------------------
// Routing

#[test]
fn default_exchange_routes_by_queue_name() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let q1 = support::temp_queue(&ch, "d1").await;
        let q2 = support::temp_queue(&ch, "d2").await;
        publish_confirmed(&ch, "", &q1, b"one", BasicProperties::default()).await;
        publish_confirmed(&ch, "", &q2, b"two", BasicProperties::default()).await;
        publish_confirmed(&ch, "", &unique("nobody"), b"dropped", Default::default()).await;
        assert_eq!(strings(drain(&ch, &q1).await), ["one"]);
        assert_eq!(strings(drain(&ch, &q2).await), ["two"]);
        support::delete_queue(&conn, &q1).await;
        support::delete_queue(&conn, &q2).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn direct_exchange_routes_exact_keys() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let x = unique("direct");
        declare_exchange(&ch, &x, ExchangeKind::Direct).await;
        let qa = support::temp_queue(&ch, "a").await;
        let qb = support::temp_queue(&ch, "b").await;
        bind(&ch, &qa, &x, "red", FieldTable::default()).await;
        bind(&ch, &qa, &x, "green", FieldTable::default()).await;
        bind(&ch, &qb, &x, "red", FieldTable::default()).await;
        bind(&ch, &qb, &x, "", FieldTable::default()).await;
        for rk in ["red", "green", "blue", "", "Red", "red.x"] {
            publish_confirmed(&ch, &x, rk, rk.as_bytes(), Default::default()).await;
        }
        assert_eq!(strings(drain(&ch, &qa).await), ["red", "green"]);
        assert_eq!(strings(drain(&ch, &qb).await), ["red", ""]);
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        support::delete_queue(&conn, &qa).await;
        support::delete_queue(&conn, &qb).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn fanout_exchange_copies_to_every_queue() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let x = unique("fanout");
        declare_exchange(&ch, &x, ExchangeKind::Fanout).await;
        let mut queues = Vec::new();
        for i in 0..3 {
            let q = support::temp_queue(&ch, &format!("f{i}")).await;
            // The binding key does not matter to a fanout exchange.
            bind(&ch, &q, &x, &format!("ignored{i}"), FieldTable::default()).await;
            queues.push(q);
        }
        for rk in ["", "anything", "a.b.c"] {
            publish_confirmed(&ch, &x, rk, rk.as_bytes(), Default::default()).await;
        }
        for q in &queues {
            assert_eq!(strings(drain(&ch, q).await), ["", "anything", "a.b.c"]);
            support::delete_queue(&conn, q).await;
        }
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

/// Words of a topic routing key or binding key, as RabbitMQ splits them: the empty key has
/// no words; otherwise every `.` separates two (possibly empty) words.
fn words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// Reference topic matcher: `*` is exactly one word, `#` zero or more.
fn topic_matches(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| topic_matches(rest, &key[skip..])),
        Some((&"*", rest)) => !key.is_empty() && topic_matches(rest, &key[1..]),
        Some((w, rest)) => key.first() == Some(w) && topic_matches(rest, &key[1..]),
    }
}

#[test]
fn topic_reference_matcher_sanity() {
    let m = |p: &str, k: &str| topic_matches(&words(p), &words(k));
    assert!(m("#.a", "a") && m("#.a", "x.y.a") && !m("#.a", "a.x"));
    assert!(m("*", "a") && !m("*", "") && !m("*", "a.b"));
    assert!(m("#", "") && m("#", "a.b.c"));
    assert!(m("a.*.c", "a..c") && !m("a.*.c", "a.c"));
    assert!(m("a.#.c", "a.c") && m("a.#.c", "a.b.b.c"));
}

#[test]
fn topic_exchange_patterns_and_edge_cases() {
    let patterns = [
        "#", "*", "a", "a.*", "a.#", "#.a", "*.a", "a.*.c", "a.#.c", "#.b.#", "*.*", "a..c", "",
        "#.#", "*.#", "#.*", "a.*.#", ".", "a.",
    ];
    let keys = [
        "", "a", "b", "a.b", "b.a", "a.b.c", "a.c", "a..c", "x.a", "x.y.a", "a.b.b.c", ".", "a.",
        ".a", "b.b", "a.b.a", "A",
    ];
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let x = unique("topic");
        declare_exchange(&ch, &x, ExchangeKind::Topic).await;
        let mut queues = Vec::new();
        for p in patterns {
            let q = support::temp_queue(&ch, "t").await;
            bind(&ch, &q, &x, p, FieldTable::default()).await;
            queues.push(q);
        }
        for k in keys {
            publish_confirmed(&ch, &x, k, k.as_bytes(), Default::default()).await;
        }
        let mut wrong = Vec::new();
        for (p, q) in patterns.iter().zip(&queues) {
            let got = strings(drain(&ch, q).await);
            let want: Vec<String> = keys
                .iter()
                .filter(|k| topic_matches(&words(p), &words(k)))
                .map(|k| k.to_string())
                .collect();
            if got != want {
                wrong.push(format!("binding {p:?}: got {got:?}, expected {want:?}"));
            }
            support::delete_queue(&conn, q).await;
        }
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        assert!(
            wrong.is_empty(),
            "topic routing differs:\n{}",
            wrong.join("\n")
        );
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn overlapping_bindings_deliver_one_copy() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let x = unique("topic");
        declare_exchange(&ch, &x, ExchangeKind::Topic).await;
        let q = support::temp_queue(&ch, "overlap").await;
        for p in ["a.#", "#.b", "a.b", "*.*", "#"] {
            bind(&ch, &q, &x, p, FieldTable::default()).await;
        }
        publish_confirmed(&ch, &x, "a.b", b"once", Default::default()).await;
        assert_eq!(strings(drain(&ch, &q).await), ["once"]);
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn headers_exchange_all_and_any() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let x = unique("headers");
        declare_exchange(&ch, &x, ExchangeKind::Headers).await;
        let one = AMQPValue::LongInt(1);
        let bindings: Vec<(&str, FieldTable)> = vec![
            (
                "all",
                table(&[("x-match", s("all")), ("a", one.clone()), ("b", s("x"))]),
            ),
            (
                "any",
                table(&[("x-match", s("any")), ("a", one.clone()), ("b", s("x"))]),
            ),
            // Without x-match, "all" is the default.
            ("default", table(&[("a", one.clone()), ("b", s("x"))])),
            // "all" of nothing matches every message.
            ("empty", table(&[("x-match", s("all"))])),
        ];
        let mut queues = BTreeMap::new();
        for (name, args) in &bindings {
            let q = support::temp_queue(&ch, name).await;
            // The routing key plays no part.
            bind(&ch, &q, &x, "ignored", args.clone()).await;
            queues.insert(*name, q);
        }
        let messages: Vec<(&str, Option<FieldTable>)> = vec![
            ("both", Some(table(&[("a", one.clone()), ("b", s("x"))]))),
            (
                "both+extra",
                Some(table(&[("a", one.clone()), ("b", s("x")), ("c", s("z"))])),
            ),
            ("only-a", Some(table(&[("a", one.clone())]))),
            ("only-b", Some(table(&[("b", s("x"))]))),
            (
                "a-wrong",
                Some(table(&[("a", AMQPValue::LongInt(2)), ("b", s("x"))])),
            ),
            ("other", Some(table(&[("c", s("z"))]))),
            ("empty-headers", Some(FieldTable::default())),
            ("no-headers", None),
        ];
        for (body, headers) in &messages {
            let props = match headers {
                Some(h) => BasicProperties::default().with_headers(h.clone()),
                None => BasicProperties::default(),
            };
            publish_confirmed(&ch, &x, "whatever", body.as_bytes(), props).await;
        }
        let expect: [(&str, &[&str]); 4] = [
            ("all", &["both", "both+extra"]),
            (
                "any",
                &["both", "both+extra", "only-a", "only-b", "a-wrong"],
            ),
            ("default", &["both", "both+extra"]),
            (
                "empty",
                &[
                    "both",
                    "both+extra",
                    "only-a",
                    "only-b",
                    "a-wrong",
                    "other",
                    "empty-headers",
                    "no-headers",
                ],
            ),
        ];
        for (name, want) in expect {
            let q = &queues[name];
            assert_eq!(strings(drain(&ch, q).await), want, "binding {name}");
            support::delete_queue(&conn, q).await;
        }
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------------
// Errors and returns

#[test]
fn publish_to_missing_exchange_closes_the_channel_with_404() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let probe = support::CloseProbe::arm(&ch).await;
        ch.basic_publish(
            unique("missing").as_str().into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"lost",
            BasicProperties::default(),
        )
        .await
        .expect("publish is asynchronous");
        probe.assert_closed_with(code::NOT_FOUND).await;
        // In confirm mode the pending confirm fails with the same code.
        let ch = confirm_channel(&conn).await;
        let confirm = ch
            .basic_publish(
                unique("missing").as_str().into(),
                "k".into(),
                BasicPublishOptions::default(),
                b"lost",
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        support::assert_code(within("confirm", confirm).await, code::NOT_FOUND);
        assert!(conn.status().connected());
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn mandatory_unroutable_is_returned_with_312() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let x = unique("direct");
        declare_exchange(&ch, &x, ExchangeKind::Direct).await;
        let q = support::temp_queue(&ch, "routable").await;
        bind(&ch, &q, &x, "yes", FieldTable::default()).await;
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let props = BasicProperties::default().with_message_id("m-1".into());

        // Unroutable through an existing exchange, and through the default exchange.
        for (exchange, rk) in [(x.as_str(), "no"), ("", "no-such-queue")] {
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    rk.into(),
                    mandatory,
                    b"bounce",
                    props.clone(),
                )
                .await
                .expect("publish");
            match within("confirm", confirm).await.expect("confirm") {
                Confirmation::Ack(Some(ret)) => {
                    assert_eq!(ret.reply_code, code::NO_ROUTE);
                    assert_eq!(ret.delivery.data, b"bounce");
                    assert_eq!(ret.delivery.exchange.as_str(), exchange);
                    assert_eq!(ret.delivery.routing_key.as_str(), rk);
                    assert_eq!(
                        ret.delivery
                            .properties
                            .message_id()
                            .as_ref()
                            .map(|m| m.as_str()),
                        Some("m-1")
                    );
                }
                other => panic!("expected an ack carrying basic.return, got {other:?}"),
            }
        }
        // Routable mandatory messages are simply acked.
        let confirm = ch
            .basic_publish(x.as_str().into(), "yes".into(), mandatory, b"ok", props)
            .await
            .expect("publish");
        assert_eq!(
            within("confirm", confirm).await.expect("confirm"),
            Confirmation::Ack(None)
        );
        // Non-mandatory unroutable messages are dropped silently (and acked).
        let confirm = ch
            .basic_publish(
                x.as_str().into(),
                "no".into(),
                BasicPublishOptions::default(),
                b"dropped",
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        assert_eq!(
            within("confirm", confirm).await.expect("confirm"),
            Confirmation::Ack(None)
        );
        assert_eq!(strings(drain(&ch, &q).await), ["ok"]);
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn mandatory_return_without_confirms() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        ch.basic_publish(
            "amq.direct".into(),
            unique("nobody").as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"bounce",
            BasicProperties::default(),
        )
        .await
        .expect("publish");
        // The return precedes the reply to any later synchronous method on the channel.
        ch.basic_qos(0, Default::default()).await.expect("qos");
        let returned = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        support::eventually("basic.return", support::WAIT, || {
            let ch = ch.clone();
            let returned = returned.clone();
            async move {
                // Without confirms, lapin keeps returns until this call drains them.
                let mut r = ch.wait_for_confirms().await.expect("drain returns");
                let mut all = returned.lock().unwrap();
                all.append(&mut r);
                !all.is_empty()
            }
        })
        .await;
        let returned = std::mem::take(&mut *returned.lock().unwrap());
        assert_eq!(returned.len(), 1);
        assert_eq!(returned[0].reply_code, code::NO_ROUTE);
        assert_eq!(returned[0].delivery.data, b"bounce");
        assert!(ch.status().connected());
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn immediate_flag_is_not_implemented() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let probe = support::CloseProbe::arm(&ch).await;
        let q = support::temp_queue(&ch, "imm").await;
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions {
                immediate: true,
                ..Default::default()
            },
            b"now",
            BasicProperties::default(),
        )
        .await
        .expect("publish");
        // RabbitMQ dropped `immediate` in 3.0 and closes the connection with 540.
        probe.assert_closed_with(code::NOT_IMPLEMENTED).await;
        support::eventually("connection to close", support::WAIT, || {
            let closed = !conn.status().connected();
            async move { closed }
        })
        .await;
        let conn = support::connect(b.url()).await;
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------------
// Bodies and properties

#[test]
fn body_sizes_round_trip() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let frame_max = conn.configuration().frame_max() as usize;
        assert!(frame_max >= 4096, "frame_max {frame_max}");
        let ch = confirm_channel(&conn).await;
        let q = support::temp_queue(&ch, "sizes").await;
        let sizes = [
            0,
            1,
            frame_max - 9,
            frame_max - 8, // exactly one full body frame
            frame_max - 7, // one byte into a second frame
            frame_max,
            3 * (frame_max - 8) + 5,
            1024 * 1024,
        ];
        for (i, &n) in sizes.iter().enumerate() {
            let body: Vec<u8> = (0..n).map(|j| ((i * 31 + j * 7) % 256) as u8).collect();
            publish_confirmed(&ch, "", &q, &body, Default::default()).await;
            let got = ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("get")
                .unwrap_or_else(|| panic!("message of {n} bytes missing"));
            assert_eq!(got.delivery.data.len(), n, "size {n}");
            assert!(got.delivery.data == body, "body of {n} bytes changed");
        }
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn all_properties_round_trip() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let q = support::temp_queue(&ch, "props").await;

        let mut nested = FieldTable::default();
        nested.insert("inner".into(), AMQPValue::LongInt(-7));
        nested.insert(
            "deep".into(),
            AMQPValue::FieldTable(table(&[("x", s("y"))])),
        );
        let headers = table(&[
            ("bool-true", AMQPValue::Boolean(true)),
            ("bool-false", AMQPValue::Boolean(false)),
            ("i8", AMQPValue::ShortShortInt(-8)),
            ("u8", AMQPValue::ShortShortUInt(200)),
            ("i16", AMQPValue::ShortInt(-1600)),
            ("u16", AMQPValue::ShortUInt(60000)),
            ("i32", AMQPValue::LongInt(-320_000)),
            ("u32", AMQPValue::LongUInt(4_000_000_000)),
            ("i64", AMQPValue::LongLongInt(-6_400_000_000)),
            ("f32", AMQPValue::Float(1.5)),
            ("f64", AMQPValue::Double(-2.25)),
            (
                "decimal",
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 12345,
                }),
            ),
            ("longstr", s("héllo")),
            ("empty-str", s("")),
            (
                "array",
                AMQPValue::FieldArray(FieldArray::from(vec![
                    AMQPValue::LongInt(1),
                    s("two"),
                    AMQPValue::Boolean(true),
                    AMQPValue::FieldArray(FieldArray::from(vec![])),
                ])),
            ),
            ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
            ("table", AMQPValue::FieldTable(nested)),
            (
                "bytes",
                AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255])),
            ),
            ("void", AMQPValue::Void),
        ]);
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("corr-42".into())
            .with_reply_to("reply.queue".into())
            .with_expiration("600000".into())
            .with_message_id("msg-1".into())
            .with_timestamp(1_700_000_123)
            .with_type("order.created".into())
            // RabbitMQ checks user-id against the connection's user.
            .with_user_id("guest".into())
            .with_app_id("warren-tests".into())
            .with_cluster_id("cluster-9".into());
        publish_confirmed(&ch, "", &q, b"{}", props.clone()).await;
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("message");
        assert_eq!(got.delivery.properties, props);

        // And with no properties at all, none appear.
        publish_confirmed(&ch, "", &q, b"bare", BasicProperties::default()).await;
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("message");
        assert_eq!(got.delivery.properties, BasicProperties::default());
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn wrong_user_id_is_406() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let probe = support::CloseProbe::arm(&ch).await;
        let q = support::temp_queue(&ch, "uid").await;
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"spoofed",
            BasicProperties::default().with_user_id("someone-else".into()),
        )
        .await
        .expect("publish");
        probe.assert_closed_with(code::PRECONDITION_FAILED).await;
        let ch = support::channel(&conn).await;
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn publish_to_server_named_queue_and_durable_flags() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = confirm_channel(&conn).await;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        let name = q.name().as_str().to_owned();
        let persistent = BasicProperties::default().with_delivery_mode(2);
        publish_confirmed(&ch, "", &name, b"p", persistent).await;
        publish_confirmed(&ch, "", &name, b"t", BasicProperties::default()).await;
        let got = ch
            .basic_get(name.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("message");
        assert_eq!(got.delivery.properties.delivery_mode(), &Some(2));
        assert!(!got.delivery.redelivered);
        assert_eq!(got.message_count, 1, "message_count counts the rest");
        conn.close(200, "bye".into()).await.expect("close");
    });
}
