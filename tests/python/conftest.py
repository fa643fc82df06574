"""Fixtures for the pika test suite: the broker under test and connections to it.

The broker is the `warren` binary named by WARREN_BIN, started once per session on a
loopback port with a fresh data directory; the fixture learns the port and readiness from
the lines the binary prints on stdout (`warren: listening amqp ADDR`, `warren: ready`).
If WARREN_TEST_EXTERNAL_AMQP is set (e.g. amqp://guest:guest@127.0.0.1:5673/%2f), that
broker is used instead; this is how the suite is checked against RabbitMQ.
"""

import collections
import itertools
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid

import pika
import pytest

STARTUP_TIMEOUT = 30.0
SHUTDOWN_TIMEOUT = 30.0
# Upper bound for any single expected event in a test.
WAIT = 15.0


class Broker:
    """Where the broker under test listens, plus the process if this session started it."""

    def __init__(self, host, port, user="guest", password="guest", vhost="/", process=None):
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.vhost = vhost
        self.process = process
        self.stderr_tail = collections.deque(maxlen=400)
        # The amqps listener and the certificate clients trust, when this session runs one.
        self.tls_port = None
        self.tls_ca = None
        # The management HTTP API and the cluster (warrenctl) address, when known.
        self.http_port = None
        self.cluster_address = None

    def params(self, **overrides):
        kwargs = dict(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.user, self.password),
            connection_attempts=1,
            socket_timeout=WAIT,
            blocked_connection_timeout=WAIT,
        )
        kwargs.update(overrides)
        return pika.ConnectionParameters(**kwargs)


def _external(url):
    u = urllib.parse.urlparse(url)
    if u.scheme != "amqp":
        raise pytest.UsageError(f"WARREN_TEST_EXTERNAL_AMQP must be an amqp:// URL: {url}")
    vhost = urllib.parse.unquote(u.path[1:]) if len(u.path) > 1 else "/"
    return Broker(
        u.hostname or "127.0.0.1",
        u.port or 5672,
        urllib.parse.unquote(u.username or "guest"),
        urllib.parse.unquote(u.password or "guest"),
        vhost,
    )


def _drain(stream, sink):
    for line in iter(stream.readline, b""):
        sink(line.decode("utf-8", "replace").rstrip("\n"))
    stream.close()


def _make_certificate(directory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command (installed
    by scripts/setup.sh); it is its own CA for the clients of the TLS tests."""
    cert = os.path.join(directory, "server.pem")
    key = os.path.join(directory, "server.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return cert, key


def _start(binary, data_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARREN_")}
    cert, key = _make_certificate(os.path.dirname(data_dir))
    proc = subprocess.Popen(
        [binary, "--data-dir", data_dir, "--amqp-listen", "127.0.0.1:0",
         "--http-listen", "127.0.0.1:0", "--cluster-listen", "127.0.0.1:0",
         "--tls-listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    lines = queue.Queue()
    broker = Broker("127.0.0.1", 0, process=proc)
    # Both pipes are drained for the whole session so the broker never blocks on them.
    threading.Thread(target=_drain, args=(proc.stdout, lines.put), daemon=True).start()
    threading.Thread(
        target=_drain, args=(proc.stderr, broker.stderr_tail.append), daemon=True
    ).start()

    deadline = time.monotonic() + STARTUP_TIMEOUT
    port = None
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise RuntimeError(
                "warren did not become ready (exit status %r)\nstdout:\n%s\nstderr:\n%s"
                % (proc.returncode, "\n".join(seen), "\n".join(broker.stderr_tail))
            )
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith("warren: listening http "):
            broker.http_port = int(line.split()[-1].rpartition(":")[2])
        elif line.startswith("warren: listening cluster "):
            broker.cluster_address = line.split()[-1]
        elif line.startswith("warren: listening amqps "):
            broker.tls_port = int(line.split()[-1].rpartition(":")[2])
            broker.tls_ca = cert
        elif line.startswith("warren: listening amqp ") and port is None:
            host, _, p = line.split()[-1].rpartition(":")
            broker.host = host.strip("[]")
            port = int(p)
        elif line.strip() == "warren: ready":
            break
    if port is None:
        proc.kill()
        raise RuntimeError("warren became ready without printing its amqp listener")
    broker.port = port
    return broker


def _stop(broker):
    proc = broker.process
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def broker():
    url = os.environ.get("WARREN_TEST_EXTERNAL_AMQP", "").strip()
    if url:
        yield _external(url)
        return
    binary = os.environ.get("WARREN_BIN", "").strip()
    if not binary:
        pytest.fail("set WARREN_BIN to the warren binary, or WARREN_TEST_EXTERNAL_AMQP")
    with tempfile.TemporaryDirectory(prefix="warren-pika-") as tmp:
        b = _start(binary, os.path.join(tmp, "data"))
        try:
            yield b
        finally:
            _stop(b)


@pytest.fixture
def params(broker):
    return broker.params()


@pytest.fixture
def connection(params):
    conn = pika.BlockingConnection(params)
    yield conn
    if conn.is_open:
        conn.close()


_counter = itertools.count()


def unique(prefix):
    """A name unique to this run, so leftovers of other runs never interfere."""
    return f"pt-{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


def pump(connection, until, what, timeout=WAIT):
    """Runs the connection's I/O loop until `until()` is true; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while not until():
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        connection.process_data_events(time_limit=min(left, 0.2))


def drain(channel, queue, limit=10_000):
    """The bodies of every message in `queue`, fetched with basic.get (auto-ack) until it is
    empty; bounded by `limit` fetches."""
    bodies = []
    for _ in range(limit):
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return bodies
        bodies.append(body)
    pytest.fail(f"{queue} still had messages after {limit} fetches")

