#!/usr/bin/env bash
# Runs every test: unit, integration (image files, a loop device when root),
# and the QEMU boot tests. Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
# Release mode: the boot tests and read-back hashing are I/O and CPU heavy,
# and debug-mode sha256/md5 would dominate the run time.
cargo test --release --all-targets --no-fail-fast -- --test-threads=2 "$@"
