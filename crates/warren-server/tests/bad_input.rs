//! Malformed and out-of-order input on a raw socket: wrong protocol headers, broken frames,
//! frames too large, methods on channels that are not open, content without a publish and
//! unknown methods. Each test checks the exact reply (the protocol header, or the close
//! code RabbitMQ sends) and then that the broker is unharmed: a fresh lapin connection works
//! and a message published beforehand is still in its queue.

mod support;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use support::raw::{self, Args, RawConn, Tune, method};
use support::{TestBroker, code, run, within};

const SURVIVOR: &[u8] = b"published before the bad input";

/// A queue holding one confirmed message, made before the bad input.
fn seed(b: &TestBroker) -> String {
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        let q = support::unique("survivor");
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let confirm = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                SURVIVOR,
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        assert!(
            within("publisher confirm", confirm)
                .await
                .expect("confirm")
                .is_ack()
        );
        close(conn).await;
        q
    })
}

/// A fresh connection works and the seeded message is still there, alone.
fn verify_unharmed(b: &TestBroker, q: &str) {
    run(async {
        let (conn, ch) = support::open(b.url()).await;
        assert_eq!(
            support::ready_count(&ch, q).await,
            1,
            "the queue should hold just the seeded message"
        );
        let got = within(
            "basic.get",
            ch.basic_get(q.into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get")
        .expect("the seeded message is gone");
        assert_eq!(got.delivery.data, SURVIVOR);
        ch.queue_delete(q.into(), QueueDeleteOptions::default())
            .await
            .expect("delete");
        close(conn).await;
    })
}

async fn close(conn: Connection) {
    within("connection.close", conn.close(200, "bye".into()))
        .await
        .expect("connection.close");
}

/// Sends `header` as the protocol header and expects the server to answer with the
/// 0-9-1 header and close the socket.
fn expect_header_refused(b: &TestBroker, header: &[u8]) {
    let mut c = RawConn::connect(b.addr());
    c.send(header);
    let reply = c.read_to_eof();
    assert_eq!(
        reply,
        raw::PROTOCOL_HEADER,
        "reply to header {header:?} should be the AMQP 0-9-1 header"
    );
}

/// A handshake with a small negotiated frame-max, and channel 1 open.
fn opened(b: &TestBroker) -> RawConn {
    let mut c = RawConn::open_with(b.addr(), "guest", "guest", |t| Tune {
        frame_max: 4096,
        heartbeat: 0,
        ..t
    });
    c.open_channel(1);
    c
}

fn publish_method(channel: u16, exchange: &str, rk: &str) -> Vec<u8> {
    raw::frame(
        raw::FRAME_METHOD,
        channel,
        &raw::method_payload(
            method::BASIC_PUBLISH,
            &Args::new()
                .short(0)
                .shortstr(exchange)
                .shortstr(rk)
                .bits(&[false, false])
                .0,
        ),
    )
}

#[test]
fn random_bytes_instead_of_protocol_header() {
    let b = support::broker();
    let q = seed(&b);
    // A fixed pseudo-random sequence (not starting with "AMQP").
    let mut x: u32 = 0x1234_5678;
    let junk: Vec<u8> = (0..64)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect();
    assert_ne!(&junk[..4], b"AMQP");
    expect_header_refused(&b, &junk);
    expect_header_refused(&b, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    verify_unharmed(&b, &q);
}

#[test]
fn unsupported_protocol_versions() {
    let b = support::broker();
    let q = seed(&b);
    for header in [
        &b"AMQP\x00\x01\x00\x00"[..], // AMQP 1.0
        b"AMQP\x03\x01\x00\x00",      // AMQP 1.0 SASL layer
        b"AMQP\x01\x01\x00\x0a",      // AMQP 0-10
        b"AMQP\x00\x00\x09\x02",      // no such 0-9 revision
        b"AMQP\x00\x00\x0a\x00",      // no such version
    ] {
        expect_header_refused(&b, header);
    }
    verify_unharmed(&b, &q);
}

#[test]
fn short_header_then_disconnect() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = RawConn::connect(b.addr());
    c.send(b"AMQP");
    c.shutdown();
    verify_unharmed(&b, &q);
}

#[test]
fn truncated_frame_then_disconnect() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    let f = publish_method(1, "", &q);
    c.send(&f[..f.len() / 2]);
    c.shutdown();
    // Also a connection dropped in the middle of a message's content.
    let mut c = opened(&b);
    c.send(&publish_method(1, "", &q));
    c.send(&raw::frame(raw::FRAME_HEADER, 1, &raw::content_header(10)));
    c.send(&raw::frame(raw::FRAME_BODY, 1, b"abc"));
    c.shutdown();
    verify_unharmed(&b, &q);
}

#[test]
fn frame_larger_than_frame_max() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send(&publish_method(1, "", &q));
    c.send(&raw::frame(
        raw::FRAME_HEADER,
        1,
        &raw::content_header(10_000),
    ));
    // frame-max is 4096: this body frame is more than twice that.
    c.send_lenient(&raw::frame(raw::FRAME_BODY, 1, &[7u8; 10_000]));
    c.expect_connection_close(code::FRAME_ERROR);
    verify_unharmed(&b, &q);
}

#[test]
fn bad_frame_end_octet() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    let mut f = raw::frame(
        raw::FRAME_METHOD,
        2,
        &raw::method_payload(method::CHANNEL_OPEN, &Args::new().shortstr("").0),
    );
    *f.last_mut().unwrap() = 0x00;
    c.send(&f);
    c.expect_connection_close(code::FRAME_ERROR);
    verify_unharmed(&b, &q);
}

#[test]
fn method_on_unopened_channel() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_method(
        5,
        method::QUEUE_DECLARE,
        Args::new()
            .short(0)
            .shortstr("")
            .bits(&[false, false, false, true, false])
            .empty_table(),
    );
    c.expect_connection_close(code::CHANNEL_ERROR);
    verify_unharmed(&b, &q);
}

#[test]
fn channel_open_twice() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_method(1, method::CHANNEL_OPEN, Args::new().shortstr(""));
    c.expect_connection_close(code::CHANNEL_ERROR);
    verify_unharmed(&b, &q);
}

#[test]
fn content_body_without_publish() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_frame(raw::FRAME_BODY, 1, b"orphan body");
    c.expect_connection_close(code::UNEXPECTED_FRAME);
    verify_unharmed(&b, &q);
}

#[test]
fn content_header_without_publish() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_frame(raw::FRAME_HEADER, 1, &raw::content_header(3));
    c.expect_connection_close(code::UNEXPECTED_FRAME);
    verify_unharmed(&b, &q);
}

#[test]
fn method_where_content_was_expected() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send(&publish_method(1, "", &q));
    c.send(&publish_method(1, "", &q));
    c.expect_connection_close(code::UNEXPECTED_FRAME);
    verify_unharmed(&b, &q);
}

#[test]
fn body_longer_than_declared_size() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send(&publish_method(1, "", &q));
    c.send(&raw::frame(raw::FRAME_HEADER, 1, &raw::content_header(4)));
    c.send(&raw::frame(raw::FRAME_BODY, 1, b"0123456789"));
    // RabbitMQ 3.10 never completes such a message and keeps the connection open; closing
    // the connection with a frame error is as good. Either way no message may come of it,
    // which `verify_unharmed` checks by counting the queue.
    c.shutdown();
    verify_unharmed(&b, &q);
}

/// Unknown class or method ids: RabbitMQ 3.10's connection process crashes on them
/// (`unknown_method_id`), so the client sees the socket close with no connection.close.
/// A connection.close with COMMAND_INVALID or NOT_IMPLEMENTED is the polite equivalent;
/// anything else (a channel.close, carrying on) fails.
fn expect_unknown_method_ends_connection(c: &mut RawConn) {
    if let Some(close) = c.expect_connection_end() {
        assert!(
            [
                code::COMMAND_INVALID,
                code::NOT_IMPLEMENTED,
                code::FRAME_ERROR
            ]
            .contains(&close.reply_code),
            "unexpected close for an unknown method: {close:?}"
        );
    }
}

#[test]
fn unknown_method_id() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_method(1, (60, 255), Args::new());
    expect_unknown_method_ends_connection(&mut c);
    verify_unharmed(&b, &q);
}

#[test]
fn unknown_class_id() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_method(1, (999, 10), Args::new());
    expect_unknown_method_ends_connection(&mut c);
    verify_unharmed(&b, &q);
}

#[test]
fn unknown_frame_type() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_frame(9, 1, b"??");
    c.expect_connection_close(code::FRAME_ERROR);
    verify_unharmed(&b, &q);
}

#[test]
fn heartbeat_on_a_channel() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_frame(raw::FRAME_HEARTBEAT, 1, &[]);
    // RabbitMQ treats it as a frame it did not expect there, not as a malformed frame.
    c.expect_connection_close(code::UNEXPECTED_FRAME);
    verify_unharmed(&b, &q);
}

#[test]
fn truncated_method_arguments() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    // queue.declare whose arguments stop in the middle of the queue name.
    let mut payload = raw::method_payload(method::QUEUE_DECLARE, &Args::new().short(0).0);
    payload.extend_from_slice(&[20, b'a', b'b']);
    c.send_frame(raw::FRAME_METHOD, 1, &payload);
    c.expect_connection_close(code::FRAME_ERROR);
    verify_unharmed(&b, &q);
}

#[test]
fn data_after_close_is_ignored() {
    let b = support::broker();
    let q = seed(&b);
    let mut c = opened(&b);
    c.send_method(
        0,
        method::CONNECTION_CLOSE,
        Args::new().short(200).shortstr("bye").short(0).short(0),
    );
    let f = c.expect_method("connection.close-ok");
    assert!(f.is(method::CONNECTION_CLOSE_OK), "{}", raw::describe(&f));
    c.send_lenient(&[0xde, 0xad, 0xbe, 0xef]);
    c.shutdown();
    verify_unharmed(&b, &q);
}
