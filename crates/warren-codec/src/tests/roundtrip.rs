//! Encode-then-decode gives back the original value, and re-encoding the
//! decoded value gives back the same bytes, for every method, for field
//! tables of every type, for properties, and for whole frame streams fed to
//! the decoder in arbitrary pieces.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::strategies;
use crate::*;

/// Runs `cases` cases of each method's own strategy, so every variant is
/// exercised however the dice fall.
#[test]
fn every_method_round_trips() {
    for (name, strategy) in crate::method::method_strategies() {
        let mut runner = TestRunner::new(Config {
            cases: 48,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&(any::<u16>(), strategy), |(channel, method)| {
            let mut out = BytesMut::new();
            encode_method(channel, &method, &mut out);
            let encoded = out.clone().freeze();
            let decoded = decode_frame(&mut out, 0)
                .expect("decodes")
                .expect("complete");
            prop_assert!(out.is_empty());
            prop_assert_eq!(
                &decoded,
                &Frame::Method {
                    channel,
                    method: method.clone()
                }
            );
            let mut again = BytesMut::new();
            encode_frame(&decoded, &mut again);
            prop_assert_eq!(again.freeze(), encoded);
            Ok(())
        });
        if let Err(failure) = result {
            panic!("{name}: {failure}");
        }
    }
}

proptest! {
    #[test]
    fn field_tables_round_trip(table in strategies::field_table()) {
        let encoded = table.encoded();
        prop_assert_eq!(encoded.len(), table.encoded_len());
        let decoded = FieldTable::decode(&encoded).expect("decodes");
        prop_assert_eq!(&decoded, &table);
        prop_assert_eq!(decoded.encoded(), encoded);
    }

    #[test]
    fn basic_properties_round_trip(props in strategies::basic_properties()) {
        let encoded = props.encoded();
        prop_assert_eq!(encoded.len(), props.encoded_len());
        let decoded = BasicProperties::decode(&encoded).expect("decodes");
        prop_assert_eq!(&decoded, &props);
        prop_assert_eq!(decoded.encoded(), encoded);
    }

    /// The decoder must produce the same frames however the stream is cut
    /// into reads: one byte at a time, mid-header, mid-payload, or all at
    /// once.
    #[test]
    fn chunked_stream_decodes_to_the_same_frames(
        frames in vec(strategies::frame(), 1..8),
        cuts in vec(any::<prop::sample::Index>(), 0..24),
    ) {
        let mut stream = BytesMut::new();
        for frame in &frames {
            encode_frame(frame, &mut stream);
        }
        let stream = stream.freeze();
        let mut cut_points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cut_points.push(0);
        cut_points.push(stream.len());
        cut_points.sort_unstable();
        cut_points.dedup();

        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for piece in cut_points.windows(2) {
            buf.extend_from_slice(&stream[piece[0]..piece[1]]);
            while let Some(frame) = decode_frame(&mut buf, 0).expect("valid stream") {
                decoded.push(frame);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn bodies_split_and_rejoin(
        body in vec(any::<u8>(), 0..20_000),
        frame_max in prop_oneof![Just(0u32), 9u32..200, 4096u32..=131_072],
    ) {
        let mut out = BytesMut::new();
        encode_body(1, &body, frame_max, &mut out);
        let mut rejoined = Vec::new();
        while let Some(frame) = decode_frame(&mut out, frame_max).expect("valid") {
            let Frame::Body { channel: 1, payload } = frame else {
                return Err(TestCaseError::fail(format!("unexpected {frame:?}")));
            };
            prop_assert!(!payload.is_empty());
            if frame_max != 0 {
                prop_assert!(payload.len() + FRAME_OVERHEAD <= frame_max as usize);
            }
            rejoined.extend_from_slice(&payload);
        }
        prop_assert!(out.is_empty());
        prop_assert_eq!(rejoined, body);
    }
}

#[test]
fn content_header_properties_are_forwarded_untouched() {
    // A property list a client might send with a continuation word: we keep
    // the raw bytes, so re-encoding the frame reproduces them exactly.
    let raw_properties = Bytes::from_static(b"\x10\x01\x00\x00\x02");
    let mut out = BytesMut::new();
    encode_content_header(9, 60, 0, &raw_properties, &mut out);
    let encoded = out.clone().freeze();
    let frame = decode_frame(&mut out, FRAME_MIN_SIZE).unwrap().unwrap();
    let mut again = BytesMut::new();
    encode_frame(&frame, &mut again);
    assert_eq!(again.freeze(), encoded);
}
