#!/usr/bin/env bash
# Checks formatting and lints (rustfmt, clippy), then runs every test: unit,
# integration (image files, a loop device when root), and the QEMU boot tests.
# Installs what the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
# House habits first, and fail fast: formatting, then clippy with every warning
# an error (the lint set is `[lints]` in Cargo.toml). Neither needs the Debian
# packages below.
for tool in fmt clippy; do
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    echo "cargo $tool is missing: rustup component add rustfmt clippy" >&2
    exit 1
  fi
done
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
perl scripts/layers.pl   # the layer rules of docs/design.md: no circles, nothing imports from above
bash scripts/deps.sh
# Release mode: the boot tests and read-back hashing are I/O and CPU heavy,
# and debug-mode sha256/md5 would dominate the run time. The integration tests,
# the QEMU boot tests (`boot::`) among them, are the one binary `integration`:
# arguments after `bash scripts/test.sh` go to every test binary as a filter
# (`bash scripts/test.sh write::`). README's "Tests" shows how to run the
# integration tests without the boot tests, or the boot tests alone.
cargo test --release --all-targets --no-fail-fast -- --test-threads=2 "$@"
