//! Shared harness for the client-level integration tests.
//!
//! [`Broker`] runs the `warren` binary on loopback ports with its own data directory and
//! learns the ports and readiness from the `warren: ...` lines the binary prints on stdout.
//! [`broker`] hands a test either such a child process or, when `WARREN_TEST_EXTERNAL_AMQP`
//! names a running broker (RabbitMQ, for checking that the expectations are right), that
//! broker's URL. The rest are small helpers: bounded waits, lapin connections, unique names
//! and reading AMQP reply codes out of lapin errors. [`raw`] speaks the wire protocol by hand.

#![allow(dead_code)]

pub mod cluster;
pub mod raw;

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ErrorKind};

/// Environment variable naming an already running broker, e.g.
/// `amqp://guest:guest@127.0.0.1:5673/%2f`.
pub const EXTERNAL_ENV: &str = "WARREN_TEST_EXTERNAL_AMQP";
/// Environment variable overriding the broker binary (default: the one cargo built).
pub const BIN_ENV: &str = "WARREN_TEST_BIN";

/// Upper bound for a whole test body run through [`run`].
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for one expected event (a delivery, a reply, a frame).
pub const WAIT: Duration = Duration::from_secs(15);
/// How long the broker may take from spawn to `warren: ready`.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the broker may take to exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Journal size of the brokers the tests start: small, since each new node writes its journal
/// whole, and small enough that busy tests wrap it and checkpoint.
pub const TEST_JOURNAL_BYTES: u64 = 8 << 20;

/// Reply codes used by the tests (AMQP 0-9-1 constants).
pub mod code {
    pub const REPLY_SUCCESS: u16 = 200;
    pub const CONTENT_TOO_LARGE: u16 = 311;
    pub const NO_ROUTE: u16 = 312;
    pub const NO_CONSUMERS: u16 = 313;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const INVALID_PATH: u16 = 402;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

// ---------------------------------------------------------------------------------------------
// Running test bodies with a time limit

/// Runs an async test body on a fresh multi-threaded runtime, failing the test if it takes
/// longer than [`TEST_TIMEOUT`].
pub fn run<F: Future>(body: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build tokio runtime");
    rt.block_on(async {
        match tokio::time::timeout(TEST_TIMEOUT, body).await {
            Ok(out) => out,
            Err(_) => panic!("test body did not finish within {TEST_TIMEOUT:?}"),
        }
    })
}

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(WAIT, what, fut).await
}

/// Awaits `fut`, failing the test with `what` if it takes longer than `limit`.
pub async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Names

/// A name unique to this run, so tests sharing one external broker never collide and
/// leftovers from an earlier run are never mistaken for this run's objects.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    format!("wt-{prefix}-{}-{nanos}-{n}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// The broker under test

/// The URL of an external broker, if the tests were told to use one.
pub fn external_amqp() -> Option<String> {
    std::env::var(EXTERNAL_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// A broker for tests that only talk AMQP: the external one if configured, else a fresh
/// `warren` child process (stopped when this value is dropped).
pub struct TestBroker {
    url: String,
    owned: Option<Broker>,
}

impl TestBroker {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The broker's AMQP socket address, for raw-socket tests.
    pub fn addr(&self) -> SocketAddr {
        match &self.owned {
            Some(b) => b.amqp_addr(),
            None => addr_of_url(&self.url),
        }
    }

    /// The child process, if this test started one.
    pub fn process(&mut self) -> Option<&mut Broker> {
        self.owned.as_mut()
    }
}

/// See [`TestBroker`].
pub fn broker() -> TestBroker {
    match external_amqp() {
        Some(url) => TestBroker { url, owned: None },
        None => {
            let b = Broker::start();
            TestBroker {
                url: b.amqp_url(),
                owned: Some(b),
            }
        }
    }
}

/// A broker process for tests that kill, restart or signal it, or read its HTTP port.
/// Returns `None` (after saying so on stderr) when an external broker is configured,
/// since such tests cannot control that process.
pub fn process_broker(test: &str) -> Option<Broker> {
    if external_amqp().is_some() {
        eprintln!("skipped: {test} needs to control the broker process and {EXTERNAL_ENV} is set");
        return None;
    }
    Some(Broker::start())
}

/// Host and port out of `amqp://user:pass@host:port/vhost`.
pub fn addr_of_url(url: &str) -> SocketAddr {
    let rest = url
        .strip_prefix("amqp://")
        .unwrap_or_else(|| panic!("not an amqp:// URL: {url}"));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    };
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve {hostport}"))
}

/// Replaces the credentials of an AMQP URL.
pub fn with_credentials(url: &str, user: &str, pass: &str) -> String {
    let rest = url.strip_prefix("amqp://").expect("amqp:// URL");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    format!("amqp://{user}:{pass}@{rest}")
}

/// Adds query parameters (`frame_max=...`, `heartbeat=...`) to an AMQP URL.
pub fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

/// Output of the child kept for failure reports, bounded so a chatty broker cannot grow it
/// without limit.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
}

const CAPTURE_LIMIT: usize = 256 * 1024;

impl Captured {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > CAPTURE_LIMIT {
            let cut = self.bytes.len() - CAPTURE_LIMIT;
            self.bytes.drain(..cut);
        }
    }
}

/// What the stdout reader thread reports to the harness.
enum StdoutEvent {
    Line(String),
    Eof,
}

/// A `warren` child process. Dropping it kills the process (SIGKILL) and removes a data
/// directory the harness created.
pub struct Broker {
    bin: PathBuf,
    data_dir: PathBuf,
    extra_args: Vec<String>,
    /// Whether `--cluster-listen 127.0.0.1:0` is passed before the extra arguments (single
    /// nodes); cluster members pass their own, chosen up front.
    default_cluster_listen: bool,
    _temp: Option<tempfile::TempDir>,
    child: Option<Child>,
    amqp: Option<SocketAddr>,
    http: Option<SocketAddr>,
    cluster: Option<SocketAddr>,
    stderr: Arc<Mutex<Captured>>,
    stdout_log: Arc<Mutex<Captured>>,
    stdout_rx: Option<Receiver<StdoutEvent>>,
    readers: Vec<thread::JoinHandle<()>>,
}

/// The binary under test.
pub fn warren_bin() -> PathBuf {
    match std::env::var_os(BIN_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_warren")),
    }
}

impl Broker {
    /// Starts a broker on a fresh temporary data directory and waits until it is ready.
    pub fn start() -> Broker {
        Self::start_with_args(&[])
    }

    /// Like [`Broker::start`] with extra command-line arguments (e.g. `--config FILE`).
    pub fn start_with_args(extra: &[&str]) -> Broker {
        let temp = tempfile::Builder::new()
            .prefix("warren-test-")
            .tempdir()
            .expect("create temp data dir");
        let dir = temp.path().join("data");
        let mut b = Self::new(&dir, extra);
        b._temp = Some(temp);
        b.spawn();
        b
    }

    /// Starts a broker on an existing (or to be created) data directory, which the harness
    /// does not delete.
    pub fn start_in(dir: &Path) -> Broker {
        let mut b = Self::new(dir, &[]);
        b.spawn();
        b
    }

    /// Launches a broker on `dir` with `--data-dir`, port-0 AMQP and HTTP listeners and
    /// exactly `args` besides (no default `--cluster-listen`: a cluster member passes its
    /// own), without waiting for readiness: members of a cluster only become ready together,
    /// so all are launched before any is awaited with [`Broker::await_ready`].
    pub fn launch_in(dir: &Path, args: &[String]) -> Broker {
        let mut b = Self::new(dir, &[]);
        b.extra_args = args.to_vec();
        b.default_cluster_listen = false;
        b.launch();
        b
    }

    fn new(dir: &Path, extra: &[&str]) -> Broker {
        Broker {
            bin: warren_bin(),
            data_dir: dir.to_path_buf(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            default_cluster_listen: true,
            _temp: None,
            child: None,
            amqp: None,
            http: None,
            cluster: None,
            stderr: Arc::new(Mutex::new(Captured::default())),
            stdout_log: Arc::new(Mutex::new(Captured::default())),
            stdout_rx: None,
            readers: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker is running").id()
    }

    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp.expect("broker printed no amqp listener")
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp_addr())
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http.expect("broker printed no http listener")
    }

    /// The node-to-node listener the broker printed (`warren: listening cluster ADDR`).
    pub fn cluster_addr(&self) -> SocketAddr {
        self.cluster.expect("broker printed no cluster listener")
    }

    /// The broker's stderr so far (its logs), for failure messages.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap().bytes).into_owned()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout_log.lock().unwrap().bytes).into_owned()
    }

    fn spawn(&mut self) {
        self.launch();
        self.wait_ready();
    }

    /// Starts the process and its output readers; readiness is awaited separately.
    fn launch(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        std::fs::create_dir_all(&self.data_dir).expect("create data dir");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--data-dir").arg(&self.data_dir).args([
            "--amqp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]);
        if self.default_cluster_listen {
            cmd.args(["--cluster-listen", "127.0.0.1:0"]);
        }
        // Every new node writes its journal whole; the tests start hundreds. A test's own
        // `--journal-bytes` beats this.
        cmd.env("WARREN_JOURNAL_BYTES", TEST_JOURNAL_BYTES.to_string());
        cmd.args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Settings from the caller's environment must not leak into the broker under test.
        for var in [
            "WARREN_DATA_DIR",
            "WARREN_AMQP_LISTEN",
            "WARREN_HTTP_LISTEN",
            "WARREN_CONFIG",
            "WARREN_NODE_ID",
            "WARREN_CLUSTER_LISTEN",
            "WARREN_MEMBERS",
            "WARREN_ADVERTISE",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));

        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        // Output of earlier runs on this data directory stays in the logs, marked off.
        if !self.stdout_log.lock().unwrap().bytes.is_empty() {
            let mark = b"\n--- warren restarted ---\n";
            self.stderr.lock().unwrap().push(mark);
            self.stdout_log.lock().unwrap().push(mark);
        }
        let log = Arc::clone(&self.stdout_log);
        self.readers
            .push(thread::spawn(move || read_stdout(stdout, tx, log)));
        let err_log = Arc::clone(&self.stderr);
        self.readers.push(thread::spawn(move || {
            let mut stderr = stderr;
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                err_log.lock().unwrap().push(&buf[..n]);
            }
        }));
        self.child = Some(child);
        self.amqp = None;
        self.http = None;
        self.cluster = None;
        self.stdout_rx = Some(rx);
    }

    /// Reads the contract lines until `warren: ready`, within [`STARTUP_TIMEOUT`].
    fn wait_ready(&mut self) {
        if let Err(why) = self.read_until_ready() {
            self.fail(&why);
        }
    }

    /// Waits for `warren: ready` of a process started with [`Broker::launch_in`] or
    /// [`Broker::relaunch`], within [`STARTUP_TIMEOUT`]; fails the test otherwise.
    pub fn await_ready(&mut self) {
        self.wait_ready();
    }

    /// Like [`Broker::await_ready`], but a broker that exits or stays unready is killed and
    /// reported as an error (with its output) instead of failing the test, so the caller
    /// can retry, e.g. after a port it chose was taken in the meantime.
    pub fn try_await_ready(&mut self) -> Result<(), String> {
        self.read_until_ready().map_err(|why| {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            self.join_readers();
            format!(
                "{why}\n--- broker stdout ---\n{}\n--- broker stderr ---\n{}",
                self.stdout_text(),
                self.stderr_text()
            )
        })
    }

    fn read_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let rx = self.stdout_rx.take().expect("stdout receiver");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(StdoutEvent::Line(line)) => {
                    let line = line.trim();
                    if let Some(addr) = line.strip_prefix("warren: listening amqp ") {
                        // The first AMQP listener is the one tests use.
                        if self.amqp.is_none() {
                            self.amqp = Some(parse_addr(addr));
                        }
                    } else if let Some(addr) = line.strip_prefix("warren: listening http ") {
                        self.http = Some(parse_addr(addr));
                    } else if let Some(addr) = line.strip_prefix("warren: listening cluster ") {
                        self.cluster = Some(parse_addr(addr));
                    } else if line == "warren: ready" {
                        break;
                    }
                }
                Ok(StdoutEvent::Eof) | Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(Duration::from_secs(5));
                    return Err(format!(
                        "broker closed stdout before `warren: ready` (exit status {status:?})"
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "broker did not print `warren: ready` within {STARTUP_TIMEOUT:?}"
                    ));
                }
            }
        }
        self.stdout_rx = Some(rx);
        if self.amqp.is_none() {
            return Err(
                "broker became ready without printing `warren: listening amqp ADDR`".to_owned(),
            );
        }
        Ok(())
    }

    fn fail(&mut self, why: &str) -> ! {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        panic!(
            "{why}\n--- broker stdout ---\n{}\n--- broker stderr ---\n{}",
            self.stdout_text(),
            self.stderr_text()
        );
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                _ => return None,
            }
        }
    }

    fn join_readers(&mut self) {
        // The child is gone, so its pipes hit EOF and the readers end promptly.
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
        self.stdout_rx = None;
    }

    /// Kills the process with SIGKILL and waits for it; the data directory stays.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.join_readers();
    }

    /// Starts the broker again on the same data directory (ports may change) and waits
    /// until it is ready. Kills the running process first if there is one.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the broker again on the same data directory and arguments without waiting for
    /// readiness (see [`Broker::await_ready`]). Kills the running process first if there is
    /// one.
    pub fn relaunch(&mut self) {
        self.kill9();
        self.launch();
    }

    /// Sends a signal to the process by its id.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed: {status}");
    }

    /// Sends SIGTERM and waits (up to [`SHUTDOWN_TIMEOUT`]) for the process to exit.
    pub fn sigterm(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_for_exit()
    }

    /// Waits for the process to exit on its own (after a signal), within
    /// [`SHUTDOWN_TIMEOUT`]; fails the test if it does not.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        match self.wait_exit(SHUTDOWN_TIMEOUT) {
            Some(status) => {
                self.child = None;
                self.join_readers();
                status
            }
            None => self.fail(&format!("broker did not exit within {SHUTDOWN_TIMEOUT:?}")),
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.join_readers();
        if thread::panicking() {
            eprintln!(
                "--- broker stderr ({}) ---\n{}",
                self.data_dir.display(),
                self.stderr_text()
            );
        }
    }
}

fn parse_addr(s: &str) -> SocketAddr {
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("broker printed a bad address {s:?}: {e}"))
}

fn read_stdout(stdout: ChildStdout, tx: mpsc::Sender<StdoutEvent>, log: Arc<Mutex<Captured>>) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                log.lock().unwrap().push(&line);
                let text = String::from_utf8_lossy(&line).into_owned();
                // Nobody listens after readiness; later lines are only kept in the log.
                let _ = tx.send(StdoutEvent::Line(text));
            }
        }
    }
    let _ = tx.send(StdoutEvent::Eof);
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// A minimal HTTP/1.1 GET against loopback: returns status code, headers and body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http_request(addr, "GET", path, None, None)
}

/// One HTTP/1.1 request with optional basic credentials and JSON body; returns status,
/// head and body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    basic: Option<(&str, &str)>,
    json: Option<&str>,
) -> (u16, String, String) {
    http_request_with_headers(addr, method, path, basic, json, &[])
}

/// `http_request` with extra request headers.
pub fn http_request_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    basic: Option<(&str, &str)>,
    json: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    use base64::Engine;
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect http");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n");
    if let Some((user, pass)) = basic {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        head.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = json.unwrap_or("");
    if json.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    write!(s, "{head}\r\n{body}").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read http response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("malformed status line: {head:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, head.to_owned(), body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    for _ in 0..100_000 {
        let Some((size, rest)) = body.split_once("\r\n") else {
            break;
        };
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// lapin helpers

/// Opens a connection, failing the test on error or after [`WAIT`].
pub async fn connect(url: &str) -> Connection {
    within(
        "connection.open",
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

pub async fn channel(conn: &Connection) -> Channel {
    within("channel.open", conn.create_channel())
        .await
        .expect("channel.open")
}

/// Connection plus one channel.
pub async fn open(url: &str) -> (Connection, Channel) {
    let conn = connect(url).await;
    let ch = channel(&conn).await;
    (conn, ch)
}

/// The AMQP reply code carried by a lapin error, if it is a protocol error.
pub fn reply_code(err: &lapin::Error) -> Option<u16> {
    match err.kind() {
        ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// Asserts that `res` failed with reply code `expected`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(res: lapin::Result<T>, expected: u16) {
    match res {
        Ok(v) => panic!("expected reply code {expected}, got success: {v:?}"),
        Err(e) => assert_eq!(
            reply_code(&e),
            Some(expected),
            "expected reply code {expected}, got error: {e}"
        ),
    }
}

/// Reads the reply code of a server-initiated channel.close (or connection.close) caused
/// by a method without a reply of its own (basic.publish, basic.ack, ...). lapin hands such
/// an error to the channel's consumers, so the probe keeps one: a no-ack consumer on a
/// server-named exclusive queue declared on the channel. Arm it before the offending method;
/// unlike probing with a later synchronous method, this cannot race the close.
pub struct CloseProbe {
    ch: Channel,
    consumer: Consumer,
}

impl CloseProbe {
    pub async fn arm(ch: &Channel) -> CloseProbe {
        let q = within(
            "queue.declare for the close probe",
            ch.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("queue.declare for the close probe");
        let consumer = within(
            "basic.consume for the close probe",
            ch.basic_consume(
                q.name().clone(),
                "close-probe".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("basic.consume for the close probe");
        CloseProbe {
            ch: ch.clone(),
            consumer,
        }
    }

    /// Asserts that the server closed the channel (or the connection) with `expected`.
    pub async fn assert_closed_with(mut self, expected: u16) {
        match within("the server to close the channel", self.consumer.next()).await {
            Some(Err(e)) => assert_eq!(
                reply_code(&e),
                Some(expected),
                "expected reply code {expected}, got error: {e}"
            ),
            Some(Ok(d)) => panic!("close probe got a delivery: {:?}", d.data),
            None => panic!("channel ended without an error (expected reply code {expected})"),
        }
        assert!(
            !self.ch.status().connected(),
            "channel {} should be closed after reply code {expected}",
            self.ch.id()
        );
    }
}

/// Declares a fresh, non-exclusive, transient queue with a unique name and returns it.
pub async fn temp_queue(ch: &Channel, prefix: &str) -> String {
    let name = unique(prefix);
    within(
        "queue.declare",
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.declare");
    name
}

/// Deletes a queue on a channel of its own, ignoring failures (clean-up only).
pub async fn delete_queue(conn: &Connection, name: &str) {
    if let Ok(ch) = conn.create_channel().await {
        let _ = tokio::time::timeout(
            WAIT,
            ch.queue_delete(name.into(), QueueDeleteOptions::default()),
        )
        .await;
        let _ = tokio::time::timeout(WAIT, ch.close(200, "bye".into())).await;
    }
}

/// Number of ready messages in a queue (declare-ok's message-count of a passive declare).
pub async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    within(
        "passive queue.declare",
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("passive queue.declare")
    .message_count()
}

/// Waits until a queue holds exactly `n` ready messages.
pub async fn wait_ready_count(ch: &Channel, queue: &str, n: u32) {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = ready_count(ch, queue).await;
        if last == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} holds {last} ready messages, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Next delivery from a consumer, failing after [`WAIT`].
pub async fn next_delivery(consumer: &mut Consumer) -> Delivery {
    match within("a delivery", consumer.next()).await {
        Some(Ok(d)) => d,
        Some(Err(e)) => panic!("consumer failed: {e}"),
        None => panic!("consumer ended while a delivery was expected"),
    }
}

/// Asserts that no delivery arrives during `window` (a negative check, not a wait for an
/// event: the window only bounds how long we look).
pub async fn assert_no_delivery(consumer: &mut Consumer, window: Duration) {
    if let Ok(item) = tokio::time::timeout(window, consumer.next()).await {
        match item {
            Some(Ok(d)) => panic!(
                "unexpected delivery {:?} (tag {})",
                String::from_utf8_lossy(&d.data),
                d.delivery_tag
            ),
            Some(Err(e)) => panic!("consumer failed: {e}"),
            None => panic!("consumer ended unexpectedly"),
        }
    }
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("condition not met within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Publishes one message and waits for the broker's confirm (the channel is put in confirm
/// mode first if it is not already); panics on a nack.
pub async fn publish_confirmed(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    if !ch.status().confirm() {
        within(
            "confirm.select",
            ch.confirm_select(lapin::options::ConfirmSelectOptions::default()),
        )
        .await
        .expect("confirm.select");
    }
    let confirm = within(
        "basic.publish",
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        ),
    )
    .await
    .expect("basic.publish");
    let confirmation = within("the publish confirm", confirm)
        .await
        .expect("the publish confirm");
    assert!(confirmation.is_ack(), "publish to '{exchange}' was nacked");
}

/// The body of the next message of a queue by basic.get (acknowledged), or None when the
/// queue is empty.
pub async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    within(
        "basic.get",
        ch.basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        ),
    )
    .await
    .expect("basic.get")
    .map(|m| m.delivery.data)
}
