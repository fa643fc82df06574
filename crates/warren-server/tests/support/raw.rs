//! A hand-rolled AMQP 0-9-1 client over a plain `std::net::TcpStream`, for tests that
//! must send what no real client library would: malformed frames, wrong headers, methods
//! on unopened channels. It encodes and decodes just enough of the protocol (frames, the
//! handshake, a few methods and field tables) for those tests; every read has a deadline.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::WAIT;

pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
pub const FRAME_END: u8 = 0xCE;

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;

/// (class-id, method-id) pairs used here.
pub mod method {
    pub const CONNECTION_START: (u16, u16) = (10, 10);
    pub const CONNECTION_START_OK: (u16, u16) = (10, 11);
    pub const CONNECTION_TUNE: (u16, u16) = (10, 30);
    pub const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
    pub const CONNECTION_OPEN: (u16, u16) = (10, 40);
    pub const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
    pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
    pub const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
    pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
    pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
    pub const CHANNEL_CLOSE: (u16, u16) = (20, 40);
    pub const CHANNEL_CLOSE_OK: (u16, u16) = (20, 41);
    pub const QUEUE_DECLARE: (u16, u16) = (50, 10);
    pub const QUEUE_DECLARE_OK: (u16, u16) = (50, 11);
    pub const QUEUE_DELETE: (u16, u16) = (50, 40);
    pub const QUEUE_DELETE_OK: (u16, u16) = (50, 41);
    pub const BASIC_CONSUME: (u16, u16) = (60, 20);
    pub const BASIC_PUBLISH: (u16, u16) = (60, 40);
    pub const BASIC_RETURN: (u16, u16) = (60, 50);
    pub const BASIC_DELIVER: (u16, u16) = (60, 60);
    pub const BASIC_GET: (u16, u16) = (60, 70);
    pub const BASIC_GET_OK: (u16, u16) = (60, 71);
    pub const BASIC_GET_EMPTY: (u16, u16) = (60, 72);
    pub const BASIC_ACK: (u16, u16) = (60, 80);
    pub const BASIC_NACK: (u16, u16) = (60, 120);
    pub const CONFIRM_SELECT: (u16, u16) = (85, 10);
    pub const CONFIRM_SELECT_OK: (u16, u16) = (85, 11);
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Builds method arguments in wire order. Consecutive bits are packed into one octet, as
/// the protocol requires; call [`Args::bits`] with all adjacent bits at once.
#[derive(Default)]
pub struct Args(pub Vec<u8>);

impl Args {
    pub fn new() -> Self {
        Args(Vec::new())
    }
    pub fn octet(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn short(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn long(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn longlong(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn shortstr(mut self, s: &str) -> Self {
        assert!(s.len() < 256, "short string too long");
        self.0.push(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    pub fn longstr(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }
    pub fn bits(mut self, bits: &[bool]) -> Self {
        let mut octet = 0u8;
        for (i, b) in bits.iter().enumerate() {
            assert!(i < 8, "more than 8 bits in one octet");
            if *b {
                octet |= 1 << i;
            }
        }
        self.0.push(octet);
        self
    }
    pub fn empty_table(self) -> Self {
        self.long(0)
    }
    /// A field table of booleans and nested tables, enough for client properties.
    pub fn table(mut self, entries: &[(&str, Field)]) -> Self {
        let body = encode_table(entries);
        self.0.extend_from_slice(&(body.len() as u32).to_be_bytes());
        self.0.extend_from_slice(&body);
        self
    }
}

/// A field-table value to send.
pub enum Field<'a> {
    Bool(bool),
    Str(&'a str),
    Table(Vec<(&'a str, Field<'a>)>),
}

fn encode_table(entries: &[(&str, Field)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in entries {
        out.push(key.len() as u8);
        out.extend_from_slice(key.as_bytes());
        match value {
            Field::Bool(b) => {
                out.push(b't');
                out.push(u8::from(*b));
            }
            Field::Str(s) => {
                out.push(b'S');
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Field::Table(t) => {
                let inner = encode_table(t);
                out.push(b'F');
                out.extend_from_slice(&(inner.len() as u32).to_be_bytes());
                out.extend_from_slice(&inner);
            }
        }
    }
    out
}

/// A method frame payload: class id, method id, arguments.
pub fn method_payload(m: (u16, u16), args: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + args.len());
    p.extend_from_slice(&m.0.to_be_bytes());
    p.extend_from_slice(&m.1.to_be_bytes());
    p.extend_from_slice(args);
    p
}

/// A whole frame: type, channel, size, payload, frame-end.
pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 8);
    f.push(kind);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    f
}

/// A content header payload for class basic with no properties.
pub fn content_header(body_size: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&60u16.to_be_bytes()); // class basic
    p.extend_from_slice(&0u16.to_be_bytes()); // weight
    p.extend_from_slice(&body_size.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes()); // property flags: none
    p
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// Reads method arguments in wire order.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(self.buf.len() >= n, "argument list too short");
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        head
    }
    pub fn octet(&mut self) -> u8 {
        self.take(1)[0]
    }
    pub fn short(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    pub fn long(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    pub fn longlong(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().unwrap())
    }
    pub fn shortstr(&mut self) -> String {
        let n = self.octet() as usize;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
    pub fn longstr(&mut self) -> Vec<u8> {
        let n = self.long() as usize;
        self.take(n).to_vec()
    }
    pub fn table(&mut self) -> BTreeMap<String, Value> {
        let n = self.long() as usize;
        let mut inner = Reader::new(self.take(n));
        let mut out = BTreeMap::new();
        while !inner.buf.is_empty() {
            let key = inner.shortstr();
            let value = inner.value();
            out.insert(key, value);
        }
        out
    }
    fn value(&mut self) -> Value {
        match self.octet() {
            b't' => Value::Bool(self.octet() != 0),
            b'b' | b'B' => Value::Int(i64::from(self.octet())),
            b's' | b'u' => Value::Int(i64::from(self.short())),
            b'I' | b'i' => Value::Int(i64::from(self.long())),
            b'l' | b'L' | b'T' => Value::Int(self.longlong() as i64),
            b'f' => Value::Other(self.take(4).to_vec()),
            b'd' => Value::Other(self.take(8).to_vec()),
            b'D' => Value::Other(self.take(5).to_vec()),
            b'S' | b'x' => Value::Str(self.longstr()),
            b'F' => Value::Table(self.table()),
            b'A' => {
                let n = self.long() as usize;
                Value::Other(self.take(n).to_vec())
            }
            b'V' => Value::Other(Vec::new()),
            t => panic!("unknown field type {:?}", t as char),
        }
    }
}

/// A decoded field-table value (only as detailed as the tests need).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Str(Vec<u8>),
    Table(BTreeMap<String, Value>),
    Other(Vec<u8>),
}

/// One frame as read from the socket.
#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    /// (class-id, method-id) of a method frame.
    pub fn method(&self) -> Option<(u16, u16)> {
        (self.kind == FRAME_METHOD && self.payload.len() >= 4).then(|| {
            (
                u16::from_be_bytes([self.payload[0], self.payload[1]]),
                u16::from_be_bytes([self.payload[2], self.payload[3]]),
            )
        })
    }
    pub fn is(&self, m: (u16, u16)) -> bool {
        self.method() == Some(m)
    }
    /// Arguments of a method frame.
    pub fn args(&self) -> Reader<'_> {
        assert_eq!(self.kind, FRAME_METHOD, "not a method frame: {self:?}");
        Reader::new(&self.payload[4..])
    }
}

/// A connection.close or channel.close received from the server.
#[derive(Clone, Debug, PartialEq)]
pub struct Close {
    /// True for connection.close (channel 0), false for channel.close.
    pub connection: bool,
    pub channel: u16,
    pub reply_code: u16,
    pub reply_text: String,
    pub class_id: u16,
    pub method_id: u16,
}

/// Values the server proposed in connection.tune.
#[derive(Clone, Copy, Debug)]
pub struct Tune {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

/// What the server sent in connection.start.
#[derive(Clone, Debug)]
pub struct Start {
    pub version_major: u8,
    pub version_minor: u8,
    pub server_properties: BTreeMap<String, Value>,
    pub mechanisms: String,
    pub locales: String,
}

/// A raw connection. All reads give up after the deadline set by [`RawConn::set_deadline`]
/// (by default [`WAIT`] from each call).
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub start: Option<Start>,
    pub tune: Option<Tune>,
    /// frame-max in force after tune-ok.
    pub frame_max: u32,
}

impl RawConn {
    /// Opens a TCP connection and sends nothing.
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect_timeout(&addr, WAIT)
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_nodelay(true).ok();
        stream.set_write_timeout(Some(WAIT)).unwrap();
        RawConn {
            stream,
            buf: Vec::new(),
            start: None,
            tune: None,
            frame_max: 0,
        }
    }

    /// Connects and completes the handshake as guest/guest on vhost `/`, accepting the
    /// server's tune values (heartbeats off).
    pub fn open(addr: SocketAddr) -> RawConn {
        Self::open_with(addr, "guest", "guest", |t| Tune { heartbeat: 0, ..t })
    }

    /// Connects and completes the handshake; `tune_ok` picks the values sent in tune-ok
    /// from the ones the server proposed.
    pub fn open_with(
        addr: SocketAddr,
        user: &str,
        pass: &str,
        tune_ok: impl FnOnce(Tune) -> Tune,
    ) -> RawConn {
        let mut c = Self::connect(addr);
        c.send(PROTOCOL_HEADER);
        c.read_start();
        c.send_start_ok(user, pass);
        let proposed = c.read_tune();
        c.finish_handshake(tune_ok(proposed));
        c
    }

    /// After connection.tune: sends tune-ok with `t`, connection.open for vhost `/`, and
    /// waits for open-ok.
    pub fn finish_handshake(&mut self, t: Tune) {
        self.send_method(
            0,
            method::CONNECTION_TUNE_OK,
            Args::new()
                .short(t.channel_max)
                .long(t.frame_max)
                .short(t.heartbeat),
        );
        self.frame_max = t.frame_max;
        self.send_method(
            0,
            method::CONNECTION_OPEN,
            Args::new().shortstr("/").shortstr("").bits(&[false]),
        );
        let f = self.expect_frame("connection.open-ok");
        assert!(
            f.is(method::CONNECTION_OPEN_OK),
            "expected connection.open-ok, got {}",
            describe(&f)
        );
    }

    /// Reads connection.start (after the protocol header was sent).
    pub fn read_start(&mut self) -> Start {
        let f = self.expect_frame("connection.start");
        assert!(
            f.is(method::CONNECTION_START) && f.channel == 0,
            "expected connection.start, got {}",
            describe(&f)
        );
        let mut a = f.args();
        let start = Start {
            version_major: a.octet(),
            version_minor: a.octet(),
            server_properties: a.table(),
            mechanisms: String::from_utf8_lossy(&a.longstr()).into_owned(),
            locales: String::from_utf8_lossy(&a.longstr()).into_owned(),
        };
        self.start = Some(start.clone());
        start
    }

    /// Sends start-ok with PLAIN credentials, announcing the capabilities real clients do
    /// (so a failed login is reported with connection.close rather than a bare disconnect).
    pub fn send_start_ok(&mut self, user: &str, pass: &str) {
        self.send_start_ok_with(user, pass, true);
    }

    /// Sends start-ok with PLAIN credentials; `auth_failure_close` sets the
    /// `authentication_failure_close` client capability.
    pub fn send_start_ok_with(&mut self, user: &str, pass: &str, auth_failure_close: bool) {
        let response = format!("\0{user}\0{pass}");
        self.send_start_ok_raw("PLAIN", response.as_bytes(), auth_failure_close);
    }

    /// Sends start-ok with AMQPLAIN credentials (py-amqp's, and so Celery's, default): the
    /// response is a field table's body, without its length, holding LOGIN and PASSWORD.
    pub fn send_start_ok_amqplain(&mut self, user: &str, pass: &str) {
        let table = encode_table(&[("LOGIN", Field::Str(user)), ("PASSWORD", Field::Str(pass))]);
        self.send_start_ok_raw("AMQPLAIN", &table, true);
    }

    /// Sends start-ok with any mechanism and response.
    pub fn send_start_ok_raw(
        &mut self,
        mechanism: &str,
        response: &[u8],
        auth_failure_close: bool,
    ) {
        let capabilities = vec![
            (
                "authentication_failure_close",
                Field::Bool(auth_failure_close),
            ),
            ("consumer_cancel_notify", Field::Bool(true)),
            ("publisher_confirms", Field::Bool(true)),
            ("basic.nack", Field::Bool(true)),
        ];
        self.send_method(
            0,
            method::CONNECTION_START_OK,
            Args::new()
                .table(&[
                    ("product", Field::Str("warren raw test client")),
                    ("capabilities", Field::Table(capabilities)),
                ])
                .shortstr(mechanism)
                .longstr(response)
                .shortstr("en_US"),
        );
    }

    /// Reads connection.tune.
    pub fn read_tune(&mut self) -> Tune {
        let f = self.expect_frame("connection.tune");
        assert!(
            f.is(method::CONNECTION_TUNE),
            "expected connection.tune, got {}",
            describe(&f)
        );
        let mut a = f.args();
        let t = Tune {
            channel_max: a.short(),
            frame_max: a.long(),
            heartbeat: a.short(),
        };
        self.tune = Some(t);
        t
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to broker");
    }

    /// Like [`RawConn::send`] but tolerates the server having closed the socket already.
    pub fn send_lenient(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    pub fn send_frame(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        self.send(&frame(kind, channel, payload));
    }

    pub fn send_method(&mut self, channel: u16, m: (u16, u16), args: Args) {
        self.send_frame(FRAME_METHOD, channel, &method_payload(m, &args.0));
    }

    /// Opens a channel and waits for open-ok.
    pub fn open_channel(&mut self, channel: u16) {
        self.send_method(channel, method::CHANNEL_OPEN, Args::new().shortstr(""));
        let f = self.expect_method("channel.open-ok");
        assert!(
            f.is(method::CHANNEL_OPEN_OK) && f.channel == channel,
            "expected channel.open-ok on {channel}, got {}",
            describe(&f)
        );
    }

    /// Declares a queue (non-passive, non-durable, non-exclusive) and waits for declare-ok.
    pub fn declare_queue(&mut self, channel: u16, name: &str) {
        self.send_method(
            channel,
            method::QUEUE_DECLARE,
            Args::new()
                .short(0)
                .shortstr(name)
                .bits(&[false, false, false, false, false])
                .empty_table(),
        );
        let f = self.expect_method("queue.declare-ok");
        assert!(
            f.is(method::QUEUE_DECLARE_OK),
            "expected queue.declare-ok, got {}",
            describe(&f)
        );
    }

    /// Puts the channel in confirm mode and waits for select-ok.
    pub fn confirm_select(&mut self, channel: u16) {
        self.send_method(channel, method::CONFIRM_SELECT, Args::new().bits(&[false]));
        let f = self.expect_method("confirm.select-ok");
        assert!(
            f.is(method::CONFIRM_SELECT_OK),
            "expected confirm.select-ok, got {}",
            describe(&f)
        );
    }

    /// Publishes a message: method, content header and body frames split to frame-max.
    pub fn publish(&mut self, channel: u16, exchange: &str, routing_key: &str, body: &[u8]) {
        let mut out = frame(
            FRAME_METHOD,
            channel,
            &method_payload(
                method::BASIC_PUBLISH,
                &Args::new()
                    .short(0)
                    .shortstr(exchange)
                    .shortstr(routing_key)
                    .bits(&[false, false])
                    .0,
            ),
        );
        out.extend(frame(
            FRAME_HEADER,
            channel,
            &content_header(body.len() as u64),
        ));
        let max = if self.frame_max == 0 {
            131_072
        } else {
            self.frame_max as usize
        } - 8;
        for chunk in body.chunks(max) {
            out.extend(frame(FRAME_BODY, channel, chunk));
        }
        self.send(&out);
    }

    /// Reads one frame, or `None` if the server closed the connection. Panics on a read
    /// timeout or a malformed frame.
    pub fn read_frame(&mut self) -> Option<Frame> {
        self.read_frame_within(WAIT)
    }

    pub fn read_frame_within(&mut self, limit: Duration) -> Option<Frame> {
        match self.poll_frame(limit) {
            Next::Frame(f) => Some(f),
            Next::Eof => None,
            Next::Timeout => panic!("no frame from the server within {limit:?}"),
        }
    }

    /// Reads one frame if one arrives within `limit`.
    pub fn poll_frame(&mut self, limit: Duration) -> Next {
        let deadline = Instant::now() + limit;
        loop {
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= size + 8 {
                    let end = self.buf[7 + size];
                    assert_eq!(end, FRAME_END, "server sent a bad frame-end octet");
                    let f = Frame {
                        kind: self.buf[0],
                        channel: u16::from_be_bytes([self.buf[1], self.buf[2]]),
                        payload: self.buf[7..7 + size].to_vec(),
                    };
                    self.buf.drain(..size + 8);
                    return Next::Frame(f);
                }
            }
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => {
                    assert!(
                        self.buf.is_empty(),
                        "server closed the connection mid-frame; {} bytes left: {:?}",
                        self.buf.len(),
                        self.buf
                    );
                    return Next::Eof;
                }
                Fill::Timeout => return Next::Timeout,
            }
        }
    }

    /// Reads a frame, failing the test on EOF.
    pub fn expect_frame(&mut self, what: &str) -> Frame {
        self.read_frame()
            .unwrap_or_else(|| panic!("server closed the connection while waiting for {what}"))
    }

    /// Reads frames until a method frame (skipping heartbeats), failing on EOF.
    pub fn expect_method(&mut self, what: &str) -> Frame {
        for _ in 0..10_000 {
            let f = self.expect_frame(what);
            if f.kind != FRAME_HEARTBEAT {
                return f;
            }
        }
        panic!("only heartbeats while waiting for {what}");
    }

    /// Reads frames until connection.close or channel.close arrives and returns it; other
    /// frames (heartbeats, deliveries, acks) are skipped. Fails on EOF or timeout.
    pub fn expect_close(&mut self) -> Close {
        for _ in 0..100_000 {
            let f = self.expect_frame("connection.close or channel.close");
            if f.is(method::CONNECTION_CLOSE) || f.is(method::CHANNEL_CLOSE) {
                let mut a = f.args();
                return Close {
                    connection: f.is(method::CONNECTION_CLOSE),
                    channel: f.channel,
                    reply_code: a.short(),
                    reply_text: a.shortstr(),
                    class_id: a.short(),
                    method_id: a.short(),
                };
            }
        }
        panic!("too many frames without a close");
    }

    /// Expects connection.close with `code`, answers close-ok and checks that the server
    /// then closes the socket.
    pub fn expect_connection_close(&mut self, code: u16) -> Close {
        let close = self.expect_close();
        assert!(
            close.connection,
            "expected connection.close {code}, got channel.close: {close:?}"
        );
        assert_eq!(close.reply_code, code, "connection.close: {close:?}");
        self.send_lenient(&frame(
            FRAME_METHOD,
            0,
            &method_payload(method::CONNECTION_CLOSE_OK, &[]),
        ));
        self.expect_eof();
        close
    }

    /// Expects the server to end the connection: either connection.close (answered with
    /// close-ok, after which the socket must close; returned) or a bare disconnect with no
    /// further frame (`None`). Channel-level frames before that fail the test.
    pub fn expect_connection_end(&mut self) -> Option<Close> {
        for _ in 0..100_000 {
            match self.poll_frame(WAIT) {
                Next::Eof => return None,
                Next::Timeout => panic!("server neither closed nor dropped the connection"),
                Next::Frame(f) if f.kind == FRAME_HEARTBEAT => {}
                Next::Frame(f) if f.is(method::CONNECTION_CLOSE) => {
                    let mut a = f.args();
                    let close = Close {
                        connection: true,
                        channel: f.channel,
                        reply_code: a.short(),
                        reply_text: a.shortstr(),
                        class_id: a.short(),
                        method_id: a.short(),
                    };
                    self.send_lenient(&frame(
                        FRAME_METHOD,
                        0,
                        &method_payload(method::CONNECTION_CLOSE_OK, &[]),
                    ));
                    self.expect_eof();
                    return Some(close);
                }
                Next::Frame(f) => panic!("expected the connection to end, got {}", describe(&f)),
            }
        }
        panic!("too many frames without the connection ending");
    }

    /// Expects channel.close with `code` on `channel` and answers close-ok.
    pub fn expect_channel_close(&mut self, channel: u16, code: u16) -> Close {
        let close = self.expect_close();
        assert!(
            !close.connection && close.channel == channel,
            "expected channel.close {code} on channel {channel}, got {close:?}"
        );
        assert_eq!(close.reply_code, code, "channel.close: {close:?}");
        self.send_method(channel, method::CHANNEL_CLOSE_OK, Args::new());
        close
    }

    /// Reads everything until the server closes the socket; fails after [`WAIT`].
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.fill(deadline) {
                Fill::Data => {}
                Fill::Eof => return std::mem::take(&mut self.buf),
                Fill::Timeout => panic!(
                    "server kept the connection open for {WAIT:?}; received so far: {:?}",
                    self.buf
                ),
            }
        }
    }

    /// Asserts that the server closes the socket (discarding anything before the EOF, such
    /// as heartbeats).
    pub fn expect_eof(&mut self) {
        self.read_to_eof();
    }

    /// Closes our sending side, then the socket.
    pub fn shutdown(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn fill(&mut self, deadline: Instant) -> Fill {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Fill::Timeout;
        }
        self.stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => Fill::Eof,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Fill::Data
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Fill::Timeout
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Fill::Data,
            // A reset after the server closed counts as the end of the stream.
            Err(_) => Fill::Eof,
        }
    }
}

/// Outcome of [`RawConn::poll_frame`].
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    Eof,
    Timeout,
}

enum Fill {
    Data,
    Eof,
    Timeout,
}

/// A readable description of a frame for assertion messages.
pub fn describe(f: &Frame) -> String {
    match f.method() {
        Some(m) if m == method::CONNECTION_CLOSE || m == method::CHANNEL_CLOSE => {
            let mut a = f.args();
            let code = a.short();
            let text = a.shortstr();
            format!(
                "{} {code} {text:?} on channel {}",
                if m.0 == 10 {
                    "connection.close"
                } else {
                    "channel.close"
                },
                f.channel
            )
        }
        Some((c, m)) => format!("method {c}.{m} on channel {}", f.channel),
        None => format!(
            "frame type {} on channel {} ({} bytes)",
            f.kind,
            f.channel,
            f.payload.len()
        ),
    }
}
