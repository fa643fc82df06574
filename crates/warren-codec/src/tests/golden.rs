//! Frames written out byte for byte from the spec's grammar (4.2.3 frames,
//! 4.2.5 field types with RabbitMQ's letters, 4.2.6 content), so an encoder
//! bug that the round-trip tests would mirror in the decoder still shows.

use bytes::{Bytes, BytesMut};

use crate::*;

fn encoded_method(channel: u16, method: impl Into<Method>) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_method(channel, &method.into(), &mut out);
    out.to_vec()
}

fn decode_all(bytes: &[u8], frame_max: u32) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = decode_frame(&mut buf, frame_max).expect("valid frames") {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "undecoded bytes left: {buf:?}");
    frames
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn key(s: &'static str) -> ShortStr {
    ShortStr::from_static(s)
}

#[test]
fn connection_start_with_nested_table() {
    let capabilities = FieldTable(vec![(key("publisher_confirms"), FieldValue::Bool(true))]);
    let start = ConnectionStart {
        version_major: 0,
        version_minor: 9,
        server_properties: FieldTable(vec![
            (key("capabilities"), FieldValue::Table(capabilities)),
            (key("product"), FieldValue::from("Warren")),
        ]),
        mechanisms: LongStr::from("PLAIN"),
        locales: LongStr::from("en_US"),
    };
    let expected = concat(&[
        b"\x01\x00\x00",      // method frame, channel 0
        b"\x00\x00\x00\x56",  // payload size 86
        b"\x00\x0a\x00\x0a",  // connection.start
        b"\x00\x09",          // version 0-9
        b"\x00\x00\x00\x3a",  // server-properties: 58 bytes
        b"\x0ccapabilities",  // key
        b"F\x00\x00\x00\x15", // nested table of 21 bytes
        b"\x12publisher_confirmst\x01",
        b"\x07productS\x00\x00\x00\x06Warren",
        b"\x00\x00\x00\x05PLAIN", // mechanisms
        b"\x00\x00\x00\x05en_US", // locales
        b"\xce",
    ]);
    assert_eq!(encoded_method(0, start.clone()), expected);
    assert_eq!(
        decode_all(&expected, FRAME_MIN_SIZE),
        vec![Frame::Method {
            channel: 0,
            method: Method::ConnectionStart(start)
        }]
    );
}

#[test]
fn basic_publish_packs_its_bits_after_the_strings() {
    let publish = BasicPublish {
        exchange: key("ex"),
        routing_key: key("rk"),
        mandatory: true,
        immediate: false,
    };
    let expected = concat(&[
        b"\x01\x00\x01",     // method frame, channel 1
        b"\x00\x00\x00\x0d", // payload size 13
        b"\x00\x3c\x00\x28", // basic.publish
        b"\x00\x00",         // reserved ticket
        b"\x02ex\x02rk",
        b"\x01", // mandatory = bit 0, immediate = bit 1
        b"\xce",
    ]);
    assert_eq!(encoded_method(1, publish.clone()), expected);
    assert_eq!(
        decode_all(&expected, FRAME_MIN_SIZE),
        vec![Frame::Method {
            channel: 1,
            method: Method::BasicPublish(publish)
        }]
    );
}

#[test]
fn queue_declare_bits_are_least_significant_first() {
    let declare = QueueDeclare {
        queue: key("q"),
        passive: false,
        durable: true,
        exclusive: false,
        auto_delete: true,
        nowait: true,
        arguments: FieldTable(vec![(key("x-max-length"), FieldValue::I64(10))]),
    };
    let expected = concat(&[
        b"\x01\x00\x05\x00\x00\x00\x23",
        b"\x00\x32\x00\x0a", // queue.declare
        b"\x00\x00\x01q",
        b"\x1a", // durable (bit 1), auto-delete (bit 3), nowait (bit 4)
        b"\x00\x00\x00\x16\x0cx-max-lengthl\x00\x00\x00\x00\x00\x00\x00\x0a",
        b"\xce",
    ]);
    assert_eq!(encoded_method(5, declare), expected);
}

#[test]
fn connection_open_writes_its_deprecated_fields_as_zero() {
    let open = ConnectionOpen {
        virtual_host: key("/"),
    };
    let expected = concat(&[
        b"\x01\x00\x00\x00\x00\x00\x08",
        b"\x00\x0a\x00\x28",
        b"\x01/",
        b"\x00", // capabilities: empty short string
        b"\x00", // insist: false
        b"\xce",
    ]);
    assert_eq!(encoded_method(0, open), expected);
}

#[test]
fn content_header_with_several_properties() {
    let properties = BasicProperties {
        content_type: Some(key("text/plain")),
        headers: Some(FieldTable(vec![(key("a"), FieldValue::I32(1))])),
        delivery_mode: Some(2),
        ..Default::default()
    };
    let expected_properties = concat(&[
        b"\xb0\x00", // content-type (bit 15), headers (13), delivery-mode (12)
        b"\x0atext/plain",
        b"\x00\x00\x00\x07\x01aI\x00\x00\x00\x01",
        b"\x02",
    ]);
    assert_eq!(properties.encoded(), expected_properties);
    let mut out = BytesMut::new();
    encode_content_header(1, class_id::BASIC, 5, &properties.encoded(), &mut out);
    let expected = concat(&[
        b"\x02\x00\x01",     // header frame, channel 1
        b"\x00\x00\x00\x25", // payload size 37
        b"\x00\x3c",         // class basic
        b"\x00\x00",         // weight
        b"\x00\x00\x00\x00\x00\x00\x00\x05",
        &expected_properties,
        b"\xce",
    ]);
    assert_eq!(out.to_vec(), expected);
    let frames = decode_all(&expected, FRAME_MIN_SIZE);
    let [Frame::Header { channel: 1, header }] = &frames[..] else {
        panic!("expected one header frame, got {frames:?}");
    };
    assert_eq!(header.class_id, 60);
    assert_eq!(header.body_size, 5);
    assert_eq!(header.properties, expected_properties);
    assert_eq!(header.basic_properties(), Ok(properties));
}

#[test]
fn body_is_split_by_frame_max() {
    // frame-max 13 leaves 5 payload bytes per frame.
    let mut out = BytesMut::new();
    encode_body(7, b"hello world", 13, &mut out);
    let expected = concat(&[
        b"\x03\x00\x07\x00\x00\x00\x05hello\xce",
        b"\x03\x00\x07\x00\x00\x00\x05 worl\xce",
        b"\x03\x00\x07\x00\x00\x00\x01d\xce",
    ]);
    assert_eq!(out.to_vec(), expected);

    let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let mut out = BytesMut::new();
    encode_body(1, &body, FRAME_MIN_SIZE, &mut out);
    let frames = decode_all(&out, FRAME_MIN_SIZE);
    let sizes: Vec<usize> = frames
        .iter()
        .map(|f| match f {
            Frame::Body { payload, .. } => payload.len(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(sizes, vec![4088, 4088, 1824]);
    let rejoined: Vec<u8> = frames
        .iter()
        .flat_map(|f| match f {
            Frame::Body { payload, .. } => payload.to_vec(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(rejoined, body);
}

#[test]
fn empty_body_writes_no_frame_and_unlimited_frame_max_writes_one() {
    let mut out = BytesMut::new();
    encode_body(1, b"", 4096, &mut out);
    assert!(out.is_empty());
    encode_body(1, &[0u8; 10_000], 0, &mut out);
    assert_eq!(out.len(), 10_000 + FRAME_OVERHEAD);
}

#[test]
fn heartbeat() {
    let mut out = BytesMut::new();
    encode_heartbeat(&mut out);
    assert_eq!(&out[..], b"\x08\x00\x00\x00\x00\x00\x00\xce");
    assert_eq!(
        decode_all(&out, FRAME_MIN_SIZE),
        vec![Frame::Heartbeat { channel: 0 }]
    );
}

#[test]
fn protocol_header() {
    let mut buf = BytesMut::from(&b"AMQP\x00\x00"[..]);
    assert_eq!(decode_protocol_header(&mut buf), Ok(None));
    buf.extend_from_slice(b"\x09\x01\x01\x00");
    assert_eq!(decode_protocol_header(&mut buf), Ok(Some(())));
    assert_eq!(&buf[..], b"\x01\x00", "only the header is consumed");

    let mut old = BytesMut::from(&b"AMQP\x01\x01\x00\x09"[..]);
    assert_eq!(decode_protocol_header(&mut old), Ok(Some(())));

    for wrong in [
        &b"GET / HTTP/1.1"[..],
        b"\x16\x03\x01",
        b"AMQP\x03\x01\x00\x00",
        b"AMQP\x00\x00\x09\x00",
    ] {
        let mut buf = BytesMut::from(wrong);
        let err = decode_protocol_header(&mut buf).expect_err("not 0-9-1");
        assert_eq!(err.reply(), PROTOCOL_HEADER);
        assert!(wrong.starts_with(&err.received));
    }
}

#[test]
fn method_metadata_is_consistent() {
    use proptest::strategy::{Strategy, ValueTree};
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut content_bearing = Vec::new();
    for (name, strategy) in crate::method::method_strategies() {
        let method = strategy.new_tree(&mut runner).expect("a sample").current();
        assert_eq!(method.name(), name);
        assert_eq!(
            Method::name_of(method.class_id(), method.method_id()),
            Some(name)
        );
        if method.has_content() {
            content_bearing.push(name);
        }
    }
    assert_eq!(
        content_bearing,
        vec![
            "basic.publish",
            "basic.return",
            "basic.deliver",
            "basic.get-ok"
        ]
    );
    assert_eq!(BasicPublish::CLASS_ID, 60);
    assert_eq!(BasicPublish::METHOD_ID, 40);
    assert_eq!(ExchangeUnbindOk::METHOD_ID, 51);
}

#[test]
fn every_method_id_pair_matches_rabbitmqs_spec() {
    let expected: &[(u16, u16, &str)] = &[
        (10, 10, "connection.start"),
        (10, 11, "connection.start-ok"),
        (10, 20, "connection.secure"),
        (10, 21, "connection.secure-ok"),
        (10, 30, "connection.tune"),
        (10, 31, "connection.tune-ok"),
        (10, 40, "connection.open"),
        (10, 41, "connection.open-ok"),
        (10, 50, "connection.close"),
        (10, 51, "connection.close-ok"),
        (10, 60, "connection.blocked"),
        (10, 61, "connection.unblocked"),
        (10, 70, "connection.update-secret"),
        (10, 71, "connection.update-secret-ok"),
        (20, 10, "channel.open"),
        (20, 11, "channel.open-ok"),
        (20, 20, "channel.flow"),
        (20, 21, "channel.flow-ok"),
        (20, 40, "channel.close"),
        (20, 41, "channel.close-ok"),
        (30, 10, "access.request"),
        (30, 11, "access.request-ok"),
        (40, 10, "exchange.declare"),
        (40, 11, "exchange.declare-ok"),
        (40, 20, "exchange.delete"),
        (40, 21, "exchange.delete-ok"),
        (40, 30, "exchange.bind"),
        (40, 31, "exchange.bind-ok"),
        (40, 40, "exchange.unbind"),
        (40, 51, "exchange.unbind-ok"),
        (50, 10, "queue.declare"),
        (50, 11, "queue.declare-ok"),
        (50, 20, "queue.bind"),
        (50, 21, "queue.bind-ok"),
        (50, 30, "queue.purge"),
        (50, 31, "queue.purge-ok"),
        (50, 40, "queue.delete"),
        (50, 41, "queue.delete-ok"),
        (50, 50, "queue.unbind"),
        (50, 51, "queue.unbind-ok"),
        (60, 10, "basic.qos"),
        (60, 11, "basic.qos-ok"),
        (60, 20, "basic.consume"),
        (60, 21, "basic.consume-ok"),
        (60, 30, "basic.cancel"),
        (60, 31, "basic.cancel-ok"),
        (60, 40, "basic.publish"),
        (60, 50, "basic.return"),
        (60, 60, "basic.deliver"),
        (60, 70, "basic.get"),
        (60, 71, "basic.get-ok"),
        (60, 72, "basic.get-empty"),
        (60, 80, "basic.ack"),
        (60, 90, "basic.reject"),
        (60, 100, "basic.recover-async"),
        (60, 110, "basic.recover"),
        (60, 111, "basic.recover-ok"),
        (60, 120, "basic.nack"),
        (90, 10, "tx.select"),
        (90, 11, "tx.select-ok"),
        (90, 20, "tx.commit"),
        (90, 21, "tx.commit-ok"),
        (90, 30, "tx.rollback"),
        (90, 31, "tx.rollback-ok"),
        (85, 10, "confirm.select"),
        (85, 11, "confirm.select-ok"),
    ];
    assert_eq!(expected.len(), crate::method::method_strategies().len());
    for &(class, method, name) in expected {
        assert_eq!(
            Method::name_of(class, method),
            Some(name),
            "{class}.{method}"
        );
    }
}

#[test]
fn encode_frame_writes_what_decode_frame_reads() {
    let frames = vec![
        Frame::Method {
            channel: 3,
            method: Method::BasicAck(BasicAck {
                delivery_tag: 42,
                multiple: true,
            }),
        },
        Frame::Header {
            channel: 3,
            header: ContentHeader {
                class_id: 60,
                body_size: 3,
                properties: Bytes::from_static(b"\x00\x00"),
            },
        },
        Frame::Body {
            channel: 3,
            payload: Bytes::from_static(b"abc"),
        },
        Frame::Heartbeat { channel: 0 },
    ];
    let mut out = BytesMut::new();
    for frame in &frames {
        encode_frame(frame, &mut out);
    }
    assert_eq!(decode_all(&out, FRAME_MIN_SIZE), frames);
}
