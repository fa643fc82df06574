//! Connection-level behaviour seen by clients: the handshake and what the server announces
//! in it, authentication, tune negotiation (channel-max, frame-max, heartbeats), the close
//! handshake, and that a channel error closes only its own channel.

mod support;

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ErrorKind};
use support::raw::{self, Args, RawConn, Tune, Value, method};
use support::{code, run, within};

#[test]
fn open_channel_and_close_cleanly() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        assert!(conn.status().connected());
        let ch = support::channel(&conn).await;
        let q = within(
            "queue.declare",
            ch.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("declare");
        assert!(q.name().as_str().starts_with("amq.gen-"));
        within("channel.close", ch.close(200, "done".into()))
            .await
            .expect("channel.close");
        assert!(!ch.status().connected());
        within("connection.close", conn.close(200, "done".into()))
            .await
            .expect("connection.close");
        // lapin records the closed state on its own task just after close() resolves.
        support::eventually("lapin to record the closed state", support::WAIT, || {
            let closed = conn.status().closed();
            async move { closed }
        })
        .await;
        assert!(conn.create_channel().await.is_err());
    });
}

#[test]
fn many_channels_on_one_connection() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let mut chans = Vec::new();
        for _ in 0..50 {
            chans.push(support::channel(&conn).await);
        }
        let mut ids: Vec<u16> = chans.iter().map(|c| c.id()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 50);
        for ch in &chans {
            within("channel.close", ch.close(200, "bye".into()))
                .await
                .expect("close");
        }
        // A closed channel's number can be opened again.
        let again = support::channel(&conn).await;
        assert!(again.status().connected());
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn wrong_password_is_refused() {
    let b = support::broker();
    run(async {
        let url = support::with_credentials(b.url(), "guest", "not-the-password");
        let res = within(
            "a refused login",
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await;
        let err = match res {
            Ok(_) => panic!("login with a wrong password succeeded"),
            Err(e) => e,
        };
        // lapin announces authentication_failure_close, so the refusal arrives as
        // connection.close ACCESS_REFUSED rather than a bare disconnect.
        assert_eq!(
            support::reply_code(&err),
            Some(code::ACCESS_REFUSED),
            "unexpected error: {err}"
        );
        let url = support::with_credentials(b.url(), "no-such-user", "guest");
        let res = within(
            "a refused login",
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await;
        assert!(res.is_err(), "unknown user was let in");
    });
}

#[test]
fn wrong_password_on_the_wire() {
    let b = support::broker();
    // With the authentication_failure_close capability: connection.close 403, then EOF.
    let mut c = RawConn::connect(b.addr());
    c.send(raw::PROTOCOL_HEADER);
    c.read_start();
    c.send_start_ok("guest", "wrong");
    c.expect_connection_close(code::ACCESS_REFUSED);

    // Without it: the server just drops the connection, sending no method.
    let mut c = RawConn::connect(b.addr());
    c.send(raw::PROTOCOL_HEADER);
    c.read_start();
    c.send_start_ok_with("guest", "wrong", false);
    let rest = c.read_to_eof();
    assert!(
        rest.is_empty(),
        "expected a bare disconnect, got {} bytes: {rest:?}",
        rest.len()
    );
}

#[test]
fn amqplain_login() {
    // py-amqp (and so Celery) logs in with AMQPLAIN when the server offers it.
    let b = support::broker();
    let mut c = RawConn::connect(b.addr());
    c.send(raw::PROTOCOL_HEADER);
    c.read_start();
    c.send_start_ok_amqplain("guest", "guest");
    let t = c.read_tune();
    c.finish_handshake(Tune { heartbeat: 0, ..t });
    c.open_channel(1);
    c.declare_queue(1, "");
    c.shutdown();

    let mut c = RawConn::connect(b.addr());
    c.send(raw::PROTOCOL_HEADER);
    c.read_start();
    c.send_start_ok_amqplain("guest", "wrong");
    c.expect_connection_close(code::ACCESS_REFUSED);
}

#[test]
fn unknown_auth_mechanism_is_refused() {
    let b = support::broker();
    let mut c = RawConn::connect(b.addr());
    c.send(raw::PROTOCOL_HEADER);
    c.read_start();
    c.send_start_ok_raw("EXTERNAL", b"", true);
    // RabbitMQ 3.10 closes the socket without a method before tuning; a connection.close
    // with ACCESS_REFUSED or COMMAND_INVALID is an acceptable, politer equivalent.
    if let Some(close) = c.expect_connection_end() {
        assert!(
            [code::ACCESS_REFUSED, code::COMMAND_INVALID].contains(&close.reply_code),
            "{close:?}"
        );
    }
}

#[test]
fn server_splits_content_to_the_client_frame_max() {
    let b = support::broker();
    let mut c = RawConn::open_with(b.addr(), "guest", "guest", |t| Tune {
        frame_max: 4096,
        heartbeat: 0,
        ..t
    });
    c.open_channel(1);
    let q = support::unique("framemax");
    c.declare_queue(1, &q);
    let body: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    c.publish(1, "", &q, &body);
    c.send_method(
        1,
        method::BASIC_GET,
        Args::new().short(0).shortstr(&q).bits(&[true]),
    );
    let f = c.expect_method("basic.get-ok");
    assert!(f.is(method::BASIC_GET_OK), "{}", raw::describe(&f));
    let header = c.expect_frame("content header");
    assert_eq!(header.kind, raw::FRAME_HEADER);
    let size = u64::from_be_bytes(header.payload[4..12].try_into().unwrap());
    assert_eq!(size, body.len() as u64);
    let mut got = Vec::new();
    let mut frames = 0;
    while got.len() < body.len() && frames < 100 {
        let f = c.expect_frame("content body");
        assert_eq!(f.kind, raw::FRAME_BODY, "{}", raw::describe(&f));
        assert!(
            f.payload.len() + 8 <= 4096,
            "body frame of {} bytes exceeds the negotiated frame-max 4096",
            f.payload.len() + 8
        );
        got.extend_from_slice(&f.payload);
        frames += 1;
    }
    assert!(got == body, "body changed in transit");
    assert!(
        frames >= 5,
        "20000 bytes in {frames} frames of at most 4096"
    );
    c.send_method(
        1,
        raw::method::QUEUE_DELETE,
        Args::new()
            .short(0)
            .shortstr(&q)
            .bits(&[false, false, false]),
    );
    let f = c.expect_method("queue.delete-ok");
    assert!(f.is(raw::method::QUEUE_DELETE_OK), "{}", raw::describe(&f));
    c.shutdown();
}

#[test]
fn missing_vhost_is_refused() {
    let b = support::broker();
    run(async {
        let url = format!(
            "{}/{}",
            b.url().trim_end_matches("/%2f"),
            support::unique("vhost")
        );
        let res = within(
            "connection to a missing vhost",
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await;
        match res {
            Ok(_) => panic!("connected to a vhost that does not exist"),
            Err(e) => assert_eq!(
                support::reply_code(&e),
                Some(code::NOT_ALLOWED),
                "unexpected error: {e}"
            ),
        }
    });
}

#[test]
fn server_announces_protocol_and_capabilities() {
    let b = support::broker();
    let mut c = RawConn::connect(b.addr());
    c.send(raw::PROTOCOL_HEADER);
    let start = c.read_start();
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let mechanisms: Vec<&str> = start.mechanisms.split_whitespace().collect();
    assert!(mechanisms.contains(&"PLAIN"), "mechanisms: {mechanisms:?}");
    assert!(
        mechanisms.contains(&"AMQPLAIN"),
        "mechanisms: {mechanisms:?}"
    );
    assert!(
        start.locales.split_whitespace().any(|l| l == "en_US"),
        "locales: {:?}",
        start.locales
    );
    for key in ["product", "version", "platform"] {
        assert!(
            matches!(start.server_properties.get(key), Some(Value::Str(_))),
            "server property {key} missing: {:?}",
            start.server_properties
        );
    }
    let Some(Value::Table(caps)) = start.server_properties.get("capabilities") else {
        panic!("no capabilities table: {:?}", start.server_properties);
    };
    // Clients look these up before using the feature (pika refuses confirm_delivery
    // without publisher_confirms, for instance).
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        assert_eq!(
            caps.get(cap),
            Some(&Value::Bool(true)),
            "capability {cap}: {caps:?}"
        );
    }
    c.shutdown();
}

#[test]
fn tune_proposes_rabbitmq_defaults() {
    let b = support::broker();
    let mut c = RawConn::connect(b.addr());
    c.send(raw::PROTOCOL_HEADER);
    c.read_start();
    c.send_start_ok("guest", "guest");
    let t = c.read_tune();
    assert_eq!(t.channel_max, 2047, "{t:?}");
    assert_eq!(t.frame_max, 131_072, "{t:?}");
    assert_eq!(t.heartbeat, 60, "{t:?}");
    c.shutdown();
}

#[test]
fn lapin_negotiates_tune_values() {
    let b = support::broker();
    run(async {
        let url = support::with_query(b.url(), "heartbeat=7&channel_max=3&frame_max=16384");
        let conn = support::connect(&url).await;
        let cfg = conn.configuration();
        assert_eq!(cfg.heartbeat(), 7);
        assert_eq!(cfg.channel_max(), 3);
        assert_eq!(cfg.frame_max(), 16384);
        let mut chans = Vec::new();
        for _ in 0..3 {
            chans.push(support::channel(&conn).await);
        }
        let err = conn
            .create_channel()
            .await
            .expect_err("a fourth channel beyond channel_max=3");
        assert!(
            matches!(err.kind(), ErrorKind::ChannelsLimitReached),
            "unexpected error: {err}"
        );
        // A message spanning several 16 KiB frames still round-trips.
        let q = support::temp_queue(&chans[0], "tune").await;
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        chans[0]
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        support::wait_ready_count(&chans[1], &q, 1).await;
        let got = chans[1]
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .expect("a message");
        assert!(got.delivery.data == body, "body changed in transit");
        chans[2]
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        conn.close(200, "bye".into()).await.expect("close");
    });
}

#[test]
fn channel_max_is_enforced_by_the_server() {
    let b = support::broker();
    let mut c = RawConn::open_with(b.addr(), "guest", "guest", |t| Tune {
        channel_max: 2,
        heartbeat: 0,
        ..t
    });
    c.open_channel(1);
    c.open_channel(2);
    c.send_method(3, method::CHANNEL_OPEN, Args::new().shortstr(""));
    let close = c.expect_close();
    assert!(close.connection, "expected connection.close, got {close:?}");
    assert_eq!(close.reply_code, code::NOT_ALLOWED, "{close:?}");
}

#[test]
fn server_sends_heartbeats_at_the_negotiated_interval() {
    let b = support::broker();
    let mut c = RawConn::open_with(b.addr(), "guest", "guest", |t| Tune { heartbeat: 1, ..t });
    // Keep our side alive while waiting, so the server has no reason to drop us.
    let hb = raw::frame(raw::FRAME_HEARTBEAT, 0, &[]);
    let mut seen = 0;
    for _ in 0..10 {
        c.send(&hb);
        let f = c
            .read_frame_within(Duration::from_secs(3))
            .expect("connection closed while heartbeats were expected");
        assert_eq!(f.kind, raw::FRAME_HEARTBEAT, "{}", raw::describe(&f));
        assert_eq!(f.channel, 0);
        seen += 1;
        if seen == 2 {
            break;
        }
    }
    assert_eq!(seen, 2);
}

#[test]
fn silent_client_is_dropped_after_missed_heartbeats() {
    let b = support::broker();
    let mut c = RawConn::open_with(b.addr(), "guest", "guest", |t| Tune { heartbeat: 1, ..t });
    // We never send anything: the server must give up on us within a few intervals.
    // (RabbitMQ closes the socket without a connection.close.)
    let started = std::time::Instant::now();
    c.expect_eof();
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "dropped after only {:?}; two missed 1 s heartbeats take longer",
        started.elapsed()
    );
}

#[test]
fn close_handshake_on_the_wire() {
    let b = support::broker();
    let mut c = RawConn::open(b.addr());
    c.open_channel(1);
    // Channel close handshake.
    c.send_method(
        1,
        method::CHANNEL_CLOSE,
        Args::new().short(200).shortstr("bye").short(0).short(0),
    );
    let f = c.expect_method("channel.close-ok");
    assert!(
        f.is(method::CHANNEL_CLOSE_OK) && f.channel == 1,
        "{}",
        raw::describe(&f)
    );
    // The channel number is free again.
    c.open_channel(1);
    // Connection close handshake: the server answers close-ok and nothing else; the client
    // then closes the socket (RabbitMQ waits for that rather than closing first).
    c.send_method(
        0,
        method::CONNECTION_CLOSE,
        Args::new().short(200).shortstr("bye").short(0).short(0),
    );
    let f = c.expect_method("connection.close-ok");
    assert!(f.is(method::CONNECTION_CLOSE_OK), "{}", raw::describe(&f));
    // Methods after close are ignored: no reply may come back.
    c.send_lenient(&raw::frame(
        raw::FRAME_METHOD,
        1,
        &raw::method_payload(
            method::CHANNEL_CLOSE,
            &Args::new().short(200).shortstr("x").short(0).short(0).0,
        ),
    ));
    if let raw::Next::Frame(f) = c.poll_frame(Duration::from_millis(300)) {
        panic!(
            "server sent {} after connection.close-ok",
            raw::describe(&f)
        );
    }
    c.shutdown();
}

#[test]
fn channel_error_closes_only_that_channel() {
    let b = support::broker();
    run(async {
        let conn = support::connect(b.url()).await;
        let other_conn = support::connect(b.url()).await;
        let bad = support::channel(&conn).await;
        let good = support::channel(&conn).await;
        let q = support::temp_queue(&good, "isolation").await;

        let res = bad
            .queue_declare(
                support::unique("missing").as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        support::assert_code(res, code::NOT_FOUND);
        assert!(!bad.status().connected());

        // The sibling channel, the connection and another connection all carry on.
        assert!(conn.status().connected());
        good.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"still here",
            BasicProperties::default(),
        )
        .await
        .expect("publish on the sibling channel");
        let other = support::channel(&other_conn).await;
        support::wait_ready_count(&other, &q, 1).await;
        let got = other
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(got.delivery.data, b"still here");
        // A new channel on the connection that saw the error works too.
        let fresh = support::channel(&conn).await;
        fresh
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        conn.close(200, "bye".into()).await.expect("close");
        other_conn.close(200, "bye".into()).await.expect("close");
    });
}
