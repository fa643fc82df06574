#!/usr/bin/env bash
# Side-by-side benchmark of Warren and RabbitMQ on this machine: installs rabbitmq-server from
# Debian's packages when missing, builds Warren and warren-perf (release), then runs
# bench/bench.py, which starts a single node and a 3-node cluster of each broker on loopback,
# runs the scenarios of docs/benchmarks.md against both (interleaved, repeated) and prints a
# table of medians with Warren/RabbitMQ ratios. Settings are environment variables, listed at
# the top of bench/bench.py (BENCH_SCENARIOS, BENCH_REPEATS, BENCH_COUNT, BENCH_BACKLOG, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"

if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    echo "bench: installing rabbitmq-server" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
fi
# The package may start its own service; the benchmark runs its own nodes.
if command -v service >/dev/null && service rabbitmq-server status >/dev/null 2>&1; then
    service rabbitmq-server stop >/dev/null 2>&1 || true
fi
scripts/setup.sh
cargo build --release --locked -p warren-server -p warren-perf -p warrenctl
exec python3 bench/bench.py
