#!/usr/bin/env bash
# The chaos stage: builds warren, warrenctl and the fault-testing harness (chaos-tests/), then
# runs a short batch of seeded chaos runs, one nemesis after another, each on a fresh 3-node
# cluster in network namespaces (docs/chaos.md). Fails when any run's verdict fails, and
# prints that run's summary. Needs root (namespaces, iptables, tmpfs); installs iproute2,
# iptables and faketime when missing.
#
#   CHAOS_NEMESES   comma-separated nemeses (default: every fault kind once)
#   CHAOS_SEED      first seed (default 1), CHAOS_COUNT seeds per nemesis (default 1)
#   CHAOS_DURATION  seconds of faults per run (default 20)
#   CHAOS_OUT       where run directories go (default $CARGO_TARGET_DIR/chaos-ci)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "chaos: this stage needs root (network namespaces, iptables, tmpfs)" >&2
    exit 1
fi

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v faketime >/dev/null 2>&1 || need+=(faketime)
if ((${#need[@]})); then
    echo "chaos: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
scripts/setup.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"
export CARGO_INCREMENTAL=0
export CARGO_TERM_COLOR=never
cargo build --locked -p warren-server -p warrenctl -p chaos-tests

chaos="$CARGO_TARGET_DIR/debug/chaos"
out="${CHAOS_OUT:-$CARGO_TARGET_DIR/chaos-ci}"
rm -rf "$out"
mkdir -p "$out"
"$chaos" cleanup

nemeses="${CHAOS_NEMESES:-partition,kill,pause,restart,membership,clock,disk}"
status=0
"$chaos" batch --nemeses "$nemeses" --seed "${CHAOS_SEED:-1}" --count "${CHAOS_COUNT:-1}" \
    --duration "${CHAOS_DURATION:-20}" --out "$out" || status=$?

# Print the summary of every run that did not pass, so the CI log says why.
for s in "$out"/*/summary.json; do
    [ -f "$s" ] || continue
    if ! grep -q '"verdict": "pass"' "$s"; then
        echo
        cat "$(dirname "$s")/summary.txt"
    fi
done
if [ "$status" -ne 0 ]; then
    echo "chaos: FAILED (run directories in $out)" >&2
fi
exit "$status"
