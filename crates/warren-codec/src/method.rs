//! Every method of AMQP 0-9-1 as RabbitMQ implements it (its
//! `amqp0-9-1.extended` spec: the standard classes plus exchange.bind/unbind,
//! basic.nack, connection.blocked/unblocked/update-secret and confirm), with
//! their argument codecs.
//!
//! The methods are declared once, as a table fed to `methods!`, which
//! generates each argument struct, the [`Method`] enum and the id/name
//! lookups and codecs; adding a method is one table entry. Arguments are
//! read with the `wire` reader and the string and table types of `strings`
//! and `table`; `frame` wraps a method's payload in a method frame.
//!
//! Reserved and deprecated arguments (tickets, `reserved-1`, connection.open's
//! capabilities and insist, ...) are not struct fields: they are written with
//! their zero value (or the value RabbitMQ sends, `@type = value`) and
//! skipped on read, written `@type` in the table.
//! Consecutive `bool` (spec "bit") arguments share octets, least significant
//! bit first, up to eight per octet, as the spec requires.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{CodecError, FrameError};
use crate::reply_code;
use crate::strings::{LongStr, ShortStr};
use crate::table::FieldTable;
use crate::wire::Reader;

/// Reads method arguments: the payload reader plus the octet that
/// consecutive bit arguments are being unpacked from.
pub(crate) struct ArgReader<'a> {
    reader: Reader<'a>,
    bit_octet: u8,
    /// Index of the next bit in `bit_octet`; 8 when no octet is being
    /// unpacked, so the next bit argument reads a fresh one.
    next_bit: u8,
}

impl<'a> ArgReader<'a> {
    fn new(reader: Reader<'a>) -> Self {
        ArgReader {
            reader,
            bit_octet: 0,
            next_bit: 8,
        }
    }

    fn bit(&mut self) -> Result<bool, CodecError> {
        if self.next_bit >= 8 {
            self.bit_octet = self.reader.u8()?;
            self.next_bit = 0;
        }
        let bit = (self.bit_octet >> self.next_bit) & 1 != 0;
        self.next_bit += 1;
        Ok(bit)
    }

    /// The reader for a non-bit argument, which ends any run of bits.
    fn plain(&mut self) -> &mut Reader<'a> {
        self.next_bit = 8;
        &mut self.reader
    }
}

/// Writes method arguments, packing runs of bit arguments into octets.
pub(crate) struct ArgWriter<'o> {
    out: &'o mut BytesMut,
    bit_octet: u8,
    bit_count: u8,
}

impl<'o> ArgWriter<'o> {
    fn new(out: &'o mut BytesMut) -> Self {
        ArgWriter {
            out,
            bit_octet: 0,
            bit_count: 0,
        }
    }

    fn bit(&mut self, bit: bool) {
        if self.bit_count == 8 {
            self.flush_bits();
        }
        self.bit_octet |= u8::from(bit) << self.bit_count;
        self.bit_count += 1;
    }

    fn flush_bits(&mut self) {
        if self.bit_count > 0 {
            self.out.put_u8(self.bit_octet);
            self.bit_octet = 0;
            self.bit_count = 0;
        }
    }

    /// The output for a non-bit argument, after any pending bits.
    fn plain(&mut self) -> &mut BytesMut {
        self.flush_bits();
        self.out
    }

    fn finish(mut self) {
        self.flush_bits();
    }
}

/// A method argument type: spec domain octet = `u8`, short = `u16`, long =
/// `u32`, longlong and timestamp = `u64`, bit = `bool`, shortstr, longstr,
/// table.
pub(crate) trait Argument: Sized {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError>;
    fn write(&self, args: &mut ArgWriter<'_>);
}

impl Argument for u8 {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
        args.plain().u8()
    }
    fn write(&self, args: &mut ArgWriter<'_>) {
        args.plain().put_u8(*self)
    }
}

impl Argument for u16 {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
        args.plain().u16()
    }
    fn write(&self, args: &mut ArgWriter<'_>) {
        args.plain().put_u16(*self)
    }
}

impl Argument for u32 {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
        args.plain().u32()
    }
    fn write(&self, args: &mut ArgWriter<'_>) {
        args.plain().put_u32(*self)
    }
}

impl Argument for u64 {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
        args.plain().u64()
    }
    fn write(&self, args: &mut ArgWriter<'_>) {
        args.plain().put_u64(*self)
    }
}

impl Argument for bool {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
        args.bit()
    }
    fn write(&self, args: &mut ArgWriter<'_>) {
        args.bit(*self)
    }
}

impl Argument for ShortStr {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
        ShortStr::decode(args.plain())
    }
    fn write(&self, args: &mut ArgWriter<'_>) {
        self.encode(args.plain())
    }
}

impl Argument for LongStr {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
        LongStr::decode(args.plain())
    }
    fn write(&self, args: &mut ArgWriter<'_>) {
        self.encode(args.plain())
    }
}

impl Argument for FieldTable {
    fn read(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
        FieldTable::decode_from(args.plain())
    }
    fn write(&self, args: &mut ArgWriter<'_>) {
        self.encode(args.plain())
    }
}

/// The value a reserved argument is written with: its type's zero unless
/// the table gives one.
macro_rules! reserved_value {
    ($ty:ident) => {
        <$ty as Default>::default()
    };
    ($ty:ident = $value:literal) => {
        $value
    };
}

macro_rules! has_content {
    () => {
        false
    };
    (content) => {
        true
    };
}

macro_rules! methods {
    ($(
        $(#[$doc:meta])*
        $variant:ident($class:literal, $method:literal, $name:literal $(, $content:ident)?) {
            $( $(@$reserved:ident $(= $reserved_value:literal)?)? $( $(#[$field_doc:meta])* $field:ident : $ty:ty )?, )*
        }
    )*) => {
        $(
            #[doc = concat!("Arguments of ", $name, ".")]
            $(#[$doc])*
            #[derive(Clone, Debug, PartialEq, Default)]
            #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
            pub struct $variant {
                $( $( $(#[$field_doc])* pub $field: $ty, )? )*
            }

            impl $variant {
                pub const CLASS_ID: u16 = $class;
                pub const METHOD_ID: u16 = $method;
                pub const NAME: &'static str = $name;

                #[allow(unused_variables)]
                fn read_args(args: &mut ArgReader<'_>) -> Result<Self, CodecError> {
                    $(
                        $( let _: $reserved = Argument::read(args)?; )?
                        $( let $field: $ty = Argument::read(args)?; )?
                    )*
                    Ok($variant { $( $( $field, )? )* })
                }

                #[allow(unused_variables)]
                fn write_args(&self, args: &mut ArgWriter<'_>) {
                    $(
                        $( {
                            let value: $reserved = reserved_value!($reserved $(= $reserved_value)?);
                            value.write(args);
                        } )?
                        $( self.$field.write(args); )?
                    )*
                }
            }

            impl From<$variant> for Method {
                fn from(method: $variant) -> Method {
                    Method::$variant(method)
                }
            }
        )*

        /// A decoded method frame payload: one variant per method, named
        /// class then method in CamelCase.
        #[derive(Clone, Debug, PartialEq)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        pub enum Method {
            $( $(#[$doc])* $variant($variant), )*
        }

        impl Method {
            pub fn class_id(&self) -> u16 {
                match self { $( Method::$variant(_) => $class, )* }
            }

            pub fn method_id(&self) -> u16 {
                match self { $( Method::$variant(_) => $method, )* }
            }

            /// The spec name, e.g. "basic.publish".
            pub fn name(&self) -> &'static str {
                match self { $( Method::$variant(_) => $name, )* }
            }

            /// Whether a content header and body frames follow this method
            /// (basic.publish, return, deliver and get-ok).
            pub fn has_content(&self) -> bool {
                match self { $( Method::$variant(_) => has_content!($($content)?), )* }
            }

            /// The spec name of a (class, method) id pair, if defined.
            pub fn name_of(class_id: u16, method_id: u16) -> Option<&'static str> {
                match (class_id, method_id) {
                    $( ($class, $method) => Some($name), )*
                    _ => None,
                }
            }

            /// Writes the method frame payload: class id, method id,
            /// arguments.
            pub fn encode_payload(&self, out: &mut BytesMut) {
                out.put_u16(self.class_id());
                out.put_u16(self.method_id());
                let mut args = ArgWriter::new(out);
                match self { $( Method::$variant(m) => m.write_args(&mut args), )* }
                args.finish();
            }

            fn read_args(
                class_id: u16,
                method_id: u16,
                args: &mut ArgReader<'_>,
            ) -> Option<Result<Method, CodecError>> {
                Some(match (class_id, method_id) {
                    $( ($class, $method) => $variant::read_args(args).map(Method::$variant), )*
                    _ => return None,
                })
            }
        }

        #[cfg(test)]
        pub(crate) fn method_strategies()
            -> Vec<(&'static str, proptest::strategy::BoxedStrategy<Method>)>
        {
            use proptest::strategy::{Just, Strategy};
            use crate::tests::strategies::arbitrary;
            vec![$(
                (
                    $name,
                    (Just(()), $( $( arbitrary::<$ty>(), )? )*)
                        .prop_map(|(_, $( $( $field, )? )*)| {
                            Method::$variant($variant { $( $( $field, )? )* })
                        })
                        .boxed(),
                ),
            )*]
        }
    };
}

methods! {
    // ---- connection (class 10) ----
    /// Server's opening offer: protocol version, properties, SASL
    /// mechanisms and locales.
    ConnectionStart(10, 10, "connection.start") {
        version_major: u8,
        version_minor: u8,
        server_properties: FieldTable,
        /// Space-separated SASL mechanism names.
        mechanisms: LongStr,
        /// Space-separated locale names.
        locales: LongStr,
    }
    /// Client's choice of mechanism and locale, with its first SASL response.
    ConnectionStartOk(10, 11, "connection.start-ok") {
        client_properties: FieldTable,
        mechanism: ShortStr,
        response: LongStr,
        locale: ShortStr,
    }
    ConnectionSecure(10, 20, "connection.secure") {
        challenge: LongStr,
    }
    ConnectionSecureOk(10, 21, "connection.secure-ok") {
        response: LongStr,
    }
    /// Server's proposed limits; 0 means "no limit".
    ConnectionTune(10, 30, "connection.tune") {
        channel_max: u16,
        frame_max: u32,
        /// Seconds.
        heartbeat: u16,
    }
    /// Client's accepted limits.
    ConnectionTuneOk(10, 31, "connection.tune-ok") {
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    }
    ConnectionOpen(10, 40, "connection.open") {
        virtual_host: ShortStr,
        @ShortStr, // capabilities (deprecated)
        @bool, // insist (deprecated)
    }
    ConnectionOpenOk(10, 41, "connection.open-ok") {
        @ShortStr, // known-hosts (deprecated)
    }
    ConnectionClose(10, 50, "connection.close") {
        reply_code: u16,
        reply_text: ShortStr,
        /// Class of the method that caused the close, or 0.
        class_id: u16,
        /// Method id of the method that caused the close, or 0.
        method_id: u16,
    }
    ConnectionCloseOk(10, 51, "connection.close-ok") {}
    /// RabbitMQ extension: the broker stopped reading publishes (resource
    /// alarm).
    ConnectionBlocked(10, 60, "connection.blocked") {
        reason: ShortStr,
    }
    ConnectionUnblocked(10, 61, "connection.unblocked") {}
    /// RabbitMQ extension: the client renews its credentials (e.g. an
    /// expiring OAuth token).
    ConnectionUpdateSecret(10, 70, "connection.update-secret") {
        new_secret: LongStr,
        reason: ShortStr,
    }
    ConnectionUpdateSecretOk(10, 71, "connection.update-secret-ok") {}

    // ---- channel (class 20) ----
    ChannelOpen(20, 10, "channel.open") {
        @ShortStr, // out-of-band (reserved)
    }
    ChannelOpenOk(20, 11, "channel.open-ok") {
        @LongStr, // channel-id (reserved)
    }
    ChannelFlow(20, 20, "channel.flow") {
        active: bool,
    }
    ChannelFlowOk(20, 21, "channel.flow-ok") {
        active: bool,
    }
    ChannelClose(20, 40, "channel.close") {
        reply_code: u16,
        reply_text: ShortStr,
        class_id: u16,
        method_id: u16,
    }
    ChannelCloseOk(20, 41, "channel.close-ok") {}

    // ---- access (class 30, deprecated; RabbitMQ still answers it) ----
    AccessRequest(30, 10, "access.request") {
        realm: ShortStr,
        exclusive: bool,
        passive: bool,
        active: bool,
        write: bool,
        read: bool,
    }
    AccessRequestOk(30, 11, "access.request-ok") {
        @u16 = 1, // ticket (reserved); RabbitMQ hands out 1
    }

    // ---- exchange (class 40) ----
    ExchangeDeclare(40, 10, "exchange.declare") {
        @u16, // ticket
        exchange: ShortStr,
        /// The exchange type ("direct", "topic", ...); the spec's "type".
        kind: ShortStr,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        nowait: bool,
        arguments: FieldTable,
    }
    ExchangeDeclareOk(40, 11, "exchange.declare-ok") {}
    ExchangeDelete(40, 20, "exchange.delete") {
        @u16, // ticket
        exchange: ShortStr,
        if_unused: bool,
        nowait: bool,
    }
    ExchangeDeleteOk(40, 21, "exchange.delete-ok") {}
    /// RabbitMQ extension: exchange-to-exchange binding.
    ExchangeBind(40, 30, "exchange.bind") {
        @u16, // ticket
        destination: ShortStr,
        source: ShortStr,
        routing_key: ShortStr,
        nowait: bool,
        arguments: FieldTable,
    }
    ExchangeBindOk(40, 31, "exchange.bind-ok") {}
    ExchangeUnbind(40, 40, "exchange.unbind") {
        @u16, // ticket
        destination: ShortStr,
        source: ShortStr,
        routing_key: ShortStr,
        nowait: bool,
        arguments: FieldTable,
    }
    /// Method id 51, not 41: RabbitMQ's extended spec numbers it so.
    ExchangeUnbindOk(40, 51, "exchange.unbind-ok") {}

    // ---- queue (class 50) ----
    QueueDeclare(50, 10, "queue.declare") {
        @u16, // ticket
        queue: ShortStr,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        nowait: bool,
        arguments: FieldTable,
    }
    QueueDeclareOk(50, 11, "queue.declare-ok") {
        queue: ShortStr,
        message_count: u32,
        consumer_count: u32,
    }
    QueueBind(50, 20, "queue.bind") {
        @u16, // ticket
        queue: ShortStr,
        exchange: ShortStr,
        routing_key: ShortStr,
        nowait: bool,
        arguments: FieldTable,
    }
    QueueBindOk(50, 21, "queue.bind-ok") {}
    QueuePurge(50, 30, "queue.purge") {
        @u16, // ticket
        queue: ShortStr,
        nowait: bool,
    }
    QueuePurgeOk(50, 31, "queue.purge-ok") {
        message_count: u32,
    }
    QueueDelete(50, 40, "queue.delete") {
        @u16, // ticket
        queue: ShortStr,
        if_unused: bool,
        if_empty: bool,
        nowait: bool,
    }
    QueueDeleteOk(50, 41, "queue.delete-ok") {
        message_count: u32,
    }
    /// Has no nowait argument, unlike queue.bind.
    QueueUnbind(50, 50, "queue.unbind") {
        @u16, // ticket
        queue: ShortStr,
        exchange: ShortStr,
        routing_key: ShortStr,
        arguments: FieldTable,
    }
    QueueUnbindOk(50, 51, "queue.unbind-ok") {}

    // ---- basic (class 60) ----
    BasicQos(60, 10, "basic.qos") {
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
    }
    BasicQosOk(60, 11, "basic.qos-ok") {}
    BasicConsume(60, 20, "basic.consume") {
        @u16, // ticket
        queue: ShortStr,
        consumer_tag: ShortStr,
        no_local: bool,
        no_ack: bool,
        exclusive: bool,
        nowait: bool,
        arguments: FieldTable,
    }
    BasicConsumeOk(60, 21, "basic.consume-ok") {
        consumer_tag: ShortStr,
    }
    /// Sent by either side: RabbitMQ also uses it to tell a consumer its
    /// queue went away (consumer_cancel_notify capability).
    BasicCancel(60, 30, "basic.cancel") {
        consumer_tag: ShortStr,
        nowait: bool,
    }
    BasicCancelOk(60, 31, "basic.cancel-ok") {
        consumer_tag: ShortStr,
    }
    BasicPublish(60, 40, "basic.publish", content) {
        @u16, // ticket
        exchange: ShortStr,
        routing_key: ShortStr,
        mandatory: bool,
        immediate: bool,
    }
    BasicReturn(60, 50, "basic.return", content) {
        reply_code: u16,
        reply_text: ShortStr,
        exchange: ShortStr,
        routing_key: ShortStr,
    }
    BasicDeliver(60, 60, "basic.deliver", content) {
        consumer_tag: ShortStr,
        delivery_tag: u64,
        redelivered: bool,
        exchange: ShortStr,
        routing_key: ShortStr,
    }
    BasicGet(60, 70, "basic.get") {
        @u16, // ticket
        queue: ShortStr,
        no_ack: bool,
    }
    BasicGetOk(60, 71, "basic.get-ok", content) {
        delivery_tag: u64,
        redelivered: bool,
        exchange: ShortStr,
        routing_key: ShortStr,
        message_count: u32,
    }
    BasicGetEmpty(60, 72, "basic.get-empty") {
        @ShortStr, // cluster-id (reserved)
    }
    BasicAck(60, 80, "basic.ack") {
        delivery_tag: u64,
        multiple: bool,
    }
    BasicReject(60, 90, "basic.reject") {
        delivery_tag: u64,
        requeue: bool,
    }
    BasicRecoverAsync(60, 100, "basic.recover-async") {
        requeue: bool,
    }
    BasicRecover(60, 110, "basic.recover") {
        requeue: bool,
    }
    BasicRecoverOk(60, 111, "basic.recover-ok") {}
    /// RabbitMQ extension: negative acknowledgement of one or many
    /// deliveries (and, from the broker, of publishes under confirms).
    BasicNack(60, 120, "basic.nack") {
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    }

    // ---- tx (class 90) ----
    TxSelect(90, 10, "tx.select") {}
    TxSelectOk(90, 11, "tx.select-ok") {}
    TxCommit(90, 20, "tx.commit") {}
    TxCommitOk(90, 21, "tx.commit-ok") {}
    TxRollback(90, 30, "tx.rollback") {}
    TxRollbackOk(90, 31, "tx.rollback-ok") {}

    // ---- confirm (class 85, RabbitMQ extension: publisher confirms) ----
    ConfirmSelect(85, 10, "confirm.select") {
        nowait: bool,
    }
    ConfirmSelectOk(85, 11, "confirm.select-ok") {}
}

/// Decodes a method frame payload (class id, method id, arguments).
///
/// Short strings and long strings in the result share `payload`'s
/// allocation. Errors carry the class and method ids and channel 0;
/// [`crate::decode_frame`] puts in the frame's channel. A class or method id
/// this protocol does not define is [`reply_code::NOT_IMPLEMENTED`] (RabbitMQ
/// itself drops such a connection without a close; any hard error is
/// equivalent for the client). Anything wrong with the arguments, including
/// bytes left over after the last one, is [`reply_code::FRAME_ERROR`], as
/// RabbitMQ answers it.
pub fn decode_method(payload: &Bytes) -> Result<Method, FrameError> {
    let mut reader = Reader::new(payload);
    let (class_id, method_id) = match (reader.u16(), reader.u16()) {
        (Ok(class_id), Ok(method_id)) => (class_id, method_id),
        _ => {
            return Err(FrameError::frame(
                0,
                format!(
                    "method frame payload of {} bytes is too short for class and method ids",
                    payload.len()
                ),
            ));
        }
    };
    let mut args = ArgReader::new(reader);
    let decoded = match Method::read_args(class_id, method_id, &mut args) {
        Some(decoded) => decoded,
        None => {
            return Err(FrameError {
                reply_code: reply_code::NOT_IMPLEMENTED,
                text: format!("unknown method: class {class_id}, method {method_id}"),
                channel: 0,
                class_id,
                method_id,
            });
        }
    };
    decoded
        .and_then(|method| args.reader.finish().map(|()| method))
        .map_err(|err| {
            let name = Method::name_of(class_id, method_id).unwrap_or("method");
            FrameError::undecodable(
                0,
                class_id,
                method_id,
                format!("cannot decode {name}: {err}"),
            )
        })
}

impl Method {
    /// Same as [`decode_method`].
    pub fn decode(payload: &Bytes) -> Result<Method, FrameError> {
        decode_method(payload)
    }
}
