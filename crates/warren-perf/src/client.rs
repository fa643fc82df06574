//! The load generator's AMQP 0-9-1 client: one connection with one channel, driven by the
//! task that owns it, on the workspace's own frame codec (`warren-codec`).
//!
//! Why not a general-purpose client: the generator shares the machine with the brokers it
//! measures, so every microsecond it spends per message is taken from them. A client with
//! its own I/O thread hands every frame between threads (two context switches a message
//! and more); here the task that publishes or consumes also reads and writes the socket,
//! encodes everything produced in one pass into one buffer and writes it with one call, and
//! decodes bodies without copying them. `lib.rs` (the run: producers, consumers, checks)
//! is the only user.
//!
//! What it speaks: PLAIN login, heartbeats off (the generator's connections are never idle
//! long), one channel (1), the setup methods as request/reply (`call`), then publishes with
//! confirms, consumes with acks, and the broker's confirms and deliveries as [`Event`]s. A
//! channel or connection close from the broker is answered and becomes an error naming the
//! reply code and text.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_codec::{
    BasicAck, BasicProperties, ChannelCloseOk, ChannelOpen, ConnectionClose, ConnectionCloseOk,
    ConnectionOpen, ConnectionStartOk, ConnectionTuneOk, FRAME_MIN_SIZE, FieldTable, Frame,
    LongStr, Method, PROTOCOL_HEADER, ShortStr, decode_frame, encode_body, encode_content_header,
    encode_method,
};

/// The channel every connection uses.
const CHANNEL: u16 = 1;
/// Largest frame we ask for; bodies above it are split.
const OUR_FRAME_MAX: u32 = 128 * 1024;
/// How long the handshake and each setup reply may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to connect, from an `amqp://user:pass@host:port/vhost` URI.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl Endpoint {
    /// Parses an AMQP URI as RabbitMQ's clients do: user and password default to guest, the
    /// port to 5672, an absent or empty path to the vhost `/`; parts are percent-decoded.
    pub fn parse(uri: &str) -> anyhow::Result<Endpoint> {
        let rest = match uri.split_once("://") {
            Some(("amqp", rest)) => rest,
            Some((scheme, _)) => bail!("unsupported URI scheme '{scheme}' in {uri}"),
            None => bail!("'{uri}' is not an amqp:// URI"),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = path.split(['?', '#']).next().unwrap_or("");
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, authority),
        };
        let (user, password) = match credentials {
            Some(c) => {
                let (u, p) = c.split_once(':').unwrap_or((c, ""));
                (percent_decode(u)?, percent_decode(p)?)
            }
            None => ("guest".to_string(), "guest".to_string()),
        };
        let (host, port) = match host_port.strip_prefix('[') {
            // An IPv6 literal: [addr] or [addr]:port.
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .with_context(|| format!("unclosed '[' in {uri}"))?;
                (host, after.strip_prefix(':'))
            }
            None => match host_port.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (host_port, None),
            },
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .with_context(|| format!("bad port '{p}' in {uri}"))?,
            None => 5672,
        };
        if host.is_empty() {
            bail!("no host in {uri}");
        }
        let vhost = if path.is_empty() {
            "/".to_string()
        } else {
            percent_decode(path)?
        };
        Ok(Endpoint {
            host: host.to_string(),
            port,
            user,
            password,
            vhost,
        })
    }
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .with_context(|| format!("truncated escape in '{s}'"))?;
            out.push(u8::from_str_radix(hex, 16).with_context(|| format!("bad escape in '{s}'"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).with_context(|| format!("'{s}' is not UTF-8 once decoded"))
}

fn short(s: &str) -> anyhow::Result<ShortStr> {
    ShortStr::try_from(s).map_err(|e| anyhow::anyhow!("'{s}': {e}"))
}

/// What the broker sent that the producer or consumer acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A publisher confirm (`ack`) or nack of `tag`, and of every earlier tag if `multiple`.
    Confirm { tag: u64, multiple: bool, ack: bool },
    /// A whole delivery: its tag and body.
    Delivery { tag: u64, body: Bytes },
    /// The broker cancelled our consumer (its queue was deleted, say).
    Cancelled,
}

/// A delivery whose content frames are still arriving.
struct Incoming {
    tag: u64,
    size: Option<u64>,
    body: BytesMut,
}

pub struct Client {
    stream: TcpStream,
    read: BytesMut,
    write: BytesMut,
    frame_max: u32,
    incoming: Option<Incoming>,
}

impl Client {
    /// Connects, logs in and opens channel 1.
    pub async fn connect(uri: &str) -> anyhow::Result<Client> {
        let endpoint = Endpoint::parse(uri)?;
        tokio::time::timeout(SETUP_TIMEOUT, Self::handshake(&endpoint))
            .await
            .with_context(|| format!("no answer from {uri} within {SETUP_TIMEOUT:?}"))?
            .with_context(|| format!("connecting to {uri}"))
    }

    async fn handshake(endpoint: &Endpoint) -> anyhow::Result<Client> {
        let stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        stream.set_nodelay(true)?;
        let mut client = Client {
            stream,
            read: BytesMut::with_capacity(256 * 1024),
            write: BytesMut::with_capacity(256 * 1024),
            frame_max: FRAME_MIN_SIZE,
            incoming: None,
        };
        client.write.extend_from_slice(PROTOCOL_HEADER);
        client.flush().await?;
        match client.next_method().await? {
            Method::ConnectionStart(start) => {
                let offered = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
                if !offered.split_whitespace().any(|m| m == "PLAIN") {
                    bail!("the broker offers no PLAIN login (offers: {offered})");
                }
            }
            other => bail!("expected connection.start, got {}", other.name()),
        }
        let mut response = vec![0u8];
        response.extend_from_slice(endpoint.user.as_bytes());
        response.push(0);
        response.extend_from_slice(endpoint.password.as_bytes());
        let mut properties = FieldTable::new();
        properties.insert(short("product")?, "warren-perf".into());
        let start_ok = Method::ConnectionStartOk(ConnectionStartOk {
            client_properties: properties,
            mechanism: short("PLAIN")?,
            response: LongStr::from(response),
            locale: short("en_US")?,
        });
        client.send_method(0, &start_ok);
        client.flush().await?;
        let tune = match client.next_method().await? {
            Method::ConnectionTune(tune) => tune,
            other => bail!("expected connection.tune, got {}", other.name()),
        };
        let frame_max = match tune.frame_max {
            0 => OUR_FRAME_MAX,
            offered => offered.min(OUR_FRAME_MAX),
        };
        let channel_max = match tune.channel_max {
            0 => u16::MAX,
            offered => offered,
        };
        client.send_method(
            0,
            &Method::ConnectionTuneOk(ConnectionTuneOk {
                channel_max,
                frame_max,
                heartbeat: 0,
            }),
        );
        client.frame_max = frame_max;
        let open = Method::ConnectionOpen(ConnectionOpen {
            virtual_host: short(&endpoint.vhost)?,
        });
        match client.call_on(0, &open).await? {
            Method::ConnectionOpenOk(_) => {}
            other => bail!("expected connection.open-ok, got {}", other.name()),
        }
        match client
            .call_on(CHANNEL, &Method::ChannelOpen(ChannelOpen {}))
            .await?
        {
            Method::ChannelOpenOk(_) => {}
            other => bail!("expected channel.open-ok, got {}", other.name()),
        }
        Ok(client)
    }

    /// Sends a setup method on the channel and returns the broker's reply.
    pub async fn call(&mut self, method: Method) -> anyhow::Result<Method> {
        let name = method.name();
        tokio::time::timeout(SETUP_TIMEOUT, self.call_on(CHANNEL, &method))
            .await
            .with_context(|| format!("no reply to {name} within {SETUP_TIMEOUT:?}"))?
    }

    async fn call_on(&mut self, channel: u16, method: &Method) -> anyhow::Result<Method> {
        self.send_method(channel, method);
        self.flush().await?;
        self.next_method().await
    }

    /// The next method frame, for the handshake and setup, when nothing else is expected.
    async fn next_method(&mut self) -> anyhow::Result<Method> {
        loop {
            while let Some(frame) = self.next_frame()? {
                match frame {
                    Frame::Method { channel, method } => {
                        self.check_close(channel, &method)?;
                        return Ok(method);
                    }
                    Frame::Heartbeat { .. } => {}
                    other => bail!("unexpected {other:?} during setup"),
                }
            }
            self.read_more().await?;
        }
    }

    /// Answers a close from the broker and turns it into an error.
    fn check_close(&mut self, channel: u16, method: &Method) -> anyhow::Result<()> {
        let (code, text, class_id, method_id, what) = match method {
            Method::ChannelClose(c) => {
                self.send_method(channel, &Method::ChannelCloseOk(ChannelCloseOk {}));
                (
                    c.reply_code,
                    &c.reply_text,
                    c.class_id,
                    c.method_id,
                    "channel",
                )
            }
            Method::ConnectionClose(c) => {
                self.send_method(0, &Method::ConnectionCloseOk(ConnectionCloseOk {}));
                (
                    c.reply_code,
                    &c.reply_text,
                    c.class_id,
                    c.method_id,
                    "connection",
                )
            }
            _ => return Ok(()),
        };
        let name = Method::name_of(class_id, method_id).unwrap_or("-");
        bail!(
            "the broker closed the {what}: {code} {} (on {name})",
            text.as_str()
        )
    }

    fn send_method(&mut self, channel: u16, method: &Method) {
        encode_method(channel, method, &mut self.write);
    }

    /// Queues a method on the channel, written by the next [`Client::flush`].
    pub fn send(&mut self, method: &Method) {
        self.send_method(CHANNEL, method);
    }

    /// Queues a publish (method, content header, body frames).
    pub fn publish(&mut self, publish: &Method, properties: &[u8], body: &[u8]) {
        self.send_method(CHANNEL, publish);
        encode_content_header(CHANNEL, 60, body.len() as u64, properties, &mut self.write);
        encode_body(CHANNEL, body, self.frame_max, &mut self.write);
    }

    /// Queues an ack of a delivery.
    pub fn ack(&mut self, tag: u64, multiple: bool) {
        self.send(&Method::BasicAck(BasicAck {
            delivery_tag: tag,
            multiple,
        }));
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.write.len()
    }

    /// Writes everything queued, in one call when the socket takes it.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
            self.write.clear();
        }
        Ok(())
    }

    /// Reads what the socket has (waiting for at least one byte). Cancel-safe: dropped before
    /// it completes, it has read nothing.
    pub async fn read_more(&mut self) -> anyhow::Result<()> {
        if self.read.capacity() - self.read.len() < 64 * 1024 {
            self.read.reserve(256 * 1024);
        }
        match self.stream.read_buf(&mut self.read).await? {
            0 => bail!("the broker closed the connection"),
            _ => Ok(()),
        }
    }

    fn next_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        decode_frame(&mut self.read, self.frame_max)
            .map_err(|e| anyhow::anyhow!("bad frame from the broker: {} {}", e.reply_code, e.text))
    }

    /// The next event among the bytes already read, or `None` when more must be read.
    pub fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        while let Some(frame) = self.next_frame()? {
            match frame {
                Frame::Method { channel, method } => {
                    self.check_close(channel, &method)?;
                    match method {
                        Method::BasicAck(a) => {
                            return Ok(Some(Event::Confirm {
                                tag: a.delivery_tag,
                                multiple: a.multiple,
                                ack: true,
                            }));
                        }
                        Method::BasicNack(n) => {
                            return Ok(Some(Event::Confirm {
                                tag: n.delivery_tag,
                                multiple: n.multiple,
                                ack: false,
                            }));
                        }
                        Method::BasicDeliver(d) => {
                            self.incoming = Some(Incoming {
                                tag: d.delivery_tag,
                                size: None,
                                body: BytesMut::new(),
                            });
                        }
                        Method::BasicCancel(_) => return Ok(Some(Event::Cancelled)),
                        // Blocked/unblocked and anything else need no answer here.
                        _ => {}
                    }
                }
                Frame::Header { header, .. } => {
                    let Some(incoming) = self.incoming.as_mut() else {
                        bail!("a content header without a delivery");
                    };
                    incoming.size = Some(header.body_size);
                    if header.body_size == 0 {
                        return Ok(self.finish_delivery(Bytes::new()));
                    }
                }
                Frame::Body { payload, .. } => {
                    let Some(incoming) = self.incoming.as_mut() else {
                        bail!("a body frame without a delivery");
                    };
                    let size = incoming.size.unwrap_or(0);
                    // The usual case, a body in one frame, keeps the read buffer's bytes.
                    if incoming.body.is_empty() && payload.len() as u64 == size {
                        return Ok(self.finish_delivery(payload));
                    }
                    incoming.body.extend_from_slice(&payload);
                    if incoming.body.len() as u64 >= size {
                        let body = std::mem::take(&mut incoming.body).freeze();
                        return Ok(self.finish_delivery(body));
                    }
                }
                Frame::Heartbeat { .. } => {}
            }
        }
        Ok(None)
    }

    fn finish_delivery(&mut self, body: Bytes) -> Option<Event> {
        self.incoming
            .take()
            .map(|i| Event::Delivery { tag: i.tag, body })
    }

    /// Closes the connection politely; a broker that does not answer within a second is left.
    pub async fn close(mut self) {
        self.send_method(
            0,
            &Method::ConnectionClose(ConnectionClose {
                reply_code: 200,
                reply_text: ShortStr::try_from("bye").unwrap_or_default(),
                class_id: 0,
                method_id: 0,
            }),
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.flush().await?;
            loop {
                while let Some(frame) = self.next_frame()? {
                    if let Frame::Method {
                        method: Method::ConnectionCloseOk(_),
                        ..
                    } = frame
                    {
                        return Ok(());
                    }
                }
                self.read_more().await?;
            }
        })
        .await
        .map(|r: anyhow::Result<()>| r.ok());
    }
}

/// Content properties of the generator's messages, encoded once.
pub fn properties(persistent: bool) -> Bytes {
    let mut p = BasicProperties::default();
    if persistent {
        p.delivery_mode = Some(2);
    }
    p.encoded()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_as_rabbitmq_clients_read_them() {
        let e = Endpoint::parse("amqp://guest:guest@127.0.0.1:6001/%2f").unwrap();
        assert_eq!(
            e,
            Endpoint {
                host: "127.0.0.1".into(),
                port: 6001,
                user: "guest".into(),
                password: "guest".into(),
                vhost: "/".into(),
            }
        );
        let e = Endpoint::parse("amqp://localhost").unwrap();
        assert_eq!(
            (e.port, e.user.as_str(), e.vhost.as_str()),
            (5672, "guest", "/")
        );
        let e = Endpoint::parse("amqp://a%40b:p%3Aw@[::1]:5673/prod").unwrap();
        assert_eq!(
            (
                e.host.as_str(),
                e.port,
                e.user.as_str(),
                e.password.as_str()
            ),
            ("::1", 5673, "a@b", "p:w")
        );
        assert_eq!(e.vhost, "prod");
        assert!(Endpoint::parse("amqps://h").is_err());
        assert!(Endpoint::parse("h:5672").is_err());
        assert!(Endpoint::parse("amqp://h:notaport").is_err());
        assert!(Endpoint::parse("amqp://u:p@h/%zz").is_err());
    }

    #[test]
    fn persistent_properties_set_delivery_mode_two() {
        let p = BasicProperties::decode(&properties(true)).unwrap();
        assert!(p.is_persistent());
        let p = BasicProperties::decode(&properties(false)).unwrap();
        assert_eq!(p.delivery_mode, None);
    }
}
