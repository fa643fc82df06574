#!/usr/bin/env bash
# A stand-in for the `warren` binary built on a local RabbitMQ (Debian's rabbitmq-server
# package), used to check the process-control tests themselves: it honours --data-dir,
# prints the `warren: listening ...` / `warren: ready` lines on stdout, and becomes the
# RabbitMQ VM process (exec), so SIGKILL, SIGTERM and restarts hit the real broker. A tiny
# HTTP server answers /healthz, /readyz and /metrics.
#
#   WARREN_TEST_BIN=$PWD/crates/warren-server/tests/support/rabbitmq-stand-in.sh \
#     cargo test -p warren-server --test process -- --test-threads=1
#
# The AMQP port is fixed (STAND_IN_PORT, default 5674), so run one test at a time.
set -euo pipefail

data_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --data-dir) data_dir="$2"; shift 2 ;;
        --data-dir=*) data_dir="${1#*=}"; shift ;;
        --amqp-listen|--http-listen|--config|--node-id) shift 2 ;;
        *) shift ;;
    esac
done
[ -n "$data_dir" ] || { echo "stand-in: --data-dir is required" >&2; exit 2; }
mkdir -p "$data_dir/home"
data_dir="$(cd "$data_dir" && pwd)"

port="${STAND_IN_PORT:-5674}"
node="rmqstandin@localhost"
echo '[].' > "$data_dir/enabled_plugins"
: > "$data_dir/rabbitmq-env.conf"
export RABBITMQ_NODENAME="$node"
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT="$port"
export RABBITMQ_DIST_PORT=$((port + 20000))
export RABBITMQ_MNESIA_BASE="$data_dir/mnesia"
export RABBITMQ_LOG_BASE="$data_dir/log"
export RABBITMQ_PID_FILE="$data_dir/pid"
export RABBITMQ_ENABLED_PLUGINS_FILE="$data_dir/enabled_plugins"
export RABBITMQ_CONF_ENV_FILE="$data_dir/rabbitmq-env.conf"
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
export HOME="$data_dir/home"
# Makes the package's start script exec the VM instead of supervising it from a shell.
export NOTIFY_SOCKET="$data_dir/no-such-socket"

vm_pid=$$
(
    # HTTP side: reports its port, answers until the VM process is gone.
    python3 - "$vm_pid" > "$data_dir/http-port" <<'PY' &
import http.server, os, sys, threading, time
vm = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        bodies = {
            "/healthz": ("text/plain", "ok\n"),
            "/readyz": ("text/plain", "ready\n"),
            "/metrics": ("text/plain; version=0.0.4",
                         "# HELP warren_up Stand-in.\n# TYPE warren_up gauge\nwarren_up 1\n"),
        }
        if self.path not in bodies:
            self.send_error(404)
            return
        ctype, body = bodies[self.path]
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
while True:
    try:
        os.kill(vm, 0)
    except OSError:
        break
    time.sleep(0.5)
PY
    for _ in $(seq 120); do
        if /usr/lib/rabbitmq/bin/rabbitmqctl -n "$node" await_startup --timeout 2 >/dev/null 2>&1; then
            for _ in $(seq 50); do [ -s "$data_dir/http-port" ] && break; sleep 0.1; done
            echo "warren: listening amqp 127.0.0.1:$port"
            echo "warren: listening http 127.0.0.1:$(cat "$data_dir/http-port")"
            echo "warren: ready"
            exit 0
        fi
        sleep 0.5
    done
    echo "stand-in: RabbitMQ did not start" >&2
) &

exec /usr/lib/rabbitmq/bin/rabbitmq-server >&2
