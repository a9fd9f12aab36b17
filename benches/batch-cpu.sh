#!/usr/bin/env bash
# CPU and peak memory of a batch of 4 sticks against one, on this host.
#
#   sudo benches/batch-cpu.sh [LIVESTICK] [ISO]
#
# The targets are loop devices over files in /dev/shm, so they take the block-device
# path (dirty limit, per-batch sync, page-cache drop and read-back on a third thread),
# not the image-file one. The bus is not what is measured (tmpfs is fast): the CPU is,
# user + sys from /usr/bin/time -v, which a slow stick does not change. Prints the
# figures and ratios; it asserts nothing.
#
#   LIVESTICK  the binary (default target/release/livestick)
#   ISO        the ISO (default: a live-shaped one with BIG_MIB MiB of random squashfs)
#   BIG_MIB    squashfs size of the default ISO (256)
#   STICK_MIB  size of each loop stick (2048)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/livestick}
BIG_MIB=${BIG_MIB:-256}
STICK_MIB=${STICK_MIB:-2048}
WORK=$(mktemp -d /dev/shm/livestick-batch-cpu.XXXXXX)
LOOPS=()
cleanup() {
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

iso=${2:-}
if [[ -z $iso ]]; then
    r=$WORK/root iso=$WORK/big.iso
    mkdir -p "$r/LiveOS" "$r/isolinux"
    { printf 'hsqs'; head -c $((BIG_MIB * 1024 * 1024 - 4)) /dev/urandom; } >"$r/LiveOS/squashfs.img"
    head -c 8M /dev/urandom >"$r/isolinux/vmlinuz"
    head -c 32M /dev/urandom >"$r/isolinux/initrd.img"
    printf 'default linux\nlabel linux\n  kernel vmlinuz\n  append initrd=initrd.img root=live:CDLABEL=BENCH rd.live.image\n' >"$r/isolinux/isolinux.cfg"
    xorriso -as mkisofs -quiet -R -J -V BENCH -o "$iso" "$r"
    rm -rf "$r"
fi

for i in 0 1 2 3; do
    truncate -s "${STICK_MIB}M" "$WORK/stick$i.img"
    LOOPS+=("$(losetup -f --show "$WORK/stick$i.img")")
done

# Prints "user sys wall maxrss_kib" of one livestick run.
measure() {
    local log=$WORK/time.log
    /usr/bin/time -v "$BIN" write "$iso" "$@" --overlay-size-mb 256 --home-size-mb 256 \
        --unencrypted-home --yes --force --quiet >/dev/null 2>"$log" || {
        cat "$log" >&2
        exit 1
    }
    awk -F': ' '/User time/{u=$2} /System time/{s=$2} /Elapsed/{w=$2} /Maximum resident/{m=$2}
        END {print u, s, w, m}' "$log"
}

read -r u1 s1 w1 m1 < <(measure "${LOOPS[0]}")
# A blank start again, so the batch writes four new sticks.
dd if=/dev/zero of="${LOOPS[0]}" bs=1M count=64 conv=fsync status=none
read -r u4 s4 w4 m4 < <(measure "${LOOPS[@]}")
echo "ISO $(du -m "$iso" | cut -f1) MiB, sticks of $STICK_MIB MiB (loop devices on tmpfs), $BIN"
printf '%-12s %8s %8s %8s %10s %12s\n' "" user_s sys_s cpu_s wall maxrss_mib
printf '%-12s %8.2f %8.2f %8.2f %10s %12.1f\n' "one stick" "$u1" "$s1" "$(echo "$u1 + $s1" | bc)" "$w1" "$(echo "$m1 / 1024" | bc -l)"
printf '%-12s %8.2f %8.2f %8.2f %10s %12.1f\n' "batch of 4" "$u4" "$s4" "$(echo "$u4 + $s4" | bc)" "$w4" "$(echo "$m4 / 1024" | bc -l)"
printf 'CPU of the batch / CPU of one stick: %.2f (4 sticks: 4.00 would be no sharing at all)\n' \
    "$(echo "($u4 + $s4) / ($u1 + $s1)" | bc -l)"
