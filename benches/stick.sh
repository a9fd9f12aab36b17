#!/usr/bin/env bash
# What a write costs on a USB stick, measured where the page cache cannot hide
# it: livestick runs inside a small QEMU (TCG) VM and writes to virtio disks
# throttled like a stick (30 MB/s write, 100 MB/s read, O_DIRECT on the host),
# against baselines measured in the same VM run:
#   dd_iso      dd if=ISO of=STICK bs=4M oflag=direct conv=fsync
#   dd_payload  dd of LiveOS/squashfs.img's bytes only
#   write       livestick write ISO STICK --overlay-size-mb N --home-size-mb N
#               --unencrypted-home (read-back verification on)
#   write_luks  the same with a LUKS home (PBKDF2, LUKS_ITER_MS: cheap KDF)
#   batch4      one livestick write to 4 sticks, each throttled on its own
#   write_zst   write's command with the ISO compressed by zstd (-3) as the
#               source: unpacked in the guest's $TMPDIR, then written
# Each timed window ends with sync and blockdev --flushbufs. Per case: wall
# seconds, CPU seconds (user+sys of the command and its children), MiB
# written to and read from the stick(s) (/sys/block/vdX/stat), peak RSS, and
# wall time relative to dd_iso and dd_payload. The guest CPU is emulated
# (~30x slower than hardware): a case whose CPU time nears its wall time is
# CPU-bound here, not I/O-bound. Asserts nothing: exits non-zero only when
# the VM did not run.
#
#   benches/stick.sh [ISO...]        ISO: lab, big, or a path (default: lab big)
#
# lab: fixtures/out/boot-classic.iso (built by fixtures/build-boot-iso.sh);
# big: a live-shaped ISO whose squashfs is BIG_MIB MiB of random bytes.
# Environment:
#   OVERLAY_MB HOME_MB  persistence sizes (4095 each; a 4095+4095 write is
#                       ~8 GiB per stick, several minutes at 30 MB/s)
#   CASES               subset/order of the cases above
#   BIG_MIB             squashfs size of the big ISO (512)
#   VM_MEM              guest MiB (2048 + 4x the ISO: write_zst unpacks into
#                       /tmp, a tmpfs of half the RAM)
#   LUKS_ITER_MS        PBKDF2 time for write_luks (100)
#   BENCH_DIR           work directory (target/bench-stick): ISOs, the four
#                       16 GiB sparse stick images (removed at the end),
#                       initramfs, console logs
# Needs root only for the lab ISO (dracut); packages: scripts/deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/vm/lib.sh
. benches/vm/lib.sh

export OVERLAY_MB=${OVERLAY_MB:-4095} HOME_MB=${HOME_MB:-4095}
BIG_MIB=${BIG_MIB:-512}
WORK=${BENCH_DIR:-target/bench-stick}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
(($#)) || set -- lab big

cargo build --release --quiet
LS=${CARGO_TARGET_DIR:-target}/release/livestick

iso_path() { # lab | big | PATH
    case $1 in
        lab)
            bash fixtures/build-boot-iso.sh fixtures/out >&2
            echo "$PWD/fixtures/out/boot-classic.iso"
            ;;
        big) big_iso ;;
        *) readlink -f "$1" ;;
    esac
}

# A live-shaped ISO whose squashfs.img is incompressible: the copy cost is
# real (as in benches/write-throughput.sh). Cached by size.
big_iso() {
    local iso=$WORK/live-big-$BIG_MIB.iso r=$WORK/big-root
    if [[ ! -f $iso ]]; then
        rm -rf "$r"
        mkdir -p "$r/LiveOS" "$r/isolinux" "$r/EFI/BOOT"
        { printf 'hsqs'; head -c $((BIG_MIB * 1024 * 1024 - 4)) /dev/urandom; } >"$r/LiveOS/squashfs.img"
        head -c 8M /dev/urandom >"$r/isolinux/vmlinuz"
        head -c 32M /dev/urandom >"$r/isolinux/initrd.img"
        # One kernel and initrd, as Fedora's ISOs have them (hard links, or one
        # directory that both menus name): copies would be bytes dd must write too.
        printf 'EFI' >"$r/EFI/BOOT/BOOTX64.EFI"
        cat >"$r/isolinux/isolinux.cfg" <<'CFG'
default linux
timeout 50
label linux
  menu label Start bench
  kernel vmlinuz
  append initrd=initrd.img root=live:CDLABEL=BENCH rd.live.image quiet
CFG
        xorriso -as mkisofs -quiet -R -J -V BENCH -o "$iso.tmp" "$r"
        mv "$iso.tmp" "$iso"
        rm -rf "$r"
    fi
    echo "$iso"
}

# The guest: livestick and everything it runs as a child.
INITRD=$WORK/initramfs.cpio
benches/vm/livestick-initramfs.sh "$INITRD" benches/vm/stick-guest.sh "$LS"

# Four sparse 16 GiB sticks with stale content in their first 256 MiB (a
# real stick is never blank); made anew for each ISO so that each run starts
# alike and the space is given back.
make_sticks() {
    local i
    for i in 0 1 2 3; do
        rm -f "$WORK/stick$i.img"
        head -c 256M /dev/urandom >"$WORK/stick$i.img"
        truncate -s 16G "$WORK/stick$i.img"
    done
}
trap 'rm -f "$WORK"/stick?.img' EXIT

failed=0
results=()
for want in "$@"; do
    iso=$(iso_path "$want")
    name=$(basename "$iso" .iso)
    # Where the payload lies in the ISO: xorriso's "File data lba: xt, start
    # LBA, blocks, size, path".
    read -r lba bytes < <(xorriso -indev "$iso" -find /LiveOS/squashfs.img -exec report_lba -- 2>/dev/null |
        awk -F, '/File data lba/ { gsub(/ /, ""); print $2, $4 }')
    echo "== $name: $(stat -c %s "$iso") B, squashfs.img $bytes B at $((lba * 2048)); overlay $OVERLAY_MB MiB, home $HOME_MB MiB"
    make_sticks
    VM_ARGS=()
    # The ISO is a source, not under test: read-only, host-cached, unthrottled.
    vm_disk iso "$iso" "readonly=on,cache=writeback"
    # The same ISO as a .iso.zst (cached), for write_zst; its exact length goes
    # on the kernel command line, since a disk is a whole number of sectors.
    zst=$WORK/$name.iso.zst
    [[ -f $zst && $zst -nt $iso ]] || zstd -q -3 -f "$iso" -o "$zst"
    vm_disk isozst "$zst" "readonly=on,cache=writeback"
    for i in 0 1 2 3; do vm_stick "stick$i" "$WORK/stick$i.img"; done
    append="guest.ISO_NAME=$name guest.PAYLOAD_OFF=$((lba * 2048)) guest.PAYLOAD_BYTES=$bytes"
    append+=" guest.ZST_BYTES=$(stat -c %s "$zst")"
    append+=" guest.OVERLAY_MB=$OVERLAY_MB guest.HOME_MB=$HOME_MB guest.LUKS_ITER_MS=${LUKS_ITER_MS:-100}"
    [[ -n ${CASES:-} ]] && append+=" guest.CASES=${CASES// /,}"
    log=$WORK/console-$name.log
    rc=0
    # The guest's /tmp is RAM: write_zst keeps the .iso.zst and what it unpacks there.
    mem=${VM_MEM:-$((2048 + 4 * $(stat -c %s "$iso") / 1048576))}
    VM_MEM=$mem VM_APPEND=$append benches/vm/run.sh "$INITRD" "$log" "${VM_ARGS[@]}" || rc=$?
    if ((rc)); then
        echo "stick: the VM for $name failed (status $rc); console in $log" >&2
        failed=1
    fi
    mapfile -t -O "${#results[@]}" results < <(tr -d '\r' <"$log" | grep '^BENCH ')
done

# key=value fields of the BENCH lines, as a table.
printf '\n%-14s %-11s %6s %9s %8s %9s %8s %8s %7s %7s\n' iso case status wall_s cpu_s write_MiB read_MiB rss_MiB vs_dd vs_pay
for line in "${results[@]}"; do
    declare -A f=()
    for kv in ${line#BENCH }; do f[${kv%%=*}]=${kv#*=}; done
    printf '%-14s %-11s %6s %9s %8s %9s %8s %8s %7s %7s\n' "${f[iso]}" "${f[case]}" "${f[status]}" \
        "${f[wall]}" "${f[cpu]}" "${f[wmib]}" "${f[rmib]}" "${f[rss_mib]}" "${f[vs_dd]}" "${f[vs_payload]}"
    unset f
done
echo "(vs_dd, vs_pay: wall time over dd_iso's and dd_payload's in the same VM run)"
exit "$failed"
