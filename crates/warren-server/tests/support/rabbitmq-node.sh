#!/usr/bin/env bash
# Starts or stops a scratch RabbitMQ node (Debian's rabbitmq-server package) on loopback port
# 5673, for checking the client-level tests' expectations against the real thing:
#
#   crates/warren-server/tests/support/rabbitmq-node.sh start
#   WARREN_TEST_EXTERNAL_AMQP='amqp://guest:guest@127.0.0.1:5673/%2f' \
#     cargo test -p warren-server --tests
#   WARREN_TEST_EXTERNAL_AMQP='amqp://guest:guest@127.0.0.1:5673/%2f' \
#     tests/python/.venv/bin/python -m pytest -q tests/python
#   crates/warren-server/tests/support/rabbitmq-node.sh stop
#
# Everything (mnesia, logs, pid file, HOME) lives under RMQ_SCRATCH (default
# /tmp/warren-rabbitmq); nothing listens beyond 127.0.0.1. Needs root: the package's
# wrapper scripts would switch user, so the server script is run directly.
set -euo pipefail

scratch="${RMQ_SCRATCH:-/tmp/warren-rabbitmq}"
node="rmqtest@localhost"
ctl=/usr/lib/rabbitmq/bin/rabbitmqctl

setup_env() {
    mkdir -p "$scratch/home"
    echo '[].' > "$scratch/enabled_plugins"
    : > "$scratch/rabbitmq-env.conf"
    export RABBITMQ_NODENAME="$node"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=5673
    export RABBITMQ_DIST_PORT=25673
    export RABBITMQ_MNESIA_BASE="$scratch/mnesia"
    export RABBITMQ_LOG_BASE="$scratch/log"
    export RABBITMQ_PID_FILE="$scratch/pid"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$scratch/enabled_plugins"
    export RABBITMQ_CONF_ENV_FILE="$scratch/rabbitmq-env.conf"
    export ERL_EPMD_ADDRESS=127.0.0.1
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export HOME="$scratch/home"
}

case "${1:-}" in
    start)
        if ! [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >/dev/null
        fi
        # The package may start its own service on 5672; the tests never use it.
        if command -v service >/dev/null && service rabbitmq-server status >/dev/null 2>&1; then
            service rabbitmq-server stop >/dev/null 2>&1 || true
        fi
        setup_env
        setsid /usr/lib/rabbitmq/bin/rabbitmq-server > "$scratch/server.out" 2>&1 < /dev/null &
        for _ in $(seq 60); do
            if "$ctl" -n "$node" await_startup --timeout 5 >/dev/null 2>&1; then
                echo "RabbitMQ is up: amqp://guest:guest@127.0.0.1:5673/%2f"
                exit 0
            fi
            sleep 1
        done
        echo "RabbitMQ did not start; see $scratch/server.out and $scratch/log" >&2
        exit 1
        ;;
    stop)
        setup_env
        "$ctl" -n "$node" stop
        ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
