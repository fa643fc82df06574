//! Differential tests against `amq-protocol`, the independent codec under
//! the lapin client: every frame we write must parse there into the value we
//! meant, and every frame it writes must decode here into the value it
//! meant and re-encode to the same bytes. A misread of the spec shared by our
//! encoder and decoder cannot hide from these tests.
//!
//! The conversion below is an exhaustive match over [`Method`], so a method
//! added to the table without a conversion does not compile.

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{
    AMQPClass, access, basic, channel, confirm, connection, exchange, queue, tx,
};
use amq_protocol::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable as AmqTable, LongString, ShortString,
};
use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::strategies;
use crate::*;

fn ss(s: &ShortStr) -> ShortString {
    ShortString::from(s.as_str())
}

fn ls(s: &LongStr) -> LongString {
    LongString::from(s.as_bytes().to_vec())
}

fn cp<T: Copy>(v: &T) -> T {
    *v
}

fn tbl(table: &FieldTable) -> AmqTable {
    let mut out = AmqTable::default();
    for (key, value) in table.iter() {
        out.insert(ss(key), amq_value(value));
    }
    out
}

fn amq_value(value: &FieldValue) -> AMQPValue {
    match value {
        FieldValue::Bool(v) => AMQPValue::Boolean(*v),
        FieldValue::I8(v) => AMQPValue::ShortShortInt(*v),
        FieldValue::U8(v) => AMQPValue::ShortShortUInt(*v),
        FieldValue::I16(v) => AMQPValue::ShortInt(*v),
        FieldValue::U16(v) => AMQPValue::ShortUInt(*v),
        FieldValue::I32(v) => AMQPValue::LongInt(*v),
        FieldValue::U32(v) => AMQPValue::LongUInt(*v),
        FieldValue::I64(v) => AMQPValue::LongLongInt(*v),
        FieldValue::F32(v) => AMQPValue::Float(*v),
        FieldValue::F64(v) => AMQPValue::Double(*v),
        FieldValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        FieldValue::LongStr(s) => AMQPValue::LongString(ls(s)),
        FieldValue::Array(values) => AMQPValue::FieldArray(FieldArray::from(
            values.iter().map(amq_value).collect::<Vec<_>>(),
        )),
        FieldValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        FieldValue::Table(t) => AMQPValue::FieldTable(tbl(t)),
        FieldValue::Void => AMQPValue::Void,
        FieldValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.to_vec())),
    }
}

macro_rules! conversions {
    ($( $ours:ident => $class:ident, $module:ident :: $theirs:ident { $( $field:ident : $conv:ident ),* } )*) => {
        fn amq_class(method: &Method) -> AMQPClass {
            match method {
                $( Method::$ours(_m) => AMQPClass::$class($module::AMQPMethod::$theirs(
                    $module::$theirs { $( $field: $conv(&_m.$field), )* }
                )), )*
            }
        }
    };
}

conversions! {
    ConnectionStart => Connection, connection::Start {
        version_major: cp, version_minor: cp, server_properties: tbl, mechanisms: ls, locales: ls }
    ConnectionStartOk => Connection, connection::StartOk {
        client_properties: tbl, mechanism: ss, response: ls, locale: ss }
    ConnectionSecure => Connection, connection::Secure { challenge: ls }
    ConnectionSecureOk => Connection, connection::SecureOk { response: ls }
    ConnectionTune => Connection, connection::Tune { channel_max: cp, frame_max: cp, heartbeat: cp }
    ConnectionTuneOk => Connection, connection::TuneOk { channel_max: cp, frame_max: cp, heartbeat: cp }
    ConnectionOpen => Connection, connection::Open { virtual_host: ss }
    ConnectionOpenOk => Connection, connection::OpenOk {}
    ConnectionClose => Connection, connection::Close {
        reply_code: cp, reply_text: ss, class_id: cp, method_id: cp }
    ConnectionCloseOk => Connection, connection::CloseOk {}
    ConnectionBlocked => Connection, connection::Blocked { reason: ss }
    ConnectionUnblocked => Connection, connection::Unblocked {}
    ConnectionUpdateSecret => Connection, connection::UpdateSecret { new_secret: ls, reason: ss }
    ConnectionUpdateSecretOk => Connection, connection::UpdateSecretOk {}
    ChannelOpen => Channel, channel::Open {}
    ChannelOpenOk => Channel, channel::OpenOk {}
    ChannelFlow => Channel, channel::Flow { active: cp }
    ChannelFlowOk => Channel, channel::FlowOk { active: cp }
    ChannelClose => Channel, channel::Close { reply_code: cp, reply_text: ss, class_id: cp, method_id: cp }
    ChannelCloseOk => Channel, channel::CloseOk {}
    AccessRequest => Access, access::Request {
        realm: ss, exclusive: cp, passive: cp, active: cp, write: cp, read: cp }
    AccessRequestOk => Access, access::RequestOk {}
    ExchangeDeclare => Exchange, exchange::Declare {
        exchange: ss, kind: ss, passive: cp, durable: cp, auto_delete: cp, internal: cp, nowait: cp,
        arguments: tbl }
    ExchangeDeclareOk => Exchange, exchange::DeclareOk {}
    ExchangeDelete => Exchange, exchange::Delete { exchange: ss, if_unused: cp, nowait: cp }
    ExchangeDeleteOk => Exchange, exchange::DeleteOk {}
    ExchangeBind => Exchange, exchange::Bind {
        destination: ss, source: ss, routing_key: ss, nowait: cp, arguments: tbl }
    ExchangeBindOk => Exchange, exchange::BindOk {}
    ExchangeUnbind => Exchange, exchange::Unbind {
        destination: ss, source: ss, routing_key: ss, nowait: cp, arguments: tbl }
    ExchangeUnbindOk => Exchange, exchange::UnbindOk {}
    QueueDeclare => Queue, queue::Declare {
        queue: ss, passive: cp, durable: cp, exclusive: cp, auto_delete: cp, nowait: cp, arguments: tbl }
    QueueDeclareOk => Queue, queue::DeclareOk { queue: ss, message_count: cp, consumer_count: cp }
    QueueBind => Queue, queue::Bind {
        queue: ss, exchange: ss, routing_key: ss, nowait: cp, arguments: tbl }
    QueueBindOk => Queue, queue::BindOk {}
    QueuePurge => Queue, queue::Purge { queue: ss, nowait: cp }
    QueuePurgeOk => Queue, queue::PurgeOk { message_count: cp }
    QueueDelete => Queue, queue::Delete { queue: ss, if_unused: cp, if_empty: cp, nowait: cp }
    QueueDeleteOk => Queue, queue::DeleteOk { message_count: cp }
    QueueUnbind => Queue, queue::Unbind { queue: ss, exchange: ss, routing_key: ss, arguments: tbl }
    QueueUnbindOk => Queue, queue::UnbindOk {}
    BasicQos => Basic, basic::Qos { prefetch_count: cp, global: cp } // lapin has no prefetch-size (always 0)
    BasicQosOk => Basic, basic::QosOk {}
    BasicConsume => Basic, basic::Consume {
        queue: ss, consumer_tag: ss, no_local: cp, no_ack: cp, exclusive: cp, nowait: cp, arguments: tbl }
    BasicConsumeOk => Basic, basic::ConsumeOk { consumer_tag: ss }
    BasicCancel => Basic, basic::Cancel { consumer_tag: ss, nowait: cp }
    BasicCancelOk => Basic, basic::CancelOk { consumer_tag: ss }
    BasicPublish => Basic, basic::Publish { exchange: ss, routing_key: ss, mandatory: cp, immediate: cp }
    BasicReturn => Basic, basic::Return { reply_code: cp, reply_text: ss, exchange: ss, routing_key: ss }
    BasicDeliver => Basic, basic::Deliver {
        consumer_tag: ss, delivery_tag: cp, redelivered: cp, exchange: ss, routing_key: ss }
    BasicGet => Basic, basic::Get { queue: ss, no_ack: cp }
    BasicGetOk => Basic, basic::GetOk {
        delivery_tag: cp, redelivered: cp, exchange: ss, routing_key: ss, message_count: cp }
    BasicGetEmpty => Basic, basic::GetEmpty {}
    BasicAck => Basic, basic::Ack { delivery_tag: cp, multiple: cp }
    BasicReject => Basic, basic::Reject { delivery_tag: cp, requeue: cp }
    BasicRecoverAsync => Basic, basic::RecoverAsync { requeue: cp }
    BasicRecover => Basic, basic::Recover { requeue: cp }
    BasicRecoverOk => Basic, basic::RecoverOk {}
    BasicNack => Basic, basic::Nack { delivery_tag: cp, multiple: cp, requeue: cp }
    TxSelect => Tx, tx::Select {}
    TxSelectOk => Tx, tx::SelectOk {}
    TxCommit => Tx, tx::Commit {}
    TxCommitOk => Tx, tx::CommitOk {}
    TxRollback => Tx, tx::Rollback {}
    TxRollbackOk => Tx, tx::RollbackOk {}
    ConfirmSelect => Confirm, confirm::Select { nowait: cp }
    ConfirmSelectOk => Confirm, confirm::SelectOk {}
}

fn amq_properties(props: &BasicProperties) -> basic::AMQPProperties {
    let mut out = basic::AMQPProperties::default();
    if let Some(v) = &props.content_type {
        out = out.with_content_type(ss(v));
    }
    if let Some(v) = &props.content_encoding {
        out = out.with_content_encoding(ss(v));
    }
    if let Some(v) = &props.headers {
        out = out.with_headers(tbl(v));
    }
    if let Some(v) = props.delivery_mode {
        out = out.with_delivery_mode(v);
    }
    if let Some(v) = props.priority {
        out = out.with_priority(v);
    }
    if let Some(v) = &props.correlation_id {
        out = out.with_correlation_id(ss(v));
    }
    if let Some(v) = &props.reply_to {
        out = out.with_reply_to(ss(v));
    }
    if let Some(v) = &props.expiration {
        out = out.with_expiration(ss(v));
    }
    if let Some(v) = &props.message_id {
        out = out.with_message_id(ss(v));
    }
    if let Some(v) = props.timestamp {
        out = out.with_timestamp(v);
    }
    if let Some(v) = &props.kind {
        out = out.with_type(ss(v));
    }
    if let Some(v) = &props.user_id {
        out = out.with_user_id(ss(v));
    }
    if let Some(v) = &props.app_id {
        out = out.with_app_id(ss(v));
    }
    if let Some(v) = &props.cluster_id {
        out = out.with_cluster_id(ss(v));
    }
    out
}

fn amq_frame(frame: &Frame) -> AMQPFrame {
    match frame {
        Frame::Method { channel, method } => AMQPFrame::Method(*channel, amq_class(method)),
        Frame::Header { channel, header } => AMQPFrame::Header(
            *channel,
            AMQPContentHeader {
                class_id: header.class_id,
                body_size: header.body_size,
                properties: amq_properties(&header.basic_properties().expect("valid properties")),
            },
        ),
        Frame::Body { channel, payload } => AMQPFrame::Body(*channel, payload.to_vec()),
        Frame::Heartbeat { channel: 0 } => AMQPFrame::Heartbeat,
        Frame::Heartbeat { channel } => AMQPFrame::InvalidHeartbeat(*channel),
    }
}

fn amq_encode(frame: &AMQPFrame) -> Vec<u8> {
    gen_frame(frame)(WriteContext::from(Vec::new()))
        .expect("amq-protocol encodes")
        .write
}

fn amq_decode(bytes: &[u8]) -> Result<AMQPFrame, TestCaseError> {
    match parse_frame(bytes) {
        Ok(([], frame)) => Ok(frame),
        Ok((rest, _)) => Err(TestCaseError::fail(format!(
            "{} bytes left over",
            rest.len()
        ))),
        Err(err) => Err(TestCaseError::fail(format!(
            "amq-protocol rejected our frame: {err:?}"
        ))),
    }
}

/// Ours → bytes → amq-protocol.
fn ours_parse_with_theirs(frame: &Frame) -> Result<(), TestCaseError> {
    let mut out = BytesMut::new();
    encode_frame(frame, &mut out);
    prop_assert_eq!(amq_decode(&out)?, amq_frame(frame));
    Ok(())
}

/// amq-protocol → bytes → ours, and back to the same bytes.
fn theirs_decode_with_ours(frame: &Frame) -> Result<(), TestCaseError> {
    let theirs = amq_frame(frame);
    let bytes = amq_encode(&theirs);
    let mut buf = BytesMut::from(&bytes[..]);
    let decoded = decode_frame(&mut buf, 0)
        .map_err(|err| TestCaseError::fail(format!("we rejected amq-protocol's frame: {err}")))?
        .ok_or_else(|| TestCaseError::fail("incomplete"))?;
    prop_assert!(buf.is_empty());
    prop_assert_eq!(amq_frame(&decoded), theirs);
    let mut again = BytesMut::new();
    encode_frame(&decoded, &mut again);
    prop_assert_eq!(&again[..], &bytes[..]);
    Ok(())
}

#[test]
fn every_method_agrees_with_amq_protocol_both_ways() {
    for (name, strategy) in crate::method::method_strategies() {
        let mut runner = TestRunner::new(Config {
            cases: 32,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&(any::<u16>(), strategy), |(channel, method)| {
            let frame = Frame::Method { channel, method };
            ours_parse_with_theirs(&frame)?;
            theirs_decode_with_ours(&frame)
        });
        if let Err(failure) = result {
            panic!("{name}: {failure}");
        }
    }
}

proptest! {
    #[test]
    fn content_frames_agree_with_amq_protocol(frame in strategies::frame()) {
        ours_parse_with_theirs(&frame)?;
        theirs_decode_with_ours(&frame)?;
    }

    /// With tables in the order a map-based codec writes them, the two
    /// encoders must produce identical bytes.
    #[test]
    fn property_bytes_are_identical_for_sorted_tables(
        props in strategies::basic_properties_with(strategies::sorted_field_table()),
        body_size in any::<u64>(),
    ) {
        let header = Frame::Header {
            channel: 1,
            header: ContentHeader { class_id: 60, body_size, properties: props.encoded() },
        };
        let mut ours = BytesMut::new();
        encode_frame(&header, &mut ours);
        prop_assert_eq!(&ours[..], &amq_encode(&amq_frame(&header))[..]);
    }
}

#[test]
fn publish_and_deliver_with_content_agree_with_amq_protocol() {
    let mut headers = FieldTable::new();
    headers.insert(
        ShortStr::from_static("x-death"),
        FieldValue::Array(vec![FieldValue::Table(FieldTable::new())]),
    );
    let properties = BasicProperties {
        content_type: Some(ShortStr::from_static("application/octet-stream")),
        delivery_mode: Some(2),
        headers: Some(headers),
        ..Default::default()
    }
    .encoded();
    let body = vec![7u8; 10_000];
    let mut stream = BytesMut::new();
    let publish = BasicPublish {
        exchange: ShortStr::from_static("orders"),
        routing_key: ShortStr::from_static("eu.created"),
        mandatory: true,
        immediate: false,
    };
    encode_method(1, &publish.into(), &mut stream);
    encode_content_header(1, 60, body.len() as u64, &properties, &mut stream);
    encode_body(1, &body, FRAME_MIN_SIZE, &mut stream);

    let mut theirs = Vec::new();
    let mut rest: &[u8] = &stream;
    while !rest.is_empty() {
        let (after, frame) = parse_frame(rest).expect("amq-protocol parses our stream");
        theirs.push(frame);
        rest = after;
    }
    assert_eq!(theirs.len(), 2 + 3);
    let AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p))) = &theirs[0] else {
        panic!("not a publish: {:?}", theirs[0]);
    };
    assert_eq!(p.exchange.as_str(), "orders");
    assert!(p.mandatory && !p.immediate);
    let AMQPFrame::Header(1, header) = &theirs[1] else {
        panic!("not a header: {:?}", theirs[1]);
    };
    assert_eq!(header.body_size, 10_000);
    assert_eq!(header.properties.delivery_mode(), &Some(2));
    let body_bytes: usize = theirs[2..]
        .iter()
        .map(|f| match f {
            AMQPFrame::Body(1, b) => b.len(),
            other => panic!("not a body: {other:?}"),
        })
        .sum();
    assert_eq!(body_bytes, 10_000);

    // And the other way: a deliver written by amq-protocol.
    let deliver = AMQPFrame::Method(
        2,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "ctag-1".into(),
            delivery_tag: 99,
            redelivered: true,
            exchange: "orders".into(),
            routing_key: "eu.created".into(),
        })),
    );
    let mut buf = BytesMut::from(&amq_encode(&deliver)[..]);
    assert_eq!(
        decode_frame(&mut buf, FRAME_MIN_SIZE),
        Ok(Some(Frame::Method {
            channel: 2,
            method: Method::BasicDeliver(BasicDeliver {
                consumer_tag: ShortStr::from_static("ctag-1"),
                delivery_tag: 99,
                redelivered: true,
                exchange: ShortStr::from_static("orders"),
                routing_key: ShortStr::from_static("eu.created"),
            })
        }))
    );
}
