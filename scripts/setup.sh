#!/usr/bin/env bash
# Installs what building and testing Warren needs on a fresh Debian machine, and nothing
# when it is already there: libclang (bindgen for the RocksDB bindings), Debian's RocksDB
# library (linked instead of compiling RocksDB's C++, see docs/adr/0002-storage.md) and
# python3-venv for the pika test suite, and the openssl command the pika suite makes its
# test TLS certificate with.
set -euo pipefail

need=()
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
dpkg -s librocksdb-dev >/dev/null 2>&1 || need+=(librocksdb-dev)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    sudo_cmd=()
    if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
