//! Tests that control the broker process: the start-up contract on stdout, the HTTP
//! endpoints, SIGTERM/SIGINT shutdown (clients see connection.close 320, exit status 0) and
//! durability across `kill -9` and restarts on the same data directory. They are skipped
//! when `WARREN_TEST_EXTERNAL_AMQP` points at an external broker.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use support::raw::RawConn;
use support::{Broker, code, run, unique, within, within_for};

const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = support::channel(conn).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    ch
}

/// Publishes persistent messages `m{from}`..`m{to-1}` and waits for every confirm.
async fn publish_range(ch: &Channel, exchange: &str, rk: &str, from: u32, to: u32) {
    let mut pending = Vec::with_capacity((to - from) as usize);
    for i in from..to {
        pending.push(
            ch.basic_publish(
                exchange.into(),
                rk.into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                persistent(),
            )
            .await
            .expect("publish"),
        );
    }
    for (i, p) in pending.into_iter().enumerate() {
        let c = within("publisher confirm", p).await.expect("confirm");
        assert!(c.is_ack(), "message {} not acked: {c:?}", from as usize + i);
    }
}

/// Declares durable queue `q` and fills it with persistent `m0`..`m{count-1}`, all
/// confirmed; returns the confirm channel it used (keep it until the connection closes:
/// dropping it closes the channel, which races with a connection.close).
async fn durable_queue_with_messages(conn: &Connection, q: &str, count: u32) -> Channel {
    let ch = confirm_channel(conn).await;
    ch.queue_declare(q.into(), DURABLE, FieldTable::default())
        .await
        .expect("declare");
    publish_range(&ch, "", q, 0, count).await;
    ch
}

/// Whether a queue exists (passive declare on a throwaway channel).
async fn queue_exists(conn: &Connection, name: &str) -> bool {
    let ch = support::channel(conn).await;
    let res = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
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

async fn exchange_exists(conn: &Connection, name: &str) -> bool {
    let ch = support::channel(conn).await;
    let res = ch
        .exchange_declare(
            name.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
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

// ---------------------------------------------------------------------------------------------
// Start-up contract and HTTP

#[test]
fn start_up_contract() {
    let Some(b) = support::process_broker("start_up_contract") else {
        return;
    };
    let amqp = b.amqp_addr();
    assert!(amqp.ip().is_loopback(), "amqp listener {amqp}");
    assert_ne!(amqp.port(), 0);
    let http = b.http_addr();
    assert!(http.ip().is_loopback(), "http listener {http}");
    assert_ne!(http.port(), 0);
    // Ready means ready: the first connection attempt succeeds.
    run(async {
        let (conn, ch) = support::open(&b.amqp_url()).await;
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn http_health_ready_and_metrics() {
    let Some(b) = support::process_broker("http_health_ready_and_metrics") else {
        return;
    };
    let addr = b.http_addr();
    for path in ["/healthz", "/readyz"] {
        let (status, _, _) = support::http_get(addr, path);
        assert_eq!(status, 200, "GET {path}");
    }
    // Some traffic first, so there is something to count.
    run(async {
        let (conn, ch) = support::open(&b.amqp_url()).await;
        let q = support::temp_queue(&ch, "metrics").await;
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .expect("publish");
        conn.close(200, "bye".into()).await.expect("close");
    });
    let (status, head, body) = support::http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text format is served as text/plain, got {content_type:?}"
    );
    let mut samples = 0;
    let mut types = 0;
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let rest = rest.trim_start();
            if rest.starts_with("TYPE ") {
                types += 1;
                let kind = rest.split_whitespace().nth(2).unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad TYPE line {line:?}"
                );
            }
            continue;
        }
        // name{labels} value [timestamp]
        let (name_labels, value) = match line.rfind('}') {
            Some(i) => (&line[..=i], line[i + 1..].trim()),
            None => line.split_once(' ').expect("sample without value"),
        };
        let name = name_labels.split('{').next().unwrap_or("");
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        let value = value.split_whitespace().next().unwrap_or("");
        assert!(
            value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
            "bad sample value in {line:?}"
        );
        samples += 1;
    }
    assert!(samples > 0 && types > 0, "no metrics in /metrics:\n{body}");
    let (status, _, _) = support::http_get(addr, "/no-such-endpoint");
    assert_eq!(status, 404);
}

// ---------------------------------------------------------------------------------------------
// Signals

/// Connects a lapin client (with a consumer) and a raw client, sends `signal`, and checks
/// that both see connection.close CONNECTION_FORCED and the process exits with status 0.
fn shutdown_by_signal(test: &str, signal: &str) {
    let Some(mut b) = support::process_broker(test) else {
        return;
    };
    let mut raw = RawConn::open(b.amqp_addr());
    raw.open_channel(1);
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let ch = support::channel(&conn).await;
        let q = support::temp_queue(&ch, "shutdown").await;
        let mut consumer = ch
            .basic_consume(
                q.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");

        b.signal(signal);
        // The raw client sees the exact method.
        let close = tokio::task::block_in_place(|| raw.expect_close());
        assert!(close.connection, "expected connection.close, got {close:?}");
        assert_eq!(close.reply_code, code::CONNECTION_FORCED, "{close:?}");
        raw.send_lenient(&support::raw::frame(
            support::raw::FRAME_METHOD,
            0,
            &support::raw::method_payload(support::raw::method::CONNECTION_CLOSE_OK, &[]),
        ));

        // The lapin consumer sees the connection end with an error: 320 when lapin reads the
        // close before the socket's end, an I/O error when a broker that is going away
        // (RabbitMQ does) closes the socket before lapin's close-ok goes out.
        match within("consumer error", consumer.next()).await {
            Some(Err(e)) => assert!(
                support::reply_code(&e) == Some(code::CONNECTION_FORCED) || e.is_io_error(),
                "consumer should fail with 320, got {e}"
            ),
            other => panic!("consumer should fail with 320, got {other:?}"),
        }
        // ...and the connection ends. (Its event stream is not checked: whether lapin
        // reports the close or the socket's end first there depends on timing.)
        support::eventually("the lapin connection to end", support::WAIT, || {
            let connected = conn.status().connected();
            async move { !connected }
        })
        .await;
    });
    let status = b.wait_for_exit();
    assert!(
        status.success(),
        "exit status after SIG{signal}: {status:?}"
    );
}

#[test]
fn sigterm_closes_connections_with_320_and_exits_0() {
    shutdown_by_signal("sigterm_closes_connections_with_320_and_exits_0", "TERM");
}

#[test]
fn sigint_closes_connections_with_320_and_exits_0() {
    shutdown_by_signal("sigint_closes_connections_with_320_and_exits_0", "INT");
}

#[test]
fn sigterm_when_idle_exits_0() {
    let Some(mut b) = support::process_broker("sigterm_when_idle_exits_0") else {
        return;
    };
    let status = b.sigterm();
    assert!(status.success(), "exit status {status:?}");
}

// ---------------------------------------------------------------------------------------------
// Durability

/// Consumes everything in `queue` (acking), returning (body, redelivered) in delivery order.
/// Stops when the queue reports no more ready messages and nothing is in flight.
async fn consume_all(conn: &Connection, queue: &str, expect: usize) -> Vec<(String, bool)> {
    let ch = support::channel(conn).await;
    ch.basic_qos(100, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut out = Vec::with_capacity(expect);
    while out.len() < expect {
        let d = support::next_delivery(&mut consumer).await;
        out.push((
            String::from_utf8(d.data.clone()).expect("utf-8"),
            d.redelivered,
        ));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    // Nothing beyond what was expected (no duplicates left behind).
    support::assert_no_delivery(&mut consumer, Duration::from_millis(500)).await;
    ch.basic_cancel(consumer.tag(), Default::default())
        .await
        .expect("cancel");
    // Closed here rather than on drop, so a following connection.close does not race it.
    ch.close(200, "bye".into()).await.expect("channel.close");
    out
}

fn expected_bodies(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

#[test]
fn confirmed_persistent_messages_survive_kill_9() {
    const N: u32 = 2000;
    let Some(mut b) = support::process_broker("confirmed_persistent_messages_survive_kill_9")
    else {
        return;
    };
    let q = unique("durable");
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let _ch = durable_queue_with_messages(&conn, &q, N).await;
        // The connection is still open when the broker dies.
        crash_and_restart(&mut b);
        drop(conn);

        let conn = support::connect(&b.amqp_url()).await;
        let ch = support::channel(&conn).await;
        assert_eq!(support::ready_count(&ch, &q).await, N);
        let got = consume_all(&conn, &q, N as usize).await;
        let bodies: Vec<String> = got.iter().map(|(b, _)| b.clone()).collect();
        assert_eq!(
            bodies,
            expected_bodies(0..N),
            "lost, duplicated or reordered"
        );
        // Publish more and crash again: the second generation must survive too.
        let ch = confirm_channel(&conn).await;
        publish_range(&ch, "", &q, N, N + 500).await;
        crash_and_restart(&mut b);
        drop(conn);

        let conn = support::connect(&b.amqp_url()).await;
        let got = consume_all(&conn, &q, 500).await;
        let bodies: Vec<String> = got.iter().map(|(b, _)| b.clone()).collect();
        assert_eq!(bodies, expected_bodies(N..N + 500));
        let ch = support::channel(&conn).await;
        assert_eq!(support::ready_count(&ch, &q).await, 0);
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

/// `kill -9` and restart on the same data directory, from inside a test body (the
/// runtime keeps running, so client connections are still open at the moment of the kill).
fn crash_and_restart(b: &mut Broker) {
    tokio::task::block_in_place(|| {
        b.kill9();
        b.restart();
    });
}

#[test]
fn unacked_deliveries_come_back_redelivered_after_kill_9() {
    const N: u32 = 50;
    const UNACKED: usize = 10;
    let Some(mut b) =
        support::process_broker("unacked_deliveries_come_back_redelivered_after_kill_9")
    else {
        return;
    };
    let q = unique("unacked");
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let _ch = durable_queue_with_messages(&conn, &q, N).await;
        let cch = support::channel(&conn).await;
        cch.basic_qos(UNACKED as u16, BasicQosOptions::default())
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
        for i in 0..UNACKED {
            let d = support::next_delivery(&mut consumer).await;
            assert_eq!(d.data, format!("m{i}").as_bytes());
            assert!(!d.redelivered);
        }
        // The deliveries are out and unacked when the broker dies.
        crash_and_restart(&mut b);
        drop(consumer);
        drop(conn);

        let conn = support::connect(&b.amqp_url()).await;
        let got = consume_all(&conn, &q, N as usize).await;
        let bodies: BTreeSet<String> = got.iter().map(|(b, _)| b.clone()).collect();
        assert_eq!(bodies.len(), N as usize, "duplicates: {got:?}");
        assert_eq!(bodies, expected_bodies(0..N).into_iter().collect());
        for (body, redelivered) in &got {
            let i: usize = body[1..].parse().unwrap();
            if i < UNACKED {
                assert!(*redelivered, "{body} was delivered before the crash");
            }
        }
        // The ones that were out come first, in their original order.
        let first: Vec<String> = got[..UNACKED].iter().map(|(b, _)| b.clone()).collect();
        assert_eq!(first, expected_bodies(0..UNACKED as u32));
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn durable_topology_survives_kill_9_and_transient_does_not() {
    let Some(mut b) =
        support::process_broker("durable_topology_survives_kill_9_and_transient_does_not")
    else {
        return;
    };
    let durable_x = unique("dx");
    let durable_x2 = unique("dx2");
    let transient_x = unique("tx");
    let durable_q = unique("dq");
    let via_e2e_q = unique("dq-e2e");
    let transient_q = unique("tq");
    let auto_delete_q = unique("adq");
    let exclusive_q = unique("xq");
    let durable_opts = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let ch = support::channel(&conn).await;
        for (x, opts) in [
            (&durable_x, durable_opts),
            (&durable_x2, durable_opts),
            (&transient_x, ExchangeDeclareOptions::default()),
        ] {
            ch.exchange_declare(
                x.as_str().into(),
                ExchangeKind::Direct,
                opts,
                FieldTable::default(),
            )
            .await
            .expect("exchange.declare");
        }
        for (q, opts) in [
            (&durable_q, DURABLE),
            (&via_e2e_q, DURABLE),
            (&transient_q, QueueDeclareOptions::default()),
            (
                &auto_delete_q,
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
            ),
            (
                &exclusive_q,
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
            ),
        ] {
            ch.queue_declare(q.as_str().into(), opts, FieldTable::default())
                .await
                .expect("queue.declare");
        }
        let bind = |q: &String, x: &String, rk: &'static str| {
            let ch = ch.clone();
            let (q, x) = (q.clone(), x.clone());
            async move {
                ch.queue_bind(
                    q.as_str().into(),
                    x.as_str().into(),
                    rk.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("queue.bind");
            }
        };
        bind(&durable_q, &durable_x, "k").await;
        bind(&via_e2e_q, &durable_x2, "k2").await;
        bind(&durable_q, &transient_x, "t").await;
        // An exchange-to-exchange route: durable_x --k2--> durable_x2 --k2--> via_e2e_q.
        ch.exchange_bind(
            durable_x2.as_str().into(),
            durable_x.as_str().into(),
            "k2".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange.bind");
        // The exclusive queue's connection is still open when the broker dies.
        crash_and_restart(&mut b);
        drop(conn);

        let conn = support::connect(&b.amqp_url()).await;
        assert!(
            exchange_exists(&conn, &durable_x).await,
            "durable exchange lost"
        );
        assert!(
            exchange_exists(&conn, &durable_x2).await,
            "durable exchange lost"
        );
        assert!(
            !exchange_exists(&conn, &transient_x).await,
            "transient exchange kept"
        );
        assert!(queue_exists(&conn, &durable_q).await, "durable queue lost");
        assert!(queue_exists(&conn, &via_e2e_q).await, "durable queue lost");
        for q in [&transient_q, &auto_delete_q, &exclusive_q] {
            assert!(!queue_exists(&conn, q).await, "{q} should not survive");
        }
        // Durable bindings route as before.
        let ch = confirm_channel(&conn).await;
        publish_range(&ch, &durable_x, "k", 0, 1).await;
        publish_range(&ch, &durable_x, "k2", 1, 2).await;
        let get = |q: &String| {
            let ch = ch.clone();
            let q = q.clone();
            async move {
                support::wait_ready_count(&ch, &q, 1).await;
                let m = ch
                    .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .expect("get")
                    .expect("message");
                String::from_utf8(m.delivery.data).unwrap()
            }
        };
        assert_eq!(get(&durable_q).await, "m0");
        assert_eq!(get(&via_e2e_q).await, "m1");
        for q in [&durable_q, &via_e2e_q] {
            support::delete_queue(&conn, q).await;
        }
        let ch = support::channel(&conn).await;
        for x in [&durable_x, &durable_x2] {
            ch.exchange_delete(x.as_str().into(), Default::default())
                .await
                .expect("delete");
        }
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn graceful_restart_keeps_messages_and_topology() {
    let Some(mut b) = support::process_broker("graceful_restart_keeps_messages_and_topology")
    else {
        return;
    };
    let q = unique("graceful");
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let _ch = durable_queue_with_messages(&conn, &q, 100).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
    let status = b.sigterm();
    assert!(status.success(), "exit status {status:?}");
    b.restart();
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let got = consume_all(&conn, &q, 100).await;
        let bodies: Vec<String> = got.iter().map(|(b, _)| b.clone()).collect();
        assert_eq!(bodies, expected_bodies(0..100));
        assert!(got.iter().all(|(_, r)| !r), "nothing was delivered before");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

/// A backlog of 20,000 messages, over twice a queue's page window (most of its index is on
/// disk), survives kill -9 and drains in publish order, each message once.
#[test]
fn a_backlog_deeper_than_the_page_window_survives_kill_9_in_order() {
    const N: u32 = 20_000;
    let Some(mut b) =
        support::process_broker("a_backlog_deeper_than_the_page_window_survives_kill_9_in_order")
    else {
        return;
    };
    let q = unique("deep");
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let ch = durable_queue_with_messages(&conn, &q, N).await;
        assert_eq!(support::ready_count(&ch, &q).await, N);
        conn.close(200, "bye".into()).await.expect("close");
    });
    crash_and_restart(&mut b);
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let got = within_for(
            Duration::from_secs(120),
            "draining the backlog",
            consume_all(&conn, &q, N as usize),
        )
        .await;
        let bodies: Vec<String> = got.iter().map(|(b, _)| b.clone()).collect();
        assert!(
            bodies == expected_bodies(0..N),
            "the backlog came back out of order"
        );
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn start_in_a_given_data_dir() {
    if support::external_amqp().is_some() {
        eprintln!("skipped: start_in_a_given_data_dir needs to control the broker process");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let q = unique("start-in");
    {
        let b = Broker::start_in(&data);
        run(async {
            let conn = support::connect(&b.amqp_url()).await;
            let _ch = durable_queue_with_messages(&conn, &q, 3).await;
            conn.close(200, "bye".into()).await.expect("close");
        });
        // Dropping the broker kills it; the directory stays.
    }
    assert!(data.exists(), "data dir removed by the harness");
    let b = Broker::start_in(&data);
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let ch = support::channel(&conn).await;
        assert_eq!(support::ready_count(&ch, &q).await, 3);
        conn.close(200, "bye".into()).await.expect("close");
    });
}

/// A node killed with a backlog and started again with another `--journal-bytes` replays its
/// old journal, then replaces it with one of the new size, written whole: no message is lost.
#[test]
fn a_node_restarted_with_another_journal_size_keeps_its_messages() {
    const N: u32 = 3000;
    if support::external_amqp().is_some() {
        eprintln!("skipped: this test restarts the broker process");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let journal = data.join("journal");
    let journal_len = || std::fs::metadata(&journal).expect("journal").len();
    const HEADER: u64 = 8192;
    let q = unique("resize");
    let mut b = Broker::start_in(&data);
    assert_eq!(
        journal_len(),
        HEADER + support::TEST_JOURNAL_BYTES,
        "a new node writes its journal whole"
    );
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let _ch = durable_queue_with_messages(&conn, &q, N).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
    b.kill9();
    drop(b);

    let smaller = support::TEST_JOURNAL_BYTES / 4;
    let args = [
        "--cluster-listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--journal-bytes".to_string(),
        smaller.to_string(),
    ];
    let mut b = Broker::launch_in(&data, &args);
    b.await_ready();
    assert_eq!(journal_len(), HEADER + smaller);
    assert!(
        b.stdout_text().contains("resized the journal")
            || b.stderr_text().contains("resized the journal"),
        "no resize logged"
    );
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let got = consume_all(&conn, &q, N as usize).await;
        let bodies: Vec<String> = got.iter().map(|(b, _)| b.clone()).collect();
        assert!(bodies == expected_bodies(0..N), "lost or reordered");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

/// A policy's dead-letter exchange still applies to a queue after a restart that loads the
/// metadata from a snapshot taken after the policy was set (the node then never replays the
/// policy's own log entry, so it must take the arguments in force from the snapshot).
#[test]
fn a_policy_from_before_the_metadata_snapshot_still_applies_after_a_restart() {
    if support::external_amqp().is_some() {
        eprintln!("skipped: this test restarts the broker process");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("warren.toml");
    std::fs::write(&config, "[raft]\nsnapshot_every = 4\n").expect("write config");
    let config = config.to_str().expect("utf-8 path").to_owned();
    let mut b = Broker::start_with_args(&["--config", &config]);
    let (source, dead) = (unique("pol-src"), unique("pol-dead"));
    let admin = Some(("guest", "guest"));
    let (status, _, body) = support::http_request(
        b.http_addr(),
        "PUT",
        "/api/policies/%2F/dlx",
        admin,
        Some(r#"{"pattern": "pol-src", "definition": {"dead-letter-exchange": "pol-dlx"}}"#),
    );
    assert_eq!(status, 204, "{body}");
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let ch = confirm_channel(&conn).await;
        ch.exchange_declare(
            "pol-dlx".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the dead-letter exchange");
        for q in [&source, &dead] {
            ch.queue_declare(q.as_str().into(), DURABLE, FieldTable::default())
                .await
                .expect("declare");
        }
        ch.queue_bind(
            dead.as_str().into(),
            "pol-dlx".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        // More metadata entries than `snapshot_every`, so a snapshot covers the policy.
        for i in 0..8 {
            let filler = format!("{source}-filler-{i}");
            ch.queue_declare(filler.as_str().into(), DURABLE, FieldTable::default())
                .await
                .expect("declare a filler");
        }
        conn.close(200, "bye".into()).await.expect("close");
    });
    assert!(b.sigterm().success());
    b.restart();
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let ch = confirm_channel(&conn).await;
        publish_range(&ch, "", &source, 0, 1).await;
        let got = ch
            .basic_get(source.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("the message");
        got.reject(BasicRejectOptions { requeue: false })
            .await
            .expect("reject");
        support::eventually(
            "the rejected message is dead-lettered",
            support::WAIT,
            || async { support::ready_count(&ch, &dead).await == 1 },
        )
        .await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}

/// The value of an unlabelled counter in `/metrics` text.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
}

#[test]
fn a_burst_of_single_acks_settles_every_delivery_in_few_commands() {
    use support::raw::{Args, FRAME_METHOD, frame, method, method_payload};
    const N: u32 = 100;
    let Some(b) =
        support::process_broker("a_burst_of_single_acks_settles_every_delivery_in_few_commands")
    else {
        return;
    };
    let q = unique("ack-burst");
    run(async {
        let conn = support::connect(&b.amqp_url()).await;
        let ch = durable_queue_with_messages(&conn, &q, N).await;

        let mut raw = tokio::task::block_in_place(|| RawConn::open(b.amqp_addr()));
        tokio::task::block_in_place(|| {
            raw.open_channel(1);
            raw.send_method(
                1,
                method::BASIC_CONSUME,
                Args::new()
                    .short(0)
                    .shortstr(&q)
                    .shortstr("burst")
                    .bits(&[false, false, false, false])
                    .empty_table(),
            );
            let mut tags = Vec::new();
            while tags.len() < N as usize {
                let f = raw.expect_frame("a delivery");
                if f.is(method::BASIC_DELIVER) {
                    let mut args = f.args();
                    assert_eq!(args.shortstr(), "burst");
                    tags.push(args.longlong());
                }
            }
            // Every ack its own frame, all in one write: one read on the broker's side.
            let mut acks = Vec::new();
            for tag in &tags {
                acks.extend(frame(
                    FRAME_METHOD,
                    1,
                    &method_payload(
                        method::BASIC_ACK,
                        &Args::new().longlong(*tag).bits(&[false]).0,
                    ),
                ));
            }
            raw.send(&acks);
            // Closing the channel would return whatever it still held to the queue.
            raw.send_method(
                1,
                method::CHANNEL_CLOSE,
                Args::new().short(200).shortstr("bye").short(0).short(0),
            );
            // (after the last delivery's content frames)
            loop {
                let f = raw.expect_frame("channel.close-ok");
                if f.kind == FRAME_METHOD {
                    assert!(f.is(method::CHANNEL_CLOSE_OK), "got {f:?}");
                    break;
                }
            }
        });

        let metrics = support::http_get(b.http_addr(), "/metrics").2;
        assert_eq!(counter(&metrics, "warren_acked_total"), u64::from(N));
        let commands = counter(&metrics, "warren_settlement_commands_total");
        assert!(
            (1..=10).contains(&commands),
            "{N} acks read together took {commands} settlement commands"
        );
        // Every ack took effect: nothing came back when the channel closed.
        let got = ch
            .basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .expect("basic.get");
        assert!(got.is_none(), "an acked message came back: {got:?}");
        support::delete_queue(&conn, &q).await;
        conn.close(200, "bye".into()).await.expect("close");
    });
}
