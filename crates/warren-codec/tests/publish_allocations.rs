//! The publish path must not touch the heap: decoding a basic.publish, its
//! content header and its body frames out of the read buffer, and encoding
//! the matching basic.deliver into a write buffer with room, allocate
//! nothing. Counted with a per-thread counting allocator, which is why this
//! is an integration test of its own (a test binary has one global
//! allocator).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::BytesMut;
use warren_codec::*;

struct CountingAllocator;

thread_local! {
    // `const` and `Copy`: no lazy initialisation, so touching it from inside
    // the allocator cannot itself allocate.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations_during<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = ALLOCATIONS.with(Cell::get);
    let result = f();
    (ALLOCATIONS.with(Cell::get) - before, result)
}

fn publish_stream(count: usize) -> Vec<u8> {
    let properties = BasicProperties {
        content_type: Some(ShortStr::from_static("application/json")),
        delivery_mode: Some(2),
        message_id: Some(ShortStr::from_static("m-1")),
        ..Default::default()
    }
    .encoded();
    let body = vec![b'x'; 1024];
    let publish = Method::from(BasicPublish {
        exchange: ShortStr::from_static("orders"),
        routing_key: ShortStr::from_static("eu.created"),
        mandatory: false,
        immediate: false,
    });
    let mut out = BytesMut::new();
    for _ in 0..count {
        encode_method(1, &publish, &mut out);
        encode_content_header(1, 60, body.len() as u64, &properties, &mut out);
        encode_body(1, &body, FRAME_MIN_SIZE, &mut out);
    }
    out.to_vec()
}

#[test]
fn publish_path_does_not_allocate() {
    let stream = publish_stream(4);
    let mut read_buffer = BytesMut::with_capacity(stream.len());
    read_buffer.extend_from_slice(&stream);

    // The first split turns the read buffer into a shared one: a single
    // allocation per buffer, not per frame. Take it out of the count.
    let first = decode_frame(&mut read_buffer, FRAME_MIN_SIZE).unwrap();
    assert!(matches!(first, Some(Frame::Method { .. })));
    for _ in 0..2 {
        decode_frame(&mut read_buffer, FRAME_MIN_SIZE)
            .unwrap()
            .unwrap();
    }

    for _ in 0..3 {
        let (allocations, frames) = allocations_during(|| {
            let method = decode_frame(&mut read_buffer, FRAME_MIN_SIZE);
            let header = decode_frame(&mut read_buffer, FRAME_MIN_SIZE);
            let body = decode_frame(&mut read_buffer, FRAME_MIN_SIZE);
            (method, header, body)
        });
        assert_eq!(allocations, 0, "decoding a publish allocated");
        let (
            Ok(Some(Frame::Method {
                method: Method::BasicPublish(publish),
                ..
            })),
            Ok(Some(Frame::Header { header, .. })),
            Ok(Some(Frame::Body { payload, .. })),
        ) = frames
        else {
            panic!("unexpected frames: {frames:?}");
        };
        assert_eq!(publish.routing_key, "eu.created");
        assert_eq!(header.body_size, 1024);
        assert_eq!(payload.len(), 1024);

        // Forwarding it: deliver, the raw properties, the body.
        let deliver = Method::from(BasicDeliver {
            consumer_tag: ShortStr::from_static("ctag-1"),
            delivery_tag: 1,
            redelivered: false,
            exchange: publish.exchange.clone(),
            routing_key: publish.routing_key.clone(),
        });
        let mut write_buffer = BytesMut::with_capacity(4096);
        let (allocations, ()) = allocations_during(|| {
            encode_method(1, &deliver, &mut write_buffer);
            encode_content_header(
                1,
                header.class_id,
                header.body_size,
                &header.properties,
                &mut write_buffer,
            );
            encode_body(1, &payload, 131_072, &mut write_buffer);
        });
        assert_eq!(allocations, 0, "encoding a delivery allocated");
    }
    assert!(read_buffer.is_empty());
}
