//! Every way a peer can send something wrong, and the reply code it earns;
//! plus "no input panics" properties over random and mutated bytes.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;

use super::strategies;
use crate::reply_code::{FRAME_ERROR, NOT_IMPLEMENTED};
use crate::*;

fn method_frame(channel: u16, payload: &[u8]) -> BytesMut {
    raw_frame(frame_type::METHOD, channel, payload)
}

fn raw_frame(kind: u8, channel: u16, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(kind);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.put_u8(FRAME_END);
    out
}

fn publish_frame() -> BytesMut {
    let mut out = BytesMut::new();
    let publish = BasicPublish {
        exchange: ShortStr::from_static("amq.topic"),
        routing_key: ShortStr::from_static("a.b"),
        ..Default::default()
    };
    encode_method(1, &publish.into(), &mut out);
    out
}

fn decode_err(mut buf: BytesMut, frame_max: u32) -> FrameError {
    decode_frame(&mut buf, frame_max).expect_err("should be rejected")
}

#[test]
fn every_truncation_waits_for_more_and_consumes_nothing() {
    let whole = publish_frame();
    for cut in 0..whole.len() {
        let mut buf = BytesMut::from(&whole[..cut]);
        assert_eq!(
            decode_frame(&mut buf, FRAME_MIN_SIZE),
            Ok(None),
            "cut at {cut}"
        );
        assert_eq!(&buf[..], &whole[..cut]);
    }
}

#[test]
fn oversized_frame_is_rejected_from_its_header_alone() {
    let mut header = BytesMut::new();
    header.put_u8(frame_type::BODY);
    header.put_u16(1);
    header.put_u32(FRAME_MIN_SIZE - 7); // one byte over frame_max - 8
    let err = decode_err(header.clone(), FRAME_MIN_SIZE);
    assert_eq!((err.reply_code, err.channel), (FRAME_ERROR, 1));

    // Exactly at the limit: fine, wait for the payload.
    let mut at_limit = BytesMut::new();
    at_limit.put_u8(frame_type::BODY);
    at_limit.put_u16(1);
    at_limit.put_u32(FRAME_MIN_SIZE - 8);
    assert_eq!(decode_frame(&mut at_limit, FRAME_MIN_SIZE), Ok(None));

    // A declared 4 GiB frame: rejected, nothing buffered, no overflow.
    let mut huge = BytesMut::new();
    huge.put_u8(frame_type::METHOD);
    huge.put_u16(0);
    huge.put_u32(u32::MAX);
    assert_eq!(decode_err(huge.clone(), 131_072).reply_code, FRAME_ERROR);
    // With no limit the same header just waits.
    assert_eq!(decode_frame(&mut huge, 0), Ok(None));
}

#[test]
fn bad_frame_end_is_a_frame_error() {
    let mut frame = publish_frame();
    let last = frame.len() - 1;
    frame[last] = 0xCD;
    let before = frame.clone();
    let mut buf = frame;
    let err = decode_frame(&mut buf, FRAME_MIN_SIZE).unwrap_err();
    assert_eq!((err.reply_code, err.channel), (FRAME_ERROR, 1));
    assert_eq!(buf, before, "a frame with a bad end octet is not consumed");
}

#[test]
fn unknown_frame_type_is_a_frame_error_on_its_first_byte() {
    for kind in [0u8, 4, 9, b'A', 0xCE] {
        let err = decode_err(BytesMut::from(&[kind][..]), FRAME_MIN_SIZE);
        assert_eq!(err.reply_code, FRAME_ERROR, "type {kind}");
    }
}

#[test]
fn unknown_class_or_method_is_not_implemented() {
    for (class, method) in [(60u16, 41u16), (99, 10), (60, 200), (40, 41)] {
        let mut payload = Vec::new();
        payload.extend_from_slice(&class.to_be_bytes());
        payload.extend_from_slice(&method.to_be_bytes());
        let err = decode_err(method_frame(4, &payload), FRAME_MIN_SIZE);
        assert_eq!(
            (err.reply_code, err.channel, err.class_id, err.method_id),
            (NOT_IMPLEMENTED, 4, class, method)
        );
    }
}

#[test]
fn method_payload_too_short_for_ids_is_a_frame_error() {
    for payload in [&b""[..], b"\x00", b"\x00\x3c\x00"] {
        let err = decode_err(method_frame(1, payload), FRAME_MIN_SIZE);
        assert_eq!((err.reply_code, err.channel), (FRAME_ERROR, 1));
    }
}

#[test]
fn malformed_arguments_are_syntax_errors_naming_the_method() {
    let cases: &[(&str, &[u8])] = &[
        ("truncated short string", b"\x00\x3c\x00\x28\x00\x00\x09amq"),
        ("missing bit octet", b"\x00\x3c\x00\x28\x00\x00\x00\x00"),
        ("trailing byte", b"\x00\x3c\x00\x28\x00\x00\x00\x00\x00\xff"),
        (
            "invalid UTF-8",
            b"\x00\x3c\x00\x28\x00\x00\x02\xc3\x28\x00\x00",
        ),
        (
            "unknown table type",
            b"\x00\x32\x00\x0a\x00\x00\x01q\x00\x00\x00\x00\x03\x01kU",
        ),
        (
            "table longer than the frame",
            b"\x00\x32\x00\x0a\x00\x00\x01q\x00\x00\x00\x00\xff",
        ),
    ];
    for (what, payload) in cases {
        let err = decode_err(method_frame(2, payload), FRAME_MIN_SIZE);
        let expected_ids = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        assert_eq!(err.reply_code, FRAME_ERROR, "{what}: {err}");
        assert_eq!(err.channel, 2, "{what}");
        assert_eq!((err.class_id, err.method_id), expected_ids, "{what}");
    }
    let err = decode_err(method_frame(2, cases[0].1), FRAME_MIN_SIZE);
    assert!(err.text.contains("basic.publish"), "{}", err.text);
}

#[test]
fn a_rejected_method_frame_is_consumed_so_reading_can_continue() {
    // After sending connection.close the server must keep reading until
    // close-ok; a bad frame must not block the ones after it.
    let mut buf = method_frame(1, b"\x00\x3c\x00\x28\x00");
    buf.extend_from_slice(&publish_frame());
    assert_eq!(
        decode_frame(&mut buf, FRAME_MIN_SIZE)
            .unwrap_err()
            .reply_code,
        FRAME_ERROR
    );
    assert!(matches!(
        decode_frame(&mut buf, FRAME_MIN_SIZE),
        Ok(Some(Frame::Method {
            method: Method::BasicPublish(_),
            ..
        }))
    ));
}

#[test]
fn deep_nesting_in_arguments_is_bounded() {
    // queue.declare whose arguments table nests 10,000 tables deep.
    let depth = 10_000usize;
    let mut table = Vec::with_capacity(7 * depth);
    for level in (2..=depth).rev() {
        table.extend_from_slice(&((7 * (level - 1)) as u32).to_be_bytes());
        table.extend_from_slice(b"\x01kF");
    }
    table.extend_from_slice(&[0, 0, 0, 0]);
    let mut payload = b"\x00\x32\x00\x0a\x00\x00\x01q\x00".to_vec();
    payload.extend_from_slice(&table);
    let err = decode_err(method_frame(1, &payload), 0);
    assert_eq!(err.reply_code, FRAME_ERROR);
    assert!(err.text.contains("nested"), "{}", err.text);

    // Arrays nest the same way.
    let mut array = Vec::new();
    for level in (2..=depth).rev() {
        array.extend_from_slice(&((5 * (level - 1)) as u32).to_be_bytes());
        array.push(b'A');
    }
    array.extend_from_slice(&[0, 0, 0, 0]);
    let mut headers = b"\x01h".to_vec();
    headers.push(b'A');
    headers.extend_from_slice(&array);
    let mut props = b"\x20\x00".to_vec();
    props.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    props.extend_from_slice(&headers);
    assert_eq!(
        BasicProperties::decode(&Bytes::from(props)),
        Err(CodecError::NestingTooDeep(MAX_NESTING_DEPTH))
    );
}

#[test]
fn content_frames_on_channel_zero_are_frame_errors() {
    let header = raw_frame(
        frame_type::HEADER,
        0,
        b"\x00\x3c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
    );
    assert_eq!(decode_err(header, FRAME_MIN_SIZE).reply_code, FRAME_ERROR);
    let body = raw_frame(frame_type::BODY, 0, b"x");
    assert_eq!(decode_err(body, FRAME_MIN_SIZE).reply_code, FRAME_ERROR);
}

#[test]
fn malformed_content_headers_are_frame_errors() {
    let cases: &[(&str, &[u8])] = &[
        ("truncated", b"\x00\x3c\x00\x00\x00\x00"),
        (
            "no property flags",
            b"\x00\x3c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05",
        ),
        (
            "non-zero weight",
            b"\x00\x3c\x00\x01\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00",
        ),
    ];
    for (what, payload) in cases {
        let err = decode_err(raw_frame(frame_type::HEADER, 3, payload), FRAME_MIN_SIZE);
        assert_eq!((err.reply_code, err.channel), (FRAME_ERROR, 3), "{what}");
    }
}

#[test]
fn heartbeats_must_be_empty_but_keep_their_channel() {
    let err = decode_err(raw_frame(frame_type::HEARTBEAT, 0, b"x"), FRAME_MIN_SIZE);
    assert_eq!(err.reply_code, FRAME_ERROR);
    let mut on_channel_five = raw_frame(frame_type::HEARTBEAT, 5, b"");
    assert_eq!(
        decode_frame(&mut on_channel_five, FRAME_MIN_SIZE),
        Ok(Some(Frame::Heartbeat { channel: 5 }))
    );
}

/// Decodes frames until the input runs out or an error; must never panic.
fn decode_stream(bytes: &[u8], frame_max: u32) {
    let mut buf = BytesMut::from(bytes);
    for _ in 0..bytes.len() + 1 {
        match decode_frame(&mut buf, frame_max) {
            Ok(Some(Frame::Header { header, .. })) => {
                let _ = header.basic_properties();
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return,
        }
    }
    panic!("decode_frame made no progress");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..600)) {
        decode_stream(&bytes, 131_072);
        decode_stream(&bytes, 0);
        let raw = Bytes::from(bytes);
        let _ = BasicProperties::decode(&raw);
        let _ = FieldTable::decode(&raw);
        let _ = decode_method(&raw);
    }

    /// Random bytes rarely get past the frame header; mutating valid frames
    /// reaches the method, table and property parsers.
    #[test]
    fn mutated_frames_never_panic(
        frames in vec(strategies::frame(), 1..4),
        mutations in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut stream = BytesMut::new();
        for frame in &frames {
            encode_frame(frame, &mut stream);
        }
        for (at, value) in mutations {
            let i = at.index(stream.len());
            stream[i] = value;
        }
        decode_stream(&stream, 131_072);
        // The payload of the first frame fed straight to the inner decoders.
        if stream.len() > 8 {
            let payload = Bytes::copy_from_slice(&stream[7..stream.len() - 1]);
            let _ = decode_method(&payload);
            let _ = BasicProperties::decode(&payload);
        }
    }

    #[test]
    fn mutated_properties_never_panic(
        props in strategies::basic_properties(),
        mutations in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut raw = props.encoded().to_vec();
        for (at, value) in mutations {
            let i = at.index(raw.len());
            raw[i] = value;
        }
        let _ = BasicProperties::decode(&Bytes::from(raw));
    }
}
