#!/usr/bin/env bash
# Starts a single-node Warren broker with the built-in defaults: data in ./data, AMQP on
# port 5672 of every address, metrics on :15692. Extra arguments go to `warren`
# (see `warren --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/warren/target}"
exec cargo run --release --locked --bin warren -- "$@"
