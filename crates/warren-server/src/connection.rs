//! One AMQP 0-9-1 client connection: the handshake, then a loop that reads frames, runs the
//! channel methods against the broker, and writes replies and deliveries.
//!
//! Neighbours: the codec decodes and encodes frames; `channel` keeps each channel's protocol
//! state (publish assembly, delivery tags, confirms); the cluster crate's `Node` and
//! `QueueHandle` carry out metadata and queue commands through Raft. Socket writes happen on a
//! separate writer task so a client that stops reading cannot stall the commands of its other
//! channels; reads pause when the writer falls far behind, which throttles such a client.
//!
//! Commands that wait on Raft (declares, binds, consume, get, ...) run as spawned tasks; their
//! channel is "busy" meanwhile and later frames for it wait in order, since AMQP requires a
//! channel's methods to take effect in the order sent. Publishes and acks never wait: they are
//! submitted in order to the queues, and confirms come back as events.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use warren_cluster::{
    ClusterError, Completion, Delivery, DeliverySink, Node, QueueHandle, QueueOutcome,
    QueueRequest, ReplyTo, Traffic, transaction::Staging,
};
use warren_codec::{
    BasicProperties, ContentHeader, FieldTable, FieldValue, Frame, FrameError, Method, ShortStr,
    class_id, decode_frame, decode_protocol_header, encode_body, encode_content_header,
    encode_heartbeat, encode_method, reply_code,
};
use warren_core::meta::{BindingDecl, Destination, ExchangeDecl, MetaCmd, MetaReply};
use warren_core::queue::{
    MessageMeta, Publisher, PublisherId, QueueCmd, QueueReply, QueueStats, TxWork,
};
use warren_core::{AmqpError, ChannelRef, ConnectionRef, ConsumerKey, MessageContent, MsgId, TxId};

use crate::access::{Access, VhostAccess};
use crate::broker::{Broker, QueueOptions};
use crate::channel::{
    Channel, ChannelState, ConsumerEntry, PendingPublish, Settlement, TxBuffer, TxPublish, Unacked,
    repeats_a_known_delivery,
};
use crate::connections::ConnectionInfo;
use crate::tls::ClientStream;

/// Outgoing bytes queued for the writer above which reading from the client pauses.
const WRITE_BACKLOG_PAUSE: usize = 8 * 1024 * 1024;
/// Frames waiting behind busy channels above which reading pauses.
const CHANNEL_BACKLOG_PAUSE: usize = 20_000;
/// How long the server waits for connection.close-ok after sending connection.close.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);

/// Something that happened elsewhere and concerns this connection.
pub enum ConnEvent {
    Deliver(Delivery),
    /// A queue command this connection submitted completed (publish confirms).
    Completed {
        token: u64,
        result: Result<QueueOutcome, ClusterError>,
    },
    /// The queue behind a consumer went away.
    ConsumerGone {
        consumer: ConsumerKey,
    },
    /// A spawned command finished.
    OpDone {
        channel: u16,
        opened: u32,
        outcome: OpOutcome,
    },
    /// An operator closed the connection (management API): 320 CONNECTION_FORCED.
    ForceClose {
        reason: String,
    },
    /// The management API asks for the connection's channels and consumers.
    Describe {
        reply: tokio::sync::oneshot::Sender<ConnectionDetails>,
    },
}

/// A connection's channels and consumers as the management API shows them (RabbitMQ's
/// `/api/channels` and `/api/consumers` objects).
#[derive(Default)]
pub struct ConnectionDetails {
    pub channels: Vec<serde_json::Value>,
    pub consumers: Vec<serde_json::Value>,
}

/// Result of a channel command that ran on a task.
pub enum OpOutcome {
    Reply(Method),
    NoReply,
    ChannelError(MethodError),
    ConnectionError(MethodError),
    Consumed {
        tag: ShortStr,
        nowait: bool,
    },
    ConsumeFailed {
        tag: ShortStr,
        error: MethodError,
    },
    Got {
        handle: Arc<QueueHandle>,
        msg: MsgId,
        delivery_count: u32,
        remaining: u64,
        content: MessageContent,
        no_ack: bool,
    },
    Cancelled {
        tag: ShortStr,
        nowait: bool,
    },
    /// Run the method again: the metadata has caught up with the cluster since it failed.
    Retry(Method),
}

/// An AMQP exception together with the method that caused it, as channel.close and
/// connection.close report it.
#[derive(Clone, Debug)]
pub struct MethodError {
    pub error: AmqpError,
    pub class_id: u16,
    pub method_id: u16,
}

impl MethodError {
    fn new(error: AmqpError, method: &Method) -> Self {
        MethodError {
            error,
            class_id: method.class_id(),
            method_id: method.method_id(),
        }
    }

    fn bare(code: u16, text: impl Into<String>) -> Self {
        MethodError {
            error: AmqpError::new(code, text),
            class_id: 0,
            method_id: 0,
        }
    }
}

impl From<FrameError> for MethodError {
    fn from(e: FrameError) -> Self {
        MethodError {
            error: AmqpError::new(e.reply_code, e.text),
            class_id: e.class_id,
            method_id: e.method_id,
        }
    }
}

/// Why the main loop stops.
enum Stop {
    /// Close politely with connection.close and this error.
    Close(MethodError),
    /// The client sent connection.close: clean up, then answer close-ok.
    ClientClosed,
    /// The socket is gone, or the client closed after our close.
    Done,
}

/// The connection's side of the cluster callbacks: everything becomes a `ConnEvent`.
struct EventSink {
    tx: mpsc::UnboundedSender<ConnEvent>,
}

impl DeliverySink for EventSink {
    fn deliver(&self, delivery: Delivery) {
        let _ = self.tx.send(ConnEvent::Deliver(delivery));
    }

    fn consumer_gone(&self, consumer: &ConsumerKey) {
        let _ = self.tx.send(ConnEvent::ConsumerGone {
            consumer: consumer.clone(),
        });
    }
}

impl Completion for EventSink {
    fn complete(&self, token: u64, result: Result<QueueOutcome, ClusterError>) {
        let _ = self.tx.send(ConnEvent::Completed { token, result });
    }
}

/// Confirm tokens carry the channel number and the publish sequence number.
fn confirm_token(channel: u16, seq: u64) -> u64 {
    (u64::from(channel) << 48) | (seq & ((1 << 48) - 1))
}

fn split_token(token: u64) -> (u16, u64) {
    ((token >> 48) as u16, token & ((1 << 48) - 1))
}

fn short(s: &str) -> ShortStr {
    ShortStr::try_from(s).unwrap_or_default()
}

/// Reply texts are short strings on the wire; long ones are cut at a character boundary.
fn reply_text(code: u16, text: &str) -> ShortStr {
    let name = match code {
        reply_code::CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        reply_code::NO_ROUTE => "NO_ROUTE",
        reply_code::NO_CONSUMERS => "NO_CONSUMERS",
        reply_code::CONNECTION_FORCED => "CONNECTION_FORCED",
        reply_code::INVALID_PATH => "INVALID_PATH",
        reply_code::ACCESS_REFUSED => "ACCESS_REFUSED",
        reply_code::NOT_FOUND => "NOT_FOUND",
        reply_code::RESOURCE_LOCKED => "RESOURCE_LOCKED",
        reply_code::PRECONDITION_FAILED => "PRECONDITION_FAILED",
        reply_code::FRAME_ERROR => "FRAME_ERROR",
        reply_code::SYNTAX_ERROR => "SYNTAX_ERROR",
        reply_code::COMMAND_INVALID => "COMMAND_INVALID",
        reply_code::CHANNEL_ERROR => "CHANNEL_ERROR",
        reply_code::UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        reply_code::RESOURCE_ERROR => "RESOURCE_ERROR",
        reply_code::NOT_ALLOWED => "NOT_ALLOWED",
        reply_code::NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        reply_code::INTERNAL_ERROR => "INTERNAL_ERROR",
        _ => "",
    };
    let mut full = if name.is_empty() || code == reply_code::REPLY_SUCCESS {
        text.to_owned()
    } else {
        format!("{name} - {text}")
    };
    if full.len() > 255 {
        let mut cut = 255;
        while !full.is_char_boundary(cut) {
            cut -= 1;
        }
        full.truncate(cut);
    }
    ShortStr::try_from(full).unwrap_or_default()
}

/// A message that came back to its queue carries `x-delivery-count` (how often it did), as
/// RabbitMQ quorum queues send it. First deliveries keep their properties as published.
fn with_delivery_count(properties: &bytes::Bytes, count: u32) -> bytes::Bytes {
    if count == 0 {
        return properties.clone();
    }
    let Ok(mut props) = BasicProperties::decode(properties) else {
        return properties.clone();
    };
    props.headers.get_or_insert_with(FieldTable::new).insert(
        ShortStr::from_static("x-delivery-count"),
        FieldValue::I64(i64::from(count)),
    );
    props.encoded()
}

const ACK_TIMEOUT_CHECK: Duration = Duration::from_millis(250);

/// How long a consumer's deliveries may stay unacknowledged: the consumer's
/// `x-consumer-timeout` argument, else its queue's, else the broker's setting (0: no limit).
fn consumer_timeout(
    consumer_args: &FieldTable,
    queue: &QueueHandle,
    default_ms: u64,
) -> Option<Duration> {
    let from = |t: &FieldTable| {
        t.get("x-consumer-timeout")
            .and_then(FieldValue::as_i64)
            .and_then(|v| u64::try_from(v).ok())
    };
    let ms = from(consumer_args)
        .or_else(|| from(&queue.arguments()))
        .unwrap_or(default_ms);
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// A consumer's `x-priority` argument (0 without one), as RabbitMQ reads it: any integer type.
fn consumer_priority(args: &FieldTable) -> Result<i32, AmqpError> {
    match args.get("x-priority") {
        None => Ok(0),
        Some(v) => v
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| {
                AmqpError::precondition_failed(format!(
                    "invalid arg 'x-priority': expected an integer, got {v:?}"
                ))
            }),
    }
}

/// A message's `expiration` property: a non-negative integer of milliseconds, as text.
pub(crate) fn parse_expiration(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Server-generated names: RabbitMQ's shape (`amq.gen-` + 22 base64url characters).
pub fn generated_name(prefix: &str) -> String {
    use base64::Engine;
    let bytes: [u8; 16] = rand::random();
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Capabilities the client announced in start-ok that change what the server sends.
#[derive(Default)]
struct ClientCapabilities {
    consumer_cancel_notify: bool,
    connection_blocked: bool,
}

pub struct Connection {
    broker: Arc<Broker>,
    node: Arc<Node>,
    conn: ConnectionRef,
    peer: SocketAddr,
    vhost: String,
    user: String,
    /// A resource alarm is on (its reason), as the node's monitor last said.
    alarm: Option<String>,
    /// The connection published at least once: an alarm blocks it.
    has_published: bool,
    /// Reading is paused by an alarm (and connection.blocked was sent, if the client
    /// takes it).
    blocked: bool,
    /// The user is from the configuration file (allowed everything).
    user_configured: bool,
    /// What the user may do in the connection's vhost.
    access: VhostAccess,
    /// Write permission per exchange already checked, so a publish does not run a regex.
    write_checked: HashMap<ShortStr, bool>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: Duration,
    caps: ClientCapabilities,
    channels: HashMap<u16, Channel>,
    channel_opens: u32,
    backlog_frames: usize,
    out: BytesMut,
    events_tx: mpsc::UnboundedSender<ConnEvent>,
    sink: Arc<EventSink>,
    has_exclusive_queues: bool,
    client_properties: FieldTable,
    /// Set while a method runs a second time after a metadata read barrier.
    retrying: bool,
    /// This connection's entry in the node's connection table, once through the handshake.
    listed: Option<Arc<ConnectionInfo>>,
    /// Deliveries named by a run of basic.ack frames of one channel, not yet sent to their
    /// queues: a consumer acking each delivery sends its acks in bursts, and one settlement
    /// command per queue for the burst costs the queue's log, its replicas and their state
    /// machines one command instead of one per ack. Sent before any other frame or event is
    /// handled and before the connection waits again, so nothing observes the delay.
    pending_acks: Option<(u16, Vec<Unacked>)>,
}

/// Handles a freshly accepted socket until the connection ends. Never panics on input:
/// every protocol problem becomes a close with the right reply code.
pub async fn serve<S: ClientStream>(broker: Arc<Broker>, stream: S, addrs: Addresses) {
    let metrics = broker.metrics.clone();
    metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
    metrics.connections.fetch_add(1, Ordering::Relaxed);
    let peer = addrs.peer;
    if let Err(e) = run(broker, stream, addrs).await {
        debug!(%peer, error = %e, "connection ended with an I/O error");
    }
    metrics.connections.fetch_sub(1, Ordering::Relaxed);
}

/// Where a client connection comes from and arrives, and whether it is TLS.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

async fn run<S: ClientStream>(
    broker: Arc<Broker>,
    mut stream: S,
    addrs: Addresses,
) -> std::io::Result<()> {
    let peer = addrs.peer;
    let handshake_deadline = Instant::now() + broker.config.amqp.handshake_timeout();
    let mut rbuf = BytesMut::with_capacity(64 * 1024);

    // Protocol header.
    loop {
        match decode_protocol_header(&mut rbuf) {
            Ok(Some(())) => break,
            Ok(None) => {}
            Err(mismatch) => {
                stream.write_all(mismatch.reply()).await?;
                return Ok(());
            }
        }
        if read_with_deadline(&mut stream, &mut rbuf, handshake_deadline).await? == 0 {
            return Ok(());
        }
    }

    let node = broker.node.clone();
    let conn_ref = ConnectionRef {
        run: node.run(),
        conn: broker.next_connection_id(),
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let sink = Arc::new(EventSink {
        tx: events_tx.clone(),
    });
    let mut conn = Connection {
        broker: broker.clone(),
        node,
        conn: conn_ref,
        peer,
        vhost: String::new(),
        user: String::new(),
        alarm: None,
        has_published: false,
        blocked: false,
        user_configured: false,
        access: VhostAccess::unrestricted(),
        write_checked: HashMap::new(),
        frame_max: warren_codec::FRAME_MIN_SIZE,
        channel_max: broker.config.amqp.channel_max,
        heartbeat: Duration::ZERO,
        caps: ClientCapabilities::default(),
        channels: HashMap::new(),
        channel_opens: 0,
        backlog_frames: 0,
        pending_acks: None,
        out: BytesMut::with_capacity(16 * 1024),
        events_tx,
        sink,
        has_exclusive_queues: false,
        client_properties: FieldTable::new(),
        retrying: false,
        listed: None,
    };

    match conn
        .handshake(&mut stream, &mut rbuf, handshake_deadline)
        .await?
    {
        Some(()) => {}
        None => return Ok(()),
    }
    info!(peer = %conn.peer, user = %conn.user, vhost = %conn.vhost, "connection opened");
    let registration = broker.connections.register(
        conn_ref.conn,
        ConnectionInfo::new(
            peer,
            addrs.local,
            conn.user.clone(),
            conn.vhost.clone(),
            addrs.tls,
            conn.client_properties.clone(),
            warren_cluster::types::now_ms(),
            conn.events_tx.clone(),
        ),
    );
    conn.listed = Some(registration.info.clone());
    let result = conn.main_loop(stream, rbuf, events_rx).await;
    drop(registration);
    conn.cleanup().await;
    info!(peer = %conn.peer, "connection closed");
    result
}

async fn read_with_deadline<S: ClientStream>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> std::io::Result<usize> {
    buf.reserve(8 * 1024);
    match tokio::time::timeout_at(deadline.into(), stream.read_buf(buf)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "handshake timed out",
        )),
    }
}

impl Connection {
    fn send_method(&mut self, channel: u16, method: &Method) {
        encode_method(channel, method, &mut self.out);
    }

    fn send_content(&mut self, channel: u16, properties: &[u8], body: &[u8]) {
        encode_content_header(
            channel,
            class_id::BASIC,
            body.len() as u64,
            properties,
            &mut self.out,
        );
        encode_body(channel, body, self.frame_max, &mut self.out);
    }

    async fn flush_direct<S: ClientStream>(&mut self, stream: &mut S) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let bytes = self.out.split();
            stream.write_all(&bytes).await?;
        }
        Ok(())
    }

    /// Reads the next frame during the handshake, where only frames on channel 0 are valid.
    async fn handshake_frame<S: ClientStream>(
        &mut self,
        stream: &mut S,
        rbuf: &mut BytesMut,
        deadline: Instant,
    ) -> std::io::Result<Result<Frame, MethodError>> {
        loop {
            match decode_frame(rbuf, self.frame_max) {
                Ok(Some(Frame::Heartbeat { .. })) => continue,
                Ok(Some(frame)) => return Ok(Ok(frame)),
                Ok(None) => {}
                Err(e) => return Ok(Err(e.into())),
            }
            if read_with_deadline(stream, rbuf, deadline).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Reads the handshake's next frame, which must be the method `pick` accepts, on channel 0;
    /// anything else is the error to close the connection with.
    async fn expect_method<S: ClientStream, T>(
        &mut self,
        stream: &mut S,
        rbuf: &mut BytesMut,
        deadline: Instant,
        expected: &str,
        pick: impl FnOnce(Method) -> Result<T, Box<Method>>,
    ) -> std::io::Result<Result<T, MethodError>> {
        Ok(match self.handshake_frame(stream, rbuf, deadline).await? {
            Ok(Frame::Method { channel: 0, method }) => {
                pick(method).map_err(|other| unexpected_in_handshake(&other, expected))
            }
            Ok(other) => Err(unexpected_frame_in_handshake(&other, expected)),
            Err(e) => Err(e),
        })
    }

    /// Sends connection.close during the handshake and waits briefly for close-ok.
    async fn handshake_close<S: ClientStream>(
        &mut self,
        stream: &mut S,
        rbuf: &mut BytesMut,
        error: MethodError,
    ) -> std::io::Result<Option<()>> {
        warn!(peer = %self.peer, code = error.error.code, text = %error.error.text, "refusing connection");
        self.send_method(
            0,
            &Method::ConnectionClose(warren_codec::ConnectionClose {
                reply_code: error.error.code,
                reply_text: reply_text(error.error.code, &error.error.text),
                class_id: error.class_id,
                method_id: error.method_id,
            }),
        );
        self.flush_direct(stream).await?;
        let deadline = Instant::now() + CLOSE_OK_TIMEOUT;
        while let Ok(Ok(frame)) = self.handshake_frame(stream, rbuf, deadline).await {
            if matches!(
                frame,
                Frame::Method {
                    method: Method::ConnectionCloseOk(_),
                    ..
                }
            ) {
                break;
            }
        }
        Ok(None)
    }

    /// start → start-ok → tune → tune-ok → open → open-ok. Returns None when the connection
    /// was refused (the refusal has been sent).
    async fn handshake<S: ClientStream>(
        &mut self,
        stream: &mut S,
        rbuf: &mut BytesMut,
        deadline: Instant,
    ) -> std::io::Result<Option<()>> {
        self.send_method(0, &Method::ConnectionStart(self.broker.connection_start()));
        self.flush_direct(stream).await?;

        let start_ok = match self
            .expect_method(stream, rbuf, deadline, "connection.start-ok", |m| match m {
                Method::ConnectionStartOk(x) => Ok(x),
                other => Err(Box::new(other)),
            })
            .await?
        {
            Ok(m) => m,
            Err(e) => return self.handshake_close(stream, rbuf, e).await,
        };
        let capability = |name: &str| {
            start_ok
                .client_properties
                .get("capabilities")
                .and_then(FieldValue::as_table)
                .and_then(|c| c.get(name))
                .and_then(FieldValue::as_bool)
                .unwrap_or(false)
        };
        self.caps.consumer_cancel_notify = capability("consumer_cancel_notify");
        self.caps.connection_blocked = capability("connection.blocked");
        let failure_close = capability("authentication_failure_close");
        self.client_properties = start_ok.client_properties.clone();
        let node = self.node.clone();
        let auth = self.broker.auth.authenticate(
            start_ok.mechanism.as_str(),
            start_ok.response.as_bytes(),
            self.peer.ip(),
            |name| node.meta().user(name).cloned(),
        );
        match auth {
            Ok(principal) => {
                self.user = principal.name;
                self.user_configured = principal.configured;
            }
            Err(e) => {
                self.broker
                    .metrics
                    .auth_failures
                    .fetch_add(1, Ordering::Relaxed);
                // Clients that did not announce authentication_failure_close get what the
                // spec prescribes and RabbitMQ does: the socket closes without a reason.
                if !failure_close {
                    warn!(peer = %self.peer, error = %e, "login refused");
                    return Ok(None);
                }
                let err = MethodError::bare(reply_code::ACCESS_REFUSED, e.to_string());
                return self.handshake_close(stream, rbuf, err).await;
            }
        }

        let cfg = &self.broker.config.amqp;
        let server_heartbeat = cfg.heartbeat;
        self.send_method(
            0,
            &Method::ConnectionTune(warren_codec::ConnectionTune {
                channel_max: cfg.channel_max,
                frame_max: cfg.frame_max,
                heartbeat: server_heartbeat,
            }),
        );
        self.flush_direct(stream).await?;

        let tune_ok = match self
            .expect_method(stream, rbuf, deadline, "connection.tune-ok", |m| match m {
                Method::ConnectionTuneOk(x) => Ok(x),
                other => Err(Box::new(other)),
            })
            .await?
        {
            Ok(m) => m,
            Err(e) => return self.handshake_close(stream, rbuf, e).await,
        };
        let cfg = &self.broker.config.amqp;
        // Zero means "no limit" from the client: our own limit then applies.
        let frame_max = if tune_ok.frame_max == 0 {
            cfg.frame_max
        } else {
            tune_ok.frame_max
        };
        if frame_max < warren_codec::FRAME_MIN_SIZE || frame_max > cfg.frame_max {
            let err = MethodError::bare(
                reply_code::FRAME_ERROR,
                format!(
                    "negotiated frame_max = {frame_max} is outside {}..={}",
                    warren_codec::FRAME_MIN_SIZE,
                    cfg.frame_max
                ),
            );
            return self.handshake_close(stream, rbuf, err).await;
        }
        let channel_max = match tune_ok.channel_max {
            0 => cfg.channel_max,
            n => n.min(cfg.channel_max),
        };
        self.frame_max = frame_max;
        self.channel_max = channel_max;
        self.heartbeat = Duration::from_secs(u64::from(tune_ok.heartbeat));

        let open = match self
            .expect_method(stream, rbuf, deadline, "connection.open", |m| match m {
                Method::ConnectionOpen(x) => Ok(x),
                other => Err(Box::new(other)),
            })
            .await?
        {
            Ok(m) => m,
            Err(e) => return self.handshake_close(stream, rbuf, e).await,
        };
        let vhost = open.virtual_host.as_str().to_owned();
        let vhost = if vhost.is_empty() {
            "/".to_owned()
        } else {
            vhost
        };
        if !self.node.meta().vhost_exists(&vhost) {
            let err = MethodError {
                error: AmqpError::new(reply_code::NOT_ALLOWED, format!("vhost {vhost} not found")),
                class_id: class_id::CONNECTION,
                method_id: 40,
            };
            return self.handshake_close(stream, rbuf, err).await;
        }
        if !self.user_configured {
            // Users kept in the metadata need permissions in the vhost, as in RabbitMQ.
            let perms = self.node.meta().permissions(&self.user, &vhost).cloned();
            let access = perms
                .ok_or_else(|| {
                    format!("access to vhost '{vhost}' refused for user '{}'", self.user)
                })
                .and_then(|p| VhostAccess::from_permissions(&p));
            match access {
                Ok(a) => self.access = a,
                Err(text) => {
                    let err = MethodError {
                        error: AmqpError::new(reply_code::NOT_ALLOWED, text),
                        class_id: class_id::CONNECTION,
                        method_id: 40,
                    };
                    return self.handshake_close(stream, rbuf, err).await;
                }
            }
        }
        self.vhost = vhost;
        self.send_method(
            0,
            &Method::ConnectionOpenOk(warren_codec::ConnectionOpenOk {}),
        );
        self.flush_direct(stream).await?;
        Ok(Some(()))
    }

    async fn main_loop<S: ClientStream>(
        &mut self,
        stream: S,
        mut rbuf: BytesMut,
        mut events: mpsc::UnboundedReceiver<ConnEvent>,
    ) -> std::io::Result<()> {
        let (mut reader, writer) = stream.split_owned();
        let queued = Arc::new(AtomicUsize::new(0));
        let (wtx, wrx) = mpsc::unbounded_channel::<Bytes>();
        let writer_task = tokio::spawn(write_loop(writer, wrx, queued.clone()));
        let mut shutdown = self.broker.shutdown.subscribe();

        let heartbeat = self.heartbeat;
        let mut hb_timer = tokio::time::interval(if heartbeat.is_zero() {
            Duration::from_secs(3600)
        } else {
            heartbeat / 2
        });
        hb_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut sent_since_tick = false;
        // Consumer timeouts are checked a few times a second; a delivery times out at most
        // this much late.
        let mut alarm_rx = self.node.resource_monitor().map(|m| m.subscribe());
        self.alarm = alarm_rx
            .as_mut()
            .and_then(|rx| rx.borrow_and_update().clone());
        let mut ack_timer = tokio::time::interval(ACK_TIMEOUT_CHECK);
        ack_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // Frames already buffered after the handshake.
        let mut stop = self.process_buffer(&mut rbuf);

        while stop.is_none() {
            self.flush_acks();
            if let Some(listed) = &self.listed {
                listed
                    .channels
                    .store(self.channels.len(), Ordering::Relaxed);
            }
            if !self.out.is_empty() {
                sent_since_tick = true;
                queued.fetch_add(self.out.len(), Ordering::Relaxed);
                if wtx.send(self.out.split().freeze()).is_err() {
                    stop = Some(Stop::Done);
                    break;
                }
            }
            self.apply_alarm();
            let may_read = queued.load(Ordering::Relaxed) < WRITE_BACKLOG_PAUSE
                && self.backlog_frames < CHANNEL_BACKLOG_PAUSE
                && !self.blocked;
            rbuf.reserve(64 * 1024);
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    stop = Some(Stop::Close(MethodError::bare(
                        reply_code::CONNECTION_FORCED,
                        "broker forced connection closure with reason 'shutdown'",
                    )));
                }
                Some(event) = events.recv() => {
                    stop = self.on_event(event);
                    // Drain what else is ready so replies and deliveries go out in one write.
                    while stop.is_none() {
                        match events.try_recv() {
                            Ok(event) => stop = self.on_event(event),
                            Err(_) => break,
                        }
                    }
                }
                read = reader.read_buf(&mut rbuf), if may_read => {
                    match read {
                        Ok(0) | Err(_) => stop = Some(Stop::Done),
                        Ok(_) => {
                            last_read = Instant::now();
                            stop = self.process_buffer(&mut rbuf);
                        }
                    }
                }
                Ok(()) = async {
                    match alarm_rx.as_mut() {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.alarm = alarm_rx.as_mut().and_then(|rx| rx.borrow_and_update().clone());
                }
                _ = ack_timer.tick() => {
                    self.close_timed_out_channels();
                }
                _ = hb_timer.tick(), if !heartbeat.is_zero() => {
                    // A blocked connection is not read, so its heartbeats are not either.
                    if self.blocked {
                        last_read = Instant::now();
                    }
                    if last_read.elapsed() > heartbeat * 2 {
                        warn!(peer = %self.peer, "missed heartbeats from client, timeout: {}s", heartbeat.as_secs());
                        stop = Some(Stop::Done);
                    } else if !sent_since_tick {
                        encode_heartbeat(&mut self.out);
                    }
                    sent_since_tick = false;
                }
            }
        }

        // Acks read before the connection stopped count, as they would have one by one.
        self.flush_acks();
        if let Some(Stop::Close(err)) = stop {
            self.send_method(
                0,
                &Method::ConnectionClose(warren_codec::ConnectionClose {
                    reply_code: err.error.code,
                    reply_text: reply_text(err.error.code, &err.error.text),
                    class_id: err.class_id,
                    method_id: err.method_id,
                }),
            );
            if err.error.code != reply_code::CONNECTION_FORCED {
                warn!(peer = %self.peer, code = err.error.code, text = %err.error.text, "closing connection");
            }
            let _ = wtx.send(self.out.split().freeze());
            // Wait for close-ok, ignoring everything else (spec 2.2.4), but not forever.
            let deadline = tokio::time::Instant::now() + CLOSE_OK_TIMEOUT;
            'wait: loop {
                loop {
                    match decode_frame(&mut rbuf, self.frame_max) {
                        Ok(Some(Frame::Method {
                            method: Method::ConnectionCloseOk(_) | Method::ConnectionClose(_),
                            ..
                        })) => break 'wait,
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(_) => break 'wait,
                    }
                }
                rbuf.reserve(8 * 1024);
                match tokio::time::timeout_at(deadline, reader.read_buf(&mut rbuf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => break,
                }
            }
        } else if let Some(Stop::ClientClosed) = stop {
            // Clean up first, so that once the client has close-ok its exclusive queues are
            // gone and its unacked messages are back in their queues.
            self.cleanup().await;
            self.send_method(
                0,
                &Method::ConnectionCloseOk(warren_codec::ConnectionCloseOk {}),
            );
            let _ = wtx.send(self.out.split().freeze());
            // The client closes the socket once it has close-ok. Closing it first could make
            // the client see the end of the stream before it processed close-ok.
            let deadline = tokio::time::Instant::now() + CLOSE_OK_TIMEOUT;
            let mut discard = [0u8; 4096];
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, reader.read(&mut discard)).await
            {
                if n == 0 {
                    break;
                }
            }
        } else if !self.out.is_empty() {
            let _ = wtx.send(self.out.split().freeze());
        }
        drop(wtx);
        let _ = writer_task.await;
        Ok(())
    }

    /// Decodes and handles every complete frame in the buffer.
    fn process_buffer(&mut self, rbuf: &mut BytesMut) -> Option<Stop> {
        loop {
            match decode_frame(rbuf, self.frame_max) {
                Ok(Some(frame)) => {
                    self.broker
                        .metrics
                        .frames_in
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(stop) = self.on_frame(frame) {
                        return Some(stop);
                    }
                }
                Ok(None) => return None,
                Err(e) => return Some(Stop::Close(e.into())),
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Option<Stop> {
        let channel = frame.channel();
        if channel == 0 {
            return self.on_channel_zero(frame);
        }
        if channel > self.channel_max {
            return Some(Stop::Close(MethodError::bare(
                reply_code::NOT_ALLOWED,
                format!(
                    "channel {channel} is above the negotiated channel_max {}",
                    self.channel_max
                ),
            )));
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return match frame {
                Frame::Method {
                    method: Method::ChannelOpen(_),
                    ..
                } => {
                    self.open_channel(channel);
                    None
                }
                Frame::Method { method, .. } => Some(Stop::Close(MethodError::new(
                    AmqpError::new(
                        reply_code::CHANNEL_ERROR,
                        format!("expected 'channel.open' on channel {channel}"),
                    ),
                    &method,
                ))),
                Frame::Heartbeat { .. } => Some(Stop::Close(MethodError::bare(
                    reply_code::UNEXPECTED_FRAME,
                    "heartbeat frame on a non-zero channel",
                ))),
                _ => Some(Stop::Close(MethodError::bare(
                    reply_code::CHANNEL_ERROR,
                    format!("content frame on channel {channel}, which is not open"),
                ))),
            };
        };
        if ch.state == ChannelState::Closing {
            // After sending channel.close the server discards everything but close/close-ok.
            if let Frame::Method { method, .. } = frame {
                match method {
                    Method::ChannelCloseOk(_) => {
                        self.channels.remove(&channel);
                    }
                    Method::ChannelClose(_) => {
                        self.send_method(
                            channel,
                            &Method::ChannelCloseOk(warren_codec::ChannelCloseOk {}),
                        );
                    }
                    _ => {}
                }
            }
            return None;
        }
        if ch.busy {
            ch.backlog.push_back(frame);
            self.backlog_frames += 1;
            return None;
        }
        self.on_channel_frame(channel, frame)
    }

    fn on_channel_zero(&mut self, frame: Frame) -> Option<Stop> {
        match frame {
            Frame::Heartbeat { .. } => None,
            Frame::Method { method, .. } => match method {
                Method::ConnectionClose(_) => Some(Stop::ClientClosed),
                // A close-ok we did not ask for: nothing to do but stop.
                Method::ConnectionCloseOk(_) => Some(Stop::Done),
                Method::ConnectionBlocked(_) | Method::ConnectionUnblocked(_) => None,
                Method::ConnectionUpdateSecret(_) => {
                    self.send_method(
                        0,
                        &Method::ConnectionUpdateSecretOk(
                            warren_codec::ConnectionUpdateSecretOk {},
                        ),
                    );
                    None
                }
                other => Some(Stop::Close(MethodError::new(
                    AmqpError::command_invalid(format!(
                        "unexpected method {} on channel 0",
                        other.name()
                    )),
                    &other,
                ))),
            },
            _ => Some(Stop::Close(MethodError::bare(
                reply_code::COMMAND_INVALID,
                "content frame on channel 0",
            ))),
        }
    }

    fn open_channel(&mut self, channel: u16) {
        self.channel_opens += 1;
        let chref = ChannelRef {
            conn: self.conn,
            channel,
            opened: self.channel_opens,
        };
        self.channels.insert(channel, Channel::new(chref));
        self.broker.metrics.channels.fetch_add(1, Ordering::Relaxed);
        self.send_method(
            channel,
            &Method::ChannelOpenOk(warren_codec::ChannelOpenOk {}),
        );
    }

    /// Runs frames that waited while the channel was busy, until it is busy again.
    fn drain_backlog(&mut self, channel: u16) -> Option<Stop> {
        loop {
            let frame = {
                let ch = self.channels.get_mut(&channel)?;
                if ch.busy || ch.state != ChannelState::Open {
                    return None;
                }
                let frame = ch.backlog.pop_front()?;
                self.backlog_frames -= 1;
                frame
            };
            if let Some(stop) = self.on_channel_frame(channel, frame) {
                return Some(stop);
            }
        }
    }

    fn on_channel_frame(&mut self, channel: u16, frame: Frame) -> Option<Stop> {
        if !matches!(
            &frame,
            Frame::Method {
                method: Method::BasicAck(_),
                ..
            }
        ) {
            self.flush_acks();
        }
        let result = match frame {
            Frame::Method { method, .. } => self.on_method_with_barrier(channel, method),
            Frame::Header { header, .. } => self.on_header(channel, header),
            Frame::Body { payload, .. } => self.on_body(channel, payload),
            Frame::Heartbeat { .. } => Err(Failure::Connection(MethodError::bare(
                reply_code::UNEXPECTED_FRAME,
                "heartbeat frame on a non-zero channel",
            ))),
        };
        match result {
            Ok(()) => None,
            Err(Failure::Channel(err)) => {
                self.close_channel_with(channel, err);
                None
            }
            Err(Failure::Connection(err)) => Some(Stop::Close(err)),
        }
    }

    /// Runs a method; if it fails with 404 because this node's copy of the metadata has not
    /// yet seen a declaration another node just committed, waits for the copy to catch up
    /// with the metadata leader and runs the method once more.
    fn on_method_with_barrier(&mut self, channel: u16, method: Method) -> Result<(), Failure> {
        let may_retry = !self.retrying
            && self.node.members().len() > 1
            && matches!(
                &method,
                Method::ExchangeDeclare(_)
                    | Method::QueueDeclare(_)
                    | Method::BasicConsume(_)
                    | Method::BasicGet(_)
                    | Method::QueuePurge(_)
            );
        let copy = may_retry.then(|| method.clone());
        match (self.on_method(channel, method), copy) {
            (Err(Failure::Channel(e)), Some(method)) if e.error.code == reply_code::NOT_FOUND => {
                let node = self.node.clone();
                self.spawn_op(channel, async move {
                    let _ = node.meta_sync().await;
                    OpOutcome::Retry(method)
                });
                Ok(())
            }
            (result, _) => result,
        }
    }

    fn channel(&mut self, channel: u16) -> &mut Channel {
        self.channels
            .get_mut(&channel)
            .expect("callers only pass open channels")
    }

    fn on_method(&mut self, channel: u16, method: Method) -> Result<(), Failure> {
        if self.channel(channel).publish.is_some() {
            return Err(Failure::Connection(MethodError::new(
                AmqpError::new(
                    reply_code::UNEXPECTED_FRAME,
                    format!(
                        "expected content header for class 60, got non content header frame {}",
                        method.name()
                    ),
                ),
                &method,
            )));
        }
        let fail = |e: AmqpError, m: &Method| {
            if e.is_connection_error() {
                Failure::Connection(MethodError::new(e, m))
            } else {
                Failure::Channel(MethodError::new(e, m))
            }
        };
        match method {
            Method::ChannelOpen(_) => Err(Failure::Connection(MethodError::new(
                AmqpError::new(
                    reply_code::CHANNEL_ERROR,
                    format!("second 'channel.open' seen on channel {channel}"),
                ),
                &method,
            ))),
            Method::ChannelClose(_) => {
                self.release_channel(channel);
                self.channels.remove(&channel);
                self.send_method(
                    channel,
                    &Method::ChannelCloseOk(warren_codec::ChannelCloseOk {}),
                );
                Ok(())
            }
            Method::ChannelCloseOk(_) => Ok(()),
            Method::ChannelFlow(ref m) => {
                let active = m.active;
                self.channel(channel).flow_active = active;
                self.send_method(
                    channel,
                    &Method::ChannelFlowOk(warren_codec::ChannelFlowOk { active }),
                );
                if active {
                    self.release_held(channel);
                }
                Ok(())
            }
            Method::ChannelFlowOk(_) => Ok(()),
            Method::AccessRequest(_) => {
                self.send_method(
                    channel,
                    &Method::AccessRequestOk(warren_codec::AccessRequestOk {}),
                );
                Ok(())
            }
            Method::ExchangeDeclare(ref m) => {
                if m.passive {
                    let meta = self.node.meta();
                    match meta.exchange(&self.vhost, m.exchange.as_str()) {
                        Some(_) => {}
                        None => {
                            let e = AmqpError::not_found(format!(
                                "no exchange '{}' in vhost '{}'",
                                m.exchange, self.vhost
                            ));
                            drop(meta);
                            return Err(fail(e, &method));
                        }
                    }
                    drop(meta);
                    if !m.nowait {
                        self.send_method(
                            channel,
                            &Method::ExchangeDeclareOk(warren_codec::ExchangeDeclareOk {}),
                        );
                    }
                    return Ok(());
                }
                self.check(Access::Configure, "exchange", m.exchange.as_str(), &method)?;
                let cmd = MetaCmd::DeclareExchange(ExchangeDecl {
                    vhost: self.vhost.clone(),
                    name: m.exchange.as_str().to_owned(),
                    kind: m.kind.as_str().to_owned(),
                    durable: m.durable,
                    auto_delete: m.auto_delete,
                    internal: m.internal,
                    arguments: m.arguments.clone(),
                    declared_by: self.conn.run,
                });
                let reply = (!m.nowait)
                    .then(|| Method::ExchangeDeclareOk(warren_codec::ExchangeDeclareOk {}));
                self.spawn_meta(channel, method, cmd, reply);
                Ok(())
            }
            Method::ExchangeDelete(ref m) => {
                self.check(Access::Configure, "exchange", m.exchange.as_str(), &method)?;
                let cmd = MetaCmd::DeleteExchange {
                    vhost: self.vhost.clone(),
                    name: m.exchange.as_str().to_owned(),
                    if_unused: m.if_unused,
                };
                let reply = (!m.nowait)
                    .then(|| Method::ExchangeDeleteOk(warren_codec::ExchangeDeleteOk {}));
                self.spawn_meta(channel, method, cmd, reply);
                Ok(())
            }
            Method::ExchangeBind(ref m) => {
                self.check(Access::Write, "exchange", m.destination.as_str(), &method)?;
                self.check(Access::Read, "exchange", m.source.as_str(), &method)?;
                let cmd = MetaCmd::Bind(BindingDecl {
                    vhost: self.vhost.clone(),
                    source: m.source.as_str().to_owned(),
                    destination: Destination::Exchange(m.destination.as_str().to_owned()),
                    routing_key: m.routing_key.as_str().to_owned(),
                    arguments: m.arguments.clone(),
                    by: Some(self.conn),
                });
                let reply =
                    (!m.nowait).then(|| Method::ExchangeBindOk(warren_codec::ExchangeBindOk {}));
                self.spawn_meta(channel, method, cmd, reply);
                Ok(())
            }
            Method::ExchangeUnbind(ref m) => {
                self.check(Access::Write, "exchange", m.destination.as_str(), &method)?;
                self.check(Access::Read, "exchange", m.source.as_str(), &method)?;
                let cmd = MetaCmd::Unbind(BindingDecl {
                    vhost: self.vhost.clone(),
                    source: m.source.as_str().to_owned(),
                    destination: Destination::Exchange(m.destination.as_str().to_owned()),
                    routing_key: m.routing_key.as_str().to_owned(),
                    arguments: m.arguments.clone(),
                    by: Some(self.conn),
                });
                let reply = (!m.nowait)
                    .then(|| Method::ExchangeUnbindOk(warren_codec::ExchangeUnbindOk {}));
                self.spawn_meta(channel, method, cmd, reply);
                Ok(())
            }
            Method::QueueDeclare(_) => self.queue_declare(channel, method),
            Method::QueueBind(ref m) => {
                let queue = self.resolve_queue_name(channel, &m.queue, &method)?;
                self.check(Access::Write, "queue", &queue, &method)?;
                self.check(Access::Read, "exchange", m.exchange.as_str(), &method)?;
                let cmd = MetaCmd::Bind(BindingDecl {
                    vhost: self.vhost.clone(),
                    source: m.exchange.as_str().to_owned(),
                    destination: Destination::Queue(queue),
                    routing_key: m.routing_key.as_str().to_owned(),
                    arguments: m.arguments.clone(),
                    by: Some(self.conn),
                });
                let reply = (!m.nowait).then(|| Method::QueueBindOk(warren_codec::QueueBindOk {}));
                self.spawn_meta(channel, method, cmd, reply);
                Ok(())
            }
            Method::QueueUnbind(ref m) => {
                let queue = self.resolve_queue_name(channel, &m.queue, &method)?;
                self.check(Access::Write, "queue", &queue, &method)?;
                self.check(Access::Read, "exchange", m.exchange.as_str(), &method)?;
                let cmd = MetaCmd::Unbind(BindingDecl {
                    vhost: self.vhost.clone(),
                    source: m.exchange.as_str().to_owned(),
                    destination: Destination::Queue(queue),
                    routing_key: m.routing_key.as_str().to_owned(),
                    arguments: m.arguments.clone(),
                    by: Some(self.conn),
                });
                self.spawn_meta(
                    channel,
                    method,
                    cmd,
                    Some(Method::QueueUnbindOk(warren_codec::QueueUnbindOk {})),
                );
                Ok(())
            }
            Method::QueuePurge(ref m) => {
                let queue = self.resolve_queue_name(channel, &m.queue, &method)?;
                self.check(Access::Read, "queue", &queue, &method)?;
                let handle = self.accessible_queue(&queue, &method)?;
                let nowait = m.nowait;
                // Submitted here, in the order of the channel's methods (see `call`).
                let purged = handle.call(QueueCmd::Purge, None);
                self.spawn_op(channel, async move {
                    match purged.await {
                        Ok(QueueOutcome {
                            reply: QueueReply::Purged { count },
                            ..
                        }) => {
                            if nowait {
                                OpOutcome::NoReply
                            } else {
                                OpOutcome::Reply(Method::QueuePurgeOk(warren_codec::QueuePurgeOk {
                                    message_count: count as u32,
                                }))
                            }
                        }
                        other => op_failure(other, &method),
                    }
                });
                Ok(())
            }
            Method::QueueDelete(_) => self.queue_delete(channel, method),
            Method::BasicQos(ref m) => {
                let ch = self.channel(channel);
                if m.global {
                    ch.global_prefetch = m.prefetch_count;
                } else {
                    ch.prefetch = m.prefetch_count;
                }
                ch.prefetch_bytes = m.prefetch_size;
                self.send_method(channel, &Method::BasicQosOk(warren_codec::BasicQosOk {}));
                // A raised limit lets waiting deliveries out.
                self.release_held(channel);
                Ok(())
            }
            Method::BasicConsume(_) => self.basic_consume(channel, method),
            Method::BasicCancel(ref m) => {
                let tag = m.consumer_tag.clone();
                let nowait = m.nowait;
                let Some(entry) = self.channel(channel).consumers.get(tag.as_str()) else {
                    // RabbitMQ answers cancel-ok for an unknown tag.
                    if !nowait {
                        self.send_method(
                            channel,
                            &Method::BasicCancelOk(warren_codec::BasicCancelOk {
                                consumer_tag: tag,
                            }),
                        );
                    }
                    return Ok(());
                };
                let handle = entry.handle.clone();
                let key = ConsumerKey {
                    channel: self.channel(channel).chref,
                    tag: tag.as_str().to_owned(),
                };
                let cancelled = handle.call(
                    QueueCmd::Cancel {
                        consumer: key.clone(),
                    },
                    None,
                );
                self.spawn_op(channel, async move {
                    let _ = cancelled.await;
                    handle.detach(&key);
                    OpOutcome::Cancelled { tag, nowait }
                });
                Ok(())
            }
            Method::BasicPublish(m) => {
                if m.immediate {
                    return Err(Failure::Connection(MethodError {
                        error: AmqpError::not_implemented("immediate=true"),
                        class_id: class_id::BASIC,
                        method_id: 40,
                    }));
                }
                self.channel(channel).publish = Some(PendingPublish::new(m));
                Ok(())
            }
            Method::BasicGet(ref m) => {
                let queue = self.resolve_queue_name(channel, &m.queue, &method)?;
                self.check(Access::Read, "queue", &queue, &method)?;
                let handle = self.accessible_queue(&queue, &method)?;
                let chref = self.channel(channel).chref;
                let no_ack = m.no_ack;
                self.channel(channel).touch(&handle);
                let got = handle.call(
                    QueueCmd::Get {
                        channel: chref,
                        no_ack,
                    },
                    None,
                );
                self.spawn_op(channel, async move {
                    match got.await {
                        Ok(QueueOutcome {
                            reply:
                                QueueReply::GetOk {
                                    msg,
                                    delivery_count,
                                    remaining,
                                },
                            content: Some(content),
                        }) => OpOutcome::Got {
                            handle,
                            msg,
                            delivery_count,
                            remaining,
                            content,
                            no_ack,
                        },
                        Ok(QueueOutcome {
                            reply: QueueReply::GetEmpty,
                            ..
                        }) => {
                            OpOutcome::Reply(Method::BasicGetEmpty(warren_codec::BasicGetEmpty {}))
                        }
                        other => op_failure(other, &method),
                    }
                });
                Ok(())
            }
            Method::BasicAck(ref m) => {
                let entries = self.take_unacked(channel, m.delivery_tag, m.multiple, &method)?;
                self.settle_or_buffer(channel, entries, Settlement::Ack);
                Ok(())
            }
            Method::BasicNack(ref m) => {
                let entries = self.take_unacked(channel, m.delivery_tag, m.multiple, &method)?;
                let how = if m.requeue {
                    Settlement::Requeue
                } else {
                    Settlement::Discard
                };
                self.settle_or_buffer(channel, entries, how);
                Ok(())
            }
            Method::BasicReject(ref m) => {
                let entries = self.take_unacked(channel, m.delivery_tag, false, &method)?;
                let how = if m.requeue {
                    Settlement::Requeue
                } else {
                    Settlement::Discard
                };
                self.settle_or_buffer(channel, entries, how);
                Ok(())
            }
            Method::BasicRecoverAsync(_) => {
                self.requeue_all_unacked(channel);
                Ok(())
            }
            Method::BasicRecover(_) => {
                // recover-ok goes out before the redeliveries: clients (lapin) drop what they
                // had buffered when it arrives. RabbitMQ treats requeue=false like
                // requeue=true; so does Warren.
                self.send_method(
                    channel,
                    &Method::BasicRecoverOk(warren_codec::BasicRecoverOk {}),
                );
                self.requeue_all_unacked(channel);
                Ok(())
            }
            Method::ConfirmSelect(ref m) => {
                let ch = self.channel(channel);
                if ch.tx.is_some() {
                    return Err(Failure::Channel(MethodError::new(
                        AmqpError::precondition_failed("cannot switch from tx to confirm mode"),
                        &method,
                    )));
                }
                if ch.confirm.is_none() {
                    ch.confirm = Some(Default::default());
                }
                if !m.nowait {
                    self.send_method(
                        channel,
                        &Method::ConfirmSelectOk(warren_codec::ConfirmSelectOk {}),
                    );
                }
                Ok(())
            }
            Method::TxSelect(_) => {
                let ch = self.channel(channel);
                if ch.confirm.is_some() {
                    return Err(Failure::Channel(MethodError::new(
                        AmqpError::precondition_failed("cannot switch from confirm to tx mode"),
                        &method,
                    )));
                }
                ch.tx.get_or_insert_with(TxBuffer::default);
                self.send_method(channel, &Method::TxSelectOk(warren_codec::TxSelectOk {}));
                Ok(())
            }
            Method::TxCommit(_) => self.tx_commit(channel, method),
            Method::TxRollback(_) => {
                let ch = self.channel(channel);
                let Some(tx) = ch.tx.as_mut() else {
                    return Err(Failure::Channel(MethodError::new(
                        AmqpError::precondition_failed("channel is not transactional"),
                        &method,
                    )));
                };
                // Publishes are dropped; acked deliveries become unacked again, under their
                // delivery tags, as in RabbitMQ.
                let TxBuffer { settlements, .. } = std::mem::take(tx);
                for (tag, delivery) in settlements.into_iter().flat_map(|(entries, _)| entries) {
                    ch.unacked.insert(tag, delivery);
                }
                self.send_method(
                    channel,
                    &Method::TxRollbackOk(warren_codec::TxRollbackOk {}),
                );
                Ok(())
            }
            // Methods only a server sends.
            other => Err(Failure::Connection(MethodError::new(
                AmqpError::command_invalid(format!(
                    "method {} is not valid from a client",
                    other.name()
                )),
                &other,
            ))),
        }
    }

    /// An empty queue name means "the last queue declared on this channel", as in RabbitMQ.
    fn resolve_queue_name(
        &mut self,
        channel: u16,
        name: &ShortStr,
        method: &Method,
    ) -> Result<String, Failure> {
        if !name.is_empty() {
            return Ok(name.as_str().to_owned());
        }
        match &self.channel(channel).last_queue {
            Some(q) => Ok(q.clone()),
            None => Err(Failure::Connection(MethodError::new(
                AmqpError::new(reply_code::NOT_ALLOWED, "no previously declared queue"),
                method,
            ))),
        }
    }

    /// Looks a queue up for a queue or basic method: 404 if absent, 405 if another
    /// connection's exclusive queue.
    fn accessible_queue(&self, name: &str, method: &Method) -> Result<Arc<QueueHandle>, Failure> {
        let meta = self.node.meta();
        meta.check_queue_access(&self.vhost, name, Some(self.conn))
            .map_err(|e| Failure::Channel(MethodError::new(e, method)))?;
        drop(meta);
        self.node.queue(&self.vhost, name).ok_or_else(|| {
            Failure::Channel(MethodError::new(
                AmqpError::not_found(format!(
                    "queue '{name}' in vhost '{}' is not available on this node",
                    self.vhost
                )),
                method,
            ))
        })
    }

    fn queue_declare(&mut self, channel: u16, method: Method) -> Result<(), Failure> {
        let Method::QueueDeclare(ref m) = method else {
            unreachable!("called for queue.declare only")
        };
        let name = if m.passive {
            self.resolve_queue_name(channel, &m.queue, &method)?
        } else if m.queue.is_empty() {
            generated_name("amq.gen-")
        } else {
            m.queue.as_str().to_owned()
        };
        if m.passive {
            let handle = self.accessible_queue(&name, &method)?;
            self.channel(channel).last_queue = Some(name.clone());
            let nowait = m.nowait;
            self.spawn_op(channel, async move {
                match queue_stats(&handle).await {
                    Ok(_) if nowait => OpOutcome::NoReply,
                    Ok(stats) => OpOutcome::Reply(declare_ok(&name, stats)),
                    Err(e) => meta_failure(cluster_error(e), &method),
                }
            });
            return Ok(());
        }
        self.check(Access::Configure, "queue", &name, &method)?;
        let exclusive = m.exclusive;
        let options = QueueOptions {
            durable: m.durable,
            auto_delete: m.auto_delete,
            exclusive_owner: exclusive.then_some(self.conn),
        };
        let cmd = self
            .broker
            .queue_declaration(&self.vhost, &name, options, m.arguments.clone())
            .map_err(|e| Failure::Channel(MethodError::new(e, &method)))?;
        if exclusive {
            self.has_exclusive_queues = true;
        }
        self.channel(channel).last_queue = Some(name.clone());
        let nowait = m.nowait;
        let node = self.node.clone();
        let broker = self.broker.clone();
        let vhost = self.vhost.clone();
        self.spawn_op(channel, async move {
            match node.meta_write(cmd).await {
                Ok(MetaReply::QueueDeclared { .. }) => {
                    if let Some(touched) = broker.touch_on_declare(&vhost, &name) {
                        let _ = touched.await;
                    }
                    if nowait {
                        return OpOutcome::NoReply;
                    }
                    let stats = match node.queue(&vhost, &name) {
                        Some(handle) => queue_stats(&handle).await.unwrap_or_default(),
                        None => Default::default(),
                    };
                    OpOutcome::Reply(declare_ok(&name, stats))
                }
                Ok(MetaReply::Error(e)) => meta_failure(e, &method),
                Ok(other) => meta_failure(
                    AmqpError::internal(format!("unexpected reply {other:?}")),
                    &method,
                ),
                Err(e) => meta_failure(cluster_error(e), &method),
            }
        });
        Ok(())
    }

    fn queue_delete(&mut self, channel: u16, method: Method) -> Result<(), Failure> {
        let Method::QueueDelete(ref m) = method else {
            unreachable!("called for queue.delete only")
        };
        let name = self.resolve_queue_name(channel, &m.queue, &method)?;
        self.check(Access::Configure, "queue", &name, &method)?;
        let (if_unused, if_empty, nowait) = (m.if_unused, m.if_empty, m.nowait);
        let exists = {
            let meta = self.node.meta();
            match meta.check_queue_access(&self.vhost, &name, Some(self.conn)) {
                Ok(_) => Ok(true),
                Err(e) if e.code == reply_code::NOT_FOUND => Ok(false),
                Err(e) => Err(e),
            }
        }
        .map_err(|e| Failure::Channel(MethodError::new(e, &method)))?;
        let handle = if exists {
            self.node.queue(&self.vhost, &name)
        } else {
            None
        };
        let node = self.node.clone();
        let vhost = self.vhost.clone();
        let by = Some(self.conn);
        self.spawn_op(channel, async move {
            // The counts come from the node serving the queue: the checks must not pass on a
            // node that merely has no local copy.
            let (count, consumers) = match &handle {
                Some(h) => match queue_stats(h).await {
                    Ok(s) => (s.ready, s.consumers),
                    Err(e) => return meta_failure(cluster_error(e), &method),
                },
                None => (0, 0),
            };
            if exists && if_unused && consumers > 0 {
                return OpOutcome::ChannelError(MethodError::new(
                    AmqpError::precondition_failed(format!(
                        "queue '{name}' in vhost '{vhost}' in use"
                    )),
                    &method,
                ));
            }
            if exists && if_empty && count > 0 {
                return OpOutcome::ChannelError(MethodError::new(
                    AmqpError::precondition_failed(format!(
                        "queue '{name}' in vhost '{vhost}' is not empty"
                    )),
                    &method,
                ));
            }
            let cmd = MetaCmd::DeleteQueue { vhost, name, by };
            match node.meta_write(cmd).await {
                Ok(MetaReply::Error(e)) => meta_failure(e, &method),
                Ok(_) if nowait => OpOutcome::NoReply,
                Ok(_) => OpOutcome::Reply(Method::QueueDeleteOk(warren_codec::QueueDeleteOk {
                    message_count: count as u32,
                })),
                Err(e) => meta_failure(cluster_error(e), &method),
            }
        });
        Ok(())
    }

    fn basic_consume(&mut self, channel: u16, method: Method) -> Result<(), Failure> {
        let Method::BasicConsume(ref m) = method else {
            unreachable!("called for basic.consume only")
        };
        let queue = self.resolve_queue_name(channel, &m.queue, &method)?;
        self.check(Access::Read, "queue", &queue, &method)?;
        let handle = self.accessible_queue(&queue, &method)?;
        let tag = if m.consumer_tag.is_empty() {
            short(&generated_name("amq.ctag-"))
        } else {
            m.consumer_tag.clone()
        };
        let timeout = consumer_timeout(
            &m.arguments,
            &handle,
            self.broker.config.amqp.consumer_timeout_ms,
        );
        let ch = self.channel(channel);
        if ch.consumers.contains_key(tag.as_str()) {
            return Err(Failure::Connection(MethodError::new(
                AmqpError::new(
                    reply_code::NOT_ALLOWED,
                    format!("attempt to reuse consumer tag '{tag}'"),
                ),
                &method,
            )));
        }
        let key = ConsumerKey {
            channel: ch.chref,
            tag: tag.as_str().to_owned(),
        };
        let prefetch = ch.consumer_prefetch();
        ch.consumers.insert(
            tag.as_str().to_owned(),
            ConsumerEntry {
                handle: handle.clone(),
                ready: false,
                pending: Vec::new(),
                timeout,
                no_ack: m.no_ack,
                exclusive: m.exclusive,
                prefetch,
                arguments: m.arguments.clone(),
            },
        );
        ch.touch(&handle);
        // Attach before the command commits: deliveries may follow it immediately.
        handle.attach(key.clone(), self.sink.clone());
        let (no_ack, exclusive, nowait) = (m.no_ack, m.exclusive, m.nowait);
        let priority = consumer_priority(&m.arguments).map_err(|e| {
            // Undo the registration above: the consume never happened.
            let ch = self.channels.get_mut(&channel);
            if let Some(ch) = ch {
                ch.consumers.remove(tag.as_str());
            }
            handle.detach(&key);
            Failure::Channel(MethodError::new(e, &method))
        })?;
        // Submitted here, before any `ChannelDown` of this channel (see `call`): a consumer
        // taken after its channel closed would hold messages for nobody.
        let consumed = handle.call(
            QueueCmd::Consume {
                consumer: key.clone(),
                prefetch,
                no_ack,
                exclusive,
                priority,
            },
            None,
        );
        self.spawn_op(channel, async move {
            let result = consumed.await;
            match result {
                Ok(QueueOutcome {
                    reply: QueueReply::Done,
                    ..
                }) => OpOutcome::Consumed { tag, nowait },
                other => {
                    handle.detach(&key);
                    let error = match other {
                        Ok(QueueOutcome {
                            reply: QueueReply::Error(e),
                            ..
                        }) => e,
                        Ok(o) => AmqpError::internal(format!("unexpected reply {:?}", o.reply)),
                        Err(e) => cluster_error(e),
                    };
                    OpOutcome::ConsumeFailed {
                        tag,
                        error: MethodError::new(error, &method),
                    }
                }
            }
        });
        Ok(())
    }

    fn on_header(&mut self, channel: u16, header: ContentHeader) -> Result<(), Failure> {
        let max = self.broker.config.amqp.max_message_size;
        let ch = self.channel(channel);
        let Some(publish) = ch.publish.as_mut() else {
            return Err(Failure::Connection(MethodError::bare(
                reply_code::UNEXPECTED_FRAME,
                format!("unexpected content header on channel {channel}"),
            )));
        };
        if publish.header.is_some() {
            return Err(Failure::Connection(MethodError::bare(
                reply_code::UNEXPECTED_FRAME,
                format!("second content header on channel {channel}"),
            )));
        }
        if header.class_id != class_id::BASIC {
            return Err(Failure::Connection(MethodError::bare(
                reply_code::FRAME_ERROR,
                format!(
                    "content header for class {} on channel {channel}",
                    header.class_id
                ),
            )));
        }
        if header.body_size > max {
            ch.publish = None;
            return Err(Failure::Channel(MethodError {
                error: AmqpError::precondition_failed(format!(
                    "message size {} is larger than configured max size {max}",
                    header.body_size
                )),
                class_id: class_id::BASIC,
                method_id: 40,
            }));
        }
        publish.start_body(header);
        if publish.complete() {
            return self.finish_publish(channel);
        }
        Ok(())
    }

    fn on_body(&mut self, channel: u16, payload: Bytes) -> Result<(), Failure> {
        let ch = self.channel(channel);
        let Some(publish) = ch.publish.as_mut().filter(|p| p.header.is_some()) else {
            return Err(Failure::Connection(MethodError::bare(
                reply_code::UNEXPECTED_FRAME,
                format!("unexpected content body on channel {channel}"),
            )));
        };
        if !publish.push_body(payload) {
            return Err(Failure::Connection(MethodError::bare(
                reply_code::FRAME_ERROR,
                format!("content body on channel {channel} is longer than its header said"),
            )));
        }
        if publish.complete() {
            return self.finish_publish(channel);
        }
        Ok(())
    }

    /// A publish is complete: route it, submit it to its queues, and arrange its confirm.
    fn finish_publish(&mut self, channel: u16) -> Result<(), Failure> {
        let ch = self.channel(channel);
        let Some(publish) = ch.publish.take() else {
            return Ok(());
        };
        let (method, header, body) = publish.into_parts();
        let seq = ch.confirm.as_mut().map(|c| c.next_seq());
        self.has_published = true;
        self.check_publish(&method.exchange)?;
        let metrics = &self.broker.metrics;
        metrics.published.fetch_add(1, Ordering::Relaxed);

        // Properties stay encoded on the fast path. They are decoded only when routing needs
        // the headers table or the user-id must be checked against the login.
        let flags = header
            .properties
            .get(..2)
            .map_or(0, |f| u16::from_be_bytes([f[0], f[1]]));
        const HEADERS_FLAG: u16 = 1 << 13;
        const PRIORITY_FLAG: u16 = 1 << 11;
        const EXPIRATION_FLAG: u16 = 1 << 8;
        const USER_ID_FLAG: u16 = 1 << 4;
        let mut priority = 0;
        let mut ttl = None;
        let headers =
            if flags & (HEADERS_FLAG | PRIORITY_FLAG | EXPIRATION_FLAG | USER_ID_FLAG) != 0 {
                let props = BasicProperties::decode(&header.properties).map_err(|e| {
                    Failure::Connection(MethodError::bare(
                        reply_code::FRAME_ERROR,
                        format!("malformed content properties: {e}"),
                    ))
                })?;
                if let Some(user_id) = &props.user_id
                    && user_id.as_str() != self.user
                {
                    return Err(Failure::Channel(MethodError {
                        error: AmqpError::precondition_failed(format!(
                            "user_id property set to '{user_id}' but authenticated user was '{}'",
                            self.user
                        )),
                        class_id: class_id::BASIC,
                        method_id: 40,
                    }));
                }
                priority = props.priority.unwrap_or(0);
                if let Some(expiration) = &props.expiration {
                    ttl = Some(parse_expiration(expiration.as_str()).ok_or_else(|| {
                        Failure::Channel(MethodError {
                            error: AmqpError::precondition_failed(format!(
                                "invalid expiration '{expiration}'"
                            )),
                            class_id: class_id::BASIC,
                            method_id: 40,
                        })
                    })?);
                }
                props.headers
            } else {
                None
            };
        let routed = {
            let meta = self.node.meta();
            meta.route(
                &self.vhost,
                method.exchange.as_str(),
                method.routing_key.as_str(),
                headers.as_ref(),
            )
        };
        let routed = match routed {
            Ok(r) => r,
            Err(e) => {
                return Err(Failure::Channel(MethodError {
                    error: e,
                    class_id: class_id::BASIC,
                    method_id: 40,
                }));
            }
        };
        let content = MessageContent {
            exchange: method.exchange.clone(),
            routing_key: method.routing_key.clone(),
            properties: header.properties.clone(),
            body,
        };
        let mut handles = Vec::with_capacity(routed.queues.len());
        for q in &routed.queues {
            if let Some(h) = self.node.queue(&self.vhost, q) {
                handles.push(h);
            }
        }
        if handles.is_empty() {
            metrics.unroutable.fetch_add(1, Ordering::Relaxed);
            if method.mandatory {
                self.send_method(
                    channel,
                    &Method::BasicReturn(warren_codec::BasicReturn {
                        reply_code: reply_code::NO_ROUTE,
                        reply_text: short("NO_ROUTE"),
                        exchange: content.exchange.clone(),
                        routing_key: content.routing_key.clone(),
                    }),
                );
                self.send_content(channel, &content.properties, &content.body);
            }
            if let Some(seq) = seq {
                if routed.queues.is_empty() {
                    self.channel(channel)
                        .confirm
                        .as_mut()
                        .expect("seq implies confirm mode")
                        .settle_now(seq, true);
                } else {
                    // Routed to queues this node cannot reach: the broker did not take it.
                    self.channel(channel)
                        .confirm
                        .as_mut()
                        .expect("seq implies confirm mode")
                        .settle_now(seq, false);
                }
                self.flush_confirms(channel);
            }
            return Ok(());
        }
        let meta = MessageMeta {
            size: content.body.len() as u64,
            priority,
            ttl,
        };
        if let Some(tx) = self.channel(channel).tx.as_mut() {
            // Routed now, enqueued at tx.commit.
            tx.publishes.push(TxPublish {
                handles,
                meta,
                content,
            });
            return Ok(());
        }
        if let Some(seq) = seq {
            self.channel(channel)
                .confirm
                .as_mut()
                .expect("seq implies confirm mode")
                .expect(seq, handles.len());
        }
        for h in handles {
            let reply = match seq {
                Some(seq) => ReplyTo::Sink(self.sink.clone(), confirm_token(channel, seq)),
                None => ReplyTo::None,
            };
            self.submit_enqueue(channel, &h, meta, content.clone(), reply);
        }
        Ok(())
    }

    fn submit_enqueue(
        &mut self,
        channel: u16,
        h: &Arc<QueueHandle>,
        meta: MessageMeta,
        content: MessageContent,
        reply: ReplyTo,
    ) {
        // Replicated queues number each channel's publishes so that a publish resent after a
        // leader change is taken once; the channel-down command at close lets the queue
        // forget the numbering.
        let publisher = h.is_replicated().then(|| {
            let ch = self.channel(channel);
            ch.touch(h);
            Publisher {
                id: PublisherId::Channel(ch.chref),
                seq: ch.next_publish_seq(h.id()),
            }
        });
        Traffic::add(&h.traffic.published, 1);
        h.submit(
            QueueRequest::with_content(QueueCmd::Enqueue { meta, publisher }, content),
            reply,
        );
    }

    /// Acks, nacks and rejects: applied now (acks join the pending run, see `pending_acks`),
    /// or at tx.commit on a transactional channel.
    fn settle_or_buffer(&mut self, channel: u16, entries: Vec<(u64, Unacked)>, how: Settlement) {
        if let Some(tx) = self.channel(channel).tx.as_mut() {
            tx.settlements.push((entries, how));
            return;
        }
        let entries = entries.into_iter().map(|(_, u)| u);
        if how != Settlement::Ack {
            self.settle(channel, entries.collect(), how);
            return;
        }
        // A run of another channel is sent first.
        if !matches!(&self.pending_acks, Some((pending, _)) if *pending == channel) {
            self.flush_acks();
        }
        let (_, acks) = self
            .pending_acks
            .get_or_insert_with(|| (channel, Vec::new()));
        acks.extend(entries);
    }

    /// Sends the pending run of acks to its queues.
    fn flush_acks(&mut self) {
        if let Some((channel, acks)) = self.pending_acks.take()
            && self.channels.contains_key(&channel)
        {
            self.settle(channel, acks, Settlement::Ack);
        }
    }

    /// tx.commit: the buffered publishes and settlements are staged in their queues, decided
    /// once through the metadata and applied everywhere or nowhere (ADR 0005); commit-ok
    /// follows the decision to commit.
    fn tx_commit(&mut self, channel: u16, method: Method) -> Result<(), Failure> {
        let Some(tx) = self.channel(channel).tx.as_mut() else {
            return Err(Failure::Channel(MethodError::new(
                AmqpError::precondition_failed("channel is not transactional"),
                &method,
            )));
        };
        let TxBuffer {
            publishes,
            settlements,
        } = std::mem::take(tx);
        let ch = self.channel(channel);
        ch.tx_commits += 1;
        let tx = TxId {
            channel: ch.chref,
            commit: ch.tx_commits,
        };
        let mut work = Vec::new();
        for (entries, how) in settlements {
            let entries = entries.into_iter().map(|(_, u)| u).collect();
            for (handle, msgs) in self.settlement_groups(channel, entries, how) {
                let how = how.in_transaction();
                work.push((handle, TxWork::Settle { how, msgs }, None));
            }
        }
        for p in publishes {
            for h in p.handles {
                Traffic::add(&h.traffic.published, 1);
                let meta = p.meta;
                work.push((h, TxWork::Publish { meta }, Some(p.content.clone())));
            }
        }
        self.release_held(channel);
        let staging = Staging::submit(tx, work);
        let node = self.node.clone();
        self.spawn_op(channel, async move {
            match staging.commit(&node).await {
                Ok(()) => OpOutcome::Reply(Method::TxCommitOk(warren_codec::TxCommitOk {})),
                Err(failure) => meta_failure(failure.error, &method),
            }
        });
        Ok(())
    }

    /// Removes the unacked entries an ack/nack/reject names; an unknown tag is 406.
    fn take_unacked(
        &mut self,
        channel: u16,
        tag: u64,
        multiple: bool,
        method: &Method,
    ) -> Result<Vec<(u64, Unacked)>, Failure> {
        let ch = self.channel(channel);
        if multiple {
            if tag == 0 {
                return Ok(ch.unacked.take_all());
            }
            if !ch.unacked.any_through(tag) {
                return Err(unknown_tag(tag, method));
            }
            return Ok(ch.unacked.take_through(tag));
        }
        match ch.unacked.remove(tag) {
            Some(u) => Ok(vec![(tag, u)]),
            None => Err(unknown_tag(tag, method)),
        }
    }

    fn group_by_queue(&self, entries: Vec<Unacked>) -> Vec<(Arc<QueueHandle>, Vec<MsgId>)> {
        let mut groups: BTreeMap<u64, (Arc<QueueHandle>, Vec<MsgId>)> = BTreeMap::new();
        for u in entries {
            groups
                .entry(u.handle.id())
                .or_insert_with(|| (u.handle.clone(), Vec::new()))
                .1
                .push(u.msg);
        }
        groups.into_values().collect()
    }

    /// basic.recover(-async): every delivery the channel holds goes back to its queue, marked
    /// redelivered.
    fn requeue_all_unacked(&mut self, channel: u16) {
        let entries = self.channel(channel).unacked.take_all();
        self.settle(
            channel,
            entries.into_iter().map(|(_, u)| u).collect(),
            Settlement::Requeue,
        );
    }

    fn settle(&mut self, channel: u16, entries: Vec<Unacked>, how: Settlement) {
        let chref = self.channel(channel).chref;
        for (handle, msgs) in self.settlement_groups(channel, entries, how) {
            let cmd = match how {
                Settlement::Ack => QueueCmd::Settle {
                    channel: chref,
                    msgs,
                },
                Settlement::Requeue => QueueCmd::Requeue {
                    channel: chref,
                    msgs,
                },
                Settlement::Discard => QueueCmd::Discard {
                    channel: chref,
                    msgs,
                },
            };
            self.broker
                .metrics
                .settlement_commands
                .fetch_add(1, Ordering::Relaxed);
            handle.submit(QueueRequest::new(cmd), ReplyTo::None);
        }
        // Settled deliveries free room under the channel-wide qos limits.
        self.release_held(channel);
    }

    /// Counts settlements and remembers them (a resent delivery of a settled message is
    /// dropped), grouped by the queue that must apply them.
    fn settlement_groups(
        &mut self,
        channel: u16,
        entries: Vec<Unacked>,
        how: Settlement,
    ) -> Vec<(Arc<QueueHandle>, Vec<MsgId>)> {
        if entries.is_empty() {
            return Vec::new();
        }
        let ch = self.channel(channel);
        for u in &entries {
            ch.settled.remember(u.handle.id(), u.msg, u.delivery_count);
        }
        let metrics = &self.broker.metrics;
        match how {
            Settlement::Ack => metrics
                .acked
                .fetch_add(entries.len() as u64, Ordering::Relaxed),
            _ => metrics
                .nacked
                .fetch_add(entries.len() as u64, Ordering::Relaxed),
        };
        let groups = self.group_by_queue(entries);
        if how == Settlement::Ack {
            for (handle, msgs) in &groups {
                Traffic::add(&handle.traffic.acked, msgs.len() as u64);
            }
        }
        groups
    }

    /// Runs a metadata command on a task and replies with `reply` once it committed.
    fn spawn_meta(&mut self, channel: u16, method: Method, cmd: MetaCmd, reply: Option<Method>) {
        let node = self.node.clone();
        self.spawn_op(channel, async move {
            match node.meta_write(cmd).await {
                Ok(MetaReply::Error(e)) => meta_failure(e, &method),
                Ok(_) => reply.map_or(OpOutcome::NoReply, OpOutcome::Reply),
                Err(e) => meta_failure(cluster_error(e), &method),
            }
        });
    }

    fn spawn_op(
        &mut self,
        channel: u16,
        op: impl std::future::Future<Output = OpOutcome> + Send + 'static,
    ) {
        let ch = self.channel(channel);
        ch.busy = true;
        let opened = ch.chref.opened;
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let outcome = op.await;
            let _ = tx.send(ConnEvent::OpDone {
                channel,
                opened,
                outcome,
            });
        });
    }

    /// The channels and consumers of this connection, for the management API.
    fn details(&self) -> ConnectionDetails {
        use serde_json::json;
        let Some(listed) = &self.listed else {
            return ConnectionDetails::default();
        };
        let node = crate::management::node_name(self.node.id());
        let connection_details = json!({
            "name": listed.name,
            "peer_host": listed.peer.ip().to_string(),
            "peer_port": listed.peer.port(),
        });
        let mut out = ConnectionDetails::default();
        let mut numbers: Vec<u16> = self.channels.keys().copied().collect();
        numbers.sort_unstable();
        for number in numbers {
            let ch = &self.channels[&number];
            let name = format!("{} ({number})", listed.name);
            // RabbitMQ's consumer objects name their channel with the connection's fields
            // flattened in.
            let mut channel_details = connection_details.clone();
            if let Some(d) = channel_details.as_object_mut() {
                d.insert("connection_name".into(), listed.name.clone().into());
                d.insert("name".into(), name.clone().into());
                d.insert("number".into(), number.into());
                d.insert("user".into(), self.user.clone().into());
                d.insert("node".into(), node.clone().into());
            }
            out.channels.push(json!({
                "name": name,
                "number": number,
                "connection_details": connection_details,
                "node": node,
                "user": self.user,
                "vhost": self.vhost,
                "state": if ch.flow_active { "running" } else { "flow" },
                "confirm": ch.confirm.is_some(),
                "transactional": ch.tx.is_some(),
                "prefetch_count": ch.prefetch,
                "global_prefetch_count": ch.global_prefetch,
                "consumer_count": ch.consumers.len(),
                "messages_unacknowledged": ch.unacked.len(),
            }));
            let mut tags: Vec<&String> = ch.consumers.keys().collect();
            tags.sort();
            for tag in tags {
                let c = &ch.consumers[tag];
                out.consumers.push(json!({
                    "consumer_tag": tag,
                    "queue": {"name": c.handle.name(), "vhost": c.handle.vhost()},
                    "channel_details": channel_details,
                    "ack_required": !c.no_ack,
                    "exclusive": c.exclusive,
                    "prefetch_count": c.prefetch,
                    "arguments": warren_core::json::table_to_json(&c.arguments),
                    "active": c.ready,
                }));
            }
        }
        out
    }

    fn on_event(&mut self, event: ConnEvent) -> Option<Stop> {
        self.flush_acks();
        match event {
            ConnEvent::Describe { reply } => {
                let _ = reply.send(self.details());
                None
            }
            ConnEvent::ForceClose { reason } => {
                info!(peer = %self.peer, %reason, "connection closed by an operator");
                Some(Stop::Close(MethodError::bare(
                    reply_code::CONNECTION_FORCED,
                    reason,
                )))
            }
            ConnEvent::Deliver(d) => {
                self.deliver(d);
                None
            }
            ConnEvent::Completed { token, result } => {
                let (channel, seq) = split_token(token);
                // A duplicate is a resend of a publish the queue took already; a rejected
                // one was refused by `x-overflow: reject-publish(-dlx)`.
                let ok = matches!(
                    &result,
                    Ok(QueueOutcome {
                        reply: QueueReply::Enqueued { .. } | QueueReply::Duplicate,
                        ..
                    })
                );
                if let Some(confirm) = self
                    .channels
                    .get_mut(&channel)
                    .and_then(|c| c.confirm.as_mut())
                {
                    confirm.target_done(seq, ok);
                    self.flush_confirms(channel);
                }
                None
            }
            ConnEvent::ConsumerGone { consumer } => {
                let channel = consumer.channel.channel;
                let ch = self.channels.get_mut(&channel)?;
                if ch.chref != consumer.channel || ch.consumers.remove(&consumer.tag).is_none() {
                    return None;
                }
                if self.caps.consumer_cancel_notify {
                    self.send_method(
                        channel,
                        &Method::BasicCancel(warren_codec::BasicCancel {
                            consumer_tag: short(&consumer.tag),
                            nowait: true,
                        }),
                    );
                }
                None
            }
            ConnEvent::OpDone {
                channel,
                opened,
                outcome,
            } => {
                match self.channels.get_mut(&channel) {
                    Some(ch) if ch.chref.opened == opened => ch.busy = false,
                    _ => return None,
                }
                if let Some(stop) = self.on_op_done(channel, outcome) {
                    return Some(stop);
                }
                self.drain_backlog(channel)
            }
        }
    }

    fn on_op_done(&mut self, channel: u16, outcome: OpOutcome) -> Option<Stop> {
        match outcome {
            OpOutcome::Reply(m) => self.send_method(channel, &m),
            OpOutcome::NoReply => {}
            OpOutcome::ChannelError(e) => self.close_channel_with(channel, e),
            OpOutcome::ConnectionError(e) => return Some(Stop::Close(e)),
            OpOutcome::Consumed { tag, nowait } => {
                if !nowait {
                    self.send_method(
                        channel,
                        &Method::BasicConsumeOk(warren_codec::BasicConsumeOk {
                            consumer_tag: tag.clone(),
                        }),
                    );
                }
                let pending = match self.channel(channel).consumers.get_mut(tag.as_str()) {
                    Some(entry) => {
                        entry.ready = true;
                        std::mem::take(&mut entry.pending)
                    }
                    None => Vec::new(),
                };
                for d in pending {
                    self.deliver(d);
                }
            }
            OpOutcome::ConsumeFailed { tag, error } => {
                if let Some(entry) = self.channel(channel).consumers.remove(tag.as_str()) {
                    // Deliveries cannot exist for a consumer that never registered, but if
                    // any arrived, give them back rather than lose them.
                    let chref = self.channel(channel).chref;
                    let msgs: Vec<MsgId> = entry
                        .pending
                        .iter()
                        .filter(|d| !d.no_ack)
                        .map(|d| d.msg)
                        .collect();
                    if !msgs.is_empty() {
                        entry.handle.submit(
                            QueueRequest::new(QueueCmd::Requeue {
                                channel: chref,
                                msgs,
                            }),
                            ReplyTo::None,
                        );
                    }
                }
                if error.error.is_connection_error() {
                    return Some(Stop::Close(error));
                }
                self.close_channel_with(channel, error);
            }
            OpOutcome::Got {
                handle,
                msg,
                delivery_count,
                remaining,
                content,
                no_ack,
            } => {
                let deadline = consumer_timeout(
                    &FieldTable::new(),
                    &handle,
                    self.broker.config.amqp.consumer_timeout_ms,
                )
                .map(|t| Instant::now() + t);
                Traffic::add(&handle.traffic.delivered, 1);
                let ch = self.channel(channel);
                let tag = ch.next_delivery_tag();
                if !no_ack {
                    ch.unacked.insert(
                        tag,
                        Unacked {
                            deadline,
                            handle,
                            msg,
                            size: content.body.len() as u64,
                            delivery_count,
                        },
                    );
                }
                self.broker
                    .metrics
                    .delivered
                    .fetch_add(1, Ordering::Relaxed);
                self.send_method(
                    channel,
                    &Method::BasicGetOk(warren_codec::BasicGetOk {
                        delivery_tag: tag,
                        redelivered: delivery_count > 0,
                        exchange: content.exchange.clone(),
                        routing_key: content.routing_key.clone(),
                        message_count: remaining as u32,
                    }),
                );
                let properties = with_delivery_count(&content.properties, delivery_count);
                self.send_content(channel, &properties, &content.body);
            }
            OpOutcome::Retry(method) => {
                self.retrying = true;
                let result = self.on_method(channel, method);
                self.retrying = false;
                match result {
                    Ok(()) => {}
                    Err(Failure::Channel(err)) => self.close_channel_with(channel, err),
                    Err(Failure::Connection(err)) => return Some(Stop::Close(err)),
                }
            }
            OpOutcome::Cancelled { tag, nowait } => {
                self.channel(channel).consumers.remove(tag.as_str());
                if !nowait {
                    self.send_method(
                        channel,
                        &Method::BasicCancelOk(warren_codec::BasicCancelOk { consumer_tag: tag }),
                    );
                }
            }
        }
        None
    }

    /// Closes, with 406 as RabbitMQ does, every channel holding a delivery unacknowledged past
    /// its consumer timeout; its unacknowledged messages go back to their queues.
    fn close_timed_out_channels(&mut self) {
        let now = Instant::now();
        let late: Vec<u16> = self
            .channels
            .iter()
            .filter(|(_, ch)| ch.state == ChannelState::Open && ch.timed_out(now).is_some())
            .map(|(n, _)| *n)
            .collect();
        for channel in late {
            warn!(peer = %self.peer, channel, "delivery acknowledgement timed out");
            self.close_channel_with(
                channel,
                MethodError::bare(
                    reply_code::PRECONDITION_FAILED,
                    format!(
                        "delivery acknowledgement on channel {channel} timed out. Timeout value \
                         used: {} ms",
                        self.broker.config.amqp.consumer_timeout_ms
                    ),
                ),
            );
        }
    }

    /// Blocks or unblocks the connection after the alarm or its publishing changed: like
    /// RabbitMQ, a connection is blocked once it publishes while an alarm is on, and only
    /// then (consumers keep draining queues).
    fn apply_alarm(&mut self) {
        let blocked = self.alarm.is_some() && self.has_published;
        if blocked == self.blocked {
            return;
        }
        self.blocked = blocked;
        if !self.caps.connection_blocked {
            return;
        }
        if blocked {
            let reason = self.alarm.clone().unwrap_or_default();
            info!(peer = %self.peer, %reason, "connection blocked");
            self.send_method(
                0,
                &Method::ConnectionBlocked(warren_codec::ConnectionBlocked {
                    reason: short(&reason),
                }),
            );
        } else {
            info!(peer = %self.peer, "connection unblocked");
            self.send_method(
                0,
                &Method::ConnectionUnblocked(warren_codec::ConnectionUnblocked {}),
            );
        }
    }

    /// 403 unless the user may `access` the resource.
    fn check(
        &self,
        access: Access,
        kind: &str,
        name: &str,
        method: &Method,
    ) -> Result<(), Failure> {
        if self.access.allows(access, name) {
            return Ok(());
        }
        Err(Failure::Channel(MethodError::new(
            crate::access::refused(access, kind, name, &self.vhost, &self.user),
            method,
        )))
    }

    /// Write permission on a publish's exchange, remembered per exchange.
    fn check_publish(&mut self, exchange: &ShortStr) -> Result<(), Failure> {
        if self.access.is_unrestricted() {
            return Ok(());
        }
        let allowed = match self.write_checked.get(exchange) {
            Some(a) => *a,
            None => {
                let a = self.access.allows(Access::Write, exchange.as_str());
                self.write_checked.insert(exchange.clone(), a);
                a
            }
        };
        if allowed {
            return Ok(());
        }
        Err(Failure::Channel(MethodError {
            error: crate::access::refused(
                Access::Write,
                "exchange",
                exchange.as_str(),
                &self.vhost,
                &self.user,
            ),
            class_id: class_id::BASIC,
            method_id: 40,
        }))
    }

    /// Sends the deliveries the channel held back, as far as flow and the qos limits allow.
    fn release_held(&mut self, channel: u16) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        // Taken out so that `deliver` does not queue them behind themselves; each one is
        // checked against flow and the limits first, so `deliver` sends it.
        let mut held = std::mem::take(&mut ch.held);
        while let Some(front) = held.front() {
            let Some(ch) = self.channels.get_mut(&channel) else {
                return;
            };
            let fits = front.no_ack || ch.has_room_for(front.content.body.len() as u64);
            if !ch.flow_active || !fits {
                break;
            }
            if let Some(d) = held.pop_front() {
                self.deliver(d);
            }
        }
        if let Some(ch) = self.channels.get_mut(&channel) {
            held.append(&mut ch.held);
            ch.held = held;
        }
    }

    /// Writes a delivery to its consumer, or gives it back when the consumer is gone.
    fn deliver(&mut self, d: Delivery) {
        let channel = d.consumer.channel.channel;
        let live = self
            .channels
            .get(&channel)
            .is_some_and(|c| c.chref == d.consumer.channel && c.state == ChannelState::Open);
        if !live {
            // The channel closed: its clean-up returns what it held; nothing to do.
            return;
        }
        let ch = self.channel(channel);
        let queue = d.handle.id();
        let known = ch
            .settled
            .count_of(queue, d.msg)
            .max(ch.unacked.highest_count_held(queue, d.msg));
        if repeats_a_known_delivery(known, d.delivery_count) {
            // A new queue leader repeats deliveries it cannot know were sent (this one was,
            // and the client holds it) or settled (the settlement is on its way); an old
            // copy can arrive late from a peer that was cut off.
            return;
        }
        let Some(entry) = ch.consumers.get_mut(&d.consumer.tag) else {
            // Cancelled consumer: the message is checked out to this channel; give it back.
            if !d.no_ack {
                let chref = ch.chref;
                d.handle.submit(
                    QueueRequest::new(QueueCmd::Requeue {
                        channel: chref,
                        msgs: vec![d.msg],
                    }),
                    ReplyTo::None,
                );
            }
            return;
        };
        if !entry.ready {
            entry.pending.push(d);
            return;
        }
        let timeout = entry.timeout;
        // Held back by channel.flow or the channel-wide qos limits; behind earlier ones, so
        // the channel's deliveries keep their order.
        if !ch.flow_active
            || !ch.held.is_empty()
            || (!d.no_ack && !ch.has_room_for(d.content.body.len() as u64))
        {
            ch.held.push_back(d);
            return;
        }
        let tag = ch.next_delivery_tag();
        if !d.no_ack {
            ch.unacked.insert(
                tag,
                Unacked {
                    handle: d.handle.clone(),
                    msg: d.msg,
                    size: d.content.body.len() as u64,
                    deadline: timeout.map(|t| Instant::now() + t),
                    delivery_count: d.delivery_count,
                },
            );
        }
        Traffic::add(&d.handle.traffic.delivered, 1);
        self.broker
            .metrics
            .delivered
            .fetch_add(1, Ordering::Relaxed);
        self.send_method(
            channel,
            &Method::BasicDeliver(warren_codec::BasicDeliver {
                consumer_tag: short(&d.consumer.tag),
                delivery_tag: tag,
                // A resend this channel no longer holds was delivered (and maybe acked)
                // before a leader change: it may be a repeat, which is what the flag says.
                redelivered: d.delivery_count > 0 || d.resend,
                exchange: d.content.exchange.clone(),
                routing_key: d.content.routing_key.clone(),
            }),
        );
        let properties = with_delivery_count(&d.content.properties, d.delivery_count);
        self.send_content(channel, &properties, &d.content.body);
    }

    fn flush_confirms(&mut self, channel: u16) {
        let Some(confirm) = self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.confirm.as_mut())
        else {
            return;
        };
        for (tag, multiple, ack) in confirm.drain_ready() {
            let method = if ack {
                Method::BasicAck(warren_codec::BasicAck {
                    delivery_tag: tag,
                    multiple,
                })
            } else {
                Method::BasicNack(warren_codec::BasicNack {
                    delivery_tag: tag,
                    multiple,
                    requeue: false,
                })
            };
            encode_method(channel, &method, &mut self.out);
        }
    }

    /// Server-initiated channel close: release what the channel held, send channel.close and
    /// wait for close-ok in the Closing state.
    fn close_channel_with(&mut self, channel: u16, err: MethodError) {
        debug!(peer = %self.peer, channel, code = err.error.code, text = %err.error.text, "closing channel");
        self.release_channel(channel);
        if let Some(ch) = self.channels.get_mut(&channel) {
            ch.state = ChannelState::Closing;
            self.backlog_frames -= ch.backlog.len();
            ch.backlog.clear();
            ch.publish = None;
        }
        self.send_method(
            channel,
            &Method::ChannelClose(warren_codec::ChannelClose {
                reply_code: err.error.code,
                reply_text: reply_text(err.error.code, &err.error.text),
                class_id: err.class_id,
                method_id: err.method_id,
            }),
        );
    }

    /// The channel ends: its consumers detach and every queue it touched gets its unacked
    /// messages back.
    fn release_channel(&mut self, channel: u16) {
        // Its acks reach the queues before the release that would return what they settled.
        self.flush_acks();
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        if ch.state == ChannelState::Open {
            self.broker.metrics.channels.fetch_sub(1, Ordering::Relaxed);
        }
        self.backlog_frames -= ch.backlog.len();
        ch.backlog.clear();
        let chref = ch.chref;
        for (tag, entry) in ch.consumers.drain() {
            entry.handle.detach(&ConsumerKey {
                channel: chref,
                tag,
            });
        }
        ch.unacked.clear();
        ch.held.clear();
        for handle in ch.touched.values() {
            handle.submit(
                QueueRequest::new(QueueCmd::ChannelDown { channel: chref }),
                ReplyTo::None,
            );
        }
        ch.touched.clear();
        ch.confirm = None;
    }

    async fn cleanup(&mut self) {
        let channels: Vec<u16> = self.channels.keys().copied().collect();
        for channel in channels {
            self.release_channel(channel);
        }
        self.channels.clear();
        if std::mem::take(&mut self.has_exclusive_queues) {
            let _ = self
                .node
                .meta_write(MetaCmd::ConnectionClosed { conn: self.conn })
                .await;
        }
    }
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
) {
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(b) => batch.push(b),
                Err(_) => break,
            }
        }
        let total: usize = batch.iter().map(Bytes::len).sum();
        let mut failed = false;
        for chunk in batch.drain(..) {
            if writer.write_all(&chunk).await.is_err() {
                failed = true;
                break;
            }
        }
        queued.fetch_sub(total, Ordering::Relaxed);
        if failed {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

enum Failure {
    Channel(MethodError),
    Connection(MethodError),
}

fn unknown_tag(tag: u64, method: &Method) -> Failure {
    Failure::Channel(MethodError::new(
        AmqpError::precondition_failed(format!("unknown delivery tag {tag}")),
        method,
    ))
}

fn unexpected_in_handshake(method: &Method, expected: &str) -> MethodError {
    MethodError::new(
        AmqpError::command_invalid(format!("expected {expected}, got {}", method.name())),
        method,
    )
}

fn unexpected_frame_in_handshake(frame: &Frame, expected: &str) -> MethodError {
    match frame {
        Frame::Method { method, .. } => unexpected_in_handshake(method, expected),
        _ => MethodError::bare(
            reply_code::UNEXPECTED_FRAME,
            format!("expected {expected}, got a content or heartbeat frame"),
        ),
    }
}

/// A queue that is gone, or whose only node is down, is a 404 for the channel (RabbitMQ says
/// the same of a queue on a down node); anything else is the broker's fault.
fn cluster_error(e: ClusterError) -> AmqpError {
    match e {
        ClusterError::QueueGone(_) | ClusterError::QueueUnavailable(_) => {
            AmqpError::not_found(e.to_string())
        }
        other => AmqpError::internal(format!("cluster error: {other}")),
    }
}

fn declare_ok(name: &str, stats: QueueStats) -> Method {
    Method::QueueDeclareOk(warren_codec::QueueDeclareOk {
        queue: short(name),
        message_count: stats.ready as u32,
        consumer_count: stats.consumers as u32,
    })
}

/// A queue's counters as its serving node has them: local when this node serves it, else read
/// through the queue's log, so they include every command committed before.
async fn queue_stats(handle: &QueueHandle) -> Result<QueueStats, ClusterError> {
    if handle.is_leader() {
        return Ok(handle.stats());
    }
    match handle.call(QueueCmd::Stats, None).await?.reply {
        QueueReply::Stats {
            ready,
            unacked,
            consumers,
        } => Ok(QueueStats {
            ready,
            unacked,
            consumers,
            ready_bytes: 0,
        }),
        other => Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
    }
}

fn meta_failure(e: AmqpError, method: &Method) -> OpOutcome {
    let err = MethodError::new(e, method);
    if err.error.is_connection_error() {
        OpOutcome::ConnectionError(err)
    } else {
        OpOutcome::ChannelError(err)
    }
}

fn op_failure(result: Result<QueueOutcome, ClusterError>, method: &Method) -> OpOutcome {
    let e = match result {
        Ok(QueueOutcome {
            reply: QueueReply::Error(e),
            ..
        }) => e,
        Ok(other) => AmqpError::internal(format!("unexpected reply {:?}", other.reply)),
        Err(e) => cluster_error(e),
    };
    meta_failure(e, method)
}
