#!/bin/sh
# Device and option lists are split on purpose (busybox sh has no arrays).
# shellcheck disable=SC2086
# Guest side of benches/stick.sh (busybox sh, run as /guest.sh by the harness
# init): times each case against the throttled stick disks and prints one
# "BENCH ..." line per case on the serial console.
#
# Disks (by virtio serial): iso (the ISO, raw, unthrottled), stick0..stick3.
# Parameters (guest.NAME=VALUE kernel arguments):
#   ISO_NAME        label for the result lines
#   PAYLOAD_OFF     byte offset of LiveOS/squashfs.img in the ISO
#   PAYLOAD_BYTES   its size
#   OVERLAY_MB HOME_MB  persistence sizes for the livestick cases
#   LUKS_ITER_MS    PBKDF2 time for the encrypted home (cheap: the KDF is
#                   not what this measures)
#   CASES           which cases to run (default: all, in order)
# Each case: caches dropped, stick heads re-staled, then the command under
# /usr/bin/time, then sync and blockdev --flushbufs inside the timed window,
# so what the stick has not yet absorbed is counted.
# shellcheck source=/dev/null # written by build-initramfs.sh
. /lib/vm.sh
set -u

ISO=$(vm_dev iso) || exit 2
S0=$(vm_dev stick0) || exit 2
S1=$(vm_dev stick1) || exit 2
S2=$(vm_dev stick2) || exit 2
S3=$(vm_dev stick3) || exit 2
: "${ISO_NAME:=iso}" "${OVERLAY_MB:=4095}" "${HOME_MB:=4095}" "${LUKS_ITER_MS:=100}"
: "${CASES:=dd_iso dd_payload write write_luks batch4 write_zst}"
CASES=$(echo "$CASES" | tr , ' ') # commas on the kernel command line
printf 'benchpass' >/tmp/passphrase
echo "bench: iso=$ISO_NAME ($ISO, $(blockdev --getsize64 "$ISO") B) sticks=$S0 $S1 $S2 $S3 overlay=$OVERLAY_MB home=$HOME_MB"

now() { read -r up _ </proc/uptime; echo "$up"; }

# Sum of one /sys/block/vdX/stat field (3: sectors read, 7: sectors written)
# over the given devices.
sectors() {
    f=$1; shift
    t=0
    for d in "$@"; do
        t=$((t + $(awk -v f="$f" '{ print $f }' "/sys/block/${d#/dev/}/stat")))
    done
    echo "$t"
}

# A real stick is never blank: random bytes where a partition table would be
# (and no 0x55AA signature), so livestick formats it as it would a used
# stick, rather than finding the previous case's FAT and installing into it.
restale() {
    for d in "$@"; do
        dd if=/dev/urandom of="$d" bs=1M count=8 oflag=direct status=none
        dd if=/dev/zero of="$d" bs=1 seek=510 count=2 conv=notrunc status=none
    done
    sync
}

# Phase and note events from livestick --json (its stderr, through a FIFO,
# as they happen), stamped with seconds since T0: the phases' durations.
stamp() {
    while IFS= read -r line; do
        case $line in
            *'"progress"'*) ;;
            *) read -r up _ </proc/uptime
               echo "  [+$(awk -v a="$T0" -v b="$up" 'BEGIN { printf "%.2f", b - a }')s] $line" ;;
        esac
    done
}

DD_WALL='' PAYLOAD_WALL=''
# run_case NAME "DEVICES" CMD...: the timed window and the BENCH line.
run_case() {
    name=$1 devs=$2
    shift 2
    restale $devs
    sync
    echo 3 >/proc/sys/vm/drop_caches
    r0=$(sectors 3 $devs) w0=$(sectors 7 $devs)
    t0=$(now)
    rm -f /tmp/case.fifo
    mkfifo /tmp/case.fifo
    T0=$t0 stamp </tmp/case.fifo >/tmp/case.stamped &
    stamper=$!
    /usr/bin/time -f '%e %U %S %M %x' -o /tmp/time.out "$@" >/tmp/case.out 2>/tmp/case.fifo
    sync
    for d in $devs; do blockdev --flushbufs "$d"; done
    t1=$(now)
    r1=$(sectors 3 $devs) w1=$(sectors 7 $devs)
    # GNU time puts "Command exited with non-zero status N" first on failure.
    read -r _ user sys rss status <<EOF
$(tail -1 /tmp/time.out)
EOF
    wait "$stamper"
    [ "$status" = 0 ] || echo "bench: $name failed (exit $status):"
    tail -40 /tmp/case.stamped
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    [ "$name" = dd_iso ] && DD_WALL=$wall
    [ "$name" = dd_payload ] && PAYLOAD_WALL=$wall
    awk -v n="$name" -v iso="$ISO_NAME" -v wall="$wall" -v u="$user" -v s="$sys" -v rss="$rss" \
        -v r="$((r1 - r0))" -v w="$((w1 - w0))" -v st="$status" -v dd="$DD_WALL" -v pl="$PAYLOAD_WALL" 'BEGIN {
        printf "BENCH iso=%s case=%s status=%s wall=%.2f cpu=%.2f user=%.2f sys=%.2f wmib=%.1f rmib=%.1f rss_mib=%.1f vs_dd=%s vs_payload=%s\n",
            iso, n, st, wall, u + s, u, s, w / 2048, r / 2048, rss / 1024,
            dd == "" ? "-" : sprintf("%.2f", wall / dd), pl == "" ? "-" : sprintf("%.2f", wall / pl)
    }'
}

LS="livestick --json write $ISO"
PERSIST="--overlay-size-mb $OVERLAY_MB --home-size-mb $HOME_MB --yes --force"
for c in $CASES; do
    case $c in
        dd_iso) run_case dd_iso "$S0" dd if="$ISO" of="$S0" bs=4M oflag=direct conv=fsync ;;
        dd_payload) run_case dd_payload "$S0" dd if="$ISO" of="$S0" bs=4M oflag=direct conv=fsync \
            iflag=skip_bytes,count_bytes skip="$PAYLOAD_OFF" count="$PAYLOAD_BYTES" ;;
        write) run_case write "$S0" $LS "$S0" $PERSIST --unencrypted-home ;;
        write_luks) run_case write_luks "$S0" $LS "$S0" $PERSIST --passphrase-file /tmp/passphrase \
            --luks-pbkdf pbkdf2 --luks-iter-time "$LUKS_ITER_MS" ;;
        write_zst)
            # The compressed file as a user has it (not timed), then the write.
            head -c "$ZST_BYTES" "$(vm_dev isozst)" >"/tmp/$ISO_NAME.iso.zst"
            run_case write_zst "$S0" livestick --json write "/tmp/$ISO_NAME.iso.zst" "$S0" $PERSIST \
                --unencrypted-home
            rm -f "/tmp/$ISO_NAME.iso.zst" ;;
        batch4) run_case batch4 "$S0 $S1 $S2 $S3" $LS "$S0" "$S1" "$S2" "$S3" $PERSIST --unencrypted-home ;;
        *) echo "bench: unknown case $c" ;;
    esac
done
echo "bench: done"
