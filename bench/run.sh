#!/usr/bin/env bash
# Side-by-side benchmark of Warren and RabbitMQ on this machine, same load generator
# (warren-perf), interleaved and repeated; prints each run and a table of medians with the
# Warren/RabbitMQ ratio. Installs rabbitmq-server from Debian's packages when missing.
#
# Scenario done so far: `single` — one node of each, one durable queue (RabbitMQ: classic,
# its single-node reference), 1 KB persistent messages, publisher confirms (window 64),
# manual acks, one producer and one consumer. The cluster scenarios of docs/benchmarks.md
# are not scripted yet.
#
#   BENCH_REPEATS  runs per broker (default 3)    BENCH_COUNT  messages per run (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."

repeats="${BENCH_REPEATS:-3}"
count="${BENCH_COUNT:-20000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    echo "bench: installing rabbitmq-server" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi
scripts/setup.sh
cargo build --release --locked -p warren-server -p warren-perf
warren="$CARGO_TARGET_DIR/release/warren"
perf="$CARGO_TARGET_DIR/release/warren-perf"

work="$(mktemp -d /tmp/warren-bench.XXXXXX)"
rabbit=crates/warren-server/tests/support/rabbitmq-node.sh
cleanup() {
    [ -n "${warren_pid:-}" ] && kill "$warren_pid" 2>/dev/null || true
    "$rabbit" stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"$rabbit" start >/dev/null
rabbit_uri="amqp://guest:guest@127.0.0.1:5673/%2f"

"$warren" --data-dir "$work/warren" --amqp-listen 127.0.0.1:5674 --http-listen off \
    --cluster-listen off >"$work/warren.out" 2>"$work/warren.err" &
warren_pid=$!
for _ in $(seq 1 300); do
    grep -q "warren: ready" "$work/warren.out" 2>/dev/null && break
    sleep 0.1
done
grep -q "warren: ready" "$work/warren.out" || { cat "$work/warren.err" >&2; exit 1; }
warren_uri="amqp://guest:guest@127.0.0.1:5674/%2f"

one_run() { # broker uri run-number
    "$perf" --uri "$2" --queue "bench-$1-$3" --count "$count" --size 1000 --confirm 64 \
        --prefetch 100 --duration 120 --json
}

results="$work/results.jsonl"
for i in $(seq 1 "$repeats"); do
    for broker in warren rabbitmq; do
        uri="$warren_uri"; [ "$broker" = rabbitmq ] && uri="$rabbit_uri"
        line="$(one_run "$broker" "$uri" "$i")"
        echo "$broker run $i: $line"
        echo "{\"broker\":\"$broker\",\"report\":$line}" >>"$results"
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(broker, key, sub=None):
    vals = [r["report"][key] if sub is None else r["report"][key][sub]
            for r in rows if r["broker"] == broker]
    return statistics.median(vals)
print()
print("scenario single: 1 queue, 1 producer, 1 consumer, 1 KB persistent, confirms (median of %d)"
      % len([r for r in rows if r["broker"] == "warren"]))
print("%-28s %14s %14s %8s" % ("figure", "warren", "rabbitmq", "ratio"))
for label, key, sub, better_high in [
    ("publish msg/s", "publish_rate", None, True),
    ("consume msg/s", "consume_rate", None, True),
    ("confirm latency p50 us", "confirm_latency_us", "p50", False),
    ("confirm latency p99 us", "confirm_latency_us", "p99", False),
    ("end-to-end p50 us", "end_to_end_latency_us", "p50", False),
    ("end-to-end p99 us", "end_to_end_latency_us", "p99", False),
    ("lost", "lost", None, False),
    ("tool CPU us/msg", "cpu_us_per_message", None, False),
]:
    w, r = med("warren", key, sub), med("rabbitmq", key, sub)
    ratio = (w / r) if r else float("nan")
    print("%-28s %14.1f %14.1f %8.2f" % (label, w, r, ratio))
PY
