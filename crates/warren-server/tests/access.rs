//! Virtual hosts, users and permissions through `warrenctl` and a real client: a user kept in
//! the metadata logs in with its password into the vhosts it has permissions in, and each
//! operation is checked against its configure/write/read expressions (403 when refused), on
//! every node of a cluster.

mod support;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use support::cluster::Cluster;
use support::{assert_code, run, unique, within};

/// `amqp://user:pass@node/vhost` for node `id`.
fn url_for(cluster: &Cluster, id: usize, user: &str, pass: &str, vhost: &str) -> String {
    let base = support::with_credentials(&cluster.url(id), user, pass);
    let (head, _) = base.rsplit_once('/').expect("url with a vhost");
    let vhost = vhost.replace('/', "%2f");
    format!("{head}/{vhost}")
}

async fn try_connect(url: &str) -> lapin::Result<Connection> {
    within(
        "connect",
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
}

#[test]
fn users_log_into_vhosts_they_have_permissions_in_and_are_checked() {
    let Some(cluster) = support::cluster::cluster("access_control", 2) else {
        return;
    };
    run(async {
        cluster.ctl(1, &["add-vhost", "prod"]).await.expect_ok();
        cluster
            .ctl(1, &["add-user", "app", "s3cret", "--tags", "monitoring"])
            .await
            .expect_ok();
        // May configure and read queues named *app-* and server-named ones, write to them through the default exchange.
        cluster
            .ctl(
                2,
                &[
                    "set-permissions",
                    "app",
                    "app-|^amq\\.gen-",
                    "^amq\\.default$",
                    "app-|^amq\\.gen-",
                    "--vhost",
                    "prod",
                ],
            )
            .await
            .expect_ok();
        let bad = cluster
            .ctl(
                1,
                &["set-permissions", "app", "(", "", "", "--vhost", "prod"],
            )
            .await;
        assert!(
            !bad.success() && bad.stderr.contains("invalid"),
            "{}",
            bad.describe()
        );
        let listing = cluster.ctl(2, &["list-access"]).await.expect_ok();
        assert!(
            listing.contains("prod") && listing.contains("user app"),
            "{listing}"
        );

        // Through node 2, which learnt all of it from the metadata.
        let conn = try_connect(&url_for(&cluster, 2, "app", "s3cret", "prod"))
            .await
            .expect("app logs into prod");
        let ch = conn.create_channel().await.expect("channel");
        let q = unique("app-orders");
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare app-*");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let confirm = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                b"order",
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack());
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("the message");
        assert_eq!(got.delivery.data, b"order");

        // Refusals: configure outside app-*, read from amq.topic to bind.
        let ch2 = conn.create_channel().await.expect("channel");
        assert_code(
            ch2.queue_declare(
                "other".into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await,
            403,
        );
        let ch3 = conn.create_channel().await.expect("channel");
        assert_code(
            ch3.queue_bind(
                q.as_str().into(),
                "amq.topic".into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await,
            403,
        );
        // Write to amq.topic is refused: the publish closes the channel with 403.
        let ch4 = conn.create_channel().await.expect("channel");
        let probe = support::CloseProbe::arm(&ch4).await;
        let _ = ch4
            .basic_publish(
                "amq.topic".into(),
                "x".into(),
                BasicPublishOptions::default(),
                b"nope",
                BasicProperties::default(),
            )
            .await;
        probe.assert_closed_with(403).await;
        let _ = conn.close(200, "bye".into()).await;

        // No permissions in "/", a wrong password, a deleted user: all refused at login.
        assert!(
            try_connect(&url_for(&cluster, 1, "app", "s3cret", "/"))
                .await
                .is_err()
        );
        assert!(
            try_connect(&url_for(&cluster, 1, "app", "wrong", "prod"))
                .await
                .is_err()
        );
        cluster.ctl(1, &["delete-user", "app"]).await.expect_ok();
        assert!(
            try_connect(&url_for(&cluster, 1, "app", "s3cret", "prod"))
                .await
                .is_err()
        );

        // Deleting the vhost takes its queues with it.
        cluster.ctl(1, &["delete-vhost", "prod"]).await.expect_ok();
        assert!(
            try_connect(&url_for(&cluster, 1, "guest", "guest", "prod"))
                .await
                .is_err()
        );
    });
}

/// A policy applies queue arguments by name pattern, to queues declared before and after
/// it, through every node; clearing it takes them away; the queue's own arguments win.
#[test]
fn policies_apply_queue_arguments_by_pattern() {
    let Some(cluster) = support::cluster::cluster("policies", 2) else {
        return;
    };
    run(async {
        let (conn, ch) = support::open(&cluster.url(1)).await;
        let dlx = unique("pol-dlx");
        let dead = unique("pol-dead");
        ch.exchange_declare(
            dlx.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange.declare");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(dead.as_str().into(), durable, FieldTable::default())
            .await
            .expect("declare dead");
        ch.queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        let before = unique("pol-before");
        ch.queue_declare(before.as_str().into(), durable, FieldTable::default())
            .await
            .expect("declare");

        let bad = cluster
            .ctl(1, &["set-policy", "bad", ".*", r#"{"max-priority": 5}"#])
            .await;
        assert!(
            !bad.success() && bad.stderr.contains("unsupported"),
            "{}",
            bad.describe()
        );
        let definition = format!(r#"{{"message-ttl": 100, "dead-letter-exchange": "{dlx}"}}"#);
        cluster
            .ctl(
                2,
                &["set-policy", "expire", "pol-(before|after)", &definition],
            )
            .await
            .expect_ok();
        let after = unique("pol-after");
        ch.queue_declare(after.as_str().into(), durable, FieldTable::default())
            .await
            .expect("declare");

        let pub_ch = conn.create_channel().await.expect("channel");
        pub_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let publish = |q: String, body: &'static str| {
            let pub_ch = pub_ch.clone();
            async move {
                let c = pub_ch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish");
                assert!(c.await.expect("confirm").is_ack());
            }
        };
        publish(before.clone(), "b").await;
        publish(after.clone(), "a").await;
        // Both expire into the dead-letter queue, read through node 2.
        let (_c2, ch2) = support::open(&cluster.url(2)).await;
        let mut consumer = ch2
            .basic_consume(
                dead.as_str().into(),
                "".into(),
                lapin::options::BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(
                String::from_utf8_lossy(&support::next_delivery(&mut consumer).await.data)
                    .into_owned(),
            );
        }
        got.sort();
        assert_eq!(got, ["a", "b"]);

        let listing = cluster.ctl(1, &["list-access"]).await.expect_ok();
        assert!(listing.contains("policy expire"), "{listing}");
        cluster
            .ctl(1, &["clear-policy", "expire"])
            .await
            .expect_ok();
        publish(before.clone(), "stays").await;
        let kept = ch
            .basic_get(before.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("no TTL any more");
        assert_eq!(kept.delivery.data, b"stays");
    });
}
