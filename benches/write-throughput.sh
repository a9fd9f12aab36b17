#!/usr/bin/env bash
# Throughput of `livestick write` against baselines measured in the same run:
#   - dd bs=4M conv=fsync of the same number of bytes to the same kind of target
#   - a batch of 4 targets vs 4 sequential single writes vs dd to each
# Prints ratios; asserts nothing (timings never gate tests).
#
#   benches/write-throughput.sh [SQUASHFS_MIB] [DIR] [BATCH_DIR]
#
# DIR holds the ISO and the single-target images (a real disk); BATCH_DIR
# (default /dev/shm, a tmpfs) holds the batch targets, so the batch measures
# livestick rather than the disk.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-512}
DIR=${2:-$(mktemp -d /var/tmp/livestick-bench.XXXXXX)}
BATCH_DIR=${3:-/dev/shm/livestick-bench}
mkdir -p "$DIR" "$BATCH_DIR"
trap 'rm -rf "$DIR"/*.img "$DIR"/root "$BATCH_DIR"' EXIT

cargo build --release --quiet
LS=./target/release/livestick

# A live-shaped ISO whose squashfs.img is $MIB MiB of incompressible data:
# the copy cost is real and nothing is compressed away.
ISO=$DIR/bench-$MIB.iso
if [[ ! -f $ISO ]]; then
  mkdir -p "$DIR/root/LiveOS" "$DIR/root/isolinux" "$DIR/root/EFI/BOOT"
  { printf 'hsqs'; head -c $((MIB * 1024 * 1024 - 4)) /dev/urandom; } >"$DIR/root/LiveOS/squashfs.img"
  head -c 8M /dev/urandom >"$DIR/root/isolinux/vmlinuz"
  head -c 32M /dev/urandom >"$DIR/root/isolinux/initrd.img"
  cp "$DIR/root/isolinux/vmlinuz" "$DIR/root/isolinux/initrd.img" "$DIR/root/EFI/BOOT/" 2>/dev/null || true
  printf 'EFI' >"$DIR/root/EFI/BOOT/BOOTX64.EFI"
  cat >"$DIR/root/isolinux/isolinux.cfg" <<'CFG'
default linux
timeout 50
label linux
  menu label Start bench
  kernel vmlinuz
  append initrd=initrd.img root=live:CDLABEL=BENCH rd.live.image quiet
CFG
  xorriso -as mkisofs -quiet -R -J -V BENCH -o "$ISO" "$DIR/root"
  rm -rf "$DIR/root"
fi
SIZE=$(( MIB * 2 + 512 ))M

now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc -l; }

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

# Bytes livestick writes for one target (from the plan), for the dd baseline.
BYTES=$($LS --json write "$ISO" "$DIR/probe.img" --size "$SIZE" --dry-run | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_to_write"])')

run_single() { # $1 image, extra args...
  local img=$1; shift
  rm -f "$img"
  $LS -q write "$ISO" "$img" --size "$SIZE" --noverify "$@" >/dev/null
}

# The baseline copies the ISO itself: the same source reads and about the
# same number of bytes written, with nothing but the copy.
ISO_BYTES=$(stat -c %s "$ISO")
dd_to() { # $1 image
  rm -f "$1"
  dd if="$ISO" of="$1" bs=4M conv=fsync status=none
}

echo "squashfs: $MIB MiB; bytes per target: $BYTES; dir: $DIR"

drop_caches; t0=$(now); dd_to "$DIR/dd.img"; t1=$(now)
T_DD=$(elapsed "$t0" "$t1")
drop_caches; t0=$(now); run_single "$DIR/one.img"; t1=$(now)
T_ONE=$(elapsed "$t0" "$t1")
drop_caches; t0=$(now); run_single "$DIR/one-nv.img" --no-verify-write; t1=$(now)
T_ONE_NV=$(elapsed "$t0" "$t1")

drop_caches; t0=$(now); run_single "$BATCH_DIR/one.img"; t1=$(now)
T_ONE_B=$(elapsed "$t0" "$t1"); rm -f "$BATCH_DIR/one.img"
drop_caches; t0=$(now)
for i in 1 2 3 4; do dd_to "$BATCH_DIR/dd$i.img"; rm -f "$BATCH_DIR/dd$i.img"; done
t1=$(now); T_DD4=$(elapsed "$t0" "$t1")
drop_caches; t0=$(now)
for i in 1 2 3 4; do run_single "$BATCH_DIR/seq$i.img"; rm -f "$BATCH_DIR/seq$i.img"; done
t1=$(now); T_SEQ4=$(elapsed "$t0" "$t1")
drop_caches; t0=$(now)
$LS -q write "$ISO" "$BATCH_DIR/b1.img" "$BATCH_DIR/b2.img" "$BATCH_DIR/b3.img" "$BATCH_DIR/b4.img" --size "$SIZE" --noverify >/dev/null
t1=$(now); T_BATCH4=$(elapsed "$t0" "$t1")

printf '\n%-44s %8s  %s\n' "case" "seconds" "ratio"
# Throughput ratios are per byte: livestick writes $BYTES, dd copies $ISO_BYTES.
ratio() { echo "($BYTES / $1) / ($ISO_BYTES / $2)" | bc -l; }
printf '%-44s %8.2f\n' "dd if=ISO bs=4M conv=fsync ($ISO_BYTES B)" "$T_DD"
printf '%-44s %8.2f  throughput vs dd: %.2f (goal >= 0.9)\n' "livestick write (read-back verify on)" "$T_ONE" "$(ratio "$T_ONE" "$T_DD")"
printf '%-44s %8.2f  throughput vs dd: %.2f\n' "livestick write --no-verify-write" "$T_ONE_NV" "$(ratio "$T_ONE_NV" "$T_DD")"
echo "batch targets in $BATCH_DIR:"
printf '%-44s %8.2f\n' "  one livestick write" "$T_ONE_B"
printf '%-44s %8.2f\n' "  dd to 4 targets, one after another" "$T_DD4"
printf '%-44s %8.2f  vs 4 dd: %.2f\n' "  4 sequential livestick writes" "$T_SEQ4" "$(echo "$T_SEQ4 / $T_DD4" | bc -l)"
printf '%-44s %8.2f  vs one write: %.2f (goal <= 1.5)  vs 4 sequential: %.2f\n' "  batch of 4 (one ISO read)" "$T_BATCH4" \
  "$(echo "$T_BATCH4 / $T_ONE_B" | bc -l)" "$(echo "$T_BATCH4 / $T_SEQ4" | bc -l)"
