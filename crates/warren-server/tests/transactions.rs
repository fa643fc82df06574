//! AMQP transactions: tx.select, publishes and acks held until tx.commit (across several
//! replicated queues), tx.rollback dropping publishes and handing acked deliveries back as
//! unacked, the 406s for mixing tx with confirms or committing outside a transaction, and a
//! commit spanning queues led by other nodes of a cluster, one of which is killed.

mod support;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use std::time::Duration;
use support::{assert_code, run, unique, within, within_for};

async fn durable_queue(ch: &Channel, prefix: &str) -> String {
    let name = unique(prefix);
    within(
        "queue.declare",
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.declare");
    name
}

async fn publish(ch: &Channel, queue: &str, body: &str) {
    within(
        "basic.publish",
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic.publish");
}

/// Ready messages, through a passive declare on a channel of its own.
async fn ready(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = support::channel(conn).await;
    let n = support::ready_count(&ch, queue).await;
    let _ = ch.close(200, "bye".into()).await;
    n
}

/// Polls the ready count until it is `n`, within `support::WAIT`.
async fn wait_ready(conn: &lapin::Connection, queue: &str, n: u32) {
    let deadline = std::time::Instant::now() + support::WAIT;
    loop {
        let got = ready(conn, queue).await;
        if got == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{queue} has {got} ready messages, expected {n}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[test]
fn publishes_to_several_queues_appear_at_commit() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q1 = durable_queue(&ch, "tx-a").await;
        let q2 = durable_queue(&ch, "tx-b").await;
        within("tx.select", ch.tx_select())
            .await
            .expect("tx.select");
        for i in 0..3 {
            publish(&ch, &q1, &format!("a{i}")).await;
        }
        publish(&ch, &q2, "b0").await;
        publish(&ch, &q2, "b1").await;
        assert_eq!((ready(&conn, &q1).await, ready(&conn, &q2).await), (0, 0));
        within("tx.commit", ch.tx_commit())
            .await
            .expect("tx.commit");
        assert_eq!((ready(&conn, &q1).await, ready(&conn, &q2).await), (3, 2));
        // The channel stays transactional: the next commit covers what follows.
        publish(&ch, &q1, "a3").await;
        assert_eq!(ready(&conn, &q1).await, 3);
        within("tx.commit", ch.tx_commit())
            .await
            .expect("tx.commit");
        assert_eq!(ready(&conn, &q1).await, 4);
    });
}

#[test]
fn rollback_drops_publishes() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = durable_queue(&ch, "tx-rollback").await;
        within("tx.select", ch.tx_select())
            .await
            .expect("tx.select");
        publish(&ch, &q, "dropped").await;
        within("tx.rollback", ch.tx_rollback())
            .await
            .expect("tx.rollback");
        publish(&ch, &q, "kept").await;
        within("tx.commit", ch.tx_commit())
            .await
            .expect("tx.commit");
        let got = within(
            "basic.get",
            ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get")
        .expect("a message");
        assert_eq!(got.delivery.data, b"kept");
        assert_eq!(ready(&conn, &q).await, 0);
    });
}

#[test]
fn acks_take_effect_at_commit_and_rollback_makes_them_unacked_again() {
    let b = support::broker();
    run(async {
        let (conn, setup) = support::open(b.url()).await;
        let q = durable_queue(&setup, "tx-acks").await;
        setup
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        for i in 0..2 {
            let confirm = setup
                .basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("m{i}").as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .expect("publish");
            assert!(within("confirm", confirm).await.expect("confirm").is_ack());
        }
        assert_eq!(ready(&conn, &q).await, 2);

        // Acked, then rolled back: closing the channel returns both.
        let ch = support::channel(&conn).await;
        within("tx.select", ch.tx_select())
            .await
            .expect("tx.select");
        let mut tags = Vec::new();
        for _ in 0..2 {
            let got = within(
                "basic.get",
                ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
            )
            .await
            .expect("basic.get")
            .expect("a message");
            tags.push(got.delivery.delivery_tag);
        }
        for tag in &tags {
            ch.basic_ack(*tag, BasicAckOptions::default())
                .await
                .expect("ack");
        }
        within("tx.rollback", ch.tx_rollback())
            .await
            .expect("tx.rollback");
        ch.close(200, "bye".into()).await.expect("close");
        // The close returns them asynchronously (as in RabbitMQ): wait for it.
        wait_ready(&conn, &q, 2).await;

        // Acked and committed: gone for good.
        let ch = support::channel(&conn).await;
        within("tx.select", ch.tx_select())
            .await
            .expect("tx.select");
        for _ in 0..2 {
            let got = within(
                "basic.get",
                ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
            )
            .await
            .expect("basic.get")
            .expect("a message");
            ch.basic_ack(got.delivery.delivery_tag, BasicAckOptions::default())
                .await
                .expect("ack");
        }
        within("tx.commit", ch.tx_commit())
            .await
            .expect("tx.commit");
        ch.close(200, "bye".into()).await.expect("close");
        // Had the acks not been applied, the close would bring the messages back.
        let probe = support::channel(&conn).await;
        assert!(
            within(
                "basic.get",
                probe.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            )
            .await
            .expect("basic.get")
            .is_none(),
            "acked and committed messages came back"
        );
    });
}

#[test]
fn tx_errors_are_406() {
    let b = support::broker();
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        assert_code(ch.tx_commit().await, 406);
        let ch = support::channel(&conn).await;
        assert_code(ch.tx_rollback().await, 406);
        let ch = support::channel(&conn).await;
        within("tx.select", ch.tx_select())
            .await
            .expect("tx.select");
        assert_code(
            ch.confirm_select(ConfirmSelectOptions::default()).await,
            406,
        );
        let ch = support::channel(&conn).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        assert_code(ch.tx_select().await, 406);
    });
}

/// A transaction on a follower node spanning two queues led by the two other nodes: the
/// commit applies in both (publishes and an ack), and a commit whose queue loses its leader
/// (kill -9) just before tx.commit still completes once a new leader serves it.
#[test]
fn a_commit_spans_queues_led_elsewhere_and_survives_a_leader_kill() {
    let Some(mut cluster) = support::cluster::cluster(
        "a_commit_spans_queues_led_elsewhere_and_survives_a_leader_kill",
        3,
    ) else {
        return;
    };
    run(async {
        // qa led by node 2, qb by node 3 (a queue's first leader is the declaring node).
        let (_c2, ch2) = support::open(&cluster.url(2)).await;
        let qa = durable_queue(&ch2, "tx-led-2").await;
        let (_c3, ch3) = support::open(&cluster.url(3)).await;
        let qb = durable_queue(&ch3, "tx-led-3").await;
        ch2.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let confirm = ch2
            .basic_publish(
                "".into(),
                qa.as_str().into(),
                BasicPublishOptions::default(),
                b"old",
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        assert!(within("confirm", confirm).await.expect("confirm").is_ack());

        let (c1, ch) = support::open(&cluster.url(1)).await;
        within("tx.select", ch.tx_select())
            .await
            .expect("tx.select");
        let old = within(
            "basic.get",
            ch.basic_get(qa.as_str().into(), BasicGetOptions { no_ack: false }),
        )
        .await
        .expect("basic.get")
        .expect("a message");
        publish(&ch, &qa, "new-a").await;
        publish(&ch, &qb, "new-b").await;
        ch.basic_ack(old.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .expect("ack");
        within("tx.commit", ch.tx_commit())
            .await
            .expect("tx.commit");
        // The ack took effect ("old" is gone, not unacked) and both publishes are there.
        assert_eq!((ready(&c1, &qa).await, ready(&c1, &qb).await), (1, 1));
        let got = within(
            "basic.get",
            ch.basic_get(qa.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get")
        .expect("a message");
        assert_eq!(got.delivery.data, b"new-a");
        within("tx.commit", ch.tx_commit())
            .await
            .expect("tx.commit");

        // qb's leader dies with the next transaction buffered: the commit waits for the new
        // leader and applies in both queues.
        publish(&ch, &qa, "after-a").await;
        publish(&ch, &qb, "after-b").await;
        cluster.kill9(3);
        within_for(Duration::from_secs(40), "tx.commit", ch.tx_commit())
            .await
            .expect("tx.commit after the leader kill");
        assert_eq!((ready(&c1, &qa).await, ready(&c1, &qb).await), (1, 2));
    });
}
