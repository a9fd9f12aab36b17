#!/usr/bin/env bash
# Boots the harness VM (Debian's kernel + an initramfs from build-initramfs.sh)
# under QEMU (TCG, or KVM with VM_ACCEL=kvm), with the serial console on stdout and in LOG, and waits for
# it to power off.
#
#   benches/vm/run.sh INITRD LOG [QEMU_ARGS...]
#
# QEMU_ARGS: the disks, usually built with vm_disk / vm_stick from
# benches/vm/lib.sh, e.g.
#   . benches/vm/lib.sh; VM_ARGS=(); vm_stick stick0 stick.img
#   benches/vm/run.sh initrd.cpio console.log "${VM_ARGS[@]}"
# Environment:
#   VM_MEM      MiB of RAM (2048)        VM_SMP      vCPUs (2)
#   VM_APPEND   extra kernel arguments; guest.NAME=VALUE becomes $NAME in the
#               guest script
#   VM_TIMEOUT  seconds before the VM is killed (7200)
#   VM_QMP      path of a QMP socket to create, for a caller that injects
#               faults while the guest runs (device_del, blkdebug, …)
#   VM_KVER     kernel version (default: newest in /boot with modules)
#   VM_ACCEL    tcg (default) or kvm, where the host's KVM works
#   VM_QUIET=1  console only to LOG, not to stdout
# Exit status: the guest script's ("VM-GUEST-EXIT N" on the console), or 125
# when the VM never got there (did not boot, crashed, timed out).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/vm/lib.sh
. "$HERE/lib.sh"

INITRD=${1:?usage: run.sh INITRD LOG [QEMU_ARGS...]}
LOG=${2:?usage: run.sh INITRD LOG [QEMU_ARGS...]}
shift 2
KVER=$(vm_kver)
KERNEL=/boot/vmlinuz-$KVER

# TCG unless told: a /dev/kvm can be present and still hang the guest (it does on
# the development host), so KVM is asked for, not guessed. Under TCG the guest
# CPU is ~30x slower than hardware; under KVM the figures approach a real host's.
accel=${VM_ACCEL:-tcg}
qemu=(qemu-system-x86_64 -accel "$accel" -machine q35 -cpu max -smp "${VM_SMP:-2}" -m "${VM_MEM:-2048}"
    -kernel "$KERNEL" -initrd "$INITRD"
    # panic=-1 with -no-reboot: a guest panic ends QEMU instead of hanging.
    -append "console=ttyS0 panic=-1 quiet loglevel=4 ${VM_APPEND:-}"
    -no-reboot -display none -monitor none -serial stdio -nodefaults)
[[ -n ${VM_QMP:-} ]] && qemu+=(-qmp "unix:$VM_QMP,server=on,wait=off")
qemu+=("$@")

: >"$LOG"
set +e
if [[ ${VM_QUIET:-0} == 1 ]]; then
    timeout -k 10 "${VM_TIMEOUT:-7200}" "${qemu[@]}" </dev/null >"$LOG" 2>&1
else
    timeout -k 10 "${VM_TIMEOUT:-7200}" "${qemu[@]}" </dev/null 2>&1 | tee "$LOG"
fi
set -e
# The console may use CRLF line ends.
status=$(tr -d '\r' <"$LOG" | sed -n 's/^VM-GUEST-EXIT \([0-9][0-9]*\)$/\1/p' | tail -1)
if [[ -z $status ]]; then
    echo "vm: the guest did not finish (see $LOG)" >&2
    exit 125
fi
exit "$status"
