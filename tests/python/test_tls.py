"""AMQP over TLS (amqps) with pika and Python's ssl module: the session's broker also
listens for TLS with a self-signed certificate made by conftest; a client that trusts it
publishes with confirms and consumes; one that does not is refused at the handshake."""

import ssl

import pika
import pika.exceptions
import pytest

from conftest import WAIT, unique


def tls_params(broker, cafile):
    context = ssl.create_default_context(cafile=cafile)
    return broker.params(
        port=broker.tls_port,
        ssl_options=pika.SSLOptions(context, server_hostname="127.0.0.1"),
    )


@pytest.fixture
def tls_broker(broker):
    if broker.tls_port is None:
        pytest.skip("the broker under test has no amqps listener")
    return broker


def test_publish_and_consume_over_tls(tls_broker):
    connection = pika.BlockingConnection(tls_params(tls_broker, tls_broker.tls_ca))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        queue = unique("tls")
        channel.queue_declare(queue=queue)
        body = b"x" * 100_000
        channel.basic_publish(exchange="", routing_key=queue, body=body)
        method, _, got = channel.basic_get(queue, auto_ack=True)
        assert method is not None and got == body
    finally:
        connection.close()


def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_broker):
    context = ssl.create_default_context()  # the system CAs only
    params = tls_broker.params(
        port=tls_broker.tls_port,
        ssl_options=pika.SSLOptions(context, server_hostname="127.0.0.1"),
        socket_timeout=WAIT,
    )
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)):
        pika.BlockingConnection(params)
