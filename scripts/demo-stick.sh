#!/usr/bin/env bash
# Writes a bootable stick image from the project's own fixture ISO and shows
# what it wrote. Installs missing Debian packages and builds the fixture first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
out=fixtures/out
iso="$out/boot-classic.iso"
if [[ ! -f $iso ]]; then
  bash fixtures/build-boot-iso.sh "$out" >&2
fi
image=${1:-demo-stick.img}
cargo build --release --quiet
rm -f "$image"
./target/release/livestick write "$iso" "$image" --size 1G \
  --overlay-size-mb 256 --home-size-mb 64 --unencrypted-home --yes
echo
sfdisk --dump "$image"
echo "Boot it: qemu-system-x86_64 -accel tcg -m 1024 -nographic -drive file=$image,format=raw"
