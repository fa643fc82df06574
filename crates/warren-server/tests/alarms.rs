//! Resource alarms: while a node's free disk is under its limit (or memory over its high
//! watermark), a connection that publishes is blocked (connection.blocked, nothing read from
//! it, its confirms wait) while consumers keep going; when the alarm clears the connection is
//! unblocked and what it sent is taken. Limits change at run time with `warrenctl`.

mod support;

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Event};
use support::{run, unique, within};

#[test]
fn publishers_are_blocked_while_an_alarm_is_on() {
    let Some(cluster) = support::cluster::cluster("resource_alarms", 1) else {
        return;
    };
    run(async {
        let q = unique("alarm");
        let (pub_conn, pub_ch) = support::open(&cluster.url(1)).await;
        let mut events = pub_conn.events_listener();
        pub_ch
            .queue_declare(
                q.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        pub_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        // Publishes and waits for the confirm.
        let publish = |body: &'static str| {
            let ch = pub_ch.clone();
            let q = q.clone();
            async move {
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                    .expect("publish");
                confirm.await.expect("confirm")
            }
        };
        assert!(within("confirm", publish("before")).await.is_ack());

        // No disk has this much free: the disk alarm goes on.
        let out = cluster
            .ctl(
                1,
                &[
                    "resource-limits",
                    "--disk-free-limit",
                    &u64::MAX.to_string(),
                ],
            )
            .await
            .expect_ok();
        assert!(out.contains("alarm: low on disk"), "{out}");
        let reason = within("connection.blocked", async {
            loop {
                match events.next().await {
                    Some(Event::ConnectionBlocked(reason)) => return reason,
                    Some(_) => continue,
                    None => panic!("events ended"),
                }
            }
        })
        .await;
        assert_eq!(reason, "low on disk");
        // lapin holds publishes back itself once told; either way the confirm cannot come
        // while the broker does not read the connection.
        let held = tokio::spawn(publish("during"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !held.is_finished(),
            "a publish was confirmed during the alarm"
        );

        // A connection that only consumes keeps working.
        let (_c, ch) = support::open(&cluster.url(1)).await;
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("the first message");
        assert_eq!(got.delivery.data, b"before");

        let out = cluster
            .ctl(1, &["resource-limits", "--disk-free-limit", "0"])
            .await
            .expect_ok();
        assert!(out.contains("alarm: none"), "{out}");
        within("connection.unblocked", async {
            loop {
                match events.next().await {
                    Some(Event::ConnectionUnblocked) => return,
                    Some(_) => continue,
                    None => panic!("events ended"),
                }
            }
        })
        .await;
        let confirm = within("the held publish's confirm", held)
            .await
            .expect("task");
        assert!(confirm.is_ack());
    });
}
