//! Cluster formation through discovery: three nodes started with only a discovery address
//! list (what a Kubernetes headless service resolves to) and the expected node count find
//! each other, agree on the member list and serve a replicated queue.
//!
//! Each node listens on the same port of its own loopback address (127.0.0.1, .2, .3), as pods
//! behind one service name do.

mod support;

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use support::{Broker, run};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn nodes_started_with_a_discovery_address_form_one_cluster() {
    if support::external_amqp().is_some() {
        eprintln!("skipped: needs to start broker processes");
        return;
    }
    let port = free_port();
    let discover: Vec<String> = (1..=3).map(|i| format!("127.0.0.{i}:{port}")).collect();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes: Vec<Broker> = (1..=3)
        .map(|i| {
            Broker::launch_in(
                dirs[i - 1].path(),
                &[
                    "--node-id".into(),
                    i.to_string(),
                    "--cluster-listen".into(),
                    format!("127.0.0.{i}:{port}"),
                    "--advertise".into(),
                    format!("127.0.0.{i}:{port}"),
                    "--discover".into(),
                    discover.join(","),
                    "--expect".into(),
                    "3".into(),
                ],
            )
        })
        .collect();
    for n in &mut nodes {
        n.await_ready();
    }
    let urls: Vec<String> = nodes.iter().map(Broker::amqp_url).collect();
    run(async move {
        // A replicated queue declared on node 1 takes confirmed publishes through node 3:
        // only possible if the three agreed on one cluster.
        let (c1, ch1) = support::open(&urls[0]).await;
        ch1.queue_declare(
            "discovered".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        let (c3, ch3) = support::open(&urls[2]).await;
        ch3.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let confirm = ch3
            .basic_publish(
                "".into(),
                "discovered".into(),
                BasicPublishOptions::default(),
                b"hello",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        let confirmed = support::within_for(Duration::from_secs(20), "confirm", confirm)
            .await
            .expect("confirm");
        assert!(confirmed.is_ack());
        let (c2, ch2) = support::open(&urls[1]).await;
        assert_eq!(support::ready_count(&ch2, "discovered").await, 1);
        for c in [c1, c2, c3] {
            let _ = c.close(200, "bye".into()).await;
        }
    });
}
