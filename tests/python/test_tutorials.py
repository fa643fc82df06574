"""The six RabbitMQ tutorials for Python (pika), with their code kept as the tutorials
write it: queue and exchange names, declarations, callbacks and publishing calls are the
tutorials' own. What the tests add is the harness around them: producers and consumers run
in one process (consumers in threads or side by side on their own connections), every wait
is bounded, and each test asserts what the tutorial says the programs print.
"""

import threading
import time
import uuid

import pika
import pytest

from conftest import WAIT, pump


def _fresh(params, *queues, exchanges=()):
    """Removes tutorial objects left by an earlier run (the names are fixed by the tutorials)."""
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    for q in queues:
        ch.queue_delete(queue=q)
    for x in exchanges:
        ch.exchange_delete(exchange=x)
    conn.close()


def _consume_for(connection, channel, stop_when, what):
    """channel.start_consuming(), as the tutorials do, but stopped once `stop_when()` holds
    (checked after each delivery) or after WAIT seconds, which fails the test."""
    timed_out = []

    def give_up():
        timed_out.append(True)
        channel.stop_consuming()

    timer = connection.call_later(WAIT, give_up)
    channel.start_consuming()
    connection.remove_timeout(timer)
    if timed_out and not stop_when():
        pytest.fail(f"timed out after {WAIT}s waiting for {what}")


# --- Tutorial 1: "Hello World!" ---------------------------------------------------------


def test_hello_world(params):
    _fresh(params, "hello")

    # send.py
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare(queue="hello")
    channel.basic_publish(exchange="", routing_key="hello", body="Hello World!")
    print(" [x] Sent 'Hello World!'")
    connection.close()

    # receive.py
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare(queue="hello")
    received = []

    def callback(ch, method, properties, body):
        print(f" [x] Received {body}")
        received.append(body)
        if received:
            ch.stop_consuming()

    channel.basic_consume(queue="hello", auto_ack=True, on_message_callback=callback)
    print(" [*] Waiting for messages. To exit press CTRL+C")
    _consume_for(connection, channel, lambda: received, "Hello World!")
    assert received == [b"Hello World!"]
    # auto_ack: nothing is left behind.
    assert channel.queue_declare(queue="hello", passive=True).method.message_count == 0
    channel.queue_delete(queue="hello")
    connection.close()


# --- Tutorial 2: Work queues -----------------------------------------------------------


def _new_task(params, message):
    # new_task.py
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare(queue="task_queue", durable=True)
    channel.basic_publish(
        exchange="",
        routing_key="task_queue",
        body=message,
        properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
    )
    print(f" [x] Sent {message}")
    connection.close()


class _Worker(threading.Thread):
    """worker.py in a thread. The tutorial simulates work with time.sleep(dots); here a task
    named "heavy..." instead blocks until the test releases it, so the test decides how long
    the worker stays busy without depending on timing."""

    def __init__(self, params, name, release):
        super().__init__(daemon=True)
        self.params = params
        self.name_ = name
        self.release = release
        self.done = []
        self.properties = []
        self.started_task = threading.Event()
        self.ready = threading.Event()
        self.connection = None
        self.channel = None
        self.error = None

    def run(self):
        try:
            connection = pika.BlockingConnection(self.params)
            channel = connection.channel()
            self.connection, self.channel = connection, channel
            channel.queue_declare(queue="task_queue", durable=True)
            print(" [*] Waiting for messages. To exit press CTRL+C")

            def callback(ch, method, properties, body):
                print(f" [x] Received {body.decode()}")
                self.started_task.set()
                if body.startswith(b"heavy"):
                    assert self.release.wait(WAIT), "heavy task never released"
                else:
                    time.sleep(body.count(b".") * 0.01)
                print(" [x] Done")
                self.done.append(body.decode())
                self.properties.append(properties)
                ch.basic_ack(delivery_tag=method.delivery_tag)

            channel.basic_qos(prefetch_count=1)
            channel.basic_consume(queue="task_queue", on_message_callback=callback)
            self.ready.set()
            channel.start_consuming()
            connection.close()
        except Exception as e:  # reported by the test thread
            self.error = e
            self.ready.set()

    def stop(self):
        self.connection.add_callback_threadsafe(self.channel.stop_consuming)
        self.join(WAIT)
        assert not self.is_alive(), f"worker {self.name_} did not stop"
        assert self.error is None, f"worker {self.name_} failed: {self.error!r}"


def _wait(cond, what):
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}")
        time.sleep(0.01)


def test_work_queues_fair_dispatch(params):
    _fresh(params, "task_queue")
    release = threading.Event()
    a = _Worker(params, "A", release)
    b = _Worker(params, "B", release)
    try:
        a.start()
        assert a.ready.wait(WAIT) and a.error is None, a.error
        _new_task(params, "heavy.....")
        # Worker A is now busy with the heavy task and, with prefetch_count=1, gets no more.
        assert a.started_task.wait(WAIT), "worker A never got the heavy task"
        b.start()
        assert b.ready.wait(WAIT) and b.error is None, b.error
        light = [f"light {i}." for i in range(6)]
        for message in light:
            _new_task(params, message)
        _wait(lambda: len(b.done) == len(light), "worker B to finish the light tasks")
        assert a.done == [], "A took a second task while the first was unacked"
        release.set()
        _wait(lambda: a.done == ["heavy....."], "worker A to finish")
        assert b.done == light, "tasks are handed out in order"
        # Tasks were persistent, and the queue is durable and empty.
        assert all(p.delivery_mode == 2 for p in a.properties + b.properties)
    finally:
        release.set()
        for w in (a, b):
            if w.is_alive() and w.connection is not None:
                w.stop()
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    ok = channel.queue_declare(queue="task_queue", durable=True, passive=True)
    assert ok.method.message_count == 0
    channel.queue_delete(queue="task_queue")
    connection.close()


def test_work_queues_unacked_task_is_redelivered(params):
    """The tutorial's point about acknowledgements: a worker that dies mid-task loses
    nothing, the task goes to another worker."""
    _fresh(params, "task_queue")
    _new_task(params, "First message.")
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.queue_declare(queue="task_queue", durable=True)
    channel.basic_qos(prefetch_count=1)
    got = []
    channel.basic_consume(
        queue="task_queue", on_message_callback=lambda ch, m, p, body: got.append(m)
    )
    pump(connection, lambda: got, "the task")
    assert not got[0].redelivered
    connection.close()  # "dies" without acking

    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    redelivered = []

    def callback(ch, method, properties, body):
        redelivered.append((body, method.redelivered))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    channel.basic_qos(prefetch_count=1)
    channel.basic_consume(queue="task_queue", on_message_callback=callback)
    pump(connection, lambda: redelivered, "the redelivered task")
    assert redelivered == [(b"First message.", True)]
    channel.queue_delete(queue="task_queue")
    connection.close()


# --- Tutorial 3: Publish/Subscribe -----------------------------------------------------


class _LogReceiver:
    """receive_logs*.py: an exclusive, server-named queue bound to the exchange."""

    def __init__(self, params, exchange, exchange_type, binding_keys=(None,)):
        self.connection = pika.BlockingConnection(params)
        self.channel = channel = self.connection.channel()
        channel.exchange_declare(exchange=exchange, exchange_type=exchange_type)
        result = channel.queue_declare(queue="", exclusive=True)
        self.queue_name = queue_name = result.method.queue
        for key in binding_keys:
            if key is None:
                channel.queue_bind(exchange=exchange, queue=queue_name)
            else:
                channel.queue_bind(exchange=exchange, queue=queue_name, routing_key=key)
        self.received = []

        def callback(ch, method, properties, body):
            print(f" [x] {method.routing_key}:{body}")
            self.received.append((method.routing_key, body.decode()))

        channel.basic_consume(queue=queue_name, on_message_callback=callback, auto_ack=True)

    def wait_for(self, n, what):
        pump(self.connection, lambda: len(self.received) >= n, what)

    def close(self):
        self.connection.close()


def _emit(params, exchange, exchange_type, routing_key, message):
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.exchange_declare(exchange=exchange, exchange_type=exchange_type)
    channel.basic_publish(exchange=exchange, routing_key=routing_key, body=message)
    print(f" [x] Sent {routing_key}:{message}")
    connection.close()


def test_publish_subscribe(params):
    _fresh(params, exchanges=["logs"])
    receivers = [_LogReceiver(params, "logs", "fanout") for _ in range(2)]
    try:
        for r in receivers:
            assert r.queue_name.startswith("amq.gen-"), r.queue_name
        assert receivers[0].queue_name != receivers[1].queue_name
        messages = ["info: Hello World!", "warning: disk", "error: boom"]
        for m in messages:
            # emit_log.py
            _emit(params, "logs", "fanout", "", m)
        for r in receivers:
            r.wait_for(len(messages), "all log lines")
            assert [body for _, body in r.received] == messages
        name = receivers[0].queue_name
    finally:
        for r in receivers:
            r.close()
    # The exclusive queues went with their connections.
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    deadline = time.monotonic() + WAIT
    while True:
        try:
            channel.queue_declare(queue=name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404
            break
        assert time.monotonic() < deadline, "exclusive queue outlived its connection"
        time.sleep(0.05)
    channel = connection.channel()
    channel.exchange_delete(exchange="logs")
    connection.close()


# --- Tutorial 4: Routing ---------------------------------------------------------------


def test_routing(params):
    _fresh(params, exchanges=["direct_logs"])
    errors_only = _LogReceiver(params, "direct_logs", "direct", ["error"])
    everything = _LogReceiver(params, "direct_logs", "direct", ["info", "warning", "error"])
    try:
        sent = [
            ("info", "Run. Run. Or it will explode."),
            ("warning", "Low disk"),
            ("error", "Run. Run. Or it will explode."),
            ("debug", "nobody listens to debug"),
            ("error", "last"),
        ]
        for severity, message in sent:
            # emit_log_direct.py
            _emit(params, "direct_logs", "direct", severity, message)
        everything.wait_for(4, "info, warning and errors")
        errors_only.wait_for(2, "errors")
        assert everything.received == [s for s in sent if s[0] != "debug"]
        assert errors_only.received == [s for s in sent if s[0] == "error"]
        # The last message sent has arrived everywhere, so nothing else is in flight.
        errors_only.connection.process_data_events(time_limit=0.2)
        assert len(errors_only.received) == 2
    finally:
        errors_only.close()
        everything.close()
    connection = pika.BlockingConnection(params)
    connection.channel().exchange_delete(exchange="direct_logs")
    connection.close()


# --- Tutorial 5: Topics ----------------------------------------------------------------


def test_topics(params):
    _fresh(params, exchanges=["topic_logs"])
    # The tutorial's example: Q1 is interested in orange animals, Q2 in rabbits and lazy ones.
    q1 = _LogReceiver(params, "topic_logs", "topic", ["*.orange.*"])
    q2 = _LogReceiver(params, "topic_logs", "topic", ["*.*.rabbit", "lazy.#"])
    catch_all = _LogReceiver(params, "topic_logs", "topic", ["#"])
    kern = _LogReceiver(params, "topic_logs", "topic", ["kern.*"])
    try:
        keys = [
            "quick.orange.rabbit",  # Q1, Q2
            "lazy.orange.elephant",  # Q1, Q2
            "quick.orange.fox",  # Q1
            "lazy.brown.fox",  # Q2
            "lazy.pink.rabbit",  # Q2, once although it matches both bindings
            "quick.brown.fox",  # nobody
            "orange",  # nobody
            "quick.orange.new.rabbit",  # nobody
            "lazy.orange.new.rabbit",  # Q2
            "kern.critical",  # kern.*
            "lazy",  # Q2 (lazy.# matches zero further words)
        ]
        for key in keys:
            # emit_log_topic.py
            _emit(params, "topic_logs", "topic", key, "A critical kernel error")
        catch_all.wait_for(len(keys), "every message on #")
        expected = {
            "q1": ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox"],
            "q2": [
                "quick.orange.rabbit",
                "lazy.orange.elephant",
                "lazy.brown.fox",
                "lazy.pink.rabbit",
                "lazy.orange.new.rabbit",
                "lazy",
            ],
            "kern": ["kern.critical"],
        }
        for name, r in (("q1", q1), ("q2", q2), ("kern", kern)):
            r.wait_for(len(expected[name]), f"{name}'s messages")
            # Give stragglers the chance to show up: anything extra fails the test.
            r.connection.process_data_events(time_limit=0.2)
            assert [k for k, _ in r.received] == expected[name], name
        assert [k for k, _ in catch_all.received] == keys
    finally:
        for r in (q1, q2, catch_all, kern):
            r.close()
    connection = pika.BlockingConnection(params)
    connection.channel().exchange_delete(exchange="topic_logs")
    connection.close()


# --- Tutorial 6: RPC -------------------------------------------------------------------


def fib(n):
    if n == 0:
        return 0
    elif n == 1:
        return 1
    else:
        return fib(n - 1) + fib(n - 2)


class _RpcServer(threading.Thread):
    """rpc_server.py in a thread."""

    def __init__(self, params):
        super().__init__(daemon=True)
        self.params = params
        self.ready = threading.Event()
        self.error = None
        self.served = 0

    def run(self):
        try:
            connection = pika.BlockingConnection(self.params)
            channel = connection.channel()
            self.connection, self.channel = connection, channel
            channel.queue_declare(queue="rpc_queue")

            def on_request(ch, method, props, body):
                n = int(body)
                print(f" [.] fib({n})")
                response = fib(n)
                ch.basic_publish(
                    exchange="",
                    routing_key=props.reply_to,
                    properties=pika.BasicProperties(correlation_id=props.correlation_id),
                    body=str(response),
                )
                ch.basic_ack(delivery_tag=method.delivery_tag)
                self.served += 1

            channel.basic_qos(prefetch_count=1)
            channel.basic_consume(queue="rpc_queue", on_message_callback=on_request)
            print(" [x] Awaiting RPC requests")
            self.ready.set()
            channel.start_consuming()
            connection.close()
        except Exception as e:
            self.error = e
            self.ready.set()

    def stop(self):
        self.connection.add_callback_threadsafe(self.channel.stop_consuming)
        self.join(WAIT)
        assert not self.is_alive(), "RPC server did not stop"
        assert self.error is None, f"RPC server failed: {self.error!r}"


class FibonacciRpcClient(object):
    """rpc_client.py's client, with the response wait bounded."""

    def __init__(self, params):
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        result = self.channel.queue_declare(queue="", exclusive=True)
        self.callback_queue = result.method.queue
        self.channel.basic_consume(
            queue=self.callback_queue, on_message_callback=self.on_response, auto_ack=True
        )
        self.response = None
        self.corr_id = None

    def on_response(self, ch, method, props, body):
        if self.corr_id == props.correlation_id:
            self.response = body

    def call(self, n):
        self.response = None
        self.corr_id = str(uuid.uuid4())
        self.channel.basic_publish(
            exchange="",
            routing_key="rpc_queue",
            properties=pika.BasicProperties(
                reply_to=self.callback_queue,
                correlation_id=self.corr_id,
            ),
            body=str(n),
        )
        pump(self.connection, lambda: self.response is not None, f"fib({n})")
        return int(self.response)


def test_rpc(params):
    _fresh(params, "rpc_queue")
    server = _RpcServer(params)
    server.start()
    assert server.ready.wait(WAIT) and server.error is None, server.error
    try:
        fibonacci_rpc = FibonacciRpcClient(params)
        assert fibonacci_rpc.callback_queue.startswith("amq.gen-")
        print(" [x] Requesting fib(30)")
        response = fibonacci_rpc.call(30)
        print(f" [.] Got {response}")
        assert response == 832040
        for n, want in [(0, 0), (1, 1), (10, 55), (20, 6765)]:
            assert fibonacci_rpc.call(n) == want
        # A second client gets its own answers on its own callback queue.
        other = FibonacciRpcClient(params)
        assert other.callback_queue != fibonacci_rpc.callback_queue
        assert other.call(15) == 610
        other.connection.close()
        fibonacci_rpc.connection.close()
        assert server.served == 6
    finally:
        server.stop()
    connection = pika.BlockingConnection(params)
    connection.channel().queue_delete(queue="rpc_queue")
    connection.close()
