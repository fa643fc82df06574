//! Rough comparison of decoding a stream of 1 KiB publishes (method, content
//! header, body) with this crate and with `amq-protocol`, the figure quoted in
//! `docs/adr/0001-codec.md`. Not a rigorous benchmark: run it on a quiet
//! machine, in release mode, and read the median.
//!
//! `cargo run --release -p warren-codec --example publish_decode_bench`

use std::time::{Duration, Instant};

use amq_protocol::frame::{AMQPFrame, parse_frame};
use bytes::BytesMut;
use warren_codec::{
    BasicProperties, BasicPublish, FRAME_MIN_SIZE, FieldTable, FieldValue, Frame, Method, ShortStr,
    decode_frame, encode_body, encode_content_header, encode_method,
};

const PUBLISHES: usize = 10_000;
const RUNS: usize = 7;

fn publish_stream() -> Vec<u8> {
    let mut headers = FieldTable::new();
    headers.insert(ShortStr::from_static("x-tenant"), FieldValue::from("acme"));
    let properties = BasicProperties {
        content_type: Some(ShortStr::from_static("application/json")),
        delivery_mode: Some(2),
        message_id: Some(ShortStr::from_static(
            "5f0c6a6e-8d1b-4f0e-9a53-1b7c2f1d9e21",
        )),
        headers: Some(headers),
        ..Default::default()
    }
    .encoded();
    let body = vec![b'x'; 1024];
    let publish = Method::from(BasicPublish {
        exchange: ShortStr::from_static("orders"),
        routing_key: ShortStr::from_static("eu.orders.created"),
        mandatory: false,
        immediate: false,
    });
    let mut out = BytesMut::new();
    for _ in 0..PUBLISHES {
        encode_method(1, &publish, &mut out);
        encode_content_header(1, 60, body.len() as u64, &properties, &mut out);
        encode_body(1, &body, 131_072, &mut out);
    }
    out.to_vec()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn per_publish(d: Duration) -> f64 {
    d.as_nanos() as f64 / PUBLISHES as f64
}

fn main() {
    let stream = publish_stream();
    let frames_expected = PUBLISHES * 3;

    let mut ours = Vec::new();
    let mut ours_with_properties = Vec::new();
    let mut theirs = Vec::new();
    for _ in 0..RUNS {
        // The read buffer is filled outside the timed region, as the socket
        // read would fill it.
        let mut buf = BytesMut::with_capacity(stream.len());
        buf.extend_from_slice(&stream);
        let start = Instant::now();
        let mut frames = 0;
        while let Some(frame) = decode_frame(&mut buf, FRAME_MIN_SIZE).expect("valid") {
            std::hint::black_box(&frame);
            frames += 1;
        }
        ours.push(start.elapsed());
        assert_eq!(frames, frames_expected);

        let mut buf = BytesMut::with_capacity(stream.len());
        buf.extend_from_slice(&stream);
        let start = Instant::now();
        while let Some(frame) = decode_frame(&mut buf, FRAME_MIN_SIZE).expect("valid") {
            if let Frame::Header { header, .. } = &frame {
                std::hint::black_box(header.basic_properties().expect("valid"));
            }
            std::hint::black_box(&frame);
        }
        ours_with_properties.push(start.elapsed());

        let start = Instant::now();
        let mut rest: &[u8] = &stream;
        let mut frames = 0;
        while !rest.is_empty() {
            let (after, frame): (&[u8], AMQPFrame) = parse_frame(rest).expect("valid");
            std::hint::black_box(&frame);
            rest = after;
            frames += 1;
        }
        theirs.push(start.elapsed());
        assert_eq!(frames, frames_expected);
    }

    println!("{PUBLISHES} publishes of 1 KiB, median of {RUNS} runs, ns per publish (3 frames):");
    println!(
        "  warren-codec, properties kept raw: {:8.1}",
        per_publish(median(ours))
    );
    println!(
        "  warren-codec, properties decoded:  {:8.1}",
        per_publish(median(ours_with_properties))
    );
    println!(
        "  amq-protocol:                      {:8.1}",
        per_publish(median(theirs))
    );
}
