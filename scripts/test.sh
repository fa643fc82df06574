#!/usr/bin/env bash
# Runs Warren's whole default test suite: formatting and lint checks, every crate's unit and
# property tests, the integration tests that start real `warren` processes and drive them with
# a real AMQP client, and the pika suite (installed into a venv here). Fault-injection tests
# that need root and network namespaces are a separate stage (chaos-tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"
export CARGO_INCREMENTAL=0
export CARGO_TERM_COLOR=never
stage() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

stage "fetch"
cargo fetch --locked

stage "format"
cargo fmt --all --check

stage "pure crates stay pure"
for crate in warren-codec warren-core; do
    if cargo tree -p "$crate" -e normal --prefix none | grep -Eq '^(tokio|tonic|rocksdb|openraft) '; then
        echo "$crate must not depend on tokio, tonic, rocksdb or openraft" >&2
        exit 1
    fi
done

stage "build"
cargo build --locked --workspace --all-targets

stage "clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings

stage "rust tests"
cargo test --locked --workspace --no-fail-fast

stage "python (pika) tests"
venv="${WARREN_VENV:-$HOME/.cache/warren/venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q -r tests/python/requirements.txt
WARREN_BIN="$CARGO_TARGET_DIR/debug/warren" "$venv/bin/python" -m pytest -q tests/python

stage "done"
