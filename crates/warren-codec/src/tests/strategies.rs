//! Proptest generators for the codec's values, shared by the test modules.
//! `arbitrary::<T>()` covers every method argument type, which is what lets
//! the `methods!` table generate a strategy per method.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;

use crate::{BasicProperties, ContentHeader, FieldTable, FieldValue, Frame, LongStr, ShortStr};

/// A type with a canonical test generator.
pub(crate) trait Arbitrary: Sized {
    fn strategy() -> BoxedStrategy<Self>;
}

pub(crate) fn arbitrary<T: Arbitrary>() -> BoxedStrategy<T> {
    T::strategy()
}

macro_rules! arbitrary_via_any {
    ($($ty:ty),*) => {$(
        impl Arbitrary for $ty {
            fn strategy() -> BoxedStrategy<Self> {
                any::<$ty>().boxed()
            }
        }
    )*};
}

arbitrary_via_any!(u8, u16, u32, u64, bool);

impl Arbitrary for ShortStr {
    fn strategy() -> BoxedStrategy<Self> {
        short_str().boxed()
    }
}

impl Arbitrary for LongStr {
    fn strategy() -> BoxedStrategy<Self> {
        vec(any::<u8>(), 0..300).prop_map(LongStr::from).boxed()
    }
}

impl Arbitrary for FieldTable {
    fn strategy() -> BoxedStrategy<Self> {
        field_table().boxed()
    }
}

/// Any text up to the 255-byte limit, multi-byte characters included; long
/// enough draws hit the limit exactly.
pub(crate) fn short_str() -> impl Strategy<Value = ShortStr> {
    vec(any::<char>(), 0..80).prop_map(|chars| {
        let mut text = String::new();
        for c in chars {
            if text.len() + c.len_utf8() > ShortStr::MAX_LEN {
                break;
            }
            text.push(c);
        }
        ShortStr::try_from_string(text).expect("built within the limit")
    })
}

/// Floats from arbitrary bit patterns (so subnormals, infinities and
/// negative zero occur), minus NaN, which is not equal to itself.
fn f32_not_nan() -> impl Strategy<Value = f32> {
    any::<u32>()
        .prop_map(f32::from_bits)
        .prop_filter("NaN never compares equal", |f| !f.is_nan())
}

fn f64_not_nan() -> impl Strategy<Value = f64> {
    any::<u64>()
        .prop_map(f64::from_bits)
        .prop_filter("NaN never compares equal", |f| !f.is_nan())
}

pub(crate) fn scalar_field_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        f32_not_nan().prop_map(FieldValue::F32),
        f64_not_nan().prop_map(FieldValue::F64),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| FieldValue::Decimal { scale, value }),
        arbitrary::<LongStr>().prop_map(FieldValue::LongStr),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
        vec(any::<u8>(), 0..64).prop_map(|b| FieldValue::Bytes(Bytes::from(b))),
    ]
}

/// Any value, nesting arrays and tables a few levels deep. Keys may repeat,
/// as they may on the wire.
pub(crate) fn field_value() -> impl Strategy<Value = FieldValue> {
    scalar_field_value().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(FieldValue::Array),
            vec((short_str(), inner), 0..6)
                .prop_map(|entries| FieldValue::Table(FieldTable(entries))),
        ]
    })
}

pub(crate) fn field_table() -> impl Strategy<Value = FieldTable> {
    vec((short_str(), field_value()), 0..6).prop_map(FieldTable)
}

/// Tables as a `BTreeMap`-based codec writes them: unique keys in byte
/// order, recursively. The differential tests compare against such a codec.
pub(crate) fn sorted_field_table() -> impl Strategy<Value = FieldTable> {
    field_table().prop_map(|t| sort_table(&t))
}

fn sort_table(table: &FieldTable) -> FieldTable {
    let unique: BTreeMap<ShortStr, FieldValue> = table
        .iter()
        .map(|(k, v)| (k.clone(), sort_value(v)))
        .collect();
    FieldTable(unique.into_iter().collect())
}

fn sort_value(value: &FieldValue) -> FieldValue {
    match value {
        FieldValue::Table(t) => FieldValue::Table(sort_table(t)),
        FieldValue::Array(a) => FieldValue::Array(a.iter().map(sort_value).collect()),
        other => other.clone(),
    }
}

pub(crate) fn basic_properties_with(
    headers: impl Strategy<Value = FieldTable>,
) -> impl Strategy<Value = BasicProperties> {
    let strings = (
        prop::option::of(short_str()),
        prop::option::of(short_str()),
        prop::option::of(short_str()),
        prop::option::of(short_str()),
        prop::option::of(short_str()),
        prop::option::of(short_str()),
    );
    let more_strings = (
        prop::option::of(short_str()),
        prop::option::of(short_str()),
        prop::option::of(short_str()),
        prop::option::of(short_str()),
    );
    let others = (
        prop::option::of(headers),
        prop::option::of(any::<u8>()),
        prop::option::of(any::<u8>()),
        prop::option::of(any::<u64>()),
    );
    (strings, more_strings, others).prop_map(
        |(
            (content_type, content_encoding, correlation_id, reply_to, expiration, message_id),
            (kind, user_id, app_id, cluster_id),
            (headers, delivery_mode, priority, timestamp),
        )| BasicProperties {
            content_type,
            content_encoding,
            headers,
            delivery_mode,
            priority,
            correlation_id,
            reply_to,
            expiration,
            message_id,
            timestamp,
            kind,
            user_id,
            app_id,
            cluster_id,
        },
    )
}

pub(crate) fn basic_properties() -> impl Strategy<Value = BasicProperties> {
    basic_properties_with(field_table())
}

pub(crate) fn method() -> impl Strategy<Value = crate::Method> {
    let all: Vec<_> = crate::method::method_strategies()
        .into_iter()
        .map(|(_, strategy)| strategy)
        .collect();
    proptest::strategy::Union::new(all)
}

/// Any frame the decoder can produce: content frames on non-zero channels,
/// heartbeats on channel 0.
pub(crate) fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u16>(), method()).prop_map(|(channel, method)| Frame::Method { channel, method }),
        (1..=u16::MAX, any::<u64>(), basic_properties()).prop_map(|(channel, body_size, props)| {
            Frame::Header {
                channel,
                header: ContentHeader {
                    class_id: crate::class_id::BASIC,
                    body_size,
                    properties: props.encoded(),
                },
            }
        }),
        (1..=u16::MAX, vec(any::<u8>(), 0..512)).prop_map(|(channel, body)| Frame::Body {
            channel,
            payload: Bytes::from(body)
        }),
        Just(Frame::Heartbeat { channel: 0 }),
    ]
}
