//! Topology methods as clients use them: exchange.declare/delete/bind/unbind,
//! queue.declare/bind/unbind/purge/delete, with their reply codes and counts, and the
//! lifetime rules for exclusive, auto-delete and server-named objects.

mod support;

use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use support::{assert_code, code, run, unique, within};

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

fn xpassive() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Whether a queue exists, asked on a throwaway channel (a 404 closes it).
async fn queue_exists(conn: &Connection, name: &str) -> bool {
    let ch = support::channel(conn).await;
    let res = within(
        "passive queue.declare",
        ch.queue_declare(name.into(), passive(), FieldTable::default()),
    )
    .await;
    match res {
        Ok(_) => {
            let _ = ch.close(200, "bye".into()).await;
            true
        }
        Err(e) => {
            assert_eq!(support::reply_code(&e), Some(code::NOT_FOUND), "{e}");
            false
        }
    }
}

/// Whether an exchange exists, asked on a throwaway channel.
async fn exchange_exists(conn: &Connection, name: &str) -> bool {
    let ch = support::channel(conn).await;
    let res = within(
        "passive exchange.declare",
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            xpassive(),
            FieldTable::default(),
        ),
    )
    .await;
    match res {
        Ok(()) => {
            let _ = ch.close(200, "bye".into()).await;
            true
        }
        Err(e) => {
            assert_eq!(support::reply_code(&e), Some(code::NOT_FOUND), "{e}");
            false
        }
    }
}

async fn publish(ch: &Channel, exchange: &str, rk: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        rk.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await
    .expect("basic.publish");
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(
        "exchange.declare",
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.declare");
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, rk: &str) {
    within(
        "queue.bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            rk.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.bind");
}

// ---------------------------------------------------------------------------------------------
// exchange.declare

#[test]
fn declare_every_exchange_type_and_flag() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let kinds = [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ];
        let flag_sets = [
            ExchangeDeclareOptions::default(),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            ExchangeDeclareOptions {
                internal: true,
                ..Default::default()
            },
        ];
        let mut names = Vec::new();
        for kind in &kinds {
            for flags in &flag_sets {
                let name = unique("x");
                within(
                    "exchange.declare",
                    ch.exchange_declare(
                        name.as_str().into(),
                        kind.clone(),
                        *flags,
                        FieldTable::default(),
                    ),
                )
                .await
                .unwrap_or_else(|e| panic!("declare {kind:?} {flags:?}: {e}"));
                // Redeclaring with identical settings is fine, and so is a passive declare.
                ch.exchange_declare(
                    name.as_str().into(),
                    kind.clone(),
                    *flags,
                    FieldTable::default(),
                )
                .await
                .expect("identical redeclare");
                ch.exchange_declare(
                    name.as_str().into(),
                    kind.clone(),
                    xpassive(),
                    FieldTable::default(),
                )
                .await
                .expect("passive declare");
                names.push(name);
            }
        }
        for name in &names {
            ch.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .expect("exchange.delete");
        }
        for name in &names[..2] {
            assert!(
                !exchange_exists(&conn, name).await,
                "{name} survived delete"
            );
        }
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn builtin_exchanges_exist() {
    let b = support::broker();
    run(async {
        let (conn, _ch) = support::open(b.url()).await;
        for name in [
            "amq.direct",
            "amq.fanout",
            "amq.topic",
            "amq.headers",
            "amq.match",
        ] {
            assert!(exchange_exists(&conn, name).await, "{name} is missing");
        }
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn passive_declare_of_missing_exchange_is_404() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let res = ch
            .exchange_declare(
                unique("nope").as_str().into(),
                ExchangeKind::Direct,
                xpassive(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);
        assert!(!ch.status().connected(), "404 must close the channel");
        assert!(
            conn.status().connected(),
            "404 must not close the connection"
        );
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn redeclare_exchange_with_other_settings_is_406() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let name = unique("x");
        declare_exchange(&ch, &name, ExchangeKind::Direct).await;

        let ch2 = support::channel(&conn).await;
        let res = ch2
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::PRECONDITION_FAILED);

        let ch3 = support::channel(&conn).await;
        let res = ch3
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::PRECONDITION_FAILED);

        // The original is untouched and a passive declare does not compare settings.
        let ch4 = support::channel(&conn).await;
        ch4.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Fanout,
            xpassive(),
            FieldTable::default(),
        )
        .await
        .expect("passive declare ignores the type");
        ch4.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn reserved_exchange_names_are_403() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        // Creating an exchange named amq.* is refused, and so is declaring the default
        // exchange.
        for name in [format!("amq.{}", unique("mine")), String::new()] {
            let ch = support::channel(&conn).await;
            let res = ch
                .exchange_declare(
                    name.as_str().into(),
                    ExchangeKind::Direct,
                    durable,
                    FieldTable::default(),
                )
                .await;
            assert_code(res, code::ACCESS_REFUSED);
        }
        // Redeclaring a built-in one with its own settings is fine (clients do that), with
        // other settings it is the usual 406: the name check applies only to new exchanges.
        let ch = support::channel(&conn).await;
        ch.exchange_declare(
            "amq.direct".into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await
        .expect("equivalent redeclare of amq.direct");
        let res = ch
            .exchange_declare(
                "amq.fanout".into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::PRECONDITION_FAILED);
        for name in ["amq.direct", "amq.topic"] {
            let ch = support::channel(&conn).await;
            let res = ch
                .exchange_delete(name.into(), ExchangeDeleteOptions::default())
                .await;
            assert_code(res, code::ACCESS_REFUSED);
        }
        assert!(exchange_exists(&conn, "amq.direct").await);
        conn.close(200, "bye".into()).await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------------
// exchange.delete

#[test]
fn exchange_delete_if_unused() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let x = unique("x");
        declare_exchange(&ch, &x, ExchangeKind::Direct).await;
        let q = support::temp_queue(&ch, "q").await;
        bind(&ch, &q, &x, "k").await;

        let res = ch
            .exchange_delete(
                x.as_str().into(),
                ExchangeDeleteOptions {
                    if_unused: true,
                    ..Default::default()
                },
            )
            .await;
        assert_code(res, code::PRECONDITION_FAILED);
        assert!(
            exchange_exists(&conn, &x).await,
            "if-unused delete removed it"
        );

        let ch = support::channel(&conn).await;
        ch.queue_unbind(
            q.as_str().into(),
            x.as_str().into(),
            "k".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
        ch.exchange_delete(
            x.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .expect("if-unused delete of an unbound exchange");
        assert!(!exchange_exists(&conn, &x).await);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn exchange_that_is_only_a_destination_counts_as_unused() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let src = unique("src");
        let dst = unique("dst");
        declare_exchange(&ch, &src, ExchangeKind::Fanout).await;
        declare_exchange(&ch, &dst, ExchangeKind::Fanout).await;
        ch.exchange_bind(
            dst.as_str().into(),
            src.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.bind");
        // `src` is used (it is the source of a binding): if-unused refuses.
        let res = ch
            .exchange_delete(
                src.as_str().into(),
                ExchangeDeleteOptions {
                    if_unused: true,
                    ..Default::default()
                },
            )
            .await;
        assert_code(res, code::PRECONDITION_FAILED);
        // `dst` is only a destination: RabbitMQ counts only bindings from an exchange.
        let ch = support::channel(&conn).await;
        ch.exchange_delete(
            dst.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .expect("if-unused delete of a destination-only exchange");
        assert!(!exchange_exists(&conn, &dst).await);
        // Its binding went with it, so `src` is unused now.
        ch.exchange_delete(
            src.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .expect("if-unused delete once the binding is gone");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn exchange_delete_removes_its_bindings() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let x = unique("x");
        declare_exchange(&ch, &x, ExchangeKind::Fanout).await;
        let q = support::temp_queue(&ch, "q").await;
        bind(&ch, &q, &x, "").await;
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        // Recreated under the same name, it starts with no bindings.
        declare_exchange(&ch, &x, ExchangeKind::Fanout).await;
        publish(&ch, &x, "", b"lost").await;
        publish(&ch, "", &q, b"direct").await;
        support::wait_ready_count(&ch, &q, 1).await;
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("message");
        assert_eq!(got.delivery.data, b"direct");
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn deleting_missing_objects_is_ok() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        // RabbitMQ made both deletes idempotent; clients rely on it in clean-up code.
        ch.exchange_delete(
            unique("none").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .expect("delete of a missing exchange");
        let n = ch
            .queue_delete(
                unique("none").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await
            .expect("delete of a missing queue");
        assert_eq!(n, 0);
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn auto_delete_exchange_goes_with_its_last_binding() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let x = unique("x");
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        // Never bound: it stays.
        assert!(exchange_exists(&conn, &x).await);
        let q = support::temp_queue(&ch, "q").await;
        bind(&ch, &q, &x, "a").await;
        bind(&ch, &q, &x, "b").await;
        ch.queue_unbind(
            q.as_str().into(),
            x.as_str().into(),
            "a".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind a");
        assert!(exchange_exists(&conn, &x).await, "one binding is left");
        ch.queue_unbind(
            q.as_str().into(),
            x.as_str().into(),
            "b".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind b");
        support::eventually("auto-delete exchange to go", support::WAIT, || {
            let conn = &conn;
            let x = x.clone();
            async move { !exchange_exists(conn, &x).await }
        })
        .await;
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------------
// exchange.bind / unbind, internal exchanges

#[test]
fn exchange_to_exchange_binding_routes_end_to_end() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let src = unique("src");
        let dst = unique("dst");
        declare_exchange(&ch, &src, ExchangeKind::Topic).await;
        ch.exchange_declare(
            dst.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                internal: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare internal");
        let q = support::temp_queue(&ch, "q").await;
        bind(&ch, &q, &dst, "").await;
        ch.exchange_bind(
            dst.as_str().into(),
            src.as_str().into(),
            "orders.*".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.bind");

        publish(&ch, &src, "orders.new", b"1").await;
        publish(&ch, &src, "invoices.new", b"not routed").await;
        publish(&ch, &src, "orders.old", b"2").await;
        support::wait_ready_count(&ch, &q, 2).await;
        for want in [&b"1"[..], b"2"] {
            let got = ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("get")
                .expect("message");
            assert_eq!(got.delivery.data, want);
            assert_eq!(got.delivery.exchange.as_str(), src, "exchange as published");
        }

        // Publishing straight to an internal exchange is refused.
        let ch2 = support::channel(&conn).await;
        let probe = support::CloseProbe::arm(&ch2).await;
        publish(&ch2, &dst, "", b"refused").await;
        probe.assert_closed_with(code::ACCESS_REFUSED).await;

        ch.exchange_unbind(
            dst.as_str().into(),
            src.as_str().into(),
            "orders.*".into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.unbind");
        publish(&ch, &src, "orders.new", b"after unbind").await;
        publish(&ch, "", &q, b"marker").await;
        support::wait_ready_count(&ch, &q, 1).await;
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("message");
        assert_eq!(
            got.delivery.data, b"marker",
            "unbound route still delivered"
        );

        for x in [&src, &dst] {
            ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .expect("delete");
        }
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn exchange_bind_to_missing_exchange_is_404() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let x = unique("x");
        declare_exchange(&ch, &x, ExchangeKind::Direct).await;
        let res = ch
            .exchange_bind(
                x.as_str().into(),
                unique("missing").as_str().into(),
                "k".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);
        let ch = support::channel(&conn).await;
        let res = ch
            .exchange_bind(
                unique("missing").as_str().into(),
                x.as_str().into(),
                "k".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);
        let ch = support::channel(&conn).await;
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------------
// queue.declare

#[test]
fn server_named_queues() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let mut names = Vec::new();
        for _ in 0..3 {
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
            assert!(
                q.name().as_str().starts_with("amq.gen-"),
                "server-named queue {:?}",
                q.name()
            );
            assert_eq!(q.message_count(), 0);
            assert_eq!(q.consumer_count(), 0);
            names.push(q.name().to_string());
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 3, "server names must be unique");
        // The generated name works like any other.
        publish(&ch, "", &names[0], b"hi").await;
        support::wait_ready_count(&ch, &names[0], 1).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn passive_declare_of_missing_queue_is_404() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let res = ch
            .queue_declare(
                unique("nope").as_str().into(),
                passive(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);
        assert!(conn.status().connected());
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn reserved_queue_names_are_403() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let res = ch
            .queue_declare(
                format!("amq.{}", unique("mine")).as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::ACCESS_REFUSED);
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn exclusive_queue_is_locked_to_its_connection() {
    let b = support::broker();
    run(async {
        let owner = support::connect(b.url()).await;
        let other = support::connect(b.url()).await;
        let ch = support::channel(&owner).await;
        let q = unique("excl");
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        // The owner may use it on any of its channels.
        let ch_b = support::channel(&owner).await;
        ch_b.queue_declare(q.as_str().into(), passive(), FieldTable::default())
            .await
            .expect("owner's passive declare");

        let och = support::channel(&other).await;
        let res = och
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::RESOURCE_LOCKED);
        let och = support::channel(&other).await;
        let res = och
            .queue_declare(q.as_str().into(), passive(), FieldTable::default())
            .await;
        assert_code(res, code::RESOURCE_LOCKED);
        let och = support::channel(&other).await;
        let res = och
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::RESOURCE_LOCKED);
        let och = support::channel(&other).await;
        let res = och
            .basic_get(q.as_str().into(), BasicGetOptions::default())
            .await;
        assert_code(res, code::RESOURCE_LOCKED);
        let och = support::channel(&other).await;
        let res = och
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
        assert_code(res, code::RESOURCE_LOCKED);
        let och = support::channel(&other).await;
        let res = och
            .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await;
        assert_code(res, code::RESOURCE_LOCKED);

        // Closing the owner deletes the queue.
        within("close", owner.close(200, "bye".into()))
            .await
            .expect("close");
        support::eventually("exclusive queue to go", support::WAIT, || {
            let other = &other;
            let q = q.clone();
            async move { !queue_exists(other, &q).await }
        })
        .await;
        other.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn auto_delete_queue_goes_with_its_last_consumer() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = unique("auto");
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        // Without ever having had a consumer it stays.
        assert!(queue_exists(&conn, &q).await);
        let c1 = ch
            .basic_consume(
                q.as_str().into(),
                "c1".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let c2 = ch
            .basic_consume(
                q.as_str().into(),
                "c2".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        ch.basic_cancel(c1.tag(), Default::default())
            .await
            .expect("cancel");
        assert!(queue_exists(&conn, &q).await, "one consumer is left");
        ch.basic_cancel(c2.tag(), Default::default())
            .await
            .expect("cancel");
        support::eventually("auto-delete queue to go", support::WAIT, || {
            let conn = &conn;
            let q = q.clone();
            async move { !queue_exists(conn, &q).await }
        })
        .await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn redeclare_queue_with_other_settings_is_406() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = unique("q");
        let ttl = |ms: i32| args(&[("x-message-ttl", AMQPValue::LongInt(ms))]);
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            ttl(60_000),
        )
        .await
        .expect("declare");
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            ttl(60_000),
        )
        .await
        .expect("identical redeclare");

        let bad: [(QueueDeclareOptions, FieldTable); 3] = [
            (
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                ttl(60_000),
            ),
            (
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                ttl(60_000),
            ),
            (QueueDeclareOptions::default(), ttl(1_000)),
        ];
        for (opts, a) in bad {
            let ch = support::channel(&conn).await;
            let res = ch.queue_declare(q.as_str().into(), opts, a.clone()).await;
            assert_code(res, code::PRECONDITION_FAILED);
        }
        // Passive declares do not compare.
        let ch = support::channel(&conn).await;
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive");
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn declare_ok_reports_ready_messages_and_consumers() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "counts").await;
        for i in 0..3 {
            publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
        }
        support::wait_ready_count(&ch, &q, 3).await;
        let cch = support::channel(&conn).await;
        cch.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = cch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let first = support::next_delivery(&mut consumer).await;
        assert_eq!(first.data, b"m0");
        // One delivered but unacked: not counted as ready.
        let d = ch
            .queue_declare(q.as_str().into(), passive(), FieldTable::default())
            .await
            .expect("passive");
        assert_eq!(d.message_count(), 2);
        assert_eq!(d.consumer_count(), 1);
        // A non-passive redeclare reports the same.
        let d = ch
            .queue_declare(
                q.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("redeclare");
        assert_eq!((d.message_count(), d.consumer_count()), (2, 1));
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------------
// queue.bind / unbind

#[test]
fn queue_bind_errors() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "q").await;

        let res = ch
            .queue_bind(
                q.as_str().into(),
                unique("missing").as_str().into(),
                "k".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);

        let ch = support::channel(&conn).await;
        let res = ch
            .queue_bind(
                unique("missing").as_str().into(),
                "amq.direct".into(),
                "k".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);

        // The default exchange's bindings are implicit and cannot be changed.
        let ch = support::channel(&conn).await;
        let res = ch
            .queue_bind(
                q.as_str().into(),
                "".into(),
                "k".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await;
        assert_code(res, code::ACCESS_REFUSED);

        // Unbinding is idempotent in RabbitMQ, even when the exchange or queue is missing.
        let ch = support::channel(&conn).await;
        ch.queue_unbind(
            q.as_str().into(),
            unique("missing").as_str().into(),
            "k".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind from a missing exchange");
        ch.queue_unbind(
            unique("missing").as_str().into(),
            "amq.direct".into(),
            "k".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind of a missing queue");

        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn queue_bind_and_unbind_change_routing() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let x = unique("x");
        declare_exchange(&ch, &x, ExchangeKind::Direct).await;
        let q = support::temp_queue(&ch, "q").await;
        bind(&ch, &q, &x, "k").await;
        // Binding twice is harmless: still one copy per message.
        bind(&ch, &q, &x, "k").await;
        publish(&ch, &x, "k", b"1").await;
        support::wait_ready_count(&ch, &q, 1).await;

        ch.queue_unbind(
            q.as_str().into(),
            x.as_str().into(),
            "k".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
        // Unbinding what is not bound is not an error.
        ch.queue_unbind(
            q.as_str().into(),
            x.as_str().into(),
            "k".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind again");
        publish(&ch, &x, "k", b"2").await;
        publish(&ch, "", &q, b"marker").await;
        support::wait_ready_count(&ch, &q, 2).await;
        let mut bodies = Vec::new();
        for _ in 0..2 {
            let got = ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("get")
                .expect("message");
            bodies.push(got.delivery.data);
        }
        assert_eq!(bodies, vec![b"1".to_vec(), b"marker".to_vec()]);
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .expect("delete");
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

// ---------------------------------------------------------------------------------------------
// queue.purge / queue.delete

#[test]
fn queue_purge_returns_count_and_spares_unacked() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "purge").await;
        for i in 0..5 {
            publish(&ch, "", &q, format!("{i}").as_bytes()).await;
        }
        support::wait_ready_count(&ch, &q, 5).await;
        // Take one without acking: purge leaves it alone.
        let held = ch
            .basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("message");
        let n = ch
            .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .expect("purge");
        assert_eq!(n, 4);
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        let n = ch
            .queue_purge(q.as_str().into(), QueuePurgeOptions::default())
            .await
            .expect("purge");
        assert_eq!(n, 0);
        held.delivery
            .nack(lapin::options::BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .expect("nack");
        support::wait_ready_count(&ch, &q, 1).await;

        let ch2 = support::channel(&conn).await;
        let res = ch2
            .queue_purge(
                unique("missing").as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await;
        assert_code(res, code::NOT_FOUND);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn queue_delete_if_unused_and_if_empty() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "del").await;
        publish(&ch, "", &q, b"x").await;
        publish(&ch, "", &q, b"y").await;
        support::wait_ready_count(&ch, &q, 2).await;

        let res = ch
            .queue_delete(
                q.as_str().into(),
                QueueDeleteOptions {
                    if_empty: true,
                    ..Default::default()
                },
            )
            .await;
        assert_code(res, code::PRECONDITION_FAILED);

        let cch = support::channel(&conn).await;
        cch.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let _consumer = cch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let ch = support::channel(&conn).await;
        let res = ch
            .queue_delete(
                q.as_str().into(),
                QueueDeleteOptions {
                    if_unused: true,
                    ..Default::default()
                },
            )
            .await;
        assert_code(res, code::PRECONDITION_FAILED);
        assert!(queue_exists(&conn, &q).await);

        // A plain delete reports the ready messages it dropped (one is out with the
        // consumer, unacked).
        let ch = support::channel(&conn).await;
        support::wait_ready_count(&ch, &q, 1).await;
        let n = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        assert_eq!(n, 1);
        assert!(!queue_exists(&conn, &q).await);
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn deleting_a_queue_cancels_its_consumers() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "cancelled").await;
        let cch = support::channel(&conn).await;
        let mut consumer = cch
            .basic_consume(
                q.as_str().into(),
                "watcher".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        publish(&ch, "", &q, b"before delete").await;
        let d = support::next_delivery(&mut consumer).await;
        assert_eq!(d.data, b"before delete");

        let other = support::connect(b.url()).await;
        let och = support::channel(&other).await;
        och.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        // The server's basic.cancel ends the consumer's stream.
        use futures::StreamExt;
        match within("basic.cancel from the server", consumer.next()).await {
            None => {}
            Some(Ok(d)) => panic!("unexpected delivery {:?}", d.data),
            Some(Err(e)) => panic!("consumer failed instead of being cancelled: {e}"),
        }
        // The consumer's channel is still usable.
        assert!(cch.status().connected());
        cch.basic_qos(5, BasicQosOptions::default())
            .await
            .expect("channel still open");
        other.close(200, "bye".into()).await.expect("close");
        conn.close(200, "bye".into()).await.expect("close");
    });
}
