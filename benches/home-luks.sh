#!/usr/bin/env bash
# Encrypted home creation: the time `livestick write` spends on a 1 GiB LUKS2
# home.img (write with home minus write without), against baselines measured
# in the same run: dd of the same bytes, and cryptsetup encrypting the same
# size offline (luksFormat-equivalent + full encryption with `reencrypt
# --encrypt`). Prints ratios; asserts nothing.
#
#   benches/home-luks.sh [HOME_MIB] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-1024}
DIR=${2:-$(mktemp -d /var/tmp/livestick-home-bench.XXXXXX)}
mkdir -p "$DIR"
trap 'rm -f "$DIR"/*.img "$DIR"/pass' EXIT
cargo build --release --quiet
LS=./target/release/livestick
bash fixtures/build-iso.sh fixtures/out >/dev/null
ISO=fixtures/out/fedora-classic.iso
printf 'bench passphrase' >"$DIR/pass"
SIZE=$(( MIB + 512 ))M
now() { date +%s.%N; }
t() { local t0 t1; t0=$(now); "$@" >/dev/null; t1=$(now); echo "$t1 - $t0" | bc -l; }

rm -f "$DIR/base.img" "$DIR/luks.img" "$DIR/plain.img"
T_BASE=$(t $LS -q write "$ISO" "$DIR/base.img" --size "$SIZE" --noverify)
T_LUKS=$(t $LS -q write "$ISO" "$DIR/luks.img" --size "$SIZE" --noverify --home-size-mb "$MIB" --passphrase-file "$DIR/pass")
T_PLAIN=$(t $LS -q write "$ISO" "$DIR/plain.img" --size "$SIZE" --noverify --home-size-mb "$MIB" --unencrypted-home)
T_DD=$(t dd if=/dev/zero of="$DIR/dd.img" bs=4M count=$(( MIB / 4 )) conv=fsync status=none)
T_CS=none
if command -v cryptsetup >/dev/null; then
  rm -f "$DIR/cs.img"
  truncate -s "${MIB}M" "$DIR/cs.img"
  mke2fs -q -t ext4 -b 4096 -L HOME -E lazy_itable_init=0,lazy_journal_init=0 "$DIR/cs.img" $(( (MIB - 32) * 256 ))
  T_CS=$(t cryptsetup reencrypt --encrypt --type luks2 --batch-mode --reduce-device-size 32M \
    --key-file "$DIR/pass" "$DIR/cs.img")
fi
HOME_LUKS=$(echo "$T_LUKS - $T_BASE" | bc -l)
HOME_PLAIN=$(echo "$T_PLAIN - $T_BASE" | bc -l)
printf '%-52s %8.2f\n' "write without home" "$T_BASE"
printf '%-52s %8.2f\n' "home.img ${MIB} MiB plain (write with minus without)" "$HOME_PLAIN"
printf '%-52s %8.2f\n' "home.img ${MIB} MiB LUKS2 argon2id (same)" "$HOME_LUKS"
printf '%-52s %8.2f  LUKS home vs dd: %.2f\n' "dd ${MIB} MiB conv=fsync" "$T_DD" "$(echo "$HOME_LUKS / $T_DD" | bc -l)"
if [[ $T_CS != none ]]; then
  printf '%-52s %8.2f  LUKS home vs cryptsetup: %.2f\n' "cryptsetup reencrypt --encrypt ${MIB} MiB" "$T_CS" "$(echo "$HOME_LUKS / $T_CS" | bc -l)"
fi
