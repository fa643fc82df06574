//! Decoded strings and bodies must point into the read buffer, not into
//! copies: that is what keeps the publish path free of allocations and
//! copies (the allocation count itself is checked in
//! `tests/publish_allocations.rs`).

use std::ops::Range;

use bytes::BytesMut;

use crate::*;

/// Whether `inner` lies inside the address range `region`.
fn within(region: &Range<*const u8>, inner: &[u8]) -> bool {
    let inner = inner.as_ptr_range();
    !inner.is_empty() && region.start <= inner.start && inner.end <= region.end
}

#[test]
fn publish_strings_header_and_body_share_the_read_buffer() {
    let mut stream = BytesMut::new();
    let publish = BasicPublish {
        exchange: ShortStr::from_static("amq.topic"),
        routing_key: ShortStr::from_static("stock.nyse.ibm"),
        mandatory: false,
        immediate: false,
    };
    encode_method(1, &publish.into(), &mut stream);
    let properties = BasicProperties {
        message_id: Some(ShortStr::from_static("m-1")),
        ..Default::default()
    }
    .encoded();
    encode_content_header(1, 60, 5, &properties, &mut stream);
    encode_body(1, b"hello", FRAME_MIN_SIZE, &mut stream);

    // Copy into a fresh read buffer, as a socket read would fill it.
    let mut buf = BytesMut::with_capacity(stream.len());
    buf.extend_from_slice(&stream);
    // Taken before decoding splits the buffer up; only addresses are compared.
    let read_buffer = &buf.as_ptr_range();

    let Some(Frame::Method {
        method: Method::BasicPublish(p),
        ..
    }) = decode_frame(&mut buf, FRAME_MIN_SIZE).unwrap()
    else {
        panic!("expected basic.publish");
    };
    assert_eq!(p.routing_key, "stock.nyse.ibm");
    assert!(within(read_buffer, p.exchange.as_bytes()));
    assert!(within(read_buffer, p.routing_key.as_bytes()));

    let Some(Frame::Header { header, .. }) = decode_frame(&mut buf, FRAME_MIN_SIZE).unwrap() else {
        panic!("expected a content header");
    };
    assert!(within(read_buffer, &header.properties));
    let decoded_props = header.basic_properties().unwrap();
    assert!(within(
        read_buffer,
        decoded_props.message_id.as_ref().unwrap().as_bytes()
    ));

    let Some(Frame::Body { payload, .. }) = decode_frame(&mut buf, FRAME_MIN_SIZE).unwrap() else {
        panic!("expected a body");
    };
    assert_eq!(&payload[..], b"hello");
    assert!(within(read_buffer, &payload));
}
