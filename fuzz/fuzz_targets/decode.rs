//! Fuzz target for the codec's whole input surface: the frame decoder as a
//! server's read loop drives it (frame-max 131072), the property decoder on
//! every content header it yields, and the table and method decoders on the
//! raw input. Besides "never panics" it checks that whatever decodes is a
//! fixed point of encode-then-decode: re-encoding a decoded frame and
//! decoding that again gives the same bytes once more.

#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use warren_codec::{BasicProperties, FieldTable, Frame, decode_frame, decode_method, encode_frame};

fn encoded(frame: &Frame) -> Bytes {
    let mut out = BytesMut::new();
    encode_frame(frame, &mut out);
    out.freeze()
}

fn check_fixed_point(frame: &Frame) {
    let first = encoded(frame);
    let mut buf = BytesMut::from(&first[..]);
    let again = decode_frame(&mut buf, 0)
        .expect("a re-encoded frame decodes")
        .expect("a re-encoded frame is complete");
    assert!(buf.is_empty());
    // Compared as bytes: tables may hold NaN, which is not equal to itself.
    assert_eq!(encoded(&again), first);
}

fn check_properties(raw: &Bytes) {
    if let Ok(props) = BasicProperties::decode(raw) {
        let first = props.encoded();
        let again = BasicProperties::decode(&first).expect("re-encoded properties decode");
        assert_eq!(again.encoded(), first);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode_frame(&mut buf, 131_072) {
        if let Frame::Header { header, .. } = &frame {
            check_properties(&header.properties);
        }
        check_fixed_point(&frame);
    }

    let raw = Bytes::copy_from_slice(data);
    check_properties(&raw);
    if let Ok(table) = FieldTable::decode(&raw) {
        let first = table.encoded();
        assert_eq!(FieldTable::decode(&first).expect("re-encoded table decodes").encoded(), first);
    }
    let _ = decode_method(&raw);
});
