"""Queue arguments and qos through pika, on durable (in Warren: replicated) queues: dead-lettering with
x-death for expired and rejected messages, max-length with drop-head and reject-publish,
the delivery limit with x-delivery-count, priorities, single active consumer, and basic.qos
global and prefetch-size.

Queues are declared with x-queue-type=quorum so that the suite also runs against RabbitMQ
(WARREN_TEST_EXTERNAL_AMQP); the prefetch-size test is Warren's only, since RabbitMQ refuses
prefetch-size.
"""

import os

import pika
import pika.exceptions
import pytest

from conftest import WAIT, drain, pump, unique

QUORUM = {"x-queue-type": "quorum"}


def declare(channel, name, **arguments):
    channel.queue_declare(queue=name, durable=True, arguments={**QUORUM, **arguments})


def declare_classic(channel, name, **arguments):
    """A durable queue of RabbitMQ's default type, for what its quorum queues refuse or do
    differently (priorities, global qos, exact reject-publish); replicated all the same in
    Warren."""
    channel.queue_declare(queue=name, durable=True, arguments=arguments)


def dead_letter_sink(channel, prefix):
    dlx = unique(f"{prefix}-dlx")
    dead = unique(f"{prefix}-dead")
    channel.exchange_declare(exchange=dlx, exchange_type="fanout", durable=True)
    declare(channel, dead)
    channel.queue_bind(queue=dead, exchange=dlx)
    return dlx, dead


def collect(connection, channel, queue, count):
    """Consumes `count` messages (acking each) and returns (properties, body) pairs."""
    got = []

    def on_message(ch, method, properties, body):
        got.append((properties, body))
        ch.basic_ack(method.delivery_tag)

    tag = channel.basic_consume(queue=queue, on_message_callback=on_message)
    pump(connection, lambda: len(got) >= count, f"{count} messages from {queue}")
    channel.basic_cancel(tag)
    return got


def test_expired_and_rejected_messages_are_dead_lettered_with_x_death(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    dlx, dead = dead_letter_sink(channel, "py-dlx")
    source = unique("py-ttl")
    declare(channel, source, **{"x-message-ttl": 100, "x-dead-letter-exchange": dlx})
    channel.basic_publish(exchange="", routing_key=source, body=b"old")

    [(props, body)] = collect(connection, channel, dead, 1)
    assert body == b"old"
    [death] = props.headers["x-death"]
    assert death["reason"] == "expired"
    assert death["queue"] == source
    assert death["count"] == 1
    assert death["routing-keys"] == [source]
    assert props.headers["x-first-death-reason"] == "expired"

    rejecting = unique("py-rej")
    declare(channel, rejecting, **{"x-dead-letter-exchange": dlx})
    channel.basic_publish(exchange="", routing_key=rejecting, body=b"unwanted")
    method, _, body = None, None, None
    deadline_reached = False
    for method, _, body in channel.consume(rejecting, inactivity_timeout=WAIT):
        deadline_reached = method is None
        break
    assert not deadline_reached and body == b"unwanted"
    channel.basic_reject(method.delivery_tag, requeue=False)
    channel.cancel()
    [(props, body)] = collect(connection, channel, dead, 1)
    assert body == b"unwanted"
    assert props.headers["x-death"][0]["reason"] == "rejected"


def test_max_length_drop_head_and_reject_publish(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    head = unique("py-maxlen")
    declare(channel, head, **{"x-max-length": 2})
    for i in range(4):
        channel.basic_publish(exchange="", routing_key=head, body=f"m{i}")
    assert drain(channel, head) == [b"m2", b"m3"]

    full = unique("py-reject")
    declare_classic(channel, full, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    channel.basic_publish(exchange="", routing_key=full, body=b"fits")
    with pytest.raises(pika.exceptions.NackError):
        channel.basic_publish(exchange="", routing_key=full, body=b"refused")


def test_delivery_limit_and_delivery_count(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    dlx, dead = dead_letter_sink(channel, "py-limit")
    poison = unique("py-poison")
    declare(channel, poison, **{"x-delivery-limit": 1, "x-dead-letter-exchange": dlx})
    channel.basic_publish(exchange="", routing_key=poison, body=b"poison")
    counts = []

    def on_message(ch, method, properties, body):
        counts.append((method.redelivered, (properties.headers or {}).get("x-delivery-count")))
        ch.basic_nack(method.delivery_tag, requeue=True)

    tag = channel.basic_consume(queue=poison, on_message_callback=on_message)
    pump(connection, lambda: len(counts) >= 2, "two delivery attempts")
    channel.basic_cancel(tag)
    assert counts == [(False, None), (True, 1)]
    [(props, body)] = collect(connection, channel, dead, 1)
    assert body == b"poison"
    assert props.headers["x-death"][0]["reason"] == "delivery_limit"


def test_priorities_and_single_active_consumer(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    prio = unique("py-prio")
    declare_classic(channel, prio, **{"x-max-priority": 5})
    for body, priority in [(b"low", 1), (b"high", 5), (b"mid", 3)]:
        channel.basic_publish(
            exchange="",
            routing_key=prio,
            body=body,
            properties=pika.BasicProperties(priority=priority),
        )
    assert drain(channel, prio) == [b"high", b"mid", b"low"]

    sac = unique("py-sac")
    declare(channel, sac, **{"x-single-active-consumer": True})
    first, second = [], []
    tag1 = channel.basic_consume(
        queue=sac, on_message_callback=lambda ch, m, p, b: (first.append(b), ch.basic_ack(m.delivery_tag))
    )
    channel.basic_consume(
        queue=sac, on_message_callback=lambda ch, m, p, b: (second.append(b), ch.basic_ack(m.delivery_tag))
    )
    for i in range(3):
        channel.basic_publish(exchange="", routing_key=sac, body=f"s{i}")
    pump(connection, lambda: len(first) == 3, "the active consumer's messages")
    assert second == []
    channel.basic_cancel(tag1)
    channel.basic_publish(exchange="", routing_key=sac, body=b"next")
    pump(connection, lambda: second == [b"next"], "the second consumer taking over")


def test_global_qos_limits_the_channel(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    q1, q2 = unique("py-g1"), unique("py-g2")
    for q in (q1, q2):
        declare_classic(channel, q)
        for i in range(4):
            channel.basic_publish(exchange="", routing_key=q, body=f"{q}-{i}")
    consumer = connection.channel()
    consumer.basic_qos(prefetch_count=3, global_qos=True)
    held = []
    consumer.basic_consume(queue=q1, on_message_callback=lambda ch, m, p, b: held.append(m))
    consumer.basic_consume(queue=q2, on_message_callback=lambda ch, m, p, b: held.append(m))
    pump(connection, lambda: len(held) == 3, "three deliveries")
    # No fourth while three are unacked.
    connection.process_data_events(time_limit=0.3)
    assert len(held) == 3
    consumer.basic_ack(held[0].delivery_tag)
    pump(connection, lambda: len(held) == 4, "the freed slot being used")


@pytest.mark.skipif(
    bool(os.environ.get("WARREN_TEST_EXTERNAL_AMQP")),
    reason="RabbitMQ refuses prefetch-size",
)
def test_prefetch_size_limits_unacked_bytes(connection):
    channel = connection.channel()
    channel.confirm_delivery()
    q = unique("py-bytes")
    declare(channel, q)
    for body in [b"a" * 6, b"b" * 6, b"c" * 2]:
        channel.basic_publish(exchange="", routing_key=q, body=body)
    consumer = connection.channel()
    consumer.basic_qos(prefetch_size=10, prefetch_count=0)
    got = []
    consumer.basic_consume(queue=q, on_message_callback=lambda ch, m, p, b: got.append((m, b)))
    # The first always goes; the second would make 12 unacked bytes.
    pump(connection, lambda: len(got) == 1, "the first delivery")
    connection.process_data_events(time_limit=0.3)
    assert [b for _, b in got] == [b"a" * 6]
    consumer.basic_ack(got[0][0].delivery_tag)
    pump(connection, lambda: len(got) == 3, "the rest, 8 bytes in all")
    assert [b for _, b in got] == [b"a" * 6, b"b" * 6, b"c" * 2]


def test_transactions_commit_and_rollback(connection):
    channel = connection.channel()
    q = unique("py-tx")
    declare(channel, q)
    channel.tx_select()
    for i in range(2):
        channel.basic_publish(exchange="", routing_key=q, body=f"t{i}")

    def count():
        return channel.queue_declare(queue=q, passive=True).method.message_count

    assert count() == 0
    channel.tx_commit()
    assert count() == 2
    channel.basic_publish(exchange="", routing_key=q, body=b"dropped")
    channel.tx_rollback()
    channel.tx_commit()
    assert count() == 2
