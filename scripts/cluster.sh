#!/usr/bin/env bash
# Runs a 3-node Warren cluster on this machine, for trying clustering out:
#   scripts/cluster.sh start    builds warren (release) and starts nodes 1-3 in the background
#   scripts/cluster.sh status   warrenctl status, as seen by node 1
#   scripts/cluster.sh stop     stops the three nodes (SIGTERM) and waits for them
# Node N listens for AMQP on 5671+N (5672, 5673, 5674), HTTP on 15691+N and for its peers on
# 25671+N; data and logs go to ./cluster-data/nodeN. Set WARREN_NODES=5 for five nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
nodes="${WARREN_NODES:-3}"
dir="cluster-data"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"
bin="$CARGO_TARGET_DIR/release/warren"
ctl="$CARGO_TARGET_DIR/release/warrenctl"

members() {
    local list=()
    for n in $(seq 1 "$nodes"); do list+=("$n@127.0.0.1:$((25671 + n))"); done
    (IFS=,; echo "${list[*]}")
}

case "${1:-}" in
start)
    scripts/setup.sh
    cargo build --release --locked -p warren-server -p warrenctl
    mkdir -p "$dir"
    for n in $(seq 1 "$nodes"); do
        mkdir -p "$dir/node$n"
        "$bin" --node-id "$n" --data-dir "$dir/node$n/data" \
            --amqp-listen "127.0.0.1:$((5671 + n))" --http-listen "127.0.0.1:$((15691 + n))" \
            --cluster-listen "127.0.0.1:$((25671 + n))" --members "$(members)" \
            >"$dir/node$n/stdout.log" 2>"$dir/node$n/warren.log" &
        echo $! >"$dir/node$n/pid"
    done
    # Nodes print "warren: ready" once the cluster has formed; wait for all of them (bounded).
    for _ in $(seq 1 120); do
        ready=$(cat "$dir"/node*/stdout.log 2>/dev/null | grep -c '^warren: ready' || true)
        [ "$ready" -ge "$nodes" ] && break
        sleep 0.5
    done
    [ "$ready" -ge "$nodes" ] || { echo "cluster did not form; see $dir/node*/warren.log" >&2; exit 1; }
    echo "cluster of $nodes ready: amqp://guest:guest@127.0.0.1:5672/ (and 5673, 5674, ...)"
    ;;
status)
    "$ctl" --node 127.0.0.1:25672 status
    ;;
stop)
    for pidfile in "$dir"/node*/pid; do
        [ -f "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for pidfile in "$dir"/node*/pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$pidfile"
    done
    ;;
*)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac
