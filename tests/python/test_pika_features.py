"""pika features beyond the tutorials that applications lean on: publisher confirms on a
BlockingConnection (including UnroutableError for mandatory publishes and errors for a
missing exchange), basic_get, the consume generator, channel errors surfacing as
ChannelClosedByBroker with the right reply code, and the asynchronous SelectConnection.
"""

import pika
import pika.exceptions
import pytest

from conftest import WAIT, pump, unique


def test_confirm_delivery_acks_and_mandatory_unroutable_raises(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    queue = unique("confirm")
    channel.queue_declare(queue=queue)

    # Routable: basic_publish returns once the broker has confirmed it.
    for i in range(20):
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=f"m{i}",
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
            mandatory=True,
        )
    assert channel.queue_declare(queue=queue, passive=True).method.message_count == 20

    # Unroutable + mandatory: the broker returns it, pika raises.
    with pytest.raises(pika.exceptions.UnroutableError) as info:
        channel.basic_publish(
            exchange="amq.direct",
            routing_key=unique("nobody"),
            body="bounce",
            mandatory=True,
        )
    returned = info.value.messages
    assert len(returned) == 1
    assert returned[0].method.reply_code == 312
    assert returned[0].body == b"bounce"

    # Unroutable without mandatory: silently dropped, still confirmed.
    channel.basic_publish(exchange="amq.direct", routing_key=unique("nobody"), body="x")
    assert channel.is_open
    channel.queue_delete(queue=queue)


def test_publish_to_missing_exchange_closes_channel_with_404(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.basic_publish(exchange=unique("missing"), routing_key="k", body="lost")
    assert info.value.reply_code == 404
    assert channel.is_closed
    assert connection.is_open
    # The connection carries on with a new channel.
    other = connection.channel()
    other.queue_declare(queue="", exclusive=True)


def test_channel_errors_carry_reply_codes(connection):
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.queue_declare(queue=unique("missing"), passive=True)
    assert info.value.reply_code == 404

    name = unique("x")
    channel = connection.channel()
    channel.exchange_declare(exchange=name, exchange_type="direct")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.exchange_declare(exchange=name, exchange_type="fanout")
    assert info.value.reply_code == 406

    channel = connection.channel()
    channel.exchange_delete(exchange=name)
    channel.basic_qos(prefetch_count=1)
    assert connection.is_open


def test_basic_get(connection):
    channel = connection.channel()
    queue = unique("get")
    channel.queue_declare(queue=queue)
    assert channel.basic_get(queue=queue) == (None, None, None)

    channel.confirm_delivery()
    for body in ("one", "two", "three"):
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(content_type="text/plain", headers={"n": 1}),
        )
    method, props, body = channel.basic_get(queue=queue, auto_ack=False)
    assert body == b"one"
    assert method.message_count == 2
    assert not method.redelivered
    assert props.content_type == "text/plain"
    assert props.headers == {"n": 1}
    # Not acked: rejected back to the head of the queue.
    channel.basic_reject(delivery_tag=method.delivery_tag, requeue=True)
    method, _, body = channel.basic_get(queue=queue, auto_ack=True)
    assert (body, method.redelivered, method.message_count) == (b"one", True, 2)
    method, _, body = channel.basic_get(queue=queue)
    channel.basic_ack(delivery_tag=method.delivery_tag)
    assert body == b"two"
    method, _, body = channel.basic_get(queue=queue, auto_ack=True)
    assert (body, method.message_count) == (b"three", 0)
    assert channel.basic_get(queue=queue) == (None, None, None)
    channel.queue_delete(queue=queue)


def test_consume_generator_with_inactivity_timeout(connection):
    channel = connection.channel()
    queue = unique("gen")
    channel.queue_declare(queue=queue, auto_delete=True)
    channel.confirm_delivery()
    for i in range(5):
        channel.basic_publish(exchange="", routing_key=queue, body=str(i))
    got = []
    for method, props, body in channel.consume(queue, inactivity_timeout=2):
        if method is None:
            break
        got.append(body)
        channel.basic_ack(method.delivery_tag)
        if len(got) == 5:
            break
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    requeued = channel.cancel()
    assert requeued == 0


def test_prefetch_with_multiple_ack(connection):
    channel = connection.channel()
    queue = unique("multi")
    channel.queue_declare(queue=queue)
    channel.confirm_delivery()
    for i in range(6):
        channel.basic_publish(exchange="", routing_key=queue, body=str(i))
    channel.basic_qos(prefetch_count=3)
    tags = []
    channel.basic_consume(
        queue=queue, on_message_callback=lambda ch, m, p, b: tags.append(m.delivery_tag)
    )
    pump(connection, lambda: len(tags) >= 3, "three deliveries")
    connection.process_data_events(time_limit=0.3)
    assert len(tags) == 3, "prefetch_count=3 exceeded"
    channel.basic_ack(delivery_tag=tags[-1], multiple=True)
    pump(connection, lambda: len(tags) >= 6, "the next three")
    channel.basic_ack(delivery_tag=tags[-1], multiple=True)
    check = connection.channel()
    assert check.queue_declare(queue=queue, passive=True).method.message_count == 0
    check.queue_delete(queue=queue)


def test_select_connection_smoke(params):
    """The asynchronous adapter: open, declare, consume, publish, receive, close."""
    queue = unique("select")
    state = {"received": None, "closed": False, "error": None}

    def on_open(conn):
        conn.channel(on_open_callback=on_channel)

    def on_channel(ch):
        state["channel"] = ch
        ch.queue_declare(queue=queue, exclusive=True, callback=on_declared)

    def on_declared(frame):
        ch = state["channel"]
        assert frame.method.queue == queue
        ch.basic_consume(queue=queue, on_message_callback=on_message, auto_ack=True)
        ch.basic_publish(exchange="", routing_key=queue, body=b"async hello")

    def on_message(ch, method, props, body):
        state["received"] = body
        ch.connection.close()

    def on_open_error(conn, err):
        state["error"] = err
        conn.ioloop.stop()

    def on_closed(conn, reason):
        state["closed"] = True
        state["reason"] = reason
        conn.ioloop.stop()

    conn = pika.SelectConnection(
        params,
        on_open_callback=on_open,
        on_open_error_callback=on_open_error,
        on_close_callback=on_closed,
    )

    def give_up():
        state["error"] = "timed out"
        if conn.is_open:
            conn.close()
        else:
            conn.ioloop.stop()

    conn.ioloop.call_later(WAIT, give_up)
    conn.ioloop.start()
    assert state["error"] is None, state["error"]
    assert state["received"] == b"async hello"
    assert state["closed"]
    assert isinstance(state["reason"], pika.exceptions.ConnectionClosedByClient)


def test_wrong_password_is_refused(broker):
    params = broker.params(credentials=pika.PlainCredentials(broker.user, "wrong-password"))
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(params)


def test_heartbeat_negotiated(broker):
    proposals = []

    def choose(connection, server_proposal):
        proposals.append(server_proposal)
        return 5

    conn = pika.BlockingConnection(broker.params(heartbeat=choose))
    try:
        # RabbitMQ proposes 60 seconds; the client's choice is what is used.
        assert proposals == [60]
        assert conn._impl.params.heartbeat == 5
        ch = conn.channel()
        ch.queue_declare(queue="", exclusive=True)
    finally:
        conn.close()
