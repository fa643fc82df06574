"""Virtual hosts, users, permissions, policies, topology and definitions set up the way
RabbitMQ operators do it, through the management HTTP API, then checked with pika; an
operator closing a pika connection; and resource alarms seen by pika as
connection.blocked / unblocked. Needs the session's own broker (its HTTP and cluster ports);
against an external broker these tests are skipped."""

import base64
import json
import os
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import pika
import pika.exceptions
import pytest

from conftest import WAIT, drain, pump, unique


class Api:
    def __init__(self, port, user="guest", password="guest"):
        self.base = f"http://127.0.0.1:{port}/api"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.auth = f"Basic {token}"

    def call(self, method, path, body=None, headers=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", self.auth)
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            text = response.read()
            return response.status, (json.loads(text) if text else None)


def q(name):
    return urllib.parse.quote(name, safe="")


@pytest.fixture
def api(broker):
    if broker.http_port is None:
        pytest.skip("the broker under test has no management listener known to this session")
    return Api(broker.http_port)


def test_a_user_works_only_where_its_permissions_allow(broker, api):
    vhost, user = unique("vh"), unique("user")
    assert api.call("PUT", f"/vhosts/{q(vhost)}")[0] in (201, 204)
    assert api.call("PUT", f"/users/{q(user)}", {"password": "s3cret", "tags": ""})[0] in (201, 204)
    own = f"^{user}-"
    status, _ = api.call("PUT", f"/permissions/{q(vhost)}/{q(user)}",
                         {"configure": own, "write": ".*", "read": ".*"})
    assert status in (201, 204)
    _, listed = api.call("GET", f"/permissions/{q(vhost)}/{q(user)}")
    assert listed["configure"] == own

    creds = pika.PlainCredentials(user, "s3cret")
    conn = pika.BlockingConnection(broker.params(virtual_host=vhost, credentials=creds))
    try:
        ch = conn.channel()
        mine = f"{user}-q"
        ch.queue_declare(queue=mine, durable=True)
        ch.confirm_delivery()
        ch.basic_publish(exchange="", routing_key=mine, body=b"hello")
        method, _, body = ch.basic_get(mine, auto_ack=True)
        assert method is not None and body == b"hello"
        # Declaring a queue outside its configure pattern is refused on the channel.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            ch.queue_declare(queue="not-" + mine, durable=True)
        assert refused.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()

    # No permissions in the default vhost: the connection is refused.
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(broker.params(credentials=creds))
    # Nor with a wrong password.
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(
            broker.params(virtual_host=vhost, credentials=pika.PlainCredentials(user, "nope")))

    # The management API reads as RabbitMQ's: the vhost and user are listed, then deleted.
    _, users = api.call("GET", "/users")
    assert user in [u["name"] for u in users]
    assert api.call("DELETE", f"/users/{q(user)}")[0] == 204
    assert api.call("DELETE", f"/vhosts/{q(vhost)}")[0] == 204
    with pytest.raises(urllib.error.HTTPError) as gone:
        api.call("GET", f"/users/{q(user)}")
    assert gone.value.code == 404


def test_a_policy_applies_queue_arguments_by_name_pattern(connection, api):
    prefix = unique("pol")
    status, _ = api.call("PUT", f"/policies/%2F/{q(prefix)}", {
        "pattern": f"^{prefix}", "definition": {"max-length": 2}, "apply-to": "queues",
    })
    assert status in (201, 204)
    try:
        ch = connection.channel()
        ch.confirm_delivery()
        name = f"{prefix}-q"
        ch.queue_declare(queue=name, durable=True)
        for i in range(3):
            ch.basic_publish(exchange="", routing_key=name, body=str(i).encode())
        # max-length 2 with the default overflow drops the oldest.
        assert drain(ch, name) == [b"1", b"2"]
        _, queues = api.call("GET", "/queues/%2F")
        listed = [x for x in queues if x["name"] == name]
        assert listed and listed[0].get("policy") == prefix
    finally:
        api.call("DELETE", f"/policies/%2F/{q(prefix)}")


def warrenctl(broker, *args):
    binary = os.path.join(os.path.dirname(os.environ.get("WARREN_BIN", "")), "warrenctl")
    if broker.cluster_address is None or not os.path.exists(binary):
        pytest.skip("warrenctl or the broker's cluster address is not available")
    out = subprocess.run([binary, "--node", broker.cluster_address, *args],
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_publishers_see_connection_blocked_while_a_disk_alarm_is_on(broker, connection):
    events = []
    connection.add_on_connection_blocked_callback(lambda _c, m: events.append("blocked"))
    connection.add_on_connection_unblocked_callback(lambda _c, m: events.append("unblocked"))
    ch = connection.channel()
    name = unique("alarm")
    ch.queue_declare(queue=name, durable=True)
    try:
        # No disk has this much free space: the alarm goes on.
        out = warrenctl(broker, "resource-limits", "--disk-free-limit", str(2**64 - 1))
        assert "low on disk" in out
        # A publish is what makes a connection blocked (RabbitMQ blocks publishers only).
        ch.basic_publish(exchange="", routing_key=name, body=b"waits")
        pump(connection, lambda: "blocked" in events, "connection.blocked")
    finally:
        warrenctl(broker, "resource-limits", "--disk-free-limit", "0")
    pump(connection, lambda: "unblocked" in events, "connection.unblocked")
    # What was sent while blocked is taken once the alarm clears.
    def arrived():
        method, _, _ = ch.basic_get(name, auto_ack=True)
        return method is not None
    pump(connection, arrived, "the publish made while blocked")


def test_a_vhost_topology_comes_back_from_its_exported_definitions(broker, api):
    vhost = unique("defs")
    assert api.call("PUT", f"/vhosts/{q(vhost)}")[0] in (201, 204)
    assert api.call("PUT", f"/exchanges/{q(vhost)}/orders", {"type": "direct"})[0] == 201
    assert api.call("PUT", f"/queues/{q(vhost)}/paid", {"durable": True})[0] == 201
    assert api.call("POST", f"/bindings/{q(vhost)}/e/orders/q/paid", {"routing_key": "paid"})[0] == 201
    _, exported = api.call("GET", f"/definitions/{q(vhost)}")
    assert [x["name"] for x in exported["exchanges"]] == ["orders"]
    assert [x["name"] for x in exported["queues"]] == ["paid"]
    assert api.call("DELETE", f"/queues/{q(vhost)}/paid")[0] == 204
    assert api.call("DELETE", f"/exchanges/{q(vhost)}/orders")[0] == 204

    assert api.call("POST", f"/definitions/{q(vhost)}", exported)[0] == 204
    conn = pika.BlockingConnection(broker.params(virtual_host=vhost))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange="orders", routing_key="paid", body=b"invoice-1")
        method, _, body = ch.basic_get("paid", auto_ack=True)
        assert method is not None and body == b"invoice-1"
    finally:
        conn.close()
    assert api.call("DELETE", f"/vhosts/{q(vhost)}")[0] == 204


def test_an_operator_closes_a_connection_and_the_client_hears_why(broker, api):
    name = unique("app")
    conn = pika.BlockingConnection(broker.params(client_properties={"connection_name": name}))
    try:
        _, listed = api.call("GET", "/connections")
        mine = [c for c in listed if c["client_properties"].get("connection_name") == name]
        assert len(mine) == 1, listed
        status, _ = api.call("DELETE", f"/connections/{q(mine[0]['name'])}",
                             headers={"X-Reason": "moving to another node"})
        assert status == 204
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            pump(conn, lambda: False, "the forced close")
        assert closed.value.reply_code == 320
        assert "moving to another node" in closed.value.reply_text
    finally:
        if conn.is_open:
            conn.close()


def test_messages_published_and_fetched_over_http_meet_pika(connection, api):
    ch = connection.channel()
    queue = unique("http")
    ch.queue_declare(queue=queue, durable=True)
    status, routed = api.call("POST", "/exchanges/%2F/amq.default/publish", {
        "routing_key": queue, "payload": "from-http", "payload_encoding": "string",
        "properties": {"message_id": "m-1", "delivery_mode": 2}})
    assert status == 200 and routed == {"routed": True}
    method, props, body = ch.basic_get(queue, auto_ack=True)
    assert method is not None and body == b"from-http" and props.message_id == "m-1"

    ch.confirm_delivery()
    ch.basic_publish(exchange="", routing_key=queue, body=b"from-pika",
                     properties=pika.BasicProperties(headers={"k": "v"}))
    _, peek = api.call("POST", f"/queues/%2F/{q(queue)}/get",
                       {"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"})
    assert peek[0]["payload"] == "from-pika" and peek[0]["properties"]["headers"] == {"k": "v"}
    # Requeued: pika still gets it.
    method, _, body = ch.basic_get(queue, auto_ack=True)
    assert method is not None and body == b"from-pika"
    ch.queue_delete(queue)
